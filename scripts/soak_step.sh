#!/bin/sh
# The reduction software of the soak test (scripts/soak.py), following the container
# contract (docs/manifest.md). It notes when it starts and ends in a ledger shared by every
# job (one short O_APPEND write each: lines never interleave), so the soak can prove that
# no attempt ran twice and no two runs of one step and sub-group ran at once, then writes
# its products in two halves with a pause between them, so a job killed by the fault
# driver leaves a partial file behind as a real one would.
#   soak_step.sh LEDGER
set -eu
ledger=$1
test -r "$WORKFLOW_MANIFEST" || { echo "no manifest at $WORKFLOW_MANIFEST" >&2; exit 2; }
note() {
  printf '%s %s %s %s %s\n' "$WORKFLOW_RUN_ID" "$WORKFLOW_ATTEMPT" "$WORKFLOW_STEP" "$1" "$(date +%s.%N)" >>"$ledger"
}
note start
pause() {
  # 0.2 to 1.0 s.
  n=$(od -An -N1 -tu1 /dev/urandom | tr -d ' ')
  sleep "0.$((2 + n % 9))"
}
write_in_halves() {
  printf 'first half of run %s attempt %s\n' "$WORKFLOW_RUN_ID" "$WORKFLOW_ATTEMPT" >"$1"
  pause
  printf 'second half\n' >>"$1"
}
if [ -d "$WORKFLOW_OUTPUT_DIR/science" ]; then
  write_in_halves "$WORKFLOW_OUTPUT_DIR/science/map.fits"
  echo '{"rms_mk": 12.5}' >"$WORKFLOW_OUTPUT_DIR/science/map.fits.metrics.json"
  echo "inputs: $(ls "$WORKFLOW_INPUT_DIR" | wc -l)" >"$WORKFLOW_OUTPUT_DIR/qa/summary.txt"
else
  mkdir -p "$WORKFLOW_OUTPUT_DIR"
  write_in_halves "$WORKFLOW_OUTPUT_DIR/result.dat"
fi
pause
note end

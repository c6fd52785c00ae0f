#!/bin/sh
# A pipeline step for the tests that honours the container contract (docs/manifest.md):
# it reads its manifest, checks its inputs are readable, and writes products into
# $WORKFLOW_OUTPUT_DIR. The first argument picks a behaviour:
#   ok            write products and exit 0
#   fail          print a reason and exit 3
#   sleep N       sleep N seconds first (time limits, cancellation)
#   echo-args ... write the remaining arguments, one per line, to args.txt (quoting tests)
#   empty         write nothing and exit 0 (a step that did not honour its contract)
#   hostile      also leave a link out of the run directory and a corrupt metrics file
#   big N        also write an N MiB science product (collection of large files)
set -eu
mode=${1:-ok}
[ "$#" -gt 0 ] && shift
test -r "$WORKFLOW_MANIFEST" || { echo "no manifest at $WORKFLOW_MANIFEST" >&2; exit 2; }
for input in "$WORKFLOW_INPUT_DIR"/*; do
  [ -e "$input" ] || continue
  [ -d "$input" ] || test -r "$input" || { echo "unreadable input $input" >&2; exit 2; }
done
case $mode in
  fail) echo "step failing on purpose" >&2; exit 3 ;;
  sleep) sleep "${1:-600}" ;;
  empty) echo "writing nothing"; exit 0 ;;
  echo-args) printf '%s\n' "$@" > "$WORKFLOW_OUTPUT_DIR/args.txt" ;;
esac
echo "run $WORKFLOW_RUN_ID attempt $WORKFLOW_ATTEMPT of step $WORKFLOW_STEP"
if [ -d "$WORKFLOW_OUTPUT_DIR/science" ]; then
  echo "map of run $WORKFLOW_RUN_ID" > "$WORKFLOW_OUTPUT_DIR/science/map.fits"
  echo '{"rms_mk": 12.5}' > "$WORKFLOW_OUTPUT_DIR/science/map.fits.metrics.json"
  echo "all good" > "$WORKFLOW_OUTPUT_DIR/qa/summary.txt"
else
  mkdir -p "$WORKFLOW_OUTPUT_DIR"
  echo "intermediate of run $WORKFLOW_RUN_ID" > "$WORKFLOW_OUTPUT_DIR/result.dat"
fi
case $mode in
  hostile)
    ln -s /etc/passwd "$WORKFLOW_OUTPUT_DIR/science/escape.fits"
    echo '{"rms_mk": ' > "$WORKFLOW_OUTPUT_DIR/qa/summary.txt.metrics.json" ;;
  big) dd if=/dev/zero of="$WORKFLOW_OUTPUT_DIR/science/cube.fits" bs=1M count="${1:-256}" 2>/dev/null ;;
esac

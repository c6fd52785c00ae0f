#!/usr/bin/env bash
# Runs nox from a private virtualenv (.venv-nox), creating it on first use, so that the
# tests run on a fresh Debian machine with only Rust and Python 3 installed.
#   bash scripts/nox.sh -s tests      # the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-nox

if [[ ! -x $VENV/bin/nox ]]; then
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian ships venv separately (python3-venv).
    if [[ $(id -u) -eq 0 && -f /etc/debian_version ]]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
      rm -rf "$VENV"
      python3 -m venv "$VENV"
    else
      echo "scripts/nox.sh: python3 -m venv failed; install python3-venv" >&2
      exit 1
    fi
  fi
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "nox>=2024.4"
fi
exec "$VENV/bin/nox" "$@"

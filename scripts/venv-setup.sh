#!/usr/bin/env bash
# The dev virtualenv: creates .venv and installs the project editable with test extras.
# Needs no root, so `make unit`, `make lint` and `make type` work for any user. It needs
# what libvirt-python builds against (libvirt-dev, pkg-config, gcc: `make host` as root
# installs them); without them it says so in one line.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
say() { printf 'host: %s\n' "$*"; }

if ! pkg-config --exists libvirt 2>/dev/null || ! command -v gcc >/dev/null 2>&1; then
  if ! "$VENV/bin/python" -c 'import libvirt' 2>/dev/null; then
    say "venv: libvirt-python needs libvirt-dev, pkg-config and gcc to build; run 'make host' as root (or apt install them)"
    exit 1
  fi
fi
stamp="$VENV/.flightvm-installed"
if [ ! -x "$VENV/bin/python" ]; then "$PYTHON" -m venv "$VENV"; say "venv: created $VENV"; fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >"$VENV/install.log" 2>&1
  "$VENV/bin/pip" install -q -e '.[test]' >>"$VENV/install.log" 2>&1 \
    || { say "venv: pip install failed, see $VENV/install.log"; tail -5 "$VENV/install.log"; exit 1; }
  touch "$stamp"
  say "venv: installed pytest-flightvm (editable, test extras)"
else
  say "venv: pytest-flightvm already installed"
fi

#!/usr/bin/env bash
# build-image.sh OUTPUT.qcow2: flightvm's build command for a flightctl E2E suite.
# Builds flightctl's own E2E agent image with its Makefile and copies the qcow2 out.
# FLIGHTCTL_SRC: the flightctl checkout (default: ./flightctl-src, a symlink to it).
set -euo pipefail
out=${1:?usage: build-image.sh OUTPUT.qcow2}
src=${FLIGHTCTL_SRC:-$(dirname "$0")/flightctl-src}
[ -f "$src/Makefile" ] || { echo "build-image.sh: no flightctl checkout at $src; set FLIGHTCTL_SRC" >&2; exit 2; }
make -C "$src" bin/output/qcow2/disk.qcow2 >&2
cp --sparse=always "$src/bin/output/qcow2/disk.qcow2" "$out"

#!/usr/bin/env bash
# Idempotent host setup for pytest-flightvm (Debian 12, no systemd).
#   - installs the Debian packages listed below (docs/HOST.md says why each is needed)
#   - starts virtlogd and libvirtd when they are not running
#   - starts a local CNCF registry on 127.0.0.1:5000 when none answers there, first
#     pruning what earlier test/bench/demo runs pushed to it
#   - creates .venv and installs the project editable with test extras
# Prints what it did and what was already in place; a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
REGISTRY_ADDR=${FLIGHTVM_LOCAL_REGISTRY:-127.0.0.1:5000}
REGISTRY_DIR=${FLIGHTVM_REGISTRY_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flightvm-registry}
PACKAGES=(
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  seabios ovmf libvirt-dev pkg-config gcc docker-registry mmdebstrap e2fsprogs fdisk
  grub-pc-bin grub2-common openssh-client openssh-server xorriso curl zstd apache2-utils dpkg-dev openssl
  ca-certificates util-linux time swtpm swtpm-tools dosfstools mtools
)

say() { printf 'host: %s\n' "$*"; }

# 1. Debian packages
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    say "missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"; exit 2
  fi
  say "installing ${#missing[@]} packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "packages: all ${#PACKAGES[@]} already installed"
fi

# 2a. /dev/kvm as udev would leave it (root:kvm 0660). Without udev it is root-only 0600;
# libvirt then probes QEMU as root (KVM usable) but validates as libvirt-qemu (KVM not
# usable), discards its capability cache on every domain define and re-probes QEMU:
# ~90 s per VM start under TCG. Guests still run under TCG here (see docs/HOST.md).
if [ -e /dev/kvm ] && [ "$(id -u)" -eq 0 ] && getent group kvm >/dev/null; then
  if [ "$(stat -c '%G %a' /dev/kvm)" = "kvm 660" ]; then say "/dev/kvm: already root:kvm 0660"
  else chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; say "/dev/kvm: set root:kvm 0660 (as udev would)"; fi
fi

# 2. libvirt daemons (no systemd here: start them ourselves, detached)
if [ "$(id -u)" -eq 0 ]; then
  if pgrep -x virtlogd >/dev/null; then say "virtlogd: already running"
  else setsid virtlogd -d; say "virtlogd: started"; fi
  if virsh -c qemu:///system version >/dev/null 2>&1; then say "libvirtd: already answering"
  else
    pgrep -x libvirtd >/dev/null || setsid libvirtd -d
    for _ in $(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
    virsh -c qemu:///system version >/dev/null 2>&1 || { say "libvirtd: did not answer on qemu:///system"; exit 1; }
    say "libvirtd: started"
  fi
else
  say "libvirt: not root, skipping daemon start (use qemu:///session)"
fi

# 3. local OCI registry (Debian's docker-registry) on loopback

# What test, fault, bench and demo runs push goes to throwaway repositories (by name;
# the project's base and the bench's reused copies stay). While the registry is down,
# drop those and garbage-collect their blobs, so repeated runs do not fill the disk
# (~0.5 GiB per `make test`). garbage-collect must not run beside a serving registry.
prune_registry() {
  local repos="$REGISTRY_DIR/data/docker/registry/v2/repositories" before after
  [ -d "$repos" ] || return 0
  before=$(du -sm "$REGISTRY_DIR/data" | cut -f1)
  rm -rf "$repos/flightvm-test" "$repos/flightvm-faults" "$repos"/flightvm/base-demo-*
  if [ -d "$repos/flightvm-bench" ]; then
    find "$repos/flightvm-bench" -mindepth 1 -maxdepth 1 ! -name base ! -name podman-seed \
      -exec rm -rf {} +
    # booted states (tags <prefix>-state-<key>, ~290 MiB each) pushed next to the bench's
    # base copy: a bench or test run's throwaways, keyed by QEMU version and seed; the base's
    # own tags stay. Untagged, their manifests and blobs go in the GC below.
    find "$repos/flightvm-bench/base/_manifests/tags" -mindepth 1 -maxdepth 1 -name '*-state-*' \
      -exec rm -rf {} + 2>/dev/null || true
  fi
  if /usr/bin/docker-registry garbage-collect --delete-untagged "$REGISTRY_DIR/config.yml" \
      >"$REGISTRY_DIR/gc.log" 2>&1; then
    after=$(du -sm "$REGISTRY_DIR/data" | cut -f1)
    say "registry: pruned test/bench/demo pushes, $((before - after)) MiB freed (${after} MiB kept)"
  else
    say "registry: garbage-collect failed (see $REGISTRY_DIR/gc.log); starting anyway"
  fi
}

# PRUNE_REGISTRY=1 (`make registry-prune`): stop the registry this script started (by the
# pid it recorded, and only if that pid is still docker-registry), so it is pruned now.
if [ "${PRUNE_REGISTRY:-}" = 1 ] && [ -f "$REGISTRY_DIR/registry.pid" ]; then
  pid=$(cat "$REGISTRY_DIR/registry.pid")
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = docker-registry ]; then
    kill "$pid"
    for _ in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    say "registry: stopped pid $pid to prune it"
  fi
fi
if curl -fsS -m 2 "http://$REGISTRY_ADDR/v2/" >/dev/null 2>&1; then
  say "registry: already answering on $REGISTRY_ADDR"
else
  mkdir -p "$REGISTRY_DIR/data"
  cat > "$REGISTRY_DIR/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $REGISTRY_DIR/data
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDR
YML
  prune_registry
  setsid /usr/bin/docker-registry serve "$REGISTRY_DIR/config.yml" >"$REGISTRY_DIR/registry.log" 2>&1 < /dev/null &
  echo $! > "$REGISTRY_DIR/registry.pid"
  for _ in $(seq 1 50); do curl -fsS -m 1 "http://$REGISTRY_ADDR/v2/" >/dev/null 2>&1 && break; sleep 0.2; done
  curl -fsS -m 2 "http://$REGISTRY_ADDR/v2/" >/dev/null || { say "registry: failed to start, see $REGISTRY_DIR/registry.log"; exit 1; }
  say "registry: started on $REGISTRY_ADDR (data in $REGISTRY_DIR, pid $(cat "$REGISTRY_DIR/registry.pid"))"
fi

# 4. virtualenv with the project installed editable (needs no root: scripts/venv-setup.sh)
VENV="$VENV" PYTHON="$PYTHON" ./scripts/venv-setup.sh

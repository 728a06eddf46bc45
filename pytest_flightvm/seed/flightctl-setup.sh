#!/bin/bash
# flightvm-setup: provision the flightctl agent from the NoCloud seed ISO.
#
# Runs in the guest, as root, from cloud-init's runcmd (that is, inside
# cloud-final.service). It must never wait for cloud-init itself: no
# `cloud-init status --wait` here, that would wait on its own caller.
#
# Usage: flightctl-setup.sh [SEED_DIR]
#   SEED_DIR  the root of an already mounted seed (holding flightctl/).
#             Default: find the volume labelled "cidata" and mount it read-only.
#
# Steps, each reported as one line on the console, on stdout and in
# /var/log/flightvm-setup.log:
#   flightvm-setup: step N/7 NAME: ok (...) | skipped (...) | FAILED REASON
#   1 mount-seed  2 packages  3 config  4 certs  5 ca-trust  6 registry  7 agent
# The first failure ends the run with exit status 1 and a final
# "flightvm-setup: FAILED at step N/7 NAME" line; success ends with
# "flightvm-setup: done".
#
# Test-only knobs (the guest never sets them):
#   FLIGHTVM_SETUP_ROOT     prefix for every guest path read or written (default: /)
#   FLIGHTVM_SETUP_CONSOLE  file that gets the console lines instead of /dev/console
#   FLIGHTVM_SETUP_TIMEOUT  seconds to wait for the agent to turn active (default: 90)

# The step functions are called indirectly through step(); shellcheck 0.9
# takes them for unreachable code.
# shellcheck disable=SC2317

set -u -o pipefail
umask 022

ROOT=${FLIGHTVM_SETUP_ROOT:-}
ROOT=${ROOT%/}
TOTAL=7
UNIT=flightctl-agent.service
LOG_PATH=/var/log/flightvm-setup.log
LOG=$ROOT$LOG_PATH
SEED_ARG=${1:-}
SEED=""
MOUNTED=""
REASON=""
NOTE=""

mkdir -p "${LOG%/*}" 2>/dev/null
touch "$LOG" 2>/dev/null && chmod 0640 "$LOG" 2>/dev/null

log() {
    printf '%s\n' "$*" >>"$LOG" 2>/dev/null
}

console() {
    local dev
    if [ -n "${FLIGHTVM_SETUP_CONSOLE:-}" ]; then
        printf '%s\n' "$1" >>"$FLIGHTVM_SETUP_CONSOLE" 2>/dev/null
        return 0
    fi
    for dev in /dev/console /dev/ttyS0; do
        if [ -c "$dev" ] && { printf '%s\n' "$1" >"$dev"; } 2>/dev/null; then
            return 0
        fi
    done
    return 0
}

# One status line: stdout (cloud-init-output.log), the console, the log file.
say() {
    local line="flightvm-setup: $*"
    printf '%s\n' "$line"
    console "$line"
    log "$(date -u +%Y-%m-%dT%H:%M:%SZ) $line"
}

# run DESC CMD...: run CMD with its output in the log. On failure, REASON
# names DESC, the exit status and the last line CMD printed.
run() {
    local desc=$1 out rc
    shift
    log "+ $*"
    out=$("$@" 2>&1)
    rc=$?
    [ -n "$out" ] && log "$out"
    if [ "$rc" -ne 0 ]; then
        REASON="$desc failed (exit $rc)"
        [ -n "$out" ] && REASON="$REASON: $(printf '%s\n' "$out" | tail -n 1)"
        return 1
    fi
    return 0
}

have() {
    command -v "$1" >/dev/null 2>&1
}

cleanup() {
    if [ -n "$MOUNTED" ]; then
        umount "$MOUNTED" >>"$LOG" 2>&1 || log "umount $MOUNTED failed"
        rmdir "$MOUNTED" 2>/dev/null
    fi
}
trap cleanup EXIT

# step N NAME FUNCTION: FUNCTION returns 0 (ok), 3 (skipped) or anything else
# (failed, with REASON set). NOTE adds detail to ok and skipped.
step() {
    local n=$1 name=$2 fn=$3 rc
    REASON=""
    NOTE=""
    "$fn"
    rc=$?
    case $rc in
        0) say "step $n/$TOTAL $name: ok${NOTE:+ ($NOTE)}" ;;
        3) say "step $n/$TOTAL $name: skipped${NOTE:+ ($NOTE)}" ;;
        *)
            say "step $n/$TOTAL $name: FAILED ${REASON:-exit status $rc}"
            say "FAILED at step $n/$TOTAL $name (details in $LOG_PATH)"
            exit 1
            ;;
    esac
}

# ---------------------------------------------------------------- 1 mount-seed

# Candidate devices for the seed, best first. /dev/disk/by-label needs udev
# rules some guests lack, so blkid and the cdrom devices follow.
seed_candidates() {
    local dev label
    for dev in "$ROOT/dev/disk/by-label/cidata" "$ROOT/dev/disk/by-label/CIDATA"; do
        [ -e "$dev" ] && printf '%s\n' "$dev"
    done
    if have blkid; then
        for label in cidata CIDATA; do
            dev=$(blkid -L "$label" 2>/dev/null) && [ -n "$dev" ] && printf '%s\n' "$dev"
        done
    fi
    for dev in "$ROOT"/dev/sr[0-9]*; do
        [ -e "$dev" ] && printf '%s\n' "$dev"
    done
    return 0
}

mount_seed() {
    local dev dir tried=""
    if [ -n "$SEED_ARG" ]; then
        SEED=${SEED_ARG%/}
        if [ ! -f "$SEED/flightctl/config.yaml" ]; then
            REASON="$SEED has no flightctl/config.yaml"
            return 1
        fi
        NOTE="using $SEED"
        return 0
    fi
    # A private parent directory: the seed may carry private keys.
    if ! { mkdir -p "$ROOT/run/flightvm" && chmod 0700 "$ROOT/run/flightvm"; }; then
        REASON="cannot create $ROOT/run/flightvm"
        return 1
    fi
    dir=$ROOT/run/flightvm/seed
    mkdir -p "$dir" || {
        REASON="cannot create $dir"
        return 1
    }
    while IFS= read -r dev; do
        case " $tried " in *" $dev "*) continue ;; esac
        tried="${tried:+$tried }$dev"
        if ! run "mount $dev" mount -t iso9660 -o ro "$dev" "$dir"; then
            continue
        fi
        if [ -f "$dir/flightctl/config.yaml" ]; then
            MOUNTED=$dir
            SEED=$dir
            NOTE="$dev on ${dir#"$ROOT"}"
            return 0
        fi
        log "$dev has no flightctl/config.yaml"
        umount "$dir" >>"$LOG" 2>&1
    done < <(seed_candidates)
    if [ -z "$tried" ]; then
        REASON="no seed device: no /dev/disk/by-label/cidata, blkid -L cidata found nothing, no /dev/sr*"
    else
        REASON="no seed with flightctl/config.yaml among: $tried${REASON:+ (last error: $REASON)}"
    fi
    rmdir "$dir" 2>/dev/null
    return 1
}

# ---------------------------------------------------------------- 2 packages

usr_writable() {
    local probe="$ROOT/usr/.flightvm-write-test.$$"
    if { : >"$probe"; } 2>/dev/null; then
        rm -f "$probe"
        return 0
    fi
    return 1
}

# Image-mode (bootc/ostree) guests have a read-only /usr: make it writable
# with a transient overlay (gone at the next boot) instead of failing.
unlock_usr() {
    if usr_writable; then
        return 0
    fi
    if have bootc && run "bootc usr-overlay" bootc usr-overlay && usr_writable; then
        NOTE="${NOTE:+$NOTE, }transient /usr overlay via bootc usr-overlay"
        return 0
    fi
    if have ostree && run "ostree admin unlock" ostree admin unlock --transient && usr_writable; then
        NOTE="${NOTE:+$NOTE, }transient /usr overlay via ostree admin unlock"
        return 0
    fi
    if ! have bootc && ! have ostree; then
        REASON="image-mode guest with read-only /usr and neither bootc nor ostree to unlock it"
    else
        REASON="image-mode guest: /usr is still read-only${REASON:+ ($REASON)}"
    fi
    return 1
}

install_packages() {
    local dir=$SEED/flightctl/rpms f tools=""
    local -a rpms=() debs=()
    if [ -d "$dir" ]; then
        for f in "$dir"/*.rpm; do [ -f "$f" ] && rpms+=("$f"); done
        for f in "$dir"/*.deb; do [ -f "$f" ] && debs+=("$f"); done
    fi
    if [ "${#rpms[@]}" -eq 0 ] && [ "${#debs[@]}" -eq 0 ]; then
        NOTE="no .rpm or .deb in flightctl/rpms"
        return 3
    fi
    if [ -e "$ROOT/run/ostree-booted" ]; then
        unlock_usr || return 1
    fi
    if [ "${#rpms[@]}" -gt 0 ]; then
        if have dnf; then
            # Local files first without repos (works offline); with repos if
            # their dependencies need them.
            run "dnf install" dnf -y --disablerepo='*' install "${rpms[@]}" ||
                run "dnf install" dnf -y install "${rpms[@]}" || return 1
            tools="dnf"
        elif have rpm; then
            run "rpm -U" rpm -U --replacepkgs "${rpms[@]}" || return 1
            tools="rpm"
        else
            REASON="no dnf or rpm to install ${#rpms[@]} .rpm file(s)"
            return 1
        fi
    fi
    if [ "${#debs[@]}" -gt 0 ]; then
        if have apt-get; then
            run "apt-get install" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y --no-install-recommends "${debs[@]}" || return 1
            tools="${tools:+$tools+}apt-get"
        elif have dpkg; then
            run "dpkg -i" dpkg -i "${debs[@]}" || return 1
            tools="${tools:+$tools+}dpkg"
        else
            REASON="no apt-get or dpkg to install ${#debs[@]} .deb file(s)"
            return 1
        fi
    fi
    NOTE="$((${#rpms[@]} + ${#debs[@]})) package file(s) with $tools${NOTE:+, $NOTE}"
    return 0
}

# ---------------------------------------------------------------- 3 config

install_config() {
    run "install config.yaml" install -D -m 0644 "$SEED/flightctl/config.yaml" \
        "$ROOT/etc/flightctl/config.yaml" || return 1
    NOTE="/etc/flightctl/config.yaml"
}

# ---------------------------------------------------------------- 4 certs

install_certs() {
    local src=$SEED/flightctl/certs dest=$ROOT/etc/flightctl/certs f n=0
    if [ ! -d "$src" ]; then
        NOTE="no flightctl/certs on the seed"
        return 3
    fi
    if [ ! -d "$dest" ]; then
        run "create /etc/flightctl/certs" install -d -m 0700 "$dest" || return 1
    fi
    for f in "$src"/*; do
        [ -f "$f" ] || continue
        run "install certs/${f##*/}" install -m 0600 "$f" "$dest/${f##*/}" || return 1
        n=$((n + 1))
    done
    if [ "$n" -eq 0 ]; then
        NOTE="flightctl/certs is empty"
        return 3
    fi
    NOTE="$n file(s) in /etc/flightctl/certs"
}

# ---------------------------------------------------------------- 5 ca-trust

install_ca() {
    local src=$SEED/flightctl/ca.pem
    if [ ! -f "$src" ]; then
        NOTE="no flightctl/ca.pem on the seed"
        return 3
    fi
    if have update-ca-trust; then
        run "install ca.pem" install -D -m 0644 "$src" \
            "$ROOT/etc/pki/ca-trust/source/anchors/flightctl-e2e-ca.pem" || return 1
        run "update-ca-trust" update-ca-trust extract || return 1
        NOTE="update-ca-trust"
    elif have update-ca-certificates; then
        run "install ca.pem" install -D -m 0644 "$src" \
            "$ROOT/usr/local/share/ca-certificates/flightctl-e2e-ca.crt" || return 1
        run "update-ca-certificates" update-ca-certificates || return 1
        NOTE="update-ca-certificates"
    else
        REASON="neither update-ca-trust nor update-ca-certificates is installed (add ca-certificates to the image)"
        return 1
    fi
}

# ---------------------------------------------------------------- 6 registry

install_registry() {
    local src=$SEED/flightctl/registry.conf
    local dest=/etc/containers/registries.conf.d/flightctl-e2e.conf
    if [ ! -f "$src" ]; then
        NOTE="no flightctl/registry.conf on the seed"
        return 3
    fi
    run "install registry.conf" install -D -m 0644 "$src" "$ROOT$dest" || return 1
    NOTE="$dest"
    install_registry_ca || return 1
}

# The CA for each registry host:port the host side read from registry.conf
# (flightctl/registry-hosts, one per line), where podman and skopeo look.
install_registry_ca() {
    local hosts=$SEED/flightctl/registry-hosts ca=$SEED/flightctl/ca.pem host n=0
    [ -f "$hosts" ] && [ -f "$ca" ] || return 0
    while IFS= read -r host; do
        case $host in "" | */* | *..*) continue ;; esac
        run "install certs.d/$host/ca.crt" install -D -m 0644 "$ca" \
            "$ROOT/etc/containers/certs.d/$host/ca.crt" || return 1
        n=$((n + 1))
    done <"$hosts"
    [ "$n" -gt 0 ] && NOTE="$NOTE, CA in /etc/containers/certs.d for $n registry host(s)"
    return 0
}

# ---------------------------------------------------------------- 7 agent

start_agent() {
    local timeout=${FLIGHTVM_SETUP_TIMEOUT:-90} state deadline
    if ! have systemctl; then
        REASON="systemctl not found: the guest must run systemd"
        return 1
    fi
    run "systemctl daemon-reload" systemctl daemon-reload || return 1
    if ! systemctl cat "$UNIT" >/dev/null 2>&1; then
        REASON="$UNIT is not installed (ship the agent package in rpms/ or bake it into the image)"
        return 1
    fi
    run "systemctl enable" systemctl enable "$UNIT" || return 1
    # We run inside cloud-final.service. A blocking start of a unit ordered
    # after cloud-final (or cloud-init.target) would wait for us forever, so
    # queue the start and watch the unit instead.
    run "systemctl start" systemctl start --no-block "$UNIT" || return 1
    deadline=$((SECONDS + timeout))
    while :; do
        state=$(systemctl is-active "$UNIT" 2>/dev/null)
        case $state in
            active)
                NOTE="$UNIT active"
                return 0
                ;;
            failed)
                systemctl status --no-pager "$UNIT" >>"$LOG" 2>&1
                REASON="$UNIT failed to start (systemctl status $UNIT; journalctl -u $UNIT)"
                return 1
                ;;
        esac
        if systemctl list-jobs --no-legend 2>/dev/null | grep -q "$UNIT.*waiting"; then
            NOTE="$UNIT enabled, start queued until cloud-init finishes"
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            systemctl status --no-pager "$UNIT" >>"$LOG" 2>&1
            REASON="$UNIT not active after ${timeout}s (state: ${state:-unknown})"
            return 1
        fi
        sleep 1
    done
}

# ---------------------------------------------------------------- main

log "$(date -u +%Y-%m-%dT%H:%M:%SZ) flightvm-setup: start (seed: ${SEED_ARG:-find cidata})"
step 1 mount-seed mount_seed
step 2 packages install_packages
step 3 config install_config
step 4 certs install_certs
step 5 ca-trust install_ca
step 6 registry install_registry
step 7 agent start_agent
say "done"
exit 0

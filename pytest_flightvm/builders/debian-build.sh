#!/usr/bin/env bash
# debian-build.sh OUTPUT.qcow2
#
# Build a generic, self-bootable (BIOS + GRUB) Debian bookworm qcow2 with
# cloud-init, for pytest-flightvm. Run as root. The image has no users and
# no keys: a NoCloud seed (ISO labelled "cidata") configures each instance.
#
# Environment:
#   FLIGHTVM_DEBIAN_MIRROR  apt mirror for mmdebstrap (default: mmdebstrap's own)
#   TMPDIR                  where the work dir goes (default: /var/tmp)
#
# Progress goes to stderr as "build: ..." lines (everything goes to stderr).
# Exit 0 = OUTPUT written (atomically); 2 = fix the host or the call (not root,
# a tool missing, bad output dir); any other non-zero = the build failed, and
# the last lines say where. Mounts, loop devices and the work dir are cleaned
# up on every exit, INT/TERM included.

set -euo pipefail
export LC_ALL=C.UTF-8
export PATH="$PATH:/usr/sbin:/sbin"
exec 1>&2

SUITE=bookworm
DISK_SIZE_MIB=4096          # virtual size; qcow2 stores only what is used
PART_START_SECTOR=2048      # 1 MiB
PART_OFFSET=$((PART_START_SECTOR * 512))
PACKAGES=systemd-sysv,linux-image-cloud-amd64,cloud-init,cloud-guest-utils,openssh-server,qemu-guest-agent,sudo,udev,ifupdown,isc-dhcp-client,netbase,iproute2,locales,ca-certificates,openssl,dbus

STEP="starting"
say() { STEP=$*; printf 'build: %s\n' "$*" >&2; }
die() { printf 'build: error: %s\n' "$1" >&2; exit "${2:-1}"; }   # die MESSAGE [CODE]

if [[ $# -ne 1 || -z "$1" ]]; then
    die "usage: $(basename "$0") OUTPUT.qcow2" 2
fi
if [[ "$(id -u)" -ne 0 ]]; then
    die "must run as root (mmdebstrap, losetup and mount need it); rerun with sudo" 2
fi

# tool:package, checked before anything is touched.
for pair in mmdebstrap:mmdebstrap mke2fs:e2fsprogs sfdisk:fdisk losetup:mount \
            mount:mount umount:mount grub-install:grub2-common qemu-img:qemu-utils \
            chroot:coreutils truncate:coreutils mktemp:coreutils; do
    tool=${pair%%:*} pkg=${pair#*:}
    command -v "$tool" >/dev/null 2>&1 \
        || die "$tool not found; install it with: apt-get install $pkg" 2
done
[[ -e /usr/lib/grub/i386-pc/modinfo.sh ]] \
    || die "GRUB BIOS modules (/usr/lib/grub/i386-pc) not found; install them with: apt-get install grub-pc-bin" 2

OUTPUT=$1
OUT_DIR=$(dirname -- "$OUTPUT")
[[ -d "$OUT_DIR" && -w "$OUT_DIR" ]] || die "output directory $OUT_DIR does not exist or is not writable" 2

WORK=""
MNT=""
LOOP_DISK=""
LOOP_PART=""
TMP_OUT=""

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$MNT" ]] && mountpoint -q "$MNT" 2>/dev/null; then
        umount "$MNT" || umount -l "$MNT"
    fi
    [[ -n "$LOOP_PART" ]] && losetup -d "$LOOP_PART"
    [[ -n "$LOOP_DISK" ]] && losetup -d "$LOOP_DISK"
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        # Never follow into something still mounted under the work dir.
        if grep -q " $WORK/" /proc/self/mounts; then
            printf 'build: warning: leaving %s in place, something is still mounted under it\n' "$WORK" >&2
        else
            rm -rf --one-file-system -- "$WORK"
        fi
    fi
    [[ -n "$TMP_OUT" && -e "$TMP_OUT" ]] && rm -f -- "$TMP_OUT"
    if [[ $rc -ne 0 ]]; then
        printf 'build: failed during "%s"\n' "$STEP" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

T0=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/flightvm-build.XXXXXX")
chmod 0755 "$WORK"   # lets apt download as _apt (sandboxed)
ROOT=$WORK/root
MNT=$WORK/mnt
mkdir -p "$MNT"

# --- 1. root filesystem ---------------------------------------------------
mirror_args=()
if [[ -n "${FLIGHTVM_DEBIAN_MIRROR:-}" ]]; then
    mirror_args=("$FLIGHTVM_DEBIAN_MIRROR")
    say "mmdebstrap $SUITE from $FLIGHTVM_DEBIAN_MIRROR"
else
    say "mmdebstrap $SUITE from the default mirror"
fi
mmdebstrap --mode=root --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$SUITE" "$ROOT" "${mirror_args[@]}"

# --- 2. configure it -------------------------------------------------------
say "configuring the root filesystem"

cat >"$ROOT/etc/fstab" <<'FSTAB'
# <file system> <mount point> <type> <options> <dump> <pass>
# pass 0: no fsck at boot (a throwaway test VM; saves ~2 s under TCG)
LABEL=root / ext4 defaults,noatime,errors=remount-ro 0 0
FSTAB

echo debian >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	debian

::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
HOSTS
rm -f "$ROOT/etc/resolv.conf"   # dhclient writes it at boot

# cloud-init's ifupdown renderer writes to interfaces.d; loopback stays here.
mkdir -p "$ROOT/etc/network/interfaces.d"
cat >"$ROOT/etc/network/interfaces" <<'IFACES'
# The NIC is configured by cloud-init (network-config) in interfaces.d.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
IFACES

# Only NoCloud (seed ISO labelled cidata): no probing of cloud metadata services.
# 99_ sorts after Debian's 90_dpkg.cfg, so this datasource_list wins.
cat >"$ROOT/etc/cloud/cloud.cfg.d/99_flightvm.cfg" <<'CLOUD'
# pytest-flightvm base image
datasource_list: [ NoCloud, None ]
# The locale is generated at build time; nothing to do at boot.
locale: en_US.UTF-8
# /etc/hosts gets the instance hostname (else sudo cannot resolve it).
manage_etc_hosts: true
# Host keys per instance; RSA/DSA generation costs seconds under TCG.
ssh_deletekeys: true
ssh_genkeytypes: [ ed25519, ecdsa ]
# No GRUB package in the guest (it is installed from the build host).
grub_dpkg:
  enabled: false
CLOUD

# Locale: generated now so cloud-init's cc_locale has nothing to do.
sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' "$ROOT/etc/locale.gen"
grep -q '^en_US.UTF-8 UTF-8' "$ROOT/etc/locale.gen" || echo 'en_US.UTF-8 UTF-8' >>"$ROOT/etc/locale.gen"
chroot "$ROOT" locale-gen >/dev/null
echo 'LANG=en_US.UTF-8' >"$ROOT/etc/default/locale"

# Fewer services: nothing periodic in short-lived test VMs.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
            fstrim.timer dpkg-db-backup.timer getty@tty1.service; do
    if chroot "$ROOT" systemctl is-enabled "$unit" >/dev/null 2>&1; then
        chroot "$ROOT" systemctl disable "$unit" >/dev/null 2>&1 || true
    fi
done

# Per-instance identity: no ssh host keys (generated at first boot), empty machine-id.
rm -f "$ROOT"/etc/ssh/ssh_host_*
# Fallback: if cloud-init made no host key at all (no seed, or ssh module off),
# make them here so sshd still starts. sshd skips the key types that are absent.
mkdir -p "$ROOT/etc/systemd/system/ssh.service.d"
cat >"$ROOT/etc/systemd/system/ssh.service.d/10-flightvm-hostkeys.conf" <<'UNIT'
[Unit]
After=cloud-init.service

[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || /usr/bin/ssh-keygen -A'
ExecStartPre=/usr/sbin/sshd -t
UNIT
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT/var/lib/systemd/random-seed"
rm -rf "$ROOT/var/lib/cloud" "$ROOT/var/log/"*.log "$ROOT/var/cache/apt/"*.bin

# --- 3. disk image -----------------------------------------------------------
# shellcheck disable=SC2012  # kernel file names are plain
KERNEL=$(cd "$ROOT/boot" && ls vmlinuz-* | sort -V | tail -n1)
INITRD=initrd.img-${KERNEL#vmlinuz-}
[[ -f "$ROOT/boot/$KERNEL" && -f "$ROOT/boot/$INITRD" ]] || die "kernel or initrd missing in /boot ($KERNEL, $INITRD)"
if [[ -L "$ROOT/vmlinuz" && -L "$ROOT/initrd.img" ]]; then
    # Symlinks follow in-guest kernel upgrades.
    K_PATH=/vmlinuz I_PATH=/initrd.img
else
    K_PATH=/boot/$KERNEL I_PATH=/boot/$INITRD
fi

say "partitioning a ${DISK_SIZE_MIB} MiB disk"
PART_SIZE_MIB=$((DISK_SIZE_MIB - 1))
truncate -s "${DISK_SIZE_MIB}M" "$WORK/disk.raw"
printf 'label: dos\nstart=%d, type=83, bootable\n' "$PART_START_SECTOR" \
    | sfdisk --quiet "$WORK/disk.raw"

# mke2fs -d fills the filesystem from the directory, no mount needed. Writing it
# straight into the partition (-E offset) replaces "mke2fs part.img; dd" and
# skips copying a 4 GiB sparse file (~10 s).
say "making ext4 in the partition (kernel ${KERNEL#vmlinuz-})"
mke2fs -q -t ext4 -L root -E offset="$PART_OFFSET" -d "$ROOT" "$WORK/disk.raw" "${PART_SIZE_MIB}M"
rm -rf --one-file-system -- "$ROOT"

say "installing GRUB (BIOS)"
LOOP_DISK=$(losetup -f --show "$WORK/disk.raw")
LOOP_PART=$(losetup -f --show -o "$PART_OFFSET" "$WORK/disk.raw")
mount "$LOOP_PART" "$MNT"
grub-install --target=i386-pc --boot-directory="$MNT/boot" \
    --modules="part_msdos ext2" --no-floppy "$LOOP_DISK" 2>&1 | sed 's/^/grub-install: /'
[[ -f "$MNT/boot/grub/i386-pc/core.img" ]] || die "grub-install produced no core.img"
cat >"$MNT/boot/grub/grub.cfg" <<GRUB
serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1
terminal_input serial console
terminal_output serial console
set timeout=0
set timeout_style=hidden
set default=0
# mitigations=off: a throwaway test guest gains nothing from Spectre-class mitigations
# (they guard the guest's processes from each other, never the host from the guest),
# and under TCG they cost ~12% of boot to ready (57.4 -> 50.2 s, 3 alternating pairs).
menuentry "Debian $SUITE (flightvm)" {
    insmod part_msdos
    insmod ext2
    search --no-floppy --label root --set=root
    linux $K_PATH root=LABEL=root ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 mitigations=off
    initrd $I_PATH
}
GRUB
sync
umount "$MNT"
losetup -d "$LOOP_PART"; LOOP_PART=""
losetup -d "$LOOP_DISK"; LOOP_DISK=""

# --- 4. qcow2, atomically -----------------------------------------------------
say "converting to qcow2"
TMP_OUT=$(mktemp "$OUT_DIR/.$(basename -- "$OUTPUT").XXXXXX")
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$TMP_OUT"
chmod 0644 "$TMP_OUT"
sync "$TMP_OUT" 2>/dev/null || sync
mv -f -- "$TMP_OUT" "$OUTPUT"
TMP_OUT=""
say "done: $OUTPUT ($(du -m -- "$OUTPUT" | cut -f1) MiB) in $((SECONDS - T0)) s"

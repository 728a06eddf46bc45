"""Choosing KVM or TCG, and remembering what worked on this host.

On some hosts ``/dev/kvm`` exists and KVM_CREATE_VM succeeds, yet no guest
makes progress (docs/HOST.md: QEMU aborts on an MSR, the guest pauses with a
KVM internal error, or it spins silently). libvirt's capabilities still list
``kvm``, so they prove nothing. ``auto`` therefore trusts only a verdict from
a real guest: the first boot under ``auto`` tries KVM with a short progress
watchdog, falls back to TCG with one notice line, and the verdict is stored
per host and QEMU version so later runs decide instantly. It lives in the user's
private state dir (:func:`statedir.user_state_dir`), not in a cache dir: it belongs
to the host, and every fresh cache dir used to pay the 30 s probe again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..statedir import private_dir, replace_file, user_state_dir

TCG_TIMEOUT_SCALE = 2.0
KVM_PROGRESS_SECONDS = 30.0  # a KVM guest must print its kernel banner this fast


@dataclass(frozen=True)
class Verdict:
    accel: str  # "kvm" or "tcg"
    reason: str
    qemu: str
    host: str
    when: float


def qemu_version(emulator: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([emulator, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = out.splitlines()[0] if out else "unknown"
    return first.replace("QEMU emulator version", "").strip() or "unknown"


def host_state_dir() -> Path:
    """Where verdicts live: the user's private per-host state dir."""
    return user_state_dir()


def verdict_path(state_dir: Path, qemu: str | None = None) -> Path:
    qemu = qemu or qemu_version()
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{socket.gethostname()}-{qemu}")
    return state_dir / "accel" / f"{safe}.json"


def load_verdict(state_dir: Path) -> Verdict | None:
    try:
        data = json.loads(verdict_path(state_dir).read_text())
        return Verdict(**data)
    except (OSError, ValueError, TypeError):
        return None


def save_verdict(state_dir: Path, accel: str, reason: str) -> Verdict:
    qemu = qemu_version()
    verdict = Verdict(accel, reason, qemu, socket.gethostname(), time.time())
    path = verdict_path(state_dir, qemu)
    private_dir(path.parent)  # 0700, ours; written through an O_EXCL temp, never a link
    replace_file(path, json.dumps(verdict.__dict__).encode())
    return verdict


def kvm_device_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def initial_choice(requested: str, state_dir: Path) -> tuple[str, bool]:
    """Return (accel to try first, whether this is an unproven KVM attempt)."""
    if requested in ("kvm", "tcg"):
        return requested, False
    if not kvm_device_usable():
        return "tcg", False
    verdict = load_verdict(state_dir)
    if verdict is not None and verdict.accel == "tcg":
        return "tcg", False
    # No verdict, or a KVM one: under auto, KVM always runs on probation, so a host
    # whose KVM broke since the verdict (or a stale verdict) still falls back to TCG.
    return "kvm", True


@contextlib.contextmanager
def first_choice(requested: str, state_dir: Path) -> Iterator[tuple[str, bool]]:
    """:func:`initial_choice`, with the host's first KVM probe under a lock.

    With no verdict on file yet, only one process (worker or run) at a time probes:
    the others wait on the lock, then take the verdict it stored (a TCG one spares them
    their own 30 s probe) instead of all probing at once. Hold it until the verdict is
    saved (or the probe failed); with a verdict on file there is no lock at all."""
    choice = initial_choice(requested, state_dir)
    if not choice[1] or load_verdict(state_dir) is not None:
        yield choice
        return
    where = private_dir(verdict_path(state_dir).parent)
    with FileLock(str(where / "probe.lock")):
        yield initial_choice(requested, state_dir)  # what the last prober left on file


def timeout_for(accel: str, base_timeout: float) -> float:
    return base_timeout * (TCG_TIMEOUT_SCALE if accel == "tcg" else 1.0)

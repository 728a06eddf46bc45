"""qcow2 overlays: a writable copy-on-write layer over a read-only disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import FlightVMError
from .ssh import require_tool


def create_overlay(base: Path, overlay: Path) -> None:
    """``qemu-img create -f qcow2 -F qcow2 -b BASE OVERLAY``: the base is never written."""
    require_tool("qemu-img", "qemu-utils")
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.unlink(missing_ok=True)
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise FlightVMError(f"qemu-img could not create overlay {overlay}: "
                            f"{proc.stderr.strip().splitlines()[-1:]}")
    overlay.chmod(0o600)

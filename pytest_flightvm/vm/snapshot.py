"""The ``internal`` reset: an internal qcow2 snapshot with memory, taken once, reverted per test.

libvirt 9.0 refuses internal snapshots of a domain with pflash (UEFI) firmware, so
this works for BIOS guests only; ``pristine`` (save/restore) works for every firmware.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..errors import FlightVMError
from .libvirt_conn import error_text
from .resume import after_resume, within

if TYPE_CHECKING:
    from .machine import Machine

SNAPSHOT_NAME = "pristine"
REVERT_DEADLINE = 60.0


def take_snapshot(machine: Machine) -> float:
    import libvirt

    start = time.monotonic()
    machine.ssh.close()
    try:
        machine.dom.snapshotCreateXML(
            f"<domainsnapshot><name>{SNAPSHOT_NAME}</name></domainsnapshot>", 0)
    except libvirt.libvirtError as exc:
        raise FlightVMError(f"snapshots unsupported for {machine.name}: {error_text(exc)}") from None
    return time.monotonic() - start


def revert(machine: Machine, *, deadline: float = REVERT_DEADLINE) -> float:
    """Revert to the pristine snapshot and wait for SSH; ResetFailed on any failure."""
    import libvirt

    start = time.monotonic()
    machine.ssh.close()

    def do_revert() -> None:
        snap = machine.dom.snapshotLookupByName(SNAPSHOT_NAME, 0)
        machine.dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)

    within(deadline, f"revert of {machine.name}", do_revert)
    after_resume(machine, start, deadline)
    return time.monotonic() - start

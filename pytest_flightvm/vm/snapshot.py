"""Internal snapshots of a running guest: take, revert (with a deadline), fix the clock."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import FlightVMError
from .libvirt_conn import error_text

if TYPE_CHECKING:
    from .machine import Machine

SNAPSHOT_NAME = "pristine"
REVERT_DEADLINE = 60.0

class RevertFailed(FlightVMError):
    pass


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
    """Revert to the pristine snapshot and wait for SSH; raise RevertFailed on any failure."""
    import libvirt

    start = time.monotonic()
    machine.ssh.close()
    outcome: dict[str, Any] = {"error": None}

    def do_revert() -> None:
        try:
            snap = machine.dom.snapshotLookupByName(SNAPSHOT_NAME, 0)
            machine.dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=do_revert, name=f"revert-{machine.name}", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise RevertFailed(f"revert of {machine.name} did not finish in {deadline:.0f}s")
    if outcome["error"] is not None:
        raise RevertFailed(f"revert of {machine.name} failed: {error_text(outcome['error'])}")
    # The guest agent answers over virtio-serial, not SSH: set the clock while SSH comes back.
    clock = threading.Thread(target=_agent_set_time, args=(machine, outcome),
                             name=f"clock-{machine.name}", daemon=True)
    clock.start()
    remaining = max(1.0, deadline - (time.monotonic() - start))
    while True:
        res = machine.ssh.run("true", check=False, timeout=10, connect_timeout=3)
        if res.ok:
            break
        if time.monotonic() - start > remaining:
            raise RevertFailed(f"{machine.name}: SSH did not answer {deadline:.0f}s after revert")
        time.sleep(0.2)
    clock.join(10)
    if not outcome.get("clock_set"):
        _ssh_set_time(machine)
    return time.monotonic() - start


def _agent_set_time(machine: Machine, outcome: dict[str, Any]) -> None:
    """A reverted guest wakes with the clock of the snapshot: set it to now."""
    now = time.time()
    try:
        machine.dom.setTime({"seconds": int(now), "nseconds": int((now % 1) * 1e9)}, 0)
    except Exception:  # noqa: BLE001 - no guest agent (yet); the caller falls back to ssh
        return
    outcome["clock_set"] = True


def _ssh_set_time(machine: Machine) -> None:
    machine.run(f"sudo date -u -s @{time.time():.3f} >/dev/null", check=False, timeout=15)


"""One reusable VM per worker, reset to a pristine state before each test.

Reset modes:
- ``snapshot`` (default): after the first boot, take an internal snapshot
  with memory ("pristine"); before each later test revert to it. A revert
  has a deadline; a failed or stuck revert falls back to a fresh overlay and
  boot, with a warning. Where snapshots are unsupported the pool degrades to
  ``reboot`` with one notice.
- ``reboot``: a fresh overlay and boot for every test.
- ``none``: the VM and its state are shared.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import FlightVMError
from .factory import VMFactory, VMRequest
from .libvirt_conn import error_text
from .machine import Machine

log = logging.getLogger("flightvm")

SNAPSHOT_NAME = "pristine"
REVERT_DEADLINE = 60.0

VMHook = Callable[[Machine], None]


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
    outcome: dict[str, BaseException | None] = {"error": None}

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
    remaining = max(1.0, deadline - (time.monotonic() - start))
    while True:
        res = machine.ssh.run("true", check=False, timeout=10, connect_timeout=3)
        if res.ok:
            break
        if time.monotonic() - start > remaining:
            raise RevertFailed(f"{machine.name}: SSH did not answer {deadline:.0f}s after revert")
        time.sleep(0.2)
    sync_clock(machine)
    return time.monotonic() - start


def sync_clock(machine: Machine) -> None:
    """A reverted guest wakes with the clock of the snapshot: set it to now."""
    now = time.time()
    try:
        machine.dom.setTime({"seconds": int(now), "nseconds": int((now % 1) * 1e9)}, 0)
        return
    except Exception:  # noqa: BLE001 - no guest agent; fall back to ssh
        pass
    machine.run(f"sudo date -u -s @{time.time():.3f} >/dev/null", check=False, timeout=15)


class VMPool:
    """The worker's reusable VM."""

    def __init__(
        self,
        factory: VMFactory,
        *,
        on_ready: VMHook = lambda _vm: None,
        before_snapshot: VMHook = lambda _vm: None,
        after_revert: VMHook = lambda _vm: None,
        notice: Callable[[str], None] = log.warning,
    ) -> None:
        self.factory = factory
        self.on_ready = on_ready
        self.before_snapshot = before_snapshot
        self.after_revert = after_revert
        self.notice = notice
        self.current: Machine | None = None
        self._key: tuple[Any, ...] | None = None
        self._dirty = False
        self._has_snapshot = False
        self._snapshots_unsupported = False
        self.resets: list[dict[str, Any]] = []

    def _boot(self, request: VMRequest, reset: str) -> Machine:
        machine = self.factory.create(request)
        self.on_ready(machine)
        self.current, self._key, self._dirty, self._has_snapshot = machine, request.spec_key(), False, False
        if reset == "snapshot" and not self._snapshots_unsupported:
            self.before_snapshot(machine)
            try:
                take_snapshot(machine)
                self._has_snapshot = True
            except FlightVMError as exc:
                self._snapshots_unsupported = True
                self.notice(f"flightvm: {exc}; resetting by fresh boot instead")
            else:
                self.after_revert(machine)
        return machine

    def acquire(self, request: VMRequest, reset: str) -> Machine:
        """A ready VM for ``request``, in a clean state unless ``reset == 'none'``."""
        machine = self.current
        if machine is not None and self._key != request.spec_key():
            self.drop()
            machine = None
        if machine is None:
            machine = self._boot(request, reset)
        elif self._dirty and reset != "none":
            machine = self._reset(machine, request, reset)
        self._dirty = True
        return machine

    def _reset(self, machine: Machine, request: VMRequest, reset: str) -> Machine:
        if reset == "snapshot" and self._has_snapshot:
            try:
                seconds = revert(machine)
            except FlightVMError as exc:
                self.notice(f"flightvm: {exc}; replacing the VM with a fresh boot")
                self.resets.append({"vm": machine.name, "mode": "snapshot", "ok": False})
            else:
                machine.revert_seconds.append(seconds)
                self.resets.append({"vm": machine.name, "mode": "snapshot", "ok": True,
                                    "seconds": seconds})
                self.after_revert(machine)
                return machine
        start = time.monotonic()
        self.drop()
        fresh = self._boot(request, reset)
        self.resets.append({"vm": fresh.name, "mode": "reboot", "ok": True,
                            "seconds": time.monotonic() - start})
        return fresh

    def detach(self) -> Machine | None:
        """Forget the current VM without destroying it (kept for debugging)."""
        machine, self.current, self._key = self.current, None, None
        return machine

    def drop(self) -> None:
        if self.current is not None:
            self.factory.discard(self.current)
        self.current, self._key = None, None

    def close(self) -> None:
        self.drop()

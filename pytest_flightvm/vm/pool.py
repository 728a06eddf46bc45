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
import time
from collections.abc import Callable
from typing import Any

from ..errors import FlightVMError
from .factory import VMFactory, VMRequest
from .machine import Machine
from .snapshot import revert, take_snapshot

log = logging.getLogger("flightvm")

VMHook = Callable[[Machine], None]


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

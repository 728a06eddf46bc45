"""One reusable VM per worker, reset to a pristine state before each test.

Reset modes:
- ``snapshot`` (default): return to the pristine point by the fastest mechanism
  for the guest; today that is ``restore`` for every firmware (BIOS figures of
  both side by side in docs/BENCHMARKS.md, P6).
- ``restore``: after the first boot, save the VM (memory, frozen disk, NVRAM,
  TPM; :mod:`pristine`) and restore that before each later test.
- ``internal``: an internal qcow2 snapshot with memory, reverted per test
  (:mod:`snapshot`); libvirt refuses it under UEFI, where the pool uses
  ``restore`` with one notice.
- ``reboot``: a fresh overlay and boot for every test.
- ``none``: the VM and its state are shared.

Every reset has a deadline; a failed or stuck one falls back to a fresh overlay
and boot, with a warning. Where no pristine point can be made, the pool
degrades to ``reboot`` with one notice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import FlightVMError
from .factory import VMFactory, VMRequest
from .machine import Machine
from .pristine import Pristine, capture, restore
from .snapshot import revert, take_snapshot

log = logging.getLogger("flightvm")

VMHook = Callable[[Machine], None]
PRISTINE_MODES = ("snapshot", "restore", "internal")


def mechanism(reset: str, machine: Machine) -> str:
    """The mechanism behind a pristine-point reset mode, for this guest."""
    if getattr(machine, "remote", False):
        # save/restore writes state files on the VM's host, and pristine.py handles them as
        # local files; a remote VM is BIOS-only (factory.py) and snapshots in its overlay.
        return "internal"
    if reset == "internal" and not machine.spec.firmware.uefi:
        return "internal"
    return "restore"


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
        self._pristine: Pristine | str | None = None  # a Pristine, "internal", or none yet
        self._unsupported: set[str] = set()
        self.resets: list[dict[str, Any]] = []

    def _boot(self, request: VMRequest, reset: str) -> Machine:
        machine = self.factory.create(request)
        self.on_ready(machine)
        self.current, self._key, self._dirty, self._pristine = machine, request.spec_key(), False, None
        if reset not in PRISTINE_MODES:
            return machine
        how = mechanism(reset, machine)
        if reset == "internal" and how != "internal" and "internal" not in self._unsupported:
            self._unsupported.add("internal")
            self.notice("flightvm: internal snapshots do not work with UEFI firmware (libvirt "
                        "refuses them); resetting by save/restore instead")
        if how in self._unsupported:
            return machine
        self.before_snapshot(machine)
        try:
            if how == "internal":
                take_snapshot(machine)
                self._pristine = "internal"
            else:
                self._pristine, seconds = capture(machine)
                machine.pristine_seconds = seconds
        except FlightVMError as exc:
            self._unsupported.add(how)
            self.notice(f"flightvm: no pristine point for {machine.name} ({exc}); "
                        "resetting by fresh boot instead")
            if not machine.is_running():
                self.drop()
                return self._boot(request, "reboot")
        # also when no pristine point could be made: the profile's before_snapshot stopped
        # the agent, and the test still gets the VM as after a reset
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
        pristine = self._pristine
        if reset in PRISTINE_MODES and pristine is not None:
            mode = "internal" if pristine == "internal" else "restore"
            try:
                if isinstance(pristine, Pristine):
                    seconds = restore(machine, pristine)
                else:
                    seconds = revert(machine)
            except FlightVMError as exc:
                self.notice(f"flightvm: {exc}; replacing the VM with a fresh boot")
                self.resets.append({"vm": machine.name, "mode": mode, "ok": False})
            else:
                machine.revert_seconds.append(seconds)
                self.resets.append({"vm": machine.name, "mode": mode, "ok": True,
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

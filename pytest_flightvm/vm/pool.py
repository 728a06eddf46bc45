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

With a state cache (``--flightvm-state-cache on``, :mod:`statecache`) and the ``restore``
mechanism, a VM the pool needs is first looked up by its state key: a hit is restored
(``VMFactory.restore_state``) instead of booted, and its pristine point *is* that state
(the per-test reset is the same restore); a miss boots, and the pristine point it
saves is published under the key. A state that fails to restore is evicted and the VM
booted, with one warning line. With ``--flightvm-state-cache registry`` a local miss
first asks the registry (:mod:`stateshare`, vetted against the factory's
``state_vetting``), and a state this pool published is pushed in the background once
its VM runs again (``close`` waits for it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import FlightVMError
from .factory import VMFactory, VMRequest
from .machine import Machine
from .pristine import Pristine, capture, restore
from .snapshot import revert, take_snapshot
from .statecache import StateCache, state_key

if TYPE_CHECKING:  # registry code: imported by the session only when states are shared
    from .stateshare import StateShare

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
        states: StateCache | None = None,
        share: StateShare | None = None,
        state_inputs: tuple[str, ...] = (),
    ) -> None:
        self.factory = factory
        self.states = states
        self.share = share  # the registry's side of ``states`` (vm/stateshare.py), or None
        self.state_inputs = state_inputs  # fingerprints of the hooks before the pristine point
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
        self._unpushed: str | None = None  # a state this pool published, for the registry

    def _state_key(self, request: VMRequest, reset: str, accel: str | None = None) -> str | None:
        """The state key for ``request`` (under ``accel``), when the state cache applies."""
        if (self.states is None or reset not in PRISTINE_MODES or "restore" in self._unsupported
                or (reset == "internal" and not self.factory.firmware.uefi)):
            return None
        why = self.factory.state_cache_refusal()
        if why is not None:
            if "state" not in self._unsupported:
                self._unsupported.add("state")
                self.notice(f"flightvm: the state cache is not used {why}; booting")
            return None
        try:
            self.states.store  # noqa: B018 - made here: an unusable store disables the cache
            return state_key(self.factory.state_parts(request, self.state_inputs, accel))
        except FlightVMError as exc:
            self.notice(f"flightvm: no state key ({exc}); booting without the state cache")
            return None

    def _restore_saved(self, request: VMRequest, key: str) -> Machine | None:
        assert self.states is not None
        saved = self.states.lookup(key)
        if saved is None and self.share is not None:  # --flightvm-state-cache registry
            try:
                vetting = self.factory.state_vetting(request)
            except (FlightVMError, OSError) as exc:
                self.notice(f"flightvm: a booted state cannot be pulled ({exc}); booting")
                return None
            saved = self.share.pull(self.states, key, vetting)
        if saved is None:
            return None
        try:
            machine, pristine = self.factory.restore_state(request, saved)
        except FlightVMError as exc:
            self.states.evict(key)
            self.notice(f"flightvm: the saved state {key[:12]} did not restore ({exc}); "
                        "evicted it, booting instead")
            return None
        self.states.touch(key)
        self.current, self._key, self._dirty = machine, request.spec_key(), False
        self._pristine = machine.pristine = pristine
        self.after_revert(machine)
        return machine

    def _publisher(self, request: VMRequest, reset: str,
                   machine: Machine) -> Callable[[Pristine], Pristine | None] | None:
        states = self.states
        if states is None:
            return None
        # keyed by the accel the VM really ran under (a KVM probation may have fallen back)
        key = self._state_key(request, reset, machine.accel)
        if key is None:
            return None

        def publish(pristine: Pristine) -> Pristine | None:
            try:
                published = states.publish(key, pristine, self.factory.state_meta(machine))
            except FlightVMError as exc:
                self.notice(f"flightvm: the booted state of {machine.name} was not cached ({exc})")
                return None
            if published is not None and self.share is not None:
                self._unpushed = key  # pushed once the VM runs again (_boot)
            return published

        return publish

    def _boot(self, request: VMRequest, reset: str) -> Machine:
        key = self._state_key(request, reset)
        if key is not None:
            restored = self._restore_saved(request, key)
            if restored is not None:
                return restored
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
                publish = self._publisher(request, reset, machine)
                self._pristine, seconds = (capture(machine, publish=publish) if publish
                                           else capture(machine))
                machine.pristine = self._pristine
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
        if self._unpushed is not None and self.states is not None and self.share:
            key, self._unpushed = self._unpushed, None
            self.share.push_soon(self.states, key)  # waited for in close()
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
        if self.share is not None:
            self.share.wait()

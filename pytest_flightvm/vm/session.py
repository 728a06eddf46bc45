"""The worker's pooled VMs behind the plugin's fixtures: one pool per kind, and the keep policy.

Pytest-free: the plugin hands in the factory, the settings, the run, the user's hooks as
callables and a notice writer, then per test calls :meth:`VMSession.acquire` and, after
the test, :meth:`VMSession.release` with whether it failed. The session owns:

- the pools by kind of VM (``flightvm``, ``flightctl``), made on first use, with the
  profile's and the user's hooks around each pristine point and reset (the order is in
  :mod:`profile`);
- the resets they ran, each with the test it ran before (the run's metrics);
- the keep/discard/diagnose policy: a VM that failed to boot gets the profile's
  diagnosis in its error, and is kept (``--flightvm-keep`` not ``never``) or discarded;
  after a test, the VM is kept when ``always``, or ``on-failure`` and the test or the
  VM failed; a kept VM leaves its pool and its hint (``kept-<name>.txt``) goes in the
  run dir for the summary.

Marker arguments are checked here too (:func:`pooled_request`), before any VM is asked
for; :class:`ExtraVMs` is the ``flightvm_factory`` fixture's object.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..config import Settings, parse_ports
from ..errors import BootError, ConfigError
from ..profile import VMProfile
from . import pool as pool_module
from .factory import RunContext, VMFactory, VMRequest
from .machine import Machine
from .statecache import StateCache

MARKER_ARGS = ("memory", "vcpus", "user_data", "reset", "host_ports", "agent")
# the user's hooks that run before the pristine point: their code is part of the state key
STATE_HOOKS = ("pytest_flightvm_vm_ready", "pytest_flightvm_before_snapshot")

VMHook = Callable[[Machine], None]
Record = Callable[[Machine, str, float], None]


def check_marks(marks: Mapping[str, Any]) -> dict[str, Any]:
    """The ``flightvm`` marker's merged arguments, checked: ConfigError names what to fix."""
    unknown = set(marks) - set(MARKER_ARGS)
    if unknown:
        raise ConfigError(f"marker flightvm: unknown argument(s) {sorted(unknown)}; "
                          f"use {', '.join(MARKER_ARGS)}")
    if marks.get("agent", "running") not in ("running", "stopped"):
        raise ConfigError(f"marker flightvm: agent={marks['agent']!r} is not one of "
                          "'running', 'stopped'")
    return dict(marks)


def all_host_ports(settings: Settings, extra: Any, where: str) -> tuple[int, ...]:
    """The configured host ports plus those a marker or a factory call adds."""
    return tuple(dict.fromkeys(settings.host_ports
                               + (parse_ports(extra, where) if extra is not None else ())))


def pooled_request(settings: Settings, marks: Mapping[str, Any], user_data: Mapping[str, Any],
                   profile: VMProfile | None = None) -> tuple[VMRequest, str, tuple[int, ...]]:
    """What one test asks of its pool: the VM request, the reset mode and the host ports.

    The pool's VM boots (and is saved at its pristine point) with no forwards; the ports
    are opened per test, after any reset, so a marker's ports cost a forward, not a boot."""
    marks = check_marks(marks)
    ports = all_host_ports(settings, marks.get("host_ports"), "marker flightvm host_ports")
    user_datas = tuple(u for u in (user_data, marks.get("user_data")) if u)
    req = VMRequest(memory=marks.get("memory"), vcpus=marks.get("vcpus"),
                    user_data=(profile.user_data if profile else ()) + user_datas,
                    seed_payload=profile.seed_payload if profile else {},
                    ready_checks=profile.ready_checks if profile else (), host_ports=())
    return req, marks.get("reset") or settings.reset, ports


def _fingerprint(obj: Any) -> str:
    try:
        text = inspect.getsource(obj)
    except (OSError, TypeError):
        code = getattr(obj, "__code__", None)
        text = repr(code.co_code if code is not None else obj)
    name = getattr(obj, "__qualname__", type(obj).__name__)
    return f"{name}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def state_inputs(implementations: Mapping[str, Sequence[Callable[..., Any]]],
                 profile: VMProfile | None) -> tuple[str, ...]:
    """Fingerprints of the code that shapes a VM before its pristine point (the user's
    ``vm_ready`` and ``before_snapshot`` hook functions, the profile's class): part of the
    state key, so changing that code makes a new state instead of restoring a stale one."""
    parts = [f"{hookname}={_fingerprint(function)}"
             for hookname in STATE_HOOKS for function in implementations.get(hookname, ())]
    if profile is not None:
        parts.append(f"profile={_fingerprint(type(profile))}")
    return tuple(parts)


def best_effort(diagnose: Callable[[Machine], str], vm: Machine) -> str:
    try:
        return str(diagnose(vm))
    except Exception as exc:  # noqa: BLE001 - diagnosis must not hide the real failure
        return f"(could not collect diagnostics: {exc})"


def _no_record(vm: Machine, made: str, seconds: float) -> None:
    pass


class VMSession:
    """The worker's pools, their resets and the keep policy, for one pytest session.

    ``vm_ready``, ``before_snapshot`` and ``after_revert`` are the user's hooks;
    ``implementations()`` returns the user's hook functions by hook name (read when a
    pool is made, for its state key)."""

    def __init__(self, factory: VMFactory, settings: Settings, run: RunContext, *,
                 vm_ready: VMHook, before_snapshot: VMHook, after_revert: VMHook,
                 implementations: Callable[[], Mapping[str, Sequence[Callable[..., Any]]]],
                 notice: Callable[[str], None]) -> None:
        self.factory, self.settings, self.run = factory, settings, run
        self.vm_ready, self.before_snapshot, self.after_revert = vm_ready, before_snapshot, after_revert
        self.implementations = implementations
        self.notice = notice
        self.pools: dict[str, pool_module.VMPool] = {}
        self.resets: list[dict[str, Any]] = []  # each pool reset, with the test it preceded
        self.kept: list[str] = []  # names of the VMs kept in this session
        self._resumed = False  # did the profile's resume run in this acquire (after a reset)?

    def pool(self, kind: str, profile: VMProfile | None = None) -> pool_module.VMPool:
        """The pool for one kind of VM. Around a reset the order is: ``profile``'s
        ``before_snapshot``, the user's ``before_snapshot``, the pristine point; and after
        each reset: ``profile.after_revert``, the user's ``after_revert``, ``profile.resume``
        (the flightctl profile's agent is stopped while both user hooks run)."""
        if kind in self.pools:
            return self.pools[kind]

        def before_snapshot(vm: Machine) -> None:
            if profile is not None:
                profile.before_snapshot(vm)
            self.before_snapshot(vm)

        def after_revert(vm: Machine) -> None:
            if profile is not None:
                profile.after_revert(vm)
            self.after_revert(vm)
            if profile is not None:
                profile.resume(vm)
            self._resumed = True

        states = None
        if self.settings.state_cache in ("on", "registry"):
            from .stateshare import StateShare  # registry code: only when states are shared

            states = StateCache(self.settings.states_dir, notice=self.notice,
                                share=StateShare.for_settings(self.settings, self.notice))
        # looked up at call time: the plugin's pytester tests stand a fake pool in here
        self.pools[kind] = pool_module.VMPool(
            self.factory, on_ready=self.vm_ready, before_snapshot=before_snapshot,
            after_revert=after_revert, notice=self.notice, states=states,
            state_inputs=state_inputs(self.implementations(), profile))
        return self.pools[kind]

    def acquire(self, kind: str, req: VMRequest, reset: str, ports: tuple[int, ...], *,
                marks: Mapping[str, Any], profile: VMProfile | None = None, test: str = "",
                record: Record = _no_record) -> Machine:
        """The test's VM: ready, reset unless ``reset == 'none'``, with ``ports`` open.

        ``record(vm, made, seconds)`` hears how it was made (booted, reset, reused, or
        boot failed) and how long that took. A BootError is raised again after its VM got
        the profile's diagnosis and was kept or discarded."""
        pool = self.pool(kind, profile)
        previous, started = pool.current, time.monotonic()
        try:
            if profile is not None:
                profile.configure(marks)
            before = len(pool.resets)
            self._resumed = False
            vm = pool.acquire(req, reset)
            if profile is not None and not self._resumed:
                profile.resume(vm)  # no reset ran (reset=none, or reboot mode): apply the marker
            ran = pool.resets[before:]
            self.resets.extend({**r, "test": test} for r in ran)
            # a reset rolled the guest back under the forwarding connection: open it again
            vm.set_host_ports(ports, reopen=bool(ran))
            if vm is not previous or any(r["mode"] == "reboot" for r in ran):
                made = "booted"
            else:
                made = "reset" if ran else "reused"
            record(vm, made, time.monotonic() - started)
        except BootError as exc:
            failed_vm: Machine | None = getattr(exc, "machine", None)
            if failed_vm is not None:
                record(failed_vm, "boot failed", time.monotonic() - started)
                if profile is not None and not exc.detail.count("--- journal"):
                    exc.detail += "\n" + best_effort(profile.diagnose, failed_vm)
                if self.settings.keep != "never":
                    self.keep(pool, failed_vm)
                else:
                    pool.factory.discard(failed_vm)
            raise
        return vm

    def release(self, kind: str, vm: Machine, *, failed: bool) -> None:
        """After the test: keep the VM (``always``, or ``on-failure`` when the test or the
        VM failed), else leave it in its pool for the next test."""
        pool = self.pools[kind]
        failed = failed or bool(vm.failed)
        keep = self.settings.keep == "always" or (self.settings.keep == "on-failure" and failed)
        if keep and pool.current is vm:
            pool.detach()
            self.keep(pool, vm)

    def keep(self, pool: pool_module.VMPool, vm: Machine) -> None:
        """Leave ``vm`` running; its hint (ssh, console, remove) goes in the run dir."""
        (self.run.run_dir / f"kept-{vm.name}.txt").write_text(pool.factory.keep(vm) + "\n")
        self.kept.append(vm.name)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


class ExtraVMs:
    """``create(**overrides) -> VM`` for VMs beside the pooled one, each handed to the
    user's ``vm_ready`` hook once ready; the factory destroys them all at session end."""

    def __init__(self, factory: VMFactory, vm_ready: VMHook) -> None:
        self.factory, self.vm_ready = factory, vm_ready

    def create(self, *, name: str | None = None, memory: int | None = None,
               vcpus: int | None = None, user_data: dict[str, Any] | None = None,
               host_ports: list[int] | tuple[int, ...] | None = None) -> Machine:
        vm = self.make(name=name, memory=memory, vcpus=vcpus, user_data=user_data,
                       host_ports=host_ports)
        self.vm_ready(vm)
        return vm

    def make(self, *, name: str | None, memory: int | None, vcpus: int | None,
             user_data: dict[str, Any] | None, host_ports: Any) -> Machine:
        """A ready VM (FlightVMError when it cannot be made or the ports are bad)."""
        ports = all_host_ports(self.factory.settings, host_ports, "flightvm_factory.create")
        return self.factory.create(VMRequest(name=name, memory=memory, vcpus=vcpus,
                                             user_data=(user_data,) if user_data else (),
                                             host_ports=ports))

    def destroy(self, vm: Machine) -> None:
        self.factory.discard(vm)

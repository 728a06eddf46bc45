"""The worker's factory and pooled VMs behind the plugin's fixtures: one pool per kind, and the keep policy.

Pytest-free: the plugin hands in the settings, the image, the run, the user's hooks
(:class:`UserHooks`, over pluggy's hook caller) and a notice writer; :meth:`VMSession.open`
opens the worker's factory, then per test the plugin calls :meth:`VMSession.acquire` and,
after the test, :meth:`VMSession.release` with whether it failed. The session owns:

- the factory, closed after the pools at the end;
- the pools by kind of VM (``flightvm``, ``flightctl``), made on first use, with the
  profile's and the user's hooks around each pristine point and reset (the order is in
  :mod:`profile`);
- the resets they ran, each with the test it ran before (the run's metrics);
- the keep/discard/diagnose policy: a VM that failed to boot gets the profile's
  diagnosis in its error, and is kept (``--flightvm-keep`` not ``never``) or discarded;
  after a test, the VM is kept when ``always``, or ``on-failure`` and the test or the
  VM failed; a kept VM leaves its pool and its hint (``kept-<name>.txt``) goes in the
  run dir for the summary.

Marker arguments are merged and checked here too (:func:`pooled_request`), before any VM
is asked for; the flightctl profile is made once per config dir (:func:`flightctl_profile`);
what a test's report carries of its VMs (junit properties, the sections of a failed test)
is :func:`junit_properties` and :func:`failure_sections`; :class:`ExtraVMs` is the
``flightvm_factory`` fixture's object.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings, parse_ports
from ..errors import BootError, ConfigError
from ..profile import VMProfile
from . import factory as factory_module
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


@dataclass(frozen=True)
class PooledRequest:
    """What one test asks of the pool of its ``kind`` of VM: the VM request, the reset mode,
    the host ports to open, the marker's arguments and the profile (None: a plain VM)."""

    kind: str
    request: VMRequest
    reset: str
    ports: tuple[int, ...]
    marks: Mapping[str, Any]
    profile: VMProfile | None = None


def merge_marks(closest_first: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``flightvm`` markers' arguments, closest first (the test's own, then its class's,
    its module's): merged so that the closest wins."""
    marks: dict[str, Any] = {}
    for kwargs in reversed(list(closest_first)):
        marks.update(kwargs)
    return marks


def pooled_request(kind: str, settings: Settings, marks: Mapping[str, Any],
                   user_data: Mapping[str, Any], profile: VMProfile | None = None) -> PooledRequest:
    """What one test asks of its pool (ConfigError on a bad marker argument).

    The pool's VM boots (and is saved at its pristine point) with no forwards; the ports
    are opened per test, after any reset, so a marker's ports cost a forward, not a boot."""
    marks = check_marks(marks)
    ports = all_host_ports(settings, marks.get("host_ports"), "marker flightvm host_ports")
    user_datas = tuple(u for u in (user_data, marks.get("user_data")) if u)
    req = VMRequest(memory=marks.get("memory"), vcpus=marks.get("vcpus"),
                    user_data=(profile.user_data if profile else ()) + user_datas,
                    seed_payload=profile.seed_payload if profile else {},
                    ready_checks=profile.ready_checks if profile else (), host_ports=())
    return PooledRequest(kind, req, marks.get("reset") or settings.reset, ports, marks, profile)


def flightctl_profile(vm_config: Path, profiles: dict[Path, VMProfile]) -> VMProfile:
    """The flightctl profile of a VM config dir, made once per worker and dir (kept in
    ``profiles``): the pool matches VMs by its ready checks' ids. ConfigError on a bad dir."""
    from .. import flightctl

    loaded = flightctl.load_vm_config(vm_config)
    if loaded.root not in profiles:
        profiles[loaded.root] = flightctl.FlightctlProfile(loaded)
    return profiles[loaded.root]


def junit_properties(vm: Machine, made: str, seconds: float) -> list[tuple[str, str]]:
    """The test's VM in its junit XML entry (user properties, as ``record_property`` adds):
    its name, how it was made for this test (booted, reset, reused, boot failed), the
    seconds that took, and its console log under --flightvm-artifacts."""
    props = [("flightvm_vm", vm.name), ("flightvm_vm_made", made),
             ("flightvm_vm_seconds", f"{seconds:.1f}")]
    artifact = getattr(vm, "artifact", None)
    if artifact is not None:
        props.append(("flightvm_console", str(artifact)))
    return props


def failure_sections(vms: Iterable[Machine]) -> list[tuple[str, str]]:
    """The report sections of a failed test, per VM it used: the console's last 40 lines
    and the VM's own failure detail, when it has one."""
    sections = []
    for vm in vms:
        sections.append((f"flightvm console {vm.name}", vm.console_tail(40)))
        extra = getattr(vm, "failure_detail", None)
        text = extra() if callable(extra) else None
        if text:
            sections.append((f"flightvm {vm.name}", text))
    return sections


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


class UserHooks:
    """The user's ``pytest_flightvm_*`` hooks (specified in :mod:`hooks`) as plain methods,
    called by name through ``caller`` (pluggy's hook relay: no pytest here); ``config`` is
    handed back, untouched, to the hook that takes it."""

    def __init__(self, caller: Any, config: Any) -> None:
        self.caller, self.config = caller, config

    def user_data(self, vm_name: str, user_data: dict[str, Any]) -> None:
        self.caller.pytest_flightvm_user_data(config=self.config, vm_name=vm_name,
                                              user_data=user_data)

    def vm_ready(self, vm: Machine) -> None:
        self.caller.pytest_flightvm_vm_ready(vm=vm)

    def before_snapshot(self, vm: Machine) -> None:
        self.caller.pytest_flightvm_before_snapshot(vm=vm)

    def after_revert(self, vm: Machine) -> None:
        self.caller.pytest_flightvm_after_revert(vm=vm)

    def implementations(self) -> dict[str, list[Callable[..., Any]]]:
        """The user's functions of the hooks that shape a VM before its pristine point."""
        return {name: [impl.function for impl in getattr(self.caller, name).get_hookimpls()]
                for name in STATE_HOOKS}


class VMSession:
    """The worker's factory, pools, their resets and the keep policy, for one pytest session.

    ``hooks`` are the user's; their ``implementations()`` are read when a pool is made,
    for its state key."""

    def __init__(self, factory: VMFactory, settings: Settings, run: RunContext, *,
                 hooks: UserHooks, notice: Callable[[str], None]) -> None:
        self.factory, self.settings, self.run = factory, settings, run
        self.hooks = hooks
        self.notice = notice
        self.pools: dict[str, pool_module.VMPool] = {}
        self.resets: list[dict[str, Any]] = []  # each pool reset, with the test it preceded
        self.kept: list[str] = []  # names of the VMs kept in this session
        self._resumed = False  # did the profile's resume run in this acquire (after a reset)?

    @classmethod
    def open(cls, settings: Settings, image: Any, run: RunContext, *, hooks: UserHooks,
             notice: Callable[[str], None], **options: Any) -> VMSession:
        """The session over the worker's new factory, on the resolved ``image``; ``options``
        are the factory's (console_out, progress)."""
        # looked up at call time: the plugin's pytester tests stand a fake factory in here
        factory = factory_module.open_factory(
            settings, Path(image.path), run, user_data_hook=hooks.user_data, notice=notice,
            base_digest=getattr(image, "digest", None) or None, **options)
        return cls(factory, settings, run, hooks=hooks, notice=notice)

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
            self.hooks.before_snapshot(vm)

        def after_revert(vm: Machine) -> None:
            if profile is not None:
                profile.after_revert(vm)
            self.hooks.after_revert(vm)
            if profile is not None:
                profile.resume(vm)
            self._resumed = True

        states = share = None
        if self.settings.state_cache in ("on", "registry"):
            from .stateshare import StateShare  # registry code: only when states are shared

            states = StateCache(self.settings.states_dir, notice=self.notice)
            share = StateShare.for_settings(self.settings, self.notice)
        # looked up at call time: the plugin's pytester tests stand a fake pool in here
        self.pools[kind] = pool_module.VMPool(
            self.factory, on_ready=self.hooks.vm_ready, before_snapshot=before_snapshot,
            after_revert=after_revert, notice=self.notice, states=states, share=share,
            state_inputs=state_inputs(self.hooks.implementations(), profile))
        return self.pools[kind]

    def acquire(self, ask: PooledRequest, *, test: str = "", record: Record = _no_record) -> Machine:
        """The test's VM: ready, reset unless ``ask.reset == 'none'``, with ``ask.ports`` open.

        ``record(vm, made, seconds)`` hears how it was made (booted, reset, reused, or
        boot failed) and how long that took. A BootError is raised again after its VM got
        the profile's diagnosis and was kept or discarded."""
        req, reset, ports, marks, profile = ask.request, ask.reset, ask.ports, ask.marks, ask.profile
        pool = self.pool(ask.kind, profile)
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
        """Close the pools, then the factory (which destroys every VM it still has)."""
        try:
            for pool in self.pools.values():
                pool.close()
        finally:
            self.factory.close()


class ExtraVMs:
    """``create(**overrides) -> VM`` for VMs beside the pooled one, each handed to the
    user's ``vm_ready`` hook once ready; the factory destroys them all at session end."""

    def __init__(self, factory: VMFactory, vm_ready: VMHook, *,
                 errors: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
                 ) -> None:
        """``errors()`` wraps the making of each VM (the plugin's: a FlightVMError as one
        line); the user's hook runs outside it."""
        self.factory, self.vm_ready, self.errors = factory, vm_ready, errors

    def create(self, *, name: str | None = None, memory: int | None = None,
               vcpus: int | None = None, user_data: dict[str, Any] | None = None,
               host_ports: list[int] | tuple[int, ...] | None = None) -> Machine:
        with self.errors():
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

"""An in-process stand-in for the VM layer, for pytester tests of the plugin layer only.

Loaded into an inner pytest run as a plugin (``run_plugin_suite`` passes
``-p tests.fake_backend``), it replaces the two places where the plugin reaches libvirt:

- ``vm.factory.open_factory`` -> :class:`FakeFactory`: "boots" a :class:`FakeVM` per
  request, reporting a few boot stages to the plugin's status line, merging the request's
  user-data and handing it to the ``pytest_flightvm_user_data`` hook like the real one;
  user-data ``{"fake": {"boot": "fail"}}`` makes the boot fail (a BootError carrying the
  VM, as the real factory raises it);
- ``vm.pool.VMPool`` -> :class:`FakePool`: the real pool's callback order (boot, on_ready,
  before_snapshot, pristine point, after_revert; a reset: after_revert) with no libvirt,
  the reset recorded as ``restore`` (``reboot``: a fresh VM; ``none``: shared as it is).

Everything else is the real plugin: settings, the run dir, the image (resolved for real
through this module's ``pytest_flightvm_build_image`` hook, which writes a small fake
qcow2), the session's keep policy, junit properties, report sections, metrics and the
summary. A fake never counts as covering libvirt or a guest: integration tests do that.

Import it as ``tests.fake_backend`` (the inner run gets the repository on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pytest_flightvm.errors import BootError
from pytest_flightvm.vm import factory as factory_module
from pytest_flightvm.vm import pool as pool_module
from tests.fake_disk import QCOW2_MAGIC, write_fake_qcow2

REPO_ROOT = Path(__file__).resolve().parents[1]
EVENTS: list[str] = []  # the pool's steps, in order, for tests of the hook order
STATE_INPUTS: list[list[str]] = []  # each pool's state_inputs (fingerprints of hook code)
BOOT_STAGES = ("firmware", "kernel", "cloud-init init")


class FakeVM:
    """What the plugin and the user's tests touch on a VM, recorded instead of done."""

    def __init__(self, name: str, request: Any, user_data: dict[str, Any]) -> None:
        self.name = name
        self.request = request  # the VMRequest it was made from (memory, vcpus, ...)
        self.user_data = user_data  # as merged and passed through the user_data hook
        self.failed = False
        self.artifact: Path | None = None
        self.accel = "tcg"
        self.spec = SimpleNamespace(memory_mib=request.memory or 1024, vcpus=request.vcpus or 2,
                                    firmware=SimpleNamespace(name="bios"), tpm=False,
                                    cpu_model=None)
        self.started, self.boot_seconds, self.ready_seconds = "booted", 1.5, 1.5
        self.boot_attempts = 1
        self.phases: dict[str, float] = {}
        self.revert_seconds: list[float] = []
        self.pristine_seconds: float | None = None
        self.host_ports: tuple[int, ...] = ()
        self.reopened = 0  # set_host_ports(..., reopen=True) calls: once per reset
        self.console = [f"{name} login: "]
        self.commands: list[str] = []

    def run(self, cmd: str, check: bool = True, timeout: float = 120,
            input: bytes | str | None = None) -> Any:  # noqa: A002 - the real signature
        self.commands.append(cmd)
        if cmd.startswith("echo ") and cmd.endswith(" > /dev/console"):
            self.console.append(cmd[5:-len(" > /dev/console")])
        return SimpleNamespace(returncode=0, stdout="", stderr="", ok=True)

    def console_tail(self, lines: int = 30) -> str:
        return "\n".join(self.console[-lines:])

    def failure_detail(self) -> str:
        return f"fake diagnostics of {self.name}"

    def set_host_ports(self, ports: tuple[int, ...] | list[int], *, reopen: bool = False) -> None:
        self.host_ports = tuple(ports)
        self.reopened += reopen

    def save_pristine(self) -> None:
        """The pool made the pristine point: a subclass keeps what a reset brings back."""

    def back_to_pristine(self) -> None:
        """The pool reset the VM: a subclass puts back what ``save_pristine`` kept."""


VM_CLASS: Callable[[str, Any, dict[str, Any]], Any] = FakeVM  # a conftest may put a subclass here


class FakeFactory:
    """``vm.factory.VMFactory``'s face, with VMs that boot in no time."""

    def __init__(self, settings: Any, base_image: Path, run: Any, *,
                 user_data_hook: Callable[[str, dict[str, Any]], None] | None = None,
                 notice: Callable[[str], None] = print, progress: Any = None,
                 **_options: Any) -> None:
        assert base_image.read_bytes()[:4] == QCOW2_MAGIC  # the plugin resolved a real image
        self.settings, self.run, self.notice = settings, run, notice
        self.user_data_hook, self.progress = user_data_hook, progress
        self.host = SimpleNamespace(label="fake", local=True)
        self.uploads: list[dict[str, Any]] = []
        self.booted: list[Any] = []
        self.machines: list[Any] = []
        self.hung_boots: list[dict[str, Any]] = []
        self.discarded: list[str] = []

    def create(self, request: Any) -> Any:
        name = request.name or f"{len(self.booted) + 1}"
        vm_name = f"flightvm-{self.run.run_id}-{self.run.worker}-{name}"
        user_data: dict[str, Any] = {}
        for part in request.user_data:
            user_data.update(part)
        if self.user_data_hook is not None:
            self.user_data_hook(vm_name, user_data)
        vm = VM_CLASS(vm_name, request, user_data)
        self.booted.append(vm)
        self.machines.append(vm)
        for elapsed, stage in enumerate(BOOT_STAGES):
            if self.progress is not None:
                self.progress(vm, float(elapsed), stage, False)
        if user_data.get("fake", {}).get("boot") == "fail":
            vm.boot_seconds = vm.ready_seconds = None
            if self.progress is not None:
                self.progress(vm, 3.0, "failed", True)
            exc = BootError(f"{vm_name} did not become ready (fake boot failure)",
                            detail="--- console tail\nkernel panic (fake)")
            exc.machine = vm  # type: ignore[attr-defined]  # as the real factory does
            raise exc
        if self.progress is not None:
            self.progress(vm, 3.0, "ready", True)
        return vm

    def discard(self, vm: Any, **_kw: Any) -> None:
        self.discarded.append(vm.name)
        if vm in self.machines:
            self.machines.remove(vm)

    def keep(self, vm: Any) -> str:
        if vm in self.machines:
            self.machines.remove(vm)
        return (f"flightvm: kept VM {vm.name}\n"
                f"  ssh:     ssh fake@{vm.name}\n"
                f"  remove:  flightvm gc --name {vm.name}")

    def close(self) -> None:
        for vm in list(self.machines):
            self.discard(vm)
        _dump(self)


class FakePool(pool_module.VMPool):
    """``vm.pool.VMPool`` with its boot and reset replaced (no libvirt), in the real pool's
    callback order; detach, drop and close are the real pool's."""

    def __init__(self, factory: Any, **callbacks: Any) -> None:
        super().__init__(factory, **callbacks)
        STATE_INPUTS.append(list(self.state_inputs))

    def _boot(self, request: Any, reset: str) -> Any:
        vm = self.factory.create(request)
        EVENTS.append("boot")
        self.on_ready(vm)
        self.current, self._key, self._dirty = vm, request.spec_key(), False
        if reset in pool_module.PRISTINE_MODES:
            self.before_snapshot(vm)
            EVENTS.append("pristine")
            vm.save_pristine()
            self.after_revert(vm)
        return vm

    def _reset(self, machine: Any, request: Any, reset: str) -> Any:
        if reset == "reboot":
            self.drop()
            fresh = self._boot(request, reset)
            self.resets.append({"vm": fresh.name, "mode": "reboot", "ok": True, "seconds": 1.5})
            return fresh
        EVENTS.append("revert")
        machine.back_to_pristine()
        machine.revert_seconds.append(0.5)
        self.resets.append({"vm": machine.name, "mode": "restore", "ok": True, "seconds": 0.5})
        self.after_revert(machine)
        return machine


def _dump(factory: FakeFactory) -> None:
    """What this process's fakes saw, for the outer test (``record(cache_dir, worker)``)."""
    worker = factory.run.worker  # the inner run's own (the outer run's env may name another)
    vms = {vm.name: {"memory": vm.request.memory, "vcpus": vm.request.vcpus,
                     "user_data": vm.user_data, "host_ports": list(vm.host_ports),
                     "reopened": vm.reopened, "commands": vm.commands} for vm in factory.booted}
    data = {"events": EVENTS, "state_inputs": STATE_INPUTS, "vms": vms,
            "discarded": factory.discarded}
    (factory.settings.cache_dir / f"fake-{worker}.json").write_text(json.dumps(data, default=str))


# ---------------------------------------------------------------- the inner run's plugin
def pytest_configure(config: Any) -> None:
    """Only in the inner run (loaded with ``-p``), never on import: the plugin imports
    both names from these modules when a VM is first needed."""
    factory_module.open_factory = FakeFactory  # type: ignore[assignment]
    pool_module.VMPool = FakePool  # type: ignore[misc, assignment]


def pytest_flightvm_build_image(config: Any, output: Path, key: str) -> bool:
    """The base image: a small, real (header-only) qcow2; each build is counted."""
    assert len(key) == 64 and int(key, 16) >= 0  # the key arrived as an argument
    write_fake_qcow2(output, 4096)
    builds = Path(config.getoption("flightvm_cache_dir")) / "fake-builds.log"
    with open(builds, "a") as fh:
        fh.write(f"{getattr(config, 'workerinput', {}).get('workerid', 'main')} {key}\n")
    return True


def run_plugin_suite(pytester: Any, cache_dir: Path, *args: str) -> Any:
    """Run the pytester suite in a subprocess with this backend standing in for libvirt."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), old) if p)
    try:
        return pytester.runpytest_subprocess("-p", "tests.fake_backend", "-p", "no:cacheprovider",
                                             f"--flightvm-cache-dir={cache_dir}", *args)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def record(cache_dir: Path, worker: str = "main") -> dict[str, Any]:
    """What the fakes of one inner process saw: pool events, state inputs, VMs, discards."""
    data: dict[str, Any] = json.loads((cache_dir / f"fake-{worker}.json").read_text())
    return data

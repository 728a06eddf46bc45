"""Create, track and tear down the VMs of one test process.

``VMFactory`` is the pytest-free core behind the ``flightvm``,
``flightctl_vm`` and ``flightvm_factory`` fixtures: it names each VM, picks
its port and MAC, renders its seed, boots it on an overlay of the base, and
destroys everything it made at the end.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..config import Settings
from ..errors import (
    BootError,
    ConfigError,
    FlightVMError,
    HostPortTaken,
    KVMUnusable,
    LibvirtUnreachable,
)
from ..hosts import assign
from ..seed.iso import write_iso
from ..seed.render import SeedSpec, load_cloud_init_dir, merge_cloud_init_dir, render
from ..statedir import ensure_cache_dir, private_dir
from . import accel as accel_mod
from . import firmware as fw_mod
from .domain import NAME_PREFIX, DomainSpec, Owner, random_mac, vm_name_problem
from .hostkey import HostKey, generate_host_key, write_known_hosts
from .hostports import HOST_ADDRESS, alias_user_data, install_host_alias
from .libvirt_conn import connect
from .machine import Machine, ReadyCheck
from .ports import release_port, reserve_port
from .reaper import KEPT_MARKER
from .ssh import Login, SSHClient, generate_keypair, write_askpass
from .volumes import BaseVolume, HostStorage, VMVolumes

log = logging.getLogger("flightvm")

USERNAME = "flightvm"
#: Ports tried for one VM on a remote host before giving up (see _boot_on_a_free_port).
PORT_TRIES = 3


def new_run_id() -> str:
    """Short, sortable, unique: ``YYMMDDHHMMSS-xxxx``."""
    return time.strftime("%y%m%d%H%M%S") + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class RunContext:
    """The run this process belongs to (shared by all xdist workers of one pytest run)."""

    run_id: str
    run_dir: Path
    worker: str = "main"

    @classmethod
    def create(cls, settings: Settings, run_id: str, worker: str) -> RunContext:
        return cls(run_id, make_run_dir(settings.runs_dir, run_id), worker)


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2**20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def make_run_dir(runs_dir: Path, run_id: str) -> Path:
    """``runs_dir/run_id``, both private (0700, ours, no planted links), the cache dir ours."""
    ensure_cache_dir(runs_dir.parent)
    return private_dir(private_dir(runs_dir, parents=False) / run_id, parents=False)


@dataclass(frozen=True)
class VMRequest:
    """Per-VM overrides on top of the settings."""

    name: str | None = None
    memory: int | None = None
    vcpus: int | None = None
    user_data: tuple[Mapping[str, Any], ...] = ()
    seed_payload: Mapping[str, bytes] = field(default_factory=dict)
    ready_checks: tuple[ReadyCheck, ...] = ()
    # Host ports this VM may reach (None: the settings' --flightvm-host-port list). Not part
    # of spec_key: a pooled VM changes its forwards in a second, without a new boot.
    host_ports: tuple[int, ...] | None = None

    def spec_key(self) -> tuple[Any, ...]:
        """What makes two requests interchangeable for VM reuse."""
        return (self.memory, self.vcpus, repr(self.user_data), sorted(self.seed_payload),
                tuple(id(c) for c in self.ready_checks))


UserDataHook = Callable[[str, dict[str, Any]], None]


class VMFactory:
    def __init__(
        self,
        settings: Settings,
        base_image: Path,
        run: RunContext,
        *,
        user_data_hook: UserDataHook | None = None,
        notice: Callable[[str], None] = log.warning,
        console_out: TextIO | None = None,
        base_digest: str | None = None,
    ) -> None:
        self.settings = settings
        # The libvirt host of this worker: the one local host unless --flightvm-hosts lists
        # more, then the one with the most free slots, picked under the run's lock.
        self.host, over = assign(settings.host_list, run.run_dir, run.worker)
        if over:
            notice(f"flightvm: every host slot is taken; worker {run.worker} shares "
                   f"{self.host.label} (add #slots=N or hosts to --flightvm-hosts)")
        self.base_digest = base_digest
        self._storage: HostStorage | None = None
        self._base_volume: BaseVolume | None = None
        # base uploads to the remote host: one entry per factory (bytes 0 = already there)
        self.uploads: list[dict[str, Any]] = []
        # --flightvm-console: where guest consoles stream live (the plugin hands over a
        # copy of the terminal's stderr taken before pytest's capture)
        self.console_out = (console_out or sys.__stderr__) if settings.console else None
        self.base_image = base_image
        self.run = run
        self.user_data_hook = user_data_hook
        self.notice = notice
        self.machines: list[Machine] = []
        self.booted: list[Machine] = []  # every VM that became ready, for metrics
        self._counter = 0
        self._lock = threading.Lock()
        self._conn: Any = None
        self.firmware = fw_mod.firmware(settings.firmware)
        self._hardware_checked = False
        self.key_path, self.public_key = generate_keypair(run.run_dir / "ssh")
        self.login = self._login()
        self._warned: set[str] = set()

    def _login(self) -> Login:
        """The run's key for the user cloud-init makes, or the image's own (baked) login."""
        s = self.settings
        if s.ssh_user is None:
            return Login(USERNAME, self.key_path)
        if s.ssh_password is not None:
            return Login(s.ssh_user, self.key_path, password=s.ssh_password,
                         askpass=write_askpass(self.run.run_dir / "ssh"), baked=True)
        assert s.ssh_key is not None  # config.validate_login
        return Login(s.ssh_user, s.ssh_key, baked=True)

    def _warn_once(self, line: str) -> None:
        if line not in self._warned:
            self._warned.add(line)
            self.notice(line)

    @property
    def conn(self) -> Any:
        if self._conn is None:
            try:
                self._conn = connect(self.host.uri)
            except LibvirtUnreachable as exc:
                if self.host.local:
                    raise
                raise LibvirtUnreachable(
                    f"cannot reach libvirt host {self.host.label} "
                    f"({str(exc).partition(' (')[2].rpartition(');')[0] or 'no answer'}); "
                    "check that entry of --flightvm-hosts (user, port, keyfile) and that "
                    "libvirtd runs there") from None
        return self._conn

    def prepare_host(self) -> None:
        """On a remote host: its pool and the base (uploaded once per digest), before the
        first VM; a local host needs nothing."""
        if self.host.local:
            return
        self._check_remote()
        if self._storage is None:
            self._storage = HostStorage(self.conn, self.host,
                                        lock_dir=self.settings.cache_dir / "host-locks")
        if self._base_volume is None:
            digest = self.base_digest or _file_digest(self.base_image)
            base = self._storage.ensure_base(self.base_image, digest)
            self._base_volume = base
            self.uploads.append({"host": self.host.label, "pool": self.host.pool,
                                 "digest": digest, "bytes": base.uploaded_bytes,
                                 "seconds": round(base.seconds, 3),
                                 "skipped": base.uploaded_bytes == 0})
            if base.uploaded_bytes:
                self.notice(f"flightvm: uploaded the base ({base.uploaded_bytes / 2**20:.0f} MiB) "
                            f"to {self.host.label} pool {self.host.pool} in {base.seconds:.1f}s")

    def _remote_volumes(self, name: str, iso: Path) -> VMVolumes:
        """On a remote host: the base (uploaded once per digest), then this VM's volumes."""
        self.prepare_host()
        assert self._storage is not None and self._base_volume is not None
        return self._storage.create_vm_volumes(name, self._base_volume, iso)

    def _check_remote(self) -> None:
        s = self.settings
        if s.firmware != "bios" or s.tpm:
            raise ConfigError(f"{self.host.label}: VMs on a remote libvirt host run BIOS "
                              "firmware without a TPM for now; drop --flightvm-firmware/"
                              "--flightvm-tpm or use a local host")

    def _next_name(self) -> str:
        with self._lock:
            self._counter += 1
            return f"{NAME_PREFIX}{self.run.run_id}-{self.run.worker}-{self._counter}"

    def create(self, request: VMRequest | None = None) -> Machine:
        """Boot a VM and wait until it is ready. Raises BootError with the console tail."""
        request = request or VMRequest()
        name = request.name or self._next_name()
        if not name.startswith(f"{NAME_PREFIX}{self.run.run_id}-"):
            # the reaper knows a VM of ours by this prefix (see vm/reaper.py)
            name = f"{NAME_PREFIX}{self.run.run_id}-{name.removeprefix(NAME_PREFIX)}"
        if len(name) > 63:
            raise ConfigError(f"VM name {name!r} is longer than 63 characters; pass a shorter name")
        if (problem := vm_name_problem(name)) is not None:
            raise ConfigError(f"VM name {name!r} {problem}; pass another name")
        if self.host.local:
            accel, probation = accel_mod.initial_choice(self.settings.accel,
                                                        accel_mod.host_state_dir())
        else:
            # the KVM verdict on file is this machine's, not the remote host's
            self._check_remote()
            accel, probation = ("kvm" if self.settings.accel == "kvm" else "tcg"), False
        self._check_hardware(accel)
        try:
            machine = self._boot_on_a_free_port(name, request, accel, probation)
        except KVMUnusable as exc:
            accel_mod.save_verdict(accel_mod.host_state_dir(), "tcg", str(exc))
            self.notice(f"flightvm: KVM cannot run guests on this host ({exc}); "
                        "falling back to TCG (verdict remembered)")
            machine = self._boot_on_a_free_port(name, request, "tcg", False)
        if probation and machine.accel == "kvm":
            accel_mod.save_verdict(accel_mod.host_state_dir(), "kvm", "a guest booted under KVM")
        return machine

    def _boot_on_a_free_port(self, name: str, request: VMRequest, accel: str,
                             probation: bool) -> Machine:
        """``_boot``; on a remote host whose QEMU found the SSH port taken there (we pick it
        free here), again with another port, up to PORT_TRIES times."""
        for attempt in range(1, PORT_TRIES + 1):
            try:
                return self._boot(name, request, accel, probation)
            except HostPortTaken as exc:
                if attempt == PORT_TRIES:
                    raise HostPortTaken(f"{exc}, and on {PORT_TRIES - 1} other port(s); "
                                        "free some ports on that host") from None
                self.notice(f"flightvm: {exc}; trying another port")
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_hardware(self, accel: str) -> None:
        """Firmware files, swtpm and the CPU model, once, before the first VM starts."""
        if self._hardware_checked:
            return
        if self.host.local:  # firmware files and swtpm on this machine
            fw_mod.check_host(self.firmware, tpm=self.settings.tpm)
        if self.settings.cpu:
            usable = fw_mod.check_cpu(self.conn, self.settings.cpu, accel=accel,
                                      emulator=DomainSpec.emulator)
            if not usable:
                log.info("flightvm: CPU model %s lacks a few features under %s; QEMU boots it "
                         "with a warning", self.settings.cpu, accel)
        self._hardware_checked = True

    def _boot(self, name: str, request: VMRequest, accel: str, probation: bool) -> Machine:
        if (problem := vm_name_problem(name)) is not None:  # before any file is touched
            raise ConfigError(f"VM name {name!r} {problem}; pass another name")
        vm_dir = private_dir(self.run.run_dir / "vms") / name
        if vm_dir.is_symlink():
            vm_dir.unlink()  # never follow a link planted where a VM dir goes
        shutil.rmtree(vm_dir, ignore_errors=True)
        private_dir(vm_dir, parents=False)
        port = reserve_port()
        mac = random_mac()
        iso = vm_dir / "seed.iso"
        # Our seed (a cloud-init dir is merged into it) gives the guest a host key made for
        # this VM, pinned in its known_hosts. A baked login may be an image without
        # cloud-init, which never reads the seed: there the first contact pins the key.
        host_key = generate_host_key(vm_dir, name)
        pinned = None if self.login.baked else host_key
        known_hosts = write_known_hosts(vm_dir, "127.0.0.1", port, pinned)
        self._write_seed(name, mac, request, iso, host_key)
        overlay = vm_dir / "overlay.qcow2"
        console = vm_dir / "console.log"
        volumes: VMVolumes | None = None
        remote: dict[str, Any] = {}
        if not self.host.local:
            try:
                volumes = self._remote_volumes(name, iso)
            except BaseException:
                release_port(None, port)
                raise
            overlay, iso = Path(volumes.overlay), Path(volumes.seed)
            remote = {"console_path": volumes.console, "pool": self.host.pool,
                      "volumes": tuple(Path(p).name for p in
                                       (volumes.overlay, volumes.seed, volumes.console))}
        nvram = fw_mod.new_nvram(self.firmware, vm_dir / "nvram.fd") if volumes is None else None
        spec = DomainSpec(
            name=name, overlay=overlay, seed_iso=iso, console_log=console, ssh_port=port,
            mac=mac, owner=Owner.current(self.run.run_id, self.run.worker, self.run.run_dir),
            memory_mib=request.memory or self.settings.memory,
            vcpus=request.vcpus or self.settings.vcpus, accel=accel,
            files=(vm_dir,), firmware=self.firmware, nvram=nvram, tpm=self.settings.tpm,
            cpu_model=self.settings.cpu,
            outbound=self.settings.guest_outbound,
            **remote,
        )
        ssh = SSHClient(port, self.login.key, self.login.user, known_hosts=known_hosts,
                        host_key_check="yes" if pinned is not None else "accept-new",
                        login=self.login, jump=self.host.jump())
        machine = Machine(
            self.conn, spec, ssh,
            base=self.base_image, vm_dir=vm_dir,
            boot_timeout=accel_mod.timeout_for(accel, self.settings.boot_timeout),
            ready_checks=request.ready_checks, console_out=self.console_out,
            volumes=volumes,
        )
        machine.kvm_probation = probation
        self.machines.append(machine)
        try:
            machine.boot()
            if self.settings.host_alias and machine.has_cloud_init is False:
                # an image without cloud-init never read the seed's /etc/hosts entry
                install_host_alias(machine.run, self.settings.host_alias, HOST_ADDRESS)
            machine.set_host_ports(request.host_ports if request.host_ports is not None
                                   else self.settings.host_ports)
        except (KVMUnusable, HostPortTaken):
            self.discard(machine, port=port)
            raise
        except BootError as exc:
            exc.machine = machine  # type: ignore[attr-defined]  # for diagnosis and keep
            self._keep_console(machine)
            raise
        except BaseException:
            self._keep_console(machine)
            raise
        self.booted.append(machine)
        return machine

    def _write_seed(self, name: str, mac: str, request: VMRequest, iso: Path,
                    host_key: HostKey | None = None) -> None:
        overrides = [dict(u) for u in request.user_data]
        if self.login.password is not None:
            # cloud-init's default ssh_pwauth: false would lock the baked password login out
            overrides.insert(0, {"ssh_pwauth": True})
        if host_key is not None:
            overrides.insert(0, host_key.user_data())
        if self.settings.host_alias:
            overrides.insert(0, alias_user_data(self.settings.host_alias, HOST_ADDRESS))
        if self.user_data_hook is not None:
            extra: dict[str, Any] = {}
            self.user_data_hook(name, extra)
            if extra:
                overrides.append(extra)
        spec = SeedSpec(
            instance_id=f"{name}-{uuid.uuid4().hex[:8]}",
            hostname=name,
            mac=mac,
            username=USERNAME,
            ssh_public_key=self.public_key,
            user_data=tuple(overrides),
        )
        if self.settings.cloud_init_dir is not None:
            given = load_cloud_init_dir(self.settings.cloud_init_dir)
            files, warnings = merge_cloud_init_dir(given, spec, request.seed_payload,
                                                   source=self.settings.cloud_init_dir)
            for line in warnings:
                self._warn_once(f"flightvm: {line}")
        else:
            files = dict(render(spec))
            files.update(request.seed_payload)
        write_iso(files, iso)

    def _keep_console(self, machine: Machine) -> None:
        try:
            machine.console_tail(1)  # a remote VM's console reaches its local mirror first
            logs = private_dir(self.run.run_dir / "consoles", parents=False)
            shutil.copy2(machine.spec.console_log, logs / f"{machine.name}.log")
        except (OSError, FlightVMError):
            pass

    def discard(self, machine: Machine, *, port: int | None = None) -> None:
        """Destroy one VM now and forget it."""
        machine.destroy()
        release_port(None, port if port is not None else machine.ssh_port)
        if machine in self.machines:
            self.machines.remove(machine)

    def keep(self, machine: Machine) -> str:
        """Leave ``machine`` running; return how to reach and remove it."""
        if machine in self.machines:
            self.machines.remove(machine)
        machine.ssh.close()
        (machine.vm_dir / KEPT_MARKER).write_text(f"{time.time()}\n")
        return (f"flightvm: kept VM {machine.name}\n"
                f"  ssh:     {machine.ssh_command()}\n"
                f"  console: virsh -c {self.host.uri} console {machine.name}"
                f"  (log: {machine.spec.console_log})\n"
                f"  remove:  flightvm gc --name {machine.name}")

    def close(self) -> None:
        for machine in list(self.machines):
            self.discard(machine)
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
            self._conn = None


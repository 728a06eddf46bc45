"""Create, track and tear down the VMs of one test process.

``VMFactory`` is the pytest-free core behind the ``flightvm``,
``flightctl_vm`` and ``flightvm_factory`` fixtures: it names each VM, picks
its port and MAC, renders its seed, boots it on an overlay of the base, and
destroys everything it made at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import artifacts
from ..config import Settings
from ..errors import (
    BootError,
    ConfigError,
    FlightVMError,
    GuestStuck,
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
from .libvirt_conn import connect, error_text
from .machine import BootProgress, Machine, ReadyCheck
from .ports import release_port, reserve_port
from .pristine import DEADLINE as PRISTINE_DEADLINE
from .pristine import Pristine
from .pristine import restore as restore_pristine
from .reaper import KEPT_MARKER, RUN_FILE, reap, write_run_file
from .savefile import read_header, retarget_xml, write_retargeted
from .ssh import Login, SSHClient, generate_keypair, write_askpass
from .statecache import SavedState
from .stateshare import StateVetting
from .volumes import BaseVolume, HostStorage, VMVolumes

log = logging.getLogger("flightvm")

USERNAME = "flightvm"
# the identity a state key's seed is rendered with: what differs per VM is not in the key
STATE_IDENTITY = "flightvm-state"
STATE_MAC = "52:54:00:00:00:00"


class _PlaceholderKey(HostKey):
    """A host key that renders as a fixed placeholder in a state key's seed."""

    def __init__(self, key: HostKey) -> None:
        super().__init__(key.private, key.public_line)

    def user_data(self) -> dict[str, Any]:
        return {"ssh_keys": {"ed25519_private": "STATE", "ed25519_public": self.public_line},
                "ssh_deletekeys": True}


def _file_identity(path: Path) -> str:
    """A pinned base without a digest: its path, size and times stand for its content."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _read_lines(path: Path | None) -> list[str]:
    try:
        return path.read_text().splitlines() if path is not None else []
    except OSError:
        return []
#: Ports tried for one VM on a remote host before giving up (see _boot_on_a_free_port).
PORT_TRIES = 3
#: Boots of one VM whose guest hung (GuestStuck) before its boot fails (see _boot_unstuck).
STUCK_BOOTS = 2


@dataclass(frozen=True)
class RunContext:
    """The run this process belongs to (shared by all xdist workers of one pytest run)."""

    run_id: str
    run_dir: Path
    worker: str = "main"

    @classmethod
    def create(cls, settings: Settings, run_id: str, worker: str) -> RunContext:
        return cls(run_id, make_run_dir(settings.runs_dir, run_id), worker)

    @classmethod
    def open(cls, runs_dir: Path, run_id: str, worker: str, owner: int | None = None) -> RunContext:
        """The run's private dir (made if missing), owned by ``owner`` (the pytest
        controller's pid, default this process): the reaper keeps it while that pid lives."""
        run = cls(run_id, make_run_dir(runs_dir, run_id), worker)
        if not (run.run_dir / RUN_FILE).exists():
            write_run_file(run.run_dir, pid=owner)
        return run


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
        progress: BootProgress | None = None,
        base_digest: str | None = None,
    ) -> None:
        self.settings = settings
        # The libvirt host of this worker: the one local host unless --flightvm-hosts lists
        # more, then the one with the most free slots, picked under the run's lock.
        self.host, over = assign(settings.host_list, run.run_dir, run.worker)
        if over:
            notice(f"flightvm: every host slot is taken; worker {run.worker} shares "
                   f"{self.host.label} (add #slots=N or hosts to --flightvm-hosts)")
        self.progress = progress  # hears each booting VM's stage (a live status line)
        self.base_digest = base_digest  # in the state key; None: the base file's identity
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
        # every boot whose guest hung (GuestStuck), retried or not, for metrics
        self.hung_boots: list[dict[str, Any]] = []
        self._counter = 0
        self._lock = threading.Lock()
        self._conn: Any = None
        self.firmware = fw_mod.firmware(settings.firmware)
        self._hardware_checked = False
        # --flightvm-artifacts: checked here, when the first VM is wanted, not at start-up
        self.artifacts = (artifacts.artifact_dir(settings.artifacts)
                          if settings.artifacts is not None else None)
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
        if not self.host.local:
            # the KVM verdict on file is this machine's, not the remote host's
            self._check_remote()
            accel = "kvm" if self.settings.accel == "kvm" else "tcg"
            self._check_hardware(accel)
            return self._boot_unstuck(name, request, accel, False)
        state_dir = accel_mod.host_state_dir()
        with accel_mod.first_choice(self.settings.accel, state_dir) as (accel, probation):
            self._check_hardware(accel)
            try:
                machine = self._boot_unstuck(name, request, accel, probation)
            except KVMUnusable as exc:
                accel_mod.save_verdict(state_dir, "tcg", str(exc))
                self.notice(f"flightvm: KVM cannot run guests on this host ({exc}); "
                            "falling back to TCG (verdict remembered)")
            else:
                if probation and machine.accel == "kvm":
                    accel_mod.save_verdict(state_dir, "kvm", "a guest booted under KVM")
                return machine
        # the TCG boot after a failed probe runs without the probe lock
        return self._boot_unstuck(name, request, "tcg", False)

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

    def _boot_unstuck(self, name: str, request: VMRequest, accel: str,
                      probation: bool) -> Machine:
        """``_boot_on_a_free_port``; a guest whose console shows it stuck (GuestStuck: a
        kernel panic, a long soft lockup or hung task) is destroyed with its files and
        booted once more from scratch (overlay, seed, port, host key), after one warning
        line: TCG hangs of that kind are transient. A second hang is the boot's failure,
        in one line (so at most 2 hung boots, whatever the port retries on a remote host).
        The VM's ``boot_attempts`` and ``ready_seconds`` (request to ready) count them."""
        start = time.monotonic()
        for attempt in range(1, STUCK_BOOTS + 1):
            began = time.monotonic()
            try:
                machine = self._boot_on_a_free_port(name, request, accel, probation)
            except GuestStuck as exc:
                hung: Machine | None = getattr(exc, "machine", None)
                self.hung_boots.append({"vm": name, "attempt": attempt, "reason": exc.hit,
                                        "seconds": round(time.monotonic() - began, 1),
                                        "retried": attempt < STUCK_BOOTS})
                if attempt == STUCK_BOOTS:
                    again = GuestStuck(f"{exc}; it hung on each of its {STUCK_BOOTS} boots",
                                       detail=exc.detail, hit=exc.hit)
                    again.machine = hung  # type: ignore[attr-defined]  # as _boot sets it
                    raise again from None
                if hung is not None:
                    self._keep_console(hung, suffix=f".boot{attempt}")
                    self.discard(hung)
                self.notice(f"flightvm: VM {name} hung during boot ({exc.hit}); "
                            "booting it once more")
                continue
            machine.boot_attempts = attempt
            if attempt > 1:
                machine.ready_seconds = time.monotonic() - start
            return machine
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
        vm_dir = self._new_vm_dir(name)
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
            progress=self.progress,
            volumes=volumes,
        )
        machine.kvm_probation = probation
        self._reserve_artifact(machine)
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
        write_iso(self._seed_files(name, mac, request, host_key=host_key), iso)

    def _seed_files(self, name: str, mac: str, request: VMRequest, *,
                    host_key: HostKey | None = None, instance_id: str | None = None,
                    public_key: str | None = None) -> dict[str, bytes]:
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
            instance_id=instance_id or f"{name}-{uuid.uuid4().hex[:8]}",
            hostname=name,
            mac=mac,
            username=USERNAME,
            ssh_public_key=public_key or self.public_key,
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
        return files

    # ------------------------------------------------------------ booted states
    def state_cache_refusal(self) -> str | None:
        """Why this factory's VMs cannot use the state cache (None: they can)."""
        if self.settings.tpm:
            # QEMU's stream holds swtpm's whole state: every VM restored from one state would
            # share the saving VM's TPM identity (endorsement key, seeds) and its RNG state.
            return ("with --flightvm-tpm (a restored state would clone the saving VM's TPM "
                    "identity)")
        if not self.host.local:
            # a save file is written and restored by the remote libvirtd, on its own disk
            return f"on a remote libvirt host ({self.host.label})"
        return None

    def state_parts(self, request: VMRequest, extra: tuple[str, ...] = (),
                    accel: str | None = None) -> dict[str, Any]:
        """What shapes the booted guest ``request`` asks for, minus per-VM identity: the
        inputs of its state key (vm/statecache.py). ``extra``: fingerprints the caller
        adds (the hooks that run before the pristine point); ``accel``: the one the VM
        ran under (default: the one a boot would try first)."""
        if accel is None:
            accel, _ = accel_mod.initial_choice(self.settings.accel, accel_mod.host_state_dir())
        placeholder = HostKey(Path("/dev/null"), "ssh-ed25519 STATE")
        files = self._seed_files(
            STATE_IDENTITY, STATE_MAC, request,
            host_key=None if self.login.baked else _PlaceholderKey(placeholder),
            instance_id=STATE_IDENTITY, public_key="ssh-ed25519 STATE")
        s = self.settings
        return {
            "base": self.base_digest or _file_identity(self.base_image),
            "seed": {n: hashlib.sha256(b).hexdigest() for n, b in sorted(files.items())},
            "memory": request.memory or s.memory, "vcpus": request.vcpus or s.vcpus,
            "firmware": self.firmware.name, "tpm": s.tpm, "cpu": s.cpu, "machine": "q35",
            "accel": accel, "qemu": self.conn.getVersion(), "libvirt": self.conn.getLibVersion(),
            "login": [self.login.user, self.login.baked, self.login.password is not None],
            "outbound": s.guest_outbound, "extra": list(extra),
        }

    def restore_state(self, request: VMRequest, saved: SavedState) -> tuple[Machine, Pristine]:
        """A new VM from ``saved``: its own name, UUID, overlay on the frozen disk, NVRAM copy,
        seed, console, SSH port and host key (the saved guest's key pinned beside it), the
        run's SSH key installed and the clock set. Raises FlightVMError (the caller evicts
        the state and boots); the half-made VM is discarded first."""
        start = time.monotonic()
        name = self._next_name()
        accel = str(saved.info.get("accel") or "tcg")
        vm_dir = self._new_vm_dir(name)
        port = reserve_port()
        host_key = generate_host_key(vm_dir, name)
        pinned = None if self.login.baked else host_key
        saved_keys = saved.host_keys
        known_hosts = write_known_hosts(vm_dir, "127.0.0.1", port, pinned, extra=saved_keys)
        iso = vm_dir / "seed.iso"
        # For a later reboot of this VM: its own instance-id and name, the saved MAC
        self._write_seed(name, saved.mac, request, iso, host_key)
        spec = DomainSpec(
            name=name, overlay=vm_dir / "overlay.qcow2", seed_iso=iso,
            console_log=vm_dir / "console.log", ssh_port=port, mac=saved.mac,
            owner=Owner.current(self.run.run_id, self.run.worker, self.run.run_dir),
            memory_mib=request.memory or self.settings.memory,
            vcpus=request.vcpus or self.settings.vcpus, accel=accel, files=(vm_dir,),
            firmware=self.firmware, nvram=vm_dir / "nvram.fd" if self.firmware.uefi else None,
            tpm=self.settings.tpm, cpu_model=self.settings.cpu,
            outbound=self.settings.guest_outbound)
        host_key_check = "yes" if pinned is not None or saved_keys else "accept-new"
        ssh = SSHClient(port, self.login.key, self.login.user, known_hosts=known_hosts,
                        host_key_check=host_key_check, login=self.login)
        machine = Machine(self.conn, spec, ssh, base=self.base_image, vm_dir=vm_dir,
                          boot_timeout=accel_mod.timeout_for(accel, self.settings.boot_timeout),
                          ready_checks=request.ready_checks, console_out=self.console_out)
        machine.started = "restored"
        self._reserve_artifact(machine)
        machine.has_cloud_init = saved.has_cloud_init
        machine.rename_from = saved.origin or None
        if not self.login.baked:
            machine.authorized_key = self.public_key
        self.machines.append(machine)
        try:
            header = read_header(saved.pristine.state)
            xml, _uuid = retarget_xml(header.xml, spec)
            own = Pristine(vm_dir / "pristine.state", saved.pristine.disk, saved.pristine.nvram)
            write_retargeted(saved.pristine.state, own.state, xml, header=header)
            copied = time.monotonic() - start
            spec.console_log.touch(mode=0o600)
            try:
                machine.dom = self.conn.defineXML(xml)
            except Exception as exc:  # noqa: BLE001 - libvirtError, in one line
                raise FlightVMError(f"libvirt refused the restored domain: {error_text(exc)}") \
                    from None
            if self.console_out is not None:
                machine._start_streaming(self.console_out)
            restore_pristine(machine, own, deadline=min(PRISTINE_DEADLINE, machine.boot_timeout))
            machine.phases["prepare"] = copied  # seed, host key, overlay, state copy
            machine.set_host_ports(request.host_ports if request.host_ports is not None
                                   else self.settings.host_ports)
        except BaseException:
            self._keep_console(machine)
            self.discard(machine)
            raise
        machine.ready_seconds = time.monotonic() - start
        self.booted.append(machine)
        return machine, own

    def state_vetting(self, request: VMRequest) -> StateVetting:
        """What a state pulled from the registry for ``request`` is checked against: our
        base (its overlay is rebased onto it), the firmware's NVRAM size, and the domain
        XML its save file gets instead of the one it came with, built from our own
        DomainSpec for ``request`` and the state's checked metadata (paths are
        placeholders: restore_state retargets them, as for every restore)."""
        nvram_size = (self.firmware.vars_template.stat().st_size
                      if self.firmware.vars_template is not None else None)
        placeholder = Path("/flightvm-state")

        def domain_xml(meta: dict[str, Any]) -> str:
            return DomainSpec(
                name=meta["origin"], overlay=placeholder / "overlay.qcow2",
                seed_iso=placeholder / "seed.iso", console_log=placeholder / "console.log",
                ssh_port=22, mac=meta["mac"],
                owner=Owner.current(self.run.run_id, self.run.worker, self.run.run_dir),
                memory_mib=request.memory or self.settings.memory,
                vcpus=request.vcpus or self.settings.vcpus, accel=meta["accel"], files=(),
                firmware=self.firmware,
                nvram=placeholder / "nvram.fd" if self.firmware.uefi else None,
                tpm=False, cpu_model=self.settings.cpu,
                outbound=self.settings.guest_outbound).to_xml()

        return StateVetting(self.base_image, nvram_size, domain_xml)

    def state_meta(self, machine: Machine) -> dict[str, Any]:
        """What a VM restored from ``machine``'s state must know: its MAC, the host keys
        it presents (as pinned in its known_hosts), its name (the hostname cloud-init
        set), whether it has cloud-init, its accel."""
        keys = []
        for line in _read_lines(machine.ssh.known_hosts):
            parts = line.split()
            if len(parts) >= 3 and not line.startswith("#"):
                keys.append(f"{parts[1]} {parts[2]}")
        return {"mac": machine.spec.mac, "host_keys": keys, "origin": machine.name,
                "has_cloud_init": machine.has_cloud_init, "accel": machine.accel}

    def _new_vm_dir(self, name: str) -> Path:
        if (problem := vm_name_problem(name)) is not None:  # before any file is touched
            raise ConfigError(f"VM name {name!r} {problem}; pass another name")
        vm_dir = private_dir(self.run.run_dir / "vms") / name
        if vm_dir.is_symlink():
            vm_dir.unlink()  # never follow a link planted where a VM dir goes
        shutil.rmtree(vm_dir, ignore_errors=True)
        return private_dir(vm_dir, parents=False)

    def _keep_console(self, machine: Machine, suffix: str = "") -> None:
        try:
            machine.console_tail(1)  # a remote VM's console reaches its local mirror first
            logs = private_dir(self.run.run_dir / "consoles", parents=False)
            shutil.copy2(machine.spec.console_log, logs / f"{machine.name}{suffix}.log")
        except (OSError, FlightVMError):
            pass

    def _reserve_artifact(self, machine: Machine) -> None:
        """Under --flightvm-artifacts: the file this VM's console log goes to, named now."""
        if self.artifacts is not None:
            machine.artifact = artifacts.reserve(self.artifacts, machine.name, ".console.log")

    def save_artifact(self, machine: Machine) -> None:
        """Copy the console log, as it is now, to the file reserved under --flightvm-artifacts."""
        if machine.artifact is not None:
            with contextlib.suppress(OSError, FlightVMError):
                machine.console_tail(1)  # a remote VM's console reaches its local mirror first
            artifacts.fill(machine.artifact, machine.spec.console_log)

    def discard(self, machine: Machine, *, port: int | None = None) -> None:
        """Destroy one VM now and forget it (its console goes to the artifacts dir first)."""
        machine.destroy(remove_files=False)
        self.save_artifact(machine)
        machine.delete_files()
        release_port(None, port if port is not None else machine.ssh_port)
        if machine in self.machines:
            self.machines.remove(machine)

    def keep(self, machine: Machine) -> str:
        """Leave ``machine`` running; return how to reach and remove it."""
        if machine in self.machines:
            self.machines.remove(machine)
        machine.ssh.close()
        machine.stop_streaming()  # the run ends, the VM goes on: stream its tail now
        self.save_artifact(machine)
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


def open_factory(settings: Settings, base_image: Path, run: RunContext, *,
                 notice: Callable[[str], None] = log.warning, **options: Any) -> VMFactory:
    """The worker's factory, after reaping what dead runs left on its libvirt hosts; a
    remote host gets the base now (once per digest per host). ``options`` are
    :class:`VMFactory`'s."""
    hosts = settings.host_list
    reap(tuple(h.uri for h in hosts), settings.runs_dir, log=notice,
         pools=tuple(h.pool for h in hosts if not h.local))
    factory = VMFactory(settings, base_image, run, notice=notice, **options)
    try:
        factory.prepare_host()
    except BaseException:
        factory.close()
        raise
    return factory

"""One guest: overlay + seed + libvirt domain, its readiness, and the VM API.

``Machine`` knows nothing of pytest. It owns its files (overlay, seed ISO,
console log) under ``vm_dir`` and removes them in ``destroy``.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import BootError, GuestCommandError, HostPortTaken, KVMUnusable, LibvirtError
from .accel import KVM_PROGRESS_SECONDS
from .bootstage import SSH_STAGE
from .disk import create_overlay
from .domain import DomainSpec
from .hostports import HOST_ADDRESS, HostPorts
from .libvirt_conn import error_text, undefine
from .ready import (
    CLOUD_INIT_PROBE,
    ConsoleWatcher,
    Probe,
    cloud_init_state,
    console_tail,
    wait_until_ready,
)
from .ssh import CommandResult, SSHClient

if TYPE_CHECKING:
    from .volumes import VMVolumes

log = logging.getLogger("flightvm")

# libvirt virDomainState values
_STATE_NAMES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
                5: "shut off", 6: "crashed", 7: "suspended by guest power management"}


ReadyCheck = Callable[["Machine"], bool]
#: ``progress(machine, elapsed_seconds, stage, done)`` while a machine boots (see ready.Progress)
BootProgress = Callable[["Machine", float, str, bool], None]

#: A baked login refused this long apart (twice) is a wrong credential, not a slow boot.
LOGIN_REFUSED_SECONDS = 5.0
#: Bound of one ``systemctl is-system-running --wait`` in a readiness probe.
SYSTEMD_WAIT_SECONDS = 30


class Machine:
    """A running (or about to run) guest."""

    def __init__(
        self,
        conn: Any,
        spec: DomainSpec,
        ssh: SSHClient,
        *,
        base: Path,
        vm_dir: Path,
        boot_timeout: float,
        ready_checks: tuple[ReadyCheck, ...] = (),
        console_out: TextIO | None = None,
        progress: BootProgress | None = None,
        volumes: VMVolumes | None = None,
    ) -> None:
        self.conn = conn
        self.progress = progress  # boot stage reports, for a live status line
        # On a remote libvirt host: the VM's pool volumes (overlay, seed, console), made by
        # the factory through the storage API; spec.console_log is then a local mirror.
        self.volumes = volumes
        self.spec = spec
        self.ssh = ssh
        self.base = base
        self.vm_dir = vm_dir
        self.boot_timeout = boot_timeout
        self.ready_checks = ready_checks
        self.console_out = console_out  # where the console streams live, if anywhere
        self.dom: Any = None
        self.boot_seconds: float | None = None
        self.revert_seconds: list[float] = []
        self.pristine_seconds: float | None = None  # making the pristine point (save/snapshot)
        # "booted", or "restored" from a saved booted state (vm/statecache.py); then
        # ready_seconds is request -> ready, and boot_seconds stays None
        self.started = "booted"
        self.ready_seconds: float | None = None
        # boots it took to get this VM ready: 2 when the first one hung (factory._boot_unstuck;
        # then ready_seconds is request -> ready, both boots included)
        self.boot_attempts = 1
        # Restored from another VM's state: after every restore the guest agent installs
        # this public key as the login's only one, and the hostname that VM's cloud-init
        # set (rename_from) becomes this VM's name (vm/resume.py).
        self.authorized_key: str | None = None
        self.phases: dict[str, float] = {}  # seconds of the last restore's steps, for metrics
        # where its pristine point lives (vm/pristine.py): the VM dir, or the state store
        self.pristine: Any = None
        self.rename_from: str | None = None
        self._streamer: threading.Thread | None = None
        self._stop_stream = threading.Event()
        self.failed = False
        # True while KVM is unproven on this host: a stall means "KVM unusable".
        self.kvm_probation = False
        self._started_at = 0.0
        self._host_ports = HostPorts(ssh, spec.name)
        self.host_port_seconds: list[float] = []  # time to (re)open the forwards, each time
        # None until readiness finds out; False on an image without cloud-init (baked login)
        self.has_cloud_init: bool | None = None
        self._denied_at: float | None = None
        self._ssh_answered = False  # a boot stage the console cannot show
        self.artifact: Path | None = None  # --flightvm-artifacts: where its console goes

    # ---------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ssh_port(self) -> int:
        return self.spec.ssh_port

    @property
    def remote(self) -> bool:
        """True when the VM runs on a remote libvirt host (disks are pool volumes there)."""
        return self.volumes is not None

    def _pull_console(self) -> None:
        if self.volumes is not None:
            self.volumes.pull_console(self.spec.console_log)

    @property
    def accel(self) -> str:
        return self.spec.accel

    @property
    def host_address(self) -> str:
        """Where the guest reaches the host ports the suite named (``--flightvm-host-port``,
        marker ``host_ports``): the guest's own loopback, forwarded over SSH to the host's
        127.0.0.1. With ``--flightvm-guest-outbound`` the guest also reaches every host
        loopback port at 10.0.2.2."""
        return HOST_ADDRESS

    @property
    def host_ports(self) -> tuple[int, ...]:
        """The host ports the guest can reach now."""
        return self._host_ports.ports

    def set_host_ports(self, ports: tuple[int, ...] | list[int], *, reopen: bool = False) -> None:
        """Make exactly ``ports`` (host 127.0.0.1 ports) reachable at ``host_address``.

        Cheap when nothing changed; ``reopen=True`` re-establishes the forwards (call it
        after anything that rolls the guest back: a snapshot revert or a restore)."""
        seconds = self._host_ports.open(tuple(ports), reopen=reopen)
        if seconds:
            self.host_port_seconds.append(seconds)

    def reopen_host_ports(self) -> None:
        """Re-establish the current forwards: after a revert, restore or reboot."""
        self.set_host_ports(self._host_ports.ports, reopen=True)

    def close_host_ports(self) -> None:
        """Drop the forwarding connection, e.g. before saving the guest's state. The
        guest's sshd ends that session's listeners once it sees the connection close;
        a listener left in a saved state is ended by the next ``reopen_host_ports``."""
        self._host_ports.close()

    def ssh_command(self) -> str:
        return self.ssh.command()

    def console_log(self) -> str:
        self._pull_console()
        try:
            return self.spec.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 30) -> str:
        self._pull_console()
        return console_tail(self.spec.console_log, lines)

    def __repr__(self) -> str:
        where = f" on {self.volumes.storage.host.label}" if self.volumes is not None else ""
        return f"<Machine {self.name} ssh=127.0.0.1:{self.ssh_port} accel={self.accel}{where}>"

    # --------------------------------------------------------------- lifecycle
    def boot(self) -> float:
        """Create the overlay, define and start the domain, wait for ready."""
        import libvirt

        if self.volumes is None:
            create_overlay(self.base, self.spec.overlay)
        self.spec.console_log.touch(mode=0o600)
        watcher = ConsoleWatcher(self.spec.console_log)
        self._started_at = time.monotonic()
        try:
            self.dom = self.conn.defineXML(self.spec.to_xml())
            self.dom.create()
        except libvirt.libvirtError as exc:
            if self.kvm_probation:
                raise KVMUnusable(f"KVM refused to start a guest: {error_text(exc)}") from None
            if self.remote and "Could not set up host forwarding rule" in error_text(exc):
                raise HostPortTaken(f"port {self.ssh_port} is taken on the libvirt host of "
                                    f"{self.name}") from None
            raise LibvirtError(f"libvirt could not start {self.name}: {error_text(exc)}") from None
        if self.console_out is not None:
            self._start_streaming(self.console_out)
        self.boot_seconds = self.wait_ready(watcher=watcher)
        return self.boot_seconds

    def wait_ready(self, *, timeout: float | None = None,
                   watcher: ConsoleWatcher | None = None) -> float:
        self._ssh_answered = False

        def domain_state() -> str | None:
            self._pull_console()  # a remote console reaches the local mirror before each scan
            return self._domain_problem()

        probe = Probe(domain_state=domain_state, guest_ready=self._guest_ready,
                      stage=lambda: SSH_STAGE if self._ssh_answered else None)
        report = self.progress

        def progress(elapsed: float, stage: str, done: bool) -> None:
            if report is not None:
                report(self, elapsed, stage, done)

        try:
            return wait_until_ready(self.name, self.spec.console_log, probe,
                                    timeout=timeout or self.boot_timeout, watcher=watcher,
                                    progress=progress if report is not None else None)
        except BootError as exc:
            self.failed = True
            if self.kvm_probation and self._kvm_stalled(str(exc)):
                raise KVMUnusable(str(exc), detail=exc.detail) from None
            raise

    def is_running(self) -> bool:
        try:
            return self.dom is not None and bool(self.dom.isActive())
        except Exception:  # noqa: BLE001 - a vanished domain is not running
            return False

    def _kvm_stalled(self, reason: str) -> bool:
        """Under KVM probation: did the guest die or stall rather than fail on its own?"""
        return "domain is" in reason or "vanished" in reason or "no progress" in reason

    def _domain_problem(self) -> str | None:
        import libvirt

        try:
            state, reason = self.dom.state()
        except libvirt.libvirtError as exc:
            return f"domain vanished ({error_text(exc)})"
        if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
            if (self.kvm_probation
                    and time.monotonic() - self._started_at > KVM_PROGRESS_SECONDS
                    and "Linux version" not in self.console_log()):
                return f"KVM guest made no progress in {KVM_PROGRESS_SECONDS:.0f}s"
            return None
        return f"domain is {_STATE_NAMES.get(state, state)} (reason {reason})"

    def _guest_ready(self) -> bool:
        if self.has_cloud_init is False:
            return self._systemd_ready() and all(check(self) for check in self.ready_checks)
        res = self.ssh.run(CLOUD_INIT_PROBE, check=False, timeout=20, connect_timeout=3)
        if res.returncode == 255:  # ssh itself failed: not up yet (or a refused baked login)
            if "Host key verification failed" in res.stderr:
                raise BootError(f"VM {self.name} presented an SSH host key that is not the one "
                                f"pinned in {self.ssh.known_hosts}; the guest did not take the "
                                "seed's host key (is cloud-init's ssh module enabled?)",
                                detail=res.stderr.strip()[-2000:])
            self._check_login_refused(res.stderr)
            return False
        self._denied_at = None
        self._ssh_answered = True
        state, detail = cloud_init_state(res.stdout)
        if state == "absent":  # not started yet, or a custom image: ask cloud-init itself
            state = self._cloud_init_status()
            if state == "absent":  # a baked login on an image without cloud-init
                self.has_cloud_init = False
                self._check_sudo()
                return self._guest_ready()
        self.has_cloud_init = True
        if state == "error":
            log_tail = self.ssh.run("cloud-init status --long; "
                                    "sudo tail -n 20 /var/log/cloud-init-output.log",
                                    check=False, timeout=20).stdout
            raise BootError(f"VM {self.name}: cloud-init reported an error"
                            + (f" ({detail[:200]})" if detail else ""),
                            detail=log_tail)
        if state != "done":
            return False
        return all(check(self) for check in self.ready_checks)

    def _check_login_refused(self, stderr: str) -> None:
        """A baked login that sshd refuses twice, 5 s apart, is a wrong credential: fail now.

        (A user cloud-init creates may be refused until cloud-init has run; so may
        anyone while pam_nologin says the system is booting: both just wait.)"""
        if not self.ssh.login.baked or "Permission denied" not in stderr:
            self._denied_at = None
            return
        if "booting up" in stderr or "not permitted to log in yet" in stderr:
            return
        now = time.monotonic()
        if self._denied_at is None:
            self._denied_at = now
            return
        if now - self._denied_at >= LOGIN_REFUSED_SECONDS:
            how = ("the password in FLIGHTVM_SSH_PASSWORD" if self.ssh.login.password is not None
                   else f"the key {self.ssh.login.key} (--flightvm-ssh-key)")
            raise BootError(f"VM {self.name}: sshd refused the login as {self.ssh.user!r} "
                            f"(Permission denied); check {how} and --flightvm-ssh-user",
                            detail=stderr.strip()[-500:])

    def _check_sudo(self) -> None:
        res = self.ssh.run("sudo -n true", check=False, timeout=20, connect_timeout=3)
        if res.returncode not in (0, 255):
            raise BootError(f"VM {self.name}: user {self.ssh.user!r} cannot run sudo without a "
                            "password; flightvm runs guest setup with sudo -n, so give it "
                            "NOPASSWD in the image's sudoers", detail=res.stderr.strip()[-500:])

    def _systemd_ready(self) -> bool:
        """Without cloud-init: SSH answers and systemd's boot has settled (bounded wait)."""
        res = self.ssh.run(f"timeout {SYSTEMD_WAIT_SECONDS} systemctl is-system-running --wait",
                           check=False, timeout=SYSTEMD_WAIT_SECONDS + 15, connect_timeout=3)
        if res.returncode == 255:
            self._check_login_refused(res.stderr)
            return False
        self._ssh_answered = True
        state = res.stdout.strip().splitlines()[-1:] or [""]
        if state[0] in ("running", "degraded"):
            return True
        if state[0] in ("maintenance", "offline"):
            raise BootError(f"VM {self.name}: systemd is in state {state[0]!r}, it will not "
                            "finish booting", detail=res.stderr.strip()[-500:])
        return False  # initializing, starting, or the bounded wait ran out: ask again

    def _cloud_init_status(self) -> str:
        res = self.ssh.run("cloud-init status", check=False, timeout=20, connect_timeout=3)
        status = res.stdout.strip()
        if res.returncode == 127 or "disabled" in status:
            if self.ssh.login.baked:
                return "absent"
            raise BootError(f"VM {self.name}: cloud-init is "
                            f"{'disabled' if 'disabled' in status else 'not installed'} in the "
                            "guest; flightvm configures guests through it, so use an image "
                            "where it runs, or log in as the image's own user with "
                            "--flightvm-ssh-user")
        if "error" in status:
            return "error"
        return "done" if "done" in status else "running"

    def reboot(self) -> float:
        """Reboot the guest and wait until it is ready again."""
        boot_id = self.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        self.ssh.run("sudo systemctl reboot", check=False, timeout=15)
        self.ssh.close()
        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            time.sleep(2)
            res = self.ssh.run("cat /proc/sys/kernel/random/boot_id", check=False, timeout=10,
                               connect_timeout=3)
            if res.returncode == 0 and res.stdout.strip() != boot_id:
                break
        seconds = self.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        self.reopen_host_ports()  # the old forwarding connection died with the old boot
        return seconds

    def destroy(self, *, remove_files: bool = True) -> None:
        """Stop and undefine the domain, then delete its overlay, seed and console."""
        import libvirt

        self.stop_streaming()
        self._host_ports.close()
        self.ssh.cleanup()
        if self.dom is not None:
            for op in ("destroy", "undefine"):
                try:
                    if op == "destroy" and not self.dom.isActive():
                        continue
                    if op == "undefine":
                        undefine(self.dom)
                    else:
                        self.dom.destroy()
                except libvirt.libvirtError as exc:
                    log.debug("flightvm: %s %s: %s", op, self.name, error_text(exc))
        if remove_files:
            self.delete_files()

    def delete_files(self) -> None:
        """Delete the VM's files: its dir and, on a remote host, its pool volumes (overlay,
        seed and console; the base volume stays)."""
        if self.volumes is not None:
            self.volumes.delete()
        shutil.rmtree(self.vm_dir, ignore_errors=True)

    # ----------------------------------------------------------------- VM API
    def run(self, cmd: str, *, check: bool = True, timeout: float | None = 120,
            input: bytes | str | None = None) -> CommandResult:  # noqa: A002 - subprocess's name
        """Run ``cmd`` in the guest; ``input`` (bytes, or str sent as UTF-8) is its stdin."""
        data = input.encode("utf-8") if isinstance(input, str) else input
        return self.ssh.run(cmd, check=check, timeout=timeout, stdin=data)

    def sudo(self, cmd: str, *, check: bool = True, timeout: float | None = 120) -> CommandResult:
        return self.ssh.run(f"sudo sh -c {shlex.quote(cmd)}", check=check, timeout=timeout)

    def put(self, local: Path | str, remote: str, *, mode: int | None = None) -> None:
        self.ssh.put(Path(local), remote, mode=mode)

    def get(self, remote: str, local: Path | str) -> Path:
        return self.ssh.get(remote, Path(local))

    def wait_for(self, cmd: str, *, timeout: float = 60, interval: float = 1) -> CommandResult:
        """Re-run ``cmd`` until it succeeds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.run(cmd, check=False)
            if res.ok or time.monotonic() > deadline:
                if not res.ok:
                    raise GuestCommandError(cmd, res.returncode, res.stdout, res.stderr)
                return res
            time.sleep(interval)

    # ---------------------------------------------------------- live console
    def stop_streaming(self) -> None:
        """End --flightvm-console's copy of this console, after one last read (its tail)."""
        self._stop_stream.set()
        if self._streamer is not None:
            self._streamer.join(timeout=5)  # it prints the console's tail before files go

    def _start_streaming(self, out: TextIO) -> None:
        self._streamer = threading.Thread(
            target=follow_console, args=(self.spec.console_log, self.name, out, self._stop_stream),
            kwargs={"pull": self._pull_console if self.remote else None},
            name=f"console-{self.name}", daemon=True)
        self._streamer.start()


def follow_console(path: Path, name: str, out: TextIO, stop: threading.Event,
                   interval: float = 0.5, pull: Callable[[], None] | None = None) -> None:
    """Copy the console log at ``path`` to ``out`` as it grows, each line as ``[name] line``,
    until ``stop`` is set; then one last read, so the tail is never lost. ``pull`` first
    brings a remote VM's console into the local mirror at ``path``."""
    pos, carry = 0, b""
    while True:
        stopping = stop.is_set()
        if pull is not None:
            with contextlib.suppress(Exception):  # a host that went away: nothing new to show
                pull()
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except OSError:
            chunk = b""
        pos += len(chunk)
        *whole, carry = (carry + chunk).split(b"\n")  # a line cut by a read waits for its end
        if stopping and carry.strip():
            whole.append(carry)
        # a bare CR (firmware, GRUB) would let the next text overwrite the prefix
        parts = [p for line in whole for p in line.split(b"\r") if p.strip()]
        if parts:
            with contextlib.suppress(OSError, ValueError):  # a closed terminal
                for part in parts:
                    out.write(f"[{name}] {part.decode(errors='replace').rstrip()}\n")
                out.flush()
        if stopping:
            return
        stop.wait(interval)

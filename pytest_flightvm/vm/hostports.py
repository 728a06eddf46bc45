"""Let a closed guest reach the host ports a suite names: reverse SSH forwards.

The guest's user-mode network runs with ``restrict=on`` (see ``domain.netdev_arg``),
so it reaches nothing on the host. For each named port ``P`` we ask the guest's
sshd for a reverse forward ``-R 127.0.0.1:P:127.0.0.1:P`` on an SSH connection
of its own (a second ControlMaster, started with ``-f`` and
``ExitOnForwardFailure=yes``, so it returns only once every forward listens):
the guest connects to its own ``127.0.0.1:P`` (``HOST_ADDRESS``) and reaches
the host's ``127.0.0.1:P``, and no other port. Why this mechanism (measured on
this host, see the README): slirp's ``guestfwd`` with ``cmd:`` crashes QEMU
under libvirt's seccomp sandbox and with ``tcp:`` is a single connection made
at start; a reverse forward works on any image with an sshd, per port by
construction, and needs nothing from the guest but the login we already have.

The forwards live as long as that connection. Reset and restore break it (the
guest's TCP state goes back in time): :meth:`HostPorts.open` with
``reopen=True`` starts it again, and when a restored guest still holds a
listener of a session that no longer exists (the state was saved while
forwards were up) that stale sshd process is ended first.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import HostPortError
from .ssh import CommandResult, SSHClient

#: Where the named host ports are, as the guest sees them (forwards bind the guest's loopback).
HOST_ADDRESS = "127.0.0.1"
#: What ``--flightvm-guest-outbound`` additionally opens: slirp maps it to the host's 127.0.0.1.
SLIRP_HOST_ADDRESS = "10.0.2.2"

_FAILED_RE = re.compile(r"remote port forwarding failed for listen port (\d+)")
_PID_RE = re.compile(r"pid=(\d+)")
HOSTS_TAG = "# flightvm host alias"


def forward_args(ports: Iterable[int]) -> list[str]:
    """``-R`` arguments binding each port on the guest's loopback to the host's."""
    args: list[str] = []
    for port in ports:
        args += ["-R", f"{HOST_ADDRESS}:{port}:127.0.0.1:{port}"]
    return args


class HostPorts:
    """The forwards of one VM, on an SSH connection (ControlMaster) of their own."""

    def __init__(self, ssh: SSHClient, vm_name: str) -> None:
        self.ssh = ssh
        self.vm_name = vm_name
        self.ports: tuple[int, ...] = ()
        self.control = Path(ssh._control_dir) / "fwd"

    def _ctl(self, op: str, timeout: float = 10) -> int:
        try:
            return subprocess.run(
                ["ssh", "-o", f"ControlPath={self.control}", "-O", op,
                 f"{self.ssh.user}@{self.ssh.host}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124

    def alive(self) -> bool:
        """The forwarding connection exists and answers a round trip to the guest."""
        if not self.ports or self._ctl("check") != 0:
            return False
        try:
            proc = subprocess.run(
                ["ssh", "-o", f"ControlPath={self.control}", "-o", "ControlMaster=no",
                 f"{self.ssh.user}@{self.ssh.host}", "--", "true"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def open(self, ports: Iterable[int], *, reopen: bool = False) -> float:
        """Make exactly ``ports`` reachable from the guest; return the seconds it took.

        A no-op when the same ports are already forwarded on a live connection,
        unless ``reopen`` (after a reset or restore, which break the connection).
        """
        import time

        wanted = tuple(dict.fromkeys(int(p) for p in ports))
        start = time.monotonic()
        if not reopen and wanted == self.ports and (not wanted or self.alive()):
            return 0.0
        self.close()
        if not wanted:
            return time.monotonic() - start
        stale_killed: set[int] = set()
        while True:
            failed, message = self._start(wanted)
            if failed is None:
                break
            if failed in stale_killed or not self._end_stale_listener(failed):
                raise HostPortError(f"host port {failed} cannot be forwarded into VM {self.vm_name}: "
                             f"{message}; something in the guest already listens on "
                             f"127.0.0.1:{failed}, so name another port or stop it there")
            stale_killed.add(failed)
        self.ports = wanted
        return time.monotonic() - start

    def _start(self, ports: tuple[int, ...]) -> tuple[int | None, str]:
        """Start the forwarding master. (None, "") on success, else (failed port, message)."""
        fd, errname = tempfile.mkstemp(prefix="fwd-", suffix=".err", dir=self.control.parent)
        self.control.unlink(missing_ok=True)
        try:
            # ssh takes the first value given for an option: ours come before options().
            argv = ["ssh", "-o", "ControlMaster=yes", "-o", f"ControlPath={self.control}",
                    "-o", "ControlPersist=no", "-o", "ExitOnForwardFailure=yes",
                    *self.ssh.options(connect_timeout=10), "-f", "-N", *forward_args(ports),
                    f"{self.ssh.user}@{self.ssh.host}"]
            try:
                # -f: ssh backgrounds itself once every forward listens; its stdout and
                # stderr must not be pipes we wait on (the daemon keeps them open).
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=fd, timeout=60)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = 124
            os.close(fd)
            fd = -1
            text = Path(errname).read_text(errors="replace").strip()
        finally:
            if fd >= 0:
                os.close(fd)
            Path(errname).unlink(missing_ok=True)
        if rc == 0:
            return None, ""
        match = _FAILED_RE.search(text)
        if match:
            return int(match.group(1)), match.group(0)
        last = text.splitlines()[-1] if text else f"ssh exited {rc}"
        raise HostPortError(f"could not open the host-port forwards of VM {self.vm_name}: {last}")

    def _end_stale_listener(self, port: int) -> bool:
        """End an sshd session process of ours that still listens on the guest's port
        (left in a saved or snapshotted guest by a connection that is gone). True if one
        was ended; False when the listener is something else (the guest's own service)."""
        # ss shows the owning process only to root (sshd's session is not dumpable):
        # sudo where the login has it, plain ss otherwise.
        query = f"ss -Htlnp 'sport = :{port}'"
        res = self.ssh.run(f"sudo -n {query} 2>/dev/null || {query}", check=False, timeout=30)
        pids = set(_PID_RE.findall(res.stdout))
        if not pids:
            return False
        ended = False
        for pid in pids:
            comm = self.ssh.run(f"cat /proc/{pid}/comm", check=False, timeout=30).stdout.strip()
            if comm != "sshd":
                return False
            ended |= self.ssh.run(f"sudo -n kill {pid} 2>/dev/null || kill {pid}", check=False,
                                  timeout=30).ok
        if ended:  # wait (briefly) until the port is free again
            self.ssh.run(f"for i in $(seq 50); do ss -Htln 'sport = :{port}' | grep -q . "
                         "|| exit 0; sleep 0.1; done", check=False, timeout=30)
        return ended

    def close(self) -> None:
        """Drop the forwarding connection (the guest's listeners go with its session)."""
        if self.control.exists() and self._ctl("exit") == 0:
            pass
        self.control.unlink(missing_ok=True)
        self.ports = ()


# ------------------------------------------------------------------ host alias
def hosts_line(alias: str, address: str) -> str:
    return f"{address} {alias} {HOSTS_TAG}"


def alias_user_data(alias: str, address: str) -> dict[str, Any]:
    """A cloud-config fragment that adds ``address alias`` to the guest's /etc/hosts.

    ``write_files`` appends the line once per instance (init stage). Our image sets
    ``manage_etc_hosts: true``, which re-renders /etc/hosts from a template later in
    the same stage and on every boot, dropping the line: ``localhost`` mode instead
    only makes sure the guest's own hostname line is there and keeps the rest.
    """
    return {"manage_etc_hosts": "localhost",
            "write_files": [{"path": "/etc/hosts", "append": True,
                             "content": hosts_line(alias, address) + "\n"}]}


def install_host_alias(run: Callable[..., CommandResult], alias: str, address: str) -> None:
    """Add (or replace) the alias line in the guest's /etc/hosts over SSH: for images
    without cloud-init. ``run`` is ``Machine.run``; the login needs sudo."""
    line = hosts_line(alias, address)
    script = (f"sed -i '/{HOSTS_TAG}$/d' /etc/hosts && "
              f"printf '%s\\n' {shlex.quote(line)} >> /etc/hosts")
    run(f"sudo sh -c {shlex.quote(script)}", check=True, timeout=60)

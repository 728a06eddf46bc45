"""A "remote" libvirt host for the tests: this machine, reached over an sshd of our own.

The sshd listens on a free 127.0.0.1 port with a host key, an authorized key for root,
a config, a pid file and a DEBUG1 log (it names each direct-tcpip channel), all in a
mktemp dir; it runs in the foreground as our child and is stopped by its pid. libvirt reaches it as
``qemu+ssh://root@127.0.0.1:PORT/system?keyfile=KEY&no_verify=1&known_hosts=KH&command=WRAP``:
``command`` names a tiny ssh wrapper that keeps host keys in the test's own known_hosts
(libvirt's ssh transport would otherwise add the test's key to root's ~/.ssh/known_hosts).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RemoteHost:
    dir: Path
    port: int
    key: Path
    known_hosts: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def uri(self) -> str:
        return (f"qemu+ssh://root@127.0.0.1:{self.port}/system?keyfile={self.key}"
                f"&no_verify=1&known_hosts={self.known_hosts}&command={self.dir / 'ssh-wrap'}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def available() -> str | None:
    """Why a remote host cannot be started here, or None."""
    if not os.path.exists(SSHD):
        return "openssh-server is not installed (make host installs it)"
    if os.geteuid() != 0:
        return "the loopback sshd logs in as root: run as root"
    return None


def start_remote_host() -> RemoteHost:
    d = Path(tempfile.mkdtemp(prefix="fvm-sshd-"))
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fvm-test",
                        "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nAllowUsers root\n"
        "AllowTcpForwarding yes\nLogLevel DEBUG1\nMaxStartups 100\nMaxSessions 100\n")
    wrap = d / "ssh-wrap"
    wrap.write_text("#!/bin/sh\n"
                    f"exec ssh -o UserKnownHostsFile={d / 'known_hosts'} "
                    "-o GlobalKnownHostsFile=/dev/null -o BatchMode=yes \"$@\"\n")
    wrap.chmod(0o700)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    log = d / "sshd.log"
    proc = subprocess.Popen([SSHD, "-D", "-f", str(d / "sshd_config"), "-E", str(log)],
                            stdin=subprocess.DEVNULL)
    host = RemoteHost(d, port, d / "client_key", d / "known_hosts", log, proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = host.log_text()
            host.stop()
            raise RuntimeError(f"sshd exited: {text[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return host
        except OSError:
            time.sleep(0.2)
    host.stop()
    raise RuntimeError("sshd did not answer within 20 s")

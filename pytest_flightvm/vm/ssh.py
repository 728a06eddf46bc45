"""SSH into a guest through its loopback port forward, reusing one connection.

We drive the system ``ssh`` client with ControlMaster, so every ``run`` after
the first rides the same TCP connection and costs one channel, not one
handshake. Keys are per run, generated with ``ssh-keygen`` and kept 0600.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import FlightVMError, GuestCommandError, ToolMissingError


@dataclass(frozen=True)
class CommandResult:
    cmd: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if not path:
        raise ToolMissingError(f"{name} not found; install it with: apt-get install {package}")
    return path


def generate_keypair(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    """Create (or reuse) an ed25519 key pair in ``directory``; return (private key, public line).

    Safe when several xdist workers of one run ask at once: one generates under a
    lock, into temp names that are renamed into place, the others reuse it.
    """
    from filelock import FileLock

    require_tool("ssh-keygen", "openssh-client")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = directory / name
    pub = directory / (name + ".pub")
    with FileLock(str(directory / f".{name}.lock"), timeout=60):
        if not (key.exists() and pub.exists()):
            tmp = directory / f".{name}.{os.getpid()}"
            for stale in (tmp, directory / (tmp.name + ".pub")):
                stale.unlink(missing_ok=True)
            proc = subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "flightvm", "-f", str(tmp)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise FlightVMError(f"ssh-keygen failed in {directory}: "
                                    f"{(proc.stderr.strip() or 'no output').splitlines()[-1]}")
            tmp.chmod(0o600)
            os.replace(directory / (tmp.name + ".pub"), pub)
            os.replace(tmp, key)
    return key, pub.read_text().strip()


class SSHClient:
    """One guest endpoint: ``user@127.0.0.1:port`` with a private key."""

    def __init__(self, port: int, key: Path, user: str, host: str = "127.0.0.1") -> None:
        require_tool("ssh", "openssh-client")
        self.port = port
        self.key = key
        self.user = user
        self.host = host
        # Unix socket paths are limited to ~100 bytes: keep the control dir short.
        self._control_dir = Path(tempfile.mkdtemp(prefix="fvm-ssh-"))
        self._control_path = self._control_dir / "%C"

    def options(self, *, connect_timeout: int = 5) -> list[str]:
        return [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={self._control_path}",
            "-o", "ControlPersist=120",
            "-i", str(self.key),
            "-p", str(self.port),
        ]

    def command(self) -> str:
        """A shell line a human can paste to reach this guest."""
        return (
            f"ssh -p {self.port} -i {self.key} -o StrictHostKeyChecking=no "
            f"-o UserKnownHostsFile=/dev/null {self.user}@{self.host}"
        )

    def run(
        self,
        cmd: str,
        *,
        check: bool = True,
        timeout: float | None = 120,
        stdin: bytes | None = None,
        connect_timeout: int = 5,
    ) -> CommandResult:
        argv = ["ssh", *self.options(connect_timeout=connect_timeout),
                f"{self.user}@{self.host}", "--", cmd]
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace")
            err = (exc.stderr or b"").decode(errors="replace")
            result = CommandResult(cmd, 124, out, err + f"\nflightvm: timed out after {timeout}s")
        else:
            result = CommandResult(
                cmd, proc.returncode,
                proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"),
            )
        if check and result.returncode != 0:
            raise GuestCommandError(cmd, result.returncode, result.stdout, result.stderr)
        return result

    def put(self, local: Path, remote: str, *, mode: int | None = None) -> None:
        data = Path(local).read_bytes()
        q = shlex.quote(remote)
        chmod = f" && chmod {mode:o} {q}" if mode is not None else ""
        self.run(f"cat > {q}{chmod}", stdin=data)

    def get(self, remote: str, local: Path) -> Path:
        argv = ["ssh", *self.options(), f"{self.user}@{self.host}", "--",
                f"cat {shlex.quote(remote)}"]
        local = Path(local)
        with open(local, "wb") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, timeout=300)
        if proc.returncode != 0:
            local.unlink(missing_ok=True)
            raise GuestCommandError(f"cat {remote}", proc.returncode, "", proc.stderr.decode())
        return local

    def close(self) -> None:
        """Drop the shared connection (e.g. before a reboot or revert)."""
        subprocess.run(
            ["ssh", "-o", f"ControlPath={self._control_path}", "-O", "exit",
             f"{self.user}@{self.host}"],
            capture_output=True, timeout=10,
        )

    def cleanup(self) -> None:
        self.close()
        shutil.rmtree(self._control_dir, ignore_errors=True)

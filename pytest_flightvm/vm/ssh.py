"""SSH into a guest through its loopback port forward, reusing one connection.

We drive the system ``ssh`` client with ControlMaster, so every ``run`` after
the first rides the same TCP connection and costs one channel, not one
handshake. Keys are per run, generated with ``ssh-keygen`` and kept 0600.

A baked login (an image that already has a user) logs in with the user's own
key, or with a password through OpenSSH's own askpass: ``SSH_ASKPASS_REQUIRE=force``
runs a tiny 0700 script from the run dir that prints the password from an
environment variable set only for that ssh child. The password is never on
an argv, in a file, or in any message.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FlightVMError, GuestCommandError, ToolMissingError

if TYPE_CHECKING:
    from ..hosts import Jump


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


#: The variable the askpass script reads; set only in the environment of our ssh children.
ASKPASS_ENV = "FLIGHTVM_ASKPASS_SECRET"
_ASKPASS_SCRIPT = f"""#!/bin/sh
# flightvm askpass: OpenSSH runs this (SSH_ASKPASS_REQUIRE=force) for the login password.
printf '%s\\n' "${ASKPASS_ENV}"
"""


def write_askpass(directory: Path) -> Path:
    """Write the 0700 askpass script into the private ``directory`` (it holds no secret);
    an O_EXCL temp file renamed into place: a planted link is replaced, never followed."""
    from ..statedir import private_dir, replace_file

    path = private_dir(directory) / "askpass"
    replace_file(path, _ASKPASS_SCRIPT.encode(), mode=0o700)
    return path


@dataclass(frozen=True)
class Login:
    """How to log in: the run's key (cloud-init made the user), or a baked login's key or password.

    ``password`` and ``askpass`` go together; ``repr`` never shows the password.
    """

    user: str
    key: Path
    password: str | None = None
    askpass: Path | None = None
    baked: bool = False

    def __repr__(self) -> str:
        how = "password" if self.password is not None else f"key {self.key}"
        return f"Login({self.user}, {how}{', baked' if self.baked else ''})"


def generate_keypair(directory: Path, name: str = "id_ed25519", *,
                     reuse: bool = True) -> tuple[Path, str]:
    """Create (or, with ``reuse``, reuse) an ed25519 key pair; return (private key, public line).

    With ``reuse`` (a run's own ``ssh/`` dir) the directory is made private (0700,
    ours, no planted link) and several xdist workers of one run may ask at once:
    one generates under a lock, the others reuse its pair. Without ``reuse`` (a
    directory the user named) an existing key file is an error, never reused.
    Either way ssh-keygen writes into a fresh private temp dir and the key files
    are created with O_EXCL | O_NOFOLLOW, 0600: nothing is written through a link.
    """
    from filelock import FileLock

    from ..errors import ConfigError
    from ..statedir import create_excl, private_dir, read_file

    require_tool("ssh-keygen", "openssh-client")
    key = directory / name
    pub = directory / (name + ".pub")
    if not reuse:
        for f in (key, pub):
            if os.path.lexists(f):
                raise ConfigError(f"{f} already exists (a key we did not make now is never reused); "
                                  "remove it, or pass --ssh-key with a public key of your own")
        return _new_keypair(key, pub, create_excl, ConfigError)
    private_dir(directory)
    with FileLock(str(directory / f".{name}.lock"), timeout=60):
        try:
            if _ours(key):
                return key, read_file(pub).decode().strip()
        except OSError:
            pass
        for f in (key, pub):  # a half-made pair, or a link where a key goes: start over
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        return _new_keypair(key, pub, create_excl, FlightVMError)


def _ours(key: Path) -> bool:
    st = key.lstat()
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _new_keypair(key: Path, pub: Path, create_excl: Callable[[Path, bytes], None],
                 error: type[FlightVMError]) -> tuple[Path, str]:
    with tempfile.TemporaryDirectory(prefix="fvm-key-") as tmp:  # 0700, a fresh name
        out = Path(tmp) / "k"
        proc = subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "flightvm", "-f", str(out)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise error(f"ssh-keygen failed for {key}: "
                        f"{(proc.stderr.strip() or 'no output').splitlines()[-1]}")
        private, public = out.read_bytes(), out.with_suffix(".pub").read_bytes()
    try:
        create_excl(key, private)
        try:
            create_excl(pub, public)
        except BaseException:
            key.unlink()  # ours, just made: no half pair left behind
            raise
    except FileExistsError:
        raise error(f"{key} appeared while a key was being generated; remove it and "
                    "try again") from None
    except OSError as exc:
        raise error(f"cannot write the key {key} ({exc.strerror})") from None
    return key, public.decode().strip()


class SSHClient:
    """One guest endpoint: ``user@127.0.0.1:port`` with a private key."""

    def __init__(self, port: int, key: Path, user: str, host: str = "127.0.0.1", *,
                 known_hosts: Path | None = None, host_key_check: str = "yes",
                 login: Login | None = None, jump: Jump | None = None) -> None:
        require_tool("ssh", "openssh-client")
        # A VM on a remote libvirt host: its forward binds on that host's loopback, and
        # we reach it through the same SSH host libvirt uses (ProxyCommand ssh -W).
        self.jump = jump
        self.login = login or Login(user, key)
        self.port = port
        self.key = self.login.key
        self.user = self.login.user
        self.host = host
        # The VM's own known_hosts (see vm/hostkey.py): "yes" when it pins the key the
        # seed gave the guest, "accept-new" when the first contact pins the image's key.
        # None keeps the old unchecked behaviour (for callers that have no VM dir).
        self.known_hosts = known_hosts
        self.host_key_check = host_key_check
        # Unix socket paths are limited to ~100 bytes: keep the control dir short.
        self._control_dir = Path(tempfile.mkdtemp(prefix="fvm-ssh-"))
        self._control_path = self._control_dir / "%C"

    def _auth_options(self) -> list[str]:
        """Login options; they come first, and ssh keeps the first value of each option."""
        if self.login.password is not None:
            # askpass needs BatchMode off; one prompt, so a wrong password fails at once
            return ["-o", "BatchMode=no", "-o", "PubkeyAuthentication=no",
                    "-o", "PreferredAuthentications=password,keyboard-interactive",
                    "-o", "NumberOfPasswordPrompts=1"]
        if self.login.baked:
            return ["-o", "IdentitiesOnly=yes"]
        return []

    def _env(self) -> dict[str, str] | None:
        """The ssh child's environment: ours plus, for a password, askpass and the secret."""
        if self.login.password is None or self.login.askpass is None:
            return None
        return {**os.environ, "SSH_ASKPASS": str(self.login.askpass),
                "SSH_ASKPASS_REQUIRE": "force", ASKPASS_ENV: self.login.password}

    def proxy_options(self) -> list[str]:
        """``-o ProxyCommand=ssh ... -W %h:%p JUMP`` for a VM behind a remote libvirt host."""
        if self.jump is None:
            return []
        inner = " ".join(shlex.quote(a) for a in
                         ["ssh", *self.jump.options(), "-W", "%h:%p", self.jump.destination])
        return ["-o", f"ProxyCommand={inner}"]

    def options(self, *, connect_timeout: int = 5) -> list[str]:
        return [*self._auth_options(),
            *self.proxy_options(),
            "-o", "BatchMode=yes",
            *self.host_key_options(),
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

    def host_key_options(self) -> list[str]:
        if self.known_hosts is None:
            return ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        return ["-o", f"StrictHostKeyChecking={self.host_key_check}",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "CheckHostIP=no"]

    def command(self) -> str:
        """A shell line a human can paste to reach this guest (host key checked against
        the VM's own known_hosts; never with a password)."""
        hk = " ".join(shlex.quote(o) for o in [*self.proxy_options(), *self.host_key_options()])
        auth = "" if self.login.password is not None else f" -i {shlex.quote(str(self.key))}"
        return f"ssh -p {self.port}{auth} {hk} {self.user}@{self.host}"

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
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                                  env=self._env())
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
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, timeout=300,
                                  env=self._env())
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

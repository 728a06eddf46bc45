"""Per-VM SSH host keys: generated on the host, handed to the guest, pinned in known_hosts.

Each VM gets its own ed25519 host key, made by ``ssh-keygen`` in a private
scratch dir and then written into the VM dir with ``O_CREAT | O_EXCL |
O_NOFOLLOW`` and mode 0600 (a file planted there beforehand makes us fail, it
is never reused or followed). The seed hands the key to cloud-init
(``ssh_keys``), and the VM's own ``known_hosts`` pins it, so SSH runs with
``StrictHostKeyChecking=yes``. An image without cloud-init keeps the host key it
was built with: its ``known_hosts`` starts empty and the first contact pins it
(``accept-new``). A VM restored from a saved booted state (:mod:`statecache`) presents
the saving VM's key until it reboots: its ``known_hosts`` pins that key (kept with the
state: pinned per state) beside its own.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FlightVMError
from ..statedir import create_excl
from .ssh import require_tool

PRIVATE_NAME = "ssh_host_ed25519_key"
KNOWN_HOSTS_NAME = "known_hosts"


@dataclass(frozen=True)
class HostKey:
    private: Path
    public_line: str  # "ssh-ed25519 AAAA... comment"

    def user_data(self) -> dict[str, Any]:
        """cloud-config that installs this key as the guest's only SSH host key."""
        return {"ssh_keys": {"ed25519_private": self.private.read_text(),
                             "ed25519_public": self.public_line},
                "ssh_deletekeys": True}


def write_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 with ``data``; fail if anything (a file, a symlink) is there."""
    try:
        create_excl(path, data, 0o600)
    except FileExistsError:
        raise FlightVMError(f"{path} already exists; flightvm creates it afresh for each VM, "
                            "remove it") from None


def generate_host_key(vm_dir: Path, comment: str) -> HostKey:
    """A fresh ed25519 host key for one VM, as ``vm_dir/ssh_host_ed25519_key`` (0600)."""
    require_tool("ssh-keygen", "openssh-client")
    scratch = Path(tempfile.mkdtemp(prefix=".hostkey-", dir=vm_dir))
    try:
        tmp = scratch / "key"
        proc = subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(tmp)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise FlightVMError(f"ssh-keygen could not make a host key in {vm_dir}: "
                                f"{(proc.stderr.strip() or 'no output').splitlines()[-1]}")
        private = vm_dir / PRIVATE_NAME
        write_exclusive(private, tmp.read_bytes())
        public = (scratch / "key.pub").read_text().strip()
        write_exclusive(vm_dir / (PRIVATE_NAME + ".pub"), (public + "\n").encode())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return HostKey(private, public)


def known_hosts_entry(host: str, port: int, public_line: str) -> str:
    """One known_hosts line for ``host:port`` (OpenSSH's ``[host]:port`` form)."""
    keytype, blob = public_line.split()[:2]
    pattern = host if port == 22 else f"[{host}]:{port}"
    return f"{pattern} {keytype} {blob}"


def write_known_hosts(vm_dir: Path, host: str, port: int, key: HostKey | None,
                      *, extra: tuple[str, ...] = ()) -> Path:
    """The VM's own known_hosts: pinned to ``key`` and the public keys in ``extra`` (a
    VM restored from a saved state presents the saving VM's key until it reboots), or
    empty (first contact pins)."""
    path = vm_dir / KNOWN_HOSTS_NAME
    publics = ([key.public_line] if key else []) + list(extra)
    text = "".join(known_hosts_entry(host, port, line) + "\n" for line in publics)
    write_exclusive(path, text.encode())
    return path

"""The libvirt hosts a run spreads its VMs over: parsing the host list and giving each worker a host.

``--flightvm-hosts URI[#slots=N][&pool=NAME][&pool_dir=DIR],...`` (ini ``flightvm_hosts``,
env ``FLIGHTVM_HOSTS``). A host without a host part in its URI (``qemu:///system``) is
local: today's path, files in the VM dir. Any other host must be ``qemu+ssh://``: its
disks go through libvirt's storage API (vm/volumes.py) and the guest's SSH jumps
through the same SSH host (:meth:`Host.jump`).

Workers are assigned under a file lock in the run dir, one record shared by all
xdist workers of a run: each new worker takes the host with the most free slots
(ties: the first listed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import ConfigError

#: Our pool names start with this, so a pool we define or use is recognisably ours.
POOL_PREFIX = "flightvm"
DEFAULT_POOL = "flightvm-images"
DEFAULT_POOL_DIR = "/var/lib/flightvm/images"
ASSIGN_FILE = "hosts.json"


@dataclass(frozen=True)
class Jump:
    """How our ssh reaches the libvirt host of a ``qemu+ssh://`` URI (same user, port and key)."""

    user: str | None
    host: str
    port: int | None
    keyfile: str | None
    known_hosts: str | None
    verify: bool

    def options(self) -> list[str]:
        """ssh options for a connection to the jump host itself."""
        opts = ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]
        if self.keyfile:
            opts += ["-o", "IdentitiesOnly=yes", "-i", self.keyfile]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}",
                     "-o", "GlobalKnownHostsFile=/dev/null"]
        if not self.verify:  # no_verify=1, as libvirt's own ssh transport does with it
            opts += ["-o", "StrictHostKeyChecking=no"]
            if not self.known_hosts:
                opts += ["-o", "UserKnownHostsFile=/dev/null"]
        if self.port:
            opts += ["-p", str(self.port)]
        return opts

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


@dataclass(frozen=True)
class Host:
    uri: str
    slots: int = 1
    pool: str = DEFAULT_POOL
    pool_dir: str = DEFAULT_POOL_DIR

    @property
    def local(self) -> bool:
        return not urlsplit(self.uri).hostname

    @property
    def label(self) -> str:
        """The URI without its query (key paths) for messages and metrics."""
        parts = urlsplit(self.uri)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    def jump(self) -> Jump | None:
        """The SSH hop to this host, None for a local one."""
        if self.local:
            return None
        parts = urlsplit(self.uri)
        query = parse_qs(parts.query)

        def one(key: str) -> str | None:
            vals = query.get(key)
            return unquote(vals[-1]) if vals else None

        return Jump(parts.username, parts.hostname or "", parts.port, one("keyfile"),
                    one("known_hosts"), one("no_verify") not in ("1",))


def parse_hosts(raw: Any, where: str) -> tuple[Host, ...]:
    """``URI[#slots=N&pool=NAME&pool_dir=DIR]`` entries, comma- or line-separated."""
    if isinstance(raw, str):
        items = [x for line in raw.splitlines() for x in line.split(",")]
    else:
        items = [str(x) for x in raw]
    hosts: list[Host] = []
    for item in (x.strip() for x in items):
        if not item:
            continue
        uri, _, frag = item.partition("#")
        parts = urlsplit(uri)
        if not parts.scheme.startswith("qemu") or not parts.path.strip("/"):
            raise ConfigError(f"{where}: {item!r} is not a libvirt URI; write e.g. "
                              "qemu:///system or qemu+ssh://root@host/system#slots=4")
        if not parts.hostname and parts.scheme != "qemu":
            raise ConfigError(f"{where}: {item!r}: a {parts.scheme}:// URI needs a host; "
                              "write qemu:///system for this machine")
        if parts.hostname and parts.scheme != "qemu+ssh":
            raise ConfigError(f"{where}: {item!r}: a remote host must be qemu+ssh:// (the "
                              "guest's SSH jumps through the same SSH host)")
        fields: dict[str, str] = {}
        for pair in filter(None, frag.split("&")):
            key, sep, value = pair.partition("=")
            if not sep or key not in ("slots", "pool", "pool_dir") or key in fields:
                raise ConfigError(f"{where}: {item!r}: unknown or repeated '#{pair}'; "
                                  "use #slots=N, &pool=NAME, &pool_dir=/abs/dir")
            fields[key] = value
        try:
            slots = int(fields.get("slots", "1"))
        except ValueError:
            slots = 0
        if not 1 <= slots <= 1024:
            raise ConfigError(f"{where}: {item!r}: slots must be a whole number 1-1024")
        pool = fields.get("pool", DEFAULT_POOL)
        if not pool.startswith(POOL_PREFIX) or not all(c.isalnum() or c in "-_." for c in pool):
            raise ConfigError(f"{where}: {item!r}: pool {pool!r} must start with "
                              f"{POOL_PREFIX!r} and hold only letters, digits, '-', '_', '.'")
        pool_dir = fields.get("pool_dir", DEFAULT_POOL_DIR)
        if not pool_dir.startswith("/") or ".." in pool_dir.split("/"):
            raise ConfigError(f"{where}: {item!r}: pool_dir must be an absolute path without '..'")
        host = Host(uri, slots, pool, pool_dir)
        if any(h.uri == uri for h in hosts):
            raise ConfigError(f"{where}: {uri!r} is listed twice; give it more slots instead")
        hosts.append(host)
    return tuple(hosts)


def pick(hosts: tuple[Host, ...], taken: list[int]) -> int:
    """Index of the host with the most free slots (``taken``: host index per worker so far);
    ties go to the first listed. With every slot taken, the least loaded host by ratio."""
    def score(i: int) -> tuple[int, float, int]:
        used = taken.count(i)
        return (-(hosts[i].slots - used), used / hosts[i].slots, i)

    return min(range(len(hosts)), key=score)


def assign(hosts: tuple[Host, ...], run_dir: Path, worker: str) -> tuple[Host, bool]:
    """The host of ``worker`` in this run, picked once under the run's lock and remembered.

    Returns ``(host, over)``; ``over`` is True when every slot was already taken."""
    from filelock import FileLock

    from .statedir import read_file, replace_file

    if len(hosts) == 1:
        return hosts[0], False
    with FileLock(str(run_dir / ".hosts.lock"), timeout=60):
        try:
            data = json.loads(read_file(run_dir / ASSIGN_FILE))
            record: dict[str, str] = {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            record = {}
        if worker in record:
            for host in hosts:
                if host.uri == record[worker]:
                    return host, False
        uris = [h.uri for h in hosts]
        taken = [uris.index(u) for w, u in record.items() if u in uris and w != worker]
        index = pick(hosts, taken)
        over = hosts[index].slots - taken.count(index) <= 0
        record[worker] = hosts[index].uri
        replace_file(run_dir / ASSIGN_FILE, json.dumps(record).encode())
        return hosts[index], over

"""Booted states in a local store: the state key, publishing a pristine point, finding and evicting one.

A *state* is what a pooled VM's pristine point is made of (:mod:`pristine`): the libvirt
save file (memory and device state; QEMU's TPM emulator state rides in its stream), the
frozen disk overlay (backed by the base blob of the same cache dir) and, under UEFI, the
NVRAM copy. Each is a blob of a :class:`~pytest_flightvm.cache.store.Store` rooted at
``<cache>/states`` (0700: a state holds guest memory), next to a small JSON manifest
blob; the ref ``state/<key>`` names the manifest. Blobs are read-only and installed by
rename after their sha256 was taken, the ref is written last (atomically), and a
publish runs under the key's file lock: a half-published state is never found, and a
key is published once even when several workers saved it.

The **state key** (:func:`state_key`) is a sha256 over everything that shapes the
booted guest; the caller (``VMFactory.state_parts``) gathers them: the base digest, the
seed files rendered with a placeholder identity (instance-id, hostname, MAC, SSH keys
are per VM), memory, vCPUs, firmware, TPM, CPU model, machine type, QEMU and libvirt
versions, accel, the login, and a fingerprint of the hooks that run before the
pristine point.

The registry's side (push a published state, pull one on a miss) is :mod:`stateshare`,
above this module: the pool holds both when ``--flightvm-state-cache registry`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import Timeout

from ..cache.store import Store
from ..errors import CacheError, FlightVMError
from ..statedir import ensure_cache_dir, private_dir
from .pristine import Pristine

STATE_FORMAT = 1
"""Bump when what a state holds, or how it is restored, changes: old states stop matching."""

MAX_AGE = 14 * 86400.0  # `flightvm gc` drops a state neither published nor restored for this long
LOCK_SECONDS = 600.0  # a publish moves files and hashes ~0.5 GiB: seconds, not minutes


def state_key(parts: dict[str, Any]) -> str:
    """Hex sha256 of ``parts`` (canonical JSON) and :data:`STATE_FORMAT`."""
    blob = json.dumps({"format": STATE_FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class SavedState:
    """A state found in the store, its blobs checked."""

    key: str
    manifest: str
    pristine: Pristine  # store paths: save file, frozen overlay, NVRAM (or None)
    mac: str  # the origin VM's MAC: the guest's network config matches it
    host_keys: tuple[str, ...]  # public host keys the guest presents ("ssh-ed25519 AAAA...")
    origin: str  # the origin VM's name (the hostname its cloud-init set)
    has_cloud_init: bool | None
    info: dict[str, Any]


class StateCache:
    """The booted-state store of one cache dir."""

    def __init__(self, root: Path, *, notice: Callable[[str], None]) -> None:
        self.root = root
        self.notice = notice
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        """The store, made on first use: ``root`` private (0700) in a cache dir of ours."""
        if self._store is None:
            ensure_cache_dir(self.root.parent)
            self._store = Store(private_dir(self.root, parents=False))
        return self._store

    def _ref(self, key: str) -> str:
        return f"state/{key}"

    def lookup(self, key: str) -> SavedState | None:
        """The state saved for ``key``, or None. A state whose manifest or blobs fail their
        digest check is evicted, with one notice line."""
        digest = self.store.get_ref(self._ref(key))
        if digest is None:
            return None
        problem = None
        manifest: dict[str, Any] = {}
        if not self.store.has(digest):
            problem = "its manifest is missing or corrupt"
        else:
            try:
                manifest = json.loads(self.store.blob_path(digest).read_bytes())
                if manifest.get("format") != STATE_FORMAT:
                    problem = "it has another format"
            except (OSError, ValueError):
                problem = "its manifest does not parse"
        blobs: dict[str, str] = {}
        if problem is None:
            for what in ("state", "disk", "nvram"):
                d = manifest.get(what)
                if d is None and what == "nvram":
                    continue
                if not isinstance(d, str) or not self._blob_ok(d):
                    problem = f"its {what} file is missing or failed its digest check"
                    break
                blobs[what] = d
        if problem is not None:
            self.evict(key)
            self.notice(f"flightvm: the saved state {key[:12]} is unusable ({problem}); "
                        "evicted it, booting instead")
            return None
        nvram = blobs.get("nvram")
        return SavedState(
            key=key, manifest=digest,
            pristine=Pristine(self.store.blob_path(blobs["state"]),
                              self.store.blob_path(blobs["disk"]),
                              self.store.blob_path(nvram) if nvram else None),
            mac=str(manifest.get("mac", "")),
            host_keys=tuple(str(k) for k in manifest.get("host_keys") or ()),
            origin=str(manifest.get("origin", "")),
            has_cloud_init=manifest.get("has_cloud_init"), info=manifest)

    def _blob_ok(self, digest: str) -> bool:
        try:
            return self.store.has(digest)
        except CacheError:
            return False

    def publish(self, key: str, pristine: Pristine, meta: dict[str, Any]) -> Pristine | None:
        """Move ``pristine``'s files into the store as the state for ``key`` and return
        them at their store paths; None when ``key`` already has a state (the files stay
        where they are). FlightVMError (one line) when it cannot be published."""
        try:
            with self.store.lock(f"state-{key}").acquire(timeout=LOCK_SECONDS):
                if self.lookup(key) is not None:
                    return None
                state = self.store.import_file(pristine.state, move=True)
                disk = self.store.import_file(pristine.disk, move=True)
                nvram = (self.store.import_file(pristine.nvram, move=True)
                         if pristine.nvram is not None else None)
                self.install(key, state=state, disk=disk, nvram=nvram, meta=meta)
        except Timeout:
            raise FlightVMError(f"the state lock for {key[:12]} stayed taken for "
                                f"{LOCK_SECONDS:.0f}s") from None
        except OSError as exc:
            raise FlightVMError(f"cannot store the state ({exc.strerror})") from None
        return Pristine(self.store.blob_path(state), self.store.blob_path(disk),
                        self.store.blob_path(nvram) if nvram else None)

    def install(self, key: str, *, state: str, disk: str, nvram: str | None,
                meta: dict[str, Any]) -> None:
        """Name blobs already in the store as the state for ``key``: its manifest blob,
        then the ref (last, atomically). The caller holds the key's lock."""
        manifest = {**meta, "format": STATE_FORMAT, "key": key, "state": state,
                    "disk": disk, "nvram": nvram, "created": time.time(),
                    "sizes": {"state": self.store.blob_path(state).stat().st_size,
                              "disk": self.store.blob_path(disk).stat().st_size}}
        with self.store.writer() as w:
            w.write(json.dumps(manifest, sort_keys=True).encode())
        assert w.digest is not None
        self.store.set_ref(self._ref(key), w.digest, origin=meta.get("origin"))

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of the state for ``key`` (unchecked; :meth:`lookup` checks)."""
        digest = self.store.get_ref(self._ref(key))
        if digest is None:
            return None
        try:
            data = json.loads(self.store.blob_path(digest).read_bytes())
        except (OSError, ValueError, CacheError):
            return None
        return data if isinstance(data, dict) else None

    def in_use(self) -> set[str]:
        """Every digest a state names (manifests and their blobs)."""
        return self._digests_in_use(exclude="")

    def evict(self, key: str) -> None:
        """Drop the state for ``key``: its ref, then its blobs."""
        digest = self.store.get_ref(self._ref(key))
        self.store.delete_ref(self._ref(key))
        if digest is None:
            return
        with contextlib.suppress(OSError, ValueError, CacheError):
            manifest = json.loads(self.store.blob_path(digest).read_bytes())
            for what in ("state", "disk", "nvram"):
                d = manifest.get(what)
                if isinstance(d, str) and d not in self._digests_in_use(exclude=key):
                    self.store.remove(d)
        with contextlib.suppress(CacheError):
            self.store.remove(digest)

    def _digests_in_use(self, *, exclude: str) -> set[str]:
        used: set[str] = set()
        for name, info in self.store.refs().items():
            if name == self._ref(exclude):
                continue
            used.add(info["digest"])
            with contextlib.suppress(OSError, ValueError, CacheError):
                manifest = json.loads(self.store.blob_path(info["digest"]).read_bytes())
                used.update(v for k, v in manifest.items()
                            if k in ("state", "disk", "nvram") and isinstance(v, str))
        return used

    def verify(self) -> list[tuple[str, bool]]:
        """Re-hash every state's blobs; a state with a bad one is evicted. (key, ok) pairs."""
        out = []
        for entry in self.entries():
            digests = [entry["manifest"]] + [entry[w] for w in ("state", "disk", "nvram")
                                              if isinstance(entry.get(w), str)]
            ok = all(self.store.verify(d, full=True) for d in digests)
            if not ok:
                self.evict(entry["key"])
            out.append((entry["key"], ok))
        return out

    def touch(self, key: str) -> None:
        """Mark the state for ``key`` used now (``gc`` drops states unused for long)."""
        info = self.store.ref_info(self._ref(key))
        if info is not None:
            with contextlib.suppress(OSError, CacheError):
                self.store.set_ref(self._ref(key), info["digest"], origin=info.get("origin"))

    def gc(self, *, dry_run: bool = False, max_age: float = MAX_AGE) -> list[str]:
        """Drop states neither published nor restored for ``max_age`` seconds, then blobs
        no state names (e.g. left by a publish killed before its ref was written) and temp
        files of dead writers. Returns the keys (``state/<key>``) and digests removed."""
        removed: list[str] = []
        for name, info in self.store.refs().items():
            if name.startswith("state/") and time.time() - float(info.get("updated", 0)) > max_age:
                removed.append(name)
                if not dry_run:
                    with self.store.lock(f"state-{name.removeprefix('state/')}"):
                        self.evict(name.removeprefix("state/"))
        used = self._digests_in_use(exclude="")
        gone = [e.digest for e in self.store.ls() if e.digest not in used]
        if not dry_run:
            with self.store.lock("states-gc"):
                used = self._digests_in_use(exclude="")
                gone = [d for d in gone if d not in used]
                for digest in gone:
                    self.store.remove(digest)
                self.store.sweep_tmp()
        return removed + gone

    def entries(self) -> list[dict[str, Any]]:
        """Every state's key, origin, sizes and age, for ``flightvm cache ls``."""
        out = []
        for name, info in sorted(self.store.refs().items()):
            if not name.startswith("state/"):
                continue
            try:
                manifest = json.loads(self.store.blob_path(info["digest"]).read_bytes())
            except (OSError, ValueError, CacheError):
                manifest = {}
            out.append({"key": name.removeprefix("state/"), "manifest": info["digest"],
                        **{k: manifest.get(k) for k in ("origin", "sizes", "created", "state",
                                                        "disk", "nvram")}})
        return out

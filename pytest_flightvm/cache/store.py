"""Content-addressed local store.

Layout under ``settings.store_dir``::

    blobs/sha256/<hex>       the content, mode 0444, only ever created by os.replace
    meta/sha256/<hex>.json   stat fingerprint recorded when the blob was last verified
    refs/<name>              JSON {"digest": "sha256:...", ...}: key/<hex>, tag/<tag>, ...
    locks/<name>.lock        one filelock per key (released by the kernel on kill -9)
    tmp/<pid>-<start>-<pidns>-<rand>.part
                             in-flight writes; swept once the process that wrote
                             them (pid, its start time, in our pid namespace) is gone

A blob only appears under its final name after its sha256 was checked, so a
half-written or unverified file is never mistaken for a hit. A hit is cheap:
``stat`` plus the recorded fingerprint (size, mtime_ns, ctime_ns, inode, dev).
When the fingerprint changed (the file was written to, truncated, touched or
replaced), the blob is rehashed; if it no longer matches its digest it is
removed and the caller fetches it again.

Blobs are not fsynced (that was ~0.2 s of a 0.7 s pull of 480 MiB). Instead the
fingerprint also records the boot it was taken in (the kernel's boot_id), and a
hit from a later boot rehashes the blob once: what a crash or power loss kept
from being written back is found and fetched again, never served. Where the
kernel gives no boot id, blobs are fsynced as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock

from ..errors import CacheError, IntegrityError, StoreUnusable
from ..procs import pid_namespace, process_start, same_process
from ..statedir import check_owned_dir

log = logging.getLogger("flightvm.cache.store")

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_REF_RE = re.compile(r"^[A-Za-z0-9_.:@+-]+(/[A-Za-z0-9_.:@+-]+)*$")
_CHUNK = 1 << 20
READ_ONLY = 0o444


def check_digest(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise CacheError(f"not a sha256 digest: {digest!r} (expected sha256:<64 hex>)")
    return digest


def _fingerprint(st: os.stat_result) -> dict[str, int]:
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "dev": st.st_dev,
    }


@functools.lru_cache(maxsize=1)
def boot_id() -> str | None:
    """This boot's id (it changes on every reboot), or None where the kernel has none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LEGACY_TMP_AGE = 3600.0


def _writer_gone(path: Path) -> bool:
    """Is the process that named temp file ``path`` provably gone (see ``sweep_tmp``)?"""
    parts = path.name.split("-", 3)
    if not parts[0].isdigit():
        return False
    pid = int(parts[0])
    if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
        return same_process(pid, parts[1], parts[2]) is False
    if pid == os.getpid() or _pid_alive(pid):
        return False
    try:
        return time.time() - path.lstat().st_mtime > LEGACY_TMP_AGE
    except OSError:
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class StoreEntry:
    digest: str
    path: Path
    size: int
    refs: tuple[str, ...]


_RING = 6
"""Chunk buffers a writer lends (see :meth:`BlobWriter.fill`): one being read into,
the rest queued for or in the hasher."""


def free_bytes(path: Path) -> int | None:
    """Bytes this process may still write on the filesystem holding ``path`` (None
    when the filesystem does not say: no statvfs, or no blocks at all, as some FUSE and
    network filesystems report)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_blocks == 0:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


_ROOM_FIX = "free space there or set --flightvm-cache-dir"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class BlobWriter:
    """Streams bytes into a temp file in the store while hashing them.

    On a clean ``with`` exit the digest (and size, when given) is checked
    against ``expected``, then ``check`` (when given) runs on the complete temp
    file, and only then is the blob installed read-only under its digest; on
    an exception, a mismatch or a failed check the temp file is removed. ``digest`` holds
    the result after commit.

    The caller's thread puts each chunk in the file and one hashing thread hashes it
    (hashlib releases the GIL), so a pull costs about its slower half. Three ways in:

    - :meth:`splice`: the kernel moves the chunk from a socket into the file, and the
      hasher reads it back from the page cache. The receiving side never waits for
      the hasher (the chunk waits in the page cache), and no byte passes through
      Python on its way in: the fastest way on a 2-CPU host (docs/BENCHMARKS.md, P2);
    - :meth:`fill`: the caller reads into one of a few buffers the writer lends, so
      a chunk is copied once between the socket and the file, as curl does;
    - :meth:`write`: anything else; copied first unless it is ``bytes``, since the
      caller may reuse it.

    The file holds the chunks in the order they came, whichever way; the digest is
    of the file's bytes.
    """

    def __init__(self, store: Store, expected: str | None = None, size: int | None = None,
                 check: Callable[[Path], None] | None = None):
        self.store = store
        self.expected = check_digest(expected) if expected else None
        self.expected_size = size
        self.check = check
        if size and (free := free_bytes(store.root)) is not None and size > free:
            raise StoreUnusable(  # before a byte moves, not after most of them
                f"the image store at {store.root} has no room for a blob of {_mib(size)} "
                f"({_mib(free)} free); {_ROOM_FIX}")
        self.tmp = store.tmp_path(".part")
        self._fd: int | None = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL
                                       | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._pipe: tuple[int, int] | None = None
        self._into_file = True  # does the file take a splice from the pipe?
        self._readback: memoryview | None = None
        self._failed: OSError | None = None
        self._hash = hashlib.sha256()
        self.bytes = 0
        self.digest: str | None = None
        self._ring: list[memoryview] = []
        self._slots: dict[int, int] = {}  # id(buffer) -> its index in _ring
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        # (chunk, its lent buffer's index or -1), or (None, file offset hashed up to)
        self._todo: queue.SimpleQueue[tuple[bytes | memoryview | None, int] | None] = (
            queue.SimpleQueue())
        self._credit = threading.Semaphore(_RING)  # bounds chunks queued for the hasher
        self._cancelled = False
        self._hasher = threading.Thread(target=self._hash_loop, daemon=True)
        self._hasher.start()

    def _hash_loop(self) -> None:
        hashed = 0
        while (item := self._todo.get()) is not None:
            data, mark = item
            if data is not None:  # written: hash it, then hand its buffer and credit back
                if not self._cancelled:
                    self._hash.update(data)
                    hashed += len(data)
                if mark >= 0:
                    self._free.put(mark)
                self._credit.release()
            elif not self._cancelled:  # spliced: read back what the file holds up to mark
                try:
                    hashed = self._hash_file(hashed, mark)
                except OSError as exc:
                    self._cancelled, self._failed = True, exc

    def _hash_file(self, start: int, end: int) -> int:
        assert self._fd is not None  # closed only once this thread is done
        if self._readback is None:
            self._readback = memoryview(bytearray(_CHUNK))
        while start < end:
            n = os.preadv(self._fd, [self._readback[:min(end - start, _CHUNK)]], start)
            if not n:
                raise OSError(errno.EIO, "the temp file is shorter than what was written")
            self._hash.update(self._readback[:n])
            start += n
        return start

    def _lend(self) -> int:
        with contextlib.suppress(queue.Empty):
            return self._free.get_nowait()
        if len(self._ring) < _RING:
            buf = bytearray(_CHUNK)
            self._slots[id(buf)] = len(self._ring)
            self._ring.append(memoryview(buf))
            return len(self._ring) - 1
        return self._free.get()

    def fill(self, readinto: Callable[[memoryview], int]) -> int:
        """Read one chunk with ``readinto`` into a buffer of this writer's and write it.
        Returns its size; 0 when ``readinto`` read nothing (the source is done)."""
        slot = self._lend()
        try:
            n = readinto(self._ring[slot])
        except BaseException:
            self._free.put(slot)
            raise
        if not n:
            self._free.put(slot)
            return 0
        return self.write(self._ring[slot][:n])

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._fd is None:
            raise CacheError("write to a closed blob writer")
        chunk: bytes | memoryview
        slot = self._slots.get(id(data.obj), -1) if isinstance(data, memoryview) else -1
        if isinstance(data, memoryview) and slot >= 0:
            chunk = data  # a view of a buffer this writer lent: the caller hands it back
        elif isinstance(data, bytes):
            chunk = data
        else:
            chunk = bytes(data)
        try:
            _write_all(self._fd, chunk)
        except OSError as exc:
            if slot >= 0:
                self._free.put(slot)
            raise self._io_error(exc) from None
        self._credit.acquire()
        self._todo.put((chunk, slot))
        self.bytes += len(chunk)
        return len(chunk)

    def splice(self, source: Callable[[int, int], int]) -> int:
        """Move one chunk into the file without copying it through Python:
        ``source(pipe, n)`` puts up to ``n`` bytes into the write end of a pipe of this
        writer's (see ``Body.splice``), and the kernel moves them on into the file; the
        hasher reads them back from the page cache. Returns the chunk's size; 0 when
        ``source`` put nothing (the source is done). Where the store's filesystem takes
        no splice, the chunk is read out of the pipe and written instead."""
        if self._fd is None:
            raise CacheError("write to a closed blob writer")
        if self._pipe is None:
            self._pipe = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # a smaller pipe only means more calls
                fcntl.fcntl(self._pipe[1], fcntl.F_SETPIPE_SZ, _CHUNK)
        n = source(self._pipe[1], _CHUNK)
        if self._into_file and self._splice_in(n):
            self.bytes += n  # no credit taken: the chunk waits in the page cache
            self._todo.put((None, self.bytes))
            return n
        moved = 0
        while moved < n:  # out of the pipe through Python, then written as any chunk
            try:
                chunk = os.read(self._pipe[0], n - moved)
            except OSError as exc:
                raise self._io_error(exc) from None
            moved += self.write(chunk)
        return n

    def _splice_in(self, n: int) -> bool:
        """Splice the ``n`` bytes in the pipe into the file. False when the filesystem
        takes no splice (EINVAL before a byte moved, e.g. ecryptfs): the bytes stay in
        the pipe, and this writer copies from then on."""
        assert self._fd is not None and self._pipe is not None
        moved = 0
        try:
            while moved < n:
                moved += os.splice(self._pipe[0], self._fd, n - moved)
        except OSError as exc:
            if exc.errno != errno.EINVAL or moved:
                raise self._io_error(exc) from None
            self._into_file = False
            return False
        return True

    def _io_error(self, exc: OSError) -> CacheError:
        return StoreUnusable(
            f"cannot write to the image store at {self.store.root} ({exc.strerror}); "
            f"{_ROOM_FIX}"
        )

    def _close(self, cancel: bool) -> None:
        """Wait for the hasher (it skips what is left on ``cancel``), then close the file."""
        self._cancelled = self._cancelled or cancel
        if self._hasher.is_alive():
            self._todo.put(None)
            self._hasher.join()
        fds = [self._fd, *(self._pipe or ())]
        self._fd, self._pipe = None, None
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def commit(self) -> str:
        if self._fd is None:
            raise CacheError("blob writer already closed")
        try:
            if boot_id() is None:  # no way to tell a later boot: make it durable now
                os.fsync(self._fd)
        except OSError as exc:
            self._close(cancel=True)
            self._discard()
            raise self._io_error(exc) from None
        # The file is complete: vet it while the hasher may still be reading it back,
        # but report a digest or size mismatch first, as the likelier cause.
        vetted: BaseException | None = None
        if self.check is not None and self.expected_size in (None, self.bytes):
            try:
                self.check(self.tmp)
            except BaseException as exc:
                vetted = exc
        self._close(cancel=False)
        if self._failed is not None:
            self._discard()
            raise self._io_error(self._failed)
        digest = "sha256:" + self._hash.hexdigest()
        if self.expected and digest != self.expected:
            self._discard()
            raise IntegrityError(
                f"content does not match its digest: expected {self.expected}, got {digest} "
                f"({self.bytes} bytes); the source is corrupt or was cut short"
            )
        if self.expected_size is not None and self.bytes != self.expected_size:
            self._discard()
            raise IntegrityError(
                f"size mismatch for {digest}: expected {self.expected_size} bytes, "
                f"got {self.bytes}"
            )
        if vetted is not None:
            self._discard()
            raise vetted
        self.digest = self.store._install(self.tmp, digest)
        return self.digest

    def abort(self) -> None:
        self._close(cancel=True)
        self._discard()

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Store:
    """The local content-addressed store rooted at ``root`` (``settings.store_dir``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            for sub in ("blobs/sha256", "meta/sha256", "refs", "locks", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnusable(
                f"cannot create the image store at {self.root} ({exc.strerror}); "
                "set --flightvm-cache-dir to a writable directory"
            ) from None
        # Another user's store (or a link planted inside ours) is refused in one line:
        # we would otherwise sweep, lock and write through whatever it points at.
        check_owned_dir(self.root, "image store")
        for sub in ("blobs", "blobs/sha256", "meta", "meta/sha256", "refs", "locks", "tmp"):
            if (self.root / sub).is_symlink():
                raise StoreUnusable(f"refusing the image store at {self.root}: {sub} is a "
                                    "symbolic link; remove it or set --flightvm-cache-dir")

    # -- paths -------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / check_digest(digest).split(":", 1)[1]

    def _meta_path(self, digest: str) -> Path:
        return self.root / "meta" / "sha256" / (digest.split(":", 1)[1] + ".json")

    def _ref_path(self, name: str) -> Path:
        if not _REF_RE.match(name) or any(p in (".", "..") for p in name.split("/")):
            raise CacheError(f"invalid store ref name {name!r}")
        return self.root / "refs" / name

    def tmp_path(self, suffix: str = "") -> Path:
        """A fresh temp path inside the store (same filesystem as the blobs)."""
        self.sweep_tmp()
        pid = os.getpid()
        return self.root / "tmp" / (f"{pid}-{process_start(pid) or 0}-{pid_namespace() or 0}-"
                                    f"{secrets.token_hex(6)}{suffix}")

    # -- blobs -------------------------------------------------------------

    def writer(self, expected: str | None = None, size: int | None = None,
               check: Callable[[Path], None] | None = None) -> BlobWriter:
        """A :class:`BlobWriter`; ``check(tmp)`` vets the content before it is installed."""
        return BlobWriter(self, expected, size, check)

    def import_file(self, path: Path, *, move: bool = False, expected: str | None = None) -> str:
        """Add a file to the store and return its digest.

        ``move=True`` renames the file into the store (it must not be used
        afterwards); otherwise it is copied, hashed in the same pass. Either
        way the blob ends up read-only under its verified digest.
        """
        path = Path(path)
        if not path.is_file():
            raise CacheError(f"cannot import {path}: not a file")
        if move:
            try:
                digest = "sha256:" + _hash_file(path)
                if expected and digest != expected:
                    raise IntegrityError(f"{path} has digest {digest}, expected {expected}")
                return self._install(path, digest)
            except OSError as exc:
                if exc.errno != 18:  # EXDEV: different filesystem; fall back to a copy
                    raise CacheError(f"cannot import {path}: {exc.strerror}") from None
        try:
            with open(path, "rb", buffering=0) as src, self.writer(expected) as w:
                while w.fill(src.readinto):
                    pass
        except OSError as exc:
            raise CacheError(f"cannot import {path}: {exc.strerror}") from None
        assert w.digest is not None
        return w.digest

    def _install(self, tmp: Path, digest: str) -> str:
        """Install a file whose content was just hashed as ``digest``."""
        final = self.blob_path(digest)
        if self.verify(digest, full=False):
            with contextlib.suppress(OSError):
                tmp.unlink()
            return digest
        os.chmod(tmp, READ_ONLY)
        os.replace(tmp, final)
        if boot_id() is None:
            _fsync_dir(final.parent)
        self._record(digest, os.stat(final))
        return digest

    def _record(self, digest: str, st: os.stat_result) -> None:
        data = {**_fingerprint(st), "verified_at": time.time(), "boot_id": boot_id()}
        _write_atomic(self._meta_path(digest), json.dumps(data).encode())

    def _read_meta(self, digest: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self._meta_path(digest).read_bytes()))
        except (OSError, ValueError):
            return None

    def verify(self, digest: str, full: bool = True) -> bool:
        """Is the blob present and intact?

        ``full=False`` trusts the fingerprint recorded at the last verification
        and only rehashes when the file's stat changed or the machine rebooted
        since (unsynced data may not have survived). A blob that fails is
        removed (so the caller fetches it again) and False is returned.
        """
        path = self.blob_path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                self._meta_path(digest).unlink()
            return False
        if not full:
            meta = self._read_meta(digest)
            if (meta is not None
                    and all(meta.get(k) == v for k, v in _fingerprint(st).items())
                    and meta.get("boot_id") in (None, boot_id())):  # None: fsynced (older meta)
                return True
        try:
            actual = "sha256:" + _hash_file(path)
        except OSError as exc:
            log.warning("cannot read %s (%s); dropping it", path, exc.strerror)
            actual = ""
        if actual != digest:
            log.warning("store blob %s is corrupt (now %s); removing it", digest, actual or "?")
            self.remove(digest)
            return False
        if st.st_mode & 0o777 != READ_ONLY:
            os.chmod(path, READ_ONLY)
            st = os.stat(path)
        self._record(digest, st)
        return True

    def has(self, digest: str) -> bool:
        """Cheap presence check (fingerprint; rehash only when the stat changed)."""
        return self.verify(digest, full=False)

    def remove(self, digest: str) -> None:
        for p in (self.blob_path(digest), self._meta_path(digest)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def ls(self) -> list[StoreEntry]:
        by_digest: dict[str, list[str]] = {}
        for name, info in self.refs().items():
            by_digest.setdefault(info["digest"], []).append(name)
        entries = []
        for path in sorted((self.root / "blobs" / "sha256").iterdir()):
            if not re.fullmatch(r"[0-9a-f]{64}", path.name):
                continue
            digest = "sha256:" + path.name
            with contextlib.suppress(FileNotFoundError):
                entries.append(StoreEntry(
                    digest, path, path.stat().st_size, tuple(sorted(by_digest.get(digest, [])))
                ))
        return entries

    # -- refs --------------------------------------------------------------

    def set_ref(self, name: str, digest: str, **info: Any) -> None:
        """Point ``name`` (``key/<hex>``, ``tag/<tag>``, ...) at a blob, with extra info."""
        path = self._ref_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**info, "digest": check_digest(digest), "updated": time.time()}
        _write_atomic(path, json.dumps(data, sort_keys=True).encode())

    def ref_info(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._ref_path(name).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not DIGEST_RE.match(str(data.get("digest", ""))):
            return None
        return data

    def get_ref(self, name: str) -> str | None:
        info = self.ref_info(name)
        return str(info["digest"]) if info else None

    def delete_ref(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._ref_path(name).unlink()

    def refs(self) -> dict[str, dict[str, Any]]:
        base = self.root / "refs"
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                name = path.relative_to(base).as_posix()
                info = self.ref_info(name) if _REF_RE.match(name) else None
                if info:
                    out[name] = info
        return out

    # -- locks and housekeeping ----------------------------------------------

    def lock(self, name: str) -> FileLock:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        return FileLock(str(self.root / "locks" / f"{safe}.lock"))

    def sweep_tmp(self) -> int:
        """Remove temp files left by processes that no longer exist.

        A temp name carries its writer's pid, start time and pid namespace. It is
        swept only when that namespace is ours and no process with that pid and
        start time runs: a file of a live process in another namespace stays.
        Names from before the start time was recorded (``<pid>-<rand>``) go once
        their pid is gone *and* they were left alone for an hour.
        """
        removed = 0
        with contextlib.suppress(OSError):
            for path in (self.root / "tmp").iterdir():
                if not _writer_gone(path):
                    continue
                if path.name.endswith(".pgid"):
                    from ..buildgroup import stop_orphaned_group

                    stop_orphaned_group(path)  # a builder that outlived its killed owner
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed += 1
        return removed

    def open_blob(self, digest: str) -> Iterator[bytes]:
        """Iterate over a blob's bytes (for pushing)."""
        with open(self.blob_path(digest), "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * _CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()

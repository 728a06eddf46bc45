"""A VM's disks on a remote libvirt host, through libvirt's storage API only (no scp).

On each remote host we use a dir pool whose name starts with ``flightvm`` (defined,
built and started when absent). In it:

- the base, one volume per digest (``sha256-<hex>.qcow2``), streamed with
  ``virStorageVolUpload`` once per digest per host and kept for later runs;
- its completion mark ``sha256-<hex>.ok`` (a few bytes: size and digest), created only
  after the upload finished and the volume's physical size was checked. libvirt's
  storage API has no rename, and cloning a qcow2 volume re-encodes it (qemu-img
  convert: another digest), so "uploaded under a temp name, then the final name" is
  this: the base counts as present only when its mark exists and its size matches.
  A kill -9 mid-upload leaves a base volume without a mark: the next run deletes it
  and uploads again;
- per VM: ``<vm>-overlay.qcow2`` (a volume with the base as its backing store),
  ``<vm>-seed.iso`` (uploaded) and ``<vm>-console.log`` (an empty raw volume the
  domain's serial console appends to, read back with ``virStorageVolDownload``),
  all deleted with the VM.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from ..errors import HostStorageError
from ..hosts import Host
from .libvirt_conn import error_text

log = logging.getLogger("flightvm")

CHUNK = 256 * 1024
VOL_SUFFIXES = ("-overlay.qcow2", "-seed.iso", "-console.log")


def base_volume_name(digest: str) -> str:
    return digest.replace(":", "-") + ".qcow2"


def mark_volume_name(digest: str) -> str:
    return digest.replace(":", "-") + ".ok"


def vm_volume_names(vm_name: str) -> tuple[str, ...]:
    return tuple(vm_name + s for s in VOL_SUFFIXES)


def qcow2_virtual_size(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(32)
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        raise HostStorageError(f"{path} is not a qcow2 image; cannot use it as a remote base")
    return int(struct.unpack(">Q", head[24:32])[0])


def _send_all(stream: Any, data: bytes) -> None:
    """Send all of ``data`` on a blocking libvirt stream (a send may take only part)."""
    view = memoryview(data)
    while view:
        n = stream.send(view.tobytes())
        if n < 0:
            raise HostStorageError("libvirt stream refused data")
        view = view[n:]


@dataclass(frozen=True)
class BaseVolume:
    path: str  # on the host
    digest: str
    size: int
    virtual_size: int
    uploaded_bytes: int  # 0 when the host already had it
    seconds: float


def _raw_volume_xml(name: str, capacity: int, mode: str = "0600") -> str:
    return (f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{capacity}</capacity>"
            f"<allocation unit='bytes'>0</allocation><target><format type='raw'/>"
            f"<permissions><mode>{mode}</mode></permissions></target></volume>")


def _overlay_xml(name: str, virtual_size: int, base_path: str) -> str:
    return (f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{virtual_size}</capacity>"
            "<target><format type='qcow2'/><permissions><mode>0600</mode></permissions></target>"
            f"<backingStore><path>{escape(base_path)}</path><format type='qcow2'/></backingStore>"
            "</volume>")


class HostStorage:
    """Our pool on one libvirt host, and the volumes in it."""

    def __init__(self, conn: Any, host: Host, *, lock_dir: Path | None = None) -> None:
        self.conn = conn
        self.host = host
        self.lock_dir = lock_dir
        self._pool: Any = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- pool
    def pool(self) -> Any:
        """Our dir pool, defined, built and started if absent; refreshed."""
        import libvirt

        if self._pool is not None:
            return self._pool
        name = self.host.pool
        try:
            try:
                pool = self.conn.storagePoolLookupByName(name)
            except libvirt.libvirtError:
                # no <permissions>: with them, building the pool chmods a directory that
                # already exists (measured on libvirt 9.0); without, an existing one is untouched
                xml = (f"<pool type='dir'><name>{escape(name)}</name><target>"
                       f"<path>{escape(self.host.pool_dir)}</path></target></pool>")
                pool = self.conn.storagePoolDefineXML(xml, 0)
                pool.build(0)
                pool.setAutostart(1)
            if not pool.isActive():
                pool.create(0)
            pool.refresh(0)
        except libvirt.libvirtError as exc:
            raise HostStorageError(
                f"{self.host.label}: cannot use storage pool {name!r} at {self.host.pool_dir} "
                f"({error_text(exc)}); fix the pool or pass #pool=/&pool_dir= in "
                "--flightvm-hosts") from None
        self._pool = pool
        return pool

    def lookup(self, name: str) -> Any | None:
        import libvirt

        try:
            return self.pool().storageVolLookupByName(name)
        except libvirt.libvirtError:
            return None

    def physical_size(self, vol: Any) -> int:
        import libvirt

        return int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])

    def delete(self, name: str) -> bool:
        import libvirt

        vol = self.lookup(name)
        if vol is None:
            return False
        try:
            vol.delete(0)
        except libvirt.libvirtError as exc:
            log.debug("flightvm: delete volume %s: %s", name, error_text(exc))
            return False
        return True

    # ---------------------------------------------------------------- base
    def base_present(self, digest: str, size: int) -> Any | None:
        """The base volume when it is complete (mark present, physical size right), else None."""
        vol, mark = self.lookup(base_volume_name(digest)), self.lookup(mark_volume_name(digest))
        if vol is None or mark is None:
            return None
        try:
            text = self.download(mark, 0).decode(errors="replace").split()
        except HostStorageError:
            return None
        if text != [str(size), digest] or self.physical_size(vol) != size:
            return None
        return vol

    def ensure_base(self, local: Path, digest: str, *,
                    progress: Callable[[int], None] | None = None) -> BaseVolume:
        """The base on this host: found by digest (0 bytes moved) or uploaded once."""
        size = local.stat().st_size
        virtual = qcow2_virtual_size(local)
        start = time.monotonic()
        with self._host_lock(digest):
            self.pool().refresh(0)
            vol = self.base_present(digest, size)
            moved = 0
            if vol is None:
                vol = self._upload_base(local, digest, size, progress)
                moved = size
        return BaseVolume(vol.path(), digest, size, virtual, moved, time.monotonic() - start)

    def _host_lock(self, digest: str) -> Any:
        """Workers of this machine upload one digest to one host one at a time."""
        from filelock import FileLock

        if self.lock_dir is None:
            return contextlib.nullcontext()
        from ..statedir import private_dir

        tag = hashlib.sha256(f"{self.host.uri}|{self.host.pool}".encode()).hexdigest()[:16]
        d = private_dir(self.lock_dir)
        return FileLock(str(d / f"upload-{tag}-{digest.replace(':', '-')}.lock"), timeout=3600)

    def _upload_base(self, local: Path, digest: str, size: int,
                     progress: Callable[[int], None] | None) -> Any:
        import libvirt

        name, mark = base_volume_name(digest), mark_volume_name(digest)
        for stale in (mark, name):  # an interrupted upload (no mark), or a wrong size
            self.delete(stale)
        pool = self.pool()
        try:
            vol = pool.createXML(_raw_volume_xml(name, size, "0644"), 0)
        except libvirt.libvirtError as exc:
            raise HostStorageError(f"{self.host.label}: cannot create volume {name} "
                                   f"({error_text(exc)})") from None
        try:
            self.upload(vol, local, progress=progress)
            got = self.physical_size(vol)
            if got != size:
                raise HostStorageError(f"{self.host.label}: base volume {name} holds {got} bytes "
                                       f"after upload, expected {size}")
            mark_data = f"{size} {digest}\n".encode()
            mvol = pool.createXML(_raw_volume_xml(mark, len(mark_data), "0644"), 0)
            self.upload_bytes(mvol, mark_data)
        except BaseException:
            self.delete(mark)
            self.delete(name)
            raise
        return vol

    # ------------------------------------------------------------- streams
    @contextlib.contextmanager
    def _stream(self, what: str) -> Iterator[Any]:
        """A libvirt stream for one transfer: finished when the body returns, aborted when
        anything escapes it (a libvirt error, our own refusal, an interrupt or a kill
        signal's exception mid-transfer), so no stream is left open on the host. A libvirt
        error is one HostStorageError: ``<host>: <what> failed (<libvirt's reason>)``."""
        import libvirt

        stream = self.conn.newStream(0)
        try:
            yield stream
            stream.finish()
        except libvirt.libvirtError as exc:
            with contextlib.suppress(Exception):
                stream.abort()
            raise HostStorageError(f"{self.host.label}: {what} failed ({error_text(exc)})") from None
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            raise

    def upload(self, vol: Any, local: Path, *, progress: Callable[[int], None] | None = None) -> None:
        size = local.stat().st_size
        sent = 0
        with self._stream(f"upload of {local.name} to {vol.name()}") as stream:
            vol.upload(stream, 0, size, 0)
            with open(local, "rb") as f:
                while chunk := f.read(CHUNK):
                    _send_all(stream, chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent)

    def upload_bytes(self, vol: Any, data: bytes) -> None:
        with self._stream(f"upload to {vol.name()}") as stream:
            vol.upload(stream, 0, len(data), 0)
            _send_all(stream, data)

    def download(self, vol: Any, offset: int, limit: int = 64 * 1024 * 1024) -> bytes:
        """Bytes of ``vol`` from ``offset`` to its end (at most ``limit``)."""
        parts: list[bytes] = []
        total = 0
        with self._stream(f"download of {vol.name()}") as stream:
            vol.download(stream, offset, 0, 0)
            while True:
                data = stream.recv(CHUNK)
                if data in (-2, None) or not isinstance(data, bytes):
                    raise HostStorageError("libvirt stream would block")
                if not data:
                    break
                parts.append(data)
                total += len(data)
                if total > limit:
                    raise HostStorageError(f"{vol.name()} is larger than {limit} bytes")
        return b"".join(parts)

    # -------------------------------------------------------------- per VM
    def create_vm_volumes(self, vm_name: str, base: BaseVolume, seed: Path) -> VMVolumes:
        import libvirt

        overlay_name, seed_name, console_name = vm_volume_names(vm_name)
        for stale in (overlay_name, seed_name, console_name):
            self.delete(stale)
        pool = self.pool()
        made: list[str] = []
        try:
            overlay = pool.createXML(_overlay_xml(overlay_name, base.virtual_size, base.path), 0)
            made.append(overlay_name)
            svol = pool.createXML(_raw_volume_xml(seed_name, seed.stat().st_size), 0)
            made.append(seed_name)
            self.upload(svol, seed)
            console = pool.createXML(_raw_volume_xml(console_name, 0), 0)
            made.append(console_name)
        except libvirt.libvirtError as exc:
            for n in made:
                self.delete(n)
            raise HostStorageError(f"{self.host.label}: cannot create the volumes of {vm_name} "
                                   f"({error_text(exc)})") from None
        except BaseException:
            for n in made:
                self.delete(n)
            raise
        return VMVolumes(self, vm_name, overlay.path(), svol.path(), console.path())


@dataclass
class VMVolumes:
    """One VM's volumes on its host, and its console mirrored into a local file."""

    storage: HostStorage
    vm_name: str
    overlay: str
    seed: str
    console: str
    _pulling: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def pull_console(self, local: Path) -> None:
        """Append what the host's console volume gained since ``local``'s size (one puller
        at a time: readiness and the live console stream both call this)."""
        with self._pulling:
            self._pull(local)

    def _pull(self, local: Path) -> None:
        vol = self.storage.lookup(self.vm_name + "-console.log")
        if vol is None:
            return
        try:
            have = local.stat().st_size
        except OSError:
            have = 0
        try:
            data = self.storage.download(vol, have)
        except HostStorageError as exc:
            log.debug("flightvm: console of %s: %s", self.vm_name, exc)
            return
        if data:
            with open(local, "ab") as f:
                f.write(data)

    def delete(self) -> None:
        for name in vm_volume_names(self.vm_name):
            self.storage.delete(name)

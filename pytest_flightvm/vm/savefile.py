"""libvirt save files: read the domain XML in one, and write a copy that restores as another VM.

A libvirt (QEMU driver) save file is a 92-byte header, a data region and QEMU's
migration stream::

    magic[16]  "LibvirtQemudSave" ("LibvirtQemudPart" while a save is still running)
    u32 version (2), u32 data_len, u32 was_running, u32 compressed, u32 cookie_offset,
    u32 unused[14]
    data_len bytes: the domain XML, NUL, the cookie XML, NUL, zero padding (libvirt
                    leaves 64 KiB of it, so the XML may grow)
    QEMU's stream, to the end of the file

libvirt 9.0 refuses to restore a save file under another name or UUID (HOST-NOTES, "One
saved state, many VMs"), so one booted state cannot be restored into a second VM as it
is. :func:`write_retargeted` writes a **copy** whose data region holds another domain's
XML (its own name, UUID, disk, seed, console, NVRAM and SSH port) and the original
cookie, and whose stream is byte for byte the original. :func:`retarget_xml` makes that
XML from the saved one, so every device address, model and the machine type stay as
QEMU saved them (ABI-identical); only paths, names and the SSH forward change.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..errors import FlightVMError
from .domain import METADATA_NS, METADATA_PREFIX, DomainSpec, netdev_arg

MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("<16sIIIII56x")  # 92 bytes, native (little-endian) order
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_COPY_CHUNK = 64 << 20

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace(METADATA_PREFIX, METADATA_NS)


@dataclass(frozen=True)
class SaveHeader:
    version: int
    data_len: int
    was_running: int
    compressed: int
    cookie_offset: int
    xml: str
    cookie: bytes  # the cookie XML and its NUL, as saved (empty without one)

    @property
    def stream_offset(self) -> int:
        return HEADER.size + self.data_len


def read_header(path: Path) -> SaveHeader:
    """The header and XML of a complete save file; FlightVMError (one line) otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                raise FlightVMError(f"{path} is not a libvirt save file (too short)")
            magic, version, data_len, running, compressed, cookie_off = HEADER.unpack(head)
            if magic != MAGIC:
                raise FlightVMError(f"{path} is not a complete libvirt save file (magic {magic!r})")
            if version != 2 or data_len > 16 << 20 or cookie_off > data_len:
                raise FlightVMError(f"{path}: unsupported save file (version {version}, "
                                    f"data {data_len} bytes)")
            data = f.read(data_len)
    except OSError as exc:
        raise FlightVMError(f"cannot read the save file {path} ({exc.strerror})") from None
    if len(data) < data_len:
        raise FlightVMError(f"{path} is cut short inside its XML region")
    xml_end = data.find(b"\0")
    if xml_end <= 0:
        raise FlightVMError(f"{path}: no domain XML in the save file")
    cookie = b""
    if cookie_off:
        end = data.find(b"\0", cookie_off)
        cookie = data[cookie_off:end + 1] if end >= 0 else b""
    return SaveHeader(version, data_len, running, compressed, cookie_off,
                      data[:xml_end].decode("utf-8"), cookie)


def _new_head(head: SaveHeader, xml: str) -> bytes:
    """The header and data region of a save file like ``head`` with ``xml`` as its domain
    XML (the cookie kept); FlightVMError when it does not fit the region."""
    body = xml.encode("utf-8") + b"\0"
    region = body + head.cookie
    if len(region) > head.data_len:
        raise FlightVMError(f"the new domain XML does not fit the save file's XML region "
                            f"({len(region)} > {head.data_len} bytes)")
    region += b"\0" * (head.data_len - len(region))
    cookie_off = len(body) if head.cookie else 0
    return HEADER.pack(MAGIC, head.version, head.data_len, head.was_running, head.compressed,
                       cookie_off) + region


def write_retargeted(src: Path, dest: Path, xml: str, *, header: SaveHeader | None = None) -> None:
    """Copy save file ``src`` to ``dest`` (0600, created exclusively) with ``xml`` as its
    domain XML; the cookie and QEMU's stream are copied unchanged."""
    head = header or read_header(src)
    new_head = _new_head(head, xml)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            out.write(new_head)
            out.flush()
            _copy_rest(inp, out, head.stream_offset)
    except BaseException:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise


def rewrite_in_place(path: Path, xml: str, *, header: SaveHeader | None = None) -> None:
    """Give save file ``path`` (ours, writable) ``xml`` as its domain XML in place: only
    the header and data region are written (same length), QEMU's stream is not copied."""
    head = header or read_header(path)
    new_head = _new_head(head, xml)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.pwrite(fd, new_head, 0)
    finally:
        os.close(fd)


def _copy_rest(inp: object, out: object, offset: int) -> None:
    """Copy ``inp`` from ``offset`` to its end onto ``out``'s end, in the kernel where it can."""
    fin, fout = inp.fileno(), out.fileno()  # type: ignore[attr-defined]
    size = os.fstat(fin).st_size
    pos = offset
    try:
        while pos < size:
            n = os.copy_file_range(fin, fout, min(_COPY_CHUNK, size - pos), pos)
            if n == 0:
                break
            pos += n
    except OSError:
        os.lseek(fin, pos, os.SEEK_SET)
        while chunk := os.read(fin, 8 << 20):
            os.write(fout, chunk)
        return
    if pos < size:
        raise FlightVMError("the save file shrank while it was copied")


def _set_file(el: ET.Element | None, attr: str, value: Path | None) -> None:
    if el is not None and value is not None:
        el.set(attr, str(value))


def retarget_xml(saved: str, spec: DomainSpec, new_uuid: str | None = None) -> tuple[str, str]:
    """The saved domain XML made into ``spec``'s: name, UUID (new unless given), VM
    generation id (new: the guest reseeds its RNG), our metadata, the disk overlay, seed
    ISO, console log, NVRAM and the SSH forward. Returns (xml, uuid)."""
    try:
        root = ET.fromstring(saved)
    except ET.ParseError as exc:
        raise FlightVMError(f"the saved domain XML does not parse ({exc})") from None
    new_uuid = new_uuid or str(uuid.uuid4())

    def text(tag: str, value: str) -> None:
        el = root.find(tag)
        if el is None:
            el = ET.SubElement(root, tag)
        el.text = value

    text("name", spec.name)
    text("uuid", new_uuid)
    genid = root.find("genid")
    if genid is not None:
        genid.text = str(uuid.uuid4())
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for child in list(metadata):
        metadata.remove(child)
    ours = ET.fromstring(spec.to_xml()).find(f"metadata/{{{METADATA_NS}}}vm")
    if ours is not None:
        metadata.append(ours)
    nvram = root.find("os/nvram")
    if nvram is not None and spec.nvram is not None:
        nvram.text = str(spec.nvram)
    for disk in root.findall("devices/disk"):
        source = disk.find("source")
        if disk.get("device") == "disk":
            for stale in disk.findall("backingStore"):  # libvirt probes the new chain
                disk.remove(stale)
            _set_file(source, "file", spec.overlay)
        elif disk.get("device") == "cdrom":
            _set_file(source, "file", spec.seed_iso)
    for tag in ("serial", "console"):
        for dev in root.findall(f"devices/{tag}"):
            if dev.get("type") == "file":
                _set_file(dev.find("source"), "path", spec.console_log)
            elif dev.get("type") == "pty":  # libvirt opens a new pty; the old one is not ours
                for stale in dev.findall("source"):
                    dev.remove(stale)
            _set_file(dev.find("log"), "file", spec.console_log)
    for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        if (arg.get("value") or "").startswith("user,id=fvmnet0"):
            arg.set("value", netdev_arg(spec.ssh_port, outbound=spec.outbound))
    return ET.tostring(root, encoding="unicode"), new_uuid


def saved_mac(xml: str) -> str | None:
    """The guest NIC's MAC in a saved domain XML (our ``-device virtio-net-pci,...,mac=``)."""
    root = ET.fromstring(xml)
    for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        for part in (arg.get("value") or "").split(","):
            if part.startswith("mac="):
                return part[4:]
    return None

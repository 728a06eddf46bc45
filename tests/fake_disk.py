"""Fake qcow2 disks that pass every check a pulled image must pass (importable as
``tests.fake_disk``; no imports beyond the standard library, so a standalone
builder script can use it too).

:data:`HEADER` is what ``qemu-img create -f qcow2 -o cluster_size=512 X 1M``
writes: a plain qcow2 v3 (no backing file, no data file) of 1 MiB virtual size,
1792 bytes. Any payload after it is ignored by QEMU, so ``HEADER + payload``
is a real qcow2 whose bytes are as random as the payload.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

MiB = 1 << 20
QCOW2_MAGIC = b"QFI\xfb"  # a qcow2's first four bytes: tests use this name, never the literal


def _header() -> bytes:
    b = bytearray(1792)
    # magic, version, backing offset+size, cluster bits, size, crypt, L1 size+offset,
    # refcount table offset+clusters, snapshots count+offset
    struct.pack_into(">4sIQIIQIIQQIIQ", b, 0, QCOW2_MAGIC, 3, 0, 0, 9, MiB, 0, 32, 1536, 512,
                     1, 0, 0)
    struct.pack_into(">QQQII", b, 72, 0, 0, 0, 4, 112)  # features, refcount order, length
    struct.pack_into(">Q", b, 512, 1024)  # refcount table -> the refcount block
    struct.pack_into(">4H", b, 1024, 1, 1, 1, 1)  # clusters 0-3 are used once
    return bytes(b)


HEADER = _header()


def qcow2_bytes(payload: bytes) -> bytes:
    return HEADER + payload


def write_fake_qcow2(path: Path, size: int, seed: int | bytes | None = None) -> Path:
    """A plain qcow2 of ``size`` bytes in all (at least the header): HEADER, then
    pseudo-random bytes from ``seed`` (distinct per seed). The one writer of fake disks:
    the tiers call it with ``n * MiB`` and a fixed seed (the fault tier's golden digests),
    or ``os.urandom(16)`` for content no other test has (see :func:`random_qcow2`)."""
    unit = hashlib.sha256(seed if isinstance(seed, bytes) else str(seed).encode()).digest()
    unit *= MiB // 32
    with open(path, "wb") as f:
        f.write(HEADER)
        left, i = max(0, size - len(HEADER)), 0
        while left > 0:
            part = (i.to_bytes(4, "big") + unit[4:])[:left]
            f.write(part)
            left -= len(part)
            i += 1
    return path


def random_qcow2(path: Path, size: int = MiB) -> Path:
    """:func:`write_fake_qcow2` with content no other call writes (a fresh random seed)."""
    return write_fake_qcow2(path, size, os.urandom(16))


def qcow2_with(tmp_path: Path, **fields: int) -> Path:
    """A header-only qcow2 (``d.qcow2``) with some header ``fields`` set: backing_offset,
    backing_size, crypt, version, incompatible, size."""
    data = bytearray(HEADER)
    offsets = {"backing_offset": (8, ">Q"), "backing_size": (16, ">I"), "crypt": (32, ">I"),
               "version": (4, ">I"), "incompatible": (72, ">Q"), "size": (24, ">Q")}
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, data, off, value)
    path = tmp_path / "d.qcow2"
    path.write_bytes(bytes(data))
    return path

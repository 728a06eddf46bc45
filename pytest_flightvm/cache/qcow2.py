"""The one check that a disk image is a qcow2 we may use as a base.

Every image passes the magic check. An image from a registry, a pinned local file
(``--flightvm-image PATH``: it may come from anywhere) and a file pushed or imported
by the CLI (every puller would refuse it otherwise) must also be a *plain* qcow2
(QEMU runs it as root, with overlays chained onto it):
its header (read here, before any tool opens it) names no backing file, no
external data file and no encryption, and its virtual size is sane; then
``qemu-img info --output=json -f qcow2`` must agree. Without this, a qcow2
whose header names ``/etc/shadow`` as its backing file would hand that file's
bytes to every guest booted on it. A build's output gets the magic check only: the
build command is the user's own code, already running with their rights.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BuildError, FlightVMError, ToolMissingError

QCOW2_MAGIC = b"QFI\xfb"
MAX_VIRTUAL_SIZE = 4 << 40
"""Largest virtual size accepted for a pulled image (4 TiB)."""
QEMU_IMG_TIMEOUT = 60.0
_INCOMPAT_DATA_FILE = 1 << 2
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # up to refcount_table_clusters/snapshots
_HEADER_V3 = struct.Struct(">QQQII")  # incompatible, compatible, autoclear, refcount order, len


def check_qcow2(path: Path, what: str = "the build", *,
                error: type[FlightVMError] = BuildError, plain: bool = False) -> None:
    """``error`` unless ``path`` exists and starts with the qcow2 magic; with ``plain``,
    also unless it is a qcow2 with no backing file and no external data file (header
    and ``qemu-img info``; see the module docstring)."""
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER.size + _HEADER_V3.size)
    except FileNotFoundError:
        raise error(f"{what} wrote no file at {path}") from None
    except OSError as exc:
        raise error(f"cannot read the output of {what} at {path}: {exc.strerror}") from None
    magic = header[:len(QCOW2_MAGIC)]
    if magic != QCOW2_MAGIC:
        raise error(
            f"{what} is not a qcow2 disk image (it starts with {magic!r}); "
            "convert it with `qemu-img convert -O qcow2`"
        )
    if plain:
        _check_header(header, what, error)
        _check_info(_qemu_img_info(path, what, error), what, error)


def check_overlay(path: Path, base: Path, what: str, *,
                  error: type[FlightVMError] = BuildError) -> None:
    """Make ``path`` (an untrusted qcow2 overlay, e.g. a booted state's frozen disk from a
    registry, writable by us) an overlay of our ``base`` and nothing else, or ``error``.

    Its header is read first, before any tool opens it: a qcow2 of version 2 or 3 with no
    external data file and no encryption, whose backing file is a store blob named as
    ``base`` is (``.../sha256/<base digest>``: the same base, stored elsewhere; that path
    is never opened); then ``qemu-img rebase -u`` (which opens neither the old nor the new
    chain's data) points it at ``base``, and ``qemu-img info`` must show exactly that:
    qcow2 backed by ``base`` as qcow2, no data file, not corrupt or encrypted, and the
    base's virtual size."""
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER.size + _HEADER_V3.size)
    except OSError as exc:
        raise error(f"cannot read {what} at {path}: {exc.strerror}") from None
    if header[:len(QCOW2_MAGIC)] != QCOW2_MAGIC:
        raise error(f"{what} is not a qcow2 disk image; refused")
    _check_header(header, what, error, backing=True)
    _, _, backing_offset, backing_size, *_rest = _HEADER.unpack_from(header)
    try:
        with open(path, "rb") as f:
            f.seek(backing_offset)
            backing_name = f.read(min(backing_size, 1023)).decode("utf-8", "replace")
    except OSError as exc:
        raise error(f"cannot read {what} at {path}: {exc.strerror}") from None
    if not backing_size or backing_name.rsplit("/", 2)[-2:] != ["sha256", base.name]:
        raise error(f"{what} is not an overlay of the base {base.name[:12]} (it names "
                    f"{backing_name[:80]!r} as its backing file); refused")
    _qemu_img(["rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", "qcow2", "--", str(path)],
              what, error, "a pulled overlay",
              lambda reason: f"{what} could not be put on the base ({reason}); refused")
    info = _qemu_img_info(path, what, error)
    base_info = _qemu_img_info(base, "the base image", error)
    specific = (info.get("format-specific") or {}).get("data") or {}
    problems = []
    if info.get("format") != "qcow2":
        problems.append(f"format {info.get('format')!r}")
    if info.get("backing-filename") != str(base) or info.get("backing-filename-format") != "qcow2":
        problems.append("another backing file")
    if specific.get("data-file") or specific.get("data-file-raw"):
        problems.append("an external data file")
    if specific.get("corrupt") or info.get("encrypted"):
        problems.append("the corrupt or encrypted flag")
    if info.get("virtual-size") != base_info.get("virtual-size"):
        problems.append(f"virtual size {info.get('virtual-size')} (the base has "
                        f"{base_info.get('virtual-size')})")
    if problems:
        raise error(f"{what} is not a plain overlay of the base (qemu-img info shows "
                    f"{', '.join(problems)}); refused")


def _check_header(header: bytes, what: str, error: type[FlightVMError], *,
                  backing: bool = False) -> None:
    if len(header) < _HEADER.size:
        raise error(f"{what} is not a qcow2 disk image (its header is cut short)")
    (_, version, backing_offset, backing_size, cluster_bits, size, crypt, *_rest) = \
        _HEADER.unpack_from(header)
    if version not in (2, 3):
        raise error(f"{what} is a qcow2 of version {version}; only versions 2 and 3 are used")
    if (backing_offset or backing_size) and not backing:
        raise error(f"{what} is a qcow2 that names a backing file; refused (a base image "
                    "must be self-contained: `qemu-img convert -O qcow2` flattens it)")
    if crypt:
        raise error(f"{what} is an encrypted qcow2; refused")
    if not 9 <= cluster_bits <= 21:
        raise error(f"{what} is not a sound qcow2 (cluster bits {cluster_bits})")
    if not 0 < size <= MAX_VIRTUAL_SIZE:
        raise error(f"{what} has a virtual size of {size} bytes; refused (at most "
                    f"{MAX_VIRTUAL_SIZE >> 40} TiB)")
    if version == 3:
        if len(header) < _HEADER.size + _HEADER_V3.size:
            raise error(f"{what} is not a qcow2 disk image (its header is cut short)")
        incompatible = _HEADER_V3.unpack_from(header, _HEADER.size)[0]
        if incompatible & _INCOMPAT_DATA_FILE:
            raise error(f"{what} is a qcow2 with an external data file; refused (a base "
                        "image must be self-contained: `qemu-img convert -O qcow2` it)")


def _qemu_img(args: list[str], what: str, error: type[FlightVMError], needs: str,
              failed: Callable[[str], str]) -> subprocess.CompletedProcess[bytes]:
    """``qemu-img ARGS`` on ``what``, bounded by QEMU_IMG_TIMEOUT; its failure is ``error``
    with ``failed(last stderr line)``, a missing qemu-img is ToolMissingError."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise ToolMissingError(f"checking {needs} needs qemu-img; apt-get install qemu-utils")
    try:
        proc = subprocess.run([qemu_img, *args], capture_output=True, timeout=QEMU_IMG_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise error(f"qemu-img {args[0]} on {what} took over {QEMU_IMG_TIMEOUT:g} s; "
                    "refused") from None
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        raise error(failed(reason[-1][:160] if reason else f"qemu-img {args[0]}"))
    return proc


def _qemu_img_info(path: Path, what: str, error: type[FlightVMError]) -> dict[str, Any]:
    proc = _qemu_img(["info", "--output=json", "-f", "qcow2", "--", str(path)], what, error,
                     "a pulled image",
                     lambda reason: f"{what} is not a readable qcow2 ({reason}); refused")
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise error(f"qemu-img info on {what} gave no JSON; refused")
    return info


def _check_info(info: dict[str, Any], what: str, error: type[FlightVMError]) -> None:
    specific = (info.get("format-specific") or {}).get("data") or {}
    problems = []
    if info.get("format") != "qcow2":
        problems.append(f"format {info.get('format')!r}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        problems.append("a backing file")
    if specific.get("data-file") or specific.get("data-file-raw"):
        problems.append("an external data file")
    if specific.get("corrupt") or info.get("encrypted"):
        problems.append("the corrupt or encrypted flag")
    size = info.get("virtual-size")
    if not isinstance(size, int) or not 0 < size <= MAX_VIRTUAL_SIZE:
        problems.append(f"virtual size {size}")
    if problems:
        raise error(f"{what} is not a plain qcow2 (qemu-img info shows {', '.join(problems)}); "
                    "refused")

"""Write and read NoCloud seed ISOs with pycdlib.

The ISO has the volume label ``cidata`` (what cloud-init's NoCloud looks
for), Rock Ridge (long names, POSIX modes: what the Linux kernel shows) and
Joliet (long names for other readers). The ISO9660 names underneath are
mangled 8.3 names that nobody needs to see.

File modes inside the ISO: in-memory files are ``0444`` and directories
``0555`` (like ``genisoimage -r``) unless ``modes`` says otherwise; files
copied from ``payload_dirs`` keep their own permission bits.

The ISO file itself is created ``0600`` from the start (it may carry private
keys) and appears atomically: it is written to a temp file in the target
directory, then ``os.replace``d.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pycdlib

from ..errors import ConfigError, FlightVMError

VOLUME_LABEL = "cidata"
FILE_MODE = 0o444
DIR_MODE = 0o555
_JOLIET_MAX = 64
_RR_MAX = 255


@dataclass
class _Dir:
    iso_path: str
    joliet_path: str
    iso_names: set[str] = field(default_factory=set)
    joliet_names: set[str] = field(default_factory=set)


def _clean_parts(name: str) -> tuple[str, ...]:
    path = PurePosixPath(name)
    parts = tuple(p for p in path.parts if p not in ("", "/", "."))
    if not parts or path.is_absolute() or ".." in parts:
        raise ConfigError(f"seed file name {name!r} must be a relative path without '..'")
    for part in parts:
        if len(part.encode("utf-8")) > _RR_MAX:
            raise ConfigError(f"seed file name {part!r} is longer than {_RR_MAX} bytes")
    return parts


def _iso_name(name: str, taken: set[str], *, is_dir: bool) -> str:
    """A unique ISO9660 level-1 name (8.3 for files, 8 for dirs) for ``name``."""
    stem, dot, ext = name.rpartition(".")
    if not dot or is_dir or not stem:
        stem, ext = name, ""
    stem = re.sub(r"[^A-Z0-9_]", "_", stem.upper()) or "_"
    ext = re.sub(r"[^A-Z0-9_]", "_", ext.upper())[:3]
    for n in range(100000):
        suffix = "" if n == 0 else f"_{n}"
        base = stem[: 8 - len(suffix)] + suffix
        candidate = base if is_dir else f"{base}.{ext}"
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise ConfigError(f"too many seed files with names like {name!r}")  # pragma: no cover


def _joliet_name(name: str, taken: set[str]) -> str:
    """The Joliet name: the real name, shortened to 64 UCS-2 units if needed, unique."""
    # Joliet names are UCS-2: no characters outside the BMP.
    base = "".join(c if ord(c) < 0x10000 else "_" for c in name)
    for n in range(100000):
        suffix = "" if n == 0 else f"~{n}"
        candidate = base[: _JOLIET_MAX - len(suffix)] + suffix
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise ConfigError(f"too many seed files with names like {name!r}")  # pragma: no cover


class _IsoBuilder:
    def __init__(self) -> None:
        self.iso = pycdlib.PyCdlib()
        self.iso.new(
            interchange_level=1,
            vol_ident=VOLUME_LABEL,
            joliet=3,
            rock_ridge="1.09",
            app_ident_str="pytest-flightvm",
        )
        self.dirs: dict[tuple[str, ...], _Dir] = {(): _Dir("/", "/")}
        self.files: set[tuple[str, ...]] = set()

    def ensure_dir(self, parts: tuple[str, ...], mode: int = DIR_MODE) -> _Dir:
        if parts in self.dirs:
            return self.dirs[parts]
        if parts in self.files:
            raise ConfigError(f"seed path {'/'.join(parts)!r} is both a file and a directory")
        parent = self.ensure_dir(parts[:-1])
        name = parts[-1]
        iso_name = _iso_name(name, parent.iso_names, is_dir=True)
        jname = _joliet_name(name, parent.joliet_names)
        entry = _Dir(
            iso_path=f"{parent.iso_path.rstrip('/')}/{iso_name}",
            joliet_path=f"{parent.joliet_path.rstrip('/')}/{jname}",
        )
        self.iso.add_directory(
            entry.iso_path,
            rr_name=name,
            joliet_path=entry.joliet_path,
            file_mode=stat.S_IFDIR | (mode & 0o7777),
        )
        self.dirs[parts] = entry
        return entry

    def add_file(self, parts: tuple[str, ...], fp: BinaryIO, length: int, mode: int) -> None:
        if parts in self.files or parts in self.dirs:
            raise ConfigError(f"seed path {'/'.join(parts)!r} is given twice")
        parent = self.ensure_dir(parts[:-1])
        name = parts[-1]
        iso_name = _iso_name(name, parent.iso_names, is_dir=False)
        jname = _joliet_name(name, parent.joliet_names)
        self.iso.add_fp(
            fp,
            length,
            f"{parent.iso_path.rstrip('/')}/{iso_name};1",
            rr_name=name,
            joliet_path=f"{parent.joliet_path.rstrip('/')}/{jname}",
            file_mode=stat.S_IFREG | (mode & 0o7777),
        )
        self.files.add(parts)


def _walk_payload(root: Path) -> Iterator[tuple[tuple[str, ...], Path, os.stat_result]]:
    """(relative parts, path, stat) for every dir and file under ``root``, sorted."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        rel = base.relative_to(root).parts
        for name in sorted(dirnames):
            path = base / name
            st = path.stat()
            if stat.S_ISDIR(st.st_mode):
                yield (*rel, name), path, st
        for name in sorted(filenames):
            path = base / name
            try:
                st = path.stat()  # follows symlinks: the content goes on the ISO
            except OSError as exc:
                raise ConfigError(f"cannot read payload file {path}: {exc.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"payload entry {path} is not a regular file")
            yield (*rel, name), path, st


def write_iso(
    files: Mapping[str, bytes],
    output: Path,
    *,
    payload_dirs: Mapping[str, Path] | None = None,
    modes: Mapping[str, int] | None = None,
) -> Path:
    """Write a NoCloud seed ISO and return its path.

    ``files`` maps relative POSIX paths (``"user-data"``, ``"a/b/c.txt"``) to
    contents; parent directories are created. ``payload_dirs`` maps an ISO
    directory name to a host directory copied recursively under it, keeping
    permission bits. ``modes`` overrides the Rock Ridge mode of entries of
    ``files`` (permission bits only).
    """
    output = Path(output)
    modes = dict(modes or {})
    builder = _IsoBuilder()
    with contextlib.ExitStack() as stack:
        for name in sorted(files):
            data = files[name]
            if not isinstance(data, bytes | bytearray):
                raise ConfigError(f"seed file {name!r}: contents must be bytes")
            parts = _clean_parts(name)
            builder.add_file(parts, io.BytesIO(bytes(data)), len(data), modes.get(name, FILE_MODE))
        for dir_name, host_dir in sorted((payload_dirs or {}).items()):
            prefix = _clean_parts(dir_name)
            host_dir = Path(host_dir)
            if not host_dir.is_dir():
                raise ConfigError(f"payload dir {host_dir} for {dir_name!r} is not a directory")
            builder.ensure_dir(prefix, host_dir.stat().st_mode)
            for rel, path, st in _walk_payload(host_dir):
                if stat.S_ISDIR(st.st_mode):
                    builder.ensure_dir(prefix + rel, st.st_mode)
                    continue
                try:
                    fp = stack.enter_context(path.open("rb"))
                except OSError as exc:
                    raise ConfigError(f"cannot read payload file {path}: {exc.strerror}") from None
                builder.add_file(prefix + rel, fp, st.st_size, st.st_mode)
        return _write_atomic(builder.iso, output)


def _write_atomic(iso: pycdlib.PyCdlib, output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600 whatever the umask: private from the start.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            iso.write_fp(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise FlightVMError(
                f"cannot write seed ISO {output}: {exc.strerror or exc}; "
                "check space and permissions"
            ) from exc
        raise
    finally:
        iso.close()
    return output


def read_iso(path: Path) -> dict[str, bytes]:
    """Every file of an ISO, keyed by its Rock Ridge path relative to the root."""
    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except (OSError, pycdlib.pycdlibexception.PyCdlibException) as exc:
        raise ConfigError(f"{path} is not a readable ISO image: {exc}") from None
    try:
        if not iso.has_rock_ridge():
            raise ConfigError(f"{path} has no Rock Ridge names; write it with write_iso")
        out: dict[str, bytes] = {}
        for dirpath, _dirs, filenames in iso.walk(rr_path="/"):
            for name in filenames:
                rr_path = f"{dirpath.rstrip('/')}/{name}"
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, rr_path=rr_path)
                out[rr_path.lstrip("/")] = buf.getvalue()
        return dict(sorted(out.items()))
    finally:
        iso.close()

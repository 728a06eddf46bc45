"""Keeps what a CI job uploads after a run (--flightvm-artifacts DIR): VM console logs, run metrics.

Layout, flat so one upload step takes it all:
- ``<vm-name>.console.log``: each VM's serial console, written when the VM is
  destroyed or kept (its name carries the run id, so runs sharing a dir never collide);
- ``flightvm-<run-id>.metrics.json``: the run's metrics (the ``--flightvm-metrics`` JSON).

The dir is created 0700 when missing; an existing one must be a directory of ours (it is
left as it is). Every file is new: created ``O_EXCL | O_NOFOLLOW``, 0600, under a name
made of ``[A-Za-z0-9_.-]`` only; a name already taken gets ``-2``, ``-3``... so nothing
that is already there, ours or not, is ever written over or through.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from .errors import ConfigError
from .statedir import create_excl

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_FIX = "set --flightvm-artifacts (env FLIGHTVM_ARTIFACTS) to a directory of your own"
_WRITE = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_TRUNC


def artifact_dir(path: Path) -> Path:
    """Create ``path`` (0700) or check an existing one: a directory we own, not open to all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot use the artifacts dir {path} ({exc.strerror}); {_FIX}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"the artifacts dir {path} is not a directory; {_FIX}")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"the artifacts dir {path} belongs to uid {st.st_uid}, not to you; {_FIX}")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"the artifacts dir {path} is writable by every user; {_FIX}")
    return path


def safe_name(name: str) -> str:
    """``name`` with anything but letters, digits, ``_``, ``.`` and ``-`` replaced by ``_``,
    and no leading dot (no hidden files, no ``..``)."""
    return _UNSAFE.sub("_", name).lstrip(".")[:200] or "unnamed"


def reserve(directory: Path, name: str, suffix: str) -> Path:
    """Create a new, empty 0600 file ``<name><suffix>`` (or ``<name>-N<suffix>``) and
    return its path. Never opens anything that already exists."""
    base = safe_name(name)
    for n in range(1, 1000):
        path = directory / (f"{base}{suffix}" if n == 1 else f"{base}-{n}{suffix}")
        try:
            create_excl(path, b"")
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot write in the artifacts dir {directory} ({exc.strerror}); "
                              f"{_FIX}") from None
        return path
    raise ConfigError(f"the artifacts dir {directory} already holds 999 files named {base}*; "
                      "empty it or pick another dir")


def fill(path: Path, source: Path) -> bool:
    """Copy ``source`` into the file :func:`reserve` made (never through a link put there
    since). False when either side cannot be used: an artifact is never worth a failure."""
    try:
        with open(source, "rb") as src:
            fd = os.open(path, _WRITE)
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    except OSError:
        return False
    return True


def write_new(directory: Path, name: str, suffix: str, data: bytes) -> Path:
    """A new artifact file holding ``data``."""
    path = reserve(directory, name, suffix)
    fd = os.open(path, _WRITE)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path

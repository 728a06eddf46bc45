"""Private, ownership-checked state dirs and files that never follow a planted link.

Every directory we keep state in (the cache dir's ``runs/`` and run dirs, a
run's ``ssh/`` and ``vms/<name>/``, the per-user port table) is made here:

- the last component is created 0700 with ``mkdir`` and then opened with
  ``O_NOFOLLOW | O_DIRECTORY``: a symlink planted there is refused, never followed;
- it must belong to us (the effective uid); one we own but left open to others
  is closed to 0700;
- files in it are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and renamed
  into place, so a planted name is never written through.

Anything else is ``StoreUnusable``: one line naming the path and what to do.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .errors import StoreUnusable

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_EXCL = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _unusable(path: Path, why: str, fix: str = "") -> StoreUnusable:
    return StoreUnusable(f"refusing {path}: {why}; "
                         + (fix or "remove it or set --flightvm-cache-dir to a directory of your own"))


def check_owned_dir(path: Path, what: str = "cache dir") -> None:
    """``path`` (a directory the user named; symlinks allowed) belongs to us and is
    not writable by everybody without the sticky bit."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StoreUnusable(f"cannot use the {what} {path} ({exc.strerror}); "
                            "set --flightvm-cache-dir to a writable directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreUnusable(f"the {what} {path} is not a directory; "
                            "set --flightvm-cache-dir to a directory")
    if st.st_uid != os.geteuid():
        raise StoreUnusable(f"the {what} {path} belongs to uid {st.st_uid}, not to you "
                            f"(uid {os.geteuid()}); set --flightvm-cache-dir to a directory "
                            "of your own")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise StoreUnusable(f"the {what} {path} is writable by every user; chmod o-w it or "
                            "set --flightvm-cache-dir to a directory of your own")


def ensure_cache_dir(path: Path) -> Path:
    """Create the cache dir if needed, then :func:`check_owned_dir` it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnusable(f"cannot create the cache dir {path} ({exc.strerror}); "
                            "set --flightvm-cache-dir to a writable directory") from None
    check_owned_dir(path)
    return path


def private_dir(path: Path, *, parents: bool = True, fix: str = "") -> Path:
    """Create (or reuse) ``path`` as a 0700 directory of ours; never follow a link there.

    With ``parents``, missing parents are created the ordinary way (they are the
    user's choice, like the cache dir). Returns ``path``.
    """
    path = Path(path)
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        fd = os.open(path, _NOFOLLOW_DIR)
    except OSError as exc:
        if os.path.islink(path):
            raise _unusable(path, "it is a symbolic link, not a directory we made", fix) from None
        raise StoreUnusable(f"cannot create the state dir {path} ({exc.strerror}); "
                            "set --flightvm-cache-dir to a writable directory") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise _unusable(path, f"it belongs to uid {st.st_uid}, not to you "
                                  f"(uid {os.geteuid()})", fix)
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def create_excl(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a new file; fail (FileExistsError) if anything, a link included, is there."""
    fd = os.open(path, _EXCL, mode)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def replace_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically put ``data`` at ``path``: an O_EXCL temp file beside it, then rename.

    A symlink at ``path`` is replaced, not written through.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    create_excl(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_file(path: Path) -> bytes:
    """Read a regular file without following a link at its last component."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _runtime_dir(env: Mapping[str, str]) -> Path | None:
    raw = env.get("XDG_RUNTIME_DIR", "")
    if not raw or not os.path.isabs(raw):
        return None
    try:
        st = os.stat(raw)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None  # not the private per-user runtime dir the spec promises
    return Path(raw)


def user_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """One private dir per user and host, the same whatever cache dir a run uses.

    The first that :func:`private_dir` accepts of: ``$XDG_RUNTIME_DIR/flightvm``
    (when that runtime dir is ours and 0700), ``$XDG_STATE_HOME/flightvm``
    (``~/.local/state/flightvm``), ``<tmp>/flightvm-<uid>``. A planted link or a
    dir of another user is skipped, never used.
    """
    env = os.environ if env is None else env
    candidates: list[tuple[Path, bool]] = []
    runtime = _runtime_dir(env)
    if runtime is not None:
        candidates.append((runtime / "flightvm", False))
    state_home = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state_home):
        home = env.get("HOME") or os.path.expanduser("~")
        state_home = os.path.join(home, ".local", "state") if os.path.isabs(home) else ""
    if state_home:
        candidates.append((Path(state_home) / "flightvm", True))
    candidates.append((Path(tempfile.gettempdir()) / f"flightvm-{os.geteuid()}", False))
    # A candidate that is a link or not ours is skipped (every process skips it alike,
    # so all still share one table); only when the last one fails is it an error.
    for path, parents in candidates[:-1]:
        with contextlib.suppress(StoreUnusable):
            return private_dir(path, parents=parents)
    return private_dir(candidates[-1][0], parents=False,
                       fix="remove it; flightvm keeps its per-user port table there "
                           "(or set XDG_RUNTIME_DIR to a private dir of yours)")

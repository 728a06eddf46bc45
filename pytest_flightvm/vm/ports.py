"""Free loopback ports for SSH forwards, unique across xdist workers and runs.

A port is probed free with bind() and then reserved in a small file under a
lock, keyed by the owning pid, so two workers never hand QEMU the same port
in the window between probe and QEMU's own bind.

The table is per user and host, shared by runs whatever their cache dir, so it
lives in the user's private state dir (``statedir.user_state_dir``:
``$XDG_RUNTIME_DIR/flightvm``, else ``~/.local/state/flightvm``), 0700 and
ownership-checked, never a predictable name in /tmp. It is rewritten through
O_EXCL temp files and read without following links.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from filelock import FileLock

from ..procs import pid_namespace, process_start, same_process
from ..statedir import private_dir, read_file, replace_file, user_state_dir


def default_state_dir() -> Path:
    """One reservation table per user and host, whatever cache dir each run uses."""
    return user_state_dir()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(table: Path) -> dict[str, list[object]]:
    try:
        held = json.loads(read_file(table))
    except (OSError, ValueError):
        return {}
    return held if isinstance(held, dict) else {}


def _alive(v: object) -> bool:
    """A reservation stands while its process lives. One made in another pid
    namespace is kept: a pid from there means nothing here."""
    if not isinstance(v, list) or len(v) not in (2, 3):
        return False
    try:
        pid = int(str(v[0]))
    except ValueError:
        return False
    ns = str(v[2]) if len(v) == 3 else pid_namespace()
    verdict = same_process(pid, str(v[1]), ns)
    return True if verdict is None else verdict


def _state(state_dir: Path | None) -> Path:
    return private_dir(state_dir) if state_dir is not None else default_state_dir()


def reserve_port(state_dir: Path | None = None) -> int:
    state_dir = _state(state_dir)
    table = state_dir / "ports.json"
    with FileLock(str(state_dir / "ports.lock"), timeout=30):
        # Forget reservations of processes that are gone.
        held = {p: v for p, v in _read(table).items() if _alive(v)}
        me: list[object] = [os.getpid(), process_start(os.getpid()), pid_namespace()]
        for _ in range(50):
            port = _free_port()
            if str(port) not in held:
                held[str(port)] = me
                replace_file(table, json.dumps(held).encode())
                return port
    raise RuntimeError("no free loopback port found")  # pragma: no cover


def release_port(state_dir: Path | None, port: int) -> None:
    state_dir = _state(state_dir)
    table = state_dir / "ports.json"
    with FileLock(str(state_dir / "ports.lock"), timeout=30):
        held = _read(table)
        if held.pop(str(port), None) is not None:
            replace_file(table, json.dumps(held).encode())

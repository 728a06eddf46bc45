"""Free loopback ports for SSH forwards, unique across xdist workers and runs.

A port is probed free with bind() and then reserved in a small file under a
lock, keyed by the owning pid, so two workers never hand QEMU the same port
in the window between probe and QEMU's own bind.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

from filelock import FileLock

from .domain import process_start


def default_state_dir() -> Path:
    """One reservation table per user and host, whatever cache dir each run uses."""
    return Path(tempfile.gettempdir()) / f"flightvm-ports-{os.getuid()}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reserve_port(state_dir: Path | None = None) -> int:
    state_dir = state_dir or default_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    table = state_dir / "ports.json"
    with FileLock(str(state_dir / "ports.lock"), timeout=30):
        try:
            held: dict[str, list[object]] = json.loads(table.read_text())
        except (OSError, ValueError):
            held = {}
        # Forget reservations of processes that are gone.
        held = {p: v for p, v in held.items()
                if isinstance(v, list) and len(v) == 2 and process_start(int(str(v[0]))) == v[1]}
        me: list[object] = [os.getpid(), process_start(os.getpid())]
        for _ in range(50):
            port = _free_port()
            if str(port) not in held:
                held[str(port)] = me
                tmp = table.with_suffix(".tmp")
                tmp.write_text(json.dumps(held))
                os.replace(tmp, table)
                return port
    raise RuntimeError("no free loopback port found")  # pragma: no cover


def release_port(state_dir: Path | None, port: int) -> None:
    state_dir = state_dir or default_state_dir()
    table = state_dir / "ports.json"
    with FileLock(str(state_dir / "ports.lock"), timeout=30):
        try:
            held = json.loads(table.read_text())
        except (OSError, ValueError):
            return
        if held.pop(str(port), None) is not None:
            tmp = table.with_suffix(".tmp")
            tmp.write_text(json.dumps(held))
            os.replace(tmp, table)

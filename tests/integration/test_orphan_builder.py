"""A builder that outlives its killed owner is stopped by the next run's sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pytest_flightvm.cache.store import Store
from pytest_flightvm.procs import process_start

CHILD = """
import sys
from pathlib import Path
from pytest_flightvm.cache.resolve import resolve_image
from pytest_flightvm.cache.build import CommandBuilder
from pytest_flightvm.config import resolve
settings = resolve({"cache_dir": sys.argv[1], "offline": True}, {}, {})
resolve_image(settings, CommandBuilder("echo $$ > " + sys.argv[2] + "; exec sleep 600"))
"""


def _wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def _wait_for_glob(directory: Path, pattern: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        notes = list(directory.glob(pattern)) if directory.is_dir() else []
        if notes and all(n.read_text().strip() for n in notes):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} in {directory}")


def test_kill_9_mid_build_then_the_sweep_stops_the_orphan(tmp_path: Path) -> None:
    cache, pidfile = tmp_path / "cache", tmp_path / "builder.pid"
    owner = subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(pidfile)])
    builder = int(_wait_for(pidfile))
    # The owner writes its group note just after the builder starts; the builder can
    # write its pid first. Kill the owner only once the note exists (what we test is
    # the sweep acting on a note, not the microseconds before one is written).
    _wait_for_glob(cache / "store" / "tmp", "*.pgid")
    try:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        time.sleep(0.5)
        assert process_start(builder) is not None, "the builder should still run: it is an orphan"
        Store(cache / "store").sweep_tmp()  # what the next resolve does first
        deadline = time.monotonic() + 10
        while process_start(builder) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_start(builder) is None or "Z" in Path(f"/proc/{builder}/stat").read_text().split()[2]
        assert list((cache / "store" / "tmp").iterdir()) == []
    finally:
        if process_start(builder) is not None:
            os.kill(builder, signal.SIGKILL)

"""stop_orphaned_group on real processes: TERM first, KILL for a group that ignores it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pytest_flightvm.buildgroup import stop_orphaned_group
from pytest_flightvm.procs import process_start


def _group(script: str, note: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    note.write_text(f"{proc.pid} {process_start(proc.pid)}\n")
    time.sleep(0.2)
    return proc


def test_a_group_that_obeys_sigterm_stops_at_once(tmp_path: Path) -> None:
    proc = _group("sleep 600", tmp_path / "n.pgid")
    started = time.monotonic()
    assert stop_orphaned_group(tmp_path / "n.pgid", grace=5)
    assert proc.wait(timeout=5) == -15
    assert time.monotonic() - started < 4


def test_a_group_that_ignores_sigterm_gets_sigkill_after_the_grace(tmp_path: Path) -> None:
    proc = _group("trap '' TERM; sleep 600", tmp_path / "n.pgid")
    assert stop_orphaned_group(tmp_path / "n.pgid", grace=0.5)
    assert proc.wait(timeout=5) == -9


def test_a_reused_pid_is_left_alone(tmp_path: Path) -> None:
    proc = _group("sleep 600", tmp_path / "n.pgid")
    try:
        (tmp_path / "n.pgid").write_text(f"{proc.pid} 1\n")  # start time of another process
        assert not stop_orphaned_group(tmp_path / "n.pgid", grace=0.5)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()

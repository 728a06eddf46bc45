"""A builder's process group: started, noted beside its temp output, and stopped.

The built-in Debian builder and a ``--flightvm-build-cmd`` both run in a process
group of their own (:func:`run_group`). If the process that started one is killed
(-9) mid-build, the note lets the next sweep of the store's temp dir stop the
orphaned group.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import BuildError
from .procs import process_is_zombie, process_start

GROUP_SUFFIX = ".pgid"


def record_group(output: Path, proc: subprocess.Popen[bytes]) -> None:
    """Note the builder's process group beside its temp output. If this process is
    killed (-9) mid-build, the next sweep of the store's temp dir finds the note of
    a dead owner and stops the orphaned builder (see ``Store.sweep_tmp``)."""
    note = output.with_name(output.name + GROUP_SUFFIX)
    part = note.with_name(note.name + ".part")
    part.write_text(f"{proc.pid} {process_start(proc.pid) or ''}\n")
    os.replace(part, note)  # a sweep never reads a half-written note


def stop_orphaned_group(note: Path, grace: float = 10.0) -> bool:
    """SIGTERM the group recorded in ``note`` if that leader still runs; True if signalled.
    SIGTERM first: the Debian builder's trap then unmounts and detaches loops. A
    group whose leader is still there after ``grace`` seconds gets SIGKILL."""
    try:
        pid_text, _, start = note.read_text().strip().partition(" ")
        pgid = int(pid_text)
    except (OSError, ValueError):
        return False
    if process_start(pgid) is None or (start and process_start(pgid) != start):
        return False  # gone, or the pid was reused by an unrelated process
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = process_start(pgid)
        if now is None or (start and now != start) or process_is_zombie(pgid):
            return True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)  # it ignored SIGTERM (or its trap hung)
    return True


def run_group(
    argv: Sequence[str],
    output: Path,
    *,
    env: Mapping[str, str],
    on_line: Callable[[str], None],
    what: str,
    cwd: Path | None = None,
    grace: float = 0.0,
    tail_lines: int = 20,
    timeout: float | None = None,
) -> tuple[int, list[str]]:
    """Run a builder in its own process group, noted beside ``output``; return its exit
    code and last output lines. Each output line (stdout and stderr) goes to ``on_line``,
    which may raise to stop the build. On any exception, or once ``timeout`` seconds
    have passed (silent or not: a timer, not the output, decides), the group is stopped:
    SIGTERM and ``grace`` seconds for its own clean-up, then SIGKILL."""
    try:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # so an interrupt can signal the whole tree
        )
    except OSError as exc:
        raise BuildError(f"cannot run {what}: {exc.strerror}") from None
    record_group(output, proc)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    assert proc.stdout is not None
    overdue = threading.Event()

    def stop_overdue() -> None:
        overdue.set()
        stop_group(proc, grace)  # its output then ends, and so does the loop below

    timer = threading.Timer(timeout, stop_overdue) if timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail.append(line)
            on_line(line)
        proc.wait()
    except BaseException:
        stop_group(proc, grace)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        proc.stdout.close()
    if overdue.is_set():
        raise BuildError(f"{what} ran over {timeout:g} s and was stopped; raise "
                         "--flightvm-build-timeout if it needs longer",
                         detail="\n".join(tail))
    return proc.returncode, list(tail)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 0.0) -> None:
    """Stop ``proc``'s process group: SIGTERM and up to ``grace`` seconds (none: straight
    to SIGKILL), then SIGKILL; reaps ``proc``."""
    if proc.poll() is not None:
        return
    if grace > 0:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            proc.terminate()
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()

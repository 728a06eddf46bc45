"""A builder's process group, noted beside its temp output so a later sweep can stop it.

The built-in Debian builder and a ``--flightvm-build-cmd`` both run in a process
group of their own. If the process that started one is killed (-9) mid-build, the
note lets the next sweep of the store's temp dir stop the orphaned group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

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

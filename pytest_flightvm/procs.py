"""Who a process is: its pid, the kernel's start time for it, and its pid namespace.

A pid alone names a process only within one pid namespace and only until it is
reused. Anything we leave behind for a later sweep (temp files, run dirs, VM
metadata) records all three, and a sweep judges a record only when it was made
in its own pid namespace.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_is_zombie(pid: int) -> bool:
    """True if ``pid`` has exited but is not yet reaped (or is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def pid_namespace() -> str:
    """This process's pid namespace: the inode of /proc/self/ns/pid ("" where unknown)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def same_process(pid: int, start: str, pid_ns: str) -> bool | None:
    """Is the process recorded as (pid, start, pid_ns) still running?

    True or False when the record was made in our pid namespace; None ("unknown")
    when it was made in another one, or when either namespace is unknown: a pid
    from there means nothing here.
    """
    here = pid_namespace()
    if not pid_ns or not here or pid_ns != here:
        return None
    now = process_start(pid)
    return now is not None and (not start or now == start)

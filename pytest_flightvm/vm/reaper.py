"""Remove what killed runs left behind: domains, overlays, seeds, run dirs.

Every flightvm domain carries metadata naming its run, owning pid (with the
pid's start time, so a recycled pid is not mistaken for the owner) and host.
A domain is reaped only when its owner on *this* host is dead and it was not
kept on purpose (``--flightvm-keep``; ``flightvm gc --name`` removes those).
Domains without our metadata are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .domain import DomainInfo, parse_metadata, process_start
from .libvirt_conn import connect, error_text, undefine

KEPT_MARKER = "KEPT"
RUN_FILE = "run.json"


def owner_is_alive(pid: int, pid_start: str, host: str) -> bool:
    if host and host != socket.gethostname():
        return True  # another host's run: not ours to judge
    start = process_start(pid)
    return start is not None and (not pid_start or start == pid_start)


def write_run_file(run_dir: Path, pid: int | None = None) -> None:
    """Mark ``run_dir`` as owned by ``pid`` (the pytest controller; default: this process)."""
    pid = pid or os.getpid()
    data = {"pid": pid, "pid_start": process_start(pid) or "", "host": socket.gethostname()}
    # One temp name per process: xdist workers may write the same run dir at once.
    tmp = run_dir / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, run_dir / RUN_FILE)


def run_dir_alive(run_dir: Path) -> bool:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
        return owner_is_alive(int(data["pid"]), str(data.get("pid_start", "")),
                              str(data.get("host", "")))
    except (OSError, ValueError, KeyError, TypeError):
        # no owner record: judge by age (a run dir being created right now is young)
        try:
            import time

            return time.time() - run_dir.stat().st_mtime < 600
        except OSError:
            return False


@dataclass(frozen=True)
class Reaped:
    kind: str  # "domain" or "files"
    name: str
    reason: str


def _is_kept(info: DomainInfo) -> bool:
    return any(Path(f, KEPT_MARKER).exists() for f in info.files)


def reap(
    uri: str,
    runs_dir: Path,
    *,
    dry_run: bool = False,
    names: tuple[str, ...] = (),
    log: Callable[[str], None] = lambda _m: None,
    conn: Any = None,
) -> list[Reaped]:
    """Remove dead runs' domains and files. With ``names``, remove exactly those
    flightvm domains (kept ones included) provided their owner is dead."""
    import libvirt

    own_conn = conn is None
    conn = conn or connect(uri)
    done: list[Reaped] = []
    live_dirs: set[str] = set()
    try:
        for dom in conn.listAllDomains(0):
            name = dom.name()
            try:
                info = parse_metadata(name, dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue
            if info is None:
                continue  # not ours
            alive = owner_is_alive(info.pid, info.pid_start, info.host)
            wanted = name in names if names else not _is_kept(info)
            if alive or not wanted:
                live_dirs.update(info.files)
                if info.run_dir:
                    live_dirs.add(info.run_dir)
                continue
            done.append(Reaped("domain", name, f"owner pid {info.pid} is gone"))
            log(f"gc: {'would remove' if dry_run else 'removing'} domain {name} "
                f"(run {info.run_id}, owner pid {info.pid} gone)")
            if dry_run:
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                undefine(dom)
            except libvirt.libvirtError as exc:
                log(f"gc: could not remove {name}: {error_text(exc)}")
                continue
            for f in info.files:
                shutil.rmtree(f, ignore_errors=True)
    finally:
        if own_conn:
            conn.close()
    if runs_dir.is_dir() and not names:
        for run_dir in sorted(runs_dir.iterdir()):
            if not run_dir.is_dir() or str(run_dir) in live_dirs:
                continue
            if any(str(d).startswith(str(run_dir) + os.sep) for d in live_dirs):
                continue
            if run_dir_alive(run_dir):
                continue
            if any(p.name == KEPT_MARKER for p in run_dir.glob("vms/*/" + KEPT_MARKER)):
                continue
            done.append(Reaped("files", str(run_dir), "run owner is gone"))
            log(f"gc: {'would remove' if dry_run else 'removing'} {run_dir}")
            if not dry_run:
                shutil.rmtree(run_dir, ignore_errors=True)
    return done

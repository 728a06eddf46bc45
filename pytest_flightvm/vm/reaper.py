"""Remove what killed runs left behind: domains, overlays, seeds, run dirs.

Every flightvm domain carries metadata naming its run, owning pid (with the
pid's start time, so a recycled pid is not mistaken for the owner, and its pid
namespace), and host. A domain is reaped only when it is *ours* and its owner
is dead and it was not kept on purpose (``--flightvm-keep``; ``flightvm gc
--name`` removes those). Ours means all of:

- its name matches ``flightvm-<run-id>-...`` for the run its metadata names;
- its run dir is ``<runs dir>/<run-id>`` and every file it names lies under
  that run dir once resolved (a symlink that escapes disqualifies it);
- its owner ran on this host, in our pid namespace (a pid from another
  namespace means nothing here, so such a run is unknown and left alone).

Anything else, with or without our metadata, is never touched. Run dirs are
judged the same way by their ``run.json`` (pid, start time, pid namespace).
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

from ..hosts import POOL_PREFIX
from ..procs import pid_namespace, process_start, same_process
from ..statedir import read_file, replace_file
from .domain import RUN_ID_RE, DomainInfo, parse_metadata, vm_name_problem
from .libvirt_conn import connect, error_text, undefine
from .volumes import VOL_SUFFIXES, vm_volume_names

KEPT_MARKER = "KEPT"
RUN_FILE = "run.json"


def owner_is_alive(pid: int, pid_start: str, host: str, pid_ns: str) -> bool:
    """False only when the owner provably ran here, in our pid namespace, and is gone.
    Another host's or another namespace's run (or one that names no namespace)
    is not ours to judge: it counts as alive."""
    if host and host != socket.gethostname():
        return True
    return same_process(pid, pid_start, pid_ns) is not False


def write_run_file(run_dir: Path, pid: int | None = None) -> None:
    """Mark ``run_dir`` as owned by ``pid`` (the pytest controller; default: this process)."""
    pid = pid or os.getpid()
    data = {"pid": pid, "pid_start": process_start(pid) or "", "host": socket.gethostname(),
            "pid_ns": pid_namespace()}
    # One O_EXCL temp name per write: xdist workers may write the same run dir at once.
    replace_file(run_dir / RUN_FILE, json.dumps(data).encode())


def run_dir_alive(run_dir: Path) -> bool:
    try:
        data = json.loads(read_file(run_dir / RUN_FILE))
        return owner_is_alive(int(data["pid"]), str(data.get("pid_start", "")),
                              str(data.get("host", "")), str(data.get("pid_ns", "")))
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


def _under(path: str, root: Path) -> bool:
    """``path`` resolves to ``root`` or below it (symlinks followed, then compared)."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):
        return False
    return os.path.isabs(path) and resolved.is_relative_to(root)


def foreign_reason(info: DomainInfo, runs_dir: Path) -> str | None:
    """Why a domain carrying our metadata is still not ours to reap (None: it is ours)."""
    if not RUN_ID_RE.match(info.run_id):
        return f"run id {info.run_id!r} is not one of ours"
    if vm_name_problem(info.name) or not info.name.startswith(f"flightvm-{info.run_id}-"):
        return f"name {info.name!r} is not flightvm-{info.run_id}-..."
    runs = runs_dir.resolve()
    run_dir = runs / info.run_id
    if not info.run_dir or not _under(info.run_dir, runs) or \
            Path(info.run_dir).resolve() != run_dir:
        return f"its run dir {info.run_dir!r} is not {run_dir}"
    for f in info.files:
        if not _under(f, run_dir) or Path(f).resolve() == run_dir:
            return f"it names {f!r}, outside its run dir {run_dir}"
    return None


def _delete_volumes(conn: Any, info: DomainInfo, log: Callable[[str], None]) -> None:
    """A reaped domain's pool volumes on its host: only in a pool named ``flightvm*`` and
    only volumes named after the domain itself (``<name>-overlay.qcow2`` and so on)."""
    import libvirt

    for pool_name, vol_name in info.volumes:
        if not pool_name.startswith(POOL_PREFIX) or vol_name not in vm_volume_names(info.name):
            log(f"gc: leaving volume {pool_name}/{vol_name} alone: not one of {info.name}'s")
            continue
        try:
            conn.storagePoolLookupByName(pool_name).storageVolLookupByName(vol_name).delete(0)
        except libvirt.libvirtError:
            continue  # already gone


def sweep_volumes(conn: Any, pools: tuple[str, ...], runs_dir: Path, domains: set[str], *,
                  dry_run: bool = False, log: Callable[[str], None] = lambda _m: None
                  ) -> list[Reaped]:
    """Per-VM volumes with no domain (a run killed between making them and defining it):
    removed when named ``flightvm-<run-id>-...<suffix>`` and that run's dir is gone or dead."""
    import libvirt

    done: list[Reaped] = []
    for pool_name in pools:
        if not pool_name.startswith(POOL_PREFIX):
            continue
        try:
            pool = conn.storagePoolLookupByName(pool_name)
            if not pool.isActive():
                continue
            pool.refresh(0)
            vols = pool.listAllVolumes(0)
        except libvirt.libvirtError:
            continue
        for vol in vols:
            vname = vol.name()
            vm = next((vname[:-len(s)] for s in VOL_SUFFIXES if vname.endswith(s)), None)
            if vm is None or vm in domains or vm_name_problem(vm):
                continue
            run_id = vm.removeprefix("flightvm-")[:17]
            if not RUN_ID_RE.match(run_id):
                continue
            run_dir = runs_dir / run_id
            if run_dir.is_dir() and run_dir_alive(run_dir):
                continue
            done.append(Reaped("volume", f"{pool_name}/{vname}", "its run is gone"))
            log(f"gc: {'would remove' if dry_run else 'removing'} volume {pool_name}/{vname}")
            if not dry_run:
                try:
                    vol.delete(0)
                except libvirt.libvirtError:
                    pass
    return done


def reap(
    uri: str | tuple[str, ...],
    runs_dir: Path,
    *,
    dry_run: bool = False,
    names: tuple[str, ...] = (),
    log: Callable[[str], None] = lambda _m: None,
    conn: Any = None,
    pools: tuple[str, ...] = (),
) -> list[Reaped]:
    """Remove dead runs' domains and files on every host of ``uri`` (one URI or several:
    --flightvm-hosts). With ``names``, remove exactly those flightvm domains (kept ones
    included) provided their owner is dead. ``pools``: our pools to sweep for volumes
    left without a domain."""
    uris = (uri,) if isinstance(uri, str) else tuple(uri)
    done: list[Reaped] = []
    live_dirs: set[str] = set()
    for one in uris:
        done += _reap_domains(one, runs_dir, dry_run=dry_run, names=names, log=log,
                              conn=conn if len(uris) == 1 else None, live_dirs=live_dirs,
                              pools=pools)
    if runs_dir.is_dir() and not runs_dir.is_symlink() and not names:
        done += _sweep_run_dirs(runs_dir, live_dirs, dry_run=dry_run, log=log)
    return done


def _reap_domains(uri: str, runs_dir: Path, *, dry_run: bool, names: tuple[str, ...],
                  log: Callable[[str], None], conn: Any, live_dirs: set[str],
                  pools: tuple[str, ...]) -> list[Reaped]:
    import libvirt

    own_conn = conn is None
    conn = conn or connect(uri)
    done: list[Reaped] = []
    domains: set[str] = set()
    try:
        for dom in conn.listAllDomains(0):
            domains.add(dom.name())
            name = dom.name()
            try:
                info = parse_metadata(name, dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue
            if info is None:
                continue  # not ours
            why = foreign_reason(info, runs_dir)
            if why is not None:
                if names and name in names:
                    log(f"gc: leaving domain {name} alone: {why}")
                live_dirs.update(info.files)  # never sweep a dir it may use
                if info.run_dir:
                    live_dirs.add(info.run_dir)
                continue
            alive = owner_is_alive(info.pid, info.pid_start, info.host, info.pid_ns)
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
            run_dir = runs_dir.resolve() / info.run_id
            for f in info.files:
                if _under(f, run_dir):  # checked again right before it goes
                    shutil.rmtree(f, ignore_errors=True)
            _delete_volumes(conn, info, log)
        if pools and not names:
            done += sweep_volumes(conn, pools, runs_dir, domains, dry_run=dry_run, log=log)
    finally:
        if own_conn:
            conn.close()
    return done


def _sweep_run_dirs(runs_dir: Path, live_dirs: set[str], *, dry_run: bool,
                    log: Callable[[str], None]) -> list[Reaped]:
    done: list[Reaped] = []
    for run_dir in sorted(runs_dir.iterdir()):
        if run_dir.is_symlink() or not run_dir.is_dir() or str(run_dir) in live_dirs:
            continue
        try:  # only run dirs of ours, by name and by owner
            if not RUN_ID_RE.match(run_dir.name) or run_dir.stat().st_uid != os.geteuid():
                continue
        except OSError:
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

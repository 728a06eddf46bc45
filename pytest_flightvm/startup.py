"""What the plugin settles before any VM: the user's raw settings, their checks, the run's id.

Pytest-free and light (no VM layer, no registry code): the plugin calls it at configure
time in every run, VM or not, with pytest's ``getoption``/``getini`` as plain callables.
The option env vars are read only by :func:`settings`, which a VM fixture calls: several
are shared with other tools, and a run that boots no VM must not fail on them.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import OPTIONS, Settings, resolve, resolve_explicit
from .errors import ConfigError

RUN_ID_KEY = "flightvm_run_id"  # xdist workerinput: the controller's run id
OWNER_KEY = "flightvm_owner_pid"  # xdist workerinput: the controller's pid (owns the run dir)

Raw = tuple[dict[str, Any], dict[str, Any]]


def raw_settings(getoption: Callable[[str], Any], getini: Callable[[str], Any]) -> Raw:
    """What the user wrote, by option name: ``--flightvm-*`` flags, ``flightvm_*`` ini keys
    (an empty ini value is unset)."""
    cli = {o.name: getoption(f"flightvm_{o.name}") for o in OPTIONS if o.cli}
    ini: dict[str, Any] = {}
    for o in OPTIONS:
        if o.ini:
            value = getini(o.ini)
            ini[o.name] = value if value not in (None, "", []) else None
    return cli, ini


def check_explicit(raw: Raw, env: Mapping[str, str], rootdir: Path) -> None:
    """Check what the user wrote for flightvm (its flags, ini keys and the dirs they name)
    without reading the option env vars; ConfigError names what to fix."""
    check_inputs(resolve_explicit(*raw, env, rootdir=rootdir))


def settings(raw: Raw, env: Mapping[str, str], rootdir: Path) -> Settings:
    """The settings a VM uses (CLI > ini > env > default), their input dirs checked."""
    resolved = resolve(*raw, env, rootdir=rootdir)
    check_inputs(resolved)
    return resolved


def summary_settings(raw: Raw, env: Mapping[str, str], rootdir: Path) -> Settings | None:
    """The settings for the summary of a process that made no VM (only the cache dir and
    the metrics path are used, no input dir is read); None when they do not resolve: then
    no worker could have made a VM."""
    try:
        return resolve(*raw, env, rootdir=rootdir)
    except ConfigError:
        return None


def check_inputs(settings: Settings) -> None:
    """Validate input dirs up front: bad input stops the run before any VM starts."""
    if settings.vm_config is not None:
        from . import flightctl

        flightctl.load_vm_config(settings.vm_config)
    if settings.cloud_init_dir is not None:
        from .seed.render import check_cloud_init_dir

        check_cloud_init_dir(settings.cloud_init_dir)


def new_run_id() -> str:
    """Short, sortable, unique: ``YYMMDDHHMMSS-xxxx``."""
    return time.strftime("%y%m%d%H%M%S") + "-" + secrets.token_hex(2)


def run_identity(workerinput: Mapping[str, Any] | None) -> tuple[str, str]:
    """``(run id, worker)``: an xdist worker's from what the controller handed it, else a
    new id for ``main``. The run dir is made later, the first time a fixture needs it."""
    if workerinput is None:
        return new_run_id(), "main"
    return workerinput.get(RUN_ID_KEY) or new_run_id(), workerinput["workerid"]


def worker_input(run_id: str) -> dict[str, Any]:
    """What the controller hands every xdist worker: its run id and its own pid."""
    return {RUN_ID_KEY: run_id, OWNER_KEY: os.getpid()}


def run_owner(workerinput: Mapping[str, Any] | None) -> int | None:
    """The controller's pid, for a worker (it owns the run dir); None on the controller."""
    owner: int | None = (workerinput or {}).get(OWNER_KEY)
    return owner

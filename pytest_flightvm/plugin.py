"""The pytest face of flightvm: options, fixtures, marker, hooks, reports and summary.

Glue only: it turns pytest's objects into values for plain library code and a
FlightVMError into one line. Start-up settings and the run id come from :mod:`startup`,
the image from :mod:`cache.resolve` (the build hook through :func:`cache.build.hook_builder`),
the factory, pooled VMs, resets, the keep policy and report contents from :mod:`vm.session`,
the boot status from :mod:`progress`, the summary from :mod:`metrics`. This module and
``hooks.py`` are the only ones that import pytest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import pytest

from . import hooks, startup
from .config import OPTIONS, Settings, flag_declarations, ini_kind, option_help
from .errors import ConfigError, FlightVMError

if TYPE_CHECKING:  # the VM layer is imported the first time a fixture needs it
    from .profile import VMProfile
    from .progress import BootStatus
    from .vm.factory import RunContext, VMFactory
    from .vm.machine import Machine
    from .vm.session import VMSession

_settings_key = pytest.StashKey[Settings]()
_run_id_key = pytest.StashKey[tuple[str, str]]()  # (run id, worker), set at configure
_used_vms_key = pytest.StashKey[list["Machine"]]()
_profiles_key = pytest.StashKey[dict[Path, "VMProfile"]]()  # flightctl_vm's, by config dir
_console_out_key = pytest.StashKey[TextIO]()


# ----------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flightvm", "real VMs for E2E tests (pytest-flightvm)")
    for opt in OPTIONS:  # declared one by one from config.OPTIONS (help names env and default)
        for flag, kwargs in flag_declarations(opt):
            group.addoption(flag, **kwargs)
        if opt.ini:
            kind, default = ini_kind(opt)
            parser.addini(opt.ini, option_help(opt), type=kind, default=default)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hooks)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> Generator[None, None, None]:
    """Keep a copy of stderr from before pytest's capture takes fd 2 (this wrapper runs
    outside the capture plugin's): --flightvm-console streams guest consoles there, live,
    from a thread, while the tests' own output stays captured."""
    with contextlib.suppress(OSError):
        early_config.stash[_console_out_key] = os.fdopen(os.dup(2), "w", buffering=1,
                                                         errors="replace")
    yield


def _raw(config: pytest.Config) -> startup.Raw:
    return startup.raw_settings(config.getoption, config.getini)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: ignored where xdist is not installed
def pytest_configure_node(node: Any) -> None:
    """Hand the controller's run id (and pid) to every worker."""
    node.workerinput.update(startup.worker_input(node.config.stash[_run_id_key][0]))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "flightvm(memory=None, vcpus=None, user_data=None, reset=None, host_ports=None, "
        "agent='running'): per-test VM overrides (agent='stopped': flightctl_vm's agent "
        "stays stopped)",
    )
    try:  # what the user wrote for flightvm is checked now: bad input stops the run
        startup.check_explicit(_raw(config), os.environ, Path(config.rootpath))
    except ConfigError as exc:
        raise pytest.UsageError(f"flightvm: {exc}") from None
    config.stash[_run_id_key] = startup.run_identity(getattr(config, "workerinput", None))


# ----------------------------------------------------------------- helpers
@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A FlightVMError as a one-line fixture failure (no deep traceback)."""
    try:
        yield
    except FlightVMError as exc:
        try:
            pytest.fail(f"flightvm: {exc}" + (f"\n{exc.detail}" if exc.detail else ""), pytrace=False)
        except pytest.fail.Exception as failure:
            raise failure from None  # no "During handling of the above exception" chain


def _uncaptured(config: pytest.Config) -> contextlib.AbstractContextManager[Any]:
    capman = config.pluginmanager.getplugin("capturemanager")
    return capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()


def _progress(config: pytest.Config) -> Callable[[str], None]:
    from .progress import stderr_lines

    return stderr_lines(lambda: _uncaptured(config))


def _boot_status(config: pytest.Config, console: bool) -> BootStatus:
    from .progress import boot_status

    return boot_status(_progress(config), config.pluginmanager.getplugin("terminalreporter"),
                       controller=getattr(config, "workerinput", None) is None, console=console,
                       verbosity=config.getoption("verbose") or 0,
                       uncaptured=lambda: _uncaptured(config))


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def flightvm_settings(pytestconfig: pytest.Config) -> Settings:
    """The resolved flightvm settings (CLI > ini > env > default), resolved the first time
    a VM fixture needs them: environment variables (several are shared with other tools:
    ``VM_CONFIG_DIR``, ``CLOUD_INIT_DIR``, ``REGISTRY_CACHE``) are never read by a run that
    uses no VM. A bad value fails the test with one line."""
    with _one_line_errors():
        settings = startup.settings(_raw(pytestconfig), os.environ, Path(pytestconfig.rootpath))
    pytestconfig.stash[_settings_key] = settings  # for the summary
    return settings


@pytest.fixture(scope="session")
def flightvm_run(pytestconfig: pytest.Config, flightvm_settings: Settings) -> RunContext:
    """This run's id and directory (shared by all xdist workers of the run)."""
    from .vm.factory import RunContext

    owner = startup.run_owner(getattr(pytestconfig, "workerinput", None))
    with _one_line_errors():  # private (0700, ours, no planted link), in a cache dir of ours
        return RunContext.open(flightvm_settings.runs_dir, *pytestconfig.stash[_run_id_key], owner)


@pytest.fixture(scope="session")
def flightvm_image(pytestconfig: pytest.Config, flightvm_settings: Settings,
                   flightvm_run: RunContext) -> Any:
    """The resolved base image: path, digest, tags, source and seconds."""
    from .cache.build import hook_builder
    from .cache.resolve import resolve_image

    builder = hook_builder(pytestconfig.hook.pytest_flightvm_build_image, pytestconfig)
    with _one_line_errors():
        return resolve_image(flightvm_settings, builder, log=_progress(pytestconfig),
                             record=flightvm_run.run_dir / "resolves.jsonl", run=flightvm_run.run_id)


@pytest.fixture
def flightvm_user_data() -> dict[str, Any]:
    """Override to merge a dict into every VM's cloud-init user-data."""
    return {}


@pytest.fixture(scope="session")
def _flightvm_session(pytestconfig: pytest.Config, flightvm_settings: Settings,
                      flightvm_run: RunContext, flightvm_image: Any) -> Iterator[VMSession]:
    """The worker's factory and pooled VMs (``vm.session``); its metrics at the end."""
    from .metrics import write_worker_metrics
    from .vm.session import UserHooks, VMSession

    with _one_line_errors():
        session = VMSession.open(flightvm_settings, flightvm_image, flightvm_run,
                                 hooks=UserHooks(pytestconfig.hook, pytestconfig),
                                 notice=_progress(pytestconfig),
                                 console_out=pytestconfig.stash.get(_console_out_key, None),
                                 progress=_boot_status(pytestconfig, flightvm_settings.console))
    yield session
    try:
        session.close()
    finally:
        write_worker_metrics(flightvm_run, flightvm_image, session.factory, resets=session.resets)


@pytest.fixture(scope="session")
def _flightvm_core(_flightvm_session: VMSession) -> VMFactory:
    """The worker's VM factory."""
    return _flightvm_session.factory


@pytest.fixture(scope="session")
def flightvm_factory(_flightvm_session: VMSession) -> Any:
    """``create(**overrides) -> VM`` for extra VMs; all are destroyed at session end."""
    from .vm.session import ExtraVMs

    return ExtraVMs(_flightvm_session.factory, _flightvm_session.hooks.vm_ready,
                    errors=_one_line_errors)


def _pooled_vm(request: pytest.FixtureRequest, kind: str, user_data: dict[str, Any],
               profile: VMProfile | None = None) -> Iterator[Machine]:
    from .vm.session import junit_properties, merge_marks, pooled_request

    marks = merge_marks(mark.kwargs for mark in request.node.iter_markers("flightvm"))
    with _one_line_errors():  # a bad marker fails the test before any VM is asked for
        ask = pooled_request(kind, request.getfixturevalue("flightvm_settings"), marks,
                             user_data, profile)
    session: VMSession = request.getfixturevalue("_flightvm_session")
    with _one_line_errors():
        vm = session.acquire(ask, test=request.node.nodeid, record=lambda vm, made, seconds:
                             request.node.user_properties.extend(junit_properties(vm, made, seconds)))
    request.node.stash.setdefault(_used_vms_key, []).append(vm)
    yield vm
    rep = getattr(request.node, "_flightvm_rep_call", None)
    session.release(kind, vm, failed=bool(rep is not None and rep.failed))


@pytest.fixture
def flightvm(request: pytest.FixtureRequest, flightvm_user_data: dict[str, Any]) -> Iterator[Machine]:
    """A ready VM, reset to its pristine state before each test; one per worker."""
    yield from _pooled_vm(request, "flightvm", flightvm_user_data)


@pytest.fixture
def flightctl_vm(request: pytest.FixtureRequest, flightvm_settings: Settings,
                 flightvm_user_data: dict[str, Any]) -> Iterator[Machine]:
    """Like ``flightvm``, with the flightctl agent provisioned from the VM config dir."""
    if flightvm_settings.vm_config is None:
        raise pytest.UsageError("flightctl_vm needs a VM config dir: pass --flightvm-vm-config DIR "
                                "or set VM_CONFIG_DIR")
    from .vm.session import flightctl_profile

    try:
        profile = flightctl_profile(flightvm_settings.vm_config,
                                    request.config.stash.setdefault(_profiles_key, {}))
    except ConfigError as exc:
        raise pytest.UsageError(f"flightvm: {exc}") from None
    yield from _pooled_vm(request, "flightctl", flightvm_user_data, profile)


# ---------------------------------------------------------- reports, hooks
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    rep = yield
    if rep.when == "call":
        item._flightvm_rep_call = rep  # type: ignore[attr-defined]
    vms = item.stash.get(_used_vms_key, [])
    if rep.failed and vms:
        from .vm.session import failure_sections

        rep.sections.extend(failure_sections(vms))
    return rep


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if _run_id_key not in config.stash or getattr(config, "workerinput", None) is not None:
        return
    run_id, _ = config.stash[_run_id_key]
    # no fixture ran here (no VM, or the xdist controller): the cache dir and metrics path do
    settings = config.stash.get(_settings_key, None) or startup.summary_settings(
        _raw(config), os.environ, Path(config.rootpath))
    if settings is None or not (settings.runs_dir / run_id).exists():
        return  # no fixture made the run dir: no VM, nothing to say (and nothing imported)
    from .metrics import run_summary

    lines = run_summary(run_id, settings.runs_dir / run_id, settings.metrics, settings.artifacts)
    if lines:
        terminalreporter.section("flightvm")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    out = config.stash.get(_console_out_key, None)
    if out is not None:
        with contextlib.suppress(OSError):
            out.close()

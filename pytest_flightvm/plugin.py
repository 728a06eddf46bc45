"""The pytest face of flightvm: options, fixtures, marker, reports, summary.

Thin on purpose: it turns pytest's objects into values for plain library code and
errors into one line. Settings come from :mod:`config`, the image from
:mod:`cache.resolve` (the build hook as a :class:`cache.build.HookBuilder`), pooled
VMs, resets and the keep policy from :mod:`vm.session` over :mod:`vm.factory`, the
boot status line from :mod:`progress`, the summary's lines from :mod:`metrics`. This
module (and ``hooks.py``) are the only ones that import pytest.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import pytest

from . import hooks
from .config import (
    OPTIONS,
    Settings,
    flag_declarations,
    ini_kind,
    option_help,
    resolve,
    resolve_explicit,
)
from .errors import ConfigError, FlightVMError

if TYPE_CHECKING:  # the VM layer is imported the first time a fixture needs it
    from .profile import VMProfile
    from .progress import BootStatus
    from .vm.factory import RunContext, VMFactory
    from .vm.machine import Machine
    from .vm.session import VMSession

RUN_ID_KEY = "flightvm_run_id"
OWNER_KEY = "flightvm_owner_pid"
_settings_key = pytest.StashKey[Settings]()
_run_id_key = pytest.StashKey[tuple[str, str]]()  # (run id, worker), set at configure
_used_vms_key = pytest.StashKey[list["Machine"]]()
_session_key = pytest.StashKey["VMSession"]()
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


def _raw_settings(config: pytest.Config) -> tuple[dict[str, Any], dict[str, Any]]:
    cli = {o.name: config.getoption(f"flightvm_{o.name}") for o in OPTIONS if o.cli}
    ini: dict[str, Any] = {}
    for o in OPTIONS:
        if o.ini:
            value = config.getini(o.ini)
            ini[o.name] = value if value not in (None, "", []) else None
    return cli, ini


def _new_run_id() -> str:
    """Short, sortable, unique: ``YYMMDDHHMMSS-xxxx`` (as ``vm.factory.new_run_id``, without
    importing the VM layer at start-up)."""
    import secrets

    return time.strftime("%y%m%d%H%M%S") + "-" + secrets.token_hex(2)


class _XdistHooks:
    """Hand the controller's run id to every worker."""

    @staticmethod
    def pytest_configure_node(node: Any) -> None:
        node.workerinput[RUN_ID_KEY] = node.config.stash[_run_id_key][0]
        node.workerinput[OWNER_KEY] = os.getpid()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "flightvm(memory=None, vcpus=None, user_data=None, reset=None, host_ports=None, "
        "agent='running'): per-test VM overrides (agent='stopped': flightctl_vm's agent "
        "stays stopped)",
    )
    # What the user wrote for flightvm (its --flightvm-* flags and flightvm_* ini keys) is
    # checked now: bad input stops the run before any test. The environment is read only
    # when a VM fixture first needs the settings (see flightvm_settings).
    try:
        cli, ini = _raw_settings(config)
        _check_inputs(resolve_explicit(cli, ini, os.environ, rootdir=Path(config.rootpath)))
    except ConfigError as exc:
        raise pytest.UsageError(f"flightvm: {exc}") from None
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        run_id, worker = workerinput.get(RUN_ID_KEY) or _new_run_id(), workerinput["workerid"]
    else:
        run_id, worker = _new_run_id(), "main"
    # The run dir is created lazily, the first time a fixture needs it.
    config.stash[_run_id_key] = (run_id, worker)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "flightvm-xdist")


def _check_inputs(settings: Settings) -> None:
    """Validate input dirs up front: bad input stops the run before any VM starts."""
    if settings.vm_config is not None:
        from . import flightctl

        flightctl.load_vm_config(settings.vm_config)
    if settings.cloud_init_dir is not None:
        from .seed.render import check_cloud_init_dir

        check_cloud_init_dir(settings.cloud_init_dir)


def _is_controller(config: pytest.Config) -> bool:
    return getattr(config, "workerinput", None) is None


# ----------------------------------------------------------------- helpers
def _fail_setup(exc: FlightVMError) -> NoReturn:
    """Turn a FlightVMError into a one-line fixture failure (no deep traceback)."""
    msg = f"flightvm: {exc}"
    if exc.detail:
        msg += "\n" + exc.detail
    try:
        pytest.fail(msg, pytrace=False)
    except pytest.fail.Exception as failure:
        raise failure from None  # no "During handling of the above exception" chain


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except FlightVMError as exc:
        _fail_setup(exc)


def _uncaptured(config: pytest.Config) -> contextlib.AbstractContextManager[Any]:
    capman = config.pluginmanager.getplugin("capturemanager")
    return capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()


def _progress(config: pytest.Config) -> Any:
    def emit(line: str) -> None:
        with _uncaptured(config):
            sys.stderr.write(line.rstrip() + "\n")
            sys.stderr.flush()

    return emit


def _boot_status(config: pytest.Config, console: bool) -> BootStatus:
    """Live status lines on the controller's terminal (plain ones under xdist, without a
    tty, or with --flightvm-console streaming to the same terminal), none with -qq."""
    from .progress import BootStatus

    tr = config.pluginmanager.getplugin("terminalreporter")
    live = tr is not None and _is_controller(config) and tr.isatty and not console
    return BootStatus(_progress(config), terminal=tr if live else None,
                      quiet=(config.getoption("verbose") or 0) <= -2,
                      uncaptured=lambda: _uncaptured(config))


def _builder(config: pytest.Config) -> Any:
    from .cache import build

    impls = config.pluginmanager.hook.pytest_flightvm_build_image.get_hookimpls()
    if impls:
        return build.HookBuilder(
            [(impl.function, impl.plugin_name) for impl in impls],
            lambda output, key: config.hook.pytest_flightvm_build_image(config=config,
                                                                        output=output, key=key))
    # None: resolve picks --flightvm-build-cmd (run in the rootdir, as the CLI runs it) or
    # the built-in Debian builder
    return None


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def flightvm_settings(pytestconfig: pytest.Config) -> Settings:
    """The resolved flightvm settings (CLI > ini > env > default), resolved the first time
    a VM fixture needs them: environment variables (several are shared with other tools:
    ``VM_CONFIG_DIR``, ``CLOUD_INIT_DIR``, ``REGISTRY_CACHE``) are never read by a run that
    uses no VM. A bad value fails the test with one line."""
    with _one_line_errors():
        settings = resolve(*_raw_settings(pytestconfig), os.environ,
                           rootdir=Path(pytestconfig.rootpath))
        _check_inputs(settings)
    pytestconfig.stash[_settings_key] = settings  # for the summary
    return settings


@pytest.fixture(scope="session")
def flightvm_run(pytestconfig: pytest.Config, flightvm_settings: Settings) -> RunContext:
    """This run's id and directory (shared by all xdist workers of the run)."""
    from .vm.factory import RunContext

    run_id, worker = pytestconfig.stash[_run_id_key]
    owner = getattr(pytestconfig, "workerinput", {}).get(OWNER_KEY)  # the controller's pid
    with _one_line_errors():  # private (0700, ours, no planted link), in a cache dir of ours
        return RunContext.open(flightvm_settings.runs_dir, run_id, worker, owner)


@pytest.fixture(scope="session")
def flightvm_image(pytestconfig: pytest.Config, flightvm_settings: Settings,
                   flightvm_run: RunContext) -> Any:
    """The resolved base image: path, digest, tags, source and seconds."""
    from .cache.resolve import resolve_image

    with _one_line_errors():
        image = resolve_image(
            flightvm_settings, _builder(pytestconfig),
            record=flightvm_run.run_dir / "resolves.jsonl", log=_progress(pytestconfig),
            run=flightvm_run.run_id,
        )
    return image


@pytest.fixture
def flightvm_user_data() -> dict[str, Any]:
    """Override to merge a dict into every VM's cloud-init user-data."""
    return {}


@pytest.fixture(scope="session")
def _flightvm_core(pytestconfig: pytest.Config, flightvm_settings: Settings,
                   flightvm_run: RunContext, flightvm_image: Any) -> Iterator[VMFactory]:
    from .metrics import write_worker_metrics
    from .vm.factory import open_factory

    def user_data_hook(name: str, user_data: dict[str, Any]) -> None:
        pytestconfig.hook.pytest_flightvm_user_data(config=pytestconfig, vm_name=name,
                                                    user_data=user_data)

    with _one_line_errors():
        factory = open_factory(flightvm_settings, Path(flightvm_image.path), flightvm_run,
                               user_data_hook=user_data_hook, notice=_progress(pytestconfig),
                               console_out=pytestconfig.stash.get(_console_out_key, None),
                               progress=_boot_status(pytestconfig, flightvm_settings.console),
                               base_digest=getattr(flightvm_image, "digest", None) or None)
    yield factory
    factory.close()
    session = pytestconfig.stash.get(_session_key, None)
    write_worker_metrics(flightvm_run, flightvm_image, factory,
                         resets=session.resets if session is not None else [])


@pytest.fixture(scope="session")
def _flightvm_session(pytestconfig: pytest.Config, flightvm_settings: Settings,
                      flightvm_run: RunContext, _flightvm_core: VMFactory) -> Iterator[VMSession]:
    """The worker's pooled VMs (``vm.session``); its pools close before the factory does."""
    from .vm.session import STATE_HOOKS, VMSession

    hook = pytestconfig.hook
    session = pytestconfig.stash[_session_key] = VMSession(
        _flightvm_core, flightvm_settings, flightvm_run, notice=_progress(pytestconfig),
        vm_ready=lambda vm: hook.pytest_flightvm_vm_ready(vm=vm),
        before_snapshot=lambda vm: hook.pytest_flightvm_before_snapshot(vm=vm),
        after_revert=lambda vm: hook.pytest_flightvm_after_revert(vm=vm),
        implementations=lambda: {name: [impl.function for impl in getattr(hook, name).get_hookimpls()]
                                 for name in STATE_HOOKS})
    yield session
    session.close()


@pytest.fixture(scope="session")
def flightvm_factory(_flightvm_core: VMFactory, pytestconfig: pytest.Config) -> Any:
    """``create(**overrides) -> VM`` for extra VMs; all are destroyed at session end."""
    from .vm.session import ExtraVMs

    class Factory(ExtraVMs):
        def make(self, **request: Any) -> Machine:
            with _one_line_errors():
                return super().make(**request)

    return Factory(_flightvm_core, lambda vm: pytestconfig.hook.pytest_flightvm_vm_ready(vm=vm))


def _pooled_vm(request: pytest.FixtureRequest, kind: str, user_data: dict[str, Any],
               profile: VMProfile | None = None) -> Iterator[Machine]:
    from .vm.session import pooled_request

    settings: Settings = request.getfixturevalue("flightvm_settings")
    marks: dict[str, Any] = {}
    for mark in reversed(list(request.node.iter_markers("flightvm"))):
        marks.update(mark.kwargs)
    with _one_line_errors():  # a bad marker fails the test before any VM is asked for
        req, reset, ports = pooled_request(settings, marks, user_data, profile)
    session: VMSession = request.getfixturevalue("_flightvm_session")
    with _one_line_errors():
        vm = session.acquire(kind, req, reset, ports, marks=marks, profile=profile,
                             test=request.node.nodeid,
                             record=lambda vm, made, seconds: _record_vm(request, vm, made, seconds))
    request.node.stash.setdefault(_used_vms_key, []).append(vm)
    yield vm
    rep = getattr(request.node, "_flightvm_rep_call", None)
    session.release(kind, vm, failed=bool(rep is not None and rep.failed))


def _record_vm(request: pytest.FixtureRequest, vm: Machine, made: str, seconds: float) -> None:
    """The test's VM in its junit XML entry (user properties, as ``record_property`` adds):
    its name, how it was made for this test (booted, reset, reused, boot failed), the
    seconds that took, and its console log under --flightvm-artifacts."""
    props = request.node.user_properties
    props += [("flightvm_vm", vm.name), ("flightvm_vm_made", made),
              ("flightvm_vm_seconds", f"{seconds:.1f}")]
    artifact = getattr(vm, "artifact", None)
    if artifact is not None:
        props.append(("flightvm_console", str(artifact)))


@pytest.fixture
def flightvm(request: pytest.FixtureRequest, flightvm_user_data: dict[str, Any]) -> Iterator[Machine]:
    """A ready VM, reset to its pristine state before each test; one per worker."""
    yield from _pooled_vm(request, "flightvm", flightvm_user_data)


@pytest.fixture
def flightctl_vm(request: pytest.FixtureRequest, flightvm_settings: Settings,
                 flightvm_user_data: dict[str, Any]) -> Iterator[Machine]:
    """Like ``flightvm``, with the flightctl agent provisioned from the VM config dir."""
    from . import flightctl

    if flightvm_settings.vm_config is None:
        raise pytest.UsageError("flightctl_vm needs a VM config dir: pass --flightvm-vm-config DIR "
                                "or set VM_CONFIG_DIR")
    try:
        vm_config = flightctl.load_vm_config(flightvm_settings.vm_config)
    except ConfigError as exc:
        raise pytest.UsageError(f"flightvm: {exc}") from None
    # One profile per worker and config dir: the pool matches VMs by its ready checks' ids.
    profiles = request.config.stash.setdefault(_profiles_key, {})
    if vm_config.root not in profiles:
        profiles[vm_config.root] = flightctl.FlightctlProfile(vm_config)
    yield from _pooled_vm(request, "flightctl", flightvm_user_data, profiles[vm_config.root])


# ---------------------------------------------------------- reports, hooks
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    rep = yield
    if rep.when == "call":
        item._flightvm_rep_call = rep  # type: ignore[attr-defined]
    if rep.failed:
        for vm in item.stash.get(_used_vms_key, []):
            rep.sections.append((f"flightvm console {vm.name}", vm.console_tail(40)))
            extra = getattr(vm, "failure_detail", None)
            if callable(extra):
                text = extra()
                if text:
                    rep.sections.append((f"flightvm {vm.name}", text))
    return rep


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if _run_id_key not in config.stash or not _is_controller(config):
        return
    settings = config.stash.get(_settings_key, None)
    if settings is None:  # no fixture here (a run without VMs, or an xdist controller):
        try:  # only the cache dir and metrics path are needed, no input dir is read
            cli, ini = _raw_settings(config)
            settings = resolve(cli, ini, os.environ, rootdir=Path(config.rootpath))
        except ConfigError:
            return  # then no worker could have made a VM
    run_id, _ = config.stash[_run_id_key]
    if not (settings.runs_dir / run_id).exists():
        return  # no fixture made the run dir: no VM, nothing to say (and nothing imported)
    from .metrics import aggregate, kept_lines, publish, summary_lines
    from .vm.factory import RunContext

    run = RunContext(run_id, settings.runs_dir / run_id)
    summary = aggregate(run)
    if not summary["resolves"] and not summary["vms"]:
        return
    terminalreporter.section("flightvm")
    for line in summary_lines(summary) + kept_lines(run.run_dir):
        terminalreporter.write_line(line)
    for line in publish(summary, run.run_id, metrics=settings.metrics,
                        artifacts=settings.artifacts):
        terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    out = config.stash.get(_console_out_key, None)
    if out is not None:
        with contextlib.suppress(OSError):
            out.close()

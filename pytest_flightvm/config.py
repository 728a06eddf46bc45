"""Settings: every option resolved once, from CLI > ini > env > default.

The option table below is the single source of truth. ``plugin.py`` turns it
into pytest options and ini keys, ``cli.py`` into ``flightvm`` flags, and
:func:`resolve` turns raw values into one frozen :class:`Settings`.
Nothing here imports pytest.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import platform
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .hosts import Host, parse_hosts

ACCELS = ("auto", "kvm", "tcg")
KEEPS = ("never", "on-failure", "always")
# snapshot: back to the pristine point by the fastest mechanism for the guest (today that is
# a save/restore for every firmware, see vm/pristine.py); restore / internal force one of them.
RESETS = ("snapshot", "restore", "internal", "reboot", "none")
FIRMWARES = ("bios", "uefi", "uefi-secure", "uefi-secure-unenrolled")
COMPRESSIONS = ("auto", "none", "zstd")
STATE_CACHES = ("on", "off", "registry")
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Option:
    """One user-facing setting and all of its spellings."""

    name: str  # Settings field
    help: str
    cli: str | None = None  # --flightvm-... (pytest); the flightvm CLI uses ``cli_short``
    ini: str | None = None
    env: tuple[str, ...] = ()
    kind: str = "str"  # str | path | bool | int | float | choice | linelist | ports | hostname | hosts
    choices: tuple[str, ...] = ()
    cli_short: str | None = None  # flag name on the ``flightvm`` CLI
    metavar: str = ""  # the value's name in --help (choices are listed instead)
    default: str = ""  # the default, as --help states it


OPTIONS: tuple[Option, ...] = (
    Option("registry", "OCI repository for the base image cache, e.g. 127.0.0.1:5000/flightvm/base",
           "--flightvm-registry", "flightvm_registry", ("FLIGHTVM_REGISTRY",), cli_short="--registry",
           metavar="REF", default="none, local store only"),
    Option("image", "pin the base to a local qcow2 path or a full registry reference",
           "--flightvm-image", "flightvm_image", ("FLIGHTVM_IMAGE",), cli_short="--image",
           metavar="PATH|REF", default="none"),
    Option("cache_dir", "local store and run directory",
           "--flightvm-cache-dir", "flightvm_cache_dir", ("FLIGHTVM_CACHE_DIR",), kind="path",
           cli_short="--cache-dir",
           metavar="DIR", default="$XDG_CACHE_HOME/flightvm"),
    Option("build_cmd",
           "shell command that writes a qcow2 to $FLIGHTVM_OUTPUT",
           "--flightvm-build-cmd", "flightvm_build_cmd", ("FLIGHTVM_BUILD_CMD",), cli_short="--build-cmd",
           metavar="CMD", default="the built-in Debian builder"),
    Option("build_timeout", "seconds a build (--flightvm-build-cmd or the built-in builder) "
           "may run before it is stopped", "--flightvm-build-timeout", "flightvm_build_timeout",
           ("FLIGHTVM_BUILD_TIMEOUT",), kind="float", cli_short="--build-timeout",
           metavar="SECONDS", default="3600"),
    Option("build_inputs", "paths/globs hashed into the cache key", None, "flightvm_build_inputs",
           kind="linelist",
           default="none"),
    Option("tag_prefix", "registry tag prefix", "--flightvm-tag-prefix", "flightvm_tag_prefix",
           ("QCOW2_CACHE_TAG",), cli_short="--tag-prefix",
           metavar="PREFIX", default="base-qcow2"),
    Option("rebuild", "ignore caches and build the base", "--flightvm-rebuild", kind="bool",
           default="off"),
    Option("push", "push the base after a build", "--flightvm-push",
           "flightvm_push", ("REGISTRY_CACHE",), kind="bool",
           default="only when CI is true"),
    Option("offline", "never contact the registry", "--flightvm-offline", "flightvm_offline",
           ("FLIGHTVM_OFFLINE",), kind="bool", cli_short="--offline",
           default="off"),
    Option("plain_http", "talk plain HTTP to a non-loopback registry", "--flightvm-plain-http",
           "flightvm_plain_http", ("FLIGHTVM_PLAIN_HTTP",), kind="bool", cli_short="--plain-http",
           default="off; loopback registries are always plain HTTP"),
    Option("compress", "compress the pushed layer: auto (zstd except to loopback registries), none, zstd",
           "--flightvm-compress", "flightvm_compress",
           ("FLIGHTVM_COMPRESS",), kind="choice", choices=COMPRESSIONS, cli_short="--compress",
           default="auto"),
    Option("libvirt_uri", "libvirt connection URI", "--flightvm-libvirt-uri", "flightvm_libvirt_uri",
           ("LIBVIRT_DEFAULT_URI",), cli_short="--libvirt-uri",
           metavar="URI", default="qemu:///system as root, else qemu:///session"),
    Option("hosts", "libvirt hosts to spread VMs over: URI[#slots=N][&pool=NAME][&pool_dir=DIR],...",
           "--flightvm-hosts", "flightvm_hosts", ("FLIGHTVM_HOSTS",), kind="hosts",
           cli_short="--hosts",
           metavar="LIST", default="the one host of --flightvm-libvirt-uri"),
    Option("accel", "auto, kvm or tcg", "--flightvm-accel", "flightvm_accel", ("FLIGHTVM_ACCEL",),
           kind="choice", choices=ACCELS, cli_short="--accel",
           default="auto"),
    Option("vm_config", "flightctl VM config dir (config.yaml, certs/, rpms/, ca.pem, registry.conf)",
           "--flightvm-vm-config", "flightvm_vm_config", ("VM_CONFIG_DIR",), kind="path",
           metavar="DIR", default="none"),
    Option("cloud_init_dir",
           "a prepared NoCloud dir, merged with the run's key, a unique instance-id and payloads",
           "--flightvm-cloud-init-dir", None, ("CLOUD_INIT_DIR",), kind="path",
           metavar="DIR", default="none"),
    Option("ssh_user", "log in as this user the image already has (a baked login), "
           "with --flightvm-ssh-key or env FLIGHTVM_SSH_PASSWORD",
           "--flightvm-ssh-user", "flightvm_ssh_user",
           metavar="USER", default="none, the flightvm user cloud-init makes"),
    Option("ssh_key", "private key for the baked login (--flightvm-ssh-user)",
           "--flightvm-ssh-key", "flightvm_ssh_key", kind="path",
           metavar="FILE", default="none"),
    Option("keep", "keep VMs after the run: never, on-failure, always", "--flightvm-keep",
           "flightvm_keep", kind="choice", choices=KEEPS,
           default="never"),
    Option("console", "stream guest consoles live", "--flightvm-console", None,
           ("DEBUG_VM_CONSOLE",), kind="bool",
           default="off"),
    Option("memory", "guest memory in MiB", "--flightvm-memory", "flightvm_memory", kind="int",
           metavar="MIB", default="1024"),
    Option("vcpus", "guest vCPUs", "--flightvm-vcpus", "flightvm_vcpus", kind="int",
           metavar="N", default="2, 1 on a one-CPU host"),
    Option("boot_timeout", "seconds to wait for a ready guest",
           "--flightvm-boot-timeout", "flightvm_boot_timeout", kind="float",
           metavar="SECONDS", default="300, doubled under TCG"),
    Option("reset", "per-test reset: snapshot (fastest mechanism), restore (save/restore), "
           "internal (internal qcow2 snapshot, BIOS only), reboot or none",
           "--flightvm-reset", "flightvm_reset", ("FLIGHTVM_RESET",), kind="choice", choices=RESETS,
           default="snapshot"),
    Option("state_cache", "restore a pooled VM from a saved booted state (same base, seed, "
           "hardware) instead of booting it: on (local store), off, or registry (also pull "
           "states from --flightvm-registry, and push them where the base is pushed; QEMU "
           "then runs a stream from the registry: only a registry you trust to run code here)",
           "--flightvm-state-cache", "flightvm_state_cache", ("FLIGHTVM_STATE_CACHE",),
           kind="choice", choices=STATE_CACHES,
           default="on"),
    Option("firmware", "guest firmware: bios, uefi, uefi-secure (Secure Boot, Microsoft keys enrolled) "
           "or uefi-secure-unenrolled (Secure Boot-capable firmware with SMM, no keys: upstream "
           "flightctl's setup)",
           "--flightvm-firmware", "flightvm_firmware", ("FLIGHTVM_FIRMWARE",), kind="choice",
           choices=FIRMWARES,
           default="bios"),
    Option("tpm", "give each VM a TPM 2.0 (swtpm)", "--flightvm-tpm", "flightvm_tpm", ("FLIGHTVM_TPM",),
           kind="bool",
           default="off"),
    Option("cpu", "guest CPU model, e.g. Haswell-noTSX-IBRS", "--flightvm-cpu",
           "flightvm_cpu", ("FLIGHTVM_CPU",),
           metavar="MODEL", default="QEMU's"),
    Option("metrics", "write run metrics as JSON to this file", "--flightvm-metrics",
           "flightvm_metrics", ("FLIGHTVM_METRICS",), kind="path",
           metavar="FILE", default="none"),
    Option("artifacts", "keep each VM's console log and the run's metrics in this dir, "
           "for CI to upload",
           "--flightvm-artifacts", "flightvm_artifacts", ("FLIGHTVM_ARTIFACTS",), kind="path",
           metavar="DIR", default="none"),
    Option("host_ports", "a host port (on 127.0.0.1) the guest may reach at vm.host_address; "
           "repeat for more",
           "--flightvm-host-port", "flightvm_host_ports", kind="ports",
           metavar="PORT", default="none, the guest reaches no host port"),
    Option("host_alias", "a name for the host in the guest's /etc/hosts (-> vm.host_address)",
           "--flightvm-host-alias", "flightvm_host_alias", kind="hostname",
           metavar="NAME", default="none"),
    Option("guest_outbound", "open the guest's network: every 127.0.0.1 port of the host "
           "(at 10.0.2.2) and the outside world",
           "--flightvm-guest-outbound", "flightvm_guest_outbound", ("FLIGHTVM_GUEST_OUTBOUND",),
           kind="bool",
           default="off, closed"),
)

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


def option_help(opt: Option, *, cli: bool = False) -> str:
    """``--help`` text of an option: what it does, its env var(s) and its default.
    ``cli`` is the ``flightvm`` command (its own flag names), else pytest."""
    text = cli_terms(opt.help) if cli else opt.help
    env = ", ".join(opt.env)
    tail = "; ".join(x for x in (f"env {env}" if env else "",
                                 f"default: {opt.default}" if opt.default else "") if x)
    return f"{text} ({tail})" if tail else text


def flag_declarations(opt: Option) -> list[tuple[str, dict[str, Any]]]:
    """The pytest flags of ``opt`` with their argparse keywords (none without ``cli``).
    Every flag defaults to None, so "not given" falls through to ini, env and default."""
    if not opt.cli:
        return []
    common: dict[str, Any] = {"default": None, "dest": f"flightvm_{opt.name}",
                              "help": option_help(opt)}
    if opt.kind == "bool":
        flags = [(opt.cli, {**common, "action": "store_const", "const": True})]
        if opt.name == "push":
            flags.append(("--flightvm-no-push", {**common, "action": "store_const",
                                                 "const": False, "help": "never push after a build"}))
        return flags
    if opt.kind == "ports":  # repeatable
        return [(opt.cli, {**common, "action": "append", "metavar": opt.metavar})]
    # an explicit metavar: pytest would show the dest (FLIGHTVM_MEMORY), which reads like
    # an env var that does not exist
    return [(opt.cli, {**common, "action": "store", "choices": list(opt.choices) or None,
                       "metavar": opt.metavar or ("{" + ",".join(opt.choices) + "}")})]


def ini_kind(opt: Option) -> tuple[Literal["linelist", "string"], Any]:
    """The pytest ini type and default of ``opt`` (lists for line lists and ports)."""
    return ("linelist", []) if opt.kind in ("linelist", "ports") else ("string", None)


def cli_terms(text: str) -> str:
    """``text`` with the plugin's flags spelled as the ``flightvm`` command's
    (``--flightvm-offline`` -> ``--offline``) where the command has that flag."""
    if "--flightvm-" not in text:
        return text
    for opt in OPTIONS:
        if opt.cli and opt.cli_short:
            text = re.sub(rf"(?<![\w-]){re.escape(opt.cli)}(?![\w-])", opt.cli_short, text)
    return text


def _default_cache_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flightvm"


def _default_uri() -> str:
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def default_vcpus() -> int:
    """Two vCPUs where the host has two CPUs: under TCG each vCPU is its own host thread,
    and a second one cut a cold boot to ready from 71 s to 49 s here (85 s against 121 s
    with two VMs booting at once on two cores); the guest's boot is otherwise serialised
    behind cloud-init's Python start-up."""
    return max(1, min(2, os.cpu_count() or 1))


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


@dataclass(frozen=True)
class Settings:
    registry: str | None = None
    image: str | None = None
    cache_dir: Path = field(default_factory=lambda: _default_cache_dir(os.environ))
    build_cmd: str | None = None
    build_timeout: float = 3600.0
    build_inputs: tuple[str, ...] = ()
    tag_prefix: str = "base-qcow2"
    rebuild: bool = False
    push: bool = False
    offline: bool = False
    plain_http: bool = False
    compress: str = "auto"
    libvirt_uri: str = field(default_factory=_default_uri)
    hosts: tuple[Host, ...] = ()  # empty: the one host of libvirt_uri
    accel: str = "auto"
    vm_config: Path | None = None
    cloud_init_dir: Path | None = None
    keep: str = "never"
    console: bool = False
    memory: int = 1024
    vcpus: int = field(default_factory=default_vcpus)
    boot_timeout: float = 300.0
    reset: str = "snapshot"
    state_cache: str = "on"
    firmware: str = "bios"
    tpm: bool = False
    cpu: str | None = None
    metrics: Path | None = None
    artifacts: Path | None = None
    host_ports: tuple[int, ...] = ()
    host_alias: str | None = None
    guest_outbound: bool = False
    ssh_user: str | None = None
    ssh_key: Path | None = None
    # env FLIGHTVM_SSH_PASSWORD only: never on argv, never printed (repr=False)
    ssh_password: str | None = field(default=None, repr=False)
    rootdir: Path = field(default_factory=Path.cwd)
    arch: str = field(default_factory=host_arch)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def host_list(self) -> tuple[Host, ...]:
        """The hosts VMs go to: ``--flightvm-hosts``, else the local ``libvirt_uri``."""
        return self.hosts or (Host(self.libvirt_uri),)

    @property
    def store_dir(self) -> Path:
        return self.cache_dir / "store"

    @property
    def states_dir(self) -> Path:
        """The booted-state store (private: a state holds guest memory)."""
        return self.cache_dir / "states"

    @property
    def runs_dir(self) -> Path:
        return self.cache_dir / "runs"


def _parse_bool(raw: Any, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ConfigError(f"{where}: expected true or false, got {raw!r}")


_HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*$", re.IGNORECASE)


def parse_ports(raw: Any, where: str) -> tuple[int, ...]:
    """Host ports from a CLI list, an ini line list or a marker list: each 1-65535,
    given as a number; duplicates dropped, order kept."""
    if isinstance(raw, (str, int)):
        raw = str(raw).replace(",", " ").split()
    ports: list[int] = []
    try:
        items = list(raw)
    except TypeError:
        raise ConfigError(f"{where}: expected a list of port numbers, got {raw!r}") from None
    for item in items:
        for part in (str(item).replace(",", " ").split() if not isinstance(item, int) else [item]):
            if isinstance(part, bool):
                raise ConfigError(f"{where}: expected a port number (1-65535), got {part!r}")
            try:
                port = int(part)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected a port number (1-65535), got {part!r}") \
                    from None
            if not 1 <= port <= 65535:
                raise ConfigError(f"{where}: port {port} is out of range; use 1-65535")
            if port not in ports:
                ports.append(port)
    return tuple(ports)


def parse_hostname(raw: Any, where: str) -> str | None:
    """A host name for /etc/hosts: letters, digits, '-' and dots, at most 253 characters."""
    text = str(raw).strip()
    if not text:
        return None
    if len(text) > 253 or not _HOSTNAME_RE.match(text) or text.lower() == "localhost":
        raise ConfigError(f"{where}: {raw!r} is not a usable host name; use letters, digits, "
                          "'-' and dots, e.g. flightctl.host")
    return text


def _convert(opt: Option, raw: Any, where: str, rootdir: Path) -> Any:
    if opt.kind == "bool":
        return _parse_bool(raw, where)
    if opt.kind == "ports":
        return parse_ports(raw, where)
    if opt.kind == "hostname":
        return parse_hostname(raw, where)
    if opt.kind == "hosts":
        return parse_hosts(raw, where)
    if opt.kind == "linelist":
        if isinstance(raw, str):
            raw = raw.splitlines()
        return tuple(str(x).strip() for x in raw if str(x).strip())
    text = str(raw).strip()
    if opt.kind in ("int", "float"):
        try:
            value = int(text) if opt.kind == "int" else float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {raw!r}") from None
        if value <= 0:
            raise ConfigError(f"{where}: must be positive, got {raw!r}")
        return value
    if opt.kind == "choice":
        if text not in opt.choices:
            raise ConfigError(f"{where}: expected one of {', '.join(opt.choices)}, got {raw!r}")
        return text
    if opt.kind == "path":
        path = Path(os.path.expanduser(text))
        return path if path.is_absolute() else (rootdir / path)
    return text or None


def resolve(
    cli: Mapping[str, Any] | None = None,
    ini: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    rootdir: Path | None = None,
    needed: Collection[str] | None = None,
) -> Settings:
    """Resolve every option once. ``cli``/``ini`` map Option.name to raw values
    (None or missing means unset); ``env`` is the process environment. With ``needed``
    (Option names: what a ``flightvm`` verb uses), the env vars of the other options are
    not read: ``flightvm gc`` does not fail on a ``REGISTRY_CACHE`` meant for another tool."""
    cli = cli or {}
    ini = ini or {}
    env = os.environ if env is None else env
    rootdir = rootdir or Path.cwd()
    values: dict[str, Any] = {"rootdir": rootdir, "cache_dir": _default_cache_dir(env)}
    for opt in OPTIONS:
        candidates: list[tuple[Any, str]] = []
        if opt.cli:
            candidates.append((cli.get(opt.name), opt.cli))
        if opt.ini:
            candidates.append((ini.get(opt.name), f"ini {opt.ini}"))
        if needed is None or opt.name in needed:
            for var in opt.env:
                candidates.append((env.get(var), f"env {var}"))
        for raw, where in candidates:
            if raw is None or (opt.kind != "bool" and raw in ("", [], ())):
                continue
            if opt.kind == "bool" and raw == "" and where.startswith("env"):
                continue
            values[opt.name] = _convert(opt, raw, where, rootdir)
            break
    # push: explicit setting wins; otherwise push only when running in CI (CI is set by
    # every CI system, to values we do not own: anything but a true value means no).
    if "push" not in values:
        values["push"] = str(env.get("CI", "")).strip().lower() in TRUE
    # The password of a baked login comes from the environment only (never argv or ini).
    # Without a baked-login user it is ignored: a variable left in a CI environment must
    # not break runs (or `flightvm cache ...`) that log in the usual way.
    password = env.get("FLIGHTVM_SSH_PASSWORD")
    if password and values.get("ssh_user"):
        values["ssh_password"] = password
    settings = Settings(**values)
    validate_registry_ref(settings.registry, "registry")
    validate_login(settings)
    return settings


def resolve_explicit(
    cli: Mapping[str, Any] | None,
    ini: Mapping[str, Any] | None,
    env: Mapping[str, str],
    *,
    rootdir: Path | None = None,
) -> Settings:
    """Check what the user wrote for flightvm itself (flags, ini keys) without reading the
    option env vars: several are shared with other tools (``VM_CONFIG_DIR``,
    ``CLOUD_INIT_DIR``, ``REGISTRY_CACHE``, ``LIBVIRT_DEFAULT_URI``), so a run that boots no
    VM must not fail on them. The result is for validation only; :func:`resolve` makes the
    settings a VM uses. Raises ConfigError like :func:`resolve`."""
    quiet = {k: env[k] for k in ("XDG_CACHE_HOME", "FLIGHTVM_SSH_PASSWORD") if k in env}
    return resolve(cli, ini, quiet, rootdir=rootdir)


_LOGIN_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


def validate_login(settings: Settings) -> None:
    """A baked login is complete and sane, or a one-line ConfigError says what to fix."""
    user = settings.ssh_user
    if user is not None and not _LOGIN_USER_RE.match(user):
        raise ConfigError(f"--flightvm-ssh-user {user!r} is not a valid Linux user name")
    if user is None:
        if settings.ssh_key is not None:
            raise ConfigError("--flightvm-ssh-key needs --flightvm-ssh-user (the image's login)")
        return
    if settings.ssh_key is None and settings.ssh_password is None:
        raise ConfigError(f"--flightvm-ssh-user {user} needs a credential: --flightvm-ssh-key FILE "
                          "or the password in env FLIGHTVM_SSH_PASSWORD")
    if settings.ssh_password is not None and ("\n" in settings.ssh_password
                                              or "\0" in settings.ssh_password):
        raise ConfigError("FLIGHTVM_SSH_PASSWORD must be one line")
    if settings.ssh_key is not None:
        try:
            with open(settings.ssh_key, "rb") as fh:
                head = fh.read(64)
        except OSError as exc:
            raise ConfigError(f"--flightvm-ssh-key {settings.ssh_key} cannot be read "
                              f"({exc.strerror}); pass a private key file") from None
        if b"PRIVATE KEY" not in head:
            raise ConfigError(f"--flightvm-ssh-key {settings.ssh_key} is not a private key "
                              "(no PRIVATE KEY header); pass the private half, not .pub")


_REF_RE = re.compile(
    r"^(?P<host>[a-zA-Z0-9.-]+(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?)"
    r"/(?P<repo>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


def validate_registry_ref(ref: str | None, what: str) -> re.Match[str] | None:
    """Check a ``host[:port]/repo[:tag][@sha256:...]`` reference; one-line error if not."""
    if ref is None:
        return None
    match = _REF_RE.match(ref)
    if not match:
        raise ConfigError(
            f"{what} {ref!r} is not a registry reference; use HOST[:PORT]/REPO[:TAG], "
            "e.g. 127.0.0.1:5000/flightvm/base"
        )
    return match


def read_ini(directory: Path) -> tuple[dict[str, Any], Path]:
    """Read pytest's ini settings the way pytest finds them, for the ``flightvm`` CLI.

    Returns ``(values by Option.name, rootdir)``. Walks up from ``directory``.
    """
    wanted = {o.ini: o.name for o in OPTIONS if o.ini}
    for folder in (directory, *directory.parents):
        raw: Mapping[str, Any] | None = None
        pytest_ini = folder / "pytest.ini"
        pyproject = folder / "pyproject.toml"
        if pytest_ini.is_file():
            raw = _ini_section(pytest_ini, "pytest") or {}
        elif pyproject.is_file():
            data = tomllib.loads(pyproject.read_text())
            raw = data.get("tool", {}).get("pytest", {}).get("ini_options")
        for name, section in (("tox.ini", "pytest"), ("setup.cfg", "tool:pytest")):
            if raw is None and (folder / name).is_file():
                raw = _ini_section(folder / name, section)
        if raw is not None:
            return {wanted[k]: v for k, v in raw.items() if k in wanted}, folder
    return {}, directory


def _ini_section(path: Path, section: str) -> dict[str, str] | None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return dict(parser[section]) if parser.has_section(section) else None


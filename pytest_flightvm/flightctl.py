"""The flightctl profile: a VM config dir -> seed payload + in-guest setup script.

A VM config dir (``--flightvm-vm-config DIR`` / ``VM_CONFIG_DIR``) holds::

    config.yaml      required: the agent configuration
    certs/           optional: agent certificates and keys (every file must be readable)
    rpms/            optional: agent packages, *.rpm and/or *.deb
    ca.pem           optional: a CA added to the guest's trust store
    registry.conf    optional: a containers registries.conf.d snippet; with ca.pem, the CA
                     is also installed as /etc/containers/certs.d/<host:port>/ca.crt for
                     every [[registry]] location in it

:func:`flightctl_seed` turns it into a user-data fragment and the files to
put on the seed ISO under ``flightctl/``. In the guest, cloud-init writes the
setup script to :data:`GUEST_SCRIPT` (``write_files``) and runs it from
``runcmd``; the script mounts the seed by its ``cidata`` label, installs the
packages, places the config, certs, CA and registry config and starts
``flightctl-agent.service``, printing one status line per step to the
console. Putting it together::

    fragment, payload = flightctl_seed(load_vm_config(path))
    spec = SeedSpec(..., user_data=(fragment, *other_overrides))
    write_iso({**render(spec), **payload}, output)
"""

from __future__ import annotations

import io
import logging
import re
import shlex
import tarfile
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from .errors import BootError, ConfigError
from .seed.render import load_yaml_mapping

log = logging.getLogger("flightvm.flightctl")

#: Directory on the seed ISO that holds the payload.
PAYLOAD_DIR = "flightctl"
#: Where cloud-init writes the setup script in the guest.
GUEST_SCRIPT = "/var/lib/flightvm/flightctl-setup.sh"
#: The guest log the setup script writes.
GUEST_LOG = "/var/log/flightvm-setup.log"
#: The systemd unit the setup script enables and starts.
AGENT_UNIT = "flightctl-agent.service"
PACKAGE_SUFFIXES = (".rpm", ".deb")
#: Console line of a failed setup step (for readiness checks racing the boot).
CONSOLE_FAILED_RE = re.compile(r"flightvm-setup: step (\d+)/(\d+) (\S+): FAILED (.*)")
#: Console line when the whole setup succeeded.
CONSOLE_DONE = "flightvm-setup: done"


@dataclass(frozen=True)
class VMConfig:
    """A validated VM config dir. Paths are absolute; sequences are sorted by name."""

    root: Path
    config: Path
    settings: dict[str, Any] = field(hash=False, compare=False, repr=False)
    certs: tuple[Path, ...] = ()
    packages: tuple[Path, ...] = ()
    ca: Path | None = None
    registry_conf: Path | None = None
    #: ``host[:port]`` of every ``[[registry]]`` location in registry.conf: with ``ca.pem``,
    #: the CA is also installed as ``/etc/containers/certs.d/<host:port>/ca.crt``.
    registry_hosts: tuple[str, ...] = ()


def _expected(root: Path) -> str:
    return (
        f"{root / 'config.yaml'} (required), {root / 'certs'}/ , {root / 'rpms'}/*.rpm|*.deb, "
        f"{root / 'ca.pem'}, {root / 'registry.conf'} (optional)"
    )


def _check_readable(path: Path, what: str) -> Path:
    """``path`` must be a regular file we can open and read."""
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except IsADirectoryError:
        raise ConfigError(
            f"{what} {path} is a directory, not a file; remove it or move it"
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {path} cannot be read (a dangling symlink?); fix or remove it"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{what} {path} cannot be read: {exc.strerror}; fix its permissions"
        ) from None
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file")
    return path


def _optional_file(root: Path, name: str, what: str) -> Path | None:
    path = root / name
    if not path.exists() and not path.is_symlink():
        return None
    return _check_readable(path, what)


def load_vm_config(directory: Path) -> VMConfig:
    """Validate a VM config dir; every problem is a one-line :class:`ConfigError`."""
    root = Path(directory).absolute()
    if not root.is_dir():
        raise ConfigError(
            f"VM config dir {root} does not exist or is not a directory; expected {_expected(root)}"
        )
    config = root / "config.yaml"
    if not config.exists():
        raise ConfigError(f"VM config dir {root} has no config.yaml; expected {_expected(root)}")
    _check_readable(config, "agent config")
    settings = load_yaml_mapping(config, "agent config")

    certs: list[Path] = []
    certs_dir = root / "certs"
    if certs_dir.exists() or certs_dir.is_symlink():
        if not certs_dir.is_dir():
            raise ConfigError(f"{certs_dir} must be a directory of certificate files")
        for path in sorted(certs_dir.iterdir()):
            certs.append(_check_readable(path, "certificate"))

    packages: list[Path] = []
    rpms_dir = root / "rpms"
    if rpms_dir.exists() or rpms_dir.is_symlink():
        if not rpms_dir.is_dir():
            raise ConfigError(f"{rpms_dir} must be a directory of .rpm or .deb packages")
        for path in sorted(rpms_dir.iterdir()):
            if path.name.endswith(PACKAGE_SUFFIXES):
                packages.append(_check_readable(path, "package"))
            else:
                log.warning("ignoring %s: not an .rpm or .deb package", path)

    registry_conf = _optional_file(root, "registry.conf", "registry config")
    return VMConfig(
        registry_hosts=registry_hosts(registry_conf) if registry_conf is not None else (),
        root=root,
        config=config,
        settings=settings,
        certs=tuple(certs),
        packages=tuple(packages),
        ca=_optional_file(root, "ca.pem", "CA certificate"),
        registry_conf=registry_conf,
    )


_HOSTPORT_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                          r"(?::[0-9]{1,5})?$")


def registry_hosts(path: Path) -> tuple[str, ...]:
    """``host[:port]`` of each ``[[registry]]`` ``location`` in a registries.conf (v2, TOML)
    snippet, in order, without duplicates; the part after the first ``/`` (a namespace)
    is dropped, as ``certs.d`` is per host. A file that is not TOML gives ``()``: it is
    still installed as-is, only no ``certs.d`` entry is made from it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        log.warning("%s: not TOML (%s); no certs.d entry is made from it", path, exc)
        return ()
    out: list[str] = []
    entries = data.get("registry")
    for entry in entries if isinstance(entries, list) else []:
        location = entry.get("location") if isinstance(entry, dict) else None
        if not isinstance(location, str):
            continue
        host = location.split("/", 1)[0]
        if not _HOSTPORT_RE.match(host):
            raise ConfigError(f"{path}: registry location {location!r} does not start with "
                              "HOST[:PORT]; fix the location")
        if host not in out:
            out.append(host)
    return tuple(out)


def setup_script() -> str:
    """The in-guest setup script (package data ``seed/flightctl-setup.sh``)."""
    return (
        resources.files("pytest_flightvm.seed")
        .joinpath("flightctl-setup.sh")
        .read_text(encoding="utf-8")
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def flightctl_seed(vm_config: VMConfig) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The user-data fragment and the seed payload (``flightctl/...`` -> bytes).

    The fragment writes the setup script into the guest and runs it from
    ``runcmd``; the script then mounts the seed to read the payload. It does
    not wait for cloud-init (it runs inside it).
    """
    script = setup_script()
    prefix = PAYLOAD_DIR
    payload: dict[str, bytes] = {
        f"{prefix}/config.yaml": _read(vm_config.config),
        f"{prefix}/setup.sh": script.encode("utf-8"),
    }
    for cert in vm_config.certs:
        payload[f"{prefix}/certs/{cert.name}"] = _read(cert)
    for package in vm_config.packages:
        payload[f"{prefix}/rpms/{package.name}"] = _read(package)
    if vm_config.ca is not None:
        payload[f"{prefix}/ca.pem"] = _read(vm_config.ca)
    if vm_config.registry_conf is not None:
        payload[f"{prefix}/registry.conf"] = _read(vm_config.registry_conf)
    if vm_config.registry_hosts:
        payload[f"{prefix}/registry-hosts"] = "".join(
            h + "\n" for h in vm_config.registry_hosts).encode()
    fragment: dict[str, Any] = {
        "write_files": [
            {
                "path": GUEST_SCRIPT,
                "owner": "root:root",
                "permissions": "0700",
                "content": script,
            }
        ],
        "runcmd": [["bash", GUEST_SCRIPT]],
    }
    return fragment, dict(sorted(payload.items()))


class _Runs(Protocol):
    def run(self, cmd: str, *, check: bool = ..., timeout: float | None = ...,
            input: bytes | str | None = ...) -> Any: ...  # noqa: A002


def agent_ready(vm: _Runs) -> bool:
    """Readiness check for ``flightctl_vm``: the agent service is active.

    Raises BootError as soon as the setup script or the service has failed,
    instead of waiting for the deadline.
    """
    # sudo: without a D-Bus session, systemctl as a user cannot reach systemd.
    state = vm.run(f"sudo -n systemctl is-active {AGENT_UNIT}", check=False,
                   timeout=20).stdout.strip()
    if state == "active":
        return True
    log = vm.run(f"sudo -n cat {GUEST_LOG} 2>/dev/null", check=False, timeout=20).stdout
    failed = CONSOLE_FAILED_RE.search(log)
    if failed:
        raise BootError(f"flightctl setup failed at step {failed.group(1)}/{failed.group(2)} "
                        f"{failed.group(3)}: {failed.group(4).strip()}", detail=diagnose(vm))
    if state == "failed":
        raise BootError(f"{AGENT_UNIT} failed to start", detail=diagnose(vm))
    return False


def diagnose(vm: _Runs) -> str:
    """The setup log and the agent's journal tail, for failure reports."""
    parts = []
    for title, cmd in (
        ("setup log", f"sudo -n tail -n 20 {GUEST_LOG}"),
        (f"journal of {AGENT_UNIT}", f"sudo -n journalctl -u {AGENT_UNIT} -n 30 --no-pager"),
    ):
        res = vm.run(cmd, check=False, timeout=20)
        text = (res.stdout or res.stderr).strip()
        if text:
            parts.append(f"--- {title} ---\n{text}")
    return "\n".join(parts)


# ------------------------------------------------------ payload over SSH
#: Where the payload goes in a guest without cloud-init (private, gone at the next boot).
GUEST_PAYLOAD_DIR = "/run/flightvm/payload"


def payload_tar(payload: Mapping[str, bytes]) -> bytes:
    """The payload as an uncompressed tar: certs 0600, the setup script 0700, the rest 0644,
    directories 0700 (the guest unpacks it as root into a 0700 dir)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name, data in sorted(payload.items()):
            parts = name.split("/")
            for depth in range(1, len(parts)):
                d = "/".join(parts[:depth])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o700
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = (0o600 if f"/{PAYLOAD_DIR}/certs/" in f"/{name}"
                         else 0o700 if name.endswith("/setup.sh") else 0o644)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deliver_payload(vm: _Runs, payload: Mapping[str, bytes], *, timeout: float = 600) -> str:
    """Copy the payload into a guest over SSH and run the same setup script there that
    cloud-init runs from the seed; return its output. BootError names a failed step."""
    unpack = (f"umask 077; rm -rf {GUEST_PAYLOAD_DIR} && mkdir -p {GUEST_PAYLOAD_DIR} && "
              f"tar -x --no-same-owner -C {GUEST_PAYLOAD_DIR}")
    res = vm.run(f"sudo -n sh -c {shlex.quote(unpack)}", check=False, timeout=120,
                 input=payload_tar(payload))
    if res.returncode != 0:
        raise BootError(f"could not copy the flightctl payload into the guest over SSH "
                        f"(exit {res.returncode}): {(res.stderr.strip().splitlines() or [''])[-1]}")
    script = f"{GUEST_PAYLOAD_DIR}/{PAYLOAD_DIR}/setup.sh"
    res = vm.run(f"sudo -n bash {script} {GUEST_PAYLOAD_DIR}", check=False, timeout=timeout)
    failed = CONSOLE_FAILED_RE.search(res.stdout)
    if failed:
        raise BootError(f"flightctl setup failed at step {failed.group(1)}/{failed.group(2)} "
                        f"{failed.group(3)}: {failed.group(4).strip()}", detail=diagnose(vm))
    if res.returncode != 0 or CONSOLE_DONE not in res.stdout:
        raise BootError(f"flightctl setup over SSH exited {res.returncode} without finishing",
                        detail=(res.stdout + res.stderr)[-2000:])
    return str(res.stdout)


# ------------------------------------------------------------ reset order
#: The agent's state dir (the package makes it, 0755 root; everything in it is state).
STATE_DIR = "/var/lib/flightctl"
#: The CSR a starting agent writes; upstream removes a stale one after each revert.
AGENT_CSR = f"{STATE_DIR}/certs/agent.csr"
AGENT_STATES = ("running", "stopped")


def stop_agent(vm: _Runs) -> None:
    vm.run(f"sudo -n systemctl stop {AGENT_UNIT}", check=True, timeout=60)


def start_agent(vm: _Runs, *, attempts: int = 3) -> None:
    """Start the agent and wait until it is active (retrying a transient start failure)."""
    for _ in range(attempts):
        vm.run(f"sudo -n systemctl reset-failed {AGENT_UNIT}", check=False, timeout=30)
        vm.run(f"sudo -n systemctl start {AGENT_UNIT}", check=False, timeout=60)
        for _ in range(30):
            if vm.run(f"sudo -n systemctl is-active {AGENT_UNIT}", check=False,
                      timeout=20).stdout.strip() == "active":
                return
            time.sleep(1)
    raise BootError(f"{AGENT_UNIT} is not active after the reset", detail=diagnose(vm))


@dataclass(eq=False)
class FlightctlProfile:
    """``flightctl_vm``'s profile: seed payload, readiness, and upstream's reset order.

    - before the pristine state: stop the agent, clear ``/var/lib/flightctl`` (its
      contents; the dir stays), rotate the journal;
    - after each reset (the reset itself has set the clock and reseeded the guest's
      RNG, for every VM): remove ``agent.csr``; then, after the user's hook, start the
      agent unless the test's ``@pytest.mark.flightvm(agent="stopped")`` asks otherwise.

    On an image without cloud-init the readiness check first delivers the payload over
    SSH and runs the same setup script (:func:`deliver_payload`).
    """

    vm_config: VMConfig
    name: str = "flightctl"
    agent: str = "running"
    user_data: tuple[Mapping[str, Any], ...] = field(init=False)
    seed_payload: Mapping[str, bytes] = field(init=False)
    ready_checks: tuple[Callable[[Any], bool], ...] = field(init=False)
    _delivered: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        fragment, self.seed_payload = flightctl_seed(self.vm_config)
        self.user_data = (fragment,)
        self.ready_checks = (self.ready,)  # one bound method: the pool compares ids

    def configure(self, marks: Mapping[str, Any]) -> None:
        agent = marks.get("agent", "running")
        if agent not in AGENT_STATES:
            raise ConfigError(f"marker flightvm: agent={agent!r} is not one of "
                              f"{', '.join(repr(a) for a in AGENT_STATES)}")
        self.agent = str(agent)

    def ready(self, vm: Any) -> bool:
        if getattr(vm, "has_cloud_init", None) is False and vm.name not in self._delivered:
            self._delivered.add(vm.name)
            deliver_payload(vm, self.seed_payload)
        return agent_ready(vm)

    def before_snapshot(self, vm: _Runs) -> None:
        stop_agent(vm)
        clear = f"[ ! -d {STATE_DIR} ] || find {STATE_DIR} -mindepth 1 -delete"
        vm.run(f"sudo -n sh -c {shlex.quote(clear)}", check=True, timeout=60)
        vm.run("sudo -n journalctl --rotate", check=False, timeout=60)

    def after_revert(self, vm: _Runs) -> None:
        # the clock and the entropy reseed come first, for every VM (vm/resume.py)
        vm.run(f"sudo -n rm -f {AGENT_CSR}", check=True, timeout=30)

    def resume(self, vm: _Runs) -> None:
        if self.agent == "stopped":
            stop_agent(vm)
        else:
            start_agent(vm)

    def diagnose(self, vm: _Runs) -> str:
        return diagnose(vm)

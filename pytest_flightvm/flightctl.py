"""The flightctl profile: a VM config dir -> seed payload + in-guest setup script.

A VM config dir (``--flightvm-vm-config DIR`` / ``VM_CONFIG_DIR``) holds::

    config.yaml      required: the agent configuration
    certs/           optional: agent certificates and keys (every file must be readable)
    rpms/            optional: agent packages, *.rpm and/or *.deb
    ca.pem           optional: a CA added to the guest's trust store
    registry.conf    optional: a containers registries.conf.d snippet

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

import logging
import re
import time
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

    return VMConfig(
        root=root,
        config=config,
        settings=settings,
        certs=tuple(certs),
        packages=tuple(packages),
        ca=_optional_file(root, "ca.pem", "CA certificate"),
        registry_conf=_optional_file(root, "registry.conf", "registry config"),
    )


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
    def run(self, cmd: str, *, check: bool = ..., timeout: float | None = ...) -> Any: ...


def agent_ready(vm: _Runs) -> bool:
    """Readiness check for ``flightctl_vm``: the agent service is active.

    Raises BootError as soon as the setup script or the service has failed,
    instead of waiting for the deadline.
    """
    # sudo: without a D-Bus session, systemctl as a user cannot reach systemd.
    state = vm.run(f"sudo systemctl is-active {AGENT_UNIT}", check=False, timeout=20).stdout.strip()
    if state == "active":
        return True
    log = vm.run(f"sudo cat {GUEST_LOG} 2>/dev/null", check=False, timeout=20).stdout
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
        ("setup log", f"sudo tail -n 20 {GUEST_LOG}"),
        (f"journal of {AGENT_UNIT}", f"sudo journalctl -u {AGENT_UNIT} -n 30 --no-pager"),
    ):
        res = vm.run(cmd, check=False, timeout=20)
        text = (res.stdout or res.stderr).strip()
        if text:
            parts.append(f"--- {title} ---\n{text}")
    return "\n".join(parts)


def before_snapshot(vm: _Runs) -> None:
    """Stop the agent before the pristine snapshot, so a revert never resumes an
    agent mid-conversation with keys or state that no longer match (upstream
    flightctl hit exactly this)."""
    vm.run(f"sudo systemctl stop {AGENT_UNIT}", check=True, timeout=60)


def after_revert(vm: _Runs) -> None:
    """Start the agent again after a revert (or right after the snapshot)."""
    vm.run(f"sudo systemctl start {AGENT_UNIT}", check=True, timeout=60)
    for _ in range(30):
        if vm.run(f"sudo systemctl is-active {AGENT_UNIT}", check=False,
                  timeout=20).stdout.strip() == "active":
            return
        time.sleep(1)
    raise BootError(f"{AGENT_UNIT} is not active after the revert", detail=diagnose(vm))

"""The integration helper agent_pkg, checked without a VM.

The stand-in agent .deb and the VM config dir must be right before a slow
guest boot finds out: the package content, the PKI, and the whole
flightctl path up to the ISO (the setup script itself is run in
test_flightctl_setup.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pytest_flightvm.flightctl import flightctl_seed, load_vm_config
from pytest_flightvm.seed import read_iso, write_iso

HELPER = Path(__file__).resolve().parents[1] / "integration" / "agent_pkg.py"


@pytest.fixture(scope="module")
def agent_pkg() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flightvm_test_agent_pkg", HELPER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vm_config(agent_pkg: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict:
    facts: dict = agent_pkg.make_vm_config(tmp_path_factory.mktemp("vm-config"))
    return facts


def test_deb_contents(agent_pkg: ModuleType, vm_config: dict) -> None:
    deb = vm_config["deb"]
    assert subprocess.run(["dpkg-deb", "-f", deb, "Package"], capture_output=True, text=True,
                          check=True).stdout.strip() == "flightctl-agent"
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True,
                             check=True).stdout
    assert "-rwxr-xr-x root/root" in next(ln for ln in listing.splitlines()
                                          if ln.endswith("./usr/bin/flightctl-agent"))
    assert "./lib/systemd/system/flightctl-agent.service" in listing
    assert "Type=simple" in agent_pkg.UNIT_FILE
    assert "ExecStart=/usr/bin/flightctl-agent" in agent_pkg.UNIT_FILE


def test_agent_program_writes_status(agent_pkg: ModuleType, tmp_path: Path) -> None:
    """Run the agent program with its paths pointed at a temp dir (and no sleep)."""
    etc = tmp_path / "etc"
    (etc / "certs").mkdir(parents=True)
    (etc / "config.yaml").write_text("a: 1\n")
    (etc / "certs" / "client.crt").write_text("c")
    (etc / "certs" / "client.key").write_text("k")
    state = tmp_path / "state"
    script = (
        agent_pkg.AGENT_SCRIPT.replace("/etc/flightctl", str(etc))
        .replace("/var/lib/flightctl-agent", str(state))
        .replace("/var/lib/flightctl", str(tmp_path / "lib"))
        .replace("exec sleep infinity", "exit 0")
    )
    assert "/var/lib" not in script
    subprocess.run(["sh", "-c", script], check=True, capture_output=True, timeout=30)
    digest = hashlib.sha256((etc / "config.yaml").read_bytes()).hexdigest()
    identity = (tmp_path / "lib" / "identity").read_text()
    assert len(identity) == 32 and int(identity, 16) >= 0
    assert (state / "status").read_text().splitlines() == [
        f"config_sha256={digest}",
        "certs=client.crt client.key",
        f"identity={identity}",
    ]
    (tmp_path / "lib" / "certs" / "agent.csr").unlink()
    subprocess.run(["sh", "-c", script], check=True, capture_output=True, timeout=30)
    assert (tmp_path / "lib" / "identity").read_text() == identity  # kept across restarts
    assert (tmp_path / "lib" / "certs" / "agent.csr").read_text() == f"csr of {identity}\n"


def test_vm_config_dir_is_complete_and_valid(vm_config: dict) -> None:
    root = Path(vm_config["dir"])
    cfg = load_vm_config(root)
    assert [p.name for p in cfg.certs] == ["client.crt", "client.key"] == vm_config["cert_names"]
    assert [p.name for p in cfg.packages] == [Path(vm_config["deb"]).name]
    assert cfg.ca == root / "ca.pem" and cfg.registry_conf == root / "registry.conf"
    assert vm_config["config_sha256"] == hashlib.sha256(cfg.config.read_bytes()).hexdigest()
    # The client cert chains to the CA that the guest will trust.
    subprocess.run(["openssl", "verify", "-CAfile", str(root / "ca.pem"),
                    str(root / "certs" / "client.crt")], check=True, capture_output=True)


def test_vm_config_round_trips_through_the_seed_iso(vm_config: dict, tmp_path: Path) -> None:
    root = Path(vm_config["dir"])
    _fragment, payload = flightctl_seed(load_vm_config(root))
    back = read_iso(write_iso(payload, tmp_path / "seed.iso"))
    assert back["flightctl/config.yaml"].decode() == vm_config["config_text"]
    assert back[f"flightctl/rpms/{Path(vm_config['deb']).name}"] == Path(
        vm_config["deb"]
    ).read_bytes()
    assert back["flightctl/certs/client.key"] == (root / "certs" / "client.key").read_bytes()

"""The flightctl profile without a VM: reset order around the user's hooks (through the
plugin, with tests.fake_backend's pool and a stand-in guest), the agent marker, payload
over SSH, registry hosts."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_flightvm.errors import BootError, ConfigError
from pytest_flightvm.flightctl import (
    AGENT_CSR,
    FlightctlProfile,
    deliver_payload,
    load_vm_config,
    payload_tar,
    registry_hosts,
)
from tests.fake_backend import record, run_plugin_suite

CONFTEST = r'''
import types
import tests.fake_backend as fake
from tests.fake_backend import EVENTS


class AgentVM(fake.FakeVM):
    """Just enough guest: an agent unit that systemctl starts and stops, and whose state
    the pristine point keeps."""
    has_cloud_init = True

    def __init__(self, *args):
        super().__init__(*args)
        self.agent = "active"

    def run(self, cmd, check=True, timeout=None, input=None):
        if "systemctl stop" in cmd:
            self.agent = "inactive"
            EVENTS.append("profile:stop")
        elif "systemctl start" in cmd:
            self.agent = "active"
            EVENTS.append("profile:start")
        elif "find /var/lib/flightctl" in cmd:
            EVENTS.append("profile:clear-state")
        elif "journalctl --rotate" in cmd:
            EVENTS.append("profile:rotate-journal")
        elif "rm -f /var/lib/flightctl/certs/agent.csr" in cmd:
            EVENTS.append("profile:rm-csr")
        out = self.agent if "is-active" in cmd else ""
        return types.SimpleNamespace(returncode=0, stdout=out + "\n", stderr="", ok=True)

    def save_pristine(self):
        self.saved = self.agent

    def back_to_pristine(self):
        self.agent = self.saved


fake.VM_CLASS = AgentVM


def pytest_flightvm_before_snapshot(vm):
    EVENTS.append(f"user:before_snapshot:{vm.agent}")


def pytest_flightvm_after_revert(vm):
    EVENTS.append(f"user:after_revert:{vm.agent}")
'''

TESTS = '''
import pytest
from tests.fake_backend import EVENTS

def test_a(flightctl_vm):
    EVENTS.append(f"test_a:{flightctl_vm.agent}")

@pytest.mark.flightvm(agent="stopped")
def test_b(flightctl_vm):
    EVENTS.append(f"test_b:{flightctl_vm.agent}")

@pytest.mark.flightvm(agent="sleeping")
def test_c(flightctl_vm):
    EVENTS.append("test_c ran")
'''


def test_reset_order_around_the_user_hooks(pytester: pytest.Pytester, tmp_path: Path) -> None:
    vm_config = tmp_path / "vm-config"
    vm_config.mkdir()
    (vm_config / "config.yaml").write_text("spec-fetch-interval: 0m10s\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    cache = tmp_path / "cache"
    result = run_plugin_suite(pytester, cache, f"--flightvm-vm-config={vm_config}")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*flightvm: marker flightvm: agent='sleeping' is not one of "
                                 "'running', 'stopped'*"])
    assert "Traceback" not in result.stdout.str()
    reset = ["profile:rm-csr", "user:after_revert:inactive"]
    assert record(cache)["events"] == [
        "boot",
        "profile:stop", "profile:clear-state", "profile:rotate-journal",
        "user:before_snapshot:inactive",
        "pristine",
        *reset, "profile:start",
        "test_a:active",
        "revert", *reset, "profile:stop",  # agent="stopped": it stays stopped
        "test_b:inactive",
    ]


class Guest:
    """Records commands; answers the way a guest would."""

    def __init__(self, *, setup_out: str = "flightvm-setup: done\n", setup_rc: int = 0) -> None:
        self.cmds: list[tuple[str, bytes | None]] = []
        self.setup_out, self.setup_rc = setup_out, setup_rc
        self.name = "flightvm-guest-1"
        self.has_cloud_init = False

    def run(self, cmd: str, *, check: bool = True, timeout: float | None = None,
            input: bytes | str | None = None) -> Any:  # noqa: A002
        self.cmds.append((cmd, input if isinstance(input, bytes) else None))
        if "setup.sh" in cmd:
            return SimpleNamespace(returncode=self.setup_rc, stdout=self.setup_out, stderr="")
        out = "active\n" if "is-active" in cmd else ""
        return SimpleNamespace(returncode=0, stdout=out, stderr="")


def _vm_config(tmp_path: Path) -> Path:
    root = tmp_path / "vm-config"
    (root / "certs").mkdir(parents=True)
    (root / "config.yaml").write_text("a: 1\n")
    (root / "certs" / "client.key").write_text("KEY")
    (root / "ca.pem").write_text("CA")
    (root / "registry.conf").write_text(
        '[[registry]]\nlocation = "registry.e2e:5000/flightctl"\n'
        '[[registry]]\nlocation = "127.0.0.1:5000"\n[[registry]]\nlocation = "registry.e2e:5000"\n')
    return root


def test_payload_tar_modes(tmp_path: Path) -> None:
    profile = FlightctlProfile(load_vm_config(_vm_config(tmp_path)))
    with tarfile.open(fileobj=io.BytesIO(payload_tar(profile.seed_payload))) as tar:
        modes = {m.name: (m.mode, m.isdir()) for m in tar.getmembers()}
        assert tar.extractfile("flightctl/config.yaml").read() == b"a: 1\n"  # type: ignore[union-attr]
    assert modes["flightctl"] == (0o700, True)
    assert modes["flightctl/certs/client.key"] == (0o600, False)
    assert modes["flightctl/setup.sh"] == (0o700, False)
    assert modes["flightctl/config.yaml"] == (0o644, False)
    assert modes["flightctl/registry-hosts"] == (0o644, False)


def test_ready_delivers_once_on_an_image_without_cloud_init(tmp_path: Path) -> None:
    profile = FlightctlProfile(load_vm_config(_vm_config(tmp_path)))
    guest = Guest()
    assert profile.ready(guest) and profile.ready(guest)
    setups = [c for c, _ in guest.cmds if "setup.sh" in c]
    assert setups == ["sudo -n bash /run/flightvm/payload/flightctl/setup.sh /run/flightvm/payload"]
    unpack = [(c, data) for c, data in guest.cmds if "tar -x" in c]
    assert len(unpack) == 1 and unpack[0][1] == payload_tar(profile.seed_payload)
    guest2 = Guest()
    guest2.has_cloud_init = True  # cloud-init ran the script from the seed: nothing to deliver
    assert profile.ready(guest2)
    assert not any("setup.sh" in c or "tar -x" in c for c, _ in guest2.cmds)


def test_a_failed_setup_step_over_ssh_is_one_line(tmp_path: Path) -> None:
    guest = Guest(setup_out="flightvm-setup: step 2/7 packages: FAILED dpkg -i failed (exit 1)\n",
                  setup_rc=1)
    with pytest.raises(BootError, match=r"^flightctl setup failed at step 2/7 packages: "
                                        r"dpkg -i failed \(exit 1\)$"):
        deliver_payload(guest, {"flightctl/config.yaml": b"a: 1\n"})


def test_registry_hosts_from_registry_conf(tmp_path: Path) -> None:
    assert registry_hosts(_vm_config(tmp_path) / "registry.conf") == ("registry.e2e:5000",
                                                                      "127.0.0.1:5000")
    bad = tmp_path / "bad.conf"
    bad.write_text('[[registry]]\nlocation = "../../etc:5000"\n')
    with pytest.raises(ConfigError, match="does not start with HOST"):
        registry_hosts(bad)
    not_toml = tmp_path / "v1.conf"
    not_toml.write_text("[registries.search\nregistries = ['x']\n")
    assert registry_hosts(not_toml) == ()


def test_profile_steps_and_marker(tmp_path: Path) -> None:
    profile = FlightctlProfile(load_vm_config(_vm_config(tmp_path)))
    guest = Guest()
    profile.before_snapshot(guest)
    profile.after_revert(guest)
    cmds = [c for c, _ in guest.cmds]
    assert cmds[0] == "sudo -n systemctl stop flightctl-agent.service"
    assert "find /var/lib/flightctl -mindepth 1 -delete" in cmds[1]
    assert cmds[2] == "sudo -n journalctl --rotate"
    assert cmds[3:] == [f"sudo -n rm -f {AGENT_CSR}"]
    assert profile.ready_checks == profile.ready_checks  # the pool matches VMs by their ids
    assert id(profile.ready_checks[0]) == id(profile.ready_checks[0])
    with pytest.raises(ConfigError, match="agent='paused'"):
        profile.configure({"agent": "paused"})
    profile.configure({"agent": "stopped"})
    profile.resume(guest)
    assert guest.cmds[-1][0] == "sudo -n systemctl stop flightctl-agent.service"

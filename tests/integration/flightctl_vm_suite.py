"""The flightctl profile in a real guest: package, config, certs, CA, registry, service.

WHAT THIS MODULE EXPECTS
- The plugin's ``flightctl_vm`` fixture: a booted VM provisioned from the VM
  config dir, whose ``run(cmd, check=True, timeout=...)`` returns an object
  with ``returncode``, ``stdout`` and ``stderr``.
- The VM config dir is given to pytest with ``--flightvm-vm-config DIR`` (or
  the ini key ``flightvm_vm_config``, or ``VM_CONFIG_DIR``) and was built by
  ``tests/integration/agent_pkg.py``, either from the integration conftest
  (``make_vm_config(dir)`` before the plugin reads its settings) or by hand::

      python tests/integration/agent_pkg.py /tmp/vm-config
      pytest tests/integration/test_flightctl_vm.py --flightvm-vm-config /tmp/vm-config

- A Debian guest with apt/dpkg and ca-certificates (update-ca-certificates,
  openssl) and sudo, like the built-in Debian builder makes.

The expected values are read from that same dir (``agent_pkg.facts_for``),
so a dir made another way is checked against its own contents.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
from agent_pkg import facts_for


def _configured_dir(config: pytest.Config) -> Path | None:
    value: Any = None
    try:
        value = config.getoption("--flightvm-vm-config")
    except ValueError:
        value = None
    if not value:
        try:
            value = config.getini("flightvm_vm_config")
        except ValueError:
            value = None
    if not value:
        value = os.environ.get("VM_CONFIG_DIR")
    return Path(str(value)) if value else None


@pytest.fixture(scope="session")
def facts(pytestconfig: pytest.Config) -> dict[str, Any]:
    directory = _configured_dir(pytestconfig)
    if directory is None or not (directory / "config.yaml").is_file():
        pytest.fail(
            "no VM config dir: build one with `python tests/integration/agent_pkg.py DIR` "
            "and pass --flightvm-vm-config DIR (or set VM_CONFIG_DIR)"
        )
    return facts_for(directory)


def sudo(vm: Any, script: str, *, check: bool = True, timeout: float = 60) -> Any:
    return vm.run(f"sudo -n sh -c {shlex.quote(script)}", check=check, timeout=timeout)


def test_setup_script_reported_every_step(flightctl_vm: Any) -> None:
    log = sudo(flightctl_vm, "cat /var/log/flightvm-setup.log").stdout
    for n, name in enumerate(
        ("mount-seed", "packages", "config", "certs", "ca-trust", "registry", "agent"), start=1
    ):
        assert f"flightvm-setup: step {n}/7 {name}: ok" in log, log
    assert "flightvm-setup: done" in log


def test_agent_package_installed(flightctl_vm: Any, facts: dict[str, Any]) -> None:
    result = flightctl_vm.run(f"dpkg -s {facts['package']}")
    assert "Status: install ok installed" in result.stdout


def test_config_content_and_mode(flightctl_vm: Any, facts: dict[str, Any]) -> None:
    assert sudo(flightctl_vm, "cat /etc/flightctl/config.yaml").stdout == facts["config_text"]
    mode = sudo(flightctl_vm, "stat -c '%a %U' /etc/flightctl/config.yaml").stdout.split()
    assert mode == ["644", "root"]


def test_certs_are_private(flightctl_vm: Any, facts: dict[str, Any]) -> None:
    out = sudo(flightctl_vm, "cd /etc/flightctl/certs && stat -c '%n %a %U' *").stdout
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    assert rows == [[name, "600", "root"] for name in facts["cert_names"]]


def test_client_cert_verifies_against_system_trust(flightctl_vm: Any) -> None:
    result = sudo(
        flightctl_vm,
        "openssl verify -CAfile /etc/ssl/certs/ca-certificates.crt "
        "/etc/flightctl/certs/client.crt",
    )
    assert result.stdout.strip().endswith(": OK"), result.stdout + result.stderr


def test_registry_conf_installed(flightctl_vm: Any, facts: dict[str, Any]) -> None:
    out = sudo(flightctl_vm, f"cat {facts['registry_conf_path']}").stdout
    assert out == facts["registry_conf"]


def test_agent_service_active_and_saw_the_config(
    flightctl_vm: Any, facts: dict[str, Any]
) -> None:
    state = flightctl_vm.run(f"sudo systemctl is-active {facts['unit']}", check=False)
    assert state.stdout.strip() == "active", state.stdout + state.stderr
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        result = sudo(flightctl_vm, f"cat {facts['status_file']}", check=False)
        status = result.stdout
        if result.returncode == 0 and "config_sha256=" in status:
            break
        time.sleep(2)
    assert f"config_sha256={facts['config_sha256']}" in status.splitlines(), status
    assert f"certs={' '.join(facts['cert_names'])}" in status.splitlines(), status


def test_login_and_payload_path(flightctl_vm: Any) -> None:
    """FLIGHTVM_TEST_EXPECT=login: the image's own user, no cloud-init, payload over SSH;
    otherwise the run's user made by cloud-init, payload from the seed ISO."""
    who = flightctl_vm.run("id -un").stdout.strip()
    log = sudo(flightctl_vm, "cat /var/log/flightvm-setup.log").stdout
    has_cloud_init = flightctl_vm.run("command -v cloud-init", check=False).returncode == 0
    if os.environ.get("FLIGHTVM_TEST_EXPECT") == "login":
        assert (who, has_cloud_init) == ("user", False)
        assert "step 1/7 mount-seed: ok (using /run/flightvm/payload)" in log, log
    else:
        assert (who, has_cloud_init) == ("flightvm", True)
        assert "step 1/7 mount-seed: ok (/dev/" in log, log


def test_run_sends_input(flightctl_vm: Any) -> None:
    data = bytes(range(256)) * 64
    out = flightctl_vm.run("sha256sum", input=data).stdout.split()[0]
    assert out == hashlib.sha256(data).hexdigest()
    assert flightctl_vm.run("cat", input="héllo\n").stdout == "héllo\n"


# The reset order, across tests (they run in file order on one VM): what one test leaves
# in /var/lib/flightctl is gone in the next, and a marker-stopped agent stays stopped.
_seen: dict[str, str] = {}
STATE = "/var/lib/flightctl"


def _identity(vm: Any) -> str:
    """The agent's identity, made by the agent when it started after this test's reset."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        res = sudo(vm, f"cat {STATE}/identity", check=False)
        if res.returncode == 0 and res.stdout.strip():
            return str(res.stdout.strip())
        time.sleep(1)
    raise AssertionError(f"the agent wrote no {STATE}/identity in 60 s")


def test_reset_1_agent_leaves_state(flightctl_vm: Any) -> None:
    _seen["identity"] = _identity(flightctl_vm)
    sudo(flightctl_vm, f"touch {STATE}/left-by-test-1")
    assert sudo(flightctl_vm, f"test -s {STATE}/certs/agent.csr", check=False).returncode == 0


@pytest.mark.flightvm(agent="stopped")
def test_reset_2_stopped_agent_finds_no_state(flightctl_vm: Any, facts: dict[str, Any]) -> None:
    assert "identity" in _seen, "test_reset_1 must run first"
    assert sudo(flightctl_vm, f"ls -A {STATE}").stdout.split() == []  # no identity, no agent.csr
    time.sleep(5)
    state = flightctl_vm.run(f"sudo -n systemctl is-active {facts['unit']}", check=False)
    assert state.stdout.strip() == "inactive"
    assert sudo(flightctl_vm, f"test -e {STATE}/certs/agent.csr", check=False).returncode == 1


def test_reset_3_agent_starts_fresh(flightctl_vm: Any, facts: dict[str, Any]) -> None:
    state = flightctl_vm.run(f"sudo -n systemctl is-active {facts['unit']}", check=False)
    assert state.stdout.strip() == "active"
    identity = _identity(flightctl_vm)
    assert identity != _seen["identity"]
    assert sudo(flightctl_vm, f"test -e {STATE}/left-by-test-1", check=False).returncode == 1


def test_a_wrong_credential_is_refused_at_once(flightctl_vm: Any, tmp_path: Path) -> None:
    """What flightvm's fast failure relies on, from the real sshd: a wrong password
    (through askpass) or an unknown key ends ssh at once with 255 and "Permission denied"."""
    from pytest_flightvm.vm.ssh import Login, SSHClient, generate_keypair, write_askpass

    key, _ = generate_keypair(tmp_path / "other")
    if os.environ.get("FLIGHTVM_TEST_EXPECT") == "login":
        login = Login("user", key, password="not-the-password",
                      askpass=write_askpass(tmp_path / "askpass"), baked=True)
    else:
        login = Login("flightvm", key, baked=True)
    client = SSHClient(flightctl_vm.ssh_port, key, login.user, login=login)
    start = time.monotonic()
    try:
        res = client.run("true", check=False, timeout=60)
    finally:
        client.cleanup()
    assert res.returncode == 255 and "Permission denied" in res.stderr, res
    assert time.monotonic() - start < 30

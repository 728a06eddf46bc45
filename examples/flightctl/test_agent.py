"""Example flightctl E2E tests on ``flightctl_vm`` (see conftest.py for the set-up)."""

import pytest


def test_agent_is_running(flightctl_vm):
    state = flightctl_vm.run("sudo -n systemctl is-active flightctl-agent", check=False)
    assert state.stdout.strip() == "active"


@pytest.mark.flightvm(agent="stopped")
def test_with_the_agent_stopped(flightctl_vm):
    # e.g. change the agent's config before it first starts, then start it yourself
    flightctl_vm.run("sudo -n tee -a /etc/flightctl/config.yaml >/dev/null",
                     input="log-level: debug\n")
    flightctl_vm.run("sudo -n systemctl start flightctl-agent")


def test_enrollment_request(enrolled_device):
    csr = enrolled_device.run("sudo -n cat /var/lib/flightctl/certs/agent.csr").stdout
    assert "CERTIFICATE REQUEST" in csr

"""How a flightctl E2E suite plugs into pytest-flightvm (an example; `make demo` skips it).

Copy this directory, link a flightctl checkout in as ``flightctl-src`` and run,
from it::

    ln -s ~/src/flightctl flightctl-src
    FLIGHTVM_SSH_PASSWORD=user \
        pytest --flightvm-registry=quay.io/yourorg/flightctl-e2e-qcow2 \
               --flightvm-vm-config=vm-config

What each piece does:

- ``pytest.ini`` sets ``flightvm_build_cmd`` to ``build-image.sh``, which calls
  flightctl's own image build (``make bin/output/qcow2/disk.qcow2``: bootc image
  builder, CentOS Stream, the agent baked in) and copies the qcow2 to
  ``$FLIGHTVM_OUTPUT``. The files listed in ``flightvm_build_inputs`` are hashed
  into the cache key: change a Containerfile and the next run builds (and, with
  ``--flightvm-push`` or ``CI=true``, pushes) a new image; otherwise every run and
  every xdist worker reuses the stored or pulled one.
- The image has no cloud-init and a baked ``user``/``user`` login, so
  ``flightvm_ssh_user = user`` and the password comes from ``FLIGHTVM_SSH_PASSWORD``
  (env only). Readiness is then "SSH answers and systemd has settled".
- The payload dir (``--flightvm-vm-config DIR`` or ``VM_CONFIG_DIR``) holds what
  upstream's ``inject_agent_files_into_qcow.sh`` writes into the image:
  ``config.yaml``, ``certs/``, ``ca.pem`` (the E2E registry CA) and
  ``registry.conf`` (its ``[[registry]]`` location decides
  ``/etc/containers/certs.d/<host:port>/ca.crt``). ``flightctl_vm`` copies it in
  over SSH after boot instead of mounting the qcow2 on the host with qemu-nbd.
- ``flightctl_vm`` resets the way upstream's ``vm_pool.go`` and ``harness.go`` do:
  agent stopped, ``/var/lib/flightctl`` cleared and the journal rotated before
  the pristine point; after each reset the clock is set, entropy reseeded,
  ``agent.csr`` removed and the agent started, unless the test says
  ``@pytest.mark.flightvm(agent="stopped")``.
"""

from __future__ import annotations

import pytest


def pytest_flightvm_after_revert(vm):
    # Runs after every reset, while the agent is still stopped: the place for a
    # per-test fix-up the agent must see when it starts (e.g. an /etc/hosts entry).
    vm.run("sudo -n mkdir -p /etc/flightctl/hooks.d", check=False)


@pytest.fixture
def enrolled_device(flightctl_vm):
    """The VM with its agent running; a real suite would approve the enrollment here."""
    flightctl_vm.wait_for("sudo -n test -s /var/lib/flightctl/certs/agent.csr", timeout=120)
    return flightctl_vm

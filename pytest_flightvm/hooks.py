"""Hook specifications of pytest-flightvm (registered by ``plugin.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.hookspec(firstresult=True)
def pytest_flightvm_build_image(config: pytest.Config, output: Path, key: str) -> Any:
    """Build the base qcow2 at ``output`` (cache key ``key``) and return True.

    Implement it in a conftest to replace the built-in Debian builder. The
    implementing function's source is hashed into the cache key.
    """


def pytest_flightvm_user_data(config: pytest.Config, vm_name: str, user_data: dict) -> None:
    """Edit ``user_data`` (a dict merged last over the defaults, the
    ``flightvm_user_data`` fixture and the marker) before it is rendered."""


def pytest_flightvm_vm_ready(vm: Any) -> None:
    """Called once a VM is ready, before any test uses it."""


def pytest_flightvm_before_snapshot(vm: Any) -> None:
    """Prepare a freshly booted VM before its pristine snapshot is taken.

    Runs after ``pytest_flightvm_vm_ready`` and after the profile's own step (for
    ``flightctl_vm``: the agent stopped, ``/var/lib/flightctl`` cleared, the journal
    rotated), so the agent is stopped while this runs."""


def pytest_flightvm_after_revert(vm: Any) -> None:
    """Refresh a VM after each reset to its pristine state (and once right after the
    snapshot is taken).

    Runs after the clock is set, the guest's RNG reseeded and the profile's cleanup
    (for ``flightctl_vm``: ``agent.csr`` removed) and before the profile resumes (the
    agent is started unless the test asked ``agent="stopped"``): the agent is
    stopped while this runs."""

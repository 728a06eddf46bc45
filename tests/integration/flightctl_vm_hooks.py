"""conftest for ``flightctl_vm_suite.py`` (copied in as conftest.py): the user's reset hooks
record the agent's state at the moment they run, one line each, into the file named by
FLIGHTVM_TEST_HOOK_LOG, for the outer test to check."""

from __future__ import annotations

import os
from typing import Any

UNIT = "flightctl-agent.service"


def _record(where: str, vm: Any) -> None:
    state = vm.run(f"sudo -n systemctl is-active {UNIT}", check=False).stdout.strip()
    with open(os.environ["FLIGHTVM_TEST_HOOK_LOG"], "a") as fh:
        fh.write(f"{where} {state}\n")


def pytest_flightvm_before_snapshot(vm: Any) -> None:
    _record("before_snapshot", vm)


def pytest_flightvm_after_revert(vm: Any) -> None:
    _record("after_revert", vm)

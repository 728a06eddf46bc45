"""Example suite: every VM gets a per-run marker file, written after each reset.

The run id changes every run, so it stays out of the cloud-init user-data: the user-data
is part of the booted-state key, and a per-run value there would make every run boot
instead of restoring the saved state (README, "Booted-state cache"). The hooks below
write it instead, so every test finds this run's id.
"""

import pytest

MARKER = "/etc/flightvm-example/run-id"
_this_run = {}


@pytest.fixture(scope="session", autouse=True)
def _remember_the_run_id(flightvm_run):
    # An autouse session fixture is set up before the worker's pooled VM, so the hooks
    # below have the id. The run id is shared by all xdist workers of one pytest run.
    _this_run["id"] = flightvm_run.run_id


def _write_marker(vm):
    vm.run(f"sudo -n mkdir -p {MARKER.rsplit('/', 1)[0]} && sudo -n tee {MARKER} >/dev/null",
           input=_this_run["id"] + "\n")


def pytest_flightvm_after_revert(vm):
    # Once a pooled VM's pristine point is made or restored, then after every reset.
    _write_marker(vm)


def pytest_flightvm_vm_ready(vm):
    # Each boot, for --flightvm-reset reboot and none (they make no pristine point, so no
    # after_revert runs). A restored VM skips it: the after_revert above writes this run's id.
    _write_marker(vm)


# examples/flightctl is a separate suite (its own pytest.ini, image and payload): run it
# from inside that dir; `make demo` (pytest examples) leaves it out.
collect_ignore = ["flightctl"]

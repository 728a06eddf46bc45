"""Example suite: every VM gets a per-run marker file, written after each reset.

The run id changes every run, so it stays out of the cloud-init user-data: the user-data
is part of the booted-state key, and a per-run value there would make every run boot
instead of restoring the saved state (README, "Booted-state cache"). The
``pytest_flightvm_after_revert`` hook writes it instead: it runs once a pooled VM's
pristine point is made or restored, and after every reset, so every test finds it.
"""

import pytest

MARKER = "/etc/flightvm-example/run-id"
_this_run = {}


@pytest.fixture(scope="session", autouse=True)
def _remember_the_run_id(flightvm_run):
    # An autouse session fixture is set up before the worker's pooled VM, so the hook
    # below has the id. The run id is shared by all xdist workers of one pytest run.
    _this_run["id"] = flightvm_run.run_id


def pytest_flightvm_after_revert(vm):
    vm.run(f"sudo -n mkdir -p {MARKER.rsplit('/', 1)[0]} && sudo -n tee {MARKER} >/dev/null",
           input=_this_run["id"] + "\n")


# examples/flightctl is a separate suite (its own pytest.ini, image and payload): run it
# from inside that dir; `make demo` (pytest examples) leaves it out.
collect_ignore = ["flightctl"]

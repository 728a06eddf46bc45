"""Example suite: every VM gets a per-run marker file through cloud-init."""

import pytest

MARKER = "/etc/flightvm-example/run-id"


@pytest.fixture
def flightvm_user_data(flightvm_run):
    # Merged into the default user-data (which creates the `flightvm` user with this
    # run's SSH key). The run id is shared by all xdist workers of one pytest run.
    return {
        "write_files": [{"path": MARKER, "content": flightvm_run.run_id + "\n",
                         "permissions": "0644"}],
    }

# examples/flightctl is a separate suite (its own pytest.ini, image and payload): run it
# from inside that dir; `make demo` (pytest examples) leaves it out.
collect_ignore = ["flightctl"]

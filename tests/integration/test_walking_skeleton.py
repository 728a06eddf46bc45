"""The whole path on real parts: registry -> seed ISO -> libvirt boot -> SSH, under xdist.

The example suite runs in a subprocess with ``-n 2`` and an empty cache dir,
so the base image must come from the real registry; both workers boot their
own VM on their own port and run the examples against it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.vm

PROBE = '''

import json, os

import pytest


@pytest.fixture(autouse=True)
def _record_identity(flightvm, flightvm_run):
    out = flightvm.run(
        "cloud-init query instance_id; hostname; cat /etc/flightvm-example/run-id; "
        "cloud-init status --wait").stdout.split()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = flightvm_run.run_dir / f"identity-{worker}.json"
    path.write_text(json.dumps({"instance_id": out[0], "hostname": out[1], "marker": out[2],
                                "status": out[-1], "port": flightvm.ssh_port,
                                "name": flightvm.name}))
'''


def test_examples_under_xdist_pull_once_and_boot_a_vm_per_worker(vm_suite) -> None:
    tests = (EXAMPLES / "test_example.py").read_text()
    Path("conftest.py").write_text((EXAMPLES / "conftest.py").read_text() + PROBE)
    # Two modules under --dist loadfile: each worker runs one of them.
    Path("test_example.py").write_text(tests)
    Path("test_example_again.py").write_text(tests)
    result, metrics = vm_suite.run("-n", "2", "--dist", "loadfile", "-v")
    result.assert_outcomes(passed=8)

    # Exactly one image transfer for the whole run, from the registry; the rest are local hits.
    sources = sorted(r["source"] for r in metrics["resolves"])
    assert sources == ["local", "registry"], metrics["resolves"]
    assert metrics["image_transfers"] == 1
    pulled = next(r for r in metrics["resolves"] if r["source"] == "registry")
    assert pulled["bytes"] > 100 * 2**20

    # One VM per worker, each with its own port, instance-id and hostname, both ready.
    assert sorted(metrics["workers"]) == ["gw0", "gw1"]
    assert len(metrics["vms"]) == 2
    assert all(vm["boot_seconds"] and vm["boot_seconds"] > 0 for vm in metrics["vms"])
    run_dir = vm_suite.cache_dir / "runs" / metrics["run_id"]
    import json

    ids = [json.loads(p.read_text()) for p in sorted(run_dir.glob("identity-*.json"))]
    assert len(ids) == 2
    assert ids[0]["instance_id"] != ids[1]["instance_id"]
    assert ids[0]["hostname"] != ids[1]["hostname"]
    assert ids[0]["port"] != ids[1]["port"]
    for ident in ids:
        assert ident["hostname"] == ident["name"]
        assert ident["marker"] == metrics["run_id"]  # the per-run user-data reached each guest
        assert ident["status"] == "done"

    # The terminal summary names the source.
    result.stdout.fnmatch_lines(["*flightvm*", "*image: source=registry*"])

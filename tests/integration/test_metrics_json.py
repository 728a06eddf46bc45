"""The --flightvm-metrics JSON of a real ``-n 2`` run (real registry, empty cache dir).

The suite uses only ``flightvm_image``, so no VM boots: the walking-skeleton test
covers the VM half of the metrics. The bench harness (``python -m bench``, P4/P6)
reads these same keys.
"""

from __future__ import annotations

import json
from pathlib import Path

SUITE = '''
import pytest


@pytest.mark.parametrize("i", range(6))
def test_image(flightvm_image, i):
    assert flightvm_image.path.exists()
'''

RESOLVE_KEYS = {"pid", "source", "key", "digest", "bytes", "seconds", "ts"}


def test_metrics_json_of_a_two_worker_run(vm_suite, base_in_registry) -> None:
    Path("test_image.py").write_text(SUITE)
    result, metrics = vm_suite.run("-n", "2")
    result.assert_outcomes(passed=6)

    # Top-level keys and types.
    assert set(metrics) >= {"run_id", "workers", "resolves", "image_transfers", "vms",
                            "revert_seconds"}, sorted(metrics)
    assert isinstance(metrics["run_id"], str) and metrics["run_id"]
    assert metrics["vms"] == [] and metrics["revert_seconds"] == []  # nothing booted

    # One resolve per worker, from two processes; exactly one of them moved the image.
    resolves = metrics["resolves"]
    assert len(resolves) == 2, resolves
    for res in resolves:
        assert set(res) >= RESOLVE_KEYS, res
        assert res["pid"] > 0 and res["ts"] > 0 and res["seconds"] >= 0
        assert res["digest"] == base_in_registry["digest"]
    assert len({r["pid"] for r in resolves}) == 2
    assert len({r["key"] for r in resolves}) == 1
    assert metrics["image_transfers"] == 1
    assert sorted(r["source"] for r in resolves) == ["local", "registry"]
    pulled = next(r for r in resolves if r["source"] == "registry")
    local = next(r for r in resolves if r["source"] == "local")
    assert pulled["bytes"] == base_in_registry["path"].stat().st_size > 100 * 2**20
    assert pulled["seconds"] > 0
    assert local["bytes"] == 0

    # The file is what the run recorded: resolves.jsonl in the run dir says the same.
    run_dir = vm_suite.cache_dir / "runs" / metrics["run_id"]
    lines = [json.loads(x) for x in (run_dir / "resolves.jsonl").read_text().splitlines()]
    assert sorted(lines, key=lambda r: r["ts"]) == sorted(resolves, key=lambda r: r["ts"])

    # The terminal summary agrees with the file.
    result.stdout.fnmatch_lines(["*image resolves: 1 transfer/build, 1 local hit(s)*",
                                 "*metrics written to*"])

"""P8: request -> ready from a warm booted state vs a cold boot, side by side in one bench run.

One suite (one test that asks for ``flightvm``) in the bench's warm cache dir, with a
user-data unique to this bench run, so its state key is new: the first run boots and
publishes the state, the next ones restore it. Figures come from the plugin's metrics
(``ready_seconds``: request -> ready, and ``start``: booted or restored).
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

from .common import Ctx, log, run_child, stat
from .figure import Bar, Figure, verdict

SUITE = """
import pytest


@pytest.fixture
def flightvm_user_data():
    return {"write_files": [{"path": "/etc/flightvm-bench-p8", "content": "RUN\\n"}]}


def test_ready(flightvm):
    assert flightvm.run("cat /etc/flightvm-bench-p8").stdout.strip() == "RUN"
"""


def _one(ctx: Ctx, suite: Any, i: int) -> dict[str, Any]:
    metrics = suite / f"metrics-{i}.json"
    res = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     *ctx.plugin_args(), "--flightvm-state-cache=on",
                     f"--flightvm-metrics={metrics}"], cwd=suite, check=False, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"P8 run {i} failed:\n{res.stdout[-2000:]}")
    vm = json.loads(metrics.read_text())["vms"][0]
    return {"start": vm["start"], "ready_s": vm["ready_seconds"], "suite_s": res.seconds,
            "pristine_s": vm.get("pristine_seconds")}


def p8_state(ctx: Ctx) -> Figure:
    fig = Figure("P8", "request → ready VM: warm booted state vs cold boot (TCG)",
                 target="≤5 s, and ≥8× faster than the cold boot of the same run")
    suite = ctx.scratch("p8")
    suite.chmod(0o755)
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "test_p8.py").write_text(SUITE.replace("RUN", f"bench-{ctx.run_id}"))
    try:
        ctx.sample_load()
        log("P8: cold run (boot, then the state is published)")
        cold = _one(ctx, suite, 0)
        warm = []
        for i in range(max(2, ctx.vm_reps)):
            ctx.sample_load()
            warm.append(_one(ctx, suite, i + 1))
            log(f"P8: warm run {i + 1}: {warm[-1]['start']} in {warm[-1]['ready_s']:.1f} s")
    finally:
        shutil.rmtree(suite, ignore_errors=True)
    if cold["start"] != "booted" or any(w["start"] != "restored" for w in warm):
        fig.value, fig.verdict = "failed: a run did not boot/restore as expected", "failed"
        fig.data = {"cold": cold, "warm": warm}
        return fig
    w = stat([x["ready_s"] for x in warm])
    fig.value = f"restored {w.fmt()}"
    fig.reference = f"cold boot {cold['ready_s']:.1f} s (+ pristine point and publish " \
                    f"{cold['pristine_s']:.1f} s)"
    fig.ratio = f"{cold['ready_s'] / w.median:.1f}× faster"
    fig.verdict = verdict(w.median <= 5 and cold["ready_s"] / w.median >= 8)
    fig.notes.append("pytest wall per run: cold " f"{cold['suite_s']:.0f} s, warm "
                     + ", ".join(f"{x['suite_s']:.0f} s" for x in warm))
    fig.data = {"cold": cold, "warm": warm, "warm_ready_s": w.as_dict()}
    fig.target_line = 5.0
    fig.bars = [Bar("restored from the state", w),
                Bar("cold boot", stat([cold["ready_s"]]), True)]
    return fig

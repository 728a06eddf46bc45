"""P8 and P9: request -> ready from a warm booted state vs a cold boot; from a state pulled from the registry.

One suite (one test that asks for ``flightvm``) in the bench's warm cache dir, with a
user-data unique to this bench run, so its state key is new: the first run boots and
publishes the state, the next ones restore it. Figures come from the plugin's metrics
(``ready_seconds``: request -> ready, and ``start``: booted or restored).

P9: the same kind of suite with ``--flightvm-state-cache registry``: one run boots and
pushes its state to the bench's registry copy (next to the base), then runs with an
**empty** cache dir pull the base and the state and restore it; their request -> ready
is set against the state's pull time (the run's own "pulled the booted state" line) + 5 s.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from typing import Any

from pytest_flightvm.cache.resolve import push_file

from .cache_figs import _settings
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


def _one(ctx: Ctx, suite: Any, i: int, *extra: str, mode: str = "on",
         fig: str = "P8") -> dict[str, Any]:
    metrics = suite / f"metrics-{i}.json"
    res = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     *ctx.plugin_args(), f"--flightvm-state-cache={mode}",
                     f"--flightvm-metrics={metrics}", *extra], cwd=suite, check=False,
                    timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{fig} run {i} failed:\n{res.stdout[-2000:]}")
    vm = json.loads(metrics.read_text())["vms"][0]
    pulled = re.search(r"pulled the booted state \w+ from \S+ \((\d+) MiB in ([\d.]+) s\)",
                       res.stdout + res.stderr)  # the plugin's notices go to stderr
    pushed = re.search(r"pushed the booted state \w+ to \S+ as \S+ \((\d+) MiB in ([\d.]+) s\)",
                       res.stdout + res.stderr)
    return {"start": vm["start"], "ready_s": vm["ready_seconds"], "suite_s": res.seconds,
            "pristine_s": vm.get("pristine_seconds"),
            "pull_mib": int(pulled.group(1)) if pulled else None,
            "pull_s": float(pulled.group(2)) if pulled else None,
            "push_mib": int(pushed.group(1)) if pushed else None,
            "push_s": float(pushed.group(2)) if pushed else None}


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


def p9_state_registry(ctx: Ctx) -> Figure:
    fig = Figure("P9", "request → ready VM: empty local store, base and state in the registry",
                 target="≤ state pull time + 5 s")
    suite = ctx.scratch("p9")
    suite.chmod(0o755)
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "test_p9.py").write_text(SUITE.replace("RUN", f"bench-p9-{ctx.run_id}"))
    # a repository of this bench run (the host setup prunes it; a state is ~290 MiB), with
    # the bench's base copied in, so an empty store pulls both from it
    repo = ctx.bench_repo("p9")
    push_file(_settings(ctx, registry=repo), ctx.base.path, [ctx.base.tags[0]],
              key=ctx.base.key)
    try:
        ctx.sample_load()
        log("P9: cold run (boot; the state is published and pushed next to the base)")
        cold = _one(ctx, suite, 0, "--flightvm-push", f"--flightvm-registry={repo}",
                    mode="registry", fig="P9")
        pulled = []
        for i in range(max(1, ctx.vm_reps)):
            empty = suite / f"empty-{i}"
            empty.mkdir()
            empty.chmod(0o755)
            ctx.sample_load()
            pulled.append(_one(ctx, suite, i + 1, f"--flightvm-cache-dir={empty}",
                               f"--flightvm-registry={repo}", mode="registry", fig="P9"))
            log(f"P9: empty store {i + 1}: {pulled[-1]['start']} in "
                f"{pulled[-1]['ready_s']:.1f} s (state pull {pulled[-1]['pull_s']} s)")
            shutil.rmtree(empty, ignore_errors=True)
    finally:
        shutil.rmtree(suite, ignore_errors=True)
    if cold["start"] != "booted" or any(p["start"] != "restored" or p["pull_s"] is None
                                        for p in pulled):
        fig.value, fig.verdict = "failed: a run did not boot/pull/restore as expected", "failed"
        fig.data = {"cold": cold, "pulled": pulled}
        return fig
    r = stat([x["ready_s"] for x in pulled])
    pull = stat([x["pull_s"] for x in pulled])
    fig.value = f"restored from the registry {r.fmt()}"
    fig.reference = (f"state pull {pull.fmt()} ({pulled[0]['pull_mib']} MiB) + 5 s; cold boot "
                     f"{cold['ready_s']:.1f} s")
    fig.ratio = f"{cold['ready_s'] / r.median:.1f}× faster than the cold boot"
    fig.verdict = verdict(all(x["ready_s"] <= x["pull_s"] + 5 for x in pulled))
    if cold["push_s"] is not None:
        fig.notes.append(f"the cold run pushed the state ({cold['push_mib']} MiB sent, "
                         f"uncompressed to loopback) in {cold['push_s']:.1f} s, in the "
                         "background after its pristine point")
    fig.notes.append(f"pytest wall per run: cold {cold['suite_s']:.0f} s, empty store "
                     + ", ".join(f"{x['suite_s']:.0f} s" for x in pulled)
                     + " (the empty-store runs also pull the base)")
    fig.data = {"cold": cold, "pulled": pulled, "ready_s": r.as_dict(), "pull_s": pull.as_dict()}
    fig.bars = [Bar("restored from a pulled state", r), Bar("state pull", pull, True),
                Bar("cold boot", stat([cold["ready_s"]]), True)]
    return fig

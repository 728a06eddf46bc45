"""P8, P9 and P10: the booted-state cache priced (warm restore, registry pull, examples/ suite).

One suite (one test that asks for ``flightvm``) in the bench's warm cache dir, with a
user-data unique to this bench run, so its state key is new: the first run boots and
publishes the state, the next ones restore it. Figures come from the plugin's metrics
(``ready_seconds``: request -> ready, and ``start``: booted or restored).

P9: the same kind of suite with ``--flightvm-state-cache registry``: one run boots and
pushes its state to the bench's registry copy (next to the base), then runs with an
**empty** cache dir pull the base and the state and restore it; their request -> ready
is set against the state's pull time (the run's own "pulled the booted state" line) + 5 s.

P10: the project's ``examples/`` suite under ``-n 2`` as a whole process, with the state
cache off (a cold boot per worker), on over an empty states dir (cold: boots, saves and
publishes) and on over what that cold run published (warm: restores); wall times set
against the off run's (targets: warm ≤0.4×, cold ≤1.1×).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pytest_flightvm.cache.resolve import push_file

from .cache_figs import _settings
from .common import REPO_ROOT, Ctx, MiB, alternate, log, run_child, settle_io, stat
from .figure import Bar, Figure, verdict

SUITE = """
import pytest


@pytest.fixture
def flightvm_user_data():
    return {"write_files": [{"path": "/etc/flightvm-bench-p8", "content": "RUN\\n"}]}


def test_ready(flightvm):
    assert flightvm.run("cat /etc/flightvm-bench-p8").stdout.strip() == "RUN"
"""


def _suite(ctx: Ctx, name: str, marker: str) -> Path:
    """A scratch dir holding the one-test :data:`SUITE`, its user-data (so its state key)
    made unique by ``marker``."""
    suite = ctx.scratch(name)
    suite.chmod(0o755)
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / f"test_{name}.py").write_text(SUITE.replace("RUN", marker))
    return suite


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
    suite = _suite(ctx, "p8", f"bench-{ctx.run_id}")
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
    suite = _suite(ctx, "p9", f"bench-p9-{ctx.run_id}")
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


def _examples_run(ctx: Ctx, tag: str, mode: str) -> dict[str, Any]:
    """One whole ``pytest examples -n 2`` process on the bench's base; its wall time and,
    from its metrics JSON, how each VM started (booted or restored) and how long that took."""
    metrics = ctx.work / f"p10-{tag}.json"
    res = run_child([sys.executable, "-m", "pytest", "examples", "-n", "2", "-q",
                     "-p", "no:cacheprovider", *ctx.plugin_args(),
                     f"--flightvm-state-cache={mode}", f"--flightvm-metrics={metrics}"],
                    cwd=REPO_ROOT, check=False, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"P10 {tag} run failed ({res.returncode}):\n{res.stdout[-2000:]}")
    vms = json.loads(metrics.read_text())["vms"]
    metrics.unlink()
    return {"wall_s": res.seconds, "starts": [vm["start"] for vm in vms],
            "ready_s": [vm["ready_seconds"] for vm in vms],
            "pristine_s": [vm.get("pristine_seconds") for vm in vms]}


def _expect(tag: str, run: dict[str, Any], start: str) -> None:
    """A variant that did not start its VMs as it must would give a fake figure: raise."""
    if not run["starts"] or any(s != start for s in run["starts"]):
        raise RuntimeError(f"P10: the {tag} run's VMs started {run['starts']}, expected all "
                           f"{start!r}")


def p10_examples(ctx: Ctx) -> Figure:
    """examples/ under ``-n 2`` as a whole process: state cache off, on with an empty
    states dir (cold: boots, saves, publishes), and on with what the cold run published."""
    fig = Figure("P10", "`pytest examples -n 2` wall time: warm state vs state cache off; "
                 "cold state cache vs off", target="warm ≤0.4× off; cold ≤1.1× off")
    states = ctx.cache_dir / "states"
    # A VM boot costs 1-3 min here: one rep per variant unless asked for more. Per rep, off
    # takes its turn before, between or after the cold run (rotating), and warm follows the
    # cold run whose states it restores.
    orders = [("off", "cold", "warm"), ("cold", "off", "warm"), ("cold", "warm", "off")]
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "cold": [], "warm": []}
    for rep in range(ctx.vm_reps):
        for tag in orders[rep % len(orders)]:
            if tag == "cold":  # an empty states dir: nothing an earlier run saved is found
                shutil.rmtree(states, ignore_errors=True)
            ctx.sample_load()
            log(f"P10: rep {rep + 1}, state cache {tag}")
            run = _examples_run(ctx, f"{tag}-{rep}", "off" if tag == "off" else "on")
            run["load"] = ctx.load_samples[-1][1]  # 1-min load average as it started
            _expect(tag, run, {"off": "booted", "cold": "booted", "warm": "restored"}[tag])
            runs[tag].append(run)
            log(f"P10: {tag}: {run['wall_s']:.1f} s wall, VMs {', '.join(run['starts'])} "
                f"(ready {', '.join(f'{s:.1f}' for s in run['ready_s'])} s)")
    off, cold, warm = (stat([r["wall_s"] for r in runs[t]]) for t in ("off", "cold", "warm"))
    fig.value = f"warm {warm.fmt(digits=1)}; cold {cold.fmt(digits=1)}"
    fig.reference = f"state cache off {off.fmt(digits=1)}"
    fig.ratio = f"warm/off {warm.median / off.median:.2f}×, cold/off {cold.median / off.median:.2f}×"
    fig.verdict = verdict(warm.median <= 0.4 * off.median and cold.median <= 1.1 * off.median)

    def per_vm(tag: str) -> str:
        return "; ".join(", ".join(f"{s} {t:.1f} s" for s, t in zip(r["starts"], r["ready_s"],
                                                                    strict=True))
                         for r in runs[tag])

    def pristine(tag: str) -> str:
        return "; ".join(", ".join(f"{x:.1f} s" for x in r["pristine_s"] if x is not None)
                         for r in runs[tag])

    fig.notes.append("request → ready per VM: " + " | ".join(f"{t}: {per_vm(t)}"
                                                             for t in ("off", "cold", "warm")))
    fig.notes.append(f"pristine point per booted VM (save; cold: + publish): off {pristine('off')}"
                     f" | cold {pristine('cold')}; 1-min load as each run started: "
                     + ", ".join(f"{t} " + "/".join(f"{r['load']:.1f}" for r in runs[t])
                                 for t in ("off", "cold", "warm")))
    fig.data = {**runs, "wall_s": {"off": off.as_dict(), "cold": cold.as_dict(),
                                   "warm": warm.as_dict()}}
    fig.bars = [Bar("warm state", warm), Bar("cold state cache", cold),
                Bar("state cache off", off, True)]
    return fig


def zs_state_compression(ctx: Ctx) -> Figure:
    """A booted state that P8-P10 published (save file, frozen overlay, NVRAM), pushed as it
    is and with zstd to fresh repositories of this bench run and pulled back into an empty
    store, each file's digest checked, alternating: the state's size, push and pull seconds,
    compressed and not."""
    from pytest_flightvm.cache.registry import FlightRegistry
    from pytest_flightvm.cache.registry.bundle import pull_bundle, push_bundle
    from pytest_flightvm.cache.store import Store
    from pytest_flightvm.vm.statecache import StateCache
    from pytest_flightvm.vm.stateshare import CONFIG_MEDIA_TYPE, outgoing

    fig = Figure("ZS", "a booted state pushed and pulled, zstd vs none",
                 target="reported: sizes, push and pull seconds, compressed and not")
    states = StateCache(ctx.cache_dir / "states", notice=log)
    found = sorted(states.entries(), key=lambda e: str(e.get("created") or ""))
    if not found:
        fig.value, fig.verdict = "failed: no booted state in the bench's cache (run P8 or P10)", \
            "failed"
        return fig
    key = found[-1]["key"]
    files, config = outgoing(states, key)
    plain = sum(f.path.stat().st_size for f in files)
    scratch = ctx.scratch("zs")
    counter = [0]

    def cycle(mode: str) -> dict[str, float]:
        counter[0] += 1
        client = FlightRegistry(ctx.bench_repo(f"zs-{mode}-{counter[0]}")).client
        _digest, sent, push_s = push_bundle(client, files, config,
                                            config_media_type=CONFIG_MEDIA_TYPE, tag="bench",
                                            arch=ctx.base.arch, key=key, compress=mode)
        store = Store(scratch / f"store-{counter[0]}")
        t = time.monotonic()
        pulled = pull_bundle(client, "bench", store, config_media_type=CONFIG_MEDIA_TYPE,
                             arch=ctx.base.arch, key=key,
                             wanted={f.title: (f.media_type, lambda _p: None) for f in files},
                             required=[f.title for f in files])
        pull_s = time.monotonic() - t
        if any(pulled.files.get(f.title) != f.digest for f in files):
            raise RuntimeError(f"ZS: the {mode} round trip changed a file of the state")
        shutil.rmtree(scratch / f"store-{counter[0]}", ignore_errors=True)
        return {"push_s": push_s, "pull_s": pull_s, "sent": sent, "received": pulled.bytes}

    try:
        runs = alternate(ctx.reps_zstd, {"none": lambda: cycle("none"),
                                         "zstd": lambda: cycle("zstd")},
                         settle=settle_io(ctx.work, 2 * plain // MiB + 1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def s(mode: str, field: str) -> Any:
        return stat([r[field] for r in runs[mode]])

    z_bytes, n_bytes = runs["zstd"][0]["received"], runs["none"][0]["received"]
    fig.value = (f"zstd: {z_bytes / MiB:.0f} MiB, push {s('zstd', 'push_s').fmt()}, "
                 f"pull {s('zstd', 'pull_s').fmt()}")
    fig.reference = (f"none: {n_bytes / MiB:.0f} MiB, push {s('none', 'push_s').fmt()}, "
                     f"pull {s('none', 'pull_s').fmt()}")
    fig.ratio = f"zstd moves {z_bytes / max(n_bytes, 1):.0%} of the bytes"
    fig.verdict = "info"
    fig.notes.append(f"state {key[:12]}: " + ", ".join(
        f"{f.title} {f.path.stat().st_size / MiB:.0f} MiB" for f in files)
        + f" ({plain / MiB:.0f} MiB in all); pushed to fresh repositories on loopback, pulled "
        "into an empty store with each file's digest checked (the restore's own vetting, "
        "P9, is not part of this)")
    fig.data = {"key": key, "plain_bytes": plain, "zstd_bytes": z_bytes, "none_bytes": n_bytes,
                **{f"{m}_{k}": s(m, k).as_dict() for m in ("none", "zstd")
                   for k in ("push_s", "pull_s")}}
    fig.bars = [Bar("zstd push", s("zstd", "push_s")), Bar("zstd pull", s("zstd", "pull_s")),
                Bar("none push", s("none", "push_s"), True),
                Bar("none pull", s("none", "pull_s"), True)]
    return fig

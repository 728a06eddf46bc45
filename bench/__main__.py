"""pytest-flightvm benchmark harness: every figure side by side with its reference.

    .venv/bin/python -m bench                       # all figures; writes docs/BENCHMARKS.md,
                                                    # docs/benchmarks.png, docs/benchmarks.json
    .venv/bin/python -m bench --only P1,P2 --quick  # development: fewer reps, output under
                                                    # /var/tmp/flightvm-bench-out

Figures: P0 start-up cost of an installed, unused plugin, P1 local hit,
P2 cold pull (vs curl and the podman path), P3 push peak RSS,
P4 transfers per run at -n 1/2/4, P5 fixture -> ready VM (vs hand-run virsh),
P6 reset per firmware and mechanism vs reboot reset, P7 cold build, P8 warm booted
state vs cold boot, P9 booted state pulled from the registry into an empty store,
P10 examples/ under -n 2 with a warm state, a cold state cache and the state cache off,
Z zstd vs none, ZS a booted state zstd vs none.
Needs the host set up by `make host` (libvirtd, registry on 127.0.0.1:5000, .venv).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from . import cache_figs, report, startup_figs, state_figs, vm_figs
from .common import REPO_ROOT, Ctx, clean_env, log, machine_info
from .figure import Figure

ALL = ("P0", "P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10", "Z", "ZS")
TITLES = {"P0": "installed, unused plugin start-up",
          "P1": "local-hit resolve", "P2": "cold pull", "P3": "push peak RSS",
          "P4": "image transfers per run", "P5": "fixture request → ready VM",
          "P6": "reset per firmware vs reboot reset", "P7": "cold build",
          "P8": "warm booted state vs cold boot",
          "P9": "state pulled from the registry into an empty store",
          "P10": "examples/ -n 2: warm state and cold state cache vs state cache off",
          "Z": "zstd vs none", "ZS": "a booted state, zstd vs none"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--only", default="",
                    help=f"comma-separated figures to run ({','.join(ALL)}); default all")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions, 3 tests per reset suite, no P7 unless --only has it")
    ap.add_argument("--registry", default=os.environ.get("FLIGHTVM_TEST_REGISTRY", "127.0.0.1:5000"),
                    help="host:port of the local registry (default 127.0.0.1:5000)")
    ap.add_argument("--source-repo", default=None,
                    help="the project's base image repository (default <registry>/flightvm/base)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write BENCHMARKS.md, benchmarks.png and benchmarks.json "
                         "(default docs/ for a full run, /var/tmp/flightvm-bench-out otherwise)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of the cheap figures")
    ap.add_argument("--vm-reps", type=int, default=None, help="hand-run boots for P5")
    ap.add_argument("--reset-tests", type=int, default=None, help="tests per P6 suite")
    args = ap.parse_args(argv)
    only = [x.strip().upper() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in ALL]
    if bad:
        ap.error(f"unknown figure(s) {', '.join(bad)}; choose from {', '.join(ALL)}")
    args.figures = only or [f for f in ALL if not (args.quick and f == "P7")]
    return args


def preflight(registry: str) -> None:
    try:
        urllib.request.urlopen(f"http://{registry}/v2/", timeout=3).close()
    except OSError as exc:
        raise SystemExit(f"bench: no registry answers on {registry} ({exc}); run `make host`") from None
    if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode:
        raise SystemExit("bench: libvirtd does not answer on qemu:///system; run `make host`")


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    preflight(args.registry)
    dropped = clean_env()
    # As on a normal install: bytecode caching on (some sandboxes export this)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    if dropped:
        log(f"ignoring {', '.join(dropped)} from the environment (the bench sets its own)")
    run_id = time.strftime("%y%m%d%H%M%S") + f"-{os.getpid() % 10000:04d}"
    work = Path(os.environ.get("FLIGHTVM_BENCH_TMP", "/var/tmp")) / f"flightvm-bench-{run_id}"
    work.mkdir(parents=True)
    work.chmod(0o755)
    ctx = Ctx(
        registry_host=args.registry,
        source_repo=args.source_repo or f"{args.registry}/flightvm/base",
        base_repo=f"{args.registry}/flightvm-bench/base",
        work=work,
        reps=args.reps or (2 if quick else 3),
        vm_reps=args.vm_reps or 1,  # P5 also has the ten reboot-suite boots (n=10)
        reset_tests=args.reset_tests or (3 if quick else 10),
        quick=quick,
        run_id=run_id,
        reps_rss=1 if quick else 2,
        reps_zstd=1 if quick else 2,
        reps_p4=1 if quick else 2,
        reps_p2=args.reps or (5 if quick else 9),
    )
    full = not args.only and not quick
    out_dir = args.out or (REPO_ROOT / "docs" if full else Path("/var/tmp/flightvm-bench-out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta = {"command": "python -m bench" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                             if (argv if argv is not None else sys.argv[1:]) else ""),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "machine": machine_info(), "figures_run": args.figures,
            "reps": {"cheap": ctx.reps, "push_rss": ctx.reps_rss, "zstd": ctx.reps_zstd,
                     "p4": ctx.reps_p4, "p2": ctx.reps_p2, "hand_boots": ctx.vm_reps,
                     "reset_tests": ctx.reset_tests}}
    log(f"figures {', '.join(args.figures)}; work dir {work}; output {out_dir}")
    ctx.sample_load()
    figs: list[Figure] = []

    def run(fid: str, fn: Callable[[], Figure | list[Figure]]) -> None:
        log(f"{fid}: {TITLES.get(fid, fid)} ...")
        ctx.sample_load()
        t = time.monotonic()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - one broken figure must not lose the others
            traceback.print_exc()
            ids = fid.split("+")
            result = [Figure(i, TITLES.get(i, i), value=f"failed: {exc}"[:300], verdict="failed")
                      for i in ids]
        got = result if isinstance(result, list) else [result]
        for f in got:
            if not f.seconds:
                f.seconds = (time.monotonic() - t) / len(got)
            log(f"{f.id}: {f.value} | ref: {f.reference} | {f.ratio} -> {f.verdict}")
        figs.extend(got)

    want = set(args.figures)
    try:
        if "P0" in want:  # first: no base image or VM needed, and the machine is quietest
            run("P0", lambda: startup_figs.p0_unused_plugin(ctx))
        built_first = "P7" in want and not cache_figs.project_base_is_stored(ctx)
        if built_first:  # the run needs a build anyway: let P7's cold build be that build
            run("P7", lambda: cache_figs.p7_cold_build(ctx, into_project_store=True))
        if want - {"P0"}:
            cache_figs.ensure_base(ctx)
        steps: list[tuple[str, Callable[[], Figure | list[Figure]]]] = [
            ("P1", lambda: cache_figs.p1_local_hit(ctx)),
            ("P2", lambda: cache_figs.p2_cold_pull(ctx)),
            ("P3", lambda: cache_figs.p3_push_rss(ctx)),
            ("Z", lambda: cache_figs.compression(ctx)),
            ("P4", lambda: cache_figs.p4_resolves(ctx)),
        ]
        for fid, fn in steps:
            if fid in want:
                run(fid, fn)
        vm_want = want & {"P5", "P6"}
        if vm_want:
            run("+".join(sorted(vm_want)), lambda: vm_figs.vm_figures(ctx, vm_want))
        if "P8" in want:
            run("P8", lambda: state_figs.p8_state(ctx))
        if "P9" in want:
            run("P9", lambda: state_figs.p9_state_registry(ctx))
        if "P10" in want:  # after P8/P9: its cold runs empty the bench's states dir
            run("P10", lambda: state_figs.p10_examples(ctx))
        if "ZS" in want:  # after P8-P10: it sends the state they published
            run("ZS", lambda: state_figs.zs_state_compression(ctx))
        if "P7" in want and not built_first:
            run("P7", lambda: cache_figs.p7_cold_build(ctx))
        ctx.sample_load()
    finally:
        for dom in vm_figs.leftover_domains(ctx):
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", dom], capture_output=True)
            subprocess.run(["virsh", "-c", "qemu:///system", "undefine", dom], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    order = {f: i for i, f in enumerate(ALL)}
    figs.sort(key=lambda f: order.get(f.id, 99))
    meta["wall_s"] = time.monotonic() - started
    meta["other_vms_max"] = max(n for n, _ in ctx.load_samples)
    meta["load_samples"] = ctx.load_samples
    meta["load_range"] = (min(x for _, x in ctx.load_samples), max(x for _, x in ctx.load_samples))
    meta["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    chart_name, why = report.chart(out_dir / "benchmarks.png", figs)
    (out_dir / "BENCHMARKS.md").write_text(report.markdown(figs, meta, chart_name, why))
    report.write_json(out_dir / "benchmarks.json", figs, meta)
    print(report.print_table(figs))
    print("\ntime per figure: " + report.time_per_phase(figs))
    print(f"wall time {meta['wall_s'] / 60:.1f} min; wrote {out_dir / 'BENCHMARKS.md'}, "
          f"{out_dir / 'benchmarks.json'}" + (f", {out_dir / chart_name}" if chart_name else ""))
    if chart_name is None:
        print(f"note: no chart: {why}")
    return 1 if any(f.verdict == "failed" for f in figs) else 0


if __name__ == "__main__":
    raise SystemExit(main())

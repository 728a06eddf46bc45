"""`make demo`: run examples/ under xdist twice against the local registry.

Run 1 uses an empty cache dir and a registry repository nobody has pushed to,
so it builds the base and pushes it. Run 2 uses another empty cache dir, so
it pulls what run 1 pushed. Both boot one VM per worker. Prints per-run
image source, bytes and seconds, and the VMs' time to ready.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(label: str, cache: Path, registry: str, workers: int) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    metrics = cache / "metrics.json"
    cmd = [sys.executable, "-m", "pytest", "examples", "-n", str(workers), "-p", "no:cacheprovider",
           "-q", f"--flightvm-cache-dir={cache}", f"--flightvm-registry={registry}",
           "--flightvm-push", f"--flightvm-metrics={metrics}"]
    print(f"\n=== {label}: {' '.join(cmd[2:])}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.monotonic() - start
    data = json.loads(metrics.read_text()) if metrics.exists() else {}
    data["wall_seconds"] = wall
    data["exit"] = proc.returncode
    return data


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", default="127.0.0.1:5000/flightvm/base",
                    help="registry host/prefix; the demo pushes to <registry>-demo-<time>")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/flightvm-demo"))
    args = ap.parse_args()
    repo = f"{args.registry}-demo-{time.strftime('%Y%m%d%H%M%S')}"
    runs = [
        ("run 1 (cold: empty cache, empty registry repo)", args.workdir / "run1"),
        ("run 2 (empty cache, registry has the image)", args.workdir / "run2"),
    ]
    results = [(label, run(label, cache, repo, args.workers)) for label, cache in runs]

    print("\n=== flightvm demo summary")
    print(f"registry repository: {repo}")
    print(f"{'run':<6} {'source':<9} {'MiB moved':>10} {'image s':>8} {'VMs ready':>10} "
          f"{'boot->ready s':>14} {'wall s':>7} exit")
    ok = True
    for n, (_label, data) in enumerate(results, 1):
        transfers = [r for r in data.get("resolves", []) if r["source"] != "local"]
        src = transfers[0] if transfers else {"source": "local", "bytes": 0, "seconds": 0.0}
        vms = data.get("vms", [])
        ready = [vm["boot_seconds"] for vm in vms if vm.get("boot_seconds")]
        boots = ", ".join(f"{s:.0f}" for s in ready) or "-"
        print(f"{n:<6} {src['source']:<9} {src['bytes'] / 2**20:>10.1f} {src['seconds']:>8.1f} "
              f"{len(ready):>10} {boots:>14} {data['wall_seconds']:>7.0f} {data['exit']}")
        ok &= data["exit"] == 0 and len(ready) == args.workers and len(transfers) == 1
    expected = ["build", "registry"]
    got = [next((r["source"] for r in d.get("resolves", []) if r["source"] != "local"), "local")
           for _l, d in results]
    print(f"image sources: {' then '.join(got)} (expected {' then '.join(expected)})")
    ok &= got == expected
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

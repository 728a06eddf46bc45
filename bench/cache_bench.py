"""Image-cache figures, side by side in one run (not a test).

    .venv/bin/python bench/cache_bench.py [--registry 127.0.0.1:5000] [--mib 480]

Prints: push peak RSS (ours vs oras-py's plain push), cold pull time (ours into
the verifying store vs `curl` of the same blob vs oras-py pull), and the
local-hit resolve time (fingerprint) vs a full re-verification.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

from pytest_flightvm.cache import resolve_image
from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.store import Store
from pytest_flightvm.config import Settings


def make_disk(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(b"QFI\xfb" + block[4:])
        for i in range(1, mib):
            f.write(block[i % 7:] + block[: i % 7])  # distinct-ish blocks, cheap to make


def child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line. Adds peak RSS (MiB)."""
    wrapper = code + textwrap.dedent("""
        import json as _j, resource as _r
        RESULT["peak_rss_mib"] = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024
        print(_j.dumps(RESULT))
    """)
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", default=os.environ.get("FLIGHTVM_TEST_REGISTRY",
                                                         "127.0.0.1:5000"))
    ap.add_argument("--mib", type=int, default=480)
    ap.add_argument("--no-oras", action="store_true", help="skip the oras-py comparisons")
    args = ap.parse_args()
    repo = f"{args.registry}/flightvm-bench/{uuid.uuid4().hex[:10]}"
    work = Path(tempfile.mkdtemp(prefix="flightvm-bench-", dir=Path.home() / ".cache"))
    disk = work / "disk.qcow2"
    make_disk(disk, args.mib)
    size_mib = disk.stat().st_size / (1 << 20)
    build_cmd = f"cp {disk} \"$FLIGHTVM_OUTPUT\""
    rows: list[tuple[str, str]] = []

    # 1. push: build once into a store, then push from a child to measure its peak RSS.
    settings = Settings(cache_dir=work / "builder", rootdir=work, registry=repo,
                        build_cmd=build_cmd, push=False)
    built = resolve_image(settings, log=lambda m: None)
    push = child(textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pytest_flightvm.cache.registry import FlightRegistry
        t = time.monotonic()
        r = FlightRegistry({repo!r}).push_disk(Path({str(built.path)!r}), {list(built.tags)!r},
                                               arch="amd64", key={built.key!r},
                                               digest={built.digest!r})
        RESULT = {{"seconds": time.monotonic() - t, "bytes": r.bytes}}
    """))
    rows.append(("push (flightvm, streamed)",
                 f"{push['seconds']:.2f} s, peak RSS {push['peak_rss_mib']:.0f} MiB"))
    if not args.no_oras:
        # A different blob, or oras would skip the upload as already present.
        other = work / "other.qcow2"
        subprocess.run(["cp", str(disk), str(other)], check=True)
        with open(other, "r+b") as f:
            f.seek(-16, os.SEEK_END)
            f.write(os.urandom(16))
        oras_push = child(textwrap.dedent(f"""
            import os, time
            import oras.provider
            os.chdir({str(work)!r})
            t = time.monotonic()
            oras.provider.Registry(hostname={args.registry!r}, insecure=True).push(
                target={repo + ":oras-push"!r}, files=["other.qcow2"])
            RESULT = {{"seconds": time.monotonic() - t}}
        """))
        rows.append(("push (oras-py plain push)",
                     f"{oras_push['seconds']:.2f} s, peak RSS {oras_push['peak_rss_mib']:.0f} MiB"))

    # 2. cold pull into an empty store (through resolve_image: manifest + verified blob).
    cold = Settings(cache_dir=work / "cold", rootdir=work, registry=repo, build_cmd=build_cmd)
    t = time.monotonic()
    pulled = resolve_image(cold, log=lambda m: None)
    pull_s = time.monotonic() - t
    assert pulled.source == "registry", pulled
    rows.append(("cold pull (flightvm resolve, verified, fsynced)", f"{pull_s:.2f} s"))

    reg = FlightRegistry(repo)
    url = f"{reg.base}/blobs/{built.digest}"
    t = time.monotonic()
    subprocess.run(["curl", "-fsS", "-o", str(work / "curl.out"), url], check=True)
    curl_s = time.monotonic() - t
    rows.append(("raw curl of the same blob (no verify)", f"{curl_s:.2f} s"))
    if not args.no_oras:
        oras_pull = child(textwrap.dedent(f"""
            import time
            import oras.provider
            t = time.monotonic()
            oras.provider.Registry(hostname={args.registry!r}, insecure=True).pull(
                target={repo + ":" + built.tags[0]!r}, outdir={str(work / "oras-out")!r})
            RESULT = {{"seconds": time.monotonic() - t}}
        """))
        rows.append(("oras-py pull (no verify)", f"{oras_pull['seconds']:.2f} s"))

    # 3. local hit: fingerprint only, vs a full re-verification of the blob.
    hits = []
    for _ in range(5):
        t = time.monotonic()
        hit = resolve_image(cold, log=lambda m: None)
        hits.append(time.monotonic() - t)
        assert hit.source == "local"
    rows.append(("local hit resolve (median of 5)", f"{sorted(hits)[2] * 1000:.1f} ms"))
    t = time.monotonic()
    Store(cold.store_dir).verify(pulled.digest, full=True)
    rows.append(("full re-verification (sha256 of the blob)", f"{time.monotonic() - t:.2f} s"))

    print(f"flightvm cache bench: {size_mib:.0f} MiB qcow2, registry {args.registry}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()

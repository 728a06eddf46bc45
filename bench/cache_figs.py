"""Image-cache figures: P1 local hit, P2 cold pull, P3 push RSS, P4 resolves per run,
P7 cold build, and zstd vs none. Each runs side by side with its reference."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.resolve import current_key, push_file, resolve_image
from pytest_flightvm.cache.store import Store
from pytest_flightvm.config import Settings, resolve

from .common import (
    REPO_ROOT,
    VENV_BIN,
    Ctx,
    MiB,
    alternate,
    log,
    python_child,
    run_child,
    settle_io,
    stat,
)
from .figure import Bar, Figure, verdict


def _settings(ctx: Ctx, **cli: Any) -> Settings:
    values = {"registry": ctx.base_repo, "cache_dir": ctx.cache_dir, "build_cmd": ctx.build_cmd,
              "push": False, "compress": "none", **cli}
    return resolve({k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}, {},
                   os.environ, rootdir=REPO_ROOT)


def _quiet(_msg: str) -> None:
    pass


def project_settings(ctx: Ctx) -> Settings:
    return resolve({"registry": ctx.source_repo, "push": False}, {}, os.environ,
                   rootdir=REPO_ROOT)


def project_base_is_stored(ctx: Ctx) -> bool:
    """Is the project's base (its current key) in the default local store?"""
    settings = project_settings(ctx)
    store = Store(settings.store_dir)
    info = store.ref_info(f"key/{current_key(settings).digest}")
    return info is not None and store.has(info["digest"])


def ensure_base(ctx: Ctx) -> None:
    """Resolve the project's base (default store, else ``ctx.source_repo``, else build),
    then give the bench its own copy: a store under the work dir whose key comes from
    ``cp <blob> $FLIGHTVM_OUTPUT`` (so commits landing in a shared tree cannot move the
    key mid-run, and other runs' locks on the default store cannot stall ours), pushed to
    ``ctx.base_repo`` under that key's tag. Every cold pull below pulls it, never builds."""
    source = resolve_image(project_settings(ctx), log=log)
    ctx.build_cmd = f'cp {source.path} "$FLIGHTVM_OUTPUT"'
    ctx.cache_dir = ctx.work / "cache"
    settings = _settings(ctx)
    image = resolve_image(settings, log=_quiet)
    if image.digest != source.digest:
        raise RuntimeError(f"copying the base changed it: {source.digest} -> {image.digest}")
    reg = FlightRegistry(ctx.base_repo)
    if reg.manifest_digest(image.tags[0]) is None:
        log(f"pushing the base to {ctx.base_repo}:{image.tags[0]} (once per base digest)")
        push_file(settings, image.path, [image.tags[0]], key=image.key, log=log)
    ctx.base = image
    size = image.path.stat().st_size
    log(f"base image {image.digest[:19]} ({size / MiB:.0f} MiB) from {source.source}; bench "
        f"copy {ctx.base_repo}:{image.tags[0]}")


def _settle_mib(ctx: Ctx, copies: int) -> int:
    """MiB a sample writes into the page cache: ``copies`` of the base, plus a margin."""
    return int(copies * ctx.base.path.stat().st_size * 1.25 / MiB)


SETTLE_NOTE = ("every sample starts after an untimed `sync` and an untimed write+delete of a "
               "file as large as what the sample writes: this VM's free memory goes cold "
               "(the balloon reports it to the host) and the first write into it costs ~12× "
               "(dd of 480 MiB: ~1.2 s cold, 0.1 s warm), so without it a sample's time "
               "depended on when memory was last freed")


# ------------------------------------------------------------------ P1 local hit
def p1_local_hit(ctx: Ctx) -> Figure:
    fig = Figure("P1", "local-hit resolve (`flightvm cache get`, warm store)",
                 target="≤0.30 s beyond interpreter start-up, 0 bytes moved")
    cli = [str(VENV_BIN / "flightvm"), "cache", "get", *ctx.cli_args()]
    moved: list[int] = []
    sources: list[str] = []

    def flightvm_get() -> float:
        res = run_child(cli, cwd=REPO_ROOT)
        m = re.search(r"source=(\w+) bytes=(\d+)", res.stderr)
        if not m:
            raise RuntimeError(f"no source line in: {res.stderr[-300:]}")
        sources.append(m.group(1))
        moved.append(int(m.group(2)))
        return res.seconds

    def bare_python() -> float:
        return run_child([sys.executable, "-c", "pass"]).seconds

    flightvm_get(), bare_python()  # warm-up (page cache, bytecode), not counted
    sources.clear()
    moved.clear()
    runs = alternate(ctx.reps, {"flightvm cache get": flightvm_get, "python -c pass": bare_python})
    settings = _settings(ctx)
    inproc: list[float] = []
    for _ in range(ctx.reps):
        t = time.monotonic()
        img = resolve_image(settings, log=_quiet)
        inproc.append(time.monotonic() - t)
        sources.append(img.source)
        moved.append(img.bytes_moved)
    cli_s, py_s, in_s = stat(runs["flightvm cache get"]), stat(runs["python -c pass"]), stat(inproc)
    beyond = cli_s.median - py_s.median
    fig.value = (f"{beyond:.2f} s beyond start-up (process {cli_s.fmt()}); "
                 f"in-process resolve {in_s.fmt('ms', 1, 1000)}")
    fig.reference = f"`python -c pass` {py_s.fmt()}"
    fig.ratio = f"{sum(moved)} bytes moved"
    fig.verdict = verdict(beyond <= 0.30 and sum(moved) == 0 and set(sources) == {"local"})
    fig.data = {"cli": cli_s.as_dict(), "python_c_pass": py_s.as_dict(),
                "in_process": in_s.as_dict(), "beyond_startup_s": beyond, "bytes_moved": moved,
                "sources": sources}
    fig.target_line = py_s.median + 0.30
    fig.bars = [Bar("flightvm cache get", cli_s), Bar("python -c pass", py_s, True),
                Bar("resolve_image (in-process)", in_s)]
    return fig


# ------------------------------------------------------------------ P2 cold pull
def _registry_pid() -> int | None:
    """The pid of the registry `make host` started (its pid file), if it is alive and ours
    to read; its CPU is part of every pull's cost on a host that also serves the blob."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    pid_file = Path(os.environ.get("FLIGHTVM_REGISTRY_DIR") or base / "flightvm-registry")
    try:
        pid = int((pid_file / "registry.pid").read_text().strip())
        _cpu_of(pid)
    except (OSError, ValueError):
        return None
    return pid


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds a live process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CPUMeter:
    """CPU seconds one sample spends, split into the puller (this process and its
    children, or a child command) and the registry serving it."""

    def __init__(self) -> None:
        self.registry = _registry_pid()
        self.samples: dict[str, list[tuple[float, float]]] = {}

    def __call__(self, name: str, fn: Any) -> Any:
        def sample() -> float:
            before = (time.process_time(), _children_cpu(),
                      _cpu_of(self.registry) if self.registry else 0.0)
            seconds = fn()
            own = time.process_time() - before[0] + _children_cpu() - before[1]
            served = (_cpu_of(self.registry) - before[2]) if self.registry else 0.0
            self.samples.setdefault(name, []).append((own, served))
            return seconds
        return sample

    def median(self, name: str) -> tuple[float, float]:
        rows = self.samples.get(name) or [(0.0, 0.0)]
        return (stat([r[0] for r in rows]).median, stat([r[1] for r in rows]).median)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


PODMAN_FILE = "FROM scratch\nCOPY disk.qcow2 /qcow2/disk.qcow2\n"


class Podman:
    """podman with its own vfs storage under the bench dir (docs/HOST.md: vfs here)."""

    def __init__(self, ctx: Ctx) -> None:
        self.root = ctx.work / "podman"
        self.runroot = Path(f"/tmp/fvmb-{ctx.run_id}")  # podman wants it under 50 characters
        self.base = ["podman", "--root", str(self.root / "storage"), "--runroot",
                     str(self.runroot), "--storage-driver", "vfs", "--events-backend", "file",
                     "--cgroup-manager", "cgroupfs"]

    def __call__(self, *args: str, check: bool = True,
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args[:2])} failed: {res.stderr.strip()[-500:]}")
        return res

    def wipe(self) -> None:
        if shutil.which("podman") is None:  # nothing to wipe (and nothing to run it with)
            return
        self("rm", "-a", "-f", check=False)
        self("rmi", "-a", "-f", check=False)
        self("system", "reset", "-f", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


def podman_image(ctx: Ctx, podman: Podman) -> str:
    """The seed's layout (a container image with /qcow2/disk.qcow2) of the base, in the
    registry; built with `podman build` and pushed once per base digest."""
    ref = f"{ctx.registry_host}/flightvm-bench/podman-seed:{ctx.base.digest.split(':')[1][:12]}"
    repo, tag = ref.rsplit(":", 1)
    if FlightRegistry(repo).manifest_digest(tag) is not None:
        return ref
    log(f"building and pushing the podman-style image {ref} (once per base digest)")
    build_dir = ctx.scratch("podman-ctx")
    try:
        os.link(ctx.base.path, build_dir / "disk.qcow2")
    except OSError:
        shutil.copyfile(ctx.base.path, build_dir / "disk.qcow2")
    (build_dir / "Containerfile").write_text(PODMAN_FILE)
    podman("build", "-q", "-t", ref, "-f", str(build_dir / "Containerfile"), str(build_dir))
    podman("push", "--tls-verify=false", ref)
    podman("rmi", "-f", ref, check=False)
    shutil.rmtree(build_dir, ignore_errors=True)
    return ref


def p2_cold_pull(ctx: Ctx) -> Figure:
    fig = Figure("P2", f"cold pull of the {ctx.base.path.stat().st_size / MiB:.0f} MiB base "
                 "(empty store)", target="≤1.3× curl")
    notes = fig.notes
    digest = ctx.base.digest
    url = f"{FlightRegistry(ctx.base_repo).base}/blobs/{digest}"
    scratch = ctx.scratch("p2")
    podman = Podman(ctx)
    podman_ref: str | None = None
    if shutil.which("podman") is None:
        notes.append("podman is not installed (apt-get install podman): podman path skipped")
    else:
        try:
            podman_ref = podman_image(ctx, podman)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            notes.append(f"podman image unavailable: {exc}")
    counter = [0]

    def empty_dir(name: str) -> Path:
        counter[0] += 1
        path = scratch / f"{name}-{counter[0]}"
        path.mkdir()
        return path

    def flightvm_inproc() -> float:
        cache = empty_dir("inproc")
        t = time.monotonic()
        img = resolve_image(_settings(ctx, cache_dir=cache), log=_quiet)
        seconds = time.monotonic() - t
        if img.source != "registry" or img.digest != digest:
            raise RuntimeError(f"cold resolve gave {img.source} {img.digest}")
        shutil.rmtree(cache, ignore_errors=True)
        return seconds

    def flightvm_cli() -> float:
        cache = empty_dir("cli")
        res = run_child([str(VENV_BIN / "flightvm"), "cache", "get", *ctx.cli_args(cache)],
                        cwd=REPO_ROOT)
        if "source=registry" not in res.stderr:
            raise RuntimeError(f"cold `flightvm cache get` did not pull: {res.stderr[-300:]}")
        shutil.rmtree(cache, ignore_errors=True)
        return res.seconds

    def curl() -> float:
        out = scratch / "curl.out"
        res = run_child(["curl", "-fsS", "-o", str(out), url])
        if out.stat().st_size != ctx.base.path.stat().st_size:
            raise RuntimeError("curl got a short blob")
        out.unlink()
        return res.seconds

    def curl_verified() -> float:
        """curl, then what flightvm also does: a sha256 check (one after the other; openssl,
        as coreutils' sha256sum does not use the CPU's SHA extensions)."""
        out = scratch / "curl-v.out"
        t = time.monotonic()
        run_child(["curl", "-fsS", "-o", str(out), url])
        got = run_child(["openssl", "dgst", "-sha256", "-r", str(out)]).stdout.split()[0]
        seconds = time.monotonic() - t
        if "sha256:" + got != digest:
            raise RuntimeError("curl got a corrupt blob")
        out.unlink()
        return seconds

    def podman_path() -> float:
        assert podman_ref is not None
        out = scratch / "podman-disk.qcow2"
        name = f"fvmbench-{ctx.run_id}-{counter[0]}"
        counter[0] += 1
        t = time.monotonic()
        podman("pull", "-q", "--tls-verify=false", podman_ref)
        podman("create", "--name", name, podman_ref, "/none")
        podman("cp", f"{name}:/qcow2/disk.qcow2", str(out))
        seconds = time.monotonic() - t
        podman("rm", "-f", name, check=False)
        podman("rmi", "-f", podman_ref, check=False)
        if out.stat().st_size != ctx.base.path.stat().st_size:
            raise RuntimeError("podman cp got a different size")
        out.unlink()
        return seconds

    def sha256_only() -> float:
        """hashlib's sha256 (OpenSSL) over the page-cached blob: the verification's own cost."""
        import hashlib
        h = hashlib.sha256()
        buf = bytearray(MiB)
        t = time.monotonic()
        with open(ctx.base.path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
        return time.monotonic() - t

    meter = CPUMeter()
    contenders = {"flightvm resolve (in-process)": meter("resolve", flightvm_inproc),
                  "flightvm cache get (process)": flightvm_cli,
                  "curl": meter("curl", curl), "curl+sha256": curl_verified,
                  "sha256 alone": sha256_only}
    if podman_ref:
        contenders["podman pull+create+cp"] = podman_path
    try:
        runs = alternate(ctx.reps_p2, contenders, settle=settle_io(ctx.work, _settle_mib(ctx, 1)))
    finally:
        podman.wipe()
        shutil.rmtree(scratch, ignore_errors=True)
    ours, cli, ref = (stat(runs["flightvm resolve (in-process)"]),
                      stat(runs["flightvm cache get (process)"]), stat(runs["curl"]))
    ratio = ours.median / ref.median
    fig.value = f"resolve {ours.fmt()}; `flightvm cache get` process {cli.fmt()}"
    verified = stat(runs["curl+sha256"])
    fig.reference = f"curl {ref.fmt()}; curl + sha256 {verified.fmt()}"
    fig.ratio = (f"{ratio:.2f}× curl (process: {cli.median / ref.median:.2f}×; "
                 f"{ours.median / verified.median:.2f}× curl+sha256)")
    fig.data = {"resolve_in_process": ours.as_dict(), "cli_process": cli.as_dict(),
                "curl": ref.as_dict(), "curl_sha256": verified.as_dict(),
                "ratio_vs_curl": ratio, "ratio_cli_vs_curl": cli.median / ref.median,
                "ratio_vs_curl_verified": ours.median / verified.median}
    fig.target_line = 1.3 * ref.median
    hashing = stat(runs["sha256 alone"])
    fig.data["sha256_alone"] = hashing.as_dict()
    fig.reference += f"; sha256 alone {hashing.fmt()}"
    (ours_cpu, ours_served), (curl_cpu, curl_served) = meter.median("resolve"), meter.median("curl")
    cores = len(os.sched_getaffinity(0))
    fig.data["cpu"] = {"resolve": ours_cpu, "curl": curl_cpu, "cores": cores,
                       "registry_for_resolve": ours_served if meter.registry else None,
                       "registry_for_curl": curl_served if meter.registry else None}
    if meter.registry:
        floor = (ours_cpu + ours_served) / cores
        fig.data["cpu"]["resolve_floor_seconds"] = floor
        cpu_ratio = (ours_cpu + ours_served) / max(curl_cpu + curl_served, 1e-9)
        fig.data["cpu"]["ratio_vs_curl"] = cpu_ratio
        notes.append(
            f"CPU per pull (medians): flightvm resolve {ours_cpu:.2f} s (receive into the page "
            "cache, read back, and a sha256 that alone takes "
            f"{hashing.median:.2f} s) + the registry serving it "
            f"{ours_served:.2f} s; curl {curl_cpu:.2f} s + registry {curl_served:.2f} s: "
            f"{cpu_ratio:.2f}× curl's CPU. With the registry on the same {cores} CPUs, the "
            f"verified pull cannot take less than ({ours_cpu:.2f} + {ours_served:.2f}) / {cores} "
            f"= {floor:.2f} s ({floor / ref.median:.2f}× curl) even if every part overlapped "
            "perfectly and nothing else ran; curl keeps both CPUs busy already")
    else:
        notes.append(f"CPU per pull (medians): flightvm resolve {ours_cpu:.2f} s, curl "
                     f"{curl_cpu:.2f} s; the registry's CPU is not ours to read here")
    fig.bars = [Bar("flightvm resolve", ours), Bar("flightvm cache get", cli),
                Bar("curl", ref, True), Bar("curl+sha256", verified, True),
                Bar("sha256 alone", hashing, True)]
    if podman_ref:
        pod = stat(runs["podman pull+create+cp"])
        fig.reference += f"; podman path {pod.fmt()}"
        fig.ratio += f"; podman/flightvm {pod.median / ours.median:.1f}×"
        fig.data["podman"] = pod.as_dict()
        fig.data["podman_ratio_vs_flightvm"] = pod.median / ours.median
        fig.data["podman_ref"] = podman_ref
        fig.bars.append(Bar("podman pull+create+cp", pod, True))
    fig.verdict = verdict(ratio <= 1.3)
    notes.append("flightvm verifies the sha256 while writing into the read-only store (no "
                 "fsync: a blob from an earlier boot is rehashed once, so what a crash lost is "
                 "refetched, never served); curl does not verify; podman gunzips the layer "
                 "into vfs storage and copies it out")
    notes.append(SETTLE_NOTE)
    return fig


# ---------------------------------------------------------------- P3 push RSS
def p3_push_rss(ctx: Ctx) -> Figure:
    size = ctx.base.path.stat().st_size
    fig = Figure("P3", f"push peak RSS ({size / MiB:.0f} MiB image)", target="≤100 MiB",
                 unit="MiB")
    img = ctx.base
    scratch = ctx.scratch("p3")
    disk = scratch / "disk.qcow2"
    try:
        os.link(img.path, disk)
    except OSError:
        shutil.copyfile(img.path, disk)
    counter = [0]

    def ours() -> dict[str, float]:
        counter[0] += 1
        repo = ctx.bench_repo(f"push-{counter[0]}")
        res = python_child(textwrap.dedent(f"""
            import json, time
            from pathlib import Path
            from pytest_flightvm.cache.registry import FlightRegistry
            t = time.monotonic()
            r = FlightRegistry({repo!r}).push_disk(Path({str(img.path)!r}), ["bench"],
                arch={img.arch!r}, key={img.key!r}, digest={img.digest!r})
            print(json.dumps({{"seconds": time.monotonic() - t, "bytes": r.bytes}}))
        """))
        out = json.loads(res.stdout.strip().splitlines()[-1])
        if out["bytes"] != size:
            raise RuntimeError(f"push sent {out['bytes']} bytes, expected {size}")
        return {"rss": res.peak_rss_mib, "seconds": out["seconds"]}

    def imports_only() -> dict[str, float]:
        res = python_child("from pytest_flightvm.cache.registry import FlightRegistry")
        return {"rss": res.peak_rss_mib, "seconds": res.seconds}

    def oras_plain() -> dict[str, float]:
        counter[0] += 1
        repo = ctx.bench_repo(f"oras-{counter[0]}")
        target = repo.split("/", 1)[1]
        res = python_child(textwrap.dedent(f"""
            import time
            import oras.provider
            t = time.monotonic()
            oras.provider.Registry(hostname={ctx.registry_host!r}, insecure=True).push(
                target={ctx.registry_host + "/" + target + ":bench"!r}, files=["disk.qcow2"])
            print(time.monotonic() - t)
        """), cwd=scratch)
        return {"rss": res.peak_rss_mib, "seconds": float(res.stdout.strip().splitlines()[-1])}

    try:
        runs = alternate(ctx.reps_rss, {"flightvm push": ours, "oras-py plain push": oras_plain,
                                        "imports only": imports_only})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rss = stat([r["rss"] for r in runs["flightvm push"]])
    secs = stat([r["seconds"] for r in runs["flightvm push"]])
    oras_rss = stat([r["rss"] for r in runs["oras-py plain push"]])
    oras_s = stat([r["seconds"] for r in runs["oras-py plain push"]])
    base_rss = stat([r["rss"] for r in runs["imports only"]])
    fig.value = f"{rss.fmt('MiB', 0)} (push {secs.fmt()})"
    fig.reference = (f"oras-py plain push {oras_rss.fmt('MiB', 0)} ({oras_s.fmt()}); "
                     f"interpreter + imports {base_rss.fmt('MiB', 0)}")
    fig.ratio = f"{rss.median / oras_rss.median:.2f}× oras-py"
    fig.verdict = verdict(rss.hi <= 100)
    fig.data = {"flightvm_rss_mib": rss.as_dict(), "flightvm_seconds": secs.as_dict(),
                "oras_rss_mib": oras_rss.as_dict(), "oras_seconds": oras_s.as_dict(),
                "imports_rss_mib": base_rss.as_dict(), "bytes": size}
    fig.notes.append("peak RSS of the pushing child process from wait4(2) ru_maxrss, "
                     "forked by a small launcher (a child of the bench itself would start "
                     "from the bench's RSS); each push goes to a fresh repository so the "
                     "whole blob is uploaded")
    fig.target_line = 100
    fig.bars = [Bar("flightvm push", rss), Bar("oras-py plain push", oras_rss, True),
                Bar("imports only", base_rss, True)]
    return fig


# ------------------------------------------------------------ P4 resolves per run
P4_TESTS = textwrap.dedent("""
    import pytest

    @pytest.mark.parametrize("i", range(8))
    def test_image(flightvm_image, i):
        assert flightvm_image.path.exists()
        assert flightvm_image.source in ("local", "registry", "build")
""")


def p4_resolves(ctx: Ctx) -> Figure:
    fig = Figure("P4", "image transfers per pytest run (empty cache dir, registry), "
                 "-n 1/2/4", target="exactly 1 non-local resolve per run", unit="resolves")
    suite = ctx.scratch("p4")
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "test_image.py").write_text(P4_TESTS)
    results: dict[str, list[dict[str, Any]]] = {}

    def one(n: int) -> dict[str, Any]:
        cache = ctx.scratch(f"p4-cache-{n}")
        metrics = cache / "metrics.json"
        res = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-n", str(n), *ctx.plugin_args(), f"--flightvm-cache-dir={cache}",
                         f"--flightvm-metrics={metrics}"],
                        cwd=suite, check=False, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"pytest -n {n} failed:\n{res.stdout[-1500:]}{res.stderr[-500:]}")
        data = json.loads(metrics.read_text())
        resolves = data["resolves"]
        shutil.rmtree(cache, ignore_errors=True)
        return {"n": n, "seconds": res.seconds, "resolves": len(resolves),
                "non_local": sum(1 for r in resolves if r["source"] != "local"),
                "image_transfers": data["image_transfers"],
                "sources": sorted(r["source"] for r in resolves)}

    contenders = {f"-n {n}": (lambda n=n: one(n)) for n in (1, 2, 4)}
    try:
        runs = alternate(ctx.reps_p4, contenders)
    finally:
        shutil.rmtree(suite, ignore_errors=True)
    results = runs
    parts, ok = [], True
    for name, rs in results.items():
        non_local = [r["non_local"] for r in rs]
        ok &= all(v == 1 for v in non_local) and all(r["image_transfers"] == 1 for r in rs)
        parts.append(f"{name}: {'/'.join(map(str, non_local))} non-local of "
                     f"{'/'.join(str(r['resolves']) for r in rs)} resolves "
                     f"({stat([r['seconds'] for r in rs]).fmt()} per run)")
        fig.bars.append(Bar(f"{name} non-local", stat(non_local)))
    fig.value = "; ".join(parts)
    fig.reference = "1 (one transfer per run, however many workers)"
    fig.verdict = verdict(ok)
    fig.data = {"runs": results}
    fig.notes.append("counted from the `resolves` of the run's --flightvm-metrics JSON; one "
                     "resolve line per worker, all but one are local hits")
    return fig


# --------------------------------------------------------------- zstd vs none
def compression(ctx: Ctx) -> Figure:
    img = ctx.base
    size = img.path.stat().st_size
    fig = Figure("Z", f"push+pull with --compress zstd vs none ({size / MiB:.0f} MiB base)",
                 target="pick the default from the figures")
    scratch = ctx.scratch("zstd")
    counter = [0]

    def cycle(mode: str) -> dict[str, float]:
        counter[0] += 1
        repo = ctx.bench_repo(f"{mode}-{counter[0]}")
        reg = FlightRegistry(repo)
        t = time.monotonic()
        pushed = reg.push_disk(img.path, ["bench"], arch=img.arch, key=img.key, compress=mode,
                               digest=img.digest)
        push_s = time.monotonic() - t
        store_dir = scratch / f"store-{counter[0]}"
        t = time.monotonic()
        pulled = reg.pull_disk("bench", Store(store_dir), arch=img.arch)
        pull_s = time.monotonic() - t
        if pulled.digest != img.digest:
            raise RuntimeError(f"{mode} round trip changed the digest")
        shutil.rmtree(store_dir, ignore_errors=True)
        return {"push_s": push_s, "pull_s": pull_s, "total_s": push_s + pull_s,
                "pushed_bytes": pushed.bytes, "pulled_bytes": pulled.bytes}

    if shutil.which("zstd") is None:
        fig.verdict = "failed"
        fig.value = "zstd is not installed (apt-get install zstd)"
        return fig
    try:
        runs = alternate(ctx.reps_zstd, {"none": lambda: cycle("none"),
                                         "zstd": lambda: cycle("zstd")},
                         settle=settle_io(ctx.work, _settle_mib(ctx, 2)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def s(mode: str, key: str) -> Any:
        return stat([r[key] for r in runs[mode]])

    z_bytes, n_bytes = runs["zstd"][0]["pulled_bytes"], runs["none"][0]["pulled_bytes"]
    extra_s = s("zstd", "total_s").median - s("none", "total_s").median
    saved = n_bytes - z_bytes
    fig.value = (f"zstd: {z_bytes / MiB:.0f} MiB, push {s('zstd', 'push_s').fmt()}, "
                 f"pull {s('zstd', 'pull_s').fmt()}")
    fig.reference = (f"none: {n_bytes / MiB:.0f} MiB, push {s('none', 'push_s').fmt()}, "
                     f"pull {s('none', 'pull_s').fmt()}")
    fig.ratio = (f"zstd moves {z_bytes / n_bytes:.0%} of the bytes, costs "
                 f"{extra_s:+.1f} s per push+pull on loopback")
    if extra_s > 0 and saved > 0:
        breakeven = saved / extra_s / MiB  # MiB/s below which zstd's smaller transfer wins
        mbit = breakeven * 8.388608
        where = ("any 1 Gbit/s or slower network, so every remote registry" if mbit > 1000
                 else "links slower than that")
        fig.notes.append(f"zstd costs {extra_s:.1f} s of CPU per push+pull and saves "
                         f"{saved / MiB:.0f} MiB: it wins on links slower than ~{mbit:.0f} Mbit/s "
                         f"({where}); `none` only wins on loopback")
        fig.data["breakeven_mbit_s"] = mbit
    elif saved > 0:
        fig.notes.append("zstd is smaller and not slower even on loopback: it wins everywhere")
    fig.notes.append(SETTLE_NOTE)
    fig.verdict = "info"
    fig.data.update({"none": runs["none"], "zstd": runs["zstd"], "none_bytes": n_bytes,
                     "zstd_bytes": z_bytes, "extra_seconds": extra_s})
    fig.bars = [Bar(f"none push+pull ({n_bytes / MiB:.0f} MiB)", s("none", "total_s"), True),
                Bar(f"zstd push+pull ({z_bytes / MiB:.0f} MiB)", s("zstd", "total_s"))]
    return fig


# ---------------------------------------------------------------- P7 cold build
def p7_cold_build(ctx: Ctx, *, into_project_store: bool = False) -> Figure:
    """``flightvm cache get --force``, offline, the built-in builder end to end. With
    ``into_project_store`` (the project's base is not stored yet, so the run needs this
    very build) it builds into the default cache dir, and the setup then finds it there
    instead of building a second time; otherwise into a scratch cache dir."""
    fig = Figure("P7", "cold build of the base (built-in Debian builder, `cache get --force`)",
                 target="absolute")
    cache = project_settings(ctx).cache_dir if into_project_store else ctx.scratch("p7-cache")
    env = {"FLIGHTVM_OFFLINE": "1", "REGISTRY_CACHE": "false"}
    try:
        res = run_child([str(VENV_BIN / "flightvm"), "cache", "get", "--force", "--cache-dir",
                         str(cache)], cwd=REPO_ROOT, env=env, timeout=1200, check=False)
    finally:
        if not into_project_store:
            shutil.rmtree(cache, ignore_errors=True)
    if into_project_store:
        fig.notes.append("the project's base was not stored yet: this build went into the "
                         "default cache dir and is the base every other figure used")
    if res.returncode != 0 or "source=build" not in res.stderr:
        fig.verdict = "failed"
        fig.value = f"build failed (exit {res.returncode})"
        fig.notes.append(res.stderr.strip()[-400:])
        return fig
    built = stat([res.seconds])
    m = re.search(r"built the base image \S+ in (\d+) s", res.stderr)
    fig.value = f"{built.fmt()} whole command" + (f" (builder {m.group(1)} s)" if m else "")
    fig.reference = "absolute (once per builder change; every other run pulls, see P2)"
    fig.verdict = "info"
    fig.data = {"seconds": built.as_dict(), "stderr_tail": res.stderr.strip()[-600:]}
    fig.bars = [Bar("cold build", built)]
    return fig

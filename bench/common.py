"""Shared pieces of the bench harness: context, timing, stats, child processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MiB = 1 << 20


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


@dataclass
class Ctx:
    """What every figure needs: where to work, which registry, how many repetitions."""

    registry_host: str
    source_repo: str  # where the project's base lives (flightvm/base): the bench starts from it
    base_repo: str  # the bench's own copy, under a key that only depends on the base's digest
    work: Path  # scratch dir (not 0700: QEMU must read VM files below it)
    reps: int  # cheap figures
    vm_reps: int  # VM figures
    reset_tests: int  # tests per suite for P6
    quick: bool
    run_id: str
    reps_rss: int = 3  # P3 pushes per contender
    reps_zstd: int = 3  # Z push+pull cycles per mode
    reps_p4: int = 2  # P4 pytest runs per -n
    reps_p2: int = 9  # P2 cold pulls per contender (a ratio near its target: a steadier median)
    base: Any = None  # ResolvedImage of the base in the bench store, set by ensure_base()
    build_cmd: str = ""  # `cp <base blob> $FLIGHTVM_OUTPUT`: a key that the tree cannot move
    cache_dir: Path = Path()  # the bench's warm cache dir (holds the base)
    notes: list[str] = field(default_factory=list)
    # (other engineers' running domains, 1-min load average), sampled between steps
    load_samples: list[tuple[int, float]] = field(default_factory=list)

    def sample_load(self) -> None:
        load = float(Path("/proc/loadavg").read_text().split()[0])
        self.load_samples.append((len(other_vms()), load))

    def plugin_args(self) -> list[str]:
        """pytest options that point a suite at the bench's warm store and registry copy."""
        return [f"--flightvm-cache-dir={self.cache_dir}", f"--flightvm-registry={self.base_repo}",
                f"--flightvm-build-cmd={self.build_cmd}", "--flightvm-no-push",
                "--flightvm-accel=tcg"]

    def cli_args(self, cache_dir: Path | None = None) -> list[str]:
        """`flightvm` CLI flags for the same."""
        return ["--registry", self.base_repo, "--cache-dir", str(cache_dir or self.cache_dir),
                "--build-cmd", self.build_cmd]

    def bench_repo(self, what: str) -> str:
        return f"{self.registry_host}/flightvm-bench/{self.run_id}-{what}"

    def scratch(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


# ---------------------------------------------------------------------------- stats
@dataclass(frozen=True)
class Stat:
    samples: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def lo(self) -> float:
        return min(self.samples)

    @property
    def hi(self) -> float:
        return max(self.samples)

    def fmt(self, unit: str = "s", digits: int = 2, scale: float = 1.0) -> str:
        if not self.samples:
            return "n/a"
        m, lo, hi = self.median * scale, self.lo * scale, self.hi * scale
        if self.n == 1:
            return f"{m:.{digits}f} {unit} (n=1)"
        return f"{m:.{digits}f} {unit} ({lo:.{digits}f}–{hi:.{digits}f}, n={self.n})"

    def as_dict(self) -> dict[str, Any]:
        if not self.samples:
            return {"n": 0, "samples": []}
        return {"median": self.median, "min": self.lo, "max": self.hi, "n": self.n,
                "samples": list(self.samples)}


def stat(values: Sequence[float]) -> Stat:
    return Stat(tuple(float(v) for v in values))


def alternate(reps: int, contenders: Mapping[str, Callable[[], Any]], *,
              settle: Callable[[], None] | None = None) -> dict[str, list[Any]]:
    """Run each contender once per repetition, rotating who goes first (no order bias).
    ``settle`` runs (untimed) before every sample, e.g. ``os.sync`` so that no sample
    pays for the writeback of the bytes the previous one left dirty."""
    names = list(contenders)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            if settle is not None:
                settle()
            out[name].append(contenders[name]())
    return out


def settle_io(where: Path, mib: int) -> Callable[[], None]:
    """A ``settle`` for samples that write about ``mib`` MiB: write back what earlier
    samples left dirty (``sync``), then write and delete a file of that size, untimed.

    This VM's free memory goes cold: the balloon's free-page reporting hands it back to
    the host, and the first write into it costs ~12x (dd of 480 MiB: 1.0-1.4 s of system
    time cold, 0.1 s right after deleting a file of that size). Without this, a sample's
    time depended on how long ago the memory it wrote into was freed, not on the tool."""
    block = bytes(MiB)

    def settle() -> None:
        os.sync()
        path = where / ".settle-io"
        try:
            with open(path, "wb") as f:
                for _ in range(mib):
                    f.write(block)
        finally:
            path.unlink(missing_ok=True)
    return settle


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.monotonic()
    try:
        yield box
    finally:
        box.append(time.monotonic() - start)


# ----------------------------------------------------------------- child processes
@dataclass(frozen=True)
class ChildResult:
    returncode: int
    seconds: float
    peak_rss_mib: float
    stdout: str
    stderr: str


def run_child(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 900, check: bool = True) -> ChildResult:
    """Run a command; return its wall time and output."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    start = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{cmd[0]} timed out after {timeout:.0f} s") from None
    seconds = time.monotonic() - start
    result = ChildResult(proc.returncode, seconds, 0.0, stdout, stderr)  # RSS: peak_rss_child
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): "
                           f"{stderr.strip()[-600:]}")
    return result


# A process's ru_maxrss starts with the RSS it had before exec: a child forked (or
# vforked) by this bench process would report at least the bench's own RSS. So a small
# launcher forks the command from its own fresh, small process and reports the
# grandchild's peak from wait4 (measured: a 200 MiB parent gave an empty child 216 MiB
# directly, 10.8 MiB through a fork of a small process).
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def peak_rss_child(cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: Path | None = None) -> ChildResult:
    """Run ``cmd`` and read its own peak RSS (wait4 in a small launcher: only that
    process, not the bench's RSS it would otherwise start from)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-child-{os.getpid()}.out"
    err_path = out_path.with_suffix(".err")
    rss_path = out_path.with_suffix(".rss")
    start = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(rss_path), *cmd],
                                stdout=out, stderr=err, env=full_env, cwd=cwd)
        proc.wait()
    seconds = time.monotonic() - start
    stdout, stderr = out_path.read_text(), err_path.read_text()
    try:
        peak_kib = int(rss_path.read_text())
    except (OSError, ValueError):
        peak_kib = -1
    for p in (out_path, err_path, rss_path):
        p.unlink(missing_ok=True)
    if proc.returncode != 0 or peak_kib < 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {stderr.strip()[-600:]}")
    return ChildResult(proc.returncode, seconds, peak_kib / 1024, stdout, stderr)


def python_child(code: str, **kw: Any) -> ChildResult:
    return peak_rss_child([sys.executable, "-c", code], **kw)


# -------------------------------------------------------------------- the machine
# Settings the plugin and CLI read from the environment: the bench sets its own.
PLUGIN_ENV = ("FLIGHTVM_REGISTRY", "FLIGHTVM_IMAGE", "FLIGHTVM_CACHE_DIR", "FLIGHTVM_BUILD_CMD",
              "QCOW2_CACHE_TAG", "REGISTRY_CACHE", "FLIGHTVM_OFFLINE", "FLIGHTVM_PLAIN_HTTP",
              "FLIGHTVM_COMPRESS", "LIBVIRT_DEFAULT_URI", "FLIGHTVM_ACCEL", "VM_CONFIG_DIR",
              "CLOUD_INIT_DIR", "DEBUG_VM_CONSOLE", "FLIGHTVM_RESET", "FLIGHTVM_METRICS", "CI")


def clean_env() -> list[str]:
    """Drop the plugin's env settings from this process (children inherit the result)."""
    dropped = [k for k in PLUGIN_ENV if k in os.environ]
    for k in dropped:
        os.environ.pop(k)
    return dropped


def machine_info() -> dict[str, str]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "(unavailable)"

    qemu = sh("qemu-system-x86_64", "--version").splitlines()
    return {
        "uname": sh("uname", "-a"),
        "nproc": sh("nproc"),
        "free_g": sh("free", "-g"),
        "qemu": qemu[0] if qemu else "(unavailable)",
        "libvirt": sh("virsh", "-c", "qemu:///system", "version", "--daemon").replace("\n", "; "),
        "python": sys.version.split()[0],
        "loadavg_start": Path("/proc/loadavg").read_text().strip(),
    }


def other_vms() -> list[str]:
    """Running libvirt domains that are not ours: the noise other engineers add."""
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"],
                         capture_output=True, text=True).stdout.split()
    return [d for d in out if d]

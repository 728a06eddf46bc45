"""R2: kill -9 at seeded random points of a pull, a build and a push (22 trials).

Each trial runs the real ``flightvm`` CLI in a child process (``fault_child.py``
only *reports* how far it got: bytes written, bytes sent, blob committed, ref
written, build started/finished) and kill -9s its process group at a point
drawn from ``random.Random(SEED)``. Then:

- the store holds no partial file under a blob name, and no ref to a missing
  blob (``check_store``);
- the next run succeeds and yields exactly the expected bytes;
- the killed run's temp files are swept by the next run;
- for a push: whatever tag is visible pulls complete, and a later push + pull
  of the same file works.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import fake_builder
from faultkit import (
    HERE,
    PY,
    SEED,
    Child,
    Golden,
    Tally,
    base_env,
    check_store,
    cli,
    kill_pid,
    partials_of,
    pid_alive,
    sha256_file,
    source_line,
)

from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.store import Store
from tests.fake_disk import MiB, write_fake_qcow2

rng = random.Random(SEED * 1000 + 2)
PULL_TRIALS, BUILD_TRIALS, PUSH_TRIALS = 8, 7, 7
BUILD_CHUNKS, BUILD_DELAY = 16, 0.04  # ~0.7 s of building, 4 MiB

# The whole kill schedule, drawn once, up front: the same seed gives the same trials.
PULL_SCHEDULE = [rng.choice(["early", "bytes", "bytes", "bytes", "commit", "ref"])
                 for _ in range(PULL_TRIALS)]
PULL_POINTS = [(kind, rng.uniform(0, 0.15) if kind == "early" else rng.random())
               for kind in PULL_SCHEDULE]
BUILD_POINTS = [(kind, rng.uniform(0, BUILD_CHUNKS * BUILD_DELAY * 1.1))
                for kind in (rng.choice(["during", "during", "during", "built", "ref"])
                             for _ in range(BUILD_TRIALS))]
PUSH_POINTS = [(kind, rng.uniform(0, 0.1) if kind == "early" else rng.random())
               for kind in (rng.choice(["early", "sent", "sent", "sent", "manifest"])
                            for _ in range(PUSH_TRIALS))]


def _predicate(kind: str, fraction: float, size: int) -> tuple[Any, float]:
    """(event predicate, delay after it) for a kill point."""
    if kind == "early":
        return (lambda e: e == "ready"), fraction
    if kind == "bytes":
        target = max(1, int(fraction * size))
        return (lambda e: e.startswith("write ") and int(e.split()[1]) >= target), 0.0
    if kind == "sent":
        target = max(1, int(fraction * size))
        return (lambda e: e.startswith("sent ") and int(e.split()[1]) >= target), 0.0
    if kind == "during":
        return (lambda e: e == "build"), fraction
    event = {"commit": "commit", "ref": "ref", "built": "built", "manifest": "manifest"}[kind]
    return (lambda e: e == event), 0.0


def _summary(recs: list[dict[str, Any]]) -> str:
    return json.dumps([{k: r.get(k) for k in ("name", "killed", "next_source", "outcome")}
                       for r in recs])


def test_kill_mid_pull(golden: Golden, tally: Tally, tmp_path: Path) -> None:
    recs = []
    for i, (kind, fraction) in enumerate(PULL_POINTS):
        with tally.trial("R2", f"pull#{i}:{kind}:{fraction:.3f}", soft=True) as rec:
            recs.append(rec)
            cache = tmp_path / f"pull-{i}"
            builds = golden.builds()
            env = base_env(NO_BUILD="1")
            argv = ["cache", "get", "--cache-dir", str(cache), "--registry", golden.registry,
                    "--build-cmd", golden.build_cmd]
            child = Child({"argv": argv, "observe": ["write", "commit", "ref"]}, env,
                          tmp_path / f"pull-{i}.err")
            try:
                predicate, delay = _predicate(kind, fraction, golden.size)
                rec["killed"] = child.kill_when(predicate, delay)
            finally:
                child.close()
            store = cache / "store"
            assert check_store(store) == [], "the killed pull left a bad store"

            again = cli(*argv, env=env)
            assert again.returncode == 0, again.stderr
            rec["next_source"] = source_line(again.stderr)["source"]
            assert rec["next_source"] in ("registry", "local")
            if rec["next_source"] == "local":  # only a finished pull may be reused
                assert "ref" in child.events, child.events
            assert sha256_file(Path(again.stdout.strip())) == golden.digest
            assert partials_of(store, child.pid) == [], "the dead pull's temp file stayed"
            assert check_store(store) == []
            assert golden.builds() == builds  # never built (NO_BUILD would fail it anyway)
    tally.assert_survived(recs)
    assert sum(bool(r.get("killed")) for r in recs) >= PULL_TRIALS - 2, _summary(recs)


def test_kill_mid_build(tally: Tally, tmp_path: Path) -> None:
    recs = []
    for i, (kind, delay) in enumerate(BUILD_POINTS):
        with tally.trial("R2", f"build#{i}:{kind}:{delay:.3f}", soft=True) as rec:
            recs.append(rec)
            cache, pidfile = tmp_path / f"build-{i}", tmp_path / f"builder-{i}.pids"
            seed = SEED * 100 + i  # a new key per trial: every trial builds
            cmd = (f"exec {PY} {HERE / 'fake_builder.py'} --seed {seed} "
                   f"--chunks {BUILD_CHUNKS} --delay {BUILD_DELAY} --pidfile {pidfile}")
            argv = ["cache", "get", "--cache-dir", str(cache), "--build-cmd", cmd]
            child = Child({"argv": argv, "observe": ["build", "ref"]}, base_env(),
                          tmp_path / f"build-{i}.err")
            try:
                predicate, wait = _predicate(kind, delay, 0)
                rec["killed"] = child.kill_when(predicate, wait if kind == "during" else 0.0)
            finally:
                child.close()
            # The builder runs in its own session, so it can outlive a kill -9 of its
            # parent. End it (we started it) before the next run, and note it.
            rec["builder_outlived_parent"] = False
            for pid in map(int, pidfile.read_text().split()) if pidfile.exists() else []:
                if pid_alive(pid):
                    rec["builder_outlived_parent"] = True
                    kill_pid(pid)
            store = cache / "store"
            assert check_store(store) == [], "the killed build left a bad store"

            again = cli(*argv, env=base_env())
            assert again.returncode == 0, again.stderr
            rec["next_source"] = source_line(again.stderr)["source"]
            if rec["next_source"] == "local":
                assert "ref" in child.events, child.events
            else:
                assert rec["next_source"] == "build"
            assert sha256_file(Path(again.stdout.strip())) == fake_builder.content_digest(
                seed, BUILD_CHUNKS)
            assert partials_of(store, child.pid) == []
            assert check_store(store) == []
    tally.assert_survived(recs)
    assert sum(bool(r.get("killed")) for r in recs) >= BUILD_TRIALS - 2, _summary(recs)


def test_kill_mid_push(local_registry: str, tally: Tally, tmp_path: Path) -> None:
    disk = write_fake_qcow2(tmp_path / "push.qcow2", 48 * MiB, seed=SEED + 2)
    digest, size = sha256_file(disk), disk.stat().st_size
    recs = []
    for i, (kind, fraction) in enumerate(PUSH_POINTS):
        with tally.trial("R2", f"push#{i}:{kind}:{fraction:.3f}", soft=True) as rec:
            recs.append(rec)
            repo = f"{local_registry}/flightvm-faults/push-{uuid.uuid4().hex[:10]}"
            argv = ["cache", "push", str(disk), "t", "--registry", repo]
            child = Child({"argv": argv, "observe": ["sent", "manifest"]}, base_env(),
                          tmp_path / f"push-{i}.err")
            try:
                predicate, delay = _predicate(kind, fraction, size)
                rec["killed"] = child.kill_when(predicate, delay)
            finally:
                child.close()
            reg = FlightRegistry(repo)
            if "t" in reg.tags():  # visible means complete
                store = Store(tmp_path / f"push-{i}-peek")
                assert reg.pull_disk("t", store, arch="amd64").digest == digest

            again = cli(*argv, env=base_env())
            assert again.returncode == 0, again.stderr
            pulled = cli("cache", "pull", "t", "--registry", repo, "--cache-dir",
                         str(tmp_path / f"push-{i}-pull"), env=base_env())
            assert pulled.returncode == 0, pulled.stderr
            assert sha256_file(Path(pulled.stdout.strip())) == digest
    tally.assert_survived(recs)
    assert sum(bool(r.get("killed")) for r in recs) >= PUSH_TRIALS - 2, _summary(recs)

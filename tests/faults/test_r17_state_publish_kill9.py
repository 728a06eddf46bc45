"""R17: kill -9 while a booted state is published into the state store (8 trials).

A child process publishes a state (a 96 MiB save file, a 32 MiB frozen disk, a 2 MiB
NVRAM: the same code path a pooled VM's pristine point takes, without the guest) and is
killed with SIGKILL at a seeded point of the publish. Then:

- the states store is sound (every blob hashes to its name and is 0444, every ref names
  a present blob) and a lookup of the key finds nothing, or a state whose manifest and
  three files all hash right: nothing partial is ever found;
- ``flightvm gc`` removes the blobs no state names and the dead child's temp files;
- a new publish of the key then succeeds (or finds the complete one), and it is found.

A kill mid-*save* needs no trial of its own: libvirt writes a save file under the magic
``LibvirtQemudPart`` until the save completes, the pool publishes only after the save
returned, and ``savefile.read_header`` refuses a partial file (tests/unit).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from pathlib import Path

from faultkit import PY, REPO_ROOT, SEED, Tally, check_store, cli, kill_pid

from pytest_flightvm.vm.pristine import Pristine
from pytest_flightvm.vm.statecache import StateCache

rng = random.Random(SEED * 1000 + 17)
TRIALS = 8
KEY = "5e" * 32

CHILD = r'''
import os, sys, time
from pathlib import Path
from pytest_flightvm.vm.pristine import Pristine
from pytest_flightvm.vm.statecache import StateCache

states, src, key = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cache = StateCache(states, notice=print)
cache.store  # made before the start line
print("ready", flush=True)
start = time.monotonic()
cache.publish(key, Pristine(src / "pristine.state", src / "pristine.qcow2", src / "nvram.fd"),
              {"origin": "flightvm-r17", "mac": "52:54:00:00:00:17"})
print(f"done {time.monotonic() - start:.3f}", flush=True)
'''


def _files(src: Path, seed: int) -> None:
    src.mkdir()
    r = random.Random(seed)
    for name, mib in (("pristine.state", 96), ("pristine.qcow2", 32), ("nvram.fd", 2)):
        with open(src / name, "wb") as f:
            for _ in range(mib):
                f.write(r.randbytes(1 << 20))


def _publish(states: Path, src: Path, kill_after: float | None) -> tuple[str, float | None]:
    proc = subprocess.Popen([PY, "-c", CHILD, str(states), str(src), KEY], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    if kill_after is None:
        out = proc.stdout.read()
        assert proc.wait(timeout=120) == 0
        return "done", float(out.split()[-1])
    time.sleep(kill_after)
    kill_pid(proc.pid)
    proc.wait(timeout=30)
    return ("finished" if proc.returncode == 0 else "killed"), None


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _found_is_whole(states: Path) -> bool | None:
    """None: nothing found; True: a complete state; raises when a partial one is found."""
    found = StateCache(states, notice=lambda _l: None).lookup(KEY)
    if found is None:
        return None
    for path in (found.pristine.state, found.pristine.disk, found.pristine.nvram):
        assert path is not None and _sha(path) == "sha256:" + path.name, path
    return True


def test_r17_kill9_mid_state_publish(tmp_path: Path, tally: Tally) -> None:
    # a control publish measures how long one takes; the kills fall inside that window
    _files(tmp_path / "src-control", 0)
    _, seconds = _publish(tmp_path / "control" / "states", tmp_path / "src-control", None)
    assert seconds is not None and _found_is_whole(tmp_path / "control" / "states")
    points = [rng.uniform(0.0, seconds * 1.1) for _ in range(TRIALS)]
    recs = []
    for i, point in enumerate(points):
        with tally.trial("R17", f"kill -9 {point:.2f}s into a state publish", soft=True,
                         kill_after=round(point, 3), publish_seconds=round(seconds, 3)) as rec:
            cache = tmp_path / f"cache-{i}"
            states = cache / "states"
            src = tmp_path / f"src-{i}"
            _files(src, i + 1)
            rec["child"], _ = _publish(states, src, point)
            problems = check_store(states)
            assert not problems, problems
            rec["found_after_kill"] = _found_is_whole(states)
            gc = cli("gc", "--cache-dir", str(cache), "--libvirt-uri", "test:///default")
            assert gc.returncode == 0, gc.stderr
            rec["gc_removed"] = gc.stdout.count("removed state blob")
            assert not list((states / "tmp").iterdir()), "the dead publisher's temp files stayed"
            store_blobs = {p.name for p in (states / "blobs" / "sha256").iterdir()}
            if rec["found_after_kill"] is None:
                assert not store_blobs, f"gc left {len(store_blobs)} blob(s) no state names"
                remaining = {n for n in ("pristine.state", "pristine.qcow2", "nvram.fd")
                             if (src / n).exists()}
                if remaining != {"pristine.state", "pristine.qcow2", "nvram.fd"}:
                    _files(src.with_name(src.name + "-again"), i + 1)
                    src = src.with_name(src.name + "-again")
                _publish(states, src, None)
            assert _found_is_whole(states), "no complete state after a new publish"
            assert not check_store(states)
        recs.append(rec)
    kinds = [r["child"] for r in recs]
    assert kinds.count("killed") >= TRIALS - 2, kinds  # real mid-publish kills, mostly
    tally.assert_survived(recs)
    json.dumps(recs)  # facts stay serialisable for FLIGHTVM_FAULTS_JSON
    assert os.path.isdir(tmp_path)


def test_r17_pristine_files_survive_when_the_key_is_taken(tmp_path: Path, tally: Tally) -> None:
    """A second worker that saved the same key keeps its own files (its resets use them)."""
    with tally.trial("R17", "second publisher of a key keeps its files"):
        states = tmp_path / "states"
        _files(tmp_path / "a", 1)
        _files(tmp_path / "b", 2)
        _publish(states, tmp_path / "a", None)
        cache = StateCache(states, notice=lambda _l: None)
        b = Pristine(tmp_path / "b" / "pristine.state", tmp_path / "b" / "pristine.qcow2",
                     tmp_path / "b" / "nvram.fd")
        assert cache.publish(KEY, b, {}) is None
        assert all(p is not None and p.exists() for p in (b.state, b.disk, b.nvram))

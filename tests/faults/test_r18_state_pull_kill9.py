"""R18: kill -9 while a booted state is pulled from the registry into the state store (6 trials).

A state (a 128 MiB save file with a real libvirt header and QEMU stream magic, a frozen
overlay on a small base, no NVRAM) is pushed to the real local registry as
``--flightvm-state-cache registry`` pushes one to a remote registry (zstd layers). A
child process pulls it into an empty state store through ``StateShare.pull`` (the pool's
code path without the guest: the transfer, the vetting, the rebuilt save file and the
rebased overlay, the install) and is killed with SIGKILL at a seeded point of the pull.
Then:

- the states store is sound (every blob hashes to its name and is 0444, every ref names
  a present blob), and a lookup of the key finds nothing, or a state whose files all hash
  right, whose save file carries our domain XML and whose overlay is backed by our base:
  nothing partial is ever found, so nothing partial is ever restored;
- ``flightvm gc`` removes the blobs no state names and the dead child's temp files;
- a new pull then succeeds (or finds the complete state), and it is found whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
import uuid
from pathlib import Path

from faultkit import PY, REPO_ROOT, SEED, Tally, check_store, cli, kill_pid

from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.registry.bundle import BundleFile, push_bundle
from pytest_flightvm.vm.savefile import HEADER, MAGIC, read_header
from pytest_flightvm.vm.statecache import STATE_FORMAT, StateCache
from pytest_flightvm.vm.stateshare import (
    CONFIG_MEDIA_TYPE,
    DISK_TITLE,
    OVERLAY_MEDIA_TYPE,
    SAVE_MEDIA_TYPE,
    SAVE_TITLE,
    state_tag,
)

rng = random.Random(SEED * 1000 + 18)
TRIALS = 6
KEY = "18" * 32
PREFIX = "r18"
ORIGIN = "flightvm-261203000000-r18a-gw0-1"

CHILD = r'''
import sys, time
from pathlib import Path
from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.vm.domain import DomainSpec, Owner
from pytest_flightvm.vm.statecache import StateCache
from pytest_flightvm.vm.stateshare import StateShare, StateVetting

states, repo, base, key, prefix = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5]
cache = StateCache(states, notice=print)
cache.store  # made before the start line
share = StateShare(lambda: FlightRegistry(repo), prefix=prefix, arch="amd64", compress="none",
                   push=False, notice=print)
p = Path("/flightvm-state")
xml = lambda meta: DomainSpec(
    name=meta["origin"], overlay=p / "overlay.qcow2", seed_iso=p / "seed.iso",
    console_log=p / "console.log", ssh_port=22, mac=meta["mac"],
    owner=Owner.current("261203000000-r18a", "gw0", states)).to_xml()
print("ready", flush=True)
start = time.monotonic()
found = share.pull(cache, key, StateVetting(base, None, xml))
assert found is not None, "the pull found nothing"
print(f"done {time.monotonic() - start:.3f}", flush=True)
'''


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _make_state(tmp: Path) -> tuple[Path, Path, Path]:
    """A base blob (named by a digest, as in a store), an overlay on that base stored
    elsewhere, and a 128 MiB save file."""
    base = tmp / "local" / "blobs" / "sha256" / ("b" * 64)
    base.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    overlay = tmp / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b",
                    "/elsewhere/store/blobs/sha256/" + base.name, str(overlay), "64M"],
                   check=True)
    save = tmp / "state.sav"
    body = b"<domain type='qemu'><name>theirs</name></domain>\0"
    cookie = b"<cookie>\n  <slirpHelper/>\n</cookie>\n\0"
    data_len = 64 * 1024
    region = body + cookie + b"\0" * (data_len - len(body) - len(cookie))
    r = random.Random(SEED)
    with open(save, "wb") as f:
        f.write(HEADER.pack(MAGIC, 2, data_len, 1, 0, len(body)) + region + b"QEVM")
        for _ in range(128):
            f.write(r.randbytes(1 << 20))
    return base, overlay, save


def _pull(states: Path, repo: str, base: Path, kill_after: float | None) -> tuple[str, float | None]:
    proc = subprocess.Popen([PY, "-c", CHILD, str(states), repo, str(base), KEY, PREFIX],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    if kill_after is None:
        out = proc.stdout.read()
        assert proc.wait(timeout=300) == 0, out[-2000:]
        return "done", float(out.split()[-1])
    time.sleep(kill_after)
    kill_pid(proc.pid)
    proc.wait(timeout=30)
    return ("finished" if proc.returncode == 0 else "killed"), None


def _found_is_whole(states: Path, base: Path) -> bool | None:
    """None: nothing found; True: a complete, vetted state; raises on a partial one."""
    found = StateCache(states, notice=lambda _l: None).lookup(KEY)
    if found is None:
        return None
    for path in (found.pristine.state, found.pristine.disk):
        assert _sha(path) == "sha256:" + path.name, path
    head = read_header(found.pristine.state)
    assert "<emulator>/usr/bin/qemu-system-x86_64</emulator>" in head.xml, head.xml[:200]
    assert found.pristine.state.stat().st_size == 92 + 64 * 1024 + 4 + (128 << 20)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U",
                                      str(found.pristine.disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == str(base), info
    return True


def test_r18_kill9_mid_state_pull(tmp_path: Path, tally: Tally, local_registry: str) -> None:
    base, overlay, save = _make_state(tmp_path)
    repo = f"{local_registry}/flightvm-test/r18-{uuid.uuid4().hex[:12]}"
    config = {"format": STATE_FORMAT, "key": KEY, "mac": "52:54:00:00:00:18",
              "host_keys": [], "origin": ORIGIN, "has_cloud_init": True, "accel": "tcg"}
    push_bundle(FlightRegistry(repo).client,
                [BundleFile(save, SAVE_TITLE, SAVE_MEDIA_TYPE),
                 BundleFile(overlay, DISK_TITLE, OVERLAY_MEDIA_TYPE)],
                config, config_media_type=CONFIG_MEDIA_TYPE, tag=state_tag(PREFIX, KEY),
                arch="amd64", key=KEY, compress="zstd")  # as to a non-loopback registry
    # a control pull measures how long one takes; the kills fall inside that window
    _, seconds = _pull(tmp_path / "control" / "states", repo, base, None)
    assert seconds is not None and _found_is_whole(tmp_path / "control" / "states", base)
    # inside the control's window (a pull's time varies by a fifth or so under load)
    points = [rng.uniform(0.0, seconds * 0.9) for _ in range(TRIALS)]
    recs = []
    for i, point in enumerate(points):
        with tally.trial("R18", f"kill -9 {point:.2f}s into a state pull", soft=True,
                         kill_after=round(point, 3), pull_seconds=round(seconds, 3)) as rec:
            cache = tmp_path / f"cache-{i}"
            states = cache / "states"
            rec["child"], _ = _pull(states, repo, base, point)
            problems = check_store(states)
            assert not problems, problems
            rec["found_after_kill"] = _found_is_whole(states, base)
            gc = cli("gc", "--cache-dir", str(cache), "--libvirt-uri", "test:///default")
            assert gc.returncode == 0, gc.stderr
            rec["gc_removed"] = gc.stdout.count("removed state blob")
            assert not list((states / "tmp").iterdir()), "the dead puller's temp files stayed"
            if rec["found_after_kill"] is None:
                left = list((states / "blobs" / "sha256").iterdir())
                assert not left, f"gc left {len(left)} blob(s) no state names"
                _pull(states, repo, base, None)
            assert _found_is_whole(states, base), "no complete state after a new pull"
            assert not check_store(states)
        recs.append(rec)
    kinds = [r["child"] for r in recs]
    assert kinds.count("killed") >= TRIALS - 2, kinds  # real mid-pull kills, mostly
    tally.assert_survived(recs)
    assert os.path.isdir(tmp_path)

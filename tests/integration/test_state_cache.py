"""The booted-state cache on real guests: one cache dir, four pytest runs of one suite.

1. cold: the VM boots, and its pristine point is published as a state;
2. warm: the VM is ``restored`` from it: the run's own key works and the first run's
   does not, the clock is within 2 s of the host's, the fixture's user-data is there,
   the hostname is the VM's own, and a per-test reset of the restored VM drops dirt;
3. the state's save file is corrupted behind the store's back (its fingerprint kept, so
   only the restore can notice): one warning line, the state is evicted, the VM boots
   and the tests pass, and a new state is published;
4. a changed user-data is a miss: the VM boots and a second state appears.

Three cold boots and one restore, in one test; runs 3 and 4 overlap.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_flightvm.cache.store import Store
from pytest_flightvm.vm.savefile import read_header

pytestmark = pytest.mark.vm

SUITE = r'''
import json, os, shutil, subprocess, time
from pathlib import Path

import pytest

OUT = Path(os.environ["STATE_TEST_DIR"])


@pytest.fixture
def flightvm_user_data():
    return {"write_files": [{"path": "/etc/flightvm-state-test",
                             "content": os.environ["STATE_TEST_MARK"] + "\n"}]}


def test_a_facts_then_dirt(flightvm):
    before = time.time()
    guest = float(flightvm.run("date +%s.%N").stdout)
    after = time.time()
    facts = {"name": flightvm.name, "started": flightvm.started,
             "clock_low": guest - before, "clock_high": after - guest,
             "mark": flightvm.run("cat /etc/flightvm-state-test").stdout.strip(),
             "hostname": flightvm.run("hostname").stdout.strip()}
    old = OUT / "old_key"
    if old.exists():  # the previous run's private key, against this run's VM
        res = subprocess.run(
            ["ssh", "-i", str(old), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=10", "-p", str(flightvm.ssh_port), "flightvm@127.0.0.1",
             "true"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        facts["old_key_rc"], facts["old_key_err"] = res.returncode, res.stderr[-300:]
    shutil.copyfile(flightvm.ssh.login.key, OUT / "this_key")
    os.chmod(OUT / "this_key", 0o600)
    flightvm.run("sudo touch /var/tmp/dirt; echo gone | sudo tee /etc/flightvm-state-test")
    (OUT / "facts.json").write_text(json.dumps(facts))


def test_b_clean(flightvm):
    assert flightvm.run("test -e /var/tmp/dirt", check=False).returncode == 1
    assert flightvm.run("cat /etc/flightvm-state-test").stdout.strip() == os.environ["STATE_TEST_MARK"]
'''


def _state_refs(cache: Path) -> dict[str, dict[str, Any]]:
    return {n: i for n, i in Store(cache / "states").refs().items() if n.startswith("state/")}


def _run(vm_suite: Any, out: Path, mark: str) -> tuple[Any, dict[str, Any], dict[str, Any], list[str]]:
    result, metrics = vm_suite.run("-v", "-p", "no:randomly", STATE_TEST_DIR=str(out),
                                   STATE_TEST_MARK=mark)
    lines = result.stdout.lines + result.stderr.lines
    result.assert_outcomes(passed=2)
    facts = json.loads((out / "facts.json").read_text())
    assert facts["mark"] == mark
    # the guest clock is the host's (set after the boot, or after the restore)
    assert facts["clock_low"] > -2 and facts["clock_high"] > -2, facts
    assert len(metrics["vms"]) == 1, metrics["vms"]
    return result, metrics, facts, lines


def _corrupt_stream(cache: Path, key_ref: str) -> None:
    """Break QEMU's stream in the saved state and keep the store's fingerprint of it: the
    blob passes the cheap check, only the restore can find out."""
    store = Store(cache / "states")
    manifest = json.loads(store.blob_path(store.ref_info(key_ref)["digest"]).read_bytes())
    path = store.blob_path(manifest["state"])
    offset = read_header(path).stream_offset
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        assert f.read(4) == b"QEVM"  # QEMU's stream magic
        f.seek(offset)
        f.write(b"XXXX")
    path.chmod(0o444)
    store._record(manifest["state"], os.stat(path))  # noqa: SLF001 - the damage is invisible


def test_state_cache_restore_evict_and_miss(vm_suite: Any, tmp_path: Path) -> None:
    Path("test_state_suite.py").write_text(SUITE)
    out = tmp_path / "out"
    out.mkdir()
    cache = vm_suite.cache_dir

    # 1. cold: booted, and the state published
    result, metrics, facts, _ = _run(vm_suite, out, "one")
    assert metrics["vms"][0]["start"] == "booted" and facts["started"] == "booted"
    cold = metrics["vms"][0]["ready_seconds"]
    refs = _state_refs(cache)
    assert len(refs) == 1, refs
    assert stat.S_IMODE((cache / "states").stat().st_mode) == 0o700
    shutil.move(out / "this_key", out / "old_key")

    # 2. warm: restored, with this run's identity
    result, metrics, facts, lines = _run(vm_suite, out, "one")
    vm = metrics["vms"][0]
    assert vm["start"] == "restored" and facts["started"] == "restored", vm
    assert vm["ready_seconds"] < cold, (vm, cold)
    assert any("restored request_to_ready=" in line for line in lines), lines[-20:]
    assert facts["old_key_rc"] == 255 and "Permission denied" in facts["old_key_err"], facts
    assert facts["hostname"] == facts["name"] == vm["name"]
    assert [r["mode"] for r in metrics["resets"]] == ["restore"] and metrics["resets"][0]["ok"]
    # a hit publishes nothing (it only marks the state used)
    assert {n: i["digest"] for n, i in _state_refs(cache).items()} == \
        {n: i["digest"] for n, i in refs.items()}

    print(f"state cache: cold request->ready {cold:.1f}s, restored {vm['ready_seconds']:.1f}s")

    # 3. and 4. at once (two boots overlap, one boot's time saved):
    # 4. another user-data: a miss, a boot, a second state (its own facts and metrics)
    out4 = tmp_path / "out4"
    out4.mkdir()
    metrics4 = tmp_path / "metrics4.json"
    run4 = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--flightvm-cache-dir={cache}",
         f"--flightvm-registry={vm_suite.registry}", f"--flightvm-metrics={metrics4}",
         "--flightvm-no-push", "-v", "-p", "no:randomly", "test_state_suite.py"],
        env={**os.environ, "STATE_TEST_DIR": str(out4), "STATE_TEST_MARK": "two"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # 3. a save file that no longer restores: evicted, booted, published again
        (key_ref,) = refs
        _corrupt_stream(cache, key_ref)
        result, metrics, facts, lines = _run(vm_suite, out, "one")
        assert metrics["vms"][0]["start"] == "booted"
        warnings = [line for line in lines if "did not restore" in line]
        assert len(warnings) == 1 and key_ref.removeprefix("state/")[:12] in warnings[0], \
            lines[-30:]
        output4, _ = run4.communicate(timeout=900)
    finally:
        if run4.poll() is None:
            run4.kill()  # ours, by pid; its VM goes with the next reap of this cache dir
            run4.wait()
    assert run4.returncode == 0, output4[-3000:]
    assert json.loads(metrics4.read_text())["vms"][0]["start"] == "booted", output4[-2000:]
    assert json.loads((out4 / "facts.json").read_text())["mark"] == "two"
    again = _state_refs(cache)
    assert len(again) == 2 and key_ref in again, again
    assert again[key_ref]["digest"] != refs[key_ref]["digest"]

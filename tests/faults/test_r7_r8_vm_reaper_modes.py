"""R7 + R8 on one real boot: file modes and QEMU's view of the base while a VM runs,
then kill -9 of the pytest that owns it, and the reaper.

1. Run A: a pytest session (subprocess, own process group) whose test holds a
   ready ``flightvm`` VM and sleeps. The base comes from the real registry.
2. Run B: another live run in the same cache dir that only defines and
   starts a domain through ``VMFactory`` (fault_child.py live-vm) and sleeps.
3. R8 on A's running VM: seed ISO, overlay and SSH key 0600, base blob 0444;
   libvirt lists the base only as a backing store; QEMU holds it read-only
   (QMP ``query-named-block-nodes`` and the open file's flags in /proc);
   ``qemu-img info --force-share --backing-chain`` on the overlay shows the
   frozen pristine disk (0400 in the VM dir, or 0444 in the private state store) and
   below it the base, both qcow2.
4. R7: kill -9 A's process group. ``flightvm gc`` removes A's domain and
   files; B (owner alive) is untouched. Then kill -9 B, and the next pytest
   session's start removes B. The base is unchanged at the end.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from faultkit import (
    CHILD,
    Tally,
    all_domains,
    base_env,
    cli,
    domains_referencing,
    kill_group,
    kill_pid,
    pid_alive,
    remove_domain,
    running_domains,
    sha256_file,
    virsh,
)

pytestmark = pytest.mark.vm

BOOT_WAIT = 900.0  # seconds to wait for A's VM: a TCG boot is ~60 s, slower on a busy host

HOLD = '''
import json, os, re, time
from pathlib import Path


def test_hold(flightvm, flightvm_image, flightvm_run):
    assert flightvm.run("echo up").stdout.strip() == "up"
    key = re.search(r"-i (\\S+)", flightvm.ssh_command()).group(1)
    info = {"name": flightvm.name, "pid": os.getpid(), "run_dir": str(flightvm_run.run_dir),
            "base": str(flightvm_image.path), "digest": flightvm_image.digest, "key": key}
    Path(os.environ["FAULTS_READY"]).write_text(json.dumps(info))
    time.sleep(3600)
'''

NEXT_SESSION = '''
def test_next_session(flightvm_factory):
    pass
'''


def mode(path: str | Path) -> int:
    return os.stat(path).st_mode & 0o777


def blklist(name: str) -> dict[str, str]:
    out = virsh("domblklist", name, "--details", check=True).stdout
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    return {row[2]: row[3] for row in rows if len(row) >= 4}


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def open_flags(pid: int, path: str) -> list[int]:
    """The access-mode flags of every fd of ``pid`` open on ``path``."""
    flags = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != path:
                continue
            text = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        flags.append(int(re.search(r"^flags:\s+([0-7]+)", text, re.M).group(1), 8))  # type: ignore[union-attr]
    return flags


def start_run_a(root: Path, cache: Path, registry: str) -> tuple[subprocess.Popen, Path]:  # type: ignore[type-arg]
    suite = root / "run-a"
    suite.mkdir()
    (suite / "test_hold.py").write_text(HOLD)
    ready = root / "a-ready.json"
    log = open(root / "run-a.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", "test_hold.py",
         f"--flightvm-cache-dir={cache}", f"--flightvm-registry={registry}",
         "--flightvm-no-push", "--flightvm-accel=tcg"],
        cwd=suite, env=base_env(FAULTS_READY=str(ready)), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc, ready


def wait_ready(proc: subprocess.Popen, ready: Path, log: Path) -> dict[str, Any]:  # type: ignore[type-arg]
    deadline = time.monotonic() + BOOT_WAIT
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("run A never held a ready VM:\n"
                                 + log.read_text(errors="replace")[-3000:])
        time.sleep(1)
    time.sleep(0.2)  # the file is written in one go; let it land
    return dict(json.loads(ready.read_text()))


def start_run_b(cache: Path, base: str, root: Path) -> tuple[subprocess.Popen, dict[str, Any]]:  # type: ignore[type-arg]
    err = open(root / "run-b.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), "live-vm", json.dumps({"cache_dir": str(cache), "base": base})],
        env=base_env(), stdout=subprocess.PIPE, stderr=err)
    err.close()
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else b""
    if not line:
        kill_pid(proc.pid)
        proc.wait()
        raise AssertionError("run B did not start its domain:\n"
                             + (root / "run-b.log").read_text(errors="replace")[-3000:])
    return proc, dict(json.loads(line))


def test_modes_then_kill_9_and_reap(real_base: dict[str, Any], tally: Tally,
                                    scratch: Path) -> None:
    cache = scratch / "cache"
    a_proc = b_proc = None
    names: list[str] = []
    try:
        a_proc, ready = start_run_a(scratch, cache, real_base["registry"])
        a = wait_ready(a_proc, ready, scratch / "run-a.log")
        names.append(a["name"])
        b_proc, b = start_run_b(cache, a["base"], scratch)
        names.append(b["name"])
        base = a["base"]
        assert a["name"] in running_domains() and b["name"] in running_domains()

        # -- R8 ------------------------------------------------------------------------------
        disks = blklist(a["name"])
        overlay, seed = disks["vda"], disks["sda"]
        with tally.trial("R8", "modes: seed ISO, overlay, SSH key 0600; base blob 0444"):
            for path in (seed, overlay, a["key"], b["overlay"], b["seed"], b["key"]):
                assert mode(path) == 0o600, f"{path} is {mode(path):o}"
            assert mode(base) == 0o444, f"base is {mode(base):o}"
            assert Path(base).parent == cache / "store" / "blobs" / "sha256"

        with tally.trial("R8", "libvirt: the base is only a backing store"):
            assert base not in blklist(a["name"]).values()
            root = ET.fromstring(virsh("dumpxml", a["name"], check=True).stdout)
            tops, backing = [], []
            for disk in root.iter("disk"):
                src = disk.find("source")
                tops.append(src.get("file") if src is not None else None)
                for bs in disk.iter("backingStore"):
                    bsrc = bs.find("source")
                    if bsrc is not None:
                        backing.append((disk.find("target").get("dev"), bsrc.get("file"),  # type: ignore[union-attr]
                                        bs.find("format").get("type")))  # type: ignore[union-attr]
            assert base not in tops, tops
            assert ("vda", base, "qcow2") in backing, backing

        with tally.trial("R8", "QEMU holds the base read-only"):
            pid = qemu_pid(a["name"])
            # How libvirt asked QEMU to open it: the base's file node may never be plain
            # read-write (libvirt gives backing files auto-read-only: QEMU opens them
            # read-only and would reopen read-write only for a block job), and the qcow2
            # node on top of it is read-only.
            blockdevs = [json.loads(arg) for prev, arg in pairwise(cmdline(pid))
                         if prev == "-blockdev"]
            storage = [b for b in blockdevs if b.get("filename") == base]
            assert storage, "no -blockdev for the base"
            for node in storage:
                assert node.get("read-only") is True or (
                    node.get("auto-read-only") is True and "read-only" not in node), node
            names = {node["node-name"] for node in storage}
            formats = [b for b in blockdevs if b.get("file") in names]
            assert formats and all(b.get("read-only") is True for b in formats), formats
            # What QEMU reports, and what it really holds open right now.
            qmp = virsh("qemu-monitor-command", a["name"],
                        '{"execute":"query-named-block-nodes"}', check=True).stdout
            nodes = {n["node-name"]: n for n in json.loads(qmp)["return"]}
            assert all(nodes[b["node-name"]]["ro"] for b in formats)
            assert any(n.get("file") == overlay and not n["ro"] for n in nodes.values())
            flags = open_flags(pid, base)
            assert flags, "QEMU has no fd open on the base"
            assert all(f & os.O_ACCMODE == os.O_RDONLY for f in flags), [oct(f) for f in flags]

        with tally.trial("R8", "qemu-img info --force-share: overlay -> frozen pristine -> base"):
            # The default reset saved the VM at its pristine point: the overlay it booted on
            # was frozen read-only, in its VM dir (0400) or, published by the state cache
            # (the default), in the private state store (0444), and the running overlay
            # sits on top of it.
            chain = json.loads(subprocess.run(
                ["qemu-img", "info", "--force-share", "--backing-chain", "--output=json", overlay],
                capture_output=True, text=True, check=True).stdout)
            assert [c["format"] for c in chain] == ["qcow2"] * 3, chain
            top, frozen = chain[0], chain[1]
            assert top.get("backing-filename-format") == "qcow2"
            frozen_at = Path(top["backing-filename"]).parent
            states = cache / "states" / "blobs" / "sha256"
            assert frozen_at in (Path(overlay).parent, states), frozen_at
            want = 0o400 if frozen_at == Path(overlay).parent else 0o444
            assert mode(top["backing-filename"]) == want, "the frozen disk must be read-only"
            if frozen_at == states:
                assert mode(str(cache / "states")) == 0o700
            assert frozen["backing-filename"] == base
            assert frozen.get("backing-filename-format") == "qcow2"
            assert chain[2].get("backing-filename") is None

        # -- R7 ------------------------------------------------------------------------------
        kill_group(a_proc)
        assert a["name"] in running_domains(), "the VM should outlive its killed pytest"
        assert not pid_alive(a["pid"])
        with tally.trial("R7", "flightvm gc removes the killed run's VM and files") as rec:
            gc = cli("gc", "--cache-dir", str(cache), "--libvirt-uri", "qemu:///system",
                     env=base_env())
            assert gc.returncode == 0, gc.stderr
            assert a["name"] not in all_domains()
            by_gc = f"removed domain {a['name']}" in gc.stdout
            rec["removed_by"] = "gc" if by_gc else "another session's start"
            if "PYTEST_XDIST_WORKER" not in os.environ:
                # Alone on the host it must be gc; under -n another session may get there first.
                assert by_gc, gc.stdout + gc.stderr
            assert not Path(overlay).exists() and not Path(seed).exists()
            assert not Path(a["run_dir"]).exists(), "the dead run's dir stayed"

        with tally.trial("R7", "a concurrent live run's VM is untouched"):
            assert b_proc.poll() is None
            assert b["name"] in running_domains()
            assert b["name"] not in gc.stdout
            for path in (b["overlay"], b["seed"], b["key"], Path(b["run_dir"]) / "run.json"):
                assert Path(path).exists(), f"{path} of the live run was removed"

        kill_pid(b_proc.pid)
        b_proc.wait()
        assert b["name"] in running_domains()
        with tally.trial("R7", "the next session's start reaps the killed live run"):
            suite = scratch / "next"
            suite.mkdir()
            (suite / "test_next.py").write_text(NEXT_SESSION)
            nxt = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_next.py",
                 f"--flightvm-cache-dir={cache}", f"--flightvm-registry={real_base['registry']}",
                 "--flightvm-no-push", "--flightvm-accel=tcg"],
                cwd=suite, env=base_env(), capture_output=True, text=True, timeout=300)
            assert nxt.returncode == 0, nxt.stdout[-2000:] + nxt.stderr[-2000:]
            assert f"removing domain {b['name']}" in nxt.stdout + nxt.stderr
            assert b["name"] not in all_domains()
            assert not Path(b["overlay"]).exists() and not Path(b["run_dir"]).exists()
            assert domains_referencing(str(cache)) == []

        with tally.trial("R8", "the base is unchanged after VMs ran on it and were killed"):
            assert sha256_file(Path(base)) == a["digest"] == real_base["digest"]
            assert mode(base) == 0o444
    finally:
        if a_proc is not None and a_proc.poll() is None:
            kill_group(a_proc)
        if b_proc is not None:
            kill_pid(b_proc.pid)
            b_proc.wait()
        for name in names:
            if name in all_domains():
                remove_domain(name)

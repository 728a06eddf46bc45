"""One VM for issue 17's console, progress and artifacts: a suite run with
--flightvm-artifacts and --junitxml, a passing test then a failing one (a reset between
them), its VM kept on failure. Checks: the boot's plain progress lines, the console log's
readers (failure section, --flightvm-console) with the pty serial, the failing test's
console log in the artifacts dir (text written after the restore included), the run's
metrics there, the junit entries' VM properties, and `virsh console NAME` attached to
the kept VM showing a login prompt."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from itertools import pairwise
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

URI = "qemu:///system"
MARK = "flightvm-console-after-restore"

SUITE = f'''
def test_passes(flightvm):
    assert flightvm.run("echo hi").stdout == "hi\\n"


def test_fails(flightvm):
    flightvm.sudo("echo {MARK} > /dev/ttyS0")
    assert flightvm.run("hostname").stdout.strip() == "not-this-host"
'''


def console_until(name: str, want: bytes = b"login:", timeout: float = 60.0) -> bytes:
    """Attach `virsh console NAME` under a pty, press Enter every 5 s, read until ``want``
    (or the deadline), detach with Ctrl+]; what the console showed after attaching."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: virsh on the pty
        os.execvp("virsh", ["virsh", "-c", URI, "console", "--force", name])
    buf, poked = b"", 0.0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            attached = buf.partition(b"Escape character")[2]
            if want in attached:
                break
            if attached and time.monotonic() - poked > 5:
                os.write(fd, b"\r")
                poked = time.monotonic()
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: virsh is gone
                    break
                if not chunk:
                    break
                buf += chunk
    finally:
        try:
            os.write(fd, b"\x1d")  # Ctrl+]: virsh detaches
        except OSError:
            pass
        for _ in range(50):
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)  # our own child, by pid
            os.waitpid(pid, 0)
        os.close(fd)
    return buf.partition(b"Escape character")[2]


def test_console_progress_and_artifacts(vm_suite) -> None:
    Path("test_console_suite.py").write_text(SUITE)
    art = vm_suite.cache_dir / "ci" / "artifacts"
    junit = vm_suite.cache_dir / "junit.xml"
    start = time.monotonic()
    result, metrics = vm_suite.run("-v", "--flightvm-keep=on-failure", "--flightvm-reset=restore",
                                   f"--flightvm-artifacts={art}", f"--junitxml={junit}",
                                   DEBUG_VM_CONSOLE="1")
    wall = time.monotonic() - start
    out, err = result.stdout.str(), result.stderr.str()
    kept_match = re.search(r"flightvm gc --name (\S+)", out)
    kept = kept_match.group(1) if kept_match else None
    try:
        result.assert_outcomes(passed=1, failed=1)
        assert kept is not None, out[-3000:]
        (vm,) = metrics["vms"]
        assert vm["name"] == kept

        # Boot progress: not a terminal, so plain lines, one per new stage, then ready. (A
        # KVM probe, where this HOME has no verdict yet, ends in "failed" and TCG follows.)
        lines = re.findall(rf"^flightvm: booting {re.escape(kept)} +(\d+)s  (.+)$", err, re.M)
        probes = [i for i, (_, stage) in enumerate(lines) if stage.strip() == "failed"]
        lines = lines[probes[-1] + 1:] if probes else lines
        stages = [stage.strip() for _, stage in lines]
        assert stages[-1] == "ready", err[-3000:]
        for stage in ("firmware", "kernel", "cloud-init init", "SSH answers"):
            assert stage in stages, (stage, stages)
        assert stages.index("kernel") < stages.index("cloud-init init") < stages.index("ready")
        assert all(a != b for a, b in pairwise(stages)), stages  # per change only
        seconds = [int(s) for s, _ in lines]
        assert seconds == sorted(seconds) and seconds[-1] > 5

        # Every other reader of the console log still reads it off the pty's log file: the
        # failing test's report section, and --flightvm-console's live copy on stderr.
        fail_block = out[out.index("_ test_fails _"):]
        assert f"flightvm console {kept}" in fail_block and MARK in fail_block
        assert re.search(rf"^\[{re.escape(kept)}\] \[ +0\.0+\] Linux version", err, re.M)
        assert re.search(rf"^\[{re.escape(kept)}\] .*{MARK}", err, re.M)

        # Artifacts: private dir, the kept VM's console (with what the failing test wrote to
        # the serial port after the reset's restore), and the run's metrics.
        assert stat.S_IMODE(art.stat().st_mode) == 0o700
        props = {case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
                 for case in ET.parse(junit).getroot().iter("testcase")}
        console = Path(props["test_fails"]["flightvm_console"])
        # <kept>.console.log, or <kept>-2.console.log after a KVM probe's boot of that name
        expected = {f"{kept}.console.log", f"flightvm-{metrics['run_id']}.metrics.json"}
        if probes:
            expected.add(f"{kept}-2.console.log")
        assert {p.name for p in art.iterdir()} == expected
        assert console.parent == art and console.name == (
            f"{kept}-2.console.log" if probes else f"{kept}.console.log")
        assert stat.S_IMODE(console.stat().st_mode) == 0o600
        text = console.read_text(errors="replace")
        assert "Linux version" in text and MARK in text
        assert text.index("Linux version") < text.index(MARK)
        saved = json.loads((art / f"flightvm-{metrics['run_id']}.metrics.json").read_text())
        assert [v["name"] for v in saved["vms"]] == [kept]

        # junit XML: each test's entry carries its VM, how it was made, the seconds.
        first, second = props["test_passes"], props["test_fails"]
        assert (first["flightvm_vm"], first["flightvm_vm_made"]) == (kept, "booted")
        assert (second["flightvm_vm"], second["flightvm_vm_made"]) == (kept, "reset")
        assert float(first["flightvm_vm_seconds"]) >= vm["boot_seconds"] > 5
        assert 0 < float(second["flightvm_vm_seconds"]) < float(first["flightvm_vm_seconds"])
        assert second["flightvm_console"] == first["flightvm_console"] == str(console)

        # The kept VM's console hint works: virsh console attaches and shows a login prompt.
        assert f"virsh -c {URI} console {kept}" in out
        seen = console_until(kept)
        assert f"{kept} login:".encode() in seen, seen[-500:]  # the guest's hostname is its name
        sys.stderr.write(f"suite wall {wall:.0f}s, boot_to_ready {vm['boot_seconds']:.0f}s\n")
    finally:
        if kept is not None:
            gc = subprocess.run([sys.executable, "-m", "pytest_flightvm.cli", "gc", "--name",
                                 kept, "--cache-dir", str(vm_suite.cache_dir)],
                                capture_output=True, text=True, timeout=120)
            assert gc.returncode == 0, gc.stderr

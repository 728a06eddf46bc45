"""VM lifecycle on real libvirt: console in failure reports only (and streamed live
with DEBUG_VM_CONSOLE=1), keep-on-failure
leaves a reachable VM that `flightvm gc --name` removes, the factory boots
VMs of different sizes, and the VM API (put/get) works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

SUITE = r'''
from pathlib import Path

import pytest


def test_passes(flightvm, tmp_path):
    src = tmp_path / "payload.txt"
    src.write_text("hello from the host\n")
    flightvm.put(src, "/tmp/payload.txt")
    back = flightvm.get("/tmp/payload.txt", tmp_path / "back.txt")
    assert back.read_text() == "hello from the host\n"
    assert "Linux version" in flightvm.console_log()


def test_fails(flightvm):
    flightvm.run("echo left-behind-by-the-failing-test | sudo tee /var/tmp/evidence")
    assert flightvm.run("hostname").stdout.strip() == "not-this-host"


@pytest.mark.flightvm(vcpus=2, user_data={"write_files": [{"path": "/etc/marked", "content": "yes\n"}]})
def test_marker_overrides(flightvm):
    assert flightvm.run("nproc").stdout.strip() == "2"
    assert flightvm.run("cat /etc/marked").stdout.strip() == "yes"


def test_factory_sizes(flightvm_factory):
    small = flightvm_factory.create(memory=768, vcpus=1)
    big = flightvm_factory.create(memory=1536, vcpus=2)
    def mem_mib(vm):
        kib = int(vm.run("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)
        return kib // 1024
    assert 600 < mem_mib(small) <= 768 < mem_mib(big) <= 1536
    assert small.run("nproc").stdout.strip() == "1"
    assert big.run("nproc").stdout.strip() == "2"
    assert small.name != big.name and small.ssh_port != big.ssh_port
'''


def test_report_keep_and_factory(vm_suite) -> None:
    Path("test_lifecycle_suite.py").write_text(SUITE)
    result, metrics = vm_suite.run("-v", "-rA", "--flightvm-keep=on-failure",
                                   DEBUG_VM_CONSOLE="1")
    result.assert_outcomes(passed=3, failed=1)
    out = result.stdout.str()

    # The console section appears for the failing test only.
    sections = re.findall(r"-+ flightvm console (\S+) -+", out)
    assert len(sections) == 1, sections
    fail_block = out[out.index("_ test_fails _"):]
    assert "flightvm console" in fail_block
    assert "login:" in fail_block or "Cloud-init" in fail_block  # real console text

    # keep-on-failure: the summary says how to reach and remove the kept VM ...
    ssh_line = next(line for line in out.splitlines() if line.strip().startswith("ssh:"))
    kept = re.search(r"flightvm gc --name (\S+)", out).group(1)
    assert kept == sections[0]
    ssh = ssh_line.split("ssh:", 1)[1].split()
    # ... and it is reachable, with the failing test's state still in it.
    proc = subprocess.run([*ssh, "-o", "BatchMode=yes", "cat /var/tmp/evidence"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "left-behind-by-the-failing-test", proc.stderr
    # Removing it is one command.
    gc = subprocess.run([sys.executable, "-m", "pytest_flightvm.cli", "gc", "--name", kept,
                         "--cache-dir", str(vm_suite.cache_dir)],
                        capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    names = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                           capture_output=True, text=True).stdout.split()
    assert kept not in names

    # The factory's VMs were both booted and are gone.
    sizes = sorted((vm["memory_mib"], vm["vcpus"]) for vm in metrics["vms"])
    assert (768, 1) in sizes and (1536, 2) in sizes
    assert (1024, 2) in sizes  # the marker's VM: default memory, vcpus=2
    assert not any(n.startswith("flightvm-" + metrics["run_id"]) for n in names)

    # DEBUG_VM_CONSOLE=1 (--flightvm-console) streamed every VM's console live to the
    # real stderr, past pytest's capture (the console is in no passing test's report),
    # each line tagged with its VM's name, from the kernel's first line to cloud-init's.
    err = result.stderr.str()
    booted = {vm["name"] for vm in metrics["vms"]}
    assert len(booted) == 4
    for marker in (r"\[ +0\.0+\] Linux version", r"Cloud-init v\. \S+ finished"):
        streamed = set(re.findall(rf"^\[(\S+)\] .*{marker}", err, re.M))
        assert streamed == booted, (marker, err[-2000:])
    assert not re.search(r"^\[flightvm-\S+\] ", out, re.M)  # never in a captured section

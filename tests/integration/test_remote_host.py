"""A VM on a "remote" libvirt host: this machine over an sshd of the test's own (loopback).

One module-scoped host and pool; one mixed ``-n 2`` run (one worker on the local host, one on
the "remote" one, a guest each), and every check shares those two guests:
- a kill -9 in the middle of a base upload leaves no volume a later run takes as complete
  (the next run uploads the whole base again);
- the base arrived through the storage API: the volume is in our pool, with the base's
  size and digest, and its completion mark;
- a port taken on the remote host (QEMU cannot bind the forward there) is retried;
- a named host port reaches the pytest machine's 127.0.0.1 from the remote guest too;
- the guest was reached through the jump: the test sshd's log shows the direct-tcpip
  channels to the guest's forward port, and ``vm.ssh_command()`` works from here;
- a per-test reset on the remote host (its internal snapshot) drops the guest's changes;
- both consoles stream live (--flightvm-console), the remote one pulled from its volume;
- the VM's volumes (overlay, seed, console) went with it, the base stayed;
- a second run skipped the upload (0 bytes, the metrics say so).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_flightvm.hosts import Host
from pytest_flightvm.procs import pid_namespace
from pytest_flightvm.vm.domain import DomainSpec, Owner
from pytest_flightvm.vm.libvirt_conn import connect
from pytest_flightvm.vm.reaper import write_run_file
from pytest_flightvm.vm.volumes import (
    HostStorage,
    base_volume_name,
    mark_volume_name,
    vm_volume_names,
)
from tests.remote_sshd import RemoteHost, available, start_remote_host

INNER = '''
import http.server, json, os, subprocess, threading, time

FETCH = ("python3 -c 'import sys, urllib.request as u; "
         "print(u.urlopen(sys.argv[1], timeout=8).read().decode().strip())' ")


def test_vm(flightvm, worker_id):
    assert flightvm.run("echo hi").stdout.strip() == "hi"
    # a named host port: the guest reaches this machine's 127.0.0.1, whichever host it runs on
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("served-to-" + worker_id).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        flightvm.set_host_ports([port])
        got = flightvm.run(FETCH + f"http://{flightvm.host_address}:{port}/", timeout=60)
        assert got.stdout.strip() == "served-to-" + worker_id
        flightvm.set_host_ports([])
    finally:
        httpd.shutdown()
    start = time.monotonic()
    for _ in range(10):
        flightvm.run("true")
    warm = (time.monotonic() - start) / 10
    flightvm.ssh.close()
    start = time.monotonic()
    flightvm.run("true")
    cold = time.monotonic() - start
    cmd = flightvm.ssh_command()
    pasted = subprocess.run(cmd + " -o BatchMode=yes -- cat /proc/sys/kernel/random/boot_id",
                            shell=True, capture_output=True, text=True, timeout=120)
    assert pasted.returncode == 0, pasted.stderr
    assert pasted.stdout.strip() == flightvm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    flightvm.run("echo dirty > /tmp/fvm-dirty")  # the next test's reset must drop it
    console = flightvm.console_log()
    with open(os.environ["FVM_OUT"] + "-" + worker_id + ".json", "w") as f:
        json.dump({"name": flightvm.name, "port": flightvm.ssh_port, "cmd": cmd,
                   "remote": flightvm.remote, "warm": warm, "cold": cold,
                   "console_has_kernel": "Linux version" in console,
                   "overlay": str(flightvm.spec.overlay), "seed": str(flightvm.spec.seed_iso),
                   "console_path": flightvm.spec.console_path}, f)


def test_reset(flightvm, worker_id):
    assert flightvm.run("test -e /tmp/fvm-dirty", check=False).returncode == 1
    with open(os.environ["FVM_OUT"] + "-" + worker_id + "-reset.json", "w") as f:
        json.dump({"remote": flightvm.remote}, f)
'''

# The remote worker's first SSH port is one this process holds: QEMU on the "remote" host
# (this machine) cannot bind it, and the factory must try another port.
CONFTEST = '''
import json, os, socket
import pytest
import pytest_flightvm.vm.factory as factory_mod


@pytest.fixture(scope="session", autouse=True)
def _block_first_remote_port(_flightvm_core, worker_id):
    if _flightvm_core.host.local:
        yield
        return
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    blocked = held.getsockname()[1]
    real = factory_mod.reserve_port
    calls = []

    def first_one_blocked(*args):
        calls.append(1)
        return blocked if len(calls) == 1 else real(*args)

    factory_mod.reserve_port = first_one_blocked
    with open(os.environ["FVM_OUT"] + "-blocked.json", "w") as f:
        json.dump({"worker": worker_id, "port": blocked}, f)
    try:
        yield
    finally:
        factory_mod.reserve_port = real
        held.close()
'''

SECOND = '''
def test_no_vm(flightvm_factory):
    pass
'''


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2**20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@pytest.fixture(scope="module")
def remote() -> Iterator[tuple[RemoteHost, Host, Path]]:
    why = available()
    if why:
        pytest.skip(why)
    sshd = start_remote_host()
    pool_dir = Path(tempfile.mkdtemp(prefix="fvm-pool-", dir="/var/tmp")) / "pool"
    pool = f"flightvm-test-{sshd.port}"
    host = Host(sshd.uri, 1, pool, str(pool_dir))
    try:
        yield sshd, host, pool_dir
    finally:
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            p = conn.storagePoolLookupByName(pool)
            for vol in p.listAllVolumes(0):
                vol.delete(0)
            if p.isActive():
                p.destroy()
            p.undefine()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
        sshd.stop()
        shutil.rmtree(pool_dir.parent, ignore_errors=True)


def _kill_mid_upload(host: Host, base: Path, digest: str, pool_dir: Path) -> int:
    """Start an upload in a child process; kill -9 it once part of the base is in the pool."""
    script = (
        "import sys; from pathlib import Path\n"
        "from pytest_flightvm.hosts import parse_hosts\n"
        "from pytest_flightvm.vm.libvirt_conn import connect\n"
        "from pytest_flightvm.vm.volumes import HostStorage\n"
        "host = parse_hosts(sys.argv[1], 'x')[0]\n"
        "HostStorage(connect(host.uri), host).ensure_base(Path(sys.argv[2]), sys.argv[3])\n")
    entry = f"{host.uri}#pool={host.pool}&pool_dir={host.pool_dir}"
    child = subprocess.Popen([sys.executable, "-c", script, entry, str(base), digest])
    target = pool_dir / base_volume_name(digest)
    seen = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            try:  # the volume is made sparse at full size: count what was written
                seen = target.stat().st_blocks * 512
            except OSError:
                seen = 0
            if seen > 32 * 2**20:
                break
            time.sleep(0.01)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the upload finished before it could be killed"
    return seen


def _plant_dead_domain(conn: Any, host: Host, runs_dir: Path) -> tuple[str, tuple[str, ...]]:
    """A defined (never started) domain on the host whose owner is dead, with its three
    volumes in our pool, the way a kill -9 of a run leaves one."""
    child = subprocess.Popen(["true"])
    child.wait()  # a pid that is gone
    run_id = "250101000000-dead"
    run_dir = runs_dir / run_id
    name = f"flightvm-{run_id}-gw0-2"
    vm_dir = run_dir / "vms" / name
    vm_dir.mkdir(parents=True)
    write_run_file(run_dir, pid=child.pid)  # the run's owner: that dead pid
    vols = vm_volume_names(name)
    storage = HostStorage(conn, host)
    paths = []
    for vol in vols:
        made = storage.pool().createXML(f"<volume><name>{vol}</name><capacity>1024</capacity>"
                                        "<target><format type='raw'/></target></volume>", 0)
        paths.append(made.path())
    owner = Owner(run_id, child.pid, "", socket.gethostname(), "gw0", str(run_dir),
                  pid_namespace())
    spec = DomainSpec(name=name, overlay=Path(paths[0]), seed_iso=Path(paths[1]),
                      console_log=vm_dir / "console.log", ssh_port=1, mac="52:54:00:00:00:02",
                      owner=owner, files=(vm_dir,), console_path=paths[2], pool=host.pool,
                      volumes=vols)
    conn.defineXML(spec.to_xml())
    return name, vols


def test_vm_on_a_remote_host(vm_suite: Any, base_in_registry: dict[str, Any],
                             remote: tuple[RemoteHost, Host, Path]) -> None:
    sshd, host, pool_dir = remote
    base, digest = Path(base_in_registry["path"]), base_in_registry["digest"]
    size = base.stat().st_size

    # 1. kill -9 mid-upload: a partial base and no mark; nothing counts it as complete
    seen = _kill_mid_upload(host, base, digest, pool_dir)
    assert 0 < seen < size
    assert (pool_dir / base_volume_name(digest)).stat().st_blocks * 512 < size
    assert not (pool_dir / mark_volume_name(digest)).exists()
    conn = connect(host.uri)
    try:
        assert HostStorage(conn, host).base_present(digest, size) is None
    finally:
        conn.close()

    # 2. a mixed -n 2 run, one worker per host (one slot each): the remote worker uploads the
    # whole base again, boots there and reaches its guest; the local one runs as before
    entry = f"{host.uri}#slots=1&pool={host.pool}&pool_dir={host.pool_dir}"
    out = vm_suite.cache_dir / "inner"
    Path("test_remote.py").write_text(INNER)
    Path("conftest.py").write_text(CONFTEST)
    before = sshd.log_text().count("server_request_direct_tcpip")
    started = time.monotonic()
    result, metrics = vm_suite.run(f"--flightvm-hosts=qemu:///system#slots=1,{entry}",
                                   "-n", "2", "--dist", "each", FVM_OUT=str(out),
                                   DEBUG_VM_CONSOLE="1")
    wall = time.monotonic() - started
    result.assert_outcomes(passed=4)
    vms = [json.loads(p.read_text()) for p in sorted(out.parent.glob("inner-gw?.json"))]
    assert sorted(v["remote"] for v in vms) == [False, True], vms
    inner = next(v for v in vms if v["remote"])
    local = next(v for v in vms if not v["remote"])
    assert sorted(metrics["hosts"].values()) == sorted([host.label, "qemu:///system"])
    [upload] = metrics["uploads"]  # only the remote worker uploads
    assert upload["bytes"] == size and upload["skipped"] is False and upload["digest"] == digest
    # the local worker's VM: files in its VM dir, no jump (today's path)
    assert "ProxyCommand" not in local["cmd"] and local["console_path"] is None
    assert Path(local["overlay"]).is_relative_to(vm_suite.cache_dir / "runs")
    assert "ProxyCommand=" in inner["cmd"]
    # its first port was taken on the host: QEMU failed to bind it, another port was used
    blocked = json.loads((out.parent / "inner-blocked.json").read_text())["port"]
    assert inner["port"] != blocked
    assert f"flightvm: port {blocked} is taken on the libvirt host of" in result.stderr.str() \
        + result.stdout.str()
    # --flightvm-console streamed both consoles live, the remote one pulled from its volume
    err = result.stderr.str()
    for marker in (r"\[ +0\.0+\] Linux version", r"Cloud-init v\. \S+ finished"):
        streamed = set(re.findall(rf"^\[(\S+)\] .*{marker}", err, re.M))
        assert streamed == {inner["name"], local["name"]}, (marker, err[-2000:])
    # each worker's second test ran after a reset: the remote one by its internal snapshot
    resets = {r["vm"]: r for r in metrics["resets"]}
    assert resets[inner["name"]]["mode"] == "internal" and resets[inner["name"]]["ok"], resets
    assert resets[local["name"]]["ok"], resets

    # the base arrived through the storage API: in our pool, right size and digest, marked
    vol_path = pool_dir / base_volume_name(digest)
    assert vol_path.stat().st_size == size
    assert _sha256(vol_path) == digest
    mark = (pool_dir / mark_volume_name(digest)).read_text().split()
    assert mark == [str(size), digest]
    # the guest's disks were volumes in that pool, and its console was mirrored from one
    for key in ("overlay", "seed", "console_path"):
        assert Path(inner[key]).parent == pool_dir, inner
    assert inner["console_has_kernel"], "the remote console volume never reached the mirror"
    # ... and all three went with the VM; the base stayed
    left = sorted(p.name for p in pool_dir.iterdir())
    assert left == sorted([base_volume_name(digest), mark_volume_name(digest)]), left

    # the guest was reached through the jump: direct-tcpip channels to its forward port
    log = sshd.log_text()
    channels = [line for line in log.splitlines()
                if "server_request_direct_tcpip" in line
                and line.rstrip().endswith(f"target 127.0.0.1 port {inner['port']}")]
    assert len(channels) >= 2, log[-2000:]  # the runs' connections and the pasted command
    assert log.count("server_request_direct_tcpip") > before

    # 3. a second run: the pool has the digest, nothing is uploaded
    Path("test_remote.py").unlink()
    Path("conftest.py").unlink()
    Path("test_second.py").write_text(SECOND)
    result2, metrics2 = vm_suite.run(f"--flightvm-hosts={entry}")
    result2.assert_outcomes(passed=1)
    [upload2] = metrics2["uploads"]
    assert upload2["bytes"] == 0 and upload2["skipped"] is True
    assert vol_path.stat().st_size == size
    # 4. flightvm gc walks the remote host too: a dead run's domain goes with its volumes; a
    # VM volume left by a dead run with no domain goes; a volume not named like a VM's, and
    # the base, stay
    dead = "flightvm-250101000000-dead-gw0-1-overlay.qcow2"
    conn = connect(host.uri)
    try:
        dead_dom, dead_vols = _plant_dead_domain(conn, host, vm_suite.cache_dir / "runs")
        storage = HostStorage(conn, host)
        for name in (dead, "notours.qcow2"):
            storage.pool().createXML(f"<volume><name>{name}</name><capacity>1024</capacity>"
                                     "<target><format type='raw'/></target></volume>", 0)
    finally:
        conn.close()
    gc = subprocess.run([sys.executable, "-m", "pytest_flightvm.cli", "gc",
                         f"--cache-dir={vm_suite.cache_dir}", f"--hosts={entry}"],
                        capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert f"removed volume {host.pool}/{dead}" in gc.stdout, gc.stdout + gc.stderr
    assert f"removed domain {dead_dom}" in gc.stdout, gc.stdout + gc.stderr
    assert not any((pool_dir / v).exists() for v in dead_vols), sorted(os.listdir(pool_dir))
    assert not (vm_suite.cache_dir / "runs" / "250101000000-dead").exists()
    conn = connect(host.uri)
    try:
        assert dead_dom not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    assert not (pool_dir / dead).exists() and (pool_dir / "notours.qcow2").exists()
    assert vol_path.exists() and (pool_dir / mark_volume_name(digest)).exists()

    # 5. flightvm doctor checks each host: reachable, our pool, its free disk, the accel
    doc = subprocess.run([sys.executable, "-m", "pytest_flightvm.cli", "doctor",
                          f"--cache-dir={vm_suite.cache_dir}",
                          f"--hosts=qemu:///system,{entry}"],
                         capture_output=True, text=True, timeout=120)
    lines = doc.stdout.splitlines()
    assert any(x.startswith("ok") and f"host {host.label}" in x and "answers" in x
               for x in lines), doc.stdout
    assert any(x.startswith("ok") and f"pool {host.pool}" in x and "active" in x
               for x in lines), doc.stdout
    assert any("accel" in x and "remote host" in x for x in lines), doc.stdout

    print(f"mixed -n 2 run: wall {wall:.1f}s, upload {upload['seconds']}s for {size} bytes, "
          f"second run {upload2['seconds']}s; ssh per command warm local {local['warm']:.3f}s "
          f"remote {inner['warm']:.3f}s, fresh connection local {local['cold']:.3f}s "
          f"remote {inner['cold']:.3f}s")

"""The closed guest network on a real guest: a named host port answers by the host alias,
an unnamed one does not, a marker adds a port for one test only, and the SSH host key is
pinned (a wrong known_hosts is refused). One VM serves every check: the pool reverts it
between the three tests, so the forwards are re-opened after each revert too.

The host servers are loopback HTTP servers of this test process, on free ports; the
suite runs in a pytester subprocess with ``--flightvm-host-port`` and
``--flightvm-host-alias``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TagServer

pytestmark = pytest.mark.vm

ALIAS = "flightvm-host.test"

SUITE = r'''
import json
import os
import subprocess
from pathlib import Path

import pytest

ALIAS = os.environ["GN_ALIAS"]
NAMED = int(os.environ["GN_NAMED"])
OTHER = int(os.environ["GN_OTHER"])
OUT = Path(os.environ["GN_OUT"])

FETCH = ("python3 -c 'import sys, urllib.request as u\n"
         "try:\n"
         "    print(u.urlopen(sys.argv[1], timeout=8).read().decode().strip())\n"
         "except Exception as e:\n"
         "    print(\"ERR\", type(e).__name__, e); sys.exit(3)' ")


def fetch(vm, url):
    return vm.run(FETCH + url, check=False, timeout=60)


def record(key, **facts):
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[key] = facts
    OUT.write_text(json.dumps(data))


def test_a_named_port_by_alias_and_pinned_key(flightvm, tmp_path):
    assert flightvm.host_address == "127.0.0.1"
    assert flightvm.host_ports == (NAMED,)
    hosts = flightvm.run(f"getent hosts {ALIAS}").stdout.split()
    named = fetch(flightvm, f"http://{ALIAS}:{NAMED}/a")
    other = fetch(flightvm, f"http://{ALIAS}:{OTHER}/a")
    other_gw = fetch(flightvm, f"http://10.0.2.2:{OTHER}/a")
    # the pinned host key: the guest's key is the one in the VM's known_hosts
    known = flightvm.ssh.known_hosts.read_text().split()
    guest_pub = flightvm.run("sudo cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()
    # a second connection with a wrong known_hosts (another key for the same host:port)
    wrong = tmp_path / "wrong_known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    other_key = (tmp_path / "k.pub").read_text().split()[:2]
    wrong.write_text(f"[127.0.0.1]:{flightvm.ssh_port} {' '.join(other_key)}\n")
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={wrong}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=20", "-i", str(flightvm.ssh.key),
            "-p", str(flightvm.ssh_port), "flightvm@127.0.0.1", "true"]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    printed = subprocess.run(flightvm.ssh_command().split() + ["-o", "BatchMode=yes", "hostname"],
                             capture_output=True, text=True, timeout=60)
    record("a", hosts=hosts, named=named.stdout.strip(), named_rc=named.returncode,
           other=other.stdout.strip(), other_rc=other.returncode,
           other_gw=other_gw.stdout.strip(), other_gw_rc=other_gw.returncode,
           known=known, guest_pub=guest_pub,
           refused_rc=refused.returncode, refused_err=refused.stderr[-400:],
           printed_cmd=flightvm.ssh_command(), printed_rc=printed.returncode,
           printed_out=printed.stdout.strip(), name=flightvm.name,
           key_mode=oct(os.stat(flightvm.vm_dir / "ssh_host_ed25519_key").st_mode & 0o777),
           known_mode=oct(os.stat(flightvm.ssh.known_hosts).st_mode & 0o777))


@pytest.mark.flightvm(host_ports=[OTHER])
def test_b_marker_adds_a_port(flightvm):
    other = fetch(flightvm, f"http://{ALIAS}:{OTHER}/b")
    named = fetch(flightvm, f"http://{ALIAS}:{NAMED}/b")
    record("b", other=other.stdout.strip(), other_rc=other.returncode,
           named=named.stdout.strip(), ports=list(flightvm.host_ports), name=flightvm.name)


def test_c_marker_port_gone_again_and_reboot(flightvm):
    other = fetch(flightvm, f"http://{ALIAS}:{OTHER}/c")
    named = fetch(flightvm, f"http://{ALIAS}:{NAMED}/c")
    # a reboot drops the forwarding connection; vm.reboot() opens it again, and the
    # alias line outlives the boot (cloud-init re-renders /etc/hosts on each boot)
    flightvm.reboot()
    hosts = flightvm.run(f"getent hosts {ALIAS}", check=False).stdout.split()
    rebooted = fetch(flightvm, f"http://{ALIAS}:{NAMED}/rebooted")
    record("c", other=other.stdout.strip(), other_rc=other.returncode,
           named=named.stdout.strip(), ports=list(flightvm.host_ports), name=flightvm.name,
           forward_seconds=flightvm.host_port_seconds, hosts_after_reboot=hosts,
           rebooted=rebooted.stdout.strip())
'''


@pytest.fixture
def servers() -> Iterator[tuple[TagServer, TagServer]]:
    named, other = TagServer("named-host-service"), TagServer("other-host-service")
    yield named, other
    named.close()
    other.close()


def test_named_host_ports_alias_and_pinned_host_key(vm_suite, servers, tmp_path: Path) -> None:
    named, other = servers
    Path("test_guest_network_suite.py").write_text(SUITE)
    out = tmp_path / "facts.json"
    result, _metrics = vm_suite.run(
        "-v", "-p", "no:randomly", "--flightvm-accel=tcg", f"--flightvm-host-port={named.port}",
        f"--flightvm-host-alias={ALIAS}",
        GN_ALIAS=ALIAS, GN_NAMED=str(named.port), GN_OTHER=str(other.port), GN_OUT=str(out))
    result.assert_outcomes(passed=3)
    facts = json.loads(out.read_text())
    a, b, c = facts["a"], facts["b"], facts["c"]
    print(json.dumps(facts, indent=1))  # the figures, in the -s / failure output

    # one VM for all three tests
    assert a["name"] == b["name"] == c["name"]
    # the alias names the host address in the guest's /etc/hosts
    assert a["hosts"][:2] == ["127.0.0.1", ALIAS]
    # the named port answers by the alias ...
    assert a["named_rc"] == 0 and a["named"] == "named-host-service /a", a
    # ... an unnamed one does not, by the alias or through slirp's gateway
    assert a["other_rc"] == 3 and a["other"].startswith("ERR"), a
    assert a["other_gw_rc"] == 3 and a["other_gw"].startswith("ERR"), a
    # a marker adds a port for its test only; the configured one stays
    assert b["other_rc"] == 0 and b["other"] == "other-host-service /b", b
    assert b["named"] == "named-host-service /b" and sorted(b["ports"]) == sorted(
        [named.port, other.port])
    assert c["other_rc"] == 3 and c["ports"] == [named.port], c
    assert c["named"] == "named-host-service /c"
    assert c["hosts_after_reboot"][:2] == ["127.0.0.1", ALIAS], c
    assert c["rebooted"] == "named-host-service /rebooted", c
    assert other.paths == ["/b"], other.paths  # nothing else ever reached it
    assert named.paths == ["/a", "/b", "/c", "/rebooted"], named.paths

    # the host key: the guest's ed25519 key is the pinned one, files are 0600
    assert a["known"][0] == f"[127.0.0.1]:{a['printed_cmd'].split()[2]}"
    assert a["known"][1:3] == a["guest_pub"][:2], (a["known"], a["guest_pub"])
    assert a["key_mode"] == a["known_mode"] == "0o600"
    # a wrong known_hosts is refused; the printed command (pinned known_hosts) works
    assert a["refused_rc"] == 255 and "Host key verification failed" in a["refused_err"], a
    assert "StrictHostKeyChecking=yes" in a["printed_cmd"]
    assert a["printed_rc"] == 0 and a["printed_out"] == a["name"], a

"""The closed guest network without a VM: options, the netdev argument, forward argv,
per-VM host keys and known_hosts, and the host-alias pieces."""

from __future__ import annotations

import os
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from pytest_flightvm.config import parse_hostname, parse_ports, resolve
from pytest_flightvm.errors import ConfigError, FlightVMError
from pytest_flightvm.seed.render import SeedSpec, build_user_data
from pytest_flightvm.vm.domain import DomainSpec, Owner, netdev_arg
from pytest_flightvm.vm.hostkey import (
    generate_host_key,
    known_hosts_entry,
    write_exclusive,
    write_known_hosts,
)
from pytest_flightvm.vm.hostports import (
    HOSTS_TAG,
    alias_user_data,
    forward_args,
    hosts_line,
    install_host_alias,
)
from pytest_flightvm.vm.ssh import CommandResult, SSHClient
from tests.support import run_marked_test

QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}arg"


# ------------------------------------------------------------------ options
def test_host_ports_from_cli_ini_and_marker_forms(tmp_path: Path) -> None:
    s = resolve({"host_ports": ["8443", "5001,5002"]}, {"host_ports": ["9"]}, {}, rootdir=tmp_path)
    assert s.host_ports == (8443, 5001, 5002)  # CLI wins over ini, as every option
    s = resolve({}, {"host_ports": ["8443", " 3000", "8443"]}, {}, rootdir=tmp_path)
    assert s.host_ports == (8443, 3000)  # ini line list, duplicates dropped
    assert resolve({}, {}, {}, rootdir=tmp_path).host_ports == ()  # closed by default
    assert parse_ports([443, "80"], "marker") == (443, 80)


@pytest.mark.parametrize("raw, fragment", [
    (["0"], "port 0 is out of range; use 1-65535"),
    (["70000"], "port 70000 is out of range"),
    (["http"], "expected a port number (1-65535), got 'http'"),
    ([True], "expected a port number"),
    (3.5, "expected a list of port numbers"),
    ([3.5], "expected a port number"),
])
def test_bad_host_ports_are_one_line(raw: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_ports(raw, "--flightvm-host-port")
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("--flightvm-host-port: ")


def test_host_alias_is_validated(tmp_path: Path) -> None:
    assert resolve({"host_alias": "api.flightctl.test"}, {}, {},
                   rootdir=tmp_path).host_alias == "api.flightctl.test"
    for bad in ("two words", "a;rm -rf /", "localhost", "-x", "x" * 300):
        with pytest.raises(ConfigError, match="not a usable host name"):
            parse_hostname(bad, "ini flightvm_host_alias")


def test_guest_outbound_is_opt_in_with_an_env_twin(tmp_path: Path) -> None:
    assert resolve({}, {}, {}, rootdir=tmp_path).guest_outbound is False
    assert resolve({}, {}, {"FLIGHTVM_GUEST_OUTBOUND": "1"}, rootdir=tmp_path).guest_outbound
    assert resolve({}, {"guest_outbound": "true"}, {}, rootdir=tmp_path).guest_outbound
    with pytest.raises(ConfigError, match="env FLIGHTVM_GUEST_OUTBOUND: expected true or false"):
        resolve({}, {}, {"FLIGHTVM_GUEST_OUTBOUND": "maybe"}, rootdir=tmp_path)


# ------------------------------------------------------------------ the netdev
def _spec(tmp_path: Path, **kw: object) -> DomainSpec:
    base: dict[str, object] = dict(
        name="flightvm-r-gw0-1", overlay=tmp_path / "o.qcow2", seed_iso=None,
        console_log=tmp_path / "c.log", ssh_port=40022, mac="52:54:00:aa:bb:cc",
        owner=Owner.current("r", "gw0", tmp_path))
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


def test_netdev_is_closed_unless_outbound(tmp_path: Path) -> None:
    assert netdev_arg(2222, outbound=False) == \
        "user,id=fvmnet0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"
    assert netdev_arg(2222, outbound=True) == "user,id=fvmnet0,hostfwd=tcp:127.0.0.1:2222-:22"
    for outbound, restricted in ((False, True), (True, False)):
        root = ET.fromstring(_spec(tmp_path, outbound=outbound).to_xml())
        args = [a.get("value") or "" for a in root.iter(QEMU_NS)]
        netdev = args[args.index("-netdev") + 1]
        assert ("restrict=on" in netdev) is restricted
        assert "hostfwd=tcp:127.0.0.1:40022-:22" in netdev
        assert "guestfwd" not in netdev  # crashes QEMU under libvirt's sandbox here


def test_forward_args_bind_the_guest_loopback_to_the_host_loopback() -> None:
    assert forward_args([8443, 5001]) == ["-R", "127.0.0.1:8443:127.0.0.1:8443",
                                          "-R", "127.0.0.1:5001:127.0.0.1:5001"]
    assert forward_args([]) == []


# ------------------------------------------------------------------ host keys
def test_host_key_files_are_new_and_private(tmp_path: Path) -> None:
    key = generate_host_key(tmp_path, "flightvm-x")
    for path in (key.private, tmp_path / "ssh_host_ed25519_key.pub"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.public_line.startswith("ssh-ed25519 ") and key.public_line.endswith("flightvm-x")
    assert "OPENSSH PRIVATE KEY" in key.private.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hostkey-")] == []
    # the public half really belongs to the private half
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key.private)], capture_output=True,
                             text=True, check=True).stdout.split()[:2]
    assert derived == key.public_line.split()[:2]
    # a second key for the same dir is refused, never reused
    with pytest.raises(FlightVMError, match="already exists"):
        generate_host_key(tmp_path, "flightvm-x")


def test_a_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "known_hosts").symlink_to(victim)
    with pytest.raises(FlightVMError, match="already exists"):
        write_known_hosts(tmp_path, "127.0.0.1", 2222, None)
    assert victim.read_text() == "precious\n"
    target = tmp_path / "new"
    write_exclusive(target, b"x")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_known_hosts_pins_the_key_or_starts_empty(tmp_path: Path) -> None:
    key = generate_host_key(tmp_path, "vm")
    pinned = write_known_hosts(tmp_path, "127.0.0.1", 40022, key)
    line = pinned.read_text()
    assert line == f"[127.0.0.1]:40022 {' '.join(key.public_line.split()[:2])}\n"
    assert known_hosts_entry("h", 22, "ssh-ed25519 AAAA c") == "h ssh-ed25519 AAAA"
    (tmp_path / "empty").mkdir()
    assert write_known_hosts(tmp_path / "empty", "127.0.0.1", 1, None).read_text() == ""


def test_seed_user_data_carries_the_host_key_and_the_alias(tmp_path: Path) -> None:
    key = generate_host_key(tmp_path, "vm")
    spec = SeedSpec(instance_id="i-1", hostname="vm", mac="52:54:00:aa:bb:cc",
                    ssh_public_key="ssh-ed25519 AAAA user",
                    user_data=(alias_user_data("api.test", "127.0.0.1"), key.user_data(),
                               {"write_files": [{"path": "/etc/x", "content": "y"}]}))
    data = build_user_data(spec)
    assert data["ssh_keys"]["ed25519_private"] == key.private.read_text()
    assert data["ssh_keys"]["ed25519_public"] == key.public_line
    assert data["ssh_deletekeys"] is True
    assert data["manage_etc_hosts"] == "localhost"  # "true" re-renders /etc/hosts each boot
    # the alias line survives a suite's own write_files (lists concatenate)
    assert data["write_files"][0] == {"path": "/etc/hosts", "append": True,
                                      "content": f"127.0.0.1 api.test {HOSTS_TAG}\n"}
    assert data["write_files"][1]["path"] == "/etc/x"
    yaml.safe_load(yaml.safe_dump(data))  # stays plain YAML


# ------------------------------------------------------------------ ssh options
def test_ssh_checks_the_pinned_host_key(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    client = SSHClient(2222, tmp_path / "id", "flightvm", known_hosts=kh)
    opts = client.options()
    assert opts[opts.index("-o", opts.index("BatchMode=yes")) + 1] == "StrictHostKeyChecking=yes"
    assert f"UserKnownHostsFile={kh}" in opts and "GlobalKnownHostsFile=/dev/null" in opts
    assert "StrictHostKeyChecking=no" not in opts
    assert "StrictHostKeyChecking=yes" in client.command()
    assert f"UserKnownHostsFile={kh}" in client.command()
    first = SSHClient(2222, tmp_path / "id", "user", known_hosts=kh, host_key_check="accept-new")
    assert "StrictHostKeyChecking=accept-new" in first.options()
    for c in (client, first):
        c.cleanup()


# ------------------------------------------------------------------ alias over SSH
def test_install_host_alias_edits_hosts_idempotently(tmp_path: Path) -> None:
    """The command it sends, run against a copy of /etc/hosts: adds the line once,
    replaces an older alias line, leaves every other line alone."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.0.0.9 old.alias " + HOSTS_TAG + "\n")
    sent: list[str] = []

    def run(cmd: str, **_: object) -> CommandResult:
        sent.append(cmd)
        local = cmd.replace("sudo sh -c", "sh -c").replace("/etc/hosts", str(hosts))
        proc = subprocess.run(local, shell=True, capture_output=True, text=True)
        return CommandResult(cmd, proc.returncode, proc.stdout, proc.stderr)

    install_host_alias(run, "api.test", "127.0.0.1")
    install_host_alias(run, "api.test", "127.0.0.1")
    assert hosts.read_text() == "127.0.0.1 localhost\n" + hosts_line("api.test", "127.0.0.1") + "\n"
    assert all(c.startswith("sudo sh -c ") for c in sent)


# ------------------------------------------------------------------ the plugin's spellings
def test_plugin_takes_repeated_host_ports_alias_and_outbound(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nflightvm_host_alias = api.test\n")
    pytester.makepyfile("""
        def test_s(flightvm_settings):
            assert flightvm_settings.host_ports == (8443, 5001)
            assert flightvm_settings.host_alias == "api.test"
            assert flightvm_settings.guest_outbound is True
    """)
    result = pytester.runpytest_subprocess("--flightvm-host-port=8443", "--flightvm-host-port",
                                           "5001", "--flightvm-guest-outbound",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_plugin_bad_host_port_is_a_one_line_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(flightvm): pass")
    result = pytester.runpytest_subprocess("--flightvm-host-port=99999", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: flightvm: --flightvm-host-port: port 99999 is out of "
                                 "range; use 1-65535"])
    assert "Traceback" not in result.stderr.str()


def test_marker_host_ports_is_known_and_checked(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result = run_marked_test(pytester, tmp_path, 'host_ports=["nope"]')
    assert result.ret != 0
    assert "unknown argument" not in result.stdout.str()
    assert "Traceback" not in result.stdout.str()
    # checked before the (bad) pinned image is looked at, as the other marker arguments
    result.stdout.fnmatch_lines(["*flightvm: marker flightvm host_ports: expected a port number "
                                 "(1-65535), got 'nope'*"])
    assert "nonexistent.qcow2" not in result.stdout.str()


def test_a_guest_with_another_host_key_fails_the_boot_in_one_line(tmp_path: Path) -> None:
    """The readiness probe does not wait out the boot timeout on a mismatched host key."""
    from pytest_flightvm.errors import BootError
    from pytest_flightvm.vm.machine import Machine

    class StubSSH:
        known_hosts = tmp_path / "known_hosts"
        user, host = "flightvm", "127.0.0.1"
        _control_dir = tmp_path

        def run(self, cmd: str, **_: object) -> CommandResult:
            return CommandResult(cmd, 255, "", "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS "
                                 "CHANGED! @@@\nHost key verification failed.\n")

    vm = Machine(None, _spec(tmp_path), StubSSH(), base=tmp_path / "b",  # type: ignore[arg-type]
                 vm_dir=tmp_path, boot_timeout=1)
    with pytest.raises(BootError) as err:
        vm._guest_ready()
    assert "presented an SSH host key that is not the one pinned in" in str(err.value)
    assert "\n" not in str(err.value) and "Host key verification failed" in err.value.detail

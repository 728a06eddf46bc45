"""--flightvm-hosts: parsing, worker assignment by free slots, the SSH jump, remote domain XML."""

from __future__ import annotations

import json
import shlex
import threading
from pathlib import Path

import pytest

from pytest_flightvm.config import resolve
from pytest_flightvm.errors import ConfigError
from pytest_flightvm.hosts import DEFAULT_POOL, Host, assign, parse_hosts, pick
from pytest_flightvm.vm.domain import DomainSpec, Owner, parse_metadata
from pytest_flightvm.vm.ssh import SSHClient
from pytest_flightvm.vm.volumes import base_volume_name, mark_volume_name, vm_volume_names

REMOTE = "qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k/id&no_verify=1"


def test_parse_entries_with_slots_pool_and_defaults() -> None:
    hosts = parse_hosts(f"qemu:///system#slots=2, {REMOTE}#slots=4&pool=flightvm-ci"
                        "&pool_dir=/srv/fvm", "--flightvm-hosts")
    assert [(h.local, h.slots, h.pool, h.pool_dir) for h in hosts] == [
        (True, 2, DEFAULT_POOL, "/var/lib/flightvm/images"),
        (False, 4, "flightvm-ci", "/srv/fvm")]
    assert hosts[1].uri == REMOTE  # the fragment is ours, never handed to libvirt
    assert hosts[1].label == "qemu+ssh://root@127.0.0.1:2222/system"  # no key path in messages
    assert parse_hosts(["qemu:///system", ""], "ini")[0].slots == 1
    assert parse_hosts("qemu:///system\nqemu:///session", "ini")[1].uri == "qemu:///session"


@pytest.mark.parametrize(("raw", "match"), [
    ("qemu:///system#slots=0", "slots must be a whole number"),
    ("qemu:///system#slots=x", "slots must be a whole number"),
    ("qemu:///system#cpus=2", "unknown or repeated"),
    ("qemu:///system#slots=1&slots=2", "unknown or repeated"),
    ("qemu+tcp://h/system", "must be qemu\\+ssh"),
    ("qemu+ssh:///system", "needs a host"),
    ("http://h/", "not a libvirt URI"),
    ("qemu://", "not a libvirt URI"),
    (f"{REMOTE}#pool=default", "must start with 'flightvm'"),
    (f"{REMOTE}#pool=flightvm/x", "must start with 'flightvm'"),
    (f"{REMOTE}#pool_dir=relative", "absolute path"),
    (f"{REMOTE}#pool_dir=/a/../etc", "absolute path"),
    (f"{REMOTE},{REMOTE}#slots=2", "listed twice"),
])
def test_bad_entries_are_one_line_errors(raw: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        parse_hosts(raw, "--flightvm-hosts")
    assert "\n" not in str(err.value) and str(err.value).startswith("--flightvm-hosts: ")


def test_option_resolves_cli_over_ini_over_env_and_defaults_to_libvirt_uri() -> None:
    env = {"FLIGHTVM_HOSTS": f"{REMOTE}#slots=3"}
    assert resolve({}, {}, env).host_list[0].slots == 3
    assert resolve({}, {"hosts": "qemu:///session"}, env).host_list[0].uri == "qemu:///session"
    assert resolve({"hosts": "qemu:///system#slots=5"}, {}, env).host_list[0].slots == 5
    default = resolve({"libvirt_uri": "qemu:///session"}, {}, {})
    assert default.hosts == () and default.host_list == (Host("qemu:///session"),)
    assert default.host_list[0].local


def test_pick_takes_the_most_free_slots_then_the_first_listed() -> None:
    hosts = (Host("qemu:///system", 1), Host(REMOTE, 2))
    assert pick(hosts, []) == 1  # 2 free beats 1 free
    assert pick(hosts, [1]) == 0  # a tie (1 and 1): the first listed
    assert pick(hosts, [1, 0]) == 1
    assert pick(hosts, [1, 0, 1]) == 0  # all taken: the least loaded by ratio (1/1 vs 2/2 -> first)


def test_assign_spreads_workers_one_per_slot_and_remembers(tmp_path: Path) -> None:
    hosts = (Host("qemu:///system", 1), Host(REMOTE, 1))
    got: dict[str, str] = {}

    def worker(name: str) -> None:
        got[name] = assign(hosts, tmp_path, name)[0].uri

    threads = [threading.Thread(target=worker, args=(f"gw{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got.values()) == sorted(h.uri for h in hosts)  # one each, under the lock
    again = assign(hosts, tmp_path, "gw0")  # asked again: the same host, no new slot taken
    assert again == (next(h for h in hosts if h.uri == got["gw0"]), False)
    host, over = assign(hosts, tmp_path, "gw2")
    assert over  # a third worker: every slot taken, it is told so
    assert json.loads((tmp_path / "hosts.json").read_text())["gw2"] == host.uri


def test_assign_survives_a_garbled_record(tmp_path: Path) -> None:
    hosts = (Host("qemu:///system", 1), Host(REMOTE, 1))
    (tmp_path / "hosts.json").write_text("{not json")
    assert assign(hosts, tmp_path, "gw0") == (hosts[0], False)


def test_jump_options_follow_the_uri(tmp_path: Path) -> None:
    jump = parse_hosts(f"{REMOTE}&known_hosts=/k/kh", "x")[0].jump()
    assert jump is not None and jump.destination == "root@127.0.0.1"
    opts = jump.options()
    assert ["-i", "/k/id"] == opts[opts.index("-i"):opts.index("-i") + 2]
    assert "UserKnownHostsFile=/k/kh" in opts and "StrictHostKeyChecking=no" in opts
    assert opts[-2:] == ["-p", "2222"]
    strict = parse_hosts("qemu+ssh://h/system", "x")[0].jump()
    assert strict is not None and "StrictHostKeyChecking=no" not in strict.options()
    assert strict.destination == "h" and "-p" not in strict.options()
    assert Host("qemu:///system").jump() is None

    client = SSHClient(40001, tmp_path / "id", "flightvm", jump=jump)
    argv = client.options()
    proxy = next(o for o in argv if o.startswith("ProxyCommand="))
    inner = shlex.split(proxy.removeprefix("ProxyCommand="))
    assert inner[0] == "ssh" and inner[-3:] == ["-W", "%h:%p", "root@127.0.0.1"]
    cmd = client.command()  # what a human pastes: the same jump
    assert "ProxyCommand=" in cmd and "-p 40001" in cmd and cmd.endswith("flightvm@127.0.0.1")
    assert not any(o.startswith("ProxyCommand") for o in SSHClient(1, tmp_path, "u").options())


def test_remote_domain_xml_points_at_volumes_and_records_them(tmp_path: Path) -> None:
    owner = Owner("260101000000-abcd", 1, "1", "h", "gw0", str(tmp_path))
    name = "flightvm-260101000000-abcd-gw0-1"
    vols = vm_volume_names(name)
    spec = DomainSpec(name=name, overlay=Path("/pool/" + vols[0]), seed_iso=Path("/pool/" + vols[1]),
                      console_log=tmp_path / "console.log", ssh_port=4000, mac="52:54:00:00:00:01",
                      owner=owner, console_path="/pool/" + vols[2], pool="flightvm-images",
                      volumes=vols)
    xml = spec.to_xml()
    assert f"<log file=\"/pool/{vols[2]}\" append='on'/>" in xml
    assert str(tmp_path / "console.log") not in xml
    info = parse_metadata(name, xml)
    assert info is not None and info.volumes == tuple(("flightvm-images", v) for v in vols)
    local = DomainSpec(name=name, overlay=tmp_path / "o", seed_iso=None, console_log=tmp_path / "c",
                       ssh_port=4000, mac="52:54:00:00:00:01", owner=owner)
    assert f"<log file=\"{tmp_path / 'c'}\"" in local.to_xml()
    assert "flightvm:volume" not in local.to_xml()


def test_volume_names() -> None:
    digest = "sha256:" + "ab" * 32
    assert base_volume_name(digest) == "sha256-" + "ab" * 32 + ".qcow2"
    assert mark_volume_name(digest) == "sha256-" + "ab" * 32 + ".ok"
    assert vm_volume_names("flightvm-x") == ("flightvm-x-overlay.qcow2", "flightvm-x-seed.iso",
                                             "flightvm-x-console.log")


def test_plugin_takes_the_option_ini_and_env(pytester: pytest.Pytester,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLIGHTVM_HOSTS", "qemu:///session#slots=7")
    pytester.makeini("[pytest]\nflightvm_hosts = qemu:///system#slots=2, "
                     "qemu+ssh://root@h1/system#slots=4\n")
    pytester.makepyfile("""
        def test_s(flightvm_settings):
            assert [(h.uri, h.slots) for h in flightvm_settings.host_list] == [
                ("qemu:///system", 2), ("qemu+ssh://root@h1/system", 4)]
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("--flightvm-hosts=qemu:///session#slots=3",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)  # the CLI wins over the ini
    result.stdout.fnmatch_lines(["*qemu:///session*3*"])


def test_plugin_bad_host_list_is_a_one_line_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(flightvm): pass")
    result = pytester.runpytest_subprocess("--flightvm-hosts=qemu+tcp://h1/system",
                                           "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: flightvm: --flightvm-hosts: 'qemu+tcp://h1/system': "
                                 "a remote host must be qemu+ssh://*"])
    assert "Traceback" not in result.stderr.str()


def test_a_discarded_vm_takes_its_remote_volumes_with_it(tmp_path: Path) -> None:
    """factory.discard (every VM's end, kept or not) deletes the VM's pool volumes on a
    remote host, as well as its dir; a machine's delete_files does both."""
    from pytest_flightvm.vm.factory import VMFactory
    from pytest_flightvm.vm.machine import Machine

    deleted: list[str] = []

    class Volumes:
        def delete(self) -> None:
            deleted.append("volumes")

    machine = object.__new__(Machine)
    machine.volumes = Volumes()  # type: ignore[assignment]
    machine.vm_dir = tmp_path / "vm"
    machine.vm_dir.mkdir()
    machine.artifact = None
    machine.destroy = lambda remove_files=True: deleted.append(f"destroy {remove_files}")  # type: ignore[method-assign]
    factory = object.__new__(VMFactory)
    factory.machines = [machine]
    factory.artifacts = None
    factory.discard(machine, port=1)
    assert deleted == ["destroy False", "volumes"]
    assert not machine.vm_dir.exists() and factory.machines == []

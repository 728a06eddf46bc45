"""VM-layer pieces that need no VM: XML, metadata, console patterns, ports, accel verdicts."""

import os
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_flightvm.errors import BootError
from pytest_flightvm.procs import pid_namespace, process_start
from pytest_flightvm.vm import accel
from pytest_flightvm.vm.domain import DomainSpec, Owner, parse_metadata
from pytest_flightvm.vm.ports import release_port, reserve_port
from pytest_flightvm.vm.ready import ConsoleWatcher, Probe, wait_until_ready
from pytest_flightvm.vm.reaper import owner_is_alive


def _spec(tmp_path: Path, **kw) -> DomainSpec:
    owner = Owner.current("run1", "gw0", tmp_path)
    base = dict(name="flightvm-run1-gw0-1", overlay=tmp_path / "o.qcow2",
                seed_iso=tmp_path / "s.iso", console_log=tmp_path / "c.log", ssh_port=40022,
                mac="52:54:00:aa:bb:cc", owner=owner, files=(tmp_path,))
    base.update(kw)
    return DomainSpec(**base)


def test_domain_xml_has_the_measured_choices(tmp_path: Path) -> None:
    root = ET.fromstring(_spec(tmp_path).to_xml())
    assert root.get("type") == "qemu"  # TCG
    cd = root.find("devices/disk[@device='cdrom']")
    assert cd is not None and cd.find("target").get("bus") == "scsi"
    assert root.find("devices/controller[@model='virtio-scsi']") is not None
    assert root.find("seclabel").get("relabel") == "no"
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    # closed by default: restrict=on keeps DHCP and the SSH forward, drops everything else
    assert "user,id=fvmnet0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22" in args
    assert any("mac=52:54:00:aa:bb:cc" in a and "addr=0x10" in a for a in args)
    # a pty (virsh console attaches to it) whose output virtlogd appends to the log file
    serial = root.find("devices/serial")
    assert serial.get("type") == "pty"
    assert serial.find("log").get("file") == str(tmp_path / "c.log")
    assert serial.find("log").get("append") == "on"


def test_kvm_domain_type(tmp_path: Path) -> None:
    assert ET.fromstring(_spec(tmp_path, accel="kvm").to_xml()).get("type") == "kvm"


def test_metadata_round_trip(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    info = parse_metadata(spec.name, spec.to_xml())
    assert info is not None
    assert (info.run_id, info.pid, info.files) == ("run1", os.getpid(), (str(tmp_path),))
    assert info.pid_ns == pid_namespace() != ""
    assert owner_is_alive(info.pid, info.pid_start, info.host, info.pid_ns)
    assert parse_metadata("x", "<domain><name>x</name></domain>") is None


def test_dead_and_recycled_pids_are_not_alive() -> None:
    me, ns = os.getpid(), pid_namespace()
    assert not owner_is_alive(me, "0", "", ns)  # same pid, other start time: recycled
    assert not owner_is_alive(2**22 + 1, "", "", ns)
    assert owner_is_alive(me, process_start(me) or "", "", ns)


def test_another_pid_namespace_is_never_judged_dead() -> None:
    # a pid that does not exist here, recorded in another namespace (or in none): unknown
    assert owner_is_alive(2**22 + 1, "", "", "4026599999")
    assert owner_is_alive(2**22 + 1, "", "", "")


def test_console_watcher_spots_failures_incrementally(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("[    1.0] Linux version 6.1\n")
    w = ConsoleWatcher(log)
    assert w.scan() is None
    with open(log, "a") as f:
        f.write("[   9.0] Kernel panic - not syncing: VFS: Unable to mount root\n")
    hit = w.scan()
    assert hit and str(hit).startswith("kernel panic") and hit.stuck
    with open(log, "a") as f:
        f.write("You are in emergency mode. After logging in...\n")
    hit = w.scan()
    assert hit and str(hit).startswith("emergency mode") and not hit.stuck


def test_wait_fails_fast_with_console_tail(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("")
    probe = Probe(domain_state=lambda: None, guest_ready=lambda: False)
    watcher = ConsoleWatcher(log)
    log.write_text("booting\nKernel panic - not syncing: Attempted to kill init!\n")
    start = time.monotonic()
    with pytest.raises(BootError) as info:
        wait_until_ready("vm1", log, probe, timeout=60, interval=0.01, watcher=watcher)
    assert time.monotonic() - start < 5
    assert "kernel panic" in str(info.value)
    assert "Attempted to kill init" in info.value.detail


def test_wait_reports_dead_domain_and_deadline(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("")
    dead = Probe(domain_state=lambda: "domain is shut off (reason 1)", guest_ready=lambda: False)
    with pytest.raises(BootError, match="shut off"):
        wait_until_ready("vm1", log, dead, timeout=60, interval=0.01)
    slow = Probe(domain_state=lambda: None, guest_ready=lambda: False)
    with pytest.raises(BootError, match="not ready after"):
        wait_until_ready("vm1", log, slow, timeout=0.05, interval=0.01)


def test_ports_are_unique_and_released(tmp_path: Path) -> None:
    ports = [reserve_port(tmp_path) for _ in range(5)]
    assert len(set(ports)) == 5
    release_port(tmp_path, ports[0])
    assert str(ports[0]) not in (tmp_path / "ports.json").read_text()


def test_accel_verdict_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: True)
    assert accel.initial_choice("auto", tmp_path) == ("kvm", True)
    accel.save_verdict(tmp_path, "kvm", "a guest booted")
    assert accel.initial_choice("auto", tmp_path) == ("kvm", True)  # still on probation
    accel.save_verdict(tmp_path, "tcg", "guest paused")
    assert accel.initial_choice("auto", tmp_path) == ("tcg", False)
    assert accel.initial_choice("kvm", tmp_path) == ("kvm", False)
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: False)
    assert accel.initial_choice("auto", tmp_path / "other") == ("tcg", False)
    assert accel.timeout_for("tcg", 100) == 200 and accel.timeout_for("kvm", 100) == 100


def test_keypair_is_generated_once_when_workers_race(tmp_path: Path) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from pytest_flightvm.vm.ssh import generate_keypair

    with ProcessPoolExecutor(6) as pool:
        results = list(pool.map(generate_keypair, [tmp_path / "ssh"] * 12))
    assert len({pub for _key, pub in results}) == 1
    key = tmp_path / "ssh" / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "ssh").iterdir() if not p.name.endswith(".lock")) == [
        "id_ed25519", "id_ed25519.pub"]


@pytest.mark.parametrize(("codes", "calls", "agent"), [
    ((255, 124, 0), 3, False),  # ssh dropped, then timed out: asked again with a fresh time
    ((1,), 1, True),            # the guest said no (no passwordless sudo): the agent sets it
    ((255, 255, 255), 3, True),
])
def test_the_clock_after_a_resume_survives_a_dropped_channel(
        codes: tuple[int, ...], calls: int, agent: bool) -> None:
    from pytest_flightvm.vm import resume
    from pytest_flightvm.vm.ssh import CommandResult

    answers = list(codes)
    sent: list[str] = []
    set_time: list[dict[str, int]] = []

    class SSH:
        def run(self, cmd: str, **_: object) -> CommandResult:
            if "/dev/urandom" in cmd:
                return CommandResult(cmd, 0, "", "")
            sent.append(cmd)
            return CommandResult(cmd, answers.pop(0), "", "")

    class Dom:
        def setTime(self, when: dict[str, int], flags: int) -> None:  # noqa: N802 - libvirt's name
            set_time.append(when)

    machine = types.SimpleNamespace(ssh=SSH(), dom=Dom(), phases={}, authorized_key=None,
                                    rename_from=None, name="vm")
    resume.after_resume(machine, time.monotonic(), 60.0)  # type: ignore[arg-type]
    assert len(sent) == calls and all("sudo -n date -u -s @" in c for c in sent)
    assert bool(set_time) is agent
    assert "clock" in machine.phases

"""Firmware, TPM and CPU model without a VM: the domain XML, the NVRAM copy, the checks,
and which reset mechanism the pool picks."""

from __future__ import annotations

import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_flightvm.config import resolve
from pytest_flightvm.errors import ConfigError, ToolMissingError
from pytest_flightvm.vm import firmware as fw
from pytest_flightvm.vm.domain import DomainSpec, Owner
from pytest_flightvm.vm.pool import mechanism


def _spec(tmp_path: Path, **kw) -> DomainSpec:
    base = dict(name="flightvm-run1-gw0-1", overlay=tmp_path / "o.qcow2", seed_iso=None,
                console_log=tmp_path / "c.log", ssh_port=40022, mac="52:54:00:aa:bb:cc",
                owner=Owner.current("run1", "gw0", tmp_path), files=(tmp_path,))
    base.update(kw)
    return DomainSpec(**base)


def test_bios_keeps_todays_domain(tmp_path: Path) -> None:
    root = ET.fromstring(_spec(tmp_path).to_xml())
    assert root.find("os/loader") is None and root.find("os/nvram") is None
    assert root.find("features/smm") is None
    assert root.find("devices/tpm") is None
    assert root.find("cpu") is None  # TCG default: QEMU's own model
    assert root.find("genid") is not None  # a restored guest gets a new generation id


@pytest.mark.parametrize("name", ["uefi", "uefi-secure", "uefi-secure-unenrolled"])
def test_uefi_loader_nvram_and_smm(tmp_path: Path, name: str) -> None:
    firmware = fw.firmware(name)
    root = ET.fromstring(_spec(tmp_path, firmware=firmware, nvram=tmp_path / "nv.fd").to_xml())
    loader = root.find("os/loader")
    assert loader is not None and loader.text == str(firmware.code)
    assert loader.get("type") == "pflash" and loader.get("readonly") == "yes"
    assert loader.get("secure") == ("yes" if name != "uefi" else "no")
    assert root.findtext("os/nvram") == str(tmp_path / "nv.fd")
    assert (root.find("features/smm") is not None) == (name != "uefi")


def test_secure_variants_differ_only_in_enrolled_keys() -> None:
    secure, unenrolled = fw.firmware("uefi-secure"), fw.firmware("uefi-secure-unenrolled")
    assert secure.code == unenrolled.code and secure.secure and unenrolled.secure
    assert secure.vars_template is not None and secure.vars_template.name.endswith(".ms.fd")
    assert unenrolled.vars_template == fw.firmware("uefi").vars_template


def test_tpm_and_cpu_model_xml(tmp_path: Path) -> None:
    root = ET.fromstring(_spec(tmp_path, tpm=True, cpu_model="Haswell-noTSX-IBRS").to_xml())
    tpm = root.find("devices/tpm")
    assert tpm is not None and tpm.get("model") == "tpm-crb"
    assert tpm.find("backend").get("type") == "emulator"
    assert tpm.find("backend").get("version") == "2.0"
    cpu = root.find("cpu")
    assert cpu.get("mode") == "custom" and cpu.get("check") == "none"
    assert cpu.findtext("model") == "Haswell-noTSX-IBRS"
    assert ET.fromstring(_spec(tmp_path, cpu_model="max").to_xml()).find("cpu").get("mode") == "maximum"
    assert ET.fromstring(_spec(tmp_path, accel="kvm").to_xml()).find("cpu").get("mode") == "host-model"


def test_each_vm_gets_its_own_private_nvram(tmp_path: Path) -> None:
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"\x01" * 64)
    firmware = fw.Firmware("uefi", tmp_path / "CODE.fd", template)
    dest = fw.new_nvram(firmware, tmp_path / "nvram.fd")
    assert dest is not None and dest.read_bytes() == template.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):  # never written through a planted file or link
        fw.new_nvram(firmware, dest)
    assert fw.new_nvram(fw.firmware("bios"), tmp_path / "none.fd") is None


def test_missing_firmware_files_and_swtpm_are_one_line(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    missing = fw.Firmware("uefi", tmp_path / "nope.fd", tmp_path / "nope-vars.fd")
    with pytest.raises(ToolMissingError, match="apt-get install ovmf"):
        fw.check_host(missing, tpm=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissingError, match="apt-get install swtpm swtpm-tools"):
        fw.check_host(fw.firmware("bios"), tpm=True)
    fw.check_host(fw.firmware("bios"), tpm=False)


CAPS = """<domainCapabilities><cpu><mode name='custom' supported='yes'>
<model usable='yes'>qemu64</model><model usable='no'>Haswell-noTSX-IBRS</model>
<model usable='no'>Haswell</model></mode></cpu></domainCapabilities>"""


def test_cpu_models_are_checked_against_libvirt() -> None:
    conn = SimpleNamespace(getDomainCapabilities=lambda *a: CAPS)
    assert fw.check_cpu(conn, "qemu64", accel="tcg", emulator="qemu") is True
    assert fw.check_cpu(conn, "Haswell-noTSX-IBRS", accel="tcg", emulator="qemu") is False
    with pytest.raises(ConfigError, match=r"'Haswel-typo' is unknown.*close: Haswell"):
        fw.check_cpu(conn, "Haswel-typo", accel="tcg", emulator="qemu")


def test_options_resolve_with_env_twins() -> None:
    s = resolve({}, {}, {"FLIGHTVM_FIRMWARE": "uefi-secure", "FLIGHTVM_TPM": "1",
                         "FLIGHTVM_CPU": "Haswell-noTSX-IBRS"})
    assert (s.firmware, s.tpm, s.cpu) == ("uefi-secure", True, "Haswell-noTSX-IBRS")
    assert (resolve({}, {}, {}).firmware, resolve({}, {}, {}).tpm) == ("bios", False)
    with pytest.raises(ConfigError, match="expected one of bios, uefi"):
        resolve({"firmware": "efi"}, {}, {})


def test_the_pool_picks_restore_except_internal_on_bios() -> None:
    def vm(name: str) -> SimpleNamespace:
        return SimpleNamespace(spec=SimpleNamespace(firmware=fw.firmware(name)))

    assert mechanism("snapshot", vm("bios")) == "restore"
    assert mechanism("restore", vm("bios")) == "restore"
    assert mechanism("internal", vm("bios")) == "internal"
    assert mechanism("internal", vm("uefi-secure")) == "restore"


def test_doctor_names_the_firmware_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pytest_flightvm.doctor import _firmware

    monkeypatch.setenv("PATH", str(tmp_path))  # no swtpm on PATH
    check = _firmware(resolve({"tpm": True}, {}, {}))
    assert not check.ok and "swtpm" in check.detail and "swtpm" in check.fix


def test_the_kvm_verdict_belongs_to_the_host_not_a_cache_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_flightvm.vm import accel

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: True)
    assert accel.initial_choice("auto", accel.host_state_dir()) == ("kvm", True)
    accel.save_verdict(accel.host_state_dir(), "tcg", "guest paused")
    # a later run with any other cache dir decides at once
    assert accel.host_state_dir() == runtime / "flightvm"
    assert accel.initial_choice("auto", accel.host_state_dir()) == ("tcg", False)


def test_the_first_kvm_probe_on_a_host_runs_once_while_others_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from pytest_flightvm.vm import accel

    state = tmp_path / "state"
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: True)
    probing, events = threading.Event(), []
    waiter_choice: list[tuple[str, bool]] = []

    def first_worker() -> None:
        with accel.first_choice("auto", state) as choice:
            events.append(("probe", choice))
            probing.set()
            time.sleep(0.5)  # the probe boot; then it finds KVM unusable
            accel.save_verdict(state, "tcg", "guest paused")
            events.append(("verdict", None))

    def second_worker() -> None:
        probing.wait(5)
        with accel.first_choice("auto", state) as choice:
            events.append(("second", choice))
            waiter_choice.append(choice)

    threads = [threading.Thread(target=first_worker), threading.Thread(target=second_worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # the second waited for the first's verdict and took it: no second probe
    assert events == [("probe", ("kvm", True)), ("verdict", None), ("second", ("tcg", False))]
    # with a verdict on file, nobody waits: a held probe lock does not block the choice
    from filelock import FileLock

    with FileLock(str(state / "accel" / "probe.lock")):
        with accel.first_choice("auto", state) as again:
            assert again == ("tcg", False)


def test_no_pristine_point_on_a_running_vm_still_runs_after_revert(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_flightvm.errors import ResetFailed
    from pytest_flightvm.vm import pool as pool_mod
    from pytest_flightvm.vm.factory import VMRequest

    vm = SimpleNamespace(spec=SimpleNamespace(firmware=fw.firmware("uefi-secure")),
                         name="flightvm-x-1", is_running=lambda: True)
    factory = SimpleNamespace(create=lambda request: vm, discard=lambda m: None)
    events: list[str] = []

    def broken_capture(machine):
        raise ResetFailed("save of flightvm-x-1 failed: no space")

    monkeypatch.setattr(pool_mod, "capture", broken_capture)
    pool = pool_mod.VMPool(factory, before_snapshot=lambda m: events.append("before"),  # type: ignore[arg-type]
                           after_revert=lambda m: events.append("after"),
                           notice=events.append)
    assert pool.acquire(VMRequest(), "snapshot") is vm
    assert events[0] == "before" and events[-1] == "after"
    assert any("no pristine point" in e for e in events)

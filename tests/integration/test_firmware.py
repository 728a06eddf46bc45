"""The guest flightctl runs, on our Debian stand-in: UEFI, Secure Boot, a TPM, a CPU model,
and a per-test reset that brings every kind of state back.

One pytest run per combination (a subprocess, one worker, one VM), two tests in order:
1. checks what the combination promises (firmware, Secure Boot state, TPM, CPU level),
   then dirties the guest everywhere a test could: a file on disk, a file in tmpfs, a
   non-volatile EFI variable (written through to the VM's NVRAM file on the host) and
   TPM PCR 16;
2. finds all of it back at the pristine point (the NVRAM file byte-equal to the pristine
   copy), after a save/restore reset.

The same VMs check the guest network (one boot serves both): upstream's template
(``uefi-secure-unenrolled``) runs with ``--flightvm-guest-outbound``, so its guest reaches
a host service on 127.0.0.1 at 10.0.2.2 but not one bound only to 127.0.0.2; the
``bios-tpm`` guest has the default closed network and reaches neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TagServer

pytestmark = pytest.mark.vm

SUITE = r'''
import os
from pathlib import Path

FIRMWARE = os.environ["FLIGHTVM_FIRMWARE"]
TPM = os.environ.get("FLIGHTVM_TPM") == "1"
CPU = os.environ.get("FLIGHTVM_CPU")
OUTBOUND = os.environ.get("FLIGHTVM_GUEST_OUTBOUND") == "1"
NET = os.environ.get("FW_NET_CHECK") == "1"
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
OUR_VAR = "/sys/firmware/efi/efivars/FlightvmTest-b2ac5fc9-92b7-4acd-aeac-11e818c3130c"
ZERO_PCR = "0" * 64


def efi_byte(vm, name):
    out = vm.run(f"od -An -t u1 /sys/firmware/efi/efivars/{name}-{EFI_GLOBAL}", check=False)
    return int(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.split() else None


def pcr16(vm):
    return vm.run("cat /sys/class/tpm/tpm0/pcr-sha256/16").stdout.strip().lower()


def fetch(vm, port):
    """The guest's GET of the host's 10.0.2.2:port (slirp's host address), 5 s at most."""
    code = ("import sys, urllib.request as u\n"
            "try:\n"
            "    print(u.urlopen(sys.argv[1], timeout=5).read().decode().strip())\n"
            "except Exception as e:\n"
            "    print('ERR', type(e).__name__); sys.exit(3)")
    return vm.run(f"python3 - http://10.0.2.2:{port}/fw", input=code, check=False,
                  timeout=60).stdout.strip()


def assert_pristine(vm):
    assert vm.run("test -e /var/tmp/dirty-disk", check=False).returncode == 1
    assert vm.run("test -e /dev/shm/dirty-tmpfs", check=False).returncode == 1
    if FIRMWARE != "bios":
        assert vm.run(f"test -e {OUR_VAR}", check=False).returncode == 1
        # the pristine copy: in the VM dir, or in the state store (--flightvm-state-cache)
        assert vm.pristine.nvram is not None
        assert vm.spec.nvram.read_bytes() == vm.pristine.nvram.read_bytes()
    if TPM:
        assert pcr16(vm) == ZERO_PCR


def test_1_features_then_dirty(flightvm):
    vm_has_efi = flightvm.run("test -d /sys/firmware/efi", check=False).returncode == 0
    assert vm_has_efi == (FIRMWARE != "bios"), FIRMWARE
    if FIRMWARE == "uefi-secure":
        assert efi_byte(flightvm, "SecureBoot") == 1, "Secure Boot is not enforced"
        assert "SecureBoot enabled" in flightvm.run("mokutil --sb-state", check=False).stdout
    elif vm_has_efi:
        assert efi_byte(flightvm, "SecureBoot") in (0, None)
    if TPM:
        assert flightvm.run("test -c /dev/tpm0 && test -c /dev/tpmrm0", check=False).ok
        assert pcr16(flightvm) == ZERO_PCR
    else:
        assert flightvm.run("test -e /dev/tpm0", check=False).returncode == 1
    if CPU:
        levels = flightvm.run("/lib64/ld-linux-x86-64.so.2 --help").stdout
        assert "x86-64-v3 (supported, searched)" in levels, levels
    if NET:
        on_loopback = fetch(flightvm, int(os.environ["FW_LOOPBACK_PORT"]))
        elsewhere = fetch(flightvm, int(os.environ["FW_OTHER_ADDR_PORT"]))
        assert elsewhere.startswith("ERR"), elsewhere  # bound to 127.0.0.2 only: never
        if OUTBOUND:
            assert on_loopback == "fw-loopback /fw", on_loopback
        else:
            assert on_loopback.startswith("ERR"), on_loopback
    assert_pristine(flightvm)

    flightvm.run("sudo touch /var/tmp/dirty-disk && touch /dev/shm/dirty-tmpfs && sync")
    if FIRMWARE != "bios":
        before = flightvm.spec.nvram.read_bytes()
        flightvm.run(f"printf '\\007\\000\\000\\000\\001' | sudo tee {OUR_VAR} >/dev/null")
        assert flightvm.run(f"test -e {OUR_VAR}", check=False).ok
        assert flightvm.spec.nvram.read_bytes() != before, "the variable never reached the NVRAM"
    if TPM:
        flightvm.run("sudo tpm2_pcrextend 16:sha256=" + "ab" * 32)
        assert pcr16(flightvm) != ZERO_PCR


def test_2_clean_again(flightvm):
    assert_pristine(flightvm)
'''

COMBOS = [  # firmware, TPM, CPU model, guest network (None: not checked)
    pytest.param("uefi", False, "Haswell-noTSX-IBRS", None, id="uefi-haswell"),
    pytest.param("uefi-secure", True, None, None, id="uefi-secure-tpm"),
    pytest.param("uefi-secure-unenrolled", False, None, "outbound", id="uefi-secure-unenrolled"),
    pytest.param("bios", True, None, "closed", id="bios-tpm"),
]


@pytest.fixture
def host_services() -> Iterator[tuple[TagServer, TagServer]]:
    """A host service on 127.0.0.1 and one bound to 127.0.0.2 only."""
    loopback, other = TagServer("fw-loopback"), TagServer("fw-other", "127.0.0.2")
    yield loopback, other
    loopback.close()
    other.close()


@pytest.mark.parametrize(("firmware", "tpm", "cpu", "net"), COMBOS)
def test_firmware_tpm_cpu_and_reset(vm_suite, host_services, firmware: str, tpm: bool,
                                    cpu: str | None, net: str | None) -> None:
    Path("test_firmware_suite.py").write_text(SUITE)
    env = {"FLIGHTVM_FIRMWARE": firmware, "FLIGHTVM_TPM": "1" if tpm else "0"}
    if cpu:
        env["FLIGHTVM_CPU"] = cpu
    loopback, other = host_services
    if net:
        env.update(FW_NET_CHECK="1", FW_LOOPBACK_PORT=str(loopback.port),
                   FW_OTHER_ADDR_PORT=str(other.port),
                   FLIGHTVM_GUEST_OUTBOUND="1" if net == "outbound" else "0")
    result, metrics = vm_suite.run("-v", "-p", "no:randomly", **env)
    result.assert_outcomes(passed=2)
    if net == "outbound":
        assert loopback.paths == ["/fw"] and other.paths == []
    elif net == "closed":
        assert loopback.paths == [] and other.paths == []
    (vm,) = metrics["vms"]
    assert (vm["firmware"], vm["tpm"], vm["cpu"]) == (firmware, tpm, cpu)
    resets = [r for r in metrics["resets"] if r["ok"]]
    assert [r["mode"] for r in resets] == ["restore"], metrics["resets"]
    assert 0 < resets[0]["seconds"] < 120


def test_an_unknown_cpu_model_is_one_line_before_any_vm(vm_suite) -> None:
    Path("test_cpu_suite.py").write_text("def test_vm(flightvm):\n    pass\n")
    result, metrics = vm_suite.run("--flightvm-cpu=Haswell-Bogus")
    result.assert_outcomes(errors=1)
    line = "flightvm: CPU model 'Haswell-Bogus' is unknown to this QEMU"
    assert any(line in out for out in result.outlines), "\n".join(result.outlines[-20:])
    assert "Traceback" not in result.stdout.str()
    assert not metrics.get("vms")

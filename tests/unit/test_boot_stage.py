"""Boot stages read off real console lines (the built-in Debian guest under BIOS and
OVMF), and the readiness loop reporting them about once a second."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_flightvm.errors import BootError
from pytest_flightvm.vm.bootstage import FIRST_STAGE, SSH_STAGE, format_status, stage_of
from pytest_flightvm.vm.ready import ConsoleWatcher, Probe, wait_until_ready

# Lines from a real boot's console.log (BIOS + GRUB), in order; escapes kept as written.
BIOS_BOOT = [
    ("\x1b[H\x1b[J\x1b[1;1H\x1b[H\x1b[J\x1b[1;1H  Booting `Debian bookworm (flightvm)'", "bootloader"),
    ("[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org)",
     "kernel"),
    ("[    0.033619] Booting paravirtualized kernel on bare hardware", None),
    ("[    5.346154] systemd[1]: systemd 252.39-1~deb12u2 running in system mode (+PAM", "systemd"),
    ("Welcome to \x1b[1mDebian GNU/Linux 12 (bookworm)\x1b[0m!", "systemd"),
    ("[[0;32m  OK  [0m] Reached target [0;1;39mswap.target[0m - Swaps.", None),
    ("         Starting \x1b[0;1;39mcloud-init-local.\u2026cloud-init job (pre-networking)...", None),
    ("[   13.429644] cloud-init[260]: Cloud-init v. 22.4.2 running 'init-local' at Thu, 03 Dec "
     "2026 02:07:49 +0000. Up 13.28 seconds.", "cloud-init init-local"),
    ("[   18.529672] cloud-init[319]: Cloud-init v. 22.4.2 running 'init' at Thu, 03 Dec 2026",
     "cloud-init init"),
    ("[   18.665758] cloud-init[319]: ci-info: |  eth0  | True |         10.0.2.15          |",
     None),
    ("[   26.603373] cloud-init[398]: Cloud-init v. 22.4.2 running 'modules:config' at Thu",
     "cloud-init modules:config"),
    ("flightvm-261203020653-ef58-main-1 login: [   32.602949] cloud-init[438]: Cloud-init v. "
     "22.4.2 running 'modules:final' at Thu, 03 Dec 2026", "cloud-init modules:final"),
    ("[   36.1] cloud-init[438]: Cloud-init v. 22.4.2 finished at Thu, 03 Dec 2026 02:08:12 "
     "+0000. Datasource DataSourceNoCloud [seed=/dev/sr0][dsmode=net].  Up 36.02 seconds",
     "cloud-init done"),
]


@pytest.mark.parametrize(("line", "stage"), BIOS_BOOT)
def test_each_console_line_names_its_stage(line: str, stage: str | None) -> None:
    assert stage_of(line) == stage


@pytest.mark.parametrize(("line", "stage"), [
    ("BdsDxe: loading Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x3,0x0)", "firmware"),
    ("SeaBIOS (version 1.16.2-debian-1.16.2-1)", "firmware"),
    ("Welcome to GRUB!", "bootloader"),
    ("flightvm-setup: step 3/7 certs: ok", "setup step 3/7 certs:"),
    ("", None),
    ("\r\r\n", None),
    ("Linux version in a user's echo without a timestamp", None),
])
def test_firmware_bootloader_and_setup_lines(line: str, stage: str | None) -> None:
    assert stage_of(line) == stage


def test_the_watcher_keeps_the_last_stage_of_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"")
    watcher = ConsoleWatcher(log)
    assert watcher.stage == FIRST_STAGE  # nothing on the console yet: SeaBIOS prints to VGA
    with open(log, "ab") as f:
        f.write("\r\n".join(line for line, _ in BIOS_BOOT[:5]).encode() + b"\r\n")
        f.write(b"[   13.4] cloud-init[260]: Cloud-init v. 22.4.2 runn")  # cut mid-line
    assert watcher.scan() is None
    assert watcher.stage == "systemd"
    with open(log, "ab") as f:
        f.write(b"ing 'init-local' at Thu\r\n")
    assert watcher.scan() is None
    assert watcher.stage == "cloud-init init-local"


def test_readiness_reports_stages_then_ready(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"")
    watcher = ConsoleWatcher(log)
    console = [b"  Booting `Debian'\r\n", b"[    0.000000] Linux version 6.1.0\r\n",
               b"[ 13.4] cloud-init[260]: Cloud-init v. 22.4.2 running 'init' at\r\n", b"",
               b"[ 26.6] cloud-init[398]: Cloud-init v. 22.4.2 running 'modules:config' at\r\n",
               b""]
    polls = {"n": 0}

    def guest_ready() -> bool:
        polls["n"] += 1
        with open(log, "ab") as f:
            f.write(console[polls["n"] - 1])
        return polls["n"] == len(console)

    heard: list[tuple[float, str, bool]] = []
    ticks = iter(range(100))
    probe = Probe(domain_state=lambda: None, guest_ready=guest_ready,
                  stage=lambda: SSH_STAGE if polls["n"] >= 4 else None)
    seconds = wait_until_ready("vm", log, probe, timeout=60, interval=0, watcher=watcher,
                               clock=lambda: float(next(ticks)),
                               progress=lambda e, s, d: heard.append((e, s, d)))
    stages = [s for _, s, _ in heard]
    # the console's stage, then SSH (from the probe) until the console shows a newer one
    assert stages == [FIRST_STAGE, "bootloader", "kernel", "cloud-init init", SSH_STAGE,
                      "cloud-init modules:config", "ready"]
    assert heard[-1] == (seconds, "ready", True)
    assert all(not done for _, _, done in heard[:-1])
    assert [e for e, _, _ in heard] == sorted(e for e, _, _ in heard)


def test_a_failed_boot_reports_failed_once(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"")
    watcher = ConsoleWatcher(log)
    log.write_bytes(b"[    0.000000] Linux version 6.1.0\nKernel panic - not syncing: VFS\n")
    heard: list[tuple[str, bool]] = []
    probe = Probe(domain_state=lambda: None, guest_ready=lambda: False)
    with pytest.raises(BootError, match="kernel panic"):
        wait_until_ready("vm", log, probe, timeout=60, interval=0, watcher=watcher,
                         progress=lambda e, s, d: heard.append((s, d)))
    assert heard == [("failed", True)]


def test_status_line() -> None:
    assert format_status("flightvm-x-main-1", 42.4, "kernel") == \
        "flightvm: booting flightvm-x-main-1    42s  kernel"

"""Per-test reset on the real guest: pristine point, reset, self-healing fallback.

For each mechanism (``restore``: save/restore, the default; ``internal``: an internal
qcow2 snapshot), one pytest run in a subprocess, one worker, tests in order:
a) dirties the guest: a file, a running process, a stopped service;
b) sees none of it, checks the clock was corrected, then reboots the guest
   and dirties it again;
c) sees a clean guest again (revert after a reboot) with the pristine boot;
d) deletes the pristine point (the snapshot, or the saved state) behind the pool's back;
e) still gets a clean, working VM: the pool fell back to a fresh boot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

SUITE = r'''
import json, os, time
from pathlib import Path

import pytest

STATE = Path(os.environ["RESET_STATE"])
UNIT = """[Unit]
Description=flightvm reset demo
[Service]
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
"""


@pytest.fixture
def flightvm_user_data():
    return {
        "write_files": [{"path": "/etc/systemd/system/fvm-demo.service", "content": UNIT}],
        "runcmd": [["systemctl", "enable", "--now", "fvm-demo.service"]],
    }


def remember(**kw):
    data = json.loads(STATE.read_text()) if STATE.exists() else {}
    data.update(kw)
    STATE.write_text(json.dumps(data))


def recall():
    return json.loads(STATE.read_text())


def assert_clean(vm):
    assert vm.run("test -e /var/tmp/dirty", check=False).returncode == 1
    assert vm.run("pgrep -f 'sleep 12345'", check=False).returncode == 1
    assert vm.run("sudo systemctl is-active fvm-demo.service", check=False).stdout.strip() == "active"


def dirty(vm):
    vm.run("sudo touch /var/tmp/dirty")
    vm.run("setsid nohup sleep 12345 >/dev/null 2>&1 < /dev/null &")
    vm.run("sudo systemctl stop fvm-demo.service")
    assert vm.run("pgrep -f 'sleep 12345'", check=False).returncode == 0
    assert vm.run("sudo systemctl is-active fvm-demo.service", check=False).stdout.strip() != "active"


def test_a_dirty(flightvm):
    assert_clean(flightvm)
    remember(name=flightvm.name, boot_id=flightvm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip())
    dirty(flightvm)


def test_b_clean_then_reboot(flightvm):
    assert_clean(flightvm)
    assert flightvm.name == recall()["name"]
    skew = abs(int(flightvm.run("date +%s").stdout) - time.time())
    assert skew < 10, f"guest clock is {skew:.0f}s off after the revert"
    flightvm.reboot()
    assert flightvm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() != recall()["boot_id"]
    dirty(flightvm)


def test_c_clean_after_reboot(flightvm):
    assert_clean(flightvm)
    assert flightvm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == recall()["boot_id"]


def test_d_break_the_pristine_point(flightvm):
    if os.environ["FLIGHTVM_RESET"] == "internal":
        flightvm.dom.snapshotLookupByName("pristine", 0).delete(0)
    else:
        (flightvm.vm_dir / "pristine.state").unlink()
    dirty(flightvm)


def test_e_fresh_vm_after_failed_revert(flightvm):
    assert_clean(flightvm)
    assert flightvm.name != recall()["name"]
'''


@pytest.mark.parametrize("mode", ["restore", "internal"])
def test_reset_between_tests(vm_suite, tmp_path: Path, mode: str) -> None:
    Path("test_reset_suite.py").write_text(SUITE)
    state = tmp_path / "state.json"
    # The VM's own pristine point (in its dir) is what test_d breaks; the state cache keeps
    # it in its store instead and has its own test (test_state_cache.py).
    result, metrics = vm_suite.run("-v", "-p", "no:randomly", "-s", RESET_STATE=str(state),
                                   FLIGHTVM_RESET=mode, FLIGHTVM_STATE_CACHE="off")
    result.assert_outcomes(passed=5)
    # a -> b, b -> c, c -> d are resets; d -> e is the failed reset that fell back.
    notices = result.stdout.lines + result.stderr.lines
    what = "revert" if mode == "internal" else "restore"
    assert any("replacing the VM with a fresh boot" in line and f"{what} of flightvm-" in line
               for line in notices), "\n".join(notices[-30:])
    assert {r["mode"] for r in metrics["resets"] if r["mode"] != "reboot"} == {mode}, metrics["resets"]
    reverts = metrics["revert_seconds"]
    assert len(reverts) == 3, metrics["vms"]
    assert all(0 < s < 60 for s in reverts)
    assert len(metrics["vms"]) == 2  # the first VM, and the fresh one after the fallback
    assert json.loads(state.read_text())["name"] == metrics["vms"][0]["name"]

"""--flightvm-artifacts without a VM: the dir and its files (private, new, never through
a planted link), the junit XML user properties (through the plugin, with tests.fake_backend),
and the boot status printer's three modes (live, plain, silent)."""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_flightvm import artifacts
from pytest_flightvm.errors import ConfigError
from tests.fake_backend import run_plugin_suite


def test_the_dir_is_created_private_and_an_existing_one_is_left_as_is(tmp_path: Path) -> None:
    made = artifacts.artifact_dir(tmp_path / "ci" / "out")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)
    artifacts.artifact_dir(mine)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755  # the user's dir: not chmodded
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory; set --flightvm-artifacts"):
        artifacts.artifact_dir(tmp_path / "afile")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(ConfigError, match="writable by every user"):
        artifacts.artifact_dir(open_dir)


def test_files_are_new_private_and_never_written_through_a_link(tmp_path: Path) -> None:
    out = artifacts.artifact_dir(tmp_path / "out")
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("not ours\n")
    (out / "flightvm-r-1.console.log").symlink_to(foreign)  # planted before we write
    (out / "flightvm-r-1-2.console.log").write_text("an earlier file\n")
    path = artifacts.reserve(out, "flightvm-r-1", ".console.log")
    assert path.name == "flightvm-r-1-3.console.log"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    console = tmp_path / "console.log"
    console.write_bytes(b"[    0.0] Linux version 6.1\r\nlogin: ")
    assert artifacts.fill(path, console)
    assert path.read_bytes() == console.read_bytes()
    assert foreign.read_text() == "not ours\n"
    assert (out / "flightvm-r-1-2.console.log").read_text() == "an earlier file\n"
    # a link swapped in after the reservation is not followed either
    path.unlink()
    path.symlink_to(foreign)
    assert artifacts.fill(path, console) is False
    assert foreign.read_text() == "not ours\n"


@pytest.mark.parametrize(("name", "safe"), [
    ("flightvm-260101000000-ab12-gw0-1", "flightvm-260101000000-ab12-gw0-1"),
    ("../../etc/passwd", "_.._etc_passwd"),
    ("a b/c\n", "a_b_c_"),
    ("..", "unnamed"),
])
def test_safe_names(name: str, safe: str) -> None:
    assert artifacts.safe_name(name) == safe
    assert "/" not in artifacts.safe_name(name)


TESTS = '''
import pytest

def test_first(flightvm):
    pass

def test_second(flightvm):
    assert flightvm.name == "another"

@pytest.mark.flightvm(reset="none")
def test_third(flightvm):
    pass
'''


def test_junit_entries_carry_the_vm(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(TESTS)
    xml = tmp_path / "junit.xml"
    result = run_plugin_suite(pytester, tmp_path / "cache", f"--junitxml={xml}")
    result.assert_outcomes(passed=2, failed=1)
    props = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        props[case.get("name")] = {p.get("name"): p.get("value")
                                   for p in case.iter("property")}
    vm = props["test_first"]["flightvm_vm"]
    assert vm.startswith("flightvm-") and vm.endswith("-main-1")
    assert {t: (p["flightvm_vm"], p["flightvm_vm_made"]) for t, p in props.items()} == {
        "test_first": (vm, "booted"),
        "test_second": (vm, "reset"),
        "test_third": (vm, "reused"),
    }
    assert all(float(p["flightvm_vm_seconds"]) >= 0 for p in props.values())


STATUS_TESTS = '''
import os
from pytest_flightvm.plugin import _boot_status

class VM:
    name = "flightvm-r-main-1"

def test_status(request):
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    if os.environ.get("FAKE_TTY"):
        tr.isatty = True
    status = _boot_status(request.config, False)
    for elapsed, stage in [(0, "firmware"), (1, "firmware"), (2, "kernel"), (3, "kernel"),
                           (4, "cloud-init init")]:
        status(VM(), float(elapsed), stage, False)
    status(VM(), 5.0, "ready", True)
'''


@pytest.mark.parametrize("mode", ["plain", "live", "silent"])
def test_boot_status_lines(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                           tmp_path: Path, mode: str) -> None:
    pytester.makepyfile(STATUS_TESTS)
    if mode == "live":
        monkeypatch.setenv("FAKE_TTY", "1")
    args = ["-p", "no:cacheprovider", f"--flightvm-cache-dir={tmp_path / 'cache'}"]
    result = pytester.runpytest_subprocess(*args, *(["-qq"] if mode == "silent" else []))
    assert result.ret == 0
    out, err = result.stdout.str(), result.stderr.str()
    if mode == "plain":  # no terminal: one line per new stage, and the end
        assert [line for line in err.splitlines() if "booting" in line] == [
            "flightvm: booting flightvm-r-main-1     0s  firmware",
            "flightvm: booting flightvm-r-main-1     2s  kernel",
            "flightvm: booting flightvm-r-main-1     4s  cloud-init init",
            "flightvm: booting flightvm-r-main-1     5s  ready",
        ]
    elif mode == "live":  # one line, rewritten in place every time, ended once
        assert "booting" not in err
        with open(pytester.path / "stdout", encoding="utf-8", newline="") as fh:
            out = fh.read()  # as written: result.stdout splits lines at each \r
        status = [chunk.strip() for chunk in out.split("\r") if "booting" in chunk]
        assert len(status) == 6
        assert status[1] == "flightvm: booting flightvm-r-main-1     1s  firmware"
        assert status[-1].startswith("flightvm: booting flightvm-r-main-1     5s  ready")
        assert out.count("ready") == 1 and "ready" + " " * 3 in out  # erased to the width
    else:
        assert "booting" not in out + err

"""The plugin layer in inner pytest runs, with tests.fake_backend standing in for libvirt:
marker overrides reaching the VM request, report sections on failure, --flightvm-keep,
the terminal summary (also under -n 2), a failed boot as one line. The image, settings,
run dir, session, metrics and summary are the real code; only the VMs are fakes."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.fake_backend import record, run_plugin_suite

MARKERS_CONFTEST = '''
import pytest

@pytest.fixture
def flightvm_user_data():
    return {"suite": "on"}

def pytest_flightvm_user_data(config, vm_name, user_data):
    user_data["hooked"] = vm_name

def pytest_flightvm_vm_ready(vm):
    vm.run("touch /ready-hook-ran")
'''

MARKERS_TESTS = '''
import pytest

def test_plain(flightvm):
    assert (flightvm.request.memory, flightvm.request.vcpus) == (None, None)
    assert flightvm.user_data == {"suite": "on", "hooked": flightvm.name}
    assert flightvm.host_ports == (8080,)

def test_plain_again(flightvm):
    assert flightvm.name.endswith("-1")  # the same pooled VM, reset
    assert flightvm.reopened == 1  # forwards reopened after the reset

@pytest.mark.flightvm(memory=2048, vcpus=3, user_data={"marked": 1}, host_ports=[9090, 8080])
def test_marked(flightvm):
    assert (flightvm.request.memory, flightvm.request.vcpus) == (2048, 3)
    assert flightvm.user_data == {"suite": "on", "marked": 1, "hooked": flightvm.name}
    assert flightvm.host_ports == (8080, 9090)
    assert flightvm.name.endswith("-2")  # another spec: another VM

@pytest.mark.flightvm(memory=2048, vcpus=3, user_data={"marked": 1}, reset="none")
def test_marked_shared(flightvm):
    assert flightvm.name.endswith("-2") and flightvm.reopened == 0  # no reset ran

@pytest.mark.flightvm(colour="red")
def test_unknown_argument(flightvm):
    pass

@pytest.mark.flightvm(host_ports=["http"])
def test_bad_port(flightvm):
    pass
'''


def _junit(path: Path) -> dict[str, dict[str, str]]:
    return {case.get("name", ""): {p.get("name", ""): p.get("value", "")
                                   for p in case.iter("property")}
            for case in ET.parse(path).getroot().iter("testcase")}


def test_marker_overrides_reach_the_request(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makeconftest(MARKERS_CONFTEST)
    pytester.makepyfile(MARKERS_TESTS)
    cache, xml = tmp_path / "cache", tmp_path / "junit.xml"
    result = run_plugin_suite(pytester, cache, "--flightvm-host-port=8080", f"--junitxml={xml}")
    result.assert_outcomes(passed=4, errors=2)
    out = result.stdout.str()
    assert ("\nflightvm: marker flightvm: unknown argument(s) ['colour']; use memory, vcpus, "
            "user_data, reset, host_ports, agent\n") in out
    assert "\nflightvm: marker flightvm host_ports: expected a port number (1-65535), got 'http'\n" in out
    assert "Traceback" not in out
    made = {test: props.get("flightvm_vm_made") for test, props in _junit(xml).items()}
    assert made == {"test_plain": "booted", "test_plain_again": "reset", "test_marked": "booted",
                    "test_marked_shared": "reused", "test_unknown_argument": None,
                    "test_bad_port": None}  # a bad marker fails before any VM is asked for
    seen = record(cache)
    assert [vm["memory"] for vm in seen["vms"].values()] == [None, 2048]
    assert all(vm["commands"] == ["touch /ready-hook-ran"] for vm in seen["vms"].values())
    # the user's vm_ready hook code is part of the state key (change it: a new state)
    assert [[p.split(":")[0] for p in pool] for pool in seen["state_inputs"]] == [
        ["pytest_flightvm_vm_ready=pytest_flightvm_vm_ready"]]
    # the plain status lines of each boot (stderr is no terminal here)
    booting = [line.split()[-1] for line in result.stderr.str().splitlines() if "booting" in line]
    assert booting == ["firmware", "kernel", "init", "ready"] * 2


FAILING_TESTS = '''
def test_ok(flightvm):
    pass

def test_fails(flightvm):
    flightvm.run("echo written-by-the-failing-test > /dev/console")
    assert False, "the test's own failure"

def test_after(flightvm):
    pass
'''


# (keep, the failing test's VM, the VMs kept): "always" keeps each test's VM, so every
# test boots its own; otherwise the pooled VM is reset for the next test
@pytest.mark.parametrize(("keep", "failing", "kept"), [("never", "1", []),
                                                       ("on-failure", "1", ["1"]),
                                                       ("always", "2", ["1", "2", "3"])])
def test_failure_sections_and_keep(pytester: pytest.Pytester, tmp_path: Path, keep: str,
                                   failing: str, kept: list[str]) -> None:
    pytester.makepyfile(FAILING_TESTS)
    cache = tmp_path / "cache"
    result = run_plugin_suite(pytester, cache, f"--flightvm-keep={keep}")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    name = re.search(r"flightvm-\d{12}-[0-9a-f]{4}-main-", out)
    assert name is not None
    prefix = name.group(0)
    # the failing test's report: its VM's console tail and the VM's own detail
    vm = prefix + failing
    result.stdout.fnmatch_lines([f"*- flightvm console {vm} -*", "written-by-the-failing-test",
                                 f"*- flightvm {vm} -*", f"fake diagnostics of {vm}"])
    assert out.count("- flightvm console ") == 1  # passing tests get no section
    summary = out[out.index("= flightvm ="):]
    assert sorted(re.findall(r"flightvm: kept VM \S+-(\d+)", summary)) == kept
    for n in kept:
        assert f"  remove:  flightvm gc --name {prefix}{n}" in summary
    discarded = record(cache)["discarded"]
    assert not set(discarded) & {prefix + n for n in kept}  # a kept VM is never destroyed
    assert len(discarded) + len(kept) == len(record(cache)["vms"])


def test_a_failed_boot_is_one_line_and_kept_on_failure(pytester: pytest.Pytester,
                                                       tmp_path: Path) -> None:
    pytester.makeconftest('''
import pytest

@pytest.fixture
def flightvm_user_data():
    return {"fake": {"boot": "fail"}}
''')
    pytester.makepyfile("def test_x(flightvm):\n    pass\n")
    cache, xml = tmp_path / "cache", tmp_path / "junit.xml"
    result = run_plugin_suite(pytester, cache, "--flightvm-keep=on-failure", f"--junitxml={xml}")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(["*flightvm: flightvm-*-main-1 did not become ready "
                                 "(fake boot failure)", "--- console tail", "kernel panic (fake)"])
    assert "Traceback" not in out and "def _pooled_vm" not in out
    assert _junit(xml)["test_x"]["flightvm_vm_made"] == "boot failed"
    summary = out[out.index("= flightvm ="):]
    assert re.search(r"flightvm: kept VM flightvm-\S+-main-1\n", summary)
    assert re.search(r"vm flightvm-\S+-main-1: not ready", summary)
    assert record(cache)["discarded"] == []


XDIST_TESTS = '''
def test_one(flightvm):
    pass

def test_two(flightvm):
    pass
'''


def test_summary_and_metrics_under_xdist(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_a=XDIST_TESTS, test_b=XDIST_TESTS)
    cache, metrics = tmp_path / "cache", tmp_path / "metrics.json"
    result = run_plugin_suite(pytester, cache, "-n", "2", "--dist", "loadfile",
                              "--flightvm-rebuild", f"--flightvm-metrics={metrics}")
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    summary = out[out.index("= flightvm ="):].splitlines()
    run_id = json.loads(metrics.read_text())["run_id"]
    # one build for the whole run: the workers share the plugin's run id under --rebuild
    assert len((cache / "fake-builds.log").read_text().splitlines()) == 1
    assert "image resolves: 1 transfer/build, 1 local hit(s)" in summary
    assert any(line.startswith("image: source=build bytes=0 seconds=") for line in summary)
    vm_lines = sorted(line for line in summary if line.startswith("vm "))
    assert vm_lines == [f"vm flightvm-{run_id}-{w}-1: accel=tcg booted boot_to_ready=1.5s "
                        "reverts=1 median=0.5s" for w in ("gw0", "gw1")]
    assert "resets: 2 restore reset(s), median 0.5s, max 0.5s; 0 fresh boot(s)" in summary
    assert f"metrics written to {metrics}" in summary
    data = json.loads(metrics.read_text())
    assert sorted(data["workers"]) == ["gw0", "gw1"]
    assert sorted(r["test"].split("::")[0] for r in data["resets"]) == ["test_a.py", "test_b.py"]
    assert all(r["test"].endswith("::test_two") for r in data["resets"])


FACTORY_TESTS = '''
import pytest

def pytest_flightvm_vm_ready(vm):
    vm.run("ready-hook")

def test_extra(flightvm_factory):
    vm = flightvm_factory.create(name="extra", memory=512, user_data={"x": 1}, host_ports=[9000])
    assert vm.name.endswith("-main-extra")
    assert (vm.request.memory, vm.request.host_ports) == (512, (8080, 9000))
    assert vm.user_data == {"x": 1} and vm.commands == ["ready-hook"]
    flightvm_factory.destroy(vm)

def test_bad_ports(flightvm_factory):
    flightvm_factory.create(host_ports=[70000])
'''


def test_factory_fixture(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makeconftest(FACTORY_TESTS.split("def test_extra")[0])
    pytester.makepyfile("def test_extra" + FACTORY_TESTS.split("def test_extra")[1])
    cache = tmp_path / "cache"
    result = run_plugin_suite(pytester, cache, "--flightvm-host-port=8080")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "\nflightvm: flightvm_factory.create: port 70000 is out of range; use 1-65535\n" in out
    assert "Traceback" not in out
    seen = record(cache)
    assert [name.rsplit("-", 1)[1] for name in seen["discarded"]] == ["extra"]

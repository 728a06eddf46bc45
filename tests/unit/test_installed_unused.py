"""An installed plugin that a suite does not use costs nothing: junk in the environment
(several names are shared with other tools) is read only when a VM fixture needs it."""

from pathlib import Path

import pytest

# Every env var the plugin reads, set to something it would refuse.
JUNK_ENV = {
    "VM_CONFIG_DIR": "/nonexistent",
    "CLOUD_INIT_DIR": "/nonexistent",
    "REGISTRY_CACHE": "maybe",
    "CI": "maybe",
    "FLIGHTVM_REGISTRY": "not a ref",
    "FLIGHTVM_ACCEL": "warp",
    "FLIGHTVM_RESET": "sometimes",
    "FLIGHTVM_FIRMWARE": "coreboot",
    "FLIGHTVM_COMPRESS": "lzma",
    "FLIGHTVM_OFFLINE": "perhaps",
    "FLIGHTVM_TPM": "2",
    "FLIGHTVM_MEMORY": "lots",
    "FLIGHTVM_VCPUS": "-1",
    "FLIGHTVM_BOOT_TIMEOUT": "soon",
    "FLIGHTVM_GUEST_OUTBOUND": "wide",
    "FLIGHTVM_KEEP": "forever",
    "DEBUG_VM_CONSOLE": "loud",
    "LIBVIRT_DEFAULT_URI": "qemu+unix:///system?socket=/nonexistent",
}

PLAIN = """
import sys

def test_plain():
    # nothing of the VM layer was imported for a suite that boots nothing
    assert "pytest_flightvm.vm.factory" not in sys.modules
    assert "libvirt" not in sys.modules
"""


def _flightvm_lines(result: pytest.RunResult) -> list[str]:
    """Lines that mention flightvm, bar pytest's own ``plugins: flightvm-...`` header."""
    text = result.stdout.str() + result.stderr.str()
    return [line for line in text.splitlines()
            if "flightvm" in line.lower() and not line.startswith("plugins:")]


def _junk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key, value in JUNK_ENV.items():
        monkeypatch.setenv(key, value)
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def test_junk_env_is_ignored_by_a_suite_without_vm_fixtures(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = _junk(monkeypatch, tmp_path)
    pytester.makepyfile(PLAIN)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    assert _flightvm_lines(result) == []  # prints nothing
    assert result.stderr.str().strip() == ""
    assert not cache.exists()  # and makes nothing


def test_junk_env_is_ignored_under_xdist_too(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = _junk(monkeypatch, tmp_path)
    pytester.makepyfile(PLAIN)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=1)
    assert _flightvm_lines(result) == []
    assert not cache.exists()


def test_junk_env_is_one_line_when_a_vm_fixture_needs_the_settings(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REGISTRY_CACHE", "maybe")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    pytester.makepyfile("""
        def test_a(flightvm_settings):
            pass

        def test_b(flightvm_settings):
            pass

        def test_plain():
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)
    text = result.stdout.str()
    assert "Traceback" not in text
    lines = _flightvm_lines(result)
    errors = [line for line in lines if not line.startswith(("ERROR ", "_"))]
    assert len(errors) == 2 and all(
        line == "flightvm: env REGISTRY_CACHE: expected true or false, got 'maybe'"
        for line in errors), lines


def test_a_bad_env_dir_is_one_line_when_a_vm_needs_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VM_CONFIG_DIR", str(tmp_path / "nope"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    pytester.makepyfile("def test_a(flightvm_settings):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"flightvm: VM config dir {tmp_path / 'nope'} does not exist*"])
    assert not (tmp_path / "xdg").exists()


def test_explicit_flags_are_still_checked_at_start_up(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the user wrote for flightvm itself is bad input up front, VM or not."""
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           f"--flightvm-vm-config={tmp_path / 'nope'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: flightvm: *nope*"])


def test_a_flag_wins_over_a_junk_env_var(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLIGHTVM_ACCEL", "warp")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    pytester.makepyfile("""
        def test_a(flightvm_settings):
            assert flightvm_settings.accel == "tcg"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--flightvm-accel=tcg")
    result.assert_outcomes(passed=1)


def test_nothing_heavy_is_imported_up_to_the_end_of_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not in the tests, and not in the summary either, even with valid VM settings."""
    vm_config = tmp_path / "vm-config"
    vm_config.mkdir()
    (vm_config / "config.yaml").write_text("spec-fetch-interval: 0m10s\n")
    monkeypatch.setenv("VM_CONFIG_DIR", str(vm_config))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    report = tmp_path / "modules.txt"
    pytester.makeconftest(f"""
        import sys

        def pytest_unconfigure(config):
            heavy = ("pytest_flightvm.vm.factory", "pytest_flightvm.flightctl",
                     "pytest_flightvm.seed.render", "pytest_flightvm.cache.resolve", "libvirt",
                     "pycdlib", "yaml")
            with open({str(report)!r}, "w") as fh:
                fh.write(" ".join(m for m in heavy if m in sys.modules))
    """)
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert report.read_text() == ""
    assert not (tmp_path / "xdg").exists()

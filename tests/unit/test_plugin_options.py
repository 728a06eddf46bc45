"""Plugin behaviour that needs no VM, checked with pytester."""

import pytest

from tests.support import run_marked_test


def test_options_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--flightvm-registry*", "*--flightvm-accel*",
                                 "*--flightvm-ssh-user*", "*--flightvm-ssh-key*",
                                 "*--flightvm-keep*", "*--flightvm-reset*"])


def test_bad_option_stops_before_any_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(flightvm): pass")
    result = pytester.runpytest_subprocess("--flightvm-registry=not a ref", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: flightvm: registry 'not a ref' is not a registry reference*"])
    assert "Traceback" not in result.stderr.str()


def test_bad_ini_value_names_the_key(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nflightvm_memory = lots\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini flightvm_memory: expected a number*"])


def test_settings_fixture_sees_cli_and_env(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QCOW2_CACHE_TAG", "legacy")
    pytester.makepyfile("""
        def test_s(flightvm_settings):
            assert flightvm_settings.tag_prefix == "legacy"
            assert flightvm_settings.memory == 2048
            assert flightvm_settings.accel == "tcg"
    """)
    result = pytester.runpytest_subprocess("--flightvm-memory=2048", "--flightvm-accel=tcg",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_unknown_marker_argument_is_a_usage_error(pytester: pytest.Pytester, tmp_path) -> None:
    result = run_marked_test(pytester, tmp_path, "memroy=2048")
    assert result.ret != 0
    assert "Traceback" not in result.stdout.str()
    # The marker is checked before the (bad) pinned image is even looked at.
    result.stdout.fnmatch_lines(
        ["*flightvm: marker flightvm: unknown argument(s) *memroy*use memory, vcpus*"])
    assert "nonexistent.qcow2" not in result.stdout.str()


def test_plugin_without_vm_fixtures_starts_nothing(pytester: pytest.Pytester, tmp_path) -> None:
    pytester.makepyfile("def test_plain(): assert 1")
    result = pytester.runpytest_subprocess(f"--flightvm-cache-dir={tmp_path}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not (tmp_path / "runs").exists()  # no run dir, no image resolve, no libvirt

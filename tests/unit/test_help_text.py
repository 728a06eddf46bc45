"""pytest --help: each flightvm option names its real env var and its default, and no value
name looks like an env var that does not exist."""

import re

import pytest

from pytest_flightvm.config import OPTIONS


def _help(pytester: pytest.Pytester) -> str:
    result = pytester.runpytest_subprocess("--help", "-p", "no:cacheprovider")
    assert result.ret == 0
    text = result.stdout.str()
    start = text.index("real VMs for E2E tests (pytest-flightvm):")
    section = text[start:text.index("\n\n", start)]
    return " ".join(section.split())  # argparse wraps lines: compare on one line


def test_help_names_real_env_vars_and_defaults(pytester: pytest.Pytester) -> None:
    text = _help(pytester)
    assert "--flightvm-memory=MIB guest memory in MiB (default: 1024)" in text
    assert ("--flightvm-vm-config=DIR flightctl VM config dir (config.yaml, certs/, rpms/, "
            "ca.pem, registry.conf) (env VM_CONFIG_DIR; default: none)") in text
    assert "--flightvm-push push the base after a build (env REGISTRY_CACHE; default: only " \
        "when CI is true)" in text
    assert "--flightvm-accel={auto,kvm,tcg} auto, kvm or tcg (env FLIGHTVM_ACCEL; default: " \
        "auto)" in text
    assert "--flightvm-tag-prefix=PREFIX registry tag prefix (env QCOW2_CACHE_TAG; default: " \
        "base-qcow2)" in text
    for opt in OPTIONS:
        if opt.cli:
            assert opt.cli in text, opt.cli
            for var in opt.env:
                assert var in text, (opt.cli, var)
    # every value name is a plain word or the choices, never an upper-cased dest
    # (pytest's default metavar, FLIGHTVM_MEMORY, reads like an env var that does not exist)
    for metavar in re.findall(r"--flightvm-[a-z-]+=(\S+)", text):
        assert not metavar.startswith("FLIGHTVM_"), metavar


def test_every_env_var_named_in_help_is_read(pytester: pytest.Pytester) -> None:
    """The reverse: an env var that --help names really sets the option."""
    text = _help(pytester)
    named = set(re.findall(r"env ([A-Z0-9_]+)", text))
    known = {var for opt in OPTIONS for var in opt.env} | {"FLIGHTVM_SSH_PASSWORD"}
    assert named and named <= known, named - known
    pytester.makepyfile("""
        def test_s(flightvm_settings):
            assert flightvm_settings.tag_prefix == "from-env"
            assert flightvm_settings.accel == "tcg"
    """)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QCOW2_CACHE_TAG", "from-env")
        mp.setenv("FLIGHTVM_ACCEL", "tcg")
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_ini_help_names_env_and_default(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help", "-p", "no:cacheprovider")
    text = " ".join(result.stdout.str().split())
    assert "flightvm_memory (string): guest memory in MiB (default: 1024)" in text
    assert "flightvm_vm_config (string): flightctl VM config dir" in text

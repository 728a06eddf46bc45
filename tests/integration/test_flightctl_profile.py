"""The flightctl profile end to end: `flightctl_vm` in the real Debian guest.

Builds a VM config dir (stand-in agent .deb made with dpkg-deb, config.yaml,
a test CA and a client cert it signed, registry.conf), then runs
``flightctl_vm_suite.py`` against it in a subprocess with
``--flightvm-vm-config``. The suite checks, over SSH, the package, the
config and its mode, the certs' modes, CA trust (openssl verify), the
registry config, and that the agent service is active and read the config
(also after each revert).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from agent_pkg import make_vm_config

pytestmark = pytest.mark.vm

HERE = Path(__file__).resolve().parent


def test_flightctl_vm_in_a_real_guest(vm_suite, tmp_path_factory: pytest.TempPathFactory) -> None:
    config_dir = vm_suite.cache_dir / "vm-config"
    make_vm_config(config_dir)
    shutil.copy(HERE / "agent_pkg.py", Path.cwd() / "agent_pkg.py")
    shutil.copy(HERE / "flightctl_vm_suite.py", Path.cwd() / "test_flightctl_vm.py")
    result, metrics = vm_suite.run("-v", f"--flightvm-vm-config={config_dir}")
    result.assert_outcomes(passed=7)
    assert len(metrics["vms"]) == 1  # one VM, reverted between the 7 tests
    assert len(metrics["revert_seconds"]) == 6


def test_missing_config_yaml_fails_before_any_vm(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    empty = tmp_path / "vm-config"
    empty.mkdir()
    pytester.makepyfile("def test_x(flightctl_vm):\n    pass\n")
    result = pytester.runpytest_subprocess(f"--flightvm-vm-config={empty}",
                                           f"--flightvm-cache-dir={tmp_path / 'cache'}",
                                           "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: flightvm: *config.yaml*"])
    assert not (tmp_path / "cache" / "runs").exists()  # nothing was resolved or booted

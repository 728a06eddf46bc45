"""R6: bad input stops the run before any VM starts, with one line that names the fix.

Each case is tried twice:
- in a pytest session using the plugin (pytester, in a subprocess): one
  ``flightvm:`` line (a usage error at start-up, or a one-line setup error),
  no traceback, and no libvirt domain referring to the session's cache dir;
- on the CLI (``python -m pytest_flightvm.cli ...``): exit 2, one line on
  stderr, nothing on stdout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from faultkit import (
    SEED,
    Golden,
    Tally,
    assert_no_traceback,
    base_env,
    cli,
    domains_referencing,
    one_line_setup_error,
    tmpfs,
)

from pytest_flightvm.cache.registry import FlightRegistry
from tests.fake_disk import MiB, write_fake_qcow2

WANTS_A_VM = '''
def test_vm(flightvm):
    raise AssertionError("bad input must stop the run before a VM is handed out")
'''
BAD_YAML = "#cloud-config\nruncmd:\n  - [echo, unclosed\nusers: {\n"
NO_LIBVIRT = "qemu+unix:///system?socket=/nonexistent"


def session(pytester: pytest.Pytester, *args: str) -> tuple[Any, str]:
    pytester.makepyfile(test_bad_input=WANTS_A_VM)
    # A fast, bounded failure if bad input ever slipped through to a boot.
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--flightvm-accel=tcg", "--flightvm-boot-timeout=5",
        "--flightvm-no-push", *args, timeout=180)
    return result, result.stdout.str() + result.stderr.str()


def check_usage_error(result: Any, text: str, fix: Sequence[str]) -> str:
    """Stopped at start-up: pytest's usage error (exit 4), one ``ERROR: flightvm:`` line."""
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text[-2000:]
    lines = [line for line in text.splitlines() if "flightvm:" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("ERROR: flightvm: "), lines
    assert all(f in lines[0] for f in fix), f"{lines[0]!r} does not name {fix}"
    assert_no_traceback(text)
    return lines[0]


def check_setup_error(result: Any, text: str, fix: Sequence[str]) -> str:
    result.assert_outcomes(errors=1)
    assert_no_traceback(text)
    return one_line_setup_error(text, fix)


def check_no_domain(*paths: Path) -> None:
    for path in paths:
        assert domains_referencing(str(path)) == [], f"a domain was defined for {path}"


def check_cli(args: Sequence[str], fix: Sequence[str], env: dict[str, str] | None = None,
              code: int = 2) -> str:
    """One line, exit ``code``, naming ``fix`` in the CLI's own flags (never --flightvm-*)."""
    proc = cli(*args, env=env or base_env())
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("flightvm: ") and all(f in lines[0] for f in fix), lines[0]
    assert "--flightvm-" not in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def small_qcow2(tmp_path: Path) -> Path:
    return write_fake_qcow2(tmp_path / "small.qcow2", MiB, seed=SEED + 6)


# -- malformed YAML user-data -----------------------------------------------------------------


def test_malformed_yaml_user_data(pytester: pytest.Pytester, tally: Tally,
                                  tmp_path: Path) -> None:
    with tally.trial("R6", "malformed YAML user-data (cloud-init dir)"):
        ci = tmp_path / "cloud-init"
        ci.mkdir()
        (ci / "user-data").write_text(BAD_YAML)
        (ci / "meta-data").write_text("instance-id: i-1\n")
        cache = pytester.path / "cache"
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               f"--flightvm-cloud-init-dir={ci}")
        check_usage_error(result, text, ["user-data line", "fix the YAML"])
        check_no_domain(cache)
        check_cli(["seed", "render", "--cloud-init-dir", str(ci), "-o", str(tmp_path / "a.iso")],
                  ["user-data line", "fix the YAML"])
        (tmp_path / "ud.yaml").write_text(BAD_YAML)
        check_cli(["seed", "render", "--user-data", str(tmp_path / "ud.yaml"), "-o",
                   str(tmp_path / "b.iso")], ["ud.yaml line", "fix the YAML"])
        assert not list(tmp_path.glob("*.iso"))


# -- baked logins and a cloud-init dir that cannot merge ---------------------------------------


@pytest.mark.parametrize("case", ["no credential", "public key", "script user-data"])
def test_bad_login_or_unmergeable_cloud_init_dir(case: str, pytester: pytest.Pytester,
                                                 tally: Tally, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with tally.trial("R6", f"baked login / cloud-init dir: {case}"):
        cache = pytester.path / "cache"
        monkeypatch.delenv("FLIGHTVM_SSH_PASSWORD", raising=False)
        if case == "no credential":
            args, fix = ["--flightvm-ssh-user=user"], ["--flightvm-ssh-key", "FLIGHTVM_SSH_PASSWORD"]
        elif case == "public key":
            pub = tmp_path / "id_ed25519.pub"
            pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB flightvm\n")
            args = ["--flightvm-ssh-user=user", f"--flightvm-ssh-key={pub}"]
            fix = [str(pub), "not a private key"]
        else:
            ci = tmp_path / "cloud-init"
            ci.mkdir()
            (ci / "user-data").write_text("#!/bin/sh\necho hi\n")
            (ci / "meta-data").write_text("instance-id: i-1\n")
            args, fix = [f"--flightvm-cloud-init-dir={ci}"], ["user-data", "#cloud-config"]
        result, text = session(pytester, f"--flightvm-cache-dir={cache}", *args)
        check_usage_error(result, text, fix)
        check_no_domain(cache)


# -- missing VM config files ------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["dir", "config.yaml"])
def test_missing_vm_config(missing: str, pytester: pytest.Pytester, tally: Tally,
                           tmp_path: Path) -> None:
    with tally.trial("R6", f"VM config: missing {missing}"):
        vmc = tmp_path / "vm-config"
        if missing == "config.yaml":
            (vmc / "certs").mkdir(parents=True)
        fix = [str(vmc / "config.yaml")] if missing == "config.yaml" else [
            str(vmc), "does not exist"]
        cache = pytester.path / "cache"
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               f"--flightvm-vm-config={vmc}")
        check_usage_error(result, text, fix)
        check_no_domain(cache)
        check_cli(["seed", "render", "--vm-config", str(vmc), "-o", str(tmp_path / "s.iso")],
                  fix)


# -- a bad registry reference -----------------------------------------------------------------


def test_bad_registry_ref(pytester: pytest.Pytester, tally: Tally, tmp_path: Path) -> None:
    with tally.trial("R6", "bad registry reference"):
        cache = pytester.path / "cache"
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               "--flightvm-registry=http://127.0.0.1:5000/Flight VM")
        check_usage_error(result, text, ["is not a registry reference", "HOST[:PORT]/REPO"])
        check_no_domain(cache)
        check_cli(["cache", "get", "--registry", "http://127.0.0.1:5000/Flight VM",
                   "--cache-dir", str(tmp_path / "c")], ["HOST[:PORT]/REPO"])


def test_bad_pinned_image_ref(pytester: pytest.Pytester, tally: Tally, tmp_path: Path) -> None:
    with tally.trial("R6", "bad --flightvm-image reference"):
        cache = pytester.path / "cache"
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               "--flightvm-image=127.0.0.1:5000/Flight VM:latest")
        check_setup_error(result, text, ["is not a registry reference", "HOST[:PORT]/REPO"])
        check_no_domain(cache)
        check_cli(["cache", "get", "--image", "127.0.0.1:5000/Flight VM:latest",
                   "--cache-dir", str(tmp_path / "c")], ["HOST[:PORT]/REPO"])


# -- an artifact that is not a qcow2 --------------------------------------------------------------


def test_artifact_not_a_qcow2(pytester: pytest.Pytester, tally: Tally, tmp_path: Path,
                              local_registry: str, golden: Golden) -> None:
    with tally.trial("R6", "registry artifact that is not a qcow2"):
        repo = f"{local_registry}/flightvm-faults/not-qcow2-{os.getpid()}"
        junk = tmp_path / "disk.raw"
        junk.write_bytes(b"\x00" * 510 + b"\x55\xaa" + os.urandom(1 << 20))  # a raw MBR disk
        FlightRegistry(repo).push_disk(junk, ["raw"], arch="amd64")
        fix = ["is not a qcow2 disk image", "qemu-img convert -O qcow2"]
        cache = pytester.path / "cache"
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               f"--flightvm-image={repo}:raw")
        check_setup_error(result, text, fix)
        check_no_domain(cache)
        assert list((cache / "store" / "blobs" / "sha256").iterdir()) == []  # not kept
        cli_cache = tmp_path / "cli-cache"
        check_cli(["cache", "pull", "raw", "--registry", repo, "--cache-dir", str(cli_cache)],
                  fix)
        assert list((cli_cache / "store" / "blobs" / "sha256").iterdir()) == []

    with tally.trial("R6", "local --flightvm-image that is not a qcow2"):
        cache = pytester.path / "cache2"
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               f"--flightvm-image={junk}")
        check_setup_error(result, text, ["not a qcow2", "qemu-img convert -O qcow2"])
        check_no_domain(cache)


# -- libvirt unreachable ----------------------------------------------------------------------


def test_libvirt_unreachable(pytester: pytest.Pytester, tally: Tally, tmp_path: Path,
                             small_qcow2: Path) -> None:
    with tally.trial("R6", "libvirt unreachable"):
        cache = pytester.path / "cache"
        fix = ["cannot reach libvirt at", "--flightvm-libvirt-uri"]
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               f"--flightvm-image={small_qcow2}",
                               f"--flightvm-libvirt-uri={NO_LIBVIRT}")
        check_setup_error(result, text, fix)
        check_no_domain(cache)
        # the CLI: its own flag, and exit 1 (libvirtd down is a failed operation, not bad input)
        check_cli(["gc", "--libvirt-uri", NO_LIBVIRT, "--cache-dir", str(tmp_path / "c")],
                  ["cannot reach libvirt at", "--libvirt-uri"], code=1)


# -- an unwritable cache dir ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["parent-is-a-file", "read-only-tmpfs"])
def test_unwritable_cache_dir(how: str, pytester: pytest.Pytester, tally: Tally,
                              tmp_path: Path, small_qcow2: Path) -> None:
    with tally.trial("R6", f"unwritable cache dir ({how})"):
        if how == "parent-is-a-file":
            (tmp_path / "a-file").write_text("")
            mount = None
            cache = tmp_path / "a-file" / "cache"
            reason = "Not a directory"
        else:
            mount = tmpfs(tmp_path / "ro", size="1m", read_only=True)
            cache = mount.__enter__() / "cache"
            reason = "Read-only file system"
        try:
            result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                                   f"--flightvm-image={small_qcow2}")
            check_setup_error(result, text, [str(cache), reason, "--flightvm-cache-dir"])
            check_no_domain(cache)
            check_cli(["cache", "get", "--cache-dir", str(cache), "--image", str(small_qcow2)],
                      [reason, "--cache-dir"])
        finally:
            if mount is not None:
                mount.__exit__(None, None, None)


# -- a full disk ------------------------------------------------------------------------------


def test_full_disk(pytester: pytest.Pytester, tally: Tally, tmp_path: Path,
                   golden: Golden, real_base: dict[str, Any]) -> None:
    # refused before a byte moves: the layer's declared size against the free space
    # (a disk that fills mid-write: tests/unit/test_cache_store.py)
    fix = ["has no room for a blob of", "MiB free); free space there or set --flightvm-cache-dir"]
    cli_fix = ["has no room for a blob of", "MiB free); free space there or set --cache-dir"]
    with tally.trial("R6", "full disk: pull the real base (~550 MiB) into a 64 MiB tmpfs"), \
            tmpfs(tmp_path / "full", size="64m") as full:
        cache = full / "cli"
        tag = real_base["tags"][0]
        check_cli(["cache", "pull", tag, "--registry", real_base["registry"], "--cache-dir",
                   str(cache)], cli_fix)
        assert list((cache / "store" / "tmp").iterdir()) == []  # the partial was removed
        assert list((cache / "store" / "blobs" / "sha256").iterdir()) == []

        cache = full / "pinned"
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               f"--flightvm-image={real_base['registry']}:{tag}")
        check_setup_error(result, text, fix)
        check_no_domain(cache)
        assert list((cache / "store" / "tmp").iterdir()) == []

    with tally.trial("R6", "full disk: a failed pull by key does not fall back to a build"), \
            tmpfs(tmp_path / "full2", size="32m") as full:
        cache = full / "key"
        builds = golden.builds()
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               f"--flightvm-registry={golden.registry}",
                               f"--flightvm-build-cmd={golden.build_cmd}")
        check_setup_error(result, text, fix)
        assert golden.builds() == builds, "a full cache dir started a build"
        check_no_domain(cache)

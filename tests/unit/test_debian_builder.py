"""The built-in Debian builder: identity, host checks and failure reporting (no VM, no root)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_flightvm.builders import debian
from pytest_flightvm.builders.debian import DebianBuilder
from pytest_flightvm.cache.build import Builder
from pytest_flightvm.errors import BuildError, ConfigError, ToolMissingError
from tests.fake_disk import QCOW2_MAGIC


def _exe(path: Path, body: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian.os, "geteuid", lambda: 0)


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, as_root: None) -> Path:
    """A PATH holding a stand-in for every tool, and a GRUB BIOS dir; returns the bin dir."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool, _pkg in debian.TOOLS:
        if tool == "bash":  # the builder runs the script with it
            (bindir / tool).symlink_to(shutil.which("bash") or "/bin/bash")
        else:
            _exe(bindir / tool)
    grub = tmp_path / "grub-i386-pc"
    grub.mkdir()
    (grub / "modinfo.sh").write_text("")
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(debian, "EXTRA_PATH", ())
    monkeypatch.setattr(debian, "GRUB_BIOS_DIR", grub)
    return bindir


# --- identity -----------------------------------------------------------------


def test_is_a_builder_and_identity_hashes_the_shipped_script() -> None:
    b = DebianBuilder()
    assert isinstance(b, Builder)
    assert debian.SCRIPT.is_file(), "debian-build.sh must ship next to debian.py"
    digest = hashlib.sha256(debian.SCRIPT.read_bytes()).hexdigest()
    assert b.identity == f"debian-bookworm:{digest}"
    assert b.name == "debian-bookworm"


def _stand_in_script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A tiny script in place of debian-build.sh, for the identity tests."""
    script = tmp_path / "debian-build.sh"
    script.write_text("#!/bin/bash\necho one\n")
    monkeypatch.setattr(debian, "SCRIPT", script)
    return script


def test_identity_changes_when_the_script_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = _stand_in_script(monkeypatch, tmp_path)
    b = DebianBuilder()
    first = b.identity
    assert first == b.identity  # stable
    script.write_text("#!/bin/bash\necho two\n")
    second = b.identity
    assert second != first
    assert second.startswith("debian-bookworm:")
    assert len(second.split(":", 1)[1]) == 64


def test_identity_of_a_missing_script_is_a_build_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(debian, "SCRIPT", tmp_path / "gone.sh")
    with pytest.raises(BuildError, match="reinstall pytest-flightvm"):
        _ = DebianBuilder().identity


def test_login_variant_has_its_own_identity(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = _stand_in_script(monkeypatch, tmp_path)
    default, login = DebianBuilder(), DebianBuilder(variant="login")
    digest = hashlib.sha256(script.read_bytes()).hexdigest()
    assert default.variant == "cloud-init"
    assert default.identity == f"debian-bookworm:{digest}"
    assert login.identity == f"debian-bookworm-login:{digest}"
    assert login.identity != default.identity
    assert DebianBuilder(variant="cloud-init").identity == default.identity
    assert "variant='login'" in repr(login)
    # a script edit changes the login key too
    script.write_text("#!/bin/bash\necho two\n")
    assert login.identity != f"debian-bookworm-login:{digest}"


@pytest.mark.parametrize("variant", ["", "Login", "login ", "cloud", "../x"])
def test_unknown_variant_is_one_config_line(variant: str) -> None:
    with pytest.raises(ConfigError) as info:
        DebianBuilder(variant=variant)
    msg = str(info.value)
    assert "\n" not in msg and "cloud-init, login" in msg
    assert info.value.exit_code == 2


# --- host checks --------------------------------------------------------------


def test_not_root_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError) as info:
        DebianBuilder().build(tmp_path / "out.qcow2")
    assert not isinstance(info.value, ToolMissingError)
    msg = str(info.value)
    assert "root" in msg and "\n" not in msg
    assert info.value.exit_code == 2
    assert not (tmp_path / "out.qcow2").exists()


def test_missing_tool_names_tool_and_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_host: Path
) -> None:
    (fake_host / "mmdebstrap").unlink()
    with pytest.raises(ToolMissingError) as info:
        DebianBuilder().build(tmp_path / "out.qcow2")
    msg = str(info.value)
    assert msg == "mmdebstrap not found; install it with: apt-get install mmdebstrap"
    assert "\n" not in msg
    assert info.value.exit_code == 2


def test_missing_tool_from_an_empty_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, as_root: None
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(debian, "EXTRA_PATH", ())
    with pytest.raises(ToolMissingError, match=r"not found; install it with: apt-get install "):
        DebianBuilder().check_host()


@pytest.mark.parametrize(("tool", "package"), [("sfdisk", "fdisk"), ("qemu-img", "qemu-utils"),
                                               ("grub-install", "grub2-common"),
                                               ("mkfs.fat", "dosfstools"), ("mmd", "mtools"),
                                               ("mcopy", "mtools")])
def test_each_missing_tool_names_its_package(
    tmp_path: Path, fake_host: Path, tool: str, package: str
) -> None:
    (fake_host / tool).unlink()
    with pytest.raises(ToolMissingError, match=f"^{tool} not found; .*apt-get install {package}$"):
        DebianBuilder().check_host()


def test_missing_grub_bios_modules(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_host: Path
) -> None:
    monkeypatch.setattr(debian, "GRUB_BIOS_DIR", tmp_path / "nope")
    with pytest.raises(ToolMissingError, match="apt-get install grub-pc-bin"):
        DebianBuilder().check_host()


def test_sbin_is_searched_even_if_path_lacks_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_host: Path
) -> None:
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (fake_host / "losetup").rename(sbin / "losetup")
    monkeypatch.setattr(debian, "EXTRA_PATH", (str(sbin),))
    DebianBuilder().check_host()  # no error


# --- running the script -------------------------------------------------------


def test_failure_reports_last_line_and_tail(tmp_path: Path, fake_host: Path) -> None:
    script = _exe(
        tmp_path / "fail.sh",
        "#!/bin/bash\nfor ((i = 1; i <= 50; i++)); do echo \"build: step $i\" >&2; done\n"
        "echo 'build: error: no space left' >&2\nexit 1\n",
    )
    lines: list[str] = []
    with pytest.raises(BuildError) as info:
        DebianBuilder(script).build(tmp_path / "out.qcow2", log=lines.append)
    assert "no space left" in str(info.value)
    assert "\n" not in str(info.value)
    detail = info.value.detail.splitlines()
    assert len(detail) == 30
    assert detail[-1] == "build: error: no space left"
    assert lines[0] == "build: step 1" and len(lines) == 51


def test_failure_headline_prefers_the_apt_root_cause(tmp_path: Path, fake_host: Path) -> None:
    script = _exe(
        tmp_path / "apt.sh",
        "#!/bin/bash\n"
        "echo 'build: mmdebstrap bookworm from http://127.0.0.1:9/debian' >&2\n"
        "echo 'E: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/InRelease' >&2\n"
        "echo 'E: mmdebstrap failed to run' >&2\n"
        "echo 'build: failed during \"mmdebstrap bookworm\"' >&2\n"
        "exit 25\n",
    )
    with pytest.raises(BuildError) as info:
        DebianBuilder(script).build(tmp_path / "out.qcow2")
    msg = str(info.value)
    assert "(exit 25)" in msg
    assert 'failed during "mmdebstrap bookworm"' in msg
    assert "E: Failed to fetch" in msg
    assert "\n" not in msg


def test_success_streams_and_passes_output(tmp_path: Path, fake_host: Path) -> None:
    script = _exe(
        tmp_path / "ok.sh",
        "#!/bin/bash\necho 'build: working' >&2\nprintf 'QFI\\373' > \"${@: -1}\"\n",
    )
    out = tmp_path / "out.qcow2"
    lines: list[str] = []
    DebianBuilder(script).build(out, log=lines.append)
    assert out.read_bytes() == QCOW2_MAGIC
    assert lines == ["build: working"]


def test_the_variant_reaches_the_script_as_an_argument(tmp_path: Path, fake_host: Path) -> None:
    script = _exe(
        tmp_path / "args.sh",
        "#!/bin/bash\necho \"build: args $*\" >&2\nprintf 'QFI\\373' > \"${@: -1}\"\n",
    )
    out = tmp_path / "out.qcow2"
    for variant in ("login", "cloud-init"):
        lines: list[str] = []
        DebianBuilder(script, variant=variant).build(out, log=lines.append)
        assert lines == [f"build: args --variant {variant} {out}"]


def test_exit_zero_without_output_is_an_error(tmp_path: Path, fake_host: Path) -> None:
    script = _exe(tmp_path / "noop.sh", "#!/bin/bash\nexit 0\n")
    with pytest.raises(BuildError, match="wrote no file"):
        DebianBuilder(script).build(tmp_path / "out.qcow2")


# --- the shell script's own up-front checks -----------------------------------


def _run_real_script(path_dirs: list[Path], out: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.pathsep.join(str(d) for d in path_dirs), "LC_ALL": "C"}
    return subprocess.run(["/bin/bash", str(debian.SCRIPT), str(out)], env=env,
                          capture_output=True, text=True, timeout=30)


def _shim_bin(tmp_path: Path, uid: int) -> Path:
    """A bin dir with `id` reporting ``uid`` and the coreutils the script's checks use."""
    bindir = tmp_path / "shim"
    bindir.mkdir()
    _exe(bindir / "id", f"#!/bin/sh\necho {uid}\n")
    for tool in ("basename", "dirname"):
        real = next((Path(d) / tool for d in ("/usr/bin", "/bin") if (Path(d) / tool).exists()),
                    None)
        if real is not None:
            (bindir / tool).symlink_to(real)
    return bindir


def test_script_refuses_non_root_with_one_line(tmp_path: Path) -> None:
    res = _run_real_script([_shim_bin(tmp_path, 1000)], tmp_path / "out.qcow2")
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1
    assert "root" in res.stderr


def test_script_names_the_missing_tool_with_one_line(tmp_path: Path) -> None:
    # Only the shim dir (plus the /usr/sbin:/sbin the script appends): no mmdebstrap there.
    res = _run_real_script([_shim_bin(tmp_path, 0)], tmp_path / "out.qcow2")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == [
        "build: error: mmdebstrap not found; install it with: apt-get install mmdebstrap"
    ]
    assert not (tmp_path / "out.qcow2").exists()


def test_script_usage_error(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    res = subprocess.run(["/bin/bash", str(debian.SCRIPT)], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert "usage:" in res.stderr


def test_script_rejects_an_unknown_variant_with_one_line(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for argv, extra_env in (
        (["--variant", "bogus", str(tmp_path / "o.qcow2")], {}),
        ([str(tmp_path / "o.qcow2")], {"FLIGHTVM_DEBIAN_VARIANT": "bogus"}),
    ):
        res = subprocess.run(["/bin/bash", str(debian.SCRIPT), *argv], env={**env, **extra_env},
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            "build: error: unknown variant 'bogus'; use cloud-init or login"
        ]
    assert not (tmp_path / "o.qcow2").exists()


@pytest.mark.parametrize("argv", [["--variant"], ["--variant", "login"], ["--bogus", "out.qcow2"],
                                  ["a.qcow2", "b.qcow2"]])
def test_script_usage_errors_for_bad_arguments(tmp_path: Path, argv: list[str]) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    res = subprocess.run(["/bin/bash", str(debian.SCRIPT), *argv], env=env, capture_output=True,
                         text=True, timeout=30, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "build: error: usage: debian-build.sh [--variant cloud-init|login] OUTPUT.qcow2"
    ]
    assert list(tmp_path.iterdir()) == []


# --- python -m pytest_flightvm.builders.debian --------------------------------


def test_main_builds_the_variant_and_prints_the_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_host: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = _exe(
        tmp_path / "ok.sh",
        "#!/bin/bash\necho \"build: variant $2\" >&2\nprintf 'QFI\\373' > \"$3\"\n",
    )
    monkeypatch.setattr(debian, "SCRIPT", script)
    out = tmp_path / "login.qcow2"
    assert debian.main(["--variant", "login", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "build: variant login" in captured.err
    assert out.read_bytes() == QCOW2_MAGIC


def test_main_reports_errors_as_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    assert debian.main([str(tmp_path / "out.qcow2")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flightvm: ") and "root" in lines[0]


def test_main_rejects_an_unknown_variant(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        debian.main(["--variant", "bogus", "out.qcow2"])
    assert info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err

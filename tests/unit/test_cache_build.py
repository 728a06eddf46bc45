"""CommandBuilder and the default builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_flightvm.cache import build
from pytest_flightvm.cache.build import Builder, CommandBuilder, check_qcow2
from pytest_flightvm.errors import BuildError, ConfigError

WRITE_QCOW2 = "printf 'QFI\\373rest' > \"$FLIGHTVM_OUTPUT\""


def test_command_builder_writes_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    b = CommandBuilder(WRITE_QCOW2)
    assert isinstance(b, Builder)
    assert b.identity == "cmd:" + WRITE_QCOW2
    b.build(out, log=print)
    assert out.read_bytes() == b"QFI\xfbrest"


def test_command_builder_env(tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    env_file = tmp_path / "env"
    CommandBuilder(f'echo "$FLIGHTVM_KEY" > {env_file}; {WRITE_QCOW2}').build(
        out, log=print, key="k" * 64
    )
    assert env_file.read_text().strip() == "k" * 64


def test_not_a_qcow2(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not a qcow2"):
        CommandBuilder('echo hello > "$FLIGHTVM_OUTPUT"').build(tmp_path / "o", log=print)


def test_no_output(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="wrote no file"):
        CommandBuilder("true").build(tmp_path / "o", log=print)


def test_failing_command_is_one_line_with_the_tail(tmp_path: Path) -> None:
    with pytest.raises(BuildError) as info:
        CommandBuilder("echo step one; echo 'mmdebstrap: boom' >&2; exit 3").build(
            tmp_path / "o", log=print
        )
    assert "\n" not in str(info.value)
    assert "exited 3" in str(info.value) and "mmdebstrap: boom" in str(info.value)
    assert "step one" in info.value.detail


def test_empty_command_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        CommandBuilder("  ")


def test_long_builds_log_progress(tmp_path: Path) -> None:
    lines: list[str] = []
    cmd = f"echo first; sleep 2.2; echo second; {WRITE_QCOW2}"
    CommandBuilder(cmd).build(tmp_path / "o", log=lines.append)
    assert len(lines) == 1 and "second" in lines[0]


def test_check_qcow2(tmp_path: Path) -> None:
    good = tmp_path / "g"
    good.write_bytes(b"QFI\xfb")
    check_qcow2(good)
    bad = tmp_path / "b"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(BuildError, match="not a qcow2"):
        check_qcow2(bad)


def test_builder_for() -> None:
    assert isinstance(build.builder_for("make image"), CommandBuilder)


def test_default_builder_missing_is_one_line(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pytest_flightvm.builders.debian", None)
    with pytest.raises(BuildError, match="no builder available"):
        build.default_builder()

"""CommandBuilder and the default builder."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_flightvm.cache import build
from pytest_flightvm.cache.build import Builder, CommandBuilder, check_qcow2
from pytest_flightvm.errors import BuildError, ConfigError, FlightVMError
from tests.fake_disk import QCOW2_MAGIC

WRITE_QCOW2 = "printf 'QFI\\373rest' > \"$FLIGHTVM_OUTPUT\""


def test_command_builder_writes_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    b = CommandBuilder(WRITE_QCOW2)
    assert isinstance(b, Builder)
    assert b.identity == "cmd:" + WRITE_QCOW2
    b.build(out, log=print)
    assert out.read_bytes() == QCOW2_MAGIC + b"rest"


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
    good.write_bytes(QCOW2_MAGIC)
    check_qcow2(good)
    bad = tmp_path / "b"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(BuildError, match="not a qcow2"):
        check_qcow2(bad)


def test_builder_for(tmp_path) -> None:
    assert isinstance(build.builder_for("make image"), CommandBuilder)
    # the plugin and the CLI both get it from here: the command runs in the rootdir
    builder = build.builder_for("make image", tmp_path)
    assert isinstance(builder, CommandBuilder) and builder.cwd == tmp_path


def test_default_builder_missing_is_one_line(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pytest_flightvm.builders.debian", None)
    with pytest.raises(BuildError, match="no builder available"):
        build.default_builder()


def test_hook_builder_gets_the_key_as_an_argument(tmp_path: Path) -> None:
    from pytest_flightvm.cache import resolve_image
    from pytest_flightvm.config import Settings
    from tests.fake_disk import write_fake_qcow2

    calls: list[tuple[Path, str]] = []

    def hook(output: Path, key: str) -> bool:
        calls.append((output, key))
        write_fake_qcow2(output, 4096)
        return True

    def impl_a(config: object, output: Path, key: str) -> bool:
        return True

    def impl_b(config: object, output: Path, key: str) -> None:
        return None

    builder = build.HookBuilder([(impl_a, "conftest")], hook)
    assert isinstance(builder, Builder) and builder.identity.startswith("hook:")
    assert build.HookBuilder([(impl_a, "conftest")], hook).identity == builder.identity
    assert build.HookBuilder([(impl_b, "conftest")], hook).identity != builder.identity  # source
    assert build.HookBuilder([(len, "p1")], hook).identity != build.HookBuilder(
        [(len, "p2")], hook).identity  # no source to read: the plugin's name counts
    settings = Settings(cache_dir=tmp_path / "cache", rootdir=tmp_path, arch="amd64")
    image = resolve_image(settings, builder, log=lambda m: None)
    assert image.source == "build" and [key for _, key in calls] == [image.key]
    with pytest.raises(FlightVMError, match="pytest_flightvm_build_image returned no result"):
        build.HookBuilder([(impl_b, "c")], lambda output, key: None).build(tmp_path / "o", key="k")


@pytest.mark.parametrize("cmd,last", [("echo started; exec sleep 60", "started"),  # then silent
                                      ("while :; do echo working; sleep 0.1; done", "working")])
def test_a_build_over_its_timeout_is_stopped_silent_or_not(tmp_path: Path, cmd: str,
                                                           last: str) -> None:
    pid_file = tmp_path / "pid"
    t = time.monotonic()
    with pytest.raises(BuildError, match=r"the build command ran over 1 s and was stopped; "
                                         r"raise --flightvm-build-timeout") as info:
        CommandBuilder(f"echo $$ > {pid_file}; {cmd}", timeout=1).build(tmp_path / "o",
                                                                        log=lambda _m: None)
    assert time.monotonic() - t < 10
    assert "\n" not in str(info.value)  # one line; the output's tail is the detail
    assert info.value.detail.splitlines()[-1] == last
    assert running_in_group(int(pid_file.read_text())) == []  # its whole group is gone


def running_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (an orphan waits for init)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            found.append(int(entry.name))
    return found


def test_builder_for_passes_the_timeout(tmp_path: Path) -> None:
    b = build.builder_for("true", tmp_path, 7.0)
    assert isinstance(b, CommandBuilder) and b.timeout == 7.0

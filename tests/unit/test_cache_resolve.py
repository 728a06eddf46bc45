"""resolve_image without a registry: local store -> build, locking, pins, records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_flightvm.cache import resolve_image
from pytest_flightvm.cache.store import Store
from pytest_flightvm.config import Settings
from pytest_flightvm.errors import BuildError, ConfigError
from tests.fake_disk import QCOW2_MAGIC, qcow2_with, write_fake_qcow2


def build_cmd(counter: Path, size_kib: int = 256) -> str:
    # Counts its runs, then writes a fake qcow2 (magic + random bytes).
    return (
        f"echo x >> {counter}; "
        "{ printf 'QFI\\373'; "
        f"head -c {size_kib * 1024} /dev/urandom; }} > \"$FLIGHTVM_OUTPUT\""
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", rootdir=tmp_path, arch="amd64",
                    build_cmd=build_cmd(tmp_path / "builds"))


def builds(tmp_path: Path) -> int:
    f = tmp_path / "builds"
    return len(f.read_text().splitlines()) if f.exists() else 0


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_then_local_hit(settings: Settings, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    first = resolve_image(settings, record=rec, log=lambda m: None)
    second = resolve_image(settings, record=rec, log=lambda m: None)
    assert first.source == "build" and second.source == "local"
    assert builds(tmp_path) == 1
    assert first.path == second.path == settings.store_dir / "blobs" / "sha256" / first.digest[7:]
    assert first.path.read_bytes()[:4] == QCOW2_MAGIC
    assert oct(first.path.stat().st_mode & 0o777) == "0o444"
    assert first.key == second.key and len(first.key) == 64
    assert first.tags[0] == f"base-qcow2-{first.key[:12]}-amd64"
    assert second.bytes_moved == 0 and second.seconds < 0.3
    lines = records(rec)
    assert [r["source"] for r in lines] == ["build", "local"]
    assert set(lines[0]) == {"pid", "source", "key", "digest", "bytes", "seconds", "ts"}
    assert list((settings.store_dir / "tmp").iterdir()) == []


def test_rebuild_builds_once_per_run(settings: Settings, tmp_path: Path) -> None:
    resolve_image(settings, log=lambda m: None, run="run-1")
    again = settings.replace(rebuild=True)
    assert resolve_image(again, log=lambda m: None, run="run-2").source == "build"
    assert resolve_image(again, log=lambda m: None, run="run-2").source == "local"
    assert builds(tmp_path) == 2


def test_damaged_local_blob_is_replaced(settings: Settings, tmp_path: Path) -> None:
    first = resolve_image(settings, log=lambda m: None)
    os.chmod(first.path, 0o644)  # 0444 in the store: only root could damage it without this
    os.truncate(first.path, 100)
    os.chmod(first.path, 0o444)
    msgs: list[str] = []
    second = resolve_image(settings, log=msgs.append)
    assert second.source == "build" and builds(tmp_path) == 2
    assert any("damaged" in m for m in msgs)
    assert second.path.read_bytes()[:4] == QCOW2_MAGIC


def test_offline_never_contacts_the_registry(settings: Settings, tmp_path: Path) -> None:
    # A registry on a port nothing listens on: offline must not even try it.
    offline = settings.replace(registry="127.0.0.1:1/nothing/here", offline=True, push=True)
    msgs: list[str] = []
    image = resolve_image(offline, log=msgs.append)
    assert image.source == "build"
    assert not any("registry" in m for m in msgs)


def test_failed_build_leaves_nothing(settings: Settings, tmp_path: Path) -> None:
    bad = settings.replace(build_cmd="echo half > \"$FLIGHTVM_OUTPUT\"; exit 1")
    with pytest.raises(BuildError, match="exited 1"):
        resolve_image(bad, log=lambda m: None)
    store = Store(settings.store_dir)
    assert store.refs() == {} and store.ls() == []
    assert list((settings.store_dir / "tmp").iterdir()) == []


def test_builder_object_and_key_kwarg(settings: Settings, tmp_path: Path) -> None:
    seen: dict[str, str] = {}

    class MyBuilder:
        identity = "test-builder 1.0"

        def build(self, output: Path, *, log, key: str) -> None:
            seen["key"] = key
            write_fake_qcow2(output, 4096)

    image = resolve_image(settings, MyBuilder(), log=lambda m: None)
    assert image.source == "build" and seen["key"] == image.key


def test_builder_without_key_kwarg_sees_flightvm_key(settings: Settings) -> None:
    seen: dict[str, str] = {}

    class EnvBuilder:
        identity = "env-builder"

        def build(self, output: Path, *, log) -> None:
            seen["key"] = os.environ["FLIGHTVM_KEY"]
            write_fake_qcow2(output, 4096)

    image = resolve_image(settings, EnvBuilder(), log=lambda m: None)
    assert seen["key"] == image.key and "FLIGHTVM_KEY" not in os.environ


def test_builder_crash_is_a_one_line_build_error(settings: Settings) -> None:
    class Broken:
        identity = "broken"

        def build(self, output: Path, *, log) -> None:
            raise KeyError("missing thing")

    with pytest.raises(BuildError, match="the builder 'broken' failed: KeyError") as info:
        resolve_image(settings, Broken(), log=lambda m: None)
    assert "\n" not in str(info.value)


def test_parallel_processes_build_once(settings: Settings, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pytest_flightvm.cache import resolve_image
        from pytest_flightvm.config import Settings
        s = Settings(cache_dir=Path({str(settings.cache_dir)!r}), rootdir=Path({str(tmp_path)!r}),
                     arch="amd64", build_cmd={settings.build_cmd!r} + "; sleep 0.5")
        print(resolve_image(s, record=Path({str(rec)!r}), log=lambda m: None).path)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    assert builds(tmp_path) == 1
    assert sorted(r["source"] for r in records(rec)) == ["build", "local", "local", "local"]


def test_pinned_local_path_is_imported_read_only(settings: Settings, tmp_path: Path) -> None:
    src = write_fake_qcow2(tmp_path / "mine.qcow2", 8192, os.urandom(8))
    pinned = settings.replace(image=str(src), build_cmd="exit 1")
    a = resolve_image(pinned, log=lambda m: None)
    assert a.source == "local" and a.key == "" and builds(tmp_path) == 0
    assert a.path != src and a.path.read_bytes() == src.read_bytes()
    assert oct(a.path.stat().st_mode & 0o777) == "0o444"
    ino = a.path.stat().st_ino
    assert resolve_image(pinned, log=lambda m: None).path.stat().st_ino == ino
    write_fake_qcow2(src, 8192, os.urandom(8))
    b = resolve_image(pinned, log=lambda m: None)
    assert b.digest != a.digest and b.path.read_bytes() == src.read_bytes()


def test_pinned_relative_path(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    base = write_fake_qcow2(tmp_path / "img" / "base.qcow2", 4096, b"rel")
    image = resolve_image(settings.replace(image="img/base.qcow2"), log=lambda m: None)
    assert image.path.read_bytes() == base.read_bytes()


def test_pinned_file_naming_a_backing_file_is_refused(settings: Settings, tmp_path: Path) -> None:
    # a downloaded image whose header points QEMU (running as root) at a host file
    src = qcow2_with(tmp_path, backing_offset=1024, backing_size=len(b"/etc/shadow"))
    data = bytearray(src.read_bytes()).ljust(1024, b"\0") + b"/etc/shadow"
    src.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="backing file.*qemu-img convert"):
        resolve_image(settings.replace(image=str(src)), log=lambda m: None)
    assert not list((settings.store_dir / "blobs" / "sha256").glob("*"))


@pytest.mark.parametrize("image,match", [
    ("./missing.qcow2", "no such file"),
    ("not a ref", "not a registry reference"),
])
def test_bad_pins(settings: Settings, image: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_image(settings.replace(image=image), log=lambda m: None)


def test_pinned_file_that_is_not_qcow2(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "x.img").write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match="not a qcow2"):
        resolve_image(settings.replace(image=str(tmp_path / "x.img")), log=lambda m: None)


def test_pinned_ref_offline_without_a_copy(settings: Settings) -> None:
    pinned = settings.replace(image="127.0.0.1:1/x/y:tag", offline=True)
    with pytest.raises(ConfigError, match="offline"):
        resolve_image(pinned, log=lambda m: None)


def test_only_a_build_asks_git_for_its_tags(settings: Settings, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # git's tags (<prefix>-<short>, -latest) are for a push; a hit resolves by the key tag.
    from pytest_flightvm.cache import key as key_mod
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    calls: list[tuple[str, ...]] = []
    real = key_mod._git
    monkeypatch.setattr(key_mod, "_git", lambda root, *args: calls.append(args) or real(root, *args))
    built = resolve_image(settings, log=lambda m: None)
    assert built.source == "build" and calls
    short = real(tmp_path, "rev-parse", "--short", "HEAD").strip()
    assert built.tags[:2] == (f"base-qcow2-{built.key[:12]}-amd64", f"base-qcow2-{short}")
    calls.clear()
    hit = resolve_image(settings, log=lambda m: None)
    assert hit.source == "local" and calls == []
    assert hit.tags == (f"base-qcow2-{hit.key[:12]}-amd64",)

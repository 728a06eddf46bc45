"""resolve_image against the real local registry: pull/build/push, N processes,
kill -9, a down and a stalled registry."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightvm.cache import resolve_image
from pytest_flightvm.cache.build import CommandBuilder
from pytest_flightvm.cache.key import compute_key, tags_for
from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.store import Store
from pytest_flightvm.config import Settings
from pytest_flightvm.errors import ArtifactNotFound, RegistryUnavailable
from tests.fake_disk import QCOW2_MAGIC, qcow2_bytes


def quiet(_msg: str) -> None:
    pass


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "golden.qcow2"
    path.write_bytes(qcow2_bytes(os.urandom(6 << 20)))
    return path


def settings_for(tmp_path: Path, disk: Path, registry: str | None, store: str = "cache",
                 **kw: object) -> Settings:
    # The build "copies the golden disk" and counts itself; $NO_BUILD makes it fail.
    cmd = (f'[ -z "$NO_BUILD" ] || exit 97; echo x >> {tmp_path}/builds; '
           f'cp {disk} "$FLIGHTVM_OUTPUT"')
    return Settings(cache_dir=tmp_path / store, rootdir=tmp_path, arch="amd64",
                    registry=registry, build_cmd=cmd, **kw)  # type: ignore[arg-type]


def builds(tmp_path: Path) -> int:
    f = tmp_path / "builds"
    return len(f.read_text().splitlines()) if f.exists() else 0


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def pushed(registry_repo: str, tmp_path: Path, disk: Path) -> Settings:
    """The golden disk built once and pushed under its key tags; returns settings with a
    fresh, empty store."""
    first = resolve_image(settings_for(tmp_path, disk, registry_repo, "builder-cache",
                                       push=True), log=quiet)
    assert first.source == "build" and first.bytes_moved == disk.stat().st_size
    tags = FlightRegistry(registry_repo).tags()
    assert first.tags[0] in tags
    return settings_for(tmp_path, disk, registry_repo)


def test_build_push_then_pull_then_local(pushed: Settings, tmp_path: Path, disk: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rec = tmp_path / "rec.jsonl"
    monkeypatch.setenv("NO_BUILD", "1")
    a = resolve_image(pushed, record=rec, log=quiet)
    b = resolve_image(pushed, record=rec, log=quiet)
    assert (a.source, b.source) == ("registry", "local")
    assert a.path == b.path and a.path.read_bytes() == disk.read_bytes()
    assert a.bytes_moved == disk.stat().st_size and b.bytes_moved == 0
    assert [r["source"] for r in records(rec)] == ["registry", "local"]
    assert builds(tmp_path) == 1


def test_local_hit_makes_no_registry_request(pushed: Settings, tmp_path: Path,
                                             stalled_port: int) -> None:
    resolve_image(pushed, log=quiet)
    # Same store, but the registry is now a socket that never answers: a hit must not care.
    stalled = pushed.replace(registry=f"127.0.0.1:{stalled_port}/x/y")
    start = time.monotonic()
    image = resolve_image(stalled, log=quiet)
    assert image.source == "local" and time.monotonic() - start < 0.3


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_local_blob_is_refetched(pushed: Settings, tmp_path: Path, damage: str) -> None:
    first = resolve_image(pushed, log=quiet)
    good = first.path.read_bytes()
    if damage == "truncate":
        os.truncate(first.path, len(good) // 3)
    else:
        with open(first.path, "r+b") as f:
            f.seek(4096)
            f.write(b"\0\0\0\0")
    msgs: list[str] = []
    again = resolve_image(pushed, log=msgs.append)
    assert again.source == "registry" and again.path.read_bytes() == good
    assert any("damaged" in m for m in msgs)
    assert builds(tmp_path) == 1


def test_eight_processes_one_transfer(pushed: Settings, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from pytest_flightvm.cache import resolve_image
        from pytest_flightvm.cache.store import Store
        from pytest_flightvm.config import Settings
        s = Settings(cache_dir=Path({str(pushed.cache_dir)!r}), rootdir=Path({str(tmp_path)!r}),
                     arch="amd64", registry={pushed.registry!r}, build_cmd={pushed.build_cmd!r})
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        image = resolve_image(s, record=Path({str(rec)!r}), log=lambda m: None)
        assert Store(s.store_dir).verify(image.digest, full=True)
        print(image.path, image.digest)
    """)
    env = dict(os.environ, NO_BUILD="1")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(8)]
    time.sleep(0.5)
    go.touch()
    results = [p.communicate(timeout=30) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert len({out for out, _ in results}) == 1
    sources = sorted(r["source"] for r in records(rec))
    assert sources == ["local"] * 7 + ["registry"]
    assert builds(tmp_path) == 1  # only the fixture's build


def test_kill_9_mid_pull_leaves_no_false_hit(pushed: Settings, tmp_path: Path) -> None:
    started = tmp_path / "started"
    # The child pulls, but stalls after its first chunk so we can kill it mid-write.
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pytest_flightvm.cache import resolve_image
        from pytest_flightvm.cache.store import BlobWriter
        from pytest_flightvm.config import Settings
        def stall(real):
            def slow(self, data):
                n = real(self, data)
                Path({str(started)!r}).touch()
                time.sleep(60)
                return n
            return slow
        BlobWriter.write = stall(BlobWriter.write)  # a chunk written, or spliced (plain HTTP)
        BlobWriter.splice = stall(BlobWriter.splice)
        s = Settings(cache_dir=Path({str(pushed.cache_dir)!r}), rootdir=Path({str(tmp_path)!r}),
                     arch="amd64", registry={pushed.registry!r}, build_cmd={pushed.build_cmd!r})
        resolve_image(s, log=lambda m: None)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, NO_BUILD="1"))
    try:
        deadline = time.monotonic() + 15
        while not started.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    store = Store(pushed.store_dir)
    partial = list((store.root / "tmp").iterdir())
    assert len(partial) == 1 and partial[0].name.startswith(f"{child.pid}-")
    assert store.ls() == [] and store.refs() == {}

    image = resolve_image(pushed, log=quiet)  # the lock died with the child
    assert image.source == "registry"
    assert store.verify(image.digest, full=True)
    assert not partial[0].exists()  # swept: its writer is dead


# -- a registry that is down, or stalled --------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on exit: connections are refused


@pytest.fixture
def stalled_port() -> Iterator[int]:
    """Accepts connections (kernel backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield int(s.getsockname()[1])
    s.close()


@pytest.mark.parametrize("which", ["down", "stalled"])
def test_unusable_registry_falls_back_to_build_fast(
    tmp_path: Path, disk: Path, which: str, request: pytest.FixtureRequest
) -> None:
    port = request.getfixturevalue("closed_port" if which == "down" else "stalled_port")
    settings = settings_for(tmp_path, disk, f"127.0.0.1:{port}/flightvm/base", push=True)
    msgs: list[str] = []
    start = time.monotonic()
    image = resolve_image(settings, log=msgs.append)
    elapsed = time.monotonic() - start
    assert image.source == "build" and builds(tmp_path) == 1
    assert elapsed < 10, f"{which} registry took {elapsed:.1f} s"
    warnings = [m for m in msgs if "unreachable" in m]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert not any("push" in m for m in msgs)  # no second wait on a push


@pytest.mark.parametrize("which", ["down", "stalled"])
def test_unusable_registry_raises_quickly(tmp_path: Path, which: str,
                                          request: pytest.FixtureRequest) -> None:
    port = request.getfixturevalue("closed_port" if which == "down" else "stalled_port")
    reg = FlightRegistry(f"127.0.0.1:{port}/flightvm/base")
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable) as info:
        reg.pull_disk("latest", Store(tmp_path / "s"), arch="amd64")
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value)
    assert ("refused" in str(info.value)) if which == "down" else ("no answer" in str(info.value))


# -- pins ------------------------------------------------------------------------------------


def test_pinned_registry_ref_by_tag_and_digest(registry_repo: str, tmp_path: Path,
                                               disk: Path) -> None:
    reg = FlightRegistry(registry_repo)
    pushed = reg.push_disk(disk, ["golden"], arch="amd64")
    by_tag = settings_for(tmp_path, disk, None, image=f"{registry_repo}:golden")
    a = resolve_image(by_tag, log=quiet)
    b = resolve_image(by_tag, log=quiet)  # one HEAD request: tag unchanged
    assert (a.source, b.source) == ("registry", "local") and a.key == ""
    assert a.path.read_bytes() == disk.read_bytes()
    by_digest = settings_for(tmp_path, disk, None,
                             image=f"{registry_repo}@{pushed.manifest_digest}")
    c = resolve_image(by_digest, log=quiet)
    d = resolve_image(by_digest, log=quiet)
    assert c.source == "registry" and d.source == "local" and c.digest == a.digest
    assert builds(tmp_path) == 0

    # Another arch never gets this copy, not even from the local store.
    with pytest.raises(ArtifactNotFound, match="not arm64"):
        resolve_image(by_digest.replace(arch="arm64"), log=quiet)

    # The tag moves: the pin follows it.
    other = tmp_path / "other.qcow2"
    other.write_bytes(qcow2_bytes(os.urandom(1 << 20)))
    reg.push_disk(other, ["golden"], arch="amd64")
    e = resolve_image(by_tag, log=quiet)
    assert e.source == "registry" and e.path.read_bytes() == other.read_bytes()


def test_key_tag_matches_what_the_cli_would_push(pushed: Settings, tmp_path: Path) -> None:
    key = compute_key(CommandBuilder(pushed.build_cmd or "").identity, (), tmp_path, "amd64")
    assert tags_for("base-qcow2", key, "amd64", tmp_path)[0] in FlightRegistry(
        pushed.registry or "").tags()


@pytest.fixture
def stalls_mid_blob(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Fault injection: a registry front that serves a valid manifest, then sends the
    first 64 KiB of the blob and goes silent (a stall mid-transfer)."""
    import hashlib
    import http.server
    import threading

    from pytest_flightvm.cache.registry import ANN_ARCH, ANN_KEY, LAYER_MEDIA_TYPE, OCI_MANIFEST

    release = threading.Event()
    state: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if "/manifests/" in self.path:
                manifest = {
                    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                               "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(),
                               "size": 2},
                    "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": "sha256:" + "a" * 64,
                                "size": 8 << 20}],
                    "annotations": {ANN_ARCH: "amd64", ANN_KEY: state.get("key", "")},
                }
                body = json.dumps(manifest).encode()
                self.send_response(200)
                self.send_header("Content-Type", OCI_MANIFEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(8 << 20))
            self.end_headers()
            self.wfile.write(QCOW2_MAGIC + b"\0" * (64 << 10))
            self.wfile.flush()
            release.wait(30)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["repo"] = f"127.0.0.1:{server.server_address[1]}/flightvm/base"
    yield state
    release.set()
    server.shutdown()
    server.server_close()


def test_stall_mid_blob_is_detected_and_leaves_nothing(stalls_mid_blob: dict[str, str],
                                                       tmp_path: Path,
                                                       disk: Path) -> None:
    settings = settings_for(tmp_path, disk, stalls_mid_blob["repo"])
    key = compute_key(CommandBuilder(settings.build_cmd or "").identity, (), tmp_path, "amd64")
    stalls_mid_blob["key"] = key.digest
    msgs: list[str] = []
    start = time.monotonic()
    image = resolve_image(settings, log=msgs.append)
    assert time.monotonic() - start < 10
    assert image.source == "build"
    assert [m for m in msgs if "unreachable" in m and "no answer" in m]
    store = Store(settings.store_dir)
    assert [e.digest for e in store.ls()] == [image.digest]
    assert list((store.root / "tmp").iterdir()) == []

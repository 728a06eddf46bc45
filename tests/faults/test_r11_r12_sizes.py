"""R11: size bombs, and R12: a trickle. Nothing from a registry is trusted to be as
small or as quick as it says.

R11 bodies: a blob that streams past its declared size (and one that announces
208 MiB); metadata without end (manifest, tag list, token reply); a zstd layer
that inflates past its declared disk size (or declares a size out of all
proportion); a gzip tar layer whose members inflate 1000:1 (peak memory
measured in a child); a sparse tar member claiming 1 TiB. R12: a blob and a
manifest sent one byte every 4 s, which a per-read timeout never catches.

The zstd, gzip and sparse cases are served by the real docker-registry
(127.0.0.1:5000); the rest by :class:`HostileRegistry` on loopback, since a real
registry cannot misbehave on purpose. Each case ends with one line or the
resolve library's fallback to a build, in bounded time and memory, with
nothing of it in the store and nothing left in the store's tmp.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from faultkit import (
    PY,
    HostileRegistry,
    Reply,
    Tally,
    base_env,
    check_store,
    cli,
    push_container_image,
)

from pytest_flightvm.cache import resolve_image
from pytest_flightvm.cache.key import tags_for
from pytest_flightvm.cache.registry import (
    ANN_ARCH,
    ANN_DISK_DIGEST,
    ANN_DISK_SIZE,
    ANN_KEY,
    LAYER_MEDIA_TYPE,
    LAYER_MEDIA_TYPE_ZSTD,
    OCI_MANIFEST,
    Credentials,
    FlightRegistry,
)
from pytest_flightvm.cache.resolve import current_key
from pytest_flightvm.cache.store import Store
from pytest_flightvm.config import Settings
from pytest_flightvm.errors import FlightVMError, RegistryError
from tests.fake_disk import HEADER, write_fake_qcow2

MiB = 1 << 20
REPO = "flightvm/base"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def disk_manifest(digest: str, size: int, media_type: str = LAYER_MEDIA_TYPE, key: str = "",
                  **layer_ann: str) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(b"{}"),
                   "size": 2},
        "layers": [{"mediaType": media_type, "digest": digest, "size": size,
                    "annotations": layer_ann}],
        "annotations": {ANN_ARCH: "amd64", ANN_KEY: key},
    }).encode()


class Endless:
    """1 MiB chunks for ever; counts what was sent."""

    def __init__(self) -> None:
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        block = b"\0" * MiB
        while True:
            self.sent += len(block)
            yield block


def trickle(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i:i + 1]


def fallback_settings(tmp_path: Path, registry: str) -> tuple[Settings, Path, str]:
    """Settings whose key resolves through ``registry``, a build that copies a good
    disk, and the tag the key is looked up under."""
    good = write_fake_qcow2(tmp_path / "good.qcow2", MiB, seed=11)
    settings = Settings(cache_dir=tmp_path / f"cache-{uuid.uuid4().hex[:6]}", registry=registry,
                        arch="amd64", build_cmd=f'cp {good} "$FLIGHTVM_OUTPUT"',
                        rootdir=tmp_path)
    key = current_key(settings)
    return settings, good, tags_for(settings.tag_prefix, key, "amd64", tmp_path)[0]


def built_and_clean(settings: Settings, good: Path, msgs: list[str], *words: str) -> None:
    """The resolve fell back to a build with one warning naming ``words``; the store
    holds only the built disk."""
    warned = [m for m in msgs if all(w in m for w in words)]
    assert len(warned) == 1 and "\n" not in warned[0], msgs
    store = Store(settings.store_dir)
    assert [e.path.read_bytes() == good.read_bytes() for e in store.ls()] == [True]
    assert check_store(store.root) == [] and list((store.root / "tmp").iterdir()) == []


def one_line_error(exc: pytest.ExceptionInfo[FlightVMError], *words: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and all(w in text for w in words), text
    return text


# -- R11: bodies --------------------------------------------------------------------------------


def test_blob_past_its_declared_size(tally: Tally, tmp_path: Path) -> None:
    with HostileRegistry() as hostile:
        settings, good, tag = fallback_settings(tmp_path, hostile.repo(REPO))
        key = current_key(settings).digest
        digest = sha(b"declared")
        hostile.replies[f"/v2/{REPO}/manifests/{tag}"] = Reply(disk_manifest(digest, MiB,
                                                                              key=key))
        endless = Endless()
        hostile.replies[f"/v2/{REPO}/blobs/{digest}"] = Reply(endless)
        with tally.trial("R11", "body: a 1 MiB layer that never ends; resolve builds"):
            msgs: list[str] = []
            start = time.monotonic()
            image = resolve_image(settings, log=msgs.append)
            assert image.source == "build" and time.monotonic() - start < 30
            built_and_clean(settings, good, msgs, "more than the 1048576 bytes")
            assert endless.sent < 64 * MiB, endless.sent  # stopped at once, not at the end

        with tally.trial("R11", "body: a layer that announces 208 MiB for 1 MiB declared"):
            hostile.replies[f"/v2/{REPO}/blobs/{digest}"] = Reply(Endless(), length=208 * MiB)
            store = Store(tmp_path / "announced")
            with pytest.raises(RegistryError) as exc:
                FlightRegistry(hostile.repo(REPO)).pull_disk(tag, store, arch="amd64")
            one_line_error(exc, "announced", "refused")
            assert store.ls() == [] and list((store.root / "tmp").iterdir()) == []


def test_metadata_without_end(tally: Tally, tmp_path: Path) -> None:
    with HostileRegistry() as hostile:
        hostile.replies[f"/v2/{REPO}/manifests/t"] = Reply(Endless())
        with tally.trial("R11", "metadata: a manifest without end (CLI: one line)"):
            cache = tmp_path / "cache"
            start = time.monotonic()
            proc = cli("cache", "pull", "t", "--registry", hostile.repo(REPO), "--cache-dir",
                       str(cache), env=base_env())
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
            assert "more than the 4194304 bytes" in lines[0] and "Traceback" not in proc.stderr
            assert time.monotonic() - start < 30
            assert not list((cache / "store" / "blobs" / "sha256").iterdir())

        hostile.replies[f"/v2/{REPO}/tags/list"] = Reply(Endless())
        with tally.trial("R11", "metadata: a tag list without end"):
            with pytest.raises(RegistryError) as exc:
                FlightRegistry(hostile.repo(REPO)).tags()
            one_line_error(exc, "more than the 4194304 bytes")

    with HostileRegistry() as hostile:
        realm = f"http://{hostile.host}/token"
        hostile.replies[f"/v2/{REPO}/manifests/t"] = Reply(
            b"{}", 401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'})
        hostile.replies["/token"] = Reply(Endless())
        with tally.trial("R11", "metadata: a token reply without end"):
            reg = FlightRegistry(hostile.repo(REPO), credentials=Credentials("test", "u", "p"))
            with pytest.raises(RegistryError) as exc:
                reg.pull_disk("t", Store(tmp_path / "token"), arch="amd64")
            one_line_error(exc, "token", "more than the 4194304 bytes")


def test_zstd_bomb(local_registry: str, tally: Tally, tmp_path: Path) -> None:
    reg = FlightRegistry(f"{local_registry}/flightvm-faults/r11-{uuid.uuid4().hex[:12]}")
    plain = HEADER + b"\0" * (256 * MiB)
    bomb = zstandard.ZstdCompressor(level=19).compress(plain)
    digest, size = reg.upload_stream([bomb], length=len(bomb))
    reg.upload_stream([b"{}"], length=2)
    reg.put_manifest(json.loads(disk_manifest(digest, size, LAYER_MEDIA_TYPE_ZSTD, **{
        ANN_DISK_DIGEST: sha(plain[:MiB]), ANN_DISK_SIZE: str(MiB)})), "small")
    reg.put_manifest(json.loads(disk_manifest(digest, size, LAYER_MEDIA_TYPE_ZSTD, **{
        ANN_DISK_DIGEST: sha(plain), ANN_DISK_SIZE: str(len(plain))})), "huge")
    for tag, words in (("small", ("more than its declared 1048576 bytes",)),
                       ("huge", ("is not a size up to", "refused"))):
        with tally.trial("R11", f"zstd: {len(bomb) >> 10} KiB inflating to 256 MiB, "
                         f"declared {tag}"):
            store = Store(tmp_path / tag)
            with pytest.raises(RegistryError) as exc:
                reg.pull_disk(tag, store, arch="amd64")
            one_line_error(exc, *words)
            assert store.ls() == [] and list((store.root / "tmp").iterdir()) == []


class Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def test_gzip_bomb_and_sparse_member(local_registry: str, tally: Tally, tmp_path: Path) -> None:
    repo = f"{local_registry}/flightvm-faults/r11-{uuid.uuid4().hex[:12]}"
    reg = FlightRegistry(repo)
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|") as tar:
        junk = tarfile.TarInfo("junk")
        junk.size = 1 << 30
        tar.addfile(junk, Zeros(junk.size))
        disk = tarfile.TarInfo("qcow2/disk.qcow2")
        disk.size = len(HEADER)
        tar.addfile(disk, io.BytesIO(HEADER))
    layer = raw.getvalue()
    push_container_image(reg, "gzip", layer, "application/vnd.oci.image.layer.v1.tar+gzip")
    with tally.trial("R11", f"gzip: a {len(layer) >> 10} KiB tar.gz layer holding 1 GiB, "
                     "peak memory of the pull") as rec:
        child = textwrap.dedent(f"""
            import re, sys
            from pathlib import Path
            # the peak RSS of this process from here on (a forked child starts with its
            # parent's peak, which says nothing about the pull)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            from pytest_flightvm.cache.registry import FlightRegistry
            from pytest_flightvm.cache.store import Store
            from pytest_flightvm.errors import FlightVMError
            try:
                FlightRegistry({repo!r}).pull_disk("gzip", Store(Path({str(tmp_path)!r}) / "gz"),
                                                   arch="amd64")
                print("pulled")
            except FlightVMError as exc:
                print("error:", exc)
            status = open("/proc/self/status").read()
            print("maxrss_kib:", re.search(r"VmHWM:\\s+(\\d+)", status).group(1))
        """)
        proc = subprocess.run([PY, "-c", child], capture_output=True, text=True, timeout=120,
                              env=base_env())
        out = proc.stdout.splitlines()
        assert proc.returncode == 0 and len(out) == 2, (proc.stdout, proc.stderr[-2000:])
        assert out[0].startswith("error:") and "decompresses to more than" in out[0], out[0]
        rss_mib = int(out[1].split()[1]) / 1024
        rec["peak_rss_mib"] = round(rss_mib)
        assert rss_mib < 200, f"peak RSS {rss_mib:.0f} MiB"
        store = tmp_path / "gz"
        assert not list((store / "blobs" / "sha256").iterdir())
        assert not list((store / "tmp").iterdir())

    with tally.trial("R11", "tar: a sparse member claiming 1 TiB"):
        src = tmp_path / "sparse-src"
        (src / "qcow2").mkdir(parents=True)
        big = src / "qcow2" / "disk.qcow2"
        big.write_bytes(HEADER)
        subprocess.run(["truncate", "-s", "1T", str(big)], check=True)
        tar_path = tmp_path / "sparse.tar"
        subprocess.run(["tar", "--sparse", "-C", str(src), "-cf", str(tar_path),
                        "qcow2/disk.qcow2"], check=True, timeout=120)
        big.unlink()
        layer = tar_path.read_bytes()
        assert len(layer) < MiB
        push_container_image(reg, "sparse", layer, "application/vnd.oci.image.layer.v1.tar")
        store = Store(tmp_path / "sparse-store")
        with pytest.raises(RegistryError) as exc:
            reg.pull_disk("sparse", store, arch="amd64")
        one_line_error(exc, "not a plain file", "refused")
        assert store.ls() == [] and list((store.root / "tmp").iterdir()) == []


# -- R12: a trickle -----------------------------------------------------------------------------


def test_trickle(tally: Tally, tmp_path: Path) -> None:
    with HostileRegistry() as hostile:
        settings, good, tag = fallback_settings(tmp_path, hostile.repo(REPO))
        key = current_key(settings).digest
        body = HEADER[:64]
        hostile.replies[f"/v2/{REPO}/manifests/{tag}"] = Reply(
            disk_manifest(sha(body), len(body), key=key))
        hostile.replies[f"/v2/{REPO}/blobs/{sha(body)}"] = Reply(trickle(body), delay=4.0)
        with tally.trial("R12", "a 64-byte blob at 1 byte / 4 s; resolve builds"):
            msgs: list[str] = []
            start = time.monotonic()
            image = resolve_image(settings, log=msgs.append)
            took = time.monotonic() - start
            assert image.source == "build" and took < 30, (image.source, took)
            built_and_clean(settings, good, msgs, "did not send its 64 bytes within")

        hostile.replies[f"/v2/{REPO}/manifests/t"] = Reply(trickle(b"{" + b" " * 4096 + b"}"),
                                                           delay=4.0)
        with tally.trial("R12", "a manifest at 1 byte / 4 s (CLI: one line)"):
            start = time.monotonic()
            proc = cli("cache", "pull", "t", "--registry", hostile.repo(REPO), "--cache-dir",
                       str(tmp_path / "cli"), env=base_env(), timeout=90)
            took = time.monotonic() - start
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
            assert "did not send its" in lines[0] and took < 45, (lines[0], took)


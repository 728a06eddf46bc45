"""What a registry hands us is checked before use: documents, disks, sizes, credentials.
(No network: the fault tier serves the same cases from real and hostile registries.)"""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import pytest
import zstandard

from pytest_flightvm.cache.qcow2 import check_qcow2
from pytest_flightvm.cache.registry.auth import Authenticator, Credentials, find_credentials
from pytest_flightvm.cache.registry.client import Client
from pytest_flightvm.cache.registry.documents import check_manifest, check_reference
from pytest_flightvm.cache.registry.streams import Budget, GunzipReader, zstd_chunks
from pytest_flightvm.errors import NotQcow2Error, RegistryError
from tests.fake_disk import qcow2_with

D = "sha256:" + "a" * 64


def manifest(**over: object) -> dict:
    doc: dict = {"schemaVersion": 2, "config": {"mediaType": "x", "digest": D, "size": 2},
                 "layers": [{"mediaType": "y", "digest": D, "size": 10}]}
    doc.update(over)
    return doc


@pytest.mark.parametrize("bad", [
    {"layers": "nope"}, {"layers": [{"mediaType": "y", "digest": "sha256:../../x", "size": 1}]},
    {"layers": [{"mediaType": "y", "digest": D, "size": "10"}]},
    {"layers": [{"mediaType": "y", "digest": D, "size": True}]},
    {"layers": [{"mediaType": "y", "digest": D, "size": -1}]},
    {"layers": [{"mediaType": "y", "digest": D, "size": 1, "annotations": {"a": 1}}]},
    {"config": None}, {"schemaVersion": 1}, {"annotations": ["x"]}, {"layers": [7]},
])
def test_malformed_manifests_are_one_line_registry_errors(bad: dict) -> None:
    with pytest.raises(RegistryError) as exc:
        check_manifest(manifest(**bad), "r/x:t")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("r/x:t")


def test_a_well_formed_manifest_passes() -> None:
    assert check_manifest(manifest(annotations={"k": "v"}), "r") is not None


@pytest.mark.parametrize("ref", ["../../v2/other/blobs/x", "sha256:abc", "a b", "", "x" * 200])
def test_references_are_checked_before_they_go_in_a_url(ref: str) -> None:
    with pytest.raises(RegistryError):
        check_reference(ref, "r")
    assert check_reference("base-qcow2-latest", "r") == "base-qcow2-latest"


@pytest.mark.parametrize("fields,words", [
    ({"backing_offset": 1024}, "backing file"), ({"incompatible": 4}, "external data file"),
    ({"crypt": 1}, "encrypted"), ({"version": 9}, "version 9"), ({"size": 0}, "virtual size"),
    ({"size": 5 << 40}, "virtual size"),
])
def test_plain_check_reads_the_header_first(tmp_path: Path, fields: dict, words: str) -> None:
    with pytest.raises(NotQcow2Error, match=words):
        check_qcow2(qcow2_with(tmp_path, **fields), "pulled", error=NotQcow2Error, plain=True)
    check_qcow2(qcow2_with(tmp_path, **fields), "built")  # the magic alone still passes


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_plain_check_passes_a_plain_qcow2(tmp_path: Path) -> None:
    check_qcow2(qcow2_with(tmp_path), "pulled", error=NotQcow2Error, plain=True)


def test_gunzip_stops_at_its_budget() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))
    reader = GunzipReader(io.BytesIO(bomb), Budget(8 << 20, lambda: RegistryError("over")))
    got = 0
    with pytest.raises(RegistryError, match="over"):
        while chunk := reader.read(1 << 20):
            assert len(chunk) <= 1 << 20
            got += len(chunk)
    assert got <= 8 << 20
    two = gzip.compress(b"a" * 10) + gzip.compress(b"b" * 10)  # multi-member
    out = GunzipReader(io.BytesIO(two), Budget(100, RuntimeError)).read(100)
    assert out == b"a" * 10 + b"b" * 10


def test_zstd_stops_at_its_budget() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (32 << 20))
    with pytest.raises(RegistryError, match="over"):
        for chunk in zstd_chunks(io.BytesIO(bomb), Budget(4 << 20, lambda: RegistryError("over"))):
            assert len(chunk) <= 1 << 20
    small = zstandard.ZstdCompressor().compress(b"disk")
    assert b"".join(zstd_chunks(io.BytesIO(small), Budget(4, RuntimeError))) == b"disk"


def test_env_credentials_only_where_allowed(tmp_path: Path) -> None:
    env = {"FLIGHTVM_REGISTRY_USER": "ci", "FLIGHTVM_REGISTRY_PASSWORD": "pw",
           "HOME": str(tmp_path)}
    assert find_credentials("h:1", env) is not None
    assert find_credentials("h:1", env, use_env=False) is None


@pytest.mark.parametrize("realm,registry,ok", [
    ("https://auth.example.com/token", "reg.example.com", True),
    ("http://auth.example.com/token", "reg.example.com", False),
    ("http://127.0.0.1:9/token", "127.0.0.1:5000", True),
    ("http://127.0.0.1:9/token", "reg.example.com", False),
    ("ftp://auth.example.com/token", "reg.example.com", False),
])
def test_token_realm_must_be_https_or_loopback(realm: str, registry: str, ok: bool) -> None:
    auth = Authenticator(registry, Credentials("test", "u", "p"))
    fetched: list[str] = []

    def fetch(*args: object) -> object:
        fetched.append(str(args[1]))
        raise RegistryError("stop here")

    with pytest.raises(RegistryError) as exc:
        auth.answer(f'Bearer realm="{realm}",service="s"', fetch,  # type: ignore[arg-type]
                    lambda r, w: {}, lambda r: "")
    assert ("stop here" in str(exc.value)) is ok
    assert fetched == ([realm] if ok else [])


def test_locations_stay_on_the_registry_host() -> None:
    client = Client("127.0.0.1:5000/a/b")
    assert client.url("/v2/a/b/blobs/uploads/x") == "http://127.0.0.1:5000/v2/a/b/blobs/uploads/x"
    assert client.url("http://127.0.0.1:5000/v2/x").endswith("/v2/x")
    for other in ("http://127.0.0.2:5000/v2/x", "https://127.0.0.1:5000/v2/x",
                  "http://evil.example/v2/x"):
        with pytest.raises(RegistryError, match="another host"):
            client.url(other)


def test_threaded_passes_chunks_errors_and_stops_on_close() -> None:
    import threading

    from pytest_flightvm.cache.registry.streams import threaded

    assert list(threaded(iter([b"a", b"b", b"c"]), depth=1)) == [b"a", b"b", b"c"]

    def failing():  # type: ignore[no-untyped-def]
        yield b"x"
        raise RegistryError("producer broke")

    gen = threaded(failing())
    assert next(gen) == b"x"
    with pytest.raises(RegistryError, match="producer broke"):
        next(gen)

    made = [0]

    def endless():  # type: ignore[no-untyped-def]
        while True:
            made[0] += 1
            yield b"y"

    before = threading.active_count()
    gen = threaded(endless(), depth=2)
    assert next(gen) == b"y"
    gen.close()
    assert threading.active_count() == before and made[0] <= 5

"""Push/pull against the real local registry (127.0.0.1:5000): no mocks."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import requests

from pytest_flightvm.cache.registry import (
    ANN_ARCH,
    ANN_CREATED,
    ANN_DISK_DIGEST,
    ANN_DISK_SIZE,
    ANN_GIT,
    ANN_KEY,
    ANN_TITLE,
    DOCKER_MANIFEST,
    LAYER_MEDIA_TYPE,
    LAYER_MEDIA_TYPE_ZSTD,
    OCI_MANIFEST,
    FlightRegistry,
)
from pytest_flightvm.cache.store import Store
from pytest_flightvm.errors import ArtifactNotFound, IntegrityError
from tests.fake_disk import QCOW2_MAGIC, MiB, qcow2_bytes, random_qcow2

KEY = "c0ffee" * 10 + "abcd"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_push_then_pull_is_byte_identical(registry_repo: str, tmp_path: Path, compress: str,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    disk = random_qcow2(tmp_path / "disk.qcow2", 4 * MiB)
    reg = FlightRegistry(registry_repo)
    pushed = reg.push_disk(disk, ["base-qcow2-abc-amd64", "base-qcow2-latest"], arch="amd64",
                           key=KEY, git_commit="1234abcd", compress=compress)
    assert pushed.bytes > 0
    assert set(reg.tags()) == {"base-qcow2-abc-amd64", "base-qcow2-latest"}

    store = Store(tmp_path / "empty-store")
    pulled = reg.pull_disk("base-qcow2-latest", store, arch="amd64", key=KEY)
    assert pulled.layout == "flightvm" and pulled.manifest_digest == pushed.manifest_digest
    blob = store.blob_path(pulled.digest)
    assert blob.read_bytes() == disk.read_bytes()
    assert pulled.digest == sha(disk.read_bytes())
    assert oct(blob.stat().st_mode & 0o777) == "0o444"
    assert store.verify(pulled.digest, full=True)

    # The artifact as any OCI client sees it.
    manifest = requests.get(f"http://{reg.ref.host}/v2/{reg.ref.repository}/manifests/"
                            "base-qcow2-latest", headers={"Accept": OCI_MANIFEST}, timeout=5).json()
    [layer] = manifest["layers"]
    assert layer["mediaType"] == (LAYER_MEDIA_TYPE if compress == "none"
                                  else LAYER_MEDIA_TYPE_ZSTD)
    assert layer["annotations"][ANN_TITLE] == "disk.qcow2"
    assert layer["annotations"][ANN_DISK_DIGEST] == pulled.digest
    ann = manifest["annotations"]
    assert ann[ANN_KEY] == KEY and ann[ANN_ARCH] == "amd64" and ann[ANN_GIT] == "1234abcd"
    assert ann[ANN_CREATED].endswith("Z")
    if compress == "zstd":
        assert layer["digest"] != pulled.digest
    out, _ = capfd.readouterr()
    assert out == ""  # oras prints nothing to stdout


def test_push_again_skips_the_existing_blob(registry_repo: str, tmp_path: Path) -> None:
    disk = random_qcow2(tmp_path / "disk.qcow2", 4 * MiB)
    reg = FlightRegistry(registry_repo)
    assert reg.push_disk(disk, ["a"], arch="amd64").bytes == disk.stat().st_size
    assert reg.push_disk(disk, ["b"], arch="amd64").bytes == 0
    assert set(reg.tags()) == {"a", "b"}


def test_pull_for_another_arch_or_key_is_refused(registry_repo: str, tmp_path: Path) -> None:
    disk = random_qcow2(tmp_path / "disk.qcow2", MiB)
    reg = FlightRegistry(registry_repo)
    reg.push_disk(disk, ["base-qcow2-latest"], arch="amd64", key=KEY)
    store = Store(tmp_path / "store")
    with pytest.raises(ArtifactNotFound, match="is for arch amd64, not arm64"):
        reg.pull_disk("base-qcow2-latest", store, arch="arm64")
    with pytest.raises(ArtifactNotFound, match="built from key"):
        reg.pull_disk("base-qcow2-latest", store, arch="amd64", key="f" * 64)
    assert store.ls() == []


def test_missing_tag_and_repo(registry_repo: str, tmp_path: Path) -> None:
    reg = FlightRegistry(registry_repo)
    assert reg.tags() == []
    with pytest.raises(ArtifactNotFound, match="not found"):
        reg.pull_disk("nope", Store(tmp_path / "s"), arch="amd64")


def test_pull_by_manifest_digest(registry_repo: str, tmp_path: Path) -> None:
    disk = random_qcow2(tmp_path / "disk.qcow2", MiB)
    reg = FlightRegistry(registry_repo)
    pushed = reg.push_disk(disk, ["t"], arch="amd64")
    pulled = reg.pull_disk(pushed.manifest_digest, Store(tmp_path / "s"), arch="amd64")
    assert pulled.digest == sha(disk.read_bytes())


def _manifest_for(layer_type: str, digest: str, size: int, **layer_ann: str) -> dict:
    return {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(b"{}"),
                   "size": 2},
        "layers": [{"mediaType": layer_type, "digest": digest, "size": size,
                    "annotations": layer_ann}],
        "annotations": {ANN_ARCH: "amd64"},
    }


@pytest.mark.parametrize("lie", ["size", "zstd-garbage", "plain-digest"])
def test_inconsistent_artifact_is_never_installed(registry_repo: str, tmp_path: Path,
                                                  lie: str) -> None:
    """Manifests that do not match their blobs: the verifying writer refuses them all."""
    reg = FlightRegistry(registry_repo)
    real = qcow2_bytes(os.urandom(1000))
    digest, size = reg.upload_stream([real], length=len(real))
    reg.upload_stream([b"{}"], length=2)
    if lie == "size":
        manifest = _manifest_for(LAYER_MEDIA_TYPE, digest, size + 10)
    elif lie == "zstd-garbage":
        manifest = _manifest_for(LAYER_MEDIA_TYPE_ZSTD, digest, size, **{
            ANN_DISK_DIGEST: sha(real), ANN_DISK_SIZE: str(len(real))})
    else:
        zst = subprocess.run(["zstd", "-q", "-c"], input=real, capture_output=True,
                             check=True).stdout
        zdigest, zsize = reg.upload_stream([zst], length=len(zst))
        manifest = _manifest_for(LAYER_MEDIA_TYPE_ZSTD, zdigest, zsize,
                                 **{ANN_DISK_DIGEST: sha(b"something else"),
                                    ANN_DISK_SIZE: str(len(real))})
    reg.put_manifest(manifest, "lying")
    store = Store(tmp_path / "s")
    with pytest.raises(IntegrityError):
        reg.pull_disk("lying", store, arch="amd64")
    assert store.ls() == [] and list((store.root / "tmp").iterdir()) == []


# -- the seed's layout: a container image with /qcow2/disk.qcow2 -------------------------


def _tar_layer(disk: bytes, gz: bool) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("qcow2")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        info = tarfile.TarInfo("qcow2/disk.qcow2")
        info.size = len(disk)
        tar.addfile(info, io.BytesIO(disk))
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"seed\n"))
    return gzip.compress(raw.getvalue(), mtime=0) if gz else raw.getvalue()


def push_container_image(reg: FlightRegistry, tag: str, disk: bytes, *, docker: bool,
                         arch: str = "amd64") -> str:
    """Write a podman/docker-style image by hand: config + tar(.gz) layer + manifest."""
    gz = docker or arch != "amd64"
    layer = _tar_layer(disk, gz)
    config = json.dumps({"architecture": arch, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    for blob in (layer, config):
        reg.upload_stream([blob], length=len(blob))
    if docker:
        layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
        config_type = "application/vnd.docker.container.image.v1+json"
        media_type = DOCKER_MANIFEST
    else:
        layer_type = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")
        config_type = "application/vnd.oci.image.config.v1+json"
        media_type = OCI_MANIFEST
    manifest = {
        "schemaVersion": 2, "mediaType": media_type,
        "config": {"mediaType": config_type, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": sha(layer), "size": len(layer)}],
    }
    return reg.put_manifest(manifest, tag)


@pytest.mark.parametrize("docker", [True, False], ids=["docker-tar.gz", "oci-tar"])
def test_pull_seed_container_layout(registry_repo: str, tmp_path: Path, docker: bool) -> None:
    disk = qcow2_bytes(os.urandom(3 << 20))
    reg = FlightRegistry(registry_repo)
    push_container_image(reg, "base-qcow2-latest", disk, docker=docker)
    store = Store(tmp_path / "s")
    pulled = reg.pull_disk("base-qcow2-latest", store, arch="amd64")
    assert pulled.layout == "container"
    assert store.blob_path(pulled.digest).read_bytes() == disk
    assert pulled.digest == sha(disk)


def test_seed_layout_for_another_arch(registry_repo: str, tmp_path: Path) -> None:
    reg = FlightRegistry(registry_repo)
    push_container_image(reg, "t", QCOW2_MAGIC + b"1234", docker=False, arch="arm64")
    with pytest.raises(ArtifactNotFound, match="arm64"):
        reg.pull_disk("t", Store(tmp_path / "s"), arch="amd64")


def test_image_without_the_disk(registry_repo: str, tmp_path: Path) -> None:
    reg = FlightRegistry(registry_repo)
    layer = gzip.compress(b"\0" * 1024, mtime=0)  # an empty tar, gzipped
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    for blob in (layer, config):
        reg.upload_stream([blob], length=len(blob))
    reg.put_manifest({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(layer), "size": len(layer)}],
    }, "empty")
    with pytest.raises(ArtifactNotFound, match="qcow2/disk.qcow2"):
        reg.pull_disk("empty", Store(tmp_path / "s"), arch="amd64")


# -- memory --------------------------------------------------------------------------


def test_push_memory_stays_flat(registry_repo: str, tmp_path: Path) -> None:
    """Push a 256 MiB file from a child process; its peak RSS must stay under 100 MiB.

    The peak is the child's own VmHWM, reset after start-up (clear_refs 5): ru_maxrss
    keeps the RSS the process had before exec, and a child vforked by a big xdist
    worker starts with the worker's (139 MiB seen late in a full run)."""
    disk = random_qcow2(tmp_path / "big.qcow2", 256 * MiB)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pytest_flightvm.cache.registry import FlightRegistry

        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

        reg = FlightRegistry({registry_repo!r})
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak starts again from the current RSS
        before = hwm()
        reg.push_disk(Path({str(disk)!r}), ["big"], arch="amd64")
        print(before, hwm())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    before_kib, peak_kib = int(out[0]), int(out[1])
    assert peak_kib < 100 * 1024, f"push peak RSS {peak_kib / 1024:.0f} MiB"
    assert peak_kib - before_kib < 32 * 1024


def test_push_of_a_blob_that_does_not_match_its_digest(registry_repo: str,
                                                       tmp_path: Path) -> None:
    disk = random_qcow2(tmp_path / "disk.qcow2", MiB)
    reg = FlightRegistry(registry_repo)
    with pytest.raises(IntegrityError, match="does not match"):
        reg.push_disk(disk, ["t"], arch="amd64", digest=sha(b"what the store thought"))
    assert reg.tags() == []


def test_pull_of_content_already_stored_moves_nothing(registry_repo: str,
                                                      tmp_path: Path) -> None:
    disk = random_qcow2(tmp_path / "disk.qcow2", MiB)
    reg = FlightRegistry(registry_repo)
    reg.push_disk(disk, ["a"], arch="amd64")
    reg.push_disk(disk, ["z"], arch="amd64", compress="zstd")
    store = Store(tmp_path / "s")
    first = reg.pull_disk("a", store, arch="amd64")
    assert first.bytes == disk.stat().st_size
    assert reg.pull_disk("a", store, arch="amd64").bytes == 0
    assert reg.pull_disk("z", store, arch="amd64").bytes == 0

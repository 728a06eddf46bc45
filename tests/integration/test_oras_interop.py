"""Interop with the reference ORAS client (oras-py), on the real local registry.

- A qcow2 pushed with oras-py's own plain ``push`` (a layer of media type
  ``application/vnd.oci.image.layer.v1.tar`` titled ``disk.qcow2``, an
  ``application/vnd.unknown.config.v1+json`` config, no arch annotation) is pulled
  when the user pins it: ``flightvm cache pull``, ``resolve_image`` and, for the real
  base, ``--flightvm-image REF`` booting one VM.
- Our artifact, pulled with oras-py's own ``pull``, gives identical bytes.
- Refused: a titled layer that is not a qcow2, and an arch annotation naming another
  arch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oras.provider as oras_provider  # oras-py, from the test extra
import pytest

from pytest_flightvm.cache.registry import ANN_ARCH, FlightRegistry
from pytest_flightvm.cache.resolve import resolve_image
from pytest_flightvm.cache.store import Store
from pytest_flightvm.config import Settings
from pytest_flightvm.errors import ArtifactNotFound, NotQcow2Error
from tests.fake_disk import write_fake_qcow2

NOTICE = "carries no dev.flightvm.arch annotation; using it as amd64 because it was pinned"


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def oras_push(repo: str, tag: str, file: Path, annotations: dict[str, str] | None = None) -> None:
    """oras-py's own plain push of one file, as `oras push REF disk.qcow2` does it (run from
    the file's dir, so the layer is titled with its bare name)."""
    host = repo.split("/", 1)[0]
    cwd = os.getcwd()
    os.chdir(file.parent)
    try:
        oras_provider.Registry(hostname=host, insecure=True).push(
            target=f"{repo}:{tag}", files=[file.name], manifest_annotations=annotations,
            quiet=True)
    finally:
        os.chdir(cwd)


def manifest_of(repo: str, tag: str) -> dict[str, Any]:
    import requests

    host, name = repo.split("/", 1)
    return requests.get(f"http://{host}/v2/{name}/manifests/{tag}", timeout=10, headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"}).json()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHTVM_")}
    return subprocess.run([sys.executable, "-m", "pytest_flightvm.cli", *args],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def plain_push(registry_repo: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    src = tmp_path / "src"
    src.mkdir()
    disk = write_fake_qcow2(src / "disk.qcow2", 3 << 20, os.urandom(16))
    oras_push(registry_repo, "plain", disk)
    yield registry_repo, disk


def test_plain_oras_push_is_what_the_issue_describes(plain_push: tuple[str, Path]) -> None:
    repo, disk = plain_push
    manifest = manifest_of(repo, "plain")
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert layer["annotations"] == {"org.opencontainers.image.title": "disk.qcow2"}
    assert manifest["config"]["mediaType"] == "application/vnd.unknown.config.v1+json"
    assert ANN_ARCH not in (manifest.get("annotations") or {})
    assert layer["digest"] == sha(disk)  # the file's bytes, as they are


def test_cli_pull_of_a_plain_oras_push(plain_push: tuple[str, Path], tmp_path: Path) -> None:
    repo, disk = plain_push
    cache = tmp_path / "cache"
    out = tmp_path / "copy.qcow2"
    proc = cli("cache", "pull", "plain", "--registry", repo, "--cache-dir", str(cache),
               "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert out.read_bytes() == disk.read_bytes()
    notices = [line for line in proc.stderr.splitlines() if "notice" in line]
    assert notices == [f"flightvm: notice: {repo}:plain {NOTICE}"], proc.stderr
    store = Store(cache / "store")
    [entry] = store.ls()
    assert entry.digest == sha(disk) and store.verify(entry.digest, full=True)
    # offline, the stored pull is handed out without a word to the registry
    again = cli("cache", "pull", "plain", "--registry", repo, "--cache-dir", str(cache),
                "--offline")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(store.blob_path(entry.digest))


def test_pinned_resolve_of_a_plain_oras_push(plain_push: tuple[str, Path], tmp_path: Path) -> None:
    repo, disk = plain_push
    lines: list[str] = []
    settings = Settings(image=f"{repo}:plain", cache_dir=tmp_path / "cache", arch="amd64")
    image = resolve_image(settings, log=lines.append)
    assert image.source == "registry" and image.digest == sha(disk)
    assert image.path.read_bytes() == disk.read_bytes()
    assert oct(image.path.stat().st_mode & 0o777) == "0o444"
    assert [line for line in lines if "notice" in line] == [f"flightvm: notice: {repo}:plain {NOTICE}"]
    lines.clear()
    again = resolve_image(settings, log=lines.append)
    assert again.source == "local" and again.digest == image.digest
    assert not [line for line in lines if "notice" in line]  # nothing pulled, nothing said


def test_another_arch_is_refused_and_junk_is_not_stored(registry_repo: str,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    disk = write_fake_qcow2(src / "disk.qcow2", 1 << 20, os.urandom(16))
    oras_push(registry_repo, "arm", disk, annotations={ANN_ARCH: "arm64"})
    store = Store(tmp_path / "store")
    reg = FlightRegistry(registry_repo)
    with pytest.raises(ArtifactNotFound, match="is for arch arm64, not amd64"):
        reg.pull_disk("arm", store, arch="amd64", pinned=True)
    # an unpinned pull (the keyed cache) still wants its arch named
    oras_push(registry_repo, "noarch", disk)
    with pytest.raises(ArtifactNotFound, match="is for arch unknown, not amd64"):
        reg.pull_disk("noarch", store, arch="amd64")

    junk_dir = tmp_path / "junk"
    junk_dir.mkdir()
    junk = junk_dir / "disk.qcow2"
    junk.write_bytes(b"\x00" * 510 + b"\x55\xaa" + os.urandom(1 << 16))  # a raw MBR disk
    oras_push(registry_repo, "junk", junk)
    with pytest.raises(NotQcow2Error, match="not a qcow2 disk image"):
        reg.pull_disk("junk", store, arch="amd64", pinned=True)
    assert store.ls() == []
    assert [p for p in (tmp_path / "store" / "tmp").iterdir()] == []


def test_oras_pull_of_our_artifact_is_byte_identical(registry_repo: str, tmp_path: Path) -> None:
    disk = write_fake_qcow2(tmp_path / "disk.qcow2", 3 << 20, os.urandom(16))
    FlightRegistry(registry_repo).push_disk(disk, ["ours"], arch="amd64", compress="none")
    out = tmp_path / "oras-out"
    files = oras_provider.Registry(hostname=registry_repo.split("/", 1)[0], insecure=True).pull(
        target=f"{registry_repo}:ours", outdir=str(out))
    assert [Path(f).name for f in files] == ["disk.qcow2"]
    assert Path(files[0]).read_bytes() == disk.read_bytes()


# -- the real base, pushed by oras-py, booted through --flightvm-image (one VM) -------------

BOOT_TEST = """
import json, os

def test_boot(flightvm, flightvm_image, flightvm_run):
    out = flightvm.run("cat /etc/os-release; cloud-init status").stdout
    assert "bookworm" in out and "status: done" in out
    (flightvm_run.run_dir / "image.json").write_text(json.dumps(
        {"digest": flightvm_image.digest, "source": flightvm_image.source}))
"""


@pytest.mark.vm
def test_plain_oras_push_of_the_base_boots_pinned(vm_suite: Any, base_in_registry: dict[str, Any],
                                                   registry_repo: str, tmp_path: Path) -> None:
    base = Path(base_in_registry["path"])
    src = Path(os.environ.get("FLIGHTVM_TEST_TMP", "/var/tmp")) / f"oras-src-{os.getpid()}"
    src.mkdir(exist_ok=True)
    try:
        os.link(base, src / "disk.qcow2")  # same file system: no copy of 480 MiB
    except OSError:
        import shutil

        shutil.copyfile(base, src / "disk.qcow2")
    try:
        oras_push(registry_repo, "plain", src / "disk.qcow2")
    finally:
        (src / "disk.qcow2").unlink()
        src.rmdir()
    Path("test_boot.py").write_text(BOOT_TEST)
    result, _ = vm_suite.run("-v", f"--flightvm-image={registry_repo}:plain")
    text = result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
    assert f"flightvm: notice: {registry_repo}:plain {NOTICE}" in text
    [run_dir] = list((vm_suite.cache_dir / "runs").iterdir())
    image = json.loads((run_dir / "image.json").read_text())
    assert image == {"digest": base_in_registry["digest"], "source": "registry"}

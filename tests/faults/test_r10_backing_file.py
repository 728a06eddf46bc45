"""R10: a registry serves a qcow2 whose header names a host file as its backing file
(or an external data file). Before the fix it was stored, overlays chained onto it,
and QEMU (as root) read the host file through it.

Served by the real docker-registry on 127.0.0.1:5000, in the flightvm layout (plain
and zstd) and in the seed's container layout. Each case ends with one line (or the
resolve library's fallback to a build), nothing of it in the store, nothing in the
store's tmp, and the host file untouched.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import uuid
from pathlib import Path

from faultkit import Tally, base_env, check_store, cli, push_container_image

from pytest_flightvm.cache import resolve_image
from pytest_flightvm.cache.key import tags_for
from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.resolve import current_key
from pytest_flightvm.cache.store import Store
from pytest_flightvm.config import Settings
from tests.fake_disk import write_fake_qcow2


def hostile_qcow2(dir: Path, how: str) -> tuple[Path, Path]:
    """(image, the host file it points at): a 0600 file of ours standing in for /etc/shadow."""
    secret = dir / "host-secret"
    secret.write_bytes(b"root:$6$not-for-guests$\n" * 64)
    secret.chmod(0o600)
    image = dir / f"{how}.qcow2"
    opts = (["-b", str(secret), "-F", "raw"] if how == "backing"
            else ["-o", f"data_file={secret},data_file_raw=on"])
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(image), "1M"],
                   check=True, capture_output=True)
    return image, secret


def nothing_stored(cache: Path) -> None:
    store = cache / "store"
    blobs = store / "blobs" / "sha256"
    assert not blobs.is_dir() or list(blobs.iterdir()) == [], "a hostile disk was stored"
    assert not (store / "tmp").is_dir() or list((store / "tmp").iterdir()) == []


def one_line(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    assert lines[0].startswith("flightvm: ") and "Traceback" not in proc.stderr, lines
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_backing_file_image_never_enters_the_store(local_registry: str, tally: Tally,
                                                   tmp_path: Path) -> None:
    repo = f"{local_registry}/flightvm-faults/r10-{uuid.uuid4().hex[:12]}"
    reg = FlightRegistry(repo)
    for compress in ("none", "zstd"):
        with tally.trial("R10", f"backing file, flightvm layout ({compress}), cache pull"):
            image, secret = hostile_qcow2(tmp_path, "backing")
            before = (secret.read_bytes(), secret.stat().st_mtime_ns)
            reg.push_disk(image, [f"backing-{compress}"], arch="amd64", compress=compress)
            cache = tmp_path / f"cache-{compress}"
            proc = cli("cache", "pull", f"backing-{compress}", "--registry", repo,
                       "--cache-dir", str(cache), env=base_env())
            one_line(proc, "backing file", "refused")
            assert proc.returncode == 2
            nothing_stored(cache)
            assert (secret.read_bytes(), secret.stat().st_mtime_ns) == before

    with tally.trial("R10", "external data file, the seed's container layout, cache get --image"):
        image, secret = hostile_qcow2(tmp_path, "datafile")
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            tar.add(image, "qcow2/disk.qcow2")
        push_container_image(reg, "datafile", raw.getvalue(),
                             "application/vnd.oci.image.layer.v1.tar")
        cache = tmp_path / "cache-datafile"
        proc = cli("cache", "get", "--image", f"{repo}:datafile", "--cache-dir", str(cache),
                   env=base_env())
        one_line(proc, "external data file", "refused")
        nothing_stored(cache)

    with tally.trial("R10", "backing file under the cache key: resolve falls back to a build"):
        good = write_fake_qcow2(tmp_path / "good.qcow2", 1 << 20, seed=10)
        settings = Settings(cache_dir=tmp_path / "cache-key", registry=repo, arch="amd64",
                            build_cmd=f'cp {good} "$FLIGHTVM_OUTPUT"', rootdir=tmp_path)
        key = current_key(settings)
        tags = tags_for(settings.tag_prefix, key, "amd64", tmp_path)
        image, secret = hostile_qcow2(tmp_path, "backing")
        reg.push_disk(image, [tags[0]], arch="amd64", key=key.digest)
        msgs: list[str] = []
        resolved = resolve_image(settings, log=msgs.append)
        assert resolved.source == "build", resolved
        assert resolved.path.read_bytes() == good.read_bytes()
        warned = [m for m in msgs if "backing file" in m]
        assert len(warned) == 1 and "\n" not in warned[0], msgs
        store = Store(settings.store_dir)
        assert [e.digest for e in store.ls()] == [resolved.digest]
        assert check_store(store.root) == []
        assert list((store.root / "tmp").iterdir()) == []
        assert os.access(secret, os.R_OK)

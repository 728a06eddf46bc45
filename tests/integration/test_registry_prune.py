"""The host setup prunes its registry: throwaway repositories of test, fault, bench and
demo runs go, and booted states next to the bench's base copy; their blobs are
garbage-collected, the project's base and the bench's copy stay pullable.

Runs scripts/host-setup.sh for real, pointed at a registry of its own (a free loopback
port and a temp data dir), so the shared registry of the other tests is never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.store import Store
from tests.fake_disk import qcow2_bytes
from tests.own_registry import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def host_setup(addr: str, data: Path, *, prune: bool = False) -> str:
    env = dict(os.environ, FLIGHTVM_LOCAL_REGISTRY=addr, FLIGHTVM_REGISTRY_DIR=str(data))
    if prune:
        env["PRUNE_REGISTRY"] = "1"
    res = subprocess.run([str(REPO_ROOT / "scripts" / "host-setup.sh")], env=env, text=True,
                         capture_output=True, timeout=600, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture
def setup_registry(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    addr, data = f"127.0.0.1:{free_port()}", tmp_path / "registry"
    try:
        yield addr, data
    finally:
        with contextlib.suppress(OSError, ValueError):  # the registry host-setup started
            os.kill(int((data / "registry.pid").read_text()), signal.SIGTERM)


def disk(path: Path, seed: bytes) -> Path:
    block = hashlib.sha256(seed).digest() * (1 << 15)  # 1 MiB, distinct per seed
    path.write_bytes(qcow2_bytes(block[4:] + block))
    return path


def blob_dirs(data: Path) -> set[str]:
    root = data / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return {p.name for p in root.glob("*/*")}


def catalog(addr: str) -> list[str]:
    with urllib.request.urlopen(f"http://{addr}/v2/_catalog", timeout=5) as resp:
        return list(json.load(resp)["repositories"])


def tags(addr: str, repo: str) -> list[str]:
    with urllib.request.urlopen(f"http://{addr}/v2/{repo}/tags/list", timeout=5) as resp:
        return list(json.load(resp)["tags"] or [])


def test_restart_drops_throwaway_pushes_and_keeps_the_base(
        setup_registry: tuple[str, Path], tmp_path: Path) -> None:
    addr, data = setup_registry
    assert "registry: started on" in host_setup(addr, data)
    kept = {"flightvm/base": disk(tmp_path / "base.qcow2", b"base"),
            "flightvm-bench/base": disk(tmp_path / "bench-base.qcow2", b"bench")}
    dropped = {"flightvm-test/abc": disk(tmp_path / "t.qcow2", b"test"),
               "flightvm-faults/def": disk(tmp_path / "f.qcow2", b"faults"),
               "flightvm-bench/261129-1-zstd-1": disk(tmp_path / "b.qcow2", b"run"),
               "flightvm/base-demo-20261129": disk(tmp_path / "d.qcow2", b"demo")}
    digests = {}
    for repo, path in {**kept, **dropped}.items():
        FlightRegistry(f"{addr}/{repo}").push_disk(path, ["t"], arch="amd64")
        digests[repo] = hashlib.sha256(path.read_bytes()).hexdigest()  # the layer's digest
    # a booted state pushed next to the bench's base copy (tag <prefix>-state-<key>)
    state = disk(tmp_path / "state.qcow2", b"state")
    FlightRegistry(f"{addr}/flightvm-bench/base").push_disk(
        state, ["base-qcow2-state-" + "5f" * 20], arch="amd64")
    digests["bench state"] = hashlib.sha256(state.read_bytes()).hexdigest()
    assert set(digests.values()) <= blob_dirs(data)
    assert sorted(tags(addr, "flightvm-bench/base")) == ["base-qcow2-state-" + "5f" * 20, "t"]

    out = host_setup(addr, data, prune=True)
    assert "stopped pid" in out and "pruned test/bench/demo pushes" in out, out
    assert sorted(catalog(addr)) == sorted(kept)  # host-setup waited until it answers
    left = blob_dirs(data)
    assert not {digests[r] for r in dropped} & left, "a throwaway push's blob survived the GC"
    assert digests["bench state"] not in left, "the bench's state blob survived the GC"
    assert tags(addr, "flightvm-bench/base") == ["t"]  # the base's own tag stays
    for repo, path in kept.items():
        res = FlightRegistry(f"{addr}/{repo}").pull_disk("t", Store(tmp_path / repo), arch="amd64")
        assert Store(tmp_path / repo).blob_path(res.digest).read_bytes() == path.read_bytes()


def test_a_running_registry_is_left_alone(setup_registry: tuple[str, Path],
                                          tmp_path: Path) -> None:
    """Without PRUNE_REGISTRY, a registry that already answers is not stopped or pruned."""
    addr, data = setup_registry
    host_setup(addr, data)
    FlightRegistry(f"{addr}/flightvm-test/x").push_disk(disk(tmp_path / "x.qcow2", b"x"), ["t"],
                                                       arch="amd64")
    pid = (data / "registry.pid").read_text()
    out = host_setup(addr, data)
    assert "already answering" in out and "pruned" not in out
    assert (data / "registry.pid").read_text() == pid
    assert "flightvm-test/x" in catalog(addr)

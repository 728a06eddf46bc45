"""R3: 8 processes resolve one cold key at the same instant: exactly one transfer.

Each process is the real ``flightvm cache get`` CLI; they finish their imports,
then wait at a start line (a file) and all go at once. Exactly one of them
may pull (or build); the other seven must get the same, verified file from
the local store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import fake_builder
import pytest
from faultkit import HERE, PY, Child, Golden, Tally, base_env, check_store, sha256_file, source_line

from pytest_flightvm.cache.store import Store

N = 8


def race(tmp_path: Path, argv: list[str], env: dict[str, str]) -> list[tuple[dict[str, str], str]]:
    """Start N children at one start line; return each one's (source line, printed path)."""
    go = tmp_path / "go"
    children = [Child({"argv": argv, "go": str(go)}, env, tmp_path / f"racer-{i}.err")
                for i in range(N)]
    try:
        for child in children:
            assert child.next_event(60) == "ready"
        go.touch()
        codes = [child.finish(300) for child in children]
        assert codes == [0] * N, [c.stderr()[-500:] for c in children]
        out = []
        for child in children:
            assert len(child.output) == 1, child.output  # the CLI prints just the path
            out.append((source_line(child.stderr()), child.output[0]))
        return out
    finally:
        for child in children:
            child.close()


def check(results: list[tuple[dict[str, str], str]], moving: str, digest: str,
          cache: Path) -> None:
    sources = sorted(line["source"] for line, _ in results)
    assert sources == sorted([moving] + ["local"] * (N - 1)), sources
    paths = {path for _, path in results}
    assert len(paths) == 1, paths
    path = Path(paths.pop())
    assert sha256_file(path) == digest
    store = Store(cache / "store")
    assert [e.digest for e in store.ls()] == [digest]
    assert store.verify(digest, full=True)
    assert check_store(store.root) == []
    assert list((store.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("what", ["registry-base", "build", "pinned-ref"])
def test_eight_processes_one_transfer(what: str, tally: Tally, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    with tally.trial("R3", f"8x {what}") as rec:
        cache = tmp_path / "cache"
        env = base_env()
        start = time.monotonic()
        if what == "registry-base":
            # The real bootable base (~480 MiB) by its cache key, from the real registry.
            base: dict[str, Any] = request.getfixturevalue("real_base")
            argv = ["cache", "get", "--cache-dir", str(cache), "--registry", base["registry"]]
            results = race(tmp_path, argv, env)
            check(results, "registry", base["digest"], cache)
            moved = [int(line["bytes"]) for line, _ in results]
            assert sum(moved) == base["size"], moved  # one transfer's worth of bytes
        elif what == "build":
            counter = tmp_path / "builds"
            cmd = (f"echo x >> {counter}; exec {PY} {HERE / 'fake_builder.py'} --seed 3 "
                   f"--chunks 8 --delay 0.05 --pidfile {tmp_path / 'pids'}")
            argv = ["cache", "get", "--cache-dir", str(cache), "--build-cmd", cmd]
            results = race(tmp_path, argv, env)
            check(results, "build", fake_builder.content_digest(3, 8), cache)
            assert len(counter.read_text().splitlines()) == 1
        else:
            golden: Golden = request.getfixturevalue("golden")
            argv = ["cache", "get", "--cache-dir", str(cache),
                    "--image", f"{golden.registry}:{golden.tags[0]}"]
            results = race(tmp_path, argv, env)
            check(results, "registry", golden.digest, cache)
        rec["seconds_all"] = round(time.monotonic() - start, 1)

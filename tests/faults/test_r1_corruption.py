"""R1: a damaged local store is detected, then re-fetched (registry) or rebuilt (no registry).

Damage, on a blob pulled from the real registry:
- ``flip``: bytes XOR-ed at a seeded offset;
- ``flip-same-mtime``: the same, with the mtime put back (only ctime betrays it);
- ``truncate``: cut to a seeded length;
- ``missing-blob``: the key's ref names a blob that is gone;
- ``garbage-ref``: the ref file holds no JSON.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import SEED, Golden, Tally, check_store, sha256_file

from pytest_flightvm.cache import resolve_image
from pytest_flightvm.cache.store import Store

rng = random.Random(SEED * 1000 + 1)


def _flip(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    offset = rng.randrange(4, st.st_size - 8)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(4)
        f.seek(offset)
        f.write(bytes(b ^ 0xA5 for b in old))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _truncate(path: Path) -> None:
    os.truncate(path, rng.randrange(0, path.stat().st_size))


def _key_ref(store: Store) -> Path:
    [ref] = [p for p in (store.root / "refs" / "key").iterdir()]
    return ref


DAMAGE: dict[str, Callable[[Store, Path], None]] = {
    "flip": lambda store, blob: _flip(blob, keep_mtime=False),
    "flip-same-mtime": lambda store, blob: _flip(blob, keep_mtime=True),
    "truncate": lambda store, blob: _truncate(blob),
    "missing-blob": lambda store, blob: blob.unlink(),
    "garbage-ref": lambda store, blob: _key_ref(store).write_text("{not json"),
}
# Damage that must be *reported* (a warning line), not just silently routed around.
REPORTED = {"flip", "flip-same-mtime", "truncate", "missing-blob"}


@pytest.mark.parametrize("recovery", ["refetch", "rebuild"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_store_is_detected_and_repaired(golden: Golden, tally: Tally, tmp_path: Path,
                                                damage: str, recovery: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with tally.trial("R1", f"{damage}->{recovery}"):
        settings = golden.settings(tmp_path / "cache")
        monkeypatch.setenv("NO_BUILD", "1")
        first = resolve_image(settings, log=lambda m: None)
        assert first.source == "registry" and first.digest == golden.digest
        store = Store(settings.store_dir)

        DAMAGE[damage](store, first.path)

        msgs: list[str] = []
        builds_before = golden.builds()
        if recovery == "rebuild":
            monkeypatch.delenv("NO_BUILD")
            settings = settings.replace(registry=None)
        again = resolve_image(settings, log=msgs.append)

        expected = "registry" if recovery == "refetch" else "build"
        assert again.source == expected, (again.source, msgs)
        assert golden.builds() == builds_before + (recovery == "rebuild")
        if damage in REPORTED:
            assert [m for m in msgs if "damaged or gone" in m], msgs
        assert again.digest == golden.digest
        assert sha256_file(again.path) == golden.digest  # the file itself, not just a record
        assert check_store(store.root) == []
        assert store.verify(again.digest, full=True)

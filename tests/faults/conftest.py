"""The fault, race and bad-input tier: fixtures, and the tally of trials.

Every fault *trial* runs against the real registry (127.0.0.1:5000, or a
docker-registry this tier starts), the real libvirt and real guests, and
records its outcome with ``tally.trial(row, name)``: *survived* when every
check of the trial held, *lost* otherwise (the test then fails too). The
session ends with one line::

    flightvm faults: trials=N survived=S lost=L

Random choices (kill points, flipped bytes) come from ``random.Random(SEED)``:
set ``FLIGHTVM_FAULTS_SEED`` to replay another schedule. With
``FLIGHTVM_FAULTS_JSON=FILE`` every trial is also written to FILE.

The tally is printed by the process that runs the trials: run this tier
without xdist (``make faults``). Under ``-n`` the trials still run and
assert, but xdist's controller never loads this conftest, so no tally line.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import SEED, Golden, Tally, sha256_file

from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.resolve import resolve_image
from tests.fake_disk import MiB, write_fake_qcow2
from tests.support import ensure_base_in_registry

# -- the tally --------------------------------------------------------------------------------


_tally_key = pytest.StashKey[Tally]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_tally_key] = Tally()


@pytest.fixture(scope="session")
def tally(pytestconfig: pytest.Config) -> Tally:
    return pytestconfig.stash[_tally_key]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    tally = config.stash.get(_tally_key, None)
    if tally is None or not tally.records:
        return
    records = tally.records
    tr = terminalreporter
    tr.section("flightvm faults")
    tr.write_line(f"seed={SEED}")
    for row in sorted({r["row"] for r in records}, key=lambda r: int(r[1:])):
        mine = [r for r in records if r["row"] == row]
        ok = sum(r["outcome"] == "survived" for r in mine)
        tr.write_line(f"{row}: {ok}/{len(mine)} survived")
        for r in mine:
            if r["outcome"] != "survived":
                tr.write_line(f"  lost {r['name']}: {r.get('error', '')}")
    survived = sum(r["outcome"] == "survived" for r in records)
    tr.write_line(f"flightvm faults: trials={len(records)} survived={survived} "
                  f"lost={len(records) - survived}")
    out = os.environ.get("FLIGHTVM_FAULTS_JSON")
    if out:
        Path(out).write_text(json.dumps({"seed": SEED, "trials": records}, indent=1,
                                        default=str))


# -- places -----------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    rep = yield
    if rep.when == "call":
        item.stash[_passed_key] = rep.passed
    return rep


_passed_key = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _drop_big_tmp(request: pytest.FixtureRequest) -> Iterator[None]:
    """Trials copy many 64-480 MiB images into tmp_path; pytest keeps the last three
    sessions' tmp dirs. Drop a passed test's tmp_path (a failed one stays to look at)."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is not None and request.node.stash.get(_passed_key, False):
        shutil.rmtree(tmp, ignore_errors=True)



def scratch_root() -> Path:
    """Outside pytest's 0700 tmp (QEMU must reach VM files), like the integration tier."""
    return Path(os.environ.get("FLIGHTVM_TEST_TMP", "/var/tmp"))


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = scratch_root() / f"fvm-faults-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- images -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_base(local_registry: str) -> dict[str, Any]:
    """The bootable Debian base, in the shared store and in the real registry
    (like the integration tier's ``base_in_registry``)."""
    settings, image = ensure_base_in_registry(local_registry)
    return {"registry": settings.registry, "path": image.path, "digest": image.digest,
            "tags": image.tags, "key": image.key, "size": image.path.stat().st_size}


@pytest.fixture(scope="session")
def golden(local_registry: str, tmp_path_factory: pytest.TempPathFactory) -> Golden:
    root = tmp_path_factory.mktemp("golden")
    disk = write_fake_qcow2(root / "golden.qcow2", 64 * MiB, seed=SEED)
    builds = root / "builds"
    cmd = (f'[ -z "$NO_BUILD" ] || exit 97; echo x >> {builds}; '
           f'cp {disk} "$FLIGHTVM_OUTPUT"')
    registry = f"{local_registry}/flightvm-faults/{uuid.uuid4().hex[:12]}"
    g = Golden(disk, sha256_file(disk), disk.stat().st_size, registry, cmd, builds, (), root)
    image = resolve_image(g.settings(root / "builder-cache", push=True), log=lambda m: None)
    assert image.source == "build" and image.bytes_moved == g.size
    assert image.tags[0] in FlightRegistry(registry).tags()
    g.tags = image.tags
    return g

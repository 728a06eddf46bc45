"""R4: a registry that is down (connection refused) or stalled (accepts, never
answers): a fallback or one clear line, always within 10 s.

Seen from three places: the resolve library (falls back to a build), the
``flightvm`` CLI (one line, exit 1), and a pytest session using the plugin
(builds, one warning). Plus a registry that goes away after we cached from
it: the pinned image is served from the store, with a warning.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    SEED,
    Golden,
    StalledListener,
    Tally,
    base_env,
    cli,
    closed_port,
    flightvm_lines,
    sha256_file,
    start_registry,
)

from pytest_flightvm.cache import resolve_image
from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.config import Settings
from tests.fake_disk import MiB, write_fake_qcow2

LIMIT = 10.0


@pytest.fixture(params=["down", "stalled"])
def bad_registry(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "down":
        yield f"127.0.0.1:{closed_port()}/flightvm/base"
    else:
        with StalledListener() as listener:
            yield f"127.0.0.1:{listener.port}/flightvm/base"


def _kind(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["bad_registry"])


def _reason_ok(text: str, kind: str) -> bool:
    return ("refused" in text) if kind == "down" else ("no answer within" in text)


def test_resolve_falls_back_to_a_build(bad_registry: str, golden: Golden, tally: Tally,
                                       tmp_path: Path, request: pytest.FixtureRequest) -> None:
    kind = _kind(request)
    with tally.trial("R4", f"{kind}: resolve builds"):
        settings = golden.settings(tmp_path / "cache", registry=bad_registry, push=True)
        msgs: list[str] = []
        builds = golden.builds()
        start = time.monotonic()
        image = resolve_image(settings, log=msgs.append)
        elapsed = time.monotonic() - start
        assert elapsed < LIMIT, f"{elapsed:.1f} s"
        assert image.source == "build" and golden.builds() == builds + 1
        assert sha256_file(image.path) == golden.digest
        warnings = [m for m in msgs if "unreachable" in m]
        assert len(warnings) == 1 and _reason_ok(warnings[0], kind), msgs
        assert not any("push" in m for m in msgs), msgs  # no second wait on a push


def test_cli_one_clear_line(bad_registry: str, tally: Tally, tmp_path: Path,
                            request: pytest.FixtureRequest) -> None:
    kind = _kind(request)
    with tally.trial("R4", f"{kind}: cli pull errors"):
        start = time.monotonic()
        proc = cli("cache", "pull", "base-qcow2-latest", "--registry", bad_registry,
                   "--cache-dir", str(tmp_path / "cache"), env=base_env())
        elapsed = time.monotonic() - start
        assert elapsed < LIMIT, f"{elapsed:.1f} s"
        assert proc.returncode == 1 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("flightvm: registry 127.0.0.1:") and _reason_ok(lines[0], kind)
        assert "use --offline" in lines[0]  # names a way out, in the CLI's own flag
        assert "--flightvm-" not in lines[0]


def test_plugin_session_builds_with_one_warning(bad_registry: str, golden: Golden,
                                                tally: Tally, pytester: pytest.Pytester,
                                                request: pytest.FixtureRequest) -> None:
    kind = _kind(request)
    with tally.trial("R4", f"{kind}: pytest session builds"):
        pytester.makepyfile(test_image='''
            def test_image(flightvm_image):
                assert flightvm_image.source == "build"
        ''')
        start = time.monotonic()
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--flightvm-cache-dir={pytester.path / 'cache'}",
            f"--flightvm-registry={bad_registry}", f"--flightvm-build-cmd={golden.build_cmd}",
            "--flightvm-no-push", timeout=60)
        elapsed = time.monotonic() - start
        result.assert_outcomes(passed=1)
        assert elapsed < LIMIT + 3, f"{elapsed:.1f} s"  # + pytest's own start-up
        text = result.stdout.str() + result.stderr.str()
        warnings = [line for line in flightvm_lines(text) if "unreachable" in line]
        assert len(warnings) == 1 and _reason_ok(warnings[0], kind), warnings


def test_registry_gone_after_caching_serves_the_store(tally: Tally, tmp_path: Path) -> None:
    """Pin an image from a registry, then lose the registry: down, then stalled on its port."""
    reg = start_registry(tmp_path / "registry", tls=False, auth=False)
    disk = write_fake_qcow2(tmp_path / "pinned.qcow2", 8 * MiB, seed=SEED + 4)
    try:
        FlightRegistry(reg.repo()).push_disk(disk, ["pinned"], arch="amd64")
        settings = Settings(cache_dir=tmp_path / "cache", image=f"{reg.repo()}:pinned",
                            build_cmd="exit 97", arch="amd64", rootdir=tmp_path)
        assert resolve_image(settings, log=lambda m: None).source == "registry"
    finally:
        reg.stop()
    port = int(reg.host.rsplit(":", 1)[1])
    for kind in ("down", "stalled"):
        with tally.trial("R4", f"{kind}: pinned image from the store"):
            listener = StalledListener(port) if kind == "stalled" else None
            try:
                msgs: list[str] = []
                start = time.monotonic()
                image = resolve_image(settings, log=msgs.append)
                elapsed = time.monotonic() - start
            finally:
                if listener:
                    listener.close()
            assert elapsed < LIMIT, f"{elapsed:.1f} s"
            assert image.source == "local" and sha256_file(image.path) == sha256_file(disk)
            warnings = [m for m in msgs if "unreachable" in m and "stored copy" in m]
            assert len(warnings) == 1 and _reason_ok(warnings[0], kind), msgs

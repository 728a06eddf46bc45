"""Where the base comes from, seen through the plugin (no VM boots here):
the build hook, --flightvm-build-cmd, --flightvm-image pins, and the
exactly-one-resolve record under xdist."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

IMAGE_TEST = """
import json, os
def test_image(flightvm_image, flightvm_run):
    assert flightvm_image.path.exists()
    assert oct(flightvm_image.path.stat().st_mode & 0o777) == "0o444"
    rec = flightvm_run.run_dir / f"image-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json"
    rec.write_text(json.dumps({"source": flightvm_image.source, "digest": flightvm_image.digest}))
"""


def _qcow2(path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)


def _resolves(cache: Path) -> list[dict]:
    [run_dir] = list((cache / "runs").iterdir())
    return [json.loads(line) for line in (run_dir / "resolves.jsonl").read_text().splitlines()]


def test_build_hook_builds_once_then_hits(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makeconftest("""
        import subprocess
        def pytest_flightvm_build_image(config, output, key):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(output), "64M"], check=True)
            return True
    """)
    pytester.makepyfile(IMAGE_TEST)
    args = ("-p", "no:cacheprovider", f"--flightvm-cache-dir={tmp_path}", "-n", "2")
    pytester.makepyfile(test_more=IMAGE_TEST)
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)
    sources = sorted(r["source"] for r in _resolves(tmp_path))
    assert sources == ["build", "local"]  # two workers, one build
    # Second run: a local hit, zero bytes.
    import shutil

    shutil.rmtree(tmp_path / "runs")
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)
    assert {(r["source"], r["bytes"]) for r in _resolves(tmp_path)} == {("local", 0)}


def test_build_cmd_and_its_key(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(IMAGE_TEST)
    cmd = 'qemu-img create -q -f qcow2 "$FLIGHTVM_OUTPUT" 32M'
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--flightvm-cache-dir={tmp_path}",
                                           f"--flightvm-build-cmd={cmd}")
    result.assert_outcomes(passed=1)
    assert [r["source"] for r in _resolves(tmp_path)] == ["build"]


def test_build_cmd_that_writes_garbage_is_one_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(IMAGE_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--flightvm-cache-dir={tmp_path}",
                                           '--flightvm-build-cmd=echo nope > "$FLIGHTVM_OUTPUT"')
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*flightvm: *not a qcow2*"])
    # nothing half-written was kept: no blob, no temp file
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file() and "blobs" in p.parts] == []
    assert [p for p in (tmp_path / "store" / "tmp").glob("*")] == []


def test_pinned_local_image_is_imported_read_only(pytester: pytest.Pytester, tmp_path: Path) -> None:
    src = tmp_path / "mine.qcow2"
    _qcow2(src)
    pytester.makepyfile(IMAGE_TEST)
    cache = tmp_path / "cache"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--flightvm-cache-dir={cache}",
                                           f"--flightvm-image={src}")
    result.assert_outcomes(passed=1)
    assert oct(src.stat().st_mode & 0o777) != "0o444"  # the user's file is left alone


def test_run_dir_is_owned_by_the_controller(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """Under xdist the run dir names the controller as owner, so the reaper keeps it
    exactly as long as the whole run lives."""
    pytester.makepyfile("""
        import json, os
        def test_owner(flightvm_run):
            owner = json.loads((flightvm_run.run_dir / "run.json").read_text())["pid"]
            assert owner == os.getppid() != os.getpid()
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--flightvm-cache-dir={tmp_path}",
                                           "-n", "2")
    result.assert_outcomes(passed=1)

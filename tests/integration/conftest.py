"""Integration fixtures: the real base image, in the real local registry.

``base_in_registry`` resolves the base once per machine with the real
builder (the shared cache dir is reused across sessions) and makes sure the
local registry holds it, so suites run by pytester with an *empty* cache dir
pull it instead of building it again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ensure_base_in_registry


@pytest.fixture(scope="session")
def base_in_registry(local_registry: str) -> dict[str, Any]:
    """The built-in Debian base: built (or found) in the shared store, present in the registry."""
    settings, image = ensure_base_in_registry(local_registry)
    return {"registry": settings.registry, "path": image.path, "digest": image.digest,
            "tags": image.tags, "cache_dir": settings.cache_dir}


@pytest.fixture
def vm_suite(pytester: pytest.Pytester, base_in_registry: dict[str, Any],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Run a small pytest suite that uses flightvm fixtures, in a subprocess.

    Each run gets an empty cache dir under /var/tmp (not pytest's 0700 tmp),
    so the image comes from the registry; ``run(...)`` returns the result and
    the parsed metrics JSON.
    """
    cache = Path(tempfile_dir()) / f"fvm-suite-{os.getpid()}-{id(pytester)}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    metrics = cache / "metrics.json"

    class Suite:
        cache_dir = cache
        registry = base_in_registry["registry"]

        def run(self, *args: str, timeout: float = 900, **env: str) -> tuple[Any, dict[str, Any]]:
            metrics.unlink(missing_ok=True)
            for key, value in env.items():
                os.environ[key] = value
            try:
                result = pytester.runpytest_subprocess(
                    "-p", "no:cacheprovider",
                    f"--flightvm-cache-dir={cache}",
                    f"--flightvm-registry={self.registry}",
                    f"--flightvm-metrics={metrics}",
                    "--flightvm-no-push",
                    *args,
                    timeout=timeout,
                )
            finally:
                for key in env:
                    os.environ.pop(key, None)
            data = json.loads(metrics.read_text()) if metrics.exists() else {}
            return result, data

    yield Suite()
    # Nothing of ours may be left running: the reaper of the next session would
    # catch it, but a test should clean up after itself.
    leftovers = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"],
                               capture_output=True, text=True).stdout.split()
    shutil.rmtree(cache, ignore_errors=True)
    mine = [d for d in leftovers if d.startswith("flightvm-") and str(cache) in _run_dirs(d)]
    assert not mine, f"suite left VMs running: {mine}"


def tempfile_dir() -> str:
    return os.environ.get("FLIGHTVM_TEST_TMP", "/var/tmp")


def _run_dirs(domain: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", domain],
                          capture_output=True, text=True).stdout

"""Helpers shared by the test tiers (importable as ``tests.support``; the root
conftest puts the repository on sys.path)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.resolve import ResolvedImage, push_file, resolve_image
from pytest_flightvm.config import Settings, resolve

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_REPO = "flightvm/base"


def ensure_base_in_registry(local_registry: str) -> tuple[Settings, ResolvedImage]:
    """The built-in Debian base: built (or found) in the shared store, and present
    in the real local registry under all of its tags."""
    registry = f"{local_registry}/{BASE_REPO}"
    settings = resolve({"registry": registry, "push": True}, {}, os.environ, rootdir=REPO_ROOT)
    image = resolve_image(settings, log=lambda m: sys.stderr.write(m + "\n"))
    reg = FlightRegistry(registry)
    if any(reg.manifest_digest(tag) is None for tag in image.tags):
        push_file(settings, image.path, list(image.tags), key=image.key)
    return settings, image


def run_marked_test(pytester: Any, cache_dir: Path, marker_args: str) -> Any:
    """Run one ``flightvm`` test carrying ``@pytest.mark.flightvm(<marker_args>)`` in a
    subprocess, with a pinned image that does not exist: a marker that is checked first
    fails before the image is looked at."""
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.flightvm({marker_args})
        def test_x(flightvm):
            pass
    """)
    return pytester.runpytest_subprocess(f"--flightvm-cache-dir={cache_dir}",
                                         "--flightvm-image=/nonexistent.qcow2",
                                         "-p", "no:cacheprovider")

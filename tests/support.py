"""Helpers shared by the test tiers (importable as ``tests.support``; the root
conftest puts the repository on sys.path)."""

from __future__ import annotations

import http.server
import os
import sys
import threading
from pathlib import Path
from typing import Any

from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.resolve import ResolvedImage, push_file, resolve_image
from pytest_flightvm.config import Settings, resolve
from pytest_flightvm.vm.factory import RunContext, VMFactory

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_REPO = "flightvm/base"


class _VersionsOnly:
    """What a factory asks a libvirt connection before any domain: the versions (QEMU 7.2,
    libvirt 9.0, as docs/HOST.md measured here)."""

    def getVersion(self) -> int:  # noqa: N802 - libvirt's name
        return 7002000

    def getLibVersion(self) -> int:  # noqa: N802
        return 9000000


def offline_factory(tmp_path: Path, **settings: Any) -> VMFactory:
    """A VMFactory for the unit tier (state keys, pool wiring): its run dir made, a base
    that is never read, and a connection that answers only the version calls."""
    s = Settings(cache_dir=tmp_path / "cache", accel="tcg", **settings)
    run = RunContext("261203000000-aaaa", tmp_path / "run", "gw0")
    run.run_dir.mkdir(mode=0o700, parents=True)
    factory = VMFactory(s, tmp_path / "base.qcow2", run, base_digest="sha256:" + "1" * 64)
    factory._conn = _VersionsOnly()  # noqa: SLF001 - no libvirt in the unit tier
    return factory


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


class TagServer:
    """A loopback HTTP server that answers ``<tag> <path>`` and records each request."""

    def __init__(self, tag: str, address: str = "127.0.0.1") -> None:
        self.tag = tag
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                body = f"{outer.tag} {self.path}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

"""Shared fixtures for the test tiers.

Integration tests run against the real services that ``make host`` starts:
the registry on 127.0.0.1:5000 and libvirtd on qemu:///system. When one is
missing the test fails with the command that fixes it; it is never skipped.
"""

from __future__ import annotations

import os
import urllib.request
import uuid

import pytest

LOCAL_REGISTRY = os.environ.get("FLIGHTVM_TEST_REGISTRY", "127.0.0.1:5000")

# pytester gives each inner run a fresh HOME, so its per-user state dir (the KVM verdict,
# the port table) would be a new one every time: each inner run re-probed KVM (a 30 s
# boot) and kept its own port table. A user's runs share one; so do ours.
os.environ.setdefault("XDG_STATE_HOME", os.path.join(os.path.expanduser("~"), ".local", "state"))


@pytest.fixture(scope="session")
def local_registry() -> str:
    """host:port of the real local registry (Debian's docker-registry)."""
    try:
        urllib.request.urlopen(f"http://{LOCAL_REGISTRY}/v2/", timeout=3).close()
    except OSError as exc:
        pytest.fail(f"no registry answers on {LOCAL_REGISTRY} ({exc}); run `make host` first")
    return LOCAL_REGISTRY


@pytest.fixture
def registry_repo(local_registry: str) -> str:
    """A fresh repository reference in the local registry, unique to this test."""
    return f"{local_registry}/flightvm-test/{uuid.uuid4().hex[:12]}"

"""Registry helpers that need no network: references, loopback, credentials."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from pytest_flightvm.cache.registry import (
    FlightRegistry,
    Reference,
    find_credentials,
    is_loopback,
)
from pytest_flightvm.errors import ConfigError


def test_reference_parse() -> None:
    r = Reference.parse("127.0.0.1:5000/flightvm/base:base-qcow2-latest")
    assert (r.host, r.repository, r.tag, r.digest) == (
        "127.0.0.1:5000", "flightvm/base", "base-qcow2-latest", None)
    d = "sha256:" + "a" * 64
    pinned = Reference.parse(f"ghcr.io/org/img@{d}")
    assert pinned.reference == d and str(pinned) == f"ghcr.io/org/img@{d}"
    assert str(r.with_tag("x")) == "127.0.0.1:5000/flightvm/base:x"
    with pytest.raises(ConfigError):
        Reference.parse("just-a-name")


@pytest.mark.parametrize("host,loop", [
    ("127.0.0.1:5000", True), ("127.1.2.3", True), ("localhost:5000", True), ("[::1]:5000", True),
    ("registry.example.com", False), ("10.0.0.1:5000", False), ("ghcr.io", False),
])
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_scheme() -> None:
    assert FlightRegistry("127.0.0.1:5000/a/b").base == "http://127.0.0.1:5000/v2/a/b"
    assert FlightRegistry("reg.example.com/a/b").base == "https://reg.example.com/v2/a/b"
    assert FlightRegistry("reg.example.com/a/b", plain_http=True).prefix == "http"


def docker_config(tmp_path: Path, auths: dict) -> dict[str, str]:
    (tmp_path / "config.json").write_text(json.dumps({"auths": auths}))
    return {"DOCKER_CONFIG": str(tmp_path), "HOME": str(tmp_path / "home")}


def test_credentials_from_docker_config(tmp_path: Path) -> None:
    auth = base64.b64encode(b"alice:s3cret:with:colons").decode()
    env = docker_config(tmp_path, {"https://localhost:5001/v1/": {"auth": auth}})
    creds = find_credentials("127.0.0.1:5001", env)
    assert creds and creds.username == "alice" and creds.password == "s3cret:with:colons"
    assert "s3cret" not in repr(creds) and "s3cret" not in str(creds)
    assert find_credentials("127.0.0.1:5002", env) is None


def test_env_credentials_win(tmp_path: Path) -> None:
    env = docker_config(tmp_path, {"h:1": {"auth": base64.b64encode(b"a:b").decode()}})
    env |= {"FLIGHTVM_REGISTRY_USER": "bob", "FLIGHTVM_REGISTRY_PASSWORD": "pw"}
    creds = find_credentials("h:1", env)
    assert creds and creds.username == "bob" and "FLIGHTVM_REGISTRY_USER" in creds.source
    env["FLIGHTVM_REGISTRY_TOKEN"] = "tok"
    creds = find_credentials("h:1", env)
    assert creds and creds.token == "tok" and "tok" not in repr(creds)


def test_bad_docker_config_entry(tmp_path: Path) -> None:
    env = docker_config(tmp_path, {"h:1": {"auth": "%%%not base64"}})
    with pytest.raises(ConfigError, match="not base64"):
        find_credentials("h:1", env)


def test_no_docker_config(tmp_path: Path) -> None:
    assert find_credentials("h:1", {"HOME": str(tmp_path)}) is None


def test_progress_lines_only_for_long_transfers(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_flightvm.cache.registry import streams

    now = [100.0]
    monkeypatch.setattr(streams.time, "monotonic", lambda: now[0])
    lines: list[str] = []
    quick = streams.Progress("pulling", 10 << 20, lines.append)
    quick.update(10 << 20)
    quick.finish()
    assert lines == []
    slow = streams.Progress("pulling", 400 << 20, lines.append)
    for _ in range(5):
        now[0] += 1.0
        slow.update(80 << 20)
    slow.finish()
    assert lines == ["pulling: 160/400 MiB (80 MiB/s)", "pulling: 320/400 MiB (80 MiB/s)",
                     "pulling: 400/400 MiB (80 MiB/s) done"]

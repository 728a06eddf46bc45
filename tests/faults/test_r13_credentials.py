"""R13: credentials go only where they were meant to.

Two loopback "hosts" (:class:`HostileRegistry` on 127.0.0.1 and on 127.0.0.2, each
recording every request's headers) stand in for the configured registry and for
another one. FLIGHTVM_REGISTRY_USER/PASSWORD reach the configured host and no
other; a docker-config entry reaches its own host only; a token realm over plain
http on a non-loopback host is refused before any connection; a next-page link
to another host is refused. Each case ends with one line.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
from faultkit import HostileRegistry, Reply, Tally, base_env, cli

from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.errors import RegistryError

REPO = "flightvm/base"
USER, SECRET = "ci", "R13-S3cret-" + uuid.uuid4().hex[:8]
BASIC = {"WWW-Authenticate": 'Basic realm="r13"'}


def asks_basic(hostile: HostileRegistry) -> None:
    for path in (f"/v2/{REPO}/manifests/t", "/v2/", f"/v2/{REPO}/tags/list"):
        hostile.replies[path] = Reply(b'{"errors":[{"code":"UNAUTHORIZED"}]}', 401,
                                      headers=BASIC)


def authorizations(hostile: HostileRegistry) -> list[str]:
    return [h.get("Authorization", "") for _, _, h in hostile.seen if h.get("Authorization")]


def one_line(proc: object, *words: str) -> str:
    stderr = getattr(proc, "stderr", "")
    lines = stderr.strip().splitlines()
    assert getattr(proc, "returncode", 0) != 0 and len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("flightvm: ") and all(w in lines[0] for w in words), lines[0]
    assert SECRET not in stderr
    return lines[0]


def test_env_credentials_only_for_the_configured_host(tally: Tally, tmp_path: Path) -> None:
    env = base_env(FLIGHTVM_REGISTRY_USER=USER, FLIGHTVM_REGISTRY_PASSWORD=SECRET,
                   DOCKER_CONFIG=str(tmp_path / "no-docker"))
    with HostileRegistry("127.0.0.1") as mine, HostileRegistry("127.0.0.2") as other:
        asks_basic(mine)
        asks_basic(other)
        with tally.trial("R13", "env credentials: a pinned image on a second host gets none"):
            proc = cli("cache", "get", "--registry", mine.repo(REPO), "--image",
                       f"{other.repo(REPO)}:t", "--cache-dir", str(tmp_path / "c1"), env=env)
            one_line(proc, "requires credentials", "configured registry")
            assert other.seen and authorizations(other) == []
            # The control: the configured host does get them (so the check above can fail).
            proc = cli("cache", "get", "--registry", mine.repo(REPO), "--image",
                       f"{mine.repo(REPO)}:t", "--cache-dir", str(tmp_path / "c2"), env=env)
            one_line(proc, "rejected the credentials", "FLIGHTVM_REGISTRY_USER")
            expected = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
            assert authorizations(mine) == [expected]

        with tally.trial("R13", "docker config: an entry for one host is not sent to another"):
            config = tmp_path / "docker"
            config.mkdir()
            auth = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
            (config / "config.json").write_text(json.dumps({"auths": {mine.host: {"auth": auth}}}))
            other.seen.clear()
            proc = cli("cache", "get", "--image", f"{other.repo(REPO)}:t", "--cache-dir",
                       str(tmp_path / "c3"), env=base_env(DOCKER_CONFIG=str(config)))
            one_line(proc, "requires credentials")
            assert other.seen and authorizations(other) == []


def test_token_realm_and_links(tally: Tally, tmp_path: Path) -> None:
    env = base_env(FLIGHTVM_REGISTRY_USER=USER, FLIGHTVM_REGISTRY_PASSWORD=SECRET,
                   DOCKER_CONFIG=str(tmp_path / "no-docker"))
    with HostileRegistry("127.0.0.1") as mine, HostileRegistry("127.0.0.2") as other:
        mine.replies[f"/v2/{REPO}/manifests/t"] = Reply(b"{}", 401, headers={
            "WWW-Authenticate": 'Bearer realm="http://token.flightvm.invalid/token",service="s"'})
        with tally.trial("R13", "a token realm over plain http on a non-loopback host"):
            proc = cli("cache", "pull", "t", "--registry", mine.repo(REPO), "--cache-dir",
                       str(tmp_path / "c"), env=env)
            line = one_line(proc, "token.flightvm.invalid", "not https; refused")
            assert "unreachable" not in line  # refused before any connection was tried

        other_url = f"http://{other.host}/v2/{REPO}/tags/list?last=a"
        mine.replies[f"/v2/{REPO}/tags/list"] = Reply(b'{"tags":["a"]}', headers={
            "Link": f'<{other_url}>; rel="next"'})
        with tally.trial("R13", "a next-page link to another host"):
            with pytest.raises(RegistryError) as exc:
                FlightRegistry(mine.repo(REPO)).tags()
            assert "another host; refused" in str(exc.value) and "\n" not in str(exc.value)
            assert other.seen == []

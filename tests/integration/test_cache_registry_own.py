"""Against registries this file starts itself (Debian's docker-registry on a free
loopback port): htpasswd auth, and a registry whose storage we can damage."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightvm.cache import resolve_image
from pytest_flightvm.cache.build import CommandBuilder
from pytest_flightvm.cache.key import compute_key, tags_for
from pytest_flightvm.cache.registry import FlightRegistry, find_credentials
from pytest_flightvm.cache.store import Store
from pytest_flightvm.config import Settings
from pytest_flightvm.errors import IntegrityError, RegistryAuthError, RegistryError
from tests.fake_disk import qcow2_bytes
from tests.own_registry import OwnRegistry, make_ca_and_cert, start_registry

USER = "flightvm-ci"
SECRET = "Sup3r-Secret-Pa55word"


def _start(tmp: Path, auth: str | None, tls: bool = False) -> Iterator[OwnRegistry]:
    reg = start_registry(tmp, tls=tls, auth=auth, user=USER, secret=SECRET)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRegistry]:
    yield from _start(tmp_path_factory.mktemp("auth-registry"), auth="htpasswd")


@pytest.fixture
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRegistry]:
    yield from _start(tmp_path_factory.mktemp("registry"), auth=None)


@pytest.fixture
def tls_auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRegistry]:
    yield from _start(tmp_path_factory.mktemp("tls-registry"), auth="htpasswd", tls=True)


@pytest.fixture
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRegistry]:
    yield from _start(tmp_path_factory.mktemp("token-registry"), auth="token")


@pytest.fixture
def no_ambient_creds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("FLIGHTVM_REGISTRY_USER", "FLIGHTVM_REGISTRY_PASSWORD",
                "FLIGHTVM_REGISTRY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    docker = tmp_path / "docker"
    docker.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    return docker


def disk(path: Path) -> Path:
    path.write_bytes(qcow2_bytes(os.urandom(2 << 20)))
    return path


# -- auth ----------------------------------------------------------------------------------


def test_no_credentials(auth_registry: OwnRegistry, no_ambient_creds: Path,
                        tmp_path: Path) -> None:
    reg = FlightRegistry(auth_registry.repo())
    with pytest.raises(RegistryAuthError, match="requires credentials"):
        reg.push_disk(disk(tmp_path / "d"), ["t"], arch="amd64")


def test_wrong_credentials_one_line_no_secret(
    auth_registry: OwnRegistry, no_ambient_creds: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FLIGHTVM_REGISTRY_USER", USER)
    monkeypatch.setenv("FLIGHTVM_REGISTRY_PASSWORD", SECRET + "-wrong")
    reg = FlightRegistry(auth_registry.repo())
    with pytest.raises(RegistryAuthError) as info:
        reg.pull_disk("t", Store(tmp_path / "s"), arch="amd64")
    message = str(info.value)
    assert "rejected the credentials from FLIGHTVM_REGISTRY_USER" in message
    assert "\n" not in message and info.value.exit_code == 2
    out, err = capfd.readouterr()
    for text in (message, out, err, caplog.text, repr(reg.credentials)):
        assert SECRET not in text
        assert base64.b64encode(f"{USER}:{SECRET}-wrong".encode()).decode() not in text


def round_trip_with_env_creds(repo: str, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> FlightRegistry:
    """User and password from the env; push with one client, pull with a fresh one (its
    own challenge): the pulled blob is the pushed file. Returns the pushing client."""
    monkeypatch.setenv("FLIGHTVM_REGISTRY_USER", USER)
    monkeypatch.setenv("FLIGHTVM_REGISTRY_PASSWORD", SECRET)
    src = disk(tmp_path / "d")
    reg = FlightRegistry(repo)
    reg.push_disk(src, ["t"], arch="amd64")
    store = Store(tmp_path / "s")
    pulled = FlightRegistry(repo).pull_disk("t", store, arch="amd64")
    assert store.blob_path(pulled.digest).read_bytes() == src.read_bytes()
    return reg


def test_right_credentials_from_env(auth_registry: OwnRegistry, no_ambient_creds: Path,
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capfd: pytest.CaptureFixture[str],
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    reg = round_trip_with_env_creds(auth_registry.repo(), tmp_path, monkeypatch)
    assert reg.tags() == ["t"]
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text


def test_right_credentials_from_docker_config(auth_registry: OwnRegistry,
                                              no_ambient_creds: Path, tmp_path: Path) -> None:
    auth = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    # docker writes "localhost:PORT" for 127.0.0.1 logins too; both must work.
    host = auth_registry.host.replace("127.0.0.1", "localhost")
    (no_ambient_creds / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    creds = find_credentials(auth_registry.host)
    assert creds and creds.username == USER and "docker config" in creds.source
    reg = FlightRegistry(auth_registry.repo())
    reg.push_disk(disk(tmp_path / "d"), ["t"], arch="amd64")
    assert reg.tags() == ["t"]


def test_resolve_with_wrong_credentials_fails_instead_of_building(
    auth_registry: OwnRegistry, no_ambient_creds: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FLIGHTVM_REGISTRY_USER", USER)
    monkeypatch.setenv("FLIGHTVM_REGISTRY_PASSWORD", SECRET + "x")
    settings = Settings(cache_dir=tmp_path / "cache", rootdir=tmp_path, arch="amd64",
                        registry=auth_registry.repo(), build_cmd="exit 1")
    msgs: list[str] = []
    with pytest.raises(RegistryAuthError):
        resolve_image(settings, log=msgs.append)
    out, err = capfd.readouterr()
    assert SECRET not in out + err + "".join(msgs)


# -- token auth: the Bearer flow of quay.io and Docker Hub -------------------------------


def test_token_auth_with_user_and_password(token_registry: OwnRegistry, no_ambient_creds: Path,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capfd: pytest.CaptureFixture[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    """401 with a Bearer challenge -> Basic creds to the token service -> a scoped JWT."""
    assert token_registry.token is not None
    caplog.set_level(logging.DEBUG)
    round_trip_with_env_creds(token_registry.repo(), tmp_path, monkeypatch)
    assert token_registry.token.issued >= 2  # one per client at least: tokens were used
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text


def test_token_auth_wrong_password_is_one_line(token_registry: OwnRegistry,
                                               no_ambient_creds: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    assert token_registry.token is not None
    monkeypatch.setenv("FLIGHTVM_REGISTRY_USER", USER)
    monkeypatch.setenv("FLIGHTVM_REGISTRY_PASSWORD", SECRET + "-wrong")
    with pytest.raises(RegistryAuthError) as info:
        FlightRegistry(token_registry.repo()).pull_disk("t", Store(tmp_path / "s"), arch="amd64")
    message = str(info.value)
    assert "rejected the credentials from FLIGHTVM_REGISTRY_USER" in message
    assert "\n" not in message and info.value.exit_code == 2
    assert token_registry.token.refused >= 1 and token_registry.token.issued == 0
    out, err = capfd.readouterr()
    assert SECRET not in out + err + message


def test_token_auth_with_a_ready_token_from_env(token_registry: OwnRegistry,
                                                no_ambient_creds: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """FLIGHTVM_REGISTRY_TOKEN (e.g. a CI job's token) goes straight to the registry."""
    assert token_registry.token is not None
    jwt = token_registry.token.sign(
        [{"type": "repository", "name": "flightvm/base", "actions": ["pull", "push"]}])
    monkeypatch.setenv("FLIGHTVM_REGISTRY_TOKEN", jwt)
    reg = FlightRegistry(token_registry.repo())
    reg.push_disk(disk(tmp_path / "d"), ["t"], arch="amd64")
    assert reg.tags() == ["t"]
    assert token_registry.token.issued == 0  # the token service was never asked


# -- docker credential helpers (credHelpers, credsStore) and identity tokens ---------------


def _helper(bin_dir: Path, name: str, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ``docker-credential-NAME`` program on PATH (the credential-helper protocol)."""
    bin_dir.mkdir(exist_ok=True)
    program = bin_dir / f"docker-credential-{name}"
    program.write_text("#!/bin/sh\n" + body)
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def _answer_for(host: str, user: str, secret: str) -> str:
    """Shell: answer for ``host`` (either spelling of loopback), else docker's not-found."""
    other = host.replace("127.0.0.1", "localhost")
    return (f'read server\ncase "$server" in {host}|{other}) '
            f'printf \'{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}\' '
            '"$server";;\n*) echo "credentials not found in native keychain"; exit 1;;\nesac\n')


def test_cred_helper_for_the_host(auth_registry: OwnRegistry, no_ambient_creds: Path,
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    _helper(tmp_path / "bin", "flightvmtest", _answer_for(auth_registry.host, USER, SECRET),
            monkeypatch)
    (no_ambient_creds / "config.json").write_text(json.dumps(
        {"credHelpers": {auth_registry.host: "flightvmtest"},
         "auths": {auth_registry.host: {"auth": base64.b64encode(b"x:wrong").decode()}}}))
    creds = find_credentials(auth_registry.host)
    assert creds and creds.username == USER and "docker-credential-flightvmtest" in creds.source
    reg = FlightRegistry(auth_registry.repo())
    reg.push_disk(disk(tmp_path / "d"), ["t"], arch="amd64")
    assert reg.tags() == ["t"]
    out, err = capfd.readouterr()
    assert SECRET not in out + err


def test_creds_store_without_an_entry_falls_back_to_auths(
    auth_registry: OwnRegistry, no_ambient_creds: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _helper(tmp_path / "bin", "emptystore", _answer_for("other.example:5000", "u", "p"),
            monkeypatch)
    auth = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    (no_ambient_creds / "config.json").write_text(json.dumps(
        {"credsStore": "emptystore", "auths": {auth_registry.host: {"auth": auth}}}))
    creds = find_credentials(auth_registry.host)
    assert creds and creds.username == USER and creds.source.startswith("docker config")
    FlightRegistry(auth_registry.repo()).push_disk(disk(tmp_path / "d"), ["t"], arch="amd64")


def test_missing_creds_store_helper_is_a_warning_then_a_one_line_auth_error(
    auth_registry: OwnRegistry, no_ambient_creds: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (no_ambient_creds / "config.json").write_text(json.dumps({"credsStore": "not-installed-x"}))
    assert find_credentials(auth_registry.host) is None
    assert "docker-credential-not-installed-x, which is not installed" in caplog.text
    with pytest.raises(RegistryAuthError, match="requires credentials") as info:
        FlightRegistry(auth_registry.repo()).push_disk(disk(tmp_path / "d"), ["t"],
                                                       arch="amd64")
    assert "\n" not in str(info.value)


def test_identity_token_from_a_helper_is_traded_at_the_token_service(
    token_registry: OwnRegistry, no_ambient_creds: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    assert token_registry.token is not None
    refresh = token_registry.token.refresh_token
    _helper(tmp_path / "bin", "idtok", _answer_for(token_registry.host, "<token>", refresh),
            monkeypatch)
    (no_ambient_creds / "config.json").write_text(json.dumps({"credsStore": "idtok"}))
    src = disk(tmp_path / "d")
    reg = FlightRegistry(token_registry.repo())
    reg.push_disk(src, ["t"], arch="amd64")
    store = Store(tmp_path / "s")
    assert store.blob_path(reg.pull_disk("t", store, arch="amd64").digest).read_bytes() == (
        src.read_bytes())
    assert token_registry.token.refreshed >= 1
    out, err = capfd.readouterr()
    assert refresh not in out + err


def test_wrong_identity_token_in_auths_is_one_line(token_registry: OwnRegistry,
                                                   no_ambient_creds: Path, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    assert token_registry.token is not None
    (no_ambient_creds / "config.json").write_text(json.dumps({"auths": {token_registry.host: {
        "auth": base64.b64encode(b"00000000-0000-0000-0000-000000000000:").decode(),
        "identitytoken": "stale-refresh-token"}}}))
    with pytest.raises(RegistryAuthError, match="rejected the credentials from docker config"):
        FlightRegistry(token_registry.repo()).pull_disk("t", Store(tmp_path / "s"),
                                                        arch="amd64")
    assert token_registry.token.refused >= 1 and token_registry.token.refreshed == 0
    out, err = capfd.readouterr()
    assert "stale-refresh-token" not in out + err


def test_tls_registry_with_our_ca(tls_auth_registry: OwnRegistry, no_ambient_creds: Path,
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tls_auth_registry.ca is not None
    monkeypatch.setenv("FLIGHTVM_REGISTRY_CA", str(tls_auth_registry.ca))
    monkeypatch.setenv("FLIGHTVM_REGISTRY_USER", USER)
    monkeypatch.setenv("FLIGHTVM_REGISTRY_PASSWORD", SECRET)
    src = disk(tmp_path / "d")
    reg = FlightRegistry(tls_auth_registry.repo())
    assert reg.base.startswith("https://")
    reg.push_disk(src, ["t"], arch="amd64")
    store = Store(tmp_path / "s")
    assert store.blob_path(reg.pull_disk("t", store, arch="amd64").digest).read_bytes() == (
        src.read_bytes())


def test_tls_registry_with_the_wrong_ca(tls_auth_registry: OwnRegistry, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    other_ca, _, _ = make_ca_and_cert(tmp_path, "other")
    monkeypatch.setenv("FLIGHTVM_REGISTRY_CA", str(other_ca))
    with pytest.raises(RegistryError, match="TLS to registry .* failed") as info:
        FlightRegistry(tls_auth_registry.repo()).ping()
    assert "\n" not in str(info.value)


# -- a registry serving damaged bytes -------------------------------------------------------


def test_registry_serving_corrupt_blob(plain_registry: OwnRegistry, tmp_path: Path) -> None:
    src = disk(tmp_path / "d")
    settings = Settings(cache_dir=tmp_path / "cache", rootdir=tmp_path, arch="amd64",
                        registry=plain_registry.repo(),
                        build_cmd=f"cp {src} \"$FLIGHTVM_OUTPUT\"")
    key = compute_key(CommandBuilder(settings.build_cmd or "").identity, (), tmp_path, "amd64")
    tag = tags_for("base-qcow2", key, "amd64", tmp_path)[0]
    reg = FlightRegistry(plain_registry.repo())
    assert reg.push_disk(src, [tag], arch="amd64", key=key.digest).bytes
    [data] = [p for p in plain_registry.data.rglob("data")
              if p.is_file() and p.stat().st_size == src.stat().st_size]
    raw = bytearray(data.read_bytes())
    raw[12345] ^= 0xFF
    data.write_bytes(bytes(raw))

    store = Store(tmp_path / "s")
    with pytest.raises(IntegrityError, match="does not match its digest"):
        reg.pull_disk(tag, store, arch="amd64")
    assert store.ls() == []

    # resolve: one warning line, then a local build.
    msgs: list[str] = []
    image = resolve_image(settings, log=msgs.append)
    assert image.source == "build"
    assert [m for m in msgs if "warning" in m and "does not match" in m]
    assert image.path.read_bytes() == src.read_bytes()

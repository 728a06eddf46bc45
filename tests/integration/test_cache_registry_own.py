"""Against registries this file starts itself (Debian's docker-registry on a free
loopback port): htpasswd auth, and a registry whose storage we can damage."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_flightvm.cache import resolve_image
from pytest_flightvm.cache.build import CommandBuilder
from pytest_flightvm.cache.key import compute_key, tags_for
from pytest_flightvm.cache.registry import FlightRegistry, find_credentials
from pytest_flightvm.cache.store import Store
from pytest_flightvm.config import Settings
from pytest_flightvm.errors import IntegrityError, RegistryAuthError, RegistryError

USER = "flightvm-ci"
SECRET = "Sup3r-Secret-Pa55word"


@dataclass
class OwnRegistry:
    host: str
    data: Path
    pid: int
    ca: Path | None = None

    def repo(self, name: str = "flightvm/base") -> str:
        return f"{self.host}/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_ca_and_cert(tmp: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert, key, csr = tmp / f"{name}-server.pem", tmp / f"{name}-server.key", tmp / "server.csr"
    ext = tmp / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1",
         "-subj", "/CN=flightvm test CA"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    return ca, cert, key


def _start(tmp: Path, auth: bool, tls: bool = False) -> Iterator[OwnRegistry]:
    port = _free_port()
    cfg: dict = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(tmp / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "test"},
    }
    ca = None
    if tls:
        ca, cert, key = make_ca_and_cert(tmp)
        cfg["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
    if auth:
        htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, SECRET], check=True,
                                  capture_output=True, text=True).stdout
        (tmp / "htpasswd").write_text(htpasswd)
        cfg["auth"] = {"htpasswd": {"realm": "flightvm-test", "path": str(tmp / "htpasswd")}}
    (tmp / "config.yml").write_text(json.dumps(cfg))  # JSON is YAML
    log = open(tmp / "registry.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(tmp / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    scheme = "https" if tls else "http"
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    while True:
        try:
            urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/v2/", timeout=1,
                                   context=context).close()
            break
        except urllib.error.HTTPError:
            break  # 401: up, and asking for credentials
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"docker-registry did not start: {(tmp / 'registry.log').read_text()}")
            time.sleep(0.05)
    try:
        yield OwnRegistry(f"127.0.0.1:{port}", tmp / "data", proc.pid, ca)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRegistry]:
    yield from _start(tmp_path_factory.mktemp("auth-registry"), auth=True)


@pytest.fixture
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRegistry]:
    yield from _start(tmp_path_factory.mktemp("registry"), auth=False)


@pytest.fixture
def tls_auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRegistry]:
    yield from _start(tmp_path_factory.mktemp("tls-registry"), auth=True, tls=True)


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
    path.write_bytes(b"QFI\xfb" + os.urandom(2 << 20))
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


def test_right_credentials_from_env(auth_registry: OwnRegistry, no_ambient_creds: Path,
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capfd: pytest.CaptureFixture[str],
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FLIGHTVM_REGISTRY_USER", USER)
    monkeypatch.setenv("FLIGHTVM_REGISTRY_PASSWORD", SECRET)
    src = disk(tmp_path / "d")
    reg = FlightRegistry(auth_registry.repo())
    reg.push_disk(src, ["t"], arch="amd64")
    store = Store(tmp_path / "s")
    pulled = reg.pull_disk("t", store, arch="amd64")
    assert store.blob_path(pulled.digest).read_bytes() == src.read_bytes()
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

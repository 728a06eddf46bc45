"""R5: an htpasswd registry over TLS (our own docker-registry, a throwaway openssl CA
given through FLIGHTVM_REGISTRY_CA).

Right credentials work from the docker config and from the environment; wrong
ones give one line naming where they came from (exit 2); a wrong CA gives one
line naming FLIGHTVM_REGISTRY_CA. The secret (and its base64 form) appears in
no output, no debug log and no file under the cache dir.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    SECRET,
    SEED,
    USER,
    OwnRegistry,
    Tally,
    base_env,
    cli,
    make_ca_and_cert,
    one_line_setup_error,
    sha256_file,
    start_registry,
)

from pytest_flightvm.cache.registry import Credentials, FlightRegistry
from tests.fake_disk import MiB, write_fake_qcow2

WRONG = SECRET + "-nope"
FORBIDDEN = [SECRET, base64.b64encode(f"{USER}:{SECRET}".encode()).decode(),
             base64.b64encode(f"{USER}:{WRONG}".encode()).decode()]


def assert_no_secret(*texts: str, where: Path | None = None) -> None:
    for text in texts:
        for secret in FORBIDDEN:
            assert secret not in text, "a secret leaked into the output"
    if where is not None:
        for path in where.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                for secret in FORBIDDEN:
                    assert secret.encode() not in data, f"a secret leaked into {path}"


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRegistry]:
    reg = start_registry(tmp_path_factory.mktemp("tls-registry"), tls=True, auth=True)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def artifact(tls_registry: OwnRegistry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 already in the TLS registry as ``:t`` (pushed with the right credentials)."""
    disk = write_fake_qcow2(tmp_path_factory.mktemp("tls-art") / "d.qcow2", 2 * MiB, seed=SEED + 5)
    reg = FlightRegistry(tls_registry.repo(), ca=str(tls_registry.ca),
                         credentials=Credentials("test", USER, SECRET))
    reg.push_disk(disk, ["t"], arch="amd64")
    return disk


def env_for(reg: OwnRegistry, tmp: Path, how: str, password: str = SECRET) -> dict[str, str]:
    """Credentials from the environment, or from a docker config (and nothing else)."""
    docker = tmp / "docker"
    docker.mkdir(exist_ok=True)
    env = base_env(DOCKER_CONFIG=str(docker), FLIGHTVM_REGISTRY_CA=str(reg.ca))
    if how == "env":
        env.update(FLIGHTVM_REGISTRY_USER=USER, FLIGHTVM_REGISTRY_PASSWORD=password)
    else:
        # docker writes "localhost:PORT" for a 127.0.0.1 login too: use that spelling.
        auth = base64.b64encode(f"{USER}:{password}".encode()).decode()
        host = reg.host.replace("127.0.0.1", "localhost")
        (docker / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return env


@pytest.mark.parametrize("how", ["env", "docker-config"])
def test_right_credentials_push_and_pull(how: str, tls_registry: OwnRegistry, artifact: Path,
                                         tally: Tally, tmp_path: Path) -> None:
    with tally.trial("R5", f"right creds from {how}: push+pull over TLS"):
        env = env_for(tls_registry, tmp_path, how)
        cache = tmp_path / "cache"
        push = cli("cache", "push", str(artifact), f"by-{how}", "--registry", tls_registry.repo(),
                   env=env)
        assert push.returncode == 0, push.stderr
        pull = cli("cache", "pull", f"by-{how}", "--registry", tls_registry.repo(),
                   "--cache-dir", str(cache), env=env)
        assert pull.returncode == 0, pull.stderr
        assert sha256_file(Path(pull.stdout.strip())) == sha256_file(artifact)
        assert_no_secret(push.stdout, push.stderr, pull.stdout, pull.stderr, where=cache)


@pytest.mark.parametrize("how", ["env", "docker-config"])
def test_wrong_credentials_one_line(how: str, tls_registry: OwnRegistry, artifact: Path,
                                    tally: Tally, tmp_path: Path) -> None:
    with tally.trial("R5", f"wrong creds from {how}: one line, exit 2"):
        env = env_for(tls_registry, tmp_path, how, password=WRONG)
        cache = tmp_path / "cache"
        proc = cli("cache", "pull", "t", "--registry", tls_registry.repo(), "--cache-dir",
                   str(cache), env=env)
        assert proc.returncode == 2 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        source = "FLIGHTVM_REGISTRY_USER" if how == "env" else "docker config"
        assert "rejected the credentials from" in lines[0] and source in lines[0], lines[0]
        assert_no_secret(proc.stderr, where=cache)


@pytest.mark.parametrize("ca", ["none", "another"])
def test_wrong_ca_one_line(ca: str, tls_registry: OwnRegistry, artifact: Path, tally: Tally,
                           tmp_path: Path) -> None:
    with tally.trial("R5", f"TLS registry, {ca} CA given: one line naming FLIGHTVM_REGISTRY_CA"):
        env = env_for(tls_registry, tmp_path, "env")
        if ca == "none":  # a loopback registry is then asked in plain HTTP
            del env["FLIGHTVM_REGISTRY_CA"]
        else:
            other, _, _ = make_ca_and_cert(tmp_path)
            env["FLIGHTVM_REGISTRY_CA"] = str(other)
        proc = cli("cache", "pull", "t", "--registry", tls_registry.repo(), "--cache-dir",
                   str(tmp_path / "cache"), env=env)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "TLS" in lines[0], lines
        assert "set FLIGHTVM_REGISTRY_CA" in lines[0]
        assert_no_secret(proc.stderr)


@pytest.mark.parametrize("right", [True, False], ids=["right", "wrong"])
def test_plugin_session_with_debug_logs(right: bool, tls_registry: OwnRegistry,
                                        artifact: Path, tally: Tally,
                                        pytester: pytest.Pytester,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with tally.trial("R5", f"pytest session, {'right' if right else 'wrong'} creds, "
                     "DEBUG logs: no secret anywhere"):
        env = env_for(tls_registry, pytester.path, "env", SECRET if right else WRONG)
        for key in [k for k in list(os.environ) if k.startswith("FLIGHTVM_")]:
            monkeypatch.delenv(key)
        for key in ("DOCKER_CONFIG", "FLIGHTVM_REGISTRY_CA", "FLIGHTVM_REGISTRY_USER",
                    "FLIGHTVM_REGISTRY_PASSWORD"):
            monkeypatch.setenv(key, env[key])
        pytester.makepyfile(test_pin='''
            def test_pin(flightvm_image):
                assert flightvm_image.source == "registry"
        ''')
        cache = pytester.path / "cache"
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--flightvm-cache-dir={cache}",
            f"--flightvm-image={tls_registry.repo()}:t", "-o", "log_cli=true",
            "--log-cli-level=DEBUG", f"--flightvm-metrics={cache / 'metrics.json'}",
            timeout=60)
        text = result.stdout.str() + result.stderr.str()
        if right:
            result.assert_outcomes(passed=1)
        else:
            result.assert_outcomes(errors=1)
            line = one_line_setup_error(text, ["rejected the credentials",
                                               "FLIGHTVM_REGISTRY_USER"])
            assert "fix them" in line
        assert "DEBUG" in text  # the debug log really was on
        assert_no_secret(text, where=cache)

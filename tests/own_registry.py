"""A docker-registry of the test's own on a free loopback port: plain, TLS with a
throwaway CA, htpasswd auth, or token auth (the Bearer flow of quay.io and Docker
Hub) with a small token server in the test process. Shared by the integration and
faults tiers (importable as ``tests.own_registry``)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTRY_BIN = "/usr/bin/docker-registry"
TOKEN_SERVICE = "flightvm-test-registry"
TOKEN_ISSUER = "flightvm-test-token-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: object, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *map(str, args)], input=stdin, check=True,
                          capture_output=True).stdout


def make_ca_and_cert(tmp: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert, key, csr = tmp / f"{name}-server.pem", tmp / f"{name}-server.key", tmp / f"{name}.csr"
    ext = tmp / f"{name}-san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1",
             "-subj", "/CN=flightvm test CA")
    _openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "1", "-extfile", ext)
    return ca, cert, key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry JWTs (RS256, signed by openssl) as distribution's token auth
    specification describes: GET with the right Basic credentials, or the OAuth2 POST
    that trades ``refresh_token`` (docker's "identitytoken") for an access token."""

    def __init__(self, tmp: Path, user: str, secret: str) -> None:
        self.user, self.secret = user, secret
        self.key, self.cert = tmp / "token.key", tmp / "token.pem"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key,
                 "-out", self.cert, "-days", "1", "-subj", "/CN=flightvm test token issuer")
        der = _openssl("x509", "-in", self.cert, "-outform", "DER")
        self._x5c = base64.b64encode(der).decode()
        self.refresh_token = f"refresh-{secret}"
        self.issued = 0
        self.refreshed = 0
        self.refused = 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                params = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                self._reply(*server.answer(self.headers.get("Authorization", ""), params))

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                self._reply(*server.refresh(urllib.parse.parse_qs(self.rfile.read(length).decode())))

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args: Any) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/token"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, authorization: str, params: dict[str, list[str]]) -> tuple[int, dict]:
        want = "Basic " + base64.b64encode(f"{self.user}:{self.secret}".encode()).decode()
        if authorization != want:
            with self._lock:
                self.refused += 1
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
        access = []
        for scope in params.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        token = self.sign(access, params.get("service", [""])[0])
        with self._lock:
            self.issued += 1
        return 200, {"token": token, "access_token": token, "expires_in": 300}

    def refresh(self, form: dict[str, list[str]]) -> tuple[int, dict]:
        grant = form.get("grant_type", [""])[0]
        if grant != "refresh_token" or form.get("refresh_token", [""])[0] != self.refresh_token:
            with self._lock:
                self.refused += 1
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad refresh token"}]}
        status, body = self.answer(
            "Basic " + base64.b64encode(f"{self.user}:{self.secret}".encode()).decode(), form)
        with self._lock:
            self.refreshed += 1
        return status, body

    def sign(self, access: list[dict[str, Any]], service: str = TOKEN_SERVICE) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": TOKEN_ISSUER, "sub": self.user, "aud": service, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        signature = _openssl("dgst", "-sha256", "-sign", self.key, stdin=signing_input.encode())
        return signing_input + "." + _b64url(signature)

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


@dataclass
class OwnRegistry:
    host: str
    root: Path
    proc: subprocess.Popen  # type: ignore[type-arg]
    ca: Path | None = None
    token: TokenServer | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def data(self) -> Path:
        return self.root / "data"

    def repo(self, name: str = "flightvm/base") -> str:
        return f"{self.host}/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.token is not None:
            self.token.stop()


def start_registry(tmp: Path, *, tls: bool = False, auth: str | None = None,
                   user: str = "flightvm-test", secret: str = "Test-S3cret-Pa55",
                   port: int | None = None) -> OwnRegistry:
    """``docker-registry serve`` on a free loopback port. ``auth``: None, "htpasswd" or
    "token"; the credentials that work are ``user``/``secret``."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cfg: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(tmp / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "flightvm-test"},
    }
    ca = None
    if tls:
        ca, cert, key = make_ca_and_cert(tmp)
        cfg["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
    token = None
    if auth == "htpasswd":
        htpasswd = subprocess.run(["htpasswd", "-Bbn", user, secret], check=True,
                                  capture_output=True, text=True).stdout
        (tmp / "htpasswd").write_text(htpasswd)
        cfg["auth"] = {"htpasswd": {"realm": "flightvm-test", "path": str(tmp / "htpasswd")}}
    elif auth == "token":
        token = TokenServer(tmp, user, secret)
        cfg["auth"] = {"token": {"realm": token.url, "service": TOKEN_SERVICE,
                                 "issuer": TOKEN_ISSUER, "rootcertbundle": str(token.cert)}}
    elif auth is not None:
        raise ValueError(f"auth must be None, 'htpasswd' or 'token', not {auth!r}")
    (tmp / "cfg.yml").write_text(json.dumps(cfg))  # JSON is YAML
    with open(tmp / "registry.log", "wb") as log:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(tmp / "cfg.yml")], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    reg = OwnRegistry(f"127.0.0.1:{port}", tmp, proc, ca, token)
    scheme = "https" if tls else "http"
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/v2/", timeout=1,
                                   context=context).close()
            return reg
        except urllib.error.HTTPError:
            return reg  # 401: up, and asking for credentials
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                reg.stop()
                raise RuntimeError("docker-registry did not start: "
                                   + (tmp / "registry.log").read_text()[-2000:]) from None
            time.sleep(0.05)

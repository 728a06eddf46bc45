"""Push and pull the base qcow2 as an OCI artifact.

oras-py provides the client (session, reference parsing, manifest schemas);
:class:`FlightRegistry` subclasses :class:`oras.provider.Registry` and
replaces the parts that do not suit a 500 MiB disk image:

* push streams the file (POST + streamed PATCH + PUT ?digest=) instead of
  reading it into RAM, and hashes it while sending;
* pull streams to disk through the store's verifying writer, so nothing
  unverified is ever installed under a digest;
* requests have connect/read timeouts and no retry schedule, so a down or
  stalled registry is reported in seconds (:data:`CONNECT_TIMEOUT`,
  :data:`READ_TIMEOUT`);
* every requests/oras failure becomes a one-line :class:`FlightVMError`.

Artifact: an OCI image manifest whose single layer is the qcow2
(:data:`LAYER_MEDIA_TYPE`, or ``+zstd`` when compressed), annotated with the
title, key, git commit, arch and creation time. ``pull`` also reads the seed's
layout: a container image (docker or OCI manifest) whose tar or tar+gzip layer
holds ``qcow2/disk.qcow2``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import jsonschema
import oras.container
import oras.defaults
import oras.logger
import oras.provider
import oras.schemas
import requests

from ..errors import (
    ArtifactNotFound,
    ConfigError,
    FlightVMError,
    IntegrityError,
    NotQcow2Error,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailable,
)
from .build import QCOW2_MAGIC
from .reference import Reference, is_loopback
from .store import Store

log = logging.getLogger("flightvm.cache.registry")

LAYER_MEDIA_TYPE = "application/vnd.flightvm.disk.qcow2"
LAYER_MEDIA_TYPE_ZSTD = LAYER_MEDIA_TYPE + "+zstd"
CONFIG_MEDIA_TYPE = "application/vnd.flightvm.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST])

ANN_TITLE = "org.opencontainers.image.title"
ANN_CREATED_OCI = "org.opencontainers.image.created"
ANN_REVISION_OCI = "org.opencontainers.image.revision"
ANN_KEY = "dev.flightvm.key"
ANN_GIT = "dev.flightvm.git-commit"
ANN_ARCH = "dev.flightvm.arch"
ANN_CREATED = "dev.flightvm.created"
ANN_DISK_DIGEST = "dev.flightvm.disk.digest"
ANN_DISK_SIZE = "dev.flightvm.disk.size"
DISK_TITLE = "disk.qcow2"
SEED_DISK_PATH = "qcow2/disk.qcow2"

CONNECT_TIMEOUT = 3.0
"""Seconds to open a connection; a closed port fails at once."""
READ_TIMEOUT = 6.0
"""Seconds of silence before a registry counts as stalled (per socket read)."""
FINALIZE_TIMEOUT = 120.0
"""Read timeout for the final PUT of an upload, when the registry may re-hash the blob."""

CHUNK = 1 << 20
MiB = 1 << 20
Log = Callable[[str], None]


def _nolog(_msg: str) -> None:
    pass


# -- quiet oras ------------------------------------------------------------------


def _oras_to_debug(msg: dict[str, Any]) -> None:
    if "msg" in msg:
        log.debug("oras: %s", msg["msg"])


def quiet_oras() -> None:
    """Route oras-py's own messages to our debug log instead of the console."""
    oras.logger.logger.log_handler = [_oras_to_debug]


# References and is_loopback live in .reference (cheap to import); re-exported here.


# -- credentials -------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Where the secret came from is printable; the secret is not (repr hides it)."""

    source: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    # docker's "identitytoken": an OAuth2 refresh token, traded at the token service
    identity_token: str | None = field(default=None, repr=False)

    def basic(self) -> str | None:
        if self.username is None or self.password is None:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def _host_aliases(host: str) -> set[str]:
    names = {host}
    if "localhost" in host:
        names.add(host.replace("localhost", "127.0.0.1"))
    if "127.0.0.1" in host:
        names.add(host.replace("127.0.0.1", "localhost"))
    return names


def _normalize_auth_key(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


HELPER_TIMEOUT = 10.0


def find_credentials(host: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for ``host``: FLIGHTVM_REGISTRY_TOKEN, then FLIGHTVM_REGISTRY_USER +
    FLIGHTVM_REGISTRY_PASSWORD, then the docker config (``$DOCKER_CONFIG/config.json``
    or ``~/.docker/config.json``) the way docker reads it: ``credHelpers.<host>``, else
    ``credsStore``, through ``docker-credential-<name> get``; then ``auths.<host>``."""
    env = os.environ if env is None else env
    if env.get("FLIGHTVM_REGISTRY_TOKEN"):
        return Credentials("FLIGHTVM_REGISTRY_TOKEN", token=env["FLIGHTVM_REGISTRY_TOKEN"])
    user, password = env.get("FLIGHTVM_REGISTRY_USER"), env.get("FLIGHTVM_REGISTRY_PASSWORD")
    if user and password is not None:
        return Credentials("FLIGHTVM_REGISTRY_USER/FLIGHTVM_REGISTRY_PASSWORD", user, password)
    home = env.get("HOME") or str(Path.home())
    config_dir = env.get("DOCKER_CONFIG") or str(Path(home) / ".docker")
    config = Path(config_dir) / "config.json"
    try:
        data = json.loads(config.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("cannot read docker config %s; ignoring it", config)
        return None
    aliases = _host_aliases(host)
    helpers = {k: v for k, v in (data.get("credHelpers") or {}).items()
               if _normalize_auth_key(k) in aliases and isinstance(v, str)}
    helper = next(iter(helpers.values()), None) or data.get("credsStore")
    if isinstance(helper, str) and helper:
        found = _from_helper(helper, host, str(config))
        if found is not None:
            return found
    for key, entry in (data.get("auths") or {}).items():
        if _normalize_auth_key(key) not in aliases or not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):  # wins over "auth", which then holds no password
            return Credentials(f"docker config {config}", identity_token=entry["identitytoken"])
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"]).decode()
                u, _, p = decoded.partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ConfigError(
                    f"docker config {config}: the auth entry for {key} is not base64 user:password"
                ) from None
            return Credentials(f"docker config {config}", u, p)
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(f"docker config {config}", entry["username"], entry["password"])
    return None


def _from_helper(helper: str, host: str, config: str) -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` (the docker credential-helper protocol:
    the server on stdin, ``{"Username", "Secret"}`` JSON on stdout). None when the helper
    has nothing for ``host``; a missing or failing helper is one warning, never fatal
    here: a registry that needs no credentials must still work."""
    program = f"docker-credential-{helper}"
    source = f"{program} (from {config})"
    for server in sorted(_host_aliases(host)):
        try:
            proc = subprocess.run([program, "get"], input=server.encode(), capture_output=True,
                                  timeout=HELPER_TIMEOUT)
        except FileNotFoundError:
            log.warning("docker config %s names the credential helper %s, which is not "
                        "installed; ignoring it", config, program)
            return None
        except subprocess.TimeoutExpired:
            log.warning("credential helper %s gave no answer in %g s; ignoring it",
                        program, HELPER_TIMEOUT)
            return None
        if proc.returncode != 0:
            continue  # "credentials not found in native keychain": try the next alias
        try:
            answer = json.loads(proc.stdout)
            user, secret = str(answer["Username"]), str(answer["Secret"])
        except (ValueError, KeyError, TypeError):
            log.warning("credential helper %s answered something that is not its JSON; "
                        "ignoring it", program)
            return None
        if user == "<token>":  # docker's marker for an identity token
            return Credentials(source, identity_token=secret)
        return Credentials(source, user, secret)
    return None


# -- results -------------------------------------------------------------------------


@dataclass(frozen=True)
class PullResult:
    digest: str  # store digest of the (uncompressed) qcow2
    manifest_digest: str
    bytes: int  # bytes received over the network
    seconds: float
    layout: str  # "flightvm" | "container"
    annotations: dict[str, str]


@dataclass(frozen=True)
class PushResult:
    manifest_digest: str
    bytes: int  # bytes sent (0 when the registry already had the blob)
    seconds: float
    tags: tuple[str, ...]


class _Progress:
    """Progress lines through ``log`` for transfers that last over ~2 s."""

    def __init__(self, what: str, total: int | None, log_fn: Log, interval: float = 2.0):
        self.what, self.total, self.log, self.interval = what, total, log_fn, interval
        self.start = self.last = time.monotonic()
        self.done = self.logged = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last, self.logged = now, self.done
            self.log(self._line(now))

    def finish(self) -> None:
        now = time.monotonic()
        if now - self.start >= self.interval and self.logged != self.done:
            self.log(self._line(now) + " done")

    def _line(self, now: float) -> str:
        rate = self.done / MiB / max(now - self.start, 1e-6)
        total = f"/{self.total / MiB:.0f}" if self.total else ""
        return f"{self.what}: {self.done / MiB:.0f}{total} MiB ({rate:.0f} MiB/s)"


class _HashingReader:
    """File-like view of a response body that hashes (and counts) what is read."""

    def __init__(self, chunks: Iterator[bytes], progress: _Progress):
        self._chunks = chunks
        self._buf = b""
        self.hash = hashlib.sha256()
        self.bytes = 0
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                break
            self.hash.update(chunk)
            self.bytes += len(chunk)
            self.progress.update(len(chunk))
            self._buf += chunk
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _SizedBody:
    """An iterable request body with a known length (so requests sends Content-Length)."""

    def __init__(self, chunks: Iterable[bytes], length: int):
        self._chunks = chunks
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)


def _short_reason(exc: BaseException) -> str:
    text = str(exc)
    for pattern in (r"\[Errno -?\d+\] ([^'\")\]]+)", r"(Read timed out)", r"(timed out)",
                    r"(Connection aborted)", r"(RemoteDisconnected[^'\")]*)",
                    r"(Connection broken[^'\")]*)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip().rstrip(".")
    return type(exc).__name__


def _speaks_tls(resp: requests.Response) -> bool:
    """Go's net/http answers a plain HTTP request on a TLS port with this 400."""
    try:
        return "HTTP request to an HTTPS server" in resp.text
    except (requests.exceptions.RequestException, OSError):
        return False
    finally:
        resp.close()


def _error_message(resp: requests.Response) -> str:
    try:
        errors = resp.json().get("errors") or []
        msgs = [f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors]
        if msgs:
            return "; ".join(msgs)
    except (ValueError, AttributeError, requests.exceptions.RequestException):
        pass
    return f"HTTP {resp.status_code} {resp.reason}"


# -- the client ------------------------------------------------------------------------


class FlightRegistry(oras.provider.Registry):
    """oras Registry with streaming, verifying, time-bounded I/O for one repository.

    ``repository`` is ``host[:port]/repo`` (a tag or digest in it is ignored).
    Plain HTTP is used for loopback hosts (unless a CA is given), or when
    ``plain_http``; otherwise HTTPS, verified against ``ca`` (default
    ``$FLIGHTVM_REGISTRY_CA``) or the system store.
    """

    def __init__(
        self,
        repository: str,
        *,
        plain_http: bool = False,
        ca: str | None = None,
        credentials: Credentials | None | bool = True,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        ref = Reference.parse(repository, "registry")
        self.ref = Reference(ref.host, ref.repository)
        ca = ca or os.environ.get("FLIGHTVM_REGISTRY_CA") or None
        # Loopback registries speak plain HTTP, unless a CA says this one has TLS.
        insecure = plain_http or (is_loopback(ref.host) and not ca)
        quiet_oras()
        super().__init__(
            hostname=ref.host, insecure=insecure, tls_verify=ca or True, auth_backend="basic"
        )
        if is_loopback(ref.host):
            self.session.trust_env = False  # never send loopback traffic through a proxy
        self.container = oras.container.Container(self.ref.name, registry=ref.host)
        self.base = f"{self.prefix}://{ref.host}/v2/{ref.repository}"
        self.timeout = (connect_timeout, read_timeout)
        # Looked up on the first challenge, not here: a registry that never asks for
        # credentials never runs a docker credential helper.
        self._find_credentials = credentials is True
        self._credentials = None if credentials is True else (credentials or None)
        self._authorization: str | None = None
        self._tokens: dict[str, str] = {}

    def __str__(self) -> str:
        return f"[flightvm-registry {self.ref.name}]"

    # -- requests --------------------------------------------------------------

    def do_request(
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        """oras' request entry point, without its retry schedule (see :meth:`request`)."""
        return self.request(method, url, data=data, headers=headers, json=json, stream=stream)

    def request(
        self,
        method: str,
        url: str,
        *,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
        timeout: tuple[float, float] | None = None,
        replayable: bool = True,
    ) -> requests.Response:
        """One request with timeouts and auth; failures become FlightVMErrors."""
        tried: set[str | None] = set()
        for _ in range(4):
            hdrs = dict(headers or {})
            if self._authorization:
                hdrs["Authorization"] = self._authorization
            tried.add(self._authorization)
            try:
                resp = self.session.request(
                    method, url, data=data, json=json, headers=hdrs, stream=stream,
                    timeout=timeout or self.timeout, verify=self._tls_verify,
                )
            except requests.exceptions.SSLError as exc:
                raise RegistryError(
                    f"TLS to registry {self.ref.host} failed ({_short_reason(exc)}); "
                    "set FLIGHTVM_REGISTRY_CA to its CA bundle, or --flightvm-plain-http"
                ) from None
            except (requests.exceptions.Timeout, requests.exceptions.ConnectionError,
                    requests.exceptions.ChunkedEncodingError) as exc:
                raise self._unavailable(exc) from None
            except requests.exceptions.RequestException as exc:
                raise RegistryError(
                    f"request to registry {self.ref.host} failed: {_short_reason(exc)}"
                ) from None
            if resp.status_code == 400 and url.startswith("http:") and _speaks_tls(resp):
                raise RegistryError(
                    f"registry {self.ref.host} speaks TLS, but was asked in plain HTTP "
                    "(loopback registries default to HTTP); set FLIGHTVM_REGISTRY_CA to its "
                    "CA bundle"
                )
            if resp.status_code != 401:
                if resp.status_code == 403:
                    resp.close()
                    raise RegistryAuthError(
                        f"registry {self.ref.host} denied {method} on {self.ref.repository}"
                        f"{self._creds_hint()}; check that these credentials may "
                        f"{'push to' if method in ('POST', 'PUT', 'PATCH') else 'read'} it"
                    )
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            self._answer(challenge)
            if self._authorization in tried or not replayable:
                break
        if self.credentials is None:
            raise RegistryAuthError(
                f"registry {self.ref.host} requires credentials; set FLIGHTVM_REGISTRY_USER and "
                "FLIGHTVM_REGISTRY_PASSWORD (or FLIGHTVM_REGISTRY_TOKEN), or `docker login` it"
            )
        raise RegistryAuthError(
            f"registry {self.ref.host} rejected the credentials from {self.credentials.source}; "
            "fix them (user, password or token)"
        )

    @property
    def credentials(self) -> Credentials | None:
        if self._find_credentials:
            self._credentials, self._find_credentials = find_credentials(self.ref.host), False
        return self._credentials

    def _creds_hint(self) -> str:
        return f" (credentials from {self.credentials.source})" if self.credentials else ""

    def _unavailable(self, exc: BaseException) -> RegistryUnavailable:
        reason = _short_reason(exc)
        if isinstance(exc, requests.exceptions.Timeout) or "timed out" in reason:
            reason = f"no answer within {self.timeout[1]:g} s"
        return RegistryUnavailable(
            f"registry {self.ref.host} is unreachable ({reason}); start it, fix "
            "--flightvm-registry, or use --flightvm-offline"
        )

    def _answer(self, challenge: str) -> None:
        """Set ``self._authorization`` to answer a WWW-Authenticate challenge."""
        creds = self.credentials
        scheme, _, params_text = challenge.partition(" ")
        if creds is None:
            return
        if scheme.lower() == "basic":
            self._authorization = creds.basic() or (
                f"Bearer {creds.token}" if creds.token else None
            )
            return
        if scheme.lower() != "bearer":
            return
        if creds.token:
            self._authorization = f"Bearer {creds.token}"
            return
        params = dict(re.findall(r'(\w+)="([^"]*)"', params_text))
        realm = params.pop("realm", "")
        if not realm:
            return
        cache_key = json.dumps(params, sort_keys=True)
        token = self._tokens.get(cache_key)
        if token is None:
            basic = creds.basic()
            try:
                if creds.identity_token:  # OAuth2: trade the refresh token for an access token
                    r = self.session.post(
                        realm, data={**params, "grant_type": "refresh_token",
                                     "refresh_token": creds.identity_token,
                                     "client_id": "pytest-flightvm"},
                        timeout=self.timeout, verify=self._tls_verify,
                    )
                else:
                    r = self.session.get(
                        realm, params=params, headers={"Authorization": basic} if basic else {},
                        timeout=self.timeout, verify=self._tls_verify,
                    )
            except requests.exceptions.RequestException as exc:
                raise self._unavailable(exc) from None
            if r.status_code in (401, 403):
                raise RegistryAuthError(
                    f"token service of {self.ref.host} rejected the credentials from "
                    f"{creds.source}; fix them"
                )
            if r.status_code != 200:
                raise RegistryError(f"token service of {self.ref.host}: {_error_message(r)}")
            body = self._json(r, f"token service of {self.ref.host}")
            token = str(body.get("token") or body.get("access_token") or "")
            self._tokens[cache_key] = token
        self._authorization = f"Bearer {token}"

    def _check(self, resp: requests.Response, what: str, ok: Sequence[int] = (200,)) -> None:
        if resp.status_code in ok:
            return
        message = _error_message(resp)
        resp.close()
        if resp.status_code == 404:
            raise ArtifactNotFound(f"{what} not found")
        raise RegistryError(f"{what}: registry {self.ref.host} answered {message}")

    def _body(self, resp: requests.Response) -> bytes:
        try:
            return resp.content
        except (requests.exceptions.RequestException, OSError) as exc:
            raise self._unavailable(exc) from None
        finally:
            resp.close()

    def _json(self, resp: requests.Response, what: str) -> dict[str, Any]:
        try:
            data = json.loads(self._body(resp))
        except ValueError:
            raise RegistryError(f"{what}: the registry answered something that is not JSON") from None
        if not isinstance(data, dict):
            raise RegistryError(f"{what}: unexpected answer from the registry")
        return data

    def _url(self, location: str) -> str:
        if location.startswith("http"):
            return location
        return f"{self.prefix}://{self.ref.host}{location}"

    # -- read side -------------------------------------------------------------

    def ping(self) -> None:
        """GET /v2/ (auth included): raises when the registry cannot be used."""
        resp = self.request("GET", f"{self.prefix}://{self.ref.host}/v2/")
        self._check(resp, f"registry {self.ref.host}")
        resp.close()

    def tags(self) -> list[str]:
        """All tags of the repository ([] when the repository does not exist)."""
        url: str | None = f"{self.base}/tags/list"
        tags: list[str] = []
        while url:
            resp = self.request("GET", url)
            if resp.status_code == 404:
                return tags
            self._check(resp, f"tags of {self.ref.name}")
            tags.extend(self._json(resp, f"tags of {self.ref.name}").get("tags") or [])
            nxt = resp.links.get("next", {}).get("url")
            url = self._url(nxt) if nxt else None
        return tags

    def manifest_digest(self, reference: str) -> str | None:
        """Digest of the manifest a tag points at (HEAD), or None when absent."""
        resp = self.request("HEAD", f"{self.base}/manifests/{reference}",
                            headers={"Accept": ACCEPT})
        resp.close()
        if resp.status_code == 404:
            return None
        self._check(resp, f"{self.ref.name}:{reference}")
        return resp.headers.get("Docker-Content-Digest")

    def get_manifest_raw(
        self, reference: str, arch: str | None = None
    ) -> tuple[dict[str, Any], str]:
        """Fetch and verify a manifest; indexes are resolved to ``arch``'s manifest."""
        what = f"{self.ref.name}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        resp = self.request("GET", f"{self.base}/manifests/{reference}",
                            headers={"Accept": ACCEPT})
        self._check(resp, what)
        body = resp.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{what}: manifest content has digest {digest}")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise RegistryError(f"{what}: the manifest is not JSON") from None
        media_type = manifest.get("mediaType") or resp.headers.get("Content-Type", "")
        if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in manifest:
            if arch is None:
                raise RegistryError(f"{what} is an index; an arch is needed to pick a manifest")
            for entry in manifest.get("manifests", []):
                platform = entry.get("platform") or {}
                if platform.get("architecture") == arch and platform.get("os", "linux") == "linux":
                    return self.get_manifest_raw(entry["digest"], arch)
            raise ArtifactNotFound(f"{what} has no linux/{arch} image")
        if manifest.get("schemaVersion") != 2:
            raise RegistryError(
                f"{what}: unsupported manifest (schema {manifest.get('schemaVersion')})"
            )
        try:
            jsonschema.validate(manifest, schema=oras.schemas.manifest)
        except jsonschema.ValidationError as exc:
            raise RegistryError(f"{what}: invalid manifest ({exc.message})") from None
        return manifest, digest

    def _get_blob(self, digest: str) -> requests.Response:
        resp = self.request("GET", f"{self.base}/blobs/{digest}", stream=True)
        self._check(resp, f"blob {digest} of {self.ref.name}")
        return resp

    def pull_disk(
        self,
        reference: str,
        store: Store,
        *,
        arch: str,
        key: str | None = None,
        log: Log = _nolog,
    ) -> PullResult:
        """Pull the qcow2 that ``reference`` (a tag or ``sha256:`` manifest digest) names,
        verify it while writing, and install it in ``store``.

        Raises ArtifactNotFound when the reference is missing, is for another
        arch, or (when ``key`` is given) was built from another key.
        """
        start = time.monotonic()
        manifest, manifest_digest = self.get_manifest_raw(reference, arch)
        what = f"{self.ref.name}:{reference}"
        layers = manifest.get("layers") or []
        ours = [la for la in layers if str(la.get("mediaType", "")).startswith(LAYER_MEDIA_TYPE)]
        if ours:
            annotations = {**(ours[0].get("annotations") or {}),
                           **(manifest.get("annotations") or {})}
            art_arch = annotations.get(ANN_ARCH)
            if art_arch != arch:
                raise ArtifactNotFound(
                    f"{what} is for arch {art_arch or 'unknown'}, not {arch}"
                )
            if key is not None and annotations.get(ANN_KEY) != key:
                raise ArtifactNotFound(
                    f"{what} was built from key {str(annotations.get(ANN_KEY))[:12]}, "
                    f"not {key[:12]}"
                )
            digest, moved = self._pull_layer(ours[0], store, log)
            layout = "flightvm"
        else:
            annotations = dict(manifest.get("annotations") or {})
            digest, moved = self._pull_container(manifest, store, arch, what, log)
            layout = "container"
        _require_qcow2(store, digest, what)
        return PullResult(digest, manifest_digest, moved, time.monotonic() - start, layout,
                          annotations)

    def _pull_layer(self, layer: Mapping[str, Any], store: Store, log_fn: Log) -> tuple[str, int]:
        media_type = str(layer["mediaType"])
        layer_digest, size = str(layer["digest"]), int(layer["size"])
        annotations = layer.get("annotations") or {}
        have = layer_digest if media_type == LAYER_MEDIA_TYPE else annotations.get(ANN_DISK_DIGEST)
        if have and store.has(str(have)):
            return str(have), 0  # same content already stored (another key or tag)
        progress = _Progress("pulling base image", size, log_fn)
        resp = self._get_blob(layer_digest)
        try:
            chunks = self._iter(resp)
            if media_type == LAYER_MEDIA_TYPE:
                with store.writer(expected=layer_digest, size=size) as w:
                    for chunk in chunks:
                        w.write(chunk)
                        progress.update(len(chunk))
                assert w.digest is not None
                progress.finish()
                return w.digest, w.bytes
            if media_type == LAYER_MEDIA_TYPE_ZSTD:
                plain = annotations.get(ANN_DISK_DIGEST)
                plain_size = annotations.get(ANN_DISK_SIZE)
                reader = _HashingReader(chunks, progress)
                with store.writer(expected=plain,
                                  size=int(plain_size) if plain_size else None) as w:
                    _zstd_decompress(reader, w.write)
                    if "sha256:" + reader.hash.hexdigest() != layer_digest or reader.bytes != size:
                        raise IntegrityError(
                            f"layer {layer_digest} of {self.ref.name} arrived corrupt "
                            f"({reader.bytes} bytes, digest mismatch)"
                        )
                assert w.digest is not None
                progress.finish()
                return w.digest, reader.bytes
            raise RegistryError(f"unsupported layer media type {media_type} in {self.ref.name}")
        finally:
            resp.close()

    def _iter(self, resp: requests.Response) -> Iterator[bytes]:
        try:
            yield from resp.iter_content(CHUNK)
        except (requests.exceptions.RequestException, OSError) as exc:
            raise self._unavailable(exc) from None

    def _pull_container(
        self, manifest: Mapping[str, Any], store: Store, arch: str, what: str, log_fn: Log
    ) -> tuple[str, int]:
        config = manifest.get("config") or {}
        moved = 0
        if config.get("digest"):
            resp = self._get_blob(str(config["digest"]))
            body = self._body(resp)
            moved += len(body)
            if "sha256:" + hashlib.sha256(body).hexdigest() != config["digest"]:
                raise IntegrityError(f"{what}: image config does not match its digest")
            try:
                image_arch = json.loads(body).get("architecture")
            except (ValueError, AttributeError):
                image_arch = None
            if image_arch and image_arch != arch:
                raise ArtifactNotFound(f"{what} is for arch {image_arch}, not {arch}")
        for layer in reversed(manifest.get("layers") or []):
            media_type = str(layer.get("mediaType", ""))
            if "tar" not in media_type:
                continue
            gz = "gzip" in media_type
            if "zstd" in media_type:
                continue
            found = self._extract_from_layer(layer, gz, store, log_fn)
            moved += found[1]
            if found[0]:
                return found[0], moved
        raise ArtifactNotFound(
            f"{what} is neither a flightvm artifact nor an image with /{SEED_DISK_PATH}"
        )

    def _extract_from_layer(
        self, layer: Mapping[str, Any], gz: bool, store: Store, log_fn: Log
    ) -> tuple[str | None, int]:
        layer_digest, size = str(layer["digest"]), int(layer["size"])
        progress = _Progress("pulling base image (container layout)", size, log_fn)
        resp = self._get_blob(layer_digest)
        try:
            reader = _HashingReader(self._iter(resp), progress)

            def check() -> None:
                reader.drain()
                if "sha256:" + reader.hash.hexdigest() != layer_digest:
                    raise IntegrityError(f"layer {layer_digest} of {self.ref.name} arrived corrupt")

            try:
                tar = tarfile.open(fileobj=reader, mode="r|gz" if gz else "r|",  # type: ignore[call-overload]
                                   bufsize=CHUNK)
                for member in tar:
                    name = member.name.lstrip("./").lstrip("/")
                    if name != SEED_DISK_PATH or not member.isfile():
                        continue
                    src = tar.extractfile(member)
                    assert src is not None
                    with store.writer(size=member.size) as w:
                        while chunk := src.read(CHUNK):
                            w.write(chunk)
                        check()
                    progress.finish()
                    return w.digest, reader.bytes
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise IntegrityError(
                    f"layer {layer_digest} of {self.ref.name} is not a readable tar ({exc})"
                ) from None
            check()
            return None, reader.bytes
        finally:
            resp.close()

    # -- write side ------------------------------------------------------------

    def blob_exists(self, digest: str) -> bool:
        resp = self.request("HEAD", f"{self.base}/blobs/{digest}")
        resp.close()
        if resp.status_code == 404:
            return False
        self._check(resp, f"blob {digest}")
        return True

    def upload_stream(
        self, chunks: Iterable[bytes], *, length: int | None = None, expected: str | None = None
    ) -> tuple[str, int]:
        """Upload a blob from an iterable of chunks: POST, one streamed PATCH, PUT ?digest=.

        With ``expected`` the registry verifies the digest at the final PUT (a
        mismatch is an IntegrityError); without it the content is hashed while
        sending. Returns (digest, size). Memory stays at one chunk.
        """
        resp = self.request("POST", f"{self.base}/blobs/uploads/",
                            headers={"Content-Length": "0"})
        self._check(resp, f"upload to {self.ref.name}", ok=(202,))
        location = self._url(resp.headers.get("Location", ""))
        resp.close()
        hasher = hashlib.sha256()
        counted = [0]

        def body() -> Iterator[bytes]:
            for chunk in chunks:
                if expected is None:  # else the registry checks ?digest= for us
                    hasher.update(chunk)
                counted[0] += len(chunk)
                yield chunk

        try:
            data: Any = _SizedBody(body(), length) if length is not None else body()
            resp = self.request(
                "PATCH", location, data=data, replayable=False,
                headers={"Content-Type": "application/octet-stream"},
            )
            self._check(resp, f"upload to {self.ref.name}", ok=(202,))
            location = self._url(resp.headers.get("Location", location))
            resp.close()
            digest = expected or "sha256:" + hasher.hexdigest()
            if length is not None and counted[0] != length:
                raise IntegrityError(f"read {counted[0]} bytes to push, expected {length}")
            sep = "&" if "?" in location else "?"
            resp = self.request(
                "PUT", f"{location}{sep}digest={digest}", headers={"Content-Length": "0"},
                timeout=(self.timeout[0], FINALIZE_TIMEOUT),
            )
            if resp.status_code == 400 and "DIGEST_INVALID" in resp.text:
                resp.close()
                raise IntegrityError(
                    f"the registry got content that does not match {digest}; the local file "
                    "changed or is corrupt; not pushed"
                )
            self._check(resp, f"upload to {self.ref.name}", ok=(201, 204))
            resp.close()
            location = ""
            return digest, counted[0]
        finally:
            if location:  # cancel a half-done upload session (best effort)
                with contextlib.suppress(FlightVMError):
                    self.request("DELETE", location).close()

    def put_manifest(self, manifest: Mapping[str, Any], tag: str) -> str:
        jsonschema.validate(dict(manifest), schema=oras.schemas.manifest)
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        resp = self.request(
            "PUT", f"{self.base}/manifests/{tag}", data=body,
            headers={"Content-Type": str(manifest.get("mediaType", OCI_MANIFEST))},
        )
        self._check(resp, f"manifest {self.ref.name}:{tag}", ok=(201, 200))
        resp.close()
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def push_disk(
        self,
        path: Path,
        tags: Sequence[str],
        *,
        arch: str,
        key: str | None = None,
        git_commit: str | None = None,
        compress: str = "none",
        digest: str | None = None,
        log: Log = _nolog,
    ) -> PushResult:
        """Push a qcow2 under ``tags``; streamed, so memory stays flat for any size.

        ``digest`` (the store's verified digest) saves a pre-hash; the upload
        re-hashes what it sends and refuses to finish if it differs.
        """
        if not tags:
            raise ConfigError("push needs at least one tag")
        start = time.monotonic()
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ConfigError(f"cannot push {path}: {exc.strerror}") from None
        if digest is None:
            from .key import file_sha256
            digest = "sha256:" + file_sha256(path)
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        annotations = {ANN_ARCH: arch, ANN_CREATED: created, ANN_CREATED_OCI: created}
        if key:
            annotations[ANN_KEY] = key
        if git_commit:
            annotations[ANN_GIT] = git_commit
            annotations[ANN_REVISION_OCI] = git_commit
        progress = _Progress(f"pushing base image to {self.ref.name}", size, log)
        sent = 0
        if compress == "zstd":
            layer_digest, layer_size = self._upload_zstd(path, progress)
            sent += layer_size
            media_type = LAYER_MEDIA_TYPE_ZSTD
        elif compress == "none":
            media_type = LAYER_MEDIA_TYPE
            layer_digest, layer_size = digest, size
            if not self.blob_exists(digest):
                _, sent = self.upload_stream(_file_chunks(path, progress), length=size,
                                             expected=digest)
        else:
            raise ConfigError(f"unknown compression {compress!r}; use none or zstd")
        progress.finish()
        config = json.dumps({
            "architecture": arch, "os": "linux",
            "flightvm": {"key": key, "disk": {"digest": digest, "size": size}},
        }, sort_keys=True, separators=(",", ":")).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        if not self.blob_exists(config_digest):
            self.upload_stream([config], length=len(config), expected=config_digest)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest,
                       "size": len(config)},
            "layers": [{
                "mediaType": media_type, "digest": layer_digest, "size": layer_size,
                "annotations": {ANN_TITLE: DISK_TITLE, ANN_DISK_DIGEST: digest,
                                ANN_DISK_SIZE: str(size)},
            }],
            "annotations": annotations,
        }
        manifest_digest = ""
        for tag in tags:
            manifest_digest = self.put_manifest(manifest, tag)
        return PushResult(manifest_digest, sent, time.monotonic() - start, tuple(tags))

    def _upload_zstd(self, path: Path, progress: _Progress) -> tuple[str, int]:
        zstd = shutil.which("zstd")
        if zstd is None:
            from ..errors import ToolMissingError
            raise ToolMissingError("compress=zstd needs the zstd binary; apt-get install zstd")
        proc = subprocess.Popen([zstd, "-q", "-c", "-T0", "-3", "--", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None

        def chunks() -> Iterator[bytes]:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(CHUNK):
                progress.update(len(chunk))
                yield chunk

        try:
            digest, size = self.upload_stream(chunks())
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            raise RegistryError(f"zstd failed on {path}: {err.decode(errors='replace').strip()}")
        return digest, size


def _require_qcow2(store: Store, digest: str, what: str) -> None:
    """A pulled disk must be a qcow2: QEMU would only fail on it later, after a VM
    was set up. A blob that is not is dropped from the store again."""
    try:
        with open(store.blob_path(digest), "rb") as f:
            magic = f.read(len(QCOW2_MAGIC))
    except OSError as exc:
        raise RegistryError(f"cannot read the disk pulled from {what}: {exc.strerror}") from None
    if magic != QCOW2_MAGIC:
        store.remove(digest)
        raise NotQcow2Error(
            f"{what} is not a qcow2 disk image (it starts with {magic!r}); push a qcow2 "
            "(qemu-img convert -O qcow2) or point --flightvm-image/--flightvm-registry elsewhere"
        )


def _file_chunks(path: Path, progress: _Progress) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            progress.update(len(chunk))
            yield chunk


def _zstd_decompress(src: _HashingReader, sink: Callable[[bytes], Any]) -> None:
    """Pipe ``src`` through ``zstd -d`` into ``sink`` (a feeder thread avoids deadlock)."""
    zstd = shutil.which("zstd")
    if zstd is None:
        from ..errors import ToolMissingError
        raise ToolMissingError("this image is zstd-compressed; apt-get install zstd")
    proc = subprocess.Popen([zstd, "-d", "-q", "-c"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    failure: list[BaseException] = []

    def feed(stdin: IO[bytes]) -> None:
        try:
            while chunk := src.read(CHUNK):
                stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    feeder = threading.Thread(target=feed, args=(proc.stdin,), daemon=True)
    feeder.start()
    try:
        while chunk := proc.stdout.read(CHUNK):
            sink(chunk)
    finally:
        if failure or proc.poll() is None:
            proc.stdout.close()
        proc.wait()
        feeder.join()
    if failure:
        raise failure[0]
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        raise IntegrityError(
            f"zstd could not decompress the pulled layer ({err or proc.returncode})"
        )

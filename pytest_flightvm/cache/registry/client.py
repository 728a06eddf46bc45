"""HTTP to one registry repository: time-bounded requests with auth, typed one-line
errors, manifests and tags.

Built on a plain ``requests.Session``: connect/read timeouts and no retry
schedule, so a down or stalled registry is reported in seconds
(:data:`CONNECT_TIMEOUT`, :data:`READ_TIMEOUT`); every requests failure becomes
a one-line :class:`FlightVMError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import requests

from ...errors import (
    ArtifactNotFound,
    IntegrityError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailable,
)
from ..reference import Reference, is_loopback
from .auth import Authenticator, Credentials
from .documents import ACCEPT, DOCKER_LIST, OCI_INDEX, check_manifest

CONNECT_TIMEOUT = 3.0
"""Seconds to open a connection; a closed port fails at once."""
READ_TIMEOUT = 6.0
"""Seconds of silence before a registry counts as stalled (per socket read)."""
FINALIZE_TIMEOUT = 120.0
"""Read timeout for the final PUT of an upload, when the registry may re-hash the blob."""

CHUNK = 1 << 20


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


def error_message(resp: requests.Response) -> str:
    try:
        errors = resp.json().get("errors") or []
        msgs = [f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors]
        if msgs:
            return "; ".join(msgs)
    except (ValueError, AttributeError, requests.exceptions.RequestException):
        pass
    return f"HTTP {resp.status_code} {resp.reason}"


class Client:
    """Requests to ``repository`` (``host[:port]/repo``; a tag or digest in it is ignored).

    Plain HTTP is used for loopback hosts (unless a CA is given), or when
    ``plain_http``; otherwise HTTPS, verified against ``ca`` or the system store.
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
        # Loopback registries speak plain HTTP, unless a CA says this one has TLS.
        insecure = plain_http or (is_loopback(ref.host) and not ca)
        self.prefix = "http" if insecure else "https"
        self.verify: str | bool = ca or True
        self.session = requests.Session()
        if is_loopback(ref.host):
            self.session.trust_env = False  # never send loopback traffic through a proxy
        self.base = f"{self.prefix}://{ref.host}/v2/{ref.repository}"
        self.timeout = (connect_timeout, read_timeout)
        self.auth = Authenticator(ref.host, credentials)

    # -- requests --------------------------------------------------------------

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
            if self.auth.authorization:
                hdrs["Authorization"] = self.auth.authorization
            tried.add(self.auth.authorization)
            try:
                resp = self.session.request(
                    method, url, data=data, json=json, headers=hdrs, stream=stream,
                    timeout=timeout or self.timeout, verify=self.verify,
                )
            except requests.exceptions.SSLError as exc:
                raise RegistryError(
                    f"TLS to registry {self.ref.host} failed ({_short_reason(exc)}); "
                    "set FLIGHTVM_REGISTRY_CA to its CA bundle, or --flightvm-plain-http"
                ) from None
            except (requests.exceptions.Timeout, requests.exceptions.ConnectionError,
                    requests.exceptions.ChunkedEncodingError) as exc:
                raise self.unavailable(exc) from None
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
                        f"{self.auth.hint()}; check that these credentials may "
                        f"{'push to' if method in ('POST', 'PUT', 'PATCH') else 'read'} it"
                    )
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            self.auth.answer(challenge, self._token_request, self.json, error_message)
            if self.auth.authorization in tried or not replayable:
                break
        if self.auth.credentials is None:
            raise RegistryAuthError(
                f"registry {self.ref.host} requires credentials; set FLIGHTVM_REGISTRY_USER and "
                "FLIGHTVM_REGISTRY_PASSWORD (or FLIGHTVM_REGISTRY_TOKEN), or `docker login` it"
            )
        raise RegistryAuthError(
            f"registry {self.ref.host} rejected the credentials from "
            f"{self.auth.credentials.source}; fix them (user, password or token)"
        )

    def _token_request(self, method: str, url: str, values: Mapping[str, str],
                       headers: Mapping[str, str] | None) -> requests.Response:
        try:
            if method == "POST":
                return self.session.post(url, data=dict(values), timeout=self.timeout,
                                         verify=self.verify)
            return self.session.get(url, params=dict(values), headers=dict(headers or {}),
                                    timeout=self.timeout, verify=self.verify)
        except requests.exceptions.RequestException as exc:
            raise self.unavailable(exc) from None

    def unavailable(self, exc: BaseException) -> RegistryUnavailable:
        reason = _short_reason(exc)
        if isinstance(exc, requests.exceptions.Timeout) or "timed out" in reason:
            reason = f"no answer within {self.timeout[1]:g} s"
        return RegistryUnavailable(
            f"registry {self.ref.host} is unreachable ({reason}); start it, fix "
            "--flightvm-registry, or use --flightvm-offline"
        )

    def check(self, resp: requests.Response, what: str, ok: Sequence[int] = (200,)) -> None:
        if resp.status_code in ok:
            return
        message = error_message(resp)
        resp.close()
        if resp.status_code == 404:
            raise ArtifactNotFound(f"{what} not found")
        raise RegistryError(f"{what}: registry {self.ref.host} answered {message}")

    def body(self, resp: requests.Response) -> bytes:
        try:
            return resp.content
        except (requests.exceptions.RequestException, OSError) as exc:
            raise self.unavailable(exc) from None
        finally:
            resp.close()

    def json(self, resp: requests.Response, what: str) -> dict[str, Any]:
        try:
            data = json.loads(self.body(resp))
        except ValueError:
            raise RegistryError(f"{what}: the registry answered something that is not JSON") from None
        if not isinstance(data, dict):
            raise RegistryError(f"{what}: unexpected answer from the registry")
        return data

    def iter_body(self, resp: requests.Response) -> Iterator[bytes]:
        try:
            yield from resp.iter_content(CHUNK)
        except (requests.exceptions.RequestException, OSError) as exc:
            raise self.unavailable(exc) from None

    def url(self, location: str) -> str:
        if location.startswith("http"):
            return location
        return f"{self.prefix}://{self.ref.host}{location}"

    # -- read side -------------------------------------------------------------

    def ping(self) -> None:
        """GET /v2/ (auth included): raises when the registry cannot be used."""
        resp = self.request("GET", f"{self.prefix}://{self.ref.host}/v2/")
        self.check(resp, f"registry {self.ref.host}")
        resp.close()

    def tags(self) -> list[str]:
        """All tags of the repository ([] when the repository does not exist)."""
        url: str | None = f"{self.base}/tags/list"
        tags: list[str] = []
        while url:
            resp = self.request("GET", url)
            if resp.status_code == 404:
                return tags
            self.check(resp, f"tags of {self.ref.name}")
            tags.extend(self.json(resp, f"tags of {self.ref.name}").get("tags") or [])
            nxt = resp.links.get("next", {}).get("url")
            url = self.url(nxt) if nxt else None
        return tags

    def manifest_digest(self, reference: str) -> str | None:
        """Digest of the manifest a tag points at (HEAD), or None when absent."""
        resp = self.request("HEAD", f"{self.base}/manifests/{reference}",
                            headers={"Accept": ACCEPT})
        resp.close()
        if resp.status_code == 404:
            return None
        self.check(resp, f"{self.ref.name}:{reference}")
        return resp.headers.get("Docker-Content-Digest")

    def get_manifest(self, reference: str, arch: str | None = None) -> tuple[dict[str, Any], str]:
        """Fetch and verify a manifest; indexes are resolved to ``arch``'s manifest."""
        what = f"{self.ref.name}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        resp = self.request("GET", f"{self.base}/manifests/{reference}",
                            headers={"Accept": ACCEPT})
        self.check(resp, what)
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
                    return self.get_manifest(entry["digest"], arch)
            raise ArtifactNotFound(f"{what} has no linux/{arch} image")
        check_manifest(manifest, what)
        return manifest, digest

    def get_blob(self, digest: str) -> requests.Response:
        resp = self.request("GET", f"{self.base}/blobs/{digest}", stream=True)
        self.check(resp, f"blob {digest} of {self.ref.name}")
        return resp

    def blob_exists(self, digest: str) -> bool:
        resp = self.request("HEAD", f"{self.base}/blobs/{digest}")
        resp.close()
        if resp.status_code == 404:
            return False
        self.check(resp, f"blob {digest}")
        return True

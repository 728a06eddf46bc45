"""HTTP to one registry repository: bounded requests with auth, typed one-line errors,
manifests and tags.

Built on a plain ``requests.Session``: connect/read timeouts and no retry
schedule, so a down or stalled registry is reported in seconds
(:data:`CONNECT_TIMEOUT`, :data:`READ_TIMEOUT`); every requests failure becomes
a one-line :class:`FlightVMError`. Every body is streamed and bounded: at most
its declared size (metadata: :data:`METADATA_CAP`), within a deadline for the
whole body that grows with its size (:meth:`Client.allowance`). Answers from
the registry are checked (:mod:`.documents`) before any value in them is used;
a URL it hands back (upload location, next page) must stay on its host.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import select
import socket
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import requests
import urllib3

from ...errors import (
    ArtifactNotFound,
    IntegrityError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailable,
)
from ..reference import Reference, is_loopback
from .auth import Authenticator, Credentials
from .documents import (
    ACCEPT,
    DOCKER_LIST,
    OCI_INDEX,
    check_digest,
    check_manifest,
    check_reference,
    index_entries,
    parse_json,
)
from .streams import CHUNK, Watchdog, socket_of

CONNECT_TIMEOUT = 3.0
"""Seconds to open a connection; a closed port fails at once."""
READ_TIMEOUT = 6.0
"""Seconds of silence before a registry counts as stalled (per socket read)."""
FINALIZE_TIMEOUT = 120.0
"""Read timeout for the final PUT of an upload, when the registry may re-hash the blob."""

METADATA_CAP = 4 << 20
"""Most bytes of a manifest, config, token reply, tag page or error body."""
MIN_RATE = 512 << 10
"""Bytes/s a body must average: its deadline is ``2 x READ_TIMEOUT + size / MIN_RATE``."""
MAX_PAGES = 1000
"""Most pages of a tag list."""


_READ_ERRORS = (requests.exceptions.RequestException, OSError, http.client.HTTPException,
                urllib3.exceptions.HTTPError)


def _spliceable(fp: http.client.HTTPResponse | None,
                resp: requests.Response) -> socket.socket | None:
    """The plain TCP socket under ``fp`` when its body can be spliced: a known length,
    not chunked, nothing decoded, no TLS (its bytes must be decrypted in Python)."""
    if fp is None or fp.chunked or fp.length is None or not hasattr(os, "splice"):
        return None
    sock = socket_of(resp)
    return sock if sock is not None and not isinstance(sock, ssl.SSLSocket) else None


def _in_place(resp: requests.Response) -> http.client.HTTPResponse | None:
    """http.client's response under requests and urllib3, when nothing decodes the body:
    it reads straight into a caller's buffer (urllib3's ``readinto`` reads a fresh
    chunk, then copies it). There is no public handle to it."""
    fp = getattr(resp.raw, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse) and not resp.headers.get("Content-Encoding"):
        return fp
    return None


class Body:
    """A response body being read (from :meth:`Client.stream`); a context manager.

    ``readinto`` fills a caller's buffer, ``read`` returns a chunk; both return
    nothing at the end. More than ``limit`` bytes, or a body not complete within the
    client's allowance for ``limit`` (a watchdog shuts the socket then: a read
    timeout applies to each read, so a body trickling in would never time out), is
    a one-line RegistryError; a broken connection is RegistryUnavailable.
    """

    def __init__(self, client: Client, resp: requests.Response, limit: int, what: str) -> None:
        self.client, self.resp, self.limit, self.what = client, resp, limit, what
        self.seconds = client.allowance(limit)
        self.got = 0
        self._fp = _in_place(resp)
        self._sock = _spliceable(self._fp, resp)
        self._left: int | None = None  # bytes still to splice (once splicing began)
        self._poller: select.poll | None = None
        self._watchdog = Watchdog(resp, self.seconds)

    @property
    def spliceable(self) -> bool:
        """Whether :meth:`splice` works: plain HTTP with a Content-Length, nothing decoded."""
        return self._sock is not None

    def readinto(self, view: memoryview) -> int:
        try:
            if self._fp is not None:
                n = self._fp.readinto(view)
            else:
                data = self.resp.raw.read(len(view), decode_content=True)
                n = len(data)
                view[:n] = data
        except _READ_ERRORS as exc:
            if not self._watchdog.fired:
                raise self.client.unavailable(exc) from None
            n = 0
        return self._count(n)

    def splice(self, pipe: int, n: int) -> int:
        """Move up to ``n`` more bytes of the body into ``pipe`` (the write end of a pipe
        with room for them) in the kernel: they never pass through Python. Returns how
        many; 0 at the end. Only when :attr:`spliceable`."""
        assert self._fp is not None and self._sock is not None
        first = self._left is None
        if self._left is None:  # http.client counted what was read before splicing began
            self._left = self._fp.length or 0
        left = self._left
        if left <= 0:
            return 0
        try:
            if first:  # what http.client's reader holds already comes first
                ahead = self._fp.fp.peek(1)[:min(n, left)]
                k = os.write(pipe, self._fp.fp.read(len(ahead))) if ahead else 0
            else:
                k = self._splice(pipe, min(n, left))
        except _READ_ERRORS as exc:
            if not self._watchdog.fired:
                raise self.client.unavailable(exc) from None
            k = 0
        if not k and not self._watchdog.fired:
            raise self.client.unavailable(http.client.IncompleteRead(b"", left))
        self._left -= k
        return self._count(k)

    def _splice(self, pipe: int, n: int) -> int:
        assert self._sock is not None
        fd = self._sock.fileno()
        while True:
            try:
                return os.splice(fd, pipe, n, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if self._poller is None:
                    self._poller = select.poll()
                    self._poller.register(fd, select.POLLIN)
                if not self._poller.poll(self.client.timeout[1] * 1000):
                    raise TimeoutError("Read timed out") from None

    def _count(self, n: int) -> int:
        if self._watchdog.fired:
            raise RegistryError(f"{self.what}: registry {self.client.ref.host} did not send its "
                                f"{self.limit} bytes within {self.seconds:.0f} s "
                                f"({self.got} arrived); refused")
        self.got += n
        if self.got > self.limit:
            raise RegistryError(f"{self.what}: registry {self.client.ref.host} sent more than "
                                f"the {self.limit} bytes expected; refused")
        return n

    def read(self, n: int) -> bytes:
        view = memoryview(bytearray(n))
        return view[:self.readinto(view)].tobytes()

    def chunks(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk

    def __enter__(self) -> Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self._watchdog.cancel()


def _short_reason(exc: BaseException) -> str:
    text = str(exc)
    for pattern in (r"\[Errno -?\d+\] ([^'\")\]]+)", r"(Read timed out)", r"(timed out)",
                    r"(Connection aborted)", r"(RemoteDisconnected[^'\")]*)",
                    r"(Connection broken[^'\")]*)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip().rstrip(".")
    return type(exc).__name__


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
        min_rate: float = MIN_RATE,
        env_credentials: bool = True,
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
        self.min_rate = min_rate
        self.auth = Authenticator(ref.host, credentials, env_credentials=env_credentials)

    # -- requests --------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        stream: bool = True,
        timeout: tuple[float, float] | None = None,
        replayable: bool = True,
    ) -> requests.Response:
        """One request with timeouts and auth; failures become FlightVMErrors.

        The body is never read here (``stream`` is ignored): read it with
        :meth:`body`, :meth:`json` or :meth:`bounded`, or close the response.
        """
        del stream
        tried: set[str | None] = set()
        for _ in range(4):
            hdrs = dict(headers or {})
            if self.auth.authorization:
                hdrs["Authorization"] = self.auth.authorization
            tried.add(self.auth.authorization)
            try:
                resp = self.session.request(
                    method, url, data=data, json=json, headers=hdrs, stream=True,
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
            if resp.status_code == 400 and url.startswith("http:") and self._speaks_tls(resp):
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
            self.auth.answer(challenge, self._token_request, self.json, self.error_message)
            if self.auth.authorization in tried or not replayable:
                break
        if self.auth.credentials is None and not self.auth.env_credentials:
            raise RegistryAuthError(
                f"registry {self.ref.host} requires credentials; FLIGHTVM_REGISTRY_* credentials "
                "go only to the configured registry, so `docker login` this one"
            )
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
                                         verify=self.verify, stream=True)
            return self.session.get(url, params=dict(values), headers=dict(headers or {}),
                                    timeout=self.timeout, verify=self.verify, stream=True)
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
        message = self.error_message(resp)
        if resp.status_code == 404:
            raise ArtifactNotFound(f"{what} not found")
        raise RegistryError(f"{what}: registry {self.ref.host} answered {message}")

    def error_message(self, resp: requests.Response) -> str:
        """The registry's own error codes and messages, from a capped body; closes ``resp``."""
        try:
            errors = parse_json(self.body(resp, "error", cap=64 << 10), "error").get("errors")
            msgs = [f"{e.get('code', '')} {e.get('message', '')}".strip()[:200]
                    for e in errors or [] if isinstance(e, dict)]
            if msgs:
                return "; ".join(msgs[:5])
        except (RegistryError, AttributeError, TypeError):
            pass
        return f"HTTP {resp.status_code} {str(resp.reason)[:80]}"

    def _speaks_tls(self, resp: requests.Response) -> bool:
        """Go's net/http answers a plain HTTP request on a TLS port with this 400."""
        try:
            return b"HTTP request to an HTTPS server" in self.body(resp, "error", cap=64 << 10)
        except RegistryError:
            return False

    def allowance(self, size: int) -> float:
        """Seconds a body of ``size`` bytes may take, all of it (see :data:`MIN_RATE`)."""
        return 2 * self.timeout[1] + size / self.min_rate

    def stream(self, resp: requests.Response, limit: int, what: str) -> Body:
        """The body of ``resp`` to read: at most ``limit`` bytes, all within
        :meth:`allowance`; otherwise a one-line RegistryError (and the socket is shut)."""
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            resp.close()
            raise RegistryError(f"{what}: registry {self.ref.host} announced {declared} bytes, "
                                f"more than the {limit} expected; refused")
        return Body(self, resp, limit, what)

    def bounded(self, resp: requests.Response, limit: int, what: str) -> Iterator[bytes]:
        """:meth:`stream`'s body in chunks."""
        with self.stream(resp, limit, what) as body:
            yield from body.chunks()

    def body(self, resp: requests.Response, what: str, cap: int = METADATA_CAP) -> bytes:
        """The whole body, at most ``cap`` bytes (metadata); closes ``resp``. A second
        call gets the same bytes (they are kept on ``resp``, as requests does)."""
        if getattr(resp, "_content_consumed", False) and isinstance(resp._content, bytes):
            return resp._content
        try:
            data = b"".join(self.bounded(resp, cap, what))
        finally:
            resp.close()
        resp._content, resp._content_consumed = data, True  # type: ignore[attr-defined]
        return data

    def json(self, resp: requests.Response, what: str) -> dict[str, Any]:
        return parse_json(self.body(resp, what), what)

    def url(self, location: str) -> str:
        """An absolute URL for a location the registry handed back, on its own host only
        (our Authorization header goes with it)."""
        if not location.startswith(("http://", "https://")):
            return f"{self.prefix}://{self.ref.host}{location}"
        parts = urllib.parse.urlsplit(location)
        if parts.netloc != self.ref.host or parts.scheme != self.prefix:
            raise RegistryError(f"registry {self.ref.host} sent us to {location[:100]}, "
                                "another host; refused")
        return location

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
        what = f"tags of {self.ref.name}"
        for _ in range(MAX_PAGES):
            if not url:
                return tags
            resp = self.request("GET", url)
            if resp.status_code == 404:
                resp.close()
                return tags
            self.check(resp, what)
            page = self.json(resp, what).get("tags") or []
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise RegistryError(f"{what}: the tag list is not a list of strings")
            tags.extend(page)
            nxt = resp.links.get("next", {}).get("url")
            url = self.url(nxt) if nxt else None
        raise RegistryError(f"{what}: more than {MAX_PAGES} pages; refused")

    def manifest_digest(self, reference: str) -> str | None:
        """Digest of the manifest a tag points at (HEAD), or None when absent."""
        what = f"{self.ref.name}:{reference}"
        check_reference(reference, what)
        resp = self.request("HEAD", f"{self.base}/manifests/{reference}",
                            headers={"Accept": ACCEPT})
        resp.close()
        if resp.status_code == 404:
            return None
        self.check(resp, what)
        digest = resp.headers.get("Docker-Content-Digest")
        return check_digest(digest, what) if digest else None

    def get_manifest(self, reference: str, arch: str | None = None,
                     _depth: int = 0) -> tuple[dict[str, Any], str]:
        """Fetch and verify a manifest; an index is resolved to ``arch``'s manifest."""
        what = f"{self.ref.name}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        check_reference(reference, what)
        resp = self.request("GET", f"{self.base}/manifests/{reference}",
                            headers={"Accept": ACCEPT})
        self.check(resp, what)
        content_type = resp.headers.get("Content-Type", "")
        body = self.body(resp, what)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{what}: manifest content has digest {digest}")
        manifest = parse_json(body, what)
        media_type = manifest.get("mediaType") or content_type
        if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in manifest:
            if arch is None:
                raise RegistryError(f"{what} is an index; an arch is needed to pick a manifest")
            if _depth:
                raise RegistryError(f"{what}: an index inside an index; refused")
            for entry in index_entries(manifest, what):
                platform = entry.get("platform") or {}
                if platform.get("architecture") == arch and platform.get("os", "linux") == "linux":
                    return self.get_manifest(entry["digest"], arch, _depth + 1)
            raise ArtifactNotFound(f"{what} has no linux/{arch} image")
        check_manifest(manifest, what)
        return manifest, digest

    def get_blob(self, digest: str) -> requests.Response:
        check_digest(digest, f"blob of {self.ref.name}")
        resp = self.request("GET", f"{self.base}/blobs/{digest}")
        self.check(resp, f"blob {digest} of {self.ref.name}")
        return resp

    def blob_exists(self, digest: str) -> bool:
        check_digest(digest, f"blob of {self.ref.name}")
        resp = self.request("HEAD", f"{self.base}/blobs/{digest}")
        resp.close()
        if resp.status_code == 404:
            return False
        self.check(resp, f"blob {digest}")
        return True

"""Registry credentials: where they come from, and answering a registry's auth challenge.

Sources, in order: ``FLIGHTVM_REGISTRY_TOKEN``; ``FLIGHTVM_REGISTRY_USER`` +
``FLIGHTVM_REGISTRY_PASSWORD`` (both only for the configured registry's host:
the caller says so with ``use_env``); the docker config (``credHelpers``,
``credsStore``, ``auths``), each entry for its own host only.
:class:`Authenticator` turns a ``WWW-Authenticate`` challenge into an
``Authorization`` header (Basic, or a Bearer token from the challenge's token
service, which must be https, or plain http only between loopback hosts).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ...errors import ConfigError, RegistryAuthError, RegistryError
from ..reference import is_loopback

log = logging.getLogger("flightvm.cache.registry")

HELPER_TIMEOUT = 10.0


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


def same_host(a: str, b: str) -> bool:
    """Do two ``host[:port]`` spellings name one registry (localhost = 127.0.0.1)?"""
    return bool(_host_aliases(a) & _host_aliases(b))


def find_credentials(host: str, env: Mapping[str, str] | None = None, *,
                     use_env: bool = True) -> Credentials | None:
    """Credentials for ``host``: FLIGHTVM_REGISTRY_TOKEN, then FLIGHTVM_REGISTRY_USER +
    FLIGHTVM_REGISTRY_PASSWORD (with ``use_env``: ``host`` is the configured registry),
    then the docker config (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``)
    the way docker reads it: ``credHelpers.<host>``, else ``credsStore``, through
    ``docker-credential-<name> get``; then ``auths.<host>``."""
    env = os.environ if env is None else env
    if use_env and env.get("FLIGHTVM_REGISTRY_TOKEN"):
        return Credentials("FLIGHTVM_REGISTRY_TOKEN", token=env["FLIGHTVM_REGISTRY_TOKEN"])
    user, password = env.get("FLIGHTVM_REGISTRY_USER"), env.get("FLIGHTVM_REGISTRY_PASSWORD")
    if use_env and user and password is not None:
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
    if not isinstance(data, dict):
        log.warning("docker config %s is not a JSON object; ignoring it", config)
        return None
    aliases = _host_aliases(host)
    helpers = {k: v for k, v in _dict(data.get("credHelpers")).items()
               if _normalize_auth_key(k) in aliases and isinstance(v, str)}
    helper = next(iter(helpers.values()), None) or data.get("credsStore")
    if isinstance(helper, str) and helper:
        found = _from_helper(helper, host, str(config))
        if found is not None:
            return found
    for key, entry in _dict(data.get("auths")).items():
        if _normalize_auth_key(key) not in aliases or not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):  # wins over "auth", which then holds no password
            return Credentials(f"docker config {config}", identity_token=entry["identitytoken"])
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"]).decode()
                u, _, p = decoded.partition(":")
            except (ValueError, UnicodeDecodeError, TypeError):
                raise ConfigError(
                    f"docker config {config}: the auth entry for {key} is not base64 user:password"
                ) from None
            return Credentials(f"docker config {config}", u, p)
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(f"docker config {config}", entry["username"], entry["password"])
    return None


def _dict(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


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


TokenFetch = Callable[[str, str, Mapping[str, str], Mapping[str, str] | None], requests.Response]
"""``fetch(method, url, params_or_form, headers)``: one bounded request to a token service."""


class Authenticator:
    """Answers the challenges of one registry host; remembers tokens per scope.

    Credentials are looked up on the first challenge, not before: a registry
    that never asks never runs a docker credential helper.
    """

    def __init__(self, host: str, credentials: Credentials | None | bool = True, *,
                 env_credentials: bool = True) -> None:
        self.host = host
        self.env_credentials = env_credentials
        self._find = credentials is True
        self._credentials = None if credentials is True else (credentials or None)
        self.authorization: str | None = None
        self._tokens: dict[str, str] = {}

    @property
    def credentials(self) -> Credentials | None:
        if self._find:
            self._credentials = find_credentials(self.host, use_env=self.env_credentials)
            self._find = False
        return self._credentials

    def hint(self) -> str:
        return f" (credentials from {self.credentials.source})" if self.credentials else ""

    def answer(self, challenge: str, fetch: TokenFetch,
               read_json: Callable[[requests.Response, str], dict[str, object]],
               describe: Callable[[requests.Response], str]) -> None:
        """Set :attr:`authorization` to answer a WWW-Authenticate challenge."""
        creds = self.credentials
        scheme, _, params_text = challenge.partition(" ")
        if creds is None:
            return
        if scheme.lower() == "basic":
            self.authorization = creds.basic() or (
                f"Bearer {creds.token}" if creds.token else None
            )
            return
        if scheme.lower() != "bearer":
            return
        if creds.token:
            self.authorization = f"Bearer {creds.token}"
            return
        params = dict(re.findall(r'(\w+)="([^"]*)"', params_text))
        realm = params.pop("realm", "")
        if not realm:
            return
        self._check_realm(realm)
        cache_key = json.dumps(params, sort_keys=True)
        token = self._tokens.get(cache_key)
        if token is None:
            basic = creds.basic()
            if creds.identity_token:  # OAuth2: trade the refresh token for an access token
                r = fetch("POST", realm, {**params, "grant_type": "refresh_token",
                                          "refresh_token": creds.identity_token,
                                          "client_id": "pytest-flightvm"}, None)
            else:
                r = fetch("GET", realm, params, {"Authorization": basic} if basic else {})
            if r.status_code in (401, 403):
                r.close()
                raise RegistryAuthError(
                    f"token service of {self.host} rejected the credentials from "
                    f"{creds.source}; fix them"
                )
            if r.status_code != 200:
                raise RegistryError(f"token service of {self.host}: {describe(r)}")
            body = read_json(r, f"token service of {self.host}")
            token = str(body.get("token") or body.get("access_token") or "")
            self._tokens[cache_key] = token
        self.authorization = f"Bearer {token}"

    def _check_realm(self, realm: str) -> None:
        """Credentials go to a token service over https only; plain http only when both
        the registry and the token service are on loopback."""
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme == "https" and parts.netloc:
            return
        if parts.scheme == "http" and is_loopback(parts.netloc) and is_loopback(self.host):
            return
        raise RegistryError(
            f"registry {self.host} names the token service {realm[:100]!r}, which is not "
            "https; refused (credentials would cross the network in clear)"
        )

"""Registry references, cheap to import: no oras, no requests.

Kept apart from :mod:`registry` so that a local cache hit never pays for
importing the registry client (~0.2 s).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..config import validate_registry_ref


@dataclass(frozen=True)
class Reference:
    """``host[:port]/repo[:tag][@sha256:...]``."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, ref: str, what: str = "registry reference") -> Reference:
        match = validate_registry_ref(ref, what)
        assert match is not None
        return cls(match["host"], match["repo"], match["tag"], match["digest"])

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.host, self.repository, tag, None)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    name = host
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False

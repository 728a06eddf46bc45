"""The registry client of one repository: pull and push the base qcow2 as an OCI artifact.

:class:`FlightRegistry` composes the parts, each a module with one job:
:mod:`.auth` (credentials, challenges, tokens), :mod:`.client` (bounded
requests, typed errors, manifests, tags), :mod:`.documents` (media types and
manifest checks), :mod:`.transfer` (streamed, verified push and pull),
:mod:`.layout` (the seed's container layout), :mod:`.bundle` (several files as
one artifact: booted states) and :mod:`.streams` (bounded byte streams).
Content from a registry is untrusted: see each module for the bound it keeps.

oras-py is not used: its ``pull`` does not verify digests, its ``push`` holds
the whole file in memory (RSS 512 MiB for a 480 MiB disk), failed requests are
retried on a 3-5-11-29-83 s schedule, and it prints to stdout; what is left
(a session, reference parsing, a manifest schema) is a few lines here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from ...errors import ArtifactNotFound, NotQcow2Error
from ..qcow2 import QCOW2_MAGIC, check_qcow2
from ..reference import Reference, is_loopback
from ..store import Store
from . import layout, transfer
from .auth import Credentials, find_credentials
from .client import CONNECT_TIMEOUT, FINALIZE_TIMEOUT, READ_TIMEOUT, Client
from .documents import (
    ACCEPT,
    ANN_ARCH,
    ANN_CREATED,
    ANN_CREATED_OCI,
    ANN_DISK_DIGEST,
    ANN_DISK_SIZE,
    ANN_GIT,
    ANN_KEY,
    ANN_REVISION_OCI,
    ANN_TITLE,
    CONFIG_MEDIA_TYPE,
    DISK_TITLE,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    LAYER_MEDIA_TYPE,
    LAYER_MEDIA_TYPE_ZSTD,
    OCI_INDEX,
    OCI_MANIFEST,
    SEED_DISK_PATH,
    check_annotations,
)
from .streams import Log, nolog
from .transfer import PushResult

__all__ = [
    "ACCEPT", "ANN_ARCH", "ANN_CREATED", "ANN_CREATED_OCI", "ANN_DISK_DIGEST", "ANN_DISK_SIZE",
    "ANN_GIT", "ANN_KEY", "ANN_REVISION_OCI", "ANN_TITLE", "CONFIG_MEDIA_TYPE",
    "CONNECT_TIMEOUT", "DISK_TITLE", "DOCKER_LIST", "DOCKER_MANIFEST", "FINALIZE_TIMEOUT",
    "LAYER_MEDIA_TYPE", "LAYER_MEDIA_TYPE_ZSTD", "OCI_INDEX", "OCI_MANIFEST", "READ_TIMEOUT",
    "SEED_DISK_PATH", "Credentials", "FlightRegistry", "PullResult", "PushResult", "Reference",
    "find_credentials", "is_loopback",
]


@dataclass(frozen=True)
class PullResult:
    digest: str  # store digest of the (uncompressed) qcow2
    manifest_digest: str
    bytes: int  # bytes received over the network
    seconds: float
    layout: str  # "flightvm" | "file" (a plain ORAS push of a qcow2) | "container"
    annotations: dict[str, str]


def titled_disk(layer: Mapping[str, Any]) -> bool:
    """A layer that names itself a qcow2 file (``org.opencontainers.image.title``
    ``*.qcow2``) and declares no compression: how ``oras push REF disk.qcow2`` (the
    oras CLI and oras-py) stores a file, whatever media type it gives it. Only a
    candidate: its content decides (:func:`.transfer.pull_titled_layer`)."""
    annotations = layer.get("annotations") or {}
    title = annotations.get(ANN_TITLE) if isinstance(annotations, Mapping) else None
    media_type = str(layer.get("mediaType", "")).lower()
    return (isinstance(title, str) and title.lower().endswith(".qcow2")
            and not any(z in media_type for z in ("gzip", "zstd", "bzip2", "xz")))


class FlightRegistry:
    """Streaming, verifying, time-bounded registry I/O for one repository.

    ``repository`` is ``host[:port]/repo`` (a tag or digest in it is ignored);
    ``options`` are :class:`~.client.Client`'s (``plain_http``, ``credentials``,
    timeouts, ``min_rate``, ``env_credentials``); ``ca`` defaults to
    ``$FLIGHTVM_REGISTRY_CA``. ``env_credentials=False`` keeps
    ``FLIGHTVM_REGISTRY_*`` credentials away from this host (they belong to the
    configured registry only). A pulled disk enters the store only after
    :func:`check_qcow2` (``plain=True``) passed on it.
    """

    def __init__(self, repository: str, *, ca: str | None = None, **options: Any) -> None:
        self.client = Client(repository, ca=ca or os.environ.get("FLIGHTVM_REGISTRY_CA") or None,
                             **options)
        self.ref = self.client.ref
        self.base = self.client.base
        self.prefix = self.client.prefix

    def __str__(self) -> str:
        return f"[flightvm-registry {self.ref.name}]"

    @property
    def credentials(self) -> Credentials | None:
        return self.client.auth.credentials

    @property
    def timeout(self) -> tuple[float, float]:
        return self.client.timeout

    def request(self, method: str, url: str, **kw: Any) -> requests.Response:
        """One request with timeouts and auth; failures become FlightVMErrors."""
        return self.client.request(method, url, **kw)

    # -- read side -------------------------------------------------------------

    def ping(self) -> None:
        self.client.ping()

    def tags(self) -> list[str]:
        return self.client.tags()

    def manifest_digest(self, reference: str) -> str | None:
        return self.client.manifest_digest(reference)

    def get_manifest_raw(
        self, reference: str, arch: str | None = None
    ) -> tuple[dict[str, Any], str]:
        return self.client.get_manifest(reference, arch)

    def blob_exists(self, digest: str) -> bool:
        return self.client.blob_exists(digest)

    def pull_disk(
        self,
        reference: str,
        store: Store,
        *,
        arch: str,
        key: str | None = None,
        pinned: bool = False,
        log: Log = nolog,
    ) -> PullResult:
        """Pull the qcow2 that ``reference`` (a tag or ``sha256:`` manifest digest) names,
        verify it while writing, and install it in ``store``.

        The disk is our layer (:data:`LAYER_MEDIA_TYPE`), else a layer titled ``*.qcow2``
        whose bytes start with the qcow2 magic (a plain ``oras push``), else the seed's
        container layout. ``pinned``: the user named this artifact (``--flightvm-image
        REF``, ``flightvm cache pull TAG``), so one with no arch annotation is taken,
        with one notice line. Raises ArtifactNotFound when the reference is missing,
        its arch annotation names another arch (or, unpinned, none), or (when ``key``
        is given) it was built from another key.
        """
        start = time.monotonic()
        manifest, manifest_digest = self.client.get_manifest(reference, arch)
        what = f"{self.ref.name}:{reference}"

        def check(candidate: Path) -> None:
            check_qcow2(candidate, what, error=NotQcow2Error, plain=True)

        layers = manifest["layers"]
        ours = [la for la in layers if la.get("mediaType", "").startswith(LAYER_MEDIA_TYPE)]
        titled = [] if ours else [la for la in layers if titled_disk(la)]
        disk_layer = (ours or titled or [None])[0]
        found: tuple[str, int] | None = None
        if disk_layer is not None:
            annotations = {**check_annotations(disk_layer.get("annotations"), what),
                           **check_annotations(manifest.get("annotations"), what)}
            art_arch = annotations.get(ANN_ARCH)
            if art_arch is None and pinned:
                log(f"flightvm: notice: {what} carries no {ANN_ARCH} annotation; "
                    f"using it as {arch} because it was pinned")
            elif art_arch != arch:
                raise ArtifactNotFound(
                    f"{what} is for arch {str(art_arch or 'unknown')[:40]}, not {arch}"
                )
            if key is not None and annotations.get(ANN_KEY) != key:
                raise ArtifactNotFound(
                    f"{what} was built from key {str(annotations.get(ANN_KEY))[:12]}, "
                    f"not {key[:12]}"
                )
            if ours:
                found = transfer.pull_layer(self.client, disk_layer, store, log, check)
                layout_name = "flightvm"
            else:
                found = transfer.pull_titled_layer(self.client, disk_layer, store, log, check,
                                                   QCOW2_MAGIC)
                layout_name = "file"
                if found is None:  # named *.qcow2, and it is not one (a tar would be odd too)
                    title = str((disk_layer.get("annotations") or {}).get(ANN_TITLE))[:80]
                    raise NotQcow2Error(
                        f"{what}: the layer titled {title!r} is not a qcow2 disk image (no "
                        "qcow2 magic); convert it with `qemu-img convert -O qcow2` and push "
                        "that")
        if found is not None:
            digest, moved = found
        else:
            annotations = check_annotations(manifest.get("annotations"), what)
            digest, moved = layout.pull_container(self.client, manifest, store, arch, what, log,
                                                  check)
            layout_name = "container"
        return PullResult(digest, manifest_digest, moved, time.monotonic() - start, layout_name,
                          annotations)

    # -- write side ------------------------------------------------------------

    def upload_stream(
        self, chunks: Iterable[bytes], *, length: int | None = None, expected: str | None = None
    ) -> tuple[str, int]:
        return transfer.upload_stream(self.client, chunks, length=length, expected=expected)

    def put_manifest(self, manifest: Mapping[str, Any], tag: str) -> str:
        return transfer.put_manifest(self.client, manifest, tag)

    def push_disk(self, path: Path, tags: Sequence[str], **options: Any) -> PushResult:
        """Push a qcow2 under ``tags``, streamed (options: :func:`.transfer.push_disk`'s
        ``arch``, ``key``, ``git_commit``, ``compress``, ``digest``, ``log``)."""
        return transfer.push_disk(self.client, path, tags, **options)

"""A bundle of named files as one OCI artifact: push them under a tag, pull them into a store.

What a booted state (``vm/stateshare.py``) travels as: an OCI image manifest whose
config is a small JSON document of the caller's (capped, digest-checked on the way
back) and whose layers are files, each titled (``org.opencontainers.image.title``)
and typed ``<media type>`` or ``<media type>+zstd``, annotated with the plain file's
digest and size like the base's disk layer. Push and pull are :mod:`.transfer`'s:
streamed, hashed while sent, verified against declared sizes and digests, zstd within
its declared size, each file vetted by the caller's ``check`` before the store
installs it. Nothing here knows what the files mean.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ArtifactNotFound, ConfigError, IntegrityError, RegistryError
from ..store import Store
from . import transfer
from .client import Client
from .documents import (
    ANN_ARCH,
    ANN_CREATED,
    ANN_DISK_DIGEST,
    ANN_DISK_SIZE,
    ANN_KEY,
    ANN_TITLE,
    OCI_MANIFEST,
    check_annotations,
    check_digest,
    parse_json,
)
from .streams import Log, Progress, file_chunks, nolog


@dataclass(frozen=True)
class BundleFile:
    """One file of a bundle: where it is, its title in the artifact, its media type."""

    path: Path
    title: str
    media_type: str  # "+zstd" is appended when pushed compressed
    digest: str | None = None  # sha256:<hex> of the file, when known (saves a pre-hash)


def push_bundle(client: Client, files: Sequence[BundleFile], config: Mapping[str, Any],
                *, config_media_type: str, tag: str, arch: str, key: str,
                compress: str = "none", log: Log = nolog) -> tuple[str, int, float]:
    """Push ``files`` and ``config`` as one artifact under ``tag``; returns (manifest
    digest, bytes sent, seconds)."""
    start = time.monotonic()
    layers = []
    sent = 0
    for f in files:
        size = f.path.stat().st_size
        digest = f.digest
        if digest is None:
            from ..key import file_sha256
            digest = "sha256:" + file_sha256(f.path)
        progress = Progress(f"pushing {f.title} to {client.ref.name}", size, log)
        if compress == "zstd":
            layer_digest, layer_size = transfer.upload_zstd(client, f.path, progress)
            sent += layer_size
            media_type = f.media_type + "+zstd"
        elif compress == "none":
            media_type = f.media_type
            layer_digest, layer_size = digest, size
            if not client.blob_exists(digest):
                _, moved = transfer.upload_stream(client, file_chunks(f.path, progress),
                                                  length=size, expected=digest)
                sent += moved
        else:
            raise ConfigError(f"unknown compression {compress!r}; use none or zstd")
        progress.finish()
        layers.append({"mediaType": media_type, "digest": layer_digest, "size": layer_size,
                       "annotations": {ANN_TITLE: f.title, ANN_DISK_DIGEST: digest,
                                       ANN_DISK_SIZE: str(size)}})
    body = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if not client.blob_exists(config_digest):
        transfer.upload_stream(client, [body], length=len(body), expected=config_digest)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_media_type, "digest": config_digest, "size": len(body)},
        "layers": layers,
        "annotations": {ANN_ARCH: arch, ANN_KEY: key, ANN_CREATED: created},
    }
    return transfer.put_manifest(client, manifest, tag), sent, time.monotonic() - start


@dataclass(frozen=True)
class PulledBundle:
    config: dict[str, Any]
    files: dict[str, str]  # title -> store digest (the plain file)
    bytes: int  # wire bytes received
    manifest_digest: str


def pull_bundle(client: Client, tag: str, store: Store, *, config_media_type: str,
                arch: str, key: str, wanted: Mapping[str, tuple[str, Callable[[Path], None]]],
                required: Sequence[str], log: Log = nolog,
                into: dict[str, str] | None = None) -> PulledBundle:
    """Pull the artifact ``tag`` names into ``store``: its config (``config_media_type``,
    a JSON object) and the layers titled as in ``wanted`` (title -> (media type, check)).
    ArtifactNotFound when the tag is missing or names another arch or key; a one-line
    RegistryError/IntegrityError when it is malformed, lacks a ``required`` title, or a
    file fails its digest, size or ``check``. Layers are pulled in manifest order; on an
    error, files already installed stay in the store with no name: ``into`` (title ->
    digest) is filled as each file is installed, so the caller can drop them."""
    what = f"{client.ref.name}:{tag}"
    manifest, manifest_digest = client.get_manifest(tag, arch)
    annotations = check_annotations(manifest.get("annotations"), what)
    if annotations.get(ANN_ARCH) != arch:
        raise ArtifactNotFound(f"{what} is for arch {str(annotations.get(ANN_ARCH))[:40]}, "
                               f"not {arch}")
    if annotations.get(ANN_KEY) != key:
        raise ArtifactNotFound(f"{what} was made for key {str(annotations.get(ANN_KEY))[:12]}, "
                               f"not {key[:12]}")
    config = manifest["config"]
    if config.get("mediaType") != config_media_type:
        raise RegistryError(f"{what}: its config is not a {config_media_type}; refused")
    config_digest = check_digest(config.get("digest"), f"{what} (config)")
    body = client.body(client.get_blob(config_digest), f"{what} (config)")
    if "sha256:" + hashlib.sha256(body).hexdigest() != config_digest:
        raise IntegrityError(f"{what}: its config does not match its digest")
    doc = parse_json(body, f"{what} (config)")
    titled: dict[str, Mapping[str, Any]] = {}
    for layer in manifest["layers"]:
        title = (layer.get("annotations") or {}).get(ANN_TITLE)
        if isinstance(title, str) and title in wanted:
            if title in titled:
                raise RegistryError(f"{what}: two layers titled {title!r}; refused")
            titled[title] = layer
    missing = [t for t in required if t not in titled]
    if missing:
        raise RegistryError(f"{what}: no layer titled {', '.join(missing)}; refused")
    moved = 0
    files: dict[str, str] = {} if into is None else into
    for title, layer in titled.items():
        media_type, check = wanted[title]
        digest, n = transfer.pull_layer(client, layer, store, log, check,
                                        media_types=(media_type, media_type + "+zstd"),
                                        label=f"pulling {title}")
        files[title] = digest
        moved += n
    return PulledBundle(doc, files, moved, manifest_digest)

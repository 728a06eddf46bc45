"""The seed's container layout: a docker or OCI image whose tar (or tar+gzip) layer
holds ``qcow2/disk.qcow2``, pulled into the store within bounds.

Bounds: the config is metadata (capped); a layer's wire bytes are its declared
size; gzip output stays within :func:`decompressed_budget` of that and is
produced one chunk at a time; the disk member must be a regular, non-sparse
file no larger than that budget; ``check`` vets it before the store installs it.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ...errors import ArtifactNotFound, IntegrityError, RegistryError
from ..store import Store
from .client import Client
from .documents import SEED_DISK_PATH, check_digest, parse_json
from .streams import (
    CHUNK,
    MAX_DISK,
    Budget,
    GunzipReader,
    HashingReader,
    Log,
    Progress,
    Readable,
    decompressed_budget,
)


def pull_container(client: Client, manifest: Mapping[str, Any], store: Store, arch: str,
                   what: str, log_fn: Log, check: Callable[[Path], None]) -> tuple[str, int]:
    """Find the disk in the image's layers (last first); returns (store digest, wire bytes)."""
    config = manifest.get("config") or {}
    moved = 0
    if config.get("digest"):
        digest = check_digest(config["digest"], f"{what} (config)")
        resp = client.get_blob(digest)
        body = client.body(resp, f"{what} (config)")
        moved += len(body)
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise IntegrityError(f"{what}: image config does not match its digest")
        image_arch = parse_json(body, f"{what} (config)").get("architecture")
        if image_arch and image_arch != arch:
            raise ArtifactNotFound(f"{what} is for arch {str(image_arch)[:40]}, not {arch}")
    for layer in reversed(manifest.get("layers") or []):
        media_type = str(layer.get("mediaType", ""))
        if "tar" not in media_type or "zstd" in media_type:
            continue
        found = _extract_from_layer(client, layer, "gzip" in media_type, store, log_fn, check)
        moved += found[1]
        if found[0]:
            return found[0], moved
    raise ArtifactNotFound(
        f"{what} is neither a flightvm artifact nor an image with /{SEED_DISK_PATH}"
    )


def _extract_from_layer(
    client: Client, layer: Mapping[str, Any], gz: bool, store: Store, log_fn: Log,
    check: Callable[[Path], None],
) -> tuple[str | None, int]:
    layer_digest, size = check_digest(layer["digest"], "layer"), int(layer["size"])
    what = f"layer {layer_digest[:19]} of {client.ref.name}"
    if size > MAX_DISK:
        raise RegistryError(f"{what} declares {size} bytes, more than {MAX_DISK >> 30} GiB; "
                            "refused")
    budget = Budget(decompressed_budget(size) if gz else size, lambda: RegistryError(
        f"{what} decompresses to more than {decompressed_budget(size)} bytes; refused"))
    progress = Progress("pulling base image (container layout)", size, log_fn)
    resp = client.get_blob(layer_digest)
    try:
        reader = HashingReader(client.bounded(resp, size, what), progress)
        source: Readable = GunzipReader(reader, budget) if gz else reader

        def check_wire() -> None:
            reader.drain()
            if "sha256:" + reader.hash.hexdigest() != layer_digest:
                raise IntegrityError(f"layer {layer_digest} of {client.ref.name} arrived corrupt")

        try:
            tar = tarfile.open(fileobj=source, mode="r|", bufsize=CHUNK)  # type: ignore[call-overload]
            for member in tar:
                name = member.name.lstrip("./").lstrip("/")
                if name != SEED_DISK_PATH:
                    continue
                if not member.isfile() or member.issparse():
                    raise RegistryError(f"{what}: /{SEED_DISK_PATH} is not a plain file "
                                        "(sparse, link or special); refused")
                if member.size > budget.limit:
                    raise RegistryError(f"{what}: /{SEED_DISK_PATH} declares {member.size} "
                                        f"bytes, more than {budget.limit}; refused")
                src = tar.extractfile(member)
                assert src is not None
                with store.writer(size=member.size, check=check) as w:
                    while chunk := src.read(CHUNK):
                        w.write(chunk)
                    check_wire()
                progress.finish()
                return w.digest, reader.bytes
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise IntegrityError(
                f"layer {layer_digest} of {client.ref.name} is not a readable tar ({exc})"
            ) from None
        check_wire()
        return None, reader.bytes
    finally:
        resp.close()

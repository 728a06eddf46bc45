"""The seed's container layout: a docker or OCI image whose tar (or tar+gzip) layer
holds ``qcow2/disk.qcow2``, pulled into the store."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Mapping
from typing import Any

from ...errors import ArtifactNotFound, IntegrityError
from ..store import Store
from .client import Client
from .documents import SEED_DISK_PATH
from .streams import CHUNK, HashingReader, Log, Progress


def pull_container(client: Client, manifest: Mapping[str, Any], store: Store, arch: str,
                   what: str, log_fn: Log) -> tuple[str, int]:
    """Find the disk in the image's layers (last first); returns (store digest, wire bytes)."""
    config = manifest.get("config") or {}
    moved = 0
    if config.get("digest"):
        resp = client.get_blob(str(config["digest"]))
        body = client.body(resp)
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
        found = _extract_from_layer(client, layer, gz, store, log_fn)
        moved += found[1]
        if found[0]:
            return found[0], moved
    raise ArtifactNotFound(
        f"{what} is neither a flightvm artifact nor an image with /{SEED_DISK_PATH}"
    )


def _extract_from_layer(
    client: Client, layer: Mapping[str, Any], gz: bool, store: Store, log_fn: Log
) -> tuple[str | None, int]:
    layer_digest, size = str(layer["digest"]), int(layer["size"])
    progress = Progress("pulling base image (container layout)", size, log_fn)
    resp = client.get_blob(layer_digest)
    try:
        reader = HashingReader(client.iter_body(resp), progress)

        def check() -> None:
            reader.drain()
            if "sha256:" + reader.hash.hexdigest() != layer_digest:
                raise IntegrityError(f"layer {layer_digest} of {client.ref.name} arrived corrupt")

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
                f"layer {layer_digest} of {client.ref.name} is not a readable tar ({exc})"
            ) from None
        check()
        return None, reader.bytes
    finally:
        resp.close()

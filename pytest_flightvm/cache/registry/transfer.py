"""Streamed, verified blob transfer: push a qcow2 (plain or zstd) and pull a flightvm layer.

Push streams the file (POST + one streamed PATCH + PUT ?digest=) and hashes it
while sending, so memory stays at one chunk for any size. Pull streams to disk
through the store's verifying writer, within the sizes and deadline the
manifest declares, so nothing unverified is ever installed under a digest.
zstd runs in-process through the ``zstandard`` package (bounded output per
read, no helper binary, no feeder threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError, FlightVMError, IntegrityError, RegistryError
from ..store import BlobWriter, Store
from .client import FINALIZE_TIMEOUT, Body, Client
from .documents import (
    ANN_DISK_DIGEST,
    ANN_DISK_SIZE,
    LAYER_MEDIA_TYPE,
    LAYER_MEDIA_TYPE_ZSTD,
    OCI_MANIFEST,
    check_digest,
    check_manifest,
    disk_manifest,
)
from .streams import (
    CHUNK,
    MAX_DISK,
    Budget,
    HashingReader,
    Log,
    Progress,
    SizedBody,
    decompressed_budget,
    file_chunks,
    nolog,
    threaded,
    zstd_chunks,
)


@dataclass(frozen=True)
class PushResult:
    manifest_digest: str
    bytes: int  # bytes sent (0 when the registry already had the blob)
    seconds: float
    tags: tuple[str, ...]


# -- pull ------------------------------------------------------------------------------


def copy_body(body: Body, w: BlobWriter, progress: Progress) -> None:
    """The rest of ``body`` into ``w``: spliced in the kernel where the body allows it
    (plain HTTP), else read into the writer's own buffers (one copy to the file)."""
    while n := (w.splice(body.splice) if body.spliceable else w.fill(body.readinto)):
        progress.update(n)


def pull_titled_layer(client: Client, layer: Mapping[str, Any], store: Store, log_fn: Log,
                      check: Callable[[Path], None], magic: bytes) -> tuple[str, int] | None:
    """Pull a layer that another client pushed as a plain file (``oras push REF
    disk.qcow2``: media type ``application/vnd.oci.image.layer.v1.tar``, titled
    ``disk.qcow2``, the bytes stored as they are) into ``store``.

    The title only nominates the layer; its content decides. The first bytes must be
    ``magic`` (else None: nothing is read further or stored), then the whole blob must
    match its declared size and digest and pass ``check`` before the store installs it.
    Returns (store digest, wire bytes).
    """
    what = f"layer of {client.ref.name}"
    digest, size = check_digest(layer["digest"], what), int(layer["size"])
    if size > MAX_DISK:
        raise RegistryError(f"{what} declares {size} bytes, more than {MAX_DISK >> 30} GiB; "
                            "refused")
    if store.has(digest):
        return digest, 0  # the same bytes, already vetted and stored
    resp = client.get_blob(digest)
    try:
        with client.stream(resp, size, f"blob {digest[:19]} of {client.ref.name}") as body:
            head = b""
            while len(head) < len(magic) and (more := body.read(len(magic) - len(head))):
                head += more
            if not head.startswith(magic):
                return None
            progress = Progress("pulling base image", size, log_fn)
            with store.writer(expected=digest, size=size, check=check) as w:
                w.write(head)
                progress.update(len(head))
                copy_body(body, w, progress)
        assert w.digest is not None
        progress.finish()
        return w.digest, w.bytes
    finally:
        resp.close()


def pull_layer(client: Client, layer: Mapping[str, Any], store: Store, log_fn: Log,
               check: Callable[[Path], None], *,
               media_types: tuple[str, str] = (LAYER_MEDIA_TYPE, LAYER_MEDIA_TYPE_ZSTD),
               label: str = "pulling base image") -> tuple[str, int]:
    """Pull a flightvm disk layer into ``store``; returns (store digest, wire bytes).

    The wire bytes must be the layer's declared size and digest; a zstd layer
    must decompress to exactly the disk size and digest its annotations
    declare (within :func:`decompressed_budget` of the wire size); ``check``
    vets the complete disk before the store installs it. ``media_types``: the
    plain and the zstd media type to accept (a booted state's files use their own).
    """
    what = f"layer of {client.ref.name}"
    media_type = str(layer["mediaType"])
    layer_digest, size = check_digest(layer["digest"], what), int(layer["size"])
    annotations = layer.get("annotations") or {}
    if size > MAX_DISK:
        raise RegistryError(f"{what} declares {size} bytes, more than {MAX_DISK >> 30} GiB; "
                            "refused")
    plain_type, zstd_type = media_types
    if media_type == plain_type:
        plain, plain_size = layer_digest, size
    elif media_type == zstd_type:
        plain = check_digest(annotations.get(ANN_DISK_DIGEST), f"{what} ({ANN_DISK_DIGEST})")
        text = annotations.get(ANN_DISK_SIZE, "")
        if not text.isdigit() or int(text) > decompressed_budget(size):
            raise RegistryError(f"{what}: {ANN_DISK_SIZE} {text[:20]!r} is not a size up to "
                                f"{decompressed_budget(size)} bytes; refused")
        plain_size = int(text)
    else:
        raise RegistryError(f"unsupported layer media type {media_type[:80]} in {client.ref.name}")
    if store.has(plain):
        return plain, 0  # same content already stored (another key or tag)
    progress = Progress(label, size, log_fn)
    resp = client.get_blob(layer_digest)
    try:
        body = client.stream(resp, size, f"blob {layer_digest[:19]} of {client.ref.name}")
        with body, store.writer(expected=plain, size=plain_size, check=check) as w:
            if media_type == plain_type:
                copy_body(body, w, progress)
                moved = w.bytes
            else:
                reader = HashingReader(threaded(body.chunks()), progress)
                budget = Budget(plain_size, lambda: RegistryError(
                    f"{what} decompresses to more than its declared {plain_size} bytes; refused"))
                try:
                    for chunk in zstd_chunks(reader, budget):
                        w.write(chunk)
                except OSError as exc:
                    raise IntegrityError(f"{what} could not be decompressed ({exc})") from None
                reader.drain()
                if "sha256:" + reader.hash.hexdigest() != layer_digest or reader.bytes != size:
                    raise IntegrityError(
                        f"layer {layer_digest} of {client.ref.name} arrived corrupt "
                        f"({reader.bytes} bytes, digest mismatch)"
                    )
                moved = reader.bytes
        assert w.digest is not None
        progress.finish()
        return w.digest, moved
    finally:
        resp.close()


# -- push ------------------------------------------------------------------------------


def upload_stream(
    client: Client, chunks: Iterable[bytes | memoryview], *, length: int | None = None,
    expected: str | None = None,
) -> tuple[str, int]:
    """Upload a blob from an iterable of chunks: POST, one streamed PATCH, PUT ?digest=.

    With ``expected`` the registry verifies the digest at the final PUT (a
    mismatch is an IntegrityError); without it the content is hashed while
    sending. Returns (digest, size). Memory stays at one chunk.
    """
    resp = client.request("POST", f"{client.base}/blobs/uploads/",
                          headers={"Content-Length": "0"})
    client.check(resp, f"upload to {client.ref.name}", ok=(202,))
    location = client.url(resp.headers.get("Location", ""))
    resp.close()
    hasher = hashlib.sha256()
    counted = [0]

    def body() -> Iterator[bytes | memoryview]:
        for chunk in chunks:
            if expected is None:  # else the registry checks ?digest= for us
                hasher.update(chunk)
            counted[0] += len(chunk)
            yield chunk

    try:
        data: Any = SizedBody(body(), length) if length is not None else body()
        resp = client.request(
            "PATCH", location, data=data, replayable=False,
            headers={"Content-Type": "application/octet-stream"},
        )
        client.check(resp, f"upload to {client.ref.name}", ok=(202,))
        location = client.url(resp.headers.get("Location", location))
        resp.close()
        digest = expected or "sha256:" + hasher.hexdigest()
        if length is not None and counted[0] != length:
            raise IntegrityError(f"read {counted[0]} bytes to push, expected {length}")
        sep = "&" if "?" in location else "?"
        resp = client.request(
            "PUT", f"{location}{sep}digest={digest}", headers={"Content-Length": "0"},
            timeout=(client.timeout[0], FINALIZE_TIMEOUT),
        )
        if resp.status_code == 400 and b"DIGEST_INVALID" in client.body(resp, "upload",
                                                                          cap=64 << 10):
            raise IntegrityError(
                f"the registry got content that does not match {digest}; the local file "
                "changed or is corrupt; not pushed"
            )
        client.check(resp, f"upload to {client.ref.name}", ok=(201, 204))
        resp.close()
        location = ""
        return digest, counted[0]
    finally:
        if location:  # cancel a half-done upload session (best effort)
            with contextlib.suppress(FlightVMError):
                client.request("DELETE", location).close()


def put_manifest(client: Client, manifest: Mapping[str, Any], tag: str) -> str:
    check_manifest(dict(manifest), f"manifest to push to {client.ref.name}:{tag}")
    body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    resp = client.request(
        "PUT", f"{client.base}/manifests/{tag}", data=body,
        headers={"Content-Type": str(manifest.get("mediaType", OCI_MANIFEST))},
    )
    client.check(resp, f"manifest {client.ref.name}:{tag}", ok=(201, 200))
    resp.close()
    return "sha256:" + hashlib.sha256(body).hexdigest()


def push_disk(
    client: Client,
    path: Path,
    tags: Sequence[str],
    *,
    arch: str,
    key: str | None = None,
    git_commit: str | None = None,
    compress: str = "none",
    digest: str | None = None,
    log: Log = nolog,
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
        from ..key import file_sha256
        digest = "sha256:" + file_sha256(path)
    progress = Progress(f"pushing base image to {client.ref.name}", size, log)
    sent = 0
    if compress == "zstd":
        layer_digest, layer_size = upload_zstd(client, path, progress)
        sent += layer_size
        media_type = LAYER_MEDIA_TYPE_ZSTD
    elif compress == "none":
        media_type = LAYER_MEDIA_TYPE
        layer_digest, layer_size = digest, size
        if not client.blob_exists(digest):
            _, sent = upload_stream(client, file_chunks(path, progress), length=size,
                                    expected=digest)
    else:
        raise ConfigError(f"unknown compression {compress!r}; use none or zstd")
    progress.finish()
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "flightvm": {"key": key, "disk": {"digest": digest, "size": size}},
    }, sort_keys=True, separators=(",", ":")).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    if not client.blob_exists(config_digest):
        upload_stream(client, [config], length=len(config), expected=config_digest)
    manifest = disk_manifest(arch=arch, key=key, git_commit=git_commit, digest=digest, size=size,
                             media_type=media_type, layer_digest=layer_digest,
                             layer_size=layer_size, config_digest=config_digest,
                             config_size=len(config))
    manifest_digest = ""
    for tag in tags:
        manifest_digest = put_manifest(client, manifest, tag)
    return PushResult(manifest_digest, sent, time.monotonic() - start, tuple(tags))


def upload_zstd(client: Client, path: Path, progress: Progress) -> tuple[str, int]:
    """Compress ``path`` in-process (zstandard: level 3, all cores, like ``zstd -3 -T0``)
    while uploading it; memory stays at a few chunks."""
    import zstandard

    size = path.stat().st_size
    compressor = zstandard.ZstdCompressor(level=3, threads=-1)

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            for chunk in compressor.read_to_iter(f, size=size, read_size=CHUNK,
                                                 write_size=CHUNK):
                progress.update(len(chunk))
                yield chunk

    try:
        return upload_stream(client, threaded(chunks()))
    except (OSError, zstandard.ZstdError) as exc:
        raise RegistryError(f"cannot compress {path} to push it: {exc}") from None

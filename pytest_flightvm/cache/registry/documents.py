"""Registry documents: media types, annotation names, and the checks a manifest passes.

The artifact flightvm pushes is an OCI image manifest whose single layer is the
qcow2 (:data:`LAYER_MEDIA_TYPE`, or ``+zstd`` when compressed), annotated with
the title, key, git commit, arch and creation time.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from ...errors import RegistryError

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
MAX_LAYERS = 1000
"""Most layers (or index entries) a manifest may list."""


DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def check_digest(value: object, what: str) -> str:
    """A ``sha256:<64 hex>`` string, or a one-line RegistryError (checked before any URL use)."""
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise RegistryError(f"{what}: {str(value)[:80]!r} is not a sha256 digest")
    return value


def check_reference(value: str, what: str) -> str:
    """A tag or a digest, safe to put after ``/manifests/``."""
    if value.startswith("sha256:"):
        return check_digest(value, what)
    if not TAG_RE.match(value):
        raise RegistryError(f"{what}: {value[:80]!r} is not a valid tag")
    return value


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    """A JSON object, or a one-line RegistryError."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise RegistryError(f"{what}: the registry answered something that is not JSON") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{what}: the registry answered JSON that is not an object")
    return data


def _size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_descriptor(d: object, what: str) -> dict[str, Any]:
    """A content descriptor: ``mediaType`` (str), ``digest`` (sha256), ``size`` (int >= 0),
    optional ``annotations`` (str -> str)."""
    if not isinstance(d, dict):
        raise RegistryError(f"{what}: a descriptor is not an object")
    if not isinstance(d.get("mediaType", ""), str):
        raise RegistryError(f"{what}: a descriptor's mediaType is not a string")
    check_digest(d.get("digest"), what)
    if not _size(d.get("size")):
        raise RegistryError(f"{what}: a descriptor's size is not a whole number >= 0")
    check_annotations(d.get("annotations"), what)
    return d


def check_annotations(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RegistryError(f"{what}: annotations are not a map of strings")
    return value


def check_manifest(manifest: dict[str, Any], what: str) -> dict[str, Any]:
    """RegistryError unless ``manifest`` is a well-formed schema-2 image manifest."""
    if manifest.get("schemaVersion") != 2:
        raise RegistryError(
            f"{what}: unsupported manifest (schema {str(manifest.get('schemaVersion'))[:20]})"
        )
    if not isinstance(manifest.get("mediaType", ""), str):
        raise RegistryError(f"{what}: the manifest's mediaType is not a string")
    check_descriptor(manifest.get("config"), what + " (config)")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise RegistryError(f"{what}: the manifest's layers are not a list of at most "
                            f"{MAX_LAYERS}")
    for layer in layers:
        check_descriptor(layer, what + " (layer)")
    check_annotations(manifest.get("annotations"), what)
    return manifest


def index_entries(index: dict[str, Any], what: str) -> list[dict[str, Any]]:
    """The entries of an image index, each a checked descriptor."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or len(entries) > MAX_LAYERS:
        raise RegistryError(f"{what}: the index's manifests are not a list")
    for entry in entries:
        check_descriptor(entry, what + " (index entry)")
        if not isinstance(entry.get("platform") or {}, dict):
            raise RegistryError(f"{what}: an index entry's platform is not an object")
    return entries


def disk_manifest(
    *, arch: str, key: str | None, git_commit: str | None, digest: str, size: int,
    media_type: str, layer_digest: str, layer_size: int, config_digest: str, config_size: int,
) -> dict[str, Any]:
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    annotations = {ANN_ARCH: arch, ANN_CREATED: created, ANN_CREATED_OCI: created}
    if key:
        annotations[ANN_KEY] = key
    if git_commit:
        annotations[ANN_GIT] = git_commit
        annotations[ANN_REVISION_OCI] = git_commit
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_size},
        "layers": [{
            "mediaType": media_type, "digest": layer_digest, "size": layer_size,
            "annotations": {ANN_TITLE: DISK_TITLE, ANN_DISK_DIGEST: digest,
                            ANN_DISK_SIZE: str(size)},
        }],
        "annotations": annotations,
    }

"""Registry documents: media types, annotation names, and the checks a manifest passes.

The artifact flightvm pushes is an OCI image manifest whose single layer is the
qcow2 (:data:`LAYER_MEDIA_TYPE`, or ``+zstd`` when compressed), annotated with
the title, key, git commit, arch and creation time.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import oras.schemas

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


def check_manifest(manifest: dict[str, Any], what: str) -> None:
    """RegistryError unless ``manifest`` is a schema-2 image manifest."""
    if manifest.get("schemaVersion") != 2:
        raise RegistryError(
            f"{what}: unsupported manifest (schema {manifest.get('schemaVersion')})"
        )
    try:
        jsonschema.validate(manifest, schema=oras.schemas.manifest)
    except jsonschema.ValidationError as exc:
        raise RegistryError(f"{what}: invalid manifest ({exc.message})") from None


def check_outgoing(manifest: dict[str, Any]) -> None:
    jsonschema.validate(manifest, schema=oras.schemas.manifest)

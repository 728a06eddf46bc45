"""Image cache: key -> local store -> OCI registry -> build (+ push).

A pytest-free library; ``plugin.py`` and ``cli.py`` use :func:`resolve_image`
and the helpers below.
"""

from __future__ import annotations

from .build import Builder, CommandBuilder, builder_for, default_builder
from .key import CacheKey, compute_key, git_commit, git_short, tags_for, tree_is_clean
from .qcow2 import check_qcow2
from .reference import Reference
from .resolve import (
    ResolvedImage,
    cache_image,
    list_images,
    pull_tag,
    push_file,
    resolve_image,
    run_id,
)
from .store import BlobWriter, Store, StoreEntry

__all__ = [
    "LAYER_MEDIA_TYPE",
    "LAYER_MEDIA_TYPE_ZSTD",
    "BlobWriter",
    "Builder",
    "CacheKey",
    "CommandBuilder",
    "Credentials",
    "FlightRegistry",
    "PullResult",
    "PushResult",
    "Reference",
    "ResolvedImage",
    "Store",
    "StoreEntry",
    "builder_for",
    "cache_image",
    "check_qcow2",
    "compute_key",
    "default_builder",
    "find_credentials",
    "git_commit",
    "git_short",
    "list_images",
    "pull_tag",
    "push_file",
    "resolve_image",
    "run_id",
    "tags_for",
    "tree_is_clean",
]

_REGISTRY_NAMES = {"LAYER_MEDIA_TYPE", "LAYER_MEDIA_TYPE_ZSTD", "Credentials", "FlightRegistry",
                   "PullResult", "PushResult", "find_credentials"}


def __getattr__(name: str) -> object:
    """The registry client (oras, requests) is imported only when first used."""
    if name in _REGISTRY_NAMES:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

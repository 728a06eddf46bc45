"""The cloud-init NoCloud seed: render the files, pack them into an ISO.

Typical use::

    files = render(SeedSpec(instance_id=..., hostname=..., mac=..., ssh_public_key=...))
    write_iso(files, run_dir / "seed.iso")
"""

from __future__ import annotations

from .iso import read_iso, write_iso
from .render import (
    SeedSpec,
    build_user_data,
    deep_merge,
    default_user_data,
    dump_cloud_config,
    load_cloud_init_dir,
    load_user_data,
    render,
)

__all__ = [
    "SeedSpec",
    "build_user_data",
    "deep_merge",
    "default_user_data",
    "dump_cloud_config",
    "load_cloud_init_dir",
    "load_user_data",
    "read_iso",
    "render",
    "write_iso",
]

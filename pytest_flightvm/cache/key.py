"""Cache key and tags.

The key is a sha256 over *content*: the builder identity, the bytes of every
file matched by ``flightvm_build_inputs`` (globs relative to the rootdir), the
target arch and :data:`FORMAT_VERSION`. Commits, mtimes and checkout location
do not enter it, so an unrelated commit keeps the key (and the cached image).

Git is only used for tags: ``<prefix>-<git short hash>`` and, from a clean
tree, ``<prefix>-latest``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FORMAT_VERSION = 1
"""Bump when the artifact layout changes, so old images stop matching."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class CacheKey:
    """``digest`` is the hex sha256 of ``parts`` (canonical JSON)."""

    digest: str
    parts: dict[str, Any] = field(compare=False, hash=False)

    @property
    def short(self) -> str:
        return self.digest[:12]

    def __str__(self) -> str:
        return self.digest


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _expand(pattern: str, rootdir: Path) -> list[Path]:
    expanded = os.path.expanduser(pattern)
    base = expanded if os.path.isabs(expanded) else str(rootdir / expanded)
    matches = [Path(m) for m in glob.glob(base, recursive=True)] if glob.has_magic(base) else (
        [Path(base)] if os.path.exists(base) else []
    )
    files: list[Path] = []
    for match in matches:
        if match.is_dir():
            files.extend(p for p in match.rglob("*") if p.is_file())
        elif match.is_file():
            files.append(match)
    return files


def _display(path: Path, rootdir: Path) -> str:
    try:
        return path.resolve().relative_to(rootdir.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def compute_key(
    builder_identity: str, build_inputs: Sequence[str], rootdir: Path, arch: str
) -> CacheKey:
    """Hash what determines the image. A pattern matching no file is a ConfigError."""
    inputs: dict[str, str] = {}
    for pattern in build_inputs:
        files = _expand(pattern, rootdir)
        if not files:
            raise ConfigError(
                f"flightvm_build_inputs: {pattern!r} matches no file under {rootdir}; "
                "fix the pattern or remove it"
            )
        for path in files:
            inputs[_display(path, rootdir)] = file_sha256(path)
    parts: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "builder": builder_identity,
        "arch": arch,
        "inputs": dict(sorted(inputs.items())),
    }
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return CacheKey(hashlib.sha256(canonical).hexdigest(), parts)


def _git(rootdir: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(rootdir), *args],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_short(rootdir: Path) -> str | None:
    """Short hash of HEAD, or None outside git (or in a repo without commits)."""
    out = _git(rootdir, "rev-parse", "--short", "HEAD")
    return (out.strip() or None) if out else None


def git_commit(rootdir: Path) -> str | None:
    """Full hash of HEAD, or None."""
    out = _git(rootdir, "rev-parse", "HEAD")
    return (out.strip() or None) if out else None


def tree_is_clean(rootdir: Path) -> bool:
    """True when git shows no staged, unstaged or untracked changes (False outside git)."""
    out = _git(rootdir, "status", "--porcelain", "--untracked-files=normal")
    return out is not None and out.strip() == ""


def key_tag(prefix: str, key: CacheKey | str, arch: str) -> str:
    """``<prefix>-<key12>-<arch>``: the tag a base is pulled by (no git involved)."""
    digest = key.digest if isinstance(key, CacheKey) else key
    return f"{prefix}-{digest[:12]}-{arch}"


def tags_for(prefix: str, key: CacheKey | str, arch: str, rootdir: Path) -> list[str]:
    """What a push uses: :func:`key_tag`; ``<prefix>-<gitshort>`` in git;
    ``<prefix>-latest`` only from a clean tree (two ``git`` runs)."""
    tags = [key_tag(prefix, key, arch)]
    short = git_short(rootdir)
    if short:
        tags.append(f"{prefix}-{short}")
        if tree_is_clean(rootdir):
            tags.append(f"{prefix}-latest")
    return tags

"""Resolve the base image: local store -> registry -> build (+ push).

All of it happens under one file lock per key, so N processes (pytest-xdist
workers) resolving the same key cause exactly one pull or build; the others
wait and then get a local hit on the same read-only store blob.

Decisions worth knowing:

* A local hit makes **no** registry request: the key is content-addressed, so
  a blob stored under it is authoritative.
* ``settings.rebuild`` ignores caches, but only once per run: a build made by
  the same run (same ``PYTEST_XDIST_TESTRUNUID``, or the same pid outside
  xdist) counts as a hit, so N workers still cause one build.
* A down, stalled or corrupt registry, or a missing artifact, falls back to a
  build with a one-line message; wrong credentials are an error (fix them).
* A failed push after a build is a one-line warning, not an error. The push
  happens after the lock is released, so waiting workers need not wait for it.
* ``settings.image`` pins the base: a local qcow2 path is copied into the
  store (once, while the file is unchanged); a registry reference is pulled
  (by digest: once; by tag: one HEAD request to notice a moved tag).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import Timeout

from ..buildgroup import GROUP_SUFFIX
from ..config import Settings
from ..errors import (
    ArtifactNotFound,
    BuildError,
    ConfigError,
    FlightVMError,
    RegistryAuthError,
    RegistryUnavailable,
    StoreUnusable,
)
from .build import Builder, builder_for
from .key import CacheKey, compute_key, git_commit, key_tag, tags_for
from .qcow2 import check_qcow2
from .reference import Reference, is_loopback

if TYPE_CHECKING:  # the registry client costs ~0.2 s to import; a local hit never needs it
    from .registry import FlightRegistry, PushResult
from .store import Store, StoreEntry

logger = logging.getLogger("flightvm.cache")
Log = Callable[[str], None]
SOURCES = ("local", "registry", "build")


def _default_log(msg: str) -> None:
    logger.info("%s", msg)


@dataclass(frozen=True)
class ResolvedImage:
    """The base image a run uses. ``path`` is the read-only store blob (never copied)."""

    path: Path
    digest: str  # sha256:<hex> of the qcow2
    key: str  # hex cache key ("" when pinned with settings.image)
    tags: tuple[str, ...]  # the key tag; after a build also the git tags a push uses
    source: str  # "local" | "registry" | "build"
    seconds: float
    bytes_moved: int  # bytes pulled, or pushed after a build (0 for a local hit)
    arch: str


def run_id() -> str:
    """The run a resolve belongs to when the caller names none (the CLI: one process);
    the plugin passes its run id, shared by all xdist workers of one pytest run."""
    return f"pid-{os.getpid()}"


@contextlib.contextmanager
def _locked(store: Store, name: str, log: Log, what: str) -> Iterator[None]:
    lock = store.lock(name)
    try:
        lock.acquire(timeout=2)
    except Timeout:
        log(f"flightvm: waiting for another process resolving {what}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _record(record: Path | None, image: ResolvedImage) -> None:
    if record is None:
        return
    line = json.dumps({
        "pid": os.getpid(), "source": image.source, "key": image.key, "digest": image.digest,
        "bytes": image.bytes_moved, "seconds": round(image.seconds, 4), "ts": time.time(),
    }) + "\n"
    record.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _call_build(builder: Builder, output: Path, log: Log, key: str) -> None:
    try:
        params = inspect.signature(builder.build).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    kwargs: dict[str, Any] = {"log": log}
    if "key" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["key"] = key
    # Builders without a ``key`` parameter can read it from $FLIGHTVM_KEY while they run.
    saved = os.environ.get("FLIGHTVM_KEY")
    os.environ["FLIGHTVM_KEY"] = key
    try:
        builder.build(output, **kwargs)
    except FlightVMError:
        raise
    except Exception as exc:
        raise BuildError(
            f"the builder {builder.identity!r} failed: {type(exc).__name__}: {exc}",
            detail=traceback.format_exc(),
        ) from None
    finally:
        # the builder has ended: its process-group note is no longer needed
        output.with_name(output.name + GROUP_SUFFIX).unlink(missing_ok=True)
        if saved is None:
            os.environ.pop("FLIGHTVM_KEY", None)
        else:
            os.environ["FLIGHTVM_KEY"] = saved


def resolve_image(
    settings: Settings,
    builder: Builder | None = None,
    *,
    record: Path | None = None,
    log: Log = _default_log,
    run: str | None = None,
) -> ResolvedImage:
    """Resolve the base image for ``settings`` (see the module docstring)."""
    start = time.monotonic()
    store = Store(settings.store_dir)
    if settings.image:
        image = _resolve_pinned(settings, store, log, start)
    else:
        image = _resolve_key(settings, store, builder, log, start, run or run_id())
    _record(record, image)
    return image


def push_compression(settings: Settings) -> str:
    """``auto`` picks from docs/BENCHMARKS.md: zstd moves 29% of the bytes for ~1.7 s of
    CPU per push+pull, a win on any link slower than ~1.7 Gbit/s; only loopback is faster."""
    if settings.compress != "auto":
        return settings.compress
    host = (settings.registry or "").split("/", 1)[0]
    return "none" if is_loopback(host) else "zstd"


def _registry(settings: Settings, repository: str | None = None) -> FlightRegistry | None:
    repo = repository or settings.registry
    if not repo or settings.offline:
        return None
    from .registry import FlightRegistry

    return FlightRegistry(repo, plain_http=settings.plain_http,
                          env_credentials=_configured_host(settings, repo))


def registry_for(settings: Settings) -> FlightRegistry | None:
    """The configured registry's client (None without one, or offline): the base's, which
    booted states (vm/stateshare.py) share."""
    return _registry(settings)


def _configured_host(settings: Settings, repository: str) -> bool:
    """Is ``repository`` on the configured registry's host (``--flightvm-registry``, or
    without one, the pinned ``--flightvm-image``'s)? Only that host gets the
    FLIGHTVM_REGISTRY_* credentials; any other uses the docker config."""
    from .registry.auth import same_host

    configured = (settings.registry or settings.image or "").split("/", 1)[0]
    return bool(configured) and same_host(repository.split("/", 1)[0], configured)


def current_key(settings: Settings, builder: Builder | None = None) -> CacheKey:
    """The cache key the settings resolve under (builder identity, inputs, arch)."""
    builder = builder or builder_for(settings.build_cmd, settings.rootdir, settings.build_timeout)
    return compute_key(builder.identity, settings.build_inputs, settings.rootdir, settings.arch)


def _resolve_key(
    settings: Settings, store: Store, builder: Builder | None, log: Log, start: float, run: str
) -> ResolvedImage:
    builder = builder or builder_for(settings.build_cmd, settings.rootdir, settings.build_timeout)
    key = current_key(settings, builder)
    # Resolving needs only the key tag; git's tags are for a push, after a build.
    tags: tuple[str, ...] = (key_tag(settings.tag_prefix, key, settings.arch),)
    ref_name = f"key/{key.digest}"

    def done(digest: str, source: str, moved: int,
             tags: tuple[str, ...] = tags) -> ResolvedImage:
        return ResolvedImage(store.blob_path(digest), digest, key.digest, tags, source,
                             time.monotonic() - start, moved, settings.arch)

    with _locked(store, f"key-{key.digest}", log, f"base image {key.short}"):
        info = store.ref_info(ref_name)
        fresh = info is not None and info.get("source") == "build" and info.get("run") == run
        if info is not None and (not settings.rebuild or fresh):
            if store.has(info["digest"]):
                return done(info["digest"], "local", 0)
            log(f"flightvm: the stored base image {info['digest'][:19]} is damaged or gone; "
                "fetching it again")
            store.delete_ref(ref_name)

        registry = _registry(settings)
        if registry is not None and not settings.rebuild:
            try:
                pulled = registry.pull_disk(tags[0], store, arch=settings.arch, key=key.digest,
                                            log=log)
            except (RegistryAuthError, StoreUnusable):
                raise  # a build cannot help: wrong credentials, or no room in the store
            except ArtifactNotFound as exc:
                log(f"flightvm: no cached base image in the registry ({exc}); building it")
            except RegistryUnavailable as exc:
                log(f"flightvm: warning: {exc}; building the base image locally")
                registry = None
            except FlightVMError as exc:
                log(f"flightvm: warning: registry pull failed ({exc}); building locally")
            else:
                store.set_ref(ref_name, pulled.digest, source="registry", run=run,
                              manifest=pulled.manifest_digest, tags=list(tags), parts=key.parts)
                return done(pulled.digest, "registry", pulled.bytes)

        digest = _build(store, builder, key, log)
        tags = tuple(tags_for(settings.tag_prefix, key, settings.arch, settings.rootdir))
        store.set_ref(ref_name, digest, source="build", run=run, tags=list(tags),
                      builder=builder.identity, parts=key.parts)
    # Push outside the lock: the other workers can use the stored image meanwhile.
    moved = 0
    if settings.push and registry is not None:
        result = _try_push(registry, store, digest, tags, key, settings, log)
        moved = result.bytes if result else 0
    return done(digest, "build", moved, tags)


def _build(store: Store, builder: Builder, key: CacheKey, log: Log) -> str:
    out = store.tmp_path(".qcow2")
    log(f"flightvm: building the base image (key {key.short}) with {builder.identity[:80]}")
    started = time.monotonic()
    try:
        _call_build(builder, out, log, key.digest)
        check_qcow2(out, f"the builder {builder.identity[:60]!r}")
        digest = store.import_file(out, move=True)
    finally:
        with contextlib.suppress(OSError):
            out.unlink()
    log(f"flightvm: built the base image {digest[:19]} in {time.monotonic() - started:.0f} s")
    return digest


def _try_push(
    registry: FlightRegistry, store: Store, digest: str, tags: Sequence[str], key: CacheKey,
    settings: Settings, log: Log,
) -> PushResult | None:
    try:
        result = registry.push_disk(
            store.blob_path(digest), tags, arch=settings.arch, key=key.digest,
            git_commit=git_commit(settings.rootdir), compress=push_compression(settings), digest=digest,
            log=log,
        )
    except FlightVMError as exc:
        log(f"flightvm: warning: pushing the base image failed ({exc}); the local copy is used")
        return None
    log(f"flightvm: pushed the base image to {registry.ref.name} as {', '.join(tags)}")
    return result


# -- pinned images -----------------------------------------------------------------


def _looks_like_path(image: str, rootdir: Path) -> Path | None:
    candidate = Path(os.path.expanduser(image))
    if not candidate.is_absolute():
        candidate = rootdir / candidate
    if candidate.exists():
        return candidate
    if image.startswith(("/", "./", "../", "~")) or image.endswith((".qcow2", ".img")):
        raise ConfigError(f"--flightvm-image {image}: no such file")
    return None


def _resolve_pinned(settings: Settings, store: Store, log: Log, start: float) -> ResolvedImage:
    image = settings.image
    assert image
    path = _looks_like_path(image, settings.rootdir)
    if path is not None:
        return _pinned_path(settings, store, path, log, start)
    ref = Reference.parse(image, "--flightvm-image")
    if not (ref.tag or ref.digest):
        raise ConfigError(f"--flightvm-image {image}: give a tag or @sha256 digest")
    return _pinned_ref(settings, store, ref, log, start)


def _pinned_path(
    settings: Settings, store: Store, path: Path, log: Log, start: float
) -> ResolvedImage:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"--flightvm-image {path}: not a file")
    ref_name = "path/" + hashlib.sha256(str(path).encode()).hexdigest()[:32]
    with _locked(store, ref_name.replace("/", "-"), log, str(path)):
        st = path.stat()
        fingerprint = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        info = store.ref_info(ref_name)
        if info and info.get("src") == fingerprint and store.has(info["digest"]):
            digest = str(info["digest"])
        else:
            try:
                check_qcow2(path, f"--flightvm-image {path}", plain=True)
            except BuildError as exc:
                raise ConfigError(str(exc)) from None
            digest = store.import_file(path)
            store.set_ref(ref_name, digest, src=fingerprint, path=str(path))
    return ResolvedImage(store.blob_path(digest), digest, "", (str(path),), "local",
                         time.monotonic() - start, 0, settings.arch)


def _pin_ref_name(ref: Reference, arch: str) -> str:
    raw = f"pin/{arch}/{ref.host}/{ref.repository}/{ref.digest or ref.tag}"
    return re.sub(r"[^A-Za-z0-9_.:@+/-]", "_", raw)


def _pinned_ref(
    settings: Settings, store: Store, ref: Reference, log: Log, start: float
) -> ResolvedImage:
    ref_name = _pin_ref_name(ref, settings.arch)  # per arch: never hand out another arch's copy

    def done(digest: str, source: str, moved: int) -> ResolvedImage:
        return ResolvedImage(store.blob_path(digest), digest, "", (str(ref),), source,
                             time.monotonic() - start, moved, settings.arch)

    with _locked(store, "pin-" + hashlib.sha256(str(ref).encode()).hexdigest()[:32], log,
                 str(ref)):
        info = store.ref_info(ref_name)
        local = info if info and store.has(info["digest"]) else None
        if local and ref.digest:
            return done(local["digest"], "local", 0)
        if settings.offline:
            if local:
                return done(local["digest"], "local", 0)
            raise ConfigError(f"--flightvm-image {ref}: not in the local store and offline")
        from .registry import FlightRegistry

        registry = FlightRegistry(ref.name, plain_http=settings.plain_http,
                                  env_credentials=_configured_host(settings, ref.name))
        if local:
            try:
                current = registry.manifest_digest(ref.reference)
            except RegistryUnavailable as exc:
                log(f"flightvm: warning: {exc}; using the stored copy of {ref}")
                return done(local["digest"], "local", 0)
            if current and current == local.get("manifest"):
                return done(local["digest"], "local", 0)
        pulled = registry.pull_disk(ref.reference, store, arch=settings.arch, pinned=True,
                                    log=log)
        store.set_ref(ref_name, pulled.digest, manifest=pulled.manifest_digest, source="registry")
        return done(pulled.digest, "registry", pulled.bytes)


# -- helpers for the CLI ------------------------------------------------------------------


def pull_tag(
    settings: Settings, tag: str | None = None, *, log: Log = _default_log,
    record: Path | None = None,
) -> ResolvedImage:
    """``flightvm cache pull [TAG]``: pull ``<registry>:<tag>`` (default
    ``<prefix>-latest``; flightvm artifact or seed container layout) into the store."""
    if not settings.registry:
        raise ConfigError("no registry configured; set --registry or FLIGHTVM_REGISTRY")
    base = Reference.parse(settings.registry, "registry")
    tag = tag or f"{settings.tag_prefix}-latest"
    ref = Reference(base.host, base.repository, None if tag.startswith("sha256:") else tag,
                    tag if tag.startswith("sha256:") else None)
    store = Store(settings.store_dir)
    if settings.offline:  # never contact the registry: only what an earlier pull stored
        info = store.ref_info(_pin_ref_name(ref, settings.arch))
        if not (info and store.has(info["digest"])):
            raise ConfigError(f"{ref} is not in the local store, and --flightvm-offline "
                              "forbids contacting the registry; drop --flightvm-offline to pull it")
        image = ResolvedImage(store.blob_path(info["digest"]), info["digest"], "", (str(ref),),
                              "local", 0.0, 0, settings.arch)
    else:
        image = _pinned_ref(settings, store, ref, log, time.monotonic())
    Store(settings.store_dir).set_ref(f"tag/{_safe(tag)}", image.digest, ref=str(ref))
    _record(record, image)
    return image


def _refuse_offline(settings: Settings, what: str) -> None:
    if settings.offline:
        raise ConfigError(f"--flightvm-offline forbids contacting the registry, and {what} "
                          "needs it; drop --flightvm-offline (or unset FLIGHTVM_OFFLINE)")


def push_file(
    settings: Settings, path: Path, tags: Sequence[str], *, key: str | None = None,
    log: Log = _default_log,
) -> PushResult:
    """``flightvm cache push FILE [TAG...]``: push a qcow2 as an OCI artifact."""
    _refuse_offline(settings, "push")
    registry = _registry(settings)
    if registry is None:
        raise ConfigError("no registry configured; set --registry or FLIGHTVM_REGISTRY")
    try:
        check_qcow2(Path(path), str(path), plain=True)
    except BuildError as exc:
        raise ConfigError(str(exc)) from None
    tags = list(tags) or [f"{settings.tag_prefix}-latest"]
    return registry.push_disk(Path(path), tags, arch=settings.arch, key=key,
                              git_commit=git_commit(settings.rootdir),
                              compress=push_compression(settings), log=log)


def cache_image(
    settings: Settings, file: Path | None = None, builder: Builder | None = None, *,
    log: Log = _default_log,
) -> tuple[ResolvedImage, PushResult]:
    """``flightvm cache cache [FILE]``: push the base under ``<prefix>-<key>-<arch>``,
    ``<prefix>-<git short>`` and, from a clean tree, ``<prefix>-latest``. Without FILE the
    base is resolved first (local store, else build)."""
    _refuse_offline(settings, "push")
    registry = _registry(settings)
    if registry is None:
        raise ConfigError("no registry configured; set --registry or FLIGHTVM_REGISTRY")
    builder = builder or builder_for(settings.build_cmd, settings.rootdir, settings.build_timeout)
    start = time.monotonic()
    store = Store(settings.store_dir)
    key = current_key(settings, builder)
    tags = tuple(tags_for(settings.tag_prefix, key, settings.arch, settings.rootdir))
    if file is not None:
        try:
            check_qcow2(Path(file), str(file), plain=True)
        except BuildError as exc:
            raise ConfigError(str(exc)) from None
        with _locked(store, f"key-{key.digest}", log, f"base image {key.short}"):
            digest = store.import_file(Path(file))
            store.set_ref(f"key/{key.digest}", digest, source="import", tags=list(tags))
        image = ResolvedImage(store.blob_path(digest), digest, key.digest, tags, "local",
                              time.monotonic() - start, 0, settings.arch)
    else:
        image = resolve_image(settings.replace(push=False, offline=True), builder, log=log)
    result = registry.push_disk(image.path, tags, arch=settings.arch, key=key.digest,
                                git_commit=git_commit(settings.rootdir),
                                compress=push_compression(settings), digest=image.digest, log=log)
    return image, result


def list_images(settings: Settings) -> tuple[list[StoreEntry], list[str] | None]:
    """``flightvm cache ls``: local store entries, and registry tags (None offline/unset)."""
    store = Store(settings.store_dir)
    registry = _registry(settings)
    return store.ls(), (registry.tags() if registry else None)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:@+-]", "_", name)

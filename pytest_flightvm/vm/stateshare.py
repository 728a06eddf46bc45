"""Booted states in the registry: push a published state, pull one on a miss, vetted before use.

Opt-in (``--flightvm-state-cache registry``): restoring a state makes QEMU, as root,
parse a migration stream, and QEMU does not treat that stream as a security boundary;
only a registry you would let run code on this host should serve states. Around that
stream, everything else is ours or checked (issue 14: registry content is untrusted):

- **What goes out** (:func:`outgoing`): the state's three store blobs (save file,
  frozen overlay, NVRAM) and a config of the whitelisted :data:`META_FIELDS`; never a
  file of a VM dir or the run's SSH dir, never anything holding ``PRIVATE KEY``
  (:func:`no_private_key`). The guest's own memory and disk go out, as the base's disk
  does: they hold the guest's host key, which pullers pin.
- **What comes in** (:meth:`StateShare.pull`): the artifact for the key's tag, made for
  this arch and key, transferred by :mod:`..cache.registry.bundle` (streamed, sized,
  digests verified), then: the metadata checked field by field (:func:`check_meta`);
  the save file's domain XML **replaced** by one built from our own ``DomainSpec``
  (the saved one, which names the emulator, devices and files, is never used), its
  header otherwise checked (uncompressed, a cookie of known shape, QEMU's stream
  magic); the overlay made an overlay of our local base and nothing else
  (:func:`..cache.qcow2.check_overlay`); the NVRAM a plain file of the firmware's
  size. Only then is the state installed, under the key's lock, with its ref written
  last, so workers pulling together cause one transfer and a killed pull leaves
  nothing that restores. Any failure is one warning line and a boot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import Timeout

from ..cache.qcow2 import check_overlay
from ..errors import ArtifactNotFound, CacheError, FlightVMError, StateRefused
from .domain import vm_name_problem
from .savefile import read_header, rewrite_in_place, write_retargeted
from .statecache import LOCK_SECONDS, STATE_FORMAT, SavedState, StateCache

if TYPE_CHECKING:
    from ..cache.registry import FlightRegistry
    from ..cache.registry.bundle import BundleFile
    from ..config import Settings

log = logging.getLogger("flightvm")

SAVE_TITLE, DISK_TITLE, NVRAM_TITLE = "state.sav", "disk.qcow2", "nvram.fd"
# DESIGN.md's names: the artifact (its config) is a ``state.v1``; the frozen overlay is a
# disk like the base (``disk.qcow2``); the save file and the NVRAM are the state's own.
CONFIG_MEDIA_TYPE = "application/vnd.flightvm.state.v1"
SAVE_MEDIA_TYPE = "application/vnd.flightvm.state.v1.save"
OVERLAY_MEDIA_TYPE = "application/vnd.flightvm.disk.qcow2"
NVRAM_MEDIA_TYPE = "application/vnd.flightvm.state.v1.nvram"
META_FIELDS = ("mac", "host_keys", "origin", "has_cloud_init", "accel")
"""The metadata a state carries to the registry; nothing else of its manifest goes out."""

_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
_HOST_KEY_RE = re.compile(r"^(?:ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)) "
                          r"[A-Za-z0-9+/]{16,2048}={0,3}$")
_COOKIE_CHILDREN = {"cpu", "slirpHelper"}  # libvirt 9.0's save cookie holds no more
_STREAM_MAGIC = b"QEVM"
PUSH_WAIT = 900.0  # the session's end waits this long for a state push still running


def state_tag(prefix: str, key: str) -> str:
    """The registry tag of the state for ``key``: ``<prefix>-state-<key[:40]>``."""
    return f"{prefix[:80]}-state-{key[:40]}"


@dataclass(frozen=True)
class StateVetting:
    """What a pulled state is checked against, from the factory that would restore it."""

    base: Path  # our local base blob: the pulled overlay is rebased onto it
    nvram_size: int | None  # the firmware's variable store size (None: BIOS, no NVRAM)
    domain_xml: Callable[[dict[str, Any]], str]  # our DomainSpec's XML for checked metadata


def check_meta(doc: Any, key: str) -> dict[str, Any]:
    """The metadata of a pulled state's config, each field checked; StateRefused (one
    line) otherwise. The MAC goes into QEMU's command line, the host keys into a
    known_hosts file, the origin into a hostname: none may carry anything else."""
    if not isinstance(doc, dict):
        raise StateRefused("the state's config is not an object; refused")
    if doc.get("format") != STATE_FORMAT or doc.get("key") != key:
        raise StateRefused(f"the state's config is for format {str(doc.get('format'))[:10]} "
                           f"and key {str(doc.get('key'))[:12]}, not {STATE_FORMAT} and "
                           f"{key[:12]}; refused")
    mac, keys, origin = doc.get("mac"), doc.get("host_keys"), doc.get("origin")
    if not isinstance(mac, str) or not _MAC_RE.match(mac):
        raise StateRefused(f"the state's MAC {str(mac)[:40]!r} is not a MAC address; refused")
    if (not isinstance(keys, list) or len(keys) > 8
            or not all(isinstance(k, str) and _HOST_KEY_RE.match(k) for k in keys)):
        raise StateRefused("the state's host keys are not a short list of public SSH keys; "
                           "refused")
    if not isinstance(origin, str) or vm_name_problem(origin) is not None:
        raise StateRefused(f"the state's origin {str(origin)[:60]!r} is not a VM name; refused")
    if doc.get("has_cloud_init") not in (True, False, None):
        raise StateRefused("the state's has_cloud_init is not true, false or null; refused")
    if doc.get("accel") not in ("tcg", "kvm"):
        raise StateRefused(f"the state's accel {str(doc.get('accel'))[:20]!r} is not tcg or "
                           "kvm; refused")
    return {"mac": mac, "host_keys": list(keys), "origin": origin,
            "has_cloud_init": doc.get("has_cloud_init"), "accel": doc["accel"]}


def no_private_key(config: dict[str, Any], files: list[Path], blobs: Path) -> None:
    """FlightVMError unless what a push sends holds no private key: the config has no
    ``PRIVATE KEY`` text and every file is a blob of the state store (``blobs``), none
    of which starts like a key file."""
    if "PRIVATE KEY" in json.dumps(config) or "BEGIN OPENSSH" in json.dumps(config):
        raise FlightVMError("the state's metadata holds a private key; not pushed")
    for path in files:
        if path.resolve().parent != blobs.resolve():
            raise FlightVMError(f"{path} is not a state store blob; not pushed")
        with open(path, "rb") as f:
            head = f.read(64)
        if head.startswith((b"-----BEGIN", b"openssh-key-v1")) or b"PRIVATE KEY" in head:
            raise FlightVMError(f"{path} looks like a key file; not pushed")


def outgoing(states: StateCache, key: str) -> tuple[list[BundleFile], dict[str, Any]]:
    """The files and config a push of ``key``'s state sends (checked: :func:`no_private_key`)."""
    from ..cache.registry.bundle import BundleFile

    manifest = states.manifest(key)
    if manifest is None:
        raise FlightVMError(f"no saved state {key[:12]} to push")
    config = {"format": STATE_FORMAT, "key": key, **{k: manifest.get(k) for k in META_FIELDS}}
    check_meta(config, key)
    files = [BundleFile(states.store.blob_path(manifest["state"]), SAVE_TITLE, SAVE_MEDIA_TYPE,
                        manifest["state"]),
             BundleFile(states.store.blob_path(manifest["disk"]), DISK_TITLE,
                        OVERLAY_MEDIA_TYPE, manifest["disk"])]
    if isinstance(manifest.get("nvram"), str):
        files.append(BundleFile(states.store.blob_path(manifest["nvram"]), NVRAM_TITLE,
                                NVRAM_MEDIA_TYPE, manifest["nvram"]))
    no_private_key(config, [f.path for f in files], states.store.root / "blobs" / "sha256")
    return files, config


def check_save_head(path: Path) -> None:
    """StateRefused unless ``path`` has a libvirt save header we can use (before install)."""
    try:
        header = read_header(path)
    except FlightVMError as exc:
        raise StateRefused(f"the state's save file: {exc}") from None
    if header.compressed != 0 or header.was_running not in (0, 1):
        raise StateRefused(f"the state's save file is compressed ({header.compressed}) or "
                           "odd; refused")
    if header.cookie:
        try:
            cookie = ET.fromstring(header.cookie.rstrip(b"\0"))
        except ET.ParseError:
            raise StateRefused("the state's save cookie does not parse; refused") from None
        if cookie.tag != "cookie" or {c.tag for c in cookie} - _COOKIE_CHILDREN:
            raise StateRefused("the state's save cookie holds more than a CPU definition "
                               "and a slirp flag; refused")
    with open(path, "rb") as f:
        f.seek(header.stream_offset)
        if f.read(len(_STREAM_MAGIC)) != _STREAM_MAGIC:
            raise StateRefused("the state's save file holds no QEMU stream; refused")


def rebuild_save_file(src: Path, dest: Path, xml: str, *, move: bool = False) -> None:
    """``src`` at ``dest`` with ``xml`` (ours) as its domain XML; StateRefused when the
    header is unusable or ``xml`` does not fit its XML region. ``move``: ``src`` is ours
    to take (renamed to ``dest`` and rewritten in place: QEMU's stream is not copied)."""
    check_save_head(src)
    try:
        if move:
            os.replace(src, dest)
            dest.chmod(0o600)
            rewrite_in_place(dest, xml)
        else:
            write_retargeted(src, dest, xml)
    except FlightVMError as exc:
        raise StateRefused(f"the state's save file: {exc}; refused") from None


class StateShare:
    """Push and pull the booted states of one cache dir through one registry repository."""

    def __init__(self, registry: Callable[[], FlightRegistry], *, prefix: str, arch: str,
                 compress: str, push: bool, notice: Callable[[str], None]) -> None:
        self._make_registry = registry
        self._registry: FlightRegistry | None = None
        self.prefix, self.arch, self.compress, self.push_enabled = prefix, arch, compress, push
        self.notice = notice
        self.pulls: list[dict[str, Any]] = []  # figures: bytes, seconds per pull
        self._pushes: list[tuple[threading.Thread, list[str]]] = []

    @classmethod
    def for_settings(cls, settings: Settings, notice: Callable[[str], None]) -> StateShare | None:
        """The share ``--flightvm-state-cache registry`` asks for (None without a registry,
        offline, or in another mode). Pushes follow the base's rule (``--flightvm-push``)."""
        if settings.state_cache != "registry" or not settings.registry or settings.offline:
            return None
        from ..cache.resolve import push_compression, registry_for

        def make() -> FlightRegistry:
            registry = registry_for(settings)
            assert registry is not None
            return registry

        return cls(make, prefix=settings.tag_prefix, arch=settings.arch,
                   compress=push_compression(settings), push=settings.push, notice=notice)

    @property
    def registry(self) -> FlightRegistry:
        if self._registry is None:
            self._registry = self._make_registry()
        return self._registry

    def push(self, states: StateCache, key: str, *,
             notice: Callable[[str], None] | None = None) -> None:
        """Push ``key``'s state (when pushes are on); a failure is one warning line. The
        manifest goes last, so a push cut short leaves no tag: nothing partial is pulled."""
        if not self.push_enabled:
            return
        from ..cache.registry.bundle import push_bundle

        notice = notice or self.notice
        tag = state_tag(self.prefix, key)
        try:
            files, config = outgoing(states, key)
            registry = self._make_registry()  # its own session: this may run in a thread
            _digest, sent, seconds = push_bundle(
                registry.client, files, config, config_media_type=CONFIG_MEDIA_TYPE,
                tag=tag, arch=self.arch, key=key, compress=self.compress)
        except (FlightVMError, OSError) as exc:
            notice(f"flightvm: warning: pushing the booted state {key[:12]} failed ({exc}); "
                   "the local copy is used")
            return
        notice(f"flightvm: pushed the booted state {key[:12]} to {registry.ref.name} "
               f"as {tag} ({sent >> 20} MiB in {seconds:.1f} s)")

    def push_soon(self, states: StateCache, key: str) -> None:
        """:meth:`push` in a thread of its own, so the tests go on meanwhile (a push to a
        remote registry takes seconds to minutes); its lines are printed by :meth:`wait`
        (a thread must not print through pytest's capture while a test runs)."""
        if not self.push_enabled:
            return
        lines: list[str] = []
        thread = threading.Thread(target=self.push, args=(states, key),
                                  kwargs={"notice": lines.append},
                                  name=f"flightvm-state-push-{key[:8]}", daemon=True)
        thread.start()
        self._pushes.append((thread, lines))

    def wait(self, timeout: float = PUSH_WAIT) -> None:
        """Wait for the pushes :meth:`push_soon` started (at most ``timeout`` seconds
        each), then print their lines; one still running is left, with one line."""
        pushes, self._pushes = self._pushes, []
        for thread, lines in pushes:
            thread.join(timeout)
            for line in lines:
                self.notice(line)
            if thread.is_alive():
                self.notice(f"flightvm: warning: a booted state push still runs after "
                            f"{timeout:.0f} s; left (without its manifest no tag names it)")

    def pull(self, states: StateCache, key: str, vet: StateVetting) -> SavedState | None:
        """The state for ``key`` from the registry, vetted and installed in ``states``
        (under the key's lock: one transfer however many workers miss at once); None when
        the registry has none or it fails a check (one warning line)."""
        try:
            lock = states.store.lock(f"state-{key}")
            with lock.acquire(timeout=LOCK_SECONDS):
                saved = states.lookup(key)  # another worker may have pulled it meanwhile
                if saved is not None:
                    return saved
                self._pull(states, key, vet)
                return states.lookup(key)
        except Timeout:
            self.notice(f"flightvm: the state lock for {key[:12]} stayed taken for "
                        f"{LOCK_SECONDS:.0f}s; booting")
        except ArtifactNotFound as exc:
            log.info("flightvm: no booted state in the registry (%s)", exc)
        except (FlightVMError, OSError) as exc:
            self.notice(f"flightvm: warning: the booted state {key[:12]} from the registry "
                        f"is not used ({exc}); booting")
        return None

    def _pull(self, states: StateCache, key: str, vet: StateVetting) -> None:
        from ..cache.registry.bundle import pull_bundle

        start = time.monotonic()
        store = states.store
        tag = state_tag(self.prefix, key)
        wanted: dict[str, tuple[str, Callable[[Path], None]]] = {
            SAVE_TITLE: (SAVE_MEDIA_TYPE, check_save_head),
            DISK_TITLE: (OVERLAY_MEDIA_TYPE, lambda _p: None),  # vetted on a copy below
        }
        if vet.nvram_size is not None:
            wanted[NVRAM_TITLE] = (NVRAM_MEDIA_TYPE, lambda p: _check_nvram(p, vet.nvram_size))
        got: dict[str, str] = {}  # title -> digest of what pull_bundle installed so far
        tmps: list[Path] = []
        kept: set[str] = set()
        try:
            pulled = pull_bundle(self.registry.client, tag, store,
                                 config_media_type=CONFIG_MEDIA_TYPE, arch=self.arch, key=key,
                                 wanted=wanted, required=list(wanted), into=got)
            meta = check_meta(pulled.config, key)
            state_tmp = store.tmp_path(".state")
            tmps.append(state_tmp)
            raw = pulled.files[SAVE_TITLE]
            # the pulled save file is taken out of the store and rewritten in place (saves
            # copying ~300 MiB), unless a state of ours names the same bytes
            take = raw not in states.in_use()
            rebuild_save_file(store.blob_path(raw), state_tmp, vet.domain_xml(meta), move=take)
            if take:
                store.remove(raw)  # its record; the file is state_tmp now
            disk_tmp = store.tmp_path(".qcow2")
            tmps.append(disk_tmp)
            shutil.copyfile(store.blob_path(pulled.files[DISK_TITLE]), disk_tmp)
            disk_tmp.chmod(0o600)
            check_overlay(disk_tmp, vet.base, f"the frozen disk of state {key[:12]}",
                          error=StateRefused)
            state = store.import_file(state_tmp, move=True)
            disk = store.import_file(disk_tmp, move=True)
            nvram = pulled.files.get(NVRAM_TITLE)
            if nvram is not None:  # also when the store had these bytes already
                _check_nvram(store.blob_path(nvram), vet.nvram_size)
            kept = {state, disk} | ({nvram} if nvram else set())
            states.install(key, state=state, disk=disk, nvram=nvram, meta={
                **meta, "source": "registry", "pulled": pulled.manifest_digest})
        finally:
            for tmp in tmps:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            used = states.in_use()
            for digest in set(got.values()) - kept - used:
                with contextlib.suppress(CacheError, OSError):
                    store.remove(digest)
        seconds = time.monotonic() - start
        self.pulls.append({"key": key, "bytes": pulled.bytes, "seconds": seconds})
        self.notice(f"flightvm: pulled the booted state {key[:12]} from "
                    f"{self.registry.ref.name} ({pulled.bytes >> 20} MiB in {seconds:.1f} s)")


def _check_nvram(path: Path, size: int | None) -> None:
    if not path.is_file() or path.is_symlink() or path.stat().st_size != size:
        raise StateRefused(f"the state's NVRAM is not a plain file of {size} bytes; refused")

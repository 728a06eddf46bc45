"""Booted states and the registry, the parts that need neither a registry nor a VM.

The metadata round trip and its checks against hostile values, the "no private key"
check on what a push sends, the save file's rebuilt XML and header checks, the overlay
checks (real qemu-img on files made here), the option. Push and pull themselves run
against the real local registry and a real guest in tests/integration/test_state_registry.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from pytest_flightvm.cache.qcow2 import check_overlay
from pytest_flightvm.cache.registry.documents import TAG_RE
from pytest_flightvm.config import resolve
from pytest_flightvm.errors import ConfigError, FlightVMError, StateRefused
from pytest_flightvm.vm.domain import DomainSpec, Owner
from pytest_flightvm.vm.pristine import Pristine
from pytest_flightvm.vm.savefile import HEADER, MAGIC, read_header
from pytest_flightvm.vm.statecache import STATE_FORMAT, StateCache
from pytest_flightvm.vm.stateshare import (
    META_FIELDS,
    StateShare,
    check_meta,
    check_save_head,
    no_private_key,
    outgoing,
    rebuild_save_file,
    state_tag,
)
from tests.fake_disk import QCOW2_MAGIC
from tests.support import offline_factory

KEY = "cd" * 32
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOv2a5bPq3ExampleExampleExampleExample0"
META = {"mac": "52:54:00:12:34:56", "host_keys": [HOST_KEY],
        "origin": "flightvm-261203000000-aaaa-gw0-1", "has_cloud_init": True, "accel": "tcg"}
STREAM = b"QEVM" + os.urandom(100_000)


def _doc(**changes: Any) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "key": KEY, **META, **changes}


def test_metadata_round_trip_and_whitelist(tmp_path: Path) -> None:
    cache = StateCache(tmp_path / "c" / "states", notice=print)
    d = tmp_path / "vm"
    d.mkdir()
    for name in ("pristine.state", "pristine.qcow2"):
        (d / name).write_bytes(QCOW2_MAGIC + name.encode())
    secret_meta = {**META, "key_path": str(tmp_path / "ssh" / "id_ed25519"),
                   "private": "-----BEGIN OPENSSH PRIVATE KEY-----"}
    assert cache.publish(KEY, Pristine(d / "pristine.state", d / "pristine.qcow2", None),
                         secret_meta) is not None
    files, config = outgoing(cache, KEY)
    # only the whitelisted fields leave; they come back as they went
    assert sorted(config) == sorted(("format", "key", *META_FIELDS))
    assert "PRIVATE" not in json.dumps(config) and "id_ed25519" not in json.dumps(config)
    assert check_meta(json.loads(json.dumps(config)), KEY) == META
    manifest = cache.manifest(KEY)
    assert manifest is not None
    assert [(f.title, f.digest) for f in files] == [("state.sav", manifest["state"]),
                                                    ("disk.qcow2", manifest["disk"])]
    assert all(f.path.parent == cache.store.root / "blobs" / "sha256" for f in files)


@pytest.mark.parametrize("changes, word", [
    ({"mac": "52:54:00:12:34:56,id=x,romfile=/etc/shadow"}, "MAC"),
    ({"mac": 5}, "MAC"),
    ({"host_keys": [HOST_KEY + "\n@cert-authority * ssh-ed25519 AAAA"]}, "host keys"),
    ({"host_keys": "ssh-ed25519 AAAA"}, "host keys"),
    ({"host_keys": [HOST_KEY] * 9}, "host keys"),
    ({"origin": "flightvm-../../etc"}, "origin"),
    ({"origin": "$(reboot)"}, "origin"),
    ({"has_cloud_init": "yes"}, "has_cloud_init"),
    ({"accel": "kvm,evil=1"}, "accel"),
    ({"key": "ef" * 32}, "key"),
    ({"format": STATE_FORMAT + 1}, "format"),
])
def test_hostile_metadata_is_refused_in_one_line(changes: dict[str, Any], word: str) -> None:
    with pytest.raises(StateRefused) as exc:
        check_meta(_doc(**changes), KEY)
    assert word in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(StateRefused):
        check_meta(["not", "an", "object"], KEY)


def test_no_private_key_leaves(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    ok = blobs / ("a" * 64)
    ok.write_bytes(b"LibvirtQemudSave...")
    no_private_key(_doc(), [ok], blobs)
    with pytest.raises(FlightVMError, match="metadata holds a private key"):
        no_private_key(_doc(origin="-----BEGIN OPENSSH PRIVATE KEY-----"), [ok], blobs)
    key_file = tmp_path / "ssh" / "id_ed25519"
    key_file.parent.mkdir()
    key_file.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...\n")
    with pytest.raises(FlightVMError, match="not a state store blob"):
        no_private_key(_doc(), [key_file], blobs)
    planted = blobs / ("b" * 64)
    planted.write_bytes(key_file.read_bytes())
    with pytest.raises(FlightVMError, match="looks like a key file"):
        no_private_key(_doc(), [planted], blobs)


def _save_file(path: Path, xml: str, *, cookie: bytes = b"<cookie>\n</cookie>\n\0",
               compressed: int = 0, stream: bytes = STREAM, data_len: int = 16 * 1024) -> None:
    body = xml.encode() + b"\0"
    region = body + cookie
    region += b"\0" * (data_len - len(region))
    path.write_bytes(HEADER.pack(MAGIC, 2, data_len, 1, compressed, len(body)) + region + stream)


def _hostile_xml() -> str:
    return ("<domain type='qemu'><name>flightvm-x</name><devices>"
            "<emulator>/tmp/evil</emulator><disk type='file' device='disk'>"
            "<source file='/etc/shadow'/></disk></devices></domain>")


def _our_xml(tmp_path: Path) -> str:
    return DomainSpec(name=str(META["origin"]), overlay=Path("/flightvm-state/overlay.qcow2"),
                      seed_iso=Path("/flightvm-state/seed.iso"),
                      console_log=Path("/flightvm-state/console.log"), ssh_port=22,
                      mac=str(META["mac"]), owner=Owner.current("261203000000-aaaa", "gw0",
                                                                tmp_path)).to_xml()


def test_save_file_gets_our_xml_and_keeps_its_stream(tmp_path: Path) -> None:
    src, dest = tmp_path / "pulled.sav", tmp_path / "ours.sav"
    _save_file(src, _hostile_xml())
    ours = _our_xml(tmp_path)
    rebuild_save_file(src, dest, ours)
    head = read_header(dest)
    assert head.xml == ours and "/tmp/evil" not in head.xml and "/etc/shadow" not in head.xml
    root = ET.fromstring(head.xml)
    assert root.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"
    assert dest.read_bytes()[head.stream_offset:] == STREAM
    # taken (a pulled blob of ours): renamed and rewritten in place, the stream not copied
    taken = tmp_path / "taken.sav"
    rebuild_save_file(src, taken, ours, move=True)
    assert not src.exists() and taken.stat().st_mode & 0o777 == 0o600
    assert read_header(taken).xml == ours and taken.read_bytes() == dest.read_bytes()
    # an XML that does not fit the save file's region: refused in one line
    small = tmp_path / "small.sav"
    _save_file(small, "<domain/>", data_len=64)
    with pytest.raises(StateRefused, match="does not fit"):
        rebuild_save_file(small, tmp_path / "x.sav", ours)
    assert not (tmp_path / "x.sav").exists()


@pytest.mark.parametrize("kwargs, word", [
    ({"compressed": 1}, "compressed"),  # libvirt would run a decompressor over it
    ({"cookie": b"<cookie><slirpHelper/><other/></cookie>\0"}, "cookie"),
    ({"cookie": b"<cookie><cpu>\0"}, "cookie"),
    ({"stream": b"ELF\x7f" + STREAM}, "no QEMU stream"),
])
def test_hostile_save_headers_are_refused(tmp_path: Path, kwargs: dict[str, Any],
                                          word: str) -> None:
    path = tmp_path / "pulled.sav"
    _save_file(path, _hostile_xml(), **kwargs)
    with pytest.raises(StateRefused, match=word):
        check_save_head(path)
    path.write_bytes(b"LibvirtQemudPart" + b"\0" * 200)
    with pytest.raises(StateRefused, match="save file"):
        check_save_head(path)


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "blobs" / "sha256" / ("e" * 64)
    path.parent.mkdir(parents=True)
    _qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")
    return path


def test_overlay_of_the_same_base_elsewhere_is_rebased(tmp_path: Path, base: Path) -> None:
    overlay = tmp_path / "pulled.qcow2"
    elsewhere = "/home/someone/.cache/flightvm/store/blobs/sha256/" + base.name
    _qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", elsewhere,
              str(overlay), "64M")
    check_overlay(overlay, base, "the overlay", error=StateRefused)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, check=True).stdout)
    assert info["backing-filename"] == str(base) and info["backing-filename-format"] == "qcow2"


@pytest.mark.parametrize("make, word", [
    # a backing file that is a host file: never opened, refused
    (lambda o, b: _qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b",
                            "/etc/shadow", str(o), "64M"), "/etc/shadow"),
    # no backing file at all
    (lambda o, b: _qemu_img("create", "-q", "-f", "qcow2", str(o), "64M"), "not an overlay"),
    # an external data file, even on the right backing name
    (lambda o, b: _qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", str(b),
                            "-o", f"data_file={o}.data", str(o), "64M"), "external data file"),
    # the right backing name, another size
    (lambda o, b: _qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", str(b),
                            str(o), "128M"), "virtual size"),
    # not a qcow2
    (lambda o, b: o.write_bytes(b"\0" * 4096), "not a qcow2"),
])
def test_hostile_overlays_are_refused(tmp_path: Path, base: Path, make: Any, word: str) -> None:
    overlay = tmp_path / "pulled.qcow2"
    make(overlay, base)
    with pytest.raises(StateRefused) as exc:
        check_overlay(overlay, base, "the overlay", error=StateRefused)
    assert word in str(exc.value) and "\n" not in str(exc.value), exc.value


def test_state_tag_is_a_valid_tag() -> None:
    tag = state_tag("base-qcow2", KEY)
    assert tag == f"base-qcow2-state-{KEY[:40]}" and TAG_RE.match(tag)
    assert TAG_RE.match(state_tag("p" * 200, KEY))


def test_option_and_when_a_share_exists(tmp_path: Path) -> None:
    def settings(ini: dict[str, Any]) -> Any:
        return resolve(ini, {}, {}, rootdir=tmp_path)

    reg = {"registry": "127.0.0.1:5000/x/y"}
    assert settings({"state_cache": "registry", **reg}).state_cache == "registry"
    with pytest.raises(ConfigError):
        settings({"state_cache": "sometimes"})
    assert StateShare.for_settings(settings({"state_cache": "on", **reg}), print) is None
    assert StateShare.for_settings(settings({"state_cache": "registry"}), print) is None
    assert StateShare.for_settings(
        settings({"state_cache": "registry", "offline": True, **reg}), print) is None
    share = StateShare.for_settings(settings({"state_cache": "registry", **reg}), print)
    assert share is not None and share.push_enabled is False and share.compress == "none"
    pushing = StateShare.for_settings(
        settings({"state_cache": "registry", "push": True, **reg}), print)
    assert pushing is not None and pushing.push_enabled


def test_pool_pulls_on_a_local_miss_with_our_own_xml(tmp_path: Path) -> None:
    """The pool's wiring (the share here is a stub: the real pull is covered against the
    real registry in tests/integration and tests/faults): a local miss asks the share,
    with the factory's vetting, whose XML is built from our settings and the checked
    metadata; a miss there is a boot."""
    from pytest_flightvm.vm.factory import VMRequest
    from pytest_flightvm.vm.pool import VMPool

    calls: list[Any] = []

    class Share:
        def pull(self, states: Any, key: str, vet: Any) -> None:
            calls.append((key, vet))

    states = StateCache(tmp_path / "cache" / "states", notice=print)
    factory = offline_factory(tmp_path, memory=1536, vcpus=1)
    pool = VMPool(factory, notice=print, states=states, share=Share())  # type: ignore[arg-type]
    assert pool._restore_saved(VMRequest(), KEY) is None  # noqa: SLF001
    ((key, vet),) = calls
    assert key == KEY and vet.base == factory.base_image and vet.nvram_size is None
    root = ET.fromstring(vet.domain_xml(META))
    assert root.findtext("name") == META["origin"] and root.get("type") == "qemu"
    assert root.findtext("memory") == "1536" and root.findtext("vcpu") == "1"
    assert root.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"
    assert f"mac={META['mac']}," in ET.tostring(root, encoding="unicode")
    uefi = offline_factory(tmp_path / "u", firmware="uefi").state_vetting(VMRequest())
    assert uefi.nvram_size == uefi_vars_size()


def uefi_vars_size() -> int:
    from pytest_flightvm.vm.firmware import firmware

    template = firmware("uefi").vars_template
    assert template is not None
    return template.stat().st_size


def test_background_push_prints_when_the_session_waits(tmp_path: Path) -> None:
    """A push runs in a thread while the tests go on; its lines wait for ``wait()`` (the
    pool's close), never printed from the thread."""
    from pytest_flightvm.errors import RegistryUnavailable

    notices: list[str] = []

    def registry() -> Any:
        raise RegistryUnavailable("127.0.0.1:9 does not answer")

    share = StateShare(registry, prefix="p", arch="amd64", compress="none", push=True,
                       notice=notices.append)
    cache = StateCache(tmp_path / "c" / "states", notice=notices.append)
    d = tmp_path / "vm"
    d.mkdir()
    for name in ("pristine.state", "pristine.qcow2"):
        (d / name).write_bytes(QCOW2_MAGIC + name.encode())
    cache.publish(KEY, Pristine(d / "pristine.state", d / "pristine.qcow2", None), META)
    share.push_soon(cache, KEY)
    assert notices == []
    share.wait()
    assert len(notices) == 1 and "pushing the booted state" in notices[0], notices
    assert "does not answer" in notices[0] and "local copy is used" in notices[0]
    off = StateShare(registry, prefix="p", arch="amd64", compress="none", push=False,
                     notice=notices.append)
    off.push_soon(cache, KEY)
    off.wait()
    assert len(notices) == 1  # pushes off: nothing tried, nothing said

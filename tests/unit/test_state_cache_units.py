"""The state cache without a VM: save-file rewriting, the state key, publish/lookup/evict.

What a real restore does with these is covered on real guests by
tests/integration/test_state_cache.py; these check the parts that need no libvirt.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_flightvm.errors import FlightVMError
from pytest_flightvm.vm.domain import DomainSpec, Owner, parse_metadata
from pytest_flightvm.vm.factory import VMRequest
from pytest_flightvm.vm.pristine import Pristine
from pytest_flightvm.vm.savefile import HEADER, MAGIC, read_header, retarget_xml, write_retargeted
from pytest_flightvm.vm.statecache import StateCache, state_key
from tests.support import offline_factory

STREAM = b"QEVM" + os.urandom(300_000)
COOKIE = b"<cookie>\n  <slirpHelper/>\n</cookie>\n\0"


def _spec(tmp_path: Path, name: str, port: int, run: str = "261203000000-aaaa") -> DomainSpec:
    d = tmp_path / name
    return DomainSpec(name=name, overlay=d / "overlay.qcow2", seed_iso=d / "seed.iso",
                      console_log=d / "console.log", ssh_port=port, mac="52:54:00:aa:bb:cc",
                      owner=Owner.current(run, "gw0", tmp_path), files=(d,))


def _saved_xml(spec: DomainSpec) -> str:
    """Our domain XML as libvirt saves it: with a UUID, a genid value and a backing chain."""
    root = ET.fromstring(spec.to_xml())
    ET.SubElement(root, "uuid").text = str(uuid.uuid4())
    root.find("genid").text = str(uuid.uuid4())  # type: ignore[union-attr]
    disk = root.find("devices/disk[@device='disk']")
    assert disk is not None
    ET.SubElement(disk, "backingStore", type="file")
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "pty"
    ET.SubElement(serial, "source", path="/dev/pts/7")  # the saving VM's pty
    return ET.tostring(root, encoding="unicode")


def _save_file(path: Path, xml: str, data_len: int = 64 * 1024) -> None:
    body = xml.encode() + b"\0"
    region = body + COOKIE
    region += b"\0" * (data_len - len(region))
    path.write_bytes(HEADER.pack(MAGIC, 2, data_len, 1, 0, len(body)) + region + STREAM)


def test_retargeted_copy_restores_as_the_new_vm(tmp_path: Path) -> None:
    origin = _spec(tmp_path, "flightvm-261203000000-aaaa-gw0-1", 40001)
    saved = tmp_path / "saved.state"
    _save_file(saved, _saved_xml(origin))
    before = saved.read_bytes()
    new = _spec(tmp_path, "flightvm-261203000001-bbbb-gw1-1", 40002, run="261203000001-bbbb")
    head = read_header(saved)
    xml, new_uuid = retarget_xml(head.xml, new)
    copy = tmp_path / "copy.state"
    write_retargeted(saved, copy, xml, header=head)

    assert saved.read_bytes() == before  # the stored state is never written
    assert copy.stat().st_mode & 0o777 == 0o600
    got = read_header(copy)
    assert got.data_len == head.data_len and got.cookie == COOKIE and got.was_running == 1
    assert copy.read_bytes()[got.stream_offset:] == STREAM
    root = ET.fromstring(got.xml)
    assert root.findtext("name") == new.name and root.findtext("uuid") == new_uuid
    assert root.findtext("genid") != ET.fromstring(head.xml).findtext("genid")
    disk = root.find("devices/disk[@device='disk']")
    assert disk is not None and disk.find("backingStore") is None
    assert disk.find("source").get("file") == str(new.overlay)  # type: ignore[union-attr]
    assert root.find("devices/disk[@device='cdrom']/source").get("file") == str(new.seed_iso)  # type: ignore[union-attr]
    serial = root.find("devices/serial")
    assert serial is not None and serial.find("source") is None  # libvirt opens a new pty
    assert serial.find("log").get("file") == str(new.console_log)  # type: ignore[union-attr]
    assert str(origin.console_log) not in got.xml
    assert "127.0.0.1:40002-:22" in got.xml and "40001" not in got.xml
    assert "mac=52:54:00:aa:bb:cc" in got.xml  # the guest's network config matches it
    assert origin.name not in got.xml
    meta = parse_metadata(new.name, got.xml)  # what the reaper reads
    assert meta is not None and meta.run_id == "261203000001-bbbb"
    assert meta.files == (str(tmp_path / new.name),)


def test_an_unfinished_or_cut_save_file_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "flightvm-261203000000-aaaa-gw0-1", 40001)
    path = tmp_path / "partial.state"
    _save_file(path, _saved_xml(spec))
    data = bytearray(path.read_bytes())
    data[:16] = b"LibvirtQemudPart"  # libvirt's magic until a save completes
    path.write_bytes(bytes(data))
    with pytest.raises(FlightVMError, match="not a complete libvirt save file"):
        read_header(path)
    path.write_bytes(bytes(MAGIC) + bytes(data[16:200]))
    with pytest.raises(FlightVMError, match="cut short"):
        read_header(path)


def test_an_xml_too_big_for_the_region_leaves_no_copy(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "flightvm-261203000000-aaaa-gw0-1", 40001)
    saved = tmp_path / "saved.state"
    xml = _saved_xml(spec)
    _save_file(saved, xml, data_len=len(xml) + len(COOKIE) + 10)
    with pytest.raises(FlightVMError, match="does not fit"):
        write_retargeted(saved, tmp_path / "copy.state", xml + "<!--" + "x" * 100 + "-->")
    assert not (tmp_path / "copy.state").exists()


def test_state_key_covers_user_data_not_identity(tmp_path: Path) -> None:
    factory = offline_factory(tmp_path)
    req = VMRequest(user_data=({"write_files": [{"path": "/etc/x", "content": "1"}]},))
    first = state_key(factory.state_parts(req))
    assert state_key(factory.state_parts(req)) == first  # per-VM identity is not in it
    other = VMRequest(user_data=({"write_files": [{"path": "/etc/x", "content": "2"}]},))
    assert state_key(factory.state_parts(other)) != first
    assert state_key(factory.state_parts(VMRequest(memory=2048, user_data=req.user_data))) != first
    assert state_key(factory.state_parts(req, ("hook=abc",))) != first
    assert state_key(factory.state_parts(req, accel="kvm")) != first
    assert state_key(offline_factory(tmp_path / "t", tpm=True).state_parts(req)) != first
    # a run with another SSH key has the same key
    assert state_key(offline_factory(tmp_path / "k").state_parts(req)) == first


def _pristine(tmp_path: Path, tag: str) -> Pristine:
    d = tmp_path / tag
    d.mkdir()
    for name, data in (("pristine.state", b"state" + tag.encode()),
                       ("pristine.qcow2", b"disk" + tag.encode()),
                       ("pristine-nvram.fd", b"nvram")):
        (d / name).write_bytes(data)
    return Pristine(d / "pristine.state", d / "pristine.qcow2", d / "pristine-nvram.fd")


def test_publish_lookup_and_evict_a_corrupt_state(tmp_path: Path) -> None:
    notices: list[str] = []
    cache = StateCache(tmp_path / "cache" / "states", notice=notices.append)
    key = "ab" * 32
    assert cache.lookup(key) is None
    meta = {"mac": "52:54:00:aa:bb:cc", "host_keys": ["ssh-ed25519 AAAA"], "origin": "flightvm-x",
            "has_cloud_init": True, "accel": "tcg"}
    stored = cache.publish(key, _pristine(tmp_path, "one"), meta)
    assert stored is not None and stored.state.parent == cache.store.root / "blobs" / "sha256"
    assert not (tmp_path / "one" / "pristine.state").exists()  # moved, not copied
    assert (tmp_path / "cache" / "states").stat().st_mode & 0o777 == 0o700
    assert stored.state.stat().st_mode & 0o777 == 0o444
    # a second publish of the same key keeps the first state and leaves the files alone
    assert cache.publish(key, _pristine(tmp_path, "two"), meta) is None
    assert (tmp_path / "two" / "pristine.state").exists()
    found = cache.lookup(key)
    assert found is not None and found.pristine == stored
    assert found.mac == meta["mac"] and found.host_keys == ("ssh-ed25519 AAAA",)
    assert [e["key"] for e in cache.entries()] == [key]
    # damage the save file: its digest check fails, the state is evicted with one line
    stored.state.chmod(0o644)
    stored.state.write_bytes(b"garbage")
    assert cache.lookup(key) is None
    assert len(notices) == 1 and key[:12] in notices[0] and "evicted" in notices[0]
    assert not stored.disk.exists() and cache.store.get_ref(f"state/{key}") is None
    assert cache.lookup(key) is None and len(notices) == 1


def test_verify_and_gc_know_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_flightvm.cli import main

    states_dir = tmp_path / "cache" / "states"
    cache = StateCache(states_dir, notice=lambda _line: None)
    keep, bad = "cd" * 32, "ef" * 32
    kept = cache.publish(keep, _pristine(tmp_path, "one"), {"origin": "flightvm-a"})
    broken = cache.publish(bad, _pristine(tmp_path, "two"), {"origin": "flightvm-b"})
    assert kept is not None and broken is not None
    # a publish killed after moving a file in, before its ref: an orphan blob
    orphan = tmp_path / "orphan"
    orphan.write_bytes(b"half a state")
    orphan_digest = cache.store.import_file(orphan, move=True)
    broken.disk.chmod(0o644)
    broken.disk.write_bytes(b"bit rot")

    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "cache"), "--offline"]) == 0
    listed = capsys.readouterr().out
    assert "booted states" in listed and keep[:12] in listed and "flightvm-a" in listed

    assert main(["cache", "verify", "--cache-dir", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert f"ok  state {keep}" in out and f"BAD state {bad} (evicted)" in out
    assert [e["key"] for e in cache.entries()] == [keep]

    # libvirt's built-in test driver: no daemon, no domain of ours
    assert main(["gc", "--cache-dir", str(tmp_path / "cache"), "--libvirt-uri", "test:///default"]) == 0
    out = capsys.readouterr().out
    assert f"removed state blob {orphan_digest}" in out
    assert not cache.store.blob_path(orphan_digest).exists()
    assert kept.state.exists() and kept.disk.exists() and cache.lookup(keep) is not None


def test_gc_drops_states_unused_for_long(tmp_path: Path) -> None:
    cache = StateCache(tmp_path / "cache" / "states", notice=lambda _line: None)
    old, fresh = "01" * 32, "02" * 32
    cache.publish(old, _pristine(tmp_path, "one"), {})
    cache.publish(fresh, _pristine(tmp_path, "two"), {})
    ref = cache.store.root / "refs" / "state" / old
    data = json.loads(ref.read_text())
    ref.write_text(json.dumps({**data, "updated": data["updated"] - 15 * 86400}))
    assert f"state/{old}" in cache.gc(dry_run=True) and cache.lookup(old) is not None
    removed = cache.gc()
    assert f"state/{old}" in removed and cache.lookup(old) is None
    assert cache.lookup(fresh) is not None and f"state/{fresh}" not in removed
    cache.touch(fresh)  # a restore keeps it young
    assert time.time() - float(cache.store.ref_info(f"state/{fresh}")["updated"]) < 60


def test_no_state_cache_for_tpm_vms(tmp_path: Path) -> None:
    """A state restored into another VM would clone its TPM: TPM VMs boot, one notice."""
    from pytest_flightvm.vm.pool import VMPool

    notices: list[str] = []
    factory = offline_factory(tmp_path, tpm=True)
    pool = VMPool(factory, notice=notices.append,
                  states=StateCache(tmp_path / "cache" / "states", notice=notices.append))
    assert pool._state_key(VMRequest(), "snapshot") is None  # noqa: SLF001
    assert pool._state_key(VMRequest(), "restore") is None  # noqa: SLF001
    assert len(notices) == 1 and "TPM" in notices[0]
    plain = VMPool(offline_factory(tmp_path / "p"), notice=notices.append,
                   states=StateCache(tmp_path / "p" / "cache" / "states", notice=notices.append))
    assert plain._state_key(VMRequest(), "snapshot") is not None  # noqa: SLF001
    assert plain._state_key(VMRequest(), "reboot") is None  # noqa: SLF001

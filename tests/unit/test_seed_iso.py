"""seed.iso: read the ISO back with pycdlib (label, Joliet and Rock Ridge names, modes)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pycdlib
import pytest

from pytest_flightvm.errors import ConfigError
from pytest_flightvm.seed import SeedSpec, read_iso, render, write_iso

LONG = "a-rather-long-file-name-that-iso9660-cannot-hold.conf"


def files() -> dict[str, bytes]:
    spec = SeedSpec(
        instance_id="i-1", hostname="vm-1", mac="52:54:00:00:00:01", ssh_public_key="ssh-ed25519 K"
    )
    return {**render(spec), f"extra/{LONG}": b"long", "extra/deep/er/file.txt": b"deep"}


def open_iso(path: Path) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    return iso


def mode(iso: pycdlib.PyCdlib, rr_path: str) -> int:
    value = iso.file_mode(rr_path=rr_path)
    assert value is not None, rr_path
    return value


def get(iso: pycdlib.PyCdlib, **kw: str) -> bytes:
    buf = io.BytesIO()
    iso.get_file_from_iso_fp(buf, **kw)
    return buf.getvalue()


def test_label_and_names(tmp_path: Path) -> None:
    out = write_iso(files(), tmp_path / "seed.iso")
    iso = open_iso(out)
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        assert iso.joliet_vd is not None
        assert iso.joliet_vd.volume_identifier.decode("utf-16-be").strip() == "cidata"
        for name, data in files().items():
            assert get(iso, rr_path=f"/{name}") == data, name
            assert get(iso, joliet_path=f"/{name}") == data, name
        names = sorted(
            c.rock_ridge.name().decode()
            for c in iso.list_children(rr_path="/extra")
            if c.rock_ridge and not c.is_dot() and not c.is_dotdot()
        )
        assert names == sorted(["deep", LONG])
    finally:
        iso.close()


def test_read_iso_round_trip(tmp_path: Path) -> None:
    out = write_iso(files(), tmp_path / "seed.iso")
    assert read_iso(out) == dict(sorted(files().items()))


def test_iso_file_is_0600_even_with_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        out = write_iso(files(), tmp_path / "sub" / "seed.iso")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # Overwriting keeps it private and leaves no temp files behind.
    write_iso(files(), out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in out.parent.iterdir()] == ["seed.iso"]


def test_identical_inputs_identical_contents(tmp_path: Path) -> None:
    a = read_iso(write_iso(files(), tmp_path / "a.iso"))
    b = read_iso(write_iso(files(), tmp_path / "b.iso"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def test_payload_dirs_nested_with_modes(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    (payload / "certs").mkdir(parents=True)
    (payload / "certs" / "client.key").write_bytes(b"KEY")
    (payload / "certs" / "client.key").chmod(0o600)
    (payload / "setup.sh").write_bytes(b"#!/bin/sh\n")
    (payload / "setup.sh").chmod(0o755)
    (payload / LONG).write_bytes(b"x" * 5000)
    out = write_iso(
        {"user-data": b"#cloud-config\n", "meta-data": b"instance-id: a\n"},
        tmp_path / "seed.iso",
        payload_dirs={"flightctl": payload},
        modes={"meta-data": 0o640},
    )
    back = read_iso(out)
    assert back["flightctl/certs/client.key"] == b"KEY"
    assert back[f"flightctl/{LONG}"] == b"x" * 5000
    iso = open_iso(out)
    try:
        assert stat.S_IMODE(mode(iso, "/flightctl/certs/client.key")) == 0o600
        assert stat.S_IMODE(mode(iso, "/flightctl/setup.sh")) == 0o755
        assert stat.S_IMODE(mode(iso, "/user-data")) == 0o444
        assert stat.S_IMODE(mode(iso, "/meta-data")) == 0o640
        assert stat.S_ISDIR(mode(iso, "/flightctl/certs"))
    finally:
        iso.close()


def test_name_collisions_in_iso9660_are_mangled_apart(tmp_path: Path) -> None:
    many = {f"dir/config-file-{i}.yaml": str(i).encode() for i in range(15)}
    many.update({"dir/Config.Yaml": b"upper", "dir/config.yaml": b"lower"})
    assert read_iso(write_iso(many, tmp_path / "s.iso")) == dict(sorted(many.items()))


@pytest.mark.parametrize("bad", ["/abs", "../up", "a/../../b", ""])
def test_bad_names_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError):
        write_iso({bad: b"x"}, tmp_path / "s.iso")
    assert not (tmp_path / "s.iso").exists()


def test_file_and_dir_clash_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both a file and a directory"):
        write_iso({"a": b"x", "a/b": b"y"}, tmp_path / "s.iso")
    assert list(tmp_path.iterdir()) == []


def test_dangling_symlink_in_payload_rejected(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="gone"):
        write_iso({}, tmp_path / "s.iso", payload_dirs={"p": tmp_path / "p"})


def test_read_iso_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "x.iso").write_bytes(b"not an iso")
    with pytest.raises(ConfigError, match="not a readable ISO"):
        read_iso(tmp_path / "x.iso")


@pytest.mark.skipif(shutil.which("blkid") is None, reason="blkid not installed")
def test_blkid_sees_the_cidata_label(tmp_path: Path) -> None:
    """cloud-init finds the seed by label via blkid: check what blkid reports."""
    out = write_iso(files(), tmp_path / "seed.iso")
    result = subprocess.run(
        ["blkid", "-p", "-o", "export", str(out)], capture_output=True, text=True, check=True
    )
    assert "LABEL=cidata" in result.stdout.splitlines()
    assert "TYPE=iso9660" in result.stdout.splitlines()

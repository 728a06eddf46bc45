"""HostStorage's one stream guard (vm/volumes.py): every transfer finishes its libvirt
stream when it completes and aborts it when anything escapes, an interrupt included.

The stream and volume here are recorders standing in for libvirt's objects: they check
our guard's bookkeeping only. Real streams to a real pool are covered by
tests/integration/test_remote_host.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libvirt
import pytest

from pytest_flightvm.errors import HostStorageError
from pytest_flightvm.hosts import Host
from pytest_flightvm.vm.volumes import HostStorage


class Stream:
    def __init__(self, *, take: int = 3, fail_after: int | None = None,
                 chunks: tuple[bytes, ...] = ()) -> None:
        self.take, self.fail_after = take, fail_after
        self.sent = b""
        self.chunks = list(chunks)
        self.calls: list[str] = []

    def send(self, data: bytes) -> int:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise KeyboardInterrupt  # Ctrl-C while libvirt is sending
        self.sent += data[:self.take]  # a send may take only part of the data
        return min(self.take, len(data))

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def finish(self) -> None:
        self.calls.append("finish")

    def abort(self) -> None:
        self.calls.append("abort")


class Conn:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def newStream(self, flags: int) -> Stream:  # noqa: N802 - libvirt's name
        return self.stream


class Vol:
    def __init__(self, error: str | None = None) -> None:
        self.error = error

    def name(self) -> str:
        return "v.qcow2"

    def upload(self, stream: Any, offset: int, length: int, flags: int) -> None:
        if self.error:
            raise libvirt.libvirtError(self.error)

    download = upload


HOST = Host("qemu+ssh://far/system")


def storage(stream: Stream) -> HostStorage:
    return HostStorage(Conn(stream), HOST)


def test_upload_bytes_sends_everything_then_finishes() -> None:
    stream = Stream(take=3)
    storage(stream).upload_bytes(Vol(), b"0123456789")
    assert stream.sent == b"0123456789" and stream.calls == ["finish"]


def test_an_interrupt_mid_upload_aborts_the_stream(tmp_path: Path) -> None:
    stream = Stream(take=4, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        storage(stream).upload_bytes(Vol(), b"0123456789")
    assert stream.calls == ["abort"]  # never finished, nothing left open

    def interrupted(sent: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C between two chunks of a file

    disk = tmp_path / "d"
    disk.write_bytes(b"x" * 100)
    stream = Stream(take=100)
    with pytest.raises(KeyboardInterrupt):
        storage(stream).upload(Vol(), disk, progress=interrupted)
    assert stream.sent == b"x" * 100 and stream.calls == ["abort"]


def test_a_libvirt_error_is_one_line_and_aborts(tmp_path: Path) -> None:
    stream = Stream()
    with pytest.raises(HostStorageError) as err:
        storage(stream).upload_bytes(Vol(error="pool is full"), b"data")
    assert str(err.value) == f"{HOST.label}: upload to v.qcow2 failed (pool is full)"
    assert stream.calls == ["abort"]

    disk = tmp_path / "seed.iso"
    disk.write_bytes(b"iso")
    stream = Stream()
    with pytest.raises(HostStorageError, match=r": upload of seed.iso to v.qcow2 failed \(gone\)$"):
        storage(stream).upload(Vol(error="gone"), disk)
    assert stream.calls == ["abort"]


def test_download_joins_chunks_and_aborts_past_its_limit() -> None:
    stream = Stream(chunks=(b"abc", b"def"))
    assert storage(stream).download(Vol(), 0) == b"abcdef"
    assert stream.calls == ["finish"]

    stream = Stream(chunks=(b"abc", b"def"))
    with pytest.raises(HostStorageError, match="v.qcow2 is larger than 4 bytes"):
        storage(stream).download(Vol(), 0, limit=4)
    assert stream.calls == ["abort"]

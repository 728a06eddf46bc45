"""A body's way into the store: read into the writer's own buffers, or spliced in the
kernel (plain HTTP), hashed alongside either way. A loopback HTTP server stands in for
the registry: these check the plumbing, the real registry is the integration tier's."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pytest_flightvm.cache import store as store_mod
from pytest_flightvm.cache.registry.client import Client
from pytest_flightvm.cache.registry.streams import Progress
from pytest_flightvm.cache.registry.transfer import copy_body
from pytest_flightvm.cache.store import Store
from pytest_flightvm.errors import RegistryError, RegistryUnavailable

MiB = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_fill_reuses_its_buffers_without_hashing_a_reused_one(store: Store) -> None:
    # More chunks than the writer has buffers, the hasher slowed down: a buffer handed
    # back before it was hashed would be overwritten and the digest would not match.
    data = os.urandom(store_mod._RING * 3 * MiB + 12345)
    src = io.BytesIO(data)
    with store.writer(expected=sha(data), size=len(data)) as w:
        real, slow = w._hash.update, w._hash

        class Slow:
            def update(self, chunk: object) -> None:
                time.sleep(0.002)
                real(chunk)  # type: ignore[arg-type]

            def hexdigest(self) -> str:
                return slow.hexdigest()

        w._hash = Slow()  # type: ignore[assignment]
        sizes = []
        while n := w.fill(src.readinto):
            sizes.append(n)
    assert sum(sizes) == len(data) and max(sizes) == MiB
    assert len(w._ring) <= store_mod._RING
    assert store.blob_path(sha(data)).read_bytes() == data


def pipe_source(data: bytes) -> Callable[[int, int], int]:
    """A ``Body.splice`` stand-in: puts the next bytes of ``data`` into the pipe."""
    pos = [0]

    def put(pipe: int, n: int) -> int:
        chunk = data[pos[0]:pos[0] + min(n, 256 << 10)]
        done = 0
        while done < len(chunk):
            done += os.write(pipe, chunk[done:])
        pos[0] += done
        return done

    return put


def test_splice_after_write_hashes_what_the_file_holds(store: Store) -> None:
    data = os.urandom(5 * MiB + 7)
    with store.writer(expected=sha(data), size=len(data)) as w:
        w.write(data[:4])  # the magic, read first
        source = pipe_source(data[4:])
        while w.splice(source):
            pass
    assert store.blob_path(sha(data)).read_bytes() == data
    assert list((store.root / "tmp").iterdir()) == []


def test_a_splice_that_fails_leaves_nothing(store: Store) -> None:
    def broken(pipe: int, n: int) -> int:
        raise RegistryUnavailable("registry x is unreachable (Connection reset by peer)")

    with pytest.raises(RegistryUnavailable):
        with store.writer() as w:
            w.write(b"QFI\xfb")
            w.splice(broken)
    assert list((store.root / "tmp").iterdir()) == []
    assert list((store.root / "blobs" / "sha256").iterdir()) == []


def test_a_filesystem_without_splice_gets_the_chunks_written(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """ecryptfs and a few others have no splice_write: the kernel answers EINVAL for a
    splice into the file (not for one into the pipe), and the writer copies instead."""
    real, refused = os.splice, []

    def no_splice_into_files(src: int, dst: int, count: int, *args: object,
                             **kwargs: object) -> int:
        if stat.S_ISREG(os.fstat(dst).st_mode):
            refused.append(count)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod.os, "splice", no_splice_into_files)
    data = os.urandom(3 * MiB + 5)
    with store.writer(expected=sha(data), size=len(data)) as w:
        w.write(data[:4])
        source = pipe_source(data[4:])
        while w.splice(source):
            pass
    assert len(refused) == 1  # asked once, then copied
    assert store.blob_path(sha(data)).read_bytes() == data
    assert list((store.root / "tmp").iterdir()) == []


def test_a_splice_error_other_than_einval_is_one_line(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod.os, "splice", full)
    with pytest.raises(store_mod.StoreUnusable, match="No space left on device"):
        with store.writer() as w:
            w.splice(pipe_source(b"x" * 1000))
    assert list((store.root / "tmp").iterdir()) == []


# -- a body from a loopback server --------------------------------------------------


def _serve(conn: socket.socket, mode: str, data: bytes) -> None:
    conn.recv(65536)
    if mode == "chunked":
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(data), 300_000):
            part = data[i:i + 300_000]
            conn.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        conn.sendall(b"0\r\n\r\n")
        return
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    if mode == "plain":
        conn.sendall(head + data)
    elif mode == "short":  # declares all of it, sends a third, hangs up
        conn.sendall(head + data[:len(data) // 3])
    elif mode == "trickle":  # a byte at a time, well inside each read's timeout
        conn.sendall(head)
        for b in data[:50]:
            try:
                conn.sendall(bytes([b]))
            except OSError:
                return
            time.sleep(0.1)


@contextmanager
def server(mode: str, data: bytes) -> Iterator[str]:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                _serve(conn, mode, data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def pull(host: str, store: Store, size: int, digest: str, **client: float) -> tuple[str, bool]:
    c = Client(f"{host}/repo", credentials=False, **client)  # type: ignore[arg-type]
    resp = c.request("GET", f"{c.base}/blobs/{digest}")
    try:
        with c.stream(resp, size, "blob") as body, store.writer(expected=digest,
                                                                 size=size) as w:
            spliced = body.spliceable
            copy_body(body, w, Progress("test", size, lambda _m: None))
        assert w.digest is not None
        return w.digest, spliced
    finally:
        resp.close()


@pytest.mark.parametrize("mode,spliced", [("plain", True), ("chunked", False)])
def test_a_body_arrives_whole_either_way(store: Store, mode: str, spliced: bool) -> None:
    data = os.urandom(3 * MiB + 99)
    with server(mode, data) as host:
        assert pull(host, store, len(data), sha(data)) == (sha(data), spliced)
    assert store.blob_path(sha(data)).read_bytes() == data


def test_a_body_cut_short_is_one_line_and_leaves_nothing(store: Store) -> None:
    data = os.urandom(2 * MiB)
    with server("short", data) as host:
        with pytest.raises(RegistryUnavailable, match=r"unreachable \(IncompleteRead"):
            pull(host, store, len(data), sha(data))
    assert list((store.root / "tmp").iterdir()) == []


def test_a_trickling_body_stops_at_its_deadline(store: Store) -> None:
    data = os.urandom(MiB)
    t = time.monotonic()
    with server("trickle", data) as host:
        with pytest.raises(RegistryError, match="did not send its 1048576 bytes within"):
            pull(host, store, len(data), sha(data), read_timeout=0.4, min_rate=float(1 << 40))
    assert time.monotonic() - t < 4  # the allowance was 2 x 0.4 s: the watchdog ended it
    assert list((store.root / "tmp").iterdir()) == []

"""Byte streams of a transfer: progress lines, hashing, a deadline for a whole body,
and decompression that stops at its budget.

Everything here holds about one chunk (:data:`CHUNK`) in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import requests

CHUNK = 1 << 20
MiB = 1 << 20
MAX_DISK = 64 << 30
"""Largest disk (file bytes) a pull accepts, whatever a manifest declares."""
MAX_RATIO = 32
"""Most bytes a compressed byte may become (qcow2 disks compress about 3:1)."""
RATIO_FLOOR = 64 * MiB
Log = Callable[[str], None]


def nolog(_msg: str) -> None:
    pass


def decompressed_budget(wire: int) -> int:
    """Most bytes ``wire`` compressed bytes may decompress to."""
    return min(MAX_DISK, max(RATIO_FLOOR, wire * MAX_RATIO))


class Progress:
    """Progress lines through ``log`` for transfers that last over ~2 s."""

    def __init__(self, what: str, total: int | None, log_fn: Log, interval: float = 2.0):
        self.what, self.total, self.log, self.interval = what, total, log_fn, interval
        self.start = self.last = time.monotonic()
        self.done = self.logged = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last, self.logged = now, self.done
            self.log(self._line(now))

    def finish(self) -> None:
        now = time.monotonic()
        if now - self.start >= self.interval and self.logged != self.done:
            self.log(self._line(now) + " done")

    def _line(self, now: float) -> str:
        rate = self.done / MiB / max(now - self.start, 1e-6)
        total = f"/{self.total / MiB:.0f}" if self.total else ""
        return f"{self.what}: {self.done / MiB:.0f}{total} MiB ({rate:.0f} MiB/s)"


class HashingReader:
    """File-like view of a response body that hashes (and counts) what is read."""

    def __init__(self, chunks: Iterator[bytes], progress: Progress):
        self._chunks = chunks
        self._buf = b""
        self.hash = hashlib.sha256()
        self.bytes = 0
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                break
            self.hash.update(chunk)
            self.bytes += len(chunk)
            self.progress.update(len(chunk))
            self._buf += chunk
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class SizedBody:
    """An iterable request body with a known length (so requests sends Content-Length)."""

    def __init__(self, chunks: Iterable[bytes | memoryview], length: int):
        self._chunks = chunks
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return iter(self._chunks)


def file_chunks(path: Path, progress: Progress) -> Iterator[memoryview]:
    """``path`` in chunks of up to CHUNK bytes, read into one reused buffer: each chunk is
    a view that is valid until the next one is asked for (the upload hashes and sends it
    before that). No new allocation per chunk, so the sender's memory is one buffer,
    whatever the allocator makes of a stream of 1 MiB objects freed in another order."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            progress.update(n)
            yield view[:n]


class Watchdog:
    """Shuts a response's socket once ``seconds`` have passed.

    requests' read timeout applies to each socket read, and one ``iter_content``
    read loops until its chunk is full: a body trickling one byte every 4 s
    never times out. Shutting the socket from this timer thread ends the
    blocked read at once; :attr:`fired` tells the reader why it ended.
    """

    def __init__(self, resp: requests.Response, seconds: float) -> None:
        self.resp = resp
        self.seconds = seconds
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = socket_of(self.resp)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self.resp.close()

    def cancel(self) -> None:
        self._timer.cancel()


def socket_of(resp: requests.Response) -> socket.socket | None:
    """The socket under a streamed response (urllib3 -> http.client -> SocketIO)."""
    node: object = resp.raw
    for attr in ("_fp", "fp", "raw", "_sock"):  # no public handle exists
        node = getattr(node, attr, None)
    return node if isinstance(node, socket.socket) else None


class Readable(Protocol):
    def read(self, n: int = -1) -> bytes: ...


class Budget:
    """Counts bytes against a limit; ``spend`` raises ``error()`` past it."""

    def __init__(self, limit: int, error: Callable[[], Exception]) -> None:
        self.limit, self.used, self._error = limit, 0, error

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise self._error()


class GunzipReader:
    """File-like gunzip of ``src`` (multi-member) whose output stops at ``budget``.

    ``zlib``'s ``max_length`` keeps each step to one chunk of output, so a
    bomb never holds more than that in memory; past the budget it raises.
    """

    def __init__(self, src: Readable, budget: Budget) -> None:
        self._src, self._budget = src, budget
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n < 0 else n
        out: list[bytes] = []
        got = 0
        while got < n:
            if not self._pending:
                self._pending = self._src.read(CHUNK)
                if not self._pending:
                    break  # input ended; a cut-short stream is the tar reader's to report
            try:
                data = self._z.decompress(self._pending, n - got)
            except zlib.error as exc:
                raise OSError(f"gzip: {exc}") from None
            if self._z.eof:  # another gzip member may follow
                self._pending = self._z.unused_data
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                self._pending = self._z.unconsumed_tail
            if data:
                self._budget.spend(len(data))
                out.append(data)
                got += len(data)
        return b"".join(out)


def zstd_chunks(src: Readable, budget: Budget) -> Iterator[bytes]:
    """Decompress a zstd stream from ``src``, one chunk at a time, within ``budget``."""
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(src, read_size=CHUNK,  # type: ignore[arg-type]
                                                        read_across_frames=True)
    try:
        while True:
            try:
                chunk = reader.read(CHUNK)
            except zstandard.ZstdError as exc:
                raise OSError(f"zstd: {exc}") from None
            if not chunk:
                return
            budget.spend(len(chunk))
            yield chunk
    finally:
        reader.close()


def threaded(chunks: Iterator[bytes], depth: int = 4) -> Iterator[bytes]:
    """Run ``chunks`` in a thread of its own, ``depth`` chunks ahead of the consumer.

    A transfer is a pipeline (receive, decompress, hash, write); zstd, zlib and
    hashlib release the GIL, so stages in threads overlap as the ``zstd``
    process once did. An exception in the producer is raised in the consumer;
    closing the consumer stops the producer.
    """
    import queue

    q: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        q.put(("chunk", chunk), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            item: tuple[str, object] = ("end", None)
        except BaseException as exc:  # handed to the consumer
            item = ("error", exc)
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "chunk":
                yield value  # type: ignore[misc]
            elif kind == "error":
                raise value  # type: ignore[misc]
            else:
                return
    finally:
        stop.set()
        thread.join(5)

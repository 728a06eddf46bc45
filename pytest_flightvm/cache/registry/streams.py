"""Byte streams of a transfer: progress lines, a hashing reader, a sized request body.

Everything here holds at most one chunk (:data:`CHUNK`) in memory.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

CHUNK = 1 << 20
MiB = 1 << 20
Log = Callable[[str], None]


def nolog(_msg: str) -> None:
    pass


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

    def __init__(self, chunks: Iterable[bytes], length: int):
        self._chunks = chunks
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)


def file_chunks(path: Path, progress: Progress) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            progress.update(len(chunk))
            yield chunk

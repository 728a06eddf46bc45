"""A slow stand-in for a base image build, for ``--flightvm-build-cmd``.

``python fake_builder.py --seed N --chunks C --delay S --pidfile P`` writes a
fake qcow2 (a real qcow2 header + C chunks of 256 KiB) to ``$FLIGHTVM_OUTPUT``,
sleeping S seconds between chunks, so that a kill -9 can land mid-build. The
content depends only on the seed (see :func:`content`). It records its pid
first, so the test can end it by pid if it outlives its parent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script
from tests.fake_disk import HEADER  # noqa: E402

CHUNK = 256 << 10


def chunks(seed: int, count: int) -> Iterator[bytes]:
    block = hashlib.sha256(f"fake-build-{seed}".encode()).digest() * (CHUNK // 32)
    yield HEADER
    for i in range(count):
        yield block[: CHUNK - 4] + i.to_bytes(4, "big")


def content_digest(seed: int, count: int) -> str:
    h = hashlib.sha256()
    for c in chunks(seed, count):
        h.update(c)
    return "sha256:" + h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--delay", type=float, default=0.05)
    p.add_argument("--pidfile", type=Path, required=True)
    args = p.parse_args()
    with open(args.pidfile, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(os.environ["FLIGHTVM_OUTPUT"], "wb") as out:
        for c in chunks(args.seed, args.chunks):
            out.write(c)
            out.flush()
            time.sleep(args.delay)


if __name__ == "__main__":
    main()

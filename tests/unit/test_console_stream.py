"""--flightvm-console: the live copy of a guest console, line by line, tagged with the VM."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pytest_flightvm.vm.machine import follow_console


def lines_soon(out: io.StringIO, n: int, timeout: float = 10.0) -> list[str]:
    """The first ``n`` lines the follower printed, waiting up to ``timeout`` for them."""
    deadline = time.monotonic() + timeout
    while len(lines := out.getvalue().splitlines()) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return lines


@contextlib.contextmanager
def following(log: Path) -> Iterator[tuple[io.StringIO, threading.Event, threading.Thread]]:
    """A follower polling ``log`` every 20 ms; stopped on the way out, even on a failure."""
    out, stop = io.StringIO(), threading.Event()
    follower = threading.Thread(target=follow_console, args=(log, "vm-1", out, stop, 0.02),
                                daemon=True)
    follower.start()
    try:
        yield out, stop, follower
    finally:
        stop.set()
        follower.join(timeout=5)


def test_lines_are_tagged_whole_and_the_tail_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"")
    with following(log) as (out, stop, follower), open(log, "ab", buffering=0) as f:
        f.write(b"\x1b[2JBooting from Hard Disk...\r[    0.000000] Linux vers")  # no newline yet
        f.write(b"ion 6.1.0\r\n\r\nlogin: ")
        assert lines_soon(out, 2) == ["[vm-1] \x1b[2JBooting from Hard Disk...",
                                      "[vm-1] [    0.000000] Linux version 6.1.0"]
        f.write(b"the last words before destroy")
        f.close()
        stop.set()
        follower.join(timeout=5)
        assert not follower.is_alive()
        assert out.getvalue().splitlines()[-1] == "[vm-1] login: the last words before destroy"
        assert len(out.getvalue().splitlines()) == 3


def test_half_a_line_waits_for_its_end(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"[    0.000000] Linux vers")
    with following(log) as (out, _, _):
        time.sleep(0.2)  # ten polls: a follower that printed half lines would have by now
        assert out.getvalue() == ""
        with open(log, "ab") as f:
            f.write(b"ion 6.1.0\n")
        assert lines_soon(out, 1) == ["[vm-1] [    0.000000] Linux version 6.1.0"]


def test_a_missing_log_or_closed_output_ends_quietly(tmp_path: Path) -> None:
    out, stop = io.StringIO(), threading.Event()
    stop.set()
    follow_console(tmp_path / "absent.log", "vm-2", out, stop)  # returns, prints nothing
    assert out.getvalue() == ""
    log = tmp_path / "console.log"
    log.write_bytes(b"line\n")
    out.close()
    follow_console(log, "vm-2", out, stop)  # a closed terminal is no error

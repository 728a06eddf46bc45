"""--flightvm-console: the live copy of a guest console, line by line, tagged with the VM."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

from pytest_flightvm.vm.machine import follow_console


def test_lines_are_tagged_whole_and_the_tail_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"")
    out, stop = io.StringIO(), threading.Event()
    follower = threading.Thread(target=follow_console, args=(log, "vm-1", out, stop, 0.02))
    follower.start()
    with open(log, "ab", buffering=0) as f:
        f.write(b"\x1b[2JBooting from Hard Disk...\r[    0.000000] Linux vers")  # no newline yet
        time.sleep(0.1)
        assert out.getvalue() == ""  # half a line is not printed
        f.write(b"ion 6.1.0\r\n\r\nlogin: ")
        time.sleep(0.1)
        assert out.getvalue().splitlines() == ["[vm-1] \x1b[2JBooting from Hard Disk...",
                                               "[vm-1] [    0.000000] Linux version 6.1.0"]
        f.write(b"the last words before destroy")
    stop.set()
    follower.join(timeout=5)
    assert not follower.is_alive()
    assert out.getvalue().splitlines()[-1] == "[vm-1] login: the last words before destroy"
    assert len(out.getvalue().splitlines()) == 3


def test_a_missing_log_or_closed_output_ends_quietly(tmp_path: Path) -> None:
    out, stop = io.StringIO(), threading.Event()
    stop.set()
    follow_console(tmp_path / "absent.log", "vm-2", out, stop)  # returns, prints nothing
    assert out.getvalue() == ""
    log = tmp_path / "console.log"
    log.write_bytes(b"line\n")
    out.close()
    follow_console(log, "vm-2", out, stop)  # a closed terminal is no error

"""progress.BootStatus on its own (no pytest terminal): which lines reach the writer or
the terminal, and that a terminal that fails mid-boot stops no boot."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace

from pytest_flightvm.progress import BootStatus

VM = SimpleNamespace(name="flightvm-r-gw0-1")
STAGES = [(0.0, "firmware", False), (1.0, "firmware", False), (2.0, "kernel", False),
          (3.0, "kernel", False), (4.0, "ready", True)]


class Terminal:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def ensure_newline(self) -> None:
        self.calls.append(("newline", ""))

    def rewrite(self, line: str, **markup: bool) -> None:
        if self.fail:
            raise OSError("terminal gone")
        self.calls.append(("rewrite", line))

    def write(self, content: str, **markup: bool) -> None:
        self.calls.append(("write", content))

    def flush(self) -> None:
        self.calls.append(("flush", ""))


def test_plain_lines_only_on_a_new_stage_and_at_the_end() -> None:
    lines: list[str] = []
    status = BootStatus(lines.append)
    for elapsed, stage, done in STAGES:
        status(VM, elapsed, stage, done)
    assert [line.split()[-1] for line in lines] == ["firmware", "kernel", "ready"]
    assert lines[0] == "flightvm: booting flightvm-r-gw0-1     0s  firmware"
    assert status.last == {}  # a finished VM is forgotten


def test_live_rewrites_every_tick_out_of_capture_and_ends_the_line_once() -> None:
    lines: list[str] = []
    tr, entered = Terminal(), []

    @contextlib.contextmanager
    def uncaptured() -> Iterator[None]:
        entered.append(1)
        yield

    status = BootStatus(lines.append, terminal=tr, uncaptured=uncaptured)
    for elapsed, stage, done in STAGES:
        status(VM, elapsed, stage, done)
    assert lines == []
    assert [c for c, _ in tr.calls].count("newline") == 1  # only before the VM's first line
    assert [t for c, t in tr.calls if c == "rewrite"][1].endswith("1s  firmware")
    assert [t for c, t in tr.calls if c == "write"] == ["\n"]
    assert len(entered) == len(STAGES)


def test_quiet_prints_nothing_and_a_failing_terminal_is_ignored() -> None:
    lines: list[str] = []
    quiet = BootStatus(lines.append, terminal=Terminal(), quiet=True)
    quiet(VM, 0.0, "firmware", False)
    broken = BootStatus(lines.append, terminal=Terminal(fail=True))
    for elapsed, stage, done in STAGES:
        broken(VM, elapsed, stage, done)  # raises nothing
    assert lines == [] and broken.last == {}

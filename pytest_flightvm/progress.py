"""Boot progress on the terminal: a live status line per booting VM, or plain lines.

Pytest-free: the plugin hands in what it knows of the terminal as values (a writer for
plain lines, the terminal to rewrite in place when it is a tty, whether the run is
quiet, and a way to step out of output capture); :mod:`vm.bootstage` names the stages.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from .vm.bootstage import format_status

Uncaptured = Callable[[], AbstractContextManager[Any]]


class Terminal(Protocol):
    """The part of pytest's terminal reporter a live status line needs."""

    def ensure_newline(self) -> None: ...

    def rewrite(self, line: str, **markup: bool) -> None: ...

    def write(self, content: str, **markup: bool) -> None: ...

    def flush(self) -> None: ...


class BootStatus:
    """While a VM boots: one live status line per VM on a terminal (elapsed time and the
    last boot stage, rewritten in place) when ``terminal`` is given, else plain lines
    through ``plain`` on each new stage (no terminal, or under xdist: workers share the
    controller's stderr); nothing when ``quiet`` (-qq). ``uncaptured`` steps out of the
    test's output capture while the live line is written."""

    def __init__(self, plain: Callable[[str], None], *, terminal: Terminal | None = None,
                 quiet: bool = False,
                 uncaptured: Uncaptured = contextlib.nullcontext,
                 ) -> None:
        self.plain = plain
        self.terminal = terminal
        self.live = terminal is not None
        self.quiet = quiet
        self.uncaptured = uncaptured
        self.last: dict[str, str] = {}

    def __call__(self, vm: Any, elapsed: float, stage: str, done: bool) -> None:
        if self.quiet:
            return
        line = format_status(vm.name, elapsed, stage)
        with contextlib.suppress(OSError, ValueError):  # a closed terminal stops no boot
            if self.terminal is not None:
                self._rewrite(self.terminal, vm.name, line, done)
            elif done or self.last.get(vm.name) != stage:
                self.plain(line)
        self.last[vm.name] = stage
        if done:
            self.last.pop(vm.name, None)

    def _rewrite(self, tr: Terminal, name: str, line: str, done: bool) -> None:
        with self.uncaptured():
            if name not in self.last:
                tr.ensure_newline()
            tr.rewrite(line, erase=True)
            if done:
                tr.write("\n")
            tr.flush()


def stderr_lines(uncaptured: Uncaptured) -> Callable[[str], None]:
    """A writer of whole lines to stderr, outside the tests' output capture."""

    def emit(line: str) -> None:
        with uncaptured():
            sys.stderr.write(line.rstrip() + "\n")
            sys.stderr.flush()

    return emit


def boot_status(plain: Callable[[str], None], terminal: Terminal | None, *, controller: bool,
                console: bool, verbosity: int, uncaptured: Uncaptured) -> BootStatus:
    """Live status lines on the controller's terminal (plain ones under xdist, without a
    tty, or with --flightvm-console streaming to the same terminal), none with -qq."""
    live = controller and bool(getattr(terminal, "isatty", False)) and not console
    return BootStatus(plain, terminal=terminal if live else None, quiet=verbosity <= -2,
                      uncaptured=uncaptured)

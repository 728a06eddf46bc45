"""Readiness as a race: success (cloud-init done, SSH answers, extra checks)
against failure (console patterns, a paused or dead domain, the deadline).

A failed boot ends as soon as it is recognised, with the console tail in
the error; it never waits out the full timeout.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BootError
from .bootstage import FIRST_STAGE, stage_of

# Console lines that mean the guest will never become ready.
FAILURE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kernel panic", re.compile(r"Kernel panic - not syncing")),
    ("emergency mode", re.compile(r"You are in emergency mode|Entering emergency mode")),
    ("rescue mode", re.compile(r"You are in rescue mode")),
    ("initramfs shell", re.compile(r"\(initramfs\)|Dropping to a shell|dracut-emergency")),
    ("cloud-init crashed", re.compile(r"Failed to start .*[Cc]loud-init|cloud-init\[\d+\]:.*Traceback")),
    ("flightvm setup step failed", re.compile(r"flightvm-setup: step \S+ .*FAILED")),
)

TAIL_LINES = 30


def console_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    text = data.replace("\r", "")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return "\n".join(text.splitlines()[-lines:])


class ConsoleWatcher:
    """Reads a console log incrementally and reports the first failure pattern; ``stage``
    is the last boot stage its lines showed (:mod:`bootstage`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self._carry = ""
        self.stage = FIRST_STAGE

    def scan(self) -> str | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return None
        self.offset += len(chunk)
        text = self._carry + chunk.decode(errors="replace")
        lines = text.split("\n")
        self._carry = lines[-1][-4096:]
        for line in lines[:-1]:  # whole lines; the carry is read again with its end
            for label, pattern in FAILURE_PATTERNS:
                if pattern.search(line):
                    return f"{label}: {line.strip()[:200]}"
            stage = stage_of(line)
            if stage is not None:
                self.stage = stage
        for label, pattern in FAILURE_PATTERNS:  # a panic's last line may have no newline yet
            if pattern.search(lines[-1]):
                return f"{label}: {lines[-1].strip()[:200]}"
        return None


# Readiness reads cloud-init's own state files instead of running `cloud-init status`:
# that is a Python start-up in the guest (2 s warm, far more during boot under TCG), and
# polling it once a second stole the CPU from the very stages it waited for.
_SEP = "@@flightvm-result@@"
CLOUD_INIT_PROBE = (f"cat /run/cloud-init/status.json 2>/dev/null; echo; echo {_SEP}; "
                    "cat /run/cloud-init/result.json 2>/dev/null")


def _json_v1(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    v1 = data.get("v1") if isinstance(data, dict) else None
    return v1 if isinstance(v1, dict) else None


def cloud_init_state(output: str) -> tuple[str, str]:
    """Read CLOUD_INIT_PROBE's output the way `cloud-init status` reads those files.

    Returns ``(state, detail)``: ``"absent"`` (no status file: not started, disabled or
    not installed), ``"running"``, ``"done"`` (result.json written at the end of the
    final stage, no errors) or ``"error"`` (any stage reported one; detail lists them).
    """
    status_text, _, result_text = output.partition(_SEP)
    status, result = _json_v1(status_text.strip()), _json_v1(result_text.strip())
    if status is None and result is None:
        return "absent", ""
    errors: list[str] = []
    for stage, info in sorted((status or {}).items()):
        if isinstance(info, dict):
            errors += [f"{stage}: {e}" for e in info.get("errors") or []]
    if result is not None:
        errors += [str(e) for e in result.get("errors") or [] if not any(str(e) in x for x in errors)]
    if errors:
        return "error", "; ".join(errors)[:500]
    return ("done" if result is not None else "running"), ""


@dataclass
class Probe:
    """One way to look at the guest; returns None while undecided."""

    domain_state: Callable[[], str | None]  # None = running fine, else a failure description
    guest_ready: Callable[[], bool]  # True once ready; may raise BootError
    stage: Callable[[], str | None] = lambda: None  # a stage the console cannot show (SSH)


#: ``progress(elapsed_seconds, stage, done)``: called about once a second while a VM boots,
#: and once more with ``done=True`` (stage ``ready`` or ``failed``).
Progress = Callable[[float, str, bool], None]


def wait_until_ready(
    name: str,
    console: Path,
    probe: Probe,
    *,
    timeout: float,
    interval: float = 1.0,
    watcher: ConsoleWatcher | None = None,
    clock: Callable[[], float] = time.monotonic,
    progress: Progress | None = None,
) -> float:
    """Block until ready; return the seconds it took. Raise BootError on failure.

    ``progress`` hears the last stage seen (console or probe) about once a second."""
    start = clock()
    watcher = watcher or ConsoleWatcher(console)
    try:
        seconds = _wait(name, console, probe, start, timeout, interval, watcher, clock, progress)
    except BaseException:
        if progress is not None:
            progress(clock() - start, "failed", True)
        raise
    if progress is not None:
        progress(seconds, "ready", True)
    return seconds


def _wait(name: str, console: Path, probe: Probe, start: float, timeout: float,
          interval: float, watcher: ConsoleWatcher, clock: Callable[[], float],
          progress: Progress | None) -> float:
    deadline = start + timeout
    stage = watcher.stage
    seen: tuple[str, str | None] = (watcher.stage, None)

    def fail(reason: str) -> BootError:
        tail = console_tail(console)
        last = tail.splitlines()[-1].strip() if tail else "no console output"
        return BootError(f"VM {name} failed to boot: {reason} (last console line: {last!r})",
                         detail=tail)

    while True:
        hit = watcher.scan()
        if hit:
            raise fail(hit)
        state = probe.domain_state()
        if state:
            raise fail(state)
        if progress is not None:
            now = (watcher.stage, probe.stage())
            if now[0] != seen[0]:  # the last stage seen wins, from either source
                stage = now[0]
            if now[1] is not None and now[1] != seen[1]:
                stage = now[1]
            seen = now
            progress(clock() - start, stage, False)
        if probe.guest_ready():
            return clock() - start
        if clock() > deadline:
            raise fail(f"not ready after {timeout:.0f}s")
        time.sleep(interval)

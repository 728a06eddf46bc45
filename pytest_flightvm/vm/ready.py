"""Readiness as a race: success (cloud-init done, SSH answers, extra checks)
against failure (console patterns, a stuck guest, a paused or dead domain, the deadline).

A failed boot ends as soon as it is recognised, with the console tail in
the error; it never waits out the full timeout. A guest whose console shows it
is stuck (a kernel panic, a long soft lockup or hung task) raises GuestStuck,
which the factory answers with one fresh boot.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BootError, GuestStuck
from .bootstage import FIRST_STAGE, stage_of

# Console lines that mean the guest will never become ready.
FAILURE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("emergency mode", re.compile(r"You are in emergency mode|Entering emergency mode")),
    ("rescue mode", re.compile(r"You are in rescue mode")),
    ("initramfs shell", re.compile(r"\(initramfs\)|Dropping to a shell|dracut-emergency")),
    ("cloud-init crashed", re.compile(r"Failed to start .*[Cc]loud-init|cloud-init\[\d+\]:.*Traceback")),
    ("flightvm setup step failed", re.compile(r"flightvm-setup: step \S+ .*FAILED")),
)

# Console lines that mean the guest is stuck: it will not get further in this boot, and a
# fresh boot may well get through (TCG hangs of this kind are transient).
PANIC = re.compile(r"Kernel panic - not syncing")
LOCKUP_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # watchdog: BUG: soft lockup - CPU#0 stuck for 533s! [cryptomgr_test:51]
    ("soft lockup", re.compile(r"soft lockup - CPU#\d+ stuck for (\d+)s!")),
    # INFO: task kworker/0:1:12 blocked for more than 120 seconds.  (the hung_task detector)
    ("hung task", re.compile(r"blocked for more than (\d+) seconds")),
)
# A lockup counts as stuck only from this many seconds on. The kernel reports a soft
# lockup from 20 s, and under TCG on a loaded host a vCPU thread the host did not run
# for 20-60 s is reported as one and the guest boots on; that costs nothing, while a
# false "stuck" costs a whole reboot. A CPU or task frozen for 2 minutes, in a boot that
# takes about 1 minute idle and 3 loaded, is not coming back (the CI hang reported 533 s
# and grew). The hung-task detector's first report is at its timeout (120 s by default)
# and it repeats with the growing figure, so its reports pass the same test.
# RCU stall reports are ignored: they give jiffies of unknown HZ, and a CPU stuck that
# long also gets a soft-lockup report, which is judged here.
STUCK_SECONDS = 120

TAIL_LINES = 30


@dataclass(frozen=True)
class Hit:
    """A console line that ends the boot: ``label`` names it, ``stuck`` when the guest
    hung (a fresh boot may get through) rather than failed on its own."""

    label: str
    line: str
    stuck: bool = False

    def __str__(self) -> str:
        return f"{self.label}: {self.line}"


def stuck_hit(line: str) -> Hit | None:
    """The verdict on one console line: a Hit when it shows the guest stuck, else None."""
    text = line.strip()[:200]
    if PANIC.search(line):
        return Hit("kernel panic", text, stuck=True)
    for label, pattern in LOCKUP_PATTERNS:
        match = pattern.search(line)
        if match and int(match.group(1)) >= STUCK_SECONDS:
            return Hit(label, text, stuck=True)
    return None


def failure_hit(line: str) -> Hit | None:
    """A console line that ends the boot (stuck, or a failure a reboot would repeat)."""
    hit = stuck_hit(line)
    if hit is not None:
        return hit
    for label, pattern in FAILURE_PATTERNS:
        if pattern.search(line):
            return Hit(label, line.strip()[:200])
    return None


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

    def scan(self) -> Hit | None:
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
            hit = failure_hit(line)
            if hit is not None:
                return hit
            stage = stage_of(line)
            if stage is not None:
                self.stage = stage
        # a panic's last line may have no newline yet (a lockup's figure is whole only
        # once its "s!" / " seconds" is there, so a cut line never reads as a shorter one)
        return failure_hit(lines[-1])


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

    def fail(reason: str, hit: Hit | None = None) -> BootError:
        tail = console_tail(console)
        last = tail.splitlines()[-1].strip() if tail else "no console output"
        message = f"VM {name} failed to boot: {reason} (last console line: {last!r})"
        if hit is not None and hit.stuck:
            return GuestStuck(message, detail=tail, hit=str(hit))
        return BootError(message, detail=tail)

    while True:
        hit = watcher.scan()
        if hit:
            raise fail(str(hit), hit)
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

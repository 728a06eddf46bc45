"""P0: what an installed but unused plugin costs a pytest run at start-up."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from .common import Ctx, alternate, run_child, stat
from .figure import Bar, Figure, verdict

# a suite that uses no VM fixture: what every unrelated run on a machine with the plugin is
PLAIN_SUITE = "def test_plain():\n    assert 1 + 1 == 2\n"
TARGET_MS = 30.0


def p0_unused_plugin(ctx: Ctx) -> Figure:
    fig = Figure("P0", "installed, unused plugin: pytest start-up overhead (-n 0)",
                 target=f"≤{TARGET_MS:.0f} ms over `-p no:flightvm` (median of paired runs)",
                 unit="ms")
    where = ctx.scratch("p0")
    (where / "test_plain.py").write_text(PLAIN_SUITE)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
            "test_plain.py"]

    def timed(extra: list[str]) -> float:
        res = run_child([*base, *extra], cwd=where, timeout=120)
        if "1 passed" not in res.stdout:
            raise RuntimeError(f"plain suite did not pass: {res.stdout[-300:]}")
        return res.seconds

    contenders = {"plugin installed": lambda: timed([]),
                  "-p no:flightvm": lambda: timed(["-p", "no:flightvm"])}
    for run in contenders.values():  # warm-up (bytecode, page cache), not counted
        run()
    reps = max(10, ctx.reps * 5)
    runs = alternate(reps, contenders)
    with_s, without_s = stat(runs["plugin installed"]), stat(runs["-p no:flightvm"])
    # pairs run back to back, so each difference sees the same machine load
    diffs = [a - b for a, b in zip(runs["plugin installed"], runs["-p no:flightvm"], strict=True)]
    overhead_ms = statistics.median(diffs) * 1000
    fig.value = (f"{overhead_ms:.0f} ms median paired overhead "
                 f"(with {with_s.fmt('ms', 0, 1000)})")
    fig.reference = f"`-p no:flightvm` {without_s.fmt('ms', 0, 1000)}"
    fig.ratio = f"{with_s.median / without_s.median:.2f}x"
    fig.verdict = verdict(overhead_ms <= TARGET_MS)
    fig.data = {"with": with_s.as_dict(), "without": without_s.as_dict(),
                "paired_diffs_s": diffs, "overhead_ms": overhead_ms, "suite": PLAIN_SUITE}
    fig.bars = [Bar("plugin installed", stat([s * 1000 for s in with_s.samples])),
                Bar("-p no:flightvm", stat([s * 1000 for s in without_s.samples]), True)]
    fig.target_line = without_s.median * 1000 + TARGET_MS
    fig.notes.append(f"{reps} pairs in {Path(where).name}/, order alternating")
    return fig

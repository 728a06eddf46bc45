"""The flightvm summary section's lines, from an aggregate dict (no VM, no pytest), and
where the run's metrics JSON goes."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from pytest_flightvm.metrics import kept_lines, publish, summary_lines

DIGEST = "sha256:" + "ab" * 32


def _summary(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"resolves": [], "image_transfers": 0, "vms": [], "resets": []}
    return {**base, **over}


def test_image_and_vm_lines() -> None:
    lines = summary_lines(_summary(
        resolves=[{"source": "registry", "bytes": 481, "seconds": 1.26, "digest": DIGEST},
                  {"source": "local", "bytes": 0, "seconds": 0.0, "digest": DIGEST}],
        image_transfers=1,
        vms=[{"name": "a", "accel": "tcg", "start": "booted", "boot_seconds": 49.25,
              "revert_seconds": [0.5, 0.9, 0.7]},
             {"name": "b", "accel": "kvm", "start": "restored", "ready_seconds": 2.2,
              "boot_seconds": None, "revert_seconds": []},
             {"name": "c", "accel": "tcg", "start": "booted", "boot_seconds": None}],
    ))
    assert lines == [
        f"image: source=registry bytes=481 seconds=1.3 digest={DIGEST[:19]}",
        "image resolves: 1 transfer/build, 1 local hit(s)",
        "vm a: accel=tcg booted boot_to_ready=49.2s reverts=3 median=0.7s",
        "vm b: accel=kvm restored request_to_ready=2.2s",
        "vm c: not ready",
    ]


def test_resets_line_counts_kinds_fallbacks_and_reboots() -> None:
    resets = [{"mode": "restore", "ok": True, "seconds": 0.4},
              {"mode": "restore", "ok": True, "seconds": 2.0},
              {"mode": "internal", "ok": True, "seconds": 3.1},
              {"mode": "restore", "ok": False},
              {"mode": "reboot", "ok": True, "seconds": 50.0}]
    assert summary_lines(_summary(resets=resets))[-1] == (
        "resets: 3 internal/restore reset(s), median 2.0s, max 3.1s; 1 fresh boot(s); "
        "1 failed revert(s) replaced by a fresh boot")
    only_reboots = summary_lines(_summary(resets=[resets[-1]]))
    assert only_reboots[-1] == "resets: 0 pristine reset(s); 1 fresh boot(s)"
    assert not any(line.startswith("resets:") for line in summary_lines(_summary()))


def test_kept_lines_and_publish(tmp_path: Path) -> None:
    (tmp_path / "kept-vm1.txt").write_text("flightvm: kept VM vm1\n  ssh:     ssh ...\n")
    (tmp_path / "other.txt").write_text("not a hint\n")
    assert kept_lines(tmp_path) == ["flightvm: kept VM vm1\n  ssh:     ssh ..."]
    summary = _summary(run_id="r1")
    metrics = tmp_path / "out" / "m.json"
    lines = publish(summary, "r1", metrics=metrics, artifacts=tmp_path / "ci")
    assert json.loads(metrics.read_text()) == summary
    assert lines[0] == f"metrics written to {metrics}"
    assert lines[1] == f"artifacts (consoles, metrics) in {tmp_path / 'ci'} (flightvm-r1.metrics.json)"
    assert stat.S_IMODE((tmp_path / "ci" / "flightvm-r1.metrics.json").stat().st_mode) == 0o600
    (tmp_path / "afile").write_text("x")
    bad = publish(summary, "r1", metrics=None, artifacts=tmp_path / "afile")
    assert len(bad) == 1 and bad[0].startswith("flightvm: artifacts not written: ")
    assert publish(summary, "r1", metrics=None, artifacts=None) == []

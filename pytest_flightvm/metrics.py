"""Run metrics: each process writes its own file; the controller aggregates and reports them.

Layout under the run dir:
- ``resolves.jsonl``: one line per image resolve (written by cache.resolve);
- ``metrics/<worker>.json``: the VMs a worker booted or restored (``start``), their
  request-to-ready, boot and revert seconds, boot attempts and accel; the boots whose
  guest hung (``hung_boots``);
- ``kept-<vm>.txt``: how to reach a VM kept for debugging (``vm.session``).

The controller's terminal summary is :func:`run_summary`: :func:`summary_lines` and
:func:`kept_lines` of the aggregate, then :func:`publish` (the ``--flightvm-metrics``
file, the artifacts copy).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .vm.factory import RunContext, VMFactory


def write_worker_metrics(run: RunContext, image: Any, factory: VMFactory,
                         resets: list[dict[str, Any]] | None = None) -> Path:
    out = run.run_dir / "metrics"
    out.mkdir(exist_ok=True)
    vms = [
        {
            "name": m.name,
            "worker": run.worker,
            "accel": m.accel,
            "memory_mib": m.spec.memory_mib,
            "vcpus": m.spec.vcpus,
            "start": m.started,  # "booted", or "restored" from a saved booted state
            "boot_seconds": m.boot_seconds,  # boot -> ready (booted VMs)
            # request -> ready: a boot's time (every boot's, when one hung), or a restore's
            "ready_seconds": m.ready_seconds if m.ready_seconds is not None else m.boot_seconds,
            "boot_attempts": m.boot_attempts,  # 2: the first boot hung (factory._boot_unstuck)
            "restore_phases": {k: round(v, 3) for k, v in m.phases.items()}
            if m.started == "restored" else None,
            "revert_seconds": list(m.revert_seconds),
            "pristine_seconds": m.pristine_seconds,
            "firmware": m.spec.firmware.name,
            "tpm": m.spec.tpm,
            "cpu": m.spec.cpu_model,
        }
        for m in factory.booted
    ]
    data = {"worker": run.worker, "pid": os.getpid(),
            "image": {"source": getattr(image, "source", None),
                      "digest": getattr(image, "digest", None),
                      "seconds": getattr(image, "seconds", None),
                      "bytes": getattr(image, "bytes_moved", None)},
            "host": factory.host.label,
            "uploads": list(factory.uploads),
            "vms": vms,
            "hung_boots": list(factory.hung_boots),
            "resets": resets or []}
    path = out / f"{run.worker}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def read_resolves(run_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (run_dir / "resolves.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def aggregate(run: RunContext) -> dict[str, Any]:
    resolves = read_resolves(run.run_dir)
    vms: list[dict[str, Any]] = []
    resets: list[dict[str, Any]] = []
    uploads: list[dict[str, Any]] = []
    hung: list[dict[str, Any]] = []
    hosts: dict[str, str] = {}
    workers = []
    for path in sorted((run.run_dir / "metrics").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        workers.append(data["worker"])
        vms.extend(data.get("vms", []))
        resets.extend(data.get("resets", []))
        uploads.extend(data.get("uploads", []))
        hung.extend(data.get("hung_boots", []))
        if data.get("host"):
            hosts[data["worker"]] = data["host"]
    reverts = [s for vm in vms for s in vm.get("revert_seconds", [])]
    return {
        "run_id": run.run_id,
        "workers": workers,
        "resolves": resolves,
        "image_transfers": sum(1 for r in resolves if r.get("source") != "local"),
        "vms": vms,
        # boots whose guest hung (a panic, a long lockup): vm, attempt, reason, seconds,
        # retried (false: the VM's last boot, which failed)
        "hung_boots": hung,
        "revert_seconds": reverts,
        "resets": resets,  # one entry per reset, with the test it ran before
        "hosts": hosts,  # worker -> libvirt host (URI without its query)
        # base uploads to remote hosts: bytes 0 and skipped true when the pool had the digest
        "uploads": uploads,
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary section's lines for an :func:`aggregate`: images moved or built, the
    resolve count, one line per VM (booted or restored, with its reverts), the resets."""
    lines = []
    for res in summary["resolves"]:
        if res["source"] != "local":
            lines.append(f"image: source={res['source']} bytes={res['bytes']} "
                         f"seconds={res['seconds']:.1f} digest={res['digest'][:19]}")
    local_hits = sum(1 for r in summary["resolves"] if r["source"] == "local")
    lines.append(f"image resolves: {summary['image_transfers']} transfer/build, "
                 f"{local_hits} local hit(s)")
    for vm in summary["vms"]:
        reverts = vm.get("revert_seconds") or []
        rev = f" reverts={len(reverts)} median={sorted(reverts)[len(reverts) // 2]:.1f}s" \
            if reverts else ""
        ready = vm.get("ready_seconds")
        if vm.get("start") == "restored" and ready is not None:
            lines.append(f"vm {vm['name']}: accel={vm['accel']} restored "
                         f"request_to_ready={ready:.1f}s{rev}")
            continue
        boot = vm.get("boot_seconds")
        attempts = vm.get("boot_attempts") or 1
        again = (f" boot_attempts={attempts} request_to_ready={ready:.1f}s"
                 if attempts > 1 and ready is not None else "")
        lines.append(f"vm {vm['name']}: accel={vm['accel']} booted boot_to_ready="
                     f"{boot:.1f}s{again}{rev}" if boot is not None
                     else f"vm {vm['name']}: not ready")
    for hung in summary.get("hung_boots") or []:
        then = "booted once more" if hung.get("retried") else "boot failed"
        lines.append(f"vm {hung['vm']}: boot {hung['attempt']} hung after {hung['seconds']:.0f}s "
                     f"({hung['reason'][:120]}); {then}")
    resets = summary["resets"]
    if resets:
        reverts = sorted(r["seconds"] for r in resets if r["mode"] != "reboot" and r["ok"])
        fallbacks = sum(1 for r in resets if r["mode"] != "reboot" and not r["ok"])
        reboots = sum(1 for r in resets if r["mode"] == "reboot")
        kinds = "/".join(sorted({r["mode"] for r in resets if r["mode"] != "reboot"})) or "pristine"
        med = f", median {reverts[len(reverts) // 2]:.1f}s, max {reverts[-1]:.1f}s" if reverts else ""
        lines.append(f"resets: {len(reverts)} {kinds} reset(s){med}; {reboots} fresh boot(s)"
                     + (f"; {fallbacks} failed revert(s) replaced by a fresh boot" if fallbacks else ""))
    return lines


def kept_lines(run_dir: Path) -> list[str]:
    """The hints of the VMs kept in this run (``kept-*.txt``: ssh, console, remove)."""
    return [kept.read_text().rstrip() for kept in run_dir.glob("kept-*.txt")]


def publish(summary: dict[str, Any], run_id: str, *, metrics: Path | None,
            artifacts: Path | None) -> list[str]:
    """Write the summary as JSON to ``metrics`` and into the ``artifacts`` dir (each when
    set); the lines saying where. A dir the artifacts cannot go to is one line, not an
    error: the tests have run by now."""
    lines = []
    text = json.dumps(summary, indent=2, default=str)
    if metrics:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(text)
        lines.append(f"metrics written to {metrics}")
    if artifacts is not None:
        from . import artifacts as store

        try:
            where = store.artifact_dir(artifacts)
            path = store.write_new(where, f"flightvm-{run_id}", ".metrics.json", text.encode())
        except (ConfigError, OSError) as exc:
            lines.append(f"flightvm: artifacts not written: {exc}")
        else:
            lines.append(f"artifacts (consoles, metrics) in {where} ({path.name})")
    return lines


def run_summary(run_id: str, run_dir: Path, metrics: Path | None,
                artifacts: Path | None) -> list[str]:
    """The terminal summary's lines for the run, the summary published (:func:`publish`,
    its lines last); none when the run resolved no image and made no VM."""
    summary = aggregate(RunContext(run_id, run_dir))
    if not summary["resolves"] and not summary["vms"]:
        return []
    lines = summary_lines(summary) + kept_lines(run_dir)
    return lines + publish(summary, run_id, metrics=metrics, artifacts=artifacts)

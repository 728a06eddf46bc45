"""Run metrics: each process writes its own file; the controller aggregates.

Layout under the run dir:
- ``resolves.jsonl``: one line per image resolve (written by cache.resolve);
- ``metrics/<worker>.json``: the VMs a worker booted or restored (``start``), their
  request-to-ready, boot and revert seconds and accel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
            # request -> ready: a boot's time, or a restore's from a saved state
            "ready_seconds": m.ready_seconds if m.started == "restored" else m.boot_seconds,
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
        if data.get("host"):
            hosts[data["worker"]] = data["host"]
    reverts = [s for vm in vms for s in vm.get("revert_seconds", [])]
    return {
        "run_id": run.run_id,
        "workers": workers,
        "resolves": resolves,
        "image_transfers": sum(1 for r in resolves if r.get("source") != "local"),
        "vms": vms,
        "revert_seconds": reverts,
        "resets": resets,  # one entry per reset, with the test it ran before
        "hosts": hosts,  # worker -> libvirt host (URI without its query)
        # base uploads to remote hosts: bytes 0 and skipped true when the pool had the digest
        "uploads": uploads,
    }

"""Child processes of the fault tier (run as ``python fault_child.py MODE JSON``).

``cli``: run the real ``flightvm`` CLI (``pytest_flightvm.cli.main``) with
*observers*: thin wrappers that report how far the operation got on stdout
(``@write <bytes>``, ``@commit``, ``@ref``, ``@sent <bytes>``, ``@manifest``,
``@build``, ``@built``) and change nothing else, so the parent can kill -9 the
process at a chosen point of a real pull, build or push. With ``go`` set, the
child finishes its imports, then waits for that file to exist (a start line
for N processes at once).

``live-vm``: define and start one flightvm domain through ``VMFactory`` for a
*live* run (its owner, this process, stays alive), without waiting for the
guest to be ready; print its name and files as JSON, then sleep until killed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def emit(event: str) -> None:
    sys.stdout.write(f"@{event}\n")
    sys.stdout.flush()


def observe(kinds: list[str]) -> None:
    from pytest_flightvm.cache import build, store
    from pytest_flightvm.cache.registry import transfer

    if "write" in kinds:  # a chunk landed in the temp file: written, or spliced
        for name in ("write", "splice"):
            real = getattr(store.BlobWriter, name)

            def landed(self: Any, arg: Any, _real: Any = real) -> int:
                n = _real(self, arg)
                emit(f"write {self.bytes}")
                return n

            setattr(store.BlobWriter, name, landed)
    if "commit" in kinds:
        real_commit = store.BlobWriter.commit

        def commit(self: Any) -> str:
            digest = real_commit(self)
            emit("commit")
            return digest

        store.BlobWriter.commit = commit  # type: ignore[method-assign]
    if "ref" in kinds:
        real_set_ref = store.Store.set_ref

        def set_ref(self: Any, name: str, digest: str, **info: Any) -> None:
            real_set_ref(self, name, digest, **info)
            emit("ref")

        store.Store.set_ref = set_ref  # type: ignore[method-assign]
    if "sent" in kinds:
        real_chunks = transfer.file_chunks

        def file_chunks(path: Path, progress: Any) -> Any:
            sent = 0
            for chunk in real_chunks(path, progress):
                yield chunk
                sent += len(chunk)
                emit(f"sent {sent}")

        transfer.file_chunks = file_chunks
    if "manifest" in kinds:
        real_put = transfer.put_manifest

        def put_manifest(client: Any, manifest: Any, tag: str) -> str:
            emit("manifest")
            return real_put(client, manifest, tag)

        transfer.put_manifest = put_manifest
    if "build" in kinds:
        real_build = build.CommandBuilder.build

        def run_build(self: Any, output: Path, **kw: Any) -> None:
            emit("build")
            real_build(self, output, **kw)
            emit("built")

        build.CommandBuilder.build = run_build  # type: ignore[method-assign]


def run_cli(spec: dict[str, Any]) -> int:
    from pytest_flightvm import cli

    observe(spec.get("observe", []))
    go = spec.get("go")
    emit("ready")
    if go:
        while not os.path.exists(go):
            time.sleep(0.002)
    return cli.main(spec["argv"])


def live_vm(spec: dict[str, Any]) -> int:
    from pytest_flightvm.config import Settings
    from pytest_flightvm.startup import new_run_id
    from pytest_flightvm.vm.factory import RunContext, VMFactory
    from pytest_flightvm.vm.machine import Machine
    from pytest_flightvm.vm.reaper import write_run_file

    settings = Settings(cache_dir=Path(spec["cache_dir"]), accel=spec.get("accel", "tcg"),
                        libvirt_uri="qemu:///system")
    run = RunContext.create(settings, new_run_id(), "live")
    write_run_file(run.run_dir)
    # Started, not waited for: this run only has to be alive and own a running domain.
    Machine.wait_ready = lambda self, **kw: 0.0  # type: ignore[method-assign]
    factory = VMFactory(settings, Path(spec["base"]), run)
    vm = factory.create()
    print(json.dumps({"name": vm.name, "vm_dir": str(vm.vm_dir), "run_dir": str(run.run_dir),
                      "overlay": str(vm.spec.overlay), "seed": str(vm.spec.seed_iso),
                      "key": str(factory.key_path), "pid": os.getpid()}), flush=True)
    while True:
        time.sleep(60)


def main() -> int:
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    if mode == "cli":
        return run_cli(spec)
    if mode == "live-vm":
        return live_vm(spec)
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    raise SystemExit(main())

"""write_run_file under xdist: several workers of one run may write the run file at once."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

from pytest_flightvm.vm.reaper import RUN_FILE, write_run_file


def _write_many(run_dir: str, owner: int, n: int) -> None:
    for _ in range(n):
        write_run_file(Path(run_dir), pid=owner)


def test_concurrent_writers_of_one_run_dir_do_not_collide(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), os.getpid(), 200))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert json.loads((tmp_path / RUN_FILE).read_text())["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == [RUN_FILE]  # no temp file left behind

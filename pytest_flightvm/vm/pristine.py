"""The ``restore`` reset: a ready VM saved once (memory, frozen disk, NVRAM), restored per test.

Works for every firmware, and is what ``--flightvm-reset snapshot`` uses (figures in
docs/BENCHMARKS.md, P6). At the pristine point:

1. the running domain is saved to a state file (memory and device state; QEMU's TPM
   emulator state travels inside that stream, so the TPM comes back with it);
2. its disk overlay is frozen read-only (``pristine.qcow2``) and the NVRAM copied
   (``pristine-nvram.fd``): a restore brings back memory only, the disk and the
   variable store are whatever the files hold;
3. then it is restored as in every reset: the domain is destroyed, an empty overlay is
   put on the frozen disk, the NVRAM copy is written back, the state file restored,
   and :func:`resume.after_resume` waits for SSH and sets the clock.

Everything lives in the VM's own 0700 dir and goes with it, unless the state cache
(:mod:`statecache`) took the files into its store at step 2: then a reset restores
from there, exactly as a VM restored from a cached state does (one mechanism).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .disk import create_overlay
from .resume import after_resume, within

if TYPE_CHECKING:
    from .machine import Machine

DEADLINE = 120.0  # a save writes the guest's RAM (1-2 GiB at most); restores take seconds


@dataclass(frozen=True)
class Pristine:
    """The files a VM returns to."""

    state: Path  # libvirt save file: memory + device state (+ TPM)
    disk: Path  # the frozen overlay, read-only; each reset puts a fresh overlay on it
    nvram: Path | None  # copy of the UEFI variable store, None under BIOS


def capture(machine: Machine, *, deadline: float = DEADLINE,
            publish: Callable[[Pristine], Pristine | None] | None = None,
            ) -> tuple[Pristine, float]:
    """Save ``machine`` as its pristine point and resume it from there.

    ``publish`` (the state cache) may take the saved files while the guest is stopped
    and hand back where they now are; the VM then resets from there."""
    start = time.monotonic()
    machine.ssh.close()
    vm_dir = machine.vm_dir
    state = vm_dir / "pristine.state"
    within(deadline, f"save of {machine.name}", lambda: machine.dom.save(str(state)))
    state.chmod(0o600)  # guest memory: keys, tokens
    disk = vm_dir / "pristine.qcow2"
    os.replace(machine.spec.overlay, disk)
    disk.chmod(0o400)
    nvram = None
    if machine.spec.nvram is not None:
        nvram = vm_dir / "pristine-nvram.fd"
        shutil.copyfile(machine.spec.nvram, nvram)
        nvram.chmod(0o400)
    pristine = Pristine(state, disk, nvram)
    if publish is not None:
        pristine = publish(pristine) or pristine
    _restore_files_and_state(machine, pristine, deadline)
    after_resume(machine, start, deadline)
    return pristine, time.monotonic() - start


def restore(machine: Machine, pristine: Pristine, *, deadline: float = DEADLINE) -> float:
    """Return ``machine`` to ``pristine``: disk, memory, NVRAM and TPM. ResetFailed on failure."""
    start = time.monotonic()
    machine.ssh.close()
    _restore_files_and_state(machine, pristine, deadline)
    after_resume(machine, start, deadline)
    return time.monotonic() - start


def _restore_files_and_state(machine: Machine, pristine: Pristine, deadline: float) -> None:
    import libvirt

    def do_restore() -> None:
        if machine.dom.isActive():
            machine.dom.destroy()
        create_overlay(pristine.disk, machine.spec.overlay)
        if pristine.nvram is not None and machine.spec.nvram is not None:
            shutil.copyfile(pristine.nvram, machine.spec.nvram)
            machine.spec.nvram.chmod(0o600)
        machine.conn.restoreFlags(str(pristine.state), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)

    within(deadline, f"restore of {machine.name}", do_restore)

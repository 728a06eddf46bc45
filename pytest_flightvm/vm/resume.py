"""What a VM needs after it resumes from a saved point: SSH back, the clock now, fresh entropy.

Shared by both per-test reset mechanisms (``pristine``: save/restore, ``snapshot``:
internal qcow2 snapshot). A resumed guest wakes with the clock of the moment it was
saved and the random state of that moment, in every test alike:
- the clock is set through the guest agent (virtio-serial, no SSH needed) while SSH
  comes back, else over SSH;
- the kernel's RNG is reseeded by the VM generation ID (``<genid/>``: libvirt gives a
  restored domain a new one, and Linux >= 5.18 reseeds on the change), and the first
  SSH command mixes 64 bytes of host randomness into the guest's pool as well.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ResetFailed
from .libvirt_conn import error_text

if TYPE_CHECKING:
    from .machine import Machine


def within(deadline: float, what: str, action: Callable[[], Any]) -> None:
    """Run ``action`` in a thread; ResetFailed if it raises or outlives ``deadline``."""
    outcome: dict[str, BaseException | None] = {"error": None}

    def target() -> None:
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=target, name=what, daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise ResetFailed(f"{what} did not finish in {deadline:.0f}s")
    if outcome["error"] is not None:
        raise ResetFailed(f"{what} failed: {error_text(outcome['error'])}")


def after_resume(machine: Machine, start: float, deadline: float) -> None:
    """Wait for SSH (feeding the guest's RNG), set the clock; ResetFailed past ``deadline``."""
    clock_set = threading.Event()
    clock = threading.Thread(target=_agent_set_time, args=(machine, clock_set),
                             name=f"clock-{machine.name}", daemon=True)
    clock.start()
    while True:
        res = machine.ssh.run("cat > /dev/urandom", check=False, timeout=10, connect_timeout=3,
                              stdin=os.urandom(64))
        if res.ok:
            break
        if time.monotonic() - start > deadline:
            raise ResetFailed(f"{machine.name}: SSH did not answer {deadline:.0f}s after the reset")
        time.sleep(0.1)
    clock.join(10)
    if not clock_set.is_set():
        machine.run(f"sudo date -u -s @{time.time():.3f} >/dev/null", check=False, timeout=15)


def _agent_set_time(machine: Machine, done: threading.Event) -> None:
    now = time.time()
    try:
        machine.dom.setTime({"seconds": int(now), "nseconds": int((now % 1) * 1e9)}, 0)
    except Exception:  # noqa: BLE001 - no guest agent (yet): the caller falls back to ssh
        return
    done.set()


"""What a VM needs after it resumes from a saved point: SSH back, the clock now, fresh entropy.

Shared by both per-test reset mechanisms (``pristine``: save/restore, ``snapshot``:
internal qcow2 snapshot). A resumed guest wakes with the clock of the moment it was
saved and the random state of that moment, in every test alike:
- the clock is set over the SSH connection that just came back (``sudo -n date``),
  else through the guest agent;
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
    while True:
        res = machine.ssh.run("cat > /dev/urandom", check=False, timeout=10, connect_timeout=3,
                              stdin=os.urandom(64))
        if res.ok:
            break
        if time.monotonic() - start > deadline:
            raise ResetFailed(f"{machine.name}: SSH did not answer {deadline:.0f}s after the reset")
        time.sleep(0.1)
    # One more channel on the connection just opened (~0.1 s); the guest agent's
    # guest-set-time also runs `hwclock -w` in the guest, which waits for an RTC second
    # boundary: 2.5-4.5 s after a restore here, longer than SSH took to come back.
    res = machine.ssh.run(f"sudo -n date -u -s @{time.time():.3f} >/dev/null", check=False,
                          timeout=15)
    if not res.ok:
        _agent_set_time(machine)


def _agent_set_time(machine: Machine) -> None:
    """No passwordless sudo in the guest: set the clock through the guest agent, if any."""
    now = time.time()
    try:
        machine.dom.setTime({"seconds": int(now), "nseconds": int((now % 1) * 1e9)}, 0)
    except Exception:  # noqa: BLE001 - no guest agent either: the clock stays as saved
        return

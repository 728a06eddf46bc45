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
import shlex
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
    """Wait for SSH (feeding the guest's RNG), set the clock; ResetFailed past ``deadline``.

    A VM restored from another VM's saved state (``machine.authorized_key`` set) first gets
    the run's public key as its login's only authorized key, through the guest agent
    (the saved disk holds the key of the run that saved it), and after SSH is back its
    hostname changes from the saving VM's name to its own."""
    t0 = time.monotonic()
    machine.phases["restore"] = t0 - start
    if machine.authorized_key is not None:
        install_key(machine, machine.authorized_key, start, deadline)
    t1 = time.monotonic()
    machine.phases["ssh_key"] = t1 - t0
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
    rename = ""
    if machine.rename_from and machine.rename_from != machine.name:
        # only the name cloud-init gave the saving VM: a hostname from user-data stays
        old, new = shlex.quote(machine.rename_from), shlex.quote(machine.name)
        rename = (f" && if [ \"$(hostname)\" = {old} ]; then sudo -n hostname {new} && "
                  f"echo {new} | sudo -n tee /etc/hostname >/dev/null; fi")
    t2 = time.monotonic()
    machine.phases["ssh_up"] = t2 - t1
    for _attempt in range(3):  # a loaded host can drop one SSH channel; the time is taken anew
        res = machine.ssh.run(f"sudo -n date -u -s @{time.time():.3f} >/dev/null{rename}",
                              check=False, timeout=15)
        if res.returncode not in (124, 255) or time.monotonic() - start > deadline:
            break  # 255: ssh failed, 124: timed out; anything else is the guest's answer
    machine.phases["clock"] = time.monotonic() - t2
    if not res.ok:
        _agent_set_time(machine)


def _agent_set_time(machine: Machine) -> None:
    """No passwordless sudo in the guest: set the clock through the guest agent, if any."""
    now = time.time()
    try:
        machine.dom.setTime({"seconds": int(now), "nseconds": int((now % 1) * 1e9)}, 0)
    except Exception:  # noqa: BLE001 - no guest agent either: the clock stays as saved
        return


def install_key(machine: Machine, public_key: str, start: float, deadline: float) -> None:
    """Make ``public_key`` the only authorized key of the machine's login, through the guest
    agent (libvirt's virDomainAuthorizedSSHKeysSet: qemu-guest-agent's
    guest-ssh-add-authorized-keys with reset). The agent answers a second or so after a
    restore; until ``deadline`` it is asked again. ResetFailed when it never does."""
    last = ""
    while True:
        try:
            machine.dom.authorizedSSHKeysSet(machine.ssh.user, [public_key], 0)
            return
        except Exception as exc:  # noqa: BLE001 - libvirtError: the agent is not up yet
            last = error_text(exc)
        if time.monotonic() - start > deadline:
            raise ResetFailed(f"{machine.name}: the guest agent did not take the run's SSH key "
                              f"within {deadline:.0f}s ({last}); the image needs "
                              "qemu-guest-agent for restored states")
        time.sleep(0.2)

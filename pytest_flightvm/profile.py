"""The shape of a VM profile: what one kind of VM adds to its seed, readiness and resets.

A profile is a small typed object (the flightctl profile, ``flightctl.FlightctlProfile``,
is one). The plugin calls it around the user's hooks, in this order:

- boot: seed with ``user_data`` and ``seed_payload``; ready once every ``ready_checks``
  entry returns True;
- before the pristine state: ``before_snapshot(vm)``, then the user's
  ``pytest_flightvm_before_snapshot`` hook, then the snapshot;
- after every reset (and right after the snapshot): ``after_revert(vm)``, then the
  user's ``pytest_flightvm_after_revert`` hook, then ``resume(vm)``;
- per test, before the VM is acquired: ``configure(marker_kwargs)``;
- on a failed boot: ``diagnose(vm)`` adds to the report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

ReadyCheck = Callable[[Any], bool]


class VMProfile(Protocol):
    """What the plugin needs from a profile (structural: no base class to inherit)."""

    name: str
    user_data: tuple[Mapping[str, Any], ...]
    seed_payload: Mapping[str, bytes]
    ready_checks: tuple[ReadyCheck, ...]

    def configure(self, marks: Mapping[str, Any]) -> None: ...

    def before_snapshot(self, vm: Any) -> None: ...

    def after_revert(self, vm: Any) -> None: ...

    def resume(self, vm: Any) -> None: ...

    def diagnose(self, vm: Any) -> str: ...

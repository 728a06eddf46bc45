"""Boot stages read off a guest console: what a live status line says while a VM boots.

Pytest-free: :mod:`vm.ready` feeds console lines to :func:`stage_of` while it waits, and
the plugin prints the stage with the elapsed time (``format_status``). The stages, in the
order a guest passes them: ``firmware`` (nothing on the console yet, or OVMF/SeaBIOS
lines), ``bootloader``, ``kernel``, ``systemd``, ``cloud-init <stage>`` (init-local, init,
modules:config, modules:final, then ``cloud-init done``), the flightctl profile's
``setup step N/M NAME``; ``SSH`` comes from the readiness probe, not the console.
"""

from __future__ import annotations

import re

FIRST_STAGE = "firmware"
SSH_STAGE = "SSH answers"

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# First match wins; each pattern is anchored on text only that stage prints.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Cloud-init v\. \S+ running '([a-z:-]+)'"), "cloud-init {0}"),
    (re.compile(r"Cloud-init v\. \S+ finished"), "cloud-init done"),
    (re.compile(r"flightvm-setup: step (\d+/\d+) (\S+)"), "setup step {0} {1}"),
    (re.compile(r"\] Linux version \d"), "kernel"),
    (re.compile(r"systemd\[1\]: systemd \d\S* running|^Welcome to .*Linux"), "systemd"),
    (re.compile(r"Booting `|GNU GRUB|Welcome to GRUB|Loading Linux "), "bootloader"),
    (re.compile(r"BdsDxe:|SeaBIOS|iPXE|Booting from "), "firmware"),
)


def stage_of(line: str) -> str | None:
    """The stage a console line shows the guest has reached, or None for any other line."""
    text = _ESCAPES.sub("", line).replace("\r", "").strip()
    if not text:
        return None
    for pattern, label in _PATTERNS:
        match = pattern.search(text)
        if match:
            return label.format(*match.groups())
    return None


def format_status(name: str, elapsed: float, stage: str) -> str:
    """One status line: ``flightvm: booting NAME  42s  cloud-init init``."""
    return f"flightvm: booting {name}  {elapsed:4.0f}s  {stage}"

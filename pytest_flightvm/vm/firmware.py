"""Guest hardware beyond QEMU's defaults: which firmware files, TPM and CPU model a VM gets.

The OVMF builds come from Debian's ``ovmf`` package; each UEFI VM gets its own 0600
copy of the variable store (NVRAM), made here and removed with the VM. The TPM is
libvirt's emulator backend (``swtpm``). A CPU model is checked against what this
libvirt and QEMU know before any VM starts. The XML itself is written by ``domain``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ToolMissingError

OVMF_DIR = Path("/usr/share/OVMF")


@dataclass(frozen=True)
class Firmware:
    """One ``--flightvm-firmware`` choice."""

    name: str
    code: Path | None = None  # OVMF code (read-only pflash); None = BIOS (SeaBIOS)
    vars_template: Path | None = None  # copied per VM into its NVRAM file
    secure: bool = False  # Secure Boot-capable code: loader secure='yes' and SMM on

    @property
    def uefi(self) -> bool:
        return self.code is not None


FIRMWARES: dict[str, Firmware] = {
    "bios": Firmware("bios"),
    "uefi": Firmware("uefi", OVMF_DIR / "OVMF_CODE_4M.fd", OVMF_DIR / "OVMF_VARS_4M.fd"),
    # Microsoft's keys enrolled: shim-signed guests boot with Secure Boot enforced.
    "uefi-secure": Firmware("uefi-secure", OVMF_DIR / "OVMF_CODE_4M.secboot.fd",
                            OVMF_DIR / "OVMF_VARS_4M.ms.fd", secure=True),
    # Upstream flightctl's domain template: Secure Boot-capable code with SMM, no keys
    # enrolled (so Secure Boot is off and any guest boots).
    "uefi-secure-unenrolled": Firmware("uefi-secure-unenrolled",
                                       OVMF_DIR / "OVMF_CODE_4M.secboot.fd",
                                       OVMF_DIR / "OVMF_VARS_4M.fd", secure=True),
}


def firmware(name: str) -> Firmware:
    try:
        return FIRMWARES[name]
    except KeyError:
        raise ConfigError(f"unknown firmware {name!r}; use one of {', '.join(FIRMWARES)}") from None


def check_host(fw: Firmware, *, tpm: bool) -> None:
    """ToolMissingError (one line) when this host lacks the firmware files or swtpm."""
    for path in (fw.code, fw.vars_template):
        if path is not None and not path.is_file():
            raise ToolMissingError(f"firmware {fw.name} needs {path}, which is missing; "
                                   "install it with: apt-get install ovmf")
    if tpm and shutil.which("swtpm") is None:
        raise ToolMissingError("--flightvm-tpm needs swtpm; install it with: "
                               "apt-get install swtpm swtpm-tools")


def new_nvram(fw: Firmware, dest: Path) -> Path | None:
    """This VM's own 0600 copy of the firmware's variable store (None under BIOS)."""
    if fw.vars_template is None:
        return None
    data = fw.vars_template.read_bytes()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return dest


def cpu_models(conn: Any, *, accel: str, emulator: str) -> dict[str, bool]:
    """The CPU models this libvirt/QEMU offers for ``accel``: name -> usable without warnings."""
    import xml.etree.ElementTree as ET

    virttype = "kvm" if accel == "kvm" else "qemu"
    caps = conn.getDomainCapabilities(emulator, "x86_64", "q35", virttype, 0)
    models: dict[str, bool] = {}
    for el in ET.fromstring(caps).iterfind("cpu/mode[@name='custom']/model"):
        if el.text:
            models[el.text.strip()] = el.get("usable") == "yes"
    return models


def check_cpu(conn: Any, model: str, *, accel: str, emulator: str) -> bool:
    """ConfigError naming ``model`` when QEMU does not know it; else whether it is fully
    usable under ``accel`` (TCG lacks a few features of most named models, e.g. pcid and
    x2apic for Haswell: QEMU warns and boots, and none of them is part of x86-64-v3)."""
    if model in ("max", "host-model"):
        return True
    models = cpu_models(conn, accel=accel, emulator=emulator)
    if model not in models:
        close = sorted(m for m in models if m.lower()[:4] == model.lower()[:4])[:6]
        hint = f" (close: {', '.join(close)})" if close else " (see: virsh domcapabilities)"
        raise ConfigError(f"CPU model {model!r} is unknown to this QEMU{hint}; "
                          "fix --flightvm-cpu")
    return models[model]

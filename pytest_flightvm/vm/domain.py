"""libvirt domain XML for a flightvm guest, and the metadata the reaper reads.

Choices that docs/HOST.md measured on this kind of host:
- the seed ISO sits on a virtio-scsi cdrom (Debian's cloud kernel has no AHCI);
- networking is QEMU user-mode (closed with ``restrict=on`` unless the suite opts
  into outbound access) with an SSH forward bound to 127.0.0.1, passed
  through ``qemu:commandline`` with an explicit PCI slot (libvirt 9's passt
  backend does not work here);
- a static DAC label with ``relabel='no'`` makes QEMU run as root and keeps
  libvirt from chowning the shared, read-only base behind our back;
- the serial console is a pty (``virsh console NAME`` attaches to it) whose output
  virtlogd also appends to ``console_log``: the file every console reader uses
  (readiness, ``--flightvm-console``, failure reports, artifacts);
- the overlay is a throwaway: ``cache='unsafe'`` drops the guest's flushes (a VM is never
  resumed after a host crash) and lets a reset's destroy skip writing the overlay back.
"""

from __future__ import annotations

import os
import random
import re
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ..procs import pid_namespace, process_start
from .firmware import FIRMWARES, Firmware

METADATA_NS = "https://flightvm.dev/xmlns/vm/1"
METADATA_PREFIX = "flightvm"
NAME_PREFIX = "flightvm-"
RUN_ID_RE = re.compile(r"^[0-9]{12}-[0-9a-f]{4}$")
VM_NAME_RE = re.compile(r"^flightvm-[A-Za-z0-9][A-Za-z0-9_.-]{0,53}$")


def vm_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a VM (domain and run-dir) name, or None when it can."""
    if not VM_NAME_RE.match(name) or ".." in name:
        return ("must be flightvm- followed by up to 54 letters, digits, '_', '.' or '-' "
                "(no '/', no '..')")
    return None


@dataclass(frozen=True)
class Owner:
    """Who owns a domain: enough for the reaper to tell dead runs from live ones."""

    run_id: str
    pid: int
    pid_start: str  # /proc/<pid>/stat start time, so a reused pid is not mistaken
    host: str
    worker: str
    run_dir: str
    pid_ns: str = ""  # inode of the owner's /proc/self/ns/pid: its pid means nothing elsewhere

    @classmethod
    def current(cls, run_id: str, worker: str, run_dir: Path) -> Owner:
        pid = os.getpid()
        return cls(run_id, pid, process_start(pid) or "", socket.gethostname(), worker,
                   str(run_dir), pid_namespace())


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def netdev_arg(ssh_port: int, *, outbound: bool) -> str:
    """QEMU's ``-netdev`` value: user-mode networking with the SSH forward on loopback.

    Closed unless ``outbound``: ``restrict=on`` keeps DHCP and the hostfwd working and
    drops every packet the guest sends elsewhere, so the host's 127.0.0.1 services
    (slirp maps them to 10.0.2.2) and the outside world are unreachable (docs/HOST.md,
    "Closing the guest network").
    """
    restrict = "" if outbound else ",restrict=on"
    return f"user,id=fvmnet0{restrict},hostfwd=tcp:127.0.0.1:{ssh_port}-:22"


@dataclass(frozen=True)
class DomainSpec:
    name: str
    overlay: Path
    seed_iso: Path | None
    console_log: Path
    ssh_port: int
    mac: str
    owner: Owner
    memory_mib: int = 1024
    vcpus: int = 1
    accel: str = "tcg"  # "kvm" or "tcg"
    emulator: str = "/usr/bin/qemu-system-x86_64"
    files: tuple[Path, ...] = field(default=())
    firmware: Firmware = FIRMWARES["bios"]
    nvram: Path | None = None  # this VM's copy of the UEFI variable store
    tpm: bool = False
    cpu_model: str | None = None
    # False: slirp's restrict=on, the guest reaches nothing on the host or beyond it
    # (DHCP and the SSH hostfwd still work); True: --flightvm-guest-outbound.
    outbound: bool = False
    # On a remote host (vm/volumes.py): the console volume the serial port appends to
    # (console_log is then the local mirror), and the pool volumes that go with the VM.
    console_path: str | None = None
    pool: str | None = None
    volumes: tuple[str, ...] = ()

    def _os_xml(self) -> str:
        fw = self.firmware
        if not fw.uefi:
            return "<os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>"
        secure = "yes" if fw.secure else "no"
        nvram = f"<nvram>{escape(str(self.nvram))}</nvram>" if self.nvram is not None else ""
        return (f"<os><type arch='x86_64' machine='q35'>hvm</type>"
                f"<loader readonly='yes' secure='{secure}' type='pflash'>{escape(str(fw.code))}</loader>"
                f"{nvram}<boot dev='hd'/></os>")

    def _cpu_xml(self) -> str:
        if self.cpu_model == "max":
            return "<cpu mode='maximum' check='none'/>"
        if self.cpu_model == "host-model" or (self.cpu_model is None and self.accel == "kvm"):
            return "<cpu mode='host-model'/>"
        if self.cpu_model is None:
            return ""
        # check='none': under TCG QEMU lacks a few features of named models (Haswell: pcid,
        # x2apic, ...) and boots with a warning; libvirt would refuse the model outright.
        return (f"<cpu mode='custom' match='exact' check='none'>"
                f"<model fallback='forbid'>{escape(self.cpu_model)}</model></cpu>")

    def to_xml(self) -> str:
        dom_type = "kvm" if self.accel == "kvm" else "qemu"
        cpu = self._cpu_xml()
        smm = "<smm state='on'/>" if self.firmware.secure else ""
        tpm = ("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
               if self.tpm else "")
        seed = ""
        if self.seed_iso is not None:
            seed = f"""
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(self.seed_iso))}/>
      <target dev='sda' bus='scsi'/>
      <readonly/>
    </disk>"""
        files = "".join(f"<flightvm:file>{escape(str(p))}</flightvm:file>" for p in self.files)
        files += "".join(f"<flightvm:volume pool={quoteattr(self.pool or '')}>{escape(v)}"
                         "</flightvm:volume>" for v in self.volumes)
        o = self.owner
        netdev = netdev_arg(self.ssh_port, outbound=self.outbound)
        # romfile= skips the iPXE option ROM: we never network-boot.
        nic = f"virtio-net-pci,netdev=fvmnet0,mac={self.mac},bus=pcie.0,addr=0x10,romfile="
        return f"""<domain type='{dom_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(self.name)}</name>
  <genid/>
  <metadata>
    <flightvm:vm xmlns:flightvm='{METADATA_NS}'>
      <flightvm:run-id>{escape(o.run_id)}</flightvm:run-id>
      <flightvm:owner-pid>{o.pid}</flightvm:owner-pid>
      <flightvm:owner-start>{escape(o.pid_start)}</flightvm:owner-start>
      <flightvm:owner-host>{escape(o.host)}</flightvm:owner-host>
      <flightvm:worker>{escape(o.worker)}</flightvm:worker>
      <flightvm:run-dir>{escape(o.run_dir)}</flightvm:run-dir>
      <flightvm:ssh-port>{self.ssh_port}</flightvm:ssh-port>
      <flightvm:owner-pidns>{escape(o.pid_ns)}</flightvm:owner-pidns>
      {files}
    </flightvm:vm>
  </metadata>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <vcpu>{self.vcpus}</vcpu>
  {self._os_xml()}
  <features><acpi/><apic/>{smm}</features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(self.emulator)}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe' discard='unmap'/>
      <source file={quoteattr(str(self.overlay))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='scsi' model='virtio-scsi'/>{seed}
    <serial type='pty'>
      <log file={quoteattr(self.console_path or str(self.console_log))} append='on'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>{tpm}
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value={quoteattr(netdev)}/>
    <qemu:arg value='-device'/>
    <qemu:arg value={quoteattr(nic)}/>
  </qemu:commandline>
</domain>
"""


@dataclass(frozen=True)
class DomainInfo:
    """What the reaper learns from a domain's metadata."""

    name: str
    run_id: str
    pid: int
    pid_start: str
    host: str
    run_dir: str
    files: tuple[str, ...]
    pid_ns: str = ""
    volumes: tuple[tuple[str, str], ...] = ()  # (pool, volume) on the domain's host


def parse_metadata(name: str, xml: str) -> DomainInfo | None:
    """Read our metadata element; None when the domain is not one of ours."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    vm = root.find(f"{{{METADATA_NS}}}vm")
    if vm is None:
        vm = root.find(f"metadata/{{{METADATA_NS}}}vm")
    if vm is None:
        return None

    def text(tag: str) -> str:
        el = vm.find(f"{{{METADATA_NS}}}{tag}")
        return (el.text or "").strip() if el is not None else ""

    try:
        pid = int(text("owner-pid"))
    except ValueError:
        return None
    files = tuple((el.text or "").strip() for el in vm.findall(f"{{{METADATA_NS}}}file"))
    volumes = tuple((el.get("pool", ""), (el.text or "").strip())
                    for el in vm.findall(f"{{{METADATA_NS}}}volume"))
    return DomainInfo(name, text("run-id"), pid, text("owner-start"), text("owner-host"),
                      text("run-dir"), files, text("owner-pidns"), volumes)

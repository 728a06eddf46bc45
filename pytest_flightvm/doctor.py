"""``flightvm doctor``: check the host and name the fix for each failure.

The fixes are in the ``flightvm`` command's terms (``--cache-dir``) and work for a pip
install; where a checkout's ``make host`` does the same, they say so too."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .config import Settings, cli_terms
from .errors import FlightVMError
from .hosts import Host

MIN_FREE_GIB = 5


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _tool(name: str, package: str) -> Check:
    path = shutil.which(name)
    return Check(name, bool(path), path or "not found", f"apt-get install {package}")


def _libvirt(settings: Settings) -> Check:
    from .vm.libvirt_conn import connect

    try:
        conn = connect(settings.libvirt_uri)
    except FlightVMError as exc:
        return Check("libvirt", False, str(exc),
                     "start virtlogd and libvirtd as root (`virtlogd -d; libvirtd -d`; "
                     "from a pytest-flightvm checkout, `make host` does it), or pass --libvirt-uri")
    try:
        ver = conn.getLibVersion()
        detail = f"{settings.libvirt_uri} answers (libvirt {ver // 1000000}.{ver // 1000 % 1000})"
    finally:
        conn.close()
    return Check("libvirt", True, detail)


def _remote_host(host: Host) -> list[Check]:
    """One remote libvirt host: reachable, our pool present, its free disk, the accel used."""
    import libvirt

    from .vm.libvirt_conn import connect, error_text

    label = host.label
    try:
        conn = connect(host.uri)
    except FlightVMError as exc:
        return [Check(f"host {label}", False, str(exc),
                      "check the URI, its keyfile and that libvirtd runs on that host")]
    try:
        ver = conn.getLibVersion()
        out = [Check(f"host {label}", True, f"answers (libvirt {ver // 1000000}."
                     f"{ver // 1000 % 1000}, slots {host.slots})")]
        try:
            pool = conn.storagePoolLookupByName(host.pool)
            if pool.isActive():
                pool.refresh(0)
            _state, _cap, _alloc, avail = pool.info()
            free = avail / 2**30
            out.append(Check(f"  pool {host.pool}", pool.isActive() == 1,
                             f"{'active' if pool.isActive() else 'inactive'}, {free:.1f} GiB free",
                             f"virsh -c '{host.uri}' pool-start {host.pool}"))
            if pool.isActive():
                out.append(Check("  disk", free >= MIN_FREE_GIB, f"{free:.1f} GiB free in the pool",
                                 f"free space on that host (need {MIN_FREE_GIB} GiB)"))
        except libvirt.libvirtError as exc:
            out.append(Check(f"  pool {host.pool}", True,
                             f"absent ({error_text(exc)}); the first run defines it at "
                             f"{host.pool_dir}"))
        # the local KVM verdict says nothing about that host: remote VMs run TCG under auto
        out.append(Check("  accel", True, "tcg (auto on a remote host; pass --flightvm-accel "
                         "kvm where that host's KVM works)"))
        return out
    finally:
        conn.close()


def _image_dir(settings: Settings) -> Check:
    """QEMU must reach the images: parents need o+x unless QEMU runs as root."""
    path = settings.cache_dir
    if settings.libvirt_uri.startswith("qemu:///system") and os.geteuid() == 0:
        return Check("image dir", True, f"{path} (QEMU runs as root via a static DAC label)")
    blocked = []
    for parent in [path, *path.parents]:
        try:
            mode = parent.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            blocked.append(str(parent))
    if blocked:
        return Check("image dir", False, f"not traversable by QEMU: {', '.join(blocked)}",
                     f"chmod o+x {' '.join(blocked)}, or pass --cache-dir")
    return Check("image dir", True, str(path))


def _accel(settings: Settings) -> Check:
    from .vm import accel

    if settings.accel != "auto":
        return Check("accel", True, f"{settings.accel} (forced)")
    if not accel.kvm_device_usable():
        return Check("accel", True, "tcg (/dev/kvm missing or not accessible)")
    verdict = accel.load_verdict(accel.host_state_dir())
    if verdict is None:
        return Check("accel", True, "not probed yet: the first boot under auto tries KVM and "
                     "falls back to TCG if the guest makes no progress")
    return Check("accel", True, f"{verdict.accel} (verdict for QEMU {verdict.qemu}: "
                 f"{verdict.reason[:120]})")


def _registry(settings: Settings) -> Check:
    if not settings.registry:
        return Check("registry", True, "none configured (local store only)")
    if settings.offline:
        return Check("registry", True, f"{settings.registry} (offline: not contacted)")
    from .cache.registry import FlightRegistry

    try:
        FlightRegistry(settings.registry, plain_http=settings.plain_http).ping()
    except FlightVMError as exc:
        return Check("registry", False, str(exc),
                     "start a registry (e.g. `docker-registry serve CONFIG` from Debian's "
                     "docker-registry package; from a pytest-flightvm checkout, `make host` "
                     "starts one on 127.0.0.1:5000), or fix --registry, or pass --offline")
    return Check("registry", True, f"{settings.registry} answers")


def _disk(settings: Settings) -> Check:
    path = settings.cache_dir
    probe = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free / 2**30
    return Check("disk", free >= MIN_FREE_GIB, f"{free:.1f} GiB free at {probe}",
                 f"free space (need {MIN_FREE_GIB} GiB) or pass --cache-dir")


def _firmware(settings: Settings) -> Check:
    from .vm import firmware

    try:
        fw = firmware.firmware(settings.firmware)
        firmware.check_host(fw, tpm=settings.tpm)
    except FlightVMError as exc:
        return Check("firmware", False, str(exc), "apt-get install ovmf swtpm swtpm-tools")
    detail = fw.name if fw.code is None else f"{fw.name} ({fw.code.name}, {fw.vars_template})"
    return Check("firmware", True, detail + (", TPM: swtpm" if settings.tpm else ""))


def run_checks(settings: Settings) -> list[Check]:
    checks: list[Callable[[], Check]] = [
        lambda: _libvirt(settings),
        lambda: _tool("qemu-img", "qemu-utils"),
        lambda: _tool("qemu-system-x86_64", "qemu-system-x86"),
        lambda: _tool("ssh", "openssh-client"),
        lambda: _image_dir(settings),
        lambda: _firmware(settings),
        lambda: _accel(settings),
        lambda: _registry(settings),
        lambda: _disk(settings),
    ]
    if not settings.build_cmd:
        checks.append(lambda: _tool("mmdebstrap", "mmdebstrap"))
    results = [c() for c in checks]
    for host in settings.host_list:
        if not host.local:
            results += _remote_host(host)
    return results


def run_doctor(settings: Settings, out: TextIO) -> int:
    results = run_checks(settings)
    for c in results:
        line = f"{'ok  ' if c.ok else 'FAIL'} {c.name:<20} {c.detail}"
        if not c.ok and c.fix:
            line += f"\n     fix: {c.fix}"
        out.write(cli_terms(line) + "\n")  # details quote errors in the plugin's terms
    return 0 if all(c.ok for c in results) else 1

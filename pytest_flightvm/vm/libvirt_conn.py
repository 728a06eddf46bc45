"""Open libvirt connections with one-line errors instead of libvirt tracebacks."""

from __future__ import annotations

import threading
from typing import Any

from ..errors import LibvirtError, LibvirtUnreachable

_silenced = False
_lock = threading.Lock()


def _silence() -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""
    global _silenced
    with _lock:
        if not _silenced:
            import libvirt

            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _silenced = True


def connect(uri: str) -> Any:
    try:
        import libvirt
    except ImportError:  # pragma: no cover - dependency of the package
        raise LibvirtError(
            "libvirt-python is not installed; pip install libvirt-python "
            "(needs libvirt-dev, pkg-config and gcc)"
        ) from None
    _silence()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        msg = (exc.get_error_message() or str(exc)).splitlines()[0]
        raise LibvirtUnreachable(
            f"cannot reach libvirt at {uri} ({msg}); start virtlogd and libvirtd "
            "(`virtlogd -d; libvirtd -d`, or `make host` in a pytest-flightvm checkout) "
            "or pass --flightvm-libvirt-uri"
        ) from None


def error_text(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return (text or str(exc)).splitlines()[0] if (text or str(exc)) else type(exc).__name__


def undefine(dom: Any) -> None:
    """Undefine ``dom`` with everything libvirt keeps beside it: snapshot metadata, the
    NVRAM file, swtpm's state dir (libvirt >= 8.9) and any managed save."""
    import libvirt

    flags = (libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
             | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
             | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_TPM", 0))
    dom.undefineFlags(flags)

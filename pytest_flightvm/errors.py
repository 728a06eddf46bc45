"""The FlightVMError family: every failure the user can act on, as one line.

Each message names what went wrong *and* what to do next. ``exit_code``
is what the ``flightvm`` CLI exits with: 2 for bad input or usage (the
user must change something), 1 for an operation that failed.
"""

from __future__ import annotations


class FlightVMError(Exception):
    """Base class. ``str(err)`` is a single actionable line."""

    exit_code = 1

    def __init__(self, message: str, *, detail: str = "") -> None:
        # Keep the headline on one line; longer context goes to ``detail``.
        super().__init__(" ".join(message.split()))
        self.detail = detail


class ConfigError(FlightVMError):
    """Bad input: an option, file or reference the user must fix."""

    exit_code = 2


class ToolMissingError(ConfigError):
    """A host tool (mmdebstrap, qemu-img, ssh-keygen ...) is not installed."""


class CacheError(FlightVMError):
    """The local store could not be read or written."""


class IntegrityError(CacheError):
    """Content did not match its digest."""


class StoreUnusable(CacheError):
    """The cache dir cannot be created or written (not a directory, read-only, full).

    Bad input, not a transient failure: the user must free space or pass
    another ``--flightvm-cache-dir``; fetching or building elsewhere cannot help.
    """

    exit_code = 2


class NotQcow2Error(ConfigError):
    """An image (a pulled artifact, a pinned file) is not a qcow2 disk."""


class RegistryError(FlightVMError):
    """The OCI registry failed."""


class RegistryUnavailable(RegistryError):
    """The registry is down, stalled or unreachable."""


class RegistryAuthError(RegistryError):
    """The registry refused our credentials."""

    exit_code = 2


class ArtifactNotFound(RegistryError):
    """The tag or digest does not exist in the registry."""


class StateRefused(RegistryError):
    """A booted state from the registry failed a check (metadata, save file, overlay, NVRAM)."""


class BuildError(FlightVMError):
    """Building the base image failed."""


class LibvirtError(FlightVMError):
    """libvirt is unreachable or refused an operation."""


class LibvirtUnreachable(LibvirtError):
    """No libvirt answers at the configured URI: start it or fix the URI.

    An operation that failed (exit 1), not bad input: the URI is usually right and the
    daemon is down, which no change to the command line fixes."""


class HostStorageError(LibvirtError):
    """A libvirt host's storage pool refused or lost a volume (remote hosts, vm/volumes.py)."""


class HostPortTaken(LibvirtError):
    """QEMU could not bind the SSH forward's port on a remote libvirt host (the port is
    picked free on this machine, and bound on that one); the factory tries another."""


class BootError(FlightVMError):
    """A guest failed to become ready."""


class GuestStuck(BootError):
    """The guest's console shows it stuck during boot (a kernel panic, a long soft lockup
    or hung task). The factory boots such a VM once more; ``hit`` is the console line's
    verdict (``kernel panic: Kernel panic - not syncing: ...``)."""

    def __init__(self, message: str, *, detail: str = "", hit: str = "") -> None:
        super().__init__(message, detail=detail)
        self.hit = hit


class KVMUnusable(BootError):
    """KVM accepted the VM but the guest cannot run on it."""


class ResetFailed(FlightVMError):
    """A per-test reset (restore, snapshot revert) failed or hung; the pool boots afresh."""


class HostPortError(FlightVMError):
    """A named host port could not be made reachable from the guest."""


class GuestCommandError(FlightVMError):
    """A command run in the guest exited non-zero (``run(check=True)``)."""

    def __init__(self, cmd: str, returncode: int, stdout: str, stderr: str) -> None:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        super().__init__(
            f"guest command exited {returncode}: {cmd!r}" + (f" ({tail[-1]})" if tail else ""),
            detail="\n".join(tail),
        )
        self.cmd = cmd
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

"""The one check that a disk image is a qcow2 we may use as a base."""

from __future__ import annotations

from pathlib import Path

from ..errors import BuildError, FlightVMError

QCOW2_MAGIC = b"QFI\xfb"


def check_qcow2(path: Path, what: str = "the build", *,
                error: type[FlightVMError] = BuildError) -> None:
    """``error`` unless ``path`` exists and starts with the qcow2 magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(QCOW2_MAGIC))
    except FileNotFoundError:
        raise error(f"{what} wrote no file at {path}") from None
    except OSError as exc:
        raise error(f"cannot read the output of {what} at {path}: {exc.strerror}") from None
    if magic != QCOW2_MAGIC:
        raise error(
            f"{what} is not a qcow2 disk image (it starts with {magic!r}); "
            "convert it with `qemu-img convert -O qcow2`"
        )

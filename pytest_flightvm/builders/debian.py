"""The built-in Debian bookworm builder: the zero-config default base image.

``DebianBuilder().build(out)`` runs ``debian-build.sh`` (next to this file) as
root. The script makes a qcow2 that boots under BIOS (GRUB), UEFI and UEFI
Secure Boot (shim -> signed GRUB -> signed kernel), in one of two variants:
``cloud-init`` (the default: NoCloud only, no users and no keys) or ``login``
(no cloud-init; user ``user``, password ``user``, like flightctl's own guest).
``identity`` names the variant and hashes the script's bytes, so any edit to
the script changes the cache key. Nothing here imports pytest.

``python -m pytest_flightvm.builders.debian [--variant login] OUTPUT`` runs the
same build from a shell, e.g. as a ``--flightvm-build-cmd``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..buildgroup import run_group
from ..errors import BuildError, ConfigError, FlightVMError, ToolMissingError

Log = Callable[[str], None]

SCRIPT = Path(__file__).with_name("debian-build.sh")

# Host tools the script needs, with the Debian package that provides each.
# Kept in step with the check at the top of debian-build.sh.
TOOLS: tuple[tuple[str, str], ...] = (
    ("bash", "bash"),
    ("mmdebstrap", "mmdebstrap"),
    ("mke2fs", "e2fsprogs"),
    ("sfdisk", "fdisk"),
    ("losetup", "mount"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("grub-install", "grub2-common"),
    ("qemu-img", "qemu-utils"),
    ("chroot", "coreutils"),
    ("mkfs.fat", "dosfstools"),
    ("mmd", "mtools"),
    ("mcopy", "mtools"),
)
# The image variants the script knows; the first is the default.
VARIANTS: tuple[str, ...] = ("cloud-init", "login")
DEFAULT_VARIANT = VARIANTS[0]
GRUB_BIOS_DIR = Path("/usr/lib/grub/i386-pc")
# The script appends these to PATH; a non-login root shell may lack them.
EXTRA_PATH = ("/usr/sbin", "/sbin")
TAIL_LINES = 30
TERM_GRACE_S = 30.0


def _noop(_line: str) -> None:
    pass


def _search_path() -> str:
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    parts += [p for p in EXTRA_PATH if p not in parts]
    return os.pathsep.join(parts)


class DebianBuilder:
    """Builds a Debian bookworm qcow2 (BIOS + UEFI + Secure Boot) with mmdebstrap (needs root)."""

    def __init__(self, script: Path | None = None, *, variant: str = DEFAULT_VARIANT,
                 timeout: float | None = None) -> None:
        if variant not in VARIANTS:
            raise ConfigError(
                f"unknown Debian image variant {variant!r}; use one of: {', '.join(VARIANTS)}"
            )
        self._script = script
        self.variant = variant
        self.timeout = timeout

    @property
    def name(self) -> str:
        """``debian-bookworm`` for the default variant, ``debian-bookworm-<variant>`` else."""
        if self.variant == DEFAULT_VARIANT:
            return "debian-bookworm"
        return f"debian-bookworm-{self.variant}"

    @property
    def script(self) -> Path:
        return self._script if self._script is not None else SCRIPT

    @property
    def identity(self) -> str:
        try:
            data = self.script.read_bytes()
        except OSError as exc:
            raise BuildError(
                f"the built-in Debian build script is unreadable at {self.script} "
                f"({exc.strerror}); reinstall pytest-flightvm"
            ) from None
        return f"{self.name}:{hashlib.sha256(data).hexdigest()}"

    def __repr__(self) -> str:
        return f"DebianBuilder({str(self.script)!r}, variant={self.variant!r})"

    def check_host(self) -> None:
        """ConfigError / ToolMissingError (one actionable line) if this host cannot build."""
        if os.geteuid() != 0:
            raise ConfigError(
                "the built-in Debian builder must run as root (mmdebstrap, losetup, mount); "
                "run as root, or set --flightvm-image / --flightvm-build-cmd"
            )
        path = _search_path()
        for tool, package in TOOLS:
            if shutil.which(tool, path=path) is None:
                raise ToolMissingError(
                    f"{tool} not found; install it with: apt-get install {package}"
                )
        if not (GRUB_BIOS_DIR / "modinfo.sh").exists():
            raise ToolMissingError(
                f"GRUB BIOS modules ({GRUB_BIOS_DIR}) not found; "
                "install them with: apt-get install grub-pc-bin"
            )
        if not self.script.is_file():
            raise BuildError(
                f"the built-in Debian build script is missing at {self.script}; "
                "reinstall pytest-flightvm"
            )

    def build(self, output: Path, *, log: Log = _noop) -> None:
        """Write the qcow2 to ``output`` (atomically), streaming progress to ``log``."""
        self.check_host()
        output = Path(output).absolute()
        if not output.parent.is_dir():
            raise ConfigError(f"cannot build into {output}: {output.parent} is not a directory")
        env = dict(os.environ, PATH=_search_path())

        def on_line(line: str) -> None:
            # Our own step lines are progress; tool chatter (mmdebstrap, apt, grub)
            # only matters when the build fails, via the tail.
            if line.startswith("build:"):
                log(line)

        # the script sends everything to stderr; SIGTERM first: its trap unmounts and
        # detaches loops
        code, tail = run_group(["bash", str(self.script), "--variant", self.variant, str(output)],
                               output, env=env, on_line=on_line, what=str(self.script),
                               grace=TERM_GRACE_S, tail_lines=TAIL_LINES, timeout=self.timeout)
        if code != 0:
            raise BuildError(
                f"building the Debian base image failed (exit {code}): "
                + _headline(tail)[:400],
                detail="\n".join(tail),
            )
        if not output.is_file():
            raise BuildError(f"the Debian build script exited 0 but wrote no file at {output}")


def _headline(tail: list[str]) -> str:
    """The most useful line of a failed build's output, for a one-line error.

    The script's own ``build: error:`` line wins; otherwise apt's first ``E:``
    line (the root cause, e.g. a failed fetch) with the step that failed;
    otherwise the last line.
    """
    if not tail:
        return "no output"
    last = tail[-1]
    errors = [line for line in tail if line.startswith("build: error:")]
    if errors:
        return errors[-1]
    apt = [line for line in tail if line.startswith("E: ")]
    if apt and last.startswith("build: failed"):
        return f"{last} | {apt[0]}"
    if apt:
        return apt[0]
    return last


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pytest_flightvm.builders.debian [--variant V] OUTPUT``: build, print the path.

    Progress lines go to stderr; an error is one ``flightvm: ...`` line with the
    error's exit code (2 = fix the host or the call)."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_flightvm.builders.debian",
        description="Build the built-in Debian bookworm qcow2 (run as root).",
    )
    parser.add_argument("--variant", choices=VARIANTS, default=DEFAULT_VARIANT,
                        help="cloud-init (default) or login (user/user, no cloud-init)")
    parser.add_argument("output", type=Path, help="where to write the qcow2")
    args = parser.parse_args(argv)
    builder = DebianBuilder(variant=args.variant)
    try:
        builder.build(args.output, log=lambda line: print(line, file=sys.stderr, flush=True))
    except FlightVMError as exc:
        print(f"flightvm: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("flightvm: interrupted; the build was stopped and cleaned up", file=sys.stderr)
        return 130
    print(Path(args.output).absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main())

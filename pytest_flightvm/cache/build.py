"""Builders: what makes the base qcow2 when neither the store nor the registry has it.

A builder has an ``identity`` (hashed into the cache key: change it and the
key changes) and ``build(output, *, log)`` which writes a qcow2 to ``output``.
A builder may also accept ``key=`` (the hex cache key); resolve passes it when
the signature has it. ``HookBuilder`` is the ``pytest_flightvm_build_image`` hook as a
builder (:func:`hook_builder`: from the hook's implementations and a way to call it).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..buildgroup import run_group
from ..errors import BuildError, ConfigError, FlightVMError
from .qcow2 import check_qcow2

Log = Callable[[str], None]


@runtime_checkable
class Builder(Protocol):
    @property
    def identity(self) -> str: ...

    def build(self, output: Path, *, log: Log) -> None: ...


class CommandBuilder:
    """Runs ``sh -c CMD`` with ``FLIGHTVM_OUTPUT`` (where to write the qcow2) and
    ``FLIGHTVM_KEY`` (the hex cache key, when known) in the environment."""

    def __init__(self, cmd: str, *, cwd: Path | None = None, timeout: float | None = None):
        if not cmd.strip():
            raise ConfigError("--flightvm-build-cmd is empty; give a command that writes "
                              "a qcow2 to $FLIGHTVM_OUTPUT")
        self.cmd = cmd
        self.cwd = cwd
        self.timeout = timeout

    @property
    def identity(self) -> str:
        return "cmd:" + self.cmd

    def __repr__(self) -> str:
        return f"CommandBuilder({self.cmd!r})"

    def build(self, output: Path, *, log: Log, key: str | None = None) -> None:
        env = dict(os.environ, FLIGHTVM_OUTPUT=str(output))
        if key:
            env["FLIGHTVM_KEY"] = key
        start = last = time.monotonic()

        def on_line(line: str) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= 2.0 and line:
                last = now
                log(f"building base image ({now - start:.0f} s): {line[:160]}")

        code, tail = run_group(["sh", "-c", self.cmd], output, env=env, on_line=on_line,
                               what="the build command", cwd=self.cwd, timeout=self.timeout)
        if code != 0:
            raise BuildError(
                f"the build command exited {code}"
                + (f" ({tail[-1][:200]})" if tail else "")
                + f": {self.cmd}",
                detail="\n".join(tail),
            )
        check_qcow2(output, "the build command")


class HookBuilder:
    """The ``pytest_flightvm_build_image(config, output, key)`` hook as a builder.

    ``implementations`` are the hook's functions with their plugin names; the identity
    hashes their source (a plugin name where the source cannot be read), so editing the
    hook changes the cache key. ``call(output, key)`` runs the hook; the key arrives as
    resolve's ``key=`` argument."""

    def __init__(self, implementations: Sequence[tuple[Callable[..., Any], str]],
                 call: Callable[[Path, str], Any]) -> None:
        sources = []
        for function, plugin_name in implementations:
            try:
                sources.append(inspect.getsource(function))
            except (OSError, TypeError):
                sources.append(plugin_name)
        self.identity = "hook:" + hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]
        self._call = call

    def build(self, output: Path, *, log: Log | None = None, key: str = "") -> None:
        if not self._call(output, key):
            raise FlightVMError("pytest_flightvm_build_image returned no result; "
                                "return True after writing the qcow2 to `output`")


def hook_builder(hook: Any, config: Any) -> HookBuilder | None:
    """The build hook as a builder when some plugin implements it, else None (resolve then
    picks --flightvm-build-cmd, run in the rootdir as the CLI runs it, or the built-in
    Debian builder). ``hook`` is pluggy's caller of ``pytest_flightvm_build_image``;
    ``config`` is handed back to it, untouched."""
    impls = hook.get_hookimpls()
    if not impls:
        return None
    return HookBuilder([(impl.function, impl.plugin_name) for impl in impls],
                       lambda output, key: hook(config=config, output=output, key=key))


def default_builder(timeout: float | None = None) -> Builder:
    """The built-in Debian builder (imported lazily); stopped after ``timeout`` seconds."""
    try:
        from ..builders.debian import DebianBuilder
    except ImportError as exc:
        raise BuildError(
            f"no builder available: the built-in Debian builder cannot be loaded ({exc}); "
            "set --flightvm-build-cmd or --flightvm-image"
        ) from None
    builder: Builder = DebianBuilder(timeout=timeout)
    return builder


def builder_for(build_cmd: str | None, rootdir: Path | None = None,
                timeout: float | None = None) -> Builder:
    """``CommandBuilder(build_cmd)`` when set, else the default builder; either is
    stopped after ``timeout`` seconds (``--flightvm-build-timeout``)."""
    if build_cmd:
        return CommandBuilder(build_cmd, cwd=rootdir, timeout=timeout)
    return default_builder(timeout)

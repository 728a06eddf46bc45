"""Helpers for the fault tier: real processes, real registries, real mounts.

Nothing here fakes libvirt or the registry. What it adds is the fault: a
registry of our own (TLS, htpasswd) we can stop, a listener that never
answers, a tmpfs that is full or read-only, a child we can kill -9 at a
chosen point, and checks that a store holds nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_flightvm.config import Settings
from tests.own_registry import OwnRegistry, make_ca_and_cert
from tests.own_registry import start_registry as _start_registry

__all__ = ["OwnRegistry", "make_ca_and_cert"]  # re-exported for the fault tests

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PY = sys.executable
MiB = 1 << 20
VIRSH = ["virsh", "-c", "qemu:///system"]
SEED = int(os.environ.get("FLIGHTVM_FAULTS_SEED", "8"))
"""Seeds every random choice of the tier (kill points, flipped bytes)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# -- the flightvm CLI -----------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m pytest_flightvm.cli ARGS`` with its own output captured."""
    return subprocess.run([PY, "-m", "pytest_flightvm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=cwd)


def base_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would change the settings behind our back."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLIGHTVM_", "PYTEST_")) and k not in (
               "REGISTRY_CACHE", "QCOW2_CACHE_TAG", "LIBVIRT_DEFAULT_URI", "VM_CONFIG_DIR",
               "CLOUD_INIT_DIR", "DEBUG_VM_CONSOLE", "CI")}
    env.update(extra)
    return env


def source_line(stderr: str) -> dict[str, str]:
    """Parse ``flightvm: source=... bytes=... seconds=...`` from ``cache get``."""
    m = re.search(r"flightvm: source=(\w+) bytes=(\d+) seconds=([\d.]+)", stderr)
    assert m, f"no source line in: {stderr!r}"
    return {"source": m.group(1), "bytes": m.group(2), "seconds": m.group(3)}


# -- store invariants -----------------------------------------------------------------------


def check_store(store_root: Path) -> list[str]:
    """Every blob is complete (hash = name) and 0444; every ref names a present blob.

    Returns the problems found (empty when the store is sound). Files in
    ``tmp/`` are in-flight writes and are not blobs: they are ignored here.
    """
    problems: list[str] = []
    blobs = store_root / "blobs" / "sha256"
    if blobs.is_dir():
        for blob in blobs.iterdir():
            if not re.fullmatch(r"[0-9a-f]{64}", blob.name):
                problems.append(f"stray file under blobs/: {blob.name}")
                continue
            if sha256_file(blob) != "sha256:" + blob.name:
                problems.append(f"blob {blob.name[:12]} does not match its name")
            if blob.stat().st_mode & 0o777 != 0o444:
                problems.append(f"blob {blob.name[:12]} has mode {blob.stat().st_mode & 0o777:o}")
    refs = store_root / "refs"
    if refs.is_dir():
        for ref in refs.rglob("*"):
            if not ref.is_file() or ref.name.startswith("."):
                continue
            try:
                digest = json.loads(ref.read_text())["digest"]
            except (ValueError, KeyError) as exc:
                problems.append(f"ref {ref.relative_to(refs)} unreadable: {exc}")
                continue
            if not (blobs / digest.split(":", 1)[1]).exists():
                problems.append(f"ref {ref.relative_to(refs)} -> missing blob {digest[:19]}")
    return problems


def partials_of(store_root: Path, pid: int) -> list[Path]:
    tmp = store_root / "tmp"
    return sorted(tmp.glob(f"{pid}-*")) if tmp.is_dir() else []


# -- processes ------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as dead
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_pid(pid: int | None, sig: int = signal.SIGKILL) -> None:
    """End one process we started, by its pid (never by name)."""
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_group(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """kill -9 the process group of a child started with start_new_session=True."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- loopback listeners ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StalledListener:
    """Accepts every connection on 127.0.0.1 and never says a word."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        for conn in self.accepted:
            conn.close()
        self.sock.close()

    def __enter__(self) -> StalledListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def closed_port() -> int:
    """A loopback port nobody listens on: connections are refused."""
    return free_port()


# -- our own docker-registry (TLS + htpasswd) -----------------------------------------------

USER = "flightvm-faults"
SECRET = "Fault-Tier-S3cret-Pa55"


def start_registry(tmp: Path, *, tls: bool, auth: bool, port: int | None = None) -> OwnRegistry:
    """``docker-registry serve`` on a free loopback port; USER/SECRET when ``auth``."""
    return _start_registry(tmp, tls=tls, auth="htpasswd" if auth else None, user=USER,
                           secret=SECRET, port=port)


# -- mounts ---------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, *, size: str, read_only: bool = False) -> Iterator[Path]:
    """Mount a small tmpfs of our own at ``path`` (root only), unmount on exit."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "flightvm-faults", str(path)],
                   check=True, capture_output=True, text=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- libvirt --------------------------------------------------------------------------------


def virsh(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIRSH, *args], capture_output=True, text=True, check=check,
                          timeout=60)


def all_domains() -> list[str]:
    return virsh("list", "--all", "--name").stdout.split()


def running_domains() -> list[str]:
    return virsh("list", "--name").stdout.split()


def domains_referencing(text: str) -> list[str]:
    """flightvm domains (running or defined) whose XML mentions ``text`` (e.g. a cache dir)."""
    return [d for d in all_domains()
            if d.startswith("flightvm-") and text in virsh("dumpxml", d).stdout]


def remove_domain(name: str) -> None:
    """Destroy and undefine a domain this tier created (cleanup)."""
    virsh("destroy", name)
    virsh("undefine", name, "--snapshots-metadata")


# -- pytest output --------------------------------------------------------------------------


def flightvm_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "flightvm:" in line]


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]
    assert not re.search(r"^>\s", text, re.M), f"a code traceback in the report:\n{text[-3000:]}"
    assert "During handling of the above exception" not in text, text[-3000:]


def error_blocks(text: str) -> list[list[str]]:
    """The bodies of pytest's ``ERROR at setup of ...`` sections."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"^_+ ERROR at setup of .* _+$", line):
            current = []
            blocks.append(current)
        elif re.match(r"^(=+|_+|-+) .* (=+|_+|-+)$", line) or line.startswith("- generated"):
            current = None
        elif current is not None and line.strip():
            current.append(line)
    return blocks


def one_line_setup_error(text: str, fix: str | Sequence[str]) -> str:
    """Every setup error is exactly one line, starting ``flightvm:``, naming ``fix``."""
    fixes = [fix] if isinstance(fix, str) else list(fix)
    blocks = error_blocks(text)
    assert blocks, f"no setup error in:\n{text[-3000:]}"
    for block in blocks:
        assert len(block) == 1, f"setup error is not one line: {block}"
        assert block[0].startswith("flightvm: "), block
        assert all(f in block[0] for f in fixes), f"{block[0]!r} does not name {fixes}"
    return blocks[0][0]


# -- the tally and the golden artifact ------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def trial(self, row: str, name: str, *, soft: bool = False,
              **info: Any) -> Iterator[dict[str, Any]]:
        """One fault trial. ``soft=True`` records a loss without raising, so a test can
        run all of its trials and fail once at the end (see :meth:`assert_survived`)."""
        rec: dict[str, Any] = {"row": row, "name": name, **info}
        start = time.monotonic()
        try:
            yield rec
        except Exception as exc:
            text = str(exc).strip().splitlines()
            rec.update(outcome="lost", seconds=round(time.monotonic() - start, 2),
                       error=f"{type(exc).__name__}: {text[0][:300] if text else ''}")
            self.records.append(rec)
            if not soft:
                raise
        else:
            rec.update(outcome="survived", seconds=round(time.monotonic() - start, 2))
            self.records.append(rec)

    def assert_survived(self, recs: list[dict[str, Any]]) -> None:
        lost = [f"{r['name']}: {r.get('error')}" for r in recs if r.get("outcome") != "survived"]
        assert not lost, "lost trials:\n" + "\n".join(lost)


@dataclass
class Golden:
    """A 64 MiB fake qcow2, pushed to the real registry under its cache-key tag.

    Its build command copies the file and counts builds; with ``NO_BUILD=1`` in
    the environment it fails instead (exit 97), so a test sees any build.
    """

    disk: Path
    digest: str
    size: int
    registry: str
    build_cmd: str
    builds_file: Path
    tags: tuple[str, ...]
    rootdir: Path

    def settings(self, cache_dir: Path, **kw: Any) -> Settings:
        values: dict[str, Any] = {"registry": self.registry, "build_cmd": self.build_cmd,
                                  "arch": "amd64", "rootdir": self.rootdir}
        values.update(kw)
        return Settings(cache_dir=cache_dir, **values)

    def builds(self) -> int:
        f = self.builds_file
        return len(f.read_text().splitlines()) if f.exists() else 0


# -- children we kill -9 at a chosen point ---------------------------------------------------

CHILD = HERE / "fault_child.py"


class Child:
    """``fault_child.py cli SPEC`` in its own process group, its ``@event`` lines readable."""

    def __init__(self, spec: dict[str, Any], env: dict[str, str], stderr: Path) -> None:
        self.stderr_path = stderr
        with open(stderr, "wb") as err:
            self.proc = subprocess.Popen([PY, str(CHILD), "cli", json.dumps(spec)], env=env,
                                         stdout=subprocess.PIPE, stderr=err,
                                         start_new_session=True)
        self._buf = b""
        self.events: list[str] = []
        self.output: list[str] = []  # the CLI's own stdout lines
        self.killed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def next_event(self, timeout: float = 60) -> str | None:
        """The next ``@`` line (without the ``@``), or None once the child closed stdout."""
        import select

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith("@"):
                    self.events.append(text[1:])
                    return text[1:]
                self.output.append(text)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"child {self.pid} said nothing for {timeout:g} s; "
                                   f"events so far {self.events[-5:]}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    return None
                self._buf += data

    def kill_when(self, predicate: Any, delay: float = 0.0, timeout: float = 60) -> bool:
        """kill -9 the child's group once ``predicate(event)`` holds (after ``delay`` s).

        Returns whether it was killed (False: it finished before the point came)."""
        while True:
            event = self.next_event(timeout)
            if event is None:
                self.proc.wait(timeout)
                return False
            if predicate(event):
                break
        if delay:
            time.sleep(delay)
        if self.proc.poll() is not None:
            return False
        kill_group(self.proc)
        self.killed = self.proc.returncode == -signal.SIGKILL
        while self.next_event(5) is not None:  # what it reported before it died
            pass
        return self.killed

    def finish(self, timeout: float = 120) -> int:
        while self.next_event(timeout) is not None:
            pass
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- a hostile registry on loopback -----------------------------------------------------------


@dataclass
class Reply:
    """What :class:`HostileRegistry` answers for one path: ``body`` (bytes, or an
    iterator of chunks), a ``length`` header to claim (None: the body's own, if bytes),
    and ``delay`` seconds between chunks (a trickle)."""

    body: Any = b""
    status: int = 200
    length: int | None = None
    delay: float = 0.0
    headers: dict[str, str] | None = None


class HostileRegistry:
    """A registry API on a loopback address that misbehaves on purpose: the test maps
    request paths to :class:`Reply` objects. Every request's path and headers are kept
    in :attr:`seen` (to check where credentials went)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        import http.server

        self.replies: dict[str, Reply] = {}
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self._stop = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _serve(self) -> None:
                owner.seen.append((self.command, self.path, dict(self.headers)))
                reply = owner.replies.get(self.path.split("?", 1)[0])
                if reply is None:
                    reply = Reply(b'{"errors":[{"code":"NOT_FOUND"}]}', 404)
                self.send_response(reply.status)
                for k, v in (reply.headers or {}).items():
                    self.send_header(k, v)
                length = reply.length
                if length is None and isinstance(reply.body, bytes):
                    length = len(reply.body)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                chunks = [reply.body] if isinstance(reply.body, bytes) else reply.body
                try:
                    for chunk in chunks:
                        if owner._stop.is_set():
                            return
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        if reply.delay:
                            owner._stop.wait(reply.delay)
                except OSError:
                    pass  # the client gave up: that is the point

            do_GET = do_HEAD = do_POST = do_PUT = _serve  # noqa: N815

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host = f"{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def repo(self, name: str = "flightvm/base") -> str:
        return f"{self.host}/{name}"

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HostileRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def push_container_image(reg: Any, tag: str, layer: bytes, layer_type: str,
                         arch: str = "amd64") -> str:
    """An OCI image of one layer (the seed's container layout), pushed by hand to ``reg``
    (a FlightRegistry): config + layer + manifest."""
    config = json.dumps({"architecture": arch, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    for blob in (layer, config):
        reg.upload_stream([blob], length=len(blob))
    return str(reg.put_manifest({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": "sha256:" + hashlib.sha256(layer).hexdigest(),
                    "size": len(layer)}],
    }, tag))

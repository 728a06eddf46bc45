"""The local content-addressed store: atomic, read-only, verified, cheap hits."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_flightvm.cache import store as store_mod
from pytest_flightvm.cache.store import Store
from pytest_flightvm.errors import CacheError, IntegrityError
from tests.fake_disk import QCOW2_MAGIC, MiB, qcow2_bytes, random_qcow2


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_import_copies_verifies_and_makes_read_only(store: Store, tmp_path: Path) -> None:
    src = random_qcow2(tmp_path / "disk.qcow2")
    digest = store.import_file(src)
    assert digest == sha(src.read_bytes())
    blob = store.blob_path(digest)
    assert blob == store.root / "blobs" / "sha256" / digest[7:]
    assert blob.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert src.exists() and stat.S_IMODE(src.stat().st_mode) != 0o444
    assert store.verify(digest) and store.has(digest)
    assert list((store.root / "tmp").iterdir()) == []


def test_import_move_renames_into_the_store(store: Store) -> None:
    src = random_qcow2(store.tmp_path(".qcow2"))
    data = src.read_bytes()
    digest = store.import_file(src, move=True)
    assert not src.exists()
    assert store.blob_path(digest).read_bytes() == data


def test_import_twice_is_idempotent(store: Store, tmp_path: Path) -> None:
    src = random_qcow2(tmp_path / "disk.qcow2")
    d1 = store.import_file(src)
    ino = store.blob_path(d1).stat().st_ino
    assert store.import_file(src) == d1
    assert store.blob_path(d1).stat().st_ino == ino


def test_writer_never_exposes_a_partial_blob(store: Store) -> None:
    data = os.urandom(3 << 20)
    digest = sha(data)
    with store.writer(expected=digest, size=len(data)) as w:
        for i in range(0, len(data), 1 << 20):
            w.write(data[i:i + (1 << 20)])
            assert not store.blob_path(digest).exists()
            assert w.tmp.parent == store.root / "tmp"
    assert w.digest == digest
    assert store.blob_path(digest).read_bytes() == data


def test_writer_rejects_a_digest_mismatch(store: Store) -> None:
    wrong = sha(b"something else")
    with pytest.raises(IntegrityError, match="does not match its digest"):
        with store.writer(expected=wrong) as w:
            w.write(QCOW2_MAGIC + b" payload")
    assert not store.blob_path(wrong).exists()
    assert not store.blob_path(sha(QCOW2_MAGIC + b" payload")).exists()
    assert list((store.root / "tmp").iterdir()) == []


def test_writer_rejects_a_short_body(store: Store) -> None:
    data = QCOW2_MAGIC + b"x" * 100
    with pytest.raises(IntegrityError, match="size mismatch"):
        with store.writer(size=len(data) + 1) as w:
            w.write(data)
    assert not store.blob_path(sha(data)).exists()


def test_writer_aborts_on_an_exception(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.writer() as w:
            w.write(QCOW2_MAGIC + b" half")
            raise RuntimeError("connection dropped")
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []


def test_local_hit_does_not_rehash(store: Store, tmp_path: Path, monkeypatch) -> None:
    digest = store.import_file(random_qcow2(tmp_path / "d.qcow2"))

    def boom(path: Path) -> str:
        raise AssertionError("rehashed on a fast hit")

    monkeypatch.setattr(store_mod, "_hash_file", boom)
    assert store.has(digest)


def test_touched_but_intact_blob_is_rehashed_once_and_kept(store: Store, tmp_path: Path,
                                                         monkeypatch) -> None:
    digest = store.import_file(random_qcow2(tmp_path / "d.qcow2"))
    os.utime(store.blob_path(digest), (1, 1))
    calls = []
    real = store_mod._hash_file
    monkeypatch.setattr(store_mod, "_hash_file", lambda p: calls.append(p) or real(p))
    assert store.has(digest) and store.has(digest)
    assert len(calls) == 1


def test_missing_fingerprint_means_a_full_check(store: Store, tmp_path: Path) -> None:
    digest = store.import_file(random_qcow2(tmp_path / "d.qcow2"))
    store._meta_path(digest).unlink()
    assert store.has(digest)
    assert store._meta_path(digest).exists()


@pytest.mark.parametrize("damage", ["truncate", "flip-keep-mtime", "append"])
def test_corruption_is_detected_and_the_blob_removed(store: Store, tmp_path: Path,
                                                     damage: str) -> None:
    digest = store.import_file(random_qcow2(tmp_path / "d.qcow2"))
    blob = store.blob_path(digest)
    st = blob.stat()
    os.chmod(blob, 0o644)  # the blob is 0444: only root could damage it without this
    if damage == "truncate":
        os.truncate(blob, st.st_size // 2)
    elif damage == "append":
        with open(blob, "ab") as f:
            f.write(b"junk")
    else:  # same size, mtime put back: only ctime betrays it
        with open(blob, "r+b") as f:
            f.seek(1000)
            b = f.read(1)
            f.seek(1000)
            f.write(bytes([b[0] ^ 0xFF]))
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(blob, 0o444)
    assert not store.has(digest)
    assert not blob.exists()
    assert not store._meta_path(digest).exists()


def test_full_verify_catches_what_the_fingerprint_cannot(store: Store, tmp_path: Path,
                                                         monkeypatch) -> None:
    digest = store.import_file(random_qcow2(tmp_path / "d.qcow2"))
    monkeypatch.setattr(store_mod, "_hash_file", lambda p: "0" * 64)
    assert store.has(digest)  # fingerprint unchanged: trusted
    assert not store.verify(digest, full=True)
    assert not store.blob_path(digest).exists()


def _set_meta(store: Store, digest: str, **fields: object) -> None:
    meta = store._read_meta(digest)
    assert meta is not None
    meta.update(fields)
    store._meta_path(digest).write_text(json.dumps(meta))


def test_a_blob_from_an_earlier_boot_is_rehashed_once(store: Store, tmp_path: Path,
                                                      monkeypatch) -> None:
    digest = store.import_file(random_qcow2(tmp_path / "d.qcow2"))
    assert store._read_meta(digest)["boot_id"] == store_mod.boot_id() is not None
    _set_meta(store, digest, boot_id="an-earlier-boot")
    calls = []
    real = store_mod._hash_file
    monkeypatch.setattr(store_mod, "_hash_file", lambda p: calls.append(p) or real(p))
    assert store.has(digest) and store.has(digest)
    assert len(calls) == 1
    assert store._read_meta(digest)["boot_id"] == store_mod.boot_id()


def test_what_a_crash_kept_from_disk_is_not_served_after_the_reboot(store: Store,
                                                                    tmp_path: Path) -> None:
    """Blobs are not fsynced: a power loss can leave the name and size on disk but zeros
    where the data was. The stat fingerprint then still matches; the boot id does not."""
    digest = store.import_file(random_qcow2(tmp_path / "d.qcow2", 3 * MiB))
    blob = store.blob_path(digest)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(1 << 20)
        f.write(bytes(1 << 20))
    os.chmod(blob, 0o444)
    st = blob.stat()
    _set_meta(store, digest, size=st.st_size, mtime_ns=st.st_mtime_ns,
              ctime_ns=st.st_ctime_ns, boot_id="the-boot-that-crashed")
    assert not store.has(digest)
    assert not blob.exists()


def test_without_a_boot_id_blobs_are_fsynced_and_then_trusted(store: Store, tmp_path: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "boot_id", lambda: None)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    data = qcow2_bytes(os.urandom(MiB))
    with store.writer(expected=sha(data)) as w:
        w.write(data)
    assert len(synced) == 2  # the blob, then its directory
    assert store._read_meta(sha(data))["boot_id"] is None

    def boom(path: Path) -> str:
        raise AssertionError("rehashed a blob that was fsynced")

    monkeypatch.setattr(store_mod, "_hash_file", boom)
    assert store.has(sha(data))


def test_a_write_error_in_the_writer_thread_is_one_store_error(tmp_path: Path) -> None:
    """A real write failure (the file size limit, EFBIG) inside the writer thread comes back
    to the caller as the store's one-line error, and no temp file is left."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from pytest_flightvm.cache.store import Store
        from pytest_flightvm.errors import StoreUnusable
        store = Store(Path({str(tmp_path / "store")!r}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            with store.writer() as w:
                for _ in range(64):
                    w.write(b"x" * (256 << 10))
        except StoreUnusable as exc:
            print(exc)
            sys.exit(3)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 3, res.stderr
    assert "cannot write to the image store" in res.stdout
    assert "File too large" in res.stdout
    assert "Traceback" not in res.stderr
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert list((tmp_path / "store" / "blobs" / "sha256").iterdir()) == []


def test_refs(store: Store, tmp_path: Path) -> None:
    digest = store.import_file(random_qcow2(tmp_path / "d.qcow2"))
    store.set_ref("key/" + "a" * 64, digest, source="build", run="r1")
    store.set_ref("tag/base-qcow2-latest", digest)
    assert store.get_ref("key/" + "a" * 64) == digest
    info = store.ref_info("key/" + "a" * 64)
    assert info is not None and info["source"] == "build" and info["run"] == "r1"
    assert store.get_ref("tag/missing") is None
    assert set(store.refs()) == {"key/" + "a" * 64, "tag/base-qcow2-latest"}
    [entry] = store.ls()
    assert entry.digest == digest and entry.size == store.blob_path(digest).stat().st_size
    assert entry.refs == ("key/" + "a" * 64, "tag/base-qcow2-latest")
    store.delete_ref("tag/base-qcow2-latest")
    assert store.get_ref("tag/base-qcow2-latest") is None


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/abs", "a//b", "", "sp ace"])
def test_bad_ref_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(CacheError):
        store.set_ref(name, "sha256:" + "0" * 64)


def test_bad_digest_is_refused(store: Store) -> None:
    with pytest.raises(CacheError, match="not a sha256 digest"):
        store.blob_path("sha256:../../etc/passwd")


def test_garbage_ref_file_reads_as_missing(store: Store) -> None:
    (store.root / "refs" / "broken").write_text("not json")
    assert store.get_ref("broken") is None


def test_sweep_removes_temp_files_of_dead_processes(store: Store) -> None:
    from pytest_flightvm.procs import pid_namespace, process_start

    ns = pid_namespace()
    mine = store.tmp_path(".part")
    assert mine.name.startswith(f"{os.getpid()}-{process_start(os.getpid())}-{ns}-")
    mine.write_bytes(b"in flight")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = store.root / "tmp" / f"{proc.pid}-1-{ns}-abc.part"
    dead.write_bytes(b"half a blob")
    # our own pid, but another start time: a recycled pid, so its writer is gone
    recycled = store.root / "tmp" / f"{os.getpid()}-1-{ns}-ghi.part"
    recycled.write_bytes(b"old")
    assert store.sweep_tmp() == 2
    assert not dead.exists() and not recycled.exists() and mine.exists()


def test_sweep_leaves_other_pid_namespaces_and_fresh_legacy_names_alone(store: Store) -> None:
    gone = 2**22 + 1  # above Linux's largest pid_max: no process here has it
    # a dead pid here, but written in another pid namespace: that pid means nothing here
    foreign = store.root / "tmp" / f"{gone}-1-4026599999-abc.part"
    foreign.write_bytes(b"a live writer elsewhere")
    legacy = store.root / "tmp" / f"{gone}-def.part"  # the old <pid>-<rand> name
    legacy.write_bytes(b"recent")
    assert store.sweep_tmp() == 0
    assert foreign.exists() and legacy.exists()
    old = time.time() - 2 * 3600
    os.utime(legacy, (old, old))
    assert store.sweep_tmp() == 1
    assert foreign.exists() and not legacy.exists()


def test_lock_is_per_name(store: Store) -> None:
    a, b = store.lock("key-abc"), store.lock("key-def")
    with a:
        assert not b.is_locked
        with b:
            assert b.is_locked
    assert (store.root / "locks" / "key-abc.lock").exists()


# -- room on the disk ---------------------------------------------------------------------------


def test_a_blob_that_cannot_fit_fails_before_a_byte_moves(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "free_bytes", lambda path: 3 * MiB)
    with pytest.raises(store_mod.StoreUnusable) as info:
        store.writer(expected=sha(b"x"), size=8 * MiB)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"image store at {store.root} has no room for a blob of 8.0 MiB (3.0 MiB free)" in msg
    assert msg.endswith("free space there or set --flightvm-cache-dir")
    assert list((store.root / "tmp").iterdir()) == []  # no temp file was made
    data = os.urandom(2 * MiB)  # what fits, and a writer that declares no size, still write
    with store.writer(expected=sha(data), size=len(data)) as w:
        w.write(data)
    with store.writer() as w2:
        w2.write(b"y" * (4 * MiB))
    assert store.has(sha(data)) and store.has(sha(b"y" * (4 * MiB)))


def test_free_bytes_is_what_the_filesystem_says(tmp_path: Path) -> None:
    free = store_mod.free_bytes(tmp_path)
    usage = shutil.disk_usage(tmp_path)  # statvfs f_bavail, what a non-root user may use
    assert free is not None and 0 < free <= usage.total
    assert free >= usage.free if os.geteuid() == 0 else abs(free - usage.free) < 64 * MiB
    assert store_mod.free_bytes(tmp_path / "missing") is None


def test_a_filesystem_that_reports_no_blocks_is_not_full(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some FUSE and network filesystems answer statvfs with zeros: that says nothing
    about room, so a pull goes ahead (and a real ENOSPC still ends it in one line)."""
    real = os.statvfs(store.root)
    zeros = os.statvfs_result((real.f_bsize, real.f_frsize, 0, 0, 0, 0, 0, 0, 0, 255))
    monkeypatch.setattr(store_mod.os, "statvfs", lambda path: zeros)
    assert store_mod.free_bytes(store.root) is None
    data = os.urandom(MiB)
    with store.writer(expected=sha(data), size=len(data)) as w:
        w.write(data)
    assert store.has(sha(data))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root only)")
def test_a_disk_that_fills_mid_write_is_one_line_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """statvfs said there was room (another writer filled the disk since): the write
    fails with the kernel's ENOSPC, one line, and the partial file is removed."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "flightvm-unit", str(mount)],
                   check=True, capture_output=True)
    try:
        store = Store(mount / "store")
        monkeypatch.setattr(store_mod, "free_bytes", lambda path: None)
        data = os.urandom(4 * MiB)
        with pytest.raises(store_mod.StoreUnusable) as info:
            with store.writer(expected=sha(data), size=len(data)) as w:
                for i in range(0, len(data), MiB):
                    w.write(data[i:i + MiB])
        msg = str(info.value)
        assert "\n" not in msg and "No space left on device" in msg
        assert msg.endswith("free space there or set --flightvm-cache-dir")
        assert list((store.root / "tmp").iterdir()) == []
        assert list((store.root / "blobs" / "sha256").iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)

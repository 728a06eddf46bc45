"""R15 + R16: a shared host gets nothing.

R15, planted symlinks (and another user's dirs): every place flightvm keeps
state is planted with a link to a *victim* dir before flightvm gets there: the
per-user port table (every candidate dir), the cache dir's ``runs/``, a run's
``ssh/`` and ``vms/<name>/`` and ``run.json``, the store's ``tmp/``, the accel
verdict dir, ``seed render``'s key file. Each case ends with one
``flightvm:`` line or a safe fallback, and the victim is byte-for-byte unchanged.

R16, foreign domains: REAL libvirt domains (defined, never started, no disk
that exists) carrying our metadata namespace and a dead owner pid: one named
like somebody else's (``...-prod-db``), one flightvm-named whose files lie
outside our runs dir, and one whose owner is alive in another pid namespace
(``unshare --pid --fork --mount-proc``; its pid means nothing here). ``flightvm
gc`` leaves all three (and their files, and the victim) alone, while a
control domain of a dead run of ours is removed with its files. Every domain
this test defines has a unique name and is undefined at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from faultkit import PY, SEED, Tally, assert_no_traceback, base_env, cli, virsh
from test_r6_bad_input import check_cli, check_no_domain, check_setup_error, session

from pytest_flightvm.config import Settings
from pytest_flightvm.errors import FlightVMError, StoreUnusable
from pytest_flightvm.procs import pid_namespace
from pytest_flightvm.startup import new_run_id
from pytest_flightvm.vm import accel
from pytest_flightvm.vm.domain import DomainSpec, Owner
from pytest_flightvm.vm.factory import RunContext, VMFactory, make_run_dir
from pytest_flightvm.vm.reaper import write_run_file
from tests.fake_disk import MiB, write_fake_qcow2

NOBODY = 65534


def snapshot(victim: Path) -> dict[str, str]:
    """Every name under ``victim`` with its content hash (links as their target)."""
    out = {}
    for p in sorted(victim.rglob("*")):
        rel = str(p.relative_to(victim))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    out["."] = oct(victim.stat().st_mode)
    return out


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.mkdir()
    (v / "precious.conf").write_text("owned by someone else\n")
    (v / "id_ed25519").write_text("not your key\n")
    (v / "4194305-0-0-abcdef.part").write_text("looks like a dead writer's temp file\n")
    old = time.time() - 7200
    os.utime(v / "4194305-0-0-abcdef.part", (old, old))
    return v


def _reserve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = ("import sys\nfrom pytest_flightvm.errors import FlightVMError\n"
            "from pytest_flightvm.vm.ports import reserve_port, default_state_dir\n"
            "try:\n    print(reserve_port(), default_state_dir())\n"
            "except FlightVMError as e:\n    sys.exit(f'flightvm: {e}')\n")
    return subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=60)


# -- R15: planted symlinks ----------------------------------------------------------------------


def test_r15_port_table_dirs(tally: Tally, tmp_path: Path, victim: Path) -> None:
    before = snapshot(victim)
    runtime, home, tmp = tmp_path / "runtime", tmp_path / "home", tmp_path / "tmp"
    runtime.mkdir(mode=0o700)
    (home / ".local" / "state").mkdir(parents=True)
    tmp.mkdir()
    uid = os.geteuid()
    (runtime / "flightvm").symlink_to(victim)
    (home / ".local" / "state" / "flightvm").symlink_to(victim)
    (tmp / f"flightvm-{uid}").symlink_to(victim)
    (tmp / f"flightvm-ports-{uid}").symlink_to(victim)  # the old predictable name
    env = base_env(XDG_RUNTIME_DIR=str(runtime), HOME=str(home), TMPDIR=str(tmp))
    env.pop("XDG_STATE_HOME", None)
    with tally.trial("R15", "ports: every state dir candidate is a planted link"):
        proc = _reserve(env)
        assert proc.returncode == 1 and proc.stdout == "", proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "symbolic link" in lines[0], proc.stderr
        assert snapshot(victim) == before
    with tally.trial("R15", "ports: planted runtime and home dirs fall back to a private dir"):
        (tmp / f"flightvm-{uid}").unlink()
        proc = _reserve(env)
        assert proc.returncode == 0, proc.stderr
        port, where = proc.stdout.split()
        assert Path(where) == tmp / f"flightvm-{uid}" and not Path(where).is_symlink()
        assert Path(where).stat().st_mode & 0o777 == 0o700
        assert port in json.loads((Path(where) / "ports.json").read_text())
        assert (tmp / f"flightvm-ports-{uid}").is_symlink()  # never used
        assert snapshot(victim) == before
    with tally.trial("R15", "ports: a private runtime dir is used, a planted table replaced"):
        (runtime / "flightvm").unlink()
        (runtime / "flightvm").mkdir(mode=0o700)
        (runtime / "flightvm" / "ports.json").symlink_to(victim / "precious.conf")
        proc = _reserve(env)
        assert proc.returncode == 0, proc.stderr
        assert Path(proc.stdout.split()[1]) == runtime / "flightvm"
        assert not (runtime / "flightvm" / "ports.json").is_symlink()
        assert snapshot(victim) == before


def test_r15_run_dir_pieces(tally: Tally, pytester: pytest.Pytester, tmp_path: Path,
                            victim: Path) -> None:
    before = snapshot(victim)
    small = write_fake_qcow2(tmp_path / "small.qcow2", MiB, seed=SEED + 15)
    with tally.trial("R15", "pytest session: the cache dir's runs/ is a planted link"):
        cache = tmp_path / "cache-a"
        cache.mkdir()
        (cache / "runs").symlink_to(victim)
        result, text = session(pytester, f"--flightvm-cache-dir={cache}",
                               f"--flightvm-image={small}")
        check_setup_error(result, text, [str(cache / "runs"), "symbolic link"])
        check_no_domain(cache)
        assert snapshot(victim) == before
    cache = tmp_path / "cache-b"
    settings = Settings(cache_dir=cache, accel="tcg", libvirt_uri="qemu+unix:///system?"
                        "socket=/nonexistent", rootdir=tmp_path)
    with tally.trial("R15", "a run's ssh/ dir is a planted link"):
        rid = new_run_id()
        run = RunContext.create(settings, rid, "main")
        (run.run_dir / "ssh").symlink_to(victim)
        with pytest.raises(StoreUnusable, match="symbolic link"):
            VMFactory(settings, small, run)
        assert snapshot(victim) == before
    with tally.trial("R15", "a VM's dir is a planted link: replaced, never followed"):
        rid = new_run_id()
        run = RunContext.create(settings, rid, "main")
        factory = VMFactory(settings, small, run)
        vms = run.run_dir / "vms"
        vms.mkdir(mode=0o700)
        (vms / f"flightvm-{rid}-main-1").symlink_to(victim)
        with pytest.raises(FlightVMError, match="libvirt"):  # the seed is written, then no libvirt
            factory.create()
        vm_dir = vms / f"flightvm-{rid}-main-1"
        assert not vm_dir.is_symlink() and (vm_dir / "seed.iso").is_file()
        assert snapshot(victim) == before
    with tally.trial("R15", "run.json and the accel verdict dir are planted links"):
        run_dir = make_run_dir(cache / "runs", new_run_id())
        (run_dir / "run.json").symlink_to(victim / "precious.conf")
        write_run_file(run_dir)
        assert json.loads((run_dir / "run.json").read_text())["pid_ns"] == pid_namespace()
        (cache / "accel").symlink_to(victim)
        with pytest.raises(StoreUnusable, match="symbolic link"):
            accel.save_verdict(cache, "tcg", "fault tier")
        assert snapshot(victim) == before


def test_r15_store_tmp_seed_key_and_foreign_cache_dir(tally: Tally, pytester: pytest.Pytester,
                                                      tmp_path: Path, victim: Path) -> None:
    before = snapshot(victim)
    small = write_fake_qcow2(tmp_path / "small.qcow2", MiB, seed=SEED + 16)
    with tally.trial("R15", "the store's tmp/ is a planted link (the sweep would delete there)"):
        cache = tmp_path / "cache-s"
        (cache / "store").mkdir(parents=True)
        (cache / "store" / "tmp").symlink_to(victim)
        check_cli(["cache", "get", "--cache-dir", str(cache), "--image", str(small)],
                  ["tmp is a symbolic link", "--cache-dir"])
        assert snapshot(victim) == before
    ud = tmp_path / "ud.yaml"
    ud.write_text("#cloud-config\n{}\n")
    for planted in ("id_ed25519", "id_ed25519.pub"):
        with tally.trial("R15", f"seed render -o X with a planted X.{planted}"):
            out = tmp_path / f"seed-{planted}.iso"
            link = tmp_path / f"{out.name}.{planted}"
            link.symlink_to(victim / "id_ed25519")
            proc = cli("seed", "render", "--user-data", str(ud), "-o", str(out), env=base_env())
            assert proc.returncode == 2 and proc.stdout == "", proc
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "already exists" in lines[0], lines
            assert "; generated" not in lines[0]
            assert not out.exists() and link.is_symlink()
            assert snapshot(victim) == before
    with tally.trial("R15", "a cache dir owned by another user (CLI and pytest)"):
        theirs = tmp_path / "theirs"
        (theirs / "store").mkdir(parents=True)
        os.chown(theirs, NOBODY, NOBODY)
        os.chown(theirs / "store", NOBODY, NOBODY)
        check_cli(["cache", "get", "--cache-dir", str(theirs), "--image", str(small)],
                  [f"belongs to uid {NOBODY}", "--cache-dir"])
        result, text = session(pytester, f"--flightvm-cache-dir={theirs}",
                               f"--flightvm-image={small}")
        check_setup_error(result, text, [f"belongs to uid {NOBODY}", "--flightvm-cache-dir"])
        assert sorted(p.name for p in theirs.iterdir()) == ["store"]
        assert list((theirs / "store").iterdir()) == []


# -- R16: foreign domains and other pid namespaces -----------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


def _define(name: str, owner: Owner, files: tuple[Path, ...], where: Path) -> str:
    spec = DomainSpec(name=name, overlay=where / "none.qcow2", seed_iso=None,
                      console_log=where / "none.log", ssh_port=1, mac="52:54:00:00:16:01",
                      owner=owner, files=files)
    xml = where / f"{name}.xml"
    xml.write_text(spec.to_xml())
    virsh("define", str(xml), check=True)
    return name


def _defined(name: str) -> bool:
    return virsh("dominfo", name).returncode == 0


NS_CHILD = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from pytest_flightvm.vm.domain import Owner
    from pytest_flightvm.vm.factory import make_run_dir
    from pytest_flightvm.vm.reaper import write_run_file
    runs, rid = Path(sys.argv[1]), sys.argv[2]
    run_dir = make_run_dir(runs, rid)
    vm_dir = run_dir / "vms" / f"flightvm-{rid}-main-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / "overlay.qcow2").write_text("in use")
    write_run_file(run_dir)
    print(json.dumps(Owner.current(rid, "main", run_dir).__dict__), flush=True)
    sys.stdin.read()  # alive until the test closes our stdin
''')


def test_r16_foreign_domains_and_namespaces(tally: Tally, tmp_path: Path, victim: Path) -> None:
    before = snapshot(victim)
    cache = tmp_path / "cache"
    runs = cache / "runs"
    tag = uuid.uuid4().hex[:8]
    host = os.uname().nodename
    defined: list[str] = []
    child = None
    try:
        # a domain named like someone else's, with our metadata and a dead owner
        rid1 = new_run_id()
        d1 = make_run_dir(runs, rid1)
        defined.append(_define(f"hostsec-{tag}-prod-db",
                               Owner(rid1, _dead_pid(), "1", host, "main", str(d1),
                                     pid_namespace()), (victim,), tmp_path))
        # flightvm-named, its run dir ours, but one file it names is outside the runs dir
        rid2 = new_run_id()
        d2 = make_run_dir(runs, rid2)
        (d2 / "vms").mkdir()
        (d2 / "vms" / "escape").symlink_to(victim)
        defined.append(_define(f"flightvm-{rid2}-{tag}-1",
                               Owner(rid2, _dead_pid(), "1", host, "main", str(d2),
                                     pid_namespace()), (d2 / "vms", victim), tmp_path))
        defined.append(_define(f"flightvm-{rid2}-{tag}-2",
                               Owner(rid2, _dead_pid(), "1", host, "main", str(d2),
                                     pid_namespace()), (d2 / "vms" / "escape",), tmp_path))
        # a live run in another pid namespace: its run dir and domain in our runs dir
        rid3 = new_run_id()
        child = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", PY, "-c",
                                  NS_CHILD, str(runs), rid3], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=base_env())
        assert child.stdout is not None
        owner3 = Owner(**json.loads(child.stdout.readline()))
        assert owner3.pid_ns and owner3.pid_ns != pid_namespace()
        d3 = Path(owner3.run_dir)
        vm3 = d3 / "vms" / f"flightvm-{rid3}-main-1"
        defined.append(_define(f"flightvm-{rid3}-main-1", owner3, (vm3,), tmp_path))
        # the control: a dead run of ours, in our namespace
        rid4 = new_run_id()
        d4 = make_run_dir(runs, rid4)
        write_run_file(d4, pid=_dead_pid())
        vm4 = d4 / "vms" / f"flightvm-{rid4}-{tag}-1"
        vm4.mkdir(parents=True)
        (vm4 / "overlay.qcow2").write_text("left behind")
        control = _define(vm4.name, Owner(rid4, _dead_pid(), "1", host, "main", str(d4),
                                          pid_namespace()), (vm4,), tmp_path)
        defined.append(control)

        gc = cli("gc", "--cache-dir", str(cache), env=base_env())
        assert gc.returncode == 0, gc.stderr
        assert_no_traceback(gc.stderr)
        removed = [line.split()[-1] for line in gc.stdout.splitlines()
                   if line.startswith("removed domain")]
        with tally.trial("R16", "a domain named like someone else's (prod-db), our metadata"):
            assert _defined(defined[0]) and defined[0] not in removed
            assert snapshot(victim) == before
        with tally.trial("R16", "flightvm-named domains naming files outside the runs dir"):
            assert _defined(defined[1]) and _defined(defined[2])
            assert (d2 / "vms" / "escape").is_symlink()
            assert snapshot(victim) == before
        with tally.trial("R16", "a live run in another pid namespace"):
            assert child.poll() is None
            assert _defined(defined[3]) and (vm3 / "overlay.qcow2").read_text() == "in use"
            assert (d3 / "run.json").is_file()
        with tally.trial("R16", "control: a dead run of ours is reaped with its files"):
            assert removed == [control], gc.stdout
            assert not _defined(control) and not d4.exists()
        with tally.trial("R16", "gc --name of a foreign domain leaves it"):
            for name in defined[:3]:
                proc = cli("gc", "--cache-dir", str(cache), "--name", name, env=base_env())
                assert proc.returncode == 1 and proc.stdout == "", proc
                assert name.startswith("hostsec-") or "leaving domain" in proc.stderr
                assert _defined(name)
            assert snapshot(victim) == before
    finally:
        if child is not None:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(30)
        for name in defined:
            virsh("undefine", name)
    assert not any(_defined(n) for n in defined)

"""A shared host gets nothing: private state dirs, no planted links followed, the
reaper and the sweep acting only on their own things (issue 14 items 2, 6-9, 11)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_flightvm.cache.store import Store
from pytest_flightvm.cli import main
from pytest_flightvm.errors import ConfigError, StoreUnusable
from pytest_flightvm.hosts import Host
from pytest_flightvm.procs import pid_namespace
from pytest_flightvm.statedir import private_dir, replace_file, user_state_dir
from pytest_flightvm.vm.domain import DomainSpec, Owner
from pytest_flightvm.vm.factory import RunContext, VMFactory, VMRequest, make_run_dir
from pytest_flightvm.vm.ports import reserve_port
from pytest_flightvm.vm.reaper import reap, run_dir_alive, write_run_file

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    return victim


def _intact(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]
    assert (victim / "precious").read_text() == "keep me\n"


# -- private dirs and files -------------------------------------------------------------------


def test_private_dir_refuses_a_planted_link_and_closes_an_open_dir(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    (tmp_path / "state").symlink_to(victim)
    with pytest.raises(StoreUnusable, match="symbolic link"):
        private_dir(tmp_path / "state")
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o777)
    private_dir(tmp_path / "open")
    assert (tmp_path / "open").stat().st_mode & 0o777 == 0o700
    _intact(victim)


@as_root
def test_private_dir_refuses_another_users_dir(tmp_path: Path) -> None:
    (tmp_path / "theirs").mkdir()
    os.chown(tmp_path / "theirs", NOBODY, NOBODY)
    with pytest.raises(StoreUnusable, match=f"belongs to uid {NOBODY}"):
        private_dir(tmp_path / "theirs")


def test_replace_file_replaces_a_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    (tmp_path / "table.json").symlink_to(victim / "precious")
    replace_file(tmp_path / "table.json", b"{}")
    assert not (tmp_path / "table.json").is_symlink()
    assert (tmp_path / "table.json").read_bytes() == b"{}"
    _intact(victim)


def test_user_state_dir_prefers_a_private_runtime_dir(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    assert user_state_dir({"XDG_RUNTIME_DIR": str(runtime)}) == runtime / "flightvm"
    os.chmod(runtime, 0o755)  # not the private runtime dir the spec promises: not used
    home = tmp_path / "home"
    got = user_state_dir({"XDG_RUNTIME_DIR": str(runtime), "HOME": str(home)})
    assert got == home / ".local" / "state" / "flightvm"
    assert got.stat().st_mode & 0o777 == 0o700


def test_ports_never_use_a_planted_state_dir_or_table(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    (tmp_path / "ports").symlink_to(victim)
    with pytest.raises(StoreUnusable, match="symbolic link"):
        reserve_port(tmp_path / "ports")
    state = private_dir(tmp_path / "state")
    (state / "ports.json").symlink_to(victim / "precious")
    port = reserve_port(state)
    assert str(port) in json.loads((state / "ports.json").read_text())
    _intact(victim)


# -- run dirs, VM names, keys -----------------------------------------------------------------


def test_run_dir_pieces_are_private_and_never_followed(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    cache = tmp_path / "cache"
    run_dir = make_run_dir(cache / "runs", "260101000000-abcd")
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert (cache / "runs").stat().st_mode & 0o777 == 0o700
    (cache / "runs" / "260101000000-beef").symlink_to(victim)
    with pytest.raises(StoreUnusable, match="symbolic link"):
        make_run_dir(cache / "runs", "260101000000-beef")
    # run.json through a planted link: the link is replaced, the victim untouched
    (run_dir / "run.json").symlink_to(victim / "precious")
    write_run_file(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["pid_ns"] == pid_namespace()
    _intact(victim)


@as_root
def test_another_users_cache_dir_is_one_line_store_unusable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "theirs"
    cache.mkdir()
    os.chown(cache, NOBODY, NOBODY)
    with pytest.raises(StoreUnusable, match="belongs to uid"):
        make_run_dir(cache / "runs", "260101000000-abcd")
    store = cache / "store"
    store.mkdir()
    os.chown(store, NOBODY, NOBODY)
    with pytest.raises(StoreUnusable, match="image store .* belongs to uid"):
        Store(store)
    assert main(["cache", "ls", "--cache-dir", str(cache), "--offline"]) == 2
    err = capsys.readouterr().err
    # the CLI names its own flag (--cache-dir), not the plugin's
    assert err.count("\n") == 1 and err.startswith("flightvm: ") and "set --cache-dir" in err


class _NoBoot(VMFactory):
    def __init__(self, run: RunContext) -> None:  # no settings, libvirt or key needed
        self.run = run
        self.host = Host("qemu:///system")  # the one local host
        self.booted_names: list[str] = []
        self._hardware_checked = True  # no firmware or CPU check: nothing boots here

    def _boot(self, name: str, request: VMRequest, accel: str, probation: bool) -> Any:
        self.booted_names.append(name)
        return SimpleNamespace(name=name)  # the factory sets boot_attempts on it


def test_vm_names_are_validated_before_any_file_is_touched(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "260101000000-abcd"
    (run_dir / "vms").mkdir(parents=True)
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "precious").write_text("keep me\n")
    factory = _NoBoot(RunContext("260101000000-abcd", run_dir))
    for bad in ("flightvm-../../x", "../../x", "a/b", "flightvm-..", "x" * 60):
        with pytest.raises(ConfigError, match="VM name"):
            factory.create(VMRequest(name=bad))
    with pytest.raises(ConfigError, match="VM name"):  # _boot checks too, before its rmtree
        VMFactory._boot(factory, "flightvm-../../x", VMRequest(), "tcg", False)
    assert (outside / "precious").read_text() == "keep me\n"
    assert not factory.booted_names


def test_custom_vm_names_carry_the_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_flightvm.vm import accel

    monkeypatch.setattr(accel, "initial_choice", lambda *_a: ("tcg", False))
    factory = _NoBoot(RunContext("260101000000-abcd", tmp_path))
    factory.settings = type("S", (), {"accel": "tcg", "cache_dir": tmp_path})()  # type: ignore
    factory.create(VMRequest(name="web"))
    factory.create(VMRequest(name="flightvm-db"))
    assert factory.booted_names == ["flightvm-260101000000-abcd-web",
                                    "flightvm-260101000000-abcd-db"]


def test_seed_render_never_reuses_a_planted_key(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    victim = _victim(tmp_path)
    ud = tmp_path / "ud.yaml"
    ud.write_text("#cloud-config\n{}\n")
    out = tmp_path / "seed.iso"
    (tmp_path / "seed.iso.id_ed25519").symlink_to(victim / "precious")
    assert main(["seed", "render", "--user-data", str(ud), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "; generated" not in err and err.count("\n") == 1
    assert not out.exists()
    _intact(victim)
    (tmp_path / "seed.iso.id_ed25519").unlink()
    assert main(["seed", "render", "--user-data", str(ud), "-o", str(out)]) == 0
    assert "generated" in capsys.readouterr().err
    key = tmp_path / "seed.iso.id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in key.read_bytes()


def test_run_keypair_replaces_a_planted_link(tmp_path: Path) -> None:
    from pytest_flightvm.vm.ssh import generate_keypair

    victim = _victim(tmp_path)
    ssh = private_dir(tmp_path / "ssh")
    (ssh / "id_ed25519").symlink_to(victim / "precious")
    key, pub = generate_keypair(ssh)
    assert not key.is_symlink() and pub.startswith("ssh-ed25519 ")
    assert generate_keypair(ssh) == (key, pub)  # reused: it is ours now
    _intact(victim)


# -- the reaper: only its own domains ---------------------------------------------------------


class _Dom:
    def __init__(self, name: str, xml: str) -> None:
        self._name, self._xml = name, xml
        self.removed = False

    def name(self) -> str:
        return self._name

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802 - libvirt's name
        return self._xml

    def isActive(self) -> bool:  # noqa: N802
        return False

    def undefineFlags(self, _flags: int) -> None:  # noqa: N802
        self.removed = True


class _Conn:
    def __init__(self, doms: list[_Dom]) -> None:
        self.doms = doms

    def listAllDomains(self, _flags: int) -> list[_Dom]:  # noqa: N802
        return self.doms


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _dom(name: str, run_id: str, run_dir: Path, files: tuple[Path, ...],
         pid_ns: str | None = None) -> _Dom:
    owner = Owner(run_id, _dead_pid(), "1", os.uname().nodename, "gw0", str(run_dir),
                  pid_namespace() if pid_ns is None else pid_ns)
    spec = DomainSpec(name=name, overlay=run_dir / "o.qcow2", seed_iso=None,
                      console_log=run_dir / "c.log", ssh_port=1, mac="52:54:00:00:00:01",
                      owner=owner, files=files)
    return _Dom(name, spec.to_xml())


def test_reaper_acts_only_on_its_own_domains(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    runs = tmp_path / "cache" / "runs"
    rid = "260101000000-abcd"
    run_dir = make_run_dir(runs, rid)
    vm_dir = private_dir(run_dir / "vms" / f"flightvm-{rid}-gw0-1")
    (run_dir / "vms" / "escape").symlink_to(victim)
    foreign = [
        _dom("prod-db", rid, run_dir, (victim,)),  # not our name
        _dom(f"flightvm-{rid}-gw0-2", rid, run_dir, (victim,)),  # a file outside
        _dom(f"flightvm-{rid}-gw0-3", rid, run_dir, (run_dir / "vms" / "escape",)),  # via link
        _dom(f"flightvm-{rid}-gw0-4", rid, tmp_path, (tmp_path / "victim",)),  # run dir outside
        _dom(f"flightvm-{rid}-gw0-5", rid, run_dir, (vm_dir,), pid_ns="4026599999"),  # other ns
        _dom("flightvm-260101000000-ffff-gw0-1", "260101000000-ffff", run_dir, (vm_dir,)),
    ]
    ours = _dom(f"flightvm-{rid}-gw0-1", rid, run_dir, (vm_dir,))
    done = reap("unused", runs, conn=_Conn([*foreign, ours]))
    assert [d.name for d in done if d.kind == "domain"] == [ours.name()]
    assert ours.removed and not any(d.removed for d in foreign)
    assert not vm_dir.exists()
    _intact(victim)


def test_run_dirs_of_another_pid_namespace_are_left_alone(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    theirs = make_run_dir(runs, "260101000000-0001")
    (theirs / "run.json").write_text(json.dumps(
        {"pid": _dead_pid(), "pid_start": "1", "host": os.uname().nodename,
         "pid_ns": "4026599999"}))
    dead = make_run_dir(runs, "260101000000-0002")
    write_run_file(dead, pid=_dead_pid())
    assert run_dir_alive(theirs) and not run_dir_alive(dead)
    done = reap("unused", runs, conn=_Conn([]))
    assert [Path(d.name).name for d in done] == ["260101000000-0002"]
    assert theirs.is_dir() and not dead.exists()

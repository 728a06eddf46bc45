"""Baked logins: settings, the askpass wiring of the ssh child, fast failure on refusal."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_flightvm.config import resolve
from pytest_flightvm.errors import BootError, ConfigError
from pytest_flightvm.vm.machine import Machine
from pytest_flightvm.vm.ssh import Login, SSHClient, write_askpass

SECRET = "s3cret with spaces'\"$x"

FAKE_SSH = r"""#!/usr/bin/env python3
# A stand-in ssh: records argv and what $SSH_ASKPASS answers, the way OpenSSH asks it.
import json, os, subprocess, sys
askpass = os.environ.get("SSH_ASKPASS")
answer = None
if askpass and os.environ.get("SSH_ASKPASS_REQUIRE") == "force":
    answer = subprocess.run([askpass, "user@127.0.0.1's password: "], capture_output=True,
                            text=True, env=os.environ).stdout
with open(os.environ["FAKE_SSH_LOG"], "a") as fh:
    fh.write(json.dumps({"argv": sys.argv[1:], "answer": answer}) + "\n")
sys.exit(0)
"""


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ssh = bindir / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    log = tmp_path / "ssh.jsonl"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    return log


def test_password_reaches_ssh_through_askpass_only(tmp_path: Path, fake_ssh: Path) -> None:
    askpass = write_askpass(tmp_path / "run" / "ssh")
    assert stat.S_IMODE(askpass.stat().st_mode) == 0o700
    assert SECRET not in askpass.read_text()  # the script holds no secret
    login = Login("user", tmp_path / "id", password=SECRET, askpass=askpass, baked=True)
    client = SSHClient(2222, login.key, login.user, login=login)
    client.run("true", stdin=b"x")
    record = json.loads(fake_ssh.read_text().splitlines()[0])
    assert record["answer"] == SECRET + "\n"
    argv = record["argv"]
    assert not any(SECRET in a for a in argv)
    # ssh keeps the first value of an option: ours must come before BatchMode=yes
    batch = [argv[i + 1] for i, a in enumerate(argv) if a == "-o" and argv[i + 1].startswith("BatchMode")]
    assert batch[0] == "BatchMode=no"
    assert "PubkeyAuthentication=no" in argv and "NumberOfPasswordPrompts=1" in argv
    assert "user@127.0.0.1" in argv
    assert SECRET not in client.command() and SECRET not in repr(login)
    assert SECRET not in repr(resolve({"ssh_user": "user"}, {}, {"FLIGHTVM_SSH_PASSWORD": SECRET}))


def test_run_key_login_keeps_batch_mode(tmp_path: Path, fake_ssh: Path) -> None:
    client = SSHClient(2222, tmp_path / "id", "flightvm")
    client.run("true")
    record = json.loads(fake_ssh.read_text().splitlines()[0])
    assert record["answer"] is None
    assert record["argv"][:2] == ["-o", "BatchMode=yes"]


def test_login_settings_need_each_other(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    s = resolve({"ssh_user": "user", "ssh_key": str(key)}, {}, {})
    assert (s.ssh_user, s.ssh_key, s.ssh_password) == ("user", key, None)
    s = resolve({}, {"ssh_user": "user"}, {"FLIGHTVM_SSH_PASSWORD": "pw"})
    assert (s.ssh_user, s.ssh_password) == ("user", "pw")
    # a password left in the environment does nothing without a baked-login user
    s = resolve({}, {}, {"FLIGHTVM_SSH_PASSWORD": "pw"})
    assert (s.ssh_user, s.ssh_password) == (None, None)
    for cli, env, message in (
        ({"ssh_user": "user"}, {}, "needs a credential"),
        ({"ssh_key": str(key)}, {}, "needs --flightvm-ssh-user"),
        ({"ssh_user": "Bad User"}, {"FLIGHTVM_SSH_PASSWORD": "pw"}, "not a valid Linux user"),
        ({"ssh_user": "user", "ssh_key": str(key) + ".pub"}, {}, "not a private key"),
        ({"ssh_user": "user", "ssh_key": str(tmp_path / "nope")}, {}, "cannot be read"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            resolve(cli, {}, env)
        assert "\n" not in str(info.value) and "pw" not in str(info.value)


class _SSH:
    def __init__(self, login: Login, answers: list[tuple[int, str, str]]) -> None:
        self.login, self.user, self.answers = login, login.user, answers

    def run(self, cmd: str, **_: object) -> object:
        from pytest_flightvm.vm.ssh import CommandResult

        rc, out, err = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return CommandResult(cmd, rc, out, err)


def _machine(login: Login, answers: list[tuple[int, str, str]]) -> Machine:
    m = Machine.__new__(Machine)
    m.spec = type("S", (), {"name": "flightvm-t-1"})()  # type: ignore[assignment]
    m.ssh = _SSH(login, answers)  # type: ignore[assignment]
    m.ready_checks = ()
    m.has_cloud_init = None
    m._denied_at = None
    return m


def test_refused_baked_login_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 106.0])
    monkeypatch.setattr("pytest_flightvm.vm.machine.time.monotonic", lambda: next(clock))
    login = Login("user", tmp_path / "id", password="pw", askpass=tmp_path / "a", baked=True)
    m = _machine(login, [(255, "", "user@127.0.0.1: Permission denied (publickey,password).")])
    assert m._guest_ready() is False  # the first refusal may be a boot race
    with pytest.raises(BootError, match=r"refused the login as 'user' \(Permission denied\); "
                                        r"check the password in FLIGHTVM_SSH_PASSWORD"):
        m._guest_ready()


def test_refusals_while_booting_or_for_cloud_init_users_wait(tmp_path: Path) -> None:
    booting = "System is booting up. Unprivileged users are not permitted to log in yet.\n" \
              "Permission denied (password)."
    baked = Login("user", tmp_path / "id", password="pw", askpass=tmp_path / "a", baked=True)
    m = _machine(baked, [(255, "", booting)])
    assert [m._guest_ready() for _ in range(3)] == [False] * 3
    m = _machine(Login("flightvm", tmp_path / "id"), [(255, "", "Permission denied (publickey).")])
    assert [m._guest_ready() for _ in range(3)] == [False] * 3


def test_no_cloud_init_means_systemd_readiness(tmp_path: Path) -> None:
    baked = Login("user", tmp_path / "id", password="pw", askpass=tmp_path / "a", baked=True)
    m = _machine(baked, [(0, "\n@@flightvm-result@@\n", ""),  # no cloud-init state files
                         (127, "", "cloud-init: command not found"),
                         (0, "", ""),  # sudo -n true
                         (0, "starting\n", ""),
                         (0, "degraded\n", "")])
    assert m._guest_ready() is False and m.has_cloud_init is False
    assert m._guest_ready() is True
    # without a baked login, a missing cloud-init is still a one-line error
    m = _machine(Login("flightvm", tmp_path / "id"),
                 [(0, "\n@@flightvm-result@@\n", ""), (127, "", "")])
    with pytest.raises(BootError, match="cloud-init is not installed.*--flightvm-ssh-user"):
        m._guest_ready()
    m = _machine(baked, [(0, "\n@@flightvm-result@@\n", ""), (127, "", ""),
                         (1, "", "sudo: a password is required")])
    with pytest.raises(BootError, match="cannot run sudo without a password"):
        m._guest_ready()


def test_run_input_reaches_stdin(tmp_path: Path) -> None:
    seen: list[object] = []

    class Rec:
        def run(self, cmd: str, *, check: bool, timeout: float | None,
                stdin: bytes | None = None) -> None:
            seen.append(stdin)

    m = Machine.__new__(Machine)
    m.ssh = Rec()  # type: ignore[assignment]
    m.run("cat", input="héllo")
    m.run("cat", input=b"\x00\xff")
    m.run("true")
    assert seen == ["héllo".encode(), b"\x00\xff", None]

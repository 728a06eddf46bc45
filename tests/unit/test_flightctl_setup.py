"""Run the in-guest setup script for real, against a temp root and PATH shims.

``FLIGHTVM_SETUP_ROOT`` prefixes every guest path the script touches and
``FLIGHTVM_SETUP_CONSOLE`` replaces /dev/console; package managers, systemctl,
the CA tools, mount and blkid are shims that log their arguments. PATH holds
only the shims and links to the few real tools the script needs, so a tool
"absent" from the shims is absent for the script.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_flightvm.flightctl import CONSOLE_DONE, CONSOLE_FAILED_RE, setup_script

SCRIPT = Path(__file__).resolve().parents[2] / "pytest_flightvm" / "seed" / "flightctl-setup.sh"
REAL_TOOLS = ("bash", "mkdir", "touch", "chmod", "date", "tail", "rmdir", "rm", "install",
              "sleep", "grep", "env")
DEFAULT_SHIMS = ("systemctl", "apt-get", "dpkg", "update-ca-certificates", "mount", "umount",
                 "blkid")

SHIM = r"""#!/bin/bash
name=${0##*/}
printf '%s\n' "$name $*" >>"$SHIM_LOG"
case " ${SHIM_FAIL:-} " in
    *" $name "*) echo "E: simulated $name failure" >&2; exit 100 ;;
esac
case $name in
    systemctl)
        case $1 in
            is-active)
                echo "${SHIM_AGENT_STATE:-active}"
                [ "${SHIM_AGENT_STATE:-active}" = active ]
                exit ;;
            cat) [ -z "${SHIM_NO_UNIT:-}" ]; exit ;;
            list-jobs)
                if [ -n "${SHIM_JOB_WAITING:-}" ]; then
                    echo "42 flightctl-agent.service start waiting"
                fi ;;
        esac ;;
    mount)
        dev=${*: -2:1}
        dir=${*: -1}
        if [ "$dev" = "${SHIM_SEED_DEV:-}" ]; then
            /bin/cp -a "$SHIM_SEED_SRC/." "$dir/"
        else
            echo "mount: $dev: wrong fs type, bad option, bad superblock" >&2
            exit 32
        fi ;;
    blkid)
        if [ "$1" = -L ] && [ "$2" = cidata ] && [ -n "${SHIM_BLKID_DEV:-}" ]; then
            echo "$SHIM_BLKID_DEV"
        else
            exit 2
        fi ;;
    bootc | ostree) /bin/mkdir -p "$FLIGHTVM_SETUP_ROOT/usr" ;;
esac
exit 0
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    lines: list[str]  # status lines on stdout
    console: list[str]
    log: str
    calls: list[str]
    root: Path


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.root.mkdir()
        self.seed = tmp / "seed"
        self.payload = self.seed / "flightctl"
        self.payload.mkdir(parents=True)
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.shim = tmp / "shim.sh"
        self.shim.write_text(SHIM)
        self.shim.chmod(0o755)
        for tool in REAL_TOOLS:
            real = shutil.which(tool)
            assert real, f"{tool} is needed to run the setup script"
            (self.bin / tool).symlink_to(real)

    def full_payload(self, *, packages: Iterable[str] = ("flightctl-agent_0.1_all.deb",)) -> None:
        (self.payload / "config.yaml").write_text("agent: {server: https://127.0.0.1:7443}\n")
        (self.payload / "certs").mkdir()
        (self.payload / "certs" / "client.crt").write_text("CRT")
        (self.payload / "certs" / "client.key").write_text("KEY")
        (self.payload / "rpms").mkdir()
        for name in packages:
            (self.payload / "rpms" / name).write_bytes(b"pkg")
        (self.payload / "ca.pem").write_text("CA")
        (self.payload / "registry.conf").write_text("[[registry]]\n")

    def run(
        self,
        *,
        shims: Iterable[str] = DEFAULT_SHIMS,
        seed_arg: bool = True,
        env: dict[str, str] | None = None,
    ) -> Result:
        for tool in shims:
            link = self.bin / tool
            if not link.exists():
                link.symlink_to(self.shim)
        calls = self.tmp / "calls.log"
        console = self.tmp / "console.log"
        full_env = {
            "PATH": str(self.bin),
            "FLIGHTVM_SETUP_ROOT": str(self.root),
            "FLIGHTVM_SETUP_CONSOLE": str(console),
            "FLIGHTVM_SETUP_TIMEOUT": "2",
            "SHIM_LOG": str(calls),
            "SHIM_SEED_SRC": str(self.seed),
            **(env or {}),
        }
        args = ["/bin/bash", str(SCRIPT)] + ([str(self.seed)] if seed_arg else [])
        proc = subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=60)
        log = self.root / "var" / "log" / "flightvm-setup.log"
        return Result(
            returncode=proc.returncode,
            stdout=proc.stdout,
            stderr=proc.stderr,
            lines=proc.stdout.splitlines(),
            console=console.read_text().splitlines() if console.exists() else [],
            log=log.read_text() if log.exists() else "",
            calls=calls.read_text().splitlines() if calls.exists() else [],
            root=self.root,
        )


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def status(result: Result, n: int) -> str:
    prefix = f"flightvm-setup: step {n}/7 "
    (line,) = [ln for ln in result.lines if ln.startswith(prefix)]
    return line.split(": ", 2)[2]  # after "flightvm-setup: step N/7 NAME: "


def test_script_is_the_packaged_one() -> None:
    assert SCRIPT.read_text() == setup_script()


def test_bash_syntax() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_happy_path_debian(harness: Harness) -> None:
    harness.full_payload()
    r = harness.run()
    assert r.returncode == 0, r.stdout + r.stderr + r.log
    assert r.lines == [
        f"flightvm-setup: step 1/7 mount-seed: ok (using {harness.seed})",
        "flightvm-setup: step 2/7 packages: ok (1 package file(s) with apt-get)",
        "flightvm-setup: step 3/7 config: ok (/etc/flightctl/config.yaml)",
        "flightvm-setup: step 4/7 certs: ok (2 file(s) in /etc/flightctl/certs)",
        "flightvm-setup: step 5/7 ca-trust: ok (update-ca-certificates)",
        "flightvm-setup: step 6/7 registry: ok "
        "(/etc/containers/registries.conf.d/flightctl-e2e.conf)",
        "flightvm-setup: step 7/7 agent: ok (flightctl-agent.service active)",
        CONSOLE_DONE,
    ]
    assert r.console == r.lines
    assert not CONSOLE_FAILED_RE.search("\n".join(r.console))
    for line in r.lines:
        assert line in r.log
    etc = r.root / "etc"
    config = etc / "flightctl" / "config.yaml"
    assert config.read_text() == (harness.payload / "config.yaml").read_text()
    assert mode(config) == 0o644
    assert mode(etc / "flightctl" / "certs") == 0o700
    for name, content in (("client.crt", "CRT"), ("client.key", "KEY")):
        assert (etc / "flightctl" / "certs" / name).read_text() == content
        assert mode(etc / "flightctl" / "certs" / name) == 0o600
    ca = r.root / "usr" / "local" / "share" / "ca-certificates" / "flightctl-e2e-ca.crt"
    assert ca.read_text() == "CA" and mode(ca) == 0o644
    reg = etc / "containers" / "registries.conf.d" / "flightctl-e2e.conf"
    assert reg.read_text() == "[[registry]]\n" and mode(reg) == 0o644
    deb = harness.payload / "rpms" / "flightctl-agent_0.1_all.deb"
    assert f"apt-get install -y --no-install-recommends {deb}" in r.calls
    assert "update-ca-certificates " in r.calls
    assert r.calls.index("systemctl daemon-reload") < r.calls.index(
        "systemctl enable flightctl-agent.service"
    ) < r.calls.index("systemctl start --no-block flightctl-agent.service")
    assert not [c for c in r.calls if c.startswith(("mount", "umount", "dpkg"))]


def test_rpm_guest_uses_dnf_and_update_ca_trust(harness: Harness) -> None:
    harness.full_payload(packages=["flightctl-agent-0.1.x86_64.rpm"])
    r = harness.run(shims=("systemctl", "dnf", "rpm", "update-ca-trust"))
    assert r.returncode == 0, r.stdout + r.log
    rpm = harness.payload / "rpms" / "flightctl-agent-0.1.x86_64.rpm"
    assert f"dnf -y --disablerepo=* install {rpm}" in r.calls
    assert "update-ca-trust extract" in r.calls
    anchor = r.root / "etc" / "pki" / "ca-trust" / "source" / "anchors" / "flightctl-e2e-ca.pem"
    assert anchor.read_text() == "CA" and mode(anchor) == 0o644
    assert status(r, 2) == "ok (1 package file(s) with dnf)"
    assert status(r, 5) == "ok (update-ca-trust)"


def test_rpm_without_dnf_uses_rpm_and_deb_without_apt_uses_dpkg(harness: Harness) -> None:
    harness.full_payload(packages=["a.rpm", "b.deb"])
    r = harness.run(shims=("systemctl", "rpm", "dpkg", "update-ca-certificates"))
    assert r.returncode == 0, r.stdout + r.log
    assert f"rpm -U --replacepkgs {harness.payload / 'rpms' / 'a.rpm'}" in r.calls
    assert f"dpkg -i {harness.payload / 'rpms' / 'b.deb'}" in r.calls
    assert status(r, 2) == "ok (2 package file(s) with rpm+dpkg)"


def test_absent_inputs_are_skipped(harness: Harness) -> None:
    (harness.payload / "config.yaml").write_text("a: 1\n")
    r = harness.run()
    assert r.returncode == 0, r.stdout + r.log
    assert status(r, 2) == "skipped (no .rpm or .deb in flightctl/rpms)"
    assert status(r, 3) == "ok (/etc/flightctl/config.yaml)"
    assert status(r, 4) == "skipped (no flightctl/certs on the seed)"
    assert status(r, 5) == "skipped (no flightctl/ca.pem on the seed)"
    assert status(r, 6) == "skipped (no flightctl/registry.conf on the seed)"
    assert status(r, 7) == "ok (flightctl-agent.service active)"
    assert not [c for c in r.calls if c.startswith(("apt-get", "update-ca"))]


def test_failing_package_step_names_itself_and_stops(harness: Harness) -> None:
    harness.full_payload()
    r = harness.run(env={"SHIM_FAIL": "apt-get"})
    assert r.returncode == 1
    assert status(r, 2) == (
        "FAILED apt-get install failed (exit 100): E: simulated apt-get failure"
    )
    assert r.lines[-1] == (
        "flightvm-setup: FAILED at step 2/7 packages (details in /var/log/flightvm-setup.log)"
    )
    assert r.console == r.lines
    match = CONSOLE_FAILED_RE.search("\n".join(r.console))
    assert match and match.group(3) == "packages" and match.group(1) == "2"
    assert not [ln for ln in r.lines if "step 3/7" in ln]
    assert not (r.root / "etc" / "flightctl").exists()
    assert "E: simulated apt-get failure" in r.log


def test_missing_ca_tool_fails_step_5(harness: Harness) -> None:
    harness.full_payload()
    r = harness.run(shims=("systemctl", "apt-get"))
    assert r.returncode == 1
    assert status(r, 5).startswith("FAILED neither update-ca-trust nor update-ca-certificates")
    assert r.lines[-1].startswith("flightvm-setup: FAILED at step 5/7 ca-trust")


def test_missing_config_on_seed_fails_step_1(harness: Harness) -> None:
    r = harness.run()
    assert r.returncode == 1
    assert status(r, 1) == f"FAILED {harness.seed} has no flightctl/config.yaml"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SHIM_AGENT_STATE": "failed"}, "FAILED flightctl-agent.service failed to start"),
        ({"SHIM_NO_UNIT": "1"}, "FAILED flightctl-agent.service is not installed"),
        ({"SHIM_AGENT_STATE": "activating", "FLIGHTVM_SETUP_TIMEOUT": "1"},
         "FAILED flightctl-agent.service not active after 1s (state: activating)"),
        ({"SHIM_FAIL": "systemctl"}, "FAILED systemctl daemon-reload failed (exit 100)"),
    ],
)
def test_agent_step_failures(harness: Harness, env: dict[str, str], expected: str) -> None:
    (harness.payload / "config.yaml").write_text("a: 1\n")
    r = harness.run(env=env)
    assert r.returncode == 1
    assert status(r, 7).startswith(expected), status(r, 7)
    assert r.lines[-1].startswith("flightvm-setup: FAILED at step 7/7 agent")


def test_agent_start_queued_behind_cloud_init_is_ok(harness: Harness) -> None:
    (harness.payload / "config.yaml").write_text("a: 1\n")
    r = harness.run(env={"SHIM_AGENT_STATE": "inactive", "SHIM_JOB_WAITING": "1"})
    assert r.returncode == 0, r.stdout
    assert status(r, 7) == (
        "ok (flightctl-agent.service enabled, start queued until cloud-init finishes)"
    )


@pytest.mark.parametrize(
    ("tools", "note"),
    [
        (("bootc", "ostree"), "transient /usr overlay via bootc usr-overlay"),
        (("ostree",), "transient /usr overlay via ostree admin unlock"),
    ],
)
def test_image_mode_unlocks_usr(harness: Harness, tools: tuple[str, ...], note: str) -> None:
    harness.full_payload(packages=["agent.rpm"])
    (harness.root / "run").mkdir()
    (harness.root / "run" / "ostree-booted").touch()
    r = harness.run(shims=("systemctl", "dnf", "update-ca-trust", *tools))
    assert r.returncode == 0, r.stdout + r.log
    assert status(r, 2) == f"ok (1 package file(s) with dnf, {note})"
    if "bootc" in tools:
        assert "bootc usr-overlay" in r.calls and not [c for c in r.calls if "ostree" in c]
    else:
        assert "ostree admin unlock --transient" in r.calls


def test_image_mode_without_unlock_tool_fails(harness: Harness) -> None:
    harness.full_payload(packages=["agent.rpm"])
    (harness.root / "run").mkdir()
    (harness.root / "run" / "ostree-booted").touch()
    r = harness.run(shims=("systemctl", "dnf"))
    assert r.returncode == 1
    assert status(r, 2) == (
        "FAILED image-mode guest with read-only /usr and neither bootc nor ostree to unlock it"
    )
    assert not [c for c in r.calls if c.startswith("dnf")]


def test_image_mode_with_writable_usr_needs_no_unlock(harness: Harness) -> None:
    harness.full_payload(packages=["agent.rpm"])
    (harness.root / "run").mkdir()
    (harness.root / "run" / "ostree-booted").touch()
    (harness.root / "usr").mkdir()
    r = harness.run(shims=("systemctl", "dnf", "update-ca-trust", "bootc"))
    assert r.returncode == 0
    assert "bootc usr-overlay" not in r.calls


def test_mounts_seed_found_by_blkid(harness: Harness) -> None:
    harness.full_payload()
    r = harness.run(seed_arg=False, env={"SHIM_BLKID_DEV": "/dev/sr0", "SHIM_SEED_DEV": "/dev/sr0"})
    assert r.returncode == 0, r.stdout + r.log
    mountpoint = r.root / "run" / "flightvm" / "seed"
    assert status(r, 1) == "ok (/dev/sr0 on /run/flightvm/seed)"
    assert f"mount -t iso9660 -o ro /dev/sr0 {mountpoint}" in r.calls
    assert r.calls[-1] == f"umount {mountpoint}"  # unmounted on exit
    assert mode(r.root / "run" / "flightvm") == 0o700
    assert (r.root / "etc" / "flightctl" / "config.yaml").exists()


def test_mounts_seed_by_label_link(harness: Harness) -> None:
    harness.full_payload()
    label = harness.root / "dev" / "disk" / "by-label" / "cidata"
    label.parent.mkdir(parents=True)
    label.touch()
    r = harness.run(seed_arg=False, env={"SHIM_SEED_DEV": str(label)})
    assert r.returncode == 0, r.stdout + r.log
    mounts = [c for c in r.calls if c.startswith("mount")]
    assert mounts == [f"mount -t iso9660 -o ro {label} {r.root / 'run' / 'flightvm' / 'seed'}"]
    assert status(r, 1) == f"ok ({label} on /run/flightvm/seed)"


def test_falls_back_to_sr_devices_when_no_label(harness: Harness) -> None:
    harness.full_payload()
    (harness.root / "dev").mkdir()
    (harness.root / "dev" / "sr0").touch()
    (harness.root / "dev" / "sr1").touch()
    sr1 = str(harness.root / "dev" / "sr1")
    r = harness.run(seed_arg=False, env={"SHIM_SEED_DEV": sr1})
    assert r.returncode == 0, r.stdout + r.log
    assert status(r, 1) == f"ok ({sr1} on /run/flightvm/seed)"
    assert any(c.startswith("mount -t iso9660 -o ro " + str(harness.root / "dev" / "sr0"))
               for c in r.calls)


def test_no_seed_device_fails_step_1(harness: Harness) -> None:
    harness.full_payload()
    r = harness.run(seed_arg=False)
    assert r.returncode == 1
    assert status(r, 1).startswith("FAILED no seed device")
    assert r.lines[-1].startswith("flightvm-setup: FAILED at step 1/7 mount-seed")


def test_log_file_is_not_world_readable(harness: Harness) -> None:
    harness.full_payload()
    harness.run()
    assert mode(harness.root / "var" / "log" / "flightvm-setup.log") == 0o640


def test_quiet_stderr_with_minimal_environment(harness: Harness) -> None:
    """cloud-init's runcmd has no HOME or TERM: the script must not depend on them."""
    harness.full_payload()
    r = harness.run()
    assert r.returncode == 0
    assert r.stderr == "", r.stderr


def test_registry_ca_goes_to_certs_d_for_each_host(harness: Harness) -> None:
    harness.full_payload()
    # written by the host side from registry.conf's locations; a path-like line is skipped
    (harness.payload / "registry-hosts").write_text("registry.e2e:5000\n../escape\n[fd00::1]:5000\n")
    r = harness.run()
    assert r.returncode == 0, r.stdout + r.stderr + r.log
    assert ("flightvm-setup: step 6/7 registry: ok (/etc/containers/registries.conf.d/"
            "flightctl-e2e.conf, CA in /etc/containers/certs.d for 2 registry host(s))") in r.lines
    certs_d = r.root / "etc" / "containers" / "certs.d"
    assert sorted(p.name for p in certs_d.iterdir()) == ["[fd00::1]:5000", "registry.e2e:5000"]
    ca = certs_d / "registry.e2e:5000" / "ca.crt"
    assert ca.read_text() == "CA" and mode(ca) == 0o644

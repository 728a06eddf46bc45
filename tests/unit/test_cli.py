"""The flightvm CLI: exit codes, one-line errors, stdout only for results."""

import subprocess
import sys
from pathlib import Path

import pytest

from pytest_flightvm.cli import main
from pytest_flightvm.seed.iso import read_iso


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_flightvm.cli", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def test_usage_error_is_one_line_exit_2() -> None:
    proc = run("cache", "frobnicate")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_bad_registry_ref_exit_2(tmp_path: Path) -> None:
    proc = run("cache", "ls", "--registry", "not a ref", "--cache-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("flightvm: registry 'not a ref' is not a registry reference")
    assert "Traceback" not in proc.stderr


def test_push_missing_file_exit_2(tmp_path: Path) -> None:
    proc = run("cache", "push", str(tmp_path / "nope.qcow2"), "--registry", "127.0.0.1:5000/a/b")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_seed_render_writes_a_private_iso(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ud = tmp_path / "ud.yaml"
    ud.write_text("runcmd:\n  - echo hi\n")
    out = tmp_path / "seed.iso"
    assert main(["seed", "render", "--user-data", str(ud), "--instance-id", "i-1", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.stat().st_mode & 0o777 == 0o600
    files = read_iso(out)
    assert b"instance-id: i-1" in files["meta-data"]
    assert b"echo hi" in files["user-data"]


def test_seed_render_bad_yaml_exit_2(tmp_path: Path) -> None:
    ud = tmp_path / "ud.yaml"
    ud.write_text("runcmd: [\n  - oops: {\n")
    proc = run("seed", "render", "--user-data", str(ud), "-o", str(tmp_path / "s.iso"))
    assert proc.returncode == 2
    assert "line" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.iso").exists()


def test_seed_render_cloud_init_dir_without_meta_data(tmp_path: Path) -> None:
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "user-data").write_text("#cloud-config\n")
    proc = run("seed", "render", "--cloud-init-dir", str(tmp_path / "ci"), "-o", str(tmp_path / "s.iso"))
    assert proc.returncode == 2 and "meta-data" in proc.stderr


def test_libvirt_unreachable_is_one_line(tmp_path: Path) -> None:
    proc = run("gc", "--libvirt-uri", "qemu+unix:///system?socket=/nonexistent/sock",
               "--cache-dir", str(tmp_path))
    assert proc.returncode == 1  # the operation failed (libvirtd down); 2 is for bad input
    assert proc.stderr.startswith("flightvm: cannot reach libvirt at")
    assert "or pass --libvirt-uri" in proc.stderr and "--flightvm-" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_seed_render_cloud_init_dir_with_bad_yaml_exit_2(tmp_path: Path) -> None:
    ci = tmp_path / "ci"
    ci.mkdir()
    (ci / "user-data").write_text("#cloud-config\nruncmd: [a,\n")
    (ci / "meta-data").write_text("instance-id: i-1\n")
    proc = run("seed", "render", "--cloud-init-dir", str(ci), "-o", str(tmp_path / "s.iso"))
    assert proc.returncode == 2
    assert "user-data line 3" in proc.stderr and "fix the YAML" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.iso").exists()


def test_seed_render_cloud_init_dir_is_merged_like_the_plugin_does(tmp_path: Path) -> None:
    import pycdlib
    import yaml

    ci = tmp_path / "ci"
    ci.mkdir()
    (ci / "user-data").write_text("#cloud-config\nruncmd: [echo theirs]\n"
                                  "users: [{name: flightvm, shell: /bin/false}]\n")
    (ci / "meta-data").write_text("instance-id: fixed\nlocal-hostname: box\n")
    (ci / "extra.txt").write_text("rides along\n")
    ud = tmp_path / "ud.yaml"
    ud.write_text("runcmd: [echo ours]\n")
    out = tmp_path / "s.iso"
    proc = run("seed", "render", "--cloud-init-dir", str(ci), "--user-data", str(ud),
               "--instance-id", "i-9", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "instance-id 'fixed' is ignored" in proc.stderr
    assert "users entry 'flightvm' is replaced" in proc.stderr
    iso = pycdlib.PyCdlib()
    iso.open(str(out))
    try:
        def read(name: str) -> str:
            import io

            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, joliet_path="/" + name)
            return buf.getvalue().decode()

        data = yaml.safe_load(read("user-data"))
        meta = yaml.safe_load(read("meta-data"))
        extra = read("extra.txt")
    finally:
        iso.close()
    assert data["runcmd"] == ["echo theirs", "echo ours"]
    assert [u["name"] for u in data["users"] if isinstance(u, dict)] == ["flightvm"]
    assert data["users"][0].get("shell") != "/bin/false"  # ours, with the key
    assert meta == {"instance-id": "i-9", "local-hostname": "box"}
    assert extra == "rides along\n"


def test_seed_render_cloud_init_dir_script_user_data_exit_2(tmp_path: Path) -> None:
    ci = tmp_path / "ci"
    ci.mkdir()
    (ci / "user-data").write_text("#!/bin/sh\necho [not yaml\n")
    (ci / "meta-data").write_text("instance-id: i-1\n")
    proc = run("seed", "render", "--cloud-init-dir", str(ci), "-o", str(tmp_path / "s.iso"))
    assert proc.returncode == 2 and "#cloud-config" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [ci]  # no ISO, no generated key


def test_cache_dir_under_a_file_exit_2(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = run("cache", "ls", "--cache-dir", str(tmp_path / "file" / "cache"))
    assert proc.returncode == 2
    assert "Not a directory" in proc.stderr and "--cache-dir" in proc.stderr
    assert "--flightvm-" not in proc.stderr  # the CLI's own flag, not the plugin's
    assert len(proc.stderr.strip().splitlines()) == 1


# -- one test per verb: exit codes and wording in the CLI's own terms -------------------------

DEAD_REGISTRY = "127.0.0.1:1/flightvm-test/none"  # nothing listens on port 1: refused at once


def one_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("flightvm: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--flightvm-" not in proc.stderr, proc.stderr  # never the plugin's flags
    assert all(n in lines[-1] for n in needles), (lines[-1], needles)
    return lines[-1]


def test_version_exit_0() -> None:
    from importlib.metadata import version

    proc = run("--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.strip() == f"flightvm (pytest-flightvm) {version('pytest-flightvm')}"


def test_help_has_no_rst_markup() -> None:
    for args in (["--help"], ["cache", "--help"], ["cache", "pull", "--help"], ["gc", "--help"],
                 ["seed", "render", "--help"], ["doctor", "--help"]):
        proc = run(*args)
        assert proc.returncode == 0, args
        assert "``" not in proc.stdout and ":func:" not in proc.stdout, args
    top = run("--help").stdout
    assert "Exit status: 0 success, 1" in " ".join(top.split())


def test_flag_help_names_the_env_var_and_the_default() -> None:
    text = " ".join(run("cache", "pull", "--help").stdout.split())
    assert "--offline never contact the registry (env FLIGHTVM_OFFLINE; default: off)" in text
    assert "--tag-prefix PREFIX registry tag prefix (env QCOW2_CACHE_TAG; default: base-qcow2)" \
        in text
    assert "--libvirt-uri URI" in text and "(env LIBVIRT_DEFAULT_URI;" in text


def test_cache_get_offline_with_nothing_stored_exit_1(tmp_path: Path) -> None:
    # offline, no registry contact, and a build command that fails: the operation failed
    proc = run("cache", "get", "--offline", "--registry", DEAD_REGISTRY, "--cache-dir",
               str(tmp_path / "c"), "--build-cmd", "exit 3")
    one_line(proc, 1)
    assert proc.stdout == ""


def test_cache_pull_offline_does_not_contact_the_registry(tmp_path: Path) -> None:
    proc = run("cache", "pull", "--registry", DEAD_REGISTRY, "--offline",
               "--cache-dir", str(tmp_path / "c"))
    line = one_line(proc, 2, "not in the local store", "drop --offline to pull it")
    assert "127.0.0.1:1/flightvm-test/none:base-qcow2-latest" in line
    assert "refused" not in proc.stderr and "unreachable" not in proc.stderr.lower()


def test_cache_pull_dead_registry_exit_1(tmp_path: Path) -> None:
    proc = run("cache", "pull", "--registry", DEAD_REGISTRY, "--cache-dir", str(tmp_path / "c"))
    one_line(proc, 1, "127.0.0.1:1")


def test_cache_pull_without_a_registry_exit_2(tmp_path: Path) -> None:
    proc = run("cache", "pull", "--cache-dir", str(tmp_path / "c"),
               cwd=tmp_path)  # no ini up the tree names one
    one_line(proc, 2, "no registry configured", "--registry")


def test_cache_push_not_a_qcow2_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "disk.qcow2"
    bad.write_bytes(b"not a disk" * 100)
    proc = run("cache", "push", str(bad), "--registry", DEAD_REGISTRY)
    one_line(proc, 2, "not a qcow2")


def test_cache_cache_missing_file_exit_2(tmp_path: Path) -> None:
    proc = run("cache", "cache", str(tmp_path / "nope.qcow2"), "--registry", DEAD_REGISTRY)
    one_line(proc, 2, "does not exist")


def test_cache_ls_bad_value_exit_2(tmp_path: Path) -> None:
    proc = run("cache", "ls", "--cache-dir", str(tmp_path), "--compress", "lzma")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr  # argparse's own check
    env_proc = subprocess.run([sys.executable, "-m", "pytest_flightvm.cli", "cache", "ls",
                               "--cache-dir", str(tmp_path)], capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "FLIGHTVM_COMPRESS": "lzma"})
    one_line(env_proc, 2, "env FLIGHTVM_COMPRESS: expected one of auto, none, zstd")


def test_cache_ls_offline_lists_the_store_exit_0(tmp_path: Path) -> None:
    proc = run("cache", "ls", "--cache-dir", str(tmp_path / "c"), "--offline",
               "--registry", DEAD_REGISTRY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("current key: ") and "DIGEST" in proc.stdout
    assert "registry 127.0.0.1:1" not in proc.stdout  # offline: no tags asked for


def test_cache_verify_empty_store_exit_0(tmp_path: Path) -> None:
    proc = run("cache", "verify", "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr


def test_seed_render_leaves_only_the_iso_and_its_key(tmp_path: Path) -> None:
    ud = tmp_path / "ud.yaml"
    ud.write_text("runcmd: [echo hi]\n")
    out = tmp_path / "new" / "dir" / "seed.iso"  # a parent that does not exist yet
    proc = run("seed", "render", "--user-data", str(ud), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "seed.iso", "seed.iso.id_ed25519", "seed.iso.id_ed25519.pub"]  # no .lock, no temp file


def test_seed_render_refuses_to_reuse_a_key_exit_2(tmp_path: Path) -> None:
    ud = tmp_path / "ud.yaml"
    ud.write_text("runcmd: [echo hi]\n")
    (tmp_path / "s.iso.id_ed25519").write_text("planted")
    proc = run("seed", "render", "--user-data", str(ud), "-o", str(tmp_path / "s.iso"))
    one_line(proc, 2, "already exists", "--ssh-key")
    assert not (tmp_path / "s.iso").exists()


def test_gc_dry_run_on_an_empty_cache_dir_exit_0(tmp_path: Path) -> None:
    proc = run("gc", "--dry-run", "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_gc_unknown_name_exit_1(tmp_path: Path) -> None:
    proc = run("gc", "--name", "no-such-vm", "--cache-dir", str(tmp_path / "c"))
    one_line(proc, 1, "no removable flightvm domain named no-such-vm")


def test_doctor_fixes_speak_to_pip_users(tmp_path: Path) -> None:
    proc = run("doctor", "--libvirt-uri", "qemu+unix:///system?socket=/nonexistent/sock",
               "--registry", DEAD_REGISTRY, "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 1
    assert "--flightvm-" not in proc.stdout, proc.stdout
    fixes = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("fix:")]
    assert len(fixes) >= 2, proc.stdout
    for fix in fixes:
        # a pip user can act on every fix; `make host` is only ever the checkout's shortcut
        assert not fix.startswith("fix: make"), fix
        assert "make host" not in fix or "checkout" in fix, fix
        assert "--flightvm-" not in fix, fix
    assert any("libvirtd -d" in f and "--libvirt-uri" in f for f in fixes), fixes
    assert any("--registry" in f and "--offline" in f for f in fixes), fixes


def test_a_verb_reads_only_the_env_vars_it_uses(tmp_path: Path) -> None:
    """gc needs no registry setting: a REGISTRY_CACHE meant for another tool is not read;
    cache ls needs it, and says which variable to fix."""
    env = {"PATH": "/usr/bin:/bin", "REGISTRY_CACHE": "maybe", "FLIGHTVM_ACCEL": "warp",
           "VM_CONFIG_DIR": "/nonexistent"}

    def run_env(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest_flightvm.cli", *args],
                              capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)

    gc = run_env("gc", "--dry-run", "--cache-dir", str(tmp_path / "c"))
    assert gc.returncode == 0 and gc.stderr == "", gc.stderr
    ls = run_env("cache", "ls", "--offline", "--cache-dir", str(tmp_path / "c"))
    one_line(ls, 2, "env REGISTRY_CACHE: expected true or false, got 'maybe'")
    # a flag is checked whatever the verb: it was written for this command
    bad_flag = run_env("gc", "--dry-run", "--registry", "not a ref", "--cache-dir",
                       str(tmp_path / "c"))
    one_line(bad_flag, 2, "is not a registry reference")


def test_push_offline_is_refused_without_contacting_the_registry(tmp_path: Path) -> None:
    from tests.fake_disk import write_fake_qcow2

    disk = write_fake_qcow2(tmp_path / "disk.qcow2", 1 << 20, b"x")
    for verb in (["push", str(disk)], ["cache", str(disk)]):
        proc = run("cache", *verb, "--registry", DEAD_REGISTRY, "--offline",
                   "--cache-dir", str(tmp_path / "c"))
        one_line(proc, 2, "--offline forbids contacting the registry", "drop --offline")
        assert "refused" not in proc.stderr  # no connection was tried (port 1 refuses)

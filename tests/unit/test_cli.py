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
    assert proc.returncode == 2  # bad input: the URI is wrong or libvirtd is not started
    assert proc.stderr.startswith("flightvm: cannot reach libvirt at")
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
    assert "Not a directory" in proc.stderr and "--flightvm-cache-dir" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

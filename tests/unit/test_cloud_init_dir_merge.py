"""CLOUD_INIT_DIR / --flightvm-cloud-init-dir: merged with the run's key, a unique
instance-id per VM and the payload, not packed as-is (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pytest_flightvm.config import resolve
from pytest_flightvm.errors import ConfigError
from pytest_flightvm.seed import read_iso
from pytest_flightvm.seed.render import SeedSpec, check_cloud_init_dir, merge_cloud_init_dir
from pytest_flightvm.vm.factory import RunContext, VMFactory, VMRequest

USER_DATA = """#cloud-config
users:
  - name: tester
    shell: /bin/sh
  - name: flightvm
    ssh_authorized_keys: [ssh-ed25519 AAAA-not-ours]
runcmd:
  - [touch, /var/tmp/theirs]
"""


def _dir(tmp_path: Path, user_data: str = USER_DATA) -> Path:
    root = tmp_path / "nocloud"
    root.mkdir()
    (root / "user-data").write_text(user_data)
    (root / "meta-data").write_text("instance-id: fixed-1\nlocal-hostname: compat\n")
    (root / "extra.txt").write_text("kept")
    return root


def test_two_vms_get_their_own_instance_id_and_the_run_key(tmp_path: Path) -> None:
    root = _dir(tmp_path)
    settings = resolve({"cloud_init_dir": str(root), "cache_dir": str(tmp_path / "cache")}, {}, {})
    notices: list[str] = []
    run = RunContext("r1", tmp_path / "run")
    factory = VMFactory(settings, tmp_path / "base.qcow2", run, notice=notices.append)
    payload = {"flightctl/config.yaml": b"a: 1\n"}
    seeds = []
    for n in (1, 2):
        iso = tmp_path / f"seed{n}.iso"
        factory._write_seed(f"flightvm-t-{n}", f"52:54:00:00:00:0{n}",
                            VMRequest(user_data=({"runcmd": [["echo", "fragment"]]},),
                                      seed_payload=payload), iso)
        seeds.append(read_iso(iso))
    metas = [yaml.safe_load(s["meta-data"]) for s in seeds]
    assert metas[0]["instance-id"] != metas[1]["instance-id"]
    assert "fixed-1" not in (metas[0]["instance-id"], metas[1]["instance-id"])
    assert metas[0]["local-hostname"] == "compat"  # the dir's own keys stay
    for seed in seeds:
        data = yaml.safe_load(seed["user-data"])
        assert seed["user-data"].startswith(b"#cloud-config\n")
        by_name = {u["name"]: u for u in data["users"]}
        assert by_name["flightvm"]["ssh_authorized_keys"] == [factory.public_key]
        assert "tester" in by_name
        assert data["runcmd"] == [["touch", "/var/tmp/theirs"], ["echo", "fragment"]]
        assert seed["flightctl/config.yaml"] == b"a: 1\n" and seed["extra.txt"] == b"kept"
        assert b"macaddress" in seed["network-config"]
    # each conflict is said once per run, one line each
    assert len(notices) == 2 and all("\n" not in n for n in notices)
    assert any("instance-id 'fixed-1' is ignored" in n for n in notices)
    assert any("users entry 'flightvm' is replaced" in n for n in notices)


def test_the_dirs_network_config_wins(tmp_path: Path) -> None:
    root = _dir(tmp_path, "#cloud-config\n{}\n")
    given = {"user-data": b"#cloud-config\n", "meta-data": b"", "network-config": b"version: 1\n"}
    spec = SeedSpec(instance_id="i-1", hostname="h", mac="52:54:00:00:00:01",
                    ssh_public_key="ssh-ed25519 AAAA k")
    files, warnings = merge_cloud_init_dir(given, spec, source=root)
    assert files["network-config"] == b"version: 1\n" and warnings == []
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "i-1", "local-hostname": "h"}


@pytest.mark.parametrize("user_data,message", [
    ("#!/bin/sh\necho hi\n", "starts with '#!/bin/sh', not #cloud-config"),
    ("#cloud-config\n- a list\n", "must be a YAML mapping"),
])
def test_user_data_that_cannot_merge_is_one_line(tmp_path: Path, user_data: str,
                                                 message: str) -> None:
    root = _dir(tmp_path, user_data)
    with pytest.raises(ConfigError, match=message) as info:
        check_cloud_init_dir(root)
    assert "\n" not in str(info.value)

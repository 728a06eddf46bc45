"""seed.render: defaults, merge order, determinism, YAML errors, cloud-init dirs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_flightvm.errors import ConfigError
from pytest_flightvm.seed import (
    SeedSpec,
    deep_merge,
    load_cloud_init_dir,
    load_user_data,
    render,
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFlightVMTestKeyOnly test@flightvm"


def spec(**kw: object) -> SeedSpec:
    args: dict[str, object] = {
        "instance_id": "flightvm-run1-gw0-1",
        "hostname": "flightvm-run1-gw0-1",
        "mac": "52:54:00:AB:cd:01",
        "ssh_public_key": KEY,
    }
    args.update(kw)
    return SeedSpec(**args)  # type: ignore[arg-type]


def load(data: bytes) -> dict:
    return yaml.safe_load(data.decode())


def test_files_and_user_data_defaults() -> None:
    files = render(spec())
    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    assert files["user-data"].startswith(b"#cloud-config\n")
    ud = load(files["user-data"])
    assert ud["ssh_pwauth"] is False
    (user,) = ud["users"]
    assert user == {
        "name": "flightvm",
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "shell": "/bin/bash",
        "lock_passwd": True,
        "ssh_authorized_keys": [KEY],
    }
    text = files["user-data"].decode()
    assert "passwd:" not in text.replace("lock_passwd", "") and "hashed" not in text


def test_meta_data_and_unique_instance_ids() -> None:
    a = render(spec(instance_id="run1-a"))["meta-data"]
    b = render(spec(instance_id="run1-b"))["meta-data"]
    assert load(a) == {"instance-id": "run1-a", "local-hostname": "flightvm-run1-gw0-1"}
    assert a != b


def test_network_config_matches_mac_and_renames_eth0() -> None:
    net = load(render(spec())["network-config"])
    assert net == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": "52:54:00:ab:cd:01"},
                "set-name": "eth0",
                "dhcp4": True,
            }
        },
    }


def test_deterministic_bytes() -> None:
    overrides = ({"runcmd": ["echo one"], "zzz": {"b": 1, "a": 2}}, {"packages": ["jq"]})
    one = render(spec(user_data=overrides, vendor_data={"b": 1, "a": [3, 1]}))
    two = render(spec(user_data=overrides, vendor_data={"a": [3, 1], "b": 1}))
    assert one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], name


def test_vendor_data_only_when_given() -> None:
    assert "vendor-data" not in render(spec())
    files = render(spec(vendor_data={"runcmd": ["true"]}))
    assert files["vendor-data"].startswith(b"#cloud-config\n")
    assert load(files["vendor-data"]) == {"runcmd": ["true"]}


def test_merge_order_later_overrides_win() -> None:
    fixture = {"ssh_pwauth": True, "timezone": "UTC", "runcmd": ["echo fixture"]}
    marker = {"timezone": "Europe/Paris", "runcmd": ["echo marker"]}
    hook = {"timezone": "Asia/Tokyo", "users": [{"name": "extra"}]}
    ud = load(render(spec(user_data=(fixture, marker, hook)))["user-data"])
    assert ud["timezone"] == "Asia/Tokyo"
    assert ud["ssh_pwauth"] is True
    assert ud["runcmd"] == ["echo fixture", "echo marker"]
    assert [u["name"] for u in ud["users"]] == ["flightvm", "extra"]


def test_deep_merge_rules_and_no_mutation() -> None:
    base: dict[str, Any] = {"runcmd": ["a"], "bootcmd": ["x"], "nested": {"k": {"a": 1}, "l": [1]}}
    override = {"runcmd": ["b"], "bootcmd": ["y"], "nested": {"k": {"b": 2}, "l": [2]}}
    merged = deep_merge(base, override)
    assert merged == {
        "runcmd": ["a", "b"],  # concatenated
        "bootcmd": ["y"],  # other lists replaced
        "nested": {"k": {"a": 1, "b": 2}, "l": [2]},  # nested lists replaced
    }
    assert base == {"runcmd": ["a"], "bootcmd": ["x"], "nested": {"k": {"a": 1}, "l": [1]}}
    merged["nested"]["k"]["a"] = 9
    assert base["nested"]["k"]["a"] == 1
    assert deep_merge({"packages": ["a"]}, {"packages": "b"}) == {"packages": "b"}


def test_multiline_strings_are_readable_blocks() -> None:
    script = "#!/bin/sh\necho hi\n"
    files = render(spec(user_data=({"write_files": [{"path": "/x", "content": script}]},)))
    assert "content: |" in files["user-data"].decode()
    assert load(files["user-data"])["write_files"][0]["content"] == script


def test_load_user_data(tmp_path: Path) -> None:
    path = tmp_path / "user-data.yaml"
    path.write_text("#cloud-config\npackages:\n  - jq\n")
    assert load_user_data(path) == {"packages": ["jq"]}
    path.write_text("")
    assert load_user_data(path) == {}


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "user-data.yaml"
    path.write_text("packages:\n  - jq\n  bad: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_user_data(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert " line 3, column " in msg


def test_non_mapping_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "user-data.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_user_data(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_user_data(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("mac", "52:54:00:zz:00:01", "MAC address"),
        ("hostname", "bad host", "hostname"),
        ("instance_id", "", "instance-id"),
        ("ssh_public_key", "", "ssh_public_key"),
        ("username", "Root User", "user name"),
    ],
)
def test_spec_validation(field: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        spec(**{field: value})


def test_user_data_override_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="override #2"):
        spec(user_data=({}, ["not", "a", "dict"]))


def test_load_cloud_init_dir(tmp_path: Path) -> None:
    (tmp_path / "user-data").write_bytes(b"#cloud-config\n{}\n")
    (tmp_path / "meta-data").write_bytes(b"instance-id: x\n")
    (tmp_path / "flightctl-config" / "certs").mkdir(parents=True)
    (tmp_path / "flightctl-config" / "certs" / "client.crt").write_bytes(b"CRT")
    files = load_cloud_init_dir(tmp_path)
    assert files == {
        "flightctl-config/certs/client.crt": b"CRT",
        "meta-data": b"instance-id: x\n",
        "user-data": b"#cloud-config\n{}\n",
    }


def test_load_cloud_init_dir_missing_meta_data(tmp_path: Path) -> None:
    (tmp_path / "user-data").write_bytes(b"#cloud-config\n")
    with pytest.raises(ConfigError) as info:
        load_cloud_init_dir(tmp_path)
    assert str(tmp_path / "meta-data") in str(info.value)
    with pytest.raises(ConfigError, match="not a directory"):
        load_cloud_init_dir(tmp_path / "missing")

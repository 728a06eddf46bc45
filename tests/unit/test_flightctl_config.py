"""flightctl: VM config dir validation and the seed payload/fragment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pytest_flightvm.errors import ConfigError
from pytest_flightvm.flightctl import (
    GUEST_SCRIPT,
    flightctl_seed,
    load_vm_config,
    setup_script,
)
from pytest_flightvm.seed import SeedSpec, read_iso, render, write_iso

CONFIG = "enrollment-service:\n  service:\n    server: https://127.0.0.1:7443\n"


def make_dir(root: Path, *, full: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(CONFIG)
    if full:
        (root / "certs").mkdir()
        (root / "certs" / "client.crt").write_text("CRT")
        (root / "certs" / "client.key").write_text("KEY")
        (root / "rpms").mkdir()
        (root / "rpms" / "flightctl-agent_0.1_all.deb").write_bytes(b"!<arch>deb")
        (root / "rpms" / "flightctl-agent-0.1.x86_64.rpm").write_bytes(b"\xed\xab\xee\xdb")
        (root / "rpms" / "README").write_text("not a package")
        (root / "ca.pem").write_text("CA")
        (root / "registry.conf").write_text('[[registry]]\nlocation = "127.0.0.1:5000"\n')
    return root


def test_full_dir(tmp_path: Path) -> None:
    cfg = load_vm_config(make_dir(tmp_path / "vm"))
    assert cfg.config == tmp_path / "vm" / "config.yaml"
    assert cfg.settings["enrollment-service"]["service"]["server"] == "https://127.0.0.1:7443"
    assert [p.name for p in cfg.certs] == ["client.crt", "client.key"]
    assert [p.name for p in cfg.packages] == [
        "flightctl-agent-0.1.x86_64.rpm",
        "flightctl-agent_0.1_all.deb",
    ]
    assert cfg.ca == tmp_path / "vm" / "ca.pem"
    assert cfg.registry_conf == tmp_path / "vm" / "registry.conf"


def test_minimal_dir(tmp_path: Path) -> None:
    cfg = load_vm_config(make_dir(tmp_path, full=False))
    assert (cfg.certs, cfg.packages, cfg.ca, cfg.registry_conf) == ((), (), None, None)


def test_missing_config_lists_expected_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_vm_config(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    for name in ("config.yaml", "certs", "rpms", "ca.pem", "registry.conf"):
        assert str(tmp_path / name) in msg
    with pytest.raises(ConfigError, match="does not exist"):
        load_vm_config(tmp_path / "nope")


def test_invalid_config_yaml_names_line(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("a: 1\nb: [unclosed\nc: 3\n")
    with pytest.raises(ConfigError) as info:
        load_vm_config(tmp_path)
    assert str(tmp_path / "config.yaml") in str(info.value)
    assert " line 3, column " in str(info.value)


def test_config_must_be_mapping(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_vm_config(tmp_path)


def test_dangling_cert_symlink_is_named(tmp_path: Path) -> None:
    root = make_dir(tmp_path)
    (root / "certs" / "broken.crt").symlink_to(root / "certs" / "gone.crt")
    with pytest.raises(ConfigError) as info:
        load_vm_config(root)
    assert str(root / "certs" / "broken.crt") in str(info.value)


def test_directory_in_certs_is_named(tmp_path: Path) -> None:
    root = make_dir(tmp_path)
    (root / "certs" / "subdir").mkdir()
    with pytest.raises(ConfigError, match="subdir is a directory"):
        load_vm_config(root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads 0000 files anyway")
def test_unreadable_cert_is_named(tmp_path: Path) -> None:  # pragma: no cover - non-root
    root = make_dir(tmp_path)
    (root / "certs" / "client.key").chmod(0)
    with pytest.raises(ConfigError, match="client.key"):
        load_vm_config(root)


def test_ca_must_be_a_file(tmp_path: Path) -> None:
    root = make_dir(tmp_path, full=False)
    (root / "ca.pem").mkdir()
    with pytest.raises(ConfigError, match="ca.pem"):
        load_vm_config(root)


def test_seed_payload_and_fragment(tmp_path: Path) -> None:
    root = make_dir(tmp_path / "vm")
    fragment, payload = flightctl_seed(load_vm_config(root))
    assert sorted(payload) == [
        "flightctl/ca.pem",
        "flightctl/certs/client.crt",
        "flightctl/certs/client.key",
        "flightctl/config.yaml",
        "flightctl/registry-hosts",
        "flightctl/registry.conf",
        "flightctl/rpms/flightctl-agent-0.1.x86_64.rpm",
        "flightctl/rpms/flightctl-agent_0.1_all.deb",
        "flightctl/setup.sh",
    ]
    assert payload["flightctl/config.yaml"] == CONFIG.encode()
    assert payload["flightctl/registry-hosts"] == b"127.0.0.1:5000\n"
    assert payload["flightctl/setup.sh"] == setup_script().encode()
    assert fragment["runcmd"] == [["bash", GUEST_SCRIPT]]
    (wf,) = fragment["write_files"]
    assert wf["path"] == GUEST_SCRIPT and wf["permissions"] == "0700"
    assert wf["content"] == setup_script()
    # Never wait on cloud-init from inside cloud-init.
    code = [ln for ln in setup_script().splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if "cloud-init" in ln and "status" in ln]


def test_end_to_end_iso(tmp_path: Path) -> None:
    """The fragment merges into user-data and the payload lands on the ISO."""
    fragment, payload = flightctl_seed(load_vm_config(make_dir(tmp_path / "vm")))
    spec = SeedSpec(
        instance_id="i-1",
        hostname="vm",
        mac="52:54:00:00:00:02",
        ssh_public_key="ssh-ed25519 K",
        user_data=(fragment, {"runcmd": ["echo after"]}),
    )
    iso = write_iso({**render(spec), **payload}, tmp_path / "seed.iso")
    back = read_iso(iso)
    assert back["flightctl/certs/client.key"] == b"KEY"
    user_data = yaml.safe_load(back["user-data"])
    assert user_data["runcmd"] == [["bash", GUEST_SCRIPT], "echo after"]
    assert user_data["write_files"][0]["content"] == setup_script()

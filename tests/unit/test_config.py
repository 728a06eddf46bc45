from pathlib import Path

import pytest

from pytest_flightvm.config import OPTIONS, read_ini, resolve
from pytest_flightvm.errors import ConfigError


def test_precedence_cli_over_ini_over_env_over_default(tmp_path: Path) -> None:
    env = {"FLIGHTVM_REGISTRY": "env.example/a/b", "XDG_CACHE_HOME": str(tmp_path)}
    assert resolve({}, {}, env).registry == "env.example/a/b"
    assert resolve({}, {"registry": "ini.example/a/b"}, env).registry == "ini.example/a/b"
    got = resolve({"registry": "cli.example/a/b"}, {"registry": "ini.example/a/b"}, env)
    assert got.registry == "cli.example/a/b"
    assert resolve({}, {}, {}).registry is None


def test_cache_dir_defaults_to_xdg(tmp_path: Path) -> None:
    assert resolve({}, {}, {"XDG_CACHE_HOME": str(tmp_path)}).cache_dir == tmp_path / "flightvm"


def test_compat_env_names(tmp_path: Path) -> None:
    s = resolve({}, {}, {"QCOW2_CACHE_TAG": "mytag", "REGISTRY_CACHE": "true",
                         "VM_CONFIG_DIR": str(tmp_path), "CLOUD_INIT_DIR": str(tmp_path),
                         "DEBUG_VM_CONSOLE": "1"})
    assert (s.tag_prefix, s.push, s.vm_config, s.cloud_init_dir, s.console) == (
        "mytag", True, tmp_path, tmp_path, True)


def test_push_defaults_on_only_in_ci() -> None:
    assert resolve({}, {}, {}).push is False
    assert resolve({}, {}, {"CI": "true"}).push is True
    assert resolve({"push": False}, {}, {"CI": "true"}).push is False
    assert resolve({}, {}, {"CI": "true", "REGISTRY_CACHE": "false"}).push is False


@pytest.mark.parametrize(("cli", "fragment"), [
    ({"accel": "fast"}, "expected one of auto, kvm, tcg"),
    ({"memory": "lots"}, "expected a number"),
    ({"vcpus": "0"}, "must be positive"),
    ({"registry": "not a ref"}, "is not a registry reference"),
    ({"registry": "UPPER.example/Repo"}, "is not a registry reference"),
])
def test_bad_values_give_one_line(cli: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(cli, {}, {})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ref", ["127.0.0.1:5000/flightvm/base", "quay.io/org/base",
                                 "localhost:5000/a/b:tag", "reg.io/x@sha256:" + "a" * 64])
def test_good_registry_refs(ref: str) -> None:
    assert resolve({"registry": ref}, {}, {}).registry == ref


def test_relative_paths_are_relative_to_rootdir(tmp_path: Path) -> None:
    s = resolve({"vm_config": "cfg"}, {}, {}, rootdir=tmp_path)
    assert s.vm_config == tmp_path / "cfg"


def test_every_option_has_a_spelling() -> None:
    for opt in OPTIONS:
        assert opt.cli or opt.ini or opt.env, opt.name


def test_read_ini_finds_pytest_settings(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nflightvm_registry = "127.0.0.1:5000/x/y"\n'
        'flightvm_memory = "2048"\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    values, root = read_ini(sub)
    assert root == tmp_path
    s = resolve({}, values, {})
    assert (s.registry, s.memory) == ("127.0.0.1:5000/x/y", 2048)


def test_compression_auto_is_zstd_except_on_loopback() -> None:
    from pytest_flightvm.cache.resolve import push_compression

    assert push_compression(resolve({"registry": "quay.io/org/base"}, {}, {})) == "zstd"
    assert push_compression(resolve({"registry": "127.0.0.1:5000/a/b"}, {}, {})) == "none"
    assert push_compression(resolve({"registry": "localhost:5000/a/b"}, {}, {})) == "none"
    assert push_compression(resolve({"registry": "quay.io/org/base", "compress": "none"}, {}, {})) == "none"
    assert push_compression(resolve({"registry": "127.0.0.1:5000/a/b", "compress": "zstd"}, {}, {})) == "zstd"

"""Cache key and tags: content only, git only for tags."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pytest_flightvm.cache.key import (
    FORMAT_VERSION,
    compute_key,
    git_short,
    tags_for,
    tree_is_clean,
)
from pytest_flightvm.errors import ConfigError


def git(root: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True, env=env).stdout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "build.sh").write_text("echo build\n")
    (tmp_path / "image" / "packages.txt").write_text("openssh-server\n")
    (tmp_path / "README").write_text("docs\n")
    return tmp_path


@pytest.fixture
def repo(tree: Path) -> Path:
    git(tree, "init", "-q")
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", "init")
    return tree


def test_key_is_stable_and_describes_its_inputs(tree: Path) -> None:
    a = compute_key("cmd:make", ["image/*"], tree, "amd64")
    b = compute_key("cmd:make", ["image/*"], tree, "amd64")
    assert a == b and len(a.digest) == 64
    assert a.parts["builder"] == "cmd:make"
    assert a.parts["arch"] == "amd64"
    assert a.parts["format"] == FORMAT_VERSION
    assert list(a.parts["inputs"]) == ["image/build.sh", "image/packages.txt"]
    assert all(len(h) == 64 for h in a.parts["inputs"].values())


@pytest.mark.parametrize("change", ["content", "identity", "arch", "inputs"])
def test_key_changes_with_what_goes_in(tree: Path, change: str) -> None:
    base = compute_key("cmd:make", ["image/*"], tree, "amd64")
    identity, inputs, arch = "cmd:make", ["image/*"], "amd64"
    if change == "content":
        (tree / "image" / "packages.txt").write_text("openssh-server\ncurl\n")
    elif change == "identity":
        identity = "cmd:make V=1"
    elif change == "arch":
        arch = "arm64"
    else:
        inputs = ["image/*", "README"]
    assert compute_key(identity, inputs, tree, arch) != base


def test_key_ignores_mtime_order_and_checkout_location(tree: Path, tmp_path_factory) -> None:
    a = compute_key("cmd:make", ["image/packages.txt", "image/build.sh"], tree, "amd64")
    os.utime(tree / "image" / "build.sh", (1, 1))
    b = compute_key("cmd:make", ["image/build.sh", "image/packages.txt"], tree, "amd64")
    other = tmp_path_factory.mktemp("elsewhere")
    (other / "image").mkdir()
    for name in ("build.sh", "packages.txt"):
        (other / "image" / name).write_bytes((tree / "image" / name).read_bytes())
    c = compute_key("cmd:make", ["image/*.*"], other, "amd64")
    assert a.digest == b.digest == c.digest


def test_directory_and_recursive_glob_inputs(tree: Path) -> None:
    (tree / "image" / "sub").mkdir()
    (tree / "image" / "sub" / "x.cfg").write_text("x")
    by_dir = compute_key("b", ["image"], tree, "amd64")
    by_glob = compute_key("b", ["image/**/*"], tree, "amd64")
    assert "image/sub/x.cfg" in by_dir.parts["inputs"]
    assert by_dir.digest == by_glob.digest


def test_unmatched_input_is_a_config_error(tree: Path) -> None:
    with pytest.raises(ConfigError, match="matches no file"):
        compute_key("b", ["nope/*.sh"], tree, "amd64")


def test_unrelated_commit_keeps_the_key(repo: Path) -> None:
    before = compute_key("cmd:make", ["image/*"], repo, "amd64")
    short = git_short(repo)
    (repo / "README").write_text("more docs\n")
    git(repo, "commit", "-q", "-am", "docs")
    assert git_short(repo) != short
    assert compute_key("cmd:make", ["image/*"], repo, "amd64") == before


def test_tags_outside_git(tree: Path) -> None:
    key = compute_key("b", [], tree, "amd64")
    assert git_short(tree) is None
    assert not tree_is_clean(tree)
    assert tags_for("base-qcow2", key, "amd64", tree) == [f"base-qcow2-{key.digest[:12]}-amd64"]


def test_tags_in_a_clean_tree(repo: Path) -> None:
    key = compute_key("b", [], repo, "amd64")
    short = git_short(repo)
    assert short and tree_is_clean(repo)
    assert tags_for("p", key.digest, "amd64", repo) == [
        f"p-{key.digest[:12]}-amd64", f"p-{short}", "p-latest"
    ]


@pytest.mark.parametrize("dirt", ["untracked", "unstaged", "staged"])
def test_latest_only_from_a_clean_tree(repo: Path, dirt: str) -> None:
    if dirt == "untracked":
        (repo / "new.txt").write_text("x")
    elif dirt == "unstaged":
        (repo / "README").write_text("changed")
    else:
        (repo / "README").write_text("changed")
        git(repo, "add", "README")
    assert not tree_is_clean(repo)
    tags = tags_for("p", "a" * 64, "amd64", repo)
    assert tags == ["p-aaaaaaaaaaaa-amd64", f"p-{git_short(repo)}"]

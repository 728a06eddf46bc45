"""The sdist and wheel build (``python -m build``, isolated: the declared setuptools floor)
and pass ``twine check --strict``; the license file and metadata agree."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                              ".mypy_cache", ".ruff_cache", ".pytest_cache", ".tox", ".flightvm")


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src = tmp_path_factory.mktemp("src") / "pytest-flightvm"
    shutil.copytree(ROOT, src, ignore=SKIP)
    out = src.parent / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_twine_check_strict_is_clean(dists: dict[str, Path]) -> None:
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                           str(dists["wheel"]), str(dists["sdist"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_license_file_matches_the_metadata(dists: dict[str, Path]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = whl.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(whl.read(meta_name))
        lic = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert whl.read(lic).decode() == text
        # what a user of the wheel needs beside the code
        assert "pytest_flightvm/py.typed" in names
        assert "pytest_flightvm/builders/debian-build.sh" in names
        assert "pytest_flightvm/seed/flightctl-setup.sh" in names
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE"
    with tarfile.open(dists["sdist"]) as sdist:
        assert any(n.endswith("/LICENSE") for n in sdist.getnames())


def test_build_floor_is_the_first_setuptools_that_takes_the_license() -> None:
    """setuptools 66 and 76 reject ``license = "Apache-2.0"`` (a PEP 639 expression);
    77 is the first that builds it (checked with pip when the floor was set)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert requires == ["setuptools>=77"]

"""The test tree itself: tests/ has no __init__.py files, so two test modules with one
basename in different tiers are a collection error when `make test` collects the tiers
together; a run of one tier alone would not show it."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_test_module_basenames_are_unique_across_tiers() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)
    assert names, "no test modules found"
    twice = sorted(n for n, c in names.items() if c > 1)
    assert not twice, f"test modules sharing a basename (rename one of each): {twice}"

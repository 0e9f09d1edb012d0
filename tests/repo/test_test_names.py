"""Test modules are imported by their file name (no packages under tests/, pytest's default
import mode): two test files with one name anywhere under tests/ stop the whole run at collection."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_file_name():
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)
    assert names, f"no test modules found under {TESTS}"
    assert [n for n, k in names.items() if k > 1] == []

"""The tracked tree stays small enough to travel: a GPU machine receives the whole working tree,
at most 64 MiB with the wheels and builds it needs, so the tracked files get at most 48 MiB.

Most of the tree is trained weights (sdk/train/weights): the shipped ones are stored FP16
(sdk.train.storage), variants that neither ship nor back a document are not kept (their model
cards say how to restore or retrain them). Sizes are those of the files in the working tree
(tracked paths deleted but not yet committed do not count).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_TRACKED_MIB = 48


def tracked_sizes(repo: Path) -> dict[str, int]:
    """Path -> bytes of every file git tracks in `repo` and the working tree holds."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=repo, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != repo.resolve():
        pytest.skip(f"{repo} is not the top of a git checkout (an installed or unpacked copy)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    sizes = {}
    for raw in filter(None, out.split(b"\0")):
        p = repo / os.fsdecode(raw)
        if p.is_file() and not p.is_symlink():
            sizes[os.fsdecode(raw)] = p.stat().st_size
    return sizes


def test_tracked_tree_stays_under_48_mib():
    sizes = tracked_sizes(REPO)
    total = sum(sizes.values())
    largest = ", ".join(f"{name} {n / 2**20:.1f} MiB" for name, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:5])
    assert total <= MAX_TRACKED_MIB * 2**20, (
        f"the tracked tree is {total / 2**20:.1f} MiB, over {MAX_TRACKED_MIB} MiB (a GPU machine gets at most 64 MiB "
        f"with its wheels); largest: {largest}")

"""benchmarks/profile_engine.py on tiny engines of both layouts: it reaches the runtime's graph
sessions (whatever runner holds them) and sums the profiled kernels by operator."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def profile_engine():
    sys.path.insert(0, str(BENCH))  # its bench_common import, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location("profile_engine", BENCH / "profile_engine.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.filterwarnings("ignore::sdk.errors.TruncationWarning")  # the tiny engines' token budget is 12
@pytest.mark.parametrize("layout", ["single", "split"])
def test_profile_sums_the_graph_kernels_of_either_layout(profile_engine, tiny_engine, tiny_split_engine, layout):
    engine = tiny_engine.path if layout == "single" else tiny_split_engine.path
    out = profile_engine.profile(str(engine), "image+text", 2, rounds=1, threads=1)
    assert out["graph_ms"] > 0 and out["ops_ms"] and out["embed_ms"] >= out["graph_ms"]
    assert abs(sum(out["kernel_share"].values()) - 1.0) < 1e-6

"""Speed of the fused L2 normalisation + Matryoshka truncation: sdk._C against the NumPy reference
and the same sub-graph in ONNX Runtime.

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py --benchmark-group-by=group \
        --benchmark-columns=mean,median,ops,rounds

Implementations: "c" (the dispatched kernel, AVX2+FMA where the CPU has it), "c_scalar" (the
portable kernel), "sdk.ops" (the public op: validation + the dispatched kernel), "numpy_ref"
(`sdk.ops.l2_normalize_ref`) and "onnxruntime" (Slice -> ReduceL2 -> Max(eps) -> Div, what
torch.nn.functional.normalize exports to, built with onnx.helper and run on the CPU with
BENCH_THREADS threads (default 1) and the session options the runtime uses). Each test checks its
output against the reference, to within `sdk.ops.L2_NORMALIZE_ATOL`.
"""

import numpy as np
import pytest
from bench_common import ort_graph

from sdk import ops
from sdk.ops import L2_NORMALIZE_ATOL, l2_normalize_ref

_C = pytest.importorskip("sdk._C")

WIDTH = 256  # D of the embedding tower output
IMPLS = {
    "c": lambda x, dim: _C.l2_normalize(x, dim),
    "c_scalar": lambda x, dim: _C.l2_normalize(x, dim, force_scalar=True),
    "sdk.ops": lambda x, dim: ops.l2_normalize(x, dim),
    "numpy_ref": l2_normalize_ref,
    "onnxruntime": None,  # built per dim: _ort_l2_normalize
}


def _ort_l2_normalize(dim: int):
    """x (B, WIDTH) -> x[:, :dim] / max(||x[:, :dim]||_2, eps) as an opset-17 graph, in an ONNX Runtime
    CPU session made as the runtime makes them (sdk.embedder), BENCH_THREADS threads."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import helper

    consts = {"starts": np.array([0], np.int64), "ends": np.array([dim], np.int64), "axes": np.array([1], np.int64),
              "eps": np.float32(ops.L2_NORMALIZE_EPS)}
    n = helper.make_node
    nodes = [n("Slice", ["x", "starts", "ends", "axes"], ["v"]), n("ReduceL2", ["v"], ["norm"], axes=[-1], keepdims=1),
             n("Max", ["norm", "eps"], ["den"]), n("Div", ["v", "den"], ["y"])]
    sess = ort_graph("l2_normalize", nodes, {"x": ["B", WIDTH]}, {"y": ["B", dim]}, consts)
    return lambda x, _dim: sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("batch", [1, 32, 1024])
def test_l2_normalize(benchmark, batch, dim, impl):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, WIDTH), dtype=np.float32) * 3  # (B, D)
    fn = IMPLS[impl] or _ort_l2_normalize(dim)
    for _ in range(20):  # warm-up: page in x, resolve the kernel dispatch
        fn(x, dim)

    benchmark.group = f"l2_normalize B={batch} D={WIDTH} dim={dim}"
    benchmark.extra_info.update(impl=impl, batch=batch, width=WIDTH, dim=dim)
    if impl.startswith("c") or impl == "sdk.ops":
        benchmark.extra_info["kernel"] = "scalar" if impl == "c_scalar" else _C.l2_normalize_kernel()
    y = benchmark(fn, x, dim)  # (B, dim)

    np.testing.assert_allclose(y, l2_normalize_ref(x, dim), rtol=0, atol=L2_NORMALIZE_ATOL)
    if benchmark.stats is not None:  # None under --benchmark-disable
        mean_s = benchmark.stats.stats.mean
        benchmark.extra_info["items_per_s"] = batch / mean_s
        benchmark.extra_info["GB_per_s"] = 2 * batch * dim * 4 / mean_s / 1e9  # read + write

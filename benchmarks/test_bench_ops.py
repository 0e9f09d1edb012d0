"""Speed of the fused L2 normalisation + Matryoshka truncation: sdk._C against the NumPy reference.

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py --benchmark-group-by=group \
        --benchmark-columns=mean,median,ops,rounds

Implementations: "c" (the dispatched kernel, AVX2+FMA where the CPU has it), "c_scalar" (the
portable kernel), "sdk.ops" (the public op: validation + the dispatched kernel) and "numpy_ref"
(`sdk.ops.l2_normalize_ref`). Each test checks its output against the reference.
"""

import numpy as np
import pytest

from sdk import ops
from sdk.ops import L2_NORMALIZE_ATOL, l2_normalize_ref

_C = pytest.importorskip("sdk._C")

WIDTH = 256  # D of the embedding tower output
IMPLS = {
    "c": lambda x, dim: _C.l2_normalize(x, dim),
    "c_scalar": lambda x, dim: _C.l2_normalize(x, dim, force_scalar=True),
    "sdk.ops": lambda x, dim: ops.l2_normalize(x, dim),
    "numpy_ref": l2_normalize_ref,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("batch", [1, 32, 1024])
def test_l2_normalize(benchmark, batch, dim, impl):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, WIDTH), dtype=np.float32) * 3  # (B, D)
    fn = IMPLS[impl]
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

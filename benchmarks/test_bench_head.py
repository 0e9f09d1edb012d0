"""The embedder head and its fused ops: sdk._C against the NumPy reference and the same sub-graph
in ONNX Runtime; and end-to-end split-engine latency with and without the compiled ops.

    .venv/bin/python -m pytest benchmarks/test_bench_head.py --benchmark-group-by=group \
        --benchmark-columns=median,ops,rounds
    MOON3_ENGINE=moon3.engine .venv/bin/python -m pytest benchmarks/test_bench_head.py -k end_to_end ...

Weights: the committed trained embedder (sdk/train/weights), so shapes and values are the real
ones (d=256, 49 image tokens, FIRE hidden 128). Implementations:
    "c"            sdk._C kernels (AVX2+FMA where the CPU has it), one thread; for the whole head,
                   the one-call `sdk._C.FusionHeadKernel`
    "c_ops"        (whole head only) the NumPy head calling the per-op sdk._C kernels
                   (`FusionHead.forward_reference` with sdk._C on)
    "numpy"        the NumPy references (sdk.fused.*_ref; NumPy's BLAS with its own threads)
    "sdk.fused"    (single ops only) the public wrapper: argument conversion/checks + sdk._C, fresh
                   outputs; "c" there is the bare sdk._C call writing into the caller's `out=` buffers
    "onnxruntime"  the same sub-graph run by ONNX Runtime (CPU, BENCH_THREADS threads (default 1, like
                   every runner of the suites), all graph optimisations, the session options the
                   runtime uses: `sdk.embedder.session_kwargs`): exported from PyTorch for the head and
                   FIRE, built with onnx.helper (opset 17, the same weights) for the single ops
The head and FIRE check the vector they timed against the PyTorch module; the single ops against
their NumPy reference, to within `sdk.fused.FUSED_ATOL`.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from bench_common import THREADS, ort_graph, ort_session

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from sdk import fused, ops  # noqa: E402
from sdk.fused import FUSED_ATOL, FireParams  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
IMPLS = ["c", "numpy", "onnxruntime"]


@pytest.fixture(scope="module")
def model():
    from sdk.paths import WEIGHTS
    from sdk.train.fusion_model import load_embedder

    return load_embedder(WEIGHTS)


def _onnx(module, args, names, dynamic, path):
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, optimize=True, verbose=False)
    program.save(str(path), external_data=False)
    sess = ort_session(path.read_bytes())
    out = sess.get_outputs()[0].name
    return lambda *xs: sess.run([out], dict(zip(names, xs)))[0]


class _Head(torch.nn.Module):
    def __init__(self, fusion):
        super().__init__()
        self.fusion = fusion

    def forward(self, image_tokens, text_states, text_mask, trace_states, trace_mask, present):
        return self.fusion(image_tokens, image_tokens, text_states, text_mask, trace_states, trace_mask, present,
                           image_tokens=image_tokens)


def _head_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, S = 14, 9
    x = (torch.randn(batch, 49, 256, generator=g), torch.randn(batch, T, 384, generator=g), torch.ones(batch, T),
         torch.randn(batch, S, 384, generator=g), torch.ones(batch, S), torch.ones(batch, 3))
    x[2][:, T // 2:] = 0  # padded titles
    x[5][:, 2] = 0  # no trace
    x[4][:] = 0
    return x


@pytest.mark.parametrize("impl", ["c", "c_ops", "numpy", "onnxruntime"])
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_head(benchmark, model, tmp_path_factory, batch, impl):
    from sdk.export.onnx_split import head_state
    from sdk.head import FusionHead

    x = _head_inputs(batch)
    with torch.inference_mode():
        want = model(*x[:1], x[0], *x[1:], image_tokens=x[0]).numpy()
    xs = [t.numpy() for t in x]
    if impl == "onnxruntime":
        from torch.export import Dim

        b, t, s = Dim("batch", min=1), Dim("text_len", min=1, max=512), Dim("trace_len", min=1, max=512)
        dyn = {"image_tokens": {0: b}, "text_states": {0: b, 1: t}, "text_mask": {0: b, 1: t},
               "trace_states": {0: b, 1: s}, "trace_mask": {0: b, 1: s}, "present": {0: b}}
        ex = _head_inputs(3)
        fn = _onnx(_Head(model).eval(), ex, list(dyn), dyn, tmp_path_factory.mktemp("head") / "head.onnx")
    else:
        head = FusionHead(head_state(model), json.loads(model.cfg.to_json()))
        have_c = impl != "numpy"
        if have_c and not ops.HAVE_C:
            pytest.skip("sdk._C is not built")
        head.fused = impl == "c"

        def fn(*a):
            saved, ops.HAVE_C = ops.HAVE_C, have_c
            try:
                return head(*a)
            finally:
                ops.HAVE_C = saved
    for _ in range(3):
        fn(*xs)
    benchmark.group = f"head (fusion + projection), batch {batch}"
    benchmark.extra_info.update(impl=impl, batch=batch)
    got = benchmark(fn, *xs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def _fire(model):
    return model.image.fire["1"].eval()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 8])
def test_fire_residual(benchmark, model, tmp_path_factory, batch, impl):
    block = _fire(model)
    g = torch.Generator().manual_seed(1)
    h, s = torch.randn(batch, 49, 256, generator=g), torch.randn(batch, 49, 152, generator=g)
    with torch.inference_mode():
        want = block(h, s).numpy()
    p = FireParams.from_state({k: v.numpy() for k, v in block.state_dict().items()}, "")
    if impl == "onnxruntime":
        from torch.export import Dim

        b = Dim("batch", min=1)
        fn = _onnx(block, (torch.randn(3, 49, 256), torch.randn(3, 49, 152)), ["h", "shallow"],
                   {"h": {0: b}, "shallow": {0: b}}, tmp_path_factory.mktemp("fire") / "fire.onnx")
    elif impl == "c":
        if not ops.HAVE_C:
            pytest.skip("sdk._C is not built")
        fn = lambda hh, ss: fused.fire_residual(hh, ss, p)  # noqa: E731
    else:
        fn = lambda hh, ss: fused.fire_residual_ref(hh, ss, p)  # noqa: E731
    benchmark.group = f"FIRE residual (49 tokens x d=256, hidden 128), batch {batch}"
    benchmark.extra_info.update(impl=impl, batch=batch)
    got = benchmark(fn, h.numpy(), s.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("impl", ["c", "numpy"])
@pytest.mark.parametrize("batch", [1, 32])
def test_fusion_epilogue_and_projection(benchmark, model, batch, impl):
    if impl == "c" and not ops.HAVE_C:
        pytest.skip("sdk._C is not built")
    f, hd = model.fusion[0], model.head
    w = lambda t: t.detach().numpy()  # noqa: E731
    rng = np.random.default_rng(0)
    q, outs = rng.standard_normal((batch, 256), np.float32), rng.standard_normal((batch, 3, 256), np.float32)
    logits, present = rng.standard_normal((batch, 3), np.float32), np.ones((batch, 3), np.float32)
    ep = (w(f.out.weight), w(f.out.bias), w(f.ffn[0].weight), w(f.ffn[0].bias))
    pj = (w(hd[0].weight), w(hd[0].bias), w(hd[1].weight), w(hd[1].bias))
    if impl == "c":
        run = lambda: (ops._C.fusion_epilogue(q, outs, logits, present, *ep), ops._C.project_normalize(q, *pj, 256))  # noqa: E731
    else:
        run = lambda: (fused.fusion_epilogue_ref(q, outs, logits, present, *ep),  # noqa: E731
                       fused.project_normalize_ref(q, *pj, 256))
    benchmark.group = f"fusion epilogue + projection/L2, batch {batch}"
    benchmark.extra_info.update(impl=impl, batch=batch)
    (qn, h, gate), e = benchmark(run)
    want_q = fused.fusion_epilogue_ref(q, outs, logits, present, *ep)[0]
    np.testing.assert_allclose(qn, want_q, rtol=0, atol=FUSED_ATOL)
    np.testing.assert_allclose(e, fused.project_normalize_ref(q, *pj, 256), rtol=0, atol=FUSED_ATOL)


def _epilogue_inputs(model, batch):
    """The first fusion round's epilogue weights and random unit-scale inputs of `batch` rows."""
    f = model.fusion[0]
    w = lambda t: t.detach().numpy()  # noqa: E731
    rng = np.random.default_rng(batch)
    present = np.ones((batch, 3), np.float32)
    present[::2, 2] = 0  # every other row has no trace: its gate weight is 0
    xs = (rng.standard_normal((batch, 256), np.float32), rng.standard_normal((batch, 3, 256), np.float32),
          rng.standard_normal((batch, 3), np.float32), present)  # q, outs, logits, present
    return xs, (w(f.out.weight), w(f.out.bias), w(f.ffn[0].weight), w(f.ffn[0].bias))


def _ort_fusion_epilogue(out_w, out_b, ln_w, ln_b):
    """fusion_epilogue as ONNX: Softmax(logits + (1 - present) * NEG) -> MatMul with outs -> Gemm ->
    Add q -> LayerNormalization; outputs (q_new, h, gate)."""
    from onnx import helper

    d = out_w.shape[0]
    n = helper.make_node
    nodes = [
        n("Sub", ["one", "present"], ["absent"]), n("Mul", ["absent", "neg"], ["mask"]),
        n("Add", ["logits", "mask"], ["z"]), n("Softmax", ["z"], ["gate"], axis=-1),  # (B, M)
        n("Unsqueeze", ["gate", "ax1"], ["gate3"]), n("MatMul", ["gate3", "outs"], ["fused3"]),  # (B, 1, d)
        n("Squeeze", ["fused3", "ax1"], ["fused"]), n("Gemm", ["fused", "out_w", "out_b"], ["proj"], transB=1),
        n("Add", ["q", "proj"], ["q_new"]),
        n("LayerNormalization", ["q_new", "ln_w", "ln_b"], ["h"], axis=-1, epsilon=fused.LN_EPS),
    ]
    weights = {"out_w": out_w, "out_b": out_b, "ln_w": ln_w, "ln_b": ln_b, "one": np.float32(1.0),
               "neg": np.float32(fused.NEG), "ax1": np.array([1], np.int64)}
    sess = ort_graph("fusion_epilogue", nodes, {"q": ["B", d], "outs": ["B", 3, d], "logits": ["B", 3],
                                             "present": ["B", 3]},
                  {"q_new": ["B", d], "h": ["B", d], "gate": ["B", 3]}, weights)
    return lambda q, outs, logits, present: tuple(
        sess.run(["q_new", "h", "gate"], {"q": q, "outs": outs, "logits": logits, "present": present}))


@pytest.mark.parametrize("impl", ["c", "sdk.fused", "numpy", "onnxruntime"])
@pytest.mark.parametrize("batch", [1, 32])
def test_fusion_epilogue(benchmark, model, batch, impl):
    if impl in ("c", "sdk.fused") and not ops.HAVE_C:
        pytest.skip("sdk._C is not built")
    xs, ep = _epilogue_inputs(model, batch)
    if impl == "c":  # into the caller's buffers: no allocation, no copy
        bufs = tuple(np.empty(shape, np.float32) for shape in ((batch, 256), (batch, 256), (batch, 3)))
        fn = lambda *a: ops._C.fusion_epilogue(*a, *ep, bufs)  # noqa: E731
    elif impl == "sdk.fused":
        fn = lambda *a: fused.fusion_epilogue(*a, *ep)  # noqa: E731
    elif impl == "numpy":
        fn = lambda *a: fused.fusion_epilogue_ref(*a, *ep)  # noqa: E731
    else:
        fn = _ort_fusion_epilogue(*ep)
    for _ in range(3):
        fn(*xs)
    benchmark.group = f"fusion epilogue (d=256, 3 modalities), batch {batch}"
    benchmark.extra_info.update(impl=impl, batch=batch)
    got = benchmark(fn, *xs)
    for g, w in zip(got, fused.fusion_epilogue_ref(*xs, *ep)):
        np.testing.assert_allclose(g, w, rtol=0, atol=FUSED_ATOL)


def _ort_project_normalize(ln_w, ln_b, w, b, dim):
    """project_normalize as ONNX: LayerNormalization -> Gemm with the kept rows of w -> x / max(||x||, eps)
    (ReduceL2, Max, Div: what torch.nn.functional.normalize exports to)."""
    from onnx import helper

    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["q", "ln_w", "ln_b"], ["h"], axis=-1, epsilon=fused.LN_EPS),
        n("Gemm", ["h", "w", "b"], ["e"], transB=1),  # (B, dim)
        n("ReduceL2", ["e"], ["norm"], axes=[-1], keepdims=1), n("Max", ["norm", "eps"], ["den"]),
        n("Div", ["e", "den"], ["y"]),
    ]
    weights = {"ln_w": ln_w, "ln_b": ln_b, "w": np.ascontiguousarray(w[:dim]), "b": np.ascontiguousarray(b[:dim]),
               "eps": np.float32(ops.L2_NORMALIZE_EPS)}
    sess = ort_graph("project_normalize", nodes, {"q": ["B", w.shape[1]]}, {"y": ["B", dim]}, weights)
    return lambda q: sess.run(["y"], {"q": q})[0]


@pytest.mark.parametrize("impl", ["c", "sdk.fused", "numpy", "onnxruntime"])
@pytest.mark.parametrize("batch", [1, 32])
def test_project_normalize(benchmark, model, batch, impl):
    if impl in ("c", "sdk.fused") and not ops.HAVE_C:
        pytest.skip("sdk._C is not built")
    hd, dim = model.head, 256
    pj = tuple(t.detach().numpy() for t in (hd[0].weight, hd[0].bias, hd[1].weight, hd[1].bias))
    q = np.random.default_rng(batch).standard_normal((batch, 256), np.float32)
    if impl == "c":  # into the caller's buffer: no allocation, no copy
        buf = np.empty((batch, dim), np.float32)
        fn = lambda x: ops._C.project_normalize(x, *pj, dim, buf)  # noqa: E731
    elif impl == "sdk.fused":
        fn = lambda x: fused.project_normalize(x, *pj, dim)  # noqa: E731
    elif impl == "numpy":
        fn = lambda x: fused.project_normalize_ref(x, *pj, dim)  # noqa: E731
    else:
        fn = _ort_project_normalize(*pj, dim)
    for _ in range(3):
        fn(q)
    benchmark.group = f"projection + L2 normalise (LayerNorm, 256 -> {dim}), batch {batch}"
    benchmark.extra_info.update(impl=impl, batch=batch, dim=dim)
    got = benchmark(fn, q)
    np.testing.assert_allclose(got, fused.project_normalize_ref(q, *pj, dim), rtol=0, atol=FUSED_ATOL)


@pytest.mark.parametrize("impl", ["c", "c_ops", "numpy"])
@pytest.mark.parametrize("kind", ["photo+title", "title"])
def test_end_to_end(benchmark, impl, kind):
    """A split engine (MOON3_ENGINE) through sdk.Embedder at batch 1: the one-call compiled head,
    the NumPy head with the per-op sdk._C kernels, and NumPy alone."""
    engine = Path(os.environ.get("MOON3_ENGINE", "moon3.engine"))
    if not engine.is_file():
        pytest.skip(f"no engine at {engine}: build one with `moon3 build` or set MOON3_ENGINE")
    if impl != "numpy" and not ops.HAVE_C:
        pytest.skip("sdk._C is not built")
    from sdk.embedder import Embedder

    e = Embedder(engine, threads=THREADS)
    if e.manifest["embedder"].get("layout") != "split":
        pytest.skip(f"{engine} is a single-graph engine; the head ops run in split engines")
    e._split.head.fused = impl == "c"
    item = json.loads((SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines()[0])
    kw = {"texts": [item["title"]]}
    if kind == "photo+title":
        kw["images"] = [SAMPLES / item["image"]]
    saved, ops.HAVE_C = ops.HAVE_C, impl != "numpy"
    try:
        want = e.embed(**kw)
        benchmark.group = f"end to end, split engine, {kind}, batch 1"
        benchmark.extra_info.update(impl=impl, kind=kind)
        got = benchmark(e.embed, **kw)
    finally:
        ops.HAVE_C = saved
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    e._split.head.fused = True
    np.testing.assert_allclose(e.embed(**kw), got, rtol=0, atol=2e-5)  # the same vector whichever head ran

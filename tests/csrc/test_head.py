"""The whole head in one compiled call (sdk._C.FusionHeadKernel) against the NumPy head."""

import math

import numpy as np
import pytest
from fused_cases import rand

from sdk import ops
from sdk.errors import EngineError
from sdk.head import FusionHead, head_weight_shapes

KERNELS = pytest.mark.parametrize("force_scalar", [False, True], ids=["dispatched", "scalar"])
# (d_model, n_heads, text_dim, ffn_mult, out_dim): the real head, and widths that are not multiples of 8
CONFIGS = [(256, 4, 384, 4, 256), (36, 4, 20, 3, 28), (13, 1, 7, 2, 5)]


def config(d, h, c, mult, out, rounds=2):
    return {"d_model": d, "n_heads": h, "text_dim": c, "ffn_mult": mult, "out_dim": out, "n_fusion_layers": rounds,
            "n_image_tokens": 9}


def random_state(cfg, seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in head_weight_shapes(cfg).items():
        if name.endswith(".weight") and len(shape) == 1:
            state[name] = 1 + rand(rng, *shape, scale=0.1)  # LayerNorm gains
        else:
            state[name] = rand(rng, *shape, scale=1 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.1)
    return state


def inputs(cfg, B, N=9, T=7, S=5, seed=1):
    rng = np.random.default_rng(seed)
    d, c = cfg["d_model"], cfg["text_dim"]
    present = (rng.uniform(size=(B, 3)) > 0.35).astype(np.float32)
    tmask = (np.arange(T)[None] < rng.integers(1, T + 1, (B, 1))).astype(np.float32) * present[:, 1:2]
    smask = (np.arange(S)[None] < rng.integers(1, S + 1, (B, 1))).astype(np.float32) * present[:, 2:3]
    image = rand(rng, B, N, d) * present[:, :1, None]
    return image, rand(rng, B, T, c), tmask, rand(rng, B, S, c), smask, present


@pytest.fixture(scope="module")
def C():
    return pytest.importorskip("sdk._C")


def heads(cfg, seed=0):
    head = FusionHead(random_state(cfg, seed), cfg)
    assert head.fused, "the compiled head should be picked when sdk._C is built"
    return head


def reference(head, args, dim=None):
    """The NumPy head with every per-op kernel off too: the pure reference."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "HAVE_C", False)
        return head.forward_reference(*args, dim=dim)


def assert_close(got, want):
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    cos = (got * want).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
    assert cos.min() >= 0.99999


@pytest.mark.usefixtures("C")
@KERNELS
@pytest.mark.parametrize("cfg_args", CONFIGS, ids=[f"d{c[0]}h{c[1]}c{c[2]}" for c in CONFIGS])
@pytest.mark.parametrize("B", [1, 5, 33])
def test_head_kernel_matches_the_numpy_head(cfg_args, B, force_scalar):
    cfg = config(*cfg_args)
    head = heads(cfg)
    args = inputs(cfg, B)
    want = reference(head, args)
    got = head._kernel(*args, cfg["out_dim"], force_scalar=force_scalar)
    assert_close(got, want)


@pytest.mark.usefixtures("C")
def test_every_presence_pattern_and_edge_rows():
    cfg = config(36, 4, 20, 3, 28)
    head = heads(cfg, seed=3)
    patterns = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], np.float32)  # all 8, incl. none
    image, text, tmask, trace, smask, _ = inputs(cfg, len(patterns), seed=4)
    tmask[:] = 1.0
    smask[:] = 1.0
    tmask[7] = 0.0  # title marked present with no valid token: attended over all positions, pooled to zero
    smask[:, 3:] = 0.0  # padded traces
    args = (image, text, tmask, trace, smask, patterns)
    want = reference(head, args)
    assert np.isfinite(want).all()
    got = head(*args)
    assert_close(got[:7], want[:7])
    # row 7: the reference adds -1e4 to every score before its softmax, which costs it ~1e-3 of
    # absolute precision in float32 (the kernel, skipping the mask, does not): cosine only
    assert float(got[7] @ want[7]) >= 0.99999


@pytest.mark.usefixtures("C")
def test_padding_and_absent_states_never_reach_the_result():
    cfg = config(36, 4, 20, 3, 28)
    head = heads(cfg, seed=5)
    image, text, tmask, trace, smask, present = inputs(cfg, 6, seed=6)
    base = head(image, text, tmask, trace, smask, present)
    image2, text2, trace2 = image.copy(), text.copy(), trace.copy()
    image2[present[:, 0] == 0] = 1e3
    text2[tmask == 0] = -1e3
    trace2[smask == 0] = 1e3
    np.testing.assert_allclose(head(image2, text2, tmask, trace2, smask, present), base, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("C")
@pytest.mark.parametrize("dim", [1, 16, 28])
def test_matryoshka_prefix(dim):
    cfg = config(36, 4, 20, 3, 28)
    head = heads(cfg)
    args = inputs(cfg, 4)
    got = head(*args, dim=dim)
    assert_close(got, reference(head, args, dim=dim))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.usefixtures("C")
def test_one_round_and_zero_rounds():
    for rounds in (0, 1):
        cfg = config(36, 4, 20, 3, 28, rounds=rounds)
        head = heads(cfg)
        args = inputs(cfg, 3)
        assert_close(head(*args), reference(head, args))


def test_reference_serves_when_the_extension_is_off(monkeypatch):
    cfg = config(36, 4, 20, 3, 28)
    head = FusionHead(random_state(cfg), cfg)
    args = inputs(cfg, 3)
    monkeypatch.setattr(ops, "HAVE_C", False)
    np.testing.assert_array_equal(head(*args), head.forward_reference(*args))


@pytest.mark.usefixtures("C")
def test_bad_shapes_name_the_argument():
    cfg = config(36, 4, 20, 3, 28)
    head = heads(cfg)
    image, text, tmask, trace, smask, present = inputs(cfg, 3)
    with pytest.raises(ValueError, match=r"text_mask must have shape \(3, 7\)"):
        head._kernel(image, text, tmask[:, :5], trace, smask, present, 28)
    with pytest.raises(ValueError, match=r"image_tokens must have shape \(3, 9, 36\)"):
        head._kernel(image[..., :30], text, tmask, trace, smask, present, 28)
    with pytest.raises(ValueError, match=r"dim must be in \[1, 28\], got 29"):
        head._kernel(image, text, tmask, trace, smask, present, 29)
    with pytest.raises(ValueError, match=r"present must be \(R, 3\)"):
        head._kernel(image, text, tmask, trace, smask, present[0], 28)
    with pytest.raises(ValueError, match="present has 2 rows and image_tokens 3: without source they must match"):
        head._kernel(image, text, tmask, trace, smask, present[:2], 28)
    with pytest.raises(ValueError, match="source must be 2 ints"):
        head._kernel(image, text, tmask, trace, smask, present[:2], 28, source=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"source\[1\] = 3 is not a token row \(0..2\)"):
        head._kernel(image, text, tmask, trace, smask, present[:2], 28, source=np.array([0, 3]))


@pytest.mark.usefixtures("C")
@KERNELS
def test_query_rows_sharing_token_rows_match_gathered_rows(force_scalar):
    """`source`: R query rows read B token rows; the result equals calling the kernel on the
    gathered rows (each row's K/V projected once instead of once per reader)."""
    cfg = config(36, 4, 20, 3, 28)
    head = heads(cfg, seed=7)
    image, text, tmask, trace, smask, _ = inputs(cfg, 4, seed=8)
    tmask[:, 0] = 1.0
    smask[:, 0] = 1.0
    image = inputs(cfg, 4, seed=9)[0] + 0.5  # every row has image tokens
    source = np.array([0, 1, 2, 3, 0, 2, 0, 2, 3], np.int64)
    rng = np.random.default_rng(10)
    present = (rng.uniform(size=(len(source), 3)) > 0.4).astype(np.float32)
    present[4:6] = [1, 0, 0]  # photo-only and title-only views of rows 0 and 2
    present[6:8] = [0, 1, 0]
    skip = rand(rng, len(source), 28)
    got = head._kernel(image, text, tmask, trace, smask, present, 28, skip, force_scalar=force_scalar, source=source)
    want = head._kernel(image[source], text[source], tmask[source], trace[source], smask[source], present, 28, skip,
                        force_scalar=force_scalar)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("C")
def test_the_blend_in_one_call_matches_three_reference_heads():
    """A head trained with the photo + title blend: the compiled path (the fused vector and the
    photo-only and title-only views in one kernel call) gives the NumPy head's vectors."""
    cfg = {**config(36, 4, 20, 3, 28), "skip_path": True, "modality_blend": 1.0, "title_blend": 2.0,
           "title_weight_with_photo": 3.0}
    head = heads(cfg, seed=11)
    patterns = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 1, 1]], np.float32)
    image, text, tmask, trace, smask, _ = inputs(cfg, len(patterns), seed=12)
    tmask[:, 0] = 1.0
    smask[:, 0] = 1.0
    image_skip = rand(np.random.default_rng(13), len(patterns), 28)
    args = (image, text, tmask * patterns[:, 1:2], trace, smask * patterns[:, 2:3], patterns)
    got = head(*args, image_skip=image_skip)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "HAVE_C", False)
        want = head(*args, image_skip=image_skip)
    assert_close(got, want)
    assert_close(head(*args, dim=16, image_skip=image_skip), want[:, :16] / np.linalg.norm(want[:, :16], axis=1,
                                                                                           keepdims=True))


@pytest.mark.usefixtures("C")
def test_inconsistent_config_is_an_engine_error():
    cfg = config(36, 5, 20, 3, 28)  # 36 is not a multiple of 5 heads
    with pytest.raises(EngineError, match="multiple of n_heads"):
        FusionHead(random_state(cfg), cfg)


@pytest.mark.usefixtures("C")
def test_kernel_reports_missing_weights(C):
    cfg = config(36, 4, 20, 3, 28)
    state = random_state(cfg)
    del state["fusion.1.attn.2.kv.bias"]
    with pytest.raises(ValueError, match="lack 'fusion.1.attn.2.kv.bias'"):
        C.FusionHeadKernel(state, 36, 4, 2, 28, 20, 3)


@pytest.mark.usefixtures("C")
def test_kernel_is_shared_safely_by_threads():
    from concurrent.futures import ThreadPoolExecutor

    cfg = config(36, 4, 20, 3, 28)
    head = heads(cfg)
    batches = [inputs(cfg, 5, seed=s) for s in range(16)]
    one = [head(*b) for b in batches]
    with ThreadPoolExecutor(8) as pool:
        many = list(pool.map(lambda b: head(*b), batches))
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)

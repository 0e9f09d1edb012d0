"""sdk.train.completion: the image completion module, its loss and its files (tiny models, in code)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiny_completion import tiny_completion  # noqa: E402
from tiny_models import tiny_fusion  # noqa: E402

from sdk.train.completion import (  # noqa: E402
    CompletionConfig,
    CompletionTrainConfig,
    completion_loss,
    fuse,
    load_completion,
    save_completion,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def batch(B=6, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    title = torch.randn(B, T, 16, generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    return title * mask[..., None], mask, torch.randn(B, 49, 32, generator=g)


def test_repeated_tokens_fuse_as_the_distinct_ones():
    # training fuses the 7 distinct tokens, the runtime the 49 repeated ones: they must agree
    fusion, model = tiny_fusion(), tiny_completion()
    title, mask, _ = batch()
    with torch.no_grad():
        short = model(title, mask, repeat=False)
        full = model(title, mask)
        assert short.shape == (6, 7, 32) and full.shape == (6, 49, 32)
        a, b = fuse(fusion, short, title, mask), fuse(fusion, full, title, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_the_completion():
    model = tiny_completion()
    title, mask, _ = batch()
    padded_t = torch.cat([title, torch.randn(6, 4, 16)], 1)  # garbage on the padding
    padded_m = torch.cat([mask, torch.zeros(6, 4)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(title, mask), model(padded_t, padded_m), atol=1e-5, rtol=1e-5)


def test_one_training_step_lowers_the_loss_and_leaves_the_embedder_frozen():
    fusion, model = tiny_fusion(), tiny_completion()
    model.train()
    for p in fusion.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in fusion.state_dict().items()}
    title, mask, target = batch()
    with torch.no_grad():
        target_vec = fuse(fusion, target, title, mask)
        photo_vec = fuse(fusion, target, title, mask, text_present=False)
    same = torch.eye(6, dtype=torch.bool)
    cfg = CompletionTrainConfig()
    inv_var = torch.ones(32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss, terms = completion_loss(model, fusion, title, mask, target, target_vec, photo_vec, same, cfg, inv_var)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
        assert set(terms) == {"pooled", "fused", "contrast"}
    assert losses[-1] < losses[0]
    for k, v in fusion.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_files_round_trip(tmp_path):
    model = tiny_completion()
    save_completion(model, tmp_path, "ab" * 32, metrics={"x": 1.0})
    loaded, meta = load_completion(tmp_path)
    assert meta["embedder_sha256"] == "ab" * 32 and meta["metrics"] == {"x": 1.0}
    title, mask, _ = batch()
    with torch.no_grad():
        a, b = model(title, mask), loaded(title, mask)
    # weights are stored in fp16 (lean files): close, not equal
    assert float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()) > 0.999
    with pytest.raises(FileNotFoundError, match="completion.json"):
        load_completion(tmp_path / "missing")


@pytest.mark.parametrize("kw, match", [
    ({"n_queries": 6}, "must divide n_tokens"),
    ({"d_model": 30, "n_heads": 4}, "divisible"),
    ({"dropout": 1.0}, "dropout"),
    ({"n_layers": 0}, "n_layers"),
])
def test_bad_config_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        CompletionConfig(**kw)


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="loss weights"):
        CompletionTrainConfig(w_fused=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        CompletionTrainConfig(temperature=0.0)
    assert np.isfinite(CompletionTrainConfig().lr)


def test_a_skip_path_embedders_completion_writes_the_photos_skip_term_and_learns_it():
    """Against a skip-path embedder the module also writes the photo's skip term: fused with it the
    completed item is the embedder's vector of those tokens plus that term (a blended embedder too);
    the loss has a skip term and one step moves the completed skip toward the real one."""
    from sdk.train.completion import fuse_completed

    fusion = tiny_fusion(skip_path=True)
    cfg = CompletionConfig.for_embedder(fusion.cfg, n_layers=1, ffn_mult=2, dropout=0.0)
    assert cfg.skip_dim == fusion.cfg.out_dim == 32
    assert CompletionConfig.for_embedder(tiny_fusion().cfg).skip_dim == 0
    model = tiny_completion(skip_dim=32)
    title, mask, target = batch()
    with torch.no_grad():
        tok, skip = model.complete(title, mask)
        assert tok.shape == (6, 49, 32) and skip.shape == (6, 32)
        torch.testing.assert_close(model(title, mask), tok)
        got, without = fuse_completed(fusion, model, title, mask), fuse(fusion, tok, title, mask)
        assert (got * without).sum(-1).min() < 0.9999  # the skip term is part of the vector
        raw = fusion.raw(None, None, title, mask, torch.zeros(6, 1, 16), torch.zeros(6, 1),
                         torch.tensor([[1.0, 1.0, 0.0]] * 6), image_tokens=tok)
        torch.testing.assert_close(got, torch.nn.functional.normalize(raw + skip, dim=-1), atol=1e-5, rtol=1e-5)
        fusion.cfg.modality_blend = 1.0  # the blend's photo-only part keeps the completed skip term
        photo = fuse(fusion, tok, title, mask, text_present=False, image_skip=skip)
        alone = fuse(fusion, tok, title, mask, image_present=False)
        want = torch.nn.functional.normalize(
            torch.nn.functional.normalize(raw + skip, dim=-1) + photo + alone, dim=-1)
        torch.testing.assert_close(fuse_completed(fusion, model, title, mask), want, atol=1e-5, rtol=1e-5)
        fusion.cfg.modality_blend = 0.0
    real_skip = torch.randn(6, 32)
    model.train()
    with torch.no_grad():
        target_vec = fuse(fusion, target, title, mask, image_skip=real_skip)
        photo_vec = fuse(fusion, target, title, mask, text_present=False, image_skip=real_skip)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    errs = []
    for _ in range(4):
        loss, terms = completion_loss(model, fusion, title, mask, target, target_vec, photo_vec,
                                      torch.eye(6, dtype=torch.bool), CompletionTrainConfig(), torch.ones(32),
                                      (real_skip, torch.ones(32)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        errs.append(terms["skip"])
    assert set(terms) == {"pooled", "fused", "contrast", "skip"} and errs[-1] < errs[0]

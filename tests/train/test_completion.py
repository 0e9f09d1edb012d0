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

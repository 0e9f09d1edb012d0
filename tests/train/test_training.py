"""Training on a synthetic feature cache: the recipe must learn a real cross-modal alignment."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdk.train.embedder import EmbedderConfig, load_embedder  # noqa: E402
from sdk.train.train_embedder import Features, TrainConfig, info_nce, make_batches, train  # noqa: E402

TINY = dict(d_model=32, n_heads=4, image_dim=24, shallow_dim=8, text_dim=16, n_image_tokens=9,
            n_image_layers=2, fire_hidden=16, n_fusion_layers=1, out_dim=32, matryoshka_dims=(16, 32), dropout=0.0)


def write_cache(folder, n=300, seed=0):
    """Image and text tokens are two different noisy linear views of one latent per product."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    A, B, C = rng.normal(size=(6, 24)), rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    tok = lambda base, t: base[:, None, :] + 0.3 * rng.normal(size=(n, t, base.shape[1]))  # noqa: E731
    deep = tok(z @ A, 9)
    has = np.ones(n, bool)
    has[[5, 17, 33]] = False
    deep[~has] = 0
    arrays = {
        "img_deep": deep.astype(np.float16),
        "img_shallow": rng.normal(size=(n, 9, 8)).astype(np.float16),
        "has_image": has,
        "title_tok": tok(z @ B, 5).astype(np.float16),
        "title_mask": (np.arange(5)[None, :] < rng.integers(2, 6, size=(n, 1))).astype(np.uint8),
        "detail_tok": tok(z @ C, 7).astype(np.float16),
        "detail_mask": np.ones((n, 7), np.uint8),
    }
    ids = np.arange(1000, 1000 + n)
    val_rows = np.flatnonzero((ids % 10 == 0) & has)
    arrays["val_flip_rows"] = val_rows
    arrays["img_deep_flip"] = (deep[val_rows] + 0.05).astype(np.float16)
    arrays["img_shallow_flip"] = arrays["img_shallow"][val_rows]
    for k, v in arrays.items():
        np.save(folder / f"{k}.npy", v)
    (folder / "meta.json").write_text(json.dumps({"ids": ids.tolist()}))
    return folder


def test_training_learns_text_to_image_alignment(tmp_path):
    f = Features(write_cache(tmp_path))
    cfg = TrainConfig(epochs=8, batch_size=32, group_size=4, lr=3e-3, warmup_steps=5)
    res = train(EmbedderConfig(**TINY), cfg, f, None, tmp_path / "out", log=lambda *_: None)
    assert len(res["history"]) == 8
    # 27 validation photos: chance R@1 is 0.04
    assert res["final"]["text->image R@1"] > 0.4, res["final"]
    assert res["final"]["image->text R@1"] > 0.4, res["final"]
    assert res["final"]["text->image R@10@16d"] > 0.7, res["final"]
    assert set(res["fire_scales"]) == {"fire@1", "fire@2"}
    load_embedder(tmp_path / "out")


def test_info_nce_masks_same_title_negatives():
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ok = torch.ones(4, dtype=torch.bool)
    b = a.clone()
    b[1] = a[0]  # items 0 and 1 look identical
    none = torch.zeros(4, 4, dtype=torch.bool)
    same = none.clone()
    same[0, 1] = same[1, 0] = True
    assert info_nce(a, b, same, ok, ok, 20.0) < info_nce(a, b, none, ok, ok, 20.0)


def test_batches_are_grouped_by_type():
    rows = np.arange(64)
    types = rows % 4
    cfg = TrainConfig(batch_size=16, group_size=4)
    batches = make_batches(rows, types, cfg, np.random.default_rng(0))
    assert len(batches) == 4 and sorted(np.concatenate(batches).tolist()) == rows.tolist()
    for b in batches:
        for g in range(0, 16, 4):
            assert len(set(types[b[g : g + 4]])) == 1


@pytest.mark.parametrize("kw", [{"batch_size": 30, "group_size": 8}, {"temperature": 0.0}, {"epochs": 0}])
def test_train_config_validates(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sdk.train.features"):
        Features(tmp_path)

"""Training on a synthetic feature cache: the recipe must learn a real cross-modal alignment."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdk.train.feature_cache as fc  # noqa: E402
import sdk.train.modality_gap as mg  # noqa: E402
import sdk.train.prompts as pr  # noqa: E402
from sdk.train.feature_cache import Features  # noqa: E402
from sdk.train.fusion_model import EmbedderConfig, load_embedder  # noqa: E402
from sdk.train.losses import info_nce  # noqa: E402
from sdk.train.train_embedder import TrainConfig, make_batches, train  # noqa: E402

TINY = dict(d_model=32, n_heads=4, image_dim=24, shallow_dim=8, text_dim=16, n_image_tokens=9,
            n_image_layers=2, fire_hidden=16, n_fusion_layers=1, out_dim=32, matryoshka_dims=(16, 32), dropout=0.0)


def write_cache(folder, n=300, seed=0):
    """Image and text tokens are two different noisy linear views of one latent per product."""
    folder.mkdir(parents=True, exist_ok=True)
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


@pytest.mark.parametrize("kw", [{"batch_size": 30, "group_size": 8}, {"temperature": 0.0}, {"epochs": 0},
                                {"prompt_weight": -0.5}])
def test_train_config_validates(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sdk.train.features"):
        Features(tmp_path)


def write_traces(cache, folder, seed=1, title_noise=3.0):
    """Traces that carry the product's latent cleanly while its title is drowned in noise, so an
    embedder that uses the trace modality must retrieve better with it."""
    import json as _json

    rng = np.random.default_rng(seed)
    f = Features(cache)
    n = len(f)
    z = np.load(cache / "z.npy")
    D = rng.normal(size=(6, 16))
    title = np.load(cache / "title_tok.npy").astype(np.float32)
    np.save(cache / "title_tok.npy", (title + title_noise * rng.normal(size=title.shape)).astype(np.float16))
    folder.mkdir(exist_ok=True)
    for view in ("photo+title", "title", "photo"):
        tok = (z @ D)[:, None, :] + 0.3 * rng.normal(size=(n, 6, 16))
        np.save(folder / f"{view}_tok.npy", tok.astype(np.float16))
        np.save(folder / f"{view}_mask.npy", np.ones((n, 6), np.uint8))
        with (folder / f"{view}.jsonl").open("w") as out:
            for i in f.ids:
                out.write(_json.dumps({"id": int(i), "trace": "t", "tokens": 6}) + "\n")
    return folder


def test_training_with_traces_uses_the_trace_modality(tmp_path):
    cache = write_cache(tmp_path)
    rng = np.random.default_rng(123)
    np.save(cache / "z.npy", rng.normal(size=(300, 6)))  # not the titles' latent: only traces carry this one
    # retrieval target: products' traces and photos must agree, so give the photos the same latent
    z = np.load(cache / "z.npy")
    deep = (z @ rng.normal(size=(6, 24)))[:, None, :] + 0.3 * rng.normal(size=(300, 9, 24))
    has = np.load(cache / "has_image.npy")
    deep[~has] = 0
    np.save(cache / "img_deep.npy", deep.astype(np.float16))
    val_rows = np.load(cache / "val_flip_rows.npy")
    np.save(cache / "img_deep_flip.npy", (deep[val_rows] + 0.05).astype(np.float16))
    traces = write_traces(cache, tmp_path / "traces")
    f = Features(cache)
    f.load_traces(traces)
    cfg = TrainConfig(epochs=6, batch_size=32, group_size=4, lr=3e-3, warmup_steps=5)
    res = train(EmbedderConfig(**TINY), cfg, f, None, tmp_path / "out", log=lambda *_: None)
    final = res["final"]
    assert res["trace_trained"] is True
    # the title says nothing about the photo's latent; the trace does
    assert final["trace text->image R@1"] > final["text->image R@1"] + 0.2, final
    assert final["trace text->image R@1"] > 0.4, final
    saved = json.loads((tmp_path / "out" / "embedder.json").read_text())
    assert saved["metrics"]["trace_trained"] is True


def test_traces_must_match_the_feature_rows(tmp_path):
    cache = write_cache(tmp_path, n=40)
    np.save(cache / "z.npy", np.zeros((40, 6)))
    traces = write_traces(cache, tmp_path / "traces")
    lines = (traces / "title.jsonl").read_text().splitlines()
    (traces / "title.jsonl").write_text("\n".join(lines[::-1]) + "\n")
    with pytest.raises(ValueError, match="do not match"):
        Features(cache).load_traces(traces)


def add_views(cache, k=2, seed=2):
    """Renditions (the photo's tokens, noisier) and two field captions (the text latent, other
    noise) in the layout `sdk.train.features --renditions K` writes."""
    rng = np.random.default_rng(seed)
    deep = np.load(cache / "img_deep.npy").astype(np.float32)
    shallow = np.load(cache / "img_shallow.npy")
    deep_aug = deep[:, None] + 0.5 * rng.normal(size=(len(deep), k, *deep.shape[1:]))
    np.save(cache / "img_deep_aug.npy", deep_aug.astype(np.float16))
    np.save(cache / "img_shallow_aug.npy", np.repeat(shallow[:, None], k, 1))
    title = np.load(cache / "title_tok.npy").astype(np.float32)
    cap = title[:, None, :4] + 0.3 * rng.normal(size=(len(title), 2, 4, title.shape[-1]))
    np.save(cache / "caption_tok.npy", cap.astype(np.float16))
    np.save(cache / "caption_mask.npy", np.ones((len(title), 2, 4), np.uint8))
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "renditions": k}))
    return cache


def write_catalog_for(cache, folder):
    """items.jsonl for the cache's ids: titles, article types and master categories."""
    ids = json.loads((cache / "meta.json").read_text())["ids"]
    kinds = ["Tshirts", "Shoes", "Watches"]
    masters = {"Tshirts": "Apparel", "Shoes": "Footwear", "Watches": "Accessories"}
    with (folder / "items.jsonl").open("w") as out:
        for i in ids:
            at = kinds[i % 3]
            out.write(json.dumps({"id": i, "title": f"product {i}", "article_type": at, "master_category": masters[at],
                                  "gender": "Men", "base_colour": ["Red", "Blue"][i % 2]}) + "\n")
    return folder


VIEWS = dict(rendition_prob=0.5, image_instance=1.0, caption_weight=0.5, tower_relational=0.5, text_relational=0.5,
             mm_relational=0.5, category_weight=0.5, colour_weight=0.5, photo_colour_weight=0.5)


def test_the_photo_colour_term_reads_only_photo_vectors(tmp_path, monkeypatch):
    import sdk.train.train_step as step

    cache = add_views(write_cache(tmp_path / "cache"))
    catalog = write_catalog_for(cache, tmp_path)
    calls = []  # the vectors each supervised term reads, in order
    real = step.category_term
    monkeypatch.setattr(step, "category_term", lambda e, *a: calls.append(e.data_ptr()) or real(e, *a))
    cfg = TrainConfig(epochs=1, batch_size=32, group_size=4, category_weight=0.5, photo_colour_weight=0.5)
    train(EmbedderConfig(**TINY), cfg, Features(cache), catalog, None, log=lambda *_: None)
    # each step: article types over the photo and the photo + title vectors, then colours over the photo ones
    steps = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert steps and len(calls) == 3 * len(steps)
    assert all(photo != mm and colour == photo for photo, mm, colour in steps)


def test_training_with_renditions_captions_and_tower_relations(tmp_path):
    cache = add_views(write_cache(tmp_path / "cache"))
    catalog = write_catalog_for(cache, tmp_path)
    f = Features(cache)
    assert f.renditions == 2
    cfg = TrainConfig(epochs=6, batch_size=32, group_size=4, lr=3e-3, warmup_steps=5, **VIEWS)
    res = train(EmbedderConfig(**TINY), cfg, f, catalog, None, log=lambda *_: None)
    assert res["final"]["text->image R@1"] > 0.4, res["final"]
    assert all(np.isfinite(h["loss"]) for h in res["history"])


def test_title_stats_standardise_the_pooled_title_states(tmp_path):
    from sdk.train.feature_cache import standardized, title_stats

    f = Features(write_cache(tmp_path / "cache"))
    rows = np.arange(0, len(f), 2)
    tok, mask = f.title[rows].float().numpy(), f.title_mask[rows].float().numpy()
    pooled = (tok * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    mean, std = title_stats(f, rows, chunk=7)
    np.testing.assert_allclose(mean.numpy(), pooled.mean(0), atol=1e-5)
    np.testing.assert_allclose(std.numpy(), pooled.std(0, ddof=1) + 1e-6, rtol=1e-4)
    z = standardized(torch.from_numpy(pooled), (mean, std)).numpy()
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_category_term_gathers_rows_of_one_label():
    from sdk.train.losses import category_term

    labels = np.array([0, 0, 1, 1, 2])
    valid = torch.ones(5, dtype=torch.bool)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    grouped = torch.stack([a, a, b, b, (a + b) / 2 ** 0.5])
    mixed = torch.stack([a, b, a, b, (a + b) / 2 ** 0.5])
    assert category_term(grouped, labels, valid, 10.0) < category_term(mixed, labels, valid, 10.0) - 5
    # label 2 has one row: no positive, no part; an invalid row is neither anchor nor candidate
    only = category_term(grouped, labels, torch.tensor([True, True, False, False, True]), 10.0)
    expected = -np.log(np.exp(10.0) / (np.exp(10.0) + np.exp(10.0 / 2 ** 0.5)))  # rows 0, 1 against 0/1 and 4
    assert torch.isclose(only, torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert category_term(grouped, np.arange(5), valid, 10.0) == 0.0


def test_views_need_their_cache_and_catalog(tmp_path):
    f = Features(write_cache(tmp_path / "cache"))
    with pytest.raises(ValueError, match="--renditions"):
        train(EmbedderConfig(**TINY), TrainConfig(batch_size=32, group_size=4, rendition_prob=0.5), f, None, None)
    cache = add_views(tmp_path / "cache")
    with pytest.raises(ValueError, match="caption_weight needs the catalog"):
        train(EmbedderConfig(**TINY), TrainConfig(batch_size=32, group_size=4, caption_weight=0.5), Features(cache), None,
              None)
    with pytest.raises(ValueError, match="rendition_prob"):
        TrainConfig(rendition_prob=1.5)


def test_holdout_master_category_is_never_trained_on(tmp_path, monkeypatch):
    cache = write_cache(tmp_path / "cache")
    catalog = write_catalog_for(cache, tmp_path)
    seen = []
    import sdk.train.train_embedder as te

    real = te.make_batches
    monkeypatch.setattr(te, "make_batches", lambda rows, *a: seen.append(rows) or real(rows, *a))
    cfg = TrainConfig(epochs=1, batch_size=32, group_size=4, holdout_master_category="Footwear")
    train(EmbedderConfig(**TINY), cfg, Features(cache), catalog, None, log=lambda *_: None)
    ids = np.asarray(json.loads((cache / "meta.json").read_text())["ids"])
    assert seen and not any(ids[r] % 3 == 1 for r in seen[0]) and len(seen[0]) > 100
    with pytest.raises(ValueError, match="no product is in master category 'Toys'"):
        train(EmbedderConfig(**TINY), TrainConfig(batch_size=32, group_size=4, holdout_master_category="Toys"),
              Features(cache), catalog, None)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    cache = add_views(write_cache(tmp_path / "cache"))
    catalog = write_catalog_for(cache, tmp_path)
    cfg = TrainConfig(epochs=3, batch_size=32, group_size=4, lr=3e-3, warmup_steps=5, ema_decay=0.8, **VIEWS)
    whole = train(EmbedderConfig(**TINY), cfg, Features(cache), catalog, tmp_path / "whole", log=lambda *_: None)

    class Stop(Exception):
        pass

    def stop_at_second_epoch(msg):
        if '"epoch": 2' in msg:
            raise Stop

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        train(EmbedderConfig(**TINY), cfg, Features(cache), catalog, None, log=stop_at_second_epoch, checkpoint=ckpt)
    logs = []
    resumed = train(EmbedderConfig(**TINY), cfg, Features(cache), catalog, tmp_path / "resumed", log=logs.append,
                    checkpoint=ckpt)
    assert any("resumed" in x and "after epoch 1" in x for x in logs)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    a, b = load_embedder(tmp_path / "whole"), load_embedder(tmp_path / "resumed")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="another configuration"):
        train(EmbedderConfig(**TINY), TrainConfig(**{**cfg.__dict__, "lr": 1e-3}), Features(cache), catalog, None,
              checkpoint=ckpt)
    # a checkpoint written before a TrainConfig field existed resumes: the field takes its default
    state = torch.load(ckpt, weights_only=False)
    del state["train_config"]["cross_modal_weight"]
    torch.save(state, ckpt)
    logs.clear()
    train(EmbedderConfig(**TINY), cfg, Features(cache), catalog, None, log=logs.append, checkpoint=ckpt)
    assert any("resumed" in x and "after epoch 3" in x for x in logs)


def test_the_weight_average_is_what_is_validated_and_saved(tmp_path, monkeypatch):
    import sdk.train.train_embedder as te

    cache = write_cache(tmp_path / "cache")
    models, steps = [], []  # the model trained; its weights after each optimizer step
    real_build, real_step = te.build_embedder, torch.optim.AdamW.step
    monkeypatch.setattr(te, "build_embedder", lambda c: models.append(real_build(c)) or models[-1])

    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        steps.append({n: p.detach().clone() for n, p in models[0].named_parameters()})
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = TrainConfig(epochs=2, batch_size=32, group_size=4, lr=3e-3, warmup_steps=2, ema_decay=0.7)
    res = train(EmbedderConfig(**TINY), cfg, Features(cache), None, tmp_path / "out", log=lambda *_: None)
    saved = dict(load_embedder(tmp_path / "out").named_parameters())
    assert len(steps) > 3 and steps[0].keys() == saved.keys()
    # the exponential average of the steps' weights (the first step's weights start it) ...
    avg = steps[0]
    for w in steps[1:]:
        avg = {n: 0.7 * a + 0.3 * w[n] for n, a in avg.items()}
    for n, a in avg.items():
        torch.testing.assert_close(saved[n], a, rtol=1e-4, atol=1e-5, msg=n)
    # ... not the last step's weights
    assert max((saved[n] - w).abs().max().item() for n, w in steps[-1].items()) > 1e-4
    assert res["train_config"]["ema_decay"] == 0.7
    with pytest.raises(ValueError, match="ema_decay must be in"):
        te.TrainConfig(ema_decay=1.0)


def test_every_view_flag_reaches_the_train_config(tmp_path, monkeypatch):
    import sdk.train.train_embedder as te

    cache = write_cache(tmp_path / "cache")
    seen = {}
    monkeypatch.setattr(te, "train", lambda model_cfg, cfg, *a, **kw: seen.setdefault("cfg", cfg) and {"final": {}})
    special = {"skip_init": "probe", "prompt_fields": "brand,gender", "center_modalities": True}
    flags = {name: special.get(name, 0.25 + i / 100) for i, name in enumerate(te.VIEW_FLAGS)}
    argv = ["--features", str(cache)] + [x for n, v in flags.items()
                                         for x in ((f"--{n.replace('_', '-')}",) if v is True
                                                   else (f"--{n.replace('_', '-')}", str(v)))]
    te.main(argv)
    assert {n: getattr(seen["cfg"], n) for n in flags} == flags
    with pytest.raises(SystemExit):
        te.main(["--features", str(cache), "--category-temperature", "2"])
    # the title's weight in photo + title vectors is a new model's config
    models = []
    monkeypatch.setattr(te, "train", lambda model_cfg, cfg, *a, **kw: models.append(model_cfg) or {"final": {}})
    te.main(["--features", str(cache), "--skip-path", "--title-weight-with-photo", "3"])
    te.main(["--features", str(cache), "--skip-path"])
    assert [m.title_weight_with_photo for m in models] == [3.0, 1.0] and models[0].skip_path
    with pytest.raises(SystemExit):  # it weighs the skip path's title term: none without one
        te.main(["--features", str(cache), "--title-weight-with-photo", "3"])
    te.main(["--features", str(cache), "--modality-blend", "1.5"])
    assert models[-1].modality_blend == 1.5
    te.main(["--features", str(cache), "--modality-blend", "0.5", "--title-blend", "2"])
    assert models[-1].blend_weights() == (0.5, 2.0)
    with pytest.raises(SystemExit):
        te.main(["--features", str(cache), "--modality-blend", "-1"])


def _fake_prompt_states(monkeypatch, dim=16):
    """Prompts through a stand-in text tower: each word a fixed random state (no MiniLM in tests)."""
    import sdk.train.prompts as prompts_module

    seen = []

    def states(texts):
        seen.extend(texts)
        L = max(len(t.split()) for t in texts)
        out, mask = torch.zeros(len(texts), L, dim), torch.zeros(len(texts), L)
        for i, t in enumerate(texts):
            for j, w in enumerate(t.split()):
                out[i, j] = torch.from_numpy(np.random.default_rng(abs(hash(w)) % 2**32).normal(size=dim)).float()
                mask[i, j] = 1.0
        return out, mask

    monkeypatch.setattr(prompts_module, "prompt_states", states)
    return seen


def test_field_prompts_take_the_training_products_classes(tmp_path, monkeypatch):

    cache = write_cache(tmp_path / "cache")
    catalog = write_catalog_for(cache, tmp_path)
    seen = _fake_prompt_states(monkeypatch)
    f = Features(cache)
    rows = np.arange(len(f))
    prompts = {p.field: p for p in pr.field_prompts(f, catalog, rows)}
    # every product is "Men": one class is no choice, so gender is not prompted
    assert set(prompts) == {"article_type", "base_colour"}
    assert prompts["article_type"].classes == ["Shoes", "Tshirts", "Watches"]
    assert prompts["base_colour"].tokens.shape[0] == 2 * len(pr.PROMPT_FIELDS["base_colour"])
    assert "red coloured" in seen and "a shoes item" in seen
    ids = json.loads((cache / "meta.json").read_text())["ids"]
    assert [prompts["base_colour"].classes[k] for k in prompts["base_colour"].label[:4]] == \
        [["Red", "Blue"][i % 2] for i in ids[:4]]
    # a class the training rows lack is not prompted, and its rows carry no label
    no_shoes = rows[np.array([i % 3 != 1 for i in ids])]
    p = {p.field: p for p in pr.field_prompts(f, catalog, no_shoes)}["article_type"]
    assert p.classes == ["Tshirts", "Watches"] and (p.label[[i % 3 == 1 for i in ids]] == -1).all()
    with pytest.raises(ValueError, match="prompt_weight needs the catalog"):
        pr.field_prompts(f, None, rows)
    with pytest.raises(ValueError, match="no field of \\['brand'\\] has two classes"):
        pr.field_prompts(f, catalog, rows, ["brand"])  # this catalog names no brand
    items = [json.loads(x) for x in (catalog / "items.jsonl").read_text().splitlines()]
    (catalog / "items.jsonl").write_text("".join(json.dumps({**r, "brand": ["Nike", "Puma"][r["id"] % 2]}) + "\n"
                                                 for r in items))
    p = pr.field_prompts(f, catalog, rows, ["brand", "gender"])
    assert [x.field for x in p] == ["brand"] and p[0].classes == ["Nike", "Puma"] and "by nike" in seen


def test_prompt_term_rewards_photos_near_their_class_prompt(monkeypatch):
    from sdk.train.fusion_model import build_embedder

    torch.manual_seed(0)
    model = build_embedder(EmbedderConfig(**TINY)).eval()
    _fake_prompt_states(monkeypatch)
    tok, mask = pr.prompt_states(["a tee item", "tee for sale", "a shoe item", "shoe for sale"])
    p = pr.FieldPrompts("article_type", tok, mask, np.array([0, 1, 0, 1]), ["tee", "shoe"])
    with torch.no_grad():
        e = model(None, None, tok, mask, torch.zeros(4, 1, 16), torch.zeros(4, 1), torch.tensor([[0.0, 1.0, 0.0]] * 4),
                  image_tokens=torch.zeros(4, 9, 32))
    centers = torch.nn.functional.normalize(e.reshape(2, 2, -1).mean(1), dim=-1)
    rows, has = np.arange(4), torch.ones(4, dtype=torch.bool)
    right = pr.prompt_term(model, [p], centers[[0, 1, 0, 1]], rows, has, 20.0)
    wrong = pr.prompt_term(model, [p], centers[[1, 0, 1, 0]], rows, has, 20.0)
    assert right < wrong
    # rows without a photo or a prompted class take no part
    assert pr.prompt_term(model, [p], centers[[1, 0, 1, 0]], rows, torch.zeros(4, dtype=torch.bool), 20.0) == 0.0


def test_training_with_the_skip_path_and_prompts(tmp_path, monkeypatch):
    from sdk.train.feature_cache import pooled_stats

    cache = add_views(write_cache(tmp_path / "cache"))
    catalog = write_catalog_for(cache, tmp_path)
    _fake_prompt_states(monkeypatch)
    f = Features(cache)
    cfg = TrainConfig(epochs=6, batch_size=32, group_size=4, lr=3e-3, warmup_steps=5, prompt_weight=0.5, **VIEWS)
    res = train(EmbedderConfig(**TINY, skip_path=True), cfg, f, catalog, tmp_path / "out", log=lambda *_: None)
    assert res["final"]["text->image R@1"] > 0.4, res["final"]
    model = load_embedder(tmp_path / "out")
    assert model.cfg.skip_path
    mean, std = pooled_stats(f, np.flatnonzero(~f.is_val))
    torch.testing.assert_close(model.skip_image.mean, mean)
    torch.testing.assert_close(model.skip_image.inv_std, 1.0 / std)
    assert model.skip_image.proj.weight.abs().max() > 1e-3 and model.skip_text.proj.weight.abs().max() > 1e-3


def test_training_a_blended_model_trains_the_blend_it_embeds_with(tmp_path, monkeypatch):
    """With modality_blend the training step reuses its photo-only and title-only views as the
    blend's parts; the saved model embeds photo + title items blended, and still learns."""
    import sdk.train.fusion_model as fm

    cache = add_views(write_cache(tmp_path / "cache"))
    catalog = write_catalog_for(cache, tmp_path)
    f = Features(cache)
    calls = {"parts": 0}
    forward = fm.FusionEmbedder.forward

    def counting(self, *a, parts=None, **kw):
        calls["parts"] += parts is not None
        return forward(self, *a, parts=parts, **kw)

    monkeypatch.setattr(fm.FusionEmbedder, "forward", counting)
    cfg = TrainConfig(epochs=6, batch_size=32, group_size=4, lr=3e-3, warmup_steps=5, **VIEWS)
    res = train(EmbedderConfig(**TINY, skip_path=True, modality_blend=1.0), cfg, f, catalog, tmp_path / "out",
                log=lambda *_: None)
    assert calls["parts"] > 0
    assert res["final"]["text->image R@1"] > 0.4, res["final"]
    assert load_embedder(tmp_path / "out").cfg.modality_blend == 1.0


def test_a_probe_initialised_skip_path_starts_as_the_probe(tmp_path):
    from sdk.train.fusion_model import build_embedder

    cache = write_cache(tmp_path / "cache")
    f = Features(cache)
    torch.manual_seed(0)
    model = build_embedder(EmbedderConfig(**TINY, skip_path=True)).eval()
    rows = np.flatnonzero(~f.is_val)
    keys = fc.title_keys(f, None)
    report = mg.init_skip_from_probe(model, f, None, rows, keys, log=lambda *_: None)
    assert report["epochs"] >= 1
    val = np.flatnonzero(f.is_val & f.has_image.numpy().astype(bool))
    with torch.no_grad():
        img = model(*fc.batch_inputs(f, val, image=True, text=None))
        txt = model(*fc.batch_inputs(f, val, image=False, text="title"))
        # the head's projection is zero: each vector is its skip term alone, normalised
        inputs = fc.batch_inputs(f, val, image=True, text=None)
        want = torch.nn.functional.normalize(model.skip(inputs[0], None, inputs[2], inputs[3], inputs[6]), dim=-1)
    torch.testing.assert_close(img, want)
    assert (txt @ img.T).argmax(1).eq(torch.arange(len(val))).float().mean() > 0.4  # the probe already retrieves
    mean_norm = model.skip_image(f.deep[torch.as_tensor(rows)].float().mean(1)).norm(dim=-1).mean()
    assert abs(mean_norm.item() - mg.SKIP_INIT_NORM) < 0.2 * mg.SKIP_INIT_NORM  # (mean over photos and blanks)
    with pytest.raises(ValueError, match="skip_init must be"):
        TrainConfig(skip_init="random")
    with pytest.raises(ValueError, match="skip_lr_scale must be"):
        TrainConfig(skip_lr_scale=-0.1)
    with pytest.raises(ValueError, match="prompt_fields: \\['size'\\]"):
        TrainConfig(prompt_fields="gender,size")
    with pytest.raises(ValueError, match="needs a new model with a skip path"):
        train(EmbedderConfig(**TINY), TrainConfig(batch_size=32, group_size=4, skip_init="probe"), f, None, None)


def test_a_frozen_probe_skip_path_keeps_the_probe_and_trains_the_fusion(tmp_path, monkeypatch):
    import sdk.train.train_embedder as te

    cache = write_cache(tmp_path / "cache")
    f = Features(cache)
    starts = {}
    real = te.init_skip_from_probe

    def init(model, *a, **kw):
        report = real(model, *a, **kw)
        starts.update({k: v.clone() for k, v in model.state_dict().items() if k.startswith(("skip_", "head."))})
        return report

    monkeypatch.setattr(te, "init_skip_from_probe", init)
    cfg = TrainConfig(epochs=2, batch_size=32, group_size=4, lr=3e-3, warmup_steps=2, skip_init="probe",
                      skip_lr_scale=0.0)
    train(EmbedderConfig(**TINY, skip_path=True), cfg, f, None, tmp_path / "out", log=lambda *_: None)
    model = load_embedder(tmp_path / "out")
    after = model.state_dict()
    for k, v in starts.items():
        if k.startswith("skip_"):
            torch.testing.assert_close(after[k], v, msg=f"{k} moved")
    assert (after["head.1.weight"] - starts["head.1.weight"]).abs().max() > 1e-4  # the residual learns
    groups = te.param_groups(list(model.named_parameters()), TrainConfig(skip_lr_scale=0.5, lr=1e-3))
    skip_ids = {id(p) for n, p in model.named_parameters() if n.startswith("skip_")}
    assert {g["lr"] for g in groups if any(id(p) in skip_ids for p in g["params"])} == {5e-4}


def _modality_means(model, f, rows):

    with torch.no_grad():
        p = fc.embed_rows(model, f, rows, image=True, text=None)
        t = fc.embed_rows(model, f, rows, image=False, text="title")
    return p.mean(0).norm().item(), t.mean(0).norm().item()


def test_centering_closes_the_modality_gap_through_the_skip_biases(tmp_path):
    from sdk.train.fusion_model import build_embedder

    f = Features(write_cache(tmp_path / "cache"))
    torch.manual_seed(0)
    model = build_embedder(EmbedderConfig(**TINY, skip_path=True)).eval()
    with torch.no_grad():  # a gap: every photo-only output leans one way, every title-only output another
        model.skip_image.proj.bias.copy_(torch.linspace(-3.0, 3.0, 32))
        model.skip_text.proj.bias.copy_(torch.linspace(3.0, -1.0, 32).roll(5))
    rows = np.flatnonzero(~f.is_val)
    before = _modality_means(model, f, rows)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    record = mg.center_modalities(model, f, rows, log=lambda *_: None)
    after = _modality_means(model, f, rows)
    assert min(before) > 0.5 and max(after) < 0.35 * min(before), (before, after)
    assert record["photo"]["mean_vector_norm"] == pytest.approx(before[0], abs=0.05)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])}
    assert changed == {"skip_image.proj.bias", "skip_text.proj.bias"}  # what an engine's skip maps carry
    with pytest.raises(ValueError, match="needs a skip-path model"):
        mg.center_modalities(build_embedder(EmbedderConfig(**TINY)), f, rows)


def test_center_only_writes_a_centred_copy_and_training_can_end_centred(tmp_path, capsys):
    import sdk.train.train_embedder as te

    cache = write_cache(tmp_path / "cache")
    f = Features(cache)
    cfg = TrainConfig(epochs=1, batch_size=32, group_size=4, warmup_steps=2, center_modalities=True)
    res = train(EmbedderConfig(**TINY, skip_path=True), cfg, f, None, tmp_path / "a", log=lambda *_: None)
    assert set(res["centering"]) == {"rows", "photo", "title"} and res["train_config"]["center_modalities"]
    te.main(["--features", str(cache), "--init", str(tmp_path / "a"), "--center-only", "--out", str(tmp_path / "b")])
    meta = json.loads((tmp_path / "b" / "embedder.json").read_text())["metrics"]
    assert meta["centered_from"] == str(tmp_path / "a") and meta["centering"]["photo"]["offset_norm"] >= 0
    # centring a centred model moves it little more
    assert meta["centering"]["photo"]["mean_vector_norm"] < 0.35
    with pytest.raises(SystemExit):
        te.main(["--features", str(cache), "--center-only"])
    with pytest.raises(ValueError, match="needs a skip-path model"):  # before any training
        train(EmbedderConfig(**TINY), cfg, f, None, None)

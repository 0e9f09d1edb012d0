"""The reference embedder's architecture, on tiny configs built in code."""

import json

import pytest

torch = pytest.importorskip("torch")

from sdk.train.fusion_model import (  # noqa: E402
    IMAGE,
    TEXT,
    EmbedderConfig,
    FusionEmbedder,
    LinearEmbedder,
    build_embedder,
    copy_half,
    embedder_sha256s,
    load_embedder,
    masked_mean,
    matryoshka,
    save_embedder,
)

TINY = dict(d_model=32, n_heads=4, image_dim=24, shallow_dim=8, text_dim=16, n_image_tokens=9,
            n_image_layers=2, fire_hidden=16, n_fusion_layers=2, out_dim=32, matryoshka_dims=(8, 16, 32), dropout=0.0)


def inputs(B=5, T=6, S=3, seed=0, present=(1, 1, 0)):
    g = torch.Generator().manual_seed(seed)
    deep = torch.randn(B, 9, 24, generator=g)
    shallow = torch.randn(B, 9, 8, generator=g)
    text = torch.randn(B, T, 16, generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0  # a padded item
    trace = torch.randn(B, S, 16, generator=g)
    tmask = torch.ones(B, S)
    pres = torch.tensor([list(present)] * B, dtype=torch.float32)
    return deep, shallow, text, mask, trace, tmask, pres


def trained_like(model):
    """Move zero-initialised parameters (FIRE scale, fusion out-proj) off zero, as training does."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.abs().sum():
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("variant", ["full", "no_fire", "linear"])
def test_output_is_normalised_and_shaped(variant):
    torch.manual_seed(0)
    model = trained_like(build_embedder(EmbedderConfig(variant=variant, **TINY)))
    for present in [(1, 1, 0), (1, 0, 0), (0, 1, 0), (1, 1, 1)]:
        e = model(*inputs(present=present))
        assert e.shape == (5, 32)
        assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
        assert torch.isfinite(e).all()


@pytest.mark.parametrize("variant", ["full", "linear"])
def test_absent_modality_has_no_influence(variant):
    torch.manual_seed(0)
    model = trained_like(build_embedder(EmbedderConfig(variant=variant, **TINY)))
    a = inputs(present=(0, 1, 0))
    b = list(a)
    b[0] = a[0] * 100 + 3  # different image tokens, but the image is marked absent
    b[1] = -a[1]
    b[4] = a[4] * 0 + 1  # different trace tokens, trace absent
    assert torch.allclose(model(*a), model(*b), atol=1e-5)


def test_padding_does_not_change_the_vector():
    torch.manual_seed(0)
    model = trained_like(FusionEmbedder(EmbedderConfig(**TINY)))
    deep, shallow, text, mask, trace, tmask, pres = inputs(B=1)
    short = model(deep, shallow, text[:, :3], mask[:, :3], trace, tmask, pres)
    padded_text = torch.cat([text[:, :3], torch.randn(1, 7, 16)], dim=1)
    padded_mask = torch.cat([mask[:, :3], torch.zeros(1, 7)], dim=1)
    long = model(deep, shallow, padded_text, padded_mask, trace, tmask, pres)
    assert torch.allclose(short, long, atol=1e-5)


def test_fire_is_identity_at_init_and_learns():
    torch.manual_seed(0)
    model = FusionEmbedder(EmbedderConfig(**TINY)).eval()
    a = inputs()
    b = list(a)
    b[1] = a[1] * 5  # other shallow tokens
    assert torch.allclose(model(*a), model(*b), atol=1e-6)
    with torch.no_grad():  # the zero-initialised fusion out-projections move first in training
        for layer in model.fusion:
            layer.out.weight.normal_(0, 0.5)
    model.train()
    model(*a).sum().backward()
    assert all(f.scale.grad is not None and f.scale.grad.abs() > 0 for f in model.image.fire.values())


def test_gate_weights_cover_present_modalities_only():
    torch.manual_seed(0)
    model = trained_like(FusionEmbedder(EmbedderConfig(**TINY)))
    model(*inputs(present=(1, 0, 0)))
    gate = model.last_gate
    assert torch.allclose(gate[:, IMAGE], torch.ones(5)) and gate[:, TEXT].max() == 0
    model(*inputs(present=(1, 1, 0)))
    assert torch.allclose(model.last_gate.sum(-1), torch.ones(5), atol=1e-6)


def test_matryoshka_prefix_is_normalised():
    e = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    m = matryoshka(e, 8)
    assert m.shape == (4, 8) and torch.allclose(m.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"variant": "big"}, "variant"),
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"fire_depths": (1,)}, ">= 2 depths"),
        ({"fire_depths": (1, 5)}, "outside"),
        ({"matryoshka_dims": (8, 16)}, "end at out_dim"),
        ({"matryoshka_dims": (16, 8, 32)}, "increasing"),
        ({"dropout": 1.0}, "dropout"),
        ({"title_weight_with_photo": 0.0}, "title_weight_with_photo"),
        ({"title_weight_with_photo": float("nan")}, "title_weight_with_photo"),
        ({"title_weight_with_photo": 2.0}, "needs skip_path"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        EmbedderConfig(**{**TINY, **kw})


def test_no_fire_variant_drops_fire():
    assert EmbedderConfig(variant="no_fire", **TINY).fire_depths == ()
    assert isinstance(build_embedder(EmbedderConfig(variant="linear", **TINY)), LinearEmbedder)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = trained_like(FusionEmbedder(EmbedderConfig(**TINY)))
    save_embedder(model, tmp_path, metrics={"R@10": 0.5})
    meta = json.loads((tmp_path / "embedder.json").read_text())
    assert meta["metrics"] == {"R@10": 0.5} and meta["config"]["d_model"] == 32
    again = load_embedder(tmp_path)
    x = inputs()
    assert torch.allclose(model(*x), again(*x))
    with pytest.raises(FileNotFoundError, match="embedder file not found"):
        load_embedder(tmp_path / "missing")


def test_fp16_copy_loads_into_the_fp32_model_and_keeps_naming_its_source(tmp_path):
    from safetensors import safe_open

    from sdk.paths import file_sha256

    torch.manual_seed(0)
    model = trained_like(FusionEmbedder(EmbedderConfig(**TINY)))
    save_embedder(model, tmp_path / "fp32", metrics={"R@10": 0.5})
    fp32_sha = file_sha256(tmp_path / "fp32" / "embedder.safetensors")
    copy_half(tmp_path / "fp32", tmp_path / "fp16")
    w = tmp_path / "fp16" / "embedder.safetensors"
    with safe_open(str(w), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    assert w.stat().st_size < 0.6 * (tmp_path / "fp32" / "embedder.safetensors").stat().st_size
    half = load_embedder(tmp_path / "fp16")
    assert all(p.dtype == torch.float32 for p in half.parameters())  # upcast on load: it computes in fp32
    x = inputs()
    assert torch.nn.functional.cosine_similarity(model(*x), half(*x)).min() > 0.999
    meta = json.loads((tmp_path / "fp16" / "embedder.json").read_text())
    assert meta["metrics"] == {"R@10": 0.5} and meta["stored_dtype"] == "float16"
    # the copy is named by its own hash and its FP32 source's (what the image completion was trained against)
    assert embedder_sha256s(tmp_path / "fp16") == (file_sha256(w), fp32_sha)
    assert embedder_sha256s(tmp_path / "fp32") == (fp32_sha,)
    # converted in place (DST = SRC), and converted again: the same bytes, still naming the first source
    copy_half(tmp_path / "fp32", tmp_path / "fp32")
    assert file_sha256(tmp_path / "fp32" / "embedder.safetensors") == file_sha256(w)
    copy_half(tmp_path / "fp16", tmp_path / "fp16")
    assert embedder_sha256s(tmp_path / "fp16") == (file_sha256(w), fp32_sha)
    # another file in the copy's place: its record no longer describes it, so only its own hash names it
    save_embedder(model, tmp_path / "other")
    (tmp_path / "other" / "embedder.safetensors").replace(w)
    assert embedder_sha256s(tmp_path / "fp16") == (file_sha256(w),)



def test_title_weight_with_photo_moves_only_photo_and_title_vectors(tmp_path):
    """The weight scales the title's skip term where a photo is present too: title-only and
    photo-only vectors stay as they were; `python -m sdk.train.fusion_model --title-weight-with-photo`
    sets it on a copy."""
    from sdk.train.fusion_model import main

    torch.manual_seed(0)
    model = trained_like(FusionEmbedder(EmbedderConfig(**TINY, skip_path=True)))
    with torch.no_grad():
        for p in (*model.skip_text.parameters(), *model.skip_image.parameters()):
            p.normal_(0, 0.5)
    save_embedder(model, tmp_path / "a")
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--title-weight-with-photo", "3"])
    main([str(tmp_path / "a"), str(tmp_path / "a16")])  # the same fp16 weights at weight 1
    base, heavy = load_embedder(tmp_path / "a16"), load_embedder(tmp_path / "b")
    assert heavy.cfg.title_weight_with_photo == 3.0 and base.cfg.title_weight_with_photo == 1.0
    x = list(inputs(B=3))
    x[6] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    with torch.no_grad():
        a, b = base.raw(*x), heavy.raw(*x)
        torch.testing.assert_close(a[:2], b[:2], rtol=1e-4, atol=1e-4)
        title_term = base.skip_text(masked_mean(x[2], x[3]))[2]
        torch.testing.assert_close(b[2] - a[2], 2.0 * title_term, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs skip_path"):  # refused before anything is written
        save_embedder(trained_like(FusionEmbedder(EmbedderConfig(**TINY))), tmp_path / "plain")
        main([str(tmp_path / "plain"), str(tmp_path / "c"), "--title-weight-with-photo", "2"])
    assert not (tmp_path / "c").exists()


def test_modality_blend_mixes_each_modalitys_own_vector_into_photo_and_title_vectors(tmp_path):
    """A blended model's photo + title vector is normalise(fused + beta * (photo-only + title-only));
    single-modality vectors do not change; `parts` given (as training does) gives the same vector;
    `python -m sdk.train.fusion_model --modality-blend` sets it on a copy; a bad value is refused."""
    from sdk.train.fusion_model import blend, main

    torch.manual_seed(0)
    save_embedder(trained_like(FusionEmbedder(EmbedderConfig(**TINY, skip_path=True))), tmp_path / "a")
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--modality-blend", "2"])
    main([str(tmp_path / "a"), str(tmp_path / "a16")])
    base, mixed = load_embedder(tmp_path / "a16"), load_embedder(tmp_path / "b")
    assert mixed.cfg.modality_blend == 2.0 and base.cfg.modality_blend == 0.0
    x = list(inputs(B=3))
    x[6] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    with torch.no_grad():
        a, b = base(*x), mixed(*x)
        torch.testing.assert_close(a[:2], b[:2])
        photo = base(*x[:6], torch.tensor([[1.0, 0.0, 0.0]] * 3))[2:]
        title = base(*x[:6], torch.tensor([[0.0, 1.0, 0.0]] * 3))[2:]
        want = torch.nn.functional.normalize(a[2:] + 2.0 * (photo + title), dim=-1)
        torch.testing.assert_close(b[2:], want, rtol=1e-5, atol=1e-5)
        assert (b[2:] - a[2:]).abs().max() > 1e-2  # it moved
        photo3 = base(*x[:6], torch.tensor([[1.0, 0.0, 0.0]] * 3))
        title3 = base(*x[:6], torch.tensor([[0.0, 1.0, 0.0]] * 3))
        torch.testing.assert_close(mixed(*x, parts=(photo3, title3)), b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(blend(a[2:], photo, title, 0.0), a[2:])
    for bad in ("-1", "nan"):
        with pytest.raises(ValueError, match="modality_blend must be"):
            main([str(tmp_path / "a"), str(tmp_path / "c"), "--modality-blend", bad])
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="linear"):
        EmbedderConfig(**{**TINY, "variant": "linear"}, modality_blend=1.0)
    from sdk.train.fusion_model import set_config

    with pytest.raises(ValueError, match=r"only \['title_weight_with_photo', 'modality_blend', 'title_blend'\] can be "
                                         r"set .*\['d_model'\]"):
        set_config(tmp_path / "b", d_model=64)  # a field that needs other weights is refused, the file kept
    assert load_embedder(tmp_path / "b").cfg.d_model == base.cfg.d_model
    # the title's own weight: normalise(fused + 0.5 * photo-only + 3 * title-only)
    main([str(tmp_path / "a"), str(tmp_path / "t"), "--modality-blend", "0.5", "--title-blend", "3"])
    split = load_embedder(tmp_path / "t")
    assert split.cfg.blend_weights() == (0.5, 3.0) and mixed.cfg.blend_weights() == (2.0, 2.0)
    with torch.no_grad():
        want = torch.nn.functional.normalize(a[2:] + 0.5 * photo + 3.0 * title, dim=-1)
        torch.testing.assert_close(split(*x)[2:], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="title_blend must be"):
        EmbedderConfig(**TINY, title_blend=-2.0)

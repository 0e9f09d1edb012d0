"""Distilled students (sdk.export.distill): cheaper towers, a fusion model trained against the teacher."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_training import TINY, write_cache  # noqa: E402

from sdk.export.distill import distill  # noqa: E402
from sdk.train.feature_cache import Features  # noqa: E402
from sdk.train.fusion_model import EmbedderConfig, FusionEmbedder, load_embedder  # noqa: E402
from sdk.train.losses import distill_terms  # noqa: E402
from sdk.train.student import init_from_teacher, student_config  # noqa: E402
from sdk.train.train_embedder import TrainConfig, train  # noqa: E402


def test_distill_terms_are_zero_for_the_teacher_and_grow_with_distortion():
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    ok = torch.ones(16, dtype=torch.bool)
    cos, rel = distill_terms(t, t, ok, 0.05)
    assert cos.abs() < 1e-6 and rel.abs() < 1e-5
    near = torch.nn.functional.normalize(t + 0.1 * torch.randn(16, 8), dim=-1)
    far = torch.nn.functional.normalize(t + 1.0 * torch.randn(16, 8), dim=-1)
    c_near, r_near = distill_terms(near, t, ok, 0.05)
    c_far, r_far = distill_terms(far, t, ok, 0.05)
    assert 0 < c_near < c_far and 0 < r_near < r_far
    # rows not valid take no part: the distorted rows masked out give the teacher's own zero
    mixed = torch.cat([t[:8], far[8:]])
    first = torch.arange(16) < 8
    cos, rel = distill_terms(mixed, t, first, 0.05)
    assert cos.abs() < 1e-6 and rel.abs() < 1e-5


def test_student_config_and_position_table_from_the_teacher():
    teacher_cfg = EmbedderConfig(**{**TINY, "n_image_tokens": 49})
    cfg = student_config(teacher_cfg, 160, 3)
    assert (cfg.image_size, cfg.text_layers, cfg.n_image_tokens) == (160, 3, 25)
    assert cfg.d_model == teacher_cfg.d_model and cfg.fire_depths == teacher_cfg.fire_depths
    with pytest.raises(ValueError, match="multiple of 32"):
        student_config(teacher_cfg, 150, 3)
    with pytest.raises(ValueError, match="text_layers"):
        student_config(teacher_cfg, 160, 0)
    two = EmbedderConfig(**{**TINY, "n_image_tokens": 49, "n_fusion_layers": 2})
    with pytest.raises(ValueError, match="fusion_layers must be an int in 1..2"):
        student_config(two, 160, 3, 3)
    assert student_config(two, 160, 3, 1).n_fusion_layers == 1 and student_config(two, 160, 3).n_fusion_layers == 2
    torch.manual_seed(0)
    teacher, student = FusionEmbedder(teacher_cfg), FusionEmbedder(cfg)
    how = init_from_teacher(student, teacher)
    pos = [k for k, v in how.items() if v.startswith("resized")]
    assert pos and all(how[k] == "copied" for k in how if k not in pos), how
    for k in pos:  # the 7x7 table's corners are the 5x5 table's corners (align_corners)
        t = teacher.state_dict()[k][0].reshape(7, 7, -1)
        s = student.state_dict()[k][0].reshape(5, 5, -1)
        for (a, b), (c, d) in (((0, 0), (0, 0)), ((0, 6), (0, 4)), ((6, 0), (4, 0)), ((6, 6), (4, 4))):
            assert torch.allclose(t[a, b], s[c, d], atol=1e-6)


def test_a_student_with_fewer_fusion_layers_gets_the_teachers_first_ones():
    teacher_cfg = EmbedderConfig(**{**TINY, "n_image_tokens": 49, "n_fusion_layers": 2})
    torch.manual_seed(0)
    teacher = FusionEmbedder(teacher_cfg)
    student = FusionEmbedder(student_config(teacher_cfg, 160, 3, 1))
    how = init_from_teacher(student, teacher)
    assert not [k for k, v in how.items() if v == "fresh"], how
    assert any(k.startswith("fusion.0.") for k in how) and not any(k.startswith("fusion.1.") for k in how)
    t, s = teacher.state_dict(), student.state_dict()
    assert all(torch.equal(t[k], s[k]) for k in s if k.startswith("fusion.0."))


def test_the_model_card_lists_every_run_of_a_chained_student():
    from sdk.export.distill import _distill_commands, model_card

    def run(size, fusion, epochs, init=None):
        return {"student": {"image_size": size, "text_layers": 3, "n_image_tokens": 25, "fusion_layers": fusion,
                            "params": 1e6},
                "train_config": {**TrainConfig(epochs=epochs).__dict__}, "seconds": 600.0,
                "continued_from": "runs/x" if init else None, "init_report": init}

    first = run(160, 2, 6)
    last = {**run(128, 1, 4, init=first), "teacher": {"weights": "sdk/train/weights", "image_size": 224, "text_layers": 6,
                                                      "fusion_layers": 2},
            "recall": {"text->image R@10": {"teacher": 0.85, "student": 0.83, "ratio": 0.976}},
            "before_training": {"text->image R@10": 0.8}, "cosine_to_teacher": {"mm": {"mean": 0.95, "min": 0.8}},
            "val_items": 816}
    cmds = _distill_commands(last)
    assert cmds.index("features_s160_l3 --out runs/student1") < cmds.index("--init runs/student1")
    assert "--image-size 128 --text-layers 3" in cmds and "--fusion-layers 1" in cmds
    assert cmds.count("--fusion-layers") == 1  # the first run kept the teacher's two
    card = model_card(last)
    assert "| 2 | 128 | 3 | 1 | 4 |" in card and "1 of the teacher's\n2 fusion layers" in card


def test_towers_must_match_the_fusion_models_image_tokens():
    from sdk.train.towers import load_towers

    with pytest.raises(ValueError, match="25 image tokens"):
        load_towers(EmbedderConfig(**{**TINY, "n_image_tokens": 49, "image_size": 160}))


def write_student_cache(teacher_cache: Path, folder: Path, seed: int = 5) -> Path:
    """The teacher cache seen through 'cheaper towers': 4 pooled image tokens instead of 9 and
    noisier text states (what fewer layers give)."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for name in ("img_deep", "img_shallow", "img_deep_flip", "img_shallow_flip"):
        x = np.load(teacher_cache / f"{name}.npy").astype(np.float32)
        g = x.reshape(len(x), 3, 3, -1)
        pooled = np.stack([g[:, :2, :2].mean((1, 2)), g[:, :2, 1:].mean((1, 2)), g[:, 1:, :2].mean((1, 2)),
                           g[:, 1:, 1:].mean((1, 2))], 1)
        np.save(folder / f"{name}.npy", pooled.astype(np.float16))
    for name in ("title_tok", "detail_tok"):
        x = np.load(teacher_cache / f"{name}.npy").astype(np.float32)
        np.save(folder / f"{name}.npy", (x + 0.3 * rng.normal(size=x.shape)).astype(np.float16))
    for name in ("has_image", "title_mask", "detail_mask", "val_flip_rows"):
        np.save(folder / f"{name}.npy", np.load(teacher_cache / f"{name}.npy"))
    meta = json.loads((teacher_cache / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "image_size": 64, "text_layers": 1}))
    return folder


def test_distilled_student_keeps_the_teachers_retrieval(tmp_path):
    t_cache = tmp_path / "teacher_cache"
    t_cache.mkdir()
    write_cache(t_cache)
    s_cache = write_student_cache(t_cache, tmp_path / "student_cache")
    cfg = TrainConfig(epochs=8, batch_size=32, group_size=4, lr=3e-3, warmup_steps=5)
    train(EmbedderConfig(**TINY), cfg, Features(t_cache), None, tmp_path / "teacher", log=lambda *_: None)
    dcfg = TrainConfig(epochs=6, batch_size=32, group_size=4, lr=2e-3, warmup_steps=5, contrastive_weight=0.5,
                       distill_cosine=1.0, distill_relational=1.0)
    report = distill(tmp_path / "teacher", t_cache, s_cache, None, tmp_path / "student", dcfg, log=lambda *_: None)
    student = load_embedder(tmp_path / "student")
    assert (student.cfg.image_size, student.cfg.text_layers, student.cfg.n_image_tokens) == (64, 1, 4)
    meta = json.loads((tmp_path / "student" / "embedder.json").read_text())
    assert meta["stored_dtype"] == "float16"
    r10 = report["recall"]["text->image R@10"]
    assert r10["teacher"] > 0.7 and r10["ratio"] > 0.85, report["recall"]
    cos = report["cosine_to_teacher"]
    assert set(cos) == {"mm", "mm_detail", "image", "text", "detail"}
    assert cos["mm"]["mean"] > 0.8 and cos["text"]["mean"] > 0.8, cos
    card = (tmp_path / "student" / "MODEL_CARD.md").read_text()
    assert "| text->image R@10 |" in card and "--image-size 64 --text-layers 1" in card


def test_distillation_needs_the_same_products(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_cache(a, n=300)
    write_cache(b, n=280)
    train(EmbedderConfig(**TINY), TrainConfig(epochs=1, batch_size=32, group_size=4), Features(a), None,
          tmp_path / "teacher", log=lambda *_: None)
    with pytest.raises(SystemExit, match="other products"):
        distill(tmp_path / "teacher", a, b, None, tmp_path / "student", TrainConfig(epochs=1, batch_size=32, group_size=4),
                log=lambda *_: None)


def test_a_small_photo_student_runs_through_the_runtime(tmp_path, tiny_engine):
    """A student reading 64-px photos (2x2 image tokens): export, package and embed torch-free;
    the runtime resizes photos to the manifest's size and matches PyTorch."""
    pytest.importorskip("onnxruntime")
    from PIL import Image
    from tiny_models import PooledImageTower, tiny_bert

    from sdk import Embedder
    from sdk.export.bundle import package_split_embedder
    from sdk.export.onnx_embedder import EmbedderGraph
    from sdk.export.onnx_split import SplitExportConfig, export_split_onnx
    from sdk.preprocess import ImagePreprocess, TextTokenizer, image_to_array

    torch.manual_seed(3)
    cfg = EmbedderConfig(d_model=32, n_heads=4, image_dim=1280, shallow_dim=152, text_dim=16, n_image_tokens=4,
                         n_image_layers=2, fire_hidden=16, n_fusion_layers=2, out_dim=32, matryoshka_dims=(16, 32),
                         dropout=0.0, image_size=64, text_layers=1)
    fusion = FusionEmbedder(cfg)
    with torch.no_grad():
        for p in fusion.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.5)
    graph = EmbedderGraph(PooledImageTower(), tiny_bert(), fusion.eval()).eval()
    paths = export_split_onnx(graph, SplitExportConfig(tmp_path / "split", image_size=64, num_threads=1,
                                                       check_batches=((2, 5, 3),)))
    pre = ImagePreprocess(size=64)
    engine = package_split_embedder(tmp_path / "student.engine", paths["image"].read_bytes(), paths["text"].read_bytes(),
                                    paths["head"].read_bytes(), tiny_engine.tokenizer.read_bytes(), dim=32,
                                    matryoshka_dims=(16, 32), image=pre)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)
    with Embedder(engine, threads=1) as e:
        assert e.manifest["preprocess"]["image"]["size"] == 64
        got = e.embed([photo, photo], ["red shoe", None])
    tok = TextTokenizer(tiny_engine.tokenizer, 32)
    ids, mask = tok(["red shoe", ""])
    mask[1] = 0
    with torch.no_grad():
        pix = torch.from_numpy(np.stack([image_to_array(Image.fromarray(photo), pre)] * 2))
        want = graph(pix, torch.from_numpy(ids), torch.from_numpy(mask), torch.zeros(2, 1, dtype=torch.long),
                     torch.zeros(2, 1, dtype=torch.long), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])).numpy()
    assert (got * want).sum(1).min() > 0.9999


def test_a_minilm_layer_matches_the_towers_layer_on_padded_text():
    """The fine-tunable layer loads a BERT layer's weights by name and gives its output."""
    from tiny_models import VOCAB, tiny_bert

    from sdk.train.tower_tails import MiniLMLayer

    torch.manual_seed(0)
    bert = tiny_bert()
    layer = MiniLMLayer(16, n_heads=2, d_ff=32).eval()
    layer.load_state_dict(bert.encoder.layer[0].state_dict())  # strict: every name matches
    ids = torch.randint(1, VOCAB, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = layer(bert.embeddings(input_ids=ids), mask)
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-5), (got[keep] - want[keep]).abs().max()


def test_fine_tuned_text_layers_are_configured_and_checked():
    cfg = EmbedderConfig(**{**TINY, "text_layers": 2, "text_tuned_layers": 1, "text_heads": 2, "text_ffn": 32})
    model = FusionEmbedder(cfg)
    assert len(model.text_tail) == 1 and not hasattr(FusionEmbedder(EmbedderConfig(**TINY)), "text_tail")
    with pytest.raises(ValueError, match="text_tuned_layers must be in 0..text_layers=2"):
        EmbedderConfig(**{**TINY, "text_layers": 2, "text_tuned_layers": 3})
    with pytest.raises(ValueError, match="split into text_heads"):
        EmbedderConfig(**{**TINY, "text_tuned_layers": 1, "text_heads": 5})
    with pytest.raises(ValueError, match="linear"):
        EmbedderConfig(**{**TINY, "variant": "linear", "text_tuned_layers": 1, "text_heads": 2})
    from sdk.export.onnx_split import head_state
    from sdk.train.towers import load_towers

    assert not [k for k in head_state(model) if k.startswith("text_tail.")]  # they live in the text graph
    with pytest.raises(ValueError, match="pass the trained model"):
        load_towers(dataclasses_replace(cfg, n_image_tokens=49))


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_the_fine_tuned_layers_learn_at_their_own_rate():
    from sdk.train.train_embedder import param_groups

    cfg = EmbedderConfig(**{**TINY, "text_layers": 2, "text_tuned_layers": 1, "text_heads": 2, "text_ffn": 32})
    model = FusionEmbedder(cfg)
    groups = param_groups(list(model.named_parameters()), TrainConfig(lr=1e-3, tower_lr_scale=0.1))
    tail = {id(p) for p in model.text_tail.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        mine = {id(p) in tail for p in g["params"]}
        assert len(mine) == 1, "a group mixes tail and fusion parameters"
        assert g["lr"] == pytest.approx(1e-4 if mine == {True} else 1e-3)
    # without a tail: the two groups of before
    assert len(param_groups(list(FusionEmbedder(EmbedderConfig(**TINY)).named_parameters()), TrainConfig())) == 2


def test_a_student_fine_tunes_its_last_text_layer(tmp_path):
    """The cache holds the states of the frozen layer below; the student runs (and trains) the
    layer above it from the tower's own weights, and ships it in its weights file."""
    from tiny_models import tiny_bert

    t_cache = tmp_path / "teacher_cache"
    t_cache.mkdir()
    write_cache(t_cache)
    s_cache = write_student_cache(t_cache, tmp_path / "student_cache")  # caches 1 text layer
    tiny = {**TINY, "text_heads": 2, "text_ffn": 32, "text_layers": 2}
    cfg = TrainConfig(epochs=6, batch_size=32, group_size=4, lr=3e-3, warmup_steps=5)
    train(EmbedderConfig(**tiny), cfg, Features(t_cache), None, tmp_path / "teacher", log=lambda *_: None)
    tower = tiny_bert()
    tower.encoder.layer.append(tiny_bert().encoder.layer[0])  # a second layer to fine-tune
    dcfg = TrainConfig(epochs=4, batch_size=32, group_size=4, lr=2e-3, warmup_steps=5, contrastive_weight=0.5,
                       distill_cosine=1.0, distill_relational=1.0, tower_lr_scale=0.5)
    report = distill(tmp_path / "teacher", t_cache, s_cache, None, tmp_path / "student", dcfg, log=lambda *_: None,
                     tune_text_layers=1, text_tower=tower)
    student = load_embedder(tmp_path / "student")
    assert (student.cfg.text_layers, student.cfg.text_tuned_layers) == (2, 1)
    assert report["student"]["text_tuned_layers"] == 1
    start, trained = tower.encoder.layer[1].state_dict(), student.text_tail[0].state_dict()
    assert set(start) == set(trained)
    assert any(not torch.allclose(start[k], trained[k].float(), atol=1e-3) for k in start), "the layer did not train"
    assert report["recall"]["text->image R@10"]["ratio"] > 0.8, report["recall"]
    f = Features(s_cache)
    with pytest.raises(ValueError, match="needs the states after 2"):
        Features(t_cache).tune_with(dataclasses_replace_model(student, 3))
    f.tune_with(student)
    assert f.text_model is student
    card = (tmp_path / "student" / "MODEL_CARD.md").read_text()
    assert "--image-size 64 --text-layers 1" in card and "--tune-text-layers 1 --tower-lr-scale 0.5" in card
    assert "| 1 | 64 | 2 (1 tuned) |" in card and "layer 2 fine-tuned" in card


def dataclasses_replace_model(model, text_layers):
    """A stand-in model whose config fine-tunes 1 layer on top of text_layers - 1 cached ones."""
    import types

    return types.SimpleNamespace(cfg=dataclasses_replace(model.cfg, text_layers=text_layers))


def _tail_cfg(**kw):
    return EmbedderConfig(**{**TINY, "image_dim": 1280, "n_image_tokens": 49, "image_tuned_blocks": 2, **kw})


def test_the_image_tail_gives_the_towers_deep_tokens_and_loads_into_the_tower(monkeypatch):
    """Fine-tuned image blocks: from the map entering them they give what the whole tower gives;
    `load_towers` puts their weights into the exported tower; BatchNorm keeps its statistics."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from tiny_models import efficientnet_tower, tiny_bert

    from sdk.train import towers
    from sdk.train.student import init_image_tail

    torch.manual_seed(0)
    tower = efficientnet_tower().eval()
    student = FusionEmbedder(_tail_cfg())
    how = {k: "fresh" for k in student.state_dict() if k.startswith("image_tail.")}
    assert init_image_tail(student, how, tower) and set(how.values()) == {"image tower"}
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        deep, _, mid = tower(x, mid_block=14)
        assert mid.shape == (2, 192, 7, 7)
        assert torch.allclose(student.tune_image(mid), deep, atol=1e-4)
    student.train()
    assert not any(m.training for m in student.image_tail.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():  # a trained tail (changed weights) is what the exported tower runs
        for p in student.image_tail.parameters():
            p.mul_(1.1)
    student.eval()
    monkeypatch.setattr(towers, "load_image_tower", lambda **kw: efficientnet_tower().eval())
    two = tiny_bert()
    two.encoder.layer.append(tiny_bert().encoder.layer[0])
    monkeypatch.setattr(towers, "load_text_tower", lambda **kw: two)
    with pytest.raises(ValueError, match="image blocks 2"):
        towers.load_towers(student.cfg)
    image, _ = towers.load_towers(student.cfg, student)
    with torch.no_grad():
        got = image(x)[0]
        want = student.tune_image(image(x, mid_block=14)[2])
    assert torch.allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="image_tuned_blocks must be in 0..5"):
        _tail_cfg(image_tuned_blocks=6)


def test_a_student_fine_tunes_its_last_image_blocks(tmp_path):
    """The student cache holds the map entering the last image block; the student trains that
    block from the tower's weights and ships it; its BatchNorm statistics stay the tower's."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from tiny_models import efficientnet_tower

    rng = np.random.default_rng(1)
    t_cache = tmp_path / "teacher_cache"
    t_cache.mkdir()
    write_cache(t_cache)
    lift = rng.normal(size=(24, 1280)).astype(np.float32) / 24 ** 0.5
    for name in ("img_deep", "img_deep_flip"):  # the teacher reads 1280-d deep tokens, like the real tower
        np.save(t_cache / f"{name}.npy", (np.load(t_cache / f"{name}.npy").astype(np.float32) @ lift).astype(np.float16))
    s_cache = write_student_cache(t_cache, tmp_path / "student_cache")  # 4 image tokens: a 2x2 map
    down = rng.normal(size=(1280, 192)).astype(np.float32) / 1280 ** 0.5
    for name, src in (("img_mid", "img_deep"), ("img_mid_flip", "img_deep_flip")):
        tokens = np.load(s_cache / f"{src}.npy").astype(np.float32) @ down  # (N, 4, 192)
        np.save(s_cache / f"{name}.npy", tokens.transpose(0, 2, 1).reshape(len(tokens), 192, 2, 2).astype(np.float16))
    meta = json.loads((s_cache / "meta.json").read_text())
    (s_cache / "meta.json").write_text(json.dumps({**meta, "image_mid_block": 15}))
    tiny = {**TINY, "image_dim": 1280}
    cfg = TrainConfig(epochs=4, batch_size=32, group_size=4, lr=3e-3, warmup_steps=5)
    train(EmbedderConfig(**tiny), cfg, Features(t_cache), None, tmp_path / "teacher", log=lambda *_: None)
    tower = efficientnet_tower().eval()
    dcfg = TrainConfig(epochs=2, batch_size=32, group_size=4, lr=2e-3, warmup_steps=5, contrastive_weight=0.5,
                       distill_cosine=1.0, distill_relational=1.0)
    with pytest.raises(SystemExit, match="--image-mid-blocks 2"):
        distill(tmp_path / "teacher", t_cache, s_cache, None, tmp_path / "bad", dcfg, log=lambda *_: None,
                tune_image_blocks=2, image_tower=tower)
    report = distill(tmp_path / "teacher", t_cache, s_cache, None, tmp_path / "student", dcfg, log=lambda *_: None,
                     tune_image_blocks=1, image_tower=tower)
    student = load_embedder(tmp_path / "student")
    assert student.cfg.image_tuned_blocks == 1 and report["student"]["image_tuned_blocks"] == 1
    start = {**{f"blocks.0.{k}": v for k, v in tower.net._blocks[15].state_dict().items()},
             **{f"conv_head.{k}": v for k, v in tower.net._conv_head.state_dict().items()},
             **{f"bn1.{k}": v for k, v in tower.net._bn1.state_dict().items()}}
    trained = student.image_tail.state_dict()
    assert set(start) == set(trained)
    stats = [k for k in start if "running_" in k]
    assert stats and all(torch.allclose(start[k], trained[k].float(), rtol=1e-2, atol=1e-3) for k in stats)
    assert any(not torch.allclose(start[k].float(), trained[k].float(), atol=1e-3) for k in start
               if k.endswith("weight")), "the blocks did not train"
    card = (tmp_path / "student" / "MODEL_CARD.md").read_text()
    assert "--image-mid-blocks 1" in card and "--tune-image-blocks 1" in card and "64 (1 block tuned)" in card


def test_a_start_with_tuned_layers_at_other_depths_does_not_lend_them():
    """Tail names number the tuned layers, not the tower's: a start whose tuned layers sit at
    other depths must not have them copied (same shapes, wrong layers)."""
    from sdk.train.student import stale_tails

    text = {**TINY, "text_heads": 2, "text_ffn": 32}
    src = EmbedderConfig(**{**text, "text_layers": 2, "text_tuned_layers": 1})  # tunes layer 2
    same = EmbedderConfig(**{**text, "text_layers": 2, "text_tuned_layers": 1})
    deeper = EmbedderConfig(**{**text, "text_layers": 3, "text_tuned_layers": 1})  # tunes layer 3
    how = {"text_tail.0.output.dense.weight": "copied", "fusion.0.out.weight": "copied"}
    assert stale_tails(dict(how), src, same) == []
    got = dict(how)
    assert stale_tails(got, src, deeper) == ["text layers"]
    assert got == {"text_tail.0.output.dense.weight": "fresh", "fusion.0.out.weight": "copied"}
    img = {**TINY, "image_dim": 1280}
    four, two = (EmbedderConfig(**{**img, "image_tuned_blocks": k}) for k in (4, 2))
    got = {"image_tail.blocks.0._bn0.weight": "copied"}
    assert stale_tails(got, four, two) == ["image blocks"] and got["image_tail.blocks.0._bn0.weight"] == "fresh"
    with pytest.raises(ValueError, match="1280-d tokens"):
        EmbedderConfig(**{**TINY, "image_tuned_blocks": 1})


def test_the_distill_command_checks_its_tuning_arguments(capsys):
    from sdk.export.distill import main

    for args, msg in ((["--tune-text-layers", "-1"], "--tune-text-layers must be >= 0"),
                      (["--tune-image-blocks", "6"], "--tune-image-blocks must be in 0..5"),
                      (["--tower-lr-scale", "2"], "--tower-lr-scale must be in")):
        with pytest.raises(SystemExit):
            main(["--features", "x", "--out", "y", *args])
        assert msg in capsys.readouterr().err


def test_the_cache_and_calibration_commands_check_their_new_arguments(tmp_path, capsys):
    from sdk.train.features import main as features_main
    from sdk.train.samples import main as samples_main

    with pytest.raises(SystemExit):
        features_main(["--catalog", str(tmp_path), "--image-mid-blocks", "6"])
    assert "--image-mid-blocks must be in 0..5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        samples_main(["--catalog", str(tmp_path), "--calib-only"])
    assert "--calib-only needs --calib-out" in capsys.readouterr().err


def test_tuned_pairs_match_each_tuned_module_with_the_towers_at_its_depth():
    from tiny_models import tiny_bert

    from sdk.train.towers import tuned_pairs

    cfg = EmbedderConfig(**{**TINY, "text_heads": 2, "text_ffn": 32, "text_layers": 3, "text_tuned_layers": 2})
    assert (cfg.text_tuned_first, cfg.image_tuned_first) == (1, 16)
    model = FusionEmbedder(cfg)
    tower = tiny_bert()
    tower.encoder.layer.extend([tiny_bert().encoder.layer[0], tiny_bert().encoder.layer[0]])
    pairs = tuned_pairs(model, text=tower)
    assert [(a, b) for a, b in pairs] == [(model.text_tail[0], tower.encoder.layer[1]),
                                          (model.text_tail[1], tower.encoder.layer[2])]
    assert tuned_pairs(model) == [] and tuned_pairs(FusionEmbedder(EmbedderConfig(**TINY)), text=tower) == []


def test_a_students_skip_path_is_standardised_on_its_own_towers(tmp_path):
    """The skip path's statistics come from the start's towers; on the student's towers (here the
    title states at 1000x the scale) they would blow the skip term up: they are refitted on the
    student's own training rows, so its standardised pooled features have unit scale."""
    from sdk.train.feature_cache import pooled_stats, title_stats, training_rows
    from sdk.train.student import refit_skip_stats

    cache = write_cache(tmp_path / "student_cache")
    tok = np.load(cache / "title_tok.npy").astype(np.float32)
    np.save(cache / "title_tok.npy", (tok * 1000).astype(np.float32))
    f = Features(cache)
    torch.manual_seed(0)
    student = FusionEmbedder(EmbedderConfig(**{**TINY, "skip_path": True}))
    before = student.skip_text.inv_std.clone()
    lines = []
    refit_skip_stats(student, f, lines.append)
    train_rows = training_rows(f, None)
    mean, std = title_stats(f, train_rows)
    assert torch.allclose(student.skip_text.mean, mean) and torch.allclose(student.skip_text.inv_std, 1 / std)
    assert not torch.allclose(student.skip_text.inv_std, before)
    i_mean, i_std = pooled_stats(f, train_rows)
    assert torch.allclose(student.skip_image.mean, i_mean) and torch.allclose(student.skip_image.inv_std, 1 / i_std)
    assert lines and "refitted" in lines[0]
    plain = FusionEmbedder(EmbedderConfig(**TINY))  # no skip path: nothing to refit, nothing logged
    refit_skip_stats(plain, f, lines.append)
    assert len(lines) == 1

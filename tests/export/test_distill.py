"""Distilled students (sdk.export.distill): cheaper towers, a fusion model trained against the teacher."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_training import TINY, write_cache  # noqa: E402

from sdk.export.distill import distill, init_from_teacher, student_config  # noqa: E402
from sdk.train.embedder import EmbedderConfig, FusionEmbedder, load_embedder  # noqa: E402
from sdk.train.train_embedder import Features, TrainConfig, distill_terms, train  # noqa: E402


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
    last = {**run(128, 1, 4, init=first), "teacher": {"weights": "train/weights", "image_size": 224, "text_layers": 6,
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
    from tiny_models import PooledImageTower, tiny_bert

    from sdk import Embedder
    from sdk.export.bundle import package_split_embedder
    from sdk.export.onnx_embedder import EmbedderGraph
    from sdk.export.onnx_split import SplitExportConfig, export_split_onnx
    from PIL import Image

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

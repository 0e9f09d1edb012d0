"""`sdk.train.train_reasoner`: the generated card (and that a hand-maintained one survives a new run),
on a tiny catalog, feature cache and reasoner built in code."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")

from sdk.train.reasoner_model import ReasonerConfig, load_reasoner  # noqa: E402
from sdk.train.train_reasoner import (  # noqa: E402
    GENERATED_MARK,
    TrainConfig,
    model_card,
    reproduce_command,
    train,
    write_model_card,
)

HAND_CARD = "# moon3 reasoner: model card\n\nThree stages, engine tables: written by hand.\n"
TINY = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_len=256, visual_dim=24, n_visual=4, dropout=0.0)


def test_a_generated_card_is_replaced_and_a_hand_card_is_kept(tmp_path):
    fresh = write_model_card(tmp_path, f"{GENERATED_MARK}\nfirst\n")
    assert fresh == tmp_path / "MODEL_CARD.md" and fresh.read_text().endswith("first\n")
    again = write_model_card(tmp_path, f"{GENERATED_MARK}\nsecond\n")  # generated before: regenerated
    assert again == fresh and again.read_text().endswith("second\n")

    (tmp_path / "MODEL_CARD.md").write_text(HAND_CARD)
    with pytest.warns(UserWarning, match="maintained by hand"):
        side = write_model_card(tmp_path, f"{GENERATED_MARK}\nthird\n")
    assert side == tmp_path / "TRAINING.md" and side.read_text().endswith("third\n")
    assert (tmp_path / "MODEL_CARD.md").read_text() == HAND_CARD


def test_card_labels_the_gates_as_tanh_and_reproduces_a_continued_run():
    gates = [math.tanh(g) for g in (0.5, -1.0)]
    m = {"params": 1e6, "gates": gates, "items": 3, "train_items": 7482,
         "train_config": {**TrainConfig().__dict__, "epochs": 4, "lr": 5e-4, "warmup": 20},
         "continued_from": {"train_config": {"epochs": 6, "tasks_per_item": 2, "lr": 7e-4}}}
    card = model_card(m, ReasonerConfig(), out="sdk/train/weights/reasoner", init="runs/reasoner_stage2")
    assert card.startswith(GENERATED_MARK + "\n# moon3 reasoner: model card")
    assert f"Learned gates, tanh(g_l) per layer:\n{[round(g, 3) for g in gates]}." in card
    assert ("--out sdk/train/weights/reasoner --init runs/reasoner_stage2 --epochs 4 --lr 0.0005 --warmup 20\n"
            in card)
    assert "Continued from `runs/reasoner_stage2` (its run: 6 epochs x 2 task(s) per product, lr 0.0007" in card
    assert "trained on 7,482 products" in card and "is not applied yet" not in card
    # from scratch: the architecture flags that differ from the defaults, no --init
    cmd = reproduce_command({"epochs": 3, "tasks_per_item": 1}, ReasonerConfig(n_layers=2), "runs/s1")
    assert cmd.endswith("--out runs/s1 --epochs 3 --tasks-per-item 1 --n-layers 2")


def write_catalog(root, n=30):
    """n products (ids 1..n; ids ending in 0 are validation) and a feature cache of random photo
    features (9 tokens of 24 channels) for all but product 7."""
    colours, kinds = ("Blue", "Red", "Black"), ("Tshirts", "Shoes", "Watches")
    recs = []
    for i in range(1, n + 1):
        c, k = colours[i % 3], kinds[(i // 3) % 3]
        recs.append({"id": i, "title": f"Brand{i % 4} Men {c} {k}", "brand": f"Brand{i % 4}", "gender": "Men",
                     "article_type": k, "sub_category": "Topwear", "base_colour": c, "season": "Fall",
                     "usage": "Casual", "attributes": {"Pattern": "Solid"}})
    cat = root / "catalog"
    cat.mkdir()
    (cat / "items.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    feats = root / "features"
    feats.mkdir()
    (feats / "meta.json").write_text(json.dumps({"ids": [r["id"] for r in recs]}))
    rng = np.random.default_rng(0)
    np.save(feats / "img_deep.npy", rng.standard_normal((n, 9, 24)).astype(np.float16))
    np.save(feats / "has_image.npy", np.array([r["id"] != 7 for r in recs]))
    return cat, feats


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_a_tiny_run_keeps_a_hand_card_and_reports_tanh_gates(tmp_path, restore_threads):
    cat, feats = write_catalog(tmp_path)
    cfg = TrainConfig(epochs=1, batch_size=8, warmup=1, threads=1, eval_items=3, max_new_tokens=6)
    logs = []
    fresh = tmp_path / "fresh"
    train(cat, feats, fresh, cfg, ReasonerConfig(**TINY), log=logs.append)
    card = (fresh / "MODEL_CARD.md").read_text()
    assert card.startswith(GENERATED_MARK) and not (fresh / "TRAINING.md").exists()
    report = json.loads((fresh / "reasoner_report.json").read_text())
    assert report["items"] == 3 and report["train_items"] == 27
    model, _ = load_reasoner(fresh)
    want = [float(torch.tanh(layer.gate.detach())) for layer in model.layers]
    assert report["gates"] == pytest.approx(want, abs=1e-6)
    assert f"tanh(g_l) per layer:\n{[round(g, 3) for g in report['gates']]}." in card
    assert f"--out {fresh} --epochs 1 --batch-size 8" in card

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "MODEL_CARD.md").write_text(HAND_CARD)
    with pytest.warns(UserWarning, match="maintained by hand"):
        train(cat, feats, kept, cfg, ReasonerConfig(**TINY), log=logs.append, init=fresh)
    assert (kept / "MODEL_CARD.md").read_text() == HAND_CARD
    summary = (kept / "TRAINING.md").read_text()
    assert summary.startswith(GENERATED_MARK) and f"--out {kept} --init {fresh}" in summary
    assert any("TRAINING.md" in line for line in logs)

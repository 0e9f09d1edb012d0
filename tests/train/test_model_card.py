"""The reference embedder's model card: the stage-3 traces subsection renders what the reports hold."""

from sdk.train.model_card_traces import _stage3_traces


def _recalls(no, both, catalog, oracle=None):
    out = {}
    for pre, r10 in (("", no), ("trace ", both), ("catalog-trace ", catalog), ("oracle-trace ", oracle)):
        if r10 is not None:
            out[f"{pre}text->image R@10"] = r10
            out[f"{pre}text->image R@1"] = r10 / 2
    return out


def test_stage3_subsection_adds_the_retrained_column_only_when_its_report_exists():
    first = _recalls(0.832, 0.806, 0.820, 0.871)
    with_new_traces = _recalls(0.832, 0.803, 0.817, 0.871)
    score = {"title validation": {"article type": 0.43, "colour": 0.2, "gender": 0.9}}
    plain = "\n".join(_stage3_traces(with_new_traces, score, first))
    assert "retrained" not in plain and "| traces on both sides | 0.403 / 0.806 | 0.402 / 0.803 |" in plain
    assert "| title | 0.430 | 0.200 | 0.900 |" in plain
    retrained = {"final": _recalls(0.834, 0.820, 0.837, 0.868), "seconds": 870.0,
                 "train_config": {"epochs": 3, "lr": 5e-4, "warmup_steps": 10}}
    card = "\n".join(_stage3_traces(with_new_traces, score, first, retrained, None, 0.849))
    assert "| traces on the catalog side only | 0.410 / 0.820 | 0.408 / 0.817 | 0.418 / 0.837 |" in card
    assert "(+0.003 text->image R@10 over no traces" in card and "the first model: -0.012" in card
    assert "still lead on text->image R@10 (0.849)" in card
    assert "--init sdk/train/weights --epochs 3 --lr 0.0005 --warmup-steps 10 --freeze-image --out runs/full_trace3" in card
    # the shipped (fp16) copy's own measurement wins over the training run's
    shipped = {"final": _recalls(0.834, 0.821, 0.838, 0.868)}
    assert "| 0.419 / 0.838 |" in "\n".join(_stage3_traces(with_new_traces, score, first, retrained, shipped, 0.849))


def test_tte_u_rows_compare_the_two_reasoners():
    from sdk.train.model_card_traces import TTE_ROWS, _stage3_tte

    before = {"layer": 4, "validation": {k: 0.1 for k in TTE_ROWS}}
    after = {"layer": 3, "seconds": 420.0, "validation": {**{k: 0.2 for k in TTE_ROWS}, TTE_ROWS[1]: 0.152}}
    text = "\n".join(_stage3_tte(before, after))
    assert "| text->image R@10 (TTE_u both sides) | 0.100 | 0.152 |" in text
    assert "layer 3 chosen" in text and "7 min" in text and "0.100 -> 0.152" in text


def test_grpo_rows_compare_the_two_reasoners():
    from sdk.train.model_card_traces import GRPO_ROWS, _stage3_grpo

    before = {"validation": {k: 0.8 for _, k in GRPO_ROWS}}
    after = {"seconds": 430.0, "config": {"steps": 60, "lr": 1e-5, "beta": 0.05},
             "validation": {**{k: 0.82 for _, k in GRPO_ROWS}, GRPO_ROWS[2][1]: 0.831}}
    text = "\n".join(_stage3_grpo(before, after))
    assert "| title + GRPO trace | 0.800 | 0.831 |" in text and "60 steps, lr 1e-05" in text and "7.2 min" in text


def test_the_kept_features_record_wins_over_the_local_cache(tmp_path):
    import json

    import numpy as np

    from sdk.train.model_card import features_record

    reports, cache = tmp_path / "reports", tmp_path / "cache"
    reports.mkdir()
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"seconds": 1329.7, "ids": [1, 2, 3]}))
    np.save(cache / "val_flip_rows.npy", np.arange(5))
    assert features_record(reports, cache) == {"seconds": 1329.7, "val_with_photo": 5}
    kept = {"seconds": 672.0, "scaling_1nn_article_type": {"pm1": 0.756, "imagenet": 0.7}, "val_with_photo": 796}
    (reports / "features.json").write_text(json.dumps(kept))
    assert features_record(reports, cache) == kept
    assert features_record(tmp_path / "none", tmp_path / "none") == {}


def test_card_adds_the_validation_suite_when_given():
    import json
    from pathlib import Path

    from sdk.train.model_card import _model_config, features_record, render

    weights = Path(__file__).resolve().parents[2] / "sdk" / "train" / "weights"
    reports = {p.stem: json.loads(p.read_text()) for p in (weights / "reports").glob("*.json")}
    if "full_trace" in reports and "full_trace_eval" in reports:
        reports["full_trace"]["final"] = {**reports["full_trace"]["final"], **reports["full_trace_eval"]["final"]}
    meta, cfg = features_record(weights / "reports", weights / "no-cache"), _model_config(weights / "reports")
    # the committed card is generated (with the committed suite report), never edited by hand
    committed = json.loads((weights.parents[2] / "docs" / "results" / "suite.json").read_text())
    assert render(reports, meta, cfg, committed) == (weights / "MODEL_CARD.md").read_text()
    assert "## Validation suite" not in render(reports, meta, cfg)
    cm = lambda r1, r10: {"title->photo": {"R@1": r1, "R@10": r10}, "photo->title": {"R@1": r1, "R@10": r10}}  # noqa: E731
    suite = {"results": {"probe": {"cross_modal": cm(0.2, 0.5)}, "teacher": {"cross_modal": cm(0.25, 0.6)}},
             "verdict": {"teacher": {"beats_probe": True, "not_scored": [],
                                     "families": {"cross_modal": {"min_delta": 0.05, "beats_probe": True}}}},
             "config": {"families": ["cross_modal"], "margin": 0.02}, "validation_photos": 10,
             "split": {"rule": "leak-free-v1", "validation": 12, "train": 30},
             "probe": {"training": {"lr": 0.001, "epochs": 7}}, "command": "python -m sdk.train.evaluate --catalog c"}
    card = render(reports, meta, cfg, suite)
    assert "## Validation suite (leak-free split)" in card and "`python -m sdk.train.evaluate --catalog c`" in card
    assert "| cross-modal | title->photo R@10 | 0.500 | 0.600 | +10.0 |" in card
    assert "measured when the model was trained, on the earlier split" in render(
        reports, {k: v for k, v in meta.items() if k != "split"}, cfg, suite).lower()
    assert "on the same\nleak-free validation products as the suite below" in render(
        reports, {**meta, "split": {"rule": "leak-free-v1"}}, cfg, suite)
    assert card.index("## Validation suite") < card.index("## Reproduce")


def test_card_says_how_the_weights_are_stored_and_what_fp16_cost():
    from sdk.train.model_card import _storage

    files, paragraph = _storage({"dtype": "float32", "mib": 20.6})
    assert files == ["`embedder.safetensors` (trained fusion weights, fp32) and `embedder.json` (config + the"]
    assert paragraph == []
    files, paragraph = _storage({"dtype": "float16", "mib": 10.3})
    assert "stored FP16, 10.3 MiB, loaded into the FP32" in files[0] and "not yet measured" in paragraph[-1]
    views = {v: {"max_l2_distance": d} for v, d in (("photo", 4e-4), ("title", 6.6e-4))}
    fidelity = {"views": views, "text->image R@10": {"fp32": 0.9267, "fp16": 0.92, "drop": 0.0067},
                "image->text R@10": {"fp32": 0.9467, "fp16": 0.9467, "drop": 0.0}}
    stored = {"dtype": "float16", "mib": 10.3,
              "fidelity": {"fidelity": fidelity, "products": 150, "source": "data/samples", "command": "..."}}
    text = " ".join(_storage(stored)[1])
    assert "150 sample products" in text and "at most 6.6e-04 apart (L2) in each view (photo, title)" in text
    assert "R@10 moves: text->image 0.9267 / 0.9200" in text


def test_a_leak_free_skip_path_recipe_card_names_its_split_terms_and_command():
    """A card for the leak-free recipe: the split it was validated on, the skip path and the title's
    weight, the training terms it used, and the command that retrains it (its flags from the report)."""
    from sdk.train.model_card import _architecture, _recipe, _reproduce, train_flags
    from sdk.train.train_config import TrainConfig

    tc = {**TrainConfig().__dict__, "epochs": 10, "cross_modal_weight": 3.0, "ema_decay": 0.97,
          "center_modalities": True, "prompt_fields": "article_type,brand", "holdout_master_category": None}
    full = {"params": 5.8e6, "train_items": 7194, "val_items": 1323, "seconds": 2338.0, "train_config": tc,
            "centering": {"rows": 2000}, "final": {}}
    cfg = {"skip_path": True, "title_weight_with_photo": 3.0}
    flags = train_flags(full, cfg)
    blended = {"skip_path": True, "modality_blend": 2.0}
    assert train_flags(full, blended).startswith("--skip-path --modality-blend 2 ")
    assert "normalise(fused + 2 x (photo-only + title-only))" in "\n".join(_architecture(full, {}, blended))
    assert flags.startswith("--skip-path") and "--cross-modal-weight 3" in flags and "--ema-decay 0.97" in flags
    assert "--center-modalities" in flags and "--prompt-fields article_type,brand" in flags
    assert "--epochs" not in flags and "holdout" not in flags  # defaults and unset options are left out
    arch = "\n".join(_architecture(full, {}, cfg))
    assert "Skip path" in arch and "title's skip term weighs 3" in arch and "--center-modalities" in arch
    recipe = "\n".join(_recipe(full, 0.2, leak_free=True))
    assert "split leak-free" in recipe and "(1323 products, never trained on) or training (7194)" in recipe
    assert "`cross_modal_weight` 3" in recipe
    steps = "\n".join(_reproduce({"dtype": "float16"}, {"split": {"rule": "leak-free-v1"}, "renditions": 2,
                                                         "seconds": 960.0}, full, cfg, {"command": "python -m x"}))
    assert f"--variant full {flags} --checkpoint runs/full.ckpt" in steps
    assert "--holdout-master-category Footwear" in steps and "--title-weight-with-photo 3" in flags
    # the title's weight shapes training (photo + title views), so it is a training flag, not set afterwards
    assert "fusion_model runs/full sdk/train/weights   # stored fp16" in steps
    assert ".venv/bin/python -m x" in steps and "--renditions 2" in steps

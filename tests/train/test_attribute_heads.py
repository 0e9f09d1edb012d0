"""Attribute heads (sdk.train.attribute_heads) on synthetic features: they learn what the features
carry, leave out what they cannot see, and are scored like the reasoner."""

import numpy as np
import pytest

pytest.importorskip("torch")

from sdk.train.attribute_heads import ABSENT, HeadConfig, fit, score, tune_thresholds  # noqa: E402

TYPES, COLOURS = ["Tshirts", "Shoes", "Watches"], ["Black", "White", "Red", "Blue"]


def _data(n, seed, noise=0.3):
    """Features that carry article type and colour; gender is one of four at random (nothing to
    see: a guess is right a quarter of the time); a Pattern attribute exists only for T-shirts."""
    rng = np.random.default_rng(seed)
    t, c = rng.integers(0, 3, n), rng.integers(0, 4, n)
    x = np.zeros((n, 16), np.float32)
    x[np.arange(n), t] = 3.0
    x[np.arange(n), 3 + c] = 3.0
    x += rng.normal(0, noise, x.shape).astype(np.float32)
    genders = ["Men", "Women", "Boys", "Girls"]
    records = [{"article_type": TYPES[a], "base_colour": COLOURS[b], "gender": genders[rng.integers(4)],
                "attributes": {"Pattern": "Solid"} if a == 0 else {}} for a, b in zip(t, c)]
    return x, records


def test_heads_learn_what_the_features_show_and_skip_absent_attributes():
    x, recs = _data(600, 0)
    heads = fit(x, recs, HeadConfig(epochs=200, min_count=5))
    assert heads.classes["article type"] == [ABSENT, *sorted(TYPES)]
    xv, rv = _data(200, 1)
    pairs = heads.predict(xv)
    m = score(pairs, rv)
    assert m["category_acc"] > 0.95 and m["items"] == 200
    for p, r in zip(pairs, rv):
        d = dict(p)
        assert d.get("colour") == r["base_colour"] or d.get("colour") is None
        assert ("pattern" in d) == (r["article_type"] == "Tshirts")  # written only where it exists


def test_thresholds_drop_the_fields_the_heads_cannot_see():
    x, recs = _data(600, 0)
    heads = fit(x, recs, HeadConfig(epochs=200))
    xv, rv = _data(300, 2)
    before = score(heads.predict(xv), rv)["attribute_f1"]
    tuned = tune_thresholds(heads, xv, rv, (0.0, 0.5, 0.7, 0.9, 1.01))
    after = score(heads.predict(xv, tuned), rv)["attribute_f1"]
    assert after > before  # a 1-in-4 guess at gender costs more precision than it gains recall
    assert tuned["gender"] >= 0.5 and tuned["article type"] < 0.9
    written = sum(k == "gender" for p in heads.predict(xv, tuned) for k, _ in p)
    assert written < 0.1 * len(rv), f"gender still written for {written} of {len(rv)} products"


def test_score_is_the_reasoners_micro_f1():
    recs = [{"article_type": "Shoes", "base_colour": "Black", "gender": "Men"}]
    assert score([[("article type", "Shoes"), ("colour", "black"), ("gender", "Men")]], recs) == {
        "attribute_f1": 1.0, "category_acc": 1.0, "items": 1}
    m = score([[("article type", "Watches")]], recs)
    assert m["category_acc"] == 0.0 and m["attribute_f1"] == 0.0


def test_fit_refuses_what_it_cannot_learn():
    x, recs = _data(20, 0)
    with pytest.raises(ValueError, match="one feature row per record, got 19 rows and 20 records"):
        fit(x[:19], recs, HeadConfig(epochs=1))
    with pytest.raises(ValueError, match="no field has a value on at least min_count=50"):
        fit(x, recs, HeadConfig(epochs=1, min_count=50))


def test_the_model_card_is_written_from_the_report(tmp_path):
    import json

    from sdk.train.attribute_heads import write_card

    report = {"command": "python -m sdk.train.attribute_heads --hidden 512", "split": {"rule": "leak-free-v1"},
              "train_photos": 600, "validation_photos": 200, "classes": {"article type": 3, "colour": 4},
              "config": {"hidden": 512, "epochs": 300, "lr": 0.003, "weight_decay": 1e-4, "min_count": 5,
                         "renditions": True, "thresholds": {"article type": 0.4, "colour": 0.7}},
              "heads": {"all validation photos": {"attribute_f1": 0.7623, "category_acc": 0.8891, "items": 200}},
              "per_field_accuracy": {"article type": 0.8895, "colour": 0.4674}}
    card = write_card(report, tmp_path).read_text()
    assert "**0.762**" in card and "**0.889**" in card and "| colour | 4 | 0.7 | 0.467 |" in card
    assert report["command"] in card and "512-wide ReLU" in card
    assert json.loads((tmp_path / "heads_report.json").read_text()) == report


def test_eval_reasoner_renders_its_report_as_a_table():
    from sdk.train.eval_reasoner import render

    m = {"attribute_f1_photo": 0.7637, "category_acc_photo": 0.8887, "attribute_f1_title": 0.5094,
         "category_acc_title": 0.571, "caption_token_f1": 0.3147, "seconds": 112.6, "precision": "int4"}
    table = render({"items": 1303, "source": "catalog", "engines": {"heads.engine": {"metrics": m},
                                                                    "plain.engine": {"metrics": {**m, "seconds": 300}}}})
    lines = table.splitlines()
    assert lines[0] == "1303 products of catalog:" and len(lines) == 6
    assert lines[4] == "| heads.engine (int4) | 0.7637 | 0.8887 | 0.5094 | 0.5710 | 0.3147 | 113 |"

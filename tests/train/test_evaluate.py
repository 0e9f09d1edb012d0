"""The validation suite on a small catalog cut from data/samples, with cheap frozen features."""

import json
import zlib

import numpy as np
import pytest

from sdk.train.catalog import catalog_split, read_catalog
from sdk.train.evaluate import (
    FAMILIES,
    RENDITIONS,
    SuiteConfig,
    ValidationSet,
    load_subject,
    named_paths,
    render_markdown,
    run_suite,
)
from sdk.train.probe import LinearProbe, ProbeConfig, train_probe
from tests.catalogs import SAMPLES

pytest.importorskip("torch")


class Histograms:
    """Frozen 'towers' that cost nothing: a colour histogram and a 4x4 thumbnail per photo, hashed
    word counts per text."""

    def image_features(self, images):
        from sdk.preprocess import load_image

        out = []
        for im in images:
            a = np.asarray(load_image(im).resize((16, 16)), np.float32) / 255.0
            hist = np.histogramdd(a.reshape(-1, 3), bins=(4, 4, 4), range=[(0, 1)] * 3)[0].ravel() / 256.0
            out.append(np.concatenate([hist, a.reshape(4, 4, 4, 4, 3).mean((1, 3)).ravel()]))
        return np.array(out, np.float32)

    def text_features(self, texts):
        out = np.zeros((len(texts), 128), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % 128] += 1.0
        return out


def make_catalog(folder):
    """The sample products (validation: ids end in 0) plus a training twin of each: another id,
    another title, its photo mirrored (other bytes), so no design or photo crosses the split."""
    from PIL import Image, ImageOps

    (folder / "images").mkdir()
    records = []
    for p in read_catalog(SAMPLES):
        rec = {**p.record}
        twin = {**p.record, "id": p.id + 1, "title": p.title + " Classic Edition"}
        if p.image is not None:
            rec["image"] = str(p.image)
            img = ImageOps.mirror(Image.open(p.image).convert("RGB"))
            img.save(folder / "images" / f"{p.id + 1}.png")
            twin["image"] = f"images/{p.id + 1}.png"
        records += [rec, twin]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


FAST = ProbeConfig(lrs=(3e-3, 3e-2), max_epochs=8, batch_size=64)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    cat = make_catalog(tmp_path_factory.mktemp("suite_catalog"))
    towers = Histograms()
    split = catalog_split(cat)
    products = read_catalog(cat)
    train = [p for p in products if p.image is not None and not split.is_validation(p.id)]
    probe, _ = train_probe(towers.image_features([p.image for p in train]), towers.text_features([p.title for p in train]),
                           np.arange(len(train)), np.arange(len(train)), towers, FAST, log=lambda *_: None)

    class Noise:
        def embed(self, images=None, texts=None):
            n = len(images if images is not None else texts)
            return np.random.default_rng(n).normal(size=(n, 32)).astype(np.float32)

    cfg = SuiteConfig(min_class=3, holdout="Footwear")
    report = run_suite(cat, {"same": probe, "noise": Noise()}, ood_subjects={"same": probe}, cfg=cfg, probe_cfg=FAST,
                       towers=towers, log=lambda *_: None)
    return cat, report


def test_split_of_the_test_catalog_is_leak_free(suite):
    cat, report = suite
    assert json.dumps(json.loads(json.dumps(report))) == json.dumps(report)  # plain JSON types all the way down
    assert report["split"]["validation"] == report["validation_products"] == 156
    assert report["validation_photos"] == 150


def test_every_family_is_scored_beside_the_probe(suite):
    cat, report = suite
    probe, noise = report["results"]["probe"], report["results"]["noise"]
    assert set(probe) == set(FAMILIES)
    assert set(probe["renditions"]) == set(RENDITIONS)
    assert set(probe["zero_shot"]) == {"article_type", "gender", "base_colour"}
    # the probe learned something real: far above the noise subject, whose recall is chance
    assert probe["cross_modal"]["title->photo"]["R@10"] > 0.3
    assert noise["cross_modal"]["title->photo"]["R@10"] < 0.2
    assert probe["renditions"]["gray"]["R@1"] > 0.2  # the thumbnail feature survives grayscale
    assert probe["knn"]["article_type"]["accuracy"] > noise["knn"]["article_type"]["accuracy"]
    # a photo + title catalog searched by a title and by a crop of the photo: judged like the rest
    assert set(probe["catalog"]) == {"title", "crop"}
    assert probe["catalog"]["title"]["R@10"] > 0.5 and probe["catalog"]["crop"]["R@10"] > 0.2
    misses = probe["catalog"]["title"]  # reported for reading, not judged
    assert misses["first-hit misses"] == round((1 - misses["R@1"]) * report["validation_photos"])
    assert 0 <= misses["first-hit misses, same words"] <= misses["first-hit misses"]
    assert set(report["verdict"]["same"]["families"]["catalog"]["deltas"]) == {
        "title R@1", "title R@10", "crop R@1", "crop R@10"}
    # each modality's kNN is reported beside the judged photo + title one, but not judged
    knn = probe["knn"]["article_type"]
    assert 0 <= knn["photo_only_accuracy"] <= 1 and knn["title_only_accuracy"] > noise["knn"]["article_type"]["accuracy"]
    assert "photo_only_accuracy" in report["results"]["same"]["ood"]["knn"]["article_type"]
    assert list(report["verdict"]["same"]["families"]["knn"]["deltas"]) == ["article_type accuracy"]
    assert report["ood"]["holdout"] == "Footwear" and report["ood"]["photos"] > 10
    # the ood family scores every Footwear product, both sides of the split (the held-out models saw none)
    footwear = [p for p in read_catalog(cat) if p.record.get("master_category") == "Footwear"]
    assert report["ood"]["scope"] == "category" and report["ood"]["products"] == len(footwear)
    # the old split's products are the sample products here (ids ending in 0): all of them
    assert probe["cross_modal"]["old_split"]["products"] == 156
    # the probe's learning rate and epochs were picked on its dev slice, the curve kept
    training = report["probe"]["training"]
    assert training["lr"] in FAST.lrs and 1 <= training["epochs"] <= FAST.max_epochs
    assert len(training["sweep"]["0.003"]) == FAST.max_epochs and "ood_training" in report["probe"]


def test_ood_scope_validation_scores_only_the_validation_side(suite):
    cat, report = suite
    cfg = SuiteConfig(min_class=3, holdout="Footwear", families=("ood",), ood_scope="validation")
    small = run_suite(cat, {}, cfg=cfg, probe_cfg=FAST, towers=Histograms(), log=lambda *_: None)
    split = catalog_split(cat)
    val_footwear = [p for p in read_catalog(cat)
                    if p.record.get("master_category") == "Footwear" and split.is_validation(p.id)]
    assert small["ood"]["scope"] == "validation" and small["ood"]["products"] == len(val_footwear)
    assert 0 < small["ood"]["products"] < report["ood"]["products"]
    with pytest.raises(ValueError, match="ood_scope"):
        SuiteConfig(ood_scope="train")


def test_verdict_compares_with_the_probe(suite):
    _, report = suite
    same, noise = report["verdict"]["same"], report["verdict"]["noise"]
    # a subject that is another probe trained on the same features equals the suite's probe on the
    # in-domain families (deltas 0: not the 2 points asked), and differs only by its training data on ood
    assert not same["beats_probe"]
    assert all(d == 0 for f, v in same["families"].items() if f != "ood" for d in v["deltas"].values())
    assert not noise["beats_probe"] and noise["families"]["cross_modal"]["min_delta"] < -0.2
    assert noise["not_scored"] == ["ood"]
    table = render_markdown(report)
    assert "| cross-modal | title->photo R@10 |" in table and "noise" in table
    assert "does not beat the probe everywhere" in table and "old split" in table


def test_a_catalog_without_a_field_skips_only_that_family(tmp_path):
    cat = make_catalog(tmp_path)
    lines = [json.loads(x) for x in (cat / "items.jsonl").read_text().splitlines()]
    for r in lines:
        r.pop("gender", None)
        r.pop("master_category", None)
    (cat / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = SuiteConfig(min_class=3, families=("zero_shot", "ood", "cross_modal"))
    report = run_suite(cat, {}, cfg=cfg, probe_cfg=FAST, towers=Histograms(), log=lambda *_: None)
    zs = report["results"]["probe"]["zero_shot"]
    assert "'gender'" in zs["gender"]["skipped"] and "zero_shot" in zs["gender"]["skipped"]
    assert "weighted_F1" in zs["article_type"]
    assert "'master_category'" in report["ood"]["skipped"]
    assert "R@10" in report["results"]["probe"]["cross_modal"]["title->photo"]


def test_renditions_degrade_but_keep_the_size():
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((160, 120, 3)) * 255).astype(np.uint8))
    for name, fn in RENDITIONS.items():
        out = fn(img)
        assert out.mode == "RGB", name
        assert np.abs(np.asarray(out, np.float32) - (np.asarray(img.resize(out.size), np.float32))).mean() > 1, name
    assert RENDITIONS["crop"](img).size == (84, 112)
    gray = np.asarray(RENDITIONS["gray"](img))
    assert (gray[..., 0] == gray[..., 1]).all()


def test_validation_set_keys_group_titles_and_identical_photos(tmp_path):
    cat = make_catalog(tmp_path)
    products = read_catalog(cat)
    val = ValidationSet.of([products[0], products[0]])  # the same product twice: one title, one photo
    assert val.title_key.tolist() == [0, 0] and val.photo_key.tolist() == [0, 0]
    sub = val.subset(np.array([False, True]))
    assert len(sub.products) == 1 and len(sub.photos) == 1 and sub.with_photo.tolist() == [0]


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown families"):
        SuiteConfig(families=("cross_modal", "vibes"))
    with pytest.raises(ValueError, match="margin"):
        SuiteConfig(margin=1.5)
    with pytest.raises(ValueError, match="lrs"):
        ProbeConfig(lrs=())
    with pytest.raises(FileNotFoundError, match="not an embedder folder"):
        load_subject(tmp_path)
    with pytest.raises(SystemExit, match="NAME=PATH"):
        named_paths(["teacher"], "--subject")
    with pytest.raises(SystemExit, match="reserved"):
        named_paths(["probe=x"], "--subject")
    with pytest.raises(ValueError, match="reserved|linear probe"):
        run_suite(tmp_path, {"probe": object()})
    with pytest.raises(ValueError, match="at least"):
        train_probe(np.zeros((3, 4)), np.zeros((3, 4)), np.arange(3), np.arange(3), Histograms(), FAST)


def test_engine_subject_runs_through_the_runtime(tiny_split_engine, tmp_path):
    import warnings

    from sdk.errors import TruncationWarning

    subject = load_subject(tiny_split_engine.path, threads=1)
    cat = make_catalog(tmp_path)
    products = [p for p in read_catalog(cat) if p.id % 10 == 0][:12]
    val = ValidationSet.of(products)
    from sdk.train.evaluate import score_subject

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)  # the tiny engine's token budget is 12
        res = score_subject(subject, val, SuiteConfig(min_class=2, families=("cross_modal", "renditions")),
                            log=lambda *_: None)
    assert 0.0 <= res["cross_modal"]["title->photo"]["R@10"] <= 1.0
    assert set(res["renditions"]) == set(RENDITIONS)


def test_linear_probe_embeds_each_modality():
    towers = Histograms()
    rng = np.random.default_rng(0)
    stats = {"img_mean": np.zeros(112), "img_std": np.ones(112), "txt_mean": np.zeros(128), "txt_std": np.ones(128)}
    probe = LinearProbe(towers, rng.normal(size=(113, 8)), rng.normal(size=(129, 8)), stats)
    from PIL import Image

    img = Image.new("RGB", (60, 80), (200, 30, 30))
    v = probe.embed(images=[img, None, img], texts=[None, "red shoe", "red shoe"])
    assert v.shape == (3, 8) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    both = v[0] + v[1]
    assert np.allclose(v[2], both / np.linalg.norm(both), atol=1e-5)


def test_memo_tower_runs_each_photo_once_and_is_shared_only_where_it_fits():
    import torch

    from sdk.train.evaluate import share_tower
    from sdk.train.probe import MemoImageTower

    calls = []

    def tower(x):
        calls.append(len(x))
        return x.mean(1).flatten(1)[:, :, None].repeat(1, 1, 2), x[:, :1].flatten(1)[:, :, None]

    memo = MemoImageTower(tower)
    x = torch.rand(3, 3, 4, 4)
    first = memo(x)
    again = memo(torch.cat([x[2:], x[:1], torch.rand(1, 3, 4, 4)]))
    assert calls == [3, 1]  # only the new photo ran
    assert torch.equal(again[0][0], first[0][2]) and torch.equal(again[1][1], first[1][0])
    from types import SimpleNamespace

    fits = SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(image_size=224, image_tuned_blocks=0)),
                           image_tower=None)
    student = SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(image_size=128, image_tuned_blocks=0)),
                              image_tower=None)
    assert share_tower(fits, memo).image_tower is memo and share_tower(student, memo).image_tower is None
    engine = object()
    assert share_tower(engine, memo) is engine


def test_the_documented_table_is_the_committed_reports():
    """docs/validation.md's table is generated from docs/results/suite.json, never edited by hand."""
    from pathlib import Path

    from sdk.train.suite_report import BEGIN, END

    docs = Path(__file__).resolve().parents[2] / "docs"
    report = json.loads((docs / "results" / "suite.json").read_text())
    page = (docs / "validation.md").read_text()
    table = page.split(BEGIN, 1)[1].split(END, 1)[0]
    assert table.strip() == render_markdown(report).strip()
    assert report["split"]["rule"] == "leak-free-v1" and report["results"]["probe"]["cross_modal"]
    assert "command" in report and "python -m sdk.train.evaluate" in report["command"]


def test_write_table_keeps_the_rest_of_the_page(tmp_path, suite):
    from sdk.train.suite_report import BEGIN, END, write_table

    _, report = suite
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    write_table(report, page)
    text = page.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{END}\n\nafter\n")
    assert "old table" not in text and "| cross-modal |" in text
    plain = tmp_path / "plain.md"
    write_table(report, plain)
    assert plain.read_text() == render_markdown(report)


def test_near_a_perfect_score_the_margin_is_half_the_headroom():
    from sdk.train.suite_report import compare, required_margin

    assert required_margin(0.5, 0.02) == 0.02 and required_margin(0.996, 0.02) == pytest.approx(0.002)
    assert required_margin(1.0, 0.02) == 0.0
    probe = {"renditions": {"jpeg": {"R@1": 0.90, "R@10": 0.996}}}
    ok = compare({"renditions": {"jpeg": {"R@1": 0.93, "R@10": 0.999}}}, probe, 0.02)["renditions"]
    assert ok["beats_probe"] and ok["required"] == {"jpeg R@1": 0.02, "jpeg R@10": 0.002}
    short = compare({"renditions": {"jpeg": {"R@1": 0.93, "R@10": 0.997}}}, probe, 0.02)["renditions"]
    assert not short["beats_probe"] and short["min_excess"] == pytest.approx(-0.001)

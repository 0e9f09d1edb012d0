import json

import pytest

from sdk.train.catalog import is_validation, read_catalog


def test_read_catalog_resolves_images_and_views(tmp_path):
    rec = {"id": 30, "title": "Red Shoe", "brand": "Acme", "description": "Soft  sole\nlight", "image": "images/30.jpg",
           "article_type": "Casual Shoes"}
    (tmp_path / "items.jsonl").write_text(json.dumps(rec) + "\n\n" + json.dumps({"id": 31, "title": "Cap", "image": None}) + "\n")
    a, b = read_catalog(tmp_path)
    assert a.image == tmp_path / "images" / "30.jpg" and b.image is None
    assert a.detail_text == "Acme. Soft sole light"
    assert b.detail_text == "Cap"
    assert is_validation(a.id) and not is_validation(b.id)


def test_read_catalog_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="items.jsonl"):
        read_catalog(tmp_path)
    (tmp_path / "items.jsonl").write_text('{"id": 1, "title": "ok"}\n{"title": "no id"}\n')
    with pytest.raises(ValueError, match="items.jsonl:2: bad catalog record"):
        read_catalog(tmp_path)

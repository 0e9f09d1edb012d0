import json

import pytest

from sdk.train.catalog import Split, catalog_split, legacy_is_validation, normalize_title, read_catalog


def test_read_catalog_resolves_images_and_views(tmp_path):
    rec = {"id": 30, "title": "Red Shoe", "brand": "Acme", "description": "Soft  sole\nlight", "image": "images/30.jpg",
           "article_type": "Casual Shoes"}
    (tmp_path / "items.jsonl").write_text(
        json.dumps(rec) + "\n\n" + json.dumps({"id": 31, "title": "Cap", "image": None}) + "\n")
    a, b = read_catalog(tmp_path)
    assert a.image == tmp_path / "images" / "30.jpg" and b.image is None
    assert a.detail_text == "Acme. Soft sole light"
    assert b.detail_text == "Cap"
    assert legacy_is_validation(a.id) and not legacy_is_validation(b.id)


def test_read_catalog_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="items.jsonl"):
        read_catalog(tmp_path)
    (tmp_path / "items.jsonl").write_text('{"id": 1, "title": "ok"}\n{"title": "no id"}\n')
    with pytest.raises(ValueError, match="items.jsonl:2: bad catalog record"):
        read_catalog(tmp_path)


def _write(tmp_path, records, photos):
    (tmp_path / "images").mkdir(exist_ok=True)
    for name, data in photos.items():
        (tmp_path / "images" / name).write_bytes(data)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_split_keeps_designs_and_photos_on_one_side(tmp_path):
    records = [
        {"id": 10, "title": "Nike Men Blue  T-shirt", "image": "images/a.jpg"},  # anchors its group in validation
        {"id": 11, "title": "nike men blue t-shirt", "image": "images/b.jpg"},  # same design (normalised title)
        {"id": 12, "title": "Puma Cap", "image": "images/c.jpg"},  # same photo bytes as 11: joins transitively
        {"id": 13, "title": "Adidas Shoe", "image": "images/d.jpg"},
        {"id": 14, "title": "Adidas Sock", "image": None},
        {"id": 21, "title": "Adidas Shoe", "image": None},  # same design as 13, neither ends in 0: train
    ]
    _write(tmp_path, records, {"a.jpg": b"A", "b.jpg": b"B", "c.jpg": b"B", "d.jpg": b"D"})
    split = catalog_split(tmp_path)
    assert split.validation_ids == {10, 11, 12}
    assert split.group[10] == split.group[11] == split.group[12] and split.group[13] == split.group[21]
    assert split.mask([13, 12, 14]).tolist() == [False, True, False]
    assert split.summary() == {"rule": "leak-free-v1", "products": 6, "validation": 3, "train": 3, "groups": 3}
    # no normalised title and no photo on both sides
    products = read_catalog(tmp_path)
    side = {p.id: split.is_validation(p.id) for p in products}
    for key in (lambda p: normalize_title(p.title), lambda p: p.image and p.image.read_bytes()):
        sides = {}
        for p in products:
            if key(p):
                sides.setdefault(key(p), set()).add(side[p.id])
        assert all(len(s) == 1 for s in sides.values())
    # the old validation products stay validation
    assert all(split.is_validation(p.id) for p in products if legacy_is_validation(p.id))


def test_split_is_memoised_per_catalog_version(tmp_path):
    _write(tmp_path, [{"id": 1, "title": "A"}, {"id": 20, "title": "B"}], {})
    first = catalog_split(tmp_path)
    assert catalog_split(tmp_path) is first and first.validation_ids == {20}
    _write(tmp_path, [{"id": 1, "title": "B"}, {"id": 20, "title": "B"}, {"id": 3, "title": "C"}], {})
    assert catalog_split(tmp_path).validation_ids == {1, 20}


def test_split_of_products_without_photos_on_disk(tmp_path):
    # a photo path that does not exist groups by title only (nothing to hash)
    _write(tmp_path, [{"id": 30, "title": "X", "image": "images/gone.jpg"},
                      {"id": 31, "title": "Y", "image": "images/gone.jpg"}], {})
    assert Split.of(read_catalog(tmp_path)).validation_ids == {30}

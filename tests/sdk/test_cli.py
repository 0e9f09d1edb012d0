"""The moon3 command line on a tiny engine: clear errors and exit codes for bad input."""

import json

import numpy as np
import pytest

from sdk.cli import main


def test_inspect_missing_and_damaged_engine(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.engine")]) == 2
    assert "engine file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"not an engine at all, just some bytes" * 3)
    assert main(["inspect", str(bad)]) == 2
    assert "not a moon3 engine file" in capsys.readouterr().err


def test_inspect_json(tiny_engine, capsys):
    assert main(["inspect", str(tiny_engine.path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["embedder"]["dim"] == 32 and [p["name"] for p in m["parts"]] == ["embedder.onnx", "tokenizer.json"]


def test_embed_reports_bad_records_and_keeps_good_ones(tiny_engine, tmp_path, capsys):
    w = tiny_engine.words
    lines = [json.dumps({"id": 1, "title": f"{w[0]} {w[1]}"}), json.dumps({"id": 2, "title": "", "image": None}),
             json.dumps({"id": 3, "title": w[2]})]
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert main(["embed", str(tiny_engine.path), "--input", str(src), "--out", str(tmp_path / "v.npy")]) == 1
    v = np.load(tmp_path / "v.npy")
    assert np.isfinite(v[[0, 2]]).all() and np.isnan(v[1]).all()
    side = json.loads((tmp_path / "v.items.json").read_text())
    assert side["ids"] == [1, 2, 3] and list(side["errors"]) == ["1"]
    assert "record 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, match", [(None, "input not found"), ('{"id": 1, "title": "a"}\n{broken\n', "items.jsonl:2: not valid JSON")]
)
def test_embed_bad_input_file(tiny_engine, tmp_path, capsys, content, match):
    src = tmp_path / "items.jsonl"
    if content is not None:
        src.write_text(content)
    assert main(["embed", str(tiny_engine.path), "--input", str(src), "--out", str(tmp_path / "v.npy")]) == 2
    assert match in capsys.readouterr().err


def test_bad_records_are_numbered_in_the_file_across_chunks(tiny_engine, tmp_path):
    from sdk import Embedder
    from sdk.cli import _embed_records

    w = tiny_engine.words
    records = [{"title": w[i]} for i in range(5)]
    records[3] = {"title": w[3], "image": "missing.jpg"}
    with Embedder(tiny_engine.path, threads=1) as emb:
        vecs, errors = _embed_records(emb, records, tmp_path, None, chunk=2)
    assert list(errors) == [3] and errors[3].startswith("record 3 image:")
    assert np.isnan(vecs[3]).all() and np.isfinite(np.delete(vecs, 3, 0)).all()

"""research.int8_divergence: the per-op comparison and the search check, run with the host's own
interpreter as the "other" one (so nothing differs) and on arrays that differ where we put it."""

import json
import sys

import numpy as np
import pytest


def test_compare_names_the_first_differing_tensor_in_graph_order():
    from research.int8_divergence import compare

    mask = np.ones((2, 3), np.float32)
    host = {"names": np.array(["token_states", "ln", "q"]), "t0": np.ones((2, 3, 4), np.float32),
            "t1": np.zeros(5, np.float32), "t2": np.zeros(6, np.uint8)}
    other = {**host, "t1": np.array([0, 0, 1e-6, 0, 0], np.float32), "t2": np.array([0, 1, 0, 0, 0, 0], np.uint8)}
    order = [("ln", "LayerNormalization"), ("q", "DynamicQuantizeLinear"), ("token_states", "LayerNormalization")]
    got = compare(host, other, order, mask)
    assert got["first_difference"]["tensor"] == "ln" and got["first_difference"]["differing"] == 0.2
    assert got["first_quantized_difference"]["op"] == "DynamicQuantizeLinear" and got["quantized_tensors"] == 1
    assert got["last_quantized_tensor"]["differing"] == round(1 / 6, 6)
    assert got["pooled_token_states_cosine_min"] == 1.0
    assert compare(host, host, order, mask)["first_difference"] is None


@pytest.mark.slow  # two interpreters, the tiny engine's photos: half a minute
def test_the_same_interpreter_on_both_sides_agrees_exactly(tiny_split_engine, tmp_path):
    pytest.importorskip("onnx")
    from research.int8_divergence import main

    out = tmp_path / "div.json"
    main(["--engine", str(tiny_split_engine.path), "--other", sys.executable, "--limit", "6", "--dump-batch", "2",
          "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rep["products"] == 6 and rep["architectures"]["host"] == rep["architectures"]["other"]
    (eng,) = rep["engines"].values()
    assert eng["graph"]["first_difference"] is None and eng["graph"]["pooled_token_states_cosine_min"] >= 0.99999
    assert eng["title_vector_cosine"]["min"] >= 0.99999
    assert eng["title->photo"]["host titles"] == eng["title->photo"]["other titles"]
    from research.int8_divergence import render

    table = render(rep)
    assert table.count("\n") == 8 and "| first tensor that differs | none |" in table

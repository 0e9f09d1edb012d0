import pytest

from sdk.contract import EMBEDDER_INPUTS
from sdk.engine import EngineFile
from sdk.export.bundle import package_embedder


def test_manifest_contract(tmp_path):
    path = package_embedder(tmp_path / "e.engine", b"graph", b"{}", dim=8, matryoshka_dims=(4, 8), precision="fp32",
                            fidelity={"passed": True})
    m = EngineFile.read(path).manifest
    assert m["embedder"]["inputs"] == EMBEDDER_INPUTS and m["embedder"]["output"] == "embedding"
    assert m["embedder"]["matryoshka_dims"] == [4, 8] and m["fidelity"] == {"passed": True}
    assert m["preprocess"]["image"]["size"] == 224 and m["preprocess"]["text"]["tokenizer"] == "tokenizer.json"
    assert m["versions"]["moon3-sdk"]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"matryoshka_dims": (4, 6)}, "end at dim=8"),
        ({"matryoshka_dims": (8, 4, 8)}, "increasing"),
        ({"text_max_length": 1}, "token budgets"),
    ],
)
def test_bad_values(tmp_path, kw, match):
    args = {"dim": 8, "matryoshka_dims": (4, 8), **kw}
    with pytest.raises(ValueError, match=match):
        package_embedder(tmp_path / "e.engine", b"g", b"{}", **args)
    assert not (tmp_path / "e.engine").exists()

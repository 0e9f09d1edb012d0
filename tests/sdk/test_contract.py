"""The embedder contract (`sdk.contract`): what the engine writer writes is what the runtime reads,
and the runners the runtime picks per layout run the parts the manifest names."""

import copy

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from sdk.contract import (  # noqa: E402
    INPUT_NAMES,
    SINGLE_PART,
    SPLIT_PARTS,
    TOKENIZER_PART,
    check_completion_graph,
    fingerprint,
    read_embedder_spec,
)
from sdk.engine import EngineFile  # noqa: E402
from sdk.errors import EngineError, InvalidInputError  # noqa: E402


def test_the_writer_and_the_reader_agree_on_both_layouts(tiny_engine, tiny_split_engine):
    for path, layout, parts in ((tiny_engine.path, "single", {"embedder": SINGLE_PART}),
                                (tiny_split_engine.path, "split", SPLIT_PARTS)):
        engine = EngineFile.read(path)
        spec = read_embedder_spec(engine.manifest, path)
        assert spec.layout == layout and dict(spec.parts) == parts
        assert spec.tokenizer_parts == [TOKENIZER_PART] and spec.dim == spec.matryoshka_dims[-1] == 32
        assert {p["name"] for p in engine.manifest["parts"]} >= set(parts.values()) | {TOKENIZER_PART}


def test_the_fingerprint_is_the_embedders_and_follows_what_it_computes(tiny_engine):
    from sdk import Embedder

    engine = EngineFile.read(tiny_engine.path)
    spec = read_embedder_spec(engine.manifest, tiny_engine.path)
    with Embedder(tiny_engine.path, threads=1) as emb:
        assert fingerprint(engine.manifest, spec) == emb.fingerprint
    other = copy.deepcopy(engine.manifest)
    other["preprocess"]["text"]["max_length"] = 7  # other preprocessing: other vectors
    assert fingerprint(other, read_embedder_spec(other, "x")) != emb.fingerprint
    other = copy.deepcopy(engine.manifest)
    other["fidelity"] = {"note": "measured again"}  # what the manifest says about the vectors is not them
    assert fingerprint(other, spec) == emb.fingerprint


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["embedder"].pop("dim"), r"x\.engine: the manifest has no usable embedder section \(KeyError: 'dim'\)"),
    (lambda m: m["embedder"].update(inputs=list(INPUT_NAMES[:-1])), r"this sdk feeds \['pixels'"),
    (lambda m: m["preprocess"]["trace"].update(max_length=1), r"x\.engine: token budgets must be >= 2, .*trace 1"),
    (lambda m: m["preprocess"]["image"].update(size=-3), r"x\.engine: bad image preprocessing in the manifest"),
])
def test_a_broken_manifest_is_refused_naming_the_file_and_the_field(tiny_engine, edit, message):
    manifest = copy.deepcopy(EngineFile.read(tiny_engine.path).manifest)
    edit(manifest)
    with pytest.raises(EngineError, match=message):
        read_embedder_spec(manifest, "x.engine")


class _Out:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class _Graph:
    def __init__(self, ins, outs):
        self._ins, self._outs = ins, outs

    def get_inputs(self):
        return self._ins

    def get_outputs(self):
        return self._outs


def test_a_completion_graph_must_give_what_the_head_reads():
    ins = [_Out("token_states", ["b", "t", 8]), _Out("attention_mask", ["b", "t"])]
    check_completion_graph(_Graph(ins, [_Out("image_tokens", ["b", 4, 8])]), "e", 4, 8)
    # a skip-path head: the completion's skip term, if it writes one, has the head's width
    tok, skip = _Out("image_tokens", ["b", 4, 8]), _Out("image_skip", ["b", 16])
    check_completion_graph(_Graph(ins, [tok, skip]), "e", 4, 8, skip_dim=16)
    check_completion_graph(_Graph(ins, [tok]), "e", 4, 8, skip_dim=16)  # an older part: no term, allowed
    with pytest.raises(EngineError, match=r"image_skip has shape \['b', 16\]; the head adds \(batch, 32\)"):
        check_completion_graph(_Graph(ins, [tok, skip]), "e", 4, 8, skip_dim=32)
    with pytest.raises(EngineError, match="head has no skip path"):
        check_completion_graph(_Graph(ins, [tok, skip]), "e", 4, 8)
    with pytest.raises(EngineError, match=r"e: the completion graph gives image tokens of shape \['b', 5, 8\]"):
        check_completion_graph(_Graph(ins, [_Out("image_tokens", ["b", 5, 8])]), "e", 4, 8)
    with pytest.raises(EngineError, match=r"has inputs \['token_states'\]"):
        check_completion_graph(_Graph(ins[:1], [_Out("image_tokens", ["b", 4, 8])]), "e", 4, 8)


def test_each_layout_gets_its_runner(tiny_engine, tiny_split_engine):
    from sdk import Embedder
    from sdk.head import SplitRunner
    from sdk.runners import GraphRunner

    with Embedder(tiny_engine.path, threads=1) as single, Embedder(tiny_split_engine.path, threads=1) as split:
        assert isinstance(single._runner, GraphRunner) and isinstance(split._runner, SplitRunner)
        assert single.completes == split.completes == ()
        a, b = single.embed(texts=["red shoe"]), split.embed(texts=["red shoe"])
        assert a.shape == b.shape == (1, 32) and np.isfinite(a).all() and np.isfinite(b).all()


def test_count_tokens_counts_what_the_engine_reads(tiny_engine):
    from sdk import Embedder

    with Embedder(tiny_engine.path, threads=1) as emb:
        budget = emb.manifest["preprocess"]["text"]["max_length"]
        long = " ".join(["red"] * (budget + 20))
        short, cut = emb.count_tokens(["red shoe", long])
        assert 2 <= short < budget and cut == budget  # the budget counts the special tokens too
        assert emb.count_tokens([long], "trace")[0] > budget  # traces have a longer budget
        with pytest.raises(ValueError, match="field must be 'text' or 'trace', got 'title'"):
            emb.count_tokens(["x"], "title")
        with pytest.raises(InvalidInputError, match="texts must be a sequence with one entry per item, got a "
                                                    "single str; wrap it in a list"):
            emb.count_tokens("red shoe")
        with pytest.raises(InvalidInputError, match=r"texts\[1\] must be a str, got int"):
            emb.count_tokens(["red", 7])
        with pytest.raises(InvalidInputError, match=r"texts\[0\] is not valid Unicode"):
            emb.count_tokens(["\udcff"])

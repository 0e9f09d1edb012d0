"""Fixtures shared by the test packages. `tiny_engine`: a tiny embedder engine built in code (random
weights, nothing downloaded), exported once per session.

The graph is as in tests/export/conftest.py: tiny BERT (vocab 100) + `PooledImageTower` + a tiny
`FusionEmbedder` with its zero-initialised parameters moved off zero. The tokenizer is a
WordPiece one whose ids fit the tiny vocab (letters, digits, a few words).
"""

import string
from types import SimpleNamespace

import pytest

VOCAB = 100  # the tiny BERT vocabulary of tests/tiny_models.py

TEXT_MAX = 12  # small, so truncation is easy to trigger
TRACE_MAX = 16
WORDS = ["red", "blue", "black", "white", "shoe", "shoes", "shirt", "running", "cotton", "men", "women",
         "sport", "casual", "leather", "bag", "watch", "dress", "the", "and", "for"]


def tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for tok in [*string.ascii_lowercase, *("##" + c for c in string.ascii_lowercase), *string.digits, *WORDS]:
        vocab.setdefault(tok, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok.to_str()


def _tiny_graph():
    import torch
    from tiny_models import PooledImageTower, tiny_bert, tiny_fusion

    from sdk.export.onnx_embedder import EmbedderGraph

    torch.manual_seed(3)
    return EmbedderGraph(PooledImageTower(), tiny_bert(), tiny_fusion()).eval()


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """A tiny exported embedder: .path (engine), .graph (the torch EmbedderGraph), .tokenizer
    (tokenizer.json path), .text_max / .trace_max (token budgets), .words (single-token words)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from sdk.export.bundle import package_embedder
    from sdk.export.onnx_embedder import OnnxExportConfig, export_embedder_onnx
    from sdk.preprocess import ImagePreprocess

    folder = tmp_path_factory.mktemp("engine")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no stalls on a busy 2-core machine
    try:
        graph = _tiny_graph()
        onnx_path = export_embedder_onnx(
            graph, OnnxExportConfig(folder / "embedder.onnx", exporter="dynamo", num_threads=1,
                                    check_batches=((2, 5, 3),))
        )
    finally:
        torch.set_num_threads(before)
    tok_path = folder / "tokenizer.json"
    tok_path.write_text(tiny_tokenizer_json())
    engine = package_embedder(
        folder / "tiny.engine", onnx_path.read_bytes(), tok_path.read_bytes(), dim=32, matryoshka_dims=(16, 32),
        image=ImagePreprocess(size=224), text_max_length=TEXT_MAX, trace_max_length=TRACE_MAX,
    )
    return SimpleNamespace(path=engine, graph=graph, tokenizer=tok_path, text_max=TEXT_MAX, trace_max=TRACE_MAX,
                           words=list(WORDS))


@pytest.fixture(scope="session")
def tiny_split_engine(tmp_path_factory, tiny_engine):
    """The tiny embedder of `tiny_engine` (same weights) as a split engine: .path, .graph, .parity."""
    import json

    import torch

    from sdk.export.bundle import package_split_embedder
    from sdk.export.onnx_split import SplitExportConfig, export_split_onnx
    from sdk.preprocess import ImagePreprocess

    folder = tmp_path_factory.mktemp("split")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = export_split_onnx(tiny_engine.graph, SplitExportConfig(folder, num_threads=1,
                                                                       check_batches=((2, 5, 3), (7, 9, 4))))
    finally:
        torch.set_num_threads(before)
    engine = package_split_embedder(
        folder / "tiny_split.engine", paths["image"].read_bytes(), paths["text"].read_bytes(),
        paths["head"].read_bytes(), tiny_engine.tokenizer.read_bytes(), dim=32, matryoshka_dims=(16, 32),
        image=ImagePreprocess(size=224), text_max_length=TEXT_MAX, trace_max_length=TRACE_MAX,
    )
    parity = json.loads((folder / "split.parity.json").read_text())
    return SimpleNamespace(path=engine, graph=tiny_engine.graph, parity=parity, parts=paths)


@pytest.fixture(scope="session")
def tiny_int8_engines(tiny_engine, tiny_split_engine, tmp_path_factory):
    """The tiny split engine with both graphs dynamic INT8: {"per-tensor": path, "per-token": path}
    (ONNX Runtime's one activation scale per batch, and `sdk.export.per_token`'s one per token)."""
    from sdk.engine import EngineFile
    from sdk.export.bundle import package_split_embedder
    from sdk.export.quantize import fold_constants, quantize_int8
    from sdk.preprocess import ImagePreprocess

    d = tmp_path_factory.mktemp("int8_tiny")
    parts = tiny_split_engine.parts
    folded = {k: fold_constants(parts[k], d / f"{k}.folded.onnx") for k in ("image", "text")}
    engines = {}
    for acts, label in (("per-tensor", "int8-dynamic"), ("per-token", "int8-dynamic-per-token")):
        q = {k: quantize_int8(folded[k], d / f"{k}.{acts}.onnx", activations=acts) for k in folded}
        engines[acts] = package_split_embedder(
            d / f"{acts}.engine", q["image"].read_bytes(), q["text"].read_bytes(), parts["head"].read_bytes(),
            EngineFile.read(tiny_split_engine.path).part("tokenizer.json"), dim=32, matryoshka_dims=(16, 32),
            image=ImagePreprocess(size=224), text_max_length=tiny_engine.text_max,
            trace_max_length=tiny_engine.trace_max, precision=label)
    return engines


@pytest.fixture
def inactive_cuda(monkeypatch):
    """onnxruntime lists CUDAExecutionProvider but every session falls back to the CPU, as without
    the CUDA libraries. Returns the provider lists the sessions were asked for."""
    import onnxruntime as ort

    asked = []
    real_session, real_avail = ort.InferenceSession, ort.get_available_providers

    def session(model, opts, providers, **kw):
        asked.append(list(providers))
        return real_session(model, opts, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [*real_avail(), "CUDAExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    return asked

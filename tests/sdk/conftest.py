"""A tiny embedder engine built in code (random weights, nothing downloaded), exported once per session.

The graph is as in tests/export/conftest.py: tiny BERT (vocab 100) + `PooledImageTower` + a tiny
`FusionEmbedder` with its zero-initialised parameters moved off zero. The tokenizer is a
WordPiece one whose ids fit the tiny vocab (letters, digits, a few words).
"""

import string
from types import SimpleNamespace

import pytest

VOCAB = 100
TEXT_DIM = 16
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
    from torch import nn
    from transformers import BertConfig, BertModel

    from sdk.export.onnx_embedder import EmbedderGraph
    from sdk.train.embedder import EmbedderConfig, FusionEmbedder

    class PooledImageTower(nn.Module):
        """ImageTower contract: (B, 3, 224, 224) -> (B, 49, 1280), (B, 49, 152)."""

        def __init__(self):
            super().__init__()
            self.deep = nn.Linear(3, 1280)
            self.shallow = nn.Linear(3, 152)

        def forward(self, x):
            t = nn.functional.avg_pool2d(x, 32).flatten(2).transpose(1, 2)  # (B, 49, 3)
            return torch.relu(self.deep(t)), self.shallow(t)

    torch.manual_seed(3)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=TEXT_DIM, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)).eval()
    cfg = EmbedderConfig(variant="full", d_model=32, n_heads=4, image_dim=1280, shallow_dim=152,
                         text_dim=TEXT_DIM, n_image_tokens=49, n_image_layers=2, fire_hidden=16,
                         n_fusion_layers=2, out_dim=32, matryoshka_dims=(16, 32), dropout=0.0)
    fusion = FusionEmbedder(cfg)
    with torch.no_grad():  # zero-initialised paths (FIRE scale, out-projection) take part
        for p in fusion.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.5)
    return EmbedderGraph(PooledImageTower(), bert, fusion.eval()).eval()


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
    torch.set_num_threads(1)  # the CPU is shared with training jobs
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

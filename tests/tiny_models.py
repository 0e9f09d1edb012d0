"""Tiny models built in code for the tests (random weights, nothing downloaded). Needs torch."""

import pytest
import torch
from torch import nn

from sdk.train.fusion_model import EmbedderConfig, FusionEmbedder

VOCAB = 100
TEXT_DIM = 16


def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    return BertModel(cfg).eval()


def efficientnet_tower():
    """The real EfficientNet-Lite0 architecture in the ImageTower contract, random weights.

    At random init BatchNorm's running stats (0, 1) shrink the 1280-d map to ~1e-9, which would
    leave the image path untested; one train-mode pass over random pixels sets them to batch
    statistics (data-dependent init), so deep and shallow tokens vary with the image.
    """
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    from sdk.train.towers import ImageTower

    tower = ImageTower(efficientnet.EfficientNet.from_name("efficientnet-lite0"))
    for m in tower.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the batch statistics
    tower.train()
    with torch.no_grad():
        tower(torch.rand(4, 3, 224, 224) * 2 - 1)
    return tower.eval()


class PooledImageTower(nn.Module):
    """A cheap stand-in in the ImageTower contract: (B, 3, 224, 224) -> (B, 49, 1280), (B, 49, 152)."""

    def __init__(self):
        super().__init__()
        self.deep = nn.Linear(3, 1280)
        self.shallow = nn.Linear(3, 152)

    def forward(self, x):
        t = nn.functional.avg_pool2d(x, 32).flatten(2).transpose(1, 2)  # (B, 49, 3)
        return torch.relu(self.deep(t)), self.shallow(t)


def tiny_fusion(variant="full", skip_path=False):
    cfg = EmbedderConfig(variant=variant, d_model=32, n_heads=4, image_dim=1280, shallow_dim=152,
                         text_dim=TEXT_DIM, n_image_tokens=49, n_image_layers=2, fire_hidden=16,
                         n_fusion_layers=2, out_dim=32, matryoshka_dims=(16, 32), dropout=0.0, skip_path=skip_path)
    model = FusionEmbedder(cfg)
    # FIRE scale, the fusion out-projection and the skip path start at zero; move them off it, as
    # training does, so their paths are part of what parity checks.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.abs().sum():
                p.normal_(0, 0.5 if not name.startswith("skip_") else 0.05)
        if skip_path:
            for m in (model.skip_image, model.skip_text):
                m.set_stats(torch.randn(m.mean.shape) * 0.1, torch.rand(m.mean.shape) + 0.5)
    return model.eval()


def tiny_heads(folder):
    """Tiny attribute heads (article type, colour, gender) fitted on random 1280-d features and saved
    to `folder`: (module, the manifest's "heads" record)."""
    import numpy as np

    from sdk.export.reasoner_build import load_heads
    from sdk.train.attribute_heads import HeadConfig, fit, save_heads

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1280)).astype(np.float32)
    records = [{"article_type": ["Tshirts", "Shoes"][i % 2], "base_colour": ["Black", "White"][i % 3 > 0],
                "gender": "Men"} for i in range(40)]
    heads = fit(x, records, HeadConfig(hidden=8, epochs=20, min_count=2))
    return load_heads(save_heads(heads, folder, hidden=8), log=lambda *_: None)


def tiny_reasoner_export(folder, heads=None):
    """A tiny reasoner (adapters switched on) exported with `PooledImageTower`: (model, tower, paths, parity);
    `heads` (a module from `tiny_heads`) join its visual graph."""
    import json

    from sdk.export.onnx_reasoner import ReasonerExportConfig, export_reasoner_onnx
    from sdk.train.reasoner_model import Reasoner, ReasonerConfig

    torch.manual_seed(0)
    model = Reasoner(ReasonerConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_len=64, n_visual=4,
                                    dropout=0.0)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.fill_(0.8)  # adapters active, so the photo path is part of the check
    tower = PooledImageTower().eval()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = export_reasoner_onnx(tower, model, ReasonerExportConfig(folder, num_threads=1, check_new_tokens=12),
                                     heads=heads)
    finally:
        torch.set_num_threads(before)
    return model, tower, paths, json.loads((folder / "reasoner.parity.json").read_text())


def tiny_reasoner_tokenizer():
    from sdk.train.reasoner_model import TASKS, train_tokenizer

    return train_tokenizer(["red shoe blue shirt black watch title colour", *TASKS.values()] * 5, vocab_size=300)

"""Tiny models built in code for the tests (random weights, nothing downloaded). Needs torch."""

import pytest
import torch
from torch import nn

from sdk.train.embedder import EmbedderConfig, FusionEmbedder

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


def tiny_fusion(variant="full"):
    cfg = EmbedderConfig(variant=variant, d_model=32, n_heads=4, image_dim=1280, shallow_dim=152,
                         text_dim=TEXT_DIM, n_image_tokens=49, n_image_layers=2, fire_hidden=16,
                         n_fusion_layers=2, out_dim=32, matryoshka_dims=(16, 32), dropout=0.0)
    model = FusionEmbedder(cfg)
    # FIRE scale and the fusion out-projection start at zero; move them off it, as training does,
    # so their paths are part of what parity checks.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.abs().sum():
                p.normal_(0, 0.5)
    return model.eval()

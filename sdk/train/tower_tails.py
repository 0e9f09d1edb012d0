"""The pretrained towers' last layers, as the fusion model fine-tunes them: MiniLM's top BERT
layers (`MiniLMLayer`, state dicts named as in `transformers`) and EfficientNet-Lite0's last
blocks and head (`ImageTail`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_BLOCKS = 16  # EfficientNet-Lite0's MBConv blocks
NEG = -1e4  # additive mask value; finite so a fully masked row stays NaN-free


class _Dense(nn.Module):
    """Linear + LayerNorm of a BERT sub-layer, named as in `transformers` so state dicts match."""

    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)


class MiniLMLayer(nn.Module):
    """One post-LN BERT layer, by default all-MiniLM-L6-v2's (384 wide, 12 heads, GELU FFN of 1536).

    Its parameter names are those of `transformers`' BertLayer, so its state dict loads into the
    text tower's layer as it is (`towers.load_towers`) and the tower's layer loads into it.
    """

    def __init__(self, d: int = 384, n_heads: int = 12, d_ff: int = 1536, dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        self.h, self.drop = n_heads, dropout
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(d, d))
        self.attention.output = _Dense(d, d, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, d_ff)
        self.output = _Dense(d_ff, d, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d) token states; mask: (B, T) 1 = token, 0 = padding
        B, T, C = x.shape
        a = self.attention.self
        q, k, v = (m(x).view(B, T, self.h, C // self.h).transpose(1, 2) for m in (a.query, a.key, a.value))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.h))
        att = att + (1.0 - mask.to(att.dtype))[:, None, None, :] * NEG
        att = F.dropout(att.softmax(-1), self.drop, self.training)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        o = self.attention.output
        x = o.LayerNorm(F.dropout(o.dense(y), self.drop, self.training) + x)
        f = F.gelu(self.intermediate.dense(x))
        o = self.output
        return o.LayerNorm(F.dropout(o.dense(f), self.drop, self.training) + x)


class ImageTail(nn.Module):
    """The last `n_blocks` MBConv blocks of EfficientNet-Lite0 and its head (1x1 conv 1280, BN,
    ReLU6): the map entering those blocks (B, C, h, w; g x g for up to 4 blocks, 2g x 2g for 5,
    which include the last stride-2 block) -> deep tokens (B, g*g, 1280), as
    `towers.ImageTower` gives them. Its BatchNorms keep their running statistics (eval mode
    even while training), so the tower exports as it trains."""

    def __init__(self, n_blocks: int):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            from sdk.errors import BackendUnavailableError

            raise BackendUnavailableError("fine-tuned image blocks need efficientnet-lite-pytorch: "
                                          "pip install 'moon3-sdk[export]'") from exc
        net = EfficientNet.from_name("efficientnet-lite0")
        self.blocks = nn.ModuleList(list(net._blocks)[IMAGE_BLOCKS - n_blocks:])
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish
        self.train()  # BatchNorm in eval mode from the start

    def train(self, mode: bool = True) -> "ImageTail":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return self.act(self.bn1(self.conv_head(h))).flatten(2).transpose(1, 2)

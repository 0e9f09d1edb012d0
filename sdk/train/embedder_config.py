"""The embedder's architecture configuration (`EmbedderConfig`), validated on creation; the
model itself is `sdk.train.fusion_model`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from .tower_tails import IMAGE_BLOCKS

MAX_IMAGE_TUNED_BLOCKS = 5  # blocks 12-16: above the shallow taps (towers.SHALLOW_BLOCKS)


@dataclass
class EmbedderConfig:
    """Architecture of the trained part of the embedder (validated on creation)."""

    variant: str = "full"  # "full" | "no_fire" | "linear" (towers + linear projection only)
    d_model: int = 256
    n_heads: int = 4
    image_dim: int = 1280
    shallow_dim: int = 152
    text_dim: int = 384
    n_image_tokens: int = 49
    n_image_layers: int = 2
    fire_depths: tuple[int, ...] = (1, 2)  # FIRE after these image layers (1-based)
    fire_hidden: int = 128
    n_fusion_layers: int = 2
    ffn_mult: int = 4
    out_dim: int = 256
    matryoshka_dims: tuple[int, ...] = (64, 128, 256)
    dropout: float = 0.2
    # the towers this fusion model reads (a distilled student uses cheaper ones; see towers.load_towers)
    image_size: int = 224  # photo side in pixels; n_image_tokens = (image_size // 32) ** 2
    text_layers: int = 6  # MiniLM layers kept (the first ones)
    # the last `text_tuned_layers` of those were fine-tuned with this model: their weights are in
    # this model's state under `text_tail.*` and replace MiniLM's (towers.load_towers)
    text_tuned_layers: int = 0
    text_heads: int = 12  # the text tower's attention heads and FFN width (MiniLM's), for those layers
    text_ffn: int = 1536
    # the last `image_tuned_blocks` of EfficientNet-Lite0's 16 blocks and its head convolution were
    # fine-tuned with this model: their weights are in this model's state under `image_tail.*`
    image_tuned_blocks: int = 0
    # a skip path around the fusion: one linear map per modality from the towers' mean-pooled
    # features (photo: the image tower's deep map; title: the text tower's token states), added to
    # the head's output before the L2 norm, so what the frozen towers know stays reachable
    skip_path: bool = False
    # the title's skip term's weight in a vector that also has a photo (1: the same as in a title-only
    # vector). Photo + title vectors of unseen categories keep more of the text tower's own view of
    # the title with a larger weight; title-only and photo-only vectors do not change
    title_weight_with_photo: float = 1.0
    # a photo + title vector is normalise(fused + modality_blend * (photo-only + title-only)), the
    # three the same model's unit vectors (0: the fused vector alone). A title query then meets its
    # own title vector inside every catalog item and a photo query its photo vector, as in a sum of
    # per-modality projections, while the fused part adds what neither modality says alone
    modality_blend: float = 0.0
    # the title-only vector's weight in that blend, when it differs from the photo-only one's
    # (None: modality_blend for both). A title query meets its own title vector more strongly with
    # a larger one; a photo query its photo vector less
    title_blend: float | None = None

    def blend_weights(self) -> tuple[float, float]:
        """(photo-only, title-only) weights of the photo + title blend."""
        return self.modality_blend, self.modality_blend if self.title_blend is None else self.title_blend

    def __post_init__(self) -> None:
        self.fire_depths = tuple(int(k) for k in self.fire_depths)
        self.matryoshka_dims = tuple(int(k) for k in self.matryoshka_dims)
        if self.variant not in ("full", "no_fire", "linear"):
            raise ValueError(f"variant must be 'full', 'no_fire' or 'linear', got {self.variant!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.variant == "no_fire":
            self.fire_depths = ()
        if self.variant == "full" and len(self.fire_depths) < 2:
            raise ValueError(f"the full variant needs FIRE at >= 2 depths, got {self.fire_depths}")
        bad = [k for k in self.fire_depths if not 1 <= k <= self.n_image_layers]
        if bad:
            raise ValueError(f"fire_depths {bad} outside 1..n_image_layers={self.n_image_layers}")
        if not self.matryoshka_dims or self.matryoshka_dims[-1] != self.out_dim:
            raise ValueError(f"matryoshka_dims must end at out_dim={self.out_dim}, got {self.matryoshka_dims}")
        if list(self.matryoshka_dims) != sorted(set(self.matryoshka_dims)):
            raise ValueError(f"matryoshka_dims must be increasing, got {self.matryoshka_dims}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size < 64 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 64, got {self.image_size}")
        if self.text_layers < 1:
            raise ValueError(f"text_layers must be >= 1, got {self.text_layers}")
        if isinstance(self.text_tuned_layers, bool) or not 0 <= self.text_tuned_layers <= self.text_layers:
            raise ValueError(f"text_tuned_layers must be in 0..text_layers={self.text_layers}, "
                             f"got {self.text_tuned_layers!r}")
        if isinstance(self.image_tuned_blocks, bool) or not 0 <= self.image_tuned_blocks <= MAX_IMAGE_TUNED_BLOCKS:
            raise ValueError(f"image_tuned_blocks must be in 0..{MAX_IMAGE_TUNED_BLOCKS} (the blocks above the "
                             f"image tower's shallow taps), got {self.image_tuned_blocks!r}")
        if self.image_tuned_blocks and self.image_dim != 1280:
            raise ValueError("fine-tuned image blocks give EfficientNet-Lite0's 1280-d tokens; "
                             f"image_dim is {self.image_dim}")
        if self.skip_path and self.variant == "linear":
            raise ValueError("the 'linear' variant is a skip path already; skip_path needs 'full' or 'no_fire'")
        self.title_weight_with_photo = float(self.title_weight_with_photo)
        if not (math.isfinite(self.title_weight_with_photo) and self.title_weight_with_photo > 0):
            raise ValueError(f"title_weight_with_photo must be a finite number > 0, got {self.title_weight_with_photo}")
        if self.title_weight_with_photo != 1.0 and not self.skip_path:
            raise ValueError("title_weight_with_photo weighs the skip path's title term: it needs skip_path")
        self.modality_blend = float(self.modality_blend)
        if not (math.isfinite(self.modality_blend) and self.modality_blend >= 0):
            raise ValueError(f"modality_blend must be a finite number >= 0, got {self.modality_blend}")
        if self.title_blend is not None:
            self.title_blend = float(self.title_blend)
            if not (math.isfinite(self.title_blend) and self.title_blend >= 0):
                raise ValueError(f"title_blend must be a finite number >= 0 or None, got {self.title_blend}")
        if any(self.blend_weights()) and self.variant == "linear":
            raise ValueError("the 'linear' variant sums its modalities already; modality_blend needs 'full' or 'no_fire'")
        if (self.text_tuned_layers or self.image_tuned_blocks) and self.variant == "linear":
            raise ValueError("the 'linear' variant cannot fine-tune tower layers")
        if self.text_tuned_layers and (self.text_heads < 1 or self.text_dim % self.text_heads or self.text_ffn < 1):
            raise ValueError(f"text_dim ({self.text_dim}) must split into text_heads ({self.text_heads}) heads, "
                             f"text_ffn ({self.text_ffn}) >= 1")

    @property
    def text_tuned_first(self) -> int:
        """Index (0-based) of the first fine-tuned MiniLM layer: the layers below it are frozen."""
        return self.text_layers - self.text_tuned_layers

    @property
    def image_tuned_first(self) -> int:
        """Index (0-based) of the first fine-tuned EfficientNet block."""
        return IMAGE_BLOCKS - self.image_tuned_blocks

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "EmbedderConfig":
        return cls(**json.loads(text))

"""The end-to-end reference embedder in PyTorch: raw photos and text -> 256-d vectors.

Composes the frozen towers (`towers.py`) with the trained fusion model (`embedder.py`) and the
SDK's own preprocessing (`sdk.preprocess`), so it is the FP32 teacher every compiled engine is
measured against.

    from sdk.train.reference import ReferenceEmbedder
    ref = ReferenceEmbedder()                     # the committed weights in sdk/train/weights
    v = ref.embed(images=["shoe.jpg", None], texts=[None, "red running shoes"])  # (2, 256)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sdk.errors import InvalidInputError
from sdk.ops import check_dim, l2_normalize
from sdk.preprocess import ImagePreprocess, TextTokenizer, image_to_array, load_image

from ..paths import WEIGHTS
from .features import TITLE_LEN, TRACE_LEN
from .fusion_model import IMAGE, TEXT, TRACE, load_embedder
from .towers import load_towers, text_tower_path


class ReferenceEmbedder:
    """FP32 PyTorch teacher: towers + fusion. Thread-unsafe; CPU."""

    def __init__(self, weights: str | Path = WEIGHTS, text_max_length: int = TITLE_LEN,
                 trace_max_length: int = TRACE_LEN):
        self.model = load_embedder(weights)
        self.metrics = json.loads((Path(weights) / "embedder.json").read_text()).get("metrics", {})
        self.image_tower, self.text_tower = load_towers(self.model.cfg, self.model)
        self.tokenizer = TextTokenizer(text_tower_path() / "tokenizer.json", text_max_length)
        self.trace_tokenizer = TextTokenizer(text_tower_path() / "tokenizer.json", trace_max_length)
        self.preprocess = ImagePreprocess(size=self.model.cfg.image_size)
        self.dim = self.model.cfg.out_dim

    @torch.no_grad()
    def embed(
        self,
        images: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
        traces: Sequence[str | None] | None = None,
        dim: int | None = None,
        batch_size: int = 32,
    ) -> np.ndarray:
        """Embed items; item i uses images[i], texts[i] and traces[i] where not None.

        Returns:
            (N, dim) float32, L2-normalised (a Matryoshka prefix when dim < 256).

        Raises:
            InvalidInputError: an item has no modality, or an image cannot be decoded.
        """
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        given = [x for x in (images, texts, traces) if x is not None]
        n = len(given[0]) if given else 0
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        traces = list(traces) if traces is not None else [None] * n
        if not len(images) == len(texts) == len(traces):
            raise InvalidInputError(
                f"images, texts and traces must have one entry per item, got {len(images)}, {len(texts)}, {len(traces)}"
            )
        dim = check_dim(dim, self.dim)
        out = np.zeros((n, self.dim), np.float32)
        for s in range(0, n, batch_size):
            out[s : s + batch_size] = self._embed_batch(
                images[s : s + batch_size], texts[s : s + batch_size], traces[s : s + batch_size], s
            )
        return l2_normalize(out, dim) if dim < self.dim else out

    def _text_states(self, texts: list[str | None], tokenizer: TextTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states and mask (B, T, C), (B, T) of the items that have a text; the text tower
        runs on those rows only (none: zeros of length 1), the others are zeros with a zero mask."""
        rows = [i for i, t in enumerate(texts) if t]
        c = self.model.cfg.text_dim
        if not rows:
            return torch.zeros(len(texts), 1, c), torch.zeros(len(texts), 1)
        ids, mask = tokenizer([texts[i] for i in rows])
        h = self.text_tower(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        states, mask_t = torch.zeros(len(texts), ids.shape[1], c), torch.zeros(len(texts), ids.shape[1])
        states[rows], mask_t[rows] = h, torch.from_numpy(mask).float()
        return states, mask_t

    def _image_inputs(self, pix: np.ndarray, rows: list[int]):
        """(deep, shallow, image tokens) for the batch: the image tower and the fusion model's image
        encoder run on the rows with a photo only (as a user's own torch code would); the other
        rows are zeros, which the fusion never reads for an absent photo."""
        cfg, B = self.model.cfg, len(pix)
        deep = torch.zeros(B, cfg.n_image_tokens, cfg.image_dim)
        shallow = torch.zeros(B, cfg.n_image_tokens, cfg.shallow_dim)
        if rows:
            deep[rows], shallow[rows] = self.image_tower(torch.from_numpy(pix[rows]))
        tok = self.model.encode_image(deep[rows], shallow[rows])
        tokens = torch.zeros(B, *tok.shape[1:])
        tokens[rows] = tok
        return deep, shallow, tokens

    def _embed_batch(self, images, texts, traces, offset: int) -> np.ndarray:
        B = len(images)
        for i in range(B):
            for kind, seq in (("text", texts), ("trace", traces)):
                if seq[i] is not None and not isinstance(seq[i], str):
                    raise InvalidInputError(f"item {offset + i}: {kind} must be str or None, got {type(seq[i]).__name__}")
            if images[i] is None and not (texts[i] or "").strip() and not (traces[i] or "").strip():
                raise InvalidInputError(f"item {offset + i}: no image and no text; give at least one modality")
        pix = np.zeros((B, 3, self.preprocess.size, self.preprocess.size), np.float32)
        present = torch.zeros(B, 3)
        for i, src in enumerate(images):
            if src is not None:
                pix[i] = image_to_array(load_image(src, name=f"item {offset + i} image"), self.preprocess)
                present[i, IMAGE] = 1.0
        texts = [t if t and t.strip() else None for t in texts]
        traces = [t if t and t.strip() else None for t in traces]
        present[:, TEXT] = torch.tensor([t is not None for t in texts], dtype=torch.float32)
        present[:, TRACE] = torch.tensor([t is not None for t in traces], dtype=torch.float32)
        deep, shallow, image_tokens = self._image_inputs(pix, [i for i in range(B) if present[i, IMAGE]])
        text_tok, text_mask = self._text_states(texts, self.tokenizer)
        trace_tok, trace_mask = self._text_states(traces, self.trace_tokenizer)
        e = self.model(deep, shallow, text_tok, text_mask, trace_tok, trace_mask, present, image_tokens=image_tokens)
        return e.numpy()

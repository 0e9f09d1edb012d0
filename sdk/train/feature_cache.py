"""The training feature cache in memory (`sdk.train.features` writes it) and what training reads
from it: each step's model inputs (`batch_inputs`), the towers' pooled features and their
statistics, per-row keys of catalog fields (one design, one article type), the training rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .catalog import SPLIT_RULE, catalog_split, legacy_is_validation, normalize_title
from .fusion_model import IMAGE, TEXT, TRACE, masked_mean


class Features:
    """Cached tower features in memory (fp16), with per-row lookups as fp32 tensors."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise FileNotFoundError(f"no feature cache in {folder}: run python -m sdk.train.features first")
        self.meta = json.loads((folder / "meta.json").read_text())
        load = lambda name: torch.from_numpy(np.load(folder / f"{name}.npy"))  # noqa: E731
        self.ids = np.asarray(self.meta["ids"], np.int64)
        self.deep, self.shallow, self.has_image = load("img_deep"), load("img_shallow"), load("has_image")
        self.title, self.title_mask = load("title_tok"), load("title_mask")
        self.detail, self.detail_mask = load("detail_tok"), load("detail_mask")
        self.flip_rows = np.load(folder / "val_flip_rows.npy")
        self.is_val = self._validation_mask(folder)
        self.deep_flip, self.shallow_flip = load("img_deep_flip"), load("img_shallow_flip")
        self.traces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_layers = int(self.meta.get("text_layers", 6))
        # the map entering the image tower's last blocks (sdk.train.features --image-mid-blocks)
        self.mid_block = self.meta.get("image_mid_block")
        self.mid = self.mid_flip = None
        if self.mid_block is not None:
            self.mid, self.mid_flip = load("img_mid"), load("img_mid_flip")
        self.text_model: nn.Module | None = None
        self.image_model: nn.Module | None = None
        # renditions and field captions (sdk.train.features --renditions K), memory-mapped
        self.renditions = int(self.meta.get("renditions", 0))
        self.deep_aug = self.shallow_aug = self.caption = self.caption_mask = None
        if self.renditions:
            mm = lambda name: np.load(folder / f"{name}.npy", mmap_mode="r")  # noqa: E731
            self.deep_aug, self.shallow_aug = mm("img_deep_aug"), mm("img_shallow_aug")
            self.caption, self.caption_mask = mm("caption_tok"), mm("caption_mask")

    def _validation_mask(self, folder: Path) -> np.ndarray:
        """Validation rows: the ids the cache recorded (its catalog's leak-free split); for a cache
        written before the split was recorded, the split of the catalog it names; a cache with no
        catalog (no titles, no photos to group by) puts the ids ending in 0 in validation."""
        if "validation_ids" in self.meta:
            mask = np.isin(self.ids, np.asarray(self.meta["validation_ids"], np.int64))
        elif self.meta.get("catalog"):
            if not (Path(self.meta["catalog"]) / "items.jsonl").is_file():
                raise FileNotFoundError(f"the feature cache in {folder} records no split and its catalog "
                                        f"{self.meta['catalog']} is gone: rebuild it (python -m sdk.train.features)")
            mask = catalog_split(self.meta["catalog"]).mask(self.ids)
        else:
            mask = np.array([legacy_is_validation(i) for i in self.ids], dtype=bool)
        with_photo = np.flatnonzero(mask & self.has_image.numpy().astype(bool))
        if not np.isin(with_photo, self.flip_rows).all():
            raise ValueError(f"the feature cache in {folder} was written for another train/validation split "
                             f"(validation photos without their flipped view): rebuild it with "
                             f"python -m sdk.train.features (split {SPLIT_RULE})")
        return mask

    def tune_with(self, model: nn.Module) -> "Features":
        """Run `model`'s fine-tuned tower layers over the cache in every `batch_inputs` from now
        on: its last text layers (`text_tuned_layers`) over the cached title and description
        states, which must be those of the layers below them, and its last image blocks
        (`image_tuned_blocks`) over the cached map entering them. A model without such layers
        detaches any earlier one."""
        cfg = model.cfg
        tuned, blocks = cfg.text_tuned_layers, cfg.image_tuned_blocks
        if tuned and self.text_layers != cfg.text_tuned_first:
            raise ValueError(f"the feature cache holds the states after {self.text_layers} MiniLM layers; a model that "
                             f"fine-tunes layers {cfg.text_tuned_first + 1}..{cfg.text_layers} needs the states after "
                             f"{cfg.text_tuned_first} (sdk.train.features --text-layers {cfg.text_tuned_first})")
        if blocks and self.mid_block != cfg.image_tuned_first:
            held = "no image map" if self.mid_block is None else f"the map entering block {self.mid_block + 1}"
            raise ValueError(f"the feature cache holds {held}; a model that fine-tunes the image tower's last {blocks} "
                             f"blocks needs the map entering block {cfg.image_tuned_first + 1} "
                             f"(sdk.train.features --image-mid-blocks {blocks})")
        self.text_model = model if tuned else None
        self.image_model = model if blocks else None
        return self

    def load_traces(self, folder: str | Path, views=("photo+title", "title", "photo")) -> None:
        """Attach the reasoner's traces (MiniLM token states per view) from `sdk.train.traces`."""
        folder = Path(folder)
        for view in views:
            lines = (folder / f"{view}.jsonl").read_text(encoding="utf-8").splitlines()
            ids = [json.loads(line)["id"] for line in lines if line.strip()]
            if ids != [int(i) for i in self.ids]:
                raise ValueError(f"{folder / view}.jsonl rows do not match the feature cache's ids")
            tok = torch.from_numpy(np.load(folder / f"{view}_tok.npy"))
            self.traces[view] = (tok, torch.from_numpy(np.load(folder / f"{view}_mask.npy")))

    def __len__(self) -> int:
        return len(self.ids)


def batch_inputs(f: Features, rows, *, image: bool, text: str | None, flip: bool = False, image_features=None,
                 trace: str | None = None, trace_keep: torch.Tensor | None = None, text_states=None):
    """Model inputs for rows: image on/off, text None/'title'/'detail', trace None or a view of
    `f.traces` (rows with `trace_keep` 0 go without it).

    `image_features` (deep, shallow) and `text_states` (tokens, mask of the same text) of these
    rows from an earlier call are reused as they are, so the views of one training step gather
    the features, and run fine-tuned text layers, once.
    """
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    B = len(rows)
    if image_features is not None:
        deep, shallow = image_features
    elif flip:
        pos = {int(r): i for i, r in enumerate(f.flip_rows)}
        sel = torch.tensor([pos[int(r)] for r in rows], dtype=torch.long)
        deep, shallow = f.deep_flip[sel].float(), f.shallow_flip[sel].float()
        if f.image_model is not None and image:
            deep = f.image_model.tune_image(f.mid_flip[sel].float())
    else:
        deep, shallow = f.deep[rows].float(), f.shallow[rows].float()
        if f.image_model is not None and image:  # a view without the photo never reads them
            deep = f.image_model.tune_image(f.mid[rows].float())
    if text_states is not None:
        tok, mask = text_states
    else:
        if text == "detail":
            tok, mask = f.detail[rows].float(), f.detail_mask[rows].float()
        else:
            tok, mask = f.title[rows].float(), f.title_mask[rows].float()
        t = int(mask.sum(1).max().clamp(min=1))
        tok, mask = tok[:, :t], mask[:, :t]
        if text is not None and f.text_model is not None:
            tok = f.text_model.tune_text(tok, mask)
    present = torch.zeros(B, 3)
    present[:, IMAGE] = f.has_image[rows].float() if image else 0.0
    if text is not None:
        present[:, TEXT] = 1.0
    else:
        mask = torch.zeros_like(mask)
    if trace is None:
        trace_tok, trace_mask = torch.zeros(B, 1, tok.shape[-1]), torch.zeros(B, 1)
    else:
        trace_tok, trace_mask = f.traces[trace][0][rows].float(), f.traces[trace][1][rows].float()
        if trace_keep is not None:
            trace_mask = trace_mask * trace_keep[:, None]
        s = int(trace_mask.sum(1).max().clamp(min=1))
        trace_tok, trace_mask = trace_tok[:, :s], trace_mask[:, :s]
        present[:, TRACE] = (trace_mask.sum(1) > 0).float()
    return deep, shallow, tok, mask, trace_tok, trace_mask, present


@torch.no_grad()
def embed_rows(model, f: Features, rows, *, image: bool, text: str | None, flip: bool = False, trace: str | None = None,
               bs: int = 256):
    model.eval()
    out = [model(*batch_inputs(f, rows[i : i + bs], image=image, text=text, flip=flip, trace=trace))
           for i in range(0, len(rows), bs)]
    return torch.cat(out)


def with_photo(f: Features, rows: np.ndarray) -> np.ndarray:
    """The rows of `rows` whose product has a photo."""
    return rows[f.has_image[torch.as_tensor(rows)].numpy().astype(bool)]


def pooled_photo(f: Features, rows: torch.Tensor) -> torch.Tensor:
    """The image tower's mean-pooled deep features of `rows` (B, C): what the skip path and the
    probe read of a photo."""
    return f.deep[rows].float().mean(1)


def pooled_title(f: Features, rows: torch.Tensor) -> torch.Tensor:
    """The text tower's mean title states of `rows` (B, C), padding left out."""
    return masked_mean(f.title[rows].float(), f.title_mask[rows].float())


def pooled_stats(f: Features, rows: np.ndarray, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the image tower's mean-pooled deep features over `rows` that
    have a photo: what standardises the tower's own view of a photo (the relational term)."""
    rows = with_photo(f, rows)
    return _mean_std(lambda r: pooled_photo(f, r), rows, chunk)


def title_stats(f: Features, rows: np.ndarray, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the text tower's mean-pooled title states over `rows`."""
    return _mean_std(lambda r: pooled_title(f, r), rows, chunk)


def _mean_std(pool, rows: np.ndarray, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (+1e-6) of `pool(row indices)` (B, C) over `rows`, `chunk` at a time."""
    pooled = torch.cat([pool(torch.as_tensor(rows[s : s + chunk])) for s in range(0, len(rows), chunk)])
    return pooled.mean(0), pooled.std(0) + 1e-6


def standardized(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Pooled tower features (B, C), standardised by `stats` and L2-normalised."""
    return F.normalize((x - stats[0]) / stats[1], dim=-1)


def row_values(f: Features, catalog: str | Path, value) -> list:
    """`value(product)` of each cached row's product, in row order."""
    from .catalog import read_catalog

    got = {p.id: value(p) for p in read_catalog(catalog)}
    return [got[int(i)] for i in f.ids]


def value_keys(values: list) -> np.ndarray:
    """An integer per value; equal values share one."""
    index: dict = {}
    return np.array([index.setdefault(v, len(index)) for v in values])


def field_keys(f: Features, catalog: str | Path | None, value) -> np.ndarray:
    """Integer key per row of `value(product)` (rows with equal values share a key); without a
    catalog every row gets 0."""
    if catalog is None:
        return np.zeros(len(f), np.int64)
    return value_keys(row_values(f, catalog, value))


def title_keys(f: Features, catalog: str | Path | None) -> np.ndarray:
    """Integer key per row: rows sharing a normalised title (one design) share a key (without a
    catalog, the row index)."""
    if catalog is None:
        return np.arange(len(f))
    return field_keys(f, catalog, lambda p: normalize_title(p.title))


def labelled_rows(f: Features, catalog: str | Path, value) -> tuple[np.ndarray, np.ndarray]:
    """(integer key per row of `value(product)`, whether the product has a value at all)."""
    vals = [str(v or "") for v in row_values(f, catalog, value)]
    return value_keys(vals), np.array([bool(v) for v in vals])


def article_types(f: Features, catalog: str | Path | None) -> np.ndarray:
    return field_keys(f, catalog, lambda p: p.article_type)


def training_rows(f: Features, catalog, holdout_master_category: str | None = None) -> np.ndarray:
    """The feature rows of the training split, less the products of `holdout_master_category`."""
    rows = np.flatnonzero(~f.is_val)
    if holdout_master_category is None:
        return rows
    if catalog is None:
        raise ValueError("holdout_master_category needs the catalog (its master categories)")
    from .catalog import read_catalog

    cats = {p.id: p.record.get("master_category") or "" for p in read_catalog(catalog)}
    held = np.array([cats[int(i)] == holdout_master_category for i in f.ids])
    if not held.any():
        raise ValueError(f"no product is in master category {holdout_master_category!r}")
    return rows[~held[rows]]

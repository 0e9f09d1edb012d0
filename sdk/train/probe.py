"""The linear probe: one linear map per modality over the frozen towers' mean-pooled features,
trained with symmetric InfoNCE (its learning rate and epoch count picked on a group-held-out dev
slice of the training split), the simple alternative at the same deployment cost that the
validation suite (`sdk.train.evaluate`) reports every subject beside; and the frozen towers it
reads (`FrozenTowers`, remembering each photo's maps so the suite runs EfficientNet once a photo)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .catalog import Product, Split, normalize_title
from .metrics import normalize_rows, recall_at_k


class MemoImageTower:
    """An image tower that remembers its (deep, shallow) maps per input photo (keyed by the pixel
    bytes), so the suite runs EfficientNet once per photo and rendition for the probe and every
    PyTorch subject that reads the same tower (224 px, no fine-tuned blocks)."""

    def __init__(self, tower):
        self.tower, self.memo = tower, {}
        self.grid = getattr(tower, "grid", 7)

    def __call__(self, x):
        import hashlib

        import torch

        keys = [hashlib.sha1(row.numpy().tobytes()).digest() for row in x]  # x: (B, 3, H, W)
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            with torch.no_grad():
                deep, shallow = self.tower(x[todo])
            for j, i in enumerate(todo):
                self.memo[keys[i]] = (deep[j].clone(), shallow[j].clone())
        return torch.stack([self.memo[k][0] for k in keys]), torch.stack([self.memo[k][1] for k in keys])


class ProbeTowers(Protocol):
    """Frozen features a linear probe reads: (N, Di) per photo and (N, Dt) per text."""

    def image_features(self, images: Sequence) -> np.ndarray: ...

    def text_features(self, texts: Sequence[str]) -> np.ndarray: ...


class FrozenTowers:
    """The default engine's pretrained towers as they come: EfficientNet-Lite0's final 1280-d map
    mean-pooled (224 px, the engine's preprocessing) and MiniLM-L6's token states mean-pooled."""

    def __init__(self, batch_size: int = 32):
        from sdk.preprocess import ImagePreprocess, TextTokenizer

        from .features import TITLE_LEN
        from .towers import load_image_tower, load_text_tower, text_tower_path

        self.image, self.text = MemoImageTower(load_image_tower()), load_text_tower()
        self.preprocess = ImagePreprocess()
        self.tokenizer = TextTokenizer(text_tower_path() / "tokenizer.json", TITLE_LEN)
        self.batch_size = batch_size

    def image_features(self, images: Sequence) -> np.ndarray:
        import torch

        from sdk.preprocess import image_to_array, load_image

        out = []
        with torch.no_grad():
            for s in range(0, len(images), self.batch_size):
                x = np.stack([image_to_array(load_image(im), self.preprocess) for im in images[s : s + self.batch_size]])
                out.append(self.image(torch.from_numpy(x))[0].mean(1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1280), np.float32)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(texts), 256):
                ids, mask = self.tokenizer(list(texts[s : s + 256]))
                h = self.text(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
                m = torch.from_numpy(mask).float()[..., None]
                out.append(((h * m).sum(1) / m.sum(1).clamp(min=1.0)).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


@dataclass
class ProbeConfig:
    """How the linear probe trains (validated on creation)."""

    dim: int = 256
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    max_epochs: int = 40
    batch_size: int = 512
    temperature: float = 0.05
    weight_decay: float = 1e-4
    dev_fraction: float = 0.1  # of the training split's groups, to pick lr and epochs
    seed: int = 0

    def __post_init__(self) -> None:
        self.lrs = tuple(float(x) for x in self.lrs)
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"ProbeConfig.lrs must be positive learning rates, got {self.lrs}")
        if self.max_epochs < 1 or self.batch_size < 2 or self.dim < 1:
            raise ValueError(f"ProbeConfig: max_epochs >= 1, batch_size >= 2, dim >= 1, got {self}")
        if not 0.0 < self.temperature < 1.0 or not 0.0 < self.dev_fraction < 0.5:
            raise ValueError(f"ProbeConfig: temperature in (0, 1), dev_fraction in (0, 0.5), got {self}")


class LinearProbe:
    """One linear map per modality over frozen features, L2-normalised; photo + title is the
    normalised sum of both vectors. A `Subject`."""

    def __init__(self, towers: ProbeTowers, w_img: np.ndarray, w_txt: np.ndarray, stats: dict[str, np.ndarray]):
        self.towers, self.w_img, self.w_txt, self.stats = towers, w_img, w_txt, stats

    def _project(self, x: np.ndarray, kind: str) -> np.ndarray:
        x = (x - self.stats[f"{kind}_mean"]) / self.stats[f"{kind}_std"]
        w = self.w_img if kind == "img" else self.w_txt
        return normalize_rows(np.concatenate([x, np.ones((len(x), 1), x.dtype)], 1) @ w)

    def embed(self, images: Sequence | None = None, texts: Sequence[str | None] | None = None) -> np.ndarray:
        n = len(images if images is not None else texts)
        out = np.zeros((n, self.w_img.shape[1]), np.float32)
        for kind, seq in (("img", images), ("txt", texts)):
            rows = [i for i in range(n) if seq is not None and seq[i] is not None]
            if rows:
                feats = (self.towers.image_features if kind == "img" else self.towers.text_features)([seq[i] for i in rows])
                out[rows] += self._project(np.asarray(feats, np.float32), kind)
        return normalize_rows(out)


def train_probe(img: np.ndarray, txt: np.ndarray, title_key: np.ndarray, group: np.ndarray, towers: ProbeTowers,
                cfg: ProbeConfig = ProbeConfig(), log=print) -> tuple[LinearProbe, dict]:
    """Train the linear probe on paired (photo, title) features of training products.

    The learning rate and epoch count are picked by mean R@10 (both directions) on a dev slice of
    whole groups (`group`), then the probe is retrained on every row with them.

    Returns:
        (probe, report): the report holds the sweep's curves and the pick.
    """
    import torch
    import torch.nn.functional as F

    img, txt = np.asarray(img, np.float32), np.asarray(txt, np.float32)
    if len(img) != len(txt) or len(img) < cfg.batch_size // 4:
        raise ValueError(f"the probe needs paired photo and title features of at least {cfg.batch_size // 4} "
                         f"products, got {len(img)} photos and {len(txt)} titles")
    rng = np.random.default_rng(cfg.seed)
    groups = np.unique(group)
    dev_groups = rng.choice(groups, size=max(1, round(len(groups) * cfg.dev_fraction)), replace=False)
    dev = np.isin(group, dev_groups)

    def fit(rows: np.ndarray, lr: float, epochs: int, eval_rows: np.ndarray | None):
        torch.manual_seed(cfg.seed)
        stats = {"img_mean": img[rows].mean(0), "img_std": img[rows].std(0) + 1e-6,
                 "txt_mean": txt[rows].mean(0), "txt_std": txt[rows].std(0) + 1e-6}
        xi = torch.from_numpy((img - stats["img_mean"]) / stats["img_std"])
        xt = torch.from_numpy((txt - stats["txt_mean"]) / stats["txt_std"])
        li, lt = torch.nn.Linear(img.shape[1], cfg.dim), torch.nn.Linear(txt.shape[1], cfg.dim)
        opt = torch.optim.AdamW([*li.parameters(), *lt.parameters()], lr=lr, weight_decay=cfg.weight_decay)
        keys = torch.from_numpy(title_key)
        curve, order_rng = [], np.random.default_rng(cfg.seed)
        for epoch in range(epochs):
            perm = rows[order_rng.permutation(len(rows))]
            total = 0.0
            for s in range(0, len(perm) - 1, cfg.batch_size):
                b = torch.from_numpy(perm[s : s + cfg.batch_size])
                if len(b) < 2:
                    continue
                a, t = F.normalize(li(xi[b]), dim=-1), F.normalize(lt(xt[b]), dim=-1)
                logits = a @ t.T / cfg.temperature
                same = (keys[b][:, None] == keys[b][None, :]) & ~torch.eye(len(b), dtype=torch.bool)
                logits = logits.masked_fill(same, -1e4)
                target = torch.arange(len(b))
                loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            point = {"epoch": epoch + 1, "loss": round(total / len(rows), 4)}
            if eval_rows is not None:
                with torch.no_grad():
                    a = F.normalize(li(xi[eval_rows]), dim=-1).numpy()
                    t = F.normalize(lt(xt[eval_rows]), dim=-1).numpy()
                k = title_key[eval_rows]
                r_it, r_ti = recall_at_k(a, t, k, k), recall_at_k(t, a, k, k)
                point["dev_R@10"] = round((r_it["R@10"] + r_ti["R@10"]) / 2, 4)
            curve.append(point)
        w = lambda lin: np.concatenate([lin.weight.detach().numpy().T, lin.bias.detach().numpy()[None]], 0)  # noqa: E731
        return LinearProbe(towers, w(li), w(lt), stats), curve

    train_rows, dev_rows = np.flatnonzero(~dev), np.flatnonzero(dev)
    sweep = {}
    for lr in cfg.lrs:
        _, curve = fit(train_rows, lr, cfg.max_epochs, dev_rows)
        sweep[str(lr)] = curve
        best = max(curve, key=lambda p: p["dev_R@10"])
        log(f"probe lr={lr:g}: best dev R@10 {best['dev_R@10']} at epoch {best['epoch']}")
    lr, best = max(((float(lr), max(c, key=lambda p: p["dev_R@10"])) for lr, c in sweep.items()),
                   key=lambda x: x[1]["dev_R@10"])
    probe, curve = fit(np.arange(len(img)), lr, best["epoch"], None)
    report = {"lr": lr, "epochs": best["epoch"], "dev_R@10": best["dev_R@10"], "train_products": int(len(img)),
              "dev_products": int(len(dev_rows)), "sweep": sweep, "final_curve": curve, "config": asdict(cfg)}
    return probe, report


def probe_features(products: Sequence[Product], towers: ProbeTowers, features: str | Path | None, log=print):
    """(image, title) probe features of products that have a photo: pooled from a feature cache of
    the same catalog (`sdk.train.features`, 224 px, all MiniLM layers) when given, else computed."""
    if features is not None:
        folder = Path(features)
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("image_size", 224) != 224 or meta.get("text_layers", 6) != 6:
            raise ValueError(f"{folder} caches a student's towers ({meta.get('image_size')} px, "
                             f"{meta.get('text_layers')} MiniLM layers); the probe reads the full towers")
        row = {int(i): r for r, i in enumerate(meta["ids"])}
        missing = [p.id for p in products if p.id not in row]
        if missing:
            raise ValueError(f"{folder} holds no features for {len(missing)} products (e.g. id {missing[0]}): "
                             "it was written for another catalog")
        rows = np.array([row[p.id] for p in products])
        deep = np.load(folder / "img_deep.npy", mmap_mode="r")
        img = np.stack([deep[r].astype(np.float32).mean(0) for r in rows])
        tok, mask = np.load(folder / "title_tok.npy", mmap_mode="r"), np.load(folder / "title_mask.npy")[rows]
        m = mask[..., None].astype(np.float32)
        txt = np.stack([tok[r].astype(np.float32) for r in rows])
        return img, (txt * m).sum(1) / np.maximum(m.sum(1), 1.0)
    log(f"probe features: {len(products)} training photos and titles through the frozen towers")
    return towers.image_features([p.image for p in products]), towers.text_features([p.title for p in products])


def train_probe_on(products: Sequence[Product], split: Split, towers: ProbeTowers, features, probe_cfg: ProbeConfig,
                   log=print) -> tuple[LinearProbe, dict]:
    """The probe trained on the training-split products of `products` that have a photo."""
    train = [p for p in products if p.image is not None and not split.is_validation(p.id)]
    img, txt = probe_features(train, towers, features, log)
    titles: dict[str, int] = {}
    key = np.array([titles.setdefault(normalize_title(p.title), len(titles)) for p in train])
    group = np.array([split.group[p.id] for p in train])
    return train_probe(img, txt, key, group, towers, probe_cfg, log)

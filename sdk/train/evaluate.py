"""The validation suite: task families on the catalog's leak-free split, each beside a linear probe.

    python -m sdk.train.evaluate --catalog ../shared/data/catalog --features .cache/features \
        --subject teacher=sdk/train/weights --subject engine=moon3.engine \
        --ood-subject teacher=.cache/holdout_footwear --out docs/results/suite.json

A subject is a trained embedder folder (`embedder.json` + safetensors: the PyTorch teacher or a
student, run end to end by `ReferenceEmbedder`) or a compiled engine (`*.engine`, run through the
torch-free runtime `sdk.Embedder`). Every subject is scored on the same validation products
(`catalog.Split`: no normalised title and no photo on both sides) and the families:

- cross_modal: title -> photo and photo -> title, R@1/R@10 (relevant: the same normalised title,
  which includes the product itself); also on the old id split's products, once, for continuity;
- renditions: each validation photo degraded (`RENDITIONS`: 60x80 thumbnail and back, JPEG
  quality 20, 70% centre crop, grayscale) against the full photos, image only, R@1/R@10
  (relevant: the same photo);
- zero_shot: photo -> nearest class prompt ("a photo of a {label}", ...) for article type,
  gender and base colour, weighted F1 (classes with at least `min_class` validation photos);
- mm_rendition: the thumbnail + title -> full photo + title, R@1/R@10 (relevant: the same photo);
- catalog: a catalog indexed as photo + title vectors, searched by a title alone (relevant: the
  same normalised title) and by a photo alone, its 70% centre crop (relevant: the same photo),
  R@1/R@10: how search by text or by photo finds products whose vectors hold both;
- knn: leave-one-out 1-NN article type of the photo + title vectors, a product's own design
  (same normalised title) left out as well, accuracy (judged); the same with the photo-only and
  the title-only vectors, reported beside it;
- ood: a model trained by the same recipe with one whole master category held out
  (`--holdout`, default Footwear), against a probe trained the same way, on retrieval, kNN and
  zero-shot inside that category (the family judges the recipe; the shipped model trains on all),
  on every product of it by default (`--ood-scope`).

The linear probe is the simple alternative at the same deployment cost: the frozen towers the
engines use (EfficientNet-Lite0 mean-pooled, MiniLM-L6 mean-pooled), one linear map each, trained
with symmetric InfoNCE on the training split in this run, its learning rate picked on a
group-held-out slice of the training split (the curve is in the report), then retrained on the
whole training split. Every subject's number is reported beside it; a subject `beats_probe` when
every family's every metric is at least `--margin` above the probe's, or, where the probe is
within 2 x margin of a perfect score, halfway from the probe's value to it (`required_margin`).

The report (JSON) renders as the model card's table (`render_markdown`, `--markdown`).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from .catalog import Product, catalog_split, legacy_is_validation, normalize_title, read_catalog, title_words
from .metrics import normalize_rows, recall_at_k, top1_misses, weighted_f1
from .probe import FrozenTowers, MemoImageTower, ProbeConfig, ProbeTowers, train_probe_on
from .suite_report import compare, headline, render_markdown, write_table

FORMAT = 1
FAMILIES = ("cross_modal", "renditions", "zero_shot", "mm_rendition", "catalog", "knn", "ood")
ZERO_SHOT_FIELDS = ("article_type", "gender", "base_colour")
TEMPLATES = {
    "article_type": ("a photo of a {}", "a product photo of {}", "{}"),
    "gender": ("a photo of a product for {}", "{} fashion"),
    "base_colour": ("a photo of a {} product", "{} colour"),
}
LOWRES = (60, 80)  # (width, height) of the thumbnail rendition, the catalog's 3:4 photos
JPEG_QUALITY = 20
CROP = 0.7


# ---------------------------------------------------------------------------------------- renditions


def _lowres(img):
    from PIL import Image

    return img.resize(LOWRES, Image.BILINEAR).resize(img.size, Image.BILINEAR)


def _jpeg(img):
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(img):
    w, h = img.size
    cw, ch = round(w * CROP), round(h * CROP)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def _gray(img):
    return img.convert("L").convert("RGB")


RENDITIONS: dict[str, Callable] = {"lowres": _lowres, "jpeg": _jpeg, "crop": _crop, "gray": _gray}


# ------------------------------------------------------------------------------------------ subjects


class Subject(Protocol):
    """Anything that embeds products: item i uses images[i] and texts[i] where not None."""

    def embed(self, images: Sequence | None = None, texts: Sequence[str | None] | None = None) -> np.ndarray: ...


def load_subject(path: str | Path, threads: int | None = None) -> Subject:
    """An embedder folder (PyTorch, `ReferenceEmbedder`) or an engine file (`sdk.Embedder`).

    Raises:
        FileNotFoundError: the path is neither.
    """
    path = Path(path)
    if path.is_dir() and (path / "embedder.json").is_file():
        from .reference import ReferenceEmbedder

        return ReferenceEmbedder(path)
    if path.is_file():
        from sdk import Embedder

        return Embedder(path, threads=threads)
    raise FileNotFoundError(f"{path}: not an embedder folder (embedder.json + embedder.safetensors) nor an engine file")


def share_tower(subject, tower: MemoImageTower):
    """Give a PyTorch subject (`ReferenceEmbedder`) the suite's memoised image tower where it
    reads the same one; other subjects are returned as they are."""
    cfg = getattr(getattr(subject, "model", None), "cfg", None)
    if cfg is not None and hasattr(subject, "image_tower") and cfg.image_size == 224 and not cfg.image_tuned_blocks:
        subject.image_tower = tower
    return subject


# -------------------------------------------------------------------------------------------- the suite


@dataclass
class SuiteConfig:
    """What the suite measures (validated on creation).

    Attributes:
        min_class: a zero-shot class counts when at least this many validation photos have it.
        margin: how far above the probe a subject must be on every metric to `beats_probe`.
        holdout: the master category the ood family's models were trained without.
        ood_scope: where the ood family scores inside `holdout`: "category", every product of it
            (the held-out models and probe trained on none of them, on either side of the split;
            six times the validation side's products in this catalog, so a point is fewer photos'
            luck), or "validation", its validation products only.
        limit: score only the first N validation products (smoke runs); 0 = all.
        batch_size: items per embed call.
    """

    min_class: int = 5
    margin: float = 0.02
    holdout: str = "Footwear"
    ood_scope: str = "category"
    limit: int = 0
    batch_size: int = 64
    families: tuple[str, ...] = FAMILIES

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        bad = [f for f in self.families if f not in FAMILIES]
        if bad:
            raise ValueError(f"unknown families {bad}; choose from {list(FAMILIES)}")
        if self.min_class < 1 or self.limit < 0 or self.batch_size < 1:
            raise ValueError(f"SuiteConfig: min_class >= 1, limit >= 0, batch_size >= 1, got {self}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"SuiteConfig.margin must be in [0, 1), got {self.margin}")
        if self.ood_scope not in ("category", "validation"):
            raise ValueError(f"SuiteConfig.ood_scope must be 'category' or 'validation', got {self.ood_scope!r}")


class MissingField(Exception):
    """A family cannot run on this catalog: it names the family and the field."""


@dataclass
class ValidationSet:
    """The validation products of a catalog, their photos (decoded once) and relevance keys."""

    products: list[Product]  # every validation product, photo or not
    photos: list  # PIL images of `with_photo`
    with_photo: np.ndarray  # indices into products
    title_key: np.ndarray  # per product: its normalised title's number
    photo_key: np.ndarray  # per product with a photo: its photo's number (byte-identical photos share one)
    field_values: dict[str, np.ndarray] = field(default_factory=dict)
    _rendered: dict[str, list] = field(default_factory=dict)

    def rendered(self) -> dict[str, list]:
        """Each of `RENDITIONS` of every photo, made once and shared by every subject (the same
        pixels, so a memoised tower runs on them once)."""
        if not self._rendered:
            self._rendered.update({name: [fn(im) for im in self.photos] for name, fn in RENDITIONS.items()})
        return self._rendered

    @classmethod
    def of(cls, products: Sequence[Product], limit: int = 0) -> "ValidationSet":
        from sdk.preprocess import load_image

        from ..paths import file_sha256

        products = list(products)[: limit or None]
        with_photo = np.array([i for i, p in enumerate(products) if p.image is not None], np.int64)
        photos = [load_image(products[i].image, name=f"product {products[i].id} photo") for i in with_photo]
        titles: dict[str, int] = {}
        digests: dict[str, int] = {}
        title_key = np.array([titles.setdefault(normalize_title(p.title), len(titles)) for p in products])
        photo_key = np.array([digests.setdefault(file_sha256(products[i].image), len(digests)) for i in with_photo])
        return cls(products, photos, with_photo, title_key, photo_key)

    def values(self, name: str, family: str) -> np.ndarray:
        """The field of every product as strings ("" where absent).

        Raises:
            MissingField: no product has it.
        """
        if name not in self.field_values:
            v = np.array([str(p.record.get(name) or "").strip() for p in self.products], dtype=object)
            self.field_values[name] = v
        v = self.field_values[name]
        if not any(v):
            raise MissingField(f"family {family!r} needs the catalog field {name!r}, which no validation product has")
        return v

    def subset(self, keep: np.ndarray) -> "ValidationSet":
        """The products where `keep` (a mask over products) holds."""
        idx = np.flatnonzero(keep)
        pos = {int(i): k for k, i in enumerate(self.with_photo)}
        photo_rows = [pos[int(i)] for i in idx if int(i) in pos]
        new_with = np.array([k for k, i in enumerate(idx) if int(i) in pos], np.int64)
        return ValidationSet([self.products[i] for i in idx], [self.photos[r] for r in photo_rows], new_with,
                             self.title_key[idx], self.photo_key[photo_rows])


def _embed(subject: Subject, images=None, texts=None, batch_size: int = 64) -> np.ndarray:
    n = len(images if images is not None else texts)
    out = []
    for s in range(0, n, batch_size):
        out.append(subject.embed(images=None if images is None else images[s : s + batch_size],
                                 texts=None if texts is None else texts[s : s + batch_size]))
    return normalize_rows(np.concatenate(out).astype(np.float32)) if out else np.zeros((0, 1), np.float32)


def _zero_shot(subject: Subject, img: np.ndarray, labels: np.ndarray, templates: Sequence[str], min_class: int,
               batch_size: int) -> dict:
    counts = {c: int(np.sum(labels == c)) for c in set(labels) if c}
    classes = sorted(c for c, n in counts.items() if n >= min_class)
    keep = np.isin(labels, classes)
    if len(classes) < 2:
        return {"skipped": f"fewer than 2 classes with >= {min_class} validation photos"}
    prompts = [t.format(c.lower()) for c in classes for t in templates]
    e = _embed(subject, texts=prompts, batch_size=batch_size).reshape(len(classes), len(templates), -1)
    centers = normalize_rows(normalize_rows(e).mean(1))  # (C, D)
    pred = np.array(classes, dtype=object)[(img[keep] @ centers.T).argmax(1)]
    y = labels[keep]
    return {"weighted_F1": weighted_f1(y, pred), "accuracy": round(float(np.mean(pred == y)), 4),
            "classes": len(classes), "photos": int(keep.sum())}


def _knn(mm: np.ndarray, labels: np.ndarray, title_key: np.ndarray) -> dict:
    sim = mm @ mm.T
    sim[title_key[:, None] == title_key[None, :]] = -np.inf  # itself and its own design
    ok = np.isfinite(sim).any(1) & (labels != "")
    nn_ = sim.argmax(1)
    return {"accuracy": round(float(np.mean(labels[nn_][ok] == labels[ok])), 4), "products": int(ok.sum())}


def score_subject(subject: Subject, val: ValidationSet, cfg: SuiteConfig, families: Sequence[str] | None = None,
                  log=print) -> dict:
    """Every family (but ood, which `run_suite` scores on the held-out models) for one subject.

    A family that cannot run on this catalog says why under its name ({"skipped": reason}); the
    others still run.
    """
    families = [f for f in (families or cfg.families) if f != "ood"]
    res: dict = {}
    P = val.with_photo
    if len(P) == 0:
        return {f: {"skipped": f"family {f!r} needs the catalog field 'image', which no validation product has"}
                for f in families}
    titles = [p.title for p in val.products]
    bs = cfg.batch_size
    t0 = time.time()
    img = _embed(subject, images=val.photos, batch_size=bs)
    need_mm = {"knn", "mm_rendition", "catalog"} & set(families)
    mm = _embed(subject, images=val.photos, texts=[titles[i] for i in P], batch_size=bs) if need_mm else None
    if "cross_modal" in families:
        ttl = _embed(subject, texts=titles, batch_size=bs)
        k = val.title_key
        out = {"title->photo": recall_at_k(ttl[P], img, k[P], k[P]), "photo->title": recall_at_k(img, ttl, k[P], k)}
        legacy = np.array([legacy_is_validation(p.id) for p in val.products])
        lp = P[legacy[P]]
        if len(lp) and legacy.sum():
            pos = {int(i): r for r, i in enumerate(P)}
            li = img[[pos[int(i)] for i in lp]]
            out["old_split"] = {"products": int(legacy.sum()),
                                "title->photo": recall_at_k(ttl[lp], li, k[lp], k[lp]),
                                "photo->title": recall_at_k(li, ttl[legacy], k[lp], k[legacy])}
        res["cross_modal"] = out
    if {"renditions", "mm_rendition", "catalog"} & set(families):
        rendered = val.rendered()
    degraded: dict[str, np.ndarray] = {}  # image-only vectors of the renditions, shared by the families
    title_only: list[np.ndarray] = []  # the title-only vectors of the products with a photo, once

    def photo_titles() -> np.ndarray:
        if not title_only:
            title_only.append(ttl[P] if "cross_modal" in families
                              else _embed(subject, texts=[titles[i] for i in P], batch_size=bs))
        return title_only[0]

    def rendition(name: str) -> np.ndarray:
        if name not in degraded:
            degraded[name] = _embed(subject, images=rendered[name], batch_size=bs)
        return degraded[name]

    if "renditions" in families:
        res["renditions"] = {name: recall_at_k(rendition(name), img, val.photo_key, val.photo_key) for name in rendered}
    if "mm_rendition" in families:
        q = _embed(subject, images=rendered["lowres"], texts=[titles[i] for i in P], batch_size=bs)
        res["mm_rendition"] = {"lowres+title": recall_at_k(q, mm, val.photo_key, val.photo_key)}
    if "catalog" in families:  # a catalog indexed as photo + title, searched by a title or by another photo
        k, ttl_p = val.title_key[P], photo_titles()
        res["catalog"] = {"title": {**recall_at_k(ttl_p, mm, k, k),  # (misses: not judged, for reading)
                                    **top1_misses(ttl_p, mm, k, [title_words(titles[i]) for i in P])},
                          "crop": recall_at_k(rendition("crop"), mm, val.photo_key, val.photo_key)}
    if "zero_shot" in families:
        out = {}
        for name in ZERO_SHOT_FIELDS:
            try:
                labels = val.values(name, "zero_shot")[P]
            except MissingField as exc:
                out[name] = {"skipped": str(exc)}
                continue
            out[name] = _zero_shot(subject, img, labels, TEMPLATES[name], cfg.min_class, bs)
        res["zero_shot"] = out
    if "knn" in families:
        try:
            labels, key = val.values("article_type", "knn")[P], val.title_key[P]
        except MissingField as exc:
            res["knn"] = {"skipped": str(exc)}
        else:  # judged on the photo + title vectors; each modality alone says which one carries it
            ttl_p = photo_titles()
            res["knn"] = {"article_type": {**_knn(mm, labels, key),
                                           "photo_only_accuracy": _knn(img, labels, key)["accuracy"],
                                           "title_only_accuracy": _knn(ttl_p, labels, key)["accuracy"]}}
    log(f"  scored in {time.time() - t0:.0f} s")
    return res


def run_suite(catalog: str | Path, subjects: dict[str, Subject], *, ood_subjects: dict[str, Subject] | None = None,
              cfg: SuiteConfig = SuiteConfig(), probe_cfg: ProbeConfig = ProbeConfig(), towers: ProbeTowers | None = None,
              features: str | Path | None = None, log=print) -> dict:
    """Score subjects and the linear probe (trained here) on the catalog's validation split.

    Args:
        catalog: a catalog folder (items.jsonl + images).
        subjects: name -> `Subject` (see `load_subject`); "probe" is reserved.
        ood_subjects: name -> a subject trained with `cfg.holdout` held out (the ood family).
        towers: the probe's frozen features (default: `FrozenTowers`).
        features: a feature cache of this catalog to read the probe's training features from.

    Returns:
        The report (see the module docstring); `report["verdict"][name]["beats_probe"]`.
    """
    if "probe" in subjects or "probe" in (ood_subjects or {}):
        raise ValueError("'probe' names the suite's own linear probe; give the subject another name")
    t0 = time.time()
    products = read_catalog(catalog)
    split = catalog_split(catalog)
    val = ValidationSet.of([p for p in products if split.is_validation(p.id)], cfg.limit)
    log(f"validation: {len(val.products)} products, {len(val.with_photo)} with a photo ({split.summary()})")
    towers = towers or FrozenTowers()
    if isinstance(getattr(towers, "image", None), MemoImageTower):
        subjects = {n: share_tower(s, towers.image) for n, s in subjects.items()}
        ood_subjects = {n: share_tower(s, towers.image) for n, s in (ood_subjects or {}).items()}
    report: dict = {"format": FORMAT, "catalog": str(catalog), "split": split.summary(),
                    "validation_products": len(val.products), "validation_photos": int(len(val.with_photo)),
                    "config": asdict(cfg), "probe": {}, "results": {}, "verdict": {}}
    probe, report["probe"]["training"] = train_probe_on(products, split, towers, features, probe_cfg, log)
    for name, subject in {"probe": probe, **subjects}.items():
        log(f"scoring {name}")
        report["results"][name] = score_subject(subject, val, cfg, log=log)
    if "ood" in cfg.families:
        _score_ood(report, products, split, val, ood_subjects or {}, cfg, towers, features, probe_cfg, log)
    for name, res in report["results"].items():
        if name == "probe":
            continue
        fams = compare(res, report["results"]["probe"], cfg.margin)
        judged = [f for f in cfg.families if headline(report["results"]["probe"].get(f, {}), f)]
        missing = [f for f in judged if f not in fams]
        report["verdict"][name] = {"beats_probe": bool(not missing and all(f["beats_probe"] for f in fams.values())),
                                   "margin": cfg.margin, "not_scored": missing, "families": fams}
    report["seconds"] = round(time.time() - t0, 1)
    return report


def _score_ood(report: dict, products: list[Product], split, val: "ValidationSet", ood_subjects: dict[str, Subject],
               cfg: SuiteConfig, towers: ProbeTowers, features, probe_cfg: ProbeConfig, log) -> None:
    """The ood family into `report`: a probe trained without `cfg.holdout` and each held-out subject,
    scored on retrieval, kNN and zero-shot inside that master category (`cfg.ood_scope`: all its
    products, or its validation products only)."""
    report["results"]["probe"]["ood"] = {}
    try:
        held = val.values("master_category", "ood") == cfg.holdout
        if not held.any():
            raise MissingField(f"family 'ood': no validation product is in master category {cfg.holdout!r}")
    except MissingField as exc:
        report["ood"] = {"skipped": str(exc)}
        return
    in_holdout = [(p.record.get("master_category") or "") == cfg.holdout for p in products]
    if cfg.ood_scope == "category":  # the held-out models saw none of them, whichever side of the split
        sub = ValidationSet.of([p for p, h in zip(products, in_holdout) if h], cfg.limit)
    else:
        sub = val.subset(held)
    kept = [p for p, h in zip(products, in_holdout) if not h]
    ood_probe, report["probe"]["ood_training"] = train_probe_on(kept, split, towers, features, probe_cfg, log)
    report["ood"] = {"holdout": cfg.holdout, "scope": cfg.ood_scope, "products": len(sub.products),
                     "photos": int(len(sub.with_photo))}
    log(f"ood: {len(sub.products)} {cfg.holdout} products ({cfg.ood_scope})")
    for name, subject in {"probe": ood_probe, **ood_subjects}.items():
        log(f"scoring {name} inside {cfg.holdout} (trained without it)")
        res = score_subject(subject, sub, cfg, families=("cross_modal", "knn", "zero_shot"), log=log)
        res.get("cross_modal", {}).pop("old_split", None)
        report["results"].setdefault(name, {})["ood"] = res


def named_paths(specs: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{what} must be NAME=PATH, got {spec!r}")
        if name in out or name == "probe":
            raise SystemExit(f"{what} name {name!r} is {'reserved' if name == 'probe' else 'given twice'}")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sdk.train.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", help="catalog folder (items.jsonl + images/)")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only render an existing report's table (to --markdown, or printed)")
    ap.add_argument("--subject", action="append", default=[], metavar="NAME=PATH",
                    help="an embedder folder or an engine file to score (repeatable)")
    ap.add_argument("--ood-subject", action="append", default=[], metavar="NAME=PATH",
                    help="the same recipe trained with --holdout left out (repeatable; NAME pairs it with --subject)")
    ap.add_argument("--holdout", default=SuiteConfig.holdout, help="master category the ood subjects were trained without")
    ap.add_argument("--ood-scope", choices=("category", "validation"), default=SuiteConfig.ood_scope,
                    help="score the ood family on every product of --holdout (default) or on its validation products")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--features", default=None, help="feature cache of this catalog (sdk.train.features): the "
                    "probe's training features are pooled from it instead of recomputed")
    ap.add_argument("--margin", type=float, default=SuiteConfig.margin)
    ap.add_argument("--min-class", type=int, default=SuiteConfig.min_class)
    ap.add_argument("--limit", type=int, default=0, help="score only the first N validation products (smoke runs)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads of engine subjects")
    ap.add_argument("--out", default=None, help="report JSON")
    ap.add_argument("--markdown", default=None,
                    help="also write the table here (between the suite-table markers where the page has them)")
    args = ap.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        if args.markdown:
            write_table(report, args.markdown)
        print(render_markdown(report))
        return
    if not args.catalog or not args.out:
        ap.error("--catalog and --out are required (or --render JSON)")
    subjects, ood = named_paths(args.subject, "--subject"), named_paths(args.ood_subject, "--ood-subject")
    try:
        cfg = SuiteConfig(min_class=args.min_class, margin=args.margin, holdout=args.holdout, limit=args.limit,
                          families=tuple(args.families), ood_scope=args.ood_scope)
    except ValueError as exc:
        ap.error(str(exc))
    report = run_suite(args.catalog, {n: load_subject(p, args.threads) for n, p in subjects.items()},
                       ood_subjects={n: load_subject(p, args.threads) for n, p in ood.items()}, cfg=cfg,
                       features=args.features)
    report["subjects"] = {**subjects, **{f"{n} (ood)": p for n, p in ood.items()}}
    report["command"] = "python -m sdk.train.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    if args.markdown:
        write_table(report, args.markdown)
    print(render_markdown(report))


if __name__ == "__main__":
    main()

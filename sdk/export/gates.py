"""The fidelity gates of an engine: its vectors against the FP32 teacher's on real products
(per-view cosine, mean and minimum; the text->image R@10 drop), measured through the runtime
(`sdk.Embedder`, what users run). `moon3 build` applies them to every candidate; `moon3 validate`
(`validate_engine`) to an engine already built."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdk.errors import SdkError
from sdk.train.metrics import recall_at_k

from ..paths import SAMPLES, WEIGHTS


class GateError(SdkError):
    """A built engine failed a fidelity gate; `.report` holds the measurements."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class FidelityGates:
    """Minimum fidelity of an engine against the FP32 teacher (per-item cosine, retrieval)."""

    min_cosine_mean: float = 0.995
    min_cosine_min: float = 0.97
    max_recall_drop: float = 0.01  # absolute R@10 drop allowed (0.01 = 1 point)

    def __post_init__(self) -> None:
        for name in ("min_cosine_mean", "min_cosine_min"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [-1, 1], got {v}")
        if not 0.0 <= self.max_recall_drop <= 1.0:
            raise ValueError(f"max_recall_drop must be in [0, 1], got {self.max_recall_drop}")


def eval_products(catalog, samples, limit: int) -> list[tuple[Path, str]]:
    """(photo path, title) of at most `limit` evaluation products: the validation split of
    `catalog` when given, else every product with a photo in the `samples` folder."""
    if catalog is not None:
        from sdk.train.catalog import catalog_split, read_catalog

        split = catalog_split(catalog)
        items = [(p.image, p.title) for p in read_catalog(catalog) if split.is_validation(p.id) and p.image]
    else:
        root = Path(samples)
        path = root / "items.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation products: {path} does not exist (pass --catalog)")
        recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        items = [(root / r["image"], r["title"]) for r in recs if r.get("image")]
    return items[:limit]


def recall_at_10(text: np.ndarray, photos: np.ndarray, titles: list[str]) -> float:
    """Text->image R@10 where a hit is a photo whose product has the query's title."""
    keys = np.array([t.strip().lower() for t in titles])
    return recall_at_k(text, photos, keys, keys, ks=(10,))["R@10"]


def probe_trace(title: str) -> str:
    """A reasoning trace in the reasoner's format for a product, to check the trace path's numerics."""
    return f"<think> the product is {title.lower()}; the title names it </think> {title}"


def embed_views(embed, products: list[tuple[Path, str]]) -> dict[str, np.ndarray]:
    """The four views of each product with an `embed(images=, texts=, traces=)` callable."""
    imgs = [p for p, _ in products]
    titles = [t for _, t in products]
    return {
        "photo+title": embed(images=imgs, texts=titles),
        "photo": embed(images=imgs, texts=None),
        "title": embed(images=None, texts=titles),
        "photo+title+trace": embed(images=imgs, texts=titles, traces=[probe_trace(t) for t in titles]),
    }


def fidelity_report(teacher: dict, engine: dict, titles: list[str], gates: FidelityGates) -> dict:
    """Compare engine vectors with the teacher's, view by view, and apply the gates."""
    report: dict = {"items": len(titles), "views": {}}
    worst_mean, worst_min = 1.0, 1.0
    for view, t in teacher.items():
        cos = np.sum(t * engine[view], axis=1)  # both L2-normalised
        report["views"][view] = {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6)}
        worst_mean, worst_min = min(worst_mean, float(cos.mean())), min(worst_min, float(cos.min()))
    r_t = recall_at_10(teacher["title"], teacher["photo"], titles)
    r_e = recall_at_10(engine["title"], engine["photo"], titles)
    report["text->image R@10"] = {"teacher": round(r_t, 4), "engine": round(r_e, 4), "drop": round(r_t - r_e, 4)}
    failed = []
    if worst_mean < gates.min_cosine_mean:
        failed.append(f"cosine mean {worst_mean:.4f} < {gates.min_cosine_mean}")
    if worst_min < gates.min_cosine_min:
        failed.append(f"cosine min {worst_min:.4f} < {gates.min_cosine_min}")
    if r_t - r_e > gates.max_recall_drop + 1e-9:  # a drop of exactly the allowance passes (0.905 - 0.895 > 0.01 in floats)
        failed.append(f"R@10 drop {r_t - r_e:.4f} > {gates.max_recall_drop}")
    report["gates"] = asdict(gates)
    report["passed"] = not failed
    report["failed"] = failed
    return report


def measure_engine(engine: Path, teacher_views: dict, products, gates: FidelityGates, threads: int = 0, log=print) -> dict:
    """Run an engine through the runtime on `products` and compare with the teacher's vectors."""
    from sdk.embedder import Embedder

    runtime = Embedder(engine, threads=threads or None)
    engine_views = embed_views(lambda **kw: runtime.embed(**kw, errors="raise"), products)
    report = fidelity_report(teacher_views, engine_views, [t for _, t in products], gates)
    for view, v in report["views"].items():
        log(f"      {view:12s} cosine mean {v['cosine_mean']:.5f}  min {v['cosine_min']:.5f}")
    r = report["text->image R@10"]
    log(f"      text->image R@10 teacher {r['teacher']:.4f}  engine {r['engine']:.4f}  drop {r['drop']:+.4f}"
        f"  -> {'passed' if report['passed'] else 'failed: ' + '; '.join(report['failed'])}")
    return report


def validate_engine(
    engine: str | Path,
    *,
    catalog: str | Path | None = None,
    samples: str | Path = SAMPLES,
    eval_items: int = 400,
    gates: FidelityGates | None = None,
    weights: str | Path | None = None,
    threads: int = 0,
    log=print,
) -> dict:
    """Measure an existing engine against the FP32 teacher (the committed weights by default).

    Returns:
        The fidelity report; report["passed"] says whether every gate passed.

    Raises:
        EngineError: the engine file is missing or damaged.
        FileNotFoundError: no evaluation products.
    """
    from sdk.engine import EngineFile
    from sdk.train.reference import ReferenceEmbedder

    EngineFile.read(engine)  # refuse a damaged file before loading the teacher
    products = eval_products(catalog, samples, eval_items)
    if len(products) < 20:
        raise ValueError(f"only {len(products)} evaluation products with a photo; need >= 20")
    log(f"teacher: FP32 reference embedder on {len(products)} products ({catalog or samples})")
    teacher = ReferenceEmbedder(Path(weights or WEIGHTS))
    teacher_views = embed_views(teacher.embed, products)
    del teacher
    log(f"engine: {engine}")
    report = measure_engine(Path(engine), teacher_views, products, gates or FidelityGates(), threads, log)
    report["eval_source"] = str(catalog or samples)
    return report

"""The skip path's two training-time tools: start it from the validation suite's linear probe
(`init_skip_from_probe`), and close the modality gap of a trained model through its skip biases
(`center_modalities`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .catalog import catalog_split
from .feature_cache import Features, batch_inputs, pooled_photo, pooled_title, with_photo

SKIP_INIT_NORM = 4.0  # mean norm of each modality's probe-initialised skip term over the training rows


def init_skip_from_probe(model, f: Features, catalog, train_rows: np.ndarray, keys: np.ndarray, log=print) -> dict:
    """Start a skip-path model from a linear probe: train the probe of the validation suite
    (`sdk.train.probe.train_probe`, its learning-rate sweep included) on the training rows'
    pooled photo and title features, copy its maps into the skip path (scaled so each modality's
    term has mean norm `SKIP_INIT_NORM`), and zero the head's output projection, so the model
    starts as the probe and the fusion learns a residual on it. Returns the probe's report."""
    from .probe import ProbeConfig, train_probe

    rows = with_photo(f, train_rows)
    idx = torch.as_tensor(rows)
    with torch.no_grad():
        img, txt = (torch.cat([pool(f, idx[s : s + 512]) for s in range(0, len(rows), 512)]).numpy()
                    for pool in (pooled_photo, pooled_title))
    if catalog is not None:
        split = catalog_split(catalog)
        group = np.array([split.group[int(i)] for i in f.ids[rows]])
    else:
        group = keys[rows]
    probe, report = train_probe(img, txt, keys[rows], group, towers=None, cfg=ProbeConfig(dim=model.cfg.out_dim),
                                log=log)
    with torch.no_grad():
        _copy_probe(model, probe, img, txt)
    log(f"skip path initialised from a probe (lr {report['lr']}, {report['epochs']} epochs, dev R@10 {report['dev_R@10']})")
    return report


def _copy_probe(model, probe, img: np.ndarray, txt: np.ndarray) -> None:
    for skip, w, kind, x in ((model.skip_image, probe.w_img, "img", img), (model.skip_text, probe.w_txt, "txt", txt)):
        skip.set_stats(torch.from_numpy(probe.stats[f"{kind}_mean"]), torch.from_numpy(probe.stats[f"{kind}_std"]))
        skip.proj.weight.copy_(torch.from_numpy(w[:-1].T))
        skip.proj.bias.copy_(torch.from_numpy(w[-1]))
        norm = skip(torch.from_numpy(x)).norm(dim=-1).mean().clamp(min=1e-6)
        skip.proj.weight.mul_(SKIP_INIT_NORM / norm)
        skip.proj.bias.mul_(SKIP_INIT_NORM / norm)
    model.head[1].weight.zero_()
    model.head[1].bias.zero_()


CENTER_ROWS = 2000  # training products (with a photo) whose vectors estimate each modality's mean


@torch.no_grad()
def center_modalities(model, f: Features, train_rows: np.ndarray, n: int = CENTER_ROWS, seed: int = 0,
                      log=print) -> dict:
    """Close the modality gap of a skip-path model, in place: photo-only vectors crowd into one
    narrow cone and title-only vectors into another, so a photo's nearest titles are the ones
    nearest the title cone's centre, whatever the photo shows. Over `n` training products with a
    photo, each modality's mean unit vector m and mean output norm r (before the L2 norm) are
    measured, and r * m is subtracted from that modality's skip-map bias: the photo-only and
    title-only vectors are then centred on the origin (a photo + title vector moves by both).
    The engine needs nothing new: the skip maps are already in it. Returns what moved."""
    if not getattr(model.cfg, "skip_path", False):
        raise ValueError("center_modalities needs a skip-path model (EmbedderConfig.skip_path): its skip biases "
                         "carry the offsets")
    model.eval()
    rows = with_photo(f, train_rows)
    rows = np.sort(np.random.default_rng(seed).choice(rows, min(n, len(rows)), replace=False))
    record = {"rows": int(len(rows))}
    for name, skip, image, text in (("photo", model.skip_image, True, None), ("title", model.skip_text, False, "title")):
        raw = torch.cat([model.raw(*batch_inputs(f, rows[i : i + 256], image=image, text=text))
                         for i in range(0, len(rows), 256)])
        mean_unit = F.normalize(raw, dim=-1).mean(0)
        offset = raw.norm(dim=-1).mean() * mean_unit
        skip.proj.bias.sub_(offset)
        record[name] = {"mean_vector_norm": round(mean_unit.norm().item(), 4), "offset_norm": round(offset.norm().item(), 4)}
    log(f"modality gap closed on {len(rows)} training products: mean photo vector norm "
        f"{record['photo']['mean_vector_norm']}, mean title vector norm {record['title']['mean_vector_norm']}")
    return record

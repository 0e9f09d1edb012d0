"""Trained weights stored in half precision, loaded back into FP32 models.

The committed weights travel everywhere the source tree goes (a clone, the wheel, a GPU machine's
copy of the tree, capped at 64 MiB), so the shipped ones are stored FP16: half the bytes, and
the loaders upcast every floating tensor to float32, so models always compute in FP32 and FP32
files keep loading unchanged. What FP16 storage costs is measured against the FP32 originals by
`python -m sdk.export.fp16_fidelity` (docs/results/weights_fp16.json).

A half copy's JSON record names the FP32 file it came from (`source_sha256`) and its own bytes
(`sha256`), so artefacts bound to the FP32 weights' SHA-256 (the image completion model) still
match the copy, and only while the copy is the file the record describes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

import torch

STORED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def load_fp32_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, floating ones as float32 (whatever precision they were stored in)."""
    from safetensors.torch import load_file

    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}


def write_half(src: str | Path, dst: str | Path, dtype: str = "float16") -> dict:
    """Write the tensors of safetensors file `src` to `dst` with floating tensors in `dtype`.

    `dst` may be `src` (the file is replaced atomically, after it was read).

    A floating tensor that does not fit `dtype` (non-finite after the cast: FP16 tops out at
    65504, e.g. the inverse standard deviation of a constant feature channel) stays float32 and
    is named in the record.

    Returns:
        The record for the copy's JSON: {"stored_dtype", "source_sha256", "sha256"}, plus
        "kept_float32" (names) when some tensors stayed float32.

    Raises:
        ValueError: `dtype` is not a half precision.
    """
    from safetensors.torch import load_file, save_file

    from ..paths import file_sha256

    if dtype not in STORED_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(STORED_DTYPES)}, got {dtype!r}")
    src, dst = Path(src), Path(dst)
    source_sha, mode = file_sha256(src), stat.S_IMODE(src.stat().st_mode)
    half, kept = {}, []
    for k, v in load_file(str(src)).items():
        if v.is_floating_point():
            h = v.to(STORED_DTYPES[dtype]).contiguous()
            if torch.isfinite(v).all() and not torch.isfinite(h).all():
                kept.append(k)
                h = v.float().contiguous()
            half[k] = h
        else:
            half[k] = v.contiguous()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(half, str(tmp))
    os.chmod(tmp, mode)  # the source's permissions, not the writer's private ones
    os.replace(tmp, dst)
    record = {"stored_dtype": dtype, "source_sha256": source_sha, "sha256": file_sha256(dst)}
    return {**record, "kept_float32": sorted(kept)} if kept else record


def merge_record(meta: dict, record: dict) -> dict:
    """`meta` with a half copy's record; a copy of a copy keeps naming the first FP32 source."""
    source = meta.get("source_sha256") if meta.get("stored_dtype") in STORED_DTYPES else None
    return {**meta, **record, "source_sha256": source or record["source_sha256"]}


def weights_sha256s(path: str | Path, meta: dict | None = None) -> tuple[str, ...]:
    """The SHA-256s that name the weights file `path`: its own and, for a half copy whose JSON
    record `meta` describes exactly this file, the FP32 file it was converted from."""
    from ..paths import file_sha256

    own = file_sha256(path)
    meta = meta or {}
    if meta.get("stored_dtype") in STORED_DTYPES and meta.get("sha256") == own and meta.get("source_sha256"):
        return (own, meta["source_sha256"])
    return (own,)


def copy_half_main(module: str, what: str, copy_half: Callable[[str, str, str], Path]) -> None:
    """The command line of a model module's `copy_half`: `python -m sdk.train.MODULE SRC DST [--dtype]`."""
    import argparse

    ap = argparse.ArgumentParser(description=f"Copy a saved {what} with fp16 weights: python -m sdk.train.{module} "
                                 "SRC DST (DST may be SRC: converted in place)")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    a = ap.parse_args()
    print(copy_half(a.src, a.dst, a.dtype))

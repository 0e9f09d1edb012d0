"""Seed inputs shared by the hypothesis fuzz tests and the atheris harness (fuzz_atheris.py):
a small valid engine file and small valid images of every format the runtime meets."""

from __future__ import annotations

import io
import os

import numpy as np
import pictures

# MOON3_FUZZ_SCALE=20 runs 20x the examples of every hypothesis fuzz test (still derandomized).
SCALE = float(os.environ.get("MOON3_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def seed_manifest() -> dict:
    """A manifest shaped like the one sdk.export.bundle writes."""
    return {
        "format": "moon3.engine",
        "format_version": 1,
        "versions": {"moon3-sdk": "0.1.0", "onnxruntime": "1.20.0"},
        "embedder": {"part": "embedder.onnx", "precision": "fp32", "output": "embedding", "dim": 32,
                     "matryoshka_dims": [16, 32], "inputs": {"pixels": {"dtype": "float32"}}},
        "preprocess": {"image": {"size": 224, "resize": "squash", "scale": "pm1"},
                       "text": {"tokenizer": "tokenizer.json", "max_length": 12}},
    }


SEED_PARTS = {
    "embedder.onnx": bytes(range(256)) * 3,
    "tokenizer.json": b'{"model": {"type": "WordPiece"}}',
    "plans/sm_87-trt10.plan": b"\x00plan" * 20,
    "empty.bin": b"",
}


def seed_engine(path) -> bytes:
    """Write the seed engine to `path` and return its bytes."""
    from sdk.engine import write_engine

    write_engine(path, seed_manifest(), SEED_PARTS)
    with open(path, "rb") as f:
        return f.read()


def gradient(seed: int, h: int = 24, w: int = 20) -> np.ndarray:
    return pictures.gradient(seed, h, w)


def seed_images() -> dict[str, bytes]:
    """Small valid files: JPEG (+EXIF, CMYK, gray), PNG (RGBA, palette, 16-bit), GIF (animated),
    TIFF (multi-page, float), WebP, BMP, ICO."""
    from PIL import Image

    def enc(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    rgb = Image.fromarray(gradient(0))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.fromarray(gradient(k)).convert("P") for k in range(3)]
    return {
        "jpeg": enc(rgb, "JPEG"),
        "jpeg-exif": enc(rgb, "JPEG", exif=exif.tobytes()),
        "jpeg-cmyk": enc(rgb.convert("CMYK"), "JPEG"),
        "jpeg-gray-progressive": enc(rgb.convert("L"), "JPEG", progressive=True),
        "png": enc(rgb, "PNG"),
        "png-rgba": enc(rgb.convert("RGBA"), "PNG"),
        "png-palette-transparent": enc(rgb.convert("P"), "PNG", transparency=0),
        "png-16bit": enc(Image.fromarray(gradient(1)[..., 0].astype(np.uint16) * 257), "PNG"),
        "gif-animated": enc(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "tiff-pages": enc(rgb, "TIFF", save_all=True, append_images=[Image.fromarray(gradient(5))]),
        "tiff-float": enc(Image.fromarray(gradient(2)[..., 0].astype(np.float32) / 255), "TIFF"),
        "webp": enc(rgb, "WEBP"),
        "bmp": enc(rgb, "BMP"),
        "ico": enc(rgb.resize((16, 16)), "ICO"),
    }

"""Image and text preprocessing shared by training and the runtime (numpy + Pillow + tokenizers).

Training code calls these same functions, so what the runtime feeds a model is, by construction,
what the model saw while it was trained.
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdk.errors import InvalidInputError

# A 20000x20000 RGB image is 1.2 GB decoded; product photos are far below this.
MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image becomes the image tower's input.

    Attributes:
        size: output side in pixels (square).
        resize: "squash" resizes the whole photo to size x size (the catalog's 3:4 photos are
            squashed, as a part of the catalog already is); "center_crop" resizes the short side
            and crops the centre.
        scale: "pm1" maps pixels to [-1, 1] (x*2-1); "imagenet" uses ImageNet mean/std.
    """

    size: int = 224
    resize: str = "squash"
    scale: str = "pm1"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 1024:
            raise ValueError(f"ImagePreprocess.size must be in [16, 1024], got {self.size}")
        if self.resize not in ("squash", "center_crop"):
            raise ValueError(f"ImagePreprocess.resize must be 'squash' or 'center_crop', got {self.resize!r}")
        if self.scale not in ("pm1", "imagenet"):
            raise ValueError(f"ImagePreprocess.scale must be 'pm1' or 'imagenet', got {self.scale!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            if not ok or (name == "std" and min(v) <= 0):
                raise ValueError(f"ImagePreprocess.{name} must be 3 finite numbers{' > 0' if name == 'std' else ''}, "
                                 f"got {v!r}")
            object.__setattr__(self, name, tuple(float(x) for x in v))


def load_image(src: Any, *, name: str = "image"):
    """Open an image from a path, bytes, a PIL image or an HWC uint8 array, as RGB PIL.

    Any format Pillow decodes is accepted (JPEG, PNG, WebP, GIF, TIFF, BMP, ...). The EXIF
    orientation is applied; animated and multi-page files give their first frame (a PIL image:
    its current frame); transparency (RGBA, LA, palette with a transparent colour) is
    composited on white; CMYK, grayscale, 16-bit and 32-bit int/float pixels become 8-bit RGB
    (see `_wide_to_uint8`). The caller's PIL image or array is never changed.

    Args:
        src: the image.
        name: how error messages name it (e.g. "item 3 image").

    Raises:
        InvalidInputError: the source is missing, not a regular file, empty, not an image,
            corrupt or truncated, larger than `MAX_IMAGE_PIXELS`, or an array of unusable
            shape/dtype; the message starts with `name` and says which.
    """
    from PIL import Image

    if isinstance(src, Image.Image):
        return _to_rgb(src, name)
    if isinstance(src, np.ndarray):
        return _array_to_pil(src, name)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise InvalidInputError(f"{name}: empty bytes, expected an encoded image (JPEG/PNG/WebP)")
        return _to_rgb(_open(io.BytesIO(bytes(src)), name), name)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        _check_file(path, name)
        try:
            f = path.open("rb")
        except OSError as exc:
            raise InvalidInputError(f"{name}: cannot read {path} ({exc.strerror or exc})") from None
        # Our own handle, closed here: Pillow keeps the file of a multi-frame image (GIF, TIFF)
        # open for seeking, which would leak one descriptor per image in a long job.
        with f:
            return _to_rgb(_open(f, name), name)
    raise InvalidInputError(
        f"{name}: unsupported image type {type(src).__name__}; "
        "pass a path, bytes, a PIL image or an HWC uint8 array"
    )


def _to_rgb(img, name: str):
    """A decoded PIL image of any mode -> a new RGB image (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        img = ImageOps.exif_transpose(img)  # a copy: the caller's image is never changed
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            img = Image.fromarray(_wide_to_uint8(np.asarray(img, dtype=np.float64), img.mode))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Composite on white, as product photos are shown.
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, rgba)
        img = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on malformed data
        raise InvalidInputError(f"{name}: could not decode image ({type(exc).__name__}: {exc})") from exc
    if min(img.size) < 1:
        raise InvalidInputError(f"{name}: image has no pixels ({img.size[0]}x{img.size[1]})")
    return img


def _check_file(path: Path, name: str) -> None:
    """A readable, non-empty regular file, or an InvalidInputError saying what the path is instead."""
    import stat

    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidInputError(f"{name}: file not found: {path}") from None
    except (OSError, ValueError) as exc:  # name too long, permission denied, NUL byte in the path
        raise InvalidInputError(f"{name}: cannot access {str(path)[:200]!r} ({exc.__class__.__name__}: "
                                f"{getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInputError(f"{name}: {path} is a directory, expected an image file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"{name}: {path} is not a regular file (device, pipe or socket)")
    if st.st_size == 0:
        raise InvalidInputError(f"{name}: file is empty (0 bytes): {path}")


def _open(fp, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(fp)  # reads the header only
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise InvalidInputError(
                f"{name}: image too large ({w}x{h} = {w * h} pixels, limit {MAX_IMAGE_PIXELS}); "
                "downscale it before embedding"
            )
        img.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires in Image.open, before the size is known here; its warning is
        # an exception where warnings are errors. Either way the image is over our limit.
        raise InvalidInputError(f"{name}: image too large (limit {MAX_IMAGE_PIXELS} pixels): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidInputError(f"{name}: not a recognised image format") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on malformed data
        raise InvalidInputError(f"{name}: corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
    return img


def _wide_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit int and 32-bit float pixels -> uint8.

    16-bit modes map 0..65535 to 0..255. "I" and "F" carry no range, so they are read in the
    smallest usual range that holds the brightest pixel: [0, 1], 0..255, 0..65535, else
    0..brightest. Negative and non-finite pixels become 0.
    """
    arr = np.where(np.isfinite(arr), arr, 0.0)
    top = float(arr.max(initial=0.0))
    peak = 65535.0 if mode.startswith("I;16") else next((p for p in (1.0, 255.0, 65535.0) if top <= p), top)
    return np.rint(arr * (255.0 / peak)).clip(0, 255).astype(np.uint8)


def _array_to_pil(arr: np.ndarray, name: str):
    from PIL import Image

    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise InvalidInputError(f"{name}: array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise InvalidInputError(f"{name}: array dtype must be uint8 (0..255), got {arr.dtype}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidInputError(f"{name}: array has no pixels, shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    img = Image.fromarray(np.ascontiguousarray(arr))
    return img.convert("RGB") if img.mode != "RGBA" else load_image(img, name=name)


@functools.lru_cache(maxsize=16)
def _pixel_table(scale: str, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: the model input value of each 8-bit level per channel, computed with the
    same float32 operations as scaling every pixel would use (so a lookup is bit-identical)."""
    x = np.arange(256, dtype=np.float32) / 255.0  # (256,)
    if scale == "pm1":
        return np.repeat((x * 2.0 - 1.0)[None], 3, 0)
    return (x[None] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


def image_to_array(img, cfg: ImagePreprocess = ImagePreprocess(), out: np.ndarray | None = None) -> np.ndarray:
    """RGB PIL image -> (3, size, size) float32 array, resized and scaled as `cfg` says.

    Scaling is a table lookup per 8-bit level (three times faster than float arithmetic on every
    pixel, and bit-identical to it). With `out` (a C-contiguous float32 (3, size, size) array, e.g.
    one row of a batch buffer) the pixels are written there and `out` is returned."""
    from PIL import Image

    if out is not None and (out.dtype != np.float32 or out.shape != (3, cfg.size, cfg.size)
                            or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"image_to_array: out must be a writeable C-contiguous float32 array of shape "
                         f"(3, {cfg.size}, {cfg.size}), got {out.dtype} {out.shape}")

    s = cfg.size
    if cfg.resize == "squash":
        img = img.resize((s, s), Image.BILINEAR)
    else:
        w, h = img.size
        k = s / min(w, h)
        img = img.resize((max(s, round(w * k)), max(s, round(h * k))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    levels = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W) view
    if out is None:
        out = np.empty(levels.shape, np.float32)
    if cfg.scale == "pm1":
        return np.take(_pixel_table("pm1", (), ())[0], levels, out=out)  # (3, H, W)
    table = _pixel_table(cfg.scale, cfg.mean, cfg.std)
    for c in range(3):
        np.take(table[c], levels[c], out=out[c])
    return out


@dataclass
class TextTokenizer:
    """WordPiece tokenizer from a `tokenizer.json` file, padding to the longest item in a batch.

    Attributes:
        path: the tokenizer.json file.
        max_length: tokens kept per text (including [CLS]/[SEP]); longer text is truncated.
    """

    path: str | os.PathLike
    max_length: int = 32
    _tok: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"TextTokenizer.max_length must be >= 2, got {self.max_length}")
        from tokenizers import Tokenizer

        if not Path(self.path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_length)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize texts -> (ids, mask), both (B, T) int64, T = longest item (>= 1).

        Raises:
            InvalidInputError: an item is not a str, or is not valid Unicode (a lone surrogate);
                the message names its index.
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"text {i}: must be a str, got {type(t).__name__}")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidInputError(
                    f"text {i}: not valid Unicode (lone surrogate at character {exc.start}); "
                    "decode bytes with errors='replace'"
                ) from None
        encs = self._tok.encode_batch(texts)
        t = max((len(e.ids) for e in encs), default=1)
        ids = np.zeros((len(encs), t), np.int64)
        mask = np.zeros((len(encs), t), np.int64)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask

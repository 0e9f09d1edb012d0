"""The bad-input corpus: one table of named, small inputs built in code, each either refused with
the documented `InvalidInputError` (message naming the item index and what was wrong) or handled
as documented (checked against an equivalent plain RGB picture built without sdk.preprocess).

Every case is also embedded inside a batch of good items: the good items must come back with
exactly the vectors they get alone, the bad one reported under its own index.
"""

from __future__ import annotations

import io
import re
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
from pictures import gradient
from PIL import Image

from sdk.errors import BatchError, InvalidInputError, TruncationWarning
from sdk.preprocess import load_image

pytest.importorskip("onnxruntime")

ATOL = 2e-6  # batch vs alone: only padding and batch shape differ


def quadrants(h: int = 64, w: int = 96) -> np.ndarray:
    """Four flat colours, one per quadrant: any rotation or flip changes it."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 0)
    return img


def enc(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h RGB pixels but holds almost no data (a few hundred bytes)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


# ------------------------------------------------------------------ the corpus


@dataclass
class Case:
    """One corpus entry.

    make(tmp) -> the item as {"image", "text", "trace"} (missing keys are None).
    bad: regex the error message must match, with {i} for the item index; None = must embed.
    pixels(tmp) -> the HWC uint8 RGB picture the image must decode to (built without
        sdk.preprocess); its vector must then equal the item's.
    not_pixels(tmp) -> what a wrong handling would give (unrotated, another frame, ...).
    same_as(tmp) -> an equivalent item (e.g. the text cut to the budget) with the same vector.
    """

    make: Callable[[Any], dict]
    bad: str | None = None
    pixels: Callable[[Any], np.ndarray] | None = None
    not_pixels: Callable[[Any], np.ndarray] | None = None
    same_as: Callable[[Any], dict] | None = None
    truncated: tuple[str, ...] = ()
    marks: list = field(default_factory=list)


def img(x):
    return lambda tmp: {"image": x(tmp) if callable(x) else x}


def const(x):
    return lambda tmp: x(tmp) if callable(x) else x


def file(name: str, data: bytes):
    def make(tmp):
        p = tmp / name
        p.write_bytes(data)
        return p

    return make


G = gradient(11)
JPEG = enc(G, "JPEG", quality=95)
PNG = enc(G, "PNG")
RANDOM = np.random.default_rng(5).integers(0, 256, 2048, dtype=np.uint8).tobytes()


def _zero_after(data: bytes, marker: bytes, skip: int, n: int) -> bytes:
    k = data.index(marker) + skip
    return data[:k] + bytes(n) + data[k + n :]


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return enc(quadrants(), "JPEG", quality=95, exif=exif.tobytes())


def _exif_jpeg_as_stored() -> np.ndarray:
    return rgb(Image.open(io.BytesIO(_exif_jpeg())))  # decoded, orientation not applied


def _gif() -> bytes:
    frames = [Image.fromarray(gradient(20 + k)).convert("P", palette=Image.ADAPTIVE) for k in range(3)]
    return enc(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _gif_frame(k: int) -> np.ndarray:
    im = Image.open(io.BytesIO(_gif()))
    im.seek(k)
    return rgb(im)


def _tiff_pages() -> bytes:
    pages = [Image.fromarray(gradient(30 + k)) for k in range(3)]
    return enc(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _palette_transparent() -> bytes:
    p = Image.fromarray(quadrants()).convert("P", palette=Image.ADAPTIVE, colors=4)
    red = next(i for i, c in enumerate(p.getpalette()[:12][::3]) if c == 255 and p.getpalette()[3 * i + 1] == 0)
    return enc(p, "PNG", transparency=red)


def _rgba() -> np.ndarray:
    a = np.dstack([G, np.tile(np.linspace(0, 255, G.shape[1], dtype=np.uint8), (G.shape[0], 1))])
    return a


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite on white, the documented handling of transparency (in float, then rounded)."""
    base = Image.new("RGBA", (rgba.shape[1], rgba.shape[0]), (255, 255, 255, 255))
    return rgb(Image.alpha_composite(base, Image.fromarray(rgba, "RGBA")))


def _i16() -> np.ndarray:
    return (gradient(40)[..., 0].astype(np.uint16) * 257)  # 0..65535


def _f32() -> np.ndarray:
    return gradient(41)[..., 1].astype(np.float32) / 255.0  # floats in [0, 1]


def _i32() -> np.ndarray:
    return gradient(42)[..., 2].astype(np.int32)  # ints in 0..255


def gray(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, -1)


LONG = " ".join(["red", "blue", "black", "white", "shoe"] * 8)  # 40 words, TEXT_MAX is 12 tokens


def _cut(text: str, n_words: int) -> str:
    return " ".join(text.split()[:n_words])


CASES: dict[str, Case] = {
    # ---- damaged or non-image bytes and files
    "corrupt jpeg (Huffman table zeroed)": Case(img(_zero_after(JPEG, b"\xff\xc4", 4, 36)),
                                                r"item {i} image: corrupt or truncated image \(OSError: broken data stream"),
    "jpeg header then garbage": Case(img(JPEG[:2] + RANDOM[:500]), r"item {i} image: not a recognised image format"),
    "truncated jpeg": Case(img(JPEG[: len(JPEG) // 2]), r"item {i} image: corrupt or truncated image (?i:.*truncated)"),
    "truncated png": Case(img(PNG[: len(PNG) // 2]), r"item {i} image: corrupt or truncated image (?i:.*truncated)"),
    "png with bad crc": Case(img(PNG[:60] + bytes([PNG[60] ^ 0xFF]) + PNG[61:]),
                             r"item {i} image: corrupt or truncated image"),
    "zero-byte file": Case(img(file("empty.jpg", b"")), r"item {i} image: file is empty \(0 bytes\): .*empty\.jpg"),
    "empty bytes": Case(img(b""), r"item {i} image: empty bytes, expected an encoded image"),
    "20000x20000 png header": Case(img(png_header(20000, 20000)), r"item {i} image: image too large"),
    "9000x9000 png header (over the sdk limit only)": Case(
        img(png_header(9000, 9000)), r"item {i} image: image too large \(9000x9000 = 81000000 pixels, limit 64000000\)"),
    "1x100M png header": Case(img(png_header(1, 100_000_000)), r"item {i} image: image too large"),
    "svg bytes": Case(img(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9">'
                          b'<rect width="9" height="9"/></svg>'),
                      r"item {i} image: not a recognised image format"),
    "html bytes": Case(img(b"<!doctype html><html><body><img src=x></body></html>"),
                       r"item {i} image: not a recognised image format"),
    "pdf bytes": Case(img(b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"),
                      r"item {i} image: not a recognised image format"),
    "random bytes": Case(img(RANDOM), r"item {i} image: not a recognised image format"),
    "random bytes file": Case(img(file("noise.png", RANDOM)), r"item {i} image: not a recognised image format"),
    "missing file": Case(img(lambda tmp: tmp / "nope.jpg"), r"item {i} image: file not found: .*nope\.jpg"),
    "directory path": Case(img(lambda tmp: tmp), r"item {i} image: .* is a directory, expected an image file"),
    "device path": Case(img("/dev/null"), r"item {i} image: /dev/null is not a regular file",
                        marks=[pytest.mark.skipif(sys.platform == "win32", reason="no /dev/null")]),
    "NUL byte in path": Case(img("photo\x00.jpg"), r"item {i} image: cannot access .*embedded null byte"),
    "file name too long": Case(img(lambda tmp: tmp / ("x" * 5000 + ".jpg")), r"item {i} image: cannot access "),
    # ---- wrong Python types and arrays
    "dict as image": Case(img({"url": "http://x/y.jpg"}), r"item {i} image: unsupported image type dict"),
    "CHW array": Case(img(np.zeros((3, 8, 8), np.uint8)), r"item {i} image: array must be HxW.*got shape \(3, 8, 8\)"),
    "float array": Case(img(np.full((8, 8, 3), 0.5)), r"item {i} image: array dtype must be uint8 .*got float64"),
    "NaN array": Case(img(np.full((8, 8, 3), np.nan, np.float32)), r"item {i} image: array dtype must be uint8 .*float32"),
    "inf array": Case(img(np.full((8, 8), np.inf)), r"item {i} image: array dtype must be uint8"),
    "bool array": Case(img(np.ones((8, 8, 3), bool)), r"item {i} image: array dtype must be uint8 .*got bool"),
    "uint16 array": Case(img(np.ones((8, 8, 3), np.uint16)), r"item {i} image: array dtype must be uint8 .*uint16"),
    "5-channel array": Case(img(np.zeros((8, 8, 5), np.uint8)), r"item {i} image: array must be .*\(8, 8, 5\)"),
    "zero-size array": Case(img(np.zeros((0, 8, 3), np.uint8)), r"item {i} image: array has no pixels"),
    "1-d array": Case(img(np.zeros(12, np.uint8)), r"item {i} image: array must be .*got shape \(12,\)"),
    "batched array as one item": Case(img(np.zeros((1, 8, 8, 3), np.uint8)),
                                      r"item {i} image: array must be .*got shape \(1, 8, 8, 3\)"),
    # ---- text
    "nothing at all": Case(lambda tmp: {}, r"item {i}: nothing to embed \(no image, no text, no trace\)"),
    "empty text only": Case(lambda tmp: {"text": ""}, r"item {i}: nothing to embed \(no image, text is empty/whitespace"),
    "whitespace text only": Case(lambda tmp: {"text": " \t\n\u00a0\u3000"},
                                 r"item {i}: nothing to embed \(no image, text is empty/whitespace, no trace\)"),
    "non-UTF-8 bytes as text": Case(lambda tmp: {"text": b"\xff\xfe caf\xe9"},
                                    r"item {i}: text must be a str or None, got bytes"),
    "undecodable bytes decoded with surrogateescape": Case(
        lambda tmp: {"text": b"red \xff shoe".decode("utf-8", "surrogateescape")},
        r"item {i}: text is not valid Unicode \(lone surrogate at character 4\)"),
    "lone surrogate in trace": Case(lambda tmp: {"text": "red", "trace": "x\ud800"},
                                    r"item {i}: trace is not valid Unicode"),
    "int as text": Case(lambda tmp: {"text": 7}, r"item {i}: text must be a str or None, got int"),
    "list as trace": Case(lambda tmp: {"text": "red", "trace": ["a"]}, r"item {i}: trace must be a str or None, got list"),
    # ---- handled: the vector equals that of the documented equivalent
    "1x1 png": Case(img(enc(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")),
                    pixels=const(np.array([[[10, 200, 30]]], np.uint8))),
    "cmyk jpeg": Case(img(enc(Image.fromarray(G).convert("CMYK"), "JPEG", quality=95)),
                      pixels=const(lambda tmp: rgb(Image.open(io.BytesIO(enc(Image.fromarray(G).convert("CMYK"), "JPEG",
                                                                                  quality=95)))))),
    "rgba png (transparency on white)": Case(img(enc(_rgba(), "PNG")), pixels=const(_over_white(_rgba())),
                                             not_pixels=const(G)),
    "rgba array": Case(img(_rgba()), pixels=const(_over_white(_rgba()))),
    "LA png": Case(img(enc(Image.fromarray(_rgba()).convert("LA"), "PNG")),
                   pixels=const(lambda tmp: _over_white(
                       np.asarray(Image.fromarray(_rgba()).convert("LA").convert("RGBA"))))),
    "palette png with transparency": Case(
        img(_palette_transparent()),
        pixels=const(lambda tmp: _over_white(np.asarray(Image.open(io.BytesIO(_palette_transparent())).convert("RGBA")))),
        not_pixels=const(quadrants())),
    "16-bit png (I;16)": Case(img(enc(Image.fromarray(_i16()), "PNG")), pixels=const(gray(gradient(40)[..., 0]))),
    "32-bit float tiff in [0,1] (F)": Case(img(enc(Image.fromarray(_f32()), "TIFF")),
                                           pixels=const(gray(gradient(41)[..., 1]))),
    "32-bit int tiff (I)": Case(img(enc(Image.fromarray(_i32()), "TIFF")), pixels=const(gray(gradient(42)[..., 2]))),
    "grayscale jpeg": Case(img(enc(Image.fromarray(G).convert("L"), "JPEG", quality=95)),
                           pixels=const(lambda tmp: rgb(Image.open(io.BytesIO(enc(Image.fromarray(G).convert("L"), "JPEG",
                                                                                  quality=95)))))),
    "grayscale HxW array": Case(img(G[..., 0]), pixels=const(gray(G[..., 0]))),
    "exif-rotated jpeg (orientation 6)": Case(
        img(_exif_jpeg()), pixels=const(lambda tmp: np.ascontiguousarray(np.rot90(_exif_jpeg_as_stored(), k=-1))),
        not_pixels=const(lambda tmp: _exif_jpeg_as_stored())),
    "animated gif (first frame)": Case(img(_gif()), pixels=const(lambda tmp: _gif_frame(0)),
                                       not_pixels=const(lambda tmp: _gif_frame(2))),
    "multi-page tiff (first page)": Case(img(file("pages.tiff", _tiff_pages())), pixels=const(gradient(30)),
                                         not_pixels=const(gradient(31))),
    "lossless webp": Case(img(enc(G, "WEBP", lossless=True)), pixels=const(G)),
    "bmp in a bytearray": Case(img(bytearray(enc(G, "BMP"))), pixels=const(G)),
    "png in a memoryview": Case(img(memoryview(PNG)), pixels=const(G)),
    "non-contiguous array view": Case(img(np.asarray(G[:, ::-1])), pixels=const(np.ascontiguousarray(G[:, ::-1]))),
    "unicode file name": Case(img(file("фото 例.png", PNG)), pixels=const(G)),
    "overlong text (truncated)": Case(lambda tmp: {"text": LONG}, same_as=lambda tmp: {"text": _cut(LONG, 10)},
                                      truncated=("text",)),
    "overlong trace (truncated)": Case(lambda tmp: {"text": "red", "trace": LONG},
                                       same_as=lambda tmp: {"text": "red", "trace": _cut(LONG, 14)}, truncated=("trace",)),
    "text with control characters": Case(lambda tmp: {"text": "red\x00\x1b[31m shoe\r\n"}),
    "text with emoji and RTL marks": Case(lambda tmp: {"text": "\u202eRed 👟 shoe\u200f"}),
    "whitespace text with an image": Case(lambda tmp: {"image": G, "text": "  "}, same_as=img(G)),
    "decoded image is not changed in place": Case(img(lambda tmp: Image.fromarray(_rgba(), "RGBA")),
                                                  pixels=const(_over_white(_rgba()))),
}

BAD = [k for k, c in CASES.items() if c.bad]
GOOD = [k for k, c in CASES.items() if not c.bad]


def params(names):
    return [pytest.param(n, id=n, marks=CASES[n].marks) for n in names]


def test_the_corpus_is_broad():
    assert len(BAD) >= 30 and len(GOOD) >= 20


# Good neighbours for every batch: photo+title, title only, photo bytes+trace.
NEIGHBOURS = [
    {"image": gradient(1), "text": "red shoe"},
    {"text": "blue cotton shirt for men"},
    {"image": enc(gradient(2), "PNG"), "trace": "black leather bag"},
]


def columns(items: list[dict]) -> dict:
    return {f"{k}s": [it.get(k) for it in items] for k in ("image", "text", "trace")}


@pytest.fixture(scope="module")
def emb(tiny_engine):
    from sdk import Embedder

    with Embedder(tiny_engine.path, threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def alone(emb):
    """Vectors of the neighbours, each embedded on its own."""
    return [emb.embed(**columns([n]))[0] for n in NEIGHBOURS]


def embed_one(emb, item) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        return emb.embed(**columns([item]))[0]


@pytest.mark.parametrize("name", params(BAD))
def test_bad_item_is_refused_and_its_neighbours_are_unharmed(emb, alone, tmp_path, name):
    case = CASES[name]
    item = case.make(tmp_path)
    batch = [NEIGHBOURS[0], NEIGHBOURS[1], item, NEIGHBOURS[2]]
    res = emb.embed_batch(**columns(batch))
    assert list(res.errors) == [2], res.errors
    assert re.fullmatch(case.bad.format(i=2) + ".*", res.errors[2], re.S), res.errors[2]
    assert res.errors[2].startswith("item 2")
    assert np.isnan(res.vectors[2]).all() and res.ok.tolist() == [True, True, False, True]
    for row, want in zip((0, 1, 3), alone):
        assert np.allclose(res.vectors[row], want, rtol=0, atol=ATOL)
    # embed: the same report on BatchError; errors="raise": InvalidInputError naming the item
    with pytest.raises(BatchError) as info:
        emb.embed(**columns(batch))
    assert info.value.errors == res.errors
    with pytest.raises(InvalidInputError, match="^" + case.bad.format(i=0)) as info:
        emb.embed(**columns([item]), errors="raise")
    assert not isinstance(info.value, BatchError)


@pytest.mark.parametrize("name", params(GOOD))
def test_odd_but_valid_item_is_handled_as_documented(emb, alone, tmp_path, name):
    case = CASES[name]
    item = case.make(tmp_path)
    batch = [NEIGHBOURS[0], item, NEIGHBOURS[1], NEIGHBOURS[2]]
    res = emb.embed_batch(**columns(batch))
    assert res.errors == {}
    assert res.truncated == ({1: case.truncated} if case.truncated else {})
    for row, want in zip((0, 2, 3), alone):
        assert np.allclose(res.vectors[row], want, rtol=0, atol=ATOL)
    v = embed_one(emb, item)
    assert np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-5
    assert np.allclose(res.vectors[1], v, rtol=0, atol=ATOL)
    if case.pixels:
        want = case.pixels(tmp_path)
        got = np.asarray(load_image(item["image"]))
        assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1
        assert np.allclose(v, embed_one(emb, {**item, "image": want}), rtol=0, atol=1e-5)
    if case.not_pixels:
        assert not np.array_equal(got, case.not_pixels(tmp_path))
    if isinstance(item.get("image"), Image.Image):
        assert item["image"].mode == "RGBA"  # the caller's image was not converted in place
    if case.same_as:
        assert np.allclose(v, embed_one(emb, case.same_as(tmp_path)), rtol=0, atol=ATOL)
    if case.truncated:
        with pytest.warns(TruncationWarning, match=r"1 of 1 item\(s\) were truncated"):
            emb.embed(**columns([item]))


def test_whole_corpus_in_one_batch(emb, tiny_engine, tmp_path):
    """Every case at once, shuffled among good neighbours and cut into small batches: each bad
    item is reported under its index, every other vector equals its vector alone."""
    items, expect = [], {}
    for name in BAD + GOOD:
        if any(m.name == "skipif" and m.args[0] for m in CASES[name].marks):
            continue
        items.append((name, CASES[name].make(tmp_path)))
    items += [(f"neighbour {k}", n) for k, n in enumerate(NEIGHBOURS * 3)]
    order = np.random.default_rng(0).permutation(len(items))
    items = [items[k] for k in order]
    for idx, (name, _) in enumerate(items):
        if name in CASES and CASES[name].bad:
            expect[idx] = CASES[name].bad.format(i=idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        res = emb.embed_batch(**columns([it for _, it in items]), batch_size=5)
        assert sorted(res.errors) == sorted(expect)
        for idx, pattern in expect.items():
            assert re.fullmatch(pattern + ".*", res.errors[idx], re.S), (idx, res.errors[idx])
        for idx, (name, it) in enumerate(items):
            if idx not in expect:
                assert np.allclose(res.vectors[idx], embed_one(emb, it), rtol=0, atol=ATOL), name

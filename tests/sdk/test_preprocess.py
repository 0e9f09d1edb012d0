"""Image and text preprocessing: good inputs of every common kind, and clear errors for bad ones."""

import io

import numpy as np
import pytest
from PIL import Image

from sdk.errors import InvalidInputError
from sdk.preprocess import ImagePreprocess, TextTokenizer, image_to_array, load_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


RED = Image.new("RGB", (30, 40), (255, 0, 0))


@pytest.mark.parametrize(
    "src",
    [
        RED,
        _png(RED),
        _jpeg(RED),
        np.full((40, 30, 3), 128, np.uint8),
        np.full((40, 30), 7, np.uint8),
        np.full((40, 30, 4), 200, np.uint8),
        _png(RED.convert("L")),
        _png(RED.convert("P")),
        _jpeg(RED.convert("CMYK")),
        _png(Image.new("RGBA", (8, 8), (0, 0, 0, 0))),
        _png(Image.new("I;16", (8, 8), 65535)),
        _png(Image.new("RGB", (1, 1), (1, 2, 3))),
    ],
    ids=["pil", "png", "jpeg", "hwc", "hw", "hwc4", "gray", "palette", "cmyk", "rgba", "16bit", "1x1"],
)
def test_load_image_accepts_common_kinds(src):
    img = load_image(src)
    assert img.mode == "RGB"
    x = image_to_array(img)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0


def test_transparent_pixels_become_white():
    img = load_image(_png(Image.new("RGBA", (4, 4), (0, 0, 0, 0))))
    assert np.asarray(img).min() == 255


def test_16bit_is_scaled_not_clipped():
    img = load_image(_png(Image.new("I;16", (4, 4), 32768)))
    assert 120 <= np.asarray(img)[0, 0, 0] <= 135


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("P", (10, 10), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).size == (10, 10)


@pytest.mark.parametrize(
    "src, match",
    [
        (b"", "empty bytes"),
        (b"<html>not an image</html>", "not a recognised image"),
        (_jpeg(Image.new("RGB", (64, 64)))[:200], "corrupt or truncated"),
        (np.zeros((4, 4, 3), np.float32), "dtype must be uint8"),
        (np.zeros((4, 4, 5), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "no pixels"),
        (12345, "unsupported image type"),
    ],
    ids=["empty", "html", "truncated", "float-array", "5-channel", "zero-size", "int"],
)
def test_bad_images_raise_clear_errors(src, match):
    with pytest.raises(InvalidInputError, match=match):
        load_image(src, name="item 3 image")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InvalidInputError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="0 bytes"):
        load_image(empty)


def test_decompression_bomb_is_refused(monkeypatch):
    import sdk.preprocess as pp

    monkeypatch.setattr(pp, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InvalidInputError, match="too large"):
        load_image(_png(Image.new("RGB", (100, 100))))


def test_image_to_array_rules():
    img = Image.new("RGB", (300, 400), (255, 255, 255))
    assert np.allclose(image_to_array(img, ImagePreprocess(size=32)), 1.0)
    x = image_to_array(img, ImagePreprocess(size=32, resize="center_crop", scale="imagenet"))
    assert x.shape == (3, 32, 32)
    assert np.allclose(x[0], (1 - 0.485) / 0.229, atol=1e-5)


@pytest.mark.parametrize("cfg", [ImagePreprocess(size=32), ImagePreprocess(size=32, resize="center_crop", scale="imagenet")],
                         ids=["pm1-squash", "imagenet-crop"])
def test_image_to_array_writes_into_out(cfg):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (41, 23, 3), dtype=np.uint8))
    batch = np.full((2, 3, 32, 32), np.nan, np.float32)
    got = image_to_array(img, cfg, out=batch[1])
    assert np.shares_memory(got, batch[1]) and got.shape == (3, 32, 32)
    np.testing.assert_array_equal(batch[1], image_to_array(img, cfg))
    assert np.isnan(batch[0]).all()  # the other row is untouched
    for bad in (np.empty((3, 32, 32), np.float64), np.empty((3, 16, 16), np.float32),
                np.empty((3, 32, 64), np.float32)[:, :, ::2]):
        with pytest.raises(ValueError, match=r"out must be a writeable C-contiguous float32 array of shape \(3, 32, 32\)"):
            image_to_array(img, cfg, out=bad)


@pytest.mark.parametrize("cfg", [ImagePreprocess(), ImagePreprocess(size=40, resize="center_crop", scale="imagenet")],
                         ids=["pm1-squash", "imagenet-crop"])
def test_scaling_by_table_is_bit_identical_to_float_arithmetic(cfg):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 29, 3), dtype=np.uint8))
    got = image_to_array(img, cfg)
    s = cfg.size
    if cfg.resize == "squash":
        r = img.resize((s, s), Image.BILINEAR)
    else:
        k = s / min(img.size)
        r = img.resize((max(s, round(img.size[0] * k)), max(s, round(img.size[1] * k))), Image.BILINEAR)
        left, top = (r.size[0] - s) // 2, (r.size[1] - s) // 2
        r = r.crop((left, top, left + s, top + s))
    x = np.asarray(r, dtype=np.float32) / 255.0
    x = x * 2.0 - 1.0 if cfg.scale == "pm1" else (x - np.float32(cfg.mean)) / np.float32(cfg.std)
    want = x.transpose(2, 0, 1)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (3, s, s)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kw", [{"size": 8}, {"resize": "stretch"}, {"scale": "0-1"}, {"mean": (0.5, 0.5)},
                                {"mean": "abc"}, {"mean": [[0.5], 0.5, 0.5]}, {"std": (0.2, 0.0, 0.2)},
                                {"std": (0.2, float("nan"), 0.2)}, {"mean": (True, 0.5, 0.5)}])
def test_image_preprocess_validates(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        ImagePreprocess(**kw)


@pytest.fixture()
def tiny_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "red": 4, "shoe": 5, "blue": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_pads_to_longest_and_truncates(tiny_tokenizer):
    tok = TextTokenizer(tiny_tokenizer, max_length=4)
    ids, mask = tok(["red shoe", "blue", "red red red red red"])
    assert ids.shape == mask.shape == (3, 4)
    assert ids[0].tolist() == [2, 4, 5, 3]
    assert ids[1].tolist() == [2, 6, 3, 0] and mask[1].tolist() == [1, 1, 1, 0]
    assert mask[2].sum() == 4


def test_tokenizer_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="max_length"):
        TextTokenizer(tiny_tokenizer, max_length=1)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        TextTokenizer(tmp_path / "missing.json")

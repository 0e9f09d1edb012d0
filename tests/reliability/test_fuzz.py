"""Bounded, derandomized fuzzing (hypothesis) of everything that reads untrusted bytes: the engine
file reader, image decoding, arrays and text tokenisation. Only the documented exception types
(SdkError subclasses) may escape; nothing may crash or hang (the hang guard of conftest.py).

The longer, coverage-guided run is tests/reliability/fuzz_atheris.py (see docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings

import numpy as np
import pytest
from fuzz_seeds import examples, seed_engine, seed_images
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sdk.engine import _HEADER, FORMAT_VERSION, MAGIC, EngineFile, _check_name
from sdk.errors import EngineError, InvalidInputError, SdkError
from sdk.preprocess import TextTokenizer, load_image

FUZZ = settings.get_profile("moon3-fuzz")


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seed")
    return seed_engine(folder / "seed.engine")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "x.engine"


def read_or_refuse(path) -> EngineFile | None:
    """EngineFile.read: a verified file or EngineError; anything else fails the test. The lazy
    reader (EngineFile.open, then every part) must agree: the same refusal or the same bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "built by a newer moon3-sdk" after edits
        try:
            eager = EngineFile.read(path)
        except EngineError as exc:
            assert str(exc)
            eager = None
        try:
            with EngineFile.open(path) as lazy:
                lazy_parts = {n: lazy.part(n) for n in lazy.part_names}
        except EngineError as exc:
            assert str(exc)
            lazy_parts = None
    assert (eager is None) == (lazy_parts is None)
    if eager is not None:
        assert lazy_parts == {n: eager.part(n) for n in eager.part_names}
    return eager


def forge(manifest_body: bytes, data: bytes) -> bytes:
    """An engine file around any manifest bytes, with the manifest digest recomputed (what an
    attacker who edits the manifest would do: integrity must then come from the part digests)."""
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest_body), hashlib.sha256(manifest_body).digest())
    return header + manifest_body + data


def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack_from("<Q", raw, 12)[0]
    return json.loads(raw[_HEADER.size : _HEADER.size + n]), raw[_HEADER.size + n :]


def check_verified(e: EngineFile, raw: bytes) -> None:
    """What a successful read promises: every part is exactly the bytes its digest names."""
    for entry in e.manifest["parts"]:
        assert hashlib.sha256(e.part(entry["name"])).hexdigest() == entry["sha256"]
        assert len(e.part(entry["name"])) == entry["size"]


# ------------------------------------------------------------------ engine file reader


@settings(FUZZ, max_examples=examples(300))
@given(st.one_of(st.binary(max_size=2048), st.binary(max_size=512).map(lambda b: MAGIC + b),
                 st.binary(max_size=512).map(lambda b: MAGIC + struct.pack("<I", FORMAT_VERSION) + b)))
def test_random_bytes_are_refused(scratch, data):
    scratch.write_bytes(data)
    assert read_or_refuse(scratch) is None


@settings(FUZZ, max_examples=examples(400))
@given(st.data())
def test_any_damage_to_a_valid_engine_is_refused(seed, scratch, data):
    """Every byte of the file is covered by the magic, the version, a length or a digest: any
    flipped, dropped, inserted or appended byte is refused."""
    raw = bytearray(seed)
    kind = data.draw(st.sampled_from(["flip", "flip-many", "truncate", "insert", "append", "delete"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "flip-many":
        for p in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=2, max_size=16, unique=True)):
            raw[p] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[:pos]
    elif kind == "insert":
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    elif kind == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        del raw[pos : pos + data.draw(st.integers(1, 64))]
    scratch.write_bytes(bytes(raw))
    assert read_or_refuse(scratch) is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
FIELDS = ["name", "offset", "size", "sha256"]


@settings(FUZZ, max_examples=examples(400))
@given(st.data())
def test_forged_manifests_never_yield_unverified_parts(seed, scratch, data):
    """Manifest edits with a recomputed digest: refused, or read with every part still verified."""
    man, body_data = split(seed)
    parts = man["parts"]
    kind = data.draw(st.sampled_from(["part-field", "drop-field", "top-level", "swap", "reorder", "extra-part",
                                      "raw-json", "raw-bytes", "nesting"]))
    if kind == "part-field":
        parts[data.draw(st.integers(0, len(parts) - 1))][data.draw(st.sampled_from(FIELDS))] = data.draw(JSON)
    elif kind == "drop-field":
        del parts[data.draw(st.integers(0, len(parts) - 1))][data.draw(st.sampled_from(FIELDS))]
    elif kind == "top-level":
        man[data.draw(st.sampled_from(["parts", "versions", "embedder", "format_version", "x"]))] = data.draw(JSON)
    elif kind == "swap":
        i, j = data.draw(st.lists(st.integers(0, len(parts) - 1), min_size=2, max_size=2, unique=True))
        parts[i]["name"], parts[j]["name"] = parts[j]["name"], parts[i]["name"]
    elif kind == "reorder":
        man["parts"] = data.draw(st.permutations(parts))
    elif kind == "extra-part":
        parts.append({"name": data.draw(st.text(max_size=20)), "offset": data.draw(st.integers(-5, 2000)),
                      "size": data.draw(st.integers(-5, 2000)), "sha256": hashlib.sha256(b"").hexdigest()})
    body = json.dumps(man).encode()
    if kind == "raw-json":
        body = data.draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    elif kind == "raw-bytes":
        body = data.draw(st.binary(max_size=300))
    elif kind == "nesting":
        depth = data.draw(st.integers(1, 200_000))
        body = b'{"parts": [], "x": ' + b"[" * depth + b"]" * depth + b"}"
    raw = forge(body, body_data)
    scratch.write_bytes(raw)
    e = read_or_refuse(scratch)
    if e is not None:
        # Swapped names or reordered entries with a recomputed manifest digest stay consistent:
        # the digests guard integrity, not authenticity (the README says to pin the file's SHA-256).
        check_verified(e, raw)


@settings(FUZZ, max_examples=examples(500))
@given(st.text(max_size=40) | st.sampled_from(["../x", "/etc/passwd", "a/../../b", "a/./b", "./a", "a//b", "C:\\x",
                                                "a\\..\\b", "~/x", "a/b/c/d/e", ".", "..", "a\x00b", "a\nb"]))
def test_accepted_part_names_cannot_leave_a_folder(name):
    """No part name the format accepts can point outside a folder it would be extracted to: no
    '..' component, no absolute or drive path, no backslash, no empty or dot component."""
    try:
        _check_name(name)
    except EngineError:
        return
    base = os.path.abspath("base")
    target = os.path.normpath(os.path.join(base, name))
    assert target.startswith(base + os.sep)
    comps = name.split("/")
    assert all(c and not c.startswith(".") for c in comps) and "\\" not in name and ":" not in name


# ------------------------------------------------------------------ images and arrays


SEEDS = seed_images()


def decode_or_refuse(src) -> None:
    try:
        img = load_image(src, name="item 0 image")
    except InvalidInputError as exc:
        assert str(exc).startswith("item 0 image: ")
        return
    assert img.mode == "RGB" and min(img.size) >= 1
    np.asarray(img)  # the pixels are really there


@settings(FUZZ, max_examples=examples(400))
@given(st.data())
def test_mutated_images_decode_or_are_refused(data):
    raw = bytearray(SEEDS[data.draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            raw = raw[:pos]
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=32))
        elif kind == "overwrite":
            chunk = data.draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                                               b"\xff\xd8\xff\xc0", b"IHDR", b"\x80\x00\x00\x00"]))
            raw[pos : pos + len(chunk)] = chunk
        else:
            del raw[pos : pos + data.draw(st.integers(1, 32))]
    decode_or_refuse(bytes(raw))


@settings(FUZZ, max_examples=examples(200))
@given(st.binary(max_size=1024) | st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00",
                                                    b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP", b"BM"]).flatmap(
    lambda magic: st.binary(max_size=256).map(lambda rest: magic + rest)))
def test_random_bytes_as_image(data):
    decode_or_refuse(data)


@settings(FUZZ, max_examples=examples(200))
@given(hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_, np.int8]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
))
def test_arrays_decode_or_are_refused(arr):
    decode_or_refuse(arr)
    usable = arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)))
    if usable and arr.size:
        load_image(arr)  # documented as accepted: must not raise


# ------------------------------------------------------------------ text


TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60)  # surrogates included


@pytest.fixture(scope="module")
def tokenizer_file(tiny_engine):
    return tiny_engine.tokenizer


def _valid(t) -> bool:
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(FUZZ, max_examples=examples(300))
@given(st.lists(TEXT | st.none() | st.integers() | st.binary(max_size=4), max_size=6))
def test_tokenizer_takes_any_str_and_refuses_the_rest(tokenizer_file, texts):
    tok = TextTokenizer(tokenizer_file, max_length=8)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not _valid(t)]
    try:
        ids, mask = tok(texts)
    except InvalidInputError as exc:
        assert bad and str(exc).startswith(f"text {bad[0]}: ")
        return
    assert not bad
    assert ids.shape == mask.shape and ids.shape[0] == len(texts) and ids.shape[1] <= 8
    assert ((mask == 0) | (mask == 1)).all()


@pytest.fixture(scope="module")
def emb(tiny_engine):
    from sdk import Embedder

    with Embedder(tiny_engine.path, threads=1) as e:
        yield e


@settings(FUZZ, max_examples=examples(150))
@given(texts=st.lists(TEXT | st.none() | st.integers(), min_size=1, max_size=6),
       traces=st.lists(TEXT | st.none(), min_size=6, max_size=6))
def test_embedder_text_never_raises_per_item(emb, texts, traces):
    """embed_batch reports bad text per item, never raises for one; good rows are unit vectors."""
    traces = traces[: len(texts)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = emb.embed_batch(texts=texts, traces=traces)
    for i, (t, s) in enumerate(zip(texts, traces)):
        wrong = (t is not None and not isinstance(t, str)) or (isinstance(t, str) and not _valid(t)) or (
            s is not None and not _valid(s))
        empty = all(v is None or (isinstance(v, str) and not v.strip()) for v in (t, s))
        assert (i in res.errors) == (wrong or empty), (i, t, s, res.errors.get(i))
        if i in res.errors:
            assert res.errors[i].startswith(f"item {i}: ") and np.isnan(res.vectors[i]).all()
        else:
            assert abs(np.linalg.norm(res.vectors[i]) - 1) < 1e-5


# ------------------------------------------------------------------ the embedder on forged manifests


@pytest.fixture(scope="module")
def engines(tiny_engine, tiny_split_engine):
    return {"single": tiny_engine.path.read_bytes(), "split": tiny_split_engine.path.read_bytes()}


@pytest.mark.parametrize("layout", ["single", "split"])
@settings(FUZZ, max_examples=examples(40))
@given(st.data())
def test_embedder_on_forged_manifest_sections(engines, tmp_path_factory, layout, data):
    """Edits of the embedder/preprocess contract (digest recomputed, parts intact): Embedder
    refuses with EngineError, or loads and embeds (or refuses an item) with SdkError only."""
    from sdk import Embedder

    man, body_data = split(engines[layout])
    section = data.draw(st.sampled_from(["embedder", "preprocess"]))
    keys = sorted(man[section])
    key = data.draw(st.sampled_from(keys))
    if isinstance(man[section][key], dict) and man[section][key] and data.draw(st.booleans()):
        sub = data.draw(st.sampled_from(sorted(man[section][key])))
        man[section][key][sub] = data.draw(JSON | st.integers(-3, 5000))
    else:
        man[section][key] = data.draw(JSON)
    body = json.dumps(man).encode()
    path = tmp_path_factory.mktemp("forged") / "f.engine"
    path.write_bytes(forge(body, body_data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            e = Embedder(path, threads=1)
        except EngineError as exc:
            assert str(path) in str(exc)
            return
        try:
            e.embed(images=[np.full((8, 8, 3), 9, np.uint8)], texts=["red shoe"])
        except SdkError:
            pass

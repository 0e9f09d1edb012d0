"""Coverage-guided fuzzing of the untrusted-input readers with atheris (libFuzzer for Python).

Not part of the test run; the default tests run the bounded hypothesis fuzzers of test_fuzz.py.

    pip install 'moon3-sdk[fuzz]'          # atheris
    python tests/reliability/fuzz_atheris.py engine -max_total_time=300 -timeout=20
    python tests/reliability/fuzz_atheris.py image  -max_total_time=300 -timeout=20 -rss_limit_mb=4096
    python tests/reliability/fuzz_atheris.py text   -max_total_time=120
    python tests/reliability/fuzz_atheris.py onnx   -max_total_time=120

Targets: engine (sdk.engine.EngineFile.read: raw bytes, damaged seed engines, forged manifests
with valid digests), image (sdk.preprocess.load_image on bytes; Pillow's Python plugins are
instrumented too), text (sdk.preprocess.TextTokenizer), onnx (sdk.onnxcheck, the external-data
scan). Only SdkError (and MalformedGraph for onnx) may escape; any other exception, a hang past
-timeout or memory past -rss_limit_mb is a finding, saved by libFuzzer as crash-*/timeout-*/oom-*
in the working directory. Extra arguments go to libFuzzer (e.g. a corpus folder, -runs=N).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/: pictures.py

import PIL.Image  # noqa: E402
from fuzz_seeds import seed_engine, seed_images  # noqa: E402

from sdk.engine import _HEADER, FORMAT_VERSION, MAGIC, EngineFile  # noqa: E402
from sdk.errors import SdkError  # noqa: E402
from sdk.onnxcheck import MalformedGraph, external_data_tensors  # noqa: E402
from sdk.preprocess import TextTokenizer, load_image  # noqa: E402

PIL.Image.init()  # load every format plugin now, so that instrument_all() covers them

warnings.simplefilter("ignore")  # Pillow warns on odd files; warnings are not findings
SCRATCH = Path(tempfile.mkdtemp(prefix="moon3-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
SEED = seed_engine(SCRATCH / "seed.engine")
_N = struct.unpack_from("<Q", SEED, 12)[0]
SEED_DATA = SEED[_HEADER.size + _N :]


def fuzz_engine(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # raw bytes behind a valid magic and version half of the time
        raw = (MAGIC + struct.pack("<I", FORMAT_VERSION) if fdp.ConsumeBool() else b"") + fdp.ConsumeBytes(4096)
    elif mode == 1:  # the seed engine with bytes overwritten
        raw = bytearray(SEED)
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            raw[fdp.ConsumeIntInRange(0, len(raw) - 1)] = fdp.ConsumeInt(1) & 0xFF
        raw = bytes(raw[: fdp.ConsumeIntInRange(0, len(raw))])
    else:  # a forged manifest with a valid digest in front of the seed's parts
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
        raw = _HEADER.pack(MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest()) + body + SEED_DATA
    path = SCRATCH / "x.engine"
    path.write_bytes(raw)
    try:
        e = EngineFile.read(path)
    except SdkError:
        return
    for entry in e.manifest["parts"]:  # a read engine is a verified engine
        assert hashlib.sha256(e.part(entry["name"])).hexdigest() == entry["sha256"]


def fuzz_image(data: bytes) -> None:
    try:
        img = load_image(data, name="item 0 image")
    except SdkError:
        return
    assert img.mode == "RGB" and min(img.size) >= 1


def _tokenizer() -> TextTokenizer:
    spec = importlib.util.spec_from_file_location("tests_conftest", HERE.parent / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = SCRATCH / "tokenizer.json"
    path.write_text(mod.tiny_tokenizer_json())
    return TextTokenizer(path, max_length=16)


def fuzz_text(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    texts = [fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 200)) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    try:
        ids, mask = TOKENIZER(texts)
    except SdkError:
        return
    assert ids.shape == mask.shape and ids.shape[0] == len(texts) and ids.shape[1] <= 16


def fuzz_onnx(data: bytes) -> None:
    try:
        external_data_tensors(data)
    except MalformedGraph:
        return


TARGETS = {"engine": fuzz_engine, "image": fuzz_image, "text": fuzz_text, "onnx": fuzz_onnx}
TOKENIZER = None


def main() -> None:
    global TOKENIZER
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer args]")
    target = sys.argv.pop(1)
    if target == "text":
        TOKENIZER = _tokenizer()
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for c in corpus:
        Path(c).mkdir(parents=True, exist_ok=True)
    if target == "image" and corpus:  # start from valid files of every format
        for name, blob in seed_images().items():
            (Path(corpus[0]) / f"seed-{name}").write_bytes(blob)
    # Instrument every loaded Python function (sdk, Pillow's plugins, ...): an editable install's
    # import finder hides sdk from atheris.instrument_imports.
    atheris.instrument_all()
    atheris.Setup(sys.argv, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()

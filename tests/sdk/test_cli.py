"""The moon3 command line on a tiny engine: clear errors and exit codes for bad input, the runtime flags
(--providers, --batch-size, --threads) reaching `sdk.Embedder`, and the progress bar."""

import json

import numpy as np
import pytest

from sdk.cli import main


def test_inspect_missing_and_damaged_engine(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.engine")]) == 2
    assert "engine file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"not an engine at all, just some bytes" * 3)
    assert main(["inspect", str(bad)]) == 2
    assert "not a moon3 engine file" in capsys.readouterr().err


def test_inspect_json(tiny_engine, capsys):
    assert main(["inspect", str(tiny_engine.path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["embedder"]["dim"] == 32 and [p["name"] for p in m["parts"]] == ["embedder.onnx", "tokenizer.json"]


def test_embed_reports_bad_records_and_keeps_good_ones(tiny_engine, tmp_path, capsys):
    w = tiny_engine.words
    lines = [json.dumps({"id": 1, "title": f"{w[0]} {w[1]}"}), json.dumps({"id": 2, "title": "", "image": None}),
             json.dumps({"id": 3, "title": w[2]})]
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert main(["embed", str(tiny_engine.path), "--input", str(src), "--out", str(tmp_path / "v.npy")]) == 1
    v = np.load(tmp_path / "v.npy")
    assert np.isfinite(v[[0, 2]]).all() and np.isnan(v[1]).all()
    side = json.loads((tmp_path / "v.items.json").read_text())
    assert side["ids"] == [1, 2, 3] and list(side["errors"]) == ["1"]
    assert "record 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, match", [(None, "input not found"), ('{"id": 1, "title": "a"}\n{broken\n', "items.jsonl:2: not valid JSON")]
)
def test_embed_bad_input_file(tiny_engine, tmp_path, capsys, content, match):
    src = tmp_path / "items.jsonl"
    if content is not None:
        src.write_text(content)
    assert main(["embed", str(tiny_engine.path), "--input", str(src), "--out", str(tmp_path / "v.npy")]) == 2
    assert match in capsys.readouterr().err


def test_bad_records_are_numbered_in_the_file_across_chunks(tiny_engine, tmp_path):
    from sdk import Embedder
    from sdk.commands import embed_records

    w = tiny_engine.words
    records = [{"title": w[i]} for i in range(5)]
    records[3] = {"title": w[3], "image": "missing.jpg"}
    with Embedder(tiny_engine.path, threads=1) as emb:
        vecs, errors = embed_records(emb, records, tmp_path, None, chunk=2)
    assert list(errors) == [3] and errors[3].startswith("record 3 image:")
    assert np.isnan(vecs[3]).all() and np.isfinite(np.delete(vecs, 3, 0)).all()


def _catalog(folder, words, n=5):
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"id": i, "title": f"{words[i]} {words[i + 1]}"}) for i in range(n)]
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_embed_shows_a_progress_bar_and_still_reports_bad_items(tiny_engine, tmp_path, capsys):
    w = tiny_engine.words
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [{"id": 1, "title": w[0]}, {"id": 2, "title": ""},
                                                        {"id": 3, "title": w[1]}]) + "\n")
    assert main(["embed", str(tiny_engine.path), "--input", str(src), "--out", str(tmp_path / "v.npy")]) == 1
    err = capsys.readouterr().err
    bar = f"\r[{'#' * 30}] 3/3 products"
    assert bar in err and "embedded 3/3" not in err
    assert err.index(bar) < err.index("  bad item: record 1")  # the report follows the finished bar
    side = json.loads((tmp_path / "v.items.json").read_text())
    assert side["ids"] == [1, 2, 3] and list(side["errors"]) == ["1"]


def test_runtime_flags_parse():
    from sdk.cli import build_parser

    for cmd in (["embed", "e", "--input", "i", "--out", "o"], ["search", "e"],
                ["index", "build", "e", "--catalog", "c", "--out", "o"]):
        a = build_parser().parse_args(cmd)
        assert (a.providers, a.batch_size, a.threads) == (None, 32, None)  # the Embedder's defaults
        a = build_parser().parse_args([*cmd, "--providers", "cuda, cpu", "--batch-size", "8", "--threads", "2"])
        assert (a.providers, a.batch_size, a.threads) == (["cuda", "cpu"], 8, 2)


def test_reason_and_bench_take_the_same_backend_names(capsys):
    from sdk.cli import build_parser

    a = build_parser().parse_args(["reason", "e", "--providers", "cuda,cpu", "--threads", "2"])
    assert (a.providers, a.threads) == (["cuda", "cpu"], 2)
    assert build_parser().parse_args(["reason", "e"]).providers is None
    for given, want in ((["cuda,cpu"], ["cuda", "cpu"]), (["cuda", "cpu"], ["cuda", "cpu"]), ([], ["cpu"])):
        a = build_parser().parse_args(["bench", "e", *(["--providers", *given] if given else [])])
        assert [n for names in a.providers for n in names] == want  # comma- or space-separated
    for cmd in (["reason", "e"], ["bench", "e"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--providers", "gpu"])
        assert "unknown backend 'gpu'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cmd", [["embed", "e", "--input", "i", "--out", "o"], ["search", "e", "--catalog", "c"],
            ["index", "build", "e", "--catalog", "c", "--out", "o"]], ids=["embed", "search", "index"])
@pytest.mark.parametrize(
    "flag, value, match",
    [("--providers", "gpu", "argument --providers: unknown backend 'gpu'; available: cpu, cuda, tensorrt"),
     ("--providers", "cpu,", "argument --providers: empty backend name in 'cpu,'"),
     ("--batch-size", "0", "argument --batch-size: expected a positive integer, got '0'"),
     ("--batch-size", "2.5", "argument --batch-size: expected a positive integer, got '2.5'"),
     ("--threads", "-1", "argument --threads: expected a positive integer, got '-1'")],
)
def test_runtime_flags_refuse_bad_values(cmd, flag, value, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, f"{flag}={value}"])
    assert exc.value.code == 2 and match in capsys.readouterr().err


@pytest.fixture
def spy(monkeypatch):
    """Records what the CLI hands `Embedder`: (providers, threads) per engine load, batch_size per call."""
    from sdk.embedder import Embedder

    calls = {"init": [], "batch_size": []}
    init = Embedder.__init__

    def spy_init(self, path, providers=None, threads=None):
        calls["init"].append((providers, threads))
        init(self, path, providers=providers, threads=threads)

    monkeypatch.setattr(Embedder, "__init__", spy_init)
    for name in ("embed", "embed_products"):
        def spy_call(self, *a, _orig=getattr(Embedder, name), **kw):
            calls["batch_size"].append(kw.get("batch_size"))
            return _orig(self, *a, **kw)

        monkeypatch.setattr(Embedder, name, spy_call)
    return calls


@pytest.mark.parametrize("command", ["embed", "search-catalog", "index-build", "search-index"])
def test_runtime_flags_reach_the_embedder(tiny_engine, tmp_path, spy, command, capsys):
    cat = _catalog(tmp_path / "cat", tiny_engine.words)
    flags = ["--providers", "cpu", "--batch-size", "2", "--threads", "1"]
    eng = str(tiny_engine.path)
    if command == "search-index":  # an index built without the flags; only the search is spied on
        assert main(["index", "build", eng, "--catalog", str(cat), "--out", str(tmp_path / "idx"),
                     "--backend", "numpy"]) == 0
        spy["init"].clear()
        spy["batch_size"].clear()
    argv = {
        "embed": ["embed", eng, "--input", str(cat / "items.jsonl"), "--out", str(tmp_path / "v.npy")],
        "search-catalog": ["search", eng, "--catalog", str(cat), "--query", tiny_engine.words[0]],
        "index-build": ["index", "build", eng, "--catalog", str(cat), "--out", str(tmp_path / "idx"),
                        "--backend", "numpy"],
        "search-index": ["search", eng, "--index", str(tmp_path / "idx"), "--query", tiny_engine.words[0],
                         "--backend", "numpy"],
    }[command]
    assert main([*argv, *flags]) == 0, capsys.readouterr().err
    assert spy["init"] == [(["cpu"], 1)]
    assert spy["batch_size"] and set(spy["batch_size"]) == {2}
    if command == "embed":  # the batch size changes the padding, never the vectors
        v = np.load(tmp_path / "v.npy")
        assert main(argv) == 0
        np.testing.assert_allclose(v, np.load(tmp_path / "v.npy"), atol=1e-5)


def test_a_backend_this_onnxruntime_lacks_is_named(tiny_engine, tmp_path, capsys):
    from sdk.sessions import available_backends

    if "cuda" in available_backends():
        pytest.skip("this onnxruntime has CUDA")
    cat = _catalog(tmp_path / "cat", tiny_engine.words)
    rc = main(["embed", str(tiny_engine.path), "--input", str(cat / "items.jsonl"), "--out", str(tmp_path / "v.npy"),
               "--providers", "cuda,cpu"])
    assert rc == 2 and "error: backend 'cuda' needs CUDAExecutionProvider" in capsys.readouterr().err
    assert not (tmp_path / "v.npy").exists()

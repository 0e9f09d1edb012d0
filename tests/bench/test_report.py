"""benchmarks/report.py on a synthetic pytest-benchmark file: rows, same-run ratios, targets, tables, plots."""

import importlib.util
import json
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(name, median_s, **info):
    return {"name": name, "group": "g", "stats": {"median": median_s, "rounds": 5}, "extra_info": info}


def _file(tmp_path, stem, benches):
    path = tmp_path / f"{stem}.json"
    path.write_text(json.dumps({
        "datetime": "2026-01-01T00:00:00", "commit_info": {"id": "abc"},
        "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11"},
        "benchmarks": benches,
    }))
    return path


def _row(runner, kind, modality, batch, p50_ms, items=None, **extra):
    items = items or batch
    return _bench(f"t[{runner}-{batch}]", p50_ms / 1e3, runner=runner, kind=kind, precision="int8-dynamic",
                  modality=modality, batch=batch, items=items, p50_ms=p50_ms, p99_ms=p50_ms * 1.5, min_ms=p50_ms * 0.8,
                  items_per_s=items / (p50_ms / 1e3), cosine_mean=0.998, cosine_min=0.995, **extra)


@pytest.fixture
def files(tmp_path):
    emb = _file(tmp_path, "embedder", [
        _row("moon3 int8 (cpu)", "engine", "image+text", 1, 10.0),
        _row("torch eager fp32 (teacher)", "teacher", "image+text", 1, 50.0),
        _row("moon3 int8 (cpu)", "engine", "image+text", 8, 40.0),
        _row("torch eager fp32 (teacher)", "teacher", "image+text", 8, 400.0),
        _row("moon3 int8 (cpu)", "cold-start", "text", 1, 900.0, cold_start_s=0.6, import_s=0.1, load_s=0.45,
             first_embed_s=0.05, warm_embed_s=0.01, peak_rss_mb=400.0, process_s=0.9),
        _bench("test_no_runner", 0.001),  # benchmarks without a runner (e.g. ops) are left out
    ])
    peers = _file(tmp_path, "peers", [
        _row("moon3 int8", "text-peer", "text", 1, 5.0),
        _row("fastembed onnx", "text-peer", "text", 1, 8.0),
        _row("moon3 int8", "text-peer", "text", 32, 300.0, items=150, workload="throughput"),
        _row("sentence-transformers onnx quint8", "text-peer", "text", 32, 600.0, items=150, workload="throughput"),
        _row("fastembed onnx", "text-peer", "text", 32, 900.0, items=150, workload="throughput"),
    ])
    reasoner = _file(tmp_path, "reasoner", [
        _bench("g[torch-eager]", 2.0, runner="torch-eager", kind="reasoner", precision="fp32", prefill_tokens_per_s=900.0,
               decode_tokens_per_s=1000.0, decode_tokens_per_s_best=1100.0, token_agreement_vs_torch=1.0),
        _bench("g[onnx-int4]", 0.4, runner="onnx-int4", kind="reasoner", precision="int4", prefill_tokens_per_s=3000.0,
               decode_tokens_per_s=4500.0, decode_tokens_per_s_best=5500.0, decode_speedup_vs_torch=4.5,
               decode_speedup_vs_torch_best=5.0, token_agreement_vs_torch=0.96),
        _bench("t[0]", 0.02, runner="pipeline", kind="think-then-embed", budget=0, trace_tokens=0.0, p50_ms=20.0,
               p99_ms=25.0),
        _bench("t[32]", 0.1, runner="pipeline", kind="think-then-embed", budget=32, trace_tokens=30.5, p50_ms=100.0,
               p99_ms=120.0, x_embedder_alone=5.0),
    ])
    return [emb, peers, reasoner]


def test_rows_and_targets_within_one_run(report, files):
    rows, meta = report.load_rows(files)
    assert len(rows) == 14 and set(meta) == {"embedder", "peers", "reasoner"} and meta["peers"]["cpu"] == "Test CPU"
    tg = {(t["target"], t["detail"].split(":")[0]): t for t in report.targets(rows)}
    b1 = tg[("int8_vs_teacher_b1", "image+text")]
    assert b1["measured"] == pytest.approx(0.2) and not b1["met"]  # 10 ms vs 50 ms: 0.2 > 0.15
    st = next(t for t in tg.values() if t["target"] == "text_vs_st_quint8")
    fe = next(t for t in tg.values() if t["target"] == "text_vs_fastembed")
    assert st["measured"] == pytest.approx(2.0) and st["met"]
    assert fe["measured"] == pytest.approx(3.0) and not fe["met"]
    cold = next(t for t in tg.values() if t["target"] == "cold_start")
    assert cold["measured"] == pytest.approx(0.6) and cold["met"]
    dec = next(t for t in tg.values() if t["target"] == "reasoner_decode_vs_torch")
    assert dec["measured"] == pytest.approx(4.5) and dec["met"] and "least disturbed rounds 5.00x" in dec["detail"]


def test_no_ratio_across_runs(report, tmp_path):
    a = _file(tmp_path, "a", [_row("moon3 int8 (cpu)", "engine", "image+text", 1, 10.0)])
    b = _file(tmp_path, "b", [_row("torch eager fp32 (teacher)", "teacher", "image+text", 1, 50.0)])
    rows, _ = report.load_rows([a, b])
    assert report.targets(rows) == []


def test_markdown_tables(report, files, tmp_path):
    written = report.write_report(files, tmp_path / "out", plots=False)
    md = written["md"].read_text()
    assert "| image+text | 1 | 10.0 / 15.0 | - | - | 50.0 / 75.0 | 5.0x; 5.0x |" in md
    assert "| fastembed onnx | int8-dynamic | 8.00 | 167 | 3.00x |" in md  # 500 vs 167 titles/s
    assert "**0.60 s**" in md and "400 MiB" in md
    assert "| onnx-int4 | int4 | 3000 | 4500 | 4.50x; 5.00x | 0.960 |" in md
    assert "| off | 0.0 | 20.0 / 25.0 | 1x |" in md and "| 32 | 30.5 | 100.0 / 120.0 | 5.0x |" in md
    data = json.loads(written["json"].read_text())
    assert {t["target"] for t in data["targets"]} == {"int8_vs_teacher_b1", "text_vs_st_quint8", "text_vs_fastembed",
                                                       "cold_start", "reasoner_decode_vs_torch"}


def test_plots(report, files, tmp_path):
    pytest.importorskip("matplotlib")
    written = report.write_report(files, tmp_path / "out")
    for key in ("latency_png", "fidelity_png"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input(report, tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        report.load_rows([bad])
    empty = _file(tmp_path, "empty", [_bench("t", 0.1)])
    with pytest.raises(ValueError, match="no benchmark with a runner"):
        report.write_report([empty], tmp_path / "out")


def _catalog(tmp_path, tree_clean=True):
    rows = [_bench(f"c[{r}-{b}-{t}]", ms / 1e3, runner=r, kind="catalog", precision="x", modality="image+text",
                   batch=b, threads=t, items=32, p50_ms=ms, items_per_s=32 / (ms / 1e3), cosine_mean=0.999,
                   cosine_min=0.998)
            for r, b, t, ms in (("moon3 engine", 32, 1, 400.0), ("plain pipeline (PIL + FP32 onnxruntime)", 32, 1, 800.0),
                                ("moon3 engine", 32, 2, 250.0), ("plain pipeline (PIL + FP32 onnxruntime)", 32, 2, 500.0),
                                ("moon3 engine", 1, 1, 600.0))]
    path = _file(tmp_path, "catalog", rows)
    data = json.loads(path.read_text())
    data["machine_info"]["tree_clean"] = tree_clean
    path.write_text(json.dumps(data))
    return path


def test_catalog_rows_target_table_and_plot(report, tmp_path):
    rows, meta = report.load_rows([_catalog(tmp_path)])
    tg = [t for t in report.targets(rows) if t["target"] == "catalog_vs_plain"]
    assert [(round(t["measured"], 3), t["met"]) for t in tg] == [(2.0, False), (2.0, False)]  # 80 vs 40 items/s
    assert "1 thread(s): 80.0 vs 40.0 items/s" in tg[0]["detail"]
    written = report.write_report([_catalog(tmp_path)], tmp_path / "out", plots=False)
    md = written["md"].read_text()
    assert "| 32 | 1 | 80.0 | 40.0 | 2.00x | 0.9990 / 0.9980 |" in md
    assert "| 1 | 2 | - | - | - | - |" in md  # a cell with no pair is a dash, not a ratio across runners
    assert "(clean tree)" in md and meta["catalog"]["dirty"] is False
    pytest.importorskip("matplotlib")
    written = report.write_report([_catalog(tmp_path)], tmp_path / "out")
    assert written["catalog_png"].read_bytes()[:4] == b"\x89PNG"


def test_a_dirty_tree_is_labelled(report, tmp_path):
    written = report.write_report([_catalog(tmp_path, tree_clean=False)], tmp_path / "out", plots=False)
    assert "**dirty tree**" in written["md"].read_text()


def test_docs_section_is_replaced_between_the_markers(report, files, tmp_path):
    out = tmp_path / "results"
    report.write_report(files, out, plots=False)
    page = tmp_path / "docs" / "speed.md"
    page.parent.mkdir()
    page.write_text(f"# Speed\n\nintro\n\n{report.BEGIN}\nold figures\n{report.END}\n\noutro\n")
    report.write_docs_section(page, (out / "results.md").read_text(), out)
    text = page.read_text()
    assert "old figures" not in text and text.startswith("# Speed\n\nintro\n\n")
    assert text.endswith(f"{report.END}\n\noutro\n")
    assert "### Targets" in text and "# Benchmark results" not in text and "(../results/results.json)" in text
    report.write_docs_section(page, (out / "results.md").read_text(), out)  # idempotent
    assert page.read_text() == text
    page.write_text("no markers")
    with pytest.raises(ValueError, match="no '<!-- begin"):
        report.write_docs_section(page, "x", out)

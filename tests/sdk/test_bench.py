"""`sdk.bench` / `moon3 bench`: the runtime-only benchmark of an engine, on the tiny engine."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdk.bench import latency_stats, load_inputs, make_call, time_calls
from sdk.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def test_latency_stats_nearest_rank_p99():
    s = latency_stats(np.arange(1, 101) / 1e3, items=4)  # 1..100 ms
    assert s["rounds"] == 100 and s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.0)
    assert s["min_ms"] == pytest.approx(1.0) and s["items_per_s"] == pytest.approx(4 / 0.0505)
    assert latency_stats([0.002, 0.001], 1)["p99_ms"] == pytest.approx(2.0)  # few rounds: the slowest
    with pytest.raises(ValueError):
        latency_stats([], 1)


def test_time_calls_counts_warmup_and_rounds():
    calls = []
    times, out = time_calls(lambda: calls.append(1) or len(calls), rounds=3, warmup=2)
    assert len(calls) == 5 and out == 5 and times.shape == (3,) and (times >= 0).all()
    with pytest.raises(ValueError, match="rounds"):
        time_calls(lambda: None, rounds=0)


def test_inputs_real_and_synthetic(tmp_path):
    images, titles, src = load_inputs(SAMPLES, 200)  # more than the samples: repeated in order
    assert len(images) == len(titles) == 200 and src == str(SAMPLES) and all(Path(p).is_file() for p in images[:3])
    images, titles, src = load_inputs(None, 3)
    assert src == "synthetic" and images[0].shape == (256, 256, 3) and all(titles)
    with pytest.raises(FileNotFoundError, match="no items.jsonl"):
        load_inputs(tmp_path, 3)
    assert make_call("text", images, titles) == {"texts": titles}
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        make_call("audio", images, titles)


def test_cli_bench_tiny_engine(tiny_engine, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_engine.path), "--rounds", "2", "--warmup", "1", "--batch", "1", "--batch", "3",
                 "--samples", str(SAMPLES), "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cold start" in printed and "items/s" in printed
    rep = json.loads(out.read_text())
    assert rep["precision"] and rep["backend"] == "cpu" and rep["inputs"] == str(SAMPLES)
    assert [(r["modality"], r["batch"]) for r in rep["latency"]] == [
        (m, b) for m in ("image+text", "text", "image") for b in (1, 3)]
    for r in rep["latency"]:
        assert r["rounds"] == 2 and 0 < r["p50_ms"] <= r["p99_ms"] and r["items_per_s"] > 0
        assert r["cosine_min_vs_unbatched"] > 0.999  # fp32 graph: batching must not change a vector
    assert [(p["modality"], p["batch"], p["cache"]) for p in rep["process"]] == [
        ("text", 1, "cold"), ("text", 1, "warm"), ("image+text", 3, "warm")]
    for p in rep["process"]:
        assert p["shape"] == [p["batch"], 32] and p["peak_rss_mb"] > 10
        assert 0 < p["import_s"] < p["cold_start_s"] < p["process_s"]
    assert rep["process"][1]["engine_cached_fraction"] in (1.0, None)  # read whole just before: all cached


def test_probe_process_rejects_an_unknown_cache_state(tiny_engine):
    from sdk.bench import probe_process

    with pytest.raises(ValueError, match="cache must be 'cold', 'warm' or None"):
        probe_process(tiny_engine.path, {"texts": ["a"]}, 1, cache="lukewarm")


def test_cli_bench_bad_arguments(tiny_engine, tmp_path, capsys):
    assert main(["bench", str(tiny_engine.path), "--batch", "0", "--no-cold-start"]) == 2
    assert "batch sizes must be >= 1" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "none.engine"), "--no-cold-start"]) == 2
    assert "engine file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", str(tiny_engine.path), "--modality", "audio"])


def test_bench_and_cli_never_import_torch():
    code = "import sys, sdk.cli, sdk.bench; print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

"""Reasoner generation speed: the ONNX runtime (each precision present) against PyTorch eager
`generate` of the same model (its KV cache), on the same prompts, in the same run.

    .venv/bin/python -m pytest benchmarks/test_bench_reasoner.py --benchmark-group-by=group
    MOON3_ENGINE=moon3.engine .venv/bin/python -m pytest benchmarks/test_bench_reasoner.py   # + that engine's reasoner

Engines: reasoner-only engines of every precision (fp32, int8, int4; the build's default settings)
built from the committed weights at the start (`sdk.export.reasoner_build.build_reasoner_engines`, about
30 s), and the reasoner of MOON3_ENGINE when set. Skipped, with the reason, when the weights or the toolchain
are missing.

Each timed call greedily generates the answers to PROMPTS (text only: every runner reads the same
tokens; at most MAX_NEW tokens each). Recorded in extra_info: tokens generated, prefill and decode
tokens/s, the same outside clock for every runner (prefill: the same generate call stopped after
its first token, timed on its own; decode: the whole call minus that), and the agreement of the
tokens with torch's. FP32 must give exactly torch's tokens; a quantized reasoner's agreement is
recorded (and must be >= 0.5: its build gate measures fidelity on 150+ products, these few long
answers only show the timed tokens are sane). The decode speed-up over torch eager (target: >= 4x)
is in each ONNX runner's extra_info.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from bench_common import ROOT, SAMPLES, THREADS, record

WEIGHTS = ROOT / "sdk" / "train" / "weights" / "reasoner"
MAX_NEW = 64
N_PROMPTS = 6
PRECISIONS = ("fp32", "int8", "int4")
RUNNERS = ["torch-eager", *(f"onnx-{p}" for p in PRECISIONS), "onnx-env"]
_results: dict[str, dict] = {}


@pytest.fixture(scope="session")
def torch_reasoner():
    pytest.importorskip("torch", reason="the PyTorch baseline needs moon3-sdk[export]")
    if not (WEIGHTS / "reasoner.safetensors").is_file():
        pytest.skip(f"no reasoner weights in {WEIGHTS}")
    import torch

    from sdk.train.reasoner_model import load_reasoner

    torch.set_num_threads(THREADS)
    return load_reasoner(WEIGHTS)


@pytest.fixture(scope="session")
def cases() -> list[tuple[str, str]]:
    """(task, title): trace and attribute prompts with the titles of the first sample products (long answers)."""
    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    return [(("trace", "attributes")[i % 2], it["title"]) for i, it in enumerate(items[:N_PROMPTS])]


@pytest.fixture(scope="session")
def prompts(torch_reasoner, cases) -> list[list[int]]:
    """The cases' token ids, as training encodes them (the runtime's `prompt_ids` is tested equal)."""
    from sdk.train.reasoner_model import TASKS, encode_example

    _, tok = torch_reasoner
    return [encode_example(tok, TASKS[task], None, title)[0] for task, title in cases]


@pytest.fixture(scope="session")
def reasoner_engines(torch_reasoner, tmp_path_factory) -> dict[str, Path]:
    """precision -> reasoner-only engine built from the committed weights (the build's defaults)."""
    pytest.importorskip("onnxscript", reason="building engines needs moon3-sdk[export]")
    from sdk.export.reasoner_build import build_reasoner_engines

    return build_reasoner_engines(WEIGHTS, tmp_path_factory.mktemp("reasoner-engines"), PRECISIONS, log=lambda *_: None)


@pytest.fixture(scope="session")
def torch_tokens(torch_reasoner, prompts) -> list[list[int]]:
    model, _ = torch_reasoner
    return [model.generate(p, None, MAX_NEW) for p in prompts]


def _agreement(got: list[list[int]], want: list[list[int]]) -> float:
    from sdk.train.eval_reasoner import agreement

    return agreement({"x": got}, {"x": want})["tokens"]


def _engine_path(runner: str, reasoner_engines: dict[str, Path]) -> Path:
    if runner != "onnx-env":
        return reasoner_engines[runner.removeprefix("onnx-")]
    value = os.environ.get("MOON3_ENGINE")
    if not value or not Path(value).is_file():
        pytest.skip("MOON3_ENGINE is not set to an engine file: only the engines built here are measured")
    from sdk.engine import EngineFile

    if "reasoner" not in EngineFile.read(value).manifest:
        pytest.skip(f"{value} has no reasoner")
    return Path(value)


@pytest.mark.parametrize("runner", RUNNERS)
def test_generate(benchmark, request, torch_reasoner, prompts, torch_tokens, runner):
    benchmark.group = f"reasoner greedy generate, {len(prompts)} prompts x <= {MAX_NEW} tokens"
    model, _ = torch_reasoner
    n_prompt = sum(map(len, prompts))
    if runner == "torch-eager":
        def run():
            return [model.generate(p, None, MAX_NEW) for p in prompts]

        out = benchmark(run)
        assert out == torch_tokens

        def prefill_once():
            return [model.generate(p, None, 1) for p in prompts]

        precision, agree = "fp32", 1.0
    else:
        from sdk.reasoner import Reasoner

        engine = _engine_path(runner, request.getfixturevalue("reasoner_engines"))
        r = Reasoner(engine, threads=THREADS)
        cases = request.getfixturevalue("cases")
        assert [r.prompt_ids(task, title) for task, title in cases] == prompts

        def run():
            return [r.generate_ids(text=title, task=task, max_new_tokens=MAX_NEW) for task, title in cases]

        def prefill_once():
            return [r.generate_ids(text=title, task=task, max_new_tokens=1) for task, title in cases]

        out = benchmark(run)
        precision, agree = r.precision, _agreement(out, torch_tokens)
        if precision == "fp32":
            assert out == torch_tokens, "the FP32 reasoner's greedy tokens differ from PyTorch's"
        # reported; on a few long answers one early difference costs the rest of an answer, so the
        # bound only says the timed tokens are the model's (a broken graph agrees on ~0)
        assert agree >= 0.5, f"{precision} tokens agree with PyTorch's on {agree:.3f} < 0.5"
    # Every runner on the same outside clock: the whole generate call as timed above, and its
    # prefill as the same call stopped after the first token (prompt forward pass + one argmax);
    # decode = the difference. No runner's own internal timers are used.
    prefill = []
    for _ in range(5):
        t0 = time.perf_counter()
        prefill_once()
        prefill.append(time.perf_counter() - t0)
    prefill_s, prefill_min = float(np.median(prefill)), float(np.min(prefill))
    stats = getattr(benchmark, "stats", None)
    total_s, total_min = (stats.stats.median, stats.stats.min) if stats else (None, None)
    n_new = sum(map(len, out))
    # decode steps: every new token but the first comes from one decode call
    info = {"runner": runner, "kind": "reasoner", "precision": precision, "threads": THREADS, "prompt_tokens": n_prompt,
            "new_tokens": n_new, "token_agreement_vs_torch": agree, "prefill_s": prefill_s}
    if total_s is not None:
        decode_s = max(total_s - prefill_s, 1e-9)
        info.update(prefill_tokens_per_s=n_prompt / prefill_s, decode_tokens_per_s=(n_new - len(prompts)) / decode_s,
                    tokens_per_s=n_new / total_s,
                    # the least disturbed rounds: on a shared machine their ratios drift least
                    decode_tokens_per_s_best=(n_new - len(prompts)) / max(total_min - prefill_min, 1e-9))
        _results[runner] = info
        base = _results.get("torch-eager")
        if runner != "torch-eager" and base:
            info["decode_speedup_vs_torch"] = info["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            info["decode_speedup_vs_torch_best"] = info["decode_tokens_per_s_best"] / base["decode_tokens_per_s_best"]
            info["prefill_speedup_vs_torch"] = info["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    record(benchmark, n_new, **info)

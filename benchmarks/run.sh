#!/usr/bin/env bash
# The whole benchmark suite, then the report (tables + plots), in one command:
#
#   MOON3_ENGINE=moon3.engine bash benchmarks/run.sh
#
# 1. the embedder (moon3 int8 + fp32 engines vs the FP32 PyTorch teacher, cold start, RSS) in .venv;
# 2. text-only vs peer libraries in benchmarks/peers-venv (created by setup_peers.sh when missing;
#    BENCH_PEERS=0 skips it), with the engine beside them in the same run;
# 3. the reasoner (greedy generate: ONNX fp32/int8/int4 vs torch eager, prefill and decode tokens/s) and
#    think-then-embed latency vs reasoning budget (sdk.Pipeline on an engine with the trace-trained
#    embedder); BENCH_REASONER=0 skips it;
# 4. benchmarks/report.py -> $OUT/results.{json,md}, latency_vs_batch.png, fidelity_vs_speed.png.
#
# MOON3_ENGINE_FP32 and MOON3_ENGINE_FP16 default to .cache/bench/moon3-fp32.engine and
# moon3-fp16.engine, built once with `moon3 build --precision fp32|fp16` (about 2-3 minutes each)
# when missing; MOON3_TRACE_ENGINE defaults to .cache/bench/moon3-trace.engine (`moon3 build --weights
# sdk/train/weights/trace`, about 3 minutes, built when missing); MOON3_ENGINE_SINGLE (optional) adds a one-graph
# engine (`moon3 build --layout single`) for comparison. Knobs: BENCH_OUT (default benchmarks/results),
# BENCH_ROUNDS (min rounds, default 5), BENCH_MAX_TIME (s per benchmark, default 0.5),
# BENCH_THREADS (threads of every runner, default 1: see bench_common.py).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MOON3_ENGINE:?set MOON3_ENGINE=path/to/moon3.engine (build one with: moon3 build --out moon3.engine)}"
export MOON3_ENGINE
export MOON3_ENGINE_FP32=${MOON3_ENGINE_FP32:-.cache/bench/moon3-fp32.engine}
export MOON3_ENGINE_FP16=${MOON3_ENGINE_FP16:-.cache/bench/moon3-fp16.engine}
OUT=${BENCH_OUT:-benchmarks/results}
mkdir -p "$OUT"
[ -x .venv/bin/python ] || bash scripts/setup.sh
for p in fp32 fp16; do
    var=MOON3_ENGINE_${p^^}
    if [ ! -f "${!var}" ]; then
        mkdir -p "$(dirname "${!var}")"
        .venv/bin/moon3 build --precision "$p" --no-reasoner --out "${!var}"
    fi
done
OPTS=(-q -p no:cacheprovider --benchmark-min-rounds="${BENCH_ROUNDS:-5}" --benchmark-max-time="${BENCH_MAX_TIME:-0.5}"
      --benchmark-warmup=on --benchmark-warmup-iterations=2 --benchmark-columns=median,max,ops,rounds
      --benchmark-group-by=group
      # a peer library's leftover temporary folder at exit must not fail the run (the tests keep
      # filterwarnings=error; benchmarks only report)
      -W "default::ResourceWarning" -W "default::pytest.PytestUnraisableExceptionWarning")
.venv/bin/python -m pytest benchmarks/test_bench_embedder.py --benchmark-json="$OUT/embedder.json" "${OPTS[@]}"
JSONS=("$OUT/embedder.json")
if [ "${BENCH_PEERS:-1}" != 0 ]; then
    [ -x benchmarks/peers-venv/bin/python ] || bash benchmarks/setup_peers.sh
    benchmarks/peers-venv/bin/python -m pytest benchmarks/test_bench_peers.py --benchmark-json="$OUT/peers.json" "${OPTS[@]}"
    JSONS+=("$OUT/peers.json")
fi
if [ "${BENCH_REASONER:-1}" != 0 ]; then
    export MOON3_TRACE_ENGINE=${MOON3_TRACE_ENGINE:-.cache/bench/moon3-trace.engine}
    if [ ! -f "$MOON3_TRACE_ENGINE" ]; then
        mkdir -p "$(dirname "$MOON3_TRACE_ENGINE")"
        .venv/bin/moon3 build --weights sdk/train/weights/trace --out "$MOON3_TRACE_ENGINE"
    fi
    .venv/bin/python -m pytest benchmarks/test_bench_reasoner.py benchmarks/test_bench_pipeline.py \
        --benchmark-json="$OUT/reasoner.json" "${OPTS[@]}"
    JSONS+=("$OUT/reasoner.json")
fi
.venv/bin/python benchmarks/report.py "${JSONS[@]}" --out "$OUT"

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
# 4. catalog throughput (benchmarks/test_bench_catalog.py): photo + title items/s with decode, the engine
#    against the plain pipeline (PIL + the FP32 model as one onnxruntime graph), 1 and 2 threads;
#    BENCH_CATALOG=0 skips it;
# 5. where one call's time goes (benchmarks/compare_engines.py: decode, preprocessing, graphs, head),
#    the INT8 engine against the FP32 one, into $OUT/stages.json;
# 6. benchmarks/report.py -> $OUT/results.{json,md}, latency_vs_batch.png, fidelity_vs_speed.png,
#    catalog_throughput.png, and the generated section of docs/speed.md (default $OUT only).
#
# It refuses a tree with uncommitted changes to tracked files (the figures would belong to no
# commit); BENCH_ALLOW_DIRTY=1 runs anyway and the report labels the run "dirty tree".
#
# MOON3_ENGINE_FP32 and MOON3_ENGINE_FP16 default to .cache/bench/moon3-fp32.engine and
# moon3-fp16.engine, built once with `moon3 build --precision fp32|fp16` (about 2-3 minutes each)
# when missing; MOON3_ENGINE_SINGLE_FP32 defaults to .cache/bench/moon3-fp32-single.engine (`moon3 build
# --precision fp32 --layout single`, the plain pipeline's graph); MOON3_TRACE_ENGINE defaults to .cache/bench/moon3-trace.engine (`moon3 build --weights
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
export MOON3_ENGINE_SINGLE_FP32=${MOON3_ENGINE_SINGLE_FP32:-.cache/bench/moon3-fp32-single.engine}
OUT=${BENCH_OUT:-benchmarks/results}
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && [ "${BENCH_ALLOW_DIRTY:-0}" != 1 ]; then
    echo "benchmarks/run.sh: the tree has uncommitted changes; commit them first (or BENCH_ALLOW_DIRTY=1," \
         "and the report says 'dirty tree')" >&2
    exit 1
fi
mkdir -p "$OUT"
[ -x .venv/bin/python ] || bash scripts/setup.sh
for p in fp32 fp16; do
    var=MOON3_ENGINE_${p^^}
    if [ ! -f "${!var}" ]; then
        mkdir -p "$(dirname "${!var}")"
        .venv/bin/moon3 build --precision "$p" --no-reasoner --out "${!var}"
    fi
done
if [ "${BENCH_CATALOG:-1}" != 0 ] && [ ! -f "$MOON3_ENGINE_SINGLE_FP32" ]; then
    mkdir -p "$(dirname "$MOON3_ENGINE_SINGLE_FP32")"
    .venv/bin/moon3 build --precision fp32 --layout single --no-reasoner --out "$MOON3_ENGINE_SINGLE_FP32"
fi
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
if [ "${BENCH_CATALOG:-1}" != 0 ]; then
    .venv/bin/python -m pytest benchmarks/test_bench_catalog.py --benchmark-json="$OUT/catalog.json" "${OPTS[@]}"
    JSONS+=("$OUT/catalog.json")
fi
# where one call's time goes: decode, preprocessing, each graph, the head, the rest (INT8 vs FP32)
.venv/bin/python benchmarks/compare_engines.py "$MOON3_ENGINE" "$MOON3_ENGINE_FP32" --call image+text:1 --call text:1 \
    --call image:1 --rounds 200 --json "$OUT/stages.json"
DOCS=()
[ "$OUT" = benchmarks/results ] && DOCS=(--docs docs/speed.md)
.venv/bin/python benchmarks/report.py "${JSONS[@]}" --out "$OUT" --stages "$OUT/stages.json" "${DOCS[@]}"

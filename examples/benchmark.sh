#!/usr/bin/env bash
# One server + vLLM's own benchmark client against it: the pair that benchmarks/sweep.py repeats
# for every (KV ranks, context length) point.
#
#   examples/benchmark.sh [KVP_SIZE] [INPUT_LEN] [CONCURRENCY]
#
# Environment: MODEL (default ~/.cache/vllm_kvp/models/default), VENV (default .venv),
#   PORT (default 8123), OUTPUT_LEN (32), NUM_PROMPTS (4), KV_BYTES (per worker, default 8 MiB),
#   MAX_TOKENS_PER_RANK (4096), RESULT_DIR (bench_results/example).
set -euo pipefail
cd "$(dirname "$0")/.."

KVP_SIZE=${1:-2}
INPUT_LEN=${2:-6000}
CONCURRENCY=${3:-2}
MODEL=${MODEL:-${VLLM_KVP_MODEL_DIR:-$HOME/.cache/vllm_kvp/models/default}}
VENV=${VENV:-.venv}
PORT=${PORT:-8123}
OUTPUT_LEN=${OUTPUT_LEN:-32}
NUM_PROMPTS=${NUM_PROMPTS:-4}
# KV cache memory of EACH worker, i.e. of each KV rank. The default model needs 1 KiB per token
# (2 layers x 2 KV heads x 32 dims x 4 bytes x K and V), so 8 MiB = 8192 tokens per rank.
KV_BYTES=${KV_BYTES:-$((8 << 20))}
# A request onboards a further rank after this many of its tokens are on the current one.
MAX_TOKENS_PER_RANK=${MAX_TOKENS_PER_RANK:-4096}
RESULT_DIR=${RESULT_DIR:-bench_results/example}
# Room for the prompt (the random dataset is only approximately INPUT_LEN tokens) and the output.
MAX_MODEL_LEN=$((INPUT_LEN + INPUT_LEN / 64 + OUTPUT_LEN + 64))

[ -f "$MODEL/config.json" ] || "$VENV/bin/vllm-kvp" make-model "$MODEL"
mkdir -p "$RESULT_DIR"
LOG="$RESULT_DIR/server_n${KVP_SIZE}.log"

# 1. The server, in its own process group (setsid) so that all its workers can be stopped together.
#    --dtype float32 --enforce-eager: what the CPU build runs; --kvp-size 1 is plain vLLM.
setsid "$VENV/bin/vllm-kvp" serve "$MODEL" \
    --host 127.0.0.1 --port "$PORT" \
    --dtype float32 --enforce-eager --seed 0 \
    --max-model-len "$MAX_MODEL_LEN" \
    --kv-cache-memory-bytes "$KV_BYTES" \
    --kvp-size "$KVP_SIZE" \
    --kvp-max-tokens-per-rank "$MAX_TOKENS_PER_RANK" \
    >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM -- -$SERVER 2>/dev/null || true; sleep 2; kill -KILL -- -$SERVER 2>/dev/null || true' EXIT INT TERM

echo "waiting for the server (log: $LOG) ..."
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    kill -0 "$SERVER" 2>/dev/null || { echo "server died:"; tail -20 "$LOG"; exit 1; }
    sleep 2
done
grep -h "vllm_kvp layout" "$LOG" | sed 's/.*vllm_kvp layout/vllm_kvp layout/' || true

# 2. vLLM's benchmark client: random prompts of INPUT_LEN tokens, fixed-length outputs
#    (--ignore-eos), at most CONCURRENCY requests in flight; the JSON has TTFT/TPOT/ITL stats.
"$VENV/bin/vllm-kvp" bench serve \
    --backend vllm --base-url "http://127.0.0.1:$PORT" \
    --model "$MODEL" --tokenizer "$MODEL" \
    --dataset-name random --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" \
    --ignore-eos --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONCURRENCY" \
    --percentile-metrics ttft,tpot,itl --metric-percentiles 50,99 \
    --save-result --result-dir "$RESULT_DIR" \
    --result-filename "n${KVP_SIZE}_ctx${INPUT_LEN}_c${CONCURRENCY}.json"

# 3. Per-rank KV cache state and onboarding count after the run.
echo  # the client may end its output without a newline
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^vllm_kvp:(rank_kv_cache_blocks|onboard_events_total|ranks_per_request_(sum|count))' || true
echo "result: $RESULT_DIR/n${KVP_SIZE}_ctx${INPUT_LEN}_c${CONCURRENCY}.json"

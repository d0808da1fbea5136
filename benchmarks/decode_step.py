"""Decode step time, KV bytes read per rank and bytes exchanged per step, for N = 1, 2, 4 KV ranks
at one fixed total context (issue: KV-parallel decode). Not a test: numbers, side by side.

    .venv/bin/python benchmarks/decode_step.py [--context 16384] [--ranks 1 2 4] [--steps 128]

N = 1 is plain vLLM (the plugin inactive, vLLM's own CPU attention kernel); N > 1 uses the KVP
backend with `striped` placement so every rank holds context/N tokens of the request.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path


def measure(model: str, n: int, context: int, steps: int) -> dict:
    from vllm import LLM, SamplingParams

    kw = dict(model=model, dtype="float32", enforce_eager=True, seed=0, max_num_seqs=4,
              max_model_len=context + steps + 16, max_num_batched_tokens=4096,
              kv_cache_memory_bytes=1 << 30, enable_prefix_caching=True)
    if n > 1:
        kw["additional_config"] = {"kvp": {"size": n, "placement": "striped"}}
    llm = LLM(**kw)
    try:
        rng = random.Random(0)
        prompt = {"prompt_token_ids": [rng.randrange(3, 4000) for _ in range(context)]}

        def run(max_tokens):
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            stats = llm.collective_rpc("kvp_stats") if n > 1 else None
            t0 = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            return time.perf_counter() - t0, stats

        run(1)  # prefill; its KV stays in the prefix cache
        # Both timed runs hit the cache and recompute the same tail, so their difference is
        # `steps` decode steps.
        t_short, s0 = run(1)
        t_long, s1 = run(steps + 1)
        s2 = llm.collective_rpc("kvp_stats") if n > 1 else None
    finally:
        llm.llm_engine.engine_core.shutdown()
    from vllm.platforms import current_platform

    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_bytes_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
    # For calibration (vllm_kvp.planner.calibrate): on a CPU host the workers and the engine process share
    # its cores; the plugin runs owner computes and counts its collectives.
    result = {"ranks": n, "context": context, "step_ms": 1000 * (t_long - t_short) / steps,
              "kv_read_per_rank_MB": kv_bytes_per_token * context / n / 1e6,
              "exchanged_per_step_KB": 0.0, "mode": "owner",
              "cpus": len(os.sched_getaffinity(0)) if current_platform.is_cpu() else 0,
              "collectives_per_step": 0.0}
    if n > 1:
        def sent(a, b, key="exchanged_bytes"):
            return sum(x[key] - y[key] for x, y in zip(a, b))
        # Each rank's partials reach the n - 1 others; the two runs differ by `steps` steps.
        result["exchanged_per_step_KB"] = (sent(s2, s1) - sent(s1, s0)) * (n - 1) / steps / 1e3
        # Every rank takes part in every collective: rank 0's count is the step's.
        result["collectives_per_step"] = (sent(s2[:1], s1[:1], "exchanges")
                                          - sent(s1[:1], s0[:1], "exchanges")) / steps
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=128)
    args = ap.parse_args()
    from vllm_kvp.model import DEFAULT_MODEL_DIR, build_default_model

    model = str(build_default_model(args.model or DEFAULT_MODEL_DIR))
    rows = []
    for n in args.ranks:
        print(f"[decode_step] N={n} context={args.context} ...", file=sys.stderr, flush=True)
        rows.append(measure(model, n, args.context, args.steps))
    base = rows[0]["step_ms"]
    out = Path("bench_results")
    out.mkdir(exist_ok=True)
    (out / "decode_step.json").write_text(json.dumps(rows, indent=2))
    print(f"\ncontext {args.context} tokens, {args.steps} decode steps, one request "
          f"(also in {out / 'decode_step.json'})")
    print(f"{'N':>3} {'step ms':>9} {'vs first':>9} {'KV read/rank/step MB':>21} {'exchanged/step KB':>18}")
    for r in rows:
        print(f"{r['ranks']:>3} {r['step_ms']:>9.2f} {r['step_ms'] / base:>8.2f}x "
              f"{r['kv_read_per_rank_MB']:>21.2f} {r['exchanged_per_step_KB']:>18.1f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.exit(main())

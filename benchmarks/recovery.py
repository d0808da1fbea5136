#!/usr/bin/env python
"""Recovery time after a worker dies, against context length, next to the original prefill.

    python benchmarks/recovery.py                          # 8k, 32k, 60k on the embedded model
    python benchmarks/recovery.py --contexts 8000 --kvp 2 --placement striped

For each context length one engine (2 KV ranks, each worker pinned to its own core) serves one
request of that many prompt tokens: first undisturbed (its time to first token is the original
prefill), then a fresh prompt of the same length whose worker of rank `--victim` is SIGKILLed after
its third output token. Recovery time is the longest wait for a token from the kill on (the engine
core runs ahead, so a token computed before the kill may arrive just after it): the workers'
restart (spawn, weights, KV cache, warm-up) plus the recompute of prompt and generated tokens. The
recovered tokens are checked against an undisturbed run of the same prompt. Results: JSON and a
Markdown table in --out. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path


def _workers() -> list:
    import psutil

    def alive(procs):
        return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    cores = [p for p in alive(psutil.Process().children(recursive=True)) if "EngineCore" in p.name()]
    core = max(cores, key=lambda p: p.create_time())
    return sorted((p for p in alive(core.children()) if "Worker" in p.name()),
                  key=lambda p: (p.create_time(), p.pid))


def _timed(llm, prompt: list[int], max_tokens: int, kill_rank: int | None = None):
    """(token ids, time of each token from submission, kill time or None)."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    rid = f"req-{time.monotonic_ns()}"
    eng.add_request(rid, {"prompt_token_ids": prompt},
                    SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    start, stamps, killed_at, tokens = time.monotonic(), [], None, []
    while eng.has_unfinished_requests():
        for out in eng.step():
            ids = out.outputs[0].token_ids
            while len(stamps) < len(ids):
                stamps.append(time.monotonic() - start)
            tokens = list(ids)
        if kill_rank is not None and killed_at is None and len(stamps) >= 3:
            os.kill(_workers()[kill_rank].pid, signal.SIGKILL)
            killed_at = time.monotonic() - start
    return tokens, stamps, killed_at


def measure(model: str, context: int, args) -> dict:
    from vllm import LLM

    kvp = {"size": args.kvp, "placement": args.placement, "max_rank_restarts": 10}
    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_num_seqs=4,
              max_model_len=context + 64, max_num_batched_tokens=args.chunk,
              enable_prefix_caching=False, kv_cache_memory_bytes=2 << 30,
              additional_config={"kvp": kvp})
    rng = random.Random(context)
    prompt = lambda: [rng.randrange(3, 4000) for _ in range(context)]  # noqa: E731
    _timed(llm, prompt()[:512], 4)  # warm-up
    original = prompt()
    ref_tokens, stamps, _ = _timed(llm, original, args.max_tokens)
    prefill = stamps[0]
    got_tokens, stamps, killed_at = _timed(llm, original, args.max_tokens, kill_rank=args.victim)
    # The engine core runs ahead of this loop, so tokens computed before the kill may still
    # arrive after it: recovery is the longest wait for a token from the kill on.
    recovery = max(stamps[i] - max(stamps[i - 1], killed_at) for i in range(1, len(stamps))
                   if stamps[i] > killed_at)
    llm.llm_engine.engine_core.shutdown()
    return {"context": context, "prefill_s": prefill, "recovery_s": recovery,
            "ratio": recovery / prefill, "identical": got_tokens == ref_tokens,
            "kv_ranks": args.kvp, "placement": args.placement, "victim_rank": args.victim}


def table(rows: list[dict]) -> str:
    lines = ["| context | original prefill (s) | recovery, full recompute (s) | ratio | tokens identical |",
             "|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['prefill_s']:.1f} | {r['recovery_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="embedded model; built if missing")
    ap.add_argument("--contexts", default="8000,32000,60000")
    ap.add_argument("--kvp", type=int, default=2)
    ap.add_argument("--placement", default="onboard")
    ap.add_argument("--victim", type=int, default=1, help="rank whose worker is killed")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", default="bench_results/recovery")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vllm_kvp.model import DEFAULT_MODEL_DIR, build_default_model

    model = str(build_default_model(args.model or DEFAULT_MODEL_DIR))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.kvp)))
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        rows.append(measure(model, context, args))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.json").write_text(json.dumps(rows, indent=1))
    (out / "recovery.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Layouts side by side in one invocation: plain vLLM on one and two cores, TP = 2, and KV ranks
(owner computes) with `striped`, `onboard` and `auto` placement, each worker pinned to its own core.

    python benchmarks/owner_computes.py                       # everything (~15 min on 2 cores)
    python benchmarks/owner_computes.py --workloads ttft,throughput --layouts plain1,tp2,kvp2-striped
    python benchmarks/owner_computes.py --plot-only           # redraw from the JSON
    python benchmarks/owner_computes.py --workloads decode --repeats 3   # medians of 3 rounds

Workloads (one engine per layout and model, in its own process so its CPU binding is its own):
  ttft        bench-size model: time to first token of one 8k-token prompt (after a warm-up);
  throughput  bench-size model: 16 requests of 1k prompt + 128 output tokens at once, tokens/s
              (after a warm-up of 4 such prompts);
  decode      embedded model, batch 1: time per output token at 32k and 60k context (prompt served
              from the prefix cache, so two runs differ only by their decode steps);
  mixed       bench-size model: 8 short streams (1k prompt, 64 output tokens) decoding when one
              long prompt (--ttft-len, 8k) arrives: the short requests' median time per output
              token (from their first token to their last) and the long prompt's TTFT.
The bench-size model (`vllm-kvp make-model --size bench`: hidden 1024, 4 layers, 8/2 heads of 128,
MLP 4096) makes dense work dominate a CPU step as it does on GPUs. Results: JSON, a Markdown
table with each figure's ratio to plain vLLM on one core, and a PNG, in --out. Run it on a quiet
machine: nothing else on the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = {  # name: (CPU binding, engine kwargs)
    "plain1": ("0", {}),
    "plain2": ("0-1", {}),
    "tp2": ("0|1", {"tensor_parallel_size": 2}),
    "kvp2-striped": ("0|1", {"additional_config": {"kvp": {"size": 2, "placement": "striped"}}}),
    "kvp2-onboard": ("0|1", {"additional_config": {"kvp": {"size": 2, "placement": "onboard"}}}),
    # Prompts longer than one step's budget striped, the others onboard.
    "kvp2-auto": ("0|1", {"additional_config": {"kvp": {"size": 2, "placement": "auto"}}}),
    # Every step routed by owner (no shared steps): what the per-step switch saves.
    "kvp2-striped-owner": ("0|1", {"additional_config": {"kvp": {"size": 2, "placement": "striped",
                                                                 "step_mode": "owner"}}}),
    "kvp2-onboard-owner": ("0|1", {"additional_config": {"kvp": {"size": 2, "placement": "onboard",
                                                                 "step_mode": "owner"}}}),
    # Exchange scope with 3 ranks (2 cores, one shared by two ranks): every request of the
    # throughput load ends on 2 of the 3 ranks (640 tokens a rank), every step routed; spanning
    # queries all-gathered to every rank, or sent only to the ranks holding their KV.
    "kvp3-owner-all": ("0|1|0", {"additional_config": {"kvp": {
        "size": 3, "placement": "onboard", "max_tokens_per_rank": 640, "step_mode": "owner",
        "exchange_scope": "all"}}}),
    "kvp3-owner-holders": ("0|1|0", {"additional_config": {"kvp": {
        "size": 3, "placement": "onboard", "max_tokens_per_rank": 640, "step_mode": "owner",
        "exchange_scope": "holders"}}}),
    # The same ranks with the defaults: step kinds and exchange scope chosen by the cost model.
    "kvp3-auto": ("0|1|0", {"additional_config": {"kvp": {
        "size": 3, "placement": "onboard", "max_tokens_per_rank": 640}}}),
}
WORKLOADS = ("ttft", "throughput", "decode", "mixed")


def _engine(model: str, extra: dict, max_model_len: int, batched: int):
    from vllm import LLM

    return LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_num_seqs=16,
               max_model_len=max_model_len, max_num_batched_tokens=batched,
               enable_prefix_caching=True, kv_cache_memory_bytes=2 << 30, **extra)


def _prompts(n: int, length: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 4000) for _ in range(length)]} for _ in range(n)]


def _generate(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0


def _mixed(llm, long_len: int, n_short: int = 8, short_len: int = 1024, short_out: int = 64,
           arrive_after: int = 4) -> dict:
    """Steps the engine by hand: the long prompt is added once every short stream has
    `arrive_after` tokens, i.e. while they decode."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    short = SamplingParams(temperature=0, max_tokens=short_out, ignore_eos=True)
    for i, p in enumerate(_prompts(n_short, short_len, 7)):
        eng.add_request(f"short{i}", p, short)
    stamps: dict[str, list[float]] = {}
    long_at = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            ts = stamps.setdefault(out.request_id, [])
            while len(ts) < len(out.outputs[0].token_ids):
                ts.append(time.perf_counter())
        if long_at is None and len(stamps) == n_short and min(
                len(t) for t in stamps.values()) >= arrive_after:
            eng.add_request("long", _prompts(1, long_len, 8)[0],
                            SamplingParams(temperature=0, max_tokens=1))
            long_at = time.perf_counter()
    per_token = [(t[-1] - t[0]) / (len(t) - 1) for r, t in stamps.items() if r.startswith("short")]
    return {"short_ms_per_token": 1000 * statistics.median(per_token),
            "long_ttft_s": stamps["long"][0] - long_at}


def run_one(layout: str, workload: str, model: str, args) -> dict:
    """Runs inside the child process."""
    extra = LAYOUTS[layout][1]
    if workload == "ttft":
        llm = _engine(model, extra, args.ttft_len + 64, args.chunk)
        _generate(llm, _prompts(1, 512, 1), 1)  # warm-up (its own prompt: no cache hit below)
        return {"ttft_s": _generate(llm, _prompts(1, args.ttft_len, 2), 1)}
    if workload == "throughput":
        llm = _engine(model, extra, 2048, args.chunk)
        # Warm-up with prompts of the measured length, so that steps of the measured sizes have
        # run once: a worker's first steps of a size fault in fresh heap pages (measured: ~1.5 s
        # of system time over the first 16-request batch of a KV rank, ~0.3 s over later ones),
        # a one-time cost that is not throughput.
        _generate(llm, _prompts(4, 1024, 3), 8)
        n, out = 16, 128
        seconds = _generate(llm, _prompts(n, 1024, 4), out)
        return {"tokens_per_s": n * out / seconds, "total_tokens_per_s": n * (1024 + out) / seconds}
    if workload == "mixed":
        llm = _engine(model, extra, args.ttft_len + 64, args.chunk)
        _generate(llm, _prompts(8, 1024, 6), 8)  # warm-up: steps of the measured sizes
        return _mixed(llm, args.ttft_len)
    result = {}
    for ctx in args.contexts:
        llm = _engine(model, extra, ctx + args.steps + 64, 8192)
        prompt = _prompts(1, ctx, 5)
        _generate(llm, prompt, 1)  # prefill; the KV stays in the prefix cache
        short = _generate(llm, prompt, 1)
        long = _generate(llm, prompt, args.steps + 1)
        result[f"ms_per_token_{ctx // 1000}k"] = 1000 * (long - short) / args.steps
        llm.llm_engine.engine_core.shutdown()
        del llm
    return result


def child_main(args) -> int:
    layout, workload, model = args.child
    print("RESULT " + json.dumps(run_one(layout, workload, model, args)), flush=True)
    return 0


def run_child(layout: str, workload: str, model: str, args) -> dict:
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=LAYOUTS[layout][0])
    cmd = [sys.executable, __file__, "--child", layout, workload, model,
           "--contexts", ",".join(map(str, args.contexts)), "--steps", str(args.steps),
           "--ttft-len", str(args.ttft_len), "--chunk", str(args.chunk)]
    # The host needs a moment after the previous engine's processes exit (their memory is being
    # returned) before it times the next one alike.
    time.sleep(args.settle)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = proc.stderr[-2000:]
        print(f"  {layout}/{workload} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"error": f"exit {proc.returncode}"}
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"  {layout:14s} {workload:10s} {out}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def median_result(rounds: list[dict]) -> dict:
    """Per metric, the median over the rounds that produced it (an error if none did)."""
    metrics = dict.fromkeys(m for r in rounds for m in r if m != "error")
    if not metrics:
        return {"error": rounds[-1].get("error", "no result")}
    return {m: statistics.median(r[m] for r in rounds if m in r) for m in metrics}


def table(results: dict) -> str:
    metrics = [m for w in results.values() for r in w.values() for m in r if m != "error"]
    metrics = list(dict.fromkeys(metrics))
    base = {m: v for r in results.get("plain1", {}).values() for m, v in r.items()}
    head = "| layout | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for layout, per in results.items():
        vals = {m: v for r in per.values() for m, v in r.items()}
        cells = []
        for m in metrics:
            v = vals.get(m)
            if not isinstance(v, (int, float)):
                cells.append("-")
                continue
            ratio = f" ({v / base[m]:.2f}x)" if isinstance(base.get(m), (int, float)) and base[m] else ""
            cells.append(f"{v:.3g}{ratio}")
        lines.append(f"| {layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {m: v for r in results.get("plain1", {}).values() for m, v in r.items()}
    metrics = [m for m in base if isinstance(base[m], (int, float))]
    fig, ax = plt.subplots(figsize=(1.8 * max(len(metrics), 2) + 2, 4))
    width = 0.8 / max(len(results), 1)
    for i, (layout, per) in enumerate(results.items()):
        vals = {m: v for r in per.values() for m, v in r.items()}
        ys = [vals[m] / base[m] if isinstance(vals.get(m), (int, float)) else 0 for m in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], ys, width, label=layout)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=15)
    ax.set_ylabel("ratio to plain vLLM, 1 core")
    ax.set_title("Layouts side by side (ttft and ms/token: lower is better; tokens/s: higher)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--model", default=None, help="embedded model (decode); built if missing")
    ap.add_argument("--bench-model", default=None, help="bench-size model (ttft, throughput)")
    ap.add_argument("--contexts", default="32000,60000")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ttft-len", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens (ttft, throughput)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--settle", type=float, default=15.0,
                    help="seconds of idle before each engine (measured: a KV rank run started "
                         "right after another engine exited ran at 0.94x its tokens/s)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds over all layouts; each figure is the median (runs kept in *_runs.json)")
    ap.add_argument("--out", default="bench_results/owner_computes")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.contexts = [int(c) for c in str(args.contexts).split(",")]
    if args.child:
        return child_main(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        unknown = set(args.layouts.split(",")) - set(LAYOUTS) | set(args.workloads.split(",")) - set(WORKLOADS)
        if unknown:
            ap.error(f"unknown layout/workload {sorted(unknown)}; layouts {list(LAYOUTS)}, workloads {list(WORKLOADS)}")
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from vllm_kvp.model import build_default_model

        small = str(build_default_model(args.model)) if args.model or "decode" in args.workloads else None
        big = str(build_default_model(args.bench_model, size="bench"))
        layouts, workloads = args.layouts.split(","), args.workloads.split(",")
        runs: dict = {l: {w: [] for w in workloads} for l in layouts}
        # Rounds over all layouts rather than repeats back to back: a drift in the host's load
        # then touches every layout alike. Each figure is the median of its rounds.
        for _ in range(args.repeats):
            for layout in layouts:
                for w in workloads:
                    runs[layout][w].append(run_child(layout, w, small if w == "decode" else big, args))
                    results = {l: {w: median_result(r) for w, r in per.items() if r}
                               for l, per in runs.items()}
                    (out / "owner_computes.json").write_text(json.dumps(results, indent=1))
                    (out / "owner_computes_runs.json").write_text(json.dumps(runs, indent=1))
    results = json.loads((out / "owner_computes.json").read_text())
    (out / "owner_computes.md").write_text(table(results) + "\n")
    plot(results, out / "owner_computes.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

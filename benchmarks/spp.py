"""Sequence pipeline prefill: time to first token of one long prompt, pipeline stages x chunking.

For every PP size and chunking (`fixed`: vLLM's token budget; `adaptive`: kvp.prefill_chunking)
one engine runs in its own process, one core per pipeline stage, and prefills one prompt of each
length (`max_tokens=1`, prefix cache off): its wall time is the TTFT. Separately, with PP = 1 and
the engine core in the benchmark's process, every step of one long prompt is timed: those are the
per-chunk times whose spread adaptive chunking is meant to flatten, and they also fit the cost
model's attention/dense ratio (`chunking.fit_attention_ratio`) to compare with the one derived
from the model config.

    python benchmarks/spp.py                        # bench model, 8k prompt, PP 1/2 x fixed/adaptive
    python benchmarks/spp.py --smoke               # tiny model and prompts: checks the script only
    python benchmarks/spp.py --plot-only           # redraw table and PNG from the JSON

Outputs (in --out, default bench_results/spp): spp.json, spp.md (tables), spp.png.
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bench-size model (built if missing)")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="prompt lengths for TTFT")
    p.add_argument("--chunk-prompt-len", type=int, default=None,
                   help="prompt whose chunks are timed one by one (default: the longest length)")
    p.add_argument("--pp", default="1,2", help="pipeline-parallel sizes")
    p.add_argument("--chunking", default="fixed,adaptive")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--cores-per-stage", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="prompts per length (median TTFT)")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds per engine run")
    p.add_argument("--out", default="bench_results/spp")
    p.add_argument("--smoke", action="store_true",
                   help="default (tiny) model, lengths 256,640, budget 128: seconds, not numbers")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--child", choices=["ttft", "chunks"], help=argparse.SUPPRESS)
    p.add_argument("--child-pp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child-chunking", default="fixed", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.max_num_batched_tokens = "256,640", 128
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.pp = [int(x) for x in args.pp.split(",")]
    args.chunking = args.chunking.split(",")
    args.chunk_prompt_len = args.chunk_prompt_len or max(args.lengths)
    return args


# --- one engine (child process) -------------------------------------------------------------------

def _engine(args, pp: int, chunking: str):
    from vllm import LLM

    from vllm_kvp.layout import cpu_thread_binding

    cores = sorted(os.sched_getaffinity(0))[: pp * args.cores_per_stage]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(pp, cores))
    extra = {"additional_config": {"kvp": {"prefill_chunking": chunking}}} if chunking != "fixed" else {}
    return LLM(model=args.model, enforce_eager=True, seed=0, pipeline_parallel_size=pp,
               max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
               max_model_len=max(args.lengths + [args.chunk_prompt_len]) + 16,
               kv_cache_memory_bytes=1 << 30, **extra)


def _prompt(length: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(10, 4000) for _ in range(length)]}


def _first_token(llm, prompt) -> float:
    from vllm import SamplingParams

    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    return time.perf_counter() - start


def child_ttft(args) -> dict:
    llm = _engine(args, args.child_pp, args.child_chunking)
    _first_token(llm, _prompt(2 * args.max_num_batched_tokens, seed=1))  # warm-up, both stages
    ttft = {n: statistics.median(_first_token(llm, _prompt(n, seed=n * 100 + r))
                                 for r in range(args.repeats)) for n in args.lengths}
    return {"pp": args.child_pp, "chunking": args.child_chunking, "ttft_s": ttft}


def child_chunks(args) -> dict:
    """Time every engine step of one prompt: the engine core runs in this process (PP = 1), so a
    step is exactly one chunk's schedule, forward pass and sampling."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = _engine(args, 1, args.child_chunking)
    core = llm.llm_engine.engine_core.engine_core
    sched, records, scheduled = core.scheduler, [], []
    schedule, step = sched.schedule, core.step_fn

    def recording_schedule(*a, **kw):
        context = {rid: r.num_computed_tokens for rid, r in sched.requests.items()}
        out = schedule(*a, **kw)
        scheduled.append([(context.get(rid, 0), n) for rid, n in out.num_scheduled_tokens.items()])
        return out

    def timed_step(*a, **kw):
        start = time.perf_counter()
        result = step(*a, **kw)
        if scheduled:
            for context, tokens in scheduled.pop():
                records.append({"context": context, "tokens": tokens,
                                "seconds": time.perf_counter() - start})
        return result

    sched.schedule, core.step_fn = recording_schedule, timed_step
    _first_token(llm, _prompt(2 * args.max_num_batched_tokens, seed=1))  # warm-up
    records.clear()
    ttft = _first_token(llm, _prompt(args.chunk_prompt_len, seed=7))
    from vllm_kvp.chunking import attention_ratio_from_hf_config

    ratio = attention_ratio_from_hf_config(llm.llm_engine.vllm_config.model_config.hf_text_config)
    return {"chunking": args.child_chunking, "ttft_s": ttft, "chunks": records,
            "config_ratio": ratio}


# --- driver ---------------------------------------------------------------------------------------

def _run_child(args, mode: str, pp: int, chunking: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--child-pp", str(pp),
           "--child-chunking", chunking, "--model", args.model,
           "--lengths", ",".join(map(str, args.lengths)),
           "--chunk-prompt-len", str(args.chunk_prompt_len),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--cores-per-stage", str(args.cores_per_stage), "--repeats", str(args.repeats)]
    log = Path(args.out) / f"{mode}_pp{pp}_{chunking}.log"
    print(f"[spp] {mode} pp={pp} chunking={chunking} (log {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True,
                              timeout=args.run_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} pp={pp} {chunking} failed ({proc.returncode}); see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def chunk_summary(run: dict) -> dict:
    """Spread of per-chunk times; the prompt's last chunk is a remainder and is left out."""
    from vllm_kvp.chunking import fit_attention_ratio

    full = run["chunks"][:-1] or run["chunks"]
    times = [c["seconds"] for c in full]
    try:
        fitted = fit_attention_ratio((c["tokens"], c["context"], c["seconds"]) for c in run["chunks"])
    except ValueError:
        fitted = None
    return {"num_chunks": len(run["chunks"]), "chunk_tokens": [c["tokens"] for c in run["chunks"]],
            "max_s": max(times), "min_s": min(times), "max_over_min": max(times) / min(times),
            "fitted_ratio": fitted, "config_ratio": run["config_ratio"]}


def write_report(result: dict, out: Path) -> str:
    lengths = result["config"]["lengths"]
    runs = result["ttft"]
    label = lambda r: f"PP={r['pp']} {r['chunking']}"  # noqa: E731
    lines = ["## TTFT (s) by prompt length", "",
             "| prompt tokens | " + " | ".join(label(r) for r in runs) + " |",
             "|---:|" + "---:|" * len(runs)]
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(f"{r['ttft_s'][str(n)]:.2f}" for r in runs) + " |")
    base = {r["chunking"]: r for r in runs if r["pp"] == 1}
    for r in runs:
        if r["pp"] > 1 and r["chunking"] in base:
            n = str(lengths[-1])
            lines.append(f"\n{label(r)} / PP=1 {r['chunking']} at {n} tokens: "
                         f"{r['ttft_s'][n] / base[r['chunking']]['ttft_s'][n]:.3f}x")
    lines += ["", f"## Per-chunk times, {result['config']['chunk_prompt_len']}-token prompt, PP=1",
              "", "| chunking | chunks | min s | max s | max/min | fitted r | config r |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in result["chunk_summary"].items():
        fitted = f"{s['fitted_ratio']:.3g}" if s["fitted_ratio"] is not None else "-"
        lines.append(f"| {name} | {s['num_chunks']} | {s['min_s']:.3f} | {s['max_s']:.3f} | "
                     f"{s['max_over_min']:.2f} | {fitted} | {s['config_ratio']:.3g} |")
    text = "\n".join(lines) + "\n"
    (out / "spp.md").write_text(text)
    _plot(result, out / "spp.png")
    return text


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = result["config"]["lengths"]
    for r in result["ttft"]:
        left.plot(lengths, [r["ttft_s"][str(n)] for n in lengths], marker="o",
                  label=f"PP={r['pp']} {r['chunking']}")
    left.set(xlabel="prompt tokens", ylabel="TTFT (s)", title="Time to first token")
    left.legend()
    for name, run in result["chunks"].items():
        right.plot([c["seconds"] for c in run["chunks"]], marker=".", label=name)
    right.set(xlabel="chunk", ylabel="seconds", title="Per-chunk time (PP=1)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run = child_ttft(args) if args.child == "ttft" else child_chunks(args)
        print(json.dumps(run), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        print(write_report(json.loads((out / "spp.json").read_text()), out))
        return 0
    if args.model is None:
        from vllm_kvp.model import build_default_model

        args.model = str(build_default_model(size="default" if args.smoke else "bench"))
    ttft = [_run_child(args, "ttft", pp, ch) for pp in args.pp for ch in args.chunking]
    chunks = {ch: _run_child(args, "chunks", 1, ch) for ch in args.chunking}
    result = {"config": {"model": args.model, "lengths": args.lengths, "pp": args.pp,
                         "chunking": args.chunking, "chunk_prompt_len": args.chunk_prompt_len,
                         "max_num_batched_tokens": args.max_num_batched_tokens,
                         "cores_per_stage": args.cores_per_stage, "repeats": args.repeats},
              "ttft": json.loads(json.dumps(ttft)),  # str keys, as read back from the file
              "chunks": chunks,
              "chunk_summary": {ch: chunk_summary(run) for ch, run in chunks.items()}}
    (out / "spp.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_report(result, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sequence pipeline prefill: time to first token of one long prompt, pipeline stages x chunking.

For every PP size and chunking (`fixed`: vLLM's token budget; `adaptive`: kvp.prefill_chunking)
one engine runs in its own process, one core per pipeline stage, and prefills one prompt of each
length (`max_tokens=1`, prefix cache off): its wall time is the TTFT. Then every worker times each
`execute_model` of one more long prompt: on the first stage (or with PP = 1) that is one chunk's
forward pass, the per-chunk time whose spread adaptive chunking is meant to flatten. Those times
also fit the cost model's attention/dense ratio (`chunking.fit_attention_ratio`), to compare with
the one adaptive chunking derives from the model config.

    python benchmarks/spp.py               # bench model, 8k prompt, PP 1/2 x fixed/adaptive
    python benchmarks/spp.py --smoke       # tiny model and prompts: checks the script only
    python benchmarks/spp.py --plot-only   # redraw table and PNG from the JSON

Outputs (in --out, default bench_results/spp): spp.json, spp.md (tables), spp.png, a log per run.
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
    p.add_argument("--repeats", type=int, default=3,
                   help="prompts per length (median TTFT: one slow outlier does not count)")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds per engine run")
    p.add_argument("--out", default="bench_results/spp")
    p.add_argument("--smoke", action="store_true",
                   help="default (tiny) model, lengths 256,640, budget 128: seconds, not numbers")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-pp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child-chunking", default="fixed", help=argparse.SUPPRESS)
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.max_num_batched_tokens, args.repeats = "256,640", 128, 1
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.pp = [int(x) for x in args.pp.split(",")]
    args.chunking = args.chunking.split(",")
    args.chunk_prompt_len = args.chunk_prompt_len or max(args.lengths)
    return args


# --- one engine (child process) -------------------------------------------------------------------

def _engine(args, pp: int, chunking: str):
    from vllm import LLM

    from vllm_kvp.engine.settings import cpu_thread_binding

    cores = sorted(os.sched_getaffinity(0))[: pp * args.cores_per_stage]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(pp, cores))
    extra = ({"additional_config": {"kvp": {"prefill_chunking": chunking}}}
             if chunking != "fixed" else {})
    return LLM(model=args.model, dtype=args.dtype, enforce_eager=True, seed=0,
               pipeline_parallel_size=pp,
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


def _install_chunk_timer(wrapper) -> None:
    """Runs in each worker: time every `execute_model` (one chunk of the prompt when it is the
    only request) with the chunk's size and the tokens of its request computed before it."""
    worker = getattr(wrapper, "worker", wrapper)
    execute, done = worker.execute_model, {}
    worker.spp_chunks = []

    def timed(scheduler_output, *a, **kw):
        start = time.perf_counter()
        out = execute(scheduler_output, *a, **kw)
        seconds = time.perf_counter() - start
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            worker.spp_chunks.append({"context": done.get(rid, 0), "tokens": n,
                                      "seconds": seconds})
            done[rid] = done.get(rid, 0) + n
        return out

    worker.execute_model = timed


def _chunk_log(wrapper) -> list[dict]:
    return getattr(getattr(wrapper, "worker", wrapper), "spp_chunks", [])


def child_run(args) -> dict:
    # The chunk timer is a function shipped to the workers (collective_rpc), which vLLM allows
    # only with this opt-in; the benchmark's engines are local and its own.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    llm = _engine(args, args.child_pp, args.child_chunking)
    _first_token(llm, _prompt(2 * args.max_num_batched_tokens, seed=1))  # warm-up, all stages
    ttft = {n: statistics.median(_first_token(llm, _prompt(n, seed=n * 100 + r))
                                 for r in range(args.repeats)) for n in args.lengths}
    llm.collective_rpc(_install_chunk_timer)
    chunk_ttft = _first_token(llm, _prompt(args.chunk_prompt_len, seed=7))
    from vllm_kvp.planner.chunking import attention_ratio_from_hf_config

    config = llm.llm_engine.vllm_config
    run = {"pp": args.child_pp, "chunking": args.child_chunking, "ttft_s": ttft,
           "dtype": str(config.model_config.dtype),
           "chunk_prompt_ttft_s": chunk_ttft,
           # one list per worker, in stage order; a later stage's time includes its wait for the
           # stage before it, so the first stage's (or PP = 1's) list is the chunk's own time
           "chunks_per_stage": llm.collective_rpc(_chunk_log),
           "config_ratio": attention_ratio_from_hf_config(config.model_config.hf_text_config)}
    llm.llm_engine.engine_core.shutdown()  # workers stop now, not after vLLM's exit grace period
    return run


# --- driver ---------------------------------------------------------------------------------------

def _run_child(args, pp: int, chunking: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--child-pp", str(pp), "--dtype", args.dtype,
           "--child-chunking", chunking, "--model", args.model,
           "--lengths", ",".join(map(str, args.lengths)),
           "--chunk-prompt-len", str(args.chunk_prompt_len),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--cores-per-stage", str(args.cores_per_stage), "--repeats", str(args.repeats)]
    name = Path(args.out) / f"pp{pp}_{chunking}"
    log, result = name.with_suffix(".log"), name.with_suffix(".json")
    result.unlink(missing_ok=True)
    print(f"[spp] pp={pp} chunking={chunking} (log {log})", flush=True)
    with open(log, "w") as f:  # vLLM logs to stdout: the result travels in its own file
        proc = subprocess.run([*cmd, "--child-result", str(result)], stdout=f,
                              stderr=subprocess.STDOUT, timeout=args.run_timeout)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"pp={pp} {chunking} failed ({proc.returncode}); see {log}")
    return json.loads(result.read_text())


def chunk_summary(run: dict) -> dict:
    """Spread of the first stage's per-chunk times; the prompt's last chunk is a remainder (and
    also samples), so it is left out."""
    from vllm_kvp.planner.chunking import fit_attention_ratio

    chunks = run["chunks_per_stage"][0]
    times = [c["seconds"] for c in (chunks[:-1] or chunks)]
    try:
        fitted = fit_attention_ratio((c["tokens"], c["context"], c["seconds"]) for c in chunks)
    except ValueError:
        fitted = None
    return {"pp": run["pp"], "chunking": run["chunking"], "num_chunks": len(chunks),
            "chunk_tokens": [c["tokens"] for c in chunks], "max_s": max(times),
            "min_s": min(times), "max_over_min": max(times) / min(times),
            "fitted_ratio": fitted, "config_ratio": run["config_ratio"],
            "ttft_s": run["chunk_prompt_ttft_s"]}


def write_report(result: dict, out: Path) -> str:
    lengths = result["config"]["lengths"]
    runs = result["runs"]
    label = lambda r: f"PP={r['pp']} {r['chunking']}"  # noqa: E731
    lines = ["## TTFT (s) by prompt length", "",
             "| prompt tokens | " + " | ".join(label(r) for r in runs) + " |",
             "|---:|" + "---:|" * len(runs)]
    for n in lengths:  # JSON object keys are strings
        lines.append(f"| {n} | " + " | ".join(f"{r['ttft_s'][str(n)]:.2f}" for r in runs) + " |")
    base = {r["chunking"]: r for r in runs if r["pp"] == 1}
    longest = str(lengths[-1])
    for r in runs:
        if r["pp"] > 1 and r["chunking"] in base:
            ratio = r["ttft_s"][longest] / base[r["chunking"]]["ttft_s"][longest]
            lines.append(f"\n{label(r)} / PP=1 {r['chunking']} at {longest} tokens: {ratio:.3f}x")
    lines += ["", f"## Per-chunk times of one {result['config']['chunk_prompt_len']}-token prompt "
              "(first stage)", "",
              "| run | chunks | min s | max s | max/min | TTFT s | fitted r | config r |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["chunk_summary"]:
        fitted = f"{c['fitted_ratio']:.3g}" if c["fitted_ratio"] is not None else "-"
        lines.append(f"| {label(c)} | {c['num_chunks']} | {c['min_s']:.3f} | {c['max_s']:.3f} | "
                     f"{c['max_over_min']:.2f} | {c['ttft_s']:.2f} | {fitted} | "
                     f"{c['config_ratio']:.3g} |")
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
    for r in result["runs"]:
        name = f"PP={r['pp']} {r['chunking']}"
        left.plot(lengths, [r["ttft_s"][str(n)] for n in lengths], marker="o", label=name)
        right.plot([c["seconds"] for c in r["chunks_per_stage"][0]], marker=".", label=name)
    left.set(xlabel="prompt tokens", ylabel="TTFT (s)", title="Time to first token")
    right.set(xlabel="chunk", ylabel="seconds", title="Per-chunk time (first stage)")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        Path(args.child_result).write_text(json.dumps(child_run(args)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        print(write_report(json.loads((out / "spp.json").read_text()), out))
        return 0
    if args.model is None:
        from vllm_kvp.model import build_default_model

        args.model = str(build_default_model(size="default" if args.smoke else "bench"))
    runs = [_run_child(args, pp, ch) for pp in args.pp for ch in args.chunking]
    result = {"config": {"model": args.model, "dtype": runs[0]["dtype"], "lengths": args.lengths,
                         "pp": args.pp, "chunking": args.chunking,
                         "chunk_prompt_len": args.chunk_prompt_len,
                         "max_num_batched_tokens": args.max_num_batched_tokens,
                         "cores_per_stage": args.cores_per_stage, "repeats": args.repeats},
              "runs": runs,
              "chunk_summary": [chunk_summary(run) for run in runs]}
    (out / "spp.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_report(result, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

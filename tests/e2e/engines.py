"""Helpers that run real vLLM engines for the end-to-end tests."""

from __future__ import annotations

import contextlib
import gc
import random
from dataclasses import dataclass

from vllm_kvp.inspect import rank_span

# kv_cache_memory_bytes: a fixed KV budget per worker, and no start-up check against free RAM
# (several engines and workers share one CPU host in the tests).
BASE_ENGINE = dict(dtype="float32", enforce_eager=True, seed=0, max_num_seqs=16,
                   kv_cache_memory_bytes=1 << 30)


LOGPROB_TOL = 5e-4


@dataclass
class Result:
    token_ids: list[list[int]]
    logprobs: list[list[float]]  # logprob of each sampled token
    num_cached_tokens: list[int]  # prompt tokens served from the prefix cache
    kvp_ranks: list[list[int] | None]  # KV ranks that held each request (None without KVP)
    kvp_rank_starts: list[list[int] | None]  # first token each of those ranks held


@contextlib.contextmanager
def engine(model: str, kvp: dict | None = None, in_process: bool | None = None, **kwargs):
    """An offline engine. `in_process` runs the engine core and its worker in the test process
    (no process start-up: measured on the 2-core host, a plain reference engine starts in 5 s
    instead of 18 s and stops in 2 s instead of 5 s). The default (None) does so for what can run
    there, a plain single-worker engine (the references); engines with KV ranks, TP or PP always
    get their own processes."""
    from vllm import LLM

    config = {**BASE_ENGINE, **kwargs}
    if kvp is not None:
        config["additional_config"] = {"kvp": kvp}
    single = (kvp is None and config.get("tensor_parallel_size", 1) == 1
              and config.get("pipeline_parallel_size", 1) == 1)
    if in_process is None:
        in_process = single
    elif in_process and not single:
        raise ValueError("only a plain single-worker engine runs in the test process")
    with _in_process(in_process):
        llm = LLM(model=model, **config)
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


@contextlib.contextmanager
def _in_process(enabled: bool):
    if not enabled:
        yield
        return
    import os

    import torch
    import vllm.envs as envs

    # The engine core sets variables in the environment of the process it runs in (among them
    # LOCAL_WORLD_SIZE=1, from which a later engine's workers would divide the cores, and
    # LD_PRELOAD): restore the test process's own afterwards.
    saved = dict(os.environ)
    # The in-process worker binds the calling thread to its cores (children started later would
    # inherit that binding), lowers torch's thread count and replaces `torch.set_num_threads`
    # with a no-op: put all three back.
    affinity, threads, set_threads = os.sched_getaffinity(0), torch.get_num_threads(), torch.set_num_threads
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    envs.disable_envs_cache()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        # The engine core caches vLLM's environment and freezes the heap it started with (the
        # model and its KV cache among it) in whatever process it runs in: undo both here.
        envs.disable_envs_cache()
        gc.unfreeze()
        gc.collect()


def generate(llm, prompts: list[list[int]], max_tokens: int) -> Result:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [
        [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
        for o in outs
    ]
    spans = [rank_span(o) for o in outs]
    return Result(tokens, logprobs, [o.num_cached_tokens or 0 for o in outs],
                  [s.ranks if s else None for s in spans], [s.starts if s else None for s in spans])


def random_prompts(lengths: list[int], vocab: int, seed: int = 0, shared_prefix: int = 0,
                   num_sharing: int = 0) -> list[list[int]]:
    """Token-id prompts of exact lengths; the last `num_sharing` share a `shared_prefix`-token
    prefix (so the second one hits the prefix cache)."""
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731 (skip special ids)
    prompts = [draw(n) for n in lengths]
    prefix = draw(shared_prefix)
    prompts += [prefix + draw(17 + 40 * i) for i in range(num_sharing)]
    return prompts


def assert_same_generation(ref: Result, got: Result, label: str) -> None:
    """Greedy tokens equal; sampled-token logprobs within 1e-4 (catches silent drift)."""
    for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)):
        assert a == b, (
            f"{label}: prompt {i} diverges at token {next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)}"
        )
    for i, (a, b) in enumerate(zip(ref.logprobs, got.logprobs)):
        worst = max(abs(x - y) for x, y in zip(a, b))
        # fp32 sums over up to ~10k keys in another order: ~1e-5..1e-4 drift is rounding.
        assert worst < LOGPROB_TOL, f"{label}: prompt {i} logprob differs by {worst}"


def step_to_completion(llm, prompts: list[list[int]], max_tokens: int, kill=None,
                       moment: str = "decode") -> list[list[int]]:
    """Greedy tokens of every prompt, stepping the engine by hand so a test can kill a worker at a
    chosen moment: `kill()` runs once every request has 3 tokens ("decode"), or from a thread
    started as the second step (a prefill chunk) is sent, so it lands in that step ("prefill")."""
    import threading
    import time

    from vllm import SamplingParams

    eng = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"r{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, {"prompt_token_ids": p}, params)
    done, progress, steps, killed = {}, {}, 0, False
    while eng.has_unfinished_requests():
        thread = None
        if kill and not killed and moment == "prefill" and steps == 1:
            thread, killed = threading.Thread(target=kill), True
            thread.start()
        for out in eng.step():
            progress[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        if thread is not None:
            thread.join()
        steps += 1
        if (kill and not killed and moment == "decode" and len(progress) == len(prompts)
                and min(progress.values()) >= 3):
            kill()
            killed = True
    assert killed or kill is None, "the kill never happened"
    return [done[rid] for rid in ids]


def engine_workers(root_pid: int | None = None) -> list:
    """The workers of the newest engine core under `root_pid` (default: this process), in
    world-rank order (they start in that order); killed ones not yet reaped are left out."""
    import psutil

    def alive(procs):
        out = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    root = psutil.Process(root_pid) if root_pid else psutil.Process()
    cores = [p for p in alive(root.children(recursive=True)) if "EngineCore" in p.name()]
    core = max(cores, key=lambda p: p.create_time())
    return sorted((p for p in alive(core.children()) if "Worker" in p.name()),
                  key=lambda p: (p.create_time(), p.pid))

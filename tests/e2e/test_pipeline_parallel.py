"""Pipeline parallelism on CPU, alone and with KV ranks, with fixed and adaptive prefill chunks:
greedy tokens equal those of one plain worker. A stage that dies restarts the workers; the requests complete unchanged.
(KV ranks x pipeline with `striped` placement and adaptive chunks runs through the server, in
test_server.)

Prompts up to 1,500 tokens in 256-token chunks, so every long prompt is prefilled in several chunks
in flight on both stages, and adaptive chunking really shrinks the later ones.
"""

import contextlib
import os
import signal

import psutil
import pytest

from engines import (assert_same_generation, engine, engine_workers, generate, random_prompts,
                     step_to_completion)
from vllm_kvp.engine import settings as layout

pytestmark = pytest.mark.e2e

LENGTHS = [5, 600, 1500]
ENGINE = dict(max_model_len=4096, max_num_batched_tokens=256)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, 4096, seed=11)


@pytest.fixture(scope="module")
def reference(model_path, prompts):
    with engine(model_path, **ENGINE) as llm:
        return generate(llm, prompts, MAX_TOKENS)


@contextlib.contextmanager
def cpu_workers_bound(num_workers: int):
    """Plain vLLM (no KV ranks) needs an explicit OpenMP binding for several CPU workers on one
    NUMA node, as a user would export it; only the engine started inside sees it."""
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = layout.cpu_thread_binding(
        num_workers, sorted(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


@pytest.mark.parametrize("kvp", [None, {"prefill_chunking": "adaptive"}],
                         ids=["pp2", "pp2-adaptive"])
def test_plain_pipeline_matches_single_worker(model_path, prompts, reference, kvp):
    with cpu_workers_bound(2), engine(model_path, kvp=kvp, pipeline_parallel_size=2,
                                      **ENGINE) as llm:
        config = llm.llm_engine.vllm_config
        # Adaptive chunks with one KV rank: vLLM's workers, only the scheduler is vllm_kvp's.
        assert config.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
        assert config.scheduler_config.scheduler_cls == (layout.CHUNK_SCHEDULER if kvp else None)
        got = generate(llm, prompts, MAX_TOKENS)
    assert_same_generation(reference, got, f"pp=2 kvp={kvp}")


def _check_kvp_pipeline(llm, prompts, reference, label):
    got = generate(llm, prompts, MAX_TOKENS)
    assert_same_generation(reference, got, label)
    assert sorted(got.kvp_ranks[-1]) == [0, 1]  # 1,500 tokens span both ranks either way
    # Four workers: each KV rank is a two-stage pipeline, and each worker holds one rank's share.
    stats = llm.collective_rpc("kvp_stats")
    assert sorted(s["kvp_rank"] for s in stats) == [0, 0, 1, 1]
    assert len({s["num_blocks"] for s in stats}) == 1


@pytest.fixture(scope="module")
def onboard_pipeline(model_path):
    # Linear layers split by columns over the KV ranks in shared steps, on both stages.
    kvp = {"size": 2, "placement": "onboard", "max_tokens_per_rank": 1024, "split_min_bytes": 0}
    with engine(model_path, kvp=kvp, pipeline_parallel_size=2, **ENGINE) as llm:
        yield llm


def test_kv_ranks_x_pipeline_onboard(onboard_pipeline, prompts, reference):
    _check_kvp_pipeline(onboard_pipeline, prompts, reference, "kvp=2 onboard x pp=2")
    stats = onboard_pipeline.collective_rpc("kvp_stats")
    assert min(s["split_linear_calls"] for s in stats) > 0


def _stage_workers(stage: int) -> list[psutil.Process]:
    """The running engine's workers of pipeline stage `stage` (engines stopped earlier may still
    be exiting beside it)."""
    title, out = f"Worker_PP{stage}", []
    for p in engine_workers():
        try:
            if any(title in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:  # exited meanwhile
            pass
    return out


def test_dead_stage_restarts_and_requests_complete(onboard_pipeline, prompts, reference):
    """Kill one last-stage worker mid-decode: its KV rank is lost with it, the engine restarts
    all four workers and every request completes with the tokens of one plain worker."""
    victims = _stage_workers(1)
    assert len(victims) == 2, [p.pid for p in engine_workers()]
    got = step_to_completion(onboard_pipeline, prompts, MAX_TOKENS,
                             kill=lambda: os.kill(victims[0].pid, signal.SIGKILL))
    assert got == reference.token_ids
    fresh = {p.pid for p in _stage_workers(0) + _stage_workers(1)}
    assert len(fresh) == 4 and not fresh & {p.pid for p in victims}

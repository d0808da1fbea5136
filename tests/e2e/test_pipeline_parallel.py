"""Pipeline parallelism on CPU, alone and with KV ranks, with fixed and adaptive prefill chunks:
greedy tokens equal those of one plain worker. A stage that dies fails the engine, never hangs it.

Prompts up to 2,100 tokens in 256-token chunks, so every long prompt is prefilled in several chunks
in flight on both stages, and adaptive chunking really shrinks the later ones.
"""

import contextlib
import os
import signal
import time

import psutil
import pytest

from engines import assert_same_generation, engine, generate, random_prompts
from vllm_kvp import layout

pytestmark = pytest.mark.e2e

LENGTHS = [5, 300, 1200, 2100]
ENGINE = dict(max_model_len=4096, max_num_batched_tokens=256)
MAX_TOKENS = 16


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
        expected = layout.CHUNK_SCHEDULER if kvp else None
        assert llm.llm_engine.vllm_config.scheduler_config.scheduler_cls == expected
        got = generate(llm, prompts, MAX_TOKENS)
    assert_same_generation(reference, got, f"pp=2 kvp={kvp}")


def test_adaptive_chunking_without_pipeline_matches_fixed(model_path, prompts, reference):
    """One worker, only the scheduler is vllm_kvp's (vLLM's CPU platform schedules synchronously;
    with asynchronous scheduling the adaptive scheduler's asynchronous twin runs)."""
    with engine(model_path, kvp={"prefill_chunking": "adaptive"}, **ENGINE) as llm:
        config = llm.llm_engine.vllm_config
        assert config.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
        sched = config.scheduler_config
        assert sched.scheduler_cls == (layout.ASYNC_CHUNK_SCHEDULER if sched.async_scheduling
                                       else layout.CHUNK_SCHEDULER)
        got = generate(llm, prompts, MAX_TOKENS)
    assert_same_generation(reference, got, "adaptive chunking")


def _kvp_pipeline_run(model_path, prompts, kvp):
    with engine(model_path, kvp=kvp, pipeline_parallel_size=2, **ENGINE) as llm:
        got = generate(llm, prompts, MAX_TOKENS)
        stats = llm.collective_rpc("kvp_stats")
    return got, stats


@pytest.mark.parametrize("kvp", [
    {"size": 2, "placement": "onboard", "max_tokens_per_rank": 1024},
    {"size": 2, "placement": "striped", "prefill_chunking": "adaptive"},
], ids=["onboard", "striped-adaptive"])
def test_kv_ranks_x_pipeline_match_single_worker(model_path, prompts, reference, kvp):
    got, stats = _kvp_pipeline_run(model_path, prompts, kvp)
    assert_same_generation(reference, got, f"kvp={kvp} x pp=2")
    assert sorted(got.kvp_ranks[3]) == [0, 1]  # 2,100 tokens span both ranks either way
    # Four workers: each KV rank is a two-stage pipeline, and each worker holds one rank's share.
    assert sorted(s["kvp_rank"] for s in stats) == [0, 0, 1, 1]
    assert len({s["num_blocks"] for s in stats}) == 1


def _stage_workers(stage: int) -> list[psutil.Process]:
    title = f"Worker_PP{stage}"
    return [p for p in psutil.Process().children(recursive=True)
            if any(title in part for part in p.cmdline())]


def test_dead_stage_fails_the_engine(model_path, prompts):
    """Kill one last-stage worker of a KV ranks x PP engine: the next request raises at once."""
    from vllm.v1.engine.exceptions import EngineDeadError

    with engine(model_path, kvp={"size": 2}, pipeline_parallel_size=2, **ENGINE) as llm:
        generate(llm, prompts[:1], 2)
        victims = _stage_workers(1)
        assert len(victims) == 2, [p.cmdline() for p in psutil.Process().children(recursive=True)]
        os.kill(victims[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            generate(llm, prompts[1:2], 2)
        assert time.monotonic() - start < 60

"""Adaptive chunking inside vLLM's real scheduler (no workers): the chunks a long prompt gets step
by step, and a decoding request next to it."""

import pytest
import torch

import vllm_kvp
from vllm_kvp.planner.chunking import attention_ratio_from_hf_config, chunk_tokens

vllm_kvp.register()

from vllm import SamplingParams  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,  # noqa: E402
                                        KVCacheGroupSpec)
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

BUDGET = 512
BLOCK = 16


def _scheduler(model_path, chunking):
    # Synchronous scheduling: each step below feeds back the tokens of the step it scheduled.
    config = EngineArgs(model=model_path, dtype="float32", max_model_len=8192,
                        max_num_batched_tokens=BUDGET, enable_prefix_caching=False,
                        async_scheduling=False,
                        additional_config={"kvp": {"prefill_chunking": chunking}}
                        ).create_engine_config()
    config.cache_config.num_gpu_blocks = 2048  # what the engine sets after profiling
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=2048, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    cls = config.scheduler_config.get_scheduler_cls()
    return cls(config, kv, StructuredOutputManager(config), block_size=BLOCK), config


def _request(rid, length, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(range(3, 3 + length)), params, None)


def _step(sched) -> dict[str, int]:
    """Schedule one step and report a sampled token for every request that reached its end."""
    out: SchedulerOutput = sched.schedule()
    counts = dict(out.num_scheduled_tokens)
    ids = list(counts)
    sampled = []
    for rid in ids:
        req = sched.requests[rid]
        sampled.append([7] if req.num_computed_tokens >= req.num_tokens else [])
    index = {r: i for i, r in enumerate(ids)}
    sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index=index,
                                                    sampled_token_ids=sampled))
    return counts


def test_fixed_keeps_vllms_chunks(model_path):
    sched, _ = _scheduler(model_path, "fixed")
    assert type(sched).__module__.startswith("vllm.")  # "fixed" leaves vLLM's scheduler in place
    sched.add_request(_request("long", 3000, 1))
    chunks = [_step(sched)["long"] for _ in range(6)]
    assert chunks == [512, 512, 512, 512, 512, 440]


def test_adaptive_chunks_shrink_as_the_model_predicts(model_path):
    sched, config = _scheduler(model_path, "adaptive")
    ratio = attention_ratio_from_hf_config(config.model_config.hf_text_config)
    assert sched.chunk_ratio == pytest.approx(ratio)
    sched.add_request(_request("long", 6000, 1))
    done, chunks = 0, []
    while done < 6000:
        c = _step(sched)["long"]
        assert c == min(chunk_tokens(done, BUDGET, ratio), 6000 - done)
        chunks.append(c)
        done += c
    assert chunks[0] == BUDGET and chunks[-2] < BUDGET // 2
    assert chunks[:-1] == sorted(chunks[:-1], reverse=True)


@pytest.mark.parametrize("first", ["decode", "long"])
def test_decodes_run_every_step_next_to_a_long_prefill(model_path, first):
    sched, _ = _scheduler(model_path, "adaptive")
    reqs = {"decode": _request("decode", 20, 200), "long": _request("long", 6000, 1)}
    for rid in ([first] + [r for r in reqs if r != first]):
        sched.add_request(reqs[rid])
    steps = []
    while reqs["long"].num_computed_tokens < 6000:
        steps.append(_step(sched))
        assert sum(steps[-1].values()) <= BUDGET
    # The short request's prompt is in by the second step; from then on it decodes every step.
    started = next(i for i, s in enumerate(steps) if reqs["decode"].num_prompt_tokens <= sum(
        x.get("decode", 0) for x in steps[:i + 1]))
    assert started <= 1
    assert all(s.get("decode") == 1 for s in steps[started + 1:])

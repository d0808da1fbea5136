"""KVPScheduler inside vLLM's real scheduler loop (no workers): the pooled block count, per-rank
placement around allocate_slots, the ranks a finished request reports, and no block zeroing."""

import torch

import vllm_kvp

vllm_kvp.register()

from vllm import SamplingParams  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,  # noqa: E402
                                        KVCacheGroupSpec)
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from vllm_kvp.engine.scheduler import KVPScheduler  # noqa: E402

BLOCK = 16
PER_RANK = 8  # blocks per rank: 128 tokens


def _scheduler(model_path, prefix_caching=False):
    config = EngineArgs(model=model_path, dtype="float32", max_model_len=1024,
                        max_num_batched_tokens=256, enable_prefix_caching=prefix_caching,
                        additional_config={"kvp": {"size": 2, "max_tokens_per_rank": 64}}
                        ).create_engine_config()
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
    # The executor planned with the memory of both ranks: a little more than 2 x PER_RANK.
    kv = KVCacheConfig(num_blocks=2 * PER_RANK + 1, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    return KVPScheduler(config, kv, StructuredOutputManager(config), block_size=BLOCK), config


def _request(rid, tokens, max_tokens, hasher=None):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, tokens, params, None, block_hasher=hasher)


def _hasher():
    """What the engine core gives requests when prefix caching is on."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    fn = get_hash_fn_by_name("sha256")
    init_none_hash(fn)
    return get_request_block_hasher(BLOCK, fn)


def _run(sched, steps=50):
    """Schedule until idle, one sampled token per request that reached its end; returns the
    finished requests' kv_transfer_params and every step's new_block_ids_to_zero."""
    finished, zeroed = {}, []
    for _ in range(steps):
        if not sched.has_requests():
            break
        out = sched.schedule()
        zeroed.append(out.new_block_ids_to_zero)
        ids = list(out.num_scheduled_tokens)
        sampled = [[7] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens
                   else [] for r in ids]
        result = sched.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled))
        for outputs in result.values():
            for o in outputs.outputs:
                if o.finish_reason is not None:
                    finished[o.request_id] = o.kv_transfer_params
    return finished, zeroed


def test_pool_is_exactly_n_times_the_rank_share(model_path):
    sched, config = _scheduler(model_path)
    assert sched.ranks.blocks_per_rank == PER_RANK
    assert config.cache_config.num_gpu_blocks == 2 * PER_RANK
    assert sched.rank_queue.free_per_rank() == [PER_RANK - 1, PER_RANK]  # rank 0: null block


def test_a_long_request_onboards_the_second_rank_and_reports_it(model_path):
    sched, _ = _scheduler(model_path)
    sched.add_request(_request("long", list(range(3, 3 + 100)), 4))
    finished, zeroed = _run(sched)
    ranks, starts = finished["long"]["kvp_ranks"], finished["long"]["kvp_rank_starts"]
    assert sorted(ranks) == [0, 1] and starts == [0, 64]  # onboards at max_tokens_per_rank
    assert all(z is None for z in zeroed)  # logical ids are never sent to be zeroed
    assert sched.rank_queue.free_per_rank() == [PER_RANK - 1, PER_RANK]  # all blocks back
    assert not sched.placement.ranks_of("long")


def test_prefix_hits_are_recorded_on_the_rank_holding_them(model_path):
    sched, _ = _scheduler(model_path, prefix_caching=True)
    prompt, hasher = list(range(3, 3 + 40)), _hasher()
    sched.add_request(_request("a", prompt, 1, hasher))
    first, _ = _run(sched)
    sched.add_request(_request("b", prompt + [9, 9], 1, hasher))
    out = sched.schedule()
    assert out.num_scheduled_tokens["b"] < 42  # the shared prefix was a cache hit
    assert sched.placement.ranks_of("b") == first["a"]["kvp_ranks"]

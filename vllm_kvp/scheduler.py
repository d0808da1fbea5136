"""KVPScheduler: vLLM's scheduler over the pooled KV blocks of all KV ranks.

The executor makes vLLM plan with the memory of all N ranks, so the KVCacheConfig handed to the
scheduler holds about N x P blocks. This scheduler trims it to exactly N x P (P = blocks per rank,
the count each worker allocated), splits the block pool's free queue per rank, and consults the
placement policy whenever a request needs new blocks.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvp.chunk_scheduler import AdaptiveChunkingMixin
from vllm_kvp.config import KVPConfig
from vllm_kvp.metrics import KVPMetrics
from vllm_kvp.placement import RankPlacement
from vllm_kvp.rank_pool import RankedFreeQueue, most_free_first

logger = logging.getLogger("vllm.vllm_kvp")


class KVPScheduler(AdaptiveChunkingMixin, Scheduler):
    def __init__(self, vllm_config, kv_cache_config, *args: Any, **kwargs: Any) -> None:
        self.kvp = KVPConfig.from_additional_config(vllm_config.additional_config)
        kv_cache_config = copy.deepcopy(kv_cache_config)
        self.blocks_per_rank = kv_cache_config.num_blocks // self.kvp.size
        kv_cache_config.num_blocks = self.blocks_per_rank * self.kvp.size
        vllm_config.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)

        manager = self.kv_cache_manager
        pool = manager.block_pool
        self.rank_queue = RankedFreeQueue(
            pool.free_block_queue.get_all_free_blocks(), self.kvp.size, self.blocks_per_rank
        )
        pool.free_block_queue = self.rank_queue
        self.placement = RankPlacement(
            self.kvp.size, self.block_size, policy=self.kvp.placement,
            max_tokens_per_rank=self.kvp.max_tokens_per_rank,
            blocks_per_rank=self.blocks_per_rank,
        )
        self.placement.on_onboard = self._on_onboard
        self.metrics = KVPMetrics(self.kvp.size, self.blocks_per_rank)
        # The manager is vLLM's; wrapping its instance methods (not the class) keeps every other
        # engine in the process untouched.
        self._allocate = manager.allocate_slots
        manager.allocate_slots = self._allocate_slots
        for name in ("free", "pop_blocks_for_free"):
            setattr(manager, name, self._forget_after(getattr(manager, name)))

    # -- placement around vLLM's allocation -------------------------------------------------
    def _allocate_slots(self, request, num_new_tokens: int, *args: Any, **kwargs: Any):
        req_id = request.request_id
        if self.placement.plan(req_id, self._blocks_needed(request, num_new_tokens, *args, **kwargs),
                               self.rank_queue.free_per_rank()) is None:
            return None  # vLLM's answer to "not enough KV cache": wait or preempt
        new_computed = kwargs.get("new_computed_blocks", args[1] if len(args) > 1 else None)
        if new_computed is not None:
            for block in new_computed.blocks[0]:
                if not block.is_null:
                    self.placement.add_existing(req_id, self.rank_queue.rank_of(block.block_id))

        def planner(n, free):
            # vLLM's exact count can differ from the estimate above; if the policy cannot place
            # it, any rank with room will do (exactness never depends on placement).
            ranks = self.placement.plan(req_id, n, free) or most_free_first(n, free)
            self.placement.commit(req_id, ranks)
            return ranks

        self.rank_queue.planner = planner
        try:
            blocks = self._allocate(request, num_new_tokens, *args, **kwargs)
        finally:
            self.rank_queue.planner = None
        if blocks is None and not self.kv_cache_manager.get_block_ids(req_id)[0]:
            # A request that got nothing holds nothing: forget the prefix hits recorded above.
            self.placement.free(req_id)
        return blocks

    def _blocks_needed(self, request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       new_computed_blocks=None, num_lookahead_tokens: int = 0,
                       num_external_computed_tokens: int = 0, *args: Any, **kwargs: Any) -> int:
        """Upper bound of the new blocks this allocation takes (vLLM computes the exact count
        later; an over-estimate only makes a request wait one step earlier)."""
        tokens = (request.num_computed_tokens + num_new_computed_tokens
                  + num_external_computed_tokens + num_new_tokens + num_lookahead_tokens)
        held = len(self.kv_cache_manager.coordinator.single_type_managers[0]
                   .req_to_blocks.get(request.request_id, ()))
        cached = len(new_computed_blocks.blocks[0]) if new_computed_blocks is not None else 0
        return max(0, math.ceil(tokens / self.block_size) - held - cached)

    def _forget_after(self, release):
        """Wrap a manager method that releases a request's blocks: placement forgets it too, and
        the usage gauges show it at once (an aborted request may leave the engine idle)."""
        def wrapped(request, *args, **kwargs):
            result = release(request, *args, **kwargs)
            self.placement.free(request.request_id)
            self._record_usage()
            return result
        return wrapped

    def _on_onboard(self, req_id: str, rank: int, token_index: int) -> None:
        if token_index > 0:  # a request's first rank is a placement, not an onboarding
            self.metrics.onboard_events.inc()
            logger.debug("vllm_kvp: request %s onboards KV rank %d at token %d",
                         req_id, rank, token_index)

    def _free_request(self, request, *args: Any, **kwargs: Any):
        """A finished request reports the KV ranks it used, in onboarding order, and the first
        token each holds (offline: RequestOutput.kv_transfer_params["kvp_ranks"] and
        ["kvp_rank_starts"]; online: the ranks-per-request histogram)."""
        ranks = self.placement.ranks_of(request.request_id)
        starts = self.placement.rank_starts(request.request_id)
        self.metrics.ranks_per_request.observe(len(ranks))
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        if kv_params is None:
            kv_params = {"kvp_ranks": ranks, "kvp_rank_starts": starts}
        return kv_params, ec_params

    def schedule(self, *args: Any, **kwargs: Any):
        self.placement.begin_step()
        output = super().schedule(*args, **kwargs)
        self._record_usage()
        return output

    def _record_usage(self) -> None:
        free = self.rank_queue.free_per_rank()
        usable = self._usable_blocks()
        self.metrics.record_usage([u - f for u, f in zip(usable, free)], usable)

    def _usable_blocks(self) -> list[int]:
        # Rank 0 holds vLLM's null block, which is never free nor usable.
        return [self.blocks_per_rank - (1 if r == 0 else 0) for r in range(self.kvp.size)]

    def _get_new_block_ids_to_zero(self):
        # KVP attention reads only the tokens each shard holds, so a fresh block's stale contents
        # are never read; and the ids here are logical, not the workers' local ones.
        self.kv_cache_manager.take_new_block_ids()
        return None

"""KVPScheduler: vLLM's scheduler over the pooled KV blocks of all KV ranks.

The executor makes vLLM plan with the memory of all N ranks, so the KVCacheConfig handed to the
scheduler holds about N x P blocks. This scheduler trims it to exactly N x P (P = blocks per rank,
the count each worker allocated), splits the block pool's free queue per rank, and consults the
placement policy whenever a request needs new blocks.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvp.config import kvp_config
from vllm_kvp.engine.chunk_scheduler import AdaptiveChunkingMixin
from vllm_kvp.engine.metrics import KVPMetrics
from vllm_kvp.engine.placement import RankPlacement
from vllm_kvp.engine.recovery import recovery_log
from vllm_kvp.engine.rank_pool import RankedFreeQueue, most_free_first
from vllm_kvp.engine.vllm_compat import (
    SchedulerHooks, allocate_slots_args, blocks_held, computed_blocks, mark_replay,
    pooled_scheduler_kv_config, replace_free_block_queue, reset_for_recompute,
    wrap_manager_methods)
from vllm_kvp.rank_map import RankMap

logger = logging.getLogger("vllm.vllm_kvp")


class KVPScheduler(AdaptiveChunkingMixin, SchedulerHooks, Scheduler):
    def __init__(self, vllm_config, kv_cache_config, *args: Any, **kwargs: Any) -> None:
        self.kvp = kvp_config(vllm_config)
        kv_cache_config, blocks_per_rank = pooled_scheduler_kv_config(
            vllm_config, kv_cache_config, self.kvp.size)
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.ranks = RankMap(self.kvp.size, blocks_per_rank, self.block_size)

        manager = self.kv_cache_manager
        self.rank_queue = replace_free_block_queue(
            manager.block_pool, lambda free: RankedFreeQueue(free, self.ranks))
        self.placement = RankPlacement(
            self.kvp.size, self.block_size, policy=self.kvp.placement,
            max_tokens_per_rank=self.kvp.max_tokens_per_rank,
            blocks_per_rank=self.ranks.blocks_per_rank,
            stripe_min_tokens=self.kvp.stripe_threshold(
                self.scheduler_config.max_num_batched_tokens),
        )
        self.placement.on_onboard = self._on_onboard
        self.metrics = KVPMetrics(self.kvp.size, self.ranks.blocks_per_rank)
        # The manager is vLLM's; wrapping its instance methods (not the class) keeps every other
        # engine in the process untouched.
        self._allocate = manager.allocate_slots
        manager.allocate_slots = self._allocate_slots
        wrap_manager_methods(manager, self._forget_after)
        # Dead-worker recovery (recovery.py): the executor restarts the workers and bumps the
        # epoch; the next schedule() recomputes every unfinished request.
        self.recovery = recovery_log(vllm_config, self.kvp.max_rank_restarts)
        self.recovery.metrics  # created now, so /metrics shows them at zero  # noqa: B018
        self._epoch = self.recovery.epoch
        self._replay: set[str] = set()  # requests whose outputs the restarted workers need
        self._recovering: dict[str, tuple[float, int]] = {}  # id -> (death, outputs then)
        self._step_epochs: dict[int, int] = {}  # id(scheduler output) -> epoch it ran in

    # -- placement around vLLM's allocation -------------------------------------------------
    def _allocate_slots(self, request, num_new_tokens: int, *args: Any, **kwargs: Any):
        req_id = request.request_id
        call = allocate_slots_args(request, num_new_tokens, args, kwargs)
        # A request's first allocation fixes its placement ("auto" stripes long prompts); after a
        # preemption it comes back with its outputs to recompute too.
        self.placement.admit(req_id, request.num_tokens)
        if self.placement.choose(req_id, self._blocks_needed(request, call),
                                 self.rank_queue.free_per_rank()) is None:
            if not self.kv_cache_manager.get_block_ids(req_id)[0]:
                self.placement.free(req_id)
            return None  # vLLM's answer to "not enough KV cache": wait or preempt
        for block in computed_blocks(call["new_computed_blocks"]):
            if not block.is_null:
                self.placement.add_existing(req_id, self.rank_queue.rank_of(block.block_id))

        def choose(n, free):
            # vLLM's exact count can differ from the estimate above; if the policy cannot place
            # it, any rank with room will do (exactness never depends on placement).
            ranks = self.placement.choose(req_id, n, free) or most_free_first(n, free)
            self.placement.commit(req_id, ranks)
            return ranks

        self.rank_queue.chooser = choose
        try:
            blocks = self._allocate(request, num_new_tokens, *args, **kwargs)
        finally:
            self.rank_queue.chooser = None
        if blocks is None and not self.kv_cache_manager.get_block_ids(req_id)[0]:
            # A request that got nothing holds nothing: forget the prefix hits recorded above.
            self.placement.free(req_id)
        return blocks

    def _blocks_needed(self, request, call: dict[str, Any]) -> int:
        """Upper bound of the new blocks an allocation (`allocate_slots_args`) takes (vLLM
        computes the exact count later; an over-estimate only makes a request wait one step
        earlier)."""
        tokens = (request.num_computed_tokens + call["num_new_computed_tokens"]
                  + call["num_external_computed_tokens"] + call["num_new_tokens"]
                  + call["num_lookahead_tokens"])
        held = blocks_held(self.kv_cache_manager, request.request_id)
        cached = len(computed_blocks(call["new_computed_blocks"]))
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

    def kvp_finished_params(self, request) -> dict:
        """A finished request reports the KV ranks it used, in onboarding order, and the first
        token each holds (offline: RequestOutput.kv_transfer_params["kvp_ranks"] and
        ["kvp_rank_starts"]; online: the ranks-per-request histogram). Read before vLLM frees
        the request's blocks, while placement still knows it."""
        ranks = self.placement.ranks_of(request.request_id)
        starts = self.placement.rank_starts(request.request_id)
        self.metrics.ranks_per_request.observe(len(ranks))
        return {"kvp_ranks": ranks, "kvp_rank_starts": starts}

    def schedule(self, *args: Any, **kwargs: Any):
        if self.recovery.epoch != self._epoch:
            self._recompute_after_restart()
        self.placement.begin_step()
        output = super().schedule(*args, **kwargs)
        if self._replay:
            for new in output.scheduled_new_reqs:
                if new.req_id in self._replay:
                    mark_replay(new, self.requests[new.req_id].all_token_ids)
                    self._replay.discard(new.req_id)
        self._step_epochs[id(output)] = self._epoch
        self._record_usage()
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        if self._step_epochs.pop(id(scheduler_output), self._epoch) != self.recovery.epoch:
            # The workers died during this step and restarted: it produced nothing, and the
            # next schedule() recomputes every request it held.
            return {}
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._recovering:
            now = time.monotonic()
            for req_id, (died_at, outputs_then) in list(self._recovering.items()):
                request = self.requests.get(req_id)
                if request is None or request.num_output_tokens > outputs_then:
                    self.recovery.metrics.recovery_seconds.observe(now - died_at)
                    del self._recovering[req_id]
        return outputs

    def _recompute_after_restart(self) -> None:
        """The workers restarted with empty KV caches: every unfinished request recomputes its
        prompt and the tokens it generated, then continues (greedy outputs are unchanged)."""
        self._epoch = self.recovery.epoch
        failure = self.recovery.last_failure
        unfinished = [r for r in list(self.running) + list(self.waiting)
                      if r.num_computed_tokens > 0 or r.num_output_tokens > 0]
        replay = reset_for_recompute(self)
        self._replay = {r.request_id for r in replay}
        died_at = failure.detected_at if failure else time.monotonic()
        for request in unfinished:
            self._recovering[request.request_id] = (died_at, request.num_output_tokens)
        self.recovery.metrics.recovered.inc(len(unfinished))
        ids = [r.request_id for r in unfinished]
        logger.warning(
            "vllm_kvp: recomputing %d unfinished request(s) after KV rank %s died: %s%s",
            len(ids), failure.kv_rank if failure else "?", ", ".join(ids[:16]),
            " ..." if len(ids) > 16 else "")

    def _record_usage(self) -> None:
        free = self.rank_queue.free_per_rank()
        usable = self.ranks.usable_blocks()  # the null block is never free nor usable
        self.metrics.record_usage([u - f for u, f in zip(usable, free)], usable)

    def kvp_zero_new_blocks(self) -> bool:
        # KVP attention reads only the tokens each shard holds, so a fresh block's stale contents
        # are never read; and the ids here are logical, not the workers' local ones.
        return False

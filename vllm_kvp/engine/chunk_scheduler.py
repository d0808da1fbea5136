"""Adaptive prefill chunking in vLLM's scheduler: a per-request cap on a prefill's tokens per step.

vLLM's `Scheduler.schedule` sizes every request's tokens for the step (token budget,
`long_prefill_token_threshold`, max_model_len) and then passes the count through
`_reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)`, in the loop over
running requests and in the loop over waiting ones alike. That per-request hook is where the
adaptive cap goes, so `schedule()` itself stays vLLM's. Decode steps (one token) are never capped,
and a capped prefill leaves the rest of the budget to the requests after it.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvp.config import kvp_config
from vllm_kvp.engine.vllm_compat import SchedulerHooks
from vllm_kvp.planner.chunking import attention_ratio_from_hf_config, chunk_tokens

logger = logging.getLogger("vllm.vllm_kvp")


class AdaptiveChunkingMixin:
    """Caps a long prefill's chunk by `chunking.chunk_tokens` when `kvp.prefill_chunking` is
    "adaptive"; a no-op with "fixed". Put it before `vllm_compat.SchedulerHooks` (which calls
    `kvp_cap_prefill`) and vLLM's `Scheduler` in the bases."""

    def __init__(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        kvp = kvp_config(vllm_config)
        self.chunk_ratio: float | None = None
        if not kvp.adaptive_chunking:
            return
        threshold = vllm_config.scheduler_config.long_prefill_token_threshold
        # The first chunk of a prompt is what vLLM would schedule; later ones match its time.
        self.first_chunk = (min(self.max_num_scheduled_tokens, threshold) if threshold > 0
                            else self.max_num_scheduled_tokens)
        self.chunk_ratio = attention_ratio_from_hf_config(vllm_config.model_config.hf_text_config)
        probe = max(8 * self.first_chunk, 8192)
        logger.info(
            "vllm_kvp adaptive prefill chunking: first chunk %d tokens, attention/dense cost "
            "ratio %.3g per (query, key) pair; a chunk after %d tokens gets %d tokens",
            self.first_chunk, self.chunk_ratio, probe,
            chunk_tokens(probe, self.first_chunk, self.chunk_ratio),
        )

    def kvp_cap_prefill(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """`vllm_compat.SchedulerHooks`' per-request cap on the tokens a prefill may take."""
        if self.chunk_ratio is not None and num_new_tokens > 1:
            num_new_tokens = min(num_new_tokens, self.adaptive_cap(num_computed_tokens))
        return num_new_tokens

    def adaptive_cap(self, num_computed_tokens: int) -> int:
        """Tokens a prefill whose prompt has `num_computed_tokens` done may take this step."""
        cap = chunk_tokens(num_computed_tokens, self.first_chunk, self.chunk_ratio)
        # Leave one token of the budget to every other running request, so a prefill of the
        # budget's full size cannot keep decodes behind it in the queue from running.
        others = max(0, len(self.running) - 1)
        return max(1, min(cap, self.max_num_scheduled_tokens - others))


class AdaptiveChunkScheduler(AdaptiveChunkingMixin, SchedulerHooks, Scheduler):
    """vLLM's scheduler with adaptive prefill chunks: what `kvp.size == 1` with
    `prefill_chunking="adaptive"` runs (no other vllm_kvp class is involved then)."""


class AdaptiveChunkAsyncScheduler(AdaptiveChunkingMixin, SchedulerHooks, AsyncScheduler):
    """The same over vLLM's asynchronous scheduler, which vLLM picks for one CUDA worker without
    pipeline stages (never on CPU; see `layout.finish_engine_config`)."""

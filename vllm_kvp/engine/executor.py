"""KVPExecutor: runs KVP x PP x TP workers and sizes the KV cache as one pool over all KV ranks.

vLLM sizes the world, the broadcast queue and the torch.distributed group from
`parallel_config.world_size`, and lays ranks out as ExternalDP x PP x TP, so multiplying the world
by the KVP size before the workers start gives each KV rank a correct TP/PP layout of its own.
The KV-cache hooks make vLLM's start-up planning (memory check, max_model_len fit, block count)
see the memory of all KV ranks, while each worker still allocates only its own share.
"""

from __future__ import annotations

import logging

from vllm.v1.executor.multiproc_executor import MultiprocExecutor

from vllm_kvp.config import kvp_config
from vllm_kvp.engine import process_exit
from vllm_kvp.engine.restart import RestartingExecutorMixin
from vllm_kvp.engine.settings import ensure_cpu_thread_binding
from vllm_kvp.engine.vllm_compat import ExecutorHooks, shrink_to_rank_share
from vllm_kvp.rank_map import RankMap

__all__ = ["KVPExecutor", "KVPMixin", "shrink_to_rank_share"]

logger = logging.getLogger("vllm.vllm_kvp")


class KVPMixin(ExecutorHooks):
    """Shared by the executors: world-size override and pooled KV-cache sizing."""

    def _setup_kvp(self) -> None:
        process_exit.skip_final_collection()  # the engine core process, when it is one
        self.kvp = kvp_config(self.vllm_config)
        pc = self.vllm_config.parallel_config
        replica = pc.tensor_parallel_size * pc.pipeline_parallel_size * pc.prefill_context_parallel_size
        pc.world_size = replica * self.kvp.size

    def kvp_parallel_sizes(self, tp: int, pp: int, pcp: int) -> tuple[int, int, int]:
        # Reported so the executors' `world_size == tp * pp * pcp` check holds; the KV ranks are
        # the outer (ExternalDP) dimension of the world.
        return tp * self.kvp.size, pp, pcp

    def _pool_override(self) -> None:
        # num_gpu_blocks_override keeps its per-worker meaning: each KV rank holds that many
        # blocks, so the pooled count vLLM plans with is N times larger.
        cache = self.vllm_config.cache_config
        if cache.num_gpu_blocks_override is not None:
            cache.num_gpu_blocks_override *= self.kvp.size

    def determine_available_memory(self) -> list[int]:
        per_worker = super().determine_available_memory()
        available = min(per_worker)
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():  # on CPUs VLLM_CPU_KVCACHE_SPACE sizes the cache
            available -= self._reserve_transient(available)
        pooled = available * self.kvp.size
        return [pooled] * len(per_worker)

    def _reserve_transient(self, available: int) -> int:
        """KVP's exchange buffers, which vLLM's profile run does not hold (transient_memory)."""
        from vllm_kvp.engine.transient_memory import transient_memory_for

        est = transient_memory_for(self.vllm_config, self.kvp.size, self.kvp.replicates_steps)
        if est.peak >= available:
            raise RuntimeError(
                f"vllm_kvp: KV-parallel exchange buffers need up to {est.peak / 2**30:.2f} GiB "
                f"per worker, more than the {available / 2**30:.2f} GiB vLLM left for the KV "
                f"cache; lower max_num_batched_tokens or raise gpu_memory_utilization")
        logger.info(
            "vllm_kvp: reserving %.2f GiB per worker for KV-parallel exchange buffers (attention "
            "%.2f, split-layer columns %.2f, hidden states %.2f GiB at %d tokens per step), not "
            "in vLLM's profile run", est.peak / 2**30, est.attention / 2**30,
            est.columns / 2**30, est.hidden / 2**30,
            self.vllm_config.scheduler_config.max_num_batched_tokens)
        return est.peak

    def initialize_from_config(self, kv_cache_configs) -> None:
        block_size = kv_cache_configs[0].kv_cache_groups[0].kv_cache_spec.block_size
        ranks = RankMap.from_pooled(kv_cache_configs[0].num_blocks, self.kvp.size, block_size)
        for config in kv_cache_configs:
            shrink_to_rank_share(config, ranks.blocks_per_rank)
        self._log_layout(ranks)
        super().initialize_from_config(kv_cache_configs)

    def _log_layout(self, ranks: RankMap) -> None:
        servable = min(self.vllm_config.model_config.max_model_len, ranks.largest_context())
        logger.info(
            "vllm_kvp layout: %d KV ranks x %d blocks per rank (%d tokens per rank, block size "
            "%d), %d workers; placement %s; largest context servable: %d tokens",
            ranks.num_ranks, ranks.blocks_per_rank, ranks.tokens_per_rank, ranks.block_size,
            self.vllm_config.parallel_config.world_size, self.kvp.placement, servable,
        )


class KVPExecutor(KVPMixin, RestartingExecutorMixin, MultiprocExecutor):
    """Local multiprocess executor (CPU with gloo, CUDA with NCCL); restarts its workers when
    one dies (restart.py)."""

    def _init_executor(self) -> None:
        self._setup_kvp()
        self._setup_restarts()
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            ensure_cpu_thread_binding(self.vllm_config.parallel_config.world_size)
        super()._init_executor()
        self._pool_override()


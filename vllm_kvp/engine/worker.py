"""KVPWorker: vLLM's worker plus the KVP process group, the KVP attention backend and owner
computes (each rank runs the model on the tokens whose KV it holds, see runner.py).

Each worker allocates only its own KV rank's blocks (the executor hands it a per-rank
KVCacheConfig); the scheduler's block ids are logical over all ranks (`rank_map.RankMap`) and are
mapped to local ones inside the attention backend, the one place that reads or writes the KV
cache. Once the cache size is known the worker records its rank context (`step.configure`): its
rank, the rank map and the step policy, derived from the config alone so every rank and pipeline
stage routes every step alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

from vllm.platforms import current_platform

from vllm_kvp import step
from vllm_kvp.config import KVPConfig, kvp_config
from vllm_kvp.engine import process_exit, vllm_compat
from vllm_kvp.engine.runner import install_owner_computes
from vllm_kvp.rank_map import RankMap
from vllm_kvp.step import comm, split_linear
from vllm_kvp.step.stats import STATS
from vllm_kvp.step_policy import StepPolicy

logger = logging.getLogger("vllm.vllm_kvp")


def _base_worker():
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def register_kvp_backend() -> None:
    """Point the attention backend the engine selects at the KVP one, in this (worker) process.

    CPU: the platform's only backend, CPU_ATTN, is overridden. CUDA: `layout.apply_to_engine_args`
    selects vLLM's CUSTOM slot, so other lookups of FLASH_ATTN in the worker (vision encoders,
    drafters, backend probing) still get vLLM's own class."""
    cpu = current_platform.is_cpu()
    vllm_compat.register_attention_backend(
        cpu, "vllm_kvp.step.backend_cpu.KVPAttentionBackend" if cpu
        else "vllm_kvp.step.backend_cuda.KVPFlashAttentionBackend")


def step_policy_for(vllm_config, kvp: KVPConfig, cuda: bool, hardware=None) -> StepPolicy:
    """The step policy of this engine, from its config and `hardware` (`device_hardware`, the
    same on every rank and stage): whether the model has split layers is the cost model's rule on
    the model's shape, and each step's kind the cost model's prediction with `hardware`'s
    constants (None: the fixed rule)."""
    policy = _step_policy(vllm_config, kvp, cuda, hardware)
    return dataclasses.replace(policy, exchange_scope=kvp.exchange_scope)


def _step_policy(vllm_config, kvp: KVPConfig, cuda: bool, hardware) -> StepPolicy:
    from vllm_kvp.planner import cost_model
    from vllm_kvp.planner.command import PlanError, shape_from_config

    if not (kvp.replicates_steps and kvp.size > 1):
        return StepPolicy(world=kvp.size, share_steps=kvp.replicates_steps,
                          split_step_tokens=kvp.split_step_tokens)
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    try:
        shape = shape_from_config(mc.hf_config.to_dict(), mc.model)
    except PlanError as e:  # not a shape the cost model reads: no split layers, the fixed rule
        logger.warning("vllm_kvp: %s; linear layers are not split", e)
        return StepPolicy(world=kvp.size, split_step_tokens=kvp.split_step_tokens)
    shape = dataclasses.replace(shape, dtype_bytes=mc.dtype.itemsize)
    layout = cost_model.Layout(tp=pc.tensor_parallel_size, pp=pc.pipeline_parallel_size,
                               kvp=kvp.size)
    return cost_model.policy(shape, layout, kvp.min_split_bytes(cuda), hw=hardware,
                             split_step_tokens=kvp.split_step_tokens,
                             out_bytes=None if cuda else cost_model.CPU_PARTIAL_BYTES)


def device_hardware(kvp: KVPConfig, cuda: bool):
    """(Hardware, name) of `kvp.device`, or of this worker's device. Every worker takes world
    rank 0's answer (`comm.agree`), so a step gets one kind on every rank and stage even on
    hosts that differ."""
    from vllm_kvp.planner import gpus

    name = None
    if cuda:
        import torch

        name = torch.cuda.get_device_name()
    return comm.agree(gpus.runtime_hardware(kvp.device, name, os.cpu_count() or 1))


class KVPWorker(_base_worker()):
    _kvp_logits_width = 0  # vocab columns of the lm_head this rank split (0: kept whole)

    def init_device(self) -> None:
        process_exit.skip_final_collection()
        register_kvp_backend()
        super().init_device()
        kvp = kvp_config(self.vllm_config)
        comm.init_kvp_group(kvp.size)
        install_owner_computes(self.model_runner)
        if current_platform.is_cpu():
            # Build (once per machine, about half a minute) or load the C++ attention kernel now,
            # at start-up, rather than inside the first request's first layer.
            from vllm_kvp.ops import cpu_kernel

            if cpu_kernel.load() is not None:
                logger.info("vllm_kvp: C++ CPU attention kernel ready")

    def initialize_from_config(self, kv_cache_config) -> None:
        """This rank's share of the KV cache (`blocks_per_rank` blocks) is known: record the rank
        context every step is built with, then let vLLM allocate it."""
        kvp = kvp_config(self.vllm_config)
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        ranks = RankMap(kvp.size, kv_cache_config.num_blocks, block_size)
        cuda = not current_platform.is_cpu()
        hardware, device = device_hardware(kvp, cuda)
        policy = step_policy_for(self.vllm_config, kvp, cuda, hardware)
        # The head this rank actually split (none on other pipeline stages, or quantized).
        policy = dataclasses.replace(policy, logits_width=self._kvp_logits_width)
        step.configure(step.RankContext(comm.kvp_rank(), ranks, policy))
        logger.info("vllm_kvp: KV rank %d of %d, %d blocks of %d tokens; step kinds: %s",
                    comm.kvp_rank(), kvp.size, ranks.blocks_per_rank, block_size,
                    policy.describe(device))
        super().initialize_from_config(kv_cache_config)

    def load_model(self, *args, **kwargs) -> None:
        """vLLM's load, then the large linear layers split over the KV ranks for shared steps
        (`split_linear`: by output columns, gated MLPs as TP splits them; step_mode "auto"
        only)."""
        kvp = kvp_config(self.vllm_config)
        cpu = current_platform.is_cpu()
        if not (kvp.enabled and kvp.replicates_steps):
            super().load_model(*args, **kwargs)
            if cpu:
                vllm_compat.warm_vocab_masks(self.model_runner.model)
            return
        min_bytes = kvp.min_split_bytes(cuda=not cpu)
        capture = contextlib.nullcontext()
        if cpu:
            from vllm_kvp.patches.cpu_linear_slices import capture_column_slices

            capture = capture_column_slices(comm.kvp_rank(), kvp.size, min_bytes)
        with capture:
            super().load_model(*args, **kwargs)
        if cpu:
            vllm_compat.warm_vocab_masks(self.model_runner.model)
        n = split_linear.install(self.model_runner.model, kvp.size, min_bytes, cpu)
        self._kvp_logits_width = split_linear.install_logits(self.model_runner.model, min_bytes,
                                                             cpu)
        logger.info("vllm_kvp: %d linear layers split over %d KV ranks in shared steps (weights "
                    ">= %d bytes; by output columns, gated MLPs as TP splits them); lm_head %s",
                    n, kvp.size, min_bytes,
                    "split by vocab columns when its rows pay for the gather"
                    if self._kvp_logits_width else "whole")

    def kvp_stats(self) -> dict:
        """This rank's KV allocation and traffic (for tests, benchmarks and debugging)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in self.model_runner.kv_caches}
        return {"kvp_rank": comm.kvp_rank(), "kv_cache_bytes": sum(storages.values()),
                "num_blocks": step.rank_context().ranks.blocks_per_rank, **STATS.as_dict()}

    def shutdown(self) -> None:
        comm.destroy_kvp_group()
        super().shutdown()

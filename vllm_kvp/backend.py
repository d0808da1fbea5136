"""KVP attention backend for vLLM: queries travel to the KV, partial outputs travel back.

Under owner computes (see `runner.py`) each rank runs the layer on its own rows only: the tokens
whose KV slots it owns. One step, in every attention layer:
  1. each rank writes its rows' new K/V into its own cache (K/V never moves);
  2. the step's queries are all-gathered, so every rank has every query in vLLM's token order;
  3. each rank attends every query over what it holds of that query's request, causally by
     position: its shard of the request's past and its own new tokens of this step, all read in
     place from its cache through a compacted local block table -> one (out, lse) per query;
  4. the partials are exchanged and each rank merges, in rank order, those of its own rows.
In a replicated step (one rank owns every token, see `plan`) every rank runs every row: step 2 is
skipped and each rank merges every row.
A rank holding nothing of a request contributes out = 0, lse = -inf for its queries.
The KV cache layout (num_blocks, num_kv_heads, block_size, 2 * head_size) is vLLM's CPU one; this
backend owns both the write and the read, so the interior is plain (K | V per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from vllm_kvp import comm, split_linear
from vllm_kvp.config import KVPConfig
from vllm_kvp.ops import cpu_kernel
from vllm_kvp.ops.attention import write_kv
from vllm_kvp.ops.merge import merge_gathered_rows
from vllm_kvp.ops.paged_attention import paged_attention_lse
from vllm_kvp.plan import StepPlan, build_step_plan, step_plan_from_routing
from vllm_kvp.shard_map import local_blocks, local_slots
from vllm_kvp.stats import STATS


class KVPAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KVPAttentionImpl

    @staticmethod
    def get_builder_cls():
        return KVPMetadataBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class KVPAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # (B+1,) int32, offsets of each request's new tokens
    local_block_table: torch.Tensor  # (B, M) int32, this rank's blocks of each request first
    shard_lens: torch.Tensor  # (B,) int32, tokens of each request held by this rank (this step's too)
    block_pos: torch.Tensor  # (B, M) int32, position of the first token of each local block
    token_pos: torch.Tensor  # (T,) int32, position of each query of the step
    plan: StepPlan  # who computes which token of this step (shared by every layer)


class KVPMetadataBuilder(AttentionMetadataBuilder[KVPAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        kvp = KVPConfig.from_additional_config(vllm_config.additional_config)
        self.allow_replicated = kvp.replicates_steps
        self.split_step_tokens = kvp.split_step_tokens

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        n, t = cm.num_reqs, cm.num_actual_tokens
        qsl = cm.query_start_loc[: n + 1]
        # Per-worker block count: the executor handed this worker its own rank's share.
        blocks_per_rank = self.vllm_config.cache_config.num_gpu_blocks
        rank, world = comm.kvp_rank(), comm.kvp_world_size()
        split = split_linear.enabled()
        # Every token up to the end of the step: owners write this step's K/V before attending.
        routed = cpu_kernel.step_routing_cpu(cm.slot_mapping[:t], qsl, cm.seq_lens[:n],
                                             cm.block_table_tensor[:n], rank, world,
                                             blocks_per_rank, self.block_size)
        if routed is not None:  # one C++ pass instead of ~40 small torch ops
            table, lens, block_pos = routed[8:]
            plan = step_plan_from_routing(routed[:8], rank, world, self.allow_replicated, split,
                                          self.split_step_tokens)
        else:
            table, lens, block_pos = local_blocks(cm.block_table_tensor[:n], cm.seq_lens[:n],
                                                  self.block_size, rank, blocks_per_rank)
            plan = build_step_plan(cm.slot_mapping[:t], qsl, cm.seq_lens[:n], rank, world,
                                   blocks_per_rank * self.block_size,
                                   allow_replicated=self.allow_replicated, split=split,
                                   split_step_tokens=self.split_step_tokens)
        return KVPAttentionMetadata(num_actual_tokens=t, query_start_loc=qsl,
                                    local_block_table=table, shard_lens=lens, block_pos=block_pos,
                                    token_pos=plan.token_pos.to(torch.int32), plan=plan)


def refuse_unsupported_layer(attn_type: str, **features: object) -> None:
    """Raise for a layer that is not plain causal decoder attention. `features` are the layer's
    optional attention features (ALiBi slopes, sliding window, soft cap, sinks, KV sharing); any
    that is not None is refused. Shared by the CPU and CUDA backends."""
    given = [k for k, v in features.items() if v is not None]
    if given or attn_type != AttentionType.DECODER:
        raise NotImplementedError(
            f"vllm_kvp attention supports plain causal decoder attention; this model's layers "
            f"use {given or attn_type}")


class KVPAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **_: object) -> None:
        refuse_unsupported_layer(
            attn_type, alibi_slopes=alibi_slopes, sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap or None, sinks=sinks,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name)
        if kv_cache_dtype not in ("auto", None):
            raise NotImplementedError(f"vllm_kvp does not support kv_cache_dtype={kv_cache_dtype!r} yet")
        self.num_heads, self.head_size = num_heads, head_size
        self.num_kv_heads, self.scale = num_kv_heads, float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the K/V (rows, Hkv, D) of the rows this rank owns; slot_mapping holds the rows'
        logical slots (other ranks' slots in a replicated step, and -1 for a dummy row, are
        skipped)."""
        block_size, rank = kv_cache.shape[2], comm.kvp_rank()
        written = cpu_kernel.write_kv_rank_cpu(kv_cache, key, value, slot_mapping[: key.shape[0]],
                                               block_size, rank, kv_cache.shape[0])
        if written is None:
            slots = local_slots(slot_mapping[: key.shape[0]], block_size, rank, kv_cache.shape[0])
            write_kv(kv_cache, key, value, slots)
            written = (slots >= 0).sum()
        STATS.kv_tokens_written += written

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: KVPAttentionMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None:  # profiling / warm-up run: no plan, no collectives
            return output
        md = attn_metadata
        plan = md.plan
        t, h, d, rows = plan.num_tokens, self.num_heads, self.head_size, plan.out_rows
        # 2. Every query of the step, in vLLM order. (1. was do_kv_cache_update.)
        q = comm.step_queries(query, plan).view(t, h, d)
        # 3. This rank's partial for every query, written straight into the exchange buffer:
        # float32 out (H * D) then lse (H) per query.
        packed = torch.empty((t, h * d + h), dtype=torch.float32, device=q.device)
        paged_attention_lse(q, kv_cache, md.local_block_table, md.shard_lens, md.query_start_loc,
                            self.scale, q_pos=md.token_pos, block_pos=md.block_pos,
                            out=packed[:, : h * d].view(t, h, d), lse=packed[:, h * d:])
        # 4. Every rank's partials of this rank's rows, merged in rank order.
        gathered = comm.gather_partials(packed, plan)  # (R, T, H*D + H)
        merge_gathered_rows(gathered, plan.merge_idx, h, d, output[:rows].view(rows, h, d))
        return output

"""KVP attention backend for vLLM on CPUs: vLLM's CPU cache layout, our C++ kernels.

The algorithm is `kvp_attention.attend`; this module is its CPU plumbing. The KV cache layout
(num_blocks, num_kv_heads, block_size, 2 * head_size) is vLLM's CPU one; this backend owns both
the write and the read, so the interior is plain (K | V per token). The metadata builder calls
`step.build_step` once per step: the Step is the metadata.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from vllm_kvp.ops import cpu_kernel
from vllm_kvp.ops.merge import merge_gathered_rows
from vllm_kvp.ops.paged_attention import paged_attention_lse, write_kv
from vllm_kvp.step import Step
from vllm_kvp.step import attention as kvp_attention
from vllm_kvp.step import build_step, rank_context
from vllm_kvp.step.fresh import scratch_cache
from vllm_kvp.step.shard_map import local_slots
from vllm_kvp.step.stats import STATS


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


class KVPMetadataBuilder(AttentionMetadataBuilder[Step]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        return build_step(common_attn_metadata, rank_context(), split_fresh=True)


class CPUKernels:
    """The C++ kernels (torch where the extension does not cover the inputs)."""

    def __init__(self, num_heads: int, head_size: int) -> None:
        self.h, self.d = num_heads, head_size

    def partials(self, q, kv_cache, step: Step, scale: float) -> torch.Tensor:
        # float32 out (H * D) then lse (H) per query: the kernel writes straight into the
        # exchange buffer.
        t, h, d = q.shape
        packed = torch.empty((t, h * d + h), dtype=torch.float32, device=q.device)
        paged_attention_lse(q, kv_cache, step.local_block_table, step.exchanged_lens,
                            step.exchanged_query_start_loc, scale, q_pos=step.exchanged_pos,
                            block_pos=step.block_pos, out=packed[:, : h * d].view(t, h, d),
                            lse=packed[:, h * d:])
        return packed

    def fresh_partials(self, q, key, value, step: Step, scale: float, packed) -> None:
        f = step.fresh
        n, (_, h, d) = f.rows.shape[0], q.shape
        if n == 0:
            return
        part = torch.empty((n, h * d + h), dtype=torch.float32, device=q.device)
        paged_attention_lse(q[f.rows], scratch_cache(f, key, value), f.block_table, f.lens,
                            f.query_start_loc, scale, q_pos=f.pos, block_pos=f.block_pos,
                            out=part[:, : h * d].view(n, h, d), lse=part[:, h * d:])
        packed[f.rows] = part

    def merge(self, gathered, rows, out) -> None:
        merge_gathered_rows(gathered, rows, self.h, self.d, out)

    def attend_own(self, q, kv_cache, step: Step, scale: float, out) -> None:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        paged_attention_lse(q, kv_cache, step.local_block_table, step.shard_lens,
                            step.own_query_start_loc, scale, q_pos=step.own_pos,
                            block_pos=step.block_pos, out=out, lse=lse)


class KVPAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **_: object) -> None:
        kvp_attention.refuse_unsupported_layer(
            attn_type, AttentionType.DECODER, alibi_slopes=alibi_slopes,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap or None, sinks=sinks,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name)
        if kv_cache_dtype not in ("auto", None):
            raise NotImplementedError(
                f"vllm_kvp does not support kv_cache_dtype={kv_cache_dtype!r} yet")
        self.num_heads, self.head_size = num_heads, head_size
        self.num_kv_heads, self.scale = num_kv_heads, float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.kernels = CPUKernels(num_heads, head_size)

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the K/V (rows, Hkv, D) of the rows this rank owns; slot_mapping holds the rows'
        logical slots (other ranks' slots in a shared step, and -1 for a dummy row, are
        skipped)."""
        ctx = rank_context()
        slots = slot_mapping[: key.shape[0]]
        written = cpu_kernel.write_kv_rank_cpu(kv_cache, key, value, slots, ctx.rank, ctx.ranks)
        if written is None:
            local = local_slots(slots, ctx.rank, ctx.ranks)
            write_kv(kv_cache, key, value, local)
            written = (local >= 0).sum()
        STATS.kv_tokens_written += written

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Step | None, output: torch.Tensor,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None:  # profiling / warm-up run: no step, no collectives
            return output
        return kvp_attention.attend(attn_metadata, query, kv_cache, output, self.num_heads,
                                    self.head_size, self.scale, self.kernels, key, value)

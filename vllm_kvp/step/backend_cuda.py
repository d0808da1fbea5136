"""KVP attention backend on CUDA: vLLM's FlashAttention layout and KV write, our Triton kernels.

The algorithm is `kvp_attention.attend` (the CPU backend runs the same one); this module is its
CUDA plumbing. The cache write goes through vLLM's `reshape_and_cache_flash` (local slots; -1,
which the kernel skips, for a dummy row or another rank's token); the partials come from our
Triton paged kernel, travel as `ops.partials` bytes (outputs in the attention dtype, float32 LSEs)
and are merged by the Triton merge kernel. Why our kernel and not FlashAttention's varlen call:
docs/design.md, "CUDA".

What comes from vLLM's FlashAttention backend: the KV cache layout (logical (num_blocks, Hkv,
block_size, 2D) over a block-major NHD tensor), the block sizes, the cache write and the support
checks. What does not: FA's metadata and kernels (the builder returns `step.build_step`'s Step).

Host synchronisation: the builder reads one small tensor per step, the per-rank token counts
(`routing.route_step`); nothing in `do_kv_cache_update` or `forward` reads a device value on the
host (tests/unit/test_backend_cuda.py runs both on `meta` tensors to keep it so). Nothing is
allocated for CUDA graphs, which owner computes does not support (`_cudagraph_support` NEVER).
"""

from __future__ import annotations

import torch
from vllm.config.cache import CacheDType
from vllm.v1.attention.backend import (
    AttentionCGSupport, AttentionMetadataBuilder, AttentionType, MultipleOf)
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from vllm_kvp.engine import vllm_compat
from vllm_kvp.ops import partials
from vllm_kvp.ops.triton_merge import triton_merge_partials
from vllm_kvp.ops.triton_paged_attention import paged_attention_lse
from vllm_kvp.step import Step
from vllm_kvp.step import attention as kvp_attention
from vllm_kvp.step import build_step, rank_context
from vllm_kvp.step.shard_map import local_slots
from vllm_kvp.step.stats import STATS


class KVPFlashAttentionBackend(FlashAttentionBackend):
    """Registered as vLLM's CUSTOM backend in every KVP worker (`worker.register_kvp_backend`).
    The support hooks refuse, at backend selection and with vLLM's own error message, what owner
    computes cannot run; the impl refuses ALiBi and soft caps, which the selector does not see."""

    # fp32 too: our Triton kernels compute in fp32 for every input dtype.
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    # fp8 KV would need scaled reads in our kernel.
    supported_kv_cache_dtypes = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return KVPFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return KVPCudaMetadataBuilder

    @classmethod
    def get_supported_kernel_block_sizes(cls, kv_cache_spec=None) -> list[int | MultipleOf]:
        # Our kernel reads any page size; FA's FA4-specific sizes do not apply to it. 16 keeps
        # vLLM's default block size, the one the kernel was measured with.
        return [MultipleOf(16)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return default_block_size if cls.supports_block_size(default_block_size) else 16

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0 and head_size <= 256

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype: CacheDType | None) -> bool:
        return kv_cache_dtype is None or kv_cache_dtype in cls.supported_kv_cache_dtypes

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        # The kernel's key-split count follows the batch's shape.
        return False

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        # A rank holds only part of each request's KV.
        return False

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink,
                             use_sparse, use_mm_prefix, device_capability) -> str | None:
        # The kernel reads K/V in the queries' dtype; FA's own combinations (FA4, fp8) do not apply.
        named = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(kv_cache_dtype or "auto")
        if named is not None and named != dtype:
            return f"kv_cache_dtype {kv_cache_dtype} differs from the model dtype {dtype}"
        return None


class KVPCudaMetadataBuilder(AttentionMetadataBuilder[Step]):
    """`step.build_step` on the device tensors vLLM hands over; no persistent buffers (they would
    only serve full CUDA graphs, which owner computes does not support)."""

    # Eager only (layout.py pins enforce_eager): docs/design.md, "CUDA graphs under owner computes".
    _cudagraph_support = AttentionCGSupport.NEVER
    # The runner would swap the logical block table back into metadata built for another group.
    supports_update_block_table = False

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        return build_step(common_attn_metadata, rank_context())


class TritonKernels:
    """Our Triton paged attention and merge; partials travel as `ops.partials` bytes."""

    def __init__(self, num_heads: int, head_size: int) -> None:
        self.h, self.d = num_heads, head_size
        self.dtype = None  # the attention dtype, seen on the first call

    def partials(self, q, kv_cache, step: Step, scale: float) -> torch.Tensor:
        # In the queries' dtype (the kernel's contract); the LSE is float32. Host bounds only:
        # the launch reads nothing back.
        out, lse = paged_attention_lse(
            q, kv_cache, step.local_block_table, step.shard_lens, step.exchanged_query_start_loc,
            scale, q_pos=step.exchanged_pos, block_pos=step.block_pos, max_kv_len=step.max_kv_len,
            max_query_len=step.max_query_len)
        self.dtype = out.dtype
        return partials.pack(out, lse)

    def merge(self, gathered, rows, out) -> None:
        outs, lses = partials.unpack(gathered, rows, self.h, self.d, self.dtype)
        merged, _ = triton_merge_partials(outs, lses)  # (R, n, H, D), (R, n, H) -> (n, H, D)
        out.copy_(merged.view(out.shape))

    def attend_own(self, q, kv_cache, step: Step, scale: float, out) -> None:
        paged_attention_lse(
            q, kv_cache, step.local_block_table, step.shard_lens, step.own_query_start_loc,
            scale, q_pos=step.own_pos, block_pos=step.block_pos, out=out,
            max_kv_len=step.max_kv_len, max_query_len=step.max_query_len)


class KVPFlashAttentionImpl(FlashAttentionImpl):
    """FlashAttention's impl for the cache write only; attention is `forward` below."""

    supports_dcp = False
    can_return_lse_for_decode = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **_: object) -> None:
        kvp_attention.refuse_unsupported_layer(
            attn_type, AttentionType.DECODER, alibi_slopes=alibi_slopes,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap or None, sinks=sinks,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name)
        if kv_cache_dtype not in (None, *KVPFlashAttentionBackend.supported_kv_cache_dtypes):
            raise NotImplementedError(f"vllm_kvp does not support kv_cache_dtype={kv_cache_dtype!r}")
        # FlashAttentionImpl.__init__ is not called: it picks and announces an FA version that
        # is never used; what its cache write reads is set instead.
        vllm_compat.init_flash_impl_for_kv_update(
            self, num_heads=num_heads, head_size=head_size, num_kv_heads=num_kv_heads,
            scale=scale, kv_cache_dtype=kv_cache_dtype, attn_type=attn_type)
        self.kernels = TritonKernels(num_heads, head_size)

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store this rank's rows' K/V (rows, Hkv, D); slot_mapping (rows,) int64 holds their
        logical slots (-1 for a dummy row), mapped here to local ones (-1 for another rank's)."""
        ctx = rank_context()
        slots = local_slots(slot_mapping[: key.shape[0]], ctx.rank, ctx.ranks)
        super().do_kv_cache_update(layer, key, value, kv_cache, slots)
        STATS.kv_tokens_written += (slots >= 0).sum()  # a device tensor: no sync

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Step | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm_kvp attention does not fuse output quantization")
        if attn_metadata is None:  # profiling / warm-up run: no step, no collectives
            return output.fill_(0)
        return kvp_attention.attend(attn_metadata, query, kv_cache, output, self.num_heads,
                                    self.head_size, self.scale, self.kernels)

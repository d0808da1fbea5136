"""KVP attention backend on CUDA: vLLM's FlashAttention layout and KV write, our attention kernels.

The step is the CPU backend's (`backend.py`), under owner computes: in every attention layer
  1. each rank writes its rows' new K/V into its own cache, through vLLM's `reshape_and_cache_flash`
     (local slots; -1, which the kernel skips, for a dummy row);
  2. the step's queries are all-gathered, so every rank has every query in vLLM's token order;
  3. each rank attends every query over what it holds of that query's request, causally by position,
     past and this step's tokens in one paged call of our Triton kernel -> one (out, lse) per query;
  4. the partials are exchanged (`ops.partials`: outputs in the attention dtype, float32 LSEs, one
     byte buffer) and each rank merges, in rank order, those of its own rows (Triton);
     in a replicated step (see `plan`) every rank runs and merges every row, and step 2 is skipped.
Why our kernel and not FlashAttention's varlen call: docs/design.md, "CUDA".

What comes from vLLM's FlashAttention backend: the KV cache layout (logical (num_blocks, Hkv,
block_size, 2D) over a block-major NHD tensor), the block sizes, the cache write and the support
checks. What does not: FA's metadata and kernels (`KVPCudaMetadataBuilder` builds our own metadata).

Host synchronisation: the metadata builder reads one small tensor per step, the per-rank token
counts (`plan.build_step_plan`); nothing in `do_kv_cache_update` or `forward` reads a device value on
the host (tests/unit/test_backend_cuda.py runs both on `meta` tensors to keep it so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.config.cache import CacheDType
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, AttentionType, MultipleOf
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from vllm_kvp import comm, split_linear
from vllm_kvp.backend import KVPAttentionMetadata, refuse_unsupported_layer
from vllm_kvp.config import KVPConfig
from vllm_kvp.ops import partials
from vllm_kvp.ops.triton_merge import triton_merge_partials
from vllm_kvp.ops.triton_paged_attention import paged_attention_lse
from vllm_kvp.plan import build_step_plan
from vllm_kvp.shard_map import local_blocks, local_slots
from vllm_kvp.stats import STATS


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


@dataclass
class KVPCudaAttentionMetadata(KVPAttentionMetadata):
    max_query_len: int  # host upper bound on the step's query lengths (launch parameters only)
    max_kv_len: int  # host upper bound on shard_lens: min(longest request, this rank's slots)


class KVPCudaMetadataBuilder(AttentionMetadataBuilder[KVPCudaAttentionMetadata]):
    """The CPU builder's metadata, computed on the device. The tensors `forward` reads (local block
    table, shard lengths, block positions, token positions) are written into buffers allocated
    once, so their addresses do not change from step to step (what FULL graphs would need; see
    docs/design.md); the plan's row tensors have per-step sizes and are fresh."""

    # Eager only (layout.py pins enforce_eager): docs/design.md, "CUDA graphs under owner computes".
    _cudagraph_support = AttentionCGSupport.NEVER
    # The runner would swap the logical block table back into metadata built for another group.
    supports_update_block_table = False

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        kvp = KVPConfig.from_additional_config(vllm_config.additional_config)
        self.allow_replicated = kvp.replicates_steps
        self.split_step_tokens = kvp.split_step_tokens
        sched = vllm_config.scheduler_config
        max_reqs = sched.max_num_seqs
        max_cols = -(-vllm_config.model_config.max_model_len // self.block_size)
        self._table = self._new((max_reqs, max_cols))
        self._block_pos = self._new((max_reqs, max_cols))
        self._lens = self._new((max_reqs,))
        self._token_pos = self._new((sched.max_num_batched_tokens,))

    def _new(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int32, device=self.device)

    def _fill(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Copy `value` into the top-left corner of persistent buffer `name` and return that view;
        a buffer too small for it (a step beyond the configured maxima) is regrown once."""
        buf = getattr(self, name)
        if any(v > b for v, b in zip(value.shape, buf.shape)):
            buf = self._new(tuple(max(v, b) for v, b in zip(value.shape, buf.shape)))
            setattr(self, name, buf)
        view = buf[tuple(slice(0, n) for n in value.shape)]
        view.copy_(value)
        return view

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        n, t = cm.num_reqs, cm.num_actual_tokens
        qsl = cm.query_start_loc[: n + 1]
        blocks_per_rank = self.vllm_config.cache_config.num_gpu_blocks  # this rank's share
        rank, world = comm.kvp_rank(), comm.kvp_world_size()
        # cm.max_seq_len bounds every request's length (host int): columns past it hold no token.
        cols = min(cm.block_table_tensor.shape[1], -(-cm.max_seq_len // self.block_size))
        table, lens, block_pos = local_blocks(cm.block_table_tensor[:n, :cols], cm.seq_lens[:n],
                                              self.block_size, rank, blocks_per_rank)
        plan = build_step_plan(cm.slot_mapping[:t], qsl, cm.seq_lens[:n], rank, world,
                               blocks_per_rank * self.block_size,
                               allow_replicated=self.allow_replicated,
                               split=split_linear.enabled(),
                               split_step_tokens=self.split_step_tokens)
        return KVPCudaAttentionMetadata(
            num_actual_tokens=t, query_start_loc=qsl,
            local_block_table=self._fill("_table", table), shard_lens=self._fill("_lens", lens),
            block_pos=self._fill("_block_pos", block_pos),
            token_pos=self._fill("_token_pos", plan.token_pos), plan=plan,
            max_query_len=cm.max_query_len,
            max_kv_len=min(cm.max_seq_len, blocks_per_rank * self.block_size))


class KVPFlashAttentionImpl(FlashAttentionImpl):
    """FlashAttention's impl for the cache write only; attention is `forward` below."""

    supports_dcp = False
    can_return_lse_for_decode = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **_: object) -> None:
        refuse_unsupported_layer(
            attn_type, alibi_slopes=alibi_slopes, sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap or None, sinks=sinks,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name)
        if kv_cache_dtype not in (None, *KVPFlashAttentionBackend.supported_kv_cache_dtypes):
            raise NotImplementedError(f"vllm_kvp does not support kv_cache_dtype={kv_cache_dtype!r}")
        # FlashAttentionImpl.__init__ is not called: it picks and announces an FA version that
        # is never used. These are the attributes its do_kv_cache_update and vLLM's layer read.
        self.num_heads, self.head_size = num_heads, head_size
        self.num_kv_heads, self.scale = num_kv_heads, float(scale)
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype or "auto"
        self.attn_type = attn_type
        self.alibi_slopes, self.sinks, self.logits_soft_cap = None, None, 0
        self.sliding_window = (-1, -1)
        self.kv_sharing_target_layer_name = None

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store this rank's rows' K/V (rows, Hkv, D); slot_mapping (rows,) int64 holds their
        logical slots (all on this rank; -1 for a dummy row), mapped here to local ones."""
        slots = local_slots(slot_mapping[: key.shape[0]], kv_cache.shape[2], comm.kvp_rank(),
                            kv_cache.shape[0])
        super().do_kv_cache_update(layer, key, value, kv_cache, slots)
        STATS.kv_tokens_written += (slots >= 0).sum()  # a device tensor: no sync

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: KVPCudaAttentionMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm_kvp attention does not fuse output quantization")
        if attn_metadata is None:  # profiling / warm-up run: no plan, no collectives
            return output.fill_(0)
        md = attn_metadata
        plan = md.plan
        t, h, d, rows = plan.num_tokens, self.num_heads, self.head_size, plan.out_rows
        # 2. Every query of the step, in vLLM order. (1. was do_kv_cache_update.)
        q = comm.step_queries(query, plan).view(t, h, d)
        # 3. This rank's partial for every query, in the queries' dtype (the kernel's contract);
        #    the LSE is float32. Host bounds only: the launch reads nothing back.
        part_out, part_lse = paged_attention_lse(
            q, kv_cache, md.local_block_table, md.shard_lens, md.query_start_loc, self.scale,
            q_pos=md.token_pos, block_pos=md.block_pos,
            max_kv_len=md.max_kv_len, max_query_len=md.max_query_len)
        # 4. Every rank's partials of this rank's rows, merged in rank order. They travel as one
        #    byte buffer: outputs in the attention dtype (bf16: half of float32's bytes), float32 LSEs.
        gathered = comm.gather_partials(partials.pack(part_out, part_lse), plan)  # (R, T, F) uint8
        # (R, rows, H, D), (R, rows, H)
        outs, lses = partials.unpack(gathered, plan.merge_idx, h, d, part_out.dtype)
        out, _ = triton_merge_partials(outs, lses)
        output[:rows].copy_(out.reshape(output[:rows].shape))
        return output

"""KVP attention, once for every device: queries travel to the KV, partial outputs travel back.

Under owner computes (see `runner.py`) each rank runs a routed step's layers on its own rows only:
the tokens whose KV slots it owns. One step, in every attention layer:
  1. each rank writes its rows' new K/V into its own cache (K/V never moves; the backend's
     `do_kv_cache_update`, before `attend`);
  2. the step's queries are all-gathered, so every rank has every query in vLLM's token order;
  3. each rank attends every query over what it holds of that query's request, causally by
     position: its shard of the request's past and its own new tokens of this step, all read in
     place from its cache through a compacted local block table -> one (out, lse) per query;
  4. the partials are exchanged and each rank merges, in rank order, those of its own rows.
In a shared step (see `step_policy`) every rank runs every row: step 2 is skipped and each rank
merges every row. A rank holding nothing of a request contributes out = 0, lse = -inf.
In a local step no request spans ranks: each rank attends its own rows over its own KV, which is
all of their context, so steps 2 and 4 (and their collectives) disappear.

The device kernels plug in through `AttentionKernels` (C++ on CPUs: `backend.py`; Triton on
CUDA: `backend_cuda.py`); the backends hold nothing else but vLLM's metadata and cache hooks.
"""

from __future__ import annotations

from typing import Protocol

import torch

from vllm_kvp.step import Step, comm


class AttentionKernels(Protocol):
    def partials(self, q: torch.Tensor, kv_cache: torch.Tensor, step: Step,
                 scale: float) -> torch.Tensor:
        """q (T, H, D) every query of the step -> (T, F) this rank's packed partials, one row per
        query (`ops.partials` layout: H x D outputs, then H float32 LSEs)."""

    def merge(self, gathered: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        """gathered (R, T, F) every rank's packed partials; rows (n,) int64 queries -> out (n, H,
        D) their merged outputs, ranks in order."""

    def attend_own(self, q: torch.Tensor, kv_cache: torch.Tensor, step: Step, scale: float,
                   out: torch.Tensor) -> None:
        """q (rows, H, D) this rank's own rows -> out (rows, H, D) their attention over this
        rank's KV (a local step: it holds all of their requests' context)."""


def attend(step: Step, query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor,
           num_heads: int, head_size: int, scale: float, kernels: AttentionKernels) -> torch.Tensor:
    """Steps 2-4 of one attention layer; `output` (>= out_rows, H * D) receives this rank's rows."""
    t, h, d, rows = step.num_tokens, num_heads, head_size, step.out_rows
    if step.local:
        out = output[:rows].view(rows, h, d)
        kernels.attend_own(query[:rows].view(rows, h, d), kv_cache, step, scale, out)
        return output
    q = comm.step_queries(query, step).view(t, h, d)  # 2.
    packed = kernels.partials(q, kv_cache, step, scale)  # 3.
    gathered = comm.gather_partials(packed, step)  # 4. (R, T, F)
    kernels.merge(gathered, step.merge_idx, output[:rows].view(rows, h, d))
    return output


def refuse_unsupported_layer(attn_type: str, decoder: str, **features: object) -> None:
    """Raise for a layer that is not plain causal decoder attention. `features` are the layer's
    optional attention features (ALiBi slopes, sliding window, soft cap, sinks, KV sharing); any
    that is not None is refused."""
    given = [k for k, v in features.items() if v is not None]
    if given or attn_type != decoder:
        raise NotImplementedError(
            f"vllm_kvp attention supports plain causal decoder attention; this model's layers "
            f"use {given or attn_type}")

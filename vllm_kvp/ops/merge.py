"""Merge per-shard partial attention results with log-sum-exp weights.

Each rank attends over its local KV shard and produces ``(out_r, lse_r)`` where ``out_r`` is the
softmax-weighted average of its values and ``lse_r = log(sum_j exp(s_j))`` over its scores. Full
attention over the union of the shards is then

    lse = log(sum_r exp(lse_r)),    out = sum_r exp(lse_r - lse) * out_r.

Every rank computes this on the same all-gathered tensors, and the ranks must agree bit for bit (they
go on to sample the same token), so the reduction order is fixed: a sequential loop over the partials
in their given order, never a library reduction whose order could depend on the device or on threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["merge_gathered_rows", "merge_partials"]


def _merge_seq(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared math. outs[r]: (T, H, D) any float dtype; lses[r]: (T, H) natural-log LSE.

    Returns out (T, H, D) in outs[0].dtype and lse (T, H) float32.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"need matching non-empty partial lists, got {len(outs)} outs, {len(lses)} lses")
    out_dtype = outs[0].dtype
    lses32 = [l.to(torch.float32) for l in lses]

    # Running max in a fixed order (max is exact, so order only matters for NaN propagation).
    m = lses32[0]
    for l in lses32[1:]:
        m = torch.maximum(m, l)
    # A row where every shard is empty has m = -inf; shifting by 0 there makes every weight
    # exp(-inf) = 0 instead of exp(-inf - -inf) = NaN.
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)

    denom = torch.zeros_like(m)
    acc = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for o, l in zip(outs, lses32):
        w = torch.exp(l - m_safe)  # in [0, 1]; 0 for empty shards
        denom = denom + w
        # Upcast one partial at a time rather than the whole (R, T, H, D) stack.
        acc = acc + w.unsqueeze(-1) * o.to(torch.float32)

    nonempty = denom > 0
    # Dividing by a clamped denominator keeps empty rows finite; their numerator is exactly 0.
    out = acc / torch.where(nonempty, denom, torch.ones_like(denom)).unsqueeze(-1)
    lse = torch.where(nonempty, m_safe + torch.log(denom), torch.full_like(m, float("-inf")))
    return out.to(out_dtype), lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge R partial attention results.

    Args:
        outs: (R, T, H, D), any float dtype: each shard's normalised attention output.
        lses: (R, T, H), natural-log LSE of each shard's scores; -inf where a shard is empty.

    Returns:
        out (T, H, D) in ``outs.dtype`` (0 where every shard is empty) and lse (T, H) float32
        (-inf where every shard is empty). Computed in float32; the result depends only on the
        input values and their order along R.
    """
    if outs.dim() != 4 or lses.dim() != 3 or outs.shape[:3] != lses.shape:
        raise ValueError(f"expected outs (R,T,H,D) and lses (R,T,H), got {tuple(outs.shape)}, {tuple(lses.shape)}")
    return _merge_seq(outs.unbind(0), lses.unbind(0))


def merge_gathered_rows(gathered: torch.Tensor, rows: torch.Tensor, h: int, d: int,
                        out: torch.Tensor) -> torch.Tensor:
    """Merge the partials of some queries straight from the exchange buffer.

    gathered: (R, T, H * D + H) float32, rank r's partials of every query of the step (out as H * D
    values, then the H LSEs), as `comm.gather_partials` returns them; rows: (n,) int64 queries to
    merge; out: (n, H, D) written with their merged outputs (its dtype). Same math and order as
    :func:`merge_partials`; on CPU the C++ kernel does it in one pass when it is built.
    """
    if gathered.device.type == "cpu" and gathered.is_contiguous():
        from vllm_kvp.ops import cpu_kernel

        if cpu_kernel.merge_gathered_rows_cpu(gathered, rows, h, d, out):
            return out
    mine = gathered[:, rows]  # (R, n, H * D + H)
    merged, _ = merge_partials(mine[..., : h * d].reshape(gathered.shape[0], -1, h, d),
                               mine[..., h * d:])
    out.copy_(merged)
    return out

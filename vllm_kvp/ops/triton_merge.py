"""Triton kernel for :func:`vllm_kvp.ops.merge.merge_partials` on GPU.

Same contract as the torch version: outs (R, T, H, D) any float dtype, lses (R, T, H) natural-log
LSE (-inf for an empty shard) -> out (T, H, D) in outs' dtype, lse (T, H) float32, computed in
float32. Each (t, h) row is reduced by exactly one program, sequentially over r = 0..R-1, so the
result depends only on the inputs and their order (every rank gets the same bits from the same
gathered tensor). The torch version fuses nothing and reads the partials R times; this reads each
partial once.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (the environment variable must be set when this
module is imported, because ``triton.jit`` picks interpreter or compiler at decoration time). The
kernel deliberately uses only builtins (``tl.full``, not ``tl.zeros``): Triton's standard-library
helpers are themselves ``@triton.jit`` functions decorated when Triton was first imported, so they
cannot be called from a kernel interpreted in a process that imported Triton without the variable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_merge_partials"]

# Elements of the (rows, D) accumulator one program holds; keeps registers bounded for large D.
_TILE_ELEMS = 2048


@triton.jit
def _merge_partials_kernel(
    outs_ptr,  # (R, N, D) contiguous, any float dtype
    lses_ptr,  # (R, N) contiguous float32
    out_ptr,  # (N, D) contiguous, outs' dtype
    lse_ptr,  # (N,) float32
    R,
    N,
    D,
    stride_out_r,  # N * D, passed in so Triton types it int64 when it does not fit int32
    stride_lse_r,  # N
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: rows * D may exceed 2**31
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    tile_mask = rmask[:, None] & (cols < D)[None, :]

    # Pass 1: per-row max LSE. Padding rows read -inf and come out as empty rows (never stored).
    lse_ptrs = lses_ptr + rows
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for _ in range(R):
        m = tl.maximum(m, tl.load(lse_ptrs, mask=rmask, other=float("-inf")))
        lse_ptrs += stride_lse_r
    # All-empty rows: shift by 0 so weights are exp(-inf) = 0 rather than exp(nan).
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    # Pass 2: weighted sum in the fixed order r = 0..R-1.
    lse_ptrs = lses_ptr + rows
    out_ptrs = outs_ptr + rows[:, None] * D + cols[None, :]
    denom = tl.full([BLOCK_N], 0.0, tl.float32)
    acc = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    for _ in range(R):
        w = tl.exp(tl.load(lse_ptrs, mask=rmask, other=float("-inf")) - m_safe)
        o = tl.load(out_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        denom += w
        acc += w[:, None] * o
        lse_ptrs += stride_lse_r
        out_ptrs += stride_out_r

    nonempty = denom > 0.0
    safe_denom = tl.where(nonempty, denom, 1.0)  # empty rows: numerator is exactly 0
    out = acc / safe_denom[:, None]
    lse = tl.where(nonempty, m_safe + tl.log(safe_denom), float("-inf"))
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


def triton_merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge R partial attention results with a Triton kernel.

    Args:
        outs: (R, T, H, D), any float dtype.
        lses: (R, T, H), natural-log LSE, -inf for an empty shard.

    Returns:
        out (T, H, D) in outs.dtype (0 where every shard is empty), lse (T, H) float32 (-inf there).
    """
    if outs.dim() != 4 or lses.dim() != 3 or outs.shape[:3] != lses.shape:
        raise ValueError(f"expected outs (R,T,H,D) and lses (R,T,H), got {tuple(outs.shape)}, {tuple(lses.shape)}")
    r, t, h, d = outs.shape
    if r == 0 or d == 0:
        raise ValueError(f"need at least one partial and head_dim > 0, got {tuple(outs.shape)}")
    outs_c = outs.contiguous()
    lses_c = lses.to(torch.float32).contiguous()
    out = torch.empty((t, h, d), dtype=outs.dtype, device=outs.device)
    lse = torch.empty((t, h), dtype=torch.float32, device=outs.device)
    n = t * h
    if n == 0:
        return out, lse
    block_d = triton.next_power_of_2(d)
    block_n = max(1, min(64, _TILE_ELEMS // block_d))  # powers of two, as tl.arange requires
    grid = (triton.cdiv(n, block_n),)
    _merge_partials_kernel[grid](
        outs_c, lses_c, out, lse, r, n, d, n * d, n, BLOCK_N=block_n, BLOCK_D=block_d
    )
    return out, lse

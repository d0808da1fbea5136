"""Output columns of a linear layer shared out over KV ranks (pure tensor math, no communication).

In a shared step (see `step_policy`) every rank runs every row, and a large linear layer computes only
rank r's slice [bounds[r], bounds[r + 1]) of its output columns; the slices are all-gathered, padded
to the widest, and put back side by side. A column slice leaves each output element's dot product
whole (same inputs, same length), so the assembled output is the unsplit layer's.
"""

from __future__ import annotations

import torch


def column_bounds(features: int, world: int) -> list[int]:
    """Slice boundaries of `features` output columns over `world` ranks: near-equal widths, the
    wider slices first (rank r owns [bounds[r], bounds[r + 1]))."""
    if features < 0 or world < 1:
        raise ValueError(f"cannot split {features} columns over {world} ranks")
    base, extra = divmod(features, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


def pad_columns(part: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, w) -> (rows, width), zero columns appended (every rank sends the same size)."""
    if part.shape[-1] == width:
        return part
    return torch.nn.functional.pad(part, (0, width - part.shape[-1]))


def assemble_columns(gathered: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Every rank's padded slice, (world, rows, widest) in rank order -> (rows, features)."""
    world, rows, widest = gathered.shape
    widths = [b - a for a, b in zip(bounds, bounds[1:])]
    if len(widths) != world:
        raise ValueError(f"{len(widths)} slices for {world} gathered ranks")
    if all(w == widest for w in widths):
        return gathered.permute(1, 0, 2).reshape(rows, world * widest)
    return torch.cat([gathered[r, :, :w] for r, w in enumerate(widths)], dim=1)


# A gated MLP (gate_up -> act(gate) * up -> down) in a shared step splits like a TP layer: rank r
# computes intermediate columns [bounds[r], bounds[r + 1]) of both the gate and the up projection
# (the activation is elementwise per column pair, so it runs on the slice), multiplies them by the
# same input columns of the down projection and the ranks' partial sums are added. One gather of
# hidden-size rows per MLP instead of gathering 2 x intermediate + hidden columns.

def gate_up_rows(intermediate: int, lo: int, hi: int) -> torch.Tensor:
    """(2 * (hi - lo),) int64 rows of a fused gate_up weight (gate rows, then up rows, each
    `intermediate` long) holding intermediate columns [lo, hi) of the gate, then of the up
    projection: the slice's output keeps the fused layout the activation expects."""
    if not 0 <= lo <= hi <= intermediate:
        raise ValueError(f"columns [{lo}, {hi}) outside an intermediate size of {intermediate}")
    cols = torch.arange(lo, hi, dtype=torch.int64)
    return torch.cat([cols, cols + intermediate])


def sum_in_rank_order(gathered: torch.Tensor) -> torch.Tensor:
    """Every rank's partial sums, (world, rows, features) in rank order -> their sum, added in
    rank order: every rank gathers the same bits and adds them the same way, so all hold the same
    result (an all-reduce may add in a rank-dependent order)."""
    out = gathered[0].clone()
    for part in gathered[1:]:
        out += part
    return out

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

"""The exchange format of partial attention results: one row of bytes per query.

A rank's partials for the T queries of a step travel as one (T, F) uint8 buffer, so one collective
moves them: each row holds the query's H x D output in the attention's own dtype (bf16 on GPUs:
half the bytes of float32, and no precision lost, since the kernel wrote them in that dtype) and
then its H LSEs in float32 (an LSE rounded to bf16 would shift the merge weights by up to 0.4%).
Where the output part's length in bytes is not a multiple of 4 (odd H x D in a 2-byte dtype) the
float32 LSEs could not be viewed in place, so the outputs travel as float32 instead.

For float32 outputs the layout is the CPU backend's exchange buffer (H x D floats, then H LSEs),
which the CPU kernel fills in place rather than packing afterwards.

Pure tensor code: no communication, no host reads, CUDA-graph capturable.
"""

from __future__ import annotations

import torch

__all__ = ["empty_partial", "pack", "unpack", "wire_dtype"]


def wire_dtype(dtype: torch.dtype, h: int, d: int) -> torch.dtype:
    """The dtype the outputs of an (H, D) partial travel in."""
    if dtype in (torch.float16, torch.bfloat16) and (h * d) % 2 == 0:
        return dtype
    return torch.float32


def pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """out (T, H, D), lse (T, H) -> (T, F) uint8, F = H * D * size(wire dtype) + 4 * H."""
    t, h, d = out.shape
    wd = wire_dtype(out.dtype, h, d)
    ob = h * d * wd.itemsize
    buf = torch.empty((t, ob + 4 * h), dtype=torch.uint8, device=out.device)
    buf[:, :ob].view(wd).view(t, h, d).copy_(out)
    buf[:, ob:].view(torch.float32).copy_(lse)
    return buf


def unpack(gathered: torch.Tensor, rows: torch.Tensor, h: int, d: int, dtype: torch.dtype):
    """gathered (R, T, F) uint8, every rank's `pack` output by rank; rows (n,) int64 queries ->
    outs (R, n, H, D) in the wire dtype for `dtype`, lses (R, n, H) float32."""
    wd = wire_dtype(dtype, h, d)
    ob = h * d * wd.itemsize
    mine = gathered[:, rows]  # (R, n, F), a copy: contiguous
    r, n = mine.shape[:2]
    return mine[..., :ob].view(wd).view(r, n, h, d), mine[..., ob:].view(torch.float32)


def empty_partial(like: torch.Tensor, h: int) -> torch.Tensor:
    """(1, F) the packed partial of a rank holding nothing of a query (out = 0, lse = -inf), in
    the layout of `like` (X, F): `pack`'s bytes or the CPU kernel's float32 row. Both end with the
    H float32 LSEs."""
    row = like.new_zeros((1, like.shape[1]))
    row.view(torch.uint8)[:, -4 * h:].view(torch.float32).fill_(float("-inf"))
    return row

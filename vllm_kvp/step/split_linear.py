"""Linear layers split by output columns over the KV ranks, for shared steps.

Every KV rank holds the whole model. In a step that runs on every rank (a shared step, see
`step_policy`: small decode batches, one-owner and uneven steps) a large linear layer computes only
this rank's slice of its output columns for all the step's rows, and `comm.gather_columns` puts
the slices together: each rank reads 1/N of the layer's weights (what bounds a small step) and
does 1/N of its FLOPs (what bounds a prompt chunk that one rank owns). The layer learns which step
runs from the forward context (`step.current_step`).

Exactness. Every rank gathers the same slices, so all ranks hold the same bits whatever the GEMM
does. Whether those bits equal the unsplit layer's depends on the kernel: a column slice keeps each
output element's dot product whole (same inputs, same length), and on CPUs, where vLLM's kernels
are chosen per layer shape, `patches/cpu_linear_slices.py` builds each slice's kernel the way vLLM
builds the layer's, and the tests check the outputs are bit-identical. On GPUs cuBLAS may choose
another algorithm (tiling, split-K) for the narrower shape, so a slice can round differently from
the unsplit GEMM: results then differ from an unsplit run at the rounding level, as they do between
TP sizes.

Only layers with vLLM's unquantized linear method and at least `split_min_bytes` of weights are
split; the others (and every layer outside a shared step) run as vLLM runs them. A rank's
slice of a TP-sharded layer is a slice of its TP shard, so TP's own all-reduce is unaffected.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from vllm_kvp.engine import vllm_compat
from vllm_kvp.step import comm, current_step
from vllm_kvp.step.columns import column_bounds
from vllm_kvp.step.stats import STATS


class SplitLinearMethod:
    """Stands in for a layer's `quant_method`: its own columns in a shared step, the wrapped
    method otherwise (and for everything but `apply`)."""

    def __init__(self, inner: Any, bounds: list[int], kernel: Callable) -> None:
        self.inner = inner
        self.bounds = bounds
        # kernel(x2d, bias slice or None) -> (rows, this rank's columns)
        self.kernel = kernel
        self.lo, self.hi = bounds[comm.kvp_rank()], bounds[comm.kvp_rank() + 1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        step = current_step()
        if step is None or not step.shared or step.world < 2:
            return self.inner.apply(layer, x, bias)
        lead = x.shape[:-1]
        part = self.kernel(x.reshape(-1, x.shape[-1]),
                           None if bias is None else bias[self.lo:self.hi])
        STATS.split_linear_calls += 1
        return comm.gather_columns(part, self.bounds, step).view(*lead, self.bounds[-1])


def splittable(layer: torch.nn.Module, min_bytes: int) -> bool:
    """Whether a layer's output columns are split over the KV ranks: a vLLM linear layer with a
    loaded 2-D weight of at least `min_bytes` (the one rule, for the CPU slices built while loading
    and for the GPU views made after)."""
    from vllm.model_executor.layers.linear import LinearBase

    w = getattr(layer, "weight", None)
    return (isinstance(layer, LinearBase) and isinstance(w, torch.Tensor) and not w.is_meta
            and w.dim() == 2 and w.numel() * w.element_size() >= min_bytes)


def install(model: torch.nn.Module, world: int, min_bytes: int, cpu: bool) -> int:
    """Wrap the eligible linear layers of `model`; returns how many. On CPUs the slices were built
    while the weights loaded (vLLM then drops each layer's weight for its packed kernel): a layer
    without one stays whole."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    n = 0
    for layer in model.modules():
        if not isinstance(layer, LinearBase) or not isinstance(layer.quant_method,
                                                               UnquantizedLinearMethod):
            continue
        if cpu:
            captured = getattr(layer, "_kvp_column_slice", None)
            if captured is None:
                continue
            bounds, proxy = captured
            kernel = _cpu_kernel(proxy)
        else:
            if not splittable(layer, min_bytes):
                continue
            bounds = column_bounds(layer.weight.shape[0], world)
            kernel = _view_kernel(layer, layer.weight, bounds[comm.kvp_rank()],
                                  bounds[comm.kvp_rank() + 1])
        layer.quant_method = SplitLinearMethod(layer.quant_method, bounds, kernel)
        n += 1
    return n


def _cpu_kernel(proxy: torch.nn.Module) -> Callable:
    return lambda x, bias: proxy.cpu_linear(x, proxy.weight, bias)


def _view_kernel(layer: torch.nn.Module, weight: torch.Tensor, lo: int, hi: int) -> Callable:
    # vLLM's GEMM for this layer, on a view of the rows of the weight that make this rank's columns.
    gemm, rows = vllm_compat.unquantized_gemm(layer), weight[lo:hi]
    return lambda x, bias: gemm(layer, x, rows, bias)

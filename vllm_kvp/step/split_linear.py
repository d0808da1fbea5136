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

Gated MLPs split like a TP layer instead (`columns.gate_up_rows`): rank r computes its
intermediate columns of the gate and the up projection (no gather: the activation is elementwise
per column pair), then the down projection of those same input columns, and the ranks' partial
sums are gathered and added in rank order. That is one gather of hidden-size rows per MLP instead
of 2 x intermediate + hidden columns (measured on the bench model's one-owner 1k prompt chunks:
the gathers and their reassembly were a fifth of a shared step). The down projection's sum of N
partial dot products rounds differently from the unsplit GEMM (as TP's all-reduce does); every
rank still holds the same bits. Only MLPs vLLM builds as `gate_up_proj` (two equal fused outputs),
`act_fn` (an activation of the form act(gate) * up: `PAIRWISE_ACTIVATIONS`) and `down_proj` split
so; any other keeps its layers whole in shared steps.

Only layers with vLLM's unquantized linear method and at least `split_min_bytes` of weights are
split; the others (and every layer outside a shared step) run as vLLM runs them. A rank's
slice of a TP-sharded layer is a slice of its TP shard, so TP's own all-reduce is unaffected.

The lm_head (vLLM's unquantized vocab-parallel head, at least `split_min_bytes`) splits the same
way, by vocab columns, but in every step, whatever its kind: the logits are computed after the
final hidden states are on every rank, so every rank would otherwise multiply all of them by the
whole head, the largest single weight of many models. Whether a step's logits split is the step
policy's call for their row count (`StepPolicy.split_logits`): the gather must cost less than the
(N - 1)/N of the head it saves. The runner opens the window in which the head may split
(`logits_window`, around vLLM's `execute_model` and `sample_tokens`, where vLLM computes logits
and prompt logprobs); dummy and warm-up runs compute theirs outside it, whole.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from vllm_kvp.engine import vllm_compat
from vllm_kvp.step import comm, current_step, rank_context
from vllm_kvp.step.columns import column_bounds, gate_up_rows, sum_in_rank_order
from vllm_kvp.step.stats import STATS
from vllm_kvp.step_policy import LOGITS


def _split_step():
    """The current step if this rank computes only its slice of split layers in it (a shared
    step over several ranks), else None."""
    step = current_step()
    return step if step is not None and step.shared and step.world > 1 else None


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
        step = _split_step()
        if step is None:
            return self.inner.apply(layer, x, bias)
        lead = x.shape[:-1]
        part = self.kernel(x.reshape(-1, x.shape[-1]),
                           None if bias is None else bias[self.lo:self.hi])
        STATS.split_linear_calls += 1
        return comm.gather_columns(part, self.bounds, step).view(*lead, self.bounds[-1])


class GateUpSliceMethod(SplitLinearMethod):
    """A gated MLP's fused gate_up projection: in a shared step, this rank's intermediate columns
    of the gate then of the up projection, kept here (the activation runs on them, and the down
    projection takes them as its input columns)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        step = _split_step()
        if step is None:
            return self.inner.apply(layer, x, bias)
        if bias is not None:
            bias = bias[gate_up_rows(bias.shape[0] // 2, self.lo, self.hi).to(bias.device)]
        return self.kernel(x.reshape(-1, x.shape[-1]), bias).view(*x.shape[:-1], -1)


class DownSliceMethod(SplitLinearMethod):
    """A gated MLP's down projection: in a shared step its input is this rank's intermediate
    columns; their product with the same columns of the weight is this rank's partial sum, and
    the ranks' partial sums are gathered and added in rank order (then the bias, once)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        step = _split_step()
        if step is None:
            return self.inner.apply(layer, x, bias)
        lead = x.shape[:-1]
        part = self.kernel(x.reshape(-1, x.shape[-1]), None)
        STATS.split_linear_calls += 1
        out = sum_in_rank_order(comm.gather_partial_sums(part, step))
        if bias is not None:
            out += bias
        return out.view(*lead, out.shape[-1])


# Activations computing act(x[..., :d]) * x[..., d:] column by column (vLLM's classes): a slice of
# gate and up columns gives the same columns of the result.
PAIRWISE_ACTIVATIONS = ("SiluAndMul", "GeluAndMul", "FatreluAndMul")


def gated_mlp_part(layer: torch.nn.Module, min_bytes: int) -> tuple[str, str] | None:
    """("gate_up" or "down", the MLP's prefix) if `layer` is vLLM's fused gate_up projection (two
    equal outputs) or down projection of a gated MLP whose down weight has at least `min_bytes`
    (judged from the layer alone: while the weights load nothing else is at hand), else None."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    w = getattr(layer, "weight", None)
    prefix = getattr(layer, "prefix", "") or ""
    mlp, _, name = prefix.rpartition(".")
    if not isinstance(w, torch.Tensor) or w.is_meta or w.dim() != 2:
        return None
    if name == "gate_up_proj" and isinstance(layer, MergedColumnParallelLinear):
        sizes = list(getattr(layer, "output_sizes", []))
        if (len(sizes) == 2 and sizes[0] == sizes[1] and w.shape[0] % 2 == 0
                and w.numel() // 2 * w.element_size() >= min_bytes):
            return "gate_up", mlp
    elif name == "down_proj" and isinstance(layer, RowParallelLinear):
        if w.numel() * w.element_size() >= min_bytes:
            return "down", mlp
    return None


def cpu_mlp_slice(weight: torch.Tensor, role: str, lo: int, hi: int,
                  build: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    """A stand-in module holding rank [lo, hi)'s slice of a gated MLP's weight (the gate and up
    rows of those intermediate columns, or those input columns of the down projection), given
    vLLM's CPU kernel for that shape by `build`."""
    w = weight.detach()
    part = w[gate_up_rows(w.shape[0] // 2, lo, hi)] if role == "gate_up" else w[:, lo:hi]
    return _proxy(part, build)


def _install_gated_mlps(model: torch.nn.Module, min_bytes: int, cpu: bool) -> set[int]:
    """Split every eligible gated MLP of `model` like a TP layer; returns the ids of the layers
    wrapped (both of each MLP)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    done: set[int] = set()
    for mlp in model.modules():
        gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
        act = getattr(mlp, "act_fn", None)
        if (gate_up is None or down is None or type(act).__name__ not in PAIRWISE_ACTIVATIONS
                or not all(isinstance(getattr(layer, "quant_method", None),
                                      UnquantizedLinearMethod) for layer in (gate_up, down))):
            continue
        if cpu:
            a, b = (getattr(gate_up, "_kvp_mlp_slice", None),
                    getattr(down, "_kvp_mlp_slice", None))
            if a is None or b is None or a[0] != "gate_up" or b[0] != "down" or a[1] != b[1]:
                continue
            bounds = a[1]
            kernels = _cpu_kernel(a[2]), _cpu_kernel(b[2])
        else:
            parts = gated_mlp_part(gate_up, min_bytes), gated_mlp_part(down, min_bytes)
            if (None in parts or gate_up.weight.shape[0] != 2 * down.weight.shape[1]):
                continue
            bounds = column_bounds(down.weight.shape[1], comm.kvp_world_size())
            lo, hi = bounds[comm.kvp_rank()], bounds[comm.kvp_rank() + 1]
            kernels = (_view_kernel_rows(vllm_compat.unquantized_gemm(gate_up), gate_up,
                                         gate_up.weight, gate_up_rows(down.weight.shape[1], lo,
                                                                      hi)),
                       _view_kernel_cols(vllm_compat.unquantized_gemm(down), down, down.weight,
                                         lo, hi))
        gate_up.quant_method = GateUpSliceMethod(gate_up.quant_method, bounds, kernels[0])
        down.quant_method = DownSliceMethod(down.quant_method, bounds, kernels[1])
        done |= {id(gate_up), id(down)}
    return done


# The step whose logits may be computed split now: a callable giving it, set by the runner around
# the calls in which vLLM computes a step's logits (None outside them).
_LOGITS_STEP: Callable[[], Any] | None = None


@contextlib.contextmanager
def logits_window(step_of_call: Callable[[], Any]) -> Iterator[None]:
    """Within this block, the lm_head may split the logits of the step `step_of_call()` returns
    (read when the logits are computed, so the step may be built inside the block)."""
    global _LOGITS_STEP
    outer, _LOGITS_STEP = _LOGITS_STEP, step_of_call
    try:
        yield
    finally:
        _LOGITS_STEP = outer


class SplitLogitsMethod(SplitLinearMethod):
    """Stands in for the lm_head's `quant_method`: in a step's logits window, and when the step
    policy says so for that many rows, this rank's vocab columns and one all-gather; otherwise
    (and for the embedding lookup of a tied head) the wrapped method."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        step = _LOGITS_STEP() if _LOGITS_STEP is not None else None
        x2 = x.reshape(-1, x.shape[-1])
        if (step is None or step.world < 2
                or not rank_context().policy.split_logits(x2.shape[0])):
            return self.inner.apply(layer, x, bias)
        part = self.kernel(x2, None if bias is None else bias[self.lo:self.hi])
        STATS.record_logits(x2.shape[0])
        out = comm.gather_columns(part, self.bounds, step, LOGITS)
        return out.view(*x.shape[:-1], self.bounds[-1])


def install_logits(model: torch.nn.Module, min_bytes: int, cpu: bool) -> int:
    """Wrap the model's lm_head (vLLM's unquantized vocab-parallel head with at least `min_bytes`
    of weights); returns its vocab columns on this TP rank, or 0 if it stays whole (none on this
    pipeline stage, quantized, or small). vLLM keeps the head's weight on CPUs too (it is also
    the embedding table when tied), so the slice's kernel is built here, as vLLM builds the
    head's."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod, VocabParallelEmbedding)

    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if (not isinstance(head, VocabParallelEmbedding)
            or type(head.quant_method) is not UnquantizedEmbeddingMethod
            or not isinstance(w, torch.Tensor) or w.is_meta or w.dim() != 2
            or w.numel() * w.element_size() < min_bytes):
        return 0
    world = comm.kvp_world_size()
    bounds = column_bounds(w.shape[0], world)
    lo, hi = bounds[comm.kvp_rank()], bounds[comm.kvp_rank() + 1]
    if cpu:
        kernel = _cpu_kernel(cpu_slice(w, lo, hi, vllm_compat.build_cpu_gemm))
    else:
        kernel = _view_kernel(vllm_compat.head_gemm(), head, w, lo, hi)
    head.quant_method = SplitLogitsMethod(head.quant_method, bounds, kernel)
    return w.shape[0]


def splittable(layer: torch.nn.Module, min_bytes: int) -> bool:
    """Whether a layer's output columns are split over the KV ranks: a vLLM linear layer with a
    loaded 2-D weight of at least `min_bytes` (the one rule, for the CPU slices built while loading
    and for the GPU views made after)."""
    from vllm.model_executor.layers.linear import LinearBase

    w = getattr(layer, "weight", None)
    return (isinstance(layer, LinearBase) and isinstance(w, torch.Tensor) and not w.is_meta
            and w.dim() == 2 and w.numel() * w.element_size() >= min_bytes)


def install(model: torch.nn.Module, world: int, min_bytes: int, cpu: bool) -> int:
    """Wrap the eligible linear layers of `model` (gated MLPs' as pairs); returns how many. On CPUs the slices were built
    while the weights loaded (vLLM then drops each layer's weight for its packed kernel): a layer
    without one stays whole."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    paired = _install_gated_mlps(model, min_bytes, cpu)
    n = len(paired)
    for layer in model.modules():
        if (not isinstance(layer, LinearBase) or id(layer) in paired
                or not isinstance(layer.quant_method, UnquantizedLinearMethod)):
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
            kernel = _view_kernel(vllm_compat.unquantized_gemm(layer), layer, layer.weight,
                                  bounds[comm.kvp_rank()], bounds[comm.kvp_rank() + 1])
        layer.quant_method = SplitLinearMethod(layer.quant_method, bounds, kernel)
        n += 1
    return n


def cpu_slice(weight: torch.Tensor, lo: int, hi: int,
              build: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    """A stand-in module holding a copy of rows [lo, hi) of `weight` (output columns), given
    vLLM's CPU kernel for that shape by `build` (vLLM's dispatch, as for the layer itself)."""
    return _proxy(weight.detach()[lo:hi], build)


def _proxy(part: torch.Tensor, build: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    proxy = torch.nn.Module()
    proxy.weight = torch.nn.Parameter(part.contiguous().clone(), requires_grad=False)
    build(proxy)
    return proxy


def _cpu_kernel(proxy: torch.nn.Module) -> Callable:
    return lambda x, bias: proxy.cpu_linear(x, proxy.weight, bias)


def _view_kernel(gemm: Callable, layer: torch.nn.Module, weight: torch.Tensor, lo: int,
                 hi: int) -> Callable:
    # vLLM's GEMM for this layer, on a view of the rows of the weight that make this rank's columns.
    rows = weight[lo:hi]
    return lambda x, bias: gemm(layer, x, rows, bias)


def _view_kernel_rows(gemm: Callable, layer: torch.nn.Module, weight: torch.Tensor,
                      rows: torch.Tensor) -> Callable:
    # Rows that are not one range (a gated MLP's gate and up slices): one GEMM on each range's
    # view, outputs side by side (no copy of the weight).
    half = rows.shape[0] // 2
    parts = [(int(r[0]), int(r[-1]) + 1) for r in (rows[:half], rows[half:]) if r.numel()]
    return lambda x, bias: torch.cat([gemm(layer, x, weight[a:b], None if bias is None else
                                           bias[half * i:half * (i + 1)])
                                      for i, (a, b) in enumerate(parts)], dim=-1)


def _view_kernel_cols(gemm: Callable, layer: torch.nn.Module, weight: torch.Tensor, lo: int,
                      hi: int) -> Callable:
    # Input columns [lo, hi) of the weight: a strided view, which GEMMs take as a leading
    # dimension (no copy).
    cols = weight[:, lo:hi]
    return lambda x, bias: gemm(layer, x, cols, bias)

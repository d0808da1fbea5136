"""CPU: build each large linear layer's column-slice kernel while the weights load.

Why: `split_linear` has each KV rank compute its slice of a large linear layer's output columns in
shared steps. On CPUs vLLM 0.32 turns every unquantized linear layer's weight into a packed
kernel (oneDNN, sgl or zentorch, chosen by the layer's shape) in `dispatch_cpu_unquantized_gemm`
and then drops the weight (`remove_weight=True`), so after loading there is no weight left to
slice, and no extension point runs in between.
What: while `KVPWorker.load_model` runs (and only then), vllm.model_executor.layers.utils'
`dispatch_cpu_unquantized_gemm` is wrapped: for a `LinearBase` layer whose 2-D weight has at least
`min_bytes`, a copy of this rank's rows of the weight (its output columns) first goes through the
same function on a stand-in module, so the slice gets vLLM's own kernel for its shape; the result is
left on the layer as `_kvp_column_slice`. A gated MLP's gate_up and down projections (see
`split_linear.gated_mlp_part`: named so by vLLM's model, the down projection's weight at least
`min_bytes`) get their TP-like slices instead, left as `_kvp_mlp_slice`: rank r's intermediate
columns of the gate and of the up projection, and the same input columns of the down projection.
The layer itself is then dispatched unchanged. Memory: 1/N of those weights more per rank.
Remove when: vLLM keeps the unpacked weight of CPU linear layers, or offers a hook after loading
that still sees it (then `split_linear.install` slices views, as it does on GPUs).
"""

from __future__ import annotations

import torch


def capture_column_slices(rank: int, world: int, min_bytes: int):
    """A context manager (`vllm_compat.wrapped_cpu_gemm_dispatch`) active while the weights load."""
    from vllm_kvp.engine.vllm_compat import wrapped_cpu_gemm_dispatch
    from vllm_kvp.step.columns import column_bounds
    from vllm_kvp.step.split_linear import cpu_mlp_slice, cpu_slice, gated_mlp_part, splittable

    gate_up_width: dict[str, int] = {}  # MLP prefix -> intermediate columns of its gate_up slice

    def make(original):
        def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
            build = lambda p: original(p, remove_weight=remove_weight)  # noqa: E731
            part = gated_mlp_part(layer, min_bytes)
            # vLLM processes a module's layers in definition order: gate_up before down.
            if part is not None and (part[0] == "gate_up" or gate_up_width.get(part[1])
                                     == layer.weight.shape[1]):
                role, mlp = part
                width = (layer.weight.shape[0] // 2 if role == "gate_up"
                         else layer.weight.shape[1])
                gate_up_width[mlp] = width
                bounds = column_bounds(width, world)
                layer._kvp_mlp_slice = (role, bounds, cpu_mlp_slice(
                    layer.weight, role, bounds[rank], bounds[rank + 1], build))
            elif splittable(layer, min_bytes):
                bounds = column_bounds(layer.weight.shape[0], world)
                proxy = cpu_slice(layer.weight, bounds[rank], bounds[rank + 1], build)
                layer._kvp_column_slice = (bounds, proxy)
            return original(layer, remove_weight)
        return dispatch

    return wrapped_cpu_gemm_dispatch(make)

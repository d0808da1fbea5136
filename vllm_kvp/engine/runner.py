"""Owner computes, on vLLM's model runner: each rank runs the model on the tokens it owns.

vLLM's runner prepares the whole step (all T tokens) on every KV rank, as usual. The one seam it
documents for changing how the model runs, `_model_forward`, is where each rank narrows the step
to its own rows (the tokens whose KV slots it owns, see `routing.StepRouting`): it selects their ids and
positions, points the forward context's slot mapping at them, runs the model, and puts the final
hidden states of all ranks back in vLLM's token order. Logits, sampling and logprobs then run
unchanged, and identically on every rank, because every rank holds the same gathered bits.

Attention layers see only local rows too; the KVP backend exchanges the queries and partial outputs
of requests whose KV spans ranks inside each layer. Dummy, profile and warm-up runs call the model directly, not through
`_model_forward`, and carry no step: every rank runs them whole, without collectives.

The step (`step.Step`, built once by the KVP metadata builder) is published in the forward context
here, so the layers that act on it (attention, split linear layers) read the same object.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_kvp.engine import vllm_compat
from vllm_kvp.step import Step, comm, publish, split_linear, step_of
from vllm_kvp.step.stats import STATS
from vllm_kvp.step_policy import HIDDEN


class KVPRunnerMixin:
    """Mixed into the worker's model runner class by `install_owner_computes`."""

    _kvp_step: Step | None = None  # the step of the latest forward (its logits may split)

    def _update_states(self, scheduler_output) -> Any:
        # A request recomputed after a worker restart (engine/recovery.py) arrives as a new
        # request carrying the tokens it had generated; it enters the batch with them.
        with vllm_compat.replayed_outputs(self, scheduler_output):
            return super()._update_states(scheduler_output)

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        # vLLM computes the step's logits in here (and its prompt logprobs' in sample_tokens):
        # the lm_head may split them over the KV ranks (`split_linear.logits_window`).
        self._kvp_step = None
        with split_linear.logits_window(lambda: self._kvp_step):
            return super().execute_model(*args, **kwargs)

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        with split_linear.logits_window(lambda: self._kvp_step):
            return super().sample_tokens(*args, **kwargs)

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                       inputs_embeds=None, **model_kwargs: Any) -> Any:
        step = step_of(vllm_compat.forward_attn_metadata())
        publish(step)
        self._kvp_step = step
        if step is not None:
            STATS.record_step(step.kind, step.routing.counts, step.routing.span_counts,
                              step.num_tokens, None if step.scope is None else step.scope.send)
        if step is None or step.world == 1:
            if step is not None:
                STATS.tokens_computed += step.num_tokens
            return super()._model_forward(input_ids=input_ids, positions=positions,
                                          intermediate_tensors=intermediate_tensors,
                                          inputs_embeds=inputs_embeds, **model_kwargs)
        if model_kwargs:
            raise NotImplementedError(
                f"vllm_kvp cannot split a step whose model takes {sorted(model_kwargs)}")
        r = step.routing
        if step.shared:
            # Every rank runs the whole step; the forward context's slot mapping is vLLM's, each
            # rank writes only the slots it holds, and split linear layers compute only this
            # rank's columns.
            out = super()._model_forward(input_ids=input_ids, positions=positions,
                                         intermediate_tensors=intermediate_tensors,
                                         inputs_embeds=inputs_embeds)
            STATS.tokens_computed += r.num_local
            STATS.tokens_shared += r.num_tokens - r.num_local
            if not isinstance(out, torch.Tensor):
                return out
            mine = out[r.row_idx]  # the owner's rows are the ones every rank keeps
        elif step.local and r.num_local == 0 and self._kvp_single_stage():
            # Nothing in a local step needs this rank until the hidden-state gather: no layer
            # exchanges anything, so it sends a placeholder row instead of running a dummy one
            # (on a shared CPU host its cores go to the ranks that compute).
            mine = self._kvp_placeholder_row()
        else:
            mine = self._run_own_rows(step, input_ids, positions, intermediate_tensors,
                                      inputs_embeds)
            STATS.tokens_computed += r.num_local
            if not isinstance(mine, torch.Tensor):  # IntermediateTensors for the next stage
                return mine
        hidden = comm.gather_rows(mine, step, HIDDEN)  # (T, hidden) in vLLM order
        total = positions.shape[-1]  # vLLM may pad the step; padded rows are never read
        if total == r.num_tokens:
            return hidden
        full = hidden.new_zeros((total, hidden.shape[-1]))
        full[: r.num_tokens] = hidden
        return full

    def _kvp_single_stage(self) -> bool:
        from vllm.distributed import get_pp_group

        return get_pp_group().world_size == 1  # a stage would still owe the next its rows

    def _kvp_placeholder_row(self) -> torch.Tensor:
        """(1, hidden) zeros in the model's dtype: a rank owning no row's share of a gather."""
        row = getattr(self, "_kvp_placeholder", None)
        if row is None:
            mc = self.vllm_config.model_config
            row = torch.zeros((1, mc.get_hidden_size()), dtype=mc.dtype, device=self.device)
            self._kvp_placeholder = row
        return row

    def _run_own_rows(self, step: Step, input_ids, positions, intermediate_tensors,
                      inputs_embeds):
        """The model on this rank's rows of a routed or local step only; the layers write K/V
        through the forward context's slot mapping, narrowed to one slot per row run."""
        idx = step.routing.row_idx
        with vllm_compat.narrowed_forward_context(step.routing.row_slots, idx):
            return self.model(
                input_ids=None if input_ids is None else input_ids[idx],
                positions=positions[..., idx],
                intermediate_tensors=intermediate_tensors,
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[idx],
            )

    def sync_and_gather_intermediate_tensors(self, num_tokens: int, intermediate_tensors,
                                             sync_self: bool):
        """A pipeline stage receives only its replica's own rows (not `num_tokens`) from the
        stage before it; they are used as received."""
        if comm.kvp_world_size() == 1 or intermediate_tensors is None:
            return super().sync_and_gather_intermediate_tensors(num_tokens, intermediate_tensors,
                                                                 sync_self)
        from vllm.sequence import IntermediateTensors

        return IntermediateTensors({k: v for k, v in intermediate_tensors.items()})


def install_owner_computes(runner: Any) -> None:
    """Give an already built model runner the KVP mixin (it adds methods only, so swapping the
    class after __init__ is safe, and vLLM's own runner classes stay untouched)."""
    vllm_compat.swap_runner_class(runner, KVPRunnerMixin)

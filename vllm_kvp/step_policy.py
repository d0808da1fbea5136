"""The step policy: which kind of step runs, and what each of its exchanges sends (pure Python).

One function of a step's per-rank token counts decides its kind; one function lists the
collectives the step issues over the KVP group and the bytes each rank contributes to each. The
runtime routes steps with the first and records its exchanges under the second's kinds; the
planner's cost model predicts with both, so a prediction and the plugin's counters (`kvp_stats`)
count the same collectives and bytes (tests/e2e/test_predicted_exchanges.py checks they are equal).

Step kinds (under owner computes every token is computed by the rank that owns its KV slot):
  "local": no request of the step spans ranks (each one's KV is all on the rank that computes its
      new tokens), so each rank runs its own tokens and attends them over its own KV: no
      attention layer exchanges anything. What most requests of a long-context service need.
  "routed": each rank runs the model on its own tokens; in every attention layer the queries of
      the requests that span ranks are all-gathered and every rank's partials of those queries
      are all-gathered. The rows of local requests stay on their rank, as in a local step.
  "shared": every rank runs every token of the step. The queries are already everywhere, so each
      attention layer gathers only the partials; each split linear layer (see `split_linear`)
      computes 1/N of its output columns for all rows and gathers the columns. A step one rank
      owns whole (a batch-1 decode, a prompt chunk on one rank) is shared: nobody runs more rows
      than the owner would. With split layers, small steps (weight-read bound: each rank then
      reads 1/N of those weights) and uneven ones (the busiest rank would set the time) are too.
Whatever the kind, the final hidden states of the owners' rows are all-gathered once per step (on
the last pipeline stage): every rank samples (vLLM keeps each request's output tokens in every
worker's input batch) and must sample from the same bits.

Local or shared, when both apply: a step whose requests are all local but that the shared rule
picks (one owner, small or uneven, with split layers) is shared. There each rank reads 1/N of the
split layers' weights, which is what bounds a decode step of a large model; without split layers a
shared step only adds collectives, so local wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

LOCAL, ROUTED, SHARED = "local", "routed", "shared"
STEP_KINDS = (LOCAL, ROUTED, SHARED)
# Exchange kinds, the names of their byte counters in `kvp_stats()` (`<kind>_bytes`).
QUERIES, PARTIALS, HIDDEN, COLUMNS = "query", "partial", "hidden", "column"
EXCHANGE_KINDS = (QUERIES, PARTIALS, HIDDEN, COLUMNS)
LSE_BYTES = 4  # LSEs always travel as float32 (a bf16 LSE would shift merge weights by ~0.4%)


@dataclass(frozen=True)
class StepPolicy:
    """world: KV ranks; share_steps: `kvp.step_mode` "auto" (else every step is routed);
    split_layers: the model has linear layers split by columns over the KV ranks (decided from
    the model config, so every pipeline stage and rank agrees); split_step_tokens: steps of at
    most this many tokens are shared when there are split layers."""

    world: int
    share_steps: bool = True
    split_layers: bool = False
    split_step_tokens: int = 128

    def kind(self, counts: Sequence[int], spans: bool = True) -> str:
        """The kind of a step whose ranks own `counts` tokens (padding tokens belong to none);
        `spans`: some request of the step has KV on more than one rank. step_mode "owner"
        (`share_steps` False) routes every step."""
        total, busiest = sum(counts), max(counts, default=0)
        if not self.share_steps or self.world < 2 or total == 0:
            return ROUTED
        small = total <= self.split_step_tokens
        uneven = 2 * busiest * self.world >= 3 * total  # the busiest owns >= 1.5x its share
        split_shares = self.split_layers and (busiest == total or small or uneven)
        if not spans:
            return SHARED if split_shares else LOCAL
        return SHARED if busiest == total or split_shares else ROUTED


@dataclass(frozen=True)
class ExchangeShape:
    """What the sizes of one KV rank's exchanges depend on (per TP rank: heads are its shard).

    heads, head_dim: query heads and head size of one attention layer; hidden: hidden size;
    act_bytes: bytes of an activation element (queries, hidden states, columns); out_bytes: bytes
    of a partial output element on the wire (`ops.partials.wire_dtype`: float32 on CPU, the
    attention dtype on GPU); attn_layers: attention layers on this pipeline stage; split_widths:
    output features of each split linear layer call of one forward on this stage, in order;
    last_stage: this stage returns the final hidden states."""

    heads: int
    head_dim: int
    hidden: int
    act_bytes: int
    out_bytes: int
    attn_layers: int
    split_widths: tuple[int, ...] = ()
    last_stage: bool = True

    @property
    def partial_row_bytes(self) -> int:
        return self.heads * (self.head_dim * self.out_bytes + LSE_BYTES)


def row_span(counts: Sequence[int]) -> int:
    """Rows each rank contributes to a row gather: the most any rank owns (at least 1: a rank
    owning nothing runs one dummy row)."""
    return max(max(counts, default=0), 1)


def exchanges(kind: str, counts: Sequence[int], tokens: int, shape: ExchangeShape,
              world: int, span_counts: Sequence[int] | None = None) -> dict[str, tuple[int, int]]:
    """The KVP collectives of one step on one rank, by exchange kind: (collectives, bytes this
    rank sends into them). `tokens`: the step's T tokens; `counts`: tokens each rank owns;
    `span_counts`: of those, the tokens of requests spanning ranks (None: all of them). A routed
    step exchanges the queries and partials of spanning tokens only; a shared step the partials
    of all T. Nothing is exchanged with one KV rank."""
    if world < 2:
        return {}
    span_counts = counts if span_counts is None else span_counts
    t_max = row_span(counts)
    out = {}
    if kind == ROUTED and any(span_counts):
        q = max(span_counts) * shape.heads * shape.head_dim * shape.act_bytes
        out[QUERIES] = (shape.attn_layers, shape.attn_layers * q)
        out[PARTIALS] = (shape.attn_layers,
                         shape.attn_layers * sum(span_counts) * shape.partial_row_bytes)
    elif kind == SHARED:
        out[PARTIALS] = (shape.attn_layers, shape.attn_layers * tokens * shape.partial_row_bytes)
        if shape.split_widths:
            sent = sum(tokens * math.ceil(w / world) * shape.act_bytes
                       for w in shape.split_widths)
            out[COLUMNS] = (len(shape.split_widths), sent)
    if shape.last_stage:
        out[HIDDEN] = (1, t_max * shape.hidden * shape.act_bytes)
    return out

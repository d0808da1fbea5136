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
      are all-gathered (or, in a *scoped* step, `step.scope`, each query goes only to the ranks
      holding KV of its request and partials come back only from them, with all-to-alls:
      `StepPolicy.scoped`). The rows of local requests stay on their rank, as in a local step.
  "shared": every rank runs every token of the step. The queries are already everywhere, so each
      attention layer gathers only the partials; each split linear layer (see `split_linear`)
      computes 1/N of its output columns for all rows and gathers the columns.
Whatever the kind, the final hidden states of the owners' rows are all-gathered once per step (on
the last pipeline stage): every rank samples (vLLM keeps each request's output tokens in every
worker's input batch) and must sample from the same bits. The logits are then computed from those
bits, whatever the kind, either whole on every rank or split by vocab columns (each rank 1/N of
the lm_head, one more all-gather), whichever the costs predict faster for their rows
(`split_logits`).

Which kind: the cost model's prediction (`StepCosts`, built by `planner.cost_model.step_costs`
from the model's shape and the hardware's calibrated constants) of the step on its owners (local,
or routed when a request spans ranks) against the step shared. Sharing costs every rank all T
rows and the column gathers; it saves reading (N - 1)/N of the split layers' weights (what a
decode batch is bound by), the busiest rank's excess rows in an uneven step, and a spanning
step's query gathers. So a step one rank owns whole (a batch-1 decode, a prompt chunk on one
rank) is shared when the model has split layers, or when it spans (no query to gather); small
and uneven steps are shared when the weights saved outweigh the columns gathered; balanced steps
of many tokens stay on their owners. docs/design.md ("Step kinds") gives the measured break-even
points. `kvp.split_step_tokens` replaces the costs with the fixed rule of earlier versions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

LOCAL, ROUTED, SHARED = "local", "routed", "shared"
STEP_KINDS = (LOCAL, ROUTED, SHARED)
# Exchange kinds, the names of their byte counters in `kvp_stats()` (`<kind>_bytes`).
QUERIES, PARTIALS, HIDDEN, COLUMNS, LOGITS = "query", "partial", "hidden", "column", "logits"
EXCHANGE_KINDS = (QUERIES, PARTIALS, HIDDEN, COLUMNS, LOGITS)
FIXED_STEP_TOKENS = 128  # the fixed rule's small-step limit (no cost model, or none readable)
LSE_BYTES = 4  # LSEs always travel as float32 (a bf16 LSE would shift merge weights by ~0.4%)


@dataclass(frozen=True)
class StepPolicy:
    """world: KV ranks; share_steps: `kvp.step_mode` "auto" (else every step is routed);
    split_layers: the model has linear layers split by columns over the KV ranks (decided from
    the model config, so every pipeline stage and rank agrees); costs: the cost model's step
    times (`StepCosts`), from which a step's kind is chosen; split_step_tokens: None, or the fixed
    rule instead of the costs (steps of at most this many tokens shared when there are split
    layers; also the rule when the model's shape is unknown, with 128); logits_width: vocab
    columns of the lm_head (per TP rank) when it is large enough to split (0: never split, see
    `split_logits`)."""

    world: int
    share_steps: bool = True
    split_layers: bool = False
    split_step_tokens: int | None = None
    costs: "StepCosts | None" = None
    logits_width: int = 0
    exchange_scope: str = "auto"

    @property
    def may_scope(self) -> bool:
        """A routed step may send queries only to the ranks holding their KV (`scoped`): with
        more than two ranks (with two, a spanning request is on both) unless `kvp.exchange_scope`
        is "all"."""
        return self.world > 2 and self.exchange_scope != "all"

    def may_scope_step(self, span_counts: Sequence[int]) -> bool:
        """Whether a routed step with these spanning tokens per owner could be scoped at all:
        checked before the step's send matrix is built (a host read). Under "auto", not when the
        all-to-alls' latency alone exceeds the all-gathers' whole cost (small steps on a host
        whose all-gathers run over shared memory)."""
        if not self.may_scope:
            return False
        if self.exchange_scope == "holders":
            return True
        return (self.costs is not None
                and self.costs.scoped_floor() < self.costs.gathered_seconds(span_counts))

    def scoped(self, send: Sequence[Sequence[int]], span_counts: Sequence[int]) -> bool:
        """Whether a routed step whose owners send `send[o][p]` spanning queries to the ranks
        holding their KV (`step.scope`; diagonal: each owner's own) exchanges them with
        all-to-alls rather than all-gathers. "holders": always; "auto": when the costs predict
        the all-to-alls faster (their latency per peer against the bytes an all-gather would
        move to ranks holding nothing of the queries); without costs, never."""
        if not self.may_scope:
            return False
        if self.exchange_scope == "holders":
            return True
        if self.costs is None:
            return False
        return self.costs.scoped_seconds(send) < self.costs.gathered_seconds(span_counts)

    def split_logits(self, rows: int) -> bool:
        """Whether the logits of `rows` hidden states are computed split by vocab columns over
        the KV ranks (each rank 1/N of the lm_head's columns, then one all-gather) rather than
        whole on every rank. Every rank holds the same final hidden states whatever the step's
        kind, so this is independent of it. By the costs: when reading and multiplying
        (N - 1)/N of the lm_head costs more than the gather of the logits (a batch-1 decode of a
        small vocabulary keeps it whole); without costs the head stays whole."""
        if not (self.share_steps and self.logits_width and self.world > 1 and rows > 0
                and self.costs is not None):
            return False
        return self.costs.logits_seconds(rows, True) < self.costs.logits_seconds(rows, False)

    def kind(self, counts: Sequence[int], spans: bool = True,
             span_counts: Sequence[int] | None = None, tokens: int | None = None) -> str:
        """The kind of a step whose ranks own `counts` tokens (padding tokens belong to none);
        `spans`: some request of the step has KV on more than one rank; `span_counts`: the
        tokens of such requests each rank owns (None: all of them); `tokens`: the step's T
        (None: the sum of `counts`). step_mode "owner" (`share_steps` False) routes every step.

        With costs: the kind the cost model predicts faster, local (routed when a request spans)
        or shared."""
        total, busiest = sum(counts), max(counts, default=0)
        if not self.share_steps or self.world < 2 or total == 0:
            return ROUTED
        own = ROUTED if spans else LOCAL
        if self.costs is not None and self.split_step_tokens is None:
            tokens = total if tokens is None else tokens
            if not spans:
                span_counts = [0] * len(counts)
            shared = self.costs.seconds(SHARED, counts, span_counts, tokens)
            owned = self.costs.seconds(own, counts, span_counts, tokens)
            if shared != owned:
                return SHARED if shared < owned else own
            # a tie (constants that price nothing, e.g. free links): the fixed rule decides
        limit = FIXED_STEP_TOKENS if self.split_step_tokens is None else self.split_step_tokens
        small = total <= limit
        uneven = 2 * busiest * self.world >= 3 * total  # the busiest owns >= 1.5x its share
        split_shares = self.split_layers and (busiest == total or small or uneven)
        if not spans:
            return SHARED if split_shares else LOCAL
        return SHARED if busiest == total or split_shares else ROUTED

    def break_even(self, case: str, limit: int = 1 << 17) -> int:
        """The most tokens a step of `case` has and is still shared (0: never): "balanced" (every
        rank owns T/N, nothing spans: a decode batch under onboard), "spanning" (the same, every
        request spans: striped), "one-owner" (one rank owns all T, nothing spans: a prompt chunk
        on one rank). Found by doubling, then bisection (the kind is shared below one point)."""
        def shared(t: int) -> bool:
            if case == "one-owner":
                counts, spans = [t] + [0] * (self.world - 1), False
            else:
                counts, spans = [t // self.world] * self.world, case == "spanning"
            return self.kind(counts, spans, tokens=sum(counts)) == SHARED

        step = self.world
        if self.world < 2 or not shared(step):
            return 0
        low = step
        while low * 2 <= limit and shared(low * 2):
            low *= 2
        high = min(low * 2, (limit // step + 1) * step)  # multiples of the rank count
        while high - low > step:  # low shared, high not (or past the limit)
            mid = low + (high - low) // step // 2 * step
            low, high = (mid, high) if shared(mid) else (low, mid)
        return low

    def describe(self, device: str = "") -> str:
        """One line for the start-up log: how step kinds are chosen here."""
        if not self.share_steps or self.world < 2:
            return "every step routed"
        if self.costs is None or self.split_step_tokens is not None:
            limit = (FIXED_STEP_TOKENS if self.split_step_tokens is None
                     else self.split_step_tokens)
            rule = f"fixed rule, {limit} tokens"
        else:
            rule = f"cost model ({device})" if device else "cost model"
        return (f"{rule}; split layers: {'yes' if self.split_layers else 'no'}; shared up to "
                + ", ".join(f"{self.break_even(c)} tokens {c}"
                                            for c in ("balanced", "spanning", "one-owner")))


@dataclass(frozen=True)
class StepCosts:
    """Predicted seconds of one step of each kind on one KV rank: the cost model's terms
    (`planner.cost_model.step_costs` builds them from the model's shape and the hardware's
    calibrated constants, the ones `vllm-kvp plan` predicts with), reduced to what differs
    between kinds. Attention reads the same KV in every kind (each rank its own shard), so it is
    left out; so is the per-step overhead, paid once whatever the kind.

    weight_s: reading every weight of the stage once; split_weight_s: the split layers' share of
    it; row_s: the dense FLOPs of one row; split_row_s: the split layers' share of it; sharing:
    how much longer work takes with the cores shared (`cost_model.core_sharing`; 1 on GPUs);
    hop_s: latency of one hop of a collective; byte_s: seconds per byte received;
    logits_weight_s, logits_row_s: reading the lm_head once, and its FLOPs for one row."""

    world: int
    shape: "ExchangeShape"
    weight_s: float
    split_weight_s: float
    row_s: float
    split_row_s: float
    sharing: float = 1.0
    hop_s: float = 0.0
    byte_s: float = 0.0
    logits_weight_s: float = 0.0
    logits_row_s: float = 0.0
    a2a_hop_s: float = 0.0
    a2a_byte_s: float = 0.0

    def _query_bytes(self) -> int:
        return self.shape.heads * self.shape.head_dim * self.shape.act_bytes

    def gathered_seconds(self, span_counts: Sequence[int]) -> float:
        """The query and partial all-gathers of a routed step's attention layers (ring: N - 1
        hops, N - 1 ranks' contributions received)."""
        n, layers = self.world, self.shape.attn_layers
        sent = (max(span_counts, default=0) * self._query_bytes()
                + sum(span_counts) * self.shape.partial_row_bytes)
        return layers * (n - 1) * (2 * self.hop_s + sent * self.byte_s)

    def scoped_floor(self) -> float:
        """`scoped_seconds` of a step sending nothing: the all-to-alls' latency."""
        return self.shape.attn_layers * 2 * (self.world - 1) * (self.a2a_hop_s or self.hop_s)

    def scoped_seconds(self, send: Sequence[Sequence[int]]) -> float:
        """The same exchanges as all-to-alls to the ranks holding the queries' KV: per layer, two
        of N - 1 peers each (`a2a_hop_s` a peer; 0: the all-gathers' hop) and the busiest rank's
        received queries and partials (`a2a_byte_s` a byte; 0: the all-gathers' rate)."""
        n, layers = self.world, self.shape.attn_layers
        hop, byte_s = self.a2a_hop_s or self.hop_s, self.a2a_byte_s or self.byte_s
        recv = max(sum(send[o][r] for o in range(n) if o != r) * self._query_bytes()
                   + sum(send[r][p] for p in range(n) if p != r) * self.shape.partial_row_bytes
                   for r in range(n))
        return layers * (2 * (n - 1) * hop + recv * byte_s)

    def logits_seconds(self, rows: int, split: bool) -> float:
        """The logits of `rows` hidden states on one rank: the whole lm_head, or 1/N of its
        columns and a ring all-gather of everyone's."""
        work = self.sharing * (self.logits_weight_s + rows * self.logits_row_s)
        if not split:
            return work
        n = self.world
        sent = rows * math.ceil(self.shape.logits_width / n) * self.shape.act_bytes
        return work / n + (n - 1) * (self.hop_s + sent * self.byte_s)

    def seconds(self, kind: str, counts: Sequence[int], span_counts: Sequence[int] | None,
                tokens: int) -> float:
        """A step of `kind`: the busiest rank's dense work (a shared step: every row, with 1/N
        of the split layers' columns and weights) plus its collectives as ring all-gathers
        (N - 1 hops and N - 1 ranks' bytes received each)."""
        n = self.world
        if kind == SHARED:
            cut = 1 - 1 / n
            work = (self.weight_s - cut * self.split_weight_s
                    + tokens * (self.row_s - cut * self.split_row_s))
        else:
            work = self.weight_s + max(counts, default=0) * self.row_s
        comm = sum(count * self.hop_s + sent * self.byte_s
                   for count, sent in exchanges(kind, counts, tokens, self.shape, n,
                                                span_counts).values())
        return self.sharing * work + (n - 1) * comm


@dataclass(frozen=True)
class ExchangeShape:
    """What the sizes of one KV rank's exchanges depend on (per TP rank: heads are its shard).

    heads, head_dim: query heads and head size of one attention layer; hidden: hidden size;
    act_bytes: bytes of an activation element (queries, hidden states, columns); out_bytes: bytes
    of a partial output element on the wire (`ops.partials.wire_dtype`: float32 on CPU, the
    attention dtype on GPU); attn_layers: attention layers on this pipeline stage; split_widths:
    output features of each split linear layer call of one forward on this stage, in order;
    last_stage: this stage returns the final hidden states; logits_width: vocab columns of the
    lm_head per TP rank when it splits over the KV ranks (0: it never does); sum_widths: output
    features of each gated MLP's down projection on this stage whose partial sums are gathered
    whole (`split_linear`: the MLP split like a TP layer)."""

    heads: int
    head_dim: int
    hidden: int
    act_bytes: int
    out_bytes: int
    attn_layers: int
    split_widths: tuple[int, ...] = ()
    last_stage: bool = True
    logits_width: int = 0
    sum_widths: tuple[int, ...] = ()

    @property
    def partial_row_bytes(self) -> int:
        return self.heads * (self.head_dim * self.out_bytes + LSE_BYTES)


def row_span(counts: Sequence[int]) -> int:
    """Rows each rank contributes to a row gather: the most any rank owns (at least 1: a rank
    owning nothing runs one dummy row)."""
    return max(max(counts, default=0), 1)


def exchanges(kind: str, counts: Sequence[int], tokens: int, shape: ExchangeShape,
              world: int, span_counts: Sequence[int] | None = None,
              logits_rows: Sequence[int] = (), scope: Sequence[Sequence[int]] | None = None,
              rank: int = 0) -> dict[str, tuple[int, int]]:
    """The KVP collectives of one step on one rank, by exchange kind: (collectives, bytes this
    rank sends into them). `tokens`: the step's T tokens; `counts`: tokens each rank owns;
    `span_counts`: of those, the tokens of requests spanning ranks (None: all of them). A routed
    step exchanges the queries and partials of spanning tokens only; a shared step the partials
    of all T. `logits_rows`: the rows of each logits computation of the step that was split by
    vocab columns (`StepPolicy.split_logits`), one gather each. `scope`: a scoped routed step's
    `send` matrix (`step.scope`), whose all-to-alls send what `rank` sends its peers: its queries
    to the ranks holding their KV, and the partials of the queries it received back to their
    owners. Nothing is exchanged with one KV rank."""
    if world < 2:
        return {}
    span_counts = counts if span_counts is None else span_counts
    t_max = row_span(counts)
    out = {}
    if kind == ROUTED and any(span_counts) and scope is not None:
        n = len(scope)
        q = sum(scope[rank][p] for p in range(n) if p != rank)
        back = sum(scope[o][rank] for o in range(n) if o != rank)
        out[QUERIES] = (shape.attn_layers,
                        shape.attn_layers * q * shape.heads * shape.head_dim * shape.act_bytes)
        out[PARTIALS] = (shape.attn_layers, shape.attn_layers * back * shape.partial_row_bytes)
    elif kind == ROUTED and any(span_counts):
        q = max(span_counts) * shape.heads * shape.head_dim * shape.act_bytes
        out[QUERIES] = (shape.attn_layers, shape.attn_layers * q)
        out[PARTIALS] = (shape.attn_layers,
                         shape.attn_layers * sum(span_counts) * shape.partial_row_bytes)
    elif kind == SHARED:
        out[PARTIALS] = (shape.attn_layers, shape.attn_layers * tokens * shape.partial_row_bytes)
        if shape.split_widths or shape.sum_widths:
            sent = sum(tokens * math.ceil(w / world) * shape.act_bytes
                       for w in shape.split_widths)
            sent += sum(tokens * w * shape.act_bytes for w in shape.sum_widths)
            out[COLUMNS] = (len(shape.split_widths) + len(shape.sum_widths), sent)
    if shape.last_stage:
        out[HIDDEN] = (1, t_max * shape.hidden * shape.act_bytes)
        if logits_rows and shape.logits_width:
            width = math.ceil(shape.logits_width / world)
            out[LOGITS] = (len(logits_rows), sum(logits_rows) * width * shape.act_bytes)
    return out

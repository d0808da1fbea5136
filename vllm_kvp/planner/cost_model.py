"""Cost model of a KV-parallel deployment: memory per GPU, prefill-chunk time, time per output token.

Pure Python (no torch, no vLLM) so the planner, the benchmarks and the scheduler (adaptive prefill
chunks: `prefill_chunk_time`) share one set of formulas. Units: bytes, seconds, FLOPs, tokens.

A layout is `kvp` KV ranks, each a full model replica sharded `tp` x `pp`: `tp * pp * kvp` GPUs.
Replica i holds GPUs [i*tp*pp, (i+1)*tp*pp), so the KVP group of a (pp, tp) position leaves its node
once `tp * pp * kvp` exceeds the GPUs per node. Two execution modes:
- "replicated" (the first version's lockstep): every KV rank runs every token's dense layers; per
  layer the ranks all-gather their attention partials (out, lse).
- "owner": the plugin's runtime. The rank that owns a token's KV slot runs its dense layers; the
  step policy (`step_policy`, the function the runtime routes with) decides per step whether it is
  routed (per layer the queries go out to all ranks and the partials come back) or shared (every
  rank runs every token: a batch-1 decode, a prompt chunk on one rank, small and uneven steps;
  each layer gathers only the partials, and split linear layers their columns, each rank reading
  1/N of their weights). One gather of final hidden states per step either way. The collectives
  and bytes are `step_policy.exchanges`' (`kvp_gathers`), the same numbers the plugin counts.
Times are sums of terms (steps x per-step overhead + bytes / bandwidth + FLOPs / FLOP/s + hops x
latency + link bytes / link bandwidth), linear in the inverse rates, so `calibrate` fits them by
least squares on the same terms.

On a CPU host the workers and the engine process share the node's cores (`Hardware.cpus`); with
more busy processes than cores each worker computes proportionally slower (`core_sharing`). vLLM's
processes poll for work rather than sleep, so all of them count as busy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_kvp import step_policy
from vllm_kvp.step_policy import ExchangeShape, StepCosts, StepPolicy

MODES = ("replicated", "owner")
PLACEMENTS = ("onboard", "striped")
CPU_PARTIAL_BYTES = 4      # CPU partial outputs travel as float32; GPUs send the model's dtype
MEMORY_UTILIZATION = 0.9   # vLLM's default gpu_memory_utilization
RUNTIME_RESERVE = 2**30    # CUDA context, communicator buffers, allocator slack per GPU


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a decoder-only transformer (gated MLP, GQA attention)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int       # MLP width of one expert
    vocab: int
    max_context: int        # max_position_embeddings
    dtype_bytes: int = 2
    tied_embeddings: bool = False
    experts: int = 1
    experts_per_token: int = 1

    @property
    def attn_params(self) -> int:
        """q, k, v, o projections of one layer."""
        return 2 * self.hidden * self.head_dim * (self.heads + self.kv_heads)

    @property
    def mlp_params(self) -> int:
        """Gate, up and down projections of one expert."""
        return 3 * self.hidden * self.intermediate

    @property
    def layer_params(self) -> int:
        """All weights of one layer (every expert, two norms)."""
        return self.attn_params + self.experts * self.mlp_params + 2 * self.hidden

    @property
    def params(self) -> int:
        """All weights: layers, final norm, embedding, lm_head unless tied."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params + self.hidden + embeddings

    @property
    def active_params(self) -> int:
        """Weights one token multiplies (its experts only), embedding table excluded."""
        per_layer = self.attn_params + self.experts_per_token * self.mlp_params + 2 * self.hidden
        return self.layers * per_layer + self.hidden + self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer: 2 * layers * kv_heads * head_dim * dtype_bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class Hardware:
    """Rates a prediction uses, per GPU (effective, not datasheet peaks: see gpus.GPU.effective)."""

    memory_bytes: float
    hbm_bw: float            # bytes/s
    flops: float             # FLOP/s
    intra_bw: float          # bytes/s per direction inside a node
    inter_bw: float          # bytes/s per direction between nodes
    intra_latency: float     # s per collective hop inside a node
    inter_latency: float     # s per collective hop between nodes
    gpus_per_node: int = 8
    step_overhead: float = 0.0   # s per engine step not covered by the terms (scheduling, launches)
    cpus: int = 0            # cores a node's workers and engine process share; 0: a device each
    a2a_latency: float = 0.0  # s per peer of a small all-to-all; 0: the collective hop latency
    a2a_bw: float = 0.0      # bytes/s received through an all-to-all; 0: the link's bandwidth
    spin_wait: float = 0.0   # s a spinning collective's hop adds when workers outnumber cpus


@dataclass(frozen=True)
class Layout:
    """`kvp` KV ranks of `tp` x `pp` GPUs each; `max_tokens_per_rank` 0 means context / kvp."""

    tp: int = 1
    pp: int = 1
    kvp: int = 1
    placement: str = "onboard"
    max_tokens_per_rank: int = 0
    split_min_bytes: int | None = None  # kvp.split_min_bytes; None: the plugin's per-device default

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.kvp


@dataclass(frozen=True)
class Terms:
    """Work on the critical path of one engine step; `seconds(hw)` turns it into time. `steps`
    counts per-step overheads (more than 1 when a worker's share of a core stretches them)."""

    steps: float = 0.0
    hbm_bytes: float = 0.0
    flops: float = 0.0
    intra_hops: float = 0.0
    inter_hops: float = 0.0
    intra_link_bytes: float = 0.0
    inter_link_bytes: float = 0.0

    def __add__(self, o: Terms) -> Terms:
        return Terms(*(a + b for a, b in zip(self.as_tuple(), o.as_tuple())))

    def scaled(self, k: float) -> Terms:
        return Terms(*(a * k for a in self.as_tuple()))

    def as_tuple(self) -> tuple[float, ...]:
        return (self.steps, self.hbm_bytes, self.flops, self.intra_hops, self.inter_hops,
                self.intra_link_bytes, self.inter_link_bytes)

    def comm_seconds(self, hw: Hardware) -> float:
        return (self.intra_hops * hw.intra_latency + self.inter_hops * hw.inter_latency
                + self.intra_link_bytes / hw.intra_bw + self.inter_link_bytes / hw.inter_bw)

    def seconds(self, hw: Hardware) -> float:
        """Additive: decode moves ~1 FLOP per byte, so the FLOP term is a small correction."""
        return (self.steps * hw.step_overhead + self.hbm_bytes / hw.hbm_bw + self.flops / hw.flops
                + self.comm_seconds(hw))


# ---- memory ------------------------------------------------------------------------------------

def kv_bytes_per_token_per_gpu(m: ModelShape, tp: int, pp: int) -> int:
    """KV bytes one GPU stores per token: its pipeline stage's layers, its share of the KV heads
    (vLLM replicates KV heads when tp > kv_heads)."""
    return 2 * math.ceil(m.layers / pp) * math.ceil(m.kv_heads / tp) * m.head_dim * m.dtype_bytes


def weight_bytes_per_gpu(m: ModelShape, tp: int, pp: int) -> float:
    """Weights on the busiest GPU: its stage's layers (the first/last stage also holds an embedding
    table), split over tp."""
    if pp == 1:
        return m.weight_bytes / tp
    stage = math.ceil(m.layers / pp) * m.layer_params + m.vocab * m.hidden
    return stage * m.dtype_bytes / tp


def activation_bytes_per_gpu(m: ModelShape, tp: int, chunk: int) -> float:
    """Peak live activations of one layer on a chunk of `chunk` tokens, plus the runtime reserve."""
    per_token = 4 * m.hidden + (2 * m.experts_per_token * m.intermediate
                                + 2 * (m.heads + 2 * m.kv_heads) * m.head_dim) / tp
    return chunk * per_token * m.dtype_bytes + RUNTIME_RESERVE


def kv_capacity_tokens(m: ModelShape, hw: Hardware, layout: Layout, chunk: int) -> int:
    """Tokens of KV one KV rank holds once weights and activations are placed (0 if none fit)."""
    free = (MEMORY_UTILIZATION * hw.memory_bytes - weight_bytes_per_gpu(m, layout.tp, layout.pp)
            - activation_bytes_per_gpu(m, layout.tp, chunk))
    return max(0, int(free // kv_bytes_per_token_per_gpu(m, layout.tp, layout.pp)))


def tokens_per_rank(layout: Layout, context: int) -> int:
    """Tokens of one request's `context` on its fullest KV rank."""
    balanced = math.ceil(context / layout.kvp)
    if layout.placement == "striped" or layout.max_tokens_per_rank <= 0:
        return balanced
    return min(context, max(layout.max_tokens_per_rank, balanced))


# ---- cores ---------------------------------------------------------------------------------------

def core_sharing(hw: Hardware, layout: Layout) -> float:
    """How many times longer a worker's own work takes because the node's cores are time-shared:
    (busy processes on the node: its workers and the engine process) / cores, at least 1. Always 1
    on GPUs (`hw.cpus` 0). E.g. plain vLLM on 2 cores (one worker, one engine process): 1; two KV
    ranks on the same 2 cores: 3 / 2. Waiting inside a collective is not stretched: the exchange's
    latency is calibrated as it is."""
    if hw.cpus <= 0:
        return 1.0
    busy = min(layout.gpus, hw.gpus_per_node) + 1
    return max(1.0, busy / hw.cpus)


def spin_wait(hw: Hardware, layout: Layout) -> float:
    """What each hop of a spinning (shared-memory) collective adds on a CPU host whose workers
    outnumber its cores: a peer descheduled behind a spinning one runs only when the scheduler
    switches. 0 on GPUs and with a core per worker."""
    if hw.cpus <= 0 or min(layout.gpus, hw.gpus_per_node) <= hw.cpus:
        return 0.0
    return hw.spin_wait


# ---- communication -----------------------------------------------------------------------------

def _crosses_nodes(hw: Hardware, span_gpus: int) -> bool:
    return span_gpus > hw.gpus_per_node


def _hops(hw: Hardware, hops: float, nbytes: float, inter: bool) -> Terms:
    """`hops` latency-bound steps of a collective moving `nbytes` into each GPU."""
    if inter:
        return Terms(inter_hops=hops, inter_link_bytes=nbytes)
    return Terms(intra_hops=hops, intra_link_bytes=nbytes)


def split_min_bytes(hw: Hardware, layout: Layout) -> int:
    """`kvp.split_min_bytes` as the plugin resolves it (`KVPConfig.min_split_bytes`)."""
    if layout.split_min_bytes is not None:
        return layout.split_min_bytes
    return (4 if hw.cpus > 0 else 32) << 20


def split_layers(m: ModelShape, tp: int, min_bytes: int) -> list[tuple[int, int]]:
    """(output features, input features) per TP rank of the linear layers of one decoder layer
    that split by output columns over the KV ranks (`split_linear.splittable`: weights of at least
    `min_bytes`): vLLM's fused qkv, o, fused gate_up and down projections. Experts (vLLM's fused
    MoE layers) are not linear layers and never split."""
    q, kv = math.ceil(m.heads / tp), max(1, m.kv_heads // tp)
    width = math.ceil(m.intermediate / tp)
    layers = [((q + 2 * kv) * m.head_dim, m.hidden), (m.hidden, q * m.head_dim)]
    if m.experts == 1:
        layers += [(2 * width, m.hidden), (m.hidden, width)]
    return [(o, i) for o, i in layers if o * i * m.dtype_bytes >= min_bytes]


def gated_mlp_splits(m: ModelShape, tp: int, min_bytes: int) -> bool:
    """Whether the MLP splits like a TP layer in shared steps (`split_linear.gated_mlp_part`): a
    dense gated MLP whose down projection has at least `min_bytes` of weights per TP rank."""
    width = math.ceil(m.intermediate / tp)
    return m.experts == 1 and m.hidden * width * m.dtype_bytes >= min_bytes


VOCAB_PADDING = 64  # vLLM pads the lm_head's rows (the vocabulary) to a multiple of this


def head_columns(m: ModelShape, tp: int) -> int:
    """Vocab columns of the lm_head on one TP rank, padded as vLLM pads them."""
    return math.ceil(math.ceil(m.vocab / VOCAB_PADDING) * VOCAB_PADDING / tp)


def logits_width(m: ModelShape, tp: int, min_bytes: int) -> int:
    """The lm_head's vocab columns per TP rank if it splits over the KV ranks
    (`split_linear.install_logits`: at least `min_bytes` of weights), else 0."""
    width = head_columns(m, tp)
    return width if width * m.hidden * m.dtype_bytes >= min_bytes else 0


def policy(m: ModelShape, layout: Layout, min_bytes: int, step_mode: str = "auto",
           split_step_tokens: int | None = None, hw: Hardware | None = None,
           out_bytes: int | None = None) -> StepPolicy:
    """The step policy the plugin runs `layout` with (`worker.step_policy_for`): with `hw`, step
    kinds chosen by the predicted times of `step_costs` (else, or with `split_step_tokens`, by the
    fixed rule)."""
    costs = (step_costs(m, hw, layout, min_bytes, out_bytes)
             if hw is not None and layout.kvp > 1 else None)
    return StepPolicy(world=layout.kvp, share_steps=step_mode == "auto",
                      split_layers=bool(split_layers(m, layout.tp, min_bytes)),
                      split_step_tokens=split_step_tokens, costs=costs,
                      logits_width=logits_width(m, layout.tp, min_bytes))


def step_costs(m: ModelShape, hw: Hardware, layout: Layout, min_bytes: int,
               out_bytes: int | None = None) -> StepCosts:
    """What a step costs one KV rank by kind (`step_policy.StepCosts`), in this model's terms:
    weights streamed (`hbm_bw`), 2 FLOPs per weight per row (`flops`), stretched by core sharing,
    and the KVP collectives (`exchanges`, every layer of every stage: stages run in turn) at the
    hop latency and link bandwidth of the group. `out_bytes` as in `exchange_shape`."""
    split = sum(o * i for o, i in split_layers(m, layout.tp, min_bytes)) * m.layers
    whole = m.active_params / layout.tp
    shape = exchange_shape(m, Layout(tp=layout.tp, kvp=layout.kvp), min_bytes,
                           CPU_PARTIAL_BYTES if out_bytes is None and hw.cpus > 0 else out_bytes)
    inter = _crosses_nodes(hw, layout.gpus)
    head = head_columns(m, layout.tp) * m.hidden
    return StepCosts(world=layout.kvp, shape=shape,
                     logits_weight_s=head * m.dtype_bytes / hw.hbm_bw,
                     logits_row_s=2 * head / hw.flops,
                     weight_s=whole * m.dtype_bytes / hw.hbm_bw,
                     split_weight_s=split * m.dtype_bytes / hw.hbm_bw,
                     row_s=2 * whole / hw.flops, split_row_s=2 * split / hw.flops,
                     sharing=core_sharing(hw, layout),
                     hop_s=(hw.inter_latency if inter else hw.intra_latency)
                     + spin_wait(hw, layout),
                     byte_s=1 / (hw.inter_bw if inter else hw.intra_bw),
                     a2a_hop_s=0.0 if inter else hw.a2a_latency,
                     a2a_byte_s=1 / hw.a2a_bw if hw.a2a_bw and not inter else 0.0)


def exchange_shape(m: ModelShape, layout: Layout, min_bytes: int,
                   out_bytes: int | None = None) -> ExchangeShape:
    """One KV rank's exchange sizes (its TP shard of the heads, the last pipeline stage's layers,
    which return the hidden states). `out_bytes`: bytes per partial output element (default the
    model's dtype, as on GPUs; `CPU_PARTIAL_BYTES` on CPUs)."""
    layers = math.ceil(m.layers / layout.pp)
    split = split_layers(m, layout.tp, min_bytes)
    # A gated MLP whose down projection splits is split like a TP layer (`split_linear`): its
    # gate_up gathers nothing and its down projection gathers hidden-size partial sums.
    paired = gated_mlp_splits(m, layout.tp, min_bytes)
    if paired:
        split = split[:-2]
    widths = tuple(o for o, _ in split) * layers
    return ExchangeShape(heads=math.ceil(m.heads / layout.tp), head_dim=m.head_dim,
                         hidden=m.hidden, act_bytes=m.dtype_bytes,
                         out_bytes=m.dtype_bytes if out_bytes is None else out_bytes,
                         attn_layers=layers, split_widths=widths,
                         sum_widths=(m.hidden,) * layers if paired else (),
                         logits_width=logits_width(m, layout.tp, min_bytes))


def step_counts(layout: Layout, tokens: int, rows: int) -> list[int]:
    """Tokens each KV rank owns in a step of `tokens` whose busiest rank owns `rows`, the rest
    spread evenly over the others."""
    rest = tokens - rows
    others = layout.kvp - 1
    return [rows] + [rest // others + (1 if i < rest % others else 0) for i in range(others)]


def kvp_gathers(m: ModelShape, layout: Layout, tokens: int, mode: str, rows: int | None = None,
                step_mode: str = "auto", min_bytes: int = 32 << 20,
                out_bytes: int | None = None, spans: bool = True,
                hw: Hardware | None = None) -> list[tuple[int, float]]:
    """The all-gathers over the KVP group in one step, all layers, as (how many, bytes each rank
    sends in each). `tokens`: the step's T tokens; every rank attends all of their queries, so it
    sends partials of T. `rows`: the most tokens one rank owns (default T: one rank owns all).
    `spans`: some request of the step holds KV on more than one rank (else the step is local).
    `hw`: the hardware whose costs choose the step's kind (None: the fixed rule).

    replicated (the first version's lockstep): the partials once per layer.
    owner: what `step_policy.exchanges` lists for the kind the step policy gives the step: the
    plugin's own accounting, so predictions and its counters agree.
    """
    if layout.kvp == 1:
        return []
    rows = tokens if rows is None else rows
    shape = exchange_shape(m, layout, min_bytes, out_bytes)
    if mode != "owner":
        return [(m.layers, tokens * shape.partial_row_bytes)]
    counts = step_counts(layout, tokens, rows)
    kind = policy(m, layout, min_bytes, step_mode, hw=hw, out_bytes=out_bytes).kind(
        counts, spans, tokens=tokens)
    sent = step_policy.exchanges(kind, counts, tokens, shape, layout.kvp,
                                 None if spans else [0] * layout.kvp)
    return [(n, b / n) for n, b in sent.values() if n]


def kvp_collectives(m: ModelShape, layout: Layout, tokens: int, mode: str,
                    rows: int | None = None, step_mode: str = "auto",
                    min_bytes: int = 32 << 20, spans: bool = True) -> int:
    """KVP collectives a rank issues per step: what the plugin counts (`exchanges` in its stats)."""
    return sum(count for count, _ in kvp_gathers(m, layout, tokens, mode, rows, step_mode,
                                                 min_bytes, spans=spans))


def kvp_exchange(m: ModelShape, hw: Hardware, layout: Layout, tokens: int, mode: str,
                 rows: int | None = None, step_mode: str = "auto", spans: bool = True,
                 by_cost: bool = True) -> Terms:
    """Per-step exchange over the KVP group: `kvp_gathers` as ring all-gathers, kvp - 1 hops and
    kvp - 1 ranks' bytes received each."""
    gathers = kvp_gathers(m, layout, tokens, mode, rows, step_mode, split_min_bytes(hw, layout),
                          CPU_PARTIAL_BYTES if hw.cpus > 0 else None, spans,
                          hw if by_cost else None)
    ring = layout.kvp - 1
    return _hops(hw, ring * sum(c for c, _ in gathers), ring * sum(c * b for c, b in gathers),
                 _crosses_nodes(hw, layout.gpus))


def shared_weight_bytes(m: ModelShape, hw: Hardware, layout: Layout, step_mode: str) -> float:
    """Weight bytes one KV rank reads in a shared step: split layers' 1/kvp of their columns, the
    rest whole."""
    whole = m.active_params * m.dtype_bytes / layout.tp
    if layout.kvp == 1 or step_mode != "auto":
        return whole
    split = sum(o * i for o, i in split_layers(m, layout.tp, split_min_bytes(hw, layout)))
    return whole - split * m.layers * m.dtype_bytes * (1 - 1 / layout.kvp)


def tp_pp_exchange(m: ModelShape, hw: Hardware, layout: Layout, tokens: int) -> Terms:
    """Two all-reduces per layer inside a TP group (log-depth: 2 * ceil(log2 tp) hops each) and one
    send per pipeline-stage boundary."""
    t = Terms()
    act = tokens * m.hidden * m.dtype_bytes
    if layout.tp > 1:
        hops = 2 * math.ceil(math.log2(layout.tp))
        ring_bytes = 2 * (layout.tp - 1) / layout.tp * act
        t = t + _hops(hw, 2 * m.layers * hops, 2 * m.layers * ring_bytes,
                      _crosses_nodes(hw, layout.tp))
    if layout.pp > 1:
        t = t + _hops(hw, layout.pp - 1, (layout.pp - 1) * act,
                      _crosses_nodes(hw, layout.tp * layout.pp))
    return t


# ---- time --------------------------------------------------------------------------------------

def decode_step_terms(m: ModelShape, hw: Hardware, layout: Layout, context: int,
                      mode: str = "replicated", step_mode: str = "auto",
                      by_cost: bool = True) -> Terms:
    """One output token of one request whose KV holds `context` tokens (batch 1). Stages run in
    turn, so pp does not shorten it; each GPU streams its weights and its KV-rank's share of the
    KV once; all KV ranks attend in parallel, so the fullest rank sets the pace. Under owner
    computes the one token is owned by one rank, whatever the placement: with `step_mode` "auto"
    and a context on one rank the step is local (no exchange but the hidden states); else every
    rank runs it (a shared step: no query is exchanged, and each rank reads 1/N of the split
    linear layers' weights); "owner" (every step routed) is here to read measurements taken with
    it. The lm_head's split by vocab columns (`StepPolicy.split_logits`, when its saving beats
    its gather) is left out: the calibration rows are fitted without it."""
    resident = tokens_per_rank(layout, context)
    spans = resident < context
    kind = policy(m, layout, split_min_bytes(hw, layout), step_mode,
                  hw=hw if by_cost else None).kind(
        step_counts(layout, 1, 1), spans) if layout.kvp > 1 else step_policy.LOCAL
    kv = resident * kv_bytes_per_token_per_gpu(m, layout.tp, 1)
    weights = (shared_weight_bytes(m, hw, layout, step_mode)
               if mode == "owner" and kind == step_policy.SHARED
               else m.active_params * m.dtype_bytes / layout.tp)
    flops = (2 * m.active_params + 4 * m.layers * m.heads * m.head_dim * resident) / layout.tp
    work = Terms(steps=1.0, hbm_bytes=weights + kv, flops=flops).scaled(core_sharing(hw, layout))
    return (work + kvp_exchange(m, hw, layout, 1, mode, step_mode=step_mode, spans=spans,
                                by_cost=by_cost)
            + tp_pp_exchange(m, hw, layout, 1))


def decode_step_time(m: ModelShape, hw: Hardware, layout: Layout, context: int,
                     mode: str = "replicated") -> float:
    """Seconds per output token at `context` tokens (batch 1)."""
    return decode_step_terms(m, hw, layout, context, mode).seconds(hw)


def prefill_chunk_time(m: ModelShape, hw: Hardware, layout: Layout, chunk: int, past: int,
                       mode: str = "replicated") -> float:
    """Seconds for one prefill chunk of `chunk` tokens attending to `past` earlier tokens (all
    pipeline stages in turn). Dense work is split over KV ranks only when the chunk's tokens are
    spread over them (owner computes with striped placement: a routed step); under `onboard` the
    chunk lands on the rank being filled, so owner computes runs it whole on every rank (a
    shared step: no query exchange), in the owner's time. A chunk that straddles two ranks'
    limits (at most kvp - 1 of a prompt) is counted as if on one. Attention to the past is split by
    where the past lives (striped: evenly; onboard: the fullest rank holds up to its limit)."""
    spread = mode == "owner" and layout.placement == "striped"
    share = layout.kvp if spread else 1
    if layout.placement == "striped":
        past_local = past / layout.kvp
    else:
        past_local = min(past, tokens_per_rank(layout, past + chunk))
    attention = 4 * m.layers * m.heads * m.head_dim * chunk * (past_local + chunk / 2 / share)
    flops = (2 * m.active_params * chunk / share + attention) / layout.tp
    kv_read = past_local * kv_bytes_per_token_per_gpu(m, layout.tp, 1)
    hbm = m.active_params * m.dtype_bytes / layout.tp + kv_read
    compute = max(flops / hw.flops, hbm / hw.hbm_bw)
    own = math.ceil(chunk / share)   # rows one rank runs and sends in a row gather (t_max)
    comm = kvp_exchange(m, hw, layout, chunk, mode, own) + tp_pp_exchange(m, hw, layout, own)
    return (hw.step_overhead + compute) * core_sharing(hw, layout) + comm.comm_seconds(hw)


def prefill_time(m: ModelShape, hw: Hardware, layout: Layout, context: int, chunk: int = 8192,
                 mode: str = "replicated", max_points: int = 256) -> float:
    """Seconds to prefill `context` tokens in chunks of `chunk` (time to first token). Chunks
    overlap across pipeline stages: total / pp plus the pipeline's fill, (pp - 1) stages of the
    last chunk. Full chunks are summed in <= `max_points` groups, each timed at its middle past
    (a chunk's time is piecewise linear in its past, so this is exact up to the kinks)."""
    full, rest = divmod(context, chunk)
    group = max(1, math.ceil(full / max_points))
    total = 0.0
    for first in range(0, full, group):
        count = min(group, full - first)
        middle = int((first + (count - 1) / 2) * chunk)
        total += count * prefill_chunk_time(m, hw, layout, chunk, middle, mode)
    if rest:
        last = prefill_chunk_time(m, hw, layout, rest, full * chunk, mode)
        total += last
    else:
        last = prefill_chunk_time(m, hw, layout, chunk, (full - 1) * chunk, mode)
    return total / layout.pp + (layout.pp - 1) * last / layout.pp

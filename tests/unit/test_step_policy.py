"""The step policy: which steps are shared, and the exchanges a step issues (pure Python)."""

import dataclasses
import math

import pytest

from vllm_kvp.rank_map import RankMap
from vllm_kvp.step_policy import (COLUMNS, HIDDEN, LOCAL, LOGITS, PARTIALS, QUERIES, ROUTED,
                                  SHARED, ExchangeShape, StepPolicy, exchanges)


@pytest.mark.parametrize("counts,split,tokens,want", [
    ([0, 5], False, 0, True),        # one owner: always
    ([5, 0, 0], True, 0, True),
    ([3, 4], False, 128, False),     # nothing split: only one-owner steps
    ([3, 4], True, 128, True),       # small step
    ([64, 64], True, 128, True),
    ([65, 64], True, 128, False),    # balanced and over the limit: routed
    ([1024, 1024], True, 128, False),
    ([7, 1074], True, 128, True),    # busiest rank >= 1.5x its share
    ([300, 700], True, 128, False),  # 1.4x
    ([100, 100, 400], True, 128, True),  # 2x of a third
    ([3, 4], True, 0, False),        # split_step_tokens 0: small balanced steps are routed
    ([0, 0], True, 128, False),      # nothing to run
    ([9], True, 128, False),         # one rank
])
def test_which_steps_are_shared(counts, split, tokens, want):
    policy = StepPolicy(len(counts), True, split, tokens)
    assert policy.kind(counts) == (SHARED if want else ROUTED)
    routed_only = StepPolicy(len(counts), False, split, tokens)  # step_mode "owner"
    assert routed_only.kind(counts) == ROUTED


SHAPE = ExchangeShape(heads=8, head_dim=32, hidden=256, act_bytes=4, out_bytes=4, attn_layers=4,
                      split_widths=(384, 256, 1024, 256) * 4)


def test_routed_step_exchanges_queries_partials_and_hidden_states():
    counts, t = [3, 1], 4
    sent = exchanges(ROUTED, counts, t, SHAPE, 2)
    row = 8 * (32 * 4 + 4)  # H x D float32 outputs, then H float32 LSEs
    assert sent == {PARTIALS: (4, 4 * t * row), QUERIES: (4, 4 * 3 * 8 * 32 * 4),
                    HIDDEN: (1, 3 * 256 * 4)}  # rows padded to the busiest rank's 3


def test_routed_step_exchanges_only_the_rows_of_spanning_requests():
    counts, spans, t = [5, 2], [1, 2], 7  # rank 0: 4 rows of local requests, 1 spanning row
    sent = exchanges(ROUTED, counts, t, SHAPE, 2, spans)
    row = 8 * (32 * 4 + 4)
    assert sent == {PARTIALS: (4, 4 * 3 * row), QUERIES: (4, 4 * 2 * 8 * 32 * 4),
                    HIDDEN: (1, 5 * 256 * 4)}  # queries padded to the most spanning rows (2)
    # Nothing spans (step_mode "owner" routes such steps): no attention layer exchanges anything.
    assert exchanges(ROUTED, counts, t, SHAPE, 2, [0, 0]) == {HIDDEN: (1, 5 * 256 * 4)}


def test_shared_step_exchanges_partials_columns_and_hidden_states():
    sent = exchanges(SHARED, [0, 1, 0], 1, SHAPE, 3)
    assert QUERIES not in sent
    assert sent[COLUMNS] == (16, 4 * sum(math.ceil(w / 3) * 4 for w in (384, 256, 1024, 256)))
    assert sent[HIDDEN] == (1, 256 * 4) and sent[PARTIALS][0] == 4


def test_no_exchange_with_one_rank_nor_hidden_states_before_the_last_stage():
    assert exchanges(ROUTED, [5], 5, SHAPE, 1) == {}
    mid = ExchangeShape(8, 32, 256, 2, 2, 4, last_stage=False)
    assert HIDDEN not in exchanges(ROUTED, [2, 2], 4, mid, 2)


def test_rank_map_places_blocks_and_slots():
    ranks = RankMap(3, 10, 16)
    assert ranks.pooled_blocks == 30 and ranks.tokens_per_rank == 160
    assert [ranks.rank_of_block(b) for b in (0, 9, 10, 29)] == [0, 0, 1, 2]
    assert ranks.local_block(25) == 5 and ranks.first_block(2) == 20
    assert [ranks.rank_of_slot(s) for s in (-1, 0, 159, 160, 479)] == [-1, 0, 0, 1, 2]
    assert ranks.usable_blocks() == [9, 10, 10] and ranks.largest_context() == 29 * 16
    assert RankMap.from_pooled(31, 3, 16) == ranks
    with pytest.raises(ValueError, match="blocks_per_rank"):
        RankMap(2, 0, 16)


@pytest.mark.parametrize("counts,split,want", [
    ([3, 4], False, "local"),         # no split layers: a shared step would only add collectives
    ([0, 1], False, "local"),         # a batch-1 decode of a request on one rank
    ([300, 300], True, "local"),      # balanced and large: would be routed
    ([0, 1], True, "shared"),         # one owner with split layers: 1/N of their weights each
    ([3, 4], True, "shared"),         # small
])
def test_steps_of_local_requests(counts, split, want):
    policy = StepPolicy(len(counts), True, split, 128)
    assert policy.kind(counts, spans=False) == want
    assert StepPolicy(len(counts), False, split).kind(counts, spans=False) == ROUTED  # "owner"


def test_local_step_exchanges_only_hidden_states():
    assert exchanges(LOCAL, [3, 5], 8, SHAPE, 2) == {HIDDEN: (1, 5 * 256 * 4)}


# ---- step kinds from the cost model -------------------------------------------------------------

def _bench_policy(world, cpus=2, **kw):
    from vllm_kvp.model import BENCH_ARCH
    from vllm_kvp.planner import cost_model as cm
    from vllm_kvp.planner.command import shape_from_config
    from vllm_kvp.planner.gpus import runtime_hardware

    shape = shape_from_config({**BENCH_ARCH, "dtype": "float32"}, "bench")
    hw, _ = runtime_hardware(None, None, cpus)
    return cm.policy(shape, cm.Layout(kvp=world), 4 << 20, hw=hw, out_bytes=4, **kw), hw


def _hand_seconds(kind, counts, span_counts, hw, world, cpus=2):
    """The bench model (fp32, 4 layers: qkv 1536, o 1024, gate_up 8192 and down 1024 output
    columns, all split at 4 MiB), worked out from its layer shapes: the busiest rank's weight
    reads and FLOPs, stretched by (ranks + engine process) / cores, plus ring all-gathers (in a
    shared step: qkv's and o's columns, and the gated MLP's down-projection partial sums, whole
    hidden-size rows)."""
    hidden, heads, dim, layers, vocab = 1024, 8, 128, 4, 4096
    widths, inputs = (1536, 1024, 8192, 1024), (1024, 1024, 1024, 4096)
    split = layers * sum(w * i for w, i in zip(widths, inputs))
    active = split + layers * 2 * hidden + hidden + vocab * hidden
    stretch = max(1.0, (world + 1) / cpus)
    t, busiest = sum(counts), max(counts)
    # More workers than cores: each hop of a spinning collective waits for a descheduled peer.
    lat = hw.intra_latency + (hw.spin_wait if world > cpus else 0.0)
    hop = lambda nbytes: (world - 1) * (lat + nbytes / hw.intra_bw)  # noqa: E731
    comm = hop(max(busiest, 1) * hidden * 4)  # final hidden states
    cut = 1 - 1 / world
    if kind == SHARED:
        work = (active - cut * split) * 4 / hw.hbm_bw + t * 2 * (active - cut * split) / hw.flops
        comm += layers * hop(t * heads * (dim * 4 + 4))
        comm += sum(layers * hop(t * math.ceil(w / world) * 4) for w in widths[:2])
        comm += layers * hop(t * hidden * 4)
    else:
        work = active * 4 / hw.hbm_bw + busiest * 2 * active / hw.flops
        if kind == ROUTED and any(span_counts):
            comm += layers * (hop(max(span_counts) * heads * dim * 4)
                              + hop(sum(span_counts) * heads * (dim * 4 + 4)))
    return stretch * work + comm


@pytest.mark.parametrize("world", [2, 3])
def test_cost_model_picks_the_faster_kind(world):
    policy, hw = _bench_policy(world)
    seen = set()
    for per in (1, 2, 8, 32, 64, 100, 200, 400, 1024):
        for shape in ("balanced", "one", "uneven"):
            counts = ([per] * world if shape == "balanced" else
                      [per * world] + [0] * (world - 1) if shape == "one" else
                      [2 * per] + [max(per // 2, 1)] * (world - 1))
            for spanning in (False, True):
                spans = counts if spanning else [0] * world
                own = ROUTED if spanning else LOCAL
                a = _hand_seconds(SHARED, counts, spans, hw, world)
                b = _hand_seconds(own, counts, spans, hw, world)
                if abs(a - b) < 1e-9 * max(a, b):
                    continue
                want = SHARED if a < b else own
                assert policy.kind(counts, spanning, spans, sum(counts)) == want, (counts, spans)
                seen.add(want)
    assert seen == {SHARED, LOCAL, ROUTED}  # the grid crosses the break-even points


def test_break_even_points_and_description():
    policy, _ = _bench_policy(2)
    for case in ("balanced", "spanning"):
        b = policy.break_even(case)
        assert 0 < b < 4096
        assert policy.kind([b // 2] * 2, case == "spanning") == SHARED
        assert policy.kind([b // 2 + 1] * 2, case == "spanning") != SHARED
    assert policy.break_even("one-owner") > 0  # 1/N of the split weights each
    text = policy.describe("CPU host")
    assert text.startswith("cost model (CPU host); split layers: yes; shared up to ")
    fixed = StepPolicy(2, True, True, 128)
    assert fixed.break_even("balanced") == 128 and "fixed rule, 128 tokens" in fixed.describe()
    assert StepPolicy(2, False).describe() == "every step routed"


def test_fixed_rule_overrides_the_costs():
    policy, _ = _bench_policy(2, split_step_tokens=0)
    assert policy.costs is not None
    assert policy.kind([3, 4], spans=False) == LOCAL   # a small step the costs would share
    assert policy.kind([0, 5], spans=False) == SHARED  # one owner, split layers


def test_a_tie_falls_back_to_the_fixed_rule():
    from vllm_kvp.step_policy import StepCosts

    free = StepCosts(world=2, shape=SHAPE, weight_s=0.0, split_weight_s=0.0, row_s=0.0,
                     split_row_s=0.0)  # nothing costs anything
    policy = StepPolicy(2, True, True, costs=free)
    assert policy.kind([0, 1], spans=True) == SHARED and policy.kind([500, 500]) == ROUTED


def test_runtime_hardware():
    from vllm_kvp.planner.gpus import CATALOGUE, runtime_hardware

    hw, name = runtime_hardware(None, None, 8)
    assert name == "CPU host" and hw.cpus == 8 and hw.hbm_bw == CATALOGUE["cpu"].hbm_bw
    assert runtime_hardware(None, "NVIDIA H200", 8)[1] == CATALOGUE["h200"].name
    assert runtime_hardware(None, "NVIDIA A100-SXM4-80GB", 8)[1] == CATALOGUE["a100"].name
    assert runtime_hardware(None, "Some Future GPU", 8)[1] == CATALOGUE["h100"].name
    hw, name = runtime_hardware("b200", "NVIDIA H100", 8)
    assert name == CATALOGUE["b200"].name and hw.cpus == 0
    assert hw.hbm_bw == CATALOGUE["b200"].hbm_bw * 0.8  # a datasheet rate: its achieved share


# ---- the lm_head split by vocab columns ----------------------------------------------------------

def _hand_logits_seconds(rows, split, hw, world, cpus=2):
    """The bench model's lm_head (4096 x 1024, fp32) on one rank: read and multiply all of it, or
    1/N of it and a ring all-gather of every rank's (rows x 2048)-column slice."""
    head = 4096 * 1024
    work = max(1.0, (world + 1) / cpus) * (head * 4 / hw.hbm_bw + rows * 2 * head / hw.flops)
    if not split:
        return work
    lat = hw.intra_latency + (hw.spin_wait if world > cpus else 0.0)
    gather = (world - 1) * (lat + rows * math.ceil(4096 / world) * 4 / hw.intra_bw)
    return work / world + gather


@pytest.mark.parametrize("world", [2, 3])
def test_the_lm_head_splits_when_its_saving_beats_the_gather(world):
    policy, hw = _bench_policy(world)
    assert policy.logits_width == 4096  # 16 MiB of fp32 head, over the 4 MiB split threshold
    for rows in (1, 2, 16, 64, 512):
        want = (_hand_logits_seconds(rows, True, hw, world)
                < _hand_logits_seconds(rows, False, hw, world))
        assert policy.split_logits(rows) == want, rows
    if world <= 2:  # a core per worker: 1/N of a 16 MiB head saves more than a gather
        assert policy.split_logits(16)
    else:  # 3 workers on 2 cores: each hop of the gather waits for a descheduled peer
        assert not policy.split_logits(16) and policy.split_logits(512)
    assert not policy.split_logits(0)
    sent = exchanges(SHARED, [8, 8], 16, policy.costs.shape, world, logits_rows=[16, 3])
    assert sent[LOGITS] == (2, 19 * math.ceil(4096 / world) * 4)


def test_a_small_lm_head_or_no_costs_keep_it_whole():
    from vllm_kvp.model import ARCH
    from vllm_kvp.planner import cost_model as cm
    from vllm_kvp.planner.command import shape_from_config
    from vllm_kvp.planner.gpus import runtime_hardware

    # The embedded model's 4 MiB head (4096 x 256 fp32): at batch 1 on the CPU host the gather's
    # latency outweighs reading half of it; a batch of decode rows pays for it.
    shape = shape_from_config({**ARCH, "dtype": "float32"}, "tiny")
    hw, _ = runtime_hardware(None, None, 2)
    policy = cm.policy(shape, cm.Layout(kvp=2), 4 << 20, hw=hw, out_bytes=4)
    assert policy.logits_width == 4096
    assert not policy.split_logits(1) and policy.split_logits(64)
    assert cm.policy(shape, cm.Layout(kvp=2), 8 << 20, hw=hw).logits_width == 0  # under threshold
    fixed = StepPolicy(2, True, True, logits_width=4096)  # no costs: whole
    assert not fixed.split_logits(64)
    assert not dataclasses.replace(policy, share_steps=False).split_logits(64)  # step_mode owner
    assert LOGITS not in exchanges(SHARED, [1, 0], 1, SHAPE, 2, logits_rows=[1])  # width 0


def _hand_exchange_seconds(send, scoped, hw, world):
    """A routed step's query and partial exchanges on the bench model (4 layers, 8 heads of 128,
    fp32), by hand: ring all-gathers of the busiest owner's queries and of every spanning
    query's partials, or all-to-alls of N - 1 peers moving the busiest rank's received rows."""
    layers, q_row, p_row = 4, 8 * 128 * 4, 8 * (128 * 4 + 4)
    if not scoped:
        span = [send[o][o] for o in range(world)]
        lat = hw.intra_latency + (hw.spin_wait if 0 < hw.cpus < world else 0.0)
        per_layer = 2 * lat + (max(span) * q_row + sum(span) * p_row) / hw.intra_bw
        return layers * (world - 1) * per_layer
    recv = max(sum(send[o][r] for o in range(world) if o != r) * q_row
               + sum(send[r][p] for p in range(world) if p != r) * p_row for r in range(world))
    lat = hw.a2a_latency or hw.intra_latency
    bw = hw.a2a_bw or hw.intra_bw
    return layers * (2 * (world - 1) * lat + recv / bw)


@pytest.mark.parametrize("device,cores", [("cpu", 8), ("cpu", 2), ("h100", 0)])
def test_exchange_scope_by_the_costs(device, cores):
    """kvp.exchange_scope "auto" sends queries only to their KV's holders where all-to-alls are
    predicted faster than all-gathers: on NVLink (all-to-alls at the all-gathers' rates) whenever
    a rank holds nothing of some spanning request; on a CPU host with a core per worker (gloo's
    all-to-all at ~1/5 of the shared memory's rate) only where the bytes saved outweigh that; on
    one whose workers outnumber its cores (spinning all-gathers wait for descheduled peers,
    gloo's all-to-all blocks) always."""
    from vllm_kvp.model import BENCH_ARCH
    from vllm_kvp.planner import cost_model as cm
    from vllm_kvp.planner.command import shape_from_config
    from vllm_kvp.planner.gpus import get_gpu

    shape = shape_from_config({**BENCH_ARCH, "dtype": "float32"}, "bench")
    hw = dataclasses.replace(get_gpu(device).effective(), cpus=cores)
    world = 4
    policy = cm.policy(shape, cm.Layout(kvp=world), 4 << 20, hw=hw, out_bytes=4)
    assert policy.may_scope
    seen = set()
    for rows in (1, 16, 256, 2048):
        # Requests of rank 0 on ranks {0, 1}, of rank 2 on {2, 3}: each query needed by one peer.
        send = [[rows, rows, 0, 0], [0, 0, 0, 0], [0, 0, rows, rows], [0, 0, 0, 0]]
        want = (_hand_exchange_seconds(send, True, hw, world)
                < _hand_exchange_seconds(send, False, hw, world))
        assert policy.scoped(send, [rows, 0, rows, 0]) == want, rows
        # The cheap check before the send matrix is built never rules out a step it would scope.
        assert policy.may_scope_step([rows, 0, rows, 0]) or not want
        seen.add(want)
    assert seen == ({False, True} if cores > world else {True})
    send = [[8, 8, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert dataclasses.replace(policy, exchange_scope="holders").scoped(send, [8, 0, 0, 0])
    assert not dataclasses.replace(policy, exchange_scope="all").scoped(send, [8, 0, 0, 0])
    assert not dataclasses.replace(policy, costs=None).scoped(send, [8, 0, 0, 0])
    two = cm.policy(shape, cm.Layout(kvp=2), 4 << 20, hw=hw, out_bytes=4)
    assert not two.may_scope  # with two ranks a spanning request is on both
    assert not two.may_scope_step([8, 8])
    if cores > world:  # a small decode step: the all-to-alls' latency alone costs more
        assert not policy.may_scope_step([1, 1, 1, 1])

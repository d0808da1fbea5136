"""The step policy: which steps are shared, and the exchanges a step issues (pure Python)."""

import math

import pytest

from vllm_kvp.rank_map import RankMap
from vllm_kvp.step_policy import (COLUMNS, HIDDEN, LOCAL, PARTIALS, QUERIES, ROUTED, SHARED,
                                  ExchangeShape, StepPolicy, exchanges)


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

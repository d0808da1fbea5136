"""Properties of vllm_kvp.engine.placement.RankPlacement (pure Python, no torch/vLLM needed)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vllm_kvp.engine.placement import RankPlacement


def runs(ranks):
    """Collapse consecutive equal ranks: [0,0,2,2,1] -> [0,2,1]."""
    return [r for r, _ in itertools.groupby(ranks)]


def most_free(cands, free):
    """Rank with the most free blocks among cands (which all have room); ties -> lowest id."""
    return max(cands, key=lambda r: (free[r], -r)) if cands else None


def reference_plan(blocks, k, free, quota, num_ranks, step_blocks=None, growing=None):
    """Independent model of the onboard policy, one block at a time from the request's block list
    (rank of each block, in order). Returns (ranks, kinds) with kind per block: 'stay' (newest
    below quota), 'onboard', 'a' (past quota on the newest), 'b' (older used rank); or None.
    A new request's first rank: fewest `step_blocks`, fewest `growing`, most free, lowest id, among
    the ranks that can hold all k blocks if any can (both None: other requests hold nothing)."""
    blocks, free = list(blocks), list(free)
    step_blocks = step_blocks or [0] * num_ranks
    growing = growing or [0] * num_ranks
    out, kinds = [], []
    for i in range(k):
        order = list(dict.fromkeys(blocks))  # first-use order; a (b) block does not reorder
        newest = order[-1] if order else None
        unused = [r for r in range(num_ranks) if r not in order and free[r] > 0]
        if newest is not None and free[newest] > 0 and (
                quota is None or blocks.count(newest) < quota):
            r, kind = newest, "stay"
        elif newest is None and unused:
            fits = [r for r in unused if free[r] >= k - i] or unused
            r = sorted(fits, key=lambda x: (step_blocks[x], growing[x], -free[x], x))[0]
            kind = "onboard"
        elif unused:
            r, kind = most_free(unused, free), "onboard"
        elif newest is not None and free[newest] > 0:
            r, kind = newest, "a"
        else:
            r, kind = most_free([x for x in order if free[x] > 0], free), "b"
            if r is None:
                return None
        free[r] -= 1
        blocks.append(r)
        out.append(r)
        kinds.append(kind)
    return out, kinds


def grow(p, req, n, free):
    """Allocate n blocks one decode step at a time, updating `free` like the real pool would."""
    placed = []
    for _ in range(n):
        got = p.choose(req, 1, free)
        assert got is not None
        p.commit(req, got)
        free[got[0]] -= 1
        placed += got
    return placed


@pytest.mark.parametrize(
    "args, kwargs, msg",
    [((0, 16), {}, "num_ranks"), ((2, 0), {}, "block_size"), ((2, 16, "rnd"), {}, "policy"),
     ((2, 16), dict(max_tokens_per_rank=0), "max_tokens_per_rank"),
     ((2, 16), dict(max_tokens_per_rank=-5), "max_tokens_per_rank"),
     ((2, 16), dict(blocks_per_rank=0), "blocks_per_rank"),
     ((2, 16), dict(stripe_min_tokens=-1), "stripe_min_tokens"),
     ((2, 16, "auto"), {}, "stripe_min_tokens")],
)
def test_invalid_args(args, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        RankPlacement(*args, **kwargs)


def test_quota_is_ceil_of_tokens_over_block_size():
    assert RankPlacement(2, 16, max_tokens_per_rank=32).quota == 2
    assert RankPlacement(2, 16, max_tokens_per_rank=33).quota == 3
    assert RankPlacement(2, 16, max_tokens_per_rank=1).quota == 1
    assert RankPlacement(2, 16, blocks_per_rank=7).quota == 7
    assert RankPlacement(2, 16).quota is None


def test_bad_plan_arguments():
    p = RankPlacement(2, 4)
    for bad in (lambda: p.choose("a", 1, [5]), lambda: p.choose("a", -1, [5, 5]),
                lambda: p.commit("a", [2])):  # wrong rank count, negative n, rank out of range
        with pytest.raises(ValueError):
            bad()
    assert p.choose("a", 0, [0, 0]) == []


@given(num_ranks=st.integers(1, 6), block_size=st.integers(1, 8), max_tokens=st.integers(1, 40),
       stepwise=st.booleans())
@settings(max_examples=80, deadline=None)
def test_onboards_exactly_at_token_multiples(num_ranks, block_size, max_tokens, stepwise):
    p = RankPlacement(num_ranks, block_size, max_tokens_per_rank=max_tokens)
    events = []
    p.on_onboard = lambda req, rank, tok: events.append((req, rank, tok))
    quota = -(-max_tokens // block_size)
    n = quota * num_ranks  # exactly fills every rank's quota; plenty of free blocks everywhere
    free = [10 * n] * num_ranks
    placed = grow(p, "r", n, free) if stepwise else p.choose("r", n, free)
    if not stepwise:
        p.commit("r", placed)
    order = runs(placed)
    assert len(order) == len(set(order)) == num_ranks  # never returns to an older rank
    assert p.ranks_of("r") == order
    for k, rank in enumerate(order):
        first = placed.index(rank)
        assert first == k * quota
    # The previous rank is left by the first block after its tokens reached max_tokens_per_rank.
    assert (quota - 1) * block_size < max_tokens <= quota * block_size
    assert p.blocks_on("r") == {r: quota for r in order}
    assert [e[2] for e in events] == [k * quota * block_size for k in range(num_ranks)]
    assert p.num_onboard_events == num_ranks
    # Every rank is at quota and none is unused: the threshold is not a cap, so further blocks
    # keep growing on the newest rank (no new onboarding).
    more = p.choose("r", 3, free)
    assert more == [order[-1]] * 3
    p.commit("r", more)
    assert p.blocks_on("r")[order[-1]] == quota + 3 and p.num_onboard_events == num_ranks
    assert p.ranks_of("r") == order


def test_least_loaded_choice_lowest_id_on_ties():
    assert RankPlacement(4, 16).choose("a", 1, [3, 9, 9, 2]) == [1]
    assert RankPlacement(4, 16).choose("a", 1, [5, 5, 5, 5]) == [0]
    p = RankPlacement(4, 1, max_tokens_per_rank=2)
    # rank 1 first (most free), then rank 3 (most free among unused), then 0 over 2 (tie -> low id)
    assert p.choose("a", 6, [5, 9, 5, 7]) == [1, 1, 3, 3, 0, 0]


def test_prompts_of_one_step_start_on_different_ranks():
    """Free blocks alone would put both on rank 0 (a one-block tie after rank 1's decode block);
    the blocks handed out in the step send the second prompt to rank 1."""
    p = RankPlacement(2, 128)
    p.commit("a", p.choose("a", 8, [99, 100]))  # first step: "a" alone, on the freer rank
    assert p.ranks_of("a") == [1]
    p.begin_step()
    p.commit("a", p.choose("a", 1, [99, 92]))  # "a" decodes past its block on rank 1
    b = p.choose("b", 8, [99, 91])
    p.commit("b", b)
    c = p.choose("c", 8, [91, 91])
    assert b == [0] * 8 and c == [1] * 8


def test_new_requests_start_where_fewest_requests_grow():
    """Between steps, a new request starts on the rank where the fewest requests are computed,
    over free blocks; a finished request no longer counts; a rank that cannot hold the
    allocation is passed over while another can."""
    p = RankPlacement(3, 16)
    for req, rank in (("a", 0), ("b", 0), ("c", 1)):
        p.add_existing(req, rank)
    assert p.growing_on() == [2, 1, 0]
    p.begin_step()
    assert p.choose("d", 1, [50, 50, 10]) == [2]
    assert p.choose("d", 20, [50, 50, 10]) == [1] * 20  # rank 2 cannot hold 20 blocks
    assert p.choose("d", 90, [50, 50, 10]) == [2] * 10 + [0] * 50 + [1] * 30  # none can: any rank
    p.free("c")
    p.free("unknown")
    assert p.growing_on() == [2, 0, 0]
    assert p.choose("d", 1, [50, 60, 60]) == [1]
    p.add_existing("a", 2)  # "a" onboards rank 2: its tokens now run there
    assert p.growing_on() == [1, 0, 1]


def test_mid_plan_accounts_for_own_blocks():
    # Unlimited quota: the request fills rank 0, and once the plan exhausted it moves on.
    p = RankPlacement(3, 16)
    assert p.choose("a", 7, [4, 2, 3]) == [0] * 4 + [2] * 3
    assert p.choose("a", 10, [4, 2, 3]) is None


@given(k=st.integers(1, 4), num_ranks=st.integers(1, 6), blocks=st.integers(1, 3))
@settings(max_examples=50, deadline=None)
def test_short_requests_are_balanced(k, num_ranks, blocks):
    p = RankPlacement(num_ranks, 16, max_tokens_per_rank=1000)
    free = [100] * num_ranks
    per_rank = [0] * num_ranks
    for i in range(k * num_ranks):
        got = p.choose(f"r{i}", blocks, free)
        assert len(set(got)) == 1  # short requests stay on one rank
        p.commit(f"r{i}", got)
        free[got[0]] -= blocks
        per_rank[got[0]] += 1
    assert per_rank == [k] * num_ranks


def test_full_ranks_are_skipped():
    p = RankPlacement(4, 1, max_tokens_per_rank=2)
    assert p.choose("a", 4, [0, 3, 0, 3]) == [1, 1, 3, 3]
    # Ranks 0 and 2 stay skipped; the fifth block grows past quota on rank 3 (the newest).
    assert p.choose("a", 5, [0, 3, 0, 3]) == [1, 1, 3, 3, 3]
    # Then rank 3 is full: back to rank 1, the only used rank with room.
    assert p.choose("a", 6, [0, 3, 0, 3]) == [1, 1, 3, 3, 3, 1]
    assert p.choose("a", 7, [0, 3, 0, 3]) is None
    assert p.choose("b", 1, [0, 0, 0, 1]) == [3]


def test_newest_rank_runs_out_before_quota():
    p = RankPlacement(3, 1, max_tokens_per_rank=10)
    p.commit("a", p.choose("a", 2, [5, 2, 1]))
    assert p.ranks_of("a") == [0]
    # Rank 0 (the newest) is now empty although below quota: onboard the next, never go back.
    got = p.choose("a", 3, [0, 2, 1])
    assert got == [1, 1, 2]
    p.commit("a", got)
    # No unused rank is left and the newest (2) is full: rank 0 (older, has room) takes it.
    assert p.choose("a", 1, [9, 0, 0]) == [0]
    p.commit("a", [0])
    assert p.ranks_of("a") == [0, 1, 2]  # order unchanged, no new onboarding
    assert p.blocks_on("a") == {0: 3, 1: 2, 2: 1} and p.num_onboard_events == 3


def test_none_when_pool_cannot_fit():
    p = RankPlacement(2, 1)
    assert p.choose("a", 1, [0, 0]) is None
    assert p.choose("a", 5, [2, 2]) is None
    assert p.choose("a", 4, [2, 2]) == [0, 0, 1, 1]
    assert p.choose("a", 3, [1, 1]) is None
    # Quotas never make a plan fail: past every rank's quota the newest rank keeps growing.
    assert RankPlacement(2, 1, max_tokens_per_rank=2).choose("a", 5, [9, 9]) == [0, 0, 1, 1, 1]


def test_plan_is_side_effect_free():
    p = RankPlacement(3, 4, max_tokens_per_rank=8)
    calls = []
    p.on_onboard = lambda *a: calls.append(a)
    free = [5, 5, 5]
    first = p.choose("a", 5, free)
    assert p.choose("a", 5, free) == first
    assert free == [5, 5, 5]
    assert p.ranks_of("a") == [] and p.blocks_on("a") == {} and "a" not in p
    assert p.num_onboard_events == 0 and calls == []


def test_add_existing_counts_toward_quota():
    p = RankPlacement(3, 4, max_tokens_per_rank=8)  # quota 2 blocks
    p.add_existing("a", 2)
    assert p.ranks_of("a") == [2] and p.blocks_on("a") == {2: 1}
    got = p.choose("a", 3, [5, 6, 5])
    assert got == [2, 1, 1]  # one more fills rank 2, then the least-loaded unused rank
    p.commit("a", got)
    assert p.blocks_on("a") == {2: 2, 1: 2}


def test_free_forgets():
    p = RankPlacement(2, 1, max_tokens_per_rank=1)
    p.commit("a", p.choose("a", 2, [5, 5]))
    assert p.choose("a", 1, [5, 5]) == [1]  # both ranks at quota: stays on the newest
    assert p.choose("a", 1, [5, 0]) == [0]  # newest full: the other used rank
    p.free("a")
    assert p.ranks_of("a") == [] and p.blocks_on("a") == {} and len(p) == 0
    assert p.choose("a", 1, [5, 6]) == [1]  # a fresh request again starts on the least-loaded
    assert p.choose("a", 2, [5, 6]) == [1, 0]  # and onboards at quota 1
    p.free("never-seen")  # no error


def test_a_grows_past_quota_on_newest_rank():
    """(a) No unused rank has room and the newest one does: keep growing there past the quota,
    even when an older used rank has more free blocks."""
    p = RankPlacement(3, 1, max_tokens_per_rank=2)
    events = []
    p.on_onboard = lambda req, rank, tok: events.append((rank, tok))
    got = p.choose("a", 7, [9, 9, 0])
    assert got == [0, 0, 1, 1, 1, 1, 1]
    p.commit("a", got)
    assert p.ranks_of("a") == [0, 1] and p.blocks_on("a") == {0: 2, 1: 5}
    assert p.choose("a", 2, [20, 3, 0]) == [1, 1]  # newest over older rank 0 with more room
    # An unused rank with room is still preferred over (a) once it appears (here: right after
    # the quota was passed, so not at a multiple of it).
    got = p.choose("a", 1, [20, 3, 4])
    assert got == [2]
    p.commit("a", got)
    assert events == [(0, 0), (1, 2), (2, 7)]
    assert p.choose("a", 3, [20, 3, 4]) == [2, 2, 2]  # newest again: quota 2 then (a) past it


def test_b_full_newest_takes_most_free_used_rank():
    """(b) No unused rank has room and the newest is full: the used rank with the most free
    blocks (ties -> lowest id) takes the block; ranks order and onboard count are unchanged."""
    p = RankPlacement(4, 1, max_tokens_per_rank=1)
    p.commit("a", p.choose("a", 3, [5, 5, 5, 0]))
    assert p.ranks_of("a") == [0, 1, 2] and p.num_onboard_events == 3
    assert p.choose("a", 1, [3, 5, 0, 0]) == [1]  # most free
    assert p.choose("a", 1, [4, 4, 0, 0]) == [0]  # tie -> lowest id
    assert p.choose("a", 1, [4, 4, 0, 1]) == [3]  # an unused rank with room beats (b)
    assert p.choose("a", 1, [0, 0, 1, 0]) == [2]  # the newest has room again: (a)
    # Per block, from the unchanged newest rank 2: each block re-picks the most free used rank.
    got = p.choose("a", 4, [3, 2, 0, 0])
    assert got == [0, 0, 1, 0]
    p.commit("a", got)
    assert p.ranks_of("a") == [0, 1, 2] and p.num_onboard_events == 3
    assert p.blocks_on("a") == {0: 4, 1: 2, 2: 1}
    # Stepwise decode gives the same blocks as one batched plan.
    q = RankPlacement(4, 1, max_tokens_per_rank=1)
    q.commit("a", [0, 1, 2])
    assert grow(q, "a", 4, [3, 2, 0, 0]) == [0, 0, 1, 0]


def test_c_none_only_when_no_rank_has_room():
    """(c) choose() fails only when some block finds no rank with a free block at all."""
    p = RankPlacement(3, 1, max_tokens_per_rank=1)
    assert p.choose("a", 1, [0, 0, 0]) is None
    p.commit("a", p.choose("a", 2, [5, 5, 0]))
    assert p.choose("a", 1, [0, 0, 0]) is None
    assert p.choose("a", 4, [1, 1, 1]) is None
    assert sorted(p.choose("a", 3, [1, 1, 1])) == [0, 1, 2]  # every free block is usable
    assert p.choose("a", 2, [0, 0, 2]) == [2, 2]  # onboard, then grow past quota on it
    assert p.choose("a", 2, [2, 0, 0]) == [0, 0]  # older rank only
    assert p.choose("a", 3, [2, 0, 0]) is None


@given(num_ranks=st.integers(1, 5), block_size=st.integers(1, 3),
       max_tokens=st.one_of(st.none(), st.integers(1, 8)), data=st.data())
@settings(max_examples=150, deadline=None)
def test_batched_plan_matches_reference_and_stepwise(num_ranks, block_size, max_tokens, data):
    quota = -(-max_tokens // block_size) if max_tokens else None
    p = RankPlacement(num_ranks, block_size, max_tokens_per_rank=max_tokens)
    q = RankPlacement(num_ranks, block_size, max_tokens_per_rank=max_tokens)
    history = data.draw(st.lists(st.integers(0, num_ranks - 1), max_size=10))
    for r in history:  # arbitrary prior blocks (e.g. prefix hits), including older ranks
        p.add_existing("a", r)
        q.add_existing("a", r)
    free = data.draw(st.lists(st.integers(0, 6), min_size=num_ranks, max_size=num_ranks))
    k = data.draw(st.integers(1, 12))
    got = p.choose("a", k, free)
    assert (got is None) == (k > sum(free))  # (c)
    ref = reference_plan(history, k, free, quota, num_ranks)
    assert (ref and ref[0]) == got
    if got is not None:
        assert grow(q, "a", k, list(free)) == got


@given(num_ranks=st.integers(1, 5), existing=st.integers(0, 7), n=st.integers(0, 20))
@settings(max_examples=50, deadline=None)
def test_striped_layout(num_ranks, existing, n):
    p = RankPlacement(num_ranks, 16, policy="striped")
    for i in range(existing):
        p.add_existing("a", i % num_ranks)
    assert p.choose("a", n, [100] * num_ranks) == [(existing + i) % num_ranks for i in range(n)]


def test_striped_none_when_target_rank_full():
    p = RankPlacement(3, 16, policy="striped")
    assert p.choose("a", 3, [1, 0, 9]) is None  # block 1 must go to rank 1, which is full
    assert p.choose("a", 4, [2, 1, 1]) == [0, 1, 2, 0]
    assert p.choose("a", 4, [1, 1, 1]) is None  # block 3 needs a second rank-0 block


def test_auto_stripes_long_prompts_and_keeps_short_ones_whole():
    p = RankPlacement(2, 16, policy="auto", stripe_min_tokens=64)
    free = [100, 100]
    p.begin_step()
    p.admit("short", 64)  # at the threshold: placed as under onboard
    got = p.choose("short", 4, free)
    assert len(set(got)) == 1
    p.commit("short", got)
    free[got[0]] -= 4
    p.admit("long", 65)
    long_ = p.choose("long", 5, free)
    # striped from the rank a new request would start on: the one not used by "short" this step
    assert long_ == [1 - got[0], got[0], 1 - got[0], got[0], 1 - got[0]]
    p.commit("long", long_)
    assert p.is_striped("long") and not p.is_striped("short")
    # a decode block keeps the rotation; the short request keeps growing on its one rank
    assert p.choose("long", 1, [50, 50]) == [got[0]]
    assert grow(p, "short", 3, [50, 50]) == [got[0]] * 3


def test_auto_admission_is_fixed_for_life_and_forgotten_on_free():
    p = RankPlacement(3, 16, policy="auto", stripe_min_tokens=10)
    p.admit("a", 5)
    p.admit("a", 500)  # a known request keeps its placement
    assert not p.is_striped("a")
    p.free("a")
    assert "a" not in p
    p.admit("a", 500)  # readmitted (recomputed after preemption) with more tokens
    assert p.is_striped("a")


def test_auto_striped_falls_back_to_a_rank_with_room():
    p = RankPlacement(2, 16, policy="auto", stripe_min_tokens=0)
    p.admit("a", 1)
    assert p.choose("a", 4, [3, 1]) == [0, 1, 0, 0]  # rank 1 full after one block: rank 0 takes it
    assert p.choose("a", 4, [2, 1]) is None


@given(num_ranks=st.integers(1, 5), cached=st.integers(0, 7), n=st.integers(1, 20),
       start_free=st.lists(st.integers(30, 60), min_size=5, max_size=5))
@settings(max_examples=50, deadline=None)
def test_auto_striped_rotates_after_prefix_hits(num_ranks, cached, n, start_free):
    p = RankPlacement(num_ranks, 16, policy="auto", stripe_min_tokens=0)
    p.admit("a", 1)
    for i in range(cached):
        p.add_existing("a", (3 * i) % num_ranks)  # cached blocks, wherever they are
    free = start_free[:num_ranks]
    got = p.choose("a", n, free)
    start = got[0]
    assert got == [(start + i) % num_ranks for i in range(n)]
    p.commit("a", got)
    assert p.choose("a", 1, free) == [(start + n) % num_ranks]


class PlacementMachine(RuleBasedStateMachine):
    """Random choose/commit/add_existing/free against a model that only tracks block counts."""

    @initialize(num_ranks=st.integers(1, 5), cap=st.integers(1, 12), block_size=st.integers(1, 4),
                max_tokens=st.one_of(st.none(), st.integers(1, 20)), cap_as_quota=st.booleans(),
                policy=st.sampled_from(["onboard", "striped"]))
    def setup(self, num_ranks, cap, block_size, max_tokens, cap_as_quota, policy):
        self.n, self.cap, self.policy = num_ranks, cap, policy
        bpr = cap if cap_as_quota else None
        self.p = RankPlacement(num_ranks, block_size, policy, max_tokens, blocks_per_rank=bpr)
        self.quota = -(-max_tokens // block_size) if max_tokens else bpr  # None = unlimited
        self.model: dict[str, list[int]] = {}  # req -> rank of each of its blocks, in order
        self.events = 0
        self.step_blocks = [0] * num_ranks  # blocks committed since the last begin_step

    def growing(self):
        """Requests whose newest (last first-used) rank is each rank."""
        out = [0] * self.n
        for blocks in self.model.values():
            if blocks:
                out[list(dict.fromkeys(blocks))[-1]] += 1
        return out

    @rule()
    def begin_step(self):
        self.p.begin_step()
        self.step_blocks = [0] * self.n

    def free_counts(self):
        used = [0] * self.n
        for blocks in self.model.values():
            for r in blocks:
                used[r] += 1
        return [self.cap - u for u in used]

    def fits(self, req, k, free):
        """Independent feasibility check: can choose() place k more blocks for req?"""
        if self.policy == "striped":
            blocks = self.model.get(req, [])
            need = [(len(blocks) + i) % self.n for i in range(k)]
            return all(need.count(r) <= free[r] for r in set(need))
        # Onboard: quotas never block, any rank with a free block can take one (c).
        return k <= sum(free)

    @rule(req=st.sampled_from("abcd"), k=st.integers(1, 8))
    def allocate(self, req, k):
        free = self.free_counts()
        got = self.p.choose(req, k, free)
        assert (got is not None) == self.fits(req, k, free)
        if got is None:
            return
        assert len(got) == k
        for r in set(got):
            assert got.count(r) <= free[r]  # never exceeds a rank's free blocks
        old = self.model.get(req, [])
        if self.policy == "striped":
            assert got == [(len(old) + i) % self.n for i in range(k)]
        else:
            ref, kinds = reference_plan(old, k, free, self.quota, self.n, self.step_blocks,
                                        self.growing())
            assert got == ref
            # Cross-checks on the reference's choices, block by block.
            blocks, running = list(old), list(free)
            for r, kind in zip(got, kinds):
                order = list(dict.fromkeys(blocks))
                unused_room = [x for x in range(self.n) if x not in order and running[x] > 0]
                if kind == "onboard":
                    assert r not in order and r in unused_room
                else:
                    assert r in order  # (a)/(b)/stay never onboard a rank
                if kind in ("a", "b"):
                    assert not unused_room  # unused ranks with room always come first
                if kind == "a":
                    assert r == order[-1] and blocks.count(r) >= self.quota
                if kind == "b":
                    assert running[order[-1]] == 0 and r != order[-1]
                    assert running[r] == max(running[x] for x in order)
                if unused_room and self.quota is not None:
                    # while unused ranks with room exist, no rank exceeds its quota
                    assert blocks.count(r) < self.quota
                running[r] -= 1
                blocks.append(r)
        self.events += len(set(old + got)) - len(set(old))
        self.p.commit(req, got)
        self.model[req] = old + got
        for r in got:
            self.step_blocks[r] += 1

    @precondition(lambda self: any(f > 0 for f in self.free_counts()))
    @rule(req=st.sampled_from("abcd"), data=st.data())
    def prefix_hit(self, req, data):
        free = self.free_counts()
        r = data.draw(st.sampled_from([x for x in range(self.n) if free[x] > 0]))
        old = self.model.get(req, [])
        self.events += r not in old
        self.p.add_existing(req, r)
        self.model[req] = old + [r]

    @rule(req=st.sampled_from("abcd"))
    def finish(self, req):
        self.p.free(req)
        self.model.pop(req, None)

    @invariant()
    def consistent(self):
        if not hasattr(self, "p"):
            return
        assert all(f >= 0 for f in self.free_counts())
        for req in "abcd":
            blocks = self.model.get(req, [])
            assert self.p.blocks_on(req) == {r: blocks.count(r) for r in set(blocks)}
            order = list(dict.fromkeys(blocks))  # first-use order
            assert self.p.ranks_of(req) == order
        assert self.p.num_onboard_events == self.events
        if self.policy == "onboard":
            assert self.p.growing_on() == self.growing()


TestPlacementMachine = PlacementMachine.TestCase
TestPlacementMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)

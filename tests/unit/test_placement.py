"""Properties of vllm_kvp.placement.RankPlacement (pure Python, no torch/vLLM needed)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vllm_kvp.placement import RankPlacement


def runs(ranks):
    """Collapse consecutive equal ranks: [0,0,2,2,1] -> [0,2,1]."""
    return [r for r, _ in itertools.groupby(ranks)]


def grow(p, req, n, free):
    """Allocate n blocks one decode step at a time, updating `free` like the real pool would."""
    placed = []
    for _ in range(n):
        got = p.plan(req, 1, free)
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
     ((2, 16), dict(blocks_per_rank=0), "blocks_per_rank")],
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
    for bad in (lambda: p.plan("a", 1, [5]), lambda: p.plan("a", -1, [5, 5]),
                lambda: p.commit("a", [2])):  # wrong rank count, negative n, rank out of range
        with pytest.raises(ValueError):
            bad()
    assert p.plan("a", 0, [0, 0]) == []


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
    placed = grow(p, "r", n, free) if stepwise else p.plan("r", n, free)
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
    # Every rank is at quota and none is unused: one more block cannot be placed.
    assert p.plan("r", 1, free) is None


def test_least_loaded_choice_lowest_id_on_ties():
    assert RankPlacement(4, 16).plan("a", 1, [3, 9, 9, 2]) == [1]
    assert RankPlacement(4, 16).plan("a", 1, [5, 5, 5, 5]) == [0]
    p = RankPlacement(4, 1, max_tokens_per_rank=2)
    # rank 1 first (most free), then rank 3 (most free among unused), then 0 over 2 (tie -> low id)
    assert p.plan("a", 6, [5, 9, 5, 7]) == [1, 1, 3, 3, 0, 0]


def test_mid_plan_accounts_for_own_blocks():
    # Unlimited quota: the request fills rank 0, and once the plan exhausted it moves on.
    p = RankPlacement(3, 16)
    assert p.plan("a", 7, [4, 2, 3]) == [0] * 4 + [2] * 3
    assert p.plan("a", 10, [4, 2, 3]) is None


@given(k=st.integers(1, 4), num_ranks=st.integers(1, 6), blocks=st.integers(1, 3))
@settings(max_examples=50, deadline=None)
def test_short_requests_are_balanced(k, num_ranks, blocks):
    p = RankPlacement(num_ranks, 16, max_tokens_per_rank=1000)
    free = [100] * num_ranks
    per_rank = [0] * num_ranks
    for i in range(k * num_ranks):
        got = p.plan(f"r{i}", blocks, free)
        assert len(set(got)) == 1  # short requests stay on one rank
        p.commit(f"r{i}", got)
        free[got[0]] -= blocks
        per_rank[got[0]] += 1
    assert per_rank == [k] * num_ranks


def test_full_ranks_are_skipped():
    p = RankPlacement(4, 1, max_tokens_per_rank=2)
    assert p.plan("a", 5, [0, 3, 0, 3]) is None
    assert p.plan("a", 4, [0, 3, 0, 3]) == [1, 1, 3, 3]
    assert p.plan("b", 1, [0, 0, 0, 1]) == [3]


def test_newest_rank_runs_out_before_quota():
    p = RankPlacement(3, 1, max_tokens_per_rank=10)
    p.commit("a", p.plan("a", 2, [5, 2, 1]))
    assert p.ranks_of("a") == [0]
    # Rank 0 (the newest) is now empty although below quota: onboard the next, never go back.
    got = p.plan("a", 3, [0, 2, 1])
    assert got == [1, 1, 2]
    p.commit("a", got)
    assert p.plan("a", 1, [9, 0, 0]) is None  # rank 0 has room again but is older
    assert p.ranks_of("a") == [0, 1, 2]


def test_none_when_pool_cannot_fit():
    p = RankPlacement(2, 1)
    assert p.plan("a", 1, [0, 0]) is None
    assert p.plan("a", 5, [2, 2]) is None
    assert p.plan("a", 4, [2, 2]) == [0, 0, 1, 1]
    assert RankPlacement(2, 1, max_tokens_per_rank=2).plan("a", 5, [9, 9]) is None  # quotas


def test_plan_is_side_effect_free():
    p = RankPlacement(3, 4, max_tokens_per_rank=8)
    calls = []
    p.on_onboard = lambda *a: calls.append(a)
    free = [5, 5, 5]
    first = p.plan("a", 5, free)
    assert p.plan("a", 5, free) == first
    assert free == [5, 5, 5]
    assert p.ranks_of("a") == [] and p.blocks_on("a") == {} and "a" not in p
    assert p.num_onboard_events == 0 and calls == []


def test_add_existing_counts_toward_quota():
    p = RankPlacement(3, 4, max_tokens_per_rank=8)  # quota 2 blocks
    p.add_existing("a", 2)
    assert p.ranks_of("a") == [2] and p.blocks_on("a") == {2: 1}
    got = p.plan("a", 3, [5, 6, 5])
    assert got == [2, 1, 1]  # one more fills rank 2, then the least-loaded unused rank
    p.commit("a", got)
    assert p.blocks_on("a") == {2: 2, 1: 2}


def test_free_forgets():
    p = RankPlacement(2, 1, max_tokens_per_rank=1)
    p.commit("a", p.plan("a", 2, [5, 5]))
    assert p.plan("a", 1, [5, 5]) is None  # both ranks at quota
    p.free("a")
    assert p.ranks_of("a") == [] and p.blocks_on("a") == {} and len(p) == 0
    assert p.plan("a", 1, [5, 5]) == [0]
    p.free("never-seen")  # no error


@given(num_ranks=st.integers(1, 5), existing=st.integers(0, 7), n=st.integers(0, 20))
@settings(max_examples=50, deadline=None)
def test_striped_layout(num_ranks, existing, n):
    p = RankPlacement(num_ranks, 16, policy="striped")
    for i in range(existing):
        p.add_existing("a", i % num_ranks)
    assert p.plan("a", n, [100] * num_ranks) == [(existing + i) % num_ranks for i in range(n)]


def test_striped_none_when_target_rank_full():
    p = RankPlacement(3, 16, policy="striped")
    assert p.plan("a", 3, [1, 0, 9]) is None  # block 1 must go to rank 1, which is full
    assert p.plan("a", 4, [2, 1, 1]) == [0, 1, 2, 0]
    assert p.plan("a", 4, [1, 1, 1]) is None  # block 3 needs a second rank-0 block


class PlacementMachine(RuleBasedStateMachine):
    """Random plan/commit/add_existing/free against a model that only tracks block counts."""

    @initialize(num_ranks=st.integers(1, 5), cap=st.integers(1, 12), block_size=st.integers(1, 4),
                max_tokens=st.one_of(st.none(), st.integers(1, 20)),
                policy=st.sampled_from(["onboard", "striped"]))
    def setup(self, num_ranks, cap, block_size, max_tokens, policy):
        self.n, self.cap, self.policy = num_ranks, cap, policy
        self.p = RankPlacement(num_ranks, block_size, policy, max_tokens, blocks_per_rank=cap)
        self.quota = -(-max_tokens // block_size) if max_tokens else cap
        self.model: dict[str, list[int]] = {}  # req -> rank of each of its blocks, in order
        self.events = 0

    def free_counts(self):
        used = [0] * self.n
        for blocks in self.model.values():
            for r in blocks:
                used[r] += 1
        return [self.cap - u for u in used]

    def fits(self, req, k, free):
        """Independent feasibility check: can plan() place k more blocks for req?"""
        blocks = self.model.get(req, [])
        if self.policy == "striped":
            need = [(len(blocks) + i) % self.n for i in range(k)]
            return all(need.count(r) <= free[r] for r in set(need))
        # The greedy takes min(free, remaining quota) from each rank it may still use.
        order = list(dict.fromkeys(blocks))  # first-use order; last = newest rank
        total = 0
        if order:
            newest = order[-1]
            total += max(0, min(free[newest], self.quota - blocks.count(newest)))
        total += sum(min(free[r], self.quota) for r in range(self.n) if r not in set(order))
        return k <= total

    @rule(req=st.sampled_from("abcd"), k=st.integers(1, 8))
    def allocate(self, req, k):
        free = self.free_counts()
        got = self.p.plan(req, k, free)
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
            old_order = list(dict.fromkeys(old))
            newest = old_order[-1] if old_order else None
            assert len(runs(got)) == len(set(got))  # ranks form contiguous runs
            assert newest not in got or got[0] == newest  # once left, newest is never revisited
            for r in set(got):
                # only the newest rank or ranks the request never used: never an older one
                assert r == newest or r not in old
                assert old.count(r) + got.count(r) <= self.quota
            # each rank onboarded in this plan was the least-loaded unused one at that moment
            running, used = list(free), set(old)
            for r in got:
                if r not in used:
                    cands = [x for x in range(self.n) if x not in used]
                    assert running[r] == max(running[x] for x in cands) > 0
                    assert r == min(x for x in cands if running[x] == running[r])
                    used.add(r)
                running[r] -= 1
        self.events += len(set(old + got)) - len(set(old))
        self.p.commit(req, got)
        self.model[req] = old + got

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


TestPlacementMachine = PlacementMachine.TestCase
TestPlacementMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)

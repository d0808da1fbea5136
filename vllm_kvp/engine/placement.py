"""Which KV rank each new KV-cache block of a request is taken from.

The scheduler sees one pool of N*P logical blocks, but logical block b physically lives on rank
b // P. This module only decides the *rank* for each new block; the caller then takes a free block
from that rank's slice of the pool. It is kept free of torch/vLLM so it can be unit-tested (and
reasoned about) on its own.

Policies
--------
"onboard" (default): a request fills one rank at a time. It starts on the rank with the least
compute in hand (see below) and keeps adding blocks to its newest rank until that rank holds its
quota for the request (or runs out of free blocks); then it "onboards" the least-loaded (most free
blocks) rank it does not use yet, so each rank holds one contiguous token range of the request.
Once the request uses every rank that has room, the threshold stops mattering: it keeps growing on
its newest rank, and if that one is full, on the used rank with the most room. Exactness never
depends on the layout: attention merges partial results over whatever blocks each rank holds.

Under owner computes a request's new tokens are computed on its newest rank, so where a request
starts decides which rank runs its prefill and decode. The starting rank is the one with the fewest
blocks handed out in the current scheduling step (two prompts scheduled together start on
different ranks, so their prefill chunks run in parallel), then the fewest requests growing on it
(decode tokens per step), then the most free blocks; a rank that cannot hold this allocation is
passed over while another can. Free blocks alone let near-ties put both prompts of a step on one
rank (measured: a fifth of a batch's throughput lost).

"striped": block i of the request goes to rank i % N. The layout depends only on the block index,
which is handy for debugging and for comparing against a fixed reference layout.

"auto": a request admitted with more than `stripe_min_tokens` tokens to prefill is striped, from
the rank a new request would start on (block i to rank (start + i) % N); any other request is
placed as under "onboard". A long prompt's prefill chunks then run on all ranks at once (each
computes the tokens of its blocks), while short requests stay whole on one rank, where their steps
exchange nothing (a step's queries and partials travel only for requests that span ranks). With
onboard alone a long prompt prefills on one rank at a time; with striped alone every request spans
ranks and every one of its decode steps exchanges.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

POLICIES = ("onboard", "striped", "auto")


class _ReqState:
    """Per-request bookkeeping: ranks in onboarding order and block counts per rank."""

    __slots__ = ("ranks", "starts", "used", "counts", "num_blocks", "striped", "offset")

    def __init__(self, striped: bool = False) -> None:
        self.ranks: list[int] = []
        self.starts: list[int] = []  # first token position held by each rank in `ranks`
        self.used: set[int] = set()  # O(1) membership; `ranks` keeps the order
        self.counts: dict[int, int] = {}
        self.num_blocks = 0
        self.striped = striped  # blocks dealt round robin: block i to rank (offset + i) % N
        self.offset: Optional[int] = 0 if striped else None


class RankPlacement:
    def __init__(
        self,
        num_ranks: int,
        block_size: int,
        policy: str = "onboard",
        max_tokens_per_rank: Optional[int] = None,
        blocks_per_rank: Optional[int] = None,
        stripe_min_tokens: Optional[int] = None,
    ) -> None:
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"num_ranks must be an integer >= 1, got {num_ranks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}; expected one of {POLICIES}")
        if max_tokens_per_rank is not None and (
            not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1
        ):
            raise ValueError(
                f"max_tokens_per_rank must be a positive integer or None, got {max_tokens_per_rank!r}"
            )
        if blocks_per_rank is not None and (
            not isinstance(blocks_per_rank, int) or blocks_per_rank < 1
        ):
            raise ValueError(
                f"blocks_per_rank must be a positive integer or None, got {blocks_per_rank!r}"
            )
        if stripe_min_tokens is not None and (
            not isinstance(stripe_min_tokens, int) or stripe_min_tokens < 0
        ):
            raise ValueError(
                f"stripe_min_tokens must be a non-negative integer or None, got {stripe_min_tokens!r}"
            )
        if policy == "auto" and stripe_min_tokens is None:
            raise ValueError("placement 'auto' needs stripe_min_tokens")
        self.stripe_min_tokens = stripe_min_tokens
        self.num_ranks = num_ranks
        self.block_size = block_size
        self.policy = policy
        self.max_tokens_per_rank = max_tokens_per_rank
        self.blocks_per_rank = blocks_per_rank
        # The threshold is in tokens but we place whole blocks: a rank is full for a request once
        # its blocks cover max_tokens_per_rank tokens, i.e. after ceil(max_tokens / block_size).
        if max_tokens_per_rank is not None:
            self.quota: Optional[int] = -(-max_tokens_per_rank // block_size)
        else:
            self.quota = blocks_per_rank  # None = unlimited; only running out of blocks onboards
        self._reqs: dict[str, _ReqState] = {}
        self._growing = [0] * num_ranks  # requests whose newest rank is r (their tokens run there)
        self._step_blocks = [0] * num_ranks  # blocks committed to r in the current scheduling step
        self.num_onboard_events = 0
        # Called as on_onboard(req_id, rank, token_index) when a request starts using a rank;
        # token_index is the first token position that lives on that rank.
        self.on_onboard: Optional[Callable[[str, int, int], None]] = None

    # ------------------------------------------------------------------ queries

    def is_striped(self, req_id: str) -> bool:
        st = self._reqs.get(req_id)
        return bool(st and st.striped)

    def ranks_of(self, req_id: str) -> list[int]:
        st = self._reqs.get(req_id)
        return list(st.ranks) if st else []

    def rank_starts(self, req_id: str) -> list[int]:
        """First token position each of ranks_of(req_id) holds (its onboarding point)."""
        st = self._reqs.get(req_id)
        return list(st.starts) if st else []

    def blocks_on(self, req_id: str) -> dict[int, int]:
        st = self._reqs.get(req_id)
        return dict(st.counts) if st else {}

    def num_blocks(self, req_id: str) -> int:
        st = self._reqs.get(req_id)
        return st.num_blocks if st else 0

    def growing_on(self) -> list[int]:
        """Requests whose newest rank is each rank (where their new tokens are computed)."""
        return list(self._growing)

    # ------------------------------------------------------------------ planning

    def admit(self, req_id: str, tokens: int) -> None:
        """A request about to take its first blocks, with `tokens` tokens to prefill (prompt, and
        outputs when it is recomputed): fixes whether it is striped. Known requests are left as
        they are (a placement holds for a request's life)."""
        if req_id in self._reqs:
            return
        striped = self.policy == "striped" or (
            self.policy == "auto" and tokens > self.stripe_min_tokens)
        st = _ReqState(striped)
        if striped and self.policy == "auto":
            st.offset = None  # starts where a new request would (the first choice fixes it)
        self._reqs[req_id] = st

    def begin_step(self) -> None:
        """A scheduling step starts: blocks handed out from now on count toward its balance."""
        self._step_blocks = [0] * self.num_ranks

    def choose(
        self, req_id: str, num_new_blocks: int, free_blocks: Sequence[int]
    ) -> Optional[list[int]]:
        """Rank for each of the request's next num_new_blocks blocks, given every rank's free
        block count. None if they cannot all be placed (the caller then fails the allocation,
        as vLLM does for an empty pool). Does not change any state."""
        if num_new_blocks < 0:
            raise ValueError(f"num_new_blocks must be >= 0, got {num_new_blocks}")
        if len(free_blocks) != self.num_ranks:
            raise ValueError(
                f"free_blocks has {len(free_blocks)} entries but there are {self.num_ranks} ranks"
            )
        if num_new_blocks == 0:
            return []
        # Work on a copy: blocks taken earlier in this choice reduce what later ones can use.
        free = list(free_blocks)
        st = self._reqs.get(req_id)
        if st is None and self.policy == "striped":
            st = _ReqState(striped=True)
        if st is not None and st.striped:
            return self._plan_striped(st, num_new_blocks, free)
        return self._plan_onboard(st, num_new_blocks, free)

    def _plan_striped(self, st: _ReqState, n: int, free: list[int]) -> Optional[list[int]]:
        first = st.num_blocks
        offset = st.offset
        if offset is None:
            start = self._pick_start_rank(free, -(-n // self.num_ranks))
            if start is None:
                return None
            offset = (start - first) % self.num_ranks
        out = []
        for i in range(first, first + n):
            r = (offset + i) % self.num_ranks
            if free[r] <= 0:
                if self.policy == "striped":
                    return None  # keep the layout deterministic rather than fall back
                # auto: any rank with room (exactness never depends on the layout)
                r = max(range(self.num_ranks), key=lambda k: (free[k], -k))
                if free[r] <= 0:
                    return None
            free[r] -= 1
            out.append(r)
        return out

    def _plan_onboard(
        self, st: Optional[_ReqState], n: int, free: list[int]
    ) -> Optional[list[int]]:
        # Local view of the request's state, so the choice can onboard mid-way without mutating.
        used = set(st.used) if st else set()
        newest = st.ranks[-1] if st and st.ranks else None
        on_newest = st.counts.get(newest, 0) if newest is not None else 0
        quota = self.quota
        out: list[int] = []
        for _ in range(n):
            if newest is None or free[newest] <= 0 or (quota is not None and on_newest >= quota):
                fresh = (self._pick_start_rank(free, n - len(out)) if newest is None
                         else self._pick_new_rank(used, free))
                if fresh is not None:
                    newest, on_newest = fresh, 0
                    used.add(fresh)
                elif free[newest] <= 0 if newest is not None else True:
                    # Every rank with room already holds part of this request and the newest is
                    # full: take the used rank with the most room (None: the pool is full). It is
                    # for this block only: the newest rank does not change (commit keeps
                    # st.ranks as is), so the next block picks again, as a later choose() would.
                    r = self._pick_rank(used, free, among_used=True)
                    if r is None:
                        return None
                    free[r] -= 1
                    out.append(r)
                    continue
                # else: the request spans every rank; the threshold is a target for when to
                # onboard, not a cap, so it keeps growing on its newest rank.
            free[newest] -= 1
            on_newest += 1
            out.append(newest)
        return out

    def _pick_start_rank(self, free: Sequence[int], need: int) -> Optional[int]:
        """First rank of a new request: fewest blocks handed out this step, then fewest requests
        growing on it, then most free blocks, then lowest id; ranks that can hold the `need`
        blocks first (None: no free block anywhere)."""
        ranks = [r for r in range(self.num_ranks) if free[r] > 0]
        if not ranks:
            return None
        fits = [r for r in ranks if free[r] >= need] or ranks
        return min(fits, key=lambda r: (self._step_blocks[r], self._growing[r], -free[r], r))

    def _pick_new_rank(self, used: set[int], free: Sequence[int]) -> Optional[int]:
        """Least-loaded (most free blocks) rank not used by the request; ties -> lowest id."""
        return self._pick_rank(used, free, among_used=False)

    def _pick_rank(self, used: set[int], free: Sequence[int], among_used: bool) -> Optional[int]:
        best, best_free = None, 0
        for r in range(self.num_ranks):
            # Strict '>' keeps the lowest id on ties and skips ranks with no free block.
            if (r in used) == among_used and free[r] > best_free:
                best, best_free = r, free[r]
        return best

    # ------------------------------------------------------------------ state updates

    def commit(self, req_id: str, ranks: list[int]) -> None:
        """Record that the request was given one block on each of `ranks`, in order."""
        st = self._state(req_id)
        if st.striped and st.offset is None and ranks:
            st.offset = (ranks[0] - st.num_blocks) % self.num_ranks
        for r in ranks:
            self._add_block(req_id, st, r)
            self._step_blocks[r] += 1

    def add_existing(self, req_id: str, rank: int) -> None:
        """A block the request got without choose() (a prefix-cache hit) on `rank`. It counts
        toward the request's usage of that rank, and a new rank becomes its newest rank."""
        self._add_block(req_id, self._state(req_id), rank)

    def _state(self, req_id: str) -> _ReqState:
        """The request's state; a request not admitted gets the policy's own layout."""
        st = self._reqs.get(req_id)
        if st is None:
            st = self._reqs[req_id] = _ReqState(striped=self.policy == "striped")
        return st

    def _add_block(self, req_id: str, st: _ReqState, rank: int) -> None:
        if not isinstance(rank, int) or not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank!r} out of range for {self.num_ranks} ranks")
        if rank not in st.used:
            if st.ranks:
                self._growing[st.ranks[-1]] -= 1
            self._growing[rank] += 1
            st.used.add(rank)
            st.ranks.append(rank)
            st.starts.append(st.num_blocks * self.block_size)
            self.num_onboard_events += 1
            if self.on_onboard is not None:
                self.on_onboard(req_id, rank, st.num_blocks * self.block_size)
        st.counts[rank] = st.counts.get(rank, 0) + 1
        st.num_blocks += 1

    def free(self, req_id: str) -> None:
        """Request finished or was preempted: forget it (unknown ids are ignored)."""
        st = self._reqs.pop(req_id, None)
        if st is not None and st.ranks:
            self._growing[st.ranks[-1]] -= 1

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._reqs

    def __len__(self) -> int:
        return len(self._reqs)

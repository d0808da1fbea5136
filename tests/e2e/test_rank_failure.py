"""A dead worker loses no request (issue: rank failure).

Workers are killed for real (SIGKILL, found among the engine core's children), mid-decode and
mid-prefill (the latter from a timer while a step of a prompt spread over the ranks runs, so the
kill lands in the middle of its compute and collectives), any rank including the one that returns
outputs. Every request must complete with the greedy tokens of an undisturbed run on the same
engine, no KV block may stay in use afterwards, and the engine keeps serving. A rank that keeps
dying hits the restart limit and the engine stops (its log names the limit).
"""

from __future__ import annotations

import os
import signal

import pytest

from engines import engine, engine_workers, random_prompts, step_to_completion

pytestmark = pytest.mark.e2e

ENGINE = dict(max_num_batched_tokens=512, max_model_len=4096)


def _kill(rank: int) -> int:
    victim = engine_workers()[rank]
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid


def _run(llm, prompts, max_tokens, kill=None):
    """`kill` = (rank, moment), see `step_to_completion`."""
    if kill is None:
        return step_to_completion(llm, prompts, max_tokens)
    rank, moment = kill
    return step_to_completion(llm, prompts, max_tokens, kill=lambda: _kill(rank), moment=moment)


def _assert_recovered(llm, prompts, max_tokens, expected, rank, moment):
    workers_before = {p.pid for p in engine_workers()}
    got = _run(llm, prompts, max_tokens, kill=(rank, moment))
    assert got == expected, f"outputs differ after killing rank {rank} {moment}"
    assert llm.reset_prefix_cache(), "KV blocks still in use after the recovered requests finished"
    after = {p.pid for p in engine_workers()}
    assert len(after) == len(workers_before) and not after & workers_before  # a fresh world
    assert _run(llm, prompts[:1], 4) == [e[:4] for e in expected[:1]]  # and it keeps serving


@pytest.fixture(scope="module")
def two_ranks(model_path):
    kvp = {"size": 2, "max_tokens_per_rank": 256, "max_rank_restarts": 10}
    with engine(model_path, kvp=kvp, **ENGINE) as llm:
        yield llm


PROMPTS2 = random_prompts([300, 450, 600, 120], 500, seed=5)


@pytest.fixture(scope="module")
def undisturbed2(two_ranks):
    return _run(two_ranks, PROMPTS2, 24)


@pytest.mark.parametrize("rank", [0, 1])
def test_kill_mid_decode_any_rank(two_ranks, undisturbed2, rank):
    """4 requests, 3 of them spanning both ranks (256 tokens per rank), decoding: either worker
    dies (rank 0 returns the outputs)."""
    _assert_recovered(two_ranks, PROMPTS2, 24, undisturbed2, rank, "decode")


def test_kill_mid_prefill(two_ranks, model_path):
    """A 3000-token prompt prefilling in 512-token chunks over both ranks, beside short ones;
    rank 0 dies during its second chunk."""
    prompts = random_prompts([3000, 40, 200], 500, seed=6)
    expected = _run(two_ranks, prompts, 8)
    _assert_recovered(two_ranks, prompts, 8, expected, 0, "prefill")


def test_three_striped_ranks_then_restart_limit(model_path):
    """N = 3, striped: a kill mid-prefill recovers; a second death exceeds max_rank_restarts = 1
    and the engine stops, as plain vLLM does at the first one."""
    prompts = random_prompts([700, 260, 1100], 500, seed=7)  # 1,100 tokens: 3 chunks
    kvp = {"size": 3, "placement": "striped", "max_rank_restarts": 1}
    with engine(model_path, kvp=kvp, **ENGINE) as llm:
        expected = _run(llm, prompts, 12)
        _assert_recovered(llm, prompts, 12, expected, 1, "prefill")
        with pytest.raises(Exception):
            _run(llm, prompts, 12, kill=(0, "decode"))

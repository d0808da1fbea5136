"""Ranks added as a request's context grows; many requests share the ranks (issue: onboarding).

One KVP engine with 3 ranks of P = 9 blocks (128 tokens each) and an onboarding limit of 256
tokens (2 blocks) runs three workloads, each compared with an unconstrained single-worker engine:
a request that grows past 2x the limit during decode, 3 x k short requests that each fit on one
rank, and more requests than the pool holds at once.
"""

import pytest

from engines import assert_same_generation, engine, generate, random_prompts

pytestmark = pytest.mark.e2e

RANKS, P, BLOCK, LIMIT = 3, 9, 128, 256
K = 4  # short requests per rank: a rank's 8-9 usable blocks hold 4 of 2 blocks each
ENGINE = dict(max_model_len=1024, max_num_batched_tokens=2048, max_num_seqs=32)


def workloads():
    return {
        # 230 prompt tokens, then decode to 530: crosses 256 and 512 while generating.
        "growing": (random_prompts([230], 4096, seed=11), 300),
        # 200 + 56 = 256 tokens = 2 blocks each: every request fits on one rank.
        "short": (random_prompts([200] * (RANKS * K), 4096, seed=12), 56),
        # All 12 are admitted with 2 blocks each (24 of the 26 usable), then each needs a third
        # block while decoding to 384 tokens: 36 > 26, so running requests get preempted.
        "pressure": (random_prompts([200] * (RANKS * K), 4096, seed=13), 184),
    }


@pytest.fixture(scope="module")
def reference(model_path):
    with engine(model_path, **ENGINE) as llm:
        return {name: generate(llm, prompts, n) for name, (prompts, n) in workloads().items()}


@pytest.fixture(scope="module")
def kvp_run(model_path):
    kvp = {"size": RANKS, "placement": "onboard", "max_tokens_per_rank": LIMIT}
    with engine(model_path, kvp=kvp, num_gpu_blocks_override=P, disable_log_stats=False,
                **ENGINE) as llm:
        results = {}
        for name, (prompts, n) in workloads().items():
            results[name] = generate(llm, prompts, n)
        metrics = {m.name: m for m in llm.get_metrics()}
    return results, metrics


def test_growing_request_onboards_at_each_crossing(reference, kvp_run):
    got = kvp_run[0]["growing"]
    assert_same_generation(reference["growing"], got, "growing request")
    ranks, starts = got.kvp_ranks[0], got.kvp_rank_starts[0]
    assert len(ranks) == len(set(ranks)) == 3
    assert starts == [0, LIMIT, 2 * LIMIT], f"onboarded at tokens {starts}"


def test_short_requests_spread_evenly(reference, kvp_run):
    got = kvp_run[0]["short"]
    assert_same_generation(reference["short"], got, "short requests")
    assert all(len(r) == 1 for r in got.kvp_ranks), got.kvp_ranks
    per_rank = [sum(r == [rank] for r in got.kvp_ranks) for rank in range(RANKS)]
    assert per_rank == [K] * RANKS, f"requests per rank: {per_rank}"


def test_memory_pressure_preempts_and_stays_exact(reference, kvp_run):
    results, metrics = kvp_run
    assert_same_generation(reference["pressure"], results["pressure"], "under memory pressure")
    preemptions = metrics["vllm:num_preemptions"].value
    assert preemptions > 0, "the pool was meant to run out"

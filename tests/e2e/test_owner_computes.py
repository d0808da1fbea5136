"""Owner computes end to end: each token runs on the KV rank that owns its slot, exactly.

- a 32k-token prompt gives the tokens of one plain worker with 2 `striped` and 3 `onboard` ranks:
  long-context exactness (fp32 sums over tens of thousands of keys in another order);
- with `striped`, a 4k-token prefill is split evenly over the ranks, and over a run every token
  is computed exactly once (the sum over ranks of `tokens_computed` is the tokens processed);
- a rank that owns no token of a step (here: of the whole run) still takes part in every
  collective, so nothing hangs and the tokens are exact, whether such steps are routed
  (step_mode "owner"), local (the request lives on one rank: nothing but the final hidden states
  is exchanged) or run on every rank (shared).
"""

import pytest

from engines import assert_same_generation, engine, generate, random_prompts

pytestmark = pytest.mark.e2e

LONG = 32_000
MAX_TOKENS = 8
ENGINE = dict(max_model_len=LONG + 64, max_num_batched_tokens=8192)
BLOCK = 128  # vLLM's CPU block size


@pytest.fixture(scope="module")
def long_prompt():
    return random_prompts([LONG], 4096, seed=11)


@pytest.fixture(scope="module")
def reference(model_path, long_prompt):
    with engine(model_path, **ENGINE) as llm:
        return generate(llm, long_prompt, MAX_TOKENS)


def _computed(llm):
    return [s["tokens_computed"] for s in llm.collective_rpc("kvp_stats")]


def test_long_context_striped_and_even_prefill_split(model_path, long_prompt, reference):
    with engine(model_path, kvp={"size": 2, "placement": "striped"}, **ENGINE) as llm:
        before = _computed(llm)
        got = generate(llm, long_prompt, MAX_TOKENS)
        mid = _computed(llm)
        generate(llm, random_prompts([4096], 4096, seed=12), 1)
        after = _computed(llm)
    assert_same_generation(reference, got, "32k tokens, kvp=2 striped")
    assert sorted(got.kvp_ranks[0]) == [0, 1]
    run = [m - b for m, b in zip(mid, before)]
    assert sum(run) == LONG + MAX_TOKENS - 1, f"each token computed once: {run}"
    prefill = [a - m for a, m in zip(after, mid)]
    assert sum(prefill) == 4096
    assert max(prefill) - min(prefill) <= BLOCK, f"striped prefill split {prefill}"


def test_long_context_onboard_three_ranks(model_path, long_prompt, reference):
    kvp = {"size": 3, "placement": "onboard", "max_tokens_per_rank": 12_288}
    with engine(model_path, kvp=kvp, **ENGINE) as llm:
        before = _computed(llm)
        got = generate(llm, long_prompt, MAX_TOKENS)
        after = _computed(llm)
    assert_same_generation(reference, got, "32k tokens, kvp=3 onboard")
    assert got.kvp_ranks[0] is not None and len(got.kvp_ranks[0]) == 3
    run = [a - b for a, b in zip(after, before)]
    assert sum(run) == LONG + MAX_TOKENS - 1
    # Onboarding fills a rank before the next: the last rank computes the tail and the decode.
    assert min(run) > 0


SHORT = dict(max_model_len=1024, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def short_prompt():
    return random_prompts([50], 4096, seed=13)


@pytest.fixture(scope="module")
def short_reference(model_path, short_prompt):
    with engine(model_path, **SHORT) as llm:
        return generate(llm, short_prompt, 16)


@pytest.mark.parametrize("step_mode,kind", [("owner", "routed"), ("auto", "local"),
                                            ("auto", "shared")])
def test_rank_that_owns_nothing_takes_part_without_hanging(model_path, short_prompt,
                                                           short_reference, step_mode, kind):
    """One short request lives on one of 2 ranks. "routed" (step_mode "owner"): the other rank runs
    a dummy row in every step, and no layer exchanges anything, since the request does not span
    ranks (only spanning requests' queries and partials travel); "local" (the
    default): no request spans ranks, so no layer exchanges anything, only the final hidden
    states travel; "shared" (split layers): both ranks run every token and the owner's results
    are kept. Either way the idle rank joins every collective and the tokens are exact."""
    prompts, ref = short_prompt, short_reference
    kvp = {"size": 2, "placement": "onboard", "step_mode": step_mode}
    if kind == "shared":
        # every linear layer split, and the fixed rule (one-owner steps are shared) in place of
        # the cost model, which keeps this small model's steps on their owner
        kvp.update(split_min_bytes=0, split_step_tokens=0)
    with engine(model_path, kvp=kvp, **SHORT) as llm:
        stats0 = llm.collective_rpc("kvp_stats")
        got = generate(llm, prompts, 16)
        stats1 = llm.collective_rpc("kvp_stats")
    assert_same_generation(ref, got, f"one short request on 2 ranks, {kind} steps")
    keys = ("tokens_computed", "tokens_shared", "exchanges", "query_bytes", "partial_bytes",
            "hidden_bytes")
    delta = [{k: b[k] - a[k] for k in keys} for a, b in zip(stats0, stats1)]
    steps = [{k: b["steps"][k] - a["steps"][k] for k in a["steps"]} for a, b in zip(stats0, stats1)]
    owner = max(range(2), key=lambda r: delta[r]["tokens_computed"])
    idle = 1 - owner
    tokens = 50 + 16 - 1
    assert (delta[idle]["tokens_computed"], delta[owner]["tokens_computed"]) == (0, tokens)
    assert steps[0] == steps[1] and set(k for k, v in steps[0].items() if v) == {kind}
    assert delta[owner]["tokens_shared"] == 0
    assert delta[idle]["tokens_shared"] == (tokens if kind == "shared" else 0)
    assert delta[0]["exchanges"] == delta[1]["exchanges"] > 0  # the idle rank joined every collective
    # Queries travel only for spanning requests (none here), partials also in shared steps: a
    # local or routed step of local requests sends the final hidden states alone.
    assert delta[owner]["query_bytes"] == 0
    assert (delta[owner]["partial_bytes"] > 0) == (kind == "shared")
    if kind != "shared":
        assert delta[owner]["exchanges"] == sum(steps[owner].values())

"""KV-parallel decode gives the tokens of plain single-worker vLLM (issue: KV-parallel decode).

One batch covers prompts from under one block to over 8,000 tokens, 64 generated tokens each,
chunked prefill forced to 512-token chunks, and two prompts sharing a 3,000-token prefix served
from the prefix cache. Each KVP layout runs it once and is compared with the reference.
"""

import pytest

from engines import assert_same_generation, engine, generate, random_prompts

pytestmark = pytest.mark.e2e

LENGTHS = [3, 16, 33, 200, 1000, 3000, 8200]
ENGINE = dict(max_model_len=12288, max_num_batched_tokens=512, enable_prefix_caching=True)
MAX_TOKENS = 64


def _run(llm):
    """The batch, then the second of two shared-prefix prompts (so it hits the prefix cache)."""
    first = random_prompts(LENGTHS, 4096, seed=1, shared_prefix=3000, num_sharing=2)
    batch = generate(llm, first[:-1], MAX_TOKENS)
    follow = generate(llm, first[-1:], MAX_TOKENS)
    return batch, follow


@pytest.fixture(scope="module")
def reference(model_path):
    with engine(model_path, **ENGINE) as llm:
        return _run(llm)


# Three ranks are covered by the 61k-token onboard test (test_owner_computes) and the onboarding
# test's three crossings; each engine here costs ~25 s of a suite that must stay under 20 minutes.
# The embedded model's linear layers are all under the default split size: N4 splits every one
# (split_min_bytes 0), so its decode steps (at most 7 tokens) run on every rank, each computing a
# quarter of every layer's columns; N2 keeps them whole.
@pytest.mark.parametrize("kvp", [
    {"size": 2, "placement": "striped"},
    {"size": 4, "placement": "onboard", "max_tokens_per_rank": 1024, "split_min_bytes": 0},
], ids=["N2-striped", "N4-onboard1024-split"])
def test_greedy_tokens_match_single_worker(model_path, reference, kvp):
    with engine(model_path, kvp=kvp, **ENGINE) as llm:
        batch, follow = _run(llm)
        stats = llm.collective_rpc("kvp_stats")
    assert_same_generation(reference[0], batch, f"kvp={kvp}")
    assert_same_generation(reference[1], follow, f"kvp={kvp} (prefix-cache hit)")
    assert follow.num_cached_tokens[0] >= 2048, "the shared prefix was not served from the cache"
    split = [s["split_linear_calls"] for s in stats]
    if "split_min_bytes" in kvp:
        # Every rank ran the same split layers in the same steps.
        assert split[0] > 0 and len(set(split)) == 1, split
        assert all(s["column_bytes"] > 0 for s in stats)
    else:
        assert split == [0] * kvp["size"]

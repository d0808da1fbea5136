"""Steps that mix requests on one rank with requests spanning ranks stay exact (issue: local
requests pay nothing).

One batch, under memory pressure and with prefix-cache hits: short requests that live on one
rank, long ones spread over the ranks, and two prompts sharing a 640-token prefix (the second
served from the prefix cache). The pool is small enough that running requests get preempted and
recompute. N = 2 onboard and N = 3 auto (the longest requests striped over all three ranks, the
others placed as under onboard, on one or two ranks; queries sent only to the ranks holding their
KV, `exchange_scope` "holders"; N = 2 striped runs in test_kvp_exact), each against one plain
worker: greedy tokens equal, logprobs within tolerance; the workers' step logs show local steps
(no request spans ranks) and steps in which spanning requests ran.
"""

import pytest

from engines import assert_same_generation, engine, generate, random_prompts

pytestmark = pytest.mark.e2e

BLOCK = 128
ENGINE = dict(max_model_len=2048, max_num_batched_tokens=1024, max_num_seqs=32,
              enable_prefix_caching=True)
# 8 short (at most 128 tokens with their outputs: one block, local under either placement), 4
# long (4-7 blocks).
LENGTHS = [3, 8, 5, 7, 4, 6, 8, 2, 300, 420, 560, 700]
MAX_TOKENS = 120


def _prompts():
    return random_prompts(LENGTHS, 4096, seed=41, shared_prefix=640, num_sharing=2)


def _run(llm):
    prompts = _prompts()
    batch = generate(llm, prompts[:-1], MAX_TOKENS)
    follow = generate(llm, prompts[-1:], MAX_TOKENS)  # its prefix is cached by now
    # Only short requests: every step of this batch is local. Whether the mixed batch above has
    # a step without a spanning request depends on how fast its requests reach the engine core.
    shorts = generate(llm, prompts[:8], 16)
    return batch, follow, shorts


@pytest.fixture(scope="module")
def reference(model_path):
    with engine(model_path, **ENGINE) as llm:
        return _run(llm)


# Blocks per rank: the batch grows to about 37 blocks at once; 2 x 10 and 3 x 7 blocks force
# preemption, while the largest request (7 blocks) still fits.
@pytest.mark.parametrize("kvp,per_rank", [
    ({"size": 2, "placement": "onboard", "max_tokens_per_rank": 256}, 10),
    ({"size": 3, "placement": "auto", "stripe_min_tokens": 600, "max_tokens_per_rank": 384,
      "exchange_scope": "holders"}, 7),
], ids=["N2-onboard256", "N3-auto-scoped"])
def test_mixed_local_and_spanning_steps_exact(model_path, reference, kvp, per_rank):
    with engine(model_path, kvp=kvp, num_gpu_blocks_override=per_rank, disable_log_stats=False,
                **ENGINE) as llm:
        batch, follow, shorts = _run(llm)
        metrics = {m.name: m for m in llm.get_metrics()}
        stats = llm.collective_rpc("kvp_stats")
    assert_same_generation(reference[0], batch, f"kvp={kvp}")
    assert_same_generation(reference[1], follow, f"kvp={kvp} (prefix-cache hit)")
    assert_same_generation(reference[2], shorts, f"kvp={kvp} (short requests only)")
    assert follow.num_cached_tokens[0] >= 512, "the shared prefix was not served from the cache"
    assert metrics["vllm:num_preemptions"].value > 0, "the pool was meant to run out"
    assert any(len(r) > 1 for r in batch.kvp_ranks), batch.kvp_ranks
    assert any(len(r) == 1 for r in batch.kvp_ranks), batch.kvp_ranks
    if kvp["placement"] == "auto":  # every long prompt was striped, whatever room one rank had
        prompts = _prompts()[:-1]
        long_ = [r for p, r in zip(prompts, batch.kvp_ranks) if len(p) > kvp["stripe_min_tokens"]]
        assert long_ and all(len(r) > 1 for r in long_), batch.kvp_ranks
    log = stats[0]["step_log"]
    assert any(kind == "local" for kind, *_ in log), \
        f"no step ran with every request local: {[kind for kind, *_ in log]}"
    assert any(sum(span) for _, _, span, *_ in log), "no step ran a request spanning ranks"
    # Routed steps in which local requests' rows stayed on their rank beside spanning rows (only
    # the spanning ones were exchanged).
    assert any(kind == "routed" and 0 < sum(span) < sum(counts)
               for kind, counts, span, *_ in log), "no routed step mixed local and spanning rows"
    # every rank routed every step alike
    assert all(s["step_log"] == log for s in stats)
    if kvp.get("exchange_scope") == "holders":
        _check_scoped_exchanges(model_path, kvp["size"], stats)


def _check_scoped_exchanges(model_path, world, stats):
    """N = 3 with requests on 2 of the 3 ranks beside striped ones: routed steps sent each
    spanning query only to the ranks holding its request's KV (an all-gather would have reached
    a rank holding none), and each rank's query and partial bytes are what `exchanges` predicts
    for the queries it sent and the partials it returned."""
    import dataclasses

    from vllm_kvp.planner import cost_model as cm
    from vllm_kvp.planner.command import load_model
    from vllm_kvp.step.scope import needs_scope
    from vllm_kvp.step_policy import PARTIALS, QUERIES, exchanges

    log = stats[0]["step_log"]
    scopes = [scope for *_, scope in log if scope is not None]
    assert scopes and stats[0]["scoped_steps"] == len(scopes)
    assert any(needs_scope(s) for s in scopes)
    assert all(kind == "routed" for kind, *_, scope in log if scope is not None)
    shape = cm.exchange_shape(dataclasses.replace(load_model(model_path), dtype_bytes=4),
                              cm.Layout(kvp=world), 4 << 20, cm.CPU_PARTIAL_BYTES)
    for rank, s in enumerate(stats):
        want = {QUERIES: 0, PARTIALS: 0}
        for kind, counts, span_counts, tokens, logits_rows, scope in s["step_log"]:
            sent = exchanges(kind, counts, tokens, shape, world, span_counts, logits_rows,
                             scope=scope, rank=rank)
            for k in want:
                want[k] += sent.get(k, (0, 0))[1]
        assert (s["query_bytes"], s["partial_bytes"]) == (want[QUERIES], want[PARTIALS]), rank

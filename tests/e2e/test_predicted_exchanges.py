"""The planner's prediction of a step's exchanges equals what the plugin counts, on real steps.

The bench-size model (4 layers, hidden 1024: every projection of its layers is >= 4 MiB in fp32,
so all of them split by columns in shared steps) runs prompts in several prefill chunks and then
decodes, with 2 KV ranks: placement "auto" stripes the long prompts and keeps the short one on one
rank. Each rank logs every step it ran (kind, tokens owned per rank, tokens) and counts the bytes
it sent per exchange kind. From the model's config.json alone and the CPU host's constants, the
cost model (the planner's) must give each logged step the kind the runtime gave it, and its
exchanges summed over the steps must equal the counters: collectives and bytes, per kind.
"""

import dataclasses
import os

import pytest

from engines import engine, generate, random_prompts

from vllm_kvp.planner import cost_model as cm
from vllm_kvp.planner.gpus import runtime_hardware
from vllm_kvp import step_policy
from vllm_kvp.model import build_default_model
from vllm_kvp.planner.command import load_model
from vllm_kvp.step_policy import EXCHANGE_KINDS, ROUTED, SHARED

pytestmark = pytest.mark.e2e

CPU_SPLIT_MIN = 4 << 20  # the plugin's CPU default for split_min_bytes


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    return str(build_default_model(tmp_path_factory.mktemp("bench") / "bench", size="bench"))


def test_predicted_exchanges_equal_the_counters(bench_model):
    # Placement "auto": the two long prompts striped (their 512-token chunks spread over both
    # ranks: routed), the short one on one rank (its chunk has one owner); then small decode
    # steps. One engine covers both placements' kinds of step.
    kvp = {"size": 2, "placement": "auto", "stripe_min_tokens": 400, "max_tokens_per_rank": 256}
    with engine(bench_model, kvp=kvp, max_model_len=1024, max_num_batched_tokens=512,
                max_num_seqs=4) as llm:
        out = generate(llm, random_prompts([600, 420, 90], 4096, seed=5), 6)
        stats = llm.collective_rpc("kvp_stats")
    assert [len(r) for r in out.kvp_ranks] == [2, 2, 1]

    shape = dataclasses.replace(load_model(bench_model), dtype_bytes=4)  # run in float32
    layout = cm.Layout(kvp=2)
    hardware, _ = runtime_hardware(None, None, os.cpu_count())  # what the workers used
    policy = cm.policy(shape, layout, CPU_SPLIT_MIN, hw=hardware, out_bytes=cm.CPU_PARTIAL_BYTES)
    assert policy.costs is not None
    exchange_shape = cm.exchange_shape(shape, layout, CPU_SPLIT_MIN, cm.CPU_PARTIAL_BYTES)
    # qkv and o split by columns; each gated MLP like a TP layer (one gather of partial sums).
    assert policy.split_layers and len(exchange_shape.split_widths) == 2 * 4
    assert exchange_shape.sum_widths == (1024,) * 4
    kinds = set()
    # The lm_head (4096 x 1024, 16 MiB) splits by vocab columns even for one row here: the logits
    # of every sampled token (3 requests x 6) were split.
    assert exchange_shape.logits_width == 4096 and policy.split_logits(1)
    for rank in stats:
        split_rows = 0
        log = rank["step_log"]
        assert 0 < len(log) == sum(rank["steps"].values())
        want = {k: [0, 0] for k in EXCHANGE_KINDS}
        for kind, counts, span_counts, tokens, logits_rows, scope in log:
            assert scope is None  # with 2 ranks every spanning request is on both
            assert policy.kind(counts, sum(span_counts) > 0, span_counts, tokens) == kind, (
                kind, counts, span_counts, tokens)
            assert all(policy.split_logits(r) for r in logits_rows)
            kinds.add(kind)
            split_rows += sum(logits_rows)
            for name, (n, nbytes) in step_policy.exchanges(kind, counts, tokens, exchange_shape,
                                                           2, span_counts, logits_rows).items():
                want[name][0] += n
                want[name][1] += nbytes
        assert {k: rank[f"{k}_bytes"] for k in EXCHANGE_KINDS} == {k: b for k, (_, b) in
                                                                   want.items()}
        assert rank["exchanges"] == sum(n for n, _ in want.values())
        assert rank["split_linear_calls"] == want["column"][0]
        # vLLM also computes (and drops) a row of logits for a prompt chunk that does not end its
        # prompt: at most one per prompt here (each is at most two 512-token chunks).
        assert 3 * 6 <= split_rows <= 3 * 6 + 3, split_rows
    # Decode steps are shared; striped prefill chunks are routed (every rank owns half).
    assert SHARED in kinds and ROUTED in kinds

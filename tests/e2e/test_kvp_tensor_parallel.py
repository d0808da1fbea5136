"""KV ranks compose with tensor parallelism: KVP = 2 x TP = 2 is four workers, one KVP group per TP
position, and gives the tokens of a single plain worker, with linear layers split by columns over
the KV ranks in shared steps."""

import pytest

from engines import assert_same_generation, engine, generate, random_prompts

pytestmark = pytest.mark.e2e

ENGINE = dict(max_model_len=4096, max_num_batched_tokens=512)


def test_kvp2_tp2_matches_single_worker(model_path):
    prompts = random_prompts([7, 130, 900, 2500], 4096, seed=31)
    with engine(model_path, **ENGINE) as llm:
        reference = generate(llm, prompts, 12)
    # Every linear layer split by columns over the KV ranks in shared steps (split_min_bytes 0):
    # a KV rank's slice of a TP shard, TP's all-reduce after the KV ranks' gather. Decode steps
    # shared by the fixed rule: with 4 workers on this host's 2 cores the costs would keep them
    # on their owners (every spinning collective waits for a descheduled peer).
    kvp = {"size": 2, "placement": "onboard", "max_tokens_per_rank": 1024, "split_min_bytes": 0,
           "split_step_tokens": 64}
    with engine(model_path, kvp=kvp, tensor_parallel_size=2, **ENGINE) as llm:
        got = generate(llm, prompts, 12)
        stats = llm.collective_rpc("kvp_stats")
    assert_same_generation(reference, got, "kvp=2 x tp=2")
    assert sorted(got.kvp_ranks[3]) == [0, 1]  # 2,500 tokens with a 1,024 limit span both ranks
    # Four workers: each KV rank is a TP pair, and each worker holds one rank's share.
    assert sorted(s["kvp_rank"] for s in stats) == [0, 0, 1, 1]
    assert len({s["num_blocks"] for s in stats}) == 1
    assert min(s["split_linear_calls"] for s in stats) > 0

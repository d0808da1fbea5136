"""KV ranks over Ray across nodes: a two-node Ray cluster (two raylets on this machine, one CPU
each) gets one KV rank per node, and the tokens are those of a single plain worker; when a
worker actor's process is killed mid-decode, the actors restart and every request completes
with the same tokens."""

import os
import sys

import cloudpickle
import pytest

from engines import assert_same_generation, engine, generate, random_prompts, step_to_completion

pytestmark = pytest.mark.e2e
ray = pytest.importorskip("ray")

ENGINE = dict(max_model_len=4096, max_num_batched_tokens=512)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "VLLM_ALLOW_INSECURE_SERIALIZATION")}
    os.environ["RAY_ADDRESS"] = cluster.address
    # Lets the test ask each worker for its Ray node id with a plain function.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _node_and_rank(worker):
    """Runs in each worker (shipped by value: the workers cannot import this test module)."""
    import ray as ray_in_worker

    from vllm_kvp.step import comm

    return ray_in_worker.get_runtime_context().get_node_id(), comm.kvp_rank()


def _pid(worker):
    import os as os_in_worker

    return os_in_worker.getpid()


def test_kvp_over_two_ray_nodes(model_path, two_node_cluster):
    prompts = random_prompts([9, 400, 2100], 4000, seed=61)
    with engine(model_path, **ENGINE) as llm:
        reference = generate(llm, prompts, 32)
    with engine(model_path, kvp={"size": 2, "max_tokens_per_rank": 256},
                distributed_executor_backend="ray", **ENGINE) as llm:
        got = generate(llm, prompts, 32)
        placement = llm.collective_rpc(_node_and_rank)
        undisturbed = step_to_completion(llm, prompts, 32)
        pids = llm.collective_rpc(_pid)
        recovered = step_to_completion(llm, prompts, 32, kill=lambda: os.kill(pids[1], 9))
        assert recovered == undisturbed, "outputs differ after a Ray worker actor died"
        assert not set(llm.collective_rpc(_pid)) & set(pids), "the actors were not restarted"
        assert llm.reset_prefix_cache(), "KV blocks still in use after recovery"
    assert_same_generation(reference, got, "kvp=2 over Ray")
    assert sorted(rank for _, rank in placement) == [0, 1]
    assert len({node for node, _ in placement}) == 2, f"both KV ranks on one node: {placement}"
    assert sorted(got.kvp_ranks[2]) == [0, 1]

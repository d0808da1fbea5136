"""`vllm-kvp serve --kvp-size 2`: OpenAI API answers with plain vLLM's tokens; /metrics shows the
KV ranks."""

import pytest

from engines import engine, random_prompts
from server import metric_values, serve

pytestmark = pytest.mark.e2e

LENGTHS = [5, 300, 1500, 2600]
MAX_TOKENS = 24
SERVER_ARGS = ("--kvp-size", "2", "--kvp-max-tokens-per-rank", "1024",
               "--max-model-len", "4096", "--max-num-batched-tokens", "512")


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, 4096, seed=7)


@pytest.fixture(scope="module")
def reference_texts(model_path, prompts):
    from vllm import SamplingParams

    with engine(model_path, max_model_len=4096, max_num_batched_tokens=512) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                            use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_openai_completions_match_and_metrics(model_path, prompts, reference_texts):
    import openai

    with serve(model_path, *SERVER_ARGS) as srv:
        base = srv.url
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        texts = []
        for p in prompts:
            r = client.completions.create(model=model_path, prompt=p, max_tokens=MAX_TOKENS,
                                          temperature=0, extra_body={"ignore_eos": True})
            texts.append(r.choices[0].text)
        assert texts == reference_texts

        totals = metric_values(base, "vllm_kvp:rank_kv_cache_blocks_total")
        assert len(totals) == 2 and totals[0] == totals[1] > 0
        usage = metric_values(base, "vllm_kvp:rank_kv_cache_usage_perc")
        assert len(usage) == 2 and all(0.0 <= u <= 1.0 for u in usage)
        # 1500- and 2600-token prompts cross the 1024-token limit once each.
        assert metric_values(base, "vllm_kvp:onboard_events_total") == [2.0]
        assert metric_values(base, "vllm_kvp:ranks_per_request_count") == [4.0]
        assert metric_values(base, "vllm_kvp:ranks_per_request_sum") == [6.0]
        # Buckets le=1, le=2, le=+Inf: two requests stayed on one rank, two used both.
        assert metric_values(base, "vllm_kvp:ranks_per_request_bucket") == [2.0, 4.0, 4.0]
        assert metric_values(base, "vllm:num_requests_running"), "vLLM's own metrics are gone"


def _completions(base, model_path, prompts):
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none")
    return [client.completions.create(model=model_path, prompt=p, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True})
            .choices[0].text for p in prompts]


def test_kv_ranks_x_pipeline_server_matches(model_path, prompts, reference_texts):
    """Two KV ranks of two pipeline stages each, striped, adaptive chunks: every flag on the
    command line, plain vLLM's text back. (The offline API runs KV ranks x pipeline with the
    other placement, in test_pipeline_parallel.)"""
    with serve(model_path, "--kvp-size", "2", "--kvp-placement", "striped",
               "--pipeline-parallel-size", "2", "--kvp-prefill-chunking", "adaptive",
               "--max-model-len", "4096", "--max-num-batched-tokens", "512") as srv:
        assert _completions(srv.url, model_path, prompts) == reference_texts
        log = srv.log()
        assert "adaptive prefill chunking" in log
        layout = next(line for line in log.splitlines() if "vllm_kvp layout:" in line)
        assert "2 KV ranks" in layout and "4 workers" in layout and "placement striped" in layout
        # Each KV rank is a two-stage pipeline; both ranks got the same share of blocks, and a
        # striped prompt spans both (le=1 bucket: no request stayed on one rank).
        totals = metric_values(srv.url, "vllm_kvp:rank_kv_cache_blocks_total")
        assert len(totals) == 2 and totals[0] == totals[1] > 0
        assert metric_values(srv.url, "vllm_kvp:ranks_per_request_bucket")[0] < len(prompts)

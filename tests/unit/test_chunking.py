"""Adaptive prefill chunk sizes: the cost model and its solution, against hand-worked cases."""

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvp.planner.chunking import (ALIGN, attention_ratio, attention_ratio_from_hf_config, chunk_time,
                               chunk_tokens, fit_attention_ratio)


def test_chunk_time_by_hand():
    # 256 dense units + (1/512) x 256 x (512 + 128) pairs = 256 + 320
    assert chunk_time(256, 512, 1 / 512) == pytest.approx(576.0)
    assert chunk_time(256, 0, 0.0) == 256


def test_context_zero_gives_the_first_chunk():
    for first in (32, 500, 512, 2048):
        for ratio in (0.0, 1e-5, 1.35e-4, 1e-2):
            assert chunk_tokens(0, first, ratio) == first


def test_no_attention_cost_keeps_chunks_fixed():
    assert chunk_tokens(100_000, 512, 0.0) == 512


def test_hand_worked_chunk():
    # r = 1/512, first chunk 256: target T = 256 + 256 * 128 / 512 = 320.
    # After 512 tokens: c^2 / 1024 + 2 c = 320  ->  c = -1024 + sqrt(1024^2 + 327680) = 149.1,
    # floored to a multiple of 16: 144 (time 308.25 <= 320; 160 would take 345).
    assert chunk_tokens(512, 256, 1 / 512) == 144
    assert chunk_time(144, 512, 1 / 512) <= 320 < chunk_time(160, 512, 1 / 512)


def test_bench_model_halves_the_chunk_by_8k():
    # hidden 1024, MLP 4096, 8 query / 2 KV heads of 128: r = 2048 / 15,204,352.
    ratio = attention_ratio(1024, 4096, 8, 2, 128)
    assert ratio == pytest.approx(2048 / 15_204_352)
    c = chunk_tokens(7680, 512, ratio)
    assert 240 <= c <= 272  # attention about doubles a 512-token chunk's cost at 8k
    assert chunk_time(c, 7680, ratio) <= chunk_time(512, 0, ratio)


def test_small_first_chunk_is_kept():
    assert chunk_tokens(10_000, ALIGN, 1.0) == ALIGN
    assert chunk_tokens(10_000, 8, 1.0) == 8


def test_floor_at_one_alignment_unit():
    assert chunk_tokens(10_000_000, 512, 1e-2) == ALIGN


@settings(max_examples=300, deadline=None)
@given(context=st.integers(0, 2_000_000), first=st.integers(ALIGN + 1, 16384),
       ratio=st.floats(0, 1e-2, allow_nan=False))
def test_chunk_is_the_largest_aligned_one_within_the_first_chunks_time(context, first, ratio):
    c = chunk_tokens(context, first, ratio)
    assert ALIGN <= c <= first
    assert c == first or c % ALIGN == 0
    target = chunk_time(first, 0, ratio)
    if c > ALIGN:  # the floor may exceed the target; anything larger is within it
        assert chunk_time(c, context, ratio) <= target * (1 + 1e-9)
    if c < first and c + ALIGN <= first:
        assert chunk_time(c + ALIGN, context, ratio) > target * (1 - 1e-9)
    assert chunk_tokens(context + 1000, first, ratio) <= c  # never grows with the context


def test_ratio_from_a_transformers_config():
    llama = SimpleNamespace(hidden_size=256, intermediate_size=768, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=32)
    # dense 256 x 32 x (16 + 4) + 3 x 256 x 768 = 753,664; pair 2 x 8 x 32 = 512
    assert attention_ratio_from_hf_config(llama) == pytest.approx(512 / 753_664)
    no_head_dim = SimpleNamespace(hidden_size=256, intermediate_size=768, num_attention_heads=8,
                                  num_key_value_heads=None)
    # head_dim 256 / 8 = 32, no GQA: 256 x 32 x 32 + 589,824 = 851,968
    assert attention_ratio_from_hf_config(no_head_dim) == pytest.approx(512 / 851_968)


def test_fit_recovers_the_ratio_from_measured_chunks():
    a, b = 2e-3, 3e-7  # seconds per token, seconds per (query, key) pair
    samples = [(c, p, a * c + b * c * (p + c / 2)) for c, p in
               [(512, 0), (512, 512), (512, 1024), (256, 4096), (128, 7936)]]
    assert fit_attention_ratio(samples) == pytest.approx(b / a, rel=1e-6)


def test_fit_needs_two_contexts():
    with pytest.raises(ValueError, match="two or more different contexts"):
        fit_attention_ratio([(512, 0, 1.0), (512, 0, 1.1)])
    with pytest.raises(ValueError, match="non-positive dense cost"):
        fit_attention_ratio([(512, 0, 0.0), (512, 4096, 1.0)])

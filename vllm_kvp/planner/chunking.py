"""Adaptive prefill chunk sizes: later chunks of a long prompt get shorter so every chunk takes
about as long as the first.

Cost model of one prefill chunk of `c` tokens whose prompt already has `p` tokens computed, in
units of one token's dense work (projections and MLP of every layer):

    time(c, p) = c + r * c * (p + c / 2)

`c` is the dense part (linear in the chunk); `c * (p + c / 2)` counts the (query, key) pairs the
chunk attends to (every earlier token, plus the causal half of its own); `r` is the cost of one
such pair relative to one token's dense work. Both terms scale with the number of layers, so `r`
is a ratio of per-layer FLOPs and needs no hardware constant. A fixed chunk's time grows linearly
with `p`; with pipeline stages that growth turns into bubbles, and one chunk's time is the
pipeline's step, so `chunk_tokens` picks the `c` whose predicted time equals the first chunk's.

Pure python: no torch, no vLLM. The scheduler calls `chunk_tokens` once per long prefill per step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

# Chunks are whole multiples of this many tokens (and never smaller): a handful of tokens per chunk
# would make per-step overheads dominate, and round sizes keep the kernels' tiling regular.
ALIGN = 16


def chunk_time(chunk: int, context: int, ratio: float) -> float:
    """Predicted time of a `chunk`-token prefill chunk after `context` computed tokens
    (units: one token's dense work)."""
    return chunk + ratio * chunk * (context + chunk / 2)


def chunk_tokens(context: int, first_chunk: int, ratio: float, align: int = ALIGN) -> int:
    """Largest chunk (a multiple of `align`, at least `align`, at most `first_chunk`) whose
    predicted time after `context` computed tokens does not exceed that of a `first_chunk`-token
    chunk at the start of the prompt.

    Solves r/2 c^2 + (1 + r p) c - T = 0 for c, with T = time(first_chunk, 0), in the form
    c = 2T / (b + sqrt(b^2 + 2 r T)) (b = 1 + r p), which stays exact as r -> 0.
    """
    if first_chunk <= align:
        return first_chunk
    target = chunk_time(first_chunk, 0, ratio)
    b = 1.0 + ratio * context
    exact = 2.0 * target / (b + math.sqrt(b * b + 2.0 * ratio * target))
    # The tiny slack absorbs float rounding at exact solutions: context 0 gives first_chunk even
    # when that is not a multiple of `align`.
    if exact >= first_chunk * (1 - 1e-9):
        return first_chunk
    aligned = math.floor(exact / align + 1e-9) * align
    return max(align, min(first_chunk, aligned))


def attention_ratio(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
                    head_dim: int) -> float:
    """FLOPs of one (query, key) pair of attention over FLOPs of one token's dense layers, per
    layer, for a decoder with a gated MLP (Llama, Qwen2, Mistral: gate, up and down projections).

    dense: q, k, v and o projections + 3 MLP matrices; attention pair: q.k and p.v, each
    num_heads x head_dim multiply-adds. Multiply-adds are counted on both sides, so the factor 2
    of FLOPs cancels.
    """
    qkv_o = hidden_size * (2 * num_heads + 2 * num_kv_heads) * head_dim
    mlp = 3 * hidden_size * intermediate_size
    return 2 * num_heads * head_dim / (qkv_o + mlp)


def attention_ratio_from_hf_config(hf_config: Any) -> float:
    """`attention_ratio` from a transformers config (the text config of the served model)."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return attention_ratio(hf_config.hidden_size, hf_config.intermediate_size, heads,
                           getattr(hf_config, "num_key_value_heads", None) or heads, head_dim)


def fit_attention_ratio(samples: Iterable[tuple[int, int, float]]) -> float:
    """`r` fitted to measured chunks: least squares of t = a * c + b * c * (p + c / 2) over
    (chunk c, context p, seconds t) samples, returned as r = b / a.

    Needs chunks at two or more different contexts (else the two terms cannot be told apart).
    """
    s_xx = s_xy = s_yy = s_xt = s_yt = 0.0
    for c, p, t in samples:
        x, y = float(c), c * (p + c / 2.0)
        s_xx, s_xy, s_yy = s_xx + x * x, s_xy + x * y, s_yy + y * y
        s_xt, s_yt = s_xt + x * t, s_yt + y * t
    det = s_xx * s_yy - s_xy * s_xy
    if det <= 1e-12 * s_xx * s_yy:
        raise ValueError("need chunks at two or more different contexts to fit the attention cost")
    a = (s_xt * s_yy - s_yt * s_xy) / det
    b = (s_yt * s_xx - s_xt * s_xy) / det
    if a <= 0:
        raise ValueError(f"measured chunk times give a non-positive dense cost ({a:.3g} s/token)")
    return b / a

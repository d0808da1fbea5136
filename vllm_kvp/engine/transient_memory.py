"""GPU memory KV parallelism needs during a step that vLLM's profile run does not see.

vLLM sizes the KV cache from the memory left after a profile run of `max_num_batched_tokens`
rows, which runs the model whole, without KVP's exchanges. A real step under KVP also holds, for
one layer at a time, the buffers of its collectives (`comm.py`): the gathered queries, the packed
partials of every rank and their unpacked rows, and in shared steps the gathered column slices of
a split linear layer; after the last layer, the gathered final hidden states. Those are not in the
profile, so the executor takes this estimate off each worker's available memory on GPUs (on CPUs
`VLLM_CPU_KVCACHE_SPACE` sizes the cache explicitly).

The estimate is an upper bound: every rank is assumed to run all T rows (the worst routing), and
outputs travel in the attention dtype (`ops.partials`). The three sets never coexist (each is
freed before the next layer's), so the peak is the largest of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransientMemory:
    attention: int  # bytes held during one layer's attention exchange
    columns: int  # bytes held during one split linear layer's column gather
    hidden: int  # bytes held while the final hidden states are gathered

    @property
    def peak(self) -> int:
        return max(self.attention, self.columns, self.hidden)


def kvp_transient_memory(num_ranks: int, max_tokens: int, num_heads: int, head_size: int,
                         hidden_size: int, dtype_bytes: int, split_out_features: int = 0
                         ) -> TransientMemory:
    """Exchange buffers of one worker in a step of up to `max_tokens` rows over `num_ranks` KV
    ranks. `num_heads` is this worker's query heads (per TP rank); `split_out_features` the widest
    linear layer split by columns over the KV ranks (this worker's TP shard; 0: none split)."""
    n, t = num_ranks, max_tokens
    if n < 2:
        return TransientMemory(0, 0, 0)
    q_row = num_heads * head_size * dtype_bytes
    part_row = q_row + 4 * num_heads  # outputs in the attention dtype, then float32 LSEs
    attention = (n * t * q_row  # all-gathered queries
                 + t * q_row  # in vLLM's token order
                 + t * part_row  # this rank's packed partials
                 + 2 * n * t * part_row  # every rank's, gathered, and the rows unpacked to merge
                 + t * q_row)  # the merged output
    widest = -(-split_out_features // n)
    columns = (t * widest + n * t * widest) * dtype_bytes  # own slice, every rank's slices
    hidden = (n * t + t) * hidden_size * dtype_bytes  # gathered rows, in vLLM's order
    return TransientMemory(attention, columns, hidden)


def transient_memory_for(vllm_config, num_ranks: int, splits_layers: bool) -> TransientMemory:
    """`kvp_transient_memory` for an engine's resolved config (model shape, TP, token budget)."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    tp = parallel.tensor_parallel_size
    hf = model.hf_text_config
    head_size = model.get_head_size()
    split = 0
    if splits_layers:
        # The widest linear layer a rank may split: the fused gate/up projection, or the fused
        # QKV one (the LM head is an embedding, never split).
        qkv = (hf.num_attention_heads + 2 * model.get_total_num_kv_heads()) * head_size
        split = max(2 * (getattr(hf, "intermediate_size", 0) or 0), qkv,
                    model.get_hidden_size()) // tp
    return kvp_transient_memory(
        num_ranks, vllm_config.scheduler_config.max_num_batched_tokens,
        model.get_num_attention_heads(parallel), head_size, model.get_hidden_size(),
        model.dtype.itemsize, split)

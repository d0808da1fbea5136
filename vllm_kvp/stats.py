"""Per-process counters of what a KV rank wrote and exchanged, read through KVPWorker.kvp_stats().

They make residency and owner computes observable: a new token's K/V is written on exactly one
rank, each token is computed on exactly one rank, and the KVP group carries queries, partial
attention outputs, final hidden states and split layers' output columns, never K/V. One instance
per worker process, like vLLM's own process-level state; updating it never synchronises a device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class RankStats:
    exchanges: int = 0  # collectives over the KVP group (queries, partials, hidden, columns)
    exchanged_bytes: int = 0  # bytes this rank contributed to them, of which:
    query_bytes: int = 0  # queries (each layer)
    partial_bytes: int = 0  # partial attention outputs (each layer)
    hidden_bytes: int = 0  # final hidden states (each step)
    column_bytes: int = 0  # output columns of split linear layers (replicated steps)
    split_linear_calls: int = 0  # linear layer calls that computed only this rank's columns
    tokens_computed: int = 0  # tokens this rank ran through the model as their owner (each once)
    tokens_replicated: int = 0  # tokens it also ran in replicated steps (their owner's result is kept)
    kv_tokens_written: torch.Tensor | int = 0  # K/V entries stored on this rank (all layers)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kv_tokens_written"] = int(self.kv_tokens_written)
        return d


STATS = RankStats()

"""Per-process counters of what a KV rank wrote and exchanged, read through KVPWorker.kvp_stats().

They make residency and owner computes observable: a new token's K/V is written on exactly one
rank, each token is computed on exactly one rank, and the KVP group carries queries, partial
attention outputs, final hidden states and split layers' output columns, never K/V. Exchanges are
counted by exchange kind and by step kind (`step_policy`), the terms the planner predicts in. One
instance per worker process, like vLLM's own process-level state; updating it never synchronises
a device.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

import torch

from vllm_kvp.step_policy import EXCHANGE_KINDS, STEP_KINDS

STEP_LOG = 4096  # steps kept in `step_log`


@dataclass
class RankStats:
    exchanges: int = 0  # collectives over the KVP group (queries, partials, hidden, columns)
    exchanged_bytes: int = 0  # bytes this rank contributed to them, of which:
    query_bytes: int = 0  # queries (each attention layer of a routed step)
    partial_bytes: int = 0  # partial attention outputs (each attention layer)
    hidden_bytes: int = 0  # final hidden states (each step)
    column_bytes: int = 0  # output columns of split linear layers (shared steps)
    logits_bytes: int = 0  # vocab columns of the logits, when the lm_head is split
    split_linear_calls: int = 0  # split linear layer calls that gathered (columns, or MLP partial sums)
    tokens_computed: int = 0  # tokens this rank ran through the model as their owner (each once)
    tokens_shared: int = 0  # tokens it also ran in shared steps (their owner's result is kept)
    kv_tokens_written: torch.Tensor | int = 0  # K/V entries stored on this rank (all layers)
    # step kind -> steps run, collectives and bytes sent in them
    steps: dict = field(default_factory=lambda: {k: 0 for k in STEP_KINDS})
    step_exchanges: dict = field(default_factory=lambda: {k: 0 for k in STEP_KINDS})
    step_bytes: dict = field(default_factory=lambda: {k: 0 for k in STEP_KINDS})
    # The latest steps as [kind, tokens owned per rank, of those the tokens of requests spanning
    # ranks, tokens, rows of each logits computation split by vocab columns, the queries each
    # owner sent each rank in a scoped step (`step.scope.send`; None: not scoped)]: what a
    # prediction of their exchanges needs (tests compare the planner's with the counters above).
    step_log: deque = field(default_factory=lambda: deque(maxlen=STEP_LOG))
    scoped_steps: int = 0  # routed steps whose queries went only to the ranks holding their KV

    def record_step(self, kind: str, counts: list[int], span_counts: list[int],
                    tokens: int, scope: list[list[int]] | None = None) -> None:
        self.steps[kind] += 1
        self.scoped_steps += scope is not None
        self.step_log.append([kind, list(counts), list(span_counts), tokens, [],
                              None if scope is None else [list(r) for r in scope]])

    def record_logits(self, rows: int) -> None:
        """The latest step computed the logits of `rows` rows split by vocab columns."""
        if self.step_log:
            self.step_log[-1][4].append(rows)

    def record(self, kind: str, nbytes: int, step_kind: str) -> None:
        """One collective of exchange `kind` into which this rank sent `nbytes`."""
        if kind not in EXCHANGE_KINDS:
            raise ValueError(f"unknown exchange kind {kind!r}")
        self.exchanges += 1
        self.exchanged_bytes += nbytes
        setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + nbytes)
        self.step_exchanges[step_kind] += 1
        self.step_bytes[step_kind] += nbytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kv_tokens_written"] = int(self.kv_tokens_written)
        d["step_log"] = list(self.step_log)
        return d


STATS = RankStats()

"""Reading, after the fact, which KV ranks held a finished request.

The KVP scheduler reports it with every finished request, in the field vLLM uses for a request's
KV-cache bookkeeping (`RequestOutput.kv_transfer_params`; the OpenAI server returns it as
`kv_transfer_params` too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankSpan:
    ranks: list[int]  # KV ranks in the order the request onboarded them
    starts: list[int]  # first token position each of them holds

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)


def rank_span(output: Any) -> RankSpan | None:
    """The rank span of a finished `RequestOutput` (or a `kv_transfer_params` dict); None when the
    engine does not run KV parallelism."""
    params = output if isinstance(output, dict) else getattr(output, "kv_transfer_params", None)
    if not params or "kvp_ranks" not in params:
        return None
    return RankSpan(list(params["kvp_ranks"]), list(params.get("kvp_rank_starts", [])))

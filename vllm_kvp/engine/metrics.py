"""Prometheus metrics of KV parallelism, recorded in the engine-core process.

They are created without a registry: under Prometheus multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
which `vllm-kvp serve` sets up for KVP servers) their values are written to shared files that the
API server's `/metrics` collects, next to vLLM's own `vllm:` metrics. Without that directory they
are plain in-memory objects and cost a few dict updates per step.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram


class KVPMetrics:
    def __init__(self, num_ranks: int, blocks_per_rank: int) -> None:
        ranks = [str(r) for r in range(num_ranks)]
        self.rank_usage = Gauge(
            "vllm_kvp:rank_kv_cache_usage_perc",
            "Fraction of each KV rank's KV-cache blocks in use (1 = full).",
            ["rank"], registry=None, multiprocess_mode="mostrecent",
        )
        self.rank_blocks = Gauge(
            "vllm_kvp:rank_kv_cache_blocks_used",
            "KV-cache blocks in use on each KV rank.",
            ["rank"], registry=None, multiprocess_mode="mostrecent",
        )
        self.rank_capacity = Gauge(
            "vllm_kvp:rank_kv_cache_blocks_total",
            "KV-cache blocks each KV rank holds.",
            ["rank"], registry=None, multiprocess_mode="mostrecent",
        )
        self.onboard_events = Counter(
            "vllm_kvp:onboard_events",
            "Times a request was given one more KV rank as its context grew.",
            registry=None,
        )
        self.ranks_per_request = Histogram(
            "vllm_kvp:ranks_per_request",
            "Number of KV ranks that held a finished request's KV cache.",
            buckets=[float(r) for r in range(1, num_ranks + 1)] + [float("inf")],
            registry=None,
        )
        self._usage = [self.rank_usage.labels(r) for r in ranks]
        self._blocks = [self.rank_blocks.labels(r) for r in ranks]
        for r in ranks:
            self.rank_capacity.labels(r).set(blocks_per_rank)

    def record_usage(self, used_blocks: list[int], usable_blocks: list[int]) -> None:
        for r, (used, usable) in enumerate(zip(used_blocks, usable_blocks)):
            self._blocks[r].set(used)
            self._usage[r].set(used / usable if usable else 0.0)

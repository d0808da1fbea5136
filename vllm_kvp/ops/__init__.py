"""Attention kernels for KV parallelism: per-shard partial attention and log-sum-exp merging."""

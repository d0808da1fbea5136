"""vLLM glue: the executors, worker, model-runner hook and scheduler that run KV ranks inside
vLLM's engine, and `vllm_compat`, the one place that touches vLLM's private details."""

"""The capacity planner and its cost model (`vllm-kvp plan`): pure Python, no vLLM, no torch."""

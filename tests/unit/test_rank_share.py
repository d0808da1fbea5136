"""KVPExecutor hands each worker its rank's share of the pooled KV-cache config."""

import pytest
import torch
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                        KVCacheTensor)

from vllm_kvp.engine.executor import shrink_to_rank_share

PAGE, LAYERS, TOTAL, PER_RANK = 4096, 3, 40, 20


def _config(layer_outermost: bool, groups: int = 1):
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    if layer_outermost:  # each layer a contiguous region of TOTAL pages
        tensor = KVCacheTensor(size=PAGE * TOTAL * LAYERS, layers=["a", "b", "c"],
                               layer_stride=PAGE * TOTAL, block_stride=PAGE)
    else:  # each block holds every layer's page
        tensor = KVCacheTensor(size=PAGE * LAYERS * TOTAL, layers=["a", "b", "c"],
                               layer_stride=PAGE, block_stride=PAGE * LAYERS)
    return KVCacheConfig(num_blocks=TOTAL, kv_cache_tensors=[tensor],
                         kv_cache_groups=[KVCacheGroupSpec(["a", "b", "c"], spec)] * groups)


@pytest.mark.parametrize("layer_outermost", [True, False])
def test_share_keeps_pages_and_scales_the_block_count(layer_outermost):
    config = _config(layer_outermost)
    shrink_to_rank_share(config, PER_RANK)
    tensor = config.kv_cache_tensors[0]
    assert config.num_blocks == PER_RANK
    assert tensor.size == PAGE * LAYERS * PER_RANK
    if layer_outermost:
        assert (tensor.layer_stride, tensor.block_stride) == (PAGE * PER_RANK, PAGE)
    else:
        assert (tensor.layer_stride, tensor.block_stride) == (PAGE, PAGE * LAYERS)
    # The last layer's last block still ends inside the allocation.
    last = tensor.offset + (LAYERS - 1) * tensor.layer_stride + (PER_RANK - 1) * tensor.block_stride
    assert last + PAGE <= tensor.size


def test_hybrid_kv_caches_are_refused():
    with pytest.raises(NotImplementedError, match="one KV cache group"):
        shrink_to_rank_share(_config(True, groups=2), PER_RANK)

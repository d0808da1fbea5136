"""KVP's exchange buffers per worker (transient_memory), against sums worked out by hand."""

from vllm_kvp.engine.transient_memory import TransientMemory, kvp_transient_memory, transient_memory_for


def test_llama_8b_shape_8k_step_two_ranks():
    # Hq = 32, D = 128, hidden 4096, bf16, MLP 14336 (gate/up fused: 28672 columns), T = 8192.
    m = kvp_transient_memory(2, 8192, 32, 128, 4096, 2, split_out_features=28672)
    q_row = 32 * 128 * 2  # 8192 bytes
    part_row = q_row + 4 * 32  # 8320 bytes
    assert m.attention == (2 * 8192 * q_row + 8192 * q_row + 8192 * part_row
                           + 2 * 2 * 8192 * part_row + 8192 * q_row) == 609_222_656
    assert m.columns == (8192 * 14336 + 2 * 8192 * 14336) * 2 == 704_643_072
    assert m.hidden == 3 * 8192 * 4096 * 2 == 201_326_592
    assert m.peak == 704_643_072  # about 0.66 GiB


def test_without_split_layers_attention_dominates():
    m = kvp_transient_memory(4, 1024, 8, 64, 512, 2)
    assert m.columns == 0
    # q_row = 8 * 64 * 2 = 1024 bytes, part_row = 1024 + 4 * 8 = 1056 bytes
    assert m.peak == m.attention == 1024 * (4 * 1024 + 1024 + 1056 + 8 * 1056 + 1024)


def test_one_rank_needs_nothing():
    assert kvp_transient_memory(1, 8192, 32, 128, 4096, 2, 28672) == TransientMemory(0, 0, 0)


def test_from_an_engine_config(model_path):
    import vllm_kvp

    vllm_kvp.register()
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=model_path, dtype="float32", max_num_batched_tokens=512,
                        additional_config={"kvp": {"size": 2}}).create_engine_config()
    mc, hf = config.model_config, config.model_config.hf_text_config
    head = mc.get_head_size()
    qkv = (hf.num_attention_heads + 2 * hf.num_key_value_heads) * head
    split = max(2 * hf.intermediate_size, qkv, hf.hidden_size)
    assert transient_memory_for(config, 2, True) == kvp_transient_memory(
        2, 512, hf.num_attention_heads, head, hf.hidden_size, 4, split)
    assert transient_memory_for(config, 2, False).columns == 0

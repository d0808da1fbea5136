"""Cost model arithmetic against hand-worked cases (no vLLM, no torch)."""

import dataclasses
import json

import pytest

from vllm_kvp.planner import cost_model as cm
from vllm_kvp.planner.gpus import CATALOGUE, GPUSpecError, get_gpu, load_gpu_spec

# Llama-3-8B's shape: 32 layers, hidden 4096, 32 heads, 8 KV heads of 128, MLP 14336, vocab 128256.
LLAMA8B = cm.ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                        intermediate=14336, vocab=128256, max_context=1 << 20)
# Unit rates and no latency, so times are plain byte and FLOP counts.
UNIT = cm.Hardware(memory_bytes=80e9, hbm_bw=1.0, flops=1.0, intra_bw=1e30, inter_bw=1e30,
                   intra_latency=0.0, inter_latency=0.0)


def test_kv_bytes_per_token_is_two_tensors_per_layer():
    assert LLAMA8B.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072


def test_parameter_count_matches_llama3_8b():
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096   # q,o + k,v + MLP + norms
    embeddings = 2 * 128256 * 4096                                             # embed + lm_head
    assert LLAMA8B.params == 32 * layer + 4096 + embeddings == 8_030_261_248
    assert LLAMA8B.weight_bytes == 2 * 8_030_261_248
    tied = dataclasses.replace(LLAMA8B, tied_embeddings=True)
    assert LLAMA8B.params - tied.params == 128256 * 4096


def test_kv_per_gpu_splits_heads_and_stages_and_replicates_past_kv_heads():
    assert cm.kv_bytes_per_token_per_gpu(LLAMA8B, tp=4, pp=2) == 2 * 16 * 2 * 128 * 2
    # tp = 16 > 8 KV heads: every GPU keeps one whole KV head.
    assert cm.kv_bytes_per_token_per_gpu(LLAMA8B, tp=16, pp=1) == 2 * 32 * 1 * 128 * 2


def test_weights_per_gpu_with_pipeline_stages():
    assert cm.weight_bytes_per_gpu(LLAMA8B, tp=8, pp=1) == LLAMA8B.weight_bytes / 8
    stage = 16 * LLAMA8B.layer_params + 128256 * 4096   # half the layers and one embedding table
    assert cm.weight_bytes_per_gpu(LLAMA8B, tp=2, pp=2) == stage * 2 / 2


def test_kv_capacity_is_what_is_left_after_weights_and_activations():
    layout = cm.Layout(tp=8)
    free = 0.9 * 80e9 - LLAMA8B.weight_bytes / 8 - cm.activation_bytes_per_gpu(LLAMA8B, 8, 8192)
    assert cm.kv_capacity_tokens(LLAMA8B, UNIT, layout, 8192) == int(free // (2 * 32 * 1 * 128 * 2))


def test_tokens_per_rank_by_placement():
    assert cm.tokens_per_rank(cm.Layout(kvp=4, placement="striped"), 1001) == 251
    onboard = cm.Layout(kvp=4, placement="onboard", max_tokens_per_rank=400)
    assert cm.tokens_per_rank(onboard, 1000) == 400
    assert cm.tokens_per_rank(onboard, 300) == 300          # still on its first rank


def test_decode_time_one_gpu_is_bytes_plus_flops():
    ctx = 1000
    t = cm.decode_step_time(LLAMA8B, UNIT, cm.Layout(), ctx)
    active = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096 + 128256 * 4096
    hbm = active * 2 + ctx * 131072
    flops = 2 * active + 4 * 32 * 32 * 128 * ctx
    assert t == pytest.approx(hbm + flops)


NOSPLIT = 1 << 62  # kvp.split_min_bytes no layer reaches
PARTIAL = 32 * (128 * 2 + 4)  # one query's partials on a GPU: bf16 outputs, float32 LSEs


def test_decode_with_kv_ranks_reads_a_share_and_pays_hops():
    hw = dataclasses.replace(UNIT, intra_latency=1.0)
    striped = cm.Layout(kvp=4, placement="striped", split_min_bytes=NOSPLIT)
    base = cm.decode_step_terms(LLAMA8B, hw, cm.Layout(), 4000)
    four = cm.decode_step_terms(LLAMA8B, hw, striped, 4000)
    assert base.hbm_bytes - four.hbm_bytes == 3000 * 131072
    assert four.intra_hops == 32 * 3                      # one all-gather of partials per layer
    owner = cm.decode_step_terms(LLAMA8B, hw, striped, 4000, "owner")
    # The one token's owner is one rank, so every rank runs it: partials per layer, hidden once.
    assert owner.intra_hops == 32 * 3 + 3
    routed = cm.decode_step_terms(LLAMA8B, hw, striped, 4000, "owner", step_mode="owner")
    assert routed.intra_hops == 32 * 2 * 3 + 3            # queries out, partials back, hidden once
    assert four.intra_link_bytes == 32 * 3 * PARTIAL


def test_decode_with_split_layers_reads_a_share_of_their_weights():
    """Llama-8B's four projections of every layer are >= 32 MiB: a shared decode step reads 1/4
    of them on each of 4 ranks and gathers the columns of qkv and o and the partial sums of the
    gated MLP's down projection (3 more collectives per layer: the MLP splits like a TP layer)."""
    hw = dataclasses.replace(UNIT, intra_latency=1.0)
    split = cm.decode_step_terms(LLAMA8B, hw, cm.Layout(kvp=4, placement="striped"), 4000, "owner")
    whole = cm.decode_step_terms(LLAMA8B, hw, cm.Layout(kvp=4, placement="striped",
                                                        split_min_bytes=NOSPLIT), 4000, "owner")
    projections = 6144 * 4096 + 4096 * 4096 + 2 * 14336 * 4096 + 4096 * 14336
    assert whole.hbm_bytes - split.hbm_bytes == 32 * projections * 2 * 3 / 4
    assert split.intra_hops == (32 + 32 * 3 + 1) * 3
    shape = cm.exchange_shape(LLAMA8B, cm.Layout(kvp=4), 32 << 20)
    assert shape.split_widths == (6144, 4096) * 32 and shape.sum_widths == (4096,) * 32
    # Per TP rank: at tp 2 only the MLP projections stay >= 32 MiB, at tp 8 none.
    assert cm.split_layers(LLAMA8B, 2, 32 << 20) == [(14336, 4096), (4096, 7168)]
    assert cm.split_layers(LLAMA8B, 8, 32 << 20) == []


@pytest.mark.parametrize("placement", cm.PLACEMENTS)
def test_owner_decode_at_batch_1_is_a_replicated_step(placement):
    # kvp = 4, tp = 1: one token's partials are 32 heads x (128 x 2 + 4) B, its query
    # 32 x 128 x 2 B = 8,192 B, its hidden state 4096 x 2 B = 8,192 B; each gather receives 3 ranks'.
    layout = cm.Layout(kvp=4, placement=placement, max_tokens_per_rank=1000,
                       split_min_bytes=NOSPLIT)
    rep = cm.decode_step_terms(LLAMA8B, UNIT, layout, 4000, "replicated")
    auto = cm.decode_step_terms(LLAMA8B, UNIT, layout, 4000, "owner")
    routed = cm.decode_step_terms(LLAMA8B, UNIT, layout, 4000, "owner", step_mode="owner")
    assert auto.intra_link_bytes == 3 * (32 * PARTIAL + 8192)
    assert routed.intra_link_bytes == 3 * (32 * (PARTIAL + 8192) + 8192)
    # The same dense work and KV in all three; owner computes adds only the hidden-state gather.
    assert (auto.steps, auto.hbm_bytes, auto.flops) == (rep.steps, rep.hbm_bytes, rep.flops)
    assert (auto.intra_hops - rep.intra_hops, auto.intra_link_bytes - rep.intra_link_bytes) \
        == (3, 3 * 8192)


def test_collectives_per_step_by_mode_and_ownership():
    striped, one = cm.Layout(kvp=4, placement="striped", split_min_bytes=NOSPLIT), cm.Layout()
    assert cm.kvp_collectives(LLAMA8B, one, 1, "owner") == 0           # no KV ranks, no exchange
    assert cm.kvp_collectives(LLAMA8B, striped, 1, "replicated") == 32
    assert cm.kvp_collectives(LLAMA8B, striped, 1, "owner", min_bytes=NOSPLIT) == 33  # one owner
    assert cm.kvp_collectives(LLAMA8B, striped, 1, "owner", step_mode="owner") == 65
    # Split layers (the default 32 MiB: all four projections): qkv's and o's columns are gathered
    # too, and the gated MLP's partial sums once, and a small step of several owners is shared as
    # well.
    assert cm.kvp_collectives(LLAMA8B, striped, 1, "owner") == 32 + 3 * 32 + 1
    assert cm.kvp_collectives(LLAMA8B, striped, 8, "owner", rows=2) == 32 + 3 * 32 + 1
    # 8 decode tokens: striped spreads them (2 per rank): routed; all on one rank: replicated.
    assert cm.kvp_collectives(LLAMA8B, striped, 8, "owner", rows=2, min_bytes=NOSPLIT) == 65
    assert cm.kvp_collectives(LLAMA8B, striped, 8, "owner", rows=8, min_bytes=NOSPLIT) == 33
    hw = dataclasses.replace(UNIT, intra_latency=1.0)
    assert cm.kvp_exchange(LLAMA8B, hw, striped, 8, "owner", rows=2).intra_hops == 65 * 3


def test_kvp_group_beyond_a_node_pays_inter_node_latency():
    terms = cm.decode_step_terms(LLAMA8B, UNIT, cm.Layout(tp=8, kvp=2), 4000)
    assert terms.inter_hops == 32 * 1 and terms.intra_hops == 32 * 2 * 2 * 3   # TP all-reduces
    assert cm.decode_step_terms(LLAMA8B, UNIT, cm.Layout(tp=4, kvp=2), 4000).inter_hops == 0


def test_prefill_single_chunk_includes_the_quadratic_term():
    c = 4096
    active = LLAMA8B.active_params
    flops = 2 * active * c + 4 * 32 * 32 * 128 * c * (c / 2)
    assert cm.prefill_time(LLAMA8B, UNIT, cm.Layout(), c, chunk=c) == pytest.approx(flops)


def test_prefill_grouping_matches_the_exact_chunk_sum():
    layout = cm.Layout(tp=8, pp=2, kvp=4, placement="onboard", max_tokens_per_rank=65536)
    hw = CATALOGUE["h100"].effective()
    exact = cm.prefill_time(LLAMA8B, hw, layout, 262144, 2048, max_points=10**9)
    assert cm.prefill_time(LLAMA8B, hw, layout, 262144, 2048, max_points=16) == pytest.approx(exact, rel=0.01)


def test_owner_striped_prefill_splits_dense_work_over_kv_ranks():
    layout = cm.Layout(kvp=4, placement="striped")
    rep = cm.prefill_chunk_time(LLAMA8B, UNIT, layout, 4096, 0, "replicated")
    own = cm.prefill_chunk_time(LLAMA8B, UNIT, layout, 4096, 0, "owner")
    dense, causal = 2 * LLAMA8B.active_params * 4096, 4 * 32 * 32 * 128 * 4096 * 2048
    assert rep == pytest.approx(dense + causal)
    assert own == pytest.approx((dense + causal) / 4, rel=1e-3)   # plus the (tiny) exchange


def test_prefill_exchange_by_placement_under_owner_computes():
    # Only latency (1 s a hop) or only link bytes (1 MB/s) added to a compute-bound host (so the
    # cost model keeps a balanced chunk on its owners); 4 KV ranks: 3 hops a gather.
    base = dataclasses.replace(UNIT, hbm_bw=1e9, flops=1e9)
    hops = dataclasses.replace(base, intra_latency=1.0)
    link = dataclasses.replace(base, intra_bw=1e6)
    onboard = cm.Layout(kvp=4, placement="onboard", max_tokens_per_rank=8192,
                        split_min_bytes=NOSPLIT)
    striped = cm.Layout(kvp=4, placement="striped", split_min_bytes=NOSPLIT)

    def exchange(hw, layout, mode="owner"):  # what the exchange adds to the chunk's time
        return (cm.prefill_chunk_time(LLAMA8B, hw, layout, 4096, 0, mode)
                - cm.prefill_chunk_time(LLAMA8B, base, layout, 4096, 0, mode))

    # onboard: the chunk lands on one rank, so every rank runs it: partials per layer, hidden once.
    assert exchange(hops, onboard) == pytest.approx((32 + 1) * 3)
    assert exchange(hops, onboard, "replicated") == pytest.approx(32 * 3)
    # striped: 1024 tokens a rank, routed: queries and partials per layer, hidden once.
    assert exchange(hops, striped) == pytest.approx((2 * 32 + 1) * 3)
    # Every rank sends partials of all 4096 queries; rows are 8,192 B.
    partials, row = 4096 * PARTIAL, 8192
    assert exchange(link, onboard) == pytest.approx(3 * (32 * partials + 4096 * row) / 1e6)
    assert exchange(link, striped) == pytest.approx(
        3 * (32 * (partials + 1024 * row) + 1024 * row) / 1e6)
    # Were compute free, sharing the striped chunk would cost only its fewer collectives.
    free = dataclasses.replace(hops, hbm_bw=1e30, flops=1e30)
    assert cm.prefill_chunk_time(LLAMA8B, free, striped, 4096, 0, "owner") == pytest.approx(
        (32 + 1) * 3)


def test_owner_onboard_prefill_runs_the_chunk_in_the_owners_time():
    layout = cm.Layout(kvp=4, placement="onboard", max_tokens_per_rank=8192)
    rep = cm.prefill_chunk_time(LLAMA8B, UNIT, layout, 4096, 0, "replicated")
    own = cm.prefill_chunk_time(LLAMA8B, UNIT, layout, 4096, 0, "owner")
    assert own == pytest.approx(rep) and rep == pytest.approx(
        2 * LLAMA8B.active_params * 4096 + 4 * 32 * 32 * 128 * 4096 * 2048)


def test_pipeline_stages_overlap_chunks():
    one = cm.prefill_time(LLAMA8B, UNIT, cm.Layout(), 8 * 1024, chunk=1024)
    last = cm.prefill_chunk_time(LLAMA8B, UNIT, cm.Layout(pp=4), 1024, 7 * 1024)
    four = cm.prefill_time(LLAMA8B, UNIT, cm.Layout(pp=4), 8 * 1024, chunk=1024)
    assert four == pytest.approx(one / 4 + 3 * last / 4)


def test_catalogue_holds_datasheet_values():
    h100 = get_gpu("H100")
    assert (h100.memory_bytes, h100.hbm_bw, h100.flops) == (80e9, 3.35e12, 989e12)
    assert h100.intra_bw == 900e9 / 2 and h100.inter_bw == 400e9 / 8   # per direction; 400 Gb/s
    assert set(CATALOGUE) >= {"a100", "h100", "h200", "b200"}
    with pytest.raises(GPUSpecError, match="unknown GPU 'v100'"):
        get_gpu("v100")


def test_gpu_spec_file(tmp_path):
    fields = {k: v for k, v in dataclasses.asdict(get_gpu("h100")).items() if k != "name"}
    good = tmp_path / "mygpu.json"
    good.write_text(json.dumps({**fields, "memory_bytes": 96e9}))
    assert load_gpu_spec(good).memory_bytes == 96e9 and load_gpu_spec(good).name == "mygpu"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**fields, "hbm_bandwidth": 1, "hbm_bw": -1}))
    with pytest.raises(GPUSpecError, match="unknown fields \\['hbm_bandwidth'\\]"):
        load_gpu_spec(bad)


def test_catalogue_has_a_step_overhead_and_the_floor_has_none():
    h100 = get_gpu("h100")
    assert h100.effective().step_overhead == h100.step_overhead == 0.5e-3
    assert h100.peak().step_overhead == 0.0 and h100.effective().cpus == 0


def test_gpu_spec_optional_fields(tmp_path):
    fields = {k: v for k, v in dataclasses.asdict(get_gpu("h100")).items()
              if k not in ("name", "gpus_per_node", "step_overhead", "cpus")}
    f = tmp_path / "cpu.json"
    f.write_text(json.dumps({**fields, "step_overhead": 2e-3, "cpus": 2}))
    spec = load_gpu_spec(f)
    assert (spec.step_overhead, spec.cpus, spec.gpus_per_node) == (2e-3, 2, 8)
    f.write_text(json.dumps(fields))
    assert load_gpu_spec(f).step_overhead == get_gpu("h100").step_overhead
    f.write_text(json.dumps({**fields, "step_overhead": -1}))
    with pytest.raises(GPUSpecError, match="step_overhead must be a number >= 0"):
        load_gpu_spec(f)


def test_core_sharing_counts_workers_and_the_engine_process():
    cpu = dataclasses.replace(UNIT, cpus=2)
    # Plain vLLM: one worker and the engine process on 2 cores; KV ranks add a busy worker each.
    assert cm.core_sharing(cpu, cm.Layout(kvp=1)) == 1.0
    assert cm.core_sharing(cpu, cm.Layout(kvp=2)) == 1.5
    assert cm.core_sharing(cpu, cm.Layout(kvp=4)) == 2.5
    assert cm.core_sharing(dataclasses.replace(UNIT, cpus=16), cm.Layout(kvp=4)) == 1.0
    assert cm.core_sharing(UNIT, cm.Layout(kvp=64)) == 1.0      # GPUs: a device per worker


def test_core_sharing_stretches_work_but_not_the_exchange():
    hw = dataclasses.replace(UNIT, cpus=2, intra_latency=1.0)
    layout = cm.Layout(kvp=2, placement="striped", split_min_bytes=NOSPLIT)
    alone = cm.decode_step_terms(LLAMA8B, UNIT, layout, 4000, "owner")
    shared = cm.decode_step_terms(LLAMA8B, hw, layout, 4000, "owner")
    assert shared.steps == 1.5 and alone.steps == 1.0
    assert shared.hbm_bytes == 1.5 * alone.hbm_bytes and shared.flops == 1.5 * alone.flops
    assert shared.intra_hops == alone.intra_hops == 32 + 1   # partials per layer, hidden once

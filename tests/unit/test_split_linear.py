"""Linear layers split by output columns over KV ranks (shared steps): the slicing and
reassembly math, and vLLM's CPU kernels on a slice against the whole layer."""

import pytest
import torch

from vllm_kvp.step.columns import assemble_columns, column_bounds, pad_columns


@pytest.mark.parametrize("features,world", [(256, 2), (256, 3), (1536, 4), (7, 3), (2, 4), (0, 2)])
def test_column_bounds_cover_every_column_once_near_evenly(features, world):
    bounds = column_bounds(features, world)
    widths = [b - a for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == features and len(widths) == world
    assert min(widths) >= 0 and max(widths) - min(widths) <= 1
    assert widths == sorted(widths, reverse=True)


def test_column_bounds_reject_bad_input():
    with pytest.raises(ValueError):
        column_bounds(8, 0)
    with pytest.raises(ValueError):
        column_bounds(-1, 2)


@pytest.mark.parametrize("features,world,rows", [(384, 2, 5), (256, 3, 1), (1537, 4, 16), (3, 4, 2)])
def test_slices_computed_apart_and_assembled_equal_the_whole_layer(features, world, rows):
    """Each simulated rank computes its columns of x @ W.T + b; padding, all-gather order (rank
    major) and reassembly give back the whole product bit for bit."""
    # Small integers: every sum is exact whatever order a GEMM adds in, so only the slicing and
    # reassembly are under test here (vLLM's kernels are checked below).
    g = torch.Generator().manual_seed(features)
    x = torch.randint(-8, 8, (rows, 64), generator=g).double()
    w = torch.randint(-8, 8, (features, 64), generator=g).double()
    b = torch.randint(-8, 8, (features,), generator=g).double()
    whole = torch.nn.functional.linear(x, w, b)
    bounds = column_bounds(features, world)
    widest = max(b1 - b0 for b0, b1 in zip(bounds, bounds[1:]))
    parts = [pad_columns(torch.nn.functional.linear(x, w[lo:hi], b[lo:hi]), widest)
             for lo, hi in zip(bounds, bounds[1:])]
    assert all(p.shape == (rows, widest) for p in parts)
    gathered = torch.cat(parts, dim=0).view(world, rows, widest)  # what all_gather(dim=0) returns
    assert torch.equal(assemble_columns(gathered, bounds), whole)


def test_assemble_refuses_a_rank_count_mismatch():
    with pytest.raises(ValueError):
        assemble_columns(torch.zeros(3, 2, 4), column_bounds(8, 2))


def _vllm_cpu_kernel(weight, remove_weight=True):
    """A module carrying vLLM's CPU kernel for `weight`, built as vLLM builds a linear layer's
    (an lm_head's keeps its weight: `remove_weight=False`)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    m = torch.nn.Module()
    m.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(m, remove_weight=remove_weight)
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features,world", [(1536, 256, 2), (256, 768, 3),
                                                            (1000, 512, 4)])
def test_vllm_cpu_kernel_on_a_column_slice_is_bit_identical(dtype, out_features, in_features,
                                                            world):
    """What `patches/cpu_linear_slices.py` relies on: vLLM's kernel built for rank r's rows of the
    weight gives exactly those columns of the whole layer's kernel, for any number of rows."""
    torch.manual_seed(out_features)
    w = (torch.randn(out_features, in_features) / in_features ** 0.5).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    whole = _vllm_cpu_kernel(w)
    bounds = column_bounds(out_features, world)
    slices = [_vllm_cpu_kernel(w[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
    for rows in (1, 3, 16, 130):
        x = torch.randn(rows, in_features).to(dtype)
        ref = whole.cpu_linear(x, whole.weight, bias)
        got = torch.cat([s.cpu_linear(x, s.weight, bias[lo:hi])
                         for s, lo, hi in zip(slices, bounds, bounds[1:])], dim=1)
        assert torch.equal(got, ref), f"{rows} rows: max diff {(got - ref).abs().max()}"


@pytest.mark.parametrize("vocab,hidden,world", [(4096, 256, 2), (4096, 1024, 3), (32064, 512, 4)])
def test_vllm_cpu_kernel_on_a_vocab_slice_of_the_lm_head_is_bit_identical(vocab, hidden, world):
    """What `split_linear.install_logits` relies on: each rank's vocab columns of the logits,
    from vLLM's kernel built for its rows of the head (weight kept, as vLLM keeps an lm_head's),
    are exactly those columns of the whole head's logits."""
    torch.manual_seed(vocab + hidden)
    w = torch.randn(vocab, hidden) / hidden ** 0.5
    whole = _vllm_cpu_kernel(w, remove_weight=False)
    bounds = column_bounds(vocab, world)
    slices = [_vllm_cpu_kernel(w[lo:hi], remove_weight=False) for lo, hi in zip(bounds, bounds[1:])]
    for rows in (1, 16, 64):
        x = torch.randn(rows, hidden)
        ref = whole.cpu_linear(x, whole.weight, None)
        widest = max(hi - lo for lo, hi in zip(bounds, bounds[1:]))
        parts = [pad_columns(s.cpu_linear(x, s.weight, None), widest) for s in slices]
        got = assemble_columns(torch.stack(parts), bounds)
        assert torch.equal(got, ref), f"{rows} rows: max diff {(got - ref).abs().max()}"


def test_gate_up_rows_pick_the_same_columns_of_gate_and_up():
    from vllm_kvp.step.columns import gate_up_rows

    assert gate_up_rows(6, 2, 4).tolist() == [2, 3, 8, 9]
    assert gate_up_rows(6, 0, 0).tolist() == []
    with pytest.raises(ValueError):
        gate_up_rows(6, 4, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter,world", [(256, 1024, 2), (128, 344, 3), (64, 100, 4)])
def test_gated_mlp_split_like_tp_matches_float64(dtype, hidden, inter, world):
    """A gated MLP in a shared step (`split_linear.GateUpSliceMethod`, `DownSliceMethod`): each
    simulated rank runs vLLM's CPU kernels on its slices (`cpu_mlp_slice`, as the patch builds
    them), SiLU-and-mul on its columns and its share of the down projection; the partial sums
    added in rank order match a float64 MLP to rounding, and the gate/up columns are bit for bit
    those of the whole layer."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from vllm_kvp.step.columns import gate_up_rows, sum_in_rank_order
    from vllm_kvp.step.split_linear import cpu_mlp_slice

    torch.manual_seed(hidden + inter + world)
    w_gu = (torch.randn(2 * inter, hidden) / hidden ** 0.5).to(dtype)
    w_down = (torch.randn(hidden, inter) / inter ** 0.5).to(dtype)
    b_down = torch.randn(hidden).to(dtype)
    build = lambda p: dispatch_cpu_unquantized_gemm(p, remove_weight=True)  # noqa: E731
    whole_gu = _vllm_cpu_kernel(w_gu)
    bounds = column_bounds(inter, world)
    ranks = [(cpu_mlp_slice(w_gu, "gate_up", lo, hi, build),
              cpu_mlp_slice(w_down, "down", lo, hi, build), lo, hi)
             for lo, hi in zip(bounds, bounds[1:])]
    act = lambda g: torch.nn.functional.silu(g[..., : g.shape[-1] // 2]) * g[..., g.shape[-1] // 2:]  # noqa: E731
    for rows in (1, 7, 130):
        x = torch.randn(rows, hidden).to(dtype)
        ref_gu = whole_gu.cpu_linear(x, whole_gu.weight, None)
        parts = []
        for gu, down, lo, hi in ranks:
            mine = gu.cpu_linear(x, gu.weight, None)
            assert torch.equal(mine, ref_gu[:, gate_up_rows(inter, lo, hi)])
            parts.append(down.cpu_linear(act(mine), down.weight, None))
        got = sum_in_rank_order(torch.stack(parts)) + b_down
        x64 = x.double()
        want = act(x64 @ w_gu.double().T) @ w_down.double().T + b_down.double()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (got.double() - want).abs().max()


def test_gated_mlp_gpu_views_match_the_cpu_slices():
    """The GPU path's kernels (`_view_kernel_rows`, `_view_kernel_cols`: views of the weight, no
    copy) compute what the CPU path's copied slices do, bias included."""
    from vllm_kvp.step.columns import gate_up_rows
    from vllm_kvp.step.split_linear import _view_kernel_cols, _view_kernel_rows

    gemm = lambda layer, x, w, b: torch.nn.functional.linear(x, w, b)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    inter, hidden = 12, 5
    w_gu = torch.randint(-4, 4, (2 * inter, hidden), generator=g).double()
    b_gu = torch.randint(-4, 4, (2 * inter,), generator=g).double()
    w_down = torch.randint(-4, 4, (hidden, inter), generator=g).double()
    x = torch.randint(-4, 4, (3, hidden), generator=g).double()
    rows = gate_up_rows(inter, 4, 8)
    got = _view_kernel_rows(gemm, None, w_gu, rows)(x, b_gu[rows])
    assert torch.equal(got, torch.nn.functional.linear(x, w_gu[rows], b_gu[rows]))
    h = torch.randint(-4, 4, (3, inter), generator=g).double()
    got = _view_kernel_cols(gemm, None, w_down, 4, 8)(h[:, 4:8], None)
    assert torch.equal(got, h[:, 4:8] @ w_down[:, 4:8].T)

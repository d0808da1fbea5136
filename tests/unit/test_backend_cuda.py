"""The CUDA backend (`vllm_kvp.step.backend_cuda`) on CPU: builder and impl built on a real VllmConfig of
the embedded model, several KV ranks simulated in one process, against dense float64 attention.

* Ranks are threads; the KVP group is a stand-in whose all_gather concatenates every rank's tensor
  in rank order, so `vllm_kvp.step.comm`'s own padding, packing and restoring run unchanged.
* Our Triton kernels (paged attention, merge) run in Triton's interpreter: private copies of their
  modules are loaded with TRITON_INTERPRET=1 set only while they are decorated (the mechanism of
  test_triton_merge.py), and swapped into backend_cuda. One kernel runs at a time.
* vLLM's `reshape_and_cache_flash` (CUDA only) is replaced by a torch reference of its contract:
  token i goes to slot slot_mapping[i] of the block-major (num_blocks, block_size, Hkv, D) views
  `kv_cache.transpose(1, 2).split(D, -1)`, and slot -1 is skipped.
* A graph-readiness lint runs `do_kv_cache_update` and `forward` on `meta` tensors (kernels faked
  by `empty_like`): any host read or data-dependent shape raises there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="triton is not installed")

from support import ref_attention, step_tensors, steps  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends import flash_attn, registry  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

import vllm_kvp.ops  # noqa: E402
from vllm_kvp.step import backend_cuda, comm  # noqa: E402
from vllm_kvp.engine import settings as layout, worker
from vllm_kvp.step.backend_cuda import (KVPCudaMetadataBuilder, KVPFlashAttentionBackend,  # noqa: E402
                                   KVPFlashAttentionImpl)
from vllm_kvp.config import KVPConfig, KVPConfigError  # noqa: E402
from vllm_kvp.rank_map import RankMap  # noqa: E402
from vllm_kvp.step.routing import route_step  # noqa: E402
from vllm_kvp.step.shard_map import local_slots  # noqa: E402
from vllm_kvp.step.stats import STATS, RankStats  # noqa: E402
from vllm_kvp.step import RankContext  # noqa: E402
from vllm_kvp.step_policy import StepPolicy  # noqa: E402

HQ, HKV, D = 8, 2, 32  # the embedded model's attention shape
SCALE = D ** -0.5


def _load_interpreted(filename: str):
    path = pathlib.Path(vllm_kvp.ops.__file__).with_name(filename)
    spec = importlib.util.spec_from_file_location(f"_kvp_backend_cuda_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


_KERNEL_LOCK = threading.Lock()  # the interpreter patches triton.language while a kernel runs


def _one_at_a_time(fn):
    def call(*args, **kwargs):
        with _KERNEL_LOCK:
            return fn(*args, **kwargs)
    return call


INTERPRETED_ATTENTION = _one_at_a_time(
    _load_interpreted("triton_paged_attention.py").paged_attention_lse)
INTERPRETED_MERGE = _one_at_a_time(_load_interpreted("triton_merge.py").triton_merge_partials)


def reference_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                      kv_cache_dtype, k_scale, v_scale):
    """vLLM's cache write, from its contract: key/value (>= S, Hkv, D); key_cache/value_cache
    (num_blocks, block_size, Hkv, D) views; slot_mapping (S,) int64; slot -1 is skipped."""
    assert slot_mapping.dtype == torch.int64 and kv_cache_dtype == "auto"
    assert key_cache.shape[2:] == key.shape[1:] and key.shape[0] >= slot_mapping.shape[0]
    bs = key_cache.shape[1]
    for i, s in enumerate(slot_mapping.tolist()):
        if s >= 0:
            key_cache[s // bs, s % bs] = key[i]
            value_cache[s // bs, s % bs] = value[i]


class ThreadGroup:
    """Stands in for the KVP GroupCoordinator: rank r is thread r; all_gather concatenates the
    tensors of all ranks in rank order once every rank has given its own."""

    def __init__(self, world: int) -> None:
        self.world_size = world
        self._local = threading.local()
        self._barrier = threading.Barrier(world, timeout=60)
        self._inbox: list[torch.Tensor | None] = [None] * world

    @property
    def rank_in_group(self) -> int:
        return self._local.rank

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self._inbox[self.rank_in_group] = x.clone()
        self._barrier.wait()
        out = torch.cat(self._inbox, dim)
        self._barrier.wait()  # everyone has read before the next exchange refills the inbox
        return out

    def run(self, fn):
        """fn(rank) on every rank, concurrently; returns the results in rank order."""
        results, errors = [None] * self.world_size, []

        def target(rank):
            self._local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return results


class PerRankContext:
    """Each simulated rank's own rank context, as each rank's process has its own."""

    def __init__(self) -> None:
        self._local = threading.local()

    def set(self, context: RankContext) -> None:
        self._local.context = context

    def __call__(self) -> RankContext:
        return self._local.context


class _Quiet:
    """Hides a fixture's value from hypothesis's report of a failing example (a VllmConfig does not
    pretty-print)."""

    def __init__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"<{type(self.value).__name__}>"


class PerRankStats:
    """Each simulated rank's own counters, as each rank's process has its own `STATS`."""

    def __init__(self) -> None:
        object.__setattr__(self, "_local", threading.local())

    def _stats(self) -> RankStats:
        if not hasattr(self._local, "stats"):
            self._local.stats = RankStats()
        return self._local.stats

    def __getattr__(self, name: str):
        return getattr(self._stats(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._stats(), name, value)


@pytest.fixture(scope="module")
def config_holder(model_path):
    from vllm.engine.arg_utils import EngineArgs

    return _Quiet(EngineArgs(model=model_path, dtype="float32", max_model_len=1024, max_num_seqs=8,
                             max_num_batched_tokens=1024).create_engine_config())


@pytest.fixture(scope="module")
def vllm_config(config_holder):
    return config_holder.value


@pytest.fixture(scope="module")
def kernels():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend_cuda, "paged_attention_lse", INTERPRETED_ATTENTION)
        mp.setattr(backend_cuda, "triton_merge_partials", INTERPRETED_MERGE)
        mp.setattr(flash_attn, "reshape_and_cache_flash", reference_reshape_and_cache_flash,
                   raising=False)  # absent from vLLM's CPU build
        yield


def make_impl() -> KVPFlashAttentionImpl:
    return KVPFlashAttentionImpl(HQ, D, SCALE, HKV, None, None, "auto")


LAYER = SimpleNamespace(_k_scale=torch.ones(()), _v_scale=torch.ones(()))


def common_metadata(table, qsl, seq_lens, slots, pad: int) -> CommonAttentionMetadata:
    """What vLLM's runner hands every builder; `pad` padding tokens (slot -1) end the step."""
    slots = torch.cat([slots, slots.new_full((pad,), -1)])
    q_lens = (qsl[1:] - qsl[:-1]).tolist()
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=len(q_lens),
        num_actual_tokens=slots.shape[0], max_query_len=max(q_lens),
        max_seq_len=int(seq_lens.max()), block_table_tensor=table, slot_mapping=slots)


@st.composite
def cuda_steps(draw):
    """N ranks of P blocks of vLLM's CUDA block sizes; requests with past and new tokens."""
    world = draw(st.integers(1, 3))
    bs = draw(st.sampled_from([16, 16, 128]))
    n_req = draw(st.integers(1, 3))
    past = [draw(st.integers(0, 3 * bs // 2)) for _ in range(n_req)]
    new = [draw(st.integers(1, 9)) for _ in range(n_req)]
    needed = sum(-(-(p + q) // bs) for p, q in zip(past, new)) + 1
    per_rank = max(draw(st.integers(2, 4)), -(-needed // world))
    free = list(draw(st.permutations(range(1, world * per_rank))))  # block 0 is vLLM's null block
    tables = [[free.pop() for _ in range(-(-(p + q) // bs))] for p, q in zip(past, new)]
    pad = draw(st.integers(0, 2))
    return world, bs, per_rank, past, new, tables, pad, draw(st.sampled_from(["auto", "owner"]))


@settings(max_examples=40, deadline=None)
@given(cuda_steps())
def test_layer_on_simulated_ranks_matches_dense_attention(config_holder, kernels, step):
    """Each rank builds its metadata, writes its rows' K/V through vLLM's write, attends every
    query (Triton) and merges its rows' partials (Triton): together, causal attention over the
    whole context, each new token written on exactly one rank. With step_mode "auto", a step
    whose requests all live on one rank each is local (each rank attends its own rows, nothing is
    exchanged); one whose tokens one rank owns but whose requests span ranks is shared: every rank
    runs every row, and the owner's rows of its output are the result."""
    world, bs, per_rank, past, new, tables, pad, step_mode = step
    vllm_config = config_holder.value
    policy = StepPolicy(world, share_steps=step_mode == "auto")
    ranks = RankMap(world, per_rank, bs)
    contexts = PerRankContext()
    assert backend_cuda.paged_attention_lse is INTERPRETED_ATTENTION
    table, qsl, seq_lens, slots = step_tensors(bs, past, new, tables)
    cm = common_metadata(table, qsl, seq_lens, slots, pad)
    t = cm.num_actual_tokens
    g = torch.Generator().manual_seed(t * 31 + bs)
    ks = [torch.randn(p + q, HKV, D, generator=g) for p, q in zip(past, new)]
    vs = [torch.randn(p + q, HKV, D, generator=g) for p, q in zip(past, new)]
    query = torch.randn(t, HQ, D, generator=g)  # padding rows too, as vLLM runs them
    new_k = torch.cat([k[p:] for k, p in zip(ks, past)] + [torch.zeros(pad, HKV, D)])
    new_v = torch.cat([v[p:] for v, p in zip(vs, past)] + [torch.zeros(pad, HKV, D)])
    past_slots = torch.tensor([tables[i][pos // bs] * bs + pos % bs
                               for i, p in enumerate(past) for pos in range(p)], dtype=torch.int64)
    past_k = torch.cat([k[:p] for k, p in zip(ks, past)])
    past_v = torch.cat([v[:p] for v, p in zip(vs, past)])
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
    group = ThreadGroup(world)

    def rank_step(rank):
        contexts.set(RankContext(rank, ranks, policy))
        # vLLM's CUDA layout: block-major (LBNHC) storage, seen through the logical view.
        kv_cache = torch.zeros(per_rank, bs, HKV, 2 * D).transpose(1, 2)
        k_view, v_view = kv_cache.transpose(1, 2).split(D, dim=-1)
        reference_reshape_and_cache_flash(  # earlier steps' tokens this rank holds
            past_k, past_v, k_view, v_view, local_slots(past_slots, rank, ranks),
            "auto", None, None)
        builder = KVPCudaMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], vllm_config,
                                         torch.device("cpu"))
        md = builder.build(0, cm)
        plan = md.routing
        impl = make_impl()
        # What the runner gives the layer: this rank's rows and their logical slots, or in a
        # shared step every row and vLLM's slot mapping.
        run = torch.arange(t) if md.shared else plan.row_idx
        run_slots = cm.slot_mapping if md.shared else plan.row_slots
        k_rows, v_rows = new_k[run], new_v[run]
        impl.do_kv_cache_update(LAYER, k_rows, v_rows, kv_cache, run_slots)
        output = torch.full((run.numel(), HQ * D), float("nan"))
        impl.forward(LAYER, query[run], k_rows, v_rows, kv_cache, md, output)
        if md.shared:
            output = output[plan.row_idx]  # the owner's rows are the ones kept
        return md, output, int(backend_cuda.STATS.kv_tokens_written)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comm, "_KVP_GROUP", group)
        stats = PerRankStats()
        mp.setattr(comm, "STATS", stats)
        mp.setattr(backend_cuda, "STATS", stats)
        mp.setattr(backend_cuda, "rank_context", contexts)
        results = [(md.routing, md.kind, out, n) for md, out, n in group.run(rank_step)]

    n_real = t - pad
    assert sum(plan.num_local for plan, _, _, _ in results) == n_real
    # Every rank gives the step the kind the policy gives it from the owners and the tables.
    spans = any(len({b // per_rank for b in blocks}) > 1 for blocks in tables)
    counts = results[0][0].counts
    assert {kind for _, kind, _, _ in results} == {policy.kind(counts, spans)}
    result = torch.full((n_real, HQ, D), float("nan"))
    for plan, _, output, written in results:
        assert written == plan.num_local  # each new token's K/V on its owner only
        if plan.num_local:
            result[plan.row_idx] = output.view(-1, HQ, D)
    for i in range(len(new)):
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        pos = torch.arange(past[i], past[i] + new[i])
        mask = torch.arange(past[i] + new[i])[None, :] <= pos[:, None]
        ref_out, _ = ref_attention(query[rows], ks[i], vs[i], SCALE, mask)
        torch.testing.assert_close(result[rows].double(), ref_out, atol=2e-5, rtol=2e-5)


@settings(max_examples=150, deadline=None)
@given(steps())
def test_padded_step_routing_is_the_unpadded_routing(step):
    world, bs, per_rank, past, new, tables = step
    table, qsl, seq_lens, slots = step_tensors(bs, past, new, tables)
    padded = torch.cat([slots, slots.new_full((2,), -1)])  # vLLM may pad a step (slot -1)
    t = slots.shape[0]
    for rank in range(world):
        ranks = RankMap(world, per_rank, bs)
        want = route_step(slots, qsl, seq_lens, rank, ranks)
        # Padding is owned by no rank and changes nothing else.
        got_padded = route_step(padded, qsl, seq_lens, rank, ranks)
        assert got_padded.num_tokens == t + 2 and got_padded.counts == want.counts
        for name in ("row_idx", "row_slots", "row_req", "row_pos"):
            assert torch.equal(getattr(got_padded, name), getattr(want, name)), name
        assert torch.equal(got_padded.restore_idx[:t], want.restore_idx)


def test_builder_builds_the_step_with_host_bounds(vllm_config, monkeypatch):
    """One Step per build: this rank's shards and the host bounds the kernel launches with."""
    bs, per_rank = 16, 4
    monkeypatch.setattr(backend_cuda, "rank_context",
                        lambda: RankContext(0, RankMap(2, per_rank, bs), StepPolicy(2)))
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
    builder = KVPCudaMetadataBuilder(spec, ["l0"], vllm_config, torch.device("cpu"))
    assert not builder.supports_update_block_table
    for past, new, tables in (([20, 3], [1, 1], [[1, 5], [2]]), ([21, 4, 0], [1, 1, 9], [[1, 5], [2], [6]])):
        md = builder.build(0, common_metadata(*step_tensors(bs, past, new, tables), pad=0))
        assert md.max_kv_len == min(max(p + q for p, q in zip(past, new)), per_rank * bs)
        assert md.max_query_len == max(new)
    assert md.shard_lens.tolist() == [16, 5, 0] and md.local_block_table[0, 0] == 1  # block 6: rank 1


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def test_kv_update_and_forward_never_read_the_device(vllm_config, monkeypatch):
    """On meta tensors a host read (.item(), .tolist(), int(t), bool(t)), boolean-mask indexing
    or nonzero raises, so passing here means neither method needs one (graph-ready)."""
    probe = torch.zeros(2, device="meta")
    for host_read in (lambda: probe[0].item(), lambda: probe.tolist(), lambda: int(probe[0]),
                      lambda: probe[probe > 0], lambda: probe.nonzero()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            host_read()

    bs, per_rank, world, rank = 16, 4, 2, 1
    monkeypatch.setattr(backend_cuda, "rank_context",
                        lambda: RankContext(rank, RankMap(world, per_rank, bs), StepPolicy(world)))
    table, qsl, seq_lens, slots = step_tensors(bs, [20, 3], [2, 5], [[1, 5], [2]])
    cm = common_metadata(table, qsl, seq_lens, slots, pad=1)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
    md = KVPCudaMetadataBuilder(spec, ["l0"], vllm_config, torch.device("cpu")).build(0, cm)
    plan = md.routing
    assert plan.num_local > 0 and not md.shared
    meta_plan = dataclasses.replace(plan, **{f.name: _to_meta(getattr(plan, f.name))
                                              for f in dataclasses.fields(plan)})
    md = dataclasses.replace(md, **{f.name: _to_meta(getattr(md, f.name))
                                    for f in dataclasses.fields(md) if f.name != "routing"},
                             routing=meta_plan)

    calls = []

    def fake_attention(q, kv_cache, block_table, kv_lens, qsl, scale, q_pos, block_pos, *,
                       max_kv_len, max_query_len):
        assert isinstance(max_kv_len, int) and isinstance(max_query_len, int)
        calls.append("attention")
        return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)

    def fake_merge(outs, lses):
        calls.append("merge")
        return torch.empty_like(outs[0]), torch.empty_like(lses[0])

    def fake_write(key, value, key_cache, value_cache, slot_mapping, *_):
        assert slot_mapping.dtype == torch.int64 and key_cache.shape[1:] == (bs, HKV, D)
        calls.append("write")

    monkeypatch.setattr(backend_cuda, "paged_attention_lse", fake_attention)
    monkeypatch.setattr(backend_cuda, "triton_merge_partials", fake_merge)
    monkeypatch.setattr(flash_attn, "reshape_and_cache_flash", fake_write, raising=False)
    monkeypatch.setattr(STATS, "kv_tokens_written", 0)
    monkeypatch.setattr(comm, "_KVP_GROUP", SimpleNamespace(
        world_size=world, rank_in_group=rank,
        all_gather=lambda x, dim=0: torch.cat([x] * world, dim)))

    rows = plan.rows
    kv_cache = torch.empty(per_rank, bs, HKV, 2 * D, device="meta").transpose(1, 2)
    key = torch.empty(rows, HKV, D, device="meta")
    impl = make_impl()
    impl.do_kv_cache_update(LAYER, key, key, kv_cache, md.routing.row_slots)
    output = torch.empty(rows, HQ * D, device="meta")
    assert impl.forward(LAYER, torch.empty(rows, HQ, D, device="meta"), key, key, kv_cache, md,
                        output) is output
    assert calls == ["write", "attention", "merge"]


def test_support_hooks_refuse_what_owner_computes_cannot_run():
    ok = dict(head_size=D, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16,
              use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
              use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
              attn_type=AttentionType.DECODER)
    validate = KVPFlashAttentionBackend.validate_configuration
    assert KVPFlashAttentionBackend.get_name() == "CUSTOM"
    assert validate(**ok) == [] and validate(**{**ok, "dtype": torch.float32}) == []
    assert validate(**{**ok, "block_size": 128}) == []
    for change, reason in (({"has_sliding_window": True}, "sliding window"),
                           ({"has_sink": True}, "sinks"),
                           ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
                           ({"kv_cache_dtype": "float16"}, "differs from the model dtype"),
                           ({"attn_type": AttentionType.ENCODER_ONLY}, "attention type"),
                           ({"use_non_causal": True}, "non-causal"),
                           ({"use_kv_connector": True}, "KV connector"),
                           ({"use_dcp": True}, "DCP"),
                           ({"block_size": 8}, "block_size")):
        reasons = validate(**{**ok, **change})
        assert any(reason in r for r in reasons), (change, reasons)
    for kwargs in ({"alibi_slopes": [0.5] * HQ}, {"logits_soft_cap": 30.0},
                   {"kv_cache_dtype": "fp8"}):
        args = dict(num_heads=HQ, head_size=D, scale=SCALE, num_kv_heads=HKV, alibi_slopes=None,
                    sliding_window=None, kv_cache_dtype="auto")
        with pytest.raises(NotImplementedError):
            KVPFlashAttentionImpl(**{**args, **kwargs})


def test_cuda_engine_settings_and_registration(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    args = EngineArgs(model="x")
    layout.apply_to_engine_args(args, KVPConfig(size=2))
    assert (args.attention_backend, args.enforce_eager) == ("CUSTOM", True)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(KVPConfigError, match="Model Runner V1"):
        layout.apply_to_engine_args(EngineArgs(model="x"), KVPConfig(size=2))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    with pytest.raises(KVPConfigError, match="attention_backend"):
        layout.apply_to_engine_args(EngineArgs(model="x", attention_backend="FLASH_ATTN"),
                                    KVPConfig(size=2))

    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", dict(registry._ATTN_OVERRIDES))
    monkeypatch.setattr(worker.current_platform, "is_cpu", lambda: False)
    flash_path = AttentionBackendEnum.FLASH_ATTN.get_path()
    worker.register_kvp_backend()
    assert AttentionBackendEnum.CUSTOM.get_class() is KVPFlashAttentionBackend
    assert AttentionBackendEnum.FLASH_ATTN.get_path() == flash_path  # other lookups untouched

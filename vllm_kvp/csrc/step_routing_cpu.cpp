// One step's routing on the CPU: the contract of vllm_kvp.step.routing.route_step (who computes which
// token, which requests span ranks) and vllm_kvp.step.shard_map.local_blocks (this rank's
// compacted block table), in one pass.
//
// Both are a few dozen small tensor ops in torch, each paying the dispatcher's fixed cost: about
// 0.4 ms per step, which is 5% of a batch-1 decode step at 60k context. Here they are plain loops
// over the step's tokens and the requests' block-table rows. The torch versions stay the reference
// (and the path on GPUs); tests compare the two on random steps.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

at::Tensor long_contiguous(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

}  // namespace

// Returns {counts, span_counts (world), row_idx, row_slots, row_req, row_pos (rows), restore_idx,
// token_req, token_pos (T), span_restore (S), span_qsl (B+1) int32, span_pos (S) int32, span_merge
// (span_counts[rank]), own_qsl (B+1) int32, own_pos (own local rows) int32, local_table (B, M)
// int32, shard_lens (B) int32, block_pos (B, M) int32}; every other tensor int64. `rows` is
// max(counts[rank], 1): a rank owning nothing gets one dummy row (index 0, slot -1, request -1,
// position 0). Rows: this rank's tokens of local requests first, then those of spanning ones.
std::vector<at::Tensor> step_routing(const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                                     const at::Tensor& seq_lens, const at::Tensor& block_table, int64_t rank,
                                     int64_t world, int64_t blocks_per_rank, int64_t block_size) {
  TORCH_CHECK(slot_mapping.device().is_cpu() && block_table.dim() == 2 && world > 0 && rank >= 0 &&
                  rank < world && blocks_per_rank > 0 && block_size > 0,
              "step_routing: bad arguments");
  const at::Tensor slots_t = long_contiguous(slot_mapping), qsl_t = long_contiguous(query_start_loc),
                   lens_t = long_contiguous(seq_lens), table_t = long_contiguous(block_table);
  const int64_t T = slots_t.numel(), B = lens_t.numel(), M = table_t.size(1);
  TORCH_CHECK(qsl_t.numel() == B + 1 && table_t.size(0) == B, "step_routing: shapes do not match");
  const int64_t* slots = slots_t.data_ptr<int64_t>();
  const int64_t* qsl = qsl_t.data_ptr<int64_t>();
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  const int64_t* table = table_t.data_ptr<int64_t>();
  const int64_t per_rank = blocks_per_rank * block_size;
  auto opts = slots_t.options();
  auto iopts = opts.dtype(at::kInt);
  // floor division, as torch.div(..., rounding_mode="floor")
  auto block_rank = [&](int64_t blk) {
    return blk >= 0 ? blk / blocks_per_rank : -((-blk + blocks_per_rank - 1) / blocks_per_rank);
  };

  // Does each request hold KV on more than one rank (its blocks up to seq_lens)?
  std::vector<char> req_span(std::max<int64_t>(B, 1), 0);
  for (int64_t i = 0; i < B; ++i) {
    int64_t lo = world, hi = -1;
    for (int64_t j = 0; j < M && j * block_size < lens[i]; ++j) {
      const int64_t o = block_rank(table[i * M + j]);
      lo = std::min(lo, o), hi = std::max(hi, o);
    }
    req_span[i] = hi > lo;
  }

  // Request and position of every token; tokens past the last request (padding) count as the
  // last request's, as in routing.token_requests.
  at::Tensor token_req = at::empty({T}, opts), token_pos = at::empty({T}, opts);
  int64_t* req = token_req.data_ptr<int64_t>();
  int64_t* pos = token_pos.data_ptr<int64_t>();
  std::vector<int64_t> owner(T), idx(T);
  std::vector<char> span(T);
  at::Tensor counts = at::zeros({world}, opts), span_counts = at::zeros({world}, opts);
  int64_t *cnt = counts.data_ptr<int64_t>(), *scnt = span_counts.data_ptr<int64_t>();
  std::vector<int64_t> lcnt(world, 0);
  at::Tensor span_qsl = at::zeros({B + 1}, iopts), own_qsl = at::zeros({B + 1}, iopts);
  int32_t *sq = span_qsl.data_ptr<int32_t>(), *oq = own_qsl.data_ptr<int32_t>();
  int64_t b = 0, n_span = 0;
  for (int64_t t = 0; t < T; ++t) {
    while (b + 1 < B && t >= qsl[b + 1]) ++b;
    const int64_t r = B > 0 ? b : 0;
    req[t] = r;
    pos[t] = B > 0 ? (lens[r] - (qsl[r + 1] - qsl[r])) + (t - qsl[r]) : t;
    const int64_t o = slots[t] >= 0 ? slots[t] / per_rank : -1;
    TORCH_CHECK(o < world, "step_routing: slot ", slots[t], " is past the last rank");
    owner[t] = o;
    span[t] = o >= 0 && B > 0 && req_span[r];
    if (o < 0) {
      idx[t] = 0;
    } else if (span[t]) {
      idx[t] = scnt[o]++;  // among the owner's spanning rows, for now
      ++sq[r + 1];
      ++n_span;
    } else {
      idx[t] = lcnt[o]++;
      if (o == rank) ++oq[r + 1];
    }
    if (o >= 0) ++cnt[o];
  }
  for (int64_t i = 0; i < B; ++i) sq[i + 1] += sq[i], oq[i + 1] += oq[i];
  int64_t t_max = 1, s_max = 0;
  for (int64_t r = 0; r < world; ++r) t_max = std::max(t_max, cnt[r]), s_max = std::max(s_max, scnt[r]);

  at::Tensor restore = at::empty({T}, opts), span_restore = at::empty({n_span}, opts);
  at::Tensor span_pos = at::empty({n_span}, iopts);
  int64_t *rest = restore.data_ptr<int64_t>(), *srest = span_restore.data_ptr<int64_t>();
  int32_t* spos = span_pos.data_ptr<int32_t>();
  const int64_t mine = cnt[rank], rows = std::max<int64_t>(mine, 1), own_local = lcnt[rank];
  at::Tensor row_idx = at::empty({rows}, opts), row_slots = at::empty({rows}, opts),
             row_req = at::empty({rows}, opts), row_pos = at::empty({rows}, opts),
             span_merge = at::empty({scnt[rank]}, opts), own_pos = at::empty({own_local}, iopts);
  int64_t *ri = row_idx.data_ptr<int64_t>(), *rs = row_slots.data_ptr<int64_t>(),
          *rq = row_req.data_ptr<int64_t>(), *rp = row_pos.data_ptr<int64_t>(),
          *sm = span_merge.data_ptr<int64_t>();
  int32_t* op = own_pos.data_ptr<int32_t>();
  if (mine == 0) ri[0] = 0, rs[0] = -1, rq[0] = -1, rp[0] = 0;
  int64_t s = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = owner[t];
    if (o < 0) {
      rest[t] = 0;
      continue;
    }
    const int64_t row = span[t] ? lcnt[o] + idx[t] : idx[t];  // local rows first
    rest[t] = o * t_max + row;
    if (span[t]) {
      srest[s] = o * s_max + idx[t], spos[s] = static_cast<int32_t>(pos[t]);
      if (o == rank) sm[idx[t]] = s;
      ++s;
    }
    if (o == rank) {
      ri[row] = t, rs[row] = slots[t], rq[row] = req[t], rp[row] = pos[t];
      if (!span[t]) op[row] = static_cast<int32_t>(pos[t]);
    }
  }

  // This rank's blocks of each request first (in logical order), then the others (zeroed).
  at::Tensor local_table = at::empty({B, M}, iopts), shard_lens = at::empty({B}, iopts),
             block_pos = at::empty({B, M}, iopts);
  int32_t *lt = local_table.data_ptr<int32_t>(), *sl = shard_lens.data_ptr<int32_t>(),
          *bp = block_pos.data_ptr<int32_t>();
  for (int64_t i = 0; i < B; ++i) {
    const int64_t* row = table + i * M;
    int64_t k = 0, held_tokens = 0;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t j = 0; j < M; ++j) {
        const int64_t tokens = std::clamp<int64_t>(lens[i] - j * block_size, 0, block_size);
        const int64_t o = block_rank(row[j]);
        const bool held = tokens > 0 && o == rank;
        if (held != (pass == 0)) continue;
        lt[i * M + k] = held ? static_cast<int32_t>(row[j] - rank * blocks_per_rank) : 0;
        bp[i * M + k] = static_cast<int32_t>(j * block_size);
        if (held) held_tokens += tokens;
        ++k;
      }
    }
    sl[i] = static_cast<int32_t>(held_tokens);
  }
  return {counts,       span_counts, row_idx,  row_slots,   row_req,     row_pos,
          restore,      token_req,   token_pos, span_restore, span_qsl,    span_pos,
          span_merge,   own_qsl,     own_pos,   local_table,  shard_lens,  block_pos};
}

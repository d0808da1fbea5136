// One step's routing on the CPU: the contract of vllm_kvp.plan.build_step_plan (who computes which
// token) and vllm_kvp.shard_map.local_blocks (this rank's compacted block table), in one pass.
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

// Returns {counts (world), row_idx, row_slots, row_req, row_pos (rows), restore_idx, token_req,
// token_pos (T), local_table (B, M) int32, shard_lens (B) int32, block_pos (B, M) int32}; every
// other tensor int64. `rows` is max(counts[rank], 1): a rank owning nothing gets one dummy row
// (index 0, slot -1, request -1, position 0).
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

  // Request and position of every token; tokens past the last request (padding) count as the
  // last request's, as in plan.token_requests.
  at::Tensor token_req = at::empty({T}, opts), token_pos = at::empty({T}, opts);
  int64_t* req = token_req.data_ptr<int64_t>();
  int64_t* pos = token_pos.data_ptr<int64_t>();
  std::vector<int64_t> owner(T), local(T);
  at::Tensor counts = at::zeros({world}, opts);
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t b = 0;
  for (int64_t t = 0; t < T; ++t) {
    while (b + 1 < B && t >= qsl[b + 1]) ++b;
    const int64_t r = B > 0 ? b : 0;
    req[t] = r;
    pos[t] = B > 0 ? (lens[r] - (qsl[r + 1] - qsl[r])) + (t - qsl[r]) : t;
    const int64_t o = slots[t] >= 0 ? slots[t] / per_rank : -1;
    TORCH_CHECK(o < world, "step_routing: slot ", slots[t], " is past the last rank");
    owner[t] = o;
    local[t] = o >= 0 ? cnt[o]++ : 0;
  }
  int64_t t_max = 1;
  for (int64_t r = 0; r < world; ++r) t_max = std::max(t_max, cnt[r]);
  at::Tensor restore = at::empty({T}, opts);
  int64_t* rest = restore.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) rest[t] = owner[t] >= 0 ? owner[t] * t_max + local[t] : 0;

  const int64_t mine = cnt[rank], rows = std::max<int64_t>(mine, 1);
  at::Tensor row_idx = at::empty({rows}, opts), row_slots = at::empty({rows}, opts),
             row_req = at::empty({rows}, opts), row_pos = at::empty({rows}, opts);
  int64_t *ri = row_idx.data_ptr<int64_t>(), *rs = row_slots.data_ptr<int64_t>(),
          *rq = row_req.data_ptr<int64_t>(), *rp = row_pos.data_ptr<int64_t>();
  if (mine == 0) {
    ri[0] = 0, rs[0] = -1, rq[0] = -1, rp[0] = 0;
  } else {
    int64_t k = 0;
    for (int64_t t = 0; t < T; ++t)
      if (owner[t] == rank) ri[k] = t, rs[k] = slots[t], rq[k] = req[t], rp[k] = pos[t], ++k;
  }

  // This rank's blocks of each request first (in logical order), then the others (zeroed).
  auto iopts = opts.dtype(at::kInt);
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
        // floor division, as torch.div(..., rounding_mode="floor")
        const int64_t o = row[j] >= 0 ? row[j] / blocks_per_rank : -((-row[j] + blocks_per_rank - 1) / blocks_per_rank);
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
  return {counts, row_idx, row_slots, row_req, row_pos, restore, token_req, token_pos,
          local_table, shard_lens, block_pos};
}

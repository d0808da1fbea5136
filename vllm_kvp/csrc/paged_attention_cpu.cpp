// Paged attention with LSE on the CPU, reading the KV cache in place through the block table.
//
// Contract: vllm_kvp.ops.triton_paged_attention.paged_attention_lse (see its docstring). Built at
// run time by vllm_kvp/ops/cpu_kernel.py with -O3 -march=native -fopenmp.
//
// Work items are (request, kv head, query tile, key split). An item keeps the tile's query rows
// (query tokens x the kv head's group of query heads) in float32 and walks its keys in chunks of
// kChunk: scores of every row against the chunk, an online-softmax update, then P @ V. Each key's
// K/V row is read where it lies in the cache (no gather copy) and converted to float on load.
//
// Vectors are GCC vector extensions rather than intrinsics so that one source builds for any x86
// level (-march=native picks AVX-512, AVX2 or SSE code for the same types). Q.K is vectorised over
// the head dimension; the W partial dot products of W keys are then summed by a shuffle tree that
// leaves key j's score in lane j, so the softmax and the mask are vectorised over keys. Tiles of
// kGemmMinRows rows or more (prefill) instead transpose the chunk's keys once and compute the
// scores as a small matrix product, where the transpose is shared by all rows, and multiply P @ V
// in slices of at most four vectors of the head so that four rows share each V load. A causal tile
// stops at its last visible key (`visible_keys`). The next chunk's rows are prefetched during
// P @ V: blocks follow the table, not memory order, so the hardware prefetcher loses the stream at
// every block boundary.
//
// Precision: scores, softmax and accumulation in float32; fp16/bf16 K/V are widened on load and
// the probabilities are not rounded to the input dtype before P @ V (one rounding fewer than the
// Triton kernel's tensor-core path).
//
// Threads: at::parallel_for (ATen's pool, sized by torch.set_num_threads) with items taken from an
// atomic counter, longest first, since request lengths differ by orders of magnitude. When there
// are fewer items than threads the key range is split and the partials are combined with their LSE.

// Only the headers the kernel uses: <torch/extension.h> would triple the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kW = 16;  // float lanes of the widest vector the build targets
#else
constexpr int kW = 8;
#endif

template <int W>
struct V {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef float fu __attribute__((vector_size(4 * W), aligned(4)));  // unaligned access
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef int32_t iu __attribute__((vector_size(4 * W), aligned(4)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
  typedef uint16_t hu __attribute__((vector_size(2 * W), aligned(2)));
};

constexpr int kChunk = 128;  // keys per online-softmax step
// Query rows (tokens x group heads) per work item: each tile reads the request's keys once, so a
// 512-query prefill over 32k keys in 64-row tiles read 8 MiB per kv head 32 times (from DRAM, 1.4x
// vLLM's time); 256 rows keep its scores (128 KiB) in L2.
constexpr int kTileRows = 256;
constexpr int kMinSplitKeys = 1024;  // below this a split's combine costs more than it saves
constexpr int kGemmMinRows = 16;  // from this many rows a chunk's K is transposed once for all rows
constexpr int kGemmRows = 4, kGemmVecs = 4;  // score tile of the transposed path: rows x W-key vectors
constexpr float kFloor = -1e30f;  // running max floor: an all-masked row gives alpha = 1, p = 0

// ---- loads: K/V/Q elements of any supported dtype to float vectors ----

template <int W>
inline typename V<W>::f load(const float* p) {
  return *reinterpret_cast<const typename V<W>::fu*>(p);
}

template <int W>
inline typename V<W>::f load(const at::BFloat16* p) {
  using T = V<W>;
  typename T::h x = *reinterpret_cast<const typename T::hu*>(p);
  typename T::u w = __builtin_convertvector(x, typename T::u) << 16;  // bf16 is float's top half
  return reinterpret_cast<typename T::f&>(w);
}

template <int W>
inline typename V<W>::f load(const at::Half* p) {
  // IEEE half -> float by moving exponent and mantissa into place and rescaling by 2^112, which also
  // turns subnormal halves into the right normal floats; inf / nan keep an all-ones exponent.
  using T = V<W>;
  typename T::h x = *reinterpret_cast<const typename T::hu*>(p);
  typename T::u w = __builtin_convertvector(x, typename T::u);
  typename T::u em = (w & 0x7fffu) << 13;
  typename T::f f = reinterpret_cast<typename T::f&>(em) * 0x1p112f;
  typename T::u fb = reinterpret_cast<typename T::u&>(f);
  typename T::u infnan = (typename T::u)((w & 0x7c00u) == 0x7c00u);  // all ones where true
  fb = (fb & ~infnan) | ((em | 0x7f800000u) & infnan);
  fb |= (w & 0x8000u) << 16;
  return reinterpret_cast<typename T::f&>(fb);
}

// ---- exp and lane reductions ----

template <int W>
inline typename V<W>::f vexp(typename V<W>::f x) {
  // exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, degree-6 polynomial (float
  // accuracy, ~1 ulp). Inputs below -87.3 (masked scores are -inf) give exactly 0.
  using T = V<W>;
  const typename T::f lo = x < -87.3f ? (typename T::f){} + -87.3f : x;
  const typename T::f xc = lo > 88.3f ? (typename T::f){} + 88.3f : lo;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  typename T::f t = xc * 1.44269504088896341f + magic;
  typename T::f n = t - magic;
  typename T::f r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  typename T::f p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  typename T::i ni = reinterpret_cast<typename T::i&>(t) - reinterpret_cast<const int32_t&>(magic);
  typename T::i e = (ni + 127) << 23;
  typename T::f res = p * reinterpret_cast<typename T::f&>(e);
  return x < -87.3f ? (typename T::f){} : res;
}

template <int W, int... L>
constexpr typename V<W>::i make_mask(bool second, int s, std::integer_sequence<int, L...>) {
  // Level s of the pair-sum tree: lanes [base, base + s) of the result take a's pairs, the next s
  // lanes b's; `second` selects the upper element of each pair.
  return typename V<W>::i{(((L % (2 * s)) < s) ? (second ? L + s : L) : (second ? W + L : W + L - s))...};
}

template <int W, int S>
inline void pair_sum_level(typename V<W>::f* v) {
  constexpr typename V<W>::i m1 = make_mask<W>(false, S, std::make_integer_sequence<int, W>{});
  constexpr typename V<W>::i m2 = make_mask<W>(true, S, std::make_integer_sequence<int, W>{});
  for (int i = 0; i < S; ++i) {
    v[i] = __builtin_shuffle(v[i], v[i + S], m1) + __builtin_shuffle(v[i], v[i + S], m2);
  }
  if constexpr (S > 1) pair_sum_level<W, S / 2>(v);
}

// v[0..W-1] -> one vector whose lane j is the sum of v[j]'s lanes (3(W-1) shuffles and adds).
template <int W>
inline typename V<W>::f lane_sums(typename V<W>::f* v) {
  pair_sum_level<W, W / 2>(v);
  return v[0];
}

template <int W, int S, int... L>
constexpr typename V<W>::i swap_mask(std::integer_sequence<int, L...>) {
  return typename V<W>::i{(L ^ S)...};
}

// Max over the lanes, in every lane: log2(W) shuffle + max steps (a scalar loop over the lanes is a
// W-long dependency chain, paid per row and chunk).
template <int W, int S = W / 2>
inline typename V<W>::f hmax_all(typename V<W>::f v) {
  constexpr typename V<W>::i m = swap_mask<W, S>(std::make_integer_sequence<int, W>{});
  const typename V<W>::f o = __builtin_shuffle(v, m);
  v = o > v ? o : v;
  if constexpr (S > 1) return hmax_all<W, S / 2>(v);
  return v;
}

// Stage d of a W x W transpose held in W vectors: rows i and i + d (bit d of i clear) swap their
// off-diagonal d x d blocks, the lanes with bit d set of row i and those with it clear of row i + d.
template <int W, int... L>
constexpr typename V<W>::i transpose_mask(bool upper, int d, std::integer_sequence<int, L...>) {
  return typename V<W>::i{(upper ? ((L & d) ? W + L : L + d) : ((L & d) ? W + L - d : L))...};
}

template <int W, int D>
inline void transpose_stage(typename V<W>::f* t) {
  constexpr typename V<W>::i lo = transpose_mask<W>(false, D, std::make_integer_sequence<int, W>{});
  constexpr typename V<W>::i hi = transpose_mask<W>(true, D, std::make_integer_sequence<int, W>{});
  for (int i = 0; i < W; ++i) {
    if (i & D) continue;
    const typename V<W>::f a = t[i], b = t[i + D];
    t[i] = __builtin_shuffle(a, b, lo);
    t[i + D] = __builtin_shuffle(a, b, hi);
  }
  if constexpr (D > 1) transpose_stage<W, D / 2>(t);
}

// t[i] lane j <- t[j] lane i, in W log2(W) two-source shuffles. The prefill path transposes each
// chunk's keys this way: element by element (a scalar load and a store to one of 128 rows each) it
// took a sixth of the kernel's time in a causal 8k prefill, and the kernel 1.12x vLLM's time for
// the same work (1.02x after).
template <int W>
inline void transpose(typename V<W>::f* t) {
  transpose_stage<W, W / 2>(t);
}

template <int W>
inline float hsum(typename V<W>::f v) {
  float s = 0.f;
  for (int j = 0; j < W; ++j) s += v[j];
  return s;
}

// ---- problem description shared by all items ----

struct Problem {
  const void* q;
  at::ScalarType q_dtype, out_dtype;
  int64_t sq_t, sq_h;  // q strides (elements); the last dimension is contiguous (checked)
  const void* kv;
  int64_t skb, skh, skt;  // kv_cache strides; d stride 1
  const int32_t* table;
  int64_t stb, stm;
  const int32_t* lens;
  const int32_t* qsl;
  const int32_t* qpos;  // nullptr: not causal
  const int32_t* bpos;
  int64_t spb, spm;
  int hq, hkv, g, d, bs;
  float scale;
  // outputs: either the final (out, lse) or the float32 split workspace
  void* out;
  int64_t so_t, so_h, so_d;
  float* lse;
  int64_t sl_t, sl_h;
  float* ws_out;  // (S, T, Hq, D)
  float* ws_lse;  // (S, T, Hq)
  int64_t T;
};

struct Item {
  int b, h, tok0, ntok, split, k_lo, k_hi;
  int64_t cost;
};

// q rows and out rows are touched once per item, so their dtype is a run-time switch rather than
// one more template parameter (which would multiply the instantiations and the build time).
inline void load_row(const void* src, at::ScalarType dt, int d, float mul, float* dst) {
  switch (dt) {
    case at::kFloat: for (int x = 0; x < d; ++x) dst[x] = static_cast<const float*>(src)[x] * mul; break;
    case at::kBFloat16:
      for (int x = 0; x < d; ++x) dst[x] = static_cast<float>(static_cast<const at::BFloat16*>(src)[x]) * mul;
      break;
    default:
      for (int x = 0; x < d; ++x) dst[x] = static_cast<float>(static_cast<const at::Half*>(src)[x]) * mul;
      break;
  }
}

inline void store_row(void* dst, at::ScalarType dt, int64_t stride, const float* src, int d, float mul) {
  switch (dt) {
    case at::kFloat:
      for (int x = 0; x < d; ++x) static_cast<float*>(dst)[x * stride] = src[x] * mul;
      break;
    case at::kBFloat16:
      for (int x = 0; x < d; ++x) static_cast<at::BFloat16*>(dst)[x * stride] = static_cast<at::BFloat16>(src[x] * mul);
      break;
    default:
      for (int x = 0; x < d; ++x) static_cast<at::Half*>(dst)[x * stride] = static_cast<at::Half>(src[x] * mul);
      break;
  }
}

inline size_t elem_size(at::ScalarType dt) { return dt == at::kFloat ? 4 : 2; }

// s[r][k] = q[r] . kt[:, k] for rows [r0, r1) and groups [0, ng) of W keys (ng a multiple of
// kGemmVecs): RB rows x kGemmVecs key vectors of accumulators, one FMA per (row, vector, dim).
template <int W, int NV, int RB>
inline void scores_gemm(const float* q, const float (*kt)[kChunk], float (*s)[kChunk], int r0, int r1, int ng) {
  using VF = typename V<W>::f;
  constexpr int D = W * NV, KV = kGemmVecs;
  for (; r0 + RB <= r1; r0 += RB) {
    for (int g0 = 0; g0 < ng; g0 += KV) {
      VF a[RB][KV] = {};
      for (int x = 0; x < D; ++x) {
        VF kv[KV];
        for (int j = 0; j < KV; ++j) kv[j] = *reinterpret_cast<const VF*>(&kt[x][(g0 + j) * W]);
        for (int i = 0; i < RB; ++i) {
          const float qx = q[(r0 + i) * D + x];
          for (int j = 0; j < KV; ++j) a[i][j] += qx * kv[j];
        }
      }
      for (int i = 0; i < RB; ++i)
        for (int j = 0; j < KV; ++j) *reinterpret_cast<VF*>(&s[r0 + i][(g0 + j) * W]) = a[i][j];
    }
  }
  if constexpr (RB > 1) scores_gemm<W, NV, RB / 2>(q, kt, s, r0, r1, ng);
}

// Into L2, not L1: a chunk's rows are a block (32 KiB at D = 32, fp32, block size 128), as large as
// the L1 data cache, so fetching the next chunk into L1 evicted the one being multiplied (measured
// on a Zen 4 core: decode over 60k cold keys 3.7 -> 2.9 ms at D = 32, 14.1 -> 10.3 ms at D = 128).
template <typename KT, int D>
inline void prefetch_row(const KT* p) {
  for (size_t o = 0; o < 2 * D * sizeof(KT); o += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + o, 0, 2);
}

// acc[r][v0, v0 + NVP) += sum_k s[r][k] * V[k][v0 * W, (v0 + NVP) * W) for rows [r0, r1): RB rows at
// a time keep RB x NVP accumulators in registers while each V row slice is loaded once; the
// remainder in passes of RB / 2, ... 1 rows. Wide heads go in slices of NVP vectors so that more
// rows share each load (the chunk's V rows come from L2 once per row block).
template <typename KT, int W, int NV, int NVP, int RB>
inline void pv_rows(typename V<W>::f (*acc)[NV], const float (*s)[kChunk], const bool* live, const KT* const* kp,
                    int r0, int r1, int nk, const KT* const* pf, int npf, int v0) {
  using VF = typename V<W>::f;
  constexpr int D = W * NV;
  for (; r0 + RB <= r1; r0 += RB) {
    bool any = false;
    for (int i = 0; i < RB; ++i) any |= live[r0 + i];
    if (!any) continue;
    VF a[RB][NVP];
    for (int i = 0; i < RB; ++i)
      for (int v = 0; v < NVP; ++v) a[i][v] = acc[r0 + i][v0 + v];
    for (int k = 0; k < nk; ++k) {
      const KT* vr = kp[k] + D + v0 * W;
      if (k < npf) prefetch_row<KT, D>(pf[k]);  // the next chunk's key k, spread over this loop
      VF vv[NVP];
      for (int v = 0; v < NVP; ++v) vv[v] = load<W>(vr + v * W);
      for (int i = 0; i < RB; ++i) {
        const float p = s[r0 + i][k];  // 0 for a row that is not live (set by the caller)
        for (int v = 0; v < NVP; ++v) a[i][v] += p * vv[v];
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int v = 0; v < NVP; ++v) acc[r0 + i][v0 + v] = a[i][v];
    npf = 0;  // prefetched once
  }
  if constexpr (RB > 1) pv_rows<KT, W, NV, NVP, RB / 2>(acc, s, live, kp, r0, r1, nk, pf, npf, v0);
}

// One work item: rows of query tokens [tok0, tok0 + ntok) x group heads of kv head h, keys
// [k_lo, k_hi) of request b. NV vectors of W floats span the head dimension.
template <typename KT, int W, int NV>
void run_item(const Problem& P, const Item& it, bool to_workspace) {
  using VF = typename V<W>::f;
  using VI = typename V<W>::i;
  constexpr int D = W * NV;
  const int g = P.g, rows = it.ntok * g;
  // Per-thread scratch on the heap (a 256-row tile needs ~0.5 MiB: too much for a pool thread's stack).
  thread_local std::vector<char> scratch;
  const size_t need = (sizeof(VF) * (2 * NV + 1) + sizeof(float) * (kChunk + 1) + sizeof(int32_t) + 1) * kTileRows
                      + sizeof(float) * D * kChunk + 6 * 64;
  if (scratch.size() < need) scratch.resize(need);
  char* cur_p = scratch.data();
  auto take = [&](size_t bytes) {
    char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(cur_p) + 63) & ~uintptr_t(63));
    cur_p = p + bytes;
    return p;
  };
  VF (*qv)[NV] = reinterpret_cast<VF (*)[NV]>(take(sizeof(VF) * NV * kTileRows));
  VF (*acc)[NV] = reinterpret_cast<VF (*)[NV]>(take(sizeof(VF) * NV * kTileRows));
  float (*s)[kChunk] = reinterpret_cast<float (*)[kChunk]>(take(sizeof(float) * kChunk * kTileRows));
  float (*kt)[kChunk] = reinterpret_cast<float (*)[kChunk]>(take(sizeof(float) * kChunk * D));  // transposed K
  VF* l = reinterpret_cast<VF*>(take(sizeof(VF) * kTileRows));
  float* m = reinterpret_cast<float*>(take(sizeof(float) * kTileRows));
  int32_t* qp = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * kTileRows));
  bool* live = reinterpret_cast<bool*>(take(kTileRows));
  const bool gemm = rows >= kGemmMinRows;

  const size_t qsize = elem_size(P.q_dtype);
  for (int r = 0; r < rows; ++r) {
    const int64_t tok = it.tok0 + r / g, head = it.h * g + r % g;
    alignas(64) float tmp[D];
    load_row(static_cast<const char*>(P.q) + (tok * P.sq_t + head * P.sq_h) * qsize, P.q_dtype, D, P.scale, tmp);
    for (int v = 0; v < NV; ++v) {
      qv[r][v] = load<W>(tmp + v * W);
      acc[r][v] = VF{};
    }
    m[r] = kFloor;
    l[r] = VF{};
    qp[r] = P.qpos ? P.qpos[tok] : 0;
  }
  const bool causal = P.qpos != nullptr;
  const KT* kv = static_cast<const KT*>(P.kv) + it.h * P.skh;
  const int32_t* trow = P.table + it.b * P.stb;
  const int32_t* prow = causal ? P.bpos + it.b * P.spb : nullptr;
  const VI lane = [] { VI x; for (int j = 0; j < W; ++j) x[j] = j; return x; }();

  // Key row pointers (and positions) of a chunk, double-buffered: the next chunk's are built before
  // the current chunk is multiplied, so its rows can be prefetched while P @ V runs (cold caches:
  // the table order jumps between blocks, which the hardware prefetcher cannot follow).
  const KT* kpbuf[2][kChunk];
  alignas(64) int32_t kposbuf[2][kChunk];
  int32_t pminb[2], pmaxb[2];
  auto build = [&](int c0, int slot) {
    const int nk = std::min(kChunk, it.k_hi - c0);
    int32_t pmin = std::numeric_limits<int32_t>::max(), pmax = std::numeric_limits<int32_t>::min();
    // One division per chunk, then whole runs of a block: a division per key cost as much as its
    // dot products at D = 32.
    int blk = c0 / P.bs, off = c0 - blk * P.bs;
    for (int k = 0; k < nk; ++blk, off = 0) {
      const int run = std::min(P.bs - off, nk - k);
      const KT* base = kv + static_cast<int64_t>(trow[blk * P.stm]) * P.skb + off * P.skt;
      for (int j = 0; j < run; ++j) kpbuf[slot][k + j] = base + j * P.skt;
      if (causal) {
        const int32_t p0 = prow[blk * P.spm] + off;
        for (int j = 0; j < run; ++j) kposbuf[slot][k + j] = p0 + j;
        pmin = std::min(pmin, p0);
        pmax = std::max(pmax, p0 + run - 1);
      }
      k += run;
    }
    pminb[slot] = pmin;
    pmaxb[slot] = pmax;
  };
  int cur = 0;
  if (it.k_lo < it.k_hi) build(it.k_lo, 0);
  for (int c0 = it.k_lo; c0 < it.k_hi; c0 += kChunk, cur ^= 1) {
    const int nk = std::min(kChunk, it.k_hi - c0);
    const int ng = (nk + W - 1) / W;
    const KT** kp = kpbuf[cur];
    int32_t* kpos = kposbuf[cur];
    const int32_t pmin = pminb[cur], pmax = pmaxb[cur];
    const int n_next = std::max(0, std::min(kChunk, it.k_hi - c0 - kChunk));
    if (n_next > 0) build(c0 + kChunk, cur ^ 1);
    const int ngp = gemm ? (ng + kGemmVecs - 1) / kGemmVecs * kGemmVecs : ng;
    for (int k = nk; k < ngp * W; ++k) {  // pad the last group(s) with a real row; their lanes are masked
      kp[k] = kp[0];
      kpos[k] = std::numeric_limits<int32_t>::max();
    }
    if (gemm) {
      // Many rows: transpose the chunk's keys once (kt[x][k] = K[k][x]), W x W tiles in registers,
      // so that every row's scores are plain FMAs over keys, with no per-score lane reduction.
      for (int k0 = 0; k0 < ngp * W; k0 += W) {
        for (int x0 = 0; x0 < D; x0 += W) {
          VF t[W];
          for (int j = 0; j < W; ++j) t[j] = load<W>(kp[k0 + j] + x0);
          transpose<W>(t);
          for (int i = 0; i < W; ++i) *reinterpret_cast<VF*>(&kt[x0 + i][k0]) = t[i];
        }
      }
      scores_gemm<W, NV, kGemmRows>(reinterpret_cast<const float*>(qv), kt, s, 0, rows, ngp);
    }

    // Scores and the softmax update, row by row.
    for (int r = 0; r < rows; ++r) {
      live[r] = !causal || qp[r] >= pmin;
      if (!live[r]) {  // sees no key of this chunk: p = 0 (P @ V may still multiply it with a live row)
        std::memset(s[r], 0, sizeof(float) * nk);
        continue;
      }
      const bool mask_pos = causal && qp[r] < pmax;
      const VI qpv = VI{} + qp[r];
      VF vmax = VF{} + m[r];
      for (int gi = 0; gi < ng; ++gi) {
        VF sc;
        if (gemm) {
          sc = *reinterpret_cast<const VF*>(&s[r][gi * W]);
        } else {
          VF part[W];
          for (int j = 0; j < W; ++j) {
            const KT* kr = kp[gi * W + j];
            VF a = qv[r][0] * load<W>(kr);
            for (int v = 1; v < NV; ++v) a += qv[r][v] * load<W>(kr + v * W);
            part[j] = a;
          }
          sc = lane_sums<W>(part);
        }
        const VF ninf = VF{} - std::numeric_limits<float>::infinity();
        if ((gi + 1) * W > nk) sc = (lane + gi * W) < nk ? sc : ninf;
        if (mask_pos) sc = *reinterpret_cast<const typename V<W>::iu*>(kpos + gi * W) > qpv ? ninf : sc;
        *reinterpret_cast<VF*>(&s[r][gi * W]) = sc;
        vmax = sc > vmax ? sc : vmax;
      }
      const VF mv = hmax_all<W>(vmax);  // >= kFloor, so also the new running max
      const float m_new = mv[0];
      // l is kept per lane (summed once at the end): no horizontal sum per row and chunk.
      VF sum = l[r];
      if (m_new != m[r]) {
        const float alpha = std::exp(m[r] - m_new);
        sum *= alpha;
        for (int v = 0; v < NV; ++v) acc[r][v] *= alpha;
        m[r] = m_new;
      }
      for (int gi = 0; gi < ng; ++gi) {
        VF p = vexp<W>(*reinterpret_cast<VF*>(&s[r][gi * W]) - mv);
        *reinterpret_cast<VF*>(&s[r][gi * W]) = p;
        sum += p;
      }
      l[r] = sum;
    }

    // P @ V, a few rows at a time so each V row loaded serves all of them from registers.
    // Many rows (prefill): slices of at most 4 vectors, 4 rows per V load (16 accumulators); a
    // 128-wide head in one slice fits only 2 rows in the registers, and V came from L2 once per 2
    // rows (causal prefill 1.41x -> 1.10x vLLM's kernel time). Few rows (decode): whole rows, V
    // read once from memory.
    if (gemm) {
      constexpr int NVP = NV >= 4 ? 4 : NV;
      for (int v0 = 0; v0 < NV; v0 += NVP)
        pv_rows<KT, W, NV, NVP, NVP >= 4 ? 4 : 8>(acc, s, live, kp, 0, rows, nk, kpbuf[cur ^ 1], v0 ? 0 : n_next, v0);
    } else {
      pv_rows<KT, W, NV, NV, NV >= 8 ? 2 : (NV >= 4 ? 4 : 8)>(acc, s, live, kp, 0, rows, nk, kpbuf[cur ^ 1], n_next, 0);
    }
  }

  // Normalise and store: out = acc / l, lse = m + log l; a row with no visible key gets 0 / -inf.
  for (int r = 0; r < rows; ++r) {
    const int64_t tok = it.tok0 + r / g, head = it.h * g + r % g;
    const float lr = hsum<W>(l[r]);
    const bool nonempty = lr > 0.f;
    const float inv = nonempty ? 1.f / lr : 0.f;
    const float lse_r = nonempty ? m[r] + std::log(lr) : -std::numeric_limits<float>::infinity();
    alignas(64) float tmp[D];
    for (int v = 0; v < NV; ++v) *reinterpret_cast<VF*>(tmp + v * W) = acc[r][v];
    if (to_workspace) {
      float* dst = P.ws_out + ((it.split * P.T + tok) * P.hq + head) * D;
      for (int x = 0; x < D; ++x) dst[x] = tmp[x] * inv;
      P.ws_lse[(it.split * P.T + tok) * P.hq + head] = lse_r;
    } else {
      store_row(static_cast<char*>(P.out) + (tok * P.so_t + head * P.so_h) * elem_size(P.out_dtype), P.out_dtype,
                P.so_d, tmp, D, inv);
      P.lse[tok * P.sl_t + head * P.sl_h] = lse_r;
    }
  }
}

// Causal: the keys [0, k) of request b that can be visible to query tokens [t0, t0 + ntok), i.e.
// every later local block starts past the tiles' last position. Scanning back from the shard's end
// needs no ordering of the local blocks by position (a block before the cut may still hold masked
// keys: the per-key mask handles those); it skips the chunks a prefill tile would otherwise
// transpose and multiply only to mask them (a fifth of a causal prefill's work).
int visible_keys(const Problem& P, int b, int t0, int ntok, int n) {
  int32_t qmax = std::numeric_limits<int32_t>::min();
  for (int t = t0; t < t0 + ntok; ++t) qmax = std::max(qmax, P.qpos[t]);
  const int32_t* prow = P.bpos + static_cast<int64_t>(b) * P.spb;
  for (int j = (n + P.bs - 1) / P.bs - 1; j >= 0; --j) {
    const int32_t p0 = prow[j * P.spm];
    if (p0 <= qmax) return static_cast<int>(std::min<int64_t>(n, static_cast<int64_t>(j) * P.bs + std::min<int64_t>(P.bs, qmax - static_cast<int64_t>(p0) + 1)));
  }
  return 0;
}

void combine_splits(const Problem& P, int64_t tok, int nsplit) {
  for (int head = 0; head < P.hq; ++head) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int sp = 0; sp < nsplit; ++sp) mx = std::max(mx, P.ws_lse[(sp * P.T + tok) * P.hq + head]);
    const float shift = std::isinf(mx) ? 0.f : mx;  // every split empty: weights exp(-inf) = 0
    std::vector<float> acc(P.d, 0.f);
    float den = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) {
      const float w = std::exp(P.ws_lse[(sp * P.T + tok) * P.hq + head] - shift);
      if (w == 0.f) continue;
      const float* src = P.ws_out + ((sp * P.T + tok) * P.hq + head) * P.d;
      for (int x = 0; x < P.d; ++x) acc[x] += w * src[x];
      den += w;
    }
    const bool nonempty = den > 0.f;
    store_row(static_cast<char*>(P.out) + (tok * P.so_t + head * P.so_h) * elem_size(P.out_dtype), P.out_dtype,
              P.so_d, acc.data(), P.d, nonempty ? 1.f / den : 0.f);
    P.lse[tok * P.sl_t + head * P.sl_h] = nonempty ? shift + std::log(den) : -std::numeric_limits<float>::infinity();
  }
}

using ItemFn = void (*)(const Problem&, const Item&, bool);

// Head dims of one to four 8-float vectors (8, 16, 24, 32) use 8-float vectors, wider ones (48, 64,
// 128) 16-float vectors where the build has them. Other head dims go to the torch implementation.
// Head dims of 8 and 24 use 8-float vectors, 16 to 128 the build's widest (16 floats with AVX-512:
// measured faster than 8 at D = 32 on a Zen 4 core). Other head dims go to the torch implementation.
template <typename KT>
ItemFn pick(int d) {
  switch (d) {
    case 8: return run_item<KT, 8, 1>;
    case 24: return run_item<KT, 8, 3>;
  }
  if (d % kW) return nullptr;
  switch (d / kW) {
    case 1: return run_item<KT, kW, 1>;
    case 2: return run_item<KT, kW, 2>;
    case 3: return run_item<KT, kW, 3>;
    case 4: return run_item<KT, kW, 4>;
    case 8: return run_item<KT, kW, 8>;
  }
  return nullptr;
}

bool io_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

ItemFn dispatch(at::ScalarType kt, at::ScalarType qt, at::ScalarType ot, int d) {
  if (!io_dtype(qt) || !io_dtype(ot)) return nullptr;
  switch (kt) {
    case at::kFloat: return pick<float>(d);
    case at::kBFloat16: return pick<at::BFloat16>(d);
    case at::kHalf: return pick<at::Half>(d);
    default: return nullptr;
  }
}

}  // namespace

// True when the kernel covers this combination of dtypes and head dim (the caller falls back to
// the torch implementation otherwise).
bool supports(at::ScalarType kv_dtype, at::ScalarType q_dtype, at::ScalarType out_dtype, int64_t d) {
  return dispatch(kv_dtype, q_dtype, out_dtype, static_cast<int>(d)) != nullptr;
}

void paged_attention_lse_cpu(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                             const at::Tensor& kv_lens, const at::Tensor& query_start_loc, double scale,
                             const c10::optional<at::Tensor>& q_pos, const c10::optional<at::Tensor>& block_pos,
                             at::Tensor& out, at::Tensor& lse, int64_t num_splits) {
  const int64_t T = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = kv_cache.size(1), bs = kv_cache.size(2);
  const int64_t B = block_table.size(0);
  TORCH_CHECK(kv_cache.size(3) == 2 * d && hq % hkv == 0, "q / kv_cache shapes do not fit");
  TORCH_CHECK(q.stride(2) == 1 && kv_cache.stride(3) == 1, "q and kv_cache need a contiguous last dim");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32");
  ItemFn fn = dispatch(kv_cache.scalar_type(), q.scalar_type(), out.scalar_type(), static_cast<int>(d));
  TORCH_CHECK(fn != nullptr, "unsupported dtype / head_dim combination");
  const bool causal = q_pos.has_value();
  at::Tensor table = block_table.to(at::kInt);
  at::Tensor lens = kv_lens.to(at::kInt).contiguous();
  at::Tensor qsl = query_start_loc.to(at::kInt).contiguous();
  at::Tensor qp, bp;
  if (causal) {
    qp = q_pos->to(at::kInt).contiguous();
    bp = block_pos->to(at::kInt);
  }
  Problem P{};
  P.q = q.data_ptr();
  P.q_dtype = q.scalar_type();
  P.out_dtype = out.scalar_type();
  P.sq_t = q.stride(0);
  P.sq_h = q.stride(1);
  P.kv = kv_cache.data_ptr();
  P.skb = kv_cache.stride(0);
  P.skh = kv_cache.stride(1);
  P.skt = kv_cache.stride(2);
  P.table = table.data_ptr<int32_t>();
  P.stb = table.stride(0);
  P.stm = table.stride(1);
  P.lens = lens.data_ptr<int32_t>();
  P.qsl = qsl.data_ptr<int32_t>();
  P.qpos = causal ? qp.data_ptr<int32_t>() : nullptr;
  P.bpos = causal ? bp.data_ptr<int32_t>() : nullptr;
  P.spb = causal ? bp.stride(0) : 0;
  P.spm = causal ? bp.stride(1) : 0;
  P.hq = hq;
  P.hkv = hkv;
  P.g = hq / hkv;
  P.d = d;
  P.bs = bs;
  P.scale = static_cast<float>(scale);
  P.out = out.data_ptr();
  P.so_t = out.stride(0);
  P.so_h = out.stride(1);
  P.so_d = out.stride(2);
  P.lse = lse.data_ptr<float>();
  P.sl_t = lse.stride(0);
  P.sl_h = lse.stride(1);
  P.T = T;

  // Query tiles: as many tokens as fit kTileRows rows (a group wider than the tile is not built).
  const int g = P.g;
  TORCH_CHECK(g <= kTileRows, "query heads per kv head above ", kTileRows);
  const int tile_tok = kTileRows / g;
  std::vector<Item> items;
  int64_t base_items = 0, max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t q0 = P.qsl[b], q1 = P.qsl[b + 1];
    if (q1 > q0) {
      base_items += hkv * ((q1 - q0 + tile_tok - 1) / tile_tok);
      max_len = std::max<int64_t>(max_len, P.lens[b]);
    }
  }
  // Splits only when the unsplit items cannot keep every thread busy.
  const int nthreads = at::get_num_threads();
  int64_t splits = num_splits > 0 ? num_splits : 1;
  if (num_splits <= 0 && base_items > 0 && base_items < nthreads) {
    splits = std::min<int64_t>((nthreads + base_items - 1) / base_items,
                               std::max<int64_t>(1, max_len / kMinSplitKeys));
  }
  std::vector<int> req_splits(B, 1);
  for (int64_t b = 0; b < B; ++b) {
    const int32_t q0 = P.qsl[b], q1 = P.qsl[b + 1], n = P.lens[b];
    if (q1 <= q0) continue;
    // Split length in whole chunks, so every split but the last walks full chunks.
    int64_t split_len = (n + splits - 1) / splits;
    split_len = std::max<int64_t>(kChunk, (split_len + kChunk - 1) / kChunk * kChunk);
    const int ns = n > 0 ? static_cast<int>((n + split_len - 1) / split_len) : 1;
    req_splits[b] = ns;
    for (int32_t t0 = q0; t0 < q1; t0 += tile_tok) {
      const int ntok = std::min<int32_t>(tile_tok, q1 - t0);
      const int visible = causal ? visible_keys(P, static_cast<int>(b), t0, ntok, n) : n;
      for (int h = 0; h < hkv; ++h) {
        for (int sp = 0; sp < ns; ++sp) {
          // A split past the tile's last visible key stays as an empty item: it still writes its
          // (0, -inf) partial for the combine.
          const int lo = static_cast<int>(std::min<int64_t>(sp * split_len, visible));
          const int hi = static_cast<int>(std::min<int64_t>({n, sp * split_len + split_len, visible}));
          items.push_back(Item{static_cast<int>(b), h, t0, ntok, sp, lo, hi,
                               static_cast<int64_t>(ntok) * (hi - lo + kChunk)});
        }
      }
    }
  }
  const bool any_split = *std::max_element(req_splits.begin(), req_splits.end()) > 1;
  at::Tensor ws_out, ws_lse;
  if (any_split) {
    const int64_t smax = *std::max_element(req_splits.begin(), req_splits.end());
    ws_out = at::empty({smax, T, hq, d}, q.options().dtype(at::kFloat));
    ws_lse = at::empty({smax, T, hq}, q.options().dtype(at::kFloat));
    P.ws_out = ws_out.data_ptr<float>();
    P.ws_lse = ws_lse.data_ptr<float>();
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  auto work = [&](const Item& it) { fn(P, it, req_splits[it.b] > 1); };
  const int64_t n_items = static_cast<int64_t>(items.size());
  if (nthreads <= 1 || n_items <= 1) {
    for (const Item& it : items) work(it);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(nthreads, n_items), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) work(items[i]);
      }
    });
  }
  if (any_split) {
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        if (req_splits[b] <= 1) continue;
        for (int64_t tok = P.qsl[b]; tok < P.qsl[b + 1]; ++tok) {
          combine_splits(P, tok, req_splits[b]);
        }
      }
    });
  }
}

// Merge of the gathered partials of some rows: gathered (R, T, H * D + H) float32, each rank's
// out (H * D) then lse (H) per query; rows (n,) int64 queries to merge; out (n, H, D) receives the
// merged output in its own dtype (any strides). The contract of ops.merge.merge_partials on those
// rows: ranks in their given order, float32, an all-empty row gives 0. One pass per (row, head)
// with no temporaries: at decode it is called once per layer for a handful of rows, where the
// dozen tensor ops of the torch version cost ~60 us.
void merge_gathered_rows(const at::Tensor& gathered, const at::Tensor& rows, int64_t h, int64_t d, at::Tensor& out) {
  TORCH_CHECK(gathered.dim() == 3 && gathered.scalar_type() == at::kFloat && gathered.is_contiguous() &&
                  gathered.size(2) == h * d + h, "gathered must be contiguous float32 (R, T, H * D + H)");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rows must be int64 (n,)");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == rows.size(0) && out.size(1) == h && out.size(2) == d &&
                  io_dtype(out.scalar_type()), "out must be (n, H, D) float32 / bf16 / fp16");
  const int64_t R = gathered.size(0), T = gathered.size(1), F = gathered.size(2), n = rows.size(0);
  const float* g = gathered.data_ptr<float>();
  at::Tensor rc = rows.contiguous();
  const int64_t* ri = rc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ri[i] >= 0 && ri[i] < T, "row index out of range");
  const int64_t so_t = out.stride(0), so_h = out.stride(1), so_d = out.stride(2);
  std::vector<float> acc(d);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t hh = 0; hh < h; ++hh) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t r = 0; r < R; ++r) mx = std::max(mx, g[(r * T + ri[i]) * F + h * d + hh]);
      const float shift = std::isinf(mx) && mx < 0 ? 0.f : mx;  // all empty: every weight exp(-inf) = 0
      std::fill(acc.begin(), acc.end(), 0.f);
      float den = 0.f;
      for (int64_t r = 0; r < R; ++r) {
        const float* row = g + (r * T + ri[i]) * F;
        const float w = std::exp(row[h * d + hh] - shift);
        den += w;
        const float* o = row + hh * d;
        for (int64_t x = 0; x < d; ++x) acc[x] += w * o[x];
      }
      store_row(static_cast<char*>(out.data_ptr()) + (i * so_t + hh * so_h) * elem_size(out.scalar_type()),
                out.scalar_type(), so_d, acc.data(), static_cast<int>(d), den > 0.f ? 1.f / den : 0.f);
    }
  }
}

// Stores a step's new K/V rows on this rank: slot_mapping (T,) int64 holds logical slots; those in
// [base, base + per_rank) are this rank's (local slot = slot - base), the others (another rank's,
// or negative padding) are skipped. key / value (T, Hkv, D) in the cache's dtype, any strides;
// kv_cache (num_blocks, Hkv, block_size, 2 * D), last dim contiguous. Returns the rows written.
// One pass instead of the mask, gather, cat and scatter ops of the torch version, per layer.
template <typename T>
int64_t write_rows(const at::Tensor& kv, const at::Tensor& key, const at::Tensor& value, const int64_t* slots,
                   int64_t n, int64_t base, int64_t per_rank) {
  const int64_t hkv = kv.size(1), bs = kv.size(2), d = key.size(2);
  T* dst = kv.data_ptr<T>();
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  int64_t written = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t local = slots[i] - base;
    if (slots[i] < 0 || local < 0 || local >= per_rank) continue;
    const int64_t blk = local / bs, off = local % bs;
    for (int64_t h = 0; h < hkv; ++h) {
      T* row = dst + blk * kv.stride(0) + h * kv.stride(1) + off * kv.stride(2);
      const T* kr = k + i * key.stride(0) + h * key.stride(1);
      const T* vr = v + i * value.stride(0) + h * value.stride(1);
      for (int64_t x = 0; x < d; ++x) {
        row[x] = kr[x * key.stride(2)];
        row[d + x] = vr[x * value.stride(2)];
      }
    }
    ++written;
  }
  return written;
}

int64_t write_kv_rank(at::Tensor& kv_cache, const at::Tensor& key, const at::Tensor& value,
                      const at::Tensor& slot_mapping, int64_t base, int64_t per_rank) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.stride(3) == 1 && key.dim() == 3 && key.sizes() == value.sizes() &&
                  key.size(1) == kv_cache.size(1) && 2 * key.size(2) == kv_cache.size(3),
              "key / value (T, Hkv, D) do not fit kv_cache (num_blocks, Hkv, block_size, 2D)");
  TORCH_CHECK(key.scalar_type() == kv_cache.scalar_type() && value.scalar_type() == kv_cache.scalar_type(),
              "key / value must be in the cache's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) >= key.size(0), "slot_mapping must be int64 with a slot per row");
  TORCH_CHECK(per_rank <= kv_cache.size(0) * kv_cache.size(2), "per_rank exceeds the cache");
  at::Tensor sm = slot_mapping.contiguous();
  const int64_t* slots = sm.data_ptr<int64_t>();
  const int64_t n = key.size(0);
  switch (kv_cache.scalar_type()) {
    case at::kFloat: return write_rows<float>(kv_cache, key, value, slots, n, base, per_rank);
    case at::kBFloat16: return write_rows<at::BFloat16>(kv_cache, key, value, slots, n, base, per_rank);
    case at::kHalf: return write_rows<at::Half>(kv_cache, key, value, slots, n, base, per_rank);
    default: TORCH_CHECK(false, "unsupported kv_cache dtype");
  }
  return 0;
}

// step_routing_cpu.cpp
std::vector<at::Tensor> step_routing(const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                                     const at::Tensor& seq_lens, const at::Tensor& block_table, int64_t rank,
                                     int64_t world, int64_t blocks_per_rank, int64_t block_size);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step_routing", &step_routing, "one step's routing and local block table (CPU)");
  m.def("write_kv_rank", &write_kv_rank, "store this rank's new K/V rows (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("merge_gathered_rows", &merge_gathered_rows, "merge gathered partials of some rows (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_attention_lse", &paged_attention_lse_cpu, "paged attention with LSE (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("supports", &supports);
}

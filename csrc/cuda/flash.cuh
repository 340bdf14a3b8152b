// Flash attention forward and backward kernels for sm_80+ (fp16 / bf16, fp32 accumulate).
//
// Tiles live in shared memory with rows padded by 16 bytes (conflict-free ldmatrix), filled
// with cp.async (out-of-range rows and head-dim columns are zero-filled, so any head dim that
// is a multiple of 8 runs on the next compiled one). Each warp owns 16 * kMT rows of the
// score tile; scores stay in mma accumulator registers, laid out as m16n8k16 C fragments:
//   acc[mi][ni][e]: row 16*mi + lane/4 + 8*(e/2), column 8*ni + 2*(lane%4) + e%2.
//
// Masks: the score accumulator starts at mask / scale, so one mma chain gives
// scale*q.k + mask without extra registers; a key block that the mask hides for every row
// of the CTA is skipped before its K/V tiles are loaded. Capped scores (softcap) read the
// mask after the cap instead, per element (`score_of`), and skip no key block for it.
//
// ALiBi: a run-time branch on the head's slope (uniform across the CTA) in `score_of`, after
// the cap and before a capped score's mask. A template flag would double the ~400 kernels
// per architecture CI compiles, and the bias needs only the slope, the indices the window
// test already computes, and one FMA per score.
//
// Sequences: every kernel finds its sequence's lengths, window and row offsets through
// SeqInfo, padded (B, H, S, D) or packed (varlen: total, H, D with cu_seqlens) by the kPacked
// template flag, which keeps the padded kernels' sizes in the parameters, not in registers.
//
// Backward is deterministic: one kernel owns a key block and loops over the query blocks of
// every query head of its GQA group (dK, dV in registers, no atomics); a second kernel owns a
// query block and computes dQ (and the optional dmask = dS).
//
// Dropout (kDropout): every kernel regenerates the keep decisions of its tiles from the call's
// (seed, offset) with Philox (csrc/philox.h); no mask is stored. The forward drops P after the
// row sums (the statistics stay the undropped softmax's) and scales the output by 1 / (1 - p);
// the backward uses dV = (P*Z/(1-p))^T dO and dP = (dO V^T)*Z/(1-p), Z the keep mask.
#pragma once

#include "../philox.h"
#include "utils.cuh"

namespace fastattn {
namespace cuda {
namespace flash {

constexpr float kLog2e = 1.4426950408889634f;

// exp(s - shift) for scores in natural units. The shift (the row max) is subtracted before the
// base-2 rescale, not folded into it (s * scale * log2(e) - max2): at large logits the folded
// form rounds the exponent by ~|max| * 2^-24, many times PyTorch's error in P.
__device__ __forceinline__ float exp_shifted(float s, float shift) { return exp2f((s - shift) * kLog2e); }

// The backward's view of a row's softmax statistics: P = exp(s - row_max) * inv_sum. Rows
// that see no key (row_sum 0) or lie past Sq get +inf and 0, so their P is exactly 0.
__device__ __forceinline__ void load_row_stats(const AttnFwdParams& f, int64_t idx, bool in_range,
                                               float& row_max, float& inv_sum) {
  const float l = in_range ? f.row_sum[idx] : 0.f;
  row_max = l == 0.f ? INFINITY : f.row_max[idx];
  inv_sum = l == 0.f ? 0.f : 1.f / l;
}

// Where sequence b lies (flash-attention's BlockInfo): its query and key counts, its window,
// and the offsets of its rows in the operands, outputs and row statistics. Every kernel finds
// its sequence through it. Padded batches take all from the parameters (b * stride_b,
// statistics (B, Hq, Sq)); packed ones (kPacked) from cu_seqlens (rows from the sequence's
// first token, statistics (Hq, total_q), the window aligned bottom-right per sequence).
template <bool kPacked>
class SeqInfo {
 public:
  __device__ __forceinline__ SeqInfo(const AttnFwdParams& p, int b) {
    if constexpr (kPacked) {
      q_start_ = p.cu_seqlens_q[b];
      k_start_ = p.cu_seqlens_k[b];
      sq_ = p.cu_seqlens_q[b + 1] - q_start_;
      sk_ = p.cu_seqlens_k[b + 1] - k_start_;
      vis_ = visibility(p.window_left, p.window_right, false, sq_, sk_);
    }
  }
  // The sequence's queries and keys, its window and that window's diagonal i' - i (ALiBi's
  // origin). Padded ones are read from the parameters where used, holding no registers.
  __device__ __forceinline__ int sq(const AttnFwdParams& p) const { return kPacked ? sq_ : p.sq; }
  __device__ __forceinline__ int sk(const AttnFwdParams& p) const { return kPacked ? sk_ : p.sk; }
  __device__ __forceinline__ Visibility vis(const AttnFwdParams& p) const {
    if constexpr (kPacked) return vis_;
    return p.vis;
  }
  __device__ __forceinline__ int diagonal(const AttnFwdParams& p) const {
    return kPacked ? static_cast<int>(window_diagonal(false, sq_, sk_)) : p.diagonal;
  }
  // Offset of head h's first query (key) row in a tensor with these strides.
  __device__ __forceinline__ int64_t q_offset(int b, int h, int64_t stride_b, int64_t stride_h,
                                              int64_t stride_s) const {
    return row_offset(q_start_, b, h, stride_b, stride_h, stride_s);
  }
  __device__ __forceinline__ int64_t k_offset(int b, int h, int64_t stride_b, int64_t stride_h,
                                              int64_t stride_s) const {
    return row_offset(k_start_, b, h, stride_b, stride_h, stride_s);
  }
  // Index of query 0's statistics (lse, row_max, row_sum, dsum) of query head h, bh = b * Hq + h.
  __device__ __forceinline__ int64_t stat_base(const AttnFwdParams& p, int64_t bh, int h) const {
    return kPacked ? static_cast<int64_t>(h) * p.total_q + q_start_ : bh * p.sq;
  }

 private:
  __device__ __forceinline__ int64_t row_offset(int start, int b, int h, int64_t stride_b,
                                                int64_t stride_h, int64_t stride_s) const {
    return (kPacked ? start * stride_s : b * stride_b) + h * stride_h;
  }

  int q_start_ = 0, k_start_ = 0, sq_ = 0, sk_ = 0;  // packed only
  Visibility vis_;                                     // packed only
};


// Dropout's per-call state, read once per thread (rng_state lives in device memory).
struct DropoutRng {
  uint64_t seed = 0;
  uint32_t offset = 0;
  uint64_t threshold = 0;
  float keep_scale = 1.f;
};

__device__ __forceinline__ DropoutRng load_dropout_rng(const AttnFwdParams& p) {
  DropoutRng rng;
  rng.seed = static_cast<uint64_t>(p.rng_state[0]);
  rng.offset = static_cast<uint32_t>(p.rng_state[1]);
  rng.threshold = p.drop_threshold;
  rng.keep_scale = p.keep_scale;
  return rng;
}

// Word w of a Philox block, chosen with selects: indexing the block at run time would put it
// in local memory.
__device__ __forceinline__ uint32_t philox_word(const philox::Block& block, int w) {
  return w == 0 ? block.x[0] : w == 1 ? block.x[1] : w == 2 ? block.x[2] : block.x[3];
}

// Dropout of a C-fragment tile whose rows are queries (forward P, dQ's dP) of head bh = b * Hq
// + h: element e of x[mi][ni] is query row_base + 16 mi + 8 (e / 2), key col_base + 8 ni +
// e % 2. col_base is even, so both keys of a pair lie in one Philox block (words col % 4 and
// col % 4 + 1): one block per two elements. Kept entries are multiplied by `scale`, dropped
// ones become 0.
template <int MT, int NT>
__device__ __forceinline__ void dropout_query_rows(float (&x)[MT][NT][4], const DropoutRng& rng,
                                                   uint32_t bh, int row_base, int col_base,
                                                   float scale) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int ni = 0; ni < NT; ++ni) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = row_base + mi * 16 + hf * 8, col = col_base + ni * 8;
        const philox::Block block = philox::keep_words(rng.seed, rng.offset, bh, row, col / 4);
        const int w = col % 4;
        x[mi][ni][2 * hf] = philox_word(block, w) >= rng.threshold ? x[mi][ni][2 * hf] * scale : 0.f;
        x[mi][ni][2 * hf + 1] =
            philox_word(block, w + 1) >= rng.threshold ? x[mi][ni][2 * hf + 1] * scale : 0.f;
      }
    }
  }
}

// Whether dropout keeps score (query, key) of head bh: one element of the dK/dV kernel's
// transposed tiles (rows = keys), whose neighbours lie in other Philox blocks.
__device__ __forceinline__ bool dropout_keeps(const DropoutRng& rng, uint32_t bh, int query,
                                              int key) {
  return philox_word(philox::keep_words(rng.seed, rng.offset, bh, query, key / 4), key % 4) >=
         rng.threshold;
}


// Copies rows [row0, row0 + kRows) x columns [0, kHeadDim) of a row-major (n_rows, d) matrix
// into shared memory (row stride kHeadDim + 8), zero-filling what lies outside.
template <int kRows, int kHeadDim, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int row0,
                                          int n_rows, int d, int tid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  if constexpr (kThreads % kChunksPerRow == 0 && kChunks % kThreads == 0) {
    // Each thread copies one column chunk of every kRowStep-th row: one pointer, one add.
    constexpr int kRowStep = kThreads / kChunksPerRow;
    const int col = (tid % kChunksPerRow) * 8;
    const int r0 = tid / kChunksPerRow;
    const T* src = gmem + static_cast<int64_t>(row0 + r0) * stride + col;
    const int64_t step = kRowStep * stride;
#pragma unroll
    for (int i = 0; i < kRows / kRowStep; ++i) {
      const int r = r0 + i * kRowStep;
      const bool valid = row0 + r < n_rows && col < d;
      cp_async_16(smem + r * (kHeadDim + 8) + col, valid ? src : gmem, valid);
      src += step;
    }
  } else {
#pragma unroll
    for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
      const int c = i * kThreads + tid;
      if (kChunks % kThreads == 0 || c < kChunks) {
        const int r = c / kChunksPerRow;
        const int col = (c % kChunksPerRow) * 8;
        const bool valid = row0 + r < n_rows && col < d;
        const T* src = valid ? gmem + static_cast<int64_t>(row0 + r) * stride + col : gmem;
        cp_async_16(smem + r * (kHeadDim + 8) + col, src, valid);
      }
    }
  }
}

// Writes rows [0, kRows) x [0, d) of a padded shared tile to global memory, 16 bytes a store.
template <int kRows, int kHeadDim, int kThreads, typename T>
__device__ __forceinline__ void store_tile(T* gmem, int64_t stride, const T* smem, int row0,
                                           int n_rows, int d, int tid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int c = i * kThreads + tid;
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int r = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      if (row0 + r < n_rows && col < d) {
        *reinterpret_cast<uint4*>(gmem + static_cast<int64_t>(row0 + r) * stride + col) =
            *reinterpret_cast<const uint4*>(smem + r * (kHeadDim + 8) + col);
      }
    }
  }
}

// acc[MT][NT] += A * B^T: A (16*MT x K) row-major in smem, B (8*NT x K) row-major in smem.
template <typename T, int MT, int NT, int K>
__device__ __forceinline__ void gemm_ss_nt(float (&acc)[MT][NT][4], const T* sA, int lda,
                                           const T* sB, int ldb, int lane) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "tile shape");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      ldmatrix_x4(a[mi], sA + (mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * lda + kk * 16 +
                             (lane >> 4) * 8);
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, sB + (np * 16 + (lane & 7) + (lane >> 4) * 8) * ldb + kk * 16 +
                         ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        mma_16816<T>(acc[mi][2 * np], a[mi], b[0], b[1]);
        mma_16816<T>(acc[mi][2 * np + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// acc[MT][NT] += A * B: A in registers (KT k-steps of A fragments), B (16*KT x 8*NT)
// row-major in smem (read transposed by ldmatrix.trans).
template <typename T, int MT, int NT, int KT>
__device__ __forceinline__ void gemm_rs_nn(float (&acc)[MT][NT][4],
                                           const uint32_t (&a)[MT][KT][4], const T* sB, int ldb,
                                           int lane) {
  static_assert(NT % 2 == 0, "tile shape");
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldb +
                               np * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        mma_16816<T>(acc[mi][2 * np], a[mi][kk], b[0], b[1]);
        mma_16816<T>(acc[mi][2 * np + 1], a[mi][kk], b[2], b[3]);
      }
    }
  }
}

// Accumulator (C fragments of a 16*MT x 8*NT tile) -> A fragments of the next mma.
template <typename T, int MT, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[MT][NT / 2][4],
                                         const float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      a[mi][kk][0] = pack2<T>(acc[mi][2 * kk][0], acc[mi][2 * kk][1]);
      a[mi][kk][1] = pack2<T>(acc[mi][2 * kk][2], acc[mi][2 * kk][3]);
      a[mi][kk][2] = pack2<T>(acc[mi][2 * kk + 1][0], acc[mi][2 * kk + 1][1]);
      a[mi][kk][3] = pack2<T>(acc[mi][2 * kk + 1][2], acc[mi][2 * kk + 1][3]);
    }
  }
}

// Starting value of a score accumulator: mask / scale (scale > 0), kept finite when the mask
// is (finfo.min padding must not overflow to -inf), so that scale * (q.k + mask / scale) ==
// scale * q.k + mask. -inf (hidden), +inf and NaN pass as they are, so they propagate.
__device__ __forceinline__ float mask_to_acc(float m, float inv_scale) {
  const float x = m * inv_scale;
  return isinf(x) && isfinite(m) ? copysignf(FLT_MAX, x) : x;
}

// Fills a score tile with mask / scale, -inf where the window hides the pair (so masked
// kernels need no window test after the matmul, where registers are scarcest); `row_base` /
// `col_base` are the global query/key of the thread's first element when kTransposed is false
// (rows = queries), else rows = keys. Returns whether any in-range entry of this thread is visible.
template <int MT, int NT, bool kTransposed>
__device__ __forceinline__ bool init_scores_from_mask(float (&s)[MT][NT][4], const MaskView& mask,
                                                      int64_t mask_base, int row_base,
                                                      int col_base, int sq, int sk,
                                                      float inv_scale, const Visibility& vis) {
  bool any = false;
  const void* ptr = mask.ptr;
  const MaskKind kind = mask.kind;
  const int64_t stride_q = mask.stride_q, stride_k = mask.stride_k;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int ni = 0; ni < NT; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row_base + mi * 16 + (e >> 1) * 8;
        const int col = col_base + ni * 8 + (e & 1);
        const int query = kTransposed ? col : row;
        const int key = kTransposed ? row : col;
        float m = -INFINITY;
        if (query < sq && key < sk && sees(vis, query, key)) {
          m = load_mask(ptr, kind, mask_base + query * stride_q + key * stride_k);
        }
        any |= m != -INFINITY;
        s[mi][ni][e] = mask_to_acc(m, inv_scale);
      }
    }
  }
  return any;
}

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&a)[MT][NT][4]) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) a[mi][ni][e] = 0.f;
}

// The head's ALiBi slope (0: no bias), alibi_slopes being (B, Hq) with bh = b * Hq + h.
__device__ __forceinline__ float alibi_slope_of(const AttnFwdParams& p, int64_t bh) {
  return p.alibi_slopes != nullptr ? p.alibi_slopes[bh] : 0.f;
}

// Score (query, key) in natural units from its accumulator `acc` (q.k, plus mask / scale for
// Scores::kMasked): scaled; capped for kCapped, with d cap / dx in `cap_slope` (1 otherwise);
// ALiBi's -slope * |query + diagonal - key|; then for kCapped the mask, read here for queries
// and keys in range (-inf hides the key whatever the capped score is). `mask_base` is the
// head's mask offset (masks come with padded batches only); `diagonal` the sequence's i' - i.
// Keys outside the window or past Sk are the caller's.
template <Scores kScores>
__device__ __forceinline__ float score_of(float acc, const AttnFwdParams& p, int diagonal,
                                          float alibi_slope, int64_t mask_base, int query, int key,
                                          float& cap_slope) {
  float x = acc * p.scale;
  cap_slope = 1.f;
  if constexpr (kScores == Scores::kCapped) {  // d cap(x) / dx = 1 - (cap(x) / softcap)^2
    x = cap_score(x, p.softcap);
    cap_slope = 1.f - (x / p.softcap) * (x / p.softcap);
  }
  if (alibi_slope != 0.f) x -= alibi_slope * fabsf(static_cast<float>(query + diagonal - key));
  if constexpr (kScores == Scores::kCapped) {
    if (p.mask.kind != MaskKind::kNone && query < p.sq && key < p.sk) {
      const float m = load_mask(p.mask.ptr, p.mask.kind,
                                mask_base + query * p.mask.stride_q + key * p.mask.stride_k);
      x = m == -INFINITY ? -INFINITY : x + m;
    }
  }
  return x;
}

// One step of the online softmax for row half hf (elements 2 hf, 2 hf + 1 of each n8 tile) of
// an m16 tile: `s` holds the row's new scores (natural units, -inf where hidden), `mx` their
// max over the quad. The scores become exp(s - max); the row's output accumulator, max and
// (per-lane) sum are updated.
template <int kNT, int kDT>
__device__ __forceinline__ void online_softmax_step(float (&s)[kNT][4], float (&acc_o)[kDT][4], int hf, float mx,
                                                    float& row_max, float& row_sum) {
  const float m_new = fmaxf(row_max, mx);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;  // rows seeing nothing yet
  const float alpha = exp_shifted(row_max, m_use);
  row_max = m_new;
  float sum = 0.f;
#pragma unroll
  for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
    for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
      s[ni][e] = exp_shifted(s[ni][e], m_use);
      sum += s[ni][e];
    }
  }
  row_sum = row_sum * alpha + sum;
#pragma unroll
  for (int di = 0; di < kDT; ++di) {
    acc_o[di][2 * hf] *= alpha;
    acc_o[di][2 * hf + 1] *= alpha;
  }
}

// ---------------------------------------------------------------------------------------
// Forward. Grid (B * Hq, ceil(Sq / kBlockM)); kNWarps warps, each owning 16 * kMT query rows.
// Writes out and the row statistics (lse, row_max, row_sum) of its query block.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNWarps, Scores kScores, bool kDropout,
          bool kPacked>
__global__ void __launch_bounds__(kNWarps * 32, 1)
    fwd_kernel(const AttnFwdParams p) {
  constexpr int kThreads = kNWarps * 32;
  constexpr int kMT = kBlockM / (16 * kNWarps);
  constexpr int kNT = kBlockN / 8;
  constexpr int kDT = kHeadDim / 8;
  constexpr int kLd = kHeadDim + 8;
  static_assert(kMT * 16 * kNWarps == kBlockM, "block M");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kLd;
  T* sV = sK + kBlockN * kLd;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.x, b = bh / p.hq, h = bh % p.hq, hk = h / (p.hq / p.hkv);
  const int m0 = blockIdx.y * kBlockM;
  const int warp_row0 = warp * kMT * 16;
  const SeqInfo<kPacked> seq(p, b);
  if (m0 >= seq.sq(p)) return;  // past this sequence's queries (packed: a shorter one)

  const T* q = static_cast<const T*>(p.q) + seq.q_offset(b, h, p.q_stride_b, p.q_stride_h, p.q_stride_s);
  const T* k = static_cast<const T*>(p.k) + seq.k_offset(b, hk, p.k_stride_b, p.k_stride_h, p.k_stride_s);
  const T* v = static_cast<const T*>(p.v) + seq.k_offset(b, hk, p.v_stride_b, p.v_stride_h, p.v_stride_s);
  const int64_t mask_base = b * p.mask.stride_b + h * p.mask.stride_h;

  // Only the key blocks the window shows this query block are visited.
  const int n_begin = key_block_begin(seq.vis(p), m0, kBlockN);
  const int n_end = key_block_end(seq.vis(p), m0, kBlockM, seq.sk(p), kBlockN);
  const float inv_scale = 1.f / p.scale;
  const float alibi_slope = alibi_slope_of(p, bh);
  DropoutRng rng;
  if constexpr (kDropout) rng = load_dropout_rng(p);

  load_tile<kBlockM, kHeadDim, kThreads>(sQ, q, p.q_stride_s, m0, seq.sq(p), p.d, tid);
  if (n_begin < n_end)
    load_tile<kBlockN, kHeadDim, kThreads>(sK, k, p.k_stride_s, n_begin * kBlockN, seq.sk(p), p.d, tid);
  cp_async_commit();
  int k_loaded = n_begin;  // key block held (or being filled) in sK

  float acc_o[kMT][kDT][4];
  zero(acc_o);
  // The online softmax starts from the head's sink, if any: one more logit per row, with no
  // value (its exp(0) = 1 counted once per quad, which sums its lanes' row sums at the end).
  const float sink = p.sinks != nullptr ? p.sinks[h] : -INFINITY;
  const float sink_sum = t == 0 && sink > -INFINITY ? 1.f : 0.f;
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
    row_max[mi][0] = row_max[mi][1] = sink;
    row_sum[mi][0] = row_sum[mi][1] = sink_sum;
  }

  for (int n = n_begin; n < n_end; ++n) {
    const int n0 = n * kBlockN;
    float s[kMT][kNT][4];
    if constexpr (kScores == Scores::kMasked) {
      const bool any = init_scores_from_mask<kMT, kNT, false>(
          s, p.mask, mask_base, m0 + warp_row0 + g, n0 + 2 * t, seq.sq(p), seq.sk(p), inv_scale, seq.vis(p));
      if (!__syncthreads_or(any)) continue;  // the mask hides this key block for every row
    } else {
      zero(s);
    }
    if (k_loaded != n) {  // the prefetched block was skipped: wait for it, then reload
      cp_async_wait<0>();
      load_tile<kBlockN, kHeadDim, kThreads>(sK, k, p.k_stride_s, n0, seq.sk(p), p.d, tid);
      cp_async_commit();
      k_loaded = n;
    }
    load_tile<kBlockN, kHeadDim, kThreads>(sV, v, p.v_stride_s, n0, seq.sk(p), p.d, tid);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K ready; V may still be in flight
    __syncthreads();

    gemm_ss_nt<T, kMT, kNT, kHeadDim>(s, sQ + warp_row0 * kLd, kLd, sK, kLd, lane);
    __syncthreads();  // every warp is done with sK: prefetch the next key block
    if (n + 1 < n_end) {
      load_tile<kBlockN, kHeadDim, kThreads>(sK, k, p.k_stride_s, n0 + kBlockN, seq.sk(p), p.d, tid);
      k_loaded = n + 1;
    }
    cp_async_commit();

    // Keys past Sk and (on blocks the window cuts) keys outside the window.
    const bool edge = n0 + kBlockN > seq.sk(p) || partial_tile(seq.vis(p), m0, kBlockM, n0, kBlockN);
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = m0 + warp_row0 + mi * 16 + g + hf * 8;
        float mx = -INFINITY;
#pragma unroll
        for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
          for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
            const int col = n0 + ni * 8 + 2 * t + (e & 1);
            float cap_slope;
            float x = score_of<kScores>(s[mi][ni][e], p, seq.diagonal(p), alibi_slope, mask_base, row, col, cap_slope);
            if (edge && (col >= seq.sk(p) || (kScores != Scores::kMasked && !sees(seq.vis(p), row, col)))) x = -INFINITY;
            s[mi][ni][e] = x;
            mx = fmaxf(mx, x);
          }
        }
        online_softmax_step(s[mi], acc_o[mi], hf, quad_max(mx), row_max[mi][hf], row_sum[mi][hf]);
      }
    }
    if constexpr (kDropout) {  // after the row sums; 1 / (1 - p) is applied in the epilogue
      dropout_query_rows<kMT, kNT>(s, rng, bh, m0 + warp_row0 + g, n0 + 2 * t, 1.f);
    }
    uint32_t pa[kMT][kNT / 2][4];
    acc_to_a<T, kMT, kNT>(pa, s);

    cp_async_wait<1>();  // V ready
    __syncthreads();
    gemm_rs_nn<T, kMT, kDT, kNT / 2>(acc_o, pa, sV, kLd, lane);
    __syncthreads();  // every warp is done with sV
  }

  // Epilogue: normalise, stage the tile in sQ, store 16 bytes at a time.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = warp_row0 + mi * 16 + g + hf * 8;
      const float l = quad_sum(row_sum[mi][hf]);
      float inv = l == 0.f ? 0.f : 1.f / l;  // NaN stays NaN
      if constexpr (kDropout) inv *= p.keep_scale;
#pragma unroll
      for (int di = 0; di < kDT; ++di) {
        *reinterpret_cast<uint32_t*>(sQ + r * kLd + di * 8 + 2 * t) =
            pack2<T>(acc_o[mi][di][2 * hf] * inv, acc_o[mi][di][2 * hf + 1] * inv);
      }
      if (t == 0 && m0 + r < seq.sq(p)) {
        const int64_t idx = seq.stat_base(p, bh, h) + m0 + r;
        const float m = l == 0.f ? -INFINITY : row_max[mi][hf];
        p.lse[idx] = m + logf(l);
        p.row_max[idx] = m;
        p.row_sum[idx] = l;
      }
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + seq.q_offset(b, h, p.o_stride_b, p.o_stride_h, p.o_stride_s);
  store_tile<kBlockM, kHeadDim, kThreads>(out, p.o_stride_s, sQ, m0, seq.sq(p), p.d, tid);
}

// ---------------------------------------------------------------------------------------
// Backward preprocessing: dsum[row] = sum_d dout[row, d] * out[row, d]; one warp per row of
// the statistics' layout (stat_rows).
template <typename T>
__global__ void __launch_bounds__(256) bwd_dsum_kernel(const AttnBwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const AttnFwdParams& f = p.fwd;
  if (row >= stat_rows(f)) return;
  // Packed statistics are (Hq, total_q): one "batch" whose rows are tokens (stride_b unused).
  const int64_t head_rows = f.cu_seqlens_q != nullptr ? f.total_q : f.sq;
  const int64_t s = row % head_rows, bh = row / head_rows, b = bh / f.hq, h = bh % f.hq;
  const T* o = static_cast<const T*>(f.out) + b * f.o_stride_b + h * f.o_stride_h + s * f.o_stride_s;
  const T* dout =
      static_cast<const T*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h + s * p.do_stride_s;
  float acc = 0.f;
  for (int d = lane; d < f.d; d += 32) acc += to_float(o[d]) * to_float(dout[d]);
  acc = warp_sum(acc);
  if (lane == 0) {
    p.dsum[row] = acc;
    // The statistics folded into one lse for the dK/dV kernel (see there).
    p.lse[row] = f.row_max[row] + logf(f.row_sum[row]);
  }
}

// dQ (and dmask). Grid (B * Hq, ceil(Sq / kBlockM)); each warp owns 16 query rows.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNWarps, Scores kScores, bool kDropout,
          bool kPacked>
__global__ void __launch_bounds__(kNWarps * 32, 1)
    bwd_dq_kernel(const AttnBwdParams p) {
  constexpr int kThreads = kNWarps * 32;
  constexpr int kNT = kBlockN / 8;
  constexpr int kDT = kHeadDim / 8;
  constexpr int kLd = kHeadDim + 8;
  static_assert(kBlockM == 16 * kNWarps, "one m16 tile per warp");
  const AttnFwdParams& f = p.fwd;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kLd;
  T* sK = sdO + kBlockM * kLd;
  T* sV = sK + kBlockN * kLd;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.x, b = bh / f.hq, h = bh % f.hq, hk = h / (f.hq / f.hkv);
  const int m0 = blockIdx.y * kBlockM;
  const int warp_row0 = warp * 16;
  const SeqInfo<kPacked> seq(f, b);
  if (m0 >= seq.sq(f)) return;  // past this sequence's queries (packed: a shorter one)

  const T* q = static_cast<const T*>(f.q) + seq.q_offset(b, h, f.q_stride_b, f.q_stride_h, f.q_stride_s);
  const T* k = static_cast<const T*>(f.k) + seq.k_offset(b, hk, f.k_stride_b, f.k_stride_h, f.k_stride_s);
  const T* v = static_cast<const T*>(f.v) + seq.k_offset(b, hk, f.v_stride_b, f.v_stride_h, f.v_stride_s);
  const T* dout =
      static_cast<const T*>(p.dout) + seq.q_offset(b, h, p.do_stride_b, p.do_stride_h, p.do_stride_s);
  const int64_t mask_base = b * f.mask.stride_b + h * f.mask.stride_h;

  const int n_begin = key_block_begin(seq.vis(f), m0, kBlockN);
  const int n_end = key_block_end(seq.vis(f), m0, kBlockM, seq.sk(f), kBlockN);
  const float inv_scale = 1.f / f.scale;
  const float alibi_slope = alibi_slope_of(f, bh);
  DropoutRng rng;
  if constexpr (kDropout) rng = load_dropout_rng(f);

  load_tile<kBlockM, kHeadDim, kThreads>(sQ, q, f.q_stride_s, m0, seq.sq(f), f.d, tid);
  load_tile<kBlockM, kHeadDim, kThreads>(sdO, dout, p.do_stride_s, m0, seq.sq(f), f.d, tid);
  cp_async_commit();

  // Per-row softmax statistics and dsum.
  float row_max[2], inv_sum[2], dsum[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = m0 + warp_row0 + g + hf * 8;
    const int64_t idx = seq.stat_base(f, bh, h) + row;
    load_row_stats(f, idx, row < seq.sq(f), row_max[hf], inv_sum[hf]);
    dsum[hf] = row < seq.sq(f) ? p.dsum[idx] : 0.f;
  }

  float acc_dq[1][kDT][4];
  zero(acc_dq);

  for (int n = n_begin; n < n_end; ++n) {
    const int n0 = n * kBlockN;
    float s[1][kNT][4];
    if constexpr (kScores == Scores::kMasked) {
      const bool any = init_scores_from_mask<1, kNT, false>(
          s, f.mask, mask_base, m0 + warp_row0 + g, n0 + 2 * t, seq.sq(f), seq.sk(f), inv_scale, seq.vis(f));
      if (!__syncthreads_or(any)) continue;
    } else {
      zero(s);
    }
    load_tile<kBlockN, kHeadDim, kThreads>(sK, k, f.k_stride_s, n0, seq.sk(f), f.d, tid);
    cp_async_commit();
    load_tile<kBlockN, kHeadDim, kThreads>(sV, v, f.v_stride_s, n0, seq.sk(f), f.d, tid);
    cp_async_commit();
    cp_async_wait<1>();  // Q, dO, K ready
    __syncthreads();
    gemm_ss_nt<T, 1, kNT, kHeadDim>(s, sQ + warp_row0 * kLd, kLd, sK, kLd, lane);
    float dp[1][kNT][4];
    zero(dp);
    cp_async_wait<0>();  // V ready
    __syncthreads();
    gemm_ss_nt<T, 1, kNT, kHeadDim>(dp, sdO + warp_row0 * kLd, kLd, sV, kLd, lane);
    if constexpr (kDropout) dropout_query_rows<1, kNT>(dp, rng, bh, m0 + warp_row0 + g, n0 + 2 * t, rng.keep_scale);

    // Keys past Sk and (on blocks the window cuts) keys outside the window.
    const bool edge = n0 + kBlockN > seq.sk(f) || partial_tile(seq.vis(f), m0, kBlockM, n0, kBlockN);
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hf = e >> 1;
        const int row = m0 + warp_row0 + g + hf * 8;
        const int col = n0 + ni * 8 + 2 * t + (e & 1);
        const bool hidden = edge && (col >= seq.sk(f) || (kScores != Scores::kMasked && !sees(seq.vis(f), row, col)));
        float cap_slope;
        const float x = score_of<kScores>(s[0][ni][e], f, seq.diagonal(f), alibi_slope, mask_base, row, col, cap_slope);
        const float pr = hidden ? 0.f : exp_shifted(x, row_max[hf]) * inv_sum[hf];
        const float ds = pr * (dp[0][ni][e] - dsum[hf]);  // dmask: dS after the cap
        s[0][ni][e] = ds * cap_slope;
        if (p.dmask != nullptr && row < seq.sq(f) && col < seq.sk(f)) {
          p.dmask[(static_cast<int64_t>(bh) * f.sq + row) * f.sk + col] = ds;  // padded only
        }
      }
    }
    uint32_t dsa[1][kNT / 2][4];
    acc_to_a<T, 1, kNT>(dsa, s);
    gemm_rs_nn<T, 1, kDT, kNT / 2>(acc_dq, dsa, sK, kLd, lane);
    __syncthreads();  // every warp is done with sK, sV
  }

  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = warp_row0 + g + hf * 8;
#pragma unroll
    for (int di = 0; di < kDT; ++di) {
      *reinterpret_cast<uint32_t*>(sQ + r * kLd + di * 8 + 2 * t) = pack2<T>(
          acc_dq[0][di][2 * hf] * f.scale, acc_dq[0][di][2 * hf + 1] * f.scale);
    }
  }
  __syncthreads();
  T* dq = static_cast<T*>(p.dq) + seq.q_offset(b, h, p.dq_stride_b, p.dq_stride_h, p.dq_stride_s);
  store_tile<kBlockM, kHeadDim, kThreads>(dq, p.dq_stride_s, sQ, m0, seq.sq(f), f.d, tid);
}

// dK, dV. Grid (B * Hkv, ceil(Sk / kBlockN)); each warp owns 16 keys and loops over the
// query blocks of every query head in its GQA group, so dK/dV need no atomics.
// Scores are computed transposed (rows = keys, columns = queries).
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNWarps, Scores kScores, bool kDropout,
          bool kPacked>
__global__ void __launch_bounds__(kNWarps * 32, 1)
    bwd_dkdv_kernel(const AttnBwdParams p) {
  constexpr int kThreads = kNWarps * 32;
  constexpr int kQT = kBlockM / 8;  // 8-column (query) tiles of the transposed scores
  constexpr int kDT = kHeadDim / 8;
  constexpr int kLd = kHeadDim + 8;
  static_assert(kBlockN == 16 * kNWarps, "one m16 tile per warp");
  const AttnFwdParams& f = p.fwd;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kLd;
  T* sQ = sV + kBlockN * kLd;
  T* sdO = sQ + kBlockM * kLd;
  float* sLse2 = reinterpret_cast<float*>(sdO + kBlockM * kLd);  // kBlockM each, see below
  float* sDsum = sLse2 + kBlockM;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;
  const int bhk = blockIdx.x, b = bhk / f.hkv, hk = bhk % f.hkv;
  const int group = f.hq / f.hkv;
  const int n0 = blockIdx.y * kBlockN;
  const int warp_row0 = warp * 16;
  const SeqInfo<kPacked> seq(f, b);
  if constexpr (kPacked) {  // padded: never taken, yet the test alone spilled (head dim 128, sm_90)
    if (n0 >= seq.sk(f)) return;  // past a shorter sequence's keys
  }

  const T* k = static_cast<const T*>(f.k) + seq.k_offset(b, hk, f.k_stride_b, f.k_stride_h, f.k_stride_s);
  const T* v = static_cast<const T*>(f.v) + seq.k_offset(b, hk, f.v_stride_b, f.v_stride_h, f.v_stride_s);
  load_tile<kBlockN, kHeadDim, kThreads>(sK, k, f.k_stride_s, n0, seq.sk(f), f.d, tid);
  load_tile<kBlockN, kHeadDim, kThreads>(sV, v, f.v_stride_s, n0, seq.sk(f), f.d, tid);
  cp_async_commit();

  // Only the query blocks the window shows this key block to are visited.
  const int m_start = query_block_begin(seq.vis(f), n0, kBlockM);
  const int m_blocks = query_block_end(seq.vis(f), n0, kBlockN, seq.sq(f), kBlockM);
  const float inv_scale = 1.f / f.scale;
  DropoutRng rng;
  if constexpr (kDropout) rng = load_dropout_rng(f);

  float acc_dk[1][kDT][4], acc_dv[1][kDT][4];
  zero(acc_dk);
  zero(acc_dv);

  for (int hh = 0; hh < group; ++hh) {
    const int h = hk * group + hh;
    const int64_t bh = static_cast<int64_t>(b) * f.hq + h;
    const T* q = static_cast<const T*>(f.q) + seq.q_offset(b, h, f.q_stride_b, f.q_stride_h, f.q_stride_s);
    const T* dout =
        static_cast<const T*>(p.dout) + seq.q_offset(b, h, p.do_stride_b, p.do_stride_h, p.do_stride_s);
    const int64_t mask_base = b * f.mask.stride_b + h * f.mask.stride_h;
    for (int m = m_start; m < m_blocks; ++m) {
      const int m0 = m * kBlockM;
      float st[1][kQT][4];
      if constexpr (kScores == Scores::kMasked) {
        const bool any = init_scores_from_mask<1, kQT, true>(
            st, f.mask, mask_base, n0 + warp_row0 + g, m0 + 2 * t, seq.sq(f), seq.sk(f), inv_scale, seq.vis(f));
        if (!__syncthreads_or(any)) continue;
      } else {
        zero(st);
      }
      load_tile<kBlockM, kHeadDim, kThreads>(sQ, q, f.q_stride_s, m0, seq.sq(f), f.d, tid);
      cp_async_commit();
      load_tile<kBlockM, kHeadDim, kThreads>(sdO, dout, p.do_stride_s, m0, seq.sq(f), f.d, tid);
      cp_async_commit();

      // The query block's log2-domain lse (from the dsum kernel) and dsum, staged in shared
      // memory while the tiles load (as flash-attention 2 does): held in registers, 4 per query
      // column, they left this kernel no headroom (head dim 128 spilled on any change). One
      // lse, not the row max and sum apart: in fp16 / bf16 its rounding (|lse| * 2^-24) is far
      // below theirs.
      for (int i = tid; i < kBlockM; i += kThreads) {
        const int query = m0 + i;
        const float l = query < seq.sq(f) ? p.lse[seq.stat_base(f, bh, h) + query] : -INFINITY;
        sLse2[i] = l == -INFINITY ? INFINITY : l * kLog2e;
        sDsum[i] = query < seq.sq(f) ? p.dsum[seq.stat_base(f, bh, h) + query] : 0.f;
      }

      cp_async_wait<1>();  // K, V, Q ready
      __syncthreads();
      gemm_ss_nt<T, 1, kQT, kHeadDim>(st, sK + warp_row0 * kLd, kLd, sQ, kLd, lane);
      float dpt[1][kQT][4];
      zero(dpt);
      cp_async_wait<0>();  // dO ready
      __syncthreads();
      gemm_ss_nt<T, 1, kQT, kHeadDim>(dpt, sV + warp_row0 * kLd, kLd, sdO, kLd, lane);

      // Read per tile, after the matmuls: held across them, it spilled (head dim 128, sm_90).
      const float alibi_slope = alibi_slope_of(f, bh);
#pragma unroll
      for (int ni = 0; ni < kQT; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + warp_row0 + g + (e >> 1) * 8;
          const int query = m0 + ni * 8 + 2 * t + (e & 1);
          const bool hidden = key >= seq.sk(f) || (kScores != Scores::kMasked && !sees(seq.vis(f), query, key));
          float cap_slope;
          const float x = score_of<kScores>(st[0][ni][e], f, seq.diagonal(f), alibi_slope, mask_base, query, key, cap_slope);
          const int column = ni * 8 + 2 * t + (e & 1);
          const float pr = hidden ? 0.f : exp2f(x * kLog2e - sLse2[column]);
          float dp = dpt[0][ni][e], pv = pr;  // pv: the probability that reached V
          if constexpr (kDropout) {
            const bool kept = dropout_keeps(rng, static_cast<uint32_t>(bh), query, key);
            dp = kept ? dp * rng.keep_scale : 0.f;
            pv = kept ? pr * rng.keep_scale : 0.f;
          }
          st[0][ni][e] = pv;
          dpt[0][ni][e] = pr * (dp - sDsum[column]) * cap_slope;
        }
      }
      uint32_t pa[1][kQT / 2][4];
      acc_to_a<T, 1, kQT>(pa, st);
      gemm_rs_nn<T, 1, kDT, kQT / 2>(acc_dv, pa, sdO, kLd, lane);
      uint32_t dsa[1][kQT / 2][4];
      acc_to_a<T, 1, kQT>(dsa, dpt);
      gemm_rs_nn<T, 1, kDT, kQT / 2>(acc_dk, dsa, sQ, kLd, lane);
      __syncthreads();  // every warp is done with sQ, sdO
    }
  }

  // Epilogue: stage dK in sK and dV in sV (no longer read), store.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = warp_row0 + g + hf * 8;
#pragma unroll
    for (int di = 0; di < kDT; ++di) {
      *reinterpret_cast<uint32_t*>(sK + r * kLd + di * 8 + 2 * t) = pack2<T>(
          acc_dk[0][di][2 * hf] * f.scale, acc_dk[0][di][2 * hf + 1] * f.scale);
      *reinterpret_cast<uint32_t*>(sV + r * kLd + di * 8 + 2 * t) =
          pack2<T>(acc_dv[0][di][2 * hf], acc_dv[0][di][2 * hf + 1]);
    }
  }
  __syncthreads();
  const int64_t head_off = seq.k_offset(b, hk, p.dkv_stride_b, p.dkv_stride_h, p.dkv_stride_s);
  store_tile<kBlockN, kHeadDim, kThreads>(static_cast<T*>(p.dk) + head_off, p.dkv_stride_s, sK, n0,
                                          seq.sk(f), f.d, tid);
  store_tile<kBlockN, kHeadDim, kThreads>(static_cast<T*>(p.dv) + head_off, p.dkv_stride_s, sV, n0,
                                          seq.sk(f), f.d, tid);
}

}  // namespace flash
}  // namespace cuda
}  // namespace fastattn

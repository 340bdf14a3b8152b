// Host-side interface of the CUDA kernels: parameter structs and launchers.
//
// Plain C++ (no torch, no CUDA device code) so that csrc/cuda_bindings.cpp can fill the
// structs from tensors and nvcc can compile the kernels on machines whose torch lacks CUDA.
// Strides are in elements. Every launcher returns the launch status (cudaGetLastError()).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "limits.h"

// The window rule below is computed on the host for padded batches and per sequence on the
// device for packed ones.
#ifdef __CUDACC__
#define FA_HOST_DEVICE __host__ __device__
#else
#define FA_HOST_DEVICE
#endif

namespace fastattn {
namespace cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// The visibility rule of the attention and softmax kernels: query (row) i sees key (column) j
// iff i + lo <= j <= i + hi (and j < the key count). Computed on the host by `visibility`,
// so the kernels read it from their parameters instead of holding it in registers.
struct Visibility {
  int lo = 0, hi = 0;
  int span = 0;  // hi - lo: one unsigned compare tests both sides
  bool bounded = false;  // a side is bounded: without one, every key is seen
};

// i' - i, the diagonal of the window rule below: sk - sq (bottom-right) or 0 (top-left).
FA_HOST_DEVICE inline int64_t window_diagonal(bool top_left, int64_t sq, int64_t sk) { return top_left ? 0 : sk - sq; }

// The rule of a window: query i sees key j iff i' - left <= j <= i' + right, i' = i + sk - sq
// (i' = i when top_left); a negative side is unbounded and becomes an offset past every key.
FA_HOST_DEVICE inline Visibility visibility(int64_t left, int64_t right, bool top_left, int64_t sq,
                                           int64_t sk) {
  const int64_t off = window_diagonal(top_left, sq, sk), far = sq + sk;
  Visibility v;
  v.lo = static_cast<int>(left < 0 || off - left < -far ? -far : off - left);
  v.hi = static_cast<int>(right < 0 || off + right > far ? far : off + right);
  v.span = v.hi - v.lo;
  v.bounded = left >= 0 || right >= 0;
  return v;
}

// How mask entries are stored: bool (true = attend) or additive values of some float type.
enum class MaskKind : int { kNone = 0, kBool = 1, kFloat16 = 2, kBFloat16 = 3, kFloat32 = 4 };

// Strided view of a (B, H, S1, S2) mask already expanded to the score shape.
struct MaskView {
  const void* ptr = nullptr;
  MaskKind kind = MaskKind::kNone;
  int64_t stride_b = 0, stride_h = 0, stride_q = 0, stride_k = 0;
};

// ---------------------------------------------------------------------------------------
// Fused scaled masked softmax over the last dim of x (B, H, R, C).
struct SoftmaxFwdParams {
  const void* x = nullptr;  // last dim contiguous
  void* y = nullptr;        // contiguous (B, H, R, C)
  int64_t x_stride_b = 0, x_stride_h = 0, x_stride_r = 0;
  int b = 0, h = 0, rows = 0, cols = 0;
  float scale = 1.f;
  Visibility vis;  // over (R, C) = (queries, keys)
  DType dtype = DType::kFloat32;
  MaskView mask;
};

// dx = y * (dy - sum(dy * y)); all three contiguous with the same (n_rows, cols) shape.
struct SoftmaxBwdParams {
  const void* dy = nullptr;
  const void* y = nullptr;
  void* dx = nullptr;
  int64_t n_rows = 0;
  int cols = 0;
  DType dtype = DType::kFloat32;
};

cudaError_t softmax_fwd(const SoftmaxFwdParams& p, cudaStream_t stream);
cudaError_t softmax_bwd(const SoftmaxBwdParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Flash attention (fp16/bf16, sm_80+). Layout (B, H, S, D); last dims contiguous, every
// row stride a multiple of 8 elements and every base pointer 16-byte aligned.
//
// Packed sequences (varlen) set cu_seqlens_q/k: q and out are then (total_q, H, D), k and v
// (total_k, Hkv, D), read through the same strides with stride_s between tokens (stride_b
// unused); b counts sequences, sq / sk are the longest ones' lengths (the grid); the row
// statistics (lse, row_max, row_sum and the backward's scratch) are (Hq, total_q); each
// sequence's window (window_left / right) is aligned bottom-right; there is no mask. The
// lengths stay on the device.
struct AttnFwdParams {
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  void* out = nullptr;  // (B, Hq, Sq, D) with the strides below
  float* lse = nullptr; // contiguous (B, Hq, Sq)
  // The softmax statistics the backward recomputes P from (P = exp(s - row_max) / row_sum),
  // contiguous (B, Hq, Sq) each: an fp32 lse keeps the row sum only to |lse| * 2^-24.
  float* row_max = nullptr;  // largest score scale*q.k + mask of the row; -inf if none seen
  float* row_sum = nullptr;  // sum of exp(score - row_max); 0 for rows that see no key
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_s = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_s = 0;
  int b = 0, hq = 0, hkv = 0, sq = 0, sk = 0, d = 0;
  float scale = 1.f;  // must be > 0
  Visibility vis;
  int diagonal = 0;  // window_diagonal of the call, from which ALiBi measures |i' - j|
  float softcap = 0.f;  // > 0: scores become softcap * tanh(score / softcap), then get the mask
  // (Hq) fp32 on the device, or nullptr: one logit per query head that joins each row's
  // softmax sum with no value (attention sinks); lse and the statistics include it.
  const float* sinks = nullptr;
  // (B, Hq) fp32 contiguous on the device, or nullptr: ALiBi adds
  // -alibi_slopes[b * Hq + h] * |i + diagonal - j| to the (capped) scaled score, before
  // the mask. No gradient; the backward recomputes P with the same bias.
  const float* alibi_slopes = nullptr;
  DType dtype = DType::kFloat16;
  MaskView mask;
  // Dropout (csrc/philox.h's decisions): rng_state, the call's int64 (seed, offset) in device
  // memory, read by the kernels (no host sync: CUDA graphs replay it); nullptr: no dropout. A
  // score is dropped when its Philox word is < drop_threshold = floor(p * 2^32); kept
  // probabilities are scaled by keep_scale = 1 / (1 - p). The softmax statistics stay the
  // undropped softmax's.
  const int64_t* rng_state = nullptr;
  uint64_t drop_threshold = 0;
  float keep_scale = 1.f;
  // Packed sequences: int32 (B + 1) cumulative lengths on the device, or nullptr (padded).
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  int64_t total_q = 0;                       // tokens of q: the statistics' row count
  int64_t window_left = -1, window_right = -1;  // each sequence's window (vis is per call)
};

// Rows of the row statistics: B * Hq * Sq for padded batches, Hq * total_q for packed ones.
FA_HOST_DEVICE inline int64_t stat_rows(const AttnFwdParams& p) {
  return p.cu_seqlens_q != nullptr ? p.hq * p.total_q : static_cast<int64_t>(p.b) * p.hq * p.sq;
}

struct AttnBwdParams {
  AttnFwdParams fwd;  // q, k, v, out, row_max, row_sum (read), sizes, mask
  const void* dout = nullptr;
  int64_t do_stride_b = 0, do_stride_h = 0, do_stride_s = 0;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;  // shapes of q, k, v, strides below
  float* dsum = nullptr;   // scratch, the statistics' layout: rowsum(dout * out)
  float* lse = nullptr;    // scratch, the statistics' layout: row_max + log(row_sum)
  float* dmask = nullptr;  // optional contiguous (B, Hq, Sq, Sk), zero-filled by the caller
  int64_t dq_stride_b = 0, dq_stride_h = 0, dq_stride_s = 0;
  int64_t dkv_stride_b = 0, dkv_stride_h = 0, dkv_stride_s = 0;  // dk and dv alike
};

cudaError_t attn_fwd(const AttnFwdParams& p, cudaStream_t stream);
cudaError_t attn_bwd(const AttnBwdParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// KV-cache decoding (flash-decoding), forward only: q (B, Hq, Sq, D) against a cache read in
// place, contiguous (B, Hkv, capacity, D) or paged (num_blocks, Hkv, block_size, D) through
// block_table. Row b sees its first seqlens[b] keys (read on the device, clamped to
// [0, capacity]); the window is aligned bottom-right within each row.
// `attn` describes q, k = k_cache and v = v_cache (stride_b: the batch or the page stride; v's
// head dim is D), out (contiguous (B, Hq, Sq, D)), lse (contiguous (B, Hq, Sq)), b, hq, hkv,
// sq, d, scale, softcap, sinks, alibi_slopes ((B, Hq)), window_left / right and dtype; its
// mask, softmax statistics, dropout and packed-sequence fields are unused.
struct KvcacheFwdParams {
  AttnFwdParams attn;
  const int* seqlens = nullptr;      // int32 (B) on the device
  const int* block_table = nullptr;  // int32 (B, max_blocks) contiguous, or nullptr: contiguous cache
  int max_blocks = 0, block_size = 0;
  int capacity = 0;  // keys a row can hold: S_max, or max_blocks * block_size
  // Split-KV: splits > 1 CTAs share a row's chunks (kvcache_splits) and write each chunk's
  // normalised output and lse here, which the combine kernel merges; with 1 the kernel writes
  // out and lse itself.
  int splits = 1;
  float* part_out = nullptr;  // (kvcache_chunks, B * Hq * Sq, D) fp32
  float* part_lse = nullptr;  // (kvcache_chunks, B * Hq * Sq) fp32
};

// Keys of a chunk, the unit of the decode kernel's arithmetic: each chunk's normalised output
// and lse are computed alike whatever the split, and folded in chunk order by the kernel (one
// split) or the combine kernel (several) with the same explicitly rounded operations, so the
// split count (which follows from how many CTAs fill the device) changes no bit of the result.
// 256 keys: 4 tiles of 64 keys at head dims <= 128, the warps' states merged once per chunk.
constexpr int kKvcacheChunkKeys = 256;
FA_HOST_DEVICE inline int kvcache_chunks(int capacity) {
  return (capacity + kKvcacheChunkKeys - 1) / kKvcacheChunkKeys;
}

// The split count of a call on a device with `sms` multiprocessors: 1 when its CTAs (one per
// cache row, kv head and 16 (query, head) rows) fill the device, else enough runs of chunks
// to give it about two CTAs per multiprocessor.
int kvcache_splits(const KvcacheFwdParams& p, int sms);
cudaError_t attn_fwd_kvcache(const KvcacheFwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn

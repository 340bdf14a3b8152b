// KV-cache decoding (flash-decoding): attention of a few new queries per cache row against the
// cache, read in place; forward only, fp16 / bf16, sm_80+.
//
// kvcache_fwd_kernel: grid (B * Hkv, ceil(group * Sq / kRows), splits), group = Hq / Hkv. A CTA
// owns kv head hk of cache row b and kRows (query, head) rows: row r is query r / group of query
// head hk * group + r % group, so every query head of the GQA group and every new query
// (chunked prefill) shares each K / V tile, read once per kRows rows. Its warps share the rows
// and split each tile's keys (warp w: keys [16 w, 16 w + 16)), each with its own online
// softmax, scores formed by `score_of` (flash.cuh) and hidden by the window rule of the row
// (`visibility` around its own length). K / V tiles are double-buffered with cp.async; their
// rows are found one by one (pages through the block table: any order, any block size) and end
// at the row's length, read on the device (no host sync; CUDA graphs replay it), so slots past
// a row's end are never read.
//
// Chunks (kKvcacheChunkKeys keys, fastattn_cuda.h): at a chunk's end the warps' states are
// merged in warp order and normalised into the chunk's output and lse. With one split the CTA
// folds its chunks in order into out and lse, starting from the head's sink (max sink, sum 1;
// lse then counts it, and a row that sees no key gives zeros and lse = sink, or -inf without
// one). With several, split s owns chunks [s * per_split, (s + 1) * per_split) of the row's
// own ceil(length / chunk keys) (the length read on the device: a short row in a long cache
// leaves no split idle), writes each one's partial (fp32; chunks it has no key of get lse
// -inf) and kvcache_combine_kernel folds those chunks of the row in order from the same start. Both folds use `fold_scales` and
// `fold_value`, explicitly rounded (never contracted differently in the two kernels), so the
// result does not depend on the split count.
#include <algorithm>

#include "flash_launch.cuh"

namespace fastattn {
namespace cuda {
namespace decode {

using flash::exp_shifted;

constexpr int kRows = 16;      // (query, head) rows of a CTA: one m16 tile
constexpr int kWarpKeys = 16;  // keys of a tile each warp owns (two n8 tiles of scores)
constexpr int kCombineWarps = 4;
// Split-KV aims at this many CTAs per multiprocessor: two ~90 KB CTAs fit one of sm_90 (not
// yet measured; chosen so that a wave's loads overlap the other CTA's arithmetic).
constexpr int kCtasPerSm = 2;

// Head dim 256 runs 2 warps (32-key tiles): 4 would need 176 KB of shared memory, more than
// sm_80's 163 KB.
template <int kHeadDim>
struct KvcacheConfig {
  static constexpr int kNWarps = kHeadDim > 128 ? 2 : 4;
  static constexpr int kBlockN = kNWarps * kWarpKeys;
};

// Softmax state of the CTA's rows in shared memory: max, sum and output accumulator (fp32).
template <int kHeadDim>
struct RowStates {
  float acc[kRows][kHeadDim];
  float max[kRows];
  float sum[kRows];
};

// Shared memory of kvcache_fwd_kernel after its tiles (Q, then K and V in two stages).
template <int kHeadDim, int kBlockN>
struct DecodeStorage {
  RowStates<kHeadDim> chunk;  // the current chunk, its warps merged
  RowStates<kHeadDim> fold;   // the chunks folded so far (one split)
  float scale_old[kRows], scale_new[kRows];  // fold factors of the current chunk, per row
  bool folds[kRows];                         // whether the chunk adds to the row (it saw a key)
  // Page and slot of each key of two tiles (page -1: past the row's end), found one iteration
  // ahead so that issuing a tile's loads waits on no block-table read (and holds no registers).
  int page[2][kBlockN], slot[2][kBlockN];
};

template <typename T, int kHeadDim>
constexpr size_t smem_bytes() {
  using C = KvcacheConfig<kHeadDim>;
  return (kRows + 4 * C::kBlockN) * (kHeadDim + 8) * sizeof(T) + sizeof(DecodeStorage<kHeadDim, C::kBlockN>);
}

// 1 / sum, 0 for a row that saw nothing (NaN stays NaN), and the row's lse (its add explicitly
// rounded: contracted with logf's scaling in one kernel and not in the other, it would differ).
__device__ __forceinline__ float inv_sum(float sum) { return sum == 0.f ? 0.f : 1.f / sum; }
__device__ __forceinline__ float row_lse(float max, float sum) {
  return sum == 0.f ? -INFINITY : __fadd_rn(max, logf(sum));
}

// Softmax state (max, sum) of a row joined by another's (max_new, sum_new): sets the factors
// that weigh the two accumulators and returns true, or returns false and leaves the state as it
// was when the other saw no key (its accumulator, possibly never written, is not read).
__device__ __forceinline__ bool fold_scales(float& max, float& sum, float max_new, float sum_new, float& scale_old,
                                            float& scale_new) {
  if (max_new == -INFINITY) return false;
  const float m = fmaxf(max, max_new);
  scale_old = exp_shifted(max, m);  // 0 while the state is empty (max -inf)
  scale_new = exp_shifted(max_new, m);
  max = m;
  sum = __fmaf_rn(sum, scale_old, __fmul_rn(sum_new, scale_new));
  return true;
}
__device__ __forceinline__ float fold_value(float acc, float scale_old, float value, float scale_new) {
  return __fmaf_rn(acc, scale_old, __fmul_rn(value, scale_new));
}

// The state a row's fold starts from: its head's sink (a logit with no value), if any.
__device__ __forceinline__ void start_fold(float sink, float& max, float& sum) {
  max = sink;
  sum = sink > -INFINITY ? 1.f : 0.f;
}

// Calls fn(row, col) for this thread's 16-byte pieces (8 elements from column col) of a
// kTileRows x kHeadDim tile shared by kThreads threads. Unrolled 4 times, so that the pieces'
// shared-memory reads (pages, slots) overlap: fully unrolled, the addresses of all pieces were
// held at once and head dim 256 spilled 44-56 bytes (ptxas, sm_90).
template <int kTileRows, int kHeadDim, int kThreads, typename Fn>
__device__ __forceinline__ void for_each_piece(int tid, Fn&& fn) {
  constexpr int kPiecesPerRow = kHeadDim / 8;
  constexpr int kPieces = kTileRows * kPiecesPerRow;
#pragma unroll 4
  for (int i = 0; i < (kPieces + kThreads - 1) / kThreads; ++i) {
    const int c = i * kThreads + tid;
    if (kPieces % kThreads == 0 || c < kPieces) fn(c / kPiecesPerRow, (c % kPiecesPerRow) * 8);
  }
}

// Calls fn(row, col) for this thread's elements of the CTA's kRows x kHeadDim row states.
template <int kHeadDim, int kThreads, typename Fn>
__device__ __forceinline__ void for_each_element(int tid, Fn&& fn) {
  for (int e = tid; e < kRows * kHeadDim; e += kThreads) fn(e / kHeadDim, e % kHeadDim);
}

// Where the CTA's rows and the cache row's keys are.
class DecodeRows {
 public:
  __device__ __forceinline__ DecodeRows(const KvcacheFwdParams& p, int b, int hk, int row0)
      : b_(b), hk_(hk), group_(p.attn.hq / p.attn.hkv), row0_(row0) {}
  // Query and query head of row r (0 <= r < kRows) of the CTA.
  __device__ __forceinline__ int query(int r) const { return (row0_ + r) / group_; }
  __device__ __forceinline__ int head(int r) const { return hk_ * group_ + (row0_ + r) % group_; }
  // Index of row r in out (rows of D) and lse: (b * Hq + head) * Sq + query.
  __device__ __forceinline__ int64_t out_row(const AttnFwdParams& a, int r) const {
    return (static_cast<int64_t>(b_) * a.hq + head(r)) * a.sq + query(r);
  }
  // Where key j of the cache row lies: cache row `page` (the batch row, or a page of the block
  // table) at position `slot`.
  __device__ __forceinline__ void find_key(const KvcacheFwdParams& p, int j, int& page, int& slot) const {
    if (p.block_table == nullptr) {
      page = b_, slot = j;
    } else {
      page = p.block_table[static_cast<int64_t>(b_) * p.max_blocks + j / p.block_size];
      slot = j % p.block_size;
    }
  }

 private:
  int b_, hk_, group_, row0_;
};

// ---------------------------------------------------------------------------------------
// Grid (B * Hkv, ceil(group * Sq / kRows), splits); see the top of the file. Writes out and lse
// of its rows (one split) or the partials of its chunks. One CTA per multiprocessor in the
// launch bounds, as the flash kernels: without it ptxas spilled 4 bytes at head dim 32 (sm_80).
template <typename T, int kHeadDim, int kNWarps, Scores kScores>
__global__ void __launch_bounds__(kNWarps * 32, 1) kvcache_fwd_kernel(const KvcacheFwdParams p) {
  constexpr int kThreads = kNWarps * 32;
  constexpr int kBlockN = kNWarps * kWarpKeys;
  constexpr int kBlocksPerChunk = kKvcacheChunkKeys / kBlockN;
  constexpr int kDT = kHeadDim / 8;
  constexpr int kLd = kHeadDim + 8;
  static_assert(kKvcacheChunkKeys % kBlockN == 0, "a chunk holds whole key tiles");
  const AttnFwdParams& a = p.attn;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kRows * kLd;          // two stages of kBlockN rows
  T* sV = sK + 2 * kBlockN * kLd;    // two stages of kBlockN rows
  DecodeStorage<kHeadDim, kBlockN>& st = *reinterpret_cast<DecodeStorage<kHeadDim, kBlockN>*>(sV + 2 * kBlockN * kLd);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;
  const int b = blockIdx.x / a.hkv, hk = blockIdx.x % a.hkv;
  const int row0 = blockIdx.y * kRows;
  const int n_rows = min(kRows, a.hq / a.hkv * a.sq - row0);
  const DecodeRows rows(p, b, hk, row0);
  const int len = min(max(p.seqlens[b], 0), p.capacity);
  const Visibility vis = visibility(a.window_left, a.window_right, false, a.sq, len);
  const int diagonal = len - a.sq;
  const int64_t stat_rows = static_cast<int64_t>(a.b) * a.hq * a.sq;

  // Key tiles [tile_begin, tile_end): those the window shows these rows, within this split's chunks.
  const int first_query = rows.query(0), queries = rows.query(n_rows - 1) - first_query + 1;
  // The splits share the row's own chunks (its length is read here), not the room's.
  const int n_chunks = kvcache_chunks(len);
  const int per_split = (n_chunks + p.splits - 1) / p.splits;
  const int chunk_begin = blockIdx.z * per_split, chunk_end = min(n_chunks, chunk_begin + per_split);
  const int tile_begin = max(key_block_begin(vis, first_query, kBlockN), chunk_begin * kBlocksPerChunk);
  const int tile_end = min(key_block_end(vis, first_query, queries, len, kBlockN), chunk_end * kBlocksPerChunk);
  const bool split = p.splits > 1;

  if (split) {  // chunks without a visited tile: lse -inf, which the combine skips
    for (int c = chunk_begin; c < chunk_end; ++c) {
      const bool visited = tile_begin < tile_end && c * kBlocksPerChunk < tile_end &&
                           (c + 1) * kBlocksPerChunk > tile_begin;
      if (!visited && tid < n_rows) p.part_lse[c * stat_rows + rows.out_row(a, tid)] = -INFINITY;
    }
  } else {
    for (int r = tid; r < kRows; r += kThreads) {
      start_fold(a.sinks != nullptr && r < n_rows ? a.sinks[rows.head(r)] : -INFINITY, st.fold.max[r],
                 st.fold.sum[r]);
    }
    for_each_element<kHeadDim, kThreads>(tid, [&](int r, int col) { st.fold.acc[r][col] = 0.f; });
  }

  const T* q = static_cast<const T*>(a.q) + b * a.q_stride_b;
  for_each_piece<kRows, kHeadDim, kThreads>(tid, [&](int r, int col) {
    const bool valid = r < n_rows && col < a.d;
    const T* src = valid ? q + rows.head(r) * a.q_stride_h + rows.query(r) * a.q_stride_s + col : q;
    cp_async_16(sQ + r * kLd + col, src, valid);
  });
  cp_async_commit();

  const T* k_head = static_cast<const T*>(a.k) + hk * a.k_stride_h;
  const T* v_head = static_cast<const T*>(a.v) + hk * a.v_stride_h;
  // The pages and slots of key tile n, into set n % 2.
  auto find_keys = [&](int n) {
    for (int r = tid; r < kBlockN; r += kThreads) {
      const int j = n * kBlockN + r;
      int page = -1, slot = 0;
      if (j < len) rows.find_key(p, j, page, slot);
      st.page[n & 1][r] = page;
      st.slot[n & 1][r] = slot;
    }
  };
  // Key tile n (its keys found) into stage `stage`; keys past the row's length become zeros, unread.
  auto load_kv = [&](int n, int stage) {
    T* k_tile = sK + stage * kBlockN * kLd;
    T* v_tile = sV + stage * kBlockN * kLd;
    for_each_piece<kBlockN, kHeadDim, kThreads>(tid, [&](int r, int col) {
      const int page = st.page[n & 1][r], slot = st.slot[n & 1][r];
      const bool valid = page >= 0 && col < a.d;
      const T* k_src = valid ? k_head + page * a.k_stride_b + slot * a.k_stride_s + col : k_head;
      const T* v_src = valid ? v_head + page * a.v_stride_b + slot * a.v_stride_s + col : v_head;
      cp_async_16(k_tile + r * kLd + col, k_src, valid);
      cp_async_16(v_tile + r * kLd + col, v_src, valid);
    });
    cp_async_commit();
  };

  // This thread's rows g and g + 8 of the warp's score tile.
  int query[2];
  float alibi_slope[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = g + 8 * hf;
    query[hf] = rows.query(r);
    alibi_slope[hf] = r < n_rows ? flash::alibi_slope_of(a, static_cast<int64_t>(b) * a.hq + rows.head(r)) : 0.f;
  }
  float acc_o[1][kDT][4];
  float row_max[2], row_sum[2];
  auto reset_warp_state = [&] {
    flash::zero(acc_o);
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
  };
  reset_warp_state();

  if (tile_begin < tile_end) {
    find_keys(tile_begin);
    if (tile_begin + 1 < tile_end) find_keys(tile_begin + 1);
    __syncthreads();
    load_kv(tile_begin, 0);
  }
  for (int n = tile_begin; n < tile_end; ++n) {
    const int stage = (n - tile_begin) & 1;
    if (n + 1 < tile_end) {
      load_kv(n + 1, stage ^ 1);
      cp_async_wait<1>();  // Q and tile n ready; tile n + 1 in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_warp = sK + (stage * kBlockN + warp * kWarpKeys) * kLd;
    const T* v_warp = sV + (stage * kBlockN + warp * kWarpKeys) * kLd;
    float s[1][2][4];
    flash::zero(s);
    flash::gemm_ss_nt<T, 1, 2, kHeadDim>(s, sQ, kLd, k_warp, kLd, lane);
    const int key0 = n * kBlockN + warp * kWarpKeys;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = -INFINITY;
#pragma unroll
      for (int ni = 0; ni < 2; ++ni) {
#pragma unroll
        for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
          const int key = key0 + ni * 8 + 2 * t + (e & 1);
          float cap_slope;
          float x = flash::score_of<kScores>(s[0][ni][e], a, diagonal, alibi_slope[hf], 0, query[hf], key, cap_slope);
          if (key >= len || !sees(vis, query[hf], key)) x = -INFINITY;
          s[0][ni][e] = x;
          mx = fmaxf(mx, x);
        }
      }
      flash::online_softmax_step(s[0], acc_o[0], hf, quad_max(mx), row_max[hf], row_sum[hf]);
    }
    uint32_t pa[1][1][4];
    flash::acc_to_a<T, 1, 2>(pa, s);
    flash::gemm_rs_nn<T, 1, kDT, 1>(acc_o, pa, v_warp, kLd, lane);
    if (n + 2 < tile_end) find_keys(n + 2);  // into tile n's set, whose loads are issued
    __syncthreads();  // every warp is done with this stage, which the next iteration refills

    if ((n + 1) % kBlocksPerChunk != 0 && n + 1 != tile_end) continue;
    // The chunk ends: merge the warps' states into st.chunk, in warp order.
    const int chunk = n / kBlocksPerChunk;
    for (int w = 0; w < kNWarps; ++w) {
      if (warp == w) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = g + 8 * hf;
          const float sum = quad_sum(row_sum[hf]);
          float merged_max = row_max[hf], merged_sum = sum, scale_old = 0.f, scale_new = 1.f;
          bool adds = true;
          if (w > 0) {
            merged_max = st.chunk.max[r];
            merged_sum = st.chunk.sum[r];
            adds = fold_scales(merged_max, merged_sum, row_max[hf], sum, scale_old, scale_new);
          }
#pragma unroll
          for (int di = 0; di < kDT; ++di) {
#pragma unroll
            for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
              float& merged = st.chunk.acc[r][di * 8 + 2 * t + (e & 1)];
              if (w == 0) {
                merged = acc_o[0][di][e];
              } else if (adds) {
                merged = fold_value(merged, scale_old, acc_o[0][di][e], scale_new);
              }
            }
          }
          __syncwarp();  // the quad has read the row's state
          if (t == 0) {
            st.chunk.max[r] = merged_max;
            st.chunk.sum[r] = merged_sum;
          }
        }
      }
      __syncthreads();
    }
    reset_warp_state();

    // The chunk's output, normalised, and lse: this split's partial, or folded into the rows.
    if (split) {
      float* part_out = p.part_out + chunk * stat_rows * a.d;
      for_each_element<kHeadDim, kThreads>(tid, [&](int r, int col) {
        if (r < n_rows && col < a.d) {
          part_out[rows.out_row(a, r) * a.d + col] = __fmul_rn(st.chunk.acc[r][col], inv_sum(st.chunk.sum[r]));
        }
      });
      if (tid < n_rows) {
        p.part_lse[chunk * stat_rows + rows.out_row(a, tid)] = row_lse(st.chunk.max[tid], st.chunk.sum[tid]);
      }
    } else {
      if (tid < kRows) {
        st.folds[tid] = fold_scales(st.fold.max[tid], st.fold.sum[tid], row_lse(st.chunk.max[tid], st.chunk.sum[tid]),
                                    1.f, st.scale_old[tid], st.scale_new[tid]);
      }
      __syncthreads();
      for_each_element<kHeadDim, kThreads>(tid, [&](int r, int col) {
        if (st.folds[r]) {
          const float value = __fmul_rn(st.chunk.acc[r][col], inv_sum(st.chunk.sum[r]));
          st.fold.acc[r][col] = fold_value(st.fold.acc[r][col], st.scale_old[r], value, st.scale_new[r]);
        }
      });
    }
    __syncthreads();  // st.chunk is free for the next chunk
  }

  cp_async_wait<0>();  // Q's copy, when no tile was visited
  if (split) return;
  __syncthreads();
  T* out = static_cast<T*>(a.out);
  for_each_element<kHeadDim, kThreads>(tid, [&](int r, int col) {
    if (r < n_rows && col < a.d) {
      out[rows.out_row(a, r) * a.d + col] = from_float<T>(__fmul_rn(st.fold.acc[r][col], inv_sum(st.fold.sum[r])));
    }
  });
  if (tid < n_rows) a.lse[rows.out_row(a, tid)] = row_lse(st.fold.max[tid], st.fold.sum[tid]);
}

// Out and lse from the partials of every chunk of a row, folded in chunk order from the head's
// sink exactly as kvcache_fwd_kernel folds them with one split. Grid
// (ceil(B * Hq * Sq / kCombineWarps)): one warp per row (b * Hq + h) * Sq + i, each lane owning
// columns lane + 32 c.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kCombineWarps * 32) kvcache_combine_kernel(const KvcacheFwdParams p) {
  constexpr int kCols = (kHeadDim + 31) / 32;
  const AttnFwdParams& a = p.attn;
  const int64_t stat_rows = static_cast<int64_t>(a.b) * a.hq * a.sq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= stat_rows) return;
  const int len = min(max(p.seqlens[row / (static_cast<int64_t>(a.hq) * a.sq)], 0), p.capacity);
  float max, sum, acc[kCols];
  start_fold(a.sinks != nullptr ? a.sinks[(row / a.sq) % a.hq] : -INFINITY, max, sum);
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
  const int n_chunks = kvcache_chunks(len);  // the chunks the splits wrote
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    const int64_t part = chunk * stat_rows + row;
    float scale_old, scale_new;
    if (!fold_scales(max, sum, p.part_lse[part], 1.f, scale_old, scale_new)) continue;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = lane + 32 * c;
      if (col < a.d) acc[c] = fold_value(acc[c], scale_old, p.part_out[part * a.d + col], scale_new);
    }
  }
  T* out = static_cast<T*>(a.out) + row * a.d;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int col = lane + 32 * c;
    if (col < a.d) out[col] = from_float<T>(__fmul_rn(acc[c], inv_sum(sum)));
  }
  if (lane == 0) a.lse[row] = row_lse(max, sum);
}

int row_blocks(const AttnFwdParams& a) { return (a.hq / a.hkv * a.sq + kRows - 1) / kRows; }

template <typename T, int kHeadDim>
cudaError_t run_kvcache(const KvcacheFwdParams& p, cudaStream_t stream) {
  using C = KvcacheConfig<kHeadDim>;
  const AttnFwdParams& a = p.attn;
  return FA_BOOL_SWITCH(a.softcap > 0.f, kCapped, [&] {
    constexpr Scores kScores = kCapped ? Scores::kCapped : Scores::kPlain;
    const dim3 grid(a.b * a.hkv, row_blocks(a), p.splits);
    cudaError_t err = flash::launch(kvcache_fwd_kernel<T, kHeadDim, C::kNWarps, kScores>, grid, C::kNWarps * 32,
                                    smem_bytes<T, kHeadDim>(), stream, p);
    if (err != cudaSuccess || p.splits == 1) return err;
    const int64_t stat_rows = static_cast<int64_t>(a.b) * a.hq * a.sq;
    return flash::launch(kvcache_combine_kernel<T, kHeadDim>, dim3((stat_rows + kCombineWarps - 1) / kCombineWarps),
                         kCombineWarps * 32, 0, stream, p);
  });
}

template <typename T>
cudaError_t kvcache_typed(const KvcacheFwdParams& p, cudaStream_t stream) {
  return FA_HEADDIM_SWITCH(p.attn.d, kHeadDim, [&] { return run_kvcache<T, kHeadDim>(p, stream); });
}

}  // namespace decode

int kvcache_splits(const KvcacheFwdParams& p, int sms) {
  const AttnFwdParams& a = p.attn;
  if (a.hkv == 0) return 1;
  const int64_t ctas = static_cast<int64_t>(a.b) * a.hkv * decode::row_blocks(a);
  const int chunks = kvcache_chunks(p.capacity);
  if (ctas == 0 || ctas >= sms || chunks <= 1) return 1;
  const int64_t wanted = std::min<int64_t>(chunks, (decode::kCtasPerSm * sms + ctas - 1) / ctas);
  const int64_t per_split = (chunks + wanted - 1) / wanted;
  return static_cast<int>((chunks + per_split - 1) / per_split);
}

cudaError_t attn_fwd_kvcache(const KvcacheFwdParams& p, cudaStream_t stream) {
  const AttnFwdParams& a = p.attn;
  if (a.d > kMaxHeadDimFwd || a.d % 8 != 0 || !(a.scale > 0.f) || a.hkv <= 0 || a.hq % a.hkv != 0 ||
      p.capacity < 0 || p.splits < 1 || (p.block_table != nullptr && p.max_blocks > 0 && p.block_size <= 0) ||
      (p.splits > 1 && (p.part_out == nullptr || p.part_lse == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (a.b == 0 || a.hq == 0 || a.sq == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat16:
      return decode::kvcache_typed<__half>(p, stream);
    case DType::kBFloat16:
      return decode::kvcache_typed<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastattn

// Plain parameter structs shared by the torch-facing bindings (attention_cpu.cpp) and the
// per-ISA kernel translation units. No torch headers here: the AVX-512 unit is compiled with
// a different target and must not instantiate any torch inline code.
#pragma once
#include <cstdint>

namespace fastattn {
namespace cpu {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kBool = 3 };

// Largest head dim (of q/k and of v) the kernels take. Tiles are sized per call, so this is
// the range the tests cover (32 to 256), not a buffer size.
constexpr int64_t kMaxHeadDim = 256;

// A (B, H, R, C) mask view; ptr == nullptr means "no mask". Strides are in elements.
struct MaskView {
  const void* ptr = nullptr;
  int dtype = kBool;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
};

// Which keys each query sees: query i sees key j iff i' - left <= j <= i' + right, with
// i' = i + Sk - Sq (bottom-right) or i' = i (top_left); a negative side is unbounded.
struct WindowParams {
  int64_t left = -1, right = -1;
  bool top_left = false;
};

// A 4-d tensor view with a contiguous last dim (strides in elements).
struct View4 {
  const void* ptr = nullptr;
  int64_t sb = 0, sh = 0, ss = 0;
};

struct AttnFwdParams {
  View4 q, k, v;
  int dtype = kF32;
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, Dv = 0;
  MaskView mask;
  float scale = 1.f;
  WindowParams window;
  float softcap = 0.f;  // > 0: scores become softcap * tanh(score / softcap) before the mask
  // KV cache: with seqlens_k, batch b has seqlens_k[b] <= Sk keys (the window aligned
  // bottom-right per batch); with block_table, k and v are pages (num_blocks, Hkv, block_size, D) and key j of
  // batch b is row j % block_size of page block_table[b * max_blocks + j / block_size]
  // (k.sb / v.sb: the page stride; Sk = max_blocks * block_size).
  const int32_t* seqlens_k = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_size = 0, max_blocks = 0;
  void* out = nullptr;  // contiguous (B, Hq, Sq, Dv), dtype
  float* lse = nullptr;  // contiguous (B, Hq, Sq): row_max + log(row_sum)
  // The softmax statistics the backward recomputes P from, kept apart because an fp32 lse
  // rounds away the row sum when |lse| is large: contiguous (B, Hq, Sq) each.
  float* row_max = nullptr;  // the largest score of the row (natural units, as torch sees it)
  float* row_sum = nullptr;  // sum over keys of exp(score - row_max)
  // Keys split into nsplit ranges of key blocks (work items per query block, or per (batch,
  // kv head) in the few-query kernel); with nsplit > 1 each writes its normalised fp32
  // output and statistics here (contiguous (nsplit, B, Hq, Sq, Dv) and (nsplit, B, Hq, Sq))
  // instead of out, lse, row_max and row_sum, for the caller to merge.
  int64_t nsplit = 1;
  float* out_partial = nullptr;
  float* row_max_partial = nullptr;
  float* row_sum_partial = nullptr;
};

struct AttnBwdParams {
  View4 q, k, v, out, dout;
  const float* row_max = nullptr;  // the forward's statistics, contiguous (B, Hq, Sq) each
  const float* row_sum = nullptr;
  int dtype = kF32;
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, Dv = 0;
  MaskView mask;
  float scale = 1.f;
  WindowParams window;
  float softcap = 0.f;
  int64_t nchunks = 1;  // key-block chunks per (batch, kv head); > 1 writes dq_partial
  void* dq = nullptr;   // contiguous (B, Hq, Sq, D), dtype (used when nchunks == 1)
  float* dq_partial = nullptr;  // contiguous (nchunks, B, Hq, Sq, D) fp32, unscaled
  void* dk = nullptr;   // contiguous (B, Hkv, Sk, D), dtype
  void* dv = nullptr;   // contiguous (B, Hkv, Sk, Dv), dtype
  float* dmask = nullptr;  // contiguous (B, Hq, Sq, Sk) fp32, zero-filled, or nullptr
};

struct SoftmaxFwdParams {
  View4 x;
  int dtype = kF32;
  int64_t B = 0, H = 0, R = 0, C = 0;
  MaskView mask;
  float scale = 1.f;
  WindowParams window;  // over the (R, C) = (queries, keys) dims
  void* y = nullptr;  // contiguous (B, H, R, C), dtype
};

struct SoftmaxBwdParams {
  View4 gy, y;
  int dtype = kF32;
  int64_t B = 0, H = 0, R = 0, C = 0;
  void* gx = nullptr;  // contiguous (B, H, R, C), dtype
};

// One instruction-set variant of every kernel. Work is split into items; a call handles
// items begin, begin + stride, begin + 2 * stride, ... < end (round-robin keeps causal work
// balanced across threads).
struct KernelTable {
  const char* name;
  int64_t fwd_block_q;  // most queries per forward work item
  int64_t fwd_block_k;  // keys per forward block
  int64_t rows_block_k;  // keys per tile of the few-query forward
  int64_t bwd_block_k;  // keys per backward block
  void (*attn_fwd)(const AttnFwdParams&, int64_t begin, int64_t end, int64_t stride);
  // Few queries (decode): items are (batch, kv head), all query heads of the group at once.
  void (*attn_fwd_rows)(const AttnFwdParams&, int64_t begin, int64_t end, int64_t stride);
  void (*attn_bwd)(const AttnBwdParams&, int64_t begin, int64_t end, int64_t stride);
  void (*softmax_fwd)(const SoftmaxFwdParams&, int64_t row_begin, int64_t row_end);
  void (*softmax_bwd)(const SoftmaxBwdParams&, int64_t row_begin, int64_t row_end);
  // Runs `iterations` of a register-resident FMA loop on this thread; returns its FLOPs.
  int64_t (*fma_peak)(int64_t iterations);
};

// nullptr where the variant was not compiled (other architecture or compiler).
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_generic();

// The FMA loop of the selected variant on every thread at once, `iterations` each; returns
// the FLOPs done (the benchmark times it for the machine's peak FMA rate).
int64_t fma_peak_all_threads(int64_t iterations);

}  // namespace cpu
}  // namespace fastattn

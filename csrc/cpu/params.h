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

// Dropout of the attention probabilities (csrc/philox.h): score (b, h, i, j) of sequence b,
// query head h, query i and key j (both within the sequence) is kept iff word j % 4 of
// Philox(counter (j / 4, i, b * Hq + h, offset), key seed) is >= threshold, and a kept
// probability is multiplied by keep_scale. p == 0: no dropout.
struct DropoutParams {
  float p = 0.f;
  uint64_t seed = 0;
  uint32_t offset = 0;
  uint32_t threshold = 0;  // floor(p * 2^32), at most 2^32 - 1 (p = 1 keeps nothing: keep_scale 0)
  float keep_scale = 1.f;  // 1 / (1 - p), 0 for p = 1
};

// A 4-d tensor view with a contiguous last dim (strides in elements).
struct View4 {
  const void* ptr = nullptr;
  int64_t sb = 0, sh = 0, ss = 0;
};

// Row numbering of a contiguous output whose rows run along its last dim: row (b, h, i),
// query or key i of sequence b, is b * sb + h * sh + (start_b + i) * ss.
struct RowIndex {
  int64_t sb = 0, sh = 0, ss = 0;
};

// Where each sequence of a call lives (flash-attention's BlockInfo), read by the kernels only
// through SeqInfo (kernels.h). Padded batches: sequence b is batch b, its queries and keys
// start at row 0 and number Sq and Sk (or seqlens_k[b] keys). Packed (varlen) batches: the
// views' batch strides are 0 and sequence b's queries are rows [cu_seqlens_q[b],
// cu_seqlens_q[b + 1]) of q (likewise keys); Sq and Sk are the longest lengths.
struct SeqLayout {
  const int32_t* cu_seqlens_q = nullptr;  // (B + 1) int32, or nullptr
  const int32_t* cu_seqlens_k = nullptr;
  // KV cache: with seqlens_k, batch b has seqlens_k[b] <= Sk keys (the window aligned
  // bottom-right per batch); with block_table, k and v are pages (num_blocks, Hkv, block_size, D) and key j of
  // batch b is row j % block_size of page block_table[b * max_blocks + j / block_size]
  // (k.sb / v.sb: the page stride; Sk = max_blocks * block_size).
  const int32_t* seqlens_k = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_size = 0, max_blocks = 0;
  RowIndex query_rows;  // rows of the query-shaped outputs (out, dq; last dim Dv or D)
  RowIndex stat_rows;   // entries of lse and the softmax statistics
  RowIndex key_rows;    // rows of dk and dv
  int64_t rows = 0;     // (head, query) rows in all: the spacing of split partials
};

// Phases of the forward kernel whose time can be measured (AttnFwdParams::phase_ns): packing Q,
// K and V (and reading the mask), S = Q K^T, the softmax of S (cap, ALiBi, mask, online
// max/exp/sum, rescaling O, dropout), O += P V, and normalising and storing O and the statistics.
enum FwdPhase : int { kPhasePack, kPhaseScores, kPhaseSoftmax, kPhaseValues, kPhaseStore, kFwdPhases };
constexpr const char* kFwdPhaseNames[kFwdPhases] = {"pack", "scores", "softmax", "values", "store"};
// Phases of the backward kernel (AttnBwdParams::phase_ns): packing Q, dO, O, delta, K and V
// (and reading the mask), recomputing S = Q K^T and dP = dO V^T, the element-wise step from
// them to P and dS (cap, ALiBi, mask, dropout, dmask), the products dV += P^T dO,
// dK += dS^T Q and dQ += dS K, and storing dq, dk and dv.
enum BwdPhase : int { kBwdPack, kBwdRecompute, kBwdSoftmax, kBwdProducts, kBwdStore, kBwdPhases };
constexpr const char* kBwdPhaseNames[kBwdPhases] = {"pack", "recompute", "softmax", "products", "store"};

struct AttnFwdParams {
  View4 q, k, v;
  int dtype = kF32;
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, Dv = 0;
  MaskView mask;
  float scale = 1.f;
  WindowParams window;
  float softcap = 0.f;  // > 0: scores become softcap * tanh(score / softcap) before the mask
  // (Hq) fp32, or nullptr: one logit per query head that joins each row's softmax sum with no
  // value (attention sinks); lse and the statistics include it.
  const float* sinks = nullptr;
  // (B, Hq) fp32, or nullptr: ALiBi adds -alibi_slopes[b * Hq + h] * |i' - j| to score (i, j)
  // of sequence b and query head h after the cap, before the mask (i' as in WindowParams).
  const float* alibi_slopes = nullptr;
  DropoutParams dropout;  // applied after the softmax statistics: they and lse stay undropped
  SeqLayout seqs;
  void* out = nullptr;  // contiguous, rows numbered by seqs.query_rows, dtype
  float* lse = nullptr;  // row_max + log(row_sum), numbered by seqs.stat_rows
  // The softmax statistics the backward recomputes P from, kept apart because an fp32 lse
  // rounds away the row sum when |lse| is large: numbered by seqs.stat_rows.
  // A reference max of the row (natural units, as torch sees it): its largest score, or a score
  // at most kRescaleMargin (kernels.h) below it.
  float* row_max = nullptr;
  float* row_sum = nullptr;  // sum over keys of exp(score - row_max)
  // Keys split into nsplit ranges of key blocks (work items per query block, or per (batch,
  // kv head) in the few-query kernel); with nsplit > 1 split c writes its normalised fp32
  // output row and statistics at c * seqs.rows + the statistics' number (contiguous
  // (nsplit, seqs.rows, Dv) and (nsplit, seqs.rows)) instead of out, lse, row_max and row_sum,
  // for the caller to merge.
  int64_t nsplit = 1;
  // The query-lane kernel's items go round-robin over the threads, except with
  // threads_own_kv_heads: each thread then takes whole (batch, kv head)s, whose K and V it
  // packs once instead of every thread packing every head, and walks their keys chunk by
  // chunk for all its query blocks (set when the heads divide evenly among the threads and
  // cost the same: padded batches, no key split).
  bool threads_own_kv_heads = false;
  float* out_partial = nullptr;
  float* row_max_partial = nullptr;
  float* row_sum_partial = nullptr;
  // kFwdPhases nanosecond totals over all threads, or nullptr (no timing): the benchmark's
  // breakdown of where the forward's time goes (fastattn._C.cpu_forward_phases).
  int64_t* phase_ns = nullptr;
};

struct AttnBwdParams {
  View4 q, k, v, out, dout;
  const float* row_max = nullptr;  // the forward's statistics, numbered by seqs.stat_rows
  const float* row_sum = nullptr;
  int dtype = kF32;
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, Dv = 0;
  MaskView mask;
  float scale = 1.f;
  WindowParams window;
  float softcap = 0.f;
  const float* alibi_slopes = nullptr;  // the forward's
  DropoutParams dropout;  // the forward's, regenerated
  SeqLayout seqs;  // sequences (padded or packed; no KV cache) and output numbering
  int64_t nchunks = 1;  // key-block chunks per (batch, kv head); > 1 writes dq_partial
  void* dq = nullptr;   // contiguous, rows numbered by seqs.query_rows, dtype (nchunks == 1)
  float* dq_partial = nullptr;  // contiguous (nchunks, seqs.rows, D) fp32, unscaled
  void* dk = nullptr;   // contiguous, rows numbered by seqs.key_rows, dtype
  void* dv = nullptr;
  float* dmask = nullptr;  // contiguous (B, Hq, Sq, Sk) fp32, zero-filled, or nullptr
  int64_t* phase_ns = nullptr;  // kBwdPhases nanosecond totals over all threads, or nullptr
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
  // Runs the kernels' tile GEMM on one L1-resident 64^3 tile `iterations` times; its FLOPs.
  int64_t (*tile_gemm_peak)(int64_t iterations);
};

// nullptr where the variant was not compiled (other architecture or compiler).
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_generic();

// The FMA loop of the selected variant on every thread at once, `iterations` each; returns
// the FLOPs done (the benchmark times it for the machine's peak FMA rate).
int64_t fma_peak_all_threads(int64_t iterations);
// The same for the L1-resident tile GEMM (the ceiling of the kernels' GEMM phases).
int64_t tile_gemm_peak_all_threads(int64_t iterations);
// The name of the variant the kernels run now ("avx512", "avx2" or "generic").
const char* kernel_isa();

}  // namespace cpu
}  // namespace fastattn

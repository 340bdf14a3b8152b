// CPU implementations of the fastattn operators: raw-input checks, output allocation,
// instruction-set selection and threading. The kernels themselves are in kernels.h, compiled
// per instruction set (kernels_<isa>.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "../philox.h"
#include "params.h"

namespace fastattn {
namespace cpu {
namespace {

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The fastest variant this CPU runs; FASTATTN_CPU_ISA=avx512|avx2|generic forces one (for
// tests and comparisons).
const KernelTable& kernels() {
  static const KernelTable* best = [] {
    if (kernels_avx512() && cpu_has_avx512()) return kernels_avx512();
    if (kernels_avx2() && cpu_has_avx2()) return kernels_avx2();
    return kernels_generic();
  }();
  const char* forced = std::getenv("FASTATTN_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return *best;
  const std::string name(forced);
  const KernelTable* table = nullptr;
  if (name == "avx512") table = cpu_has_avx512() ? kernels_avx512() : nullptr;
  else if (name == "avx2") table = cpu_has_avx2() ? kernels_avx2() : nullptr;
  else if (name == "generic") table = kernels_generic();
  TORCH_CHECK(table != nullptr, "FASTATTN_CPU_ISA=", name,
              " is not available here (choose avx512, avx2 or generic, as the CPU supports)");
  return *table;
}

// A kernel's output: at::empty, and where the buffer is large, its whole 2 MiB pages marked for
// transparent huge pages. An output is often fresh memory, so the kernel's first write to each
// 4 KiB page faults; a huge page faults once for 512 of them. One thread, AVX-512 Xeon, the
// backward's dq, dk and dv at (4, 12, 512, 64): 4300-4600 faults a call before, ~1500 after
// (the buffers' unaligned ends), the backward 3-6% faster. The OS still decides (THP
// "madvise" or "always"; "never" ignores the advice).
static at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: failure is harmless
#endif
  return t;
}

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_input(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-d, got shape ", t.sizes());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a contiguous last dim");
}

View4 view4(const at::Tensor& t) {
  View4 v;
  v.ptr = t.data_ptr();
  v.sb = t.stride(0);
  v.sh = t.stride(1);
  v.ss = t.stride(2);
  return v;
}

// mask: bool or additive (q's dtype or float32) already expanded to `shape`.
MaskView mask_view(const std::optional<at::Tensor>& mask, at::IntArrayRef shape, at::ScalarType dtype) {
  MaskView m;
  if (!mask.has_value()) return m;
  const at::Tensor& t = *mask;
  TORCH_CHECK(t.device().is_cpu(), "mask must be a CPU tensor");
  TORCH_CHECK(t.sizes() == shape, "mask must be expanded to ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kBool || t.scalar_type() == dtype || t.scalar_type() == at::kFloat,
              "mask must be bool, float32 or ", dtype, ", got ", t.scalar_type());
  m.ptr = t.data_ptr();
  m.dtype = t.scalar_type() == at::kBool ? kBool : dtype_code(t, "mask");
  m.sb = t.stride(0);
  m.sh = t.stride(1);
  m.sq = t.stride(2);
  m.sk = t.stride(3);
  return m;
}

WindowParams window_params(int64_t left, int64_t right, bool top_left) {
  WindowParams w;
  w.left = left, w.right = right, w.top_left = top_left;
  return w;
}

void check_softcap(double softcap) {
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: no cap), got ", softcap);
}

// dropout_p in [0, 1] and, when it is > 0, rng_state: an int64 CPU tensor (seed, offset).
DropoutParams dropout_params(double dropout_p, const std::optional<at::Tensor>& rng_state) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p must be in [0, 1], got ", dropout_p);
  DropoutParams d;
  if (dropout_p == 0.0) return d;
  TORCH_CHECK_VALUE(rng_state.has_value(), "rng_state must be given when dropout_p > 0 (an int64 tensor (seed, "
                    "offset)), got None with dropout_p=", dropout_p);
  const at::Tensor& state = *rng_state;
  TORCH_CHECK_VALUE(state.device().is_cpu() && state.scalar_type() == at::kLong && state.numel() == 2,
                    "rng_state must be an int64 CPU tensor of 2 elements (seed, offset), got ", state.scalar_type(),
                    " ", state.sizes(), " on ", state.device());
  const at::Tensor seed_offset = state.contiguous();
  d.p = float(dropout_p);
  d.seed = uint64_t(seed_offset.data_ptr<int64_t>()[0]);
  d.offset = uint32_t(seed_offset.data_ptr<int64_t>()[1]);
  d.threshold = uint32_t(std::min<uint64_t>(philox::drop_threshold(dropout_p), UINT32_MAX));
  d.keep_scale = dropout_p < 1.0 ? float(1.0 / (1.0 - dropout_p)) : 0.f;
  return d;
}

// Threads that run_items spreads n items over.
int64_t item_workers(int64_t n) { return std::min<int64_t>(at::get_num_threads(), n); }

// Runs items [0, n) round-robin over the intra-op threads.
template <class F>
void run_items(int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t workers = item_workers(n);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t, n, workers);
  });
}

// The forward's softmax statistics, stacked in one (2, B, Hq, Sq) float32 output: [0] the
// row max of the scores, [1] the row sum of exp(score - row max).
constexpr int64_t kSoftmaxStats = 2;

// Up to this many queries per head the forward takes the row-wise (decode) kernel: the
// query-lane layout would leave many vector lanes empty (fp32, 2 threads, 2000 keys: 17..32
// queries run 1.1-1.6x faster row-wise, 48 no longer).
constexpr int64_t kFewQueries = 32;

struct AttnShapes {
  int64_t B, Hq, Hkv, Sq, Sk, D, Dv;
};

// q, k and v as `dims`-d CPU tensors of one supported dtype (padded: 4-d, packed: 3-d).
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims) {
  check_input(q, "q", dims);
  check_input(k, "k", dims);
  check_input(v, "v", dims);
  dtype_code(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
}

// The head dims: k's equal to q's D, both D and Dv (v's) non-empty and within the kernels' limit.
void check_head_dims(int64_t D, int64_t k_head_dim, int64_t Dv) {
  TORCH_CHECK(k_head_dim == D && D > 0, "k must have q's head dim ", D, ", got ", k_head_dim);
  TORCH_CHECK(Dv > 0, "v must have a non-empty head dim");
  TORCH_CHECK(D <= kMaxHeadDim && Dv <= kMaxHeadDim, "the cpu kernels take head dims up to ",
              kMaxHeadDim, ", got ", D, " (q, k) and ", Dv, " (v)");
}

AttnShapes check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  double softcap) {
  check_qkv(q, k, v, 4);
  AttnShapes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, "q, k and v must have the same batch size");
  TORCH_CHECK(v.size(1) == s.Hkv && s.Hkv > 0 && s.Hq % s.Hkv == 0,
              "k and v must have the same number of heads, dividing q's; got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(v.size(2) == s.Sk, "k and v must have the same sequence length");
  check_head_dims(s.D, k.size(3), s.Dv);
  check_softcap(softcap);
  return s;
}

// Output numbering of padded calls: query rows and statistics (B, Hq, Sq), key rows (B, Hkv, Sk).
SeqLayout padded_layout(const AttnShapes& s) {
  SeqLayout L;
  L.query_rows = {s.Hq * s.Sq, s.Sq, 1};
  L.stat_rows = L.query_rows;
  L.key_rows = {s.Hkv * s.Sk, s.Sk, 1};
  L.rows = s.B * s.Hq * s.Sq;
  return L;
}

// The fields the forward and backward parameter structs share: inputs, shapes, mask, window,
// score modifiers, dropout, and the padded sequence layout (packed calls replace it).
template <class Params>
void set_attention_inputs(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const AttnShapes& s, const std::optional<at::Tensor>& mask, double scale,
                          const WindowParams& window, double softcap, const DropoutParams& dropout) {
  p.q = view4(q);
  p.k = view4(k);
  p.v = view4(v);
  p.dtype = dtype_code(q, "q");
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Sq = s.Sq, p.Sk = s.Sk, p.D = s.D, p.Dv = s.Dv;
  p.mask = mask_view(mask, {s.B, s.Hq, s.Sq, s.Sk}, q.scalar_type());
  p.scale = float(scale);
  p.window = window;
  p.softcap = float(softcap);
  p.dropout = dropout;
  p.seqs = padded_layout(s);
}

// The sinks argument (float32 (Hq,) contiguous, or none) into p.sinks. Returns them viewed
// to broadcast over the statistics' shape, whose dim `head_dim` of `stat_dims` is the head
// (for merge_splits), or an undefined tensor without sinks.
at::Tensor set_sinks(AttnFwdParams& p, const std::optional<at::Tensor>& sinks, int64_t head_dim, int64_t stat_dims) {
  if (!sinks.has_value()) return {};
  const at::Tensor& t = *sinks;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == p.Hq &&
                  t.is_contiguous(),
              "sinks must be a contiguous float32 CPU tensor of shape (", p.Hq, "), got ", t.scalar_type(), " ",
              t.sizes());
  p.sinks = t.data_ptr<float>();
  std::vector<int64_t> shape(stat_dims, 1);
  shape[head_dim] = p.Hq;
  return t.view(shape);
}

// The alibi_slopes argument (float32 (B, Hq) contiguous, or none) as the kernels' pointer.
const float* alibi_slopes_ptr(const std::optional<at::Tensor>& slopes, int64_t B, int64_t Hq) {
  if (!slopes.has_value()) return nullptr;
  const at::Tensor& t = *slopes;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == B &&
                  t.size(1) == Hq && t.is_contiguous(),
              "alibi_slopes must be a contiguous float32 CPU tensor of shape (", B, ", ", Hq, "), got ",
              t.scalar_type(), " ", t.sizes());
  return t.data_ptr<float>();
}

// Merges the key splits' normalised partial outputs (nsplit, rows..., Dv) and statistics
// (2, nsplit, rows...) in a fixed order: split c weighs row_sum_c * exp(row_max_c - row_max),
// a sink (sink_rows, broadcast over the rows; undefined: none) exp(sink - row_max). `out` is
// the output seen in the order of the statistics.
void merge_splits(const at::Tensor& out_partial, const at::Tensor& stats_partial, const at::Tensor& sink_rows,
                  at::Tensor& out, at::Tensor& lse, at::Tensor& stats) {
  const at::Tensor max_c = stats_partial[0], sum_c = stats_partial[1];
  at::Tensor row_max = max_c.amax(0);
  if (sink_rows.defined()) row_max = at::maximum(row_max, sink_rows);
  // Rows no split saw (row_max -inf) take weights exp(-inf) = 0 rather than NaN.
  const at::Tensor shift = row_max.masked_fill(row_max.isneginf(), 0.0);
  const at::Tensor weight = (max_c - shift).exp_().mul_(sum_c);
  at::Tensor row_sum = weight.sum(0);
  if (sink_rows.defined()) row_sum.add_((sink_rows - shift).exp_());
  const at::Tensor divisor = row_sum.masked_fill(row_sum == 0, 1.0);
  out.copy_((out_partial * weight.unsqueeze(-1)).sum(0).div_(divisor.unsqueeze(-1)));
  stats.select(0, 0).copy_(row_max);
  stats.select(0, 1).copy_(row_sum);
  lse.copy_(row_max + row_sum.log());
}

// Runs the forward kernels on filled-in inputs `p` (shapes, views, mask, rule, sequence
// layout, sinks) into lse, the softmax statistics (2, lse's shape) and the output, given here
// in the order of the statistics (lse's shape, Dv). sink_rows: set_sinks' view.
void run_forward(AttnFwdParams& p, at::Tensor out, at::Tensor lse, at::Tensor stats, const at::Tensor& sink_rows) {
  if (out.numel() == 0 && lse.numel() == 0) return;
  if (p.Sk == 0) {  // no keys: every row sees nothing but its sink, if any
    out.zero_();
    if (sink_rows.defined()) {
      lse.copy_(sink_rows.expand_as(lse));
      stats.select(0, 0).copy_(lse);
      stats.select(0, 1).fill_(1.0);
    } else {
      lse.fill_(-std::numeric_limits<float>::infinity());
      stats.select(0, 0).fill_(-std::numeric_limits<float>::infinity());
      stats.select(0, 1).zero_();
    }
    return;
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.row_max = stats[0].data_ptr<float>();
  p.row_sum = stats[1].data_ptr<float>();
  const KernelTable& kt = kernels();
  // Few queries (decode): vectorise along keys, items (batch, kv head, key split); else
  // queries in vector lanes, items (batch, query head, query block, key split).
  const bool few = p.Sq <= kFewQueries;
  const int64_t items = few ? p.B * p.Hkv : p.B * p.Hq * ((p.Sq + kt.fwd_block_q - 1) / kt.fwd_block_q);
  const int64_t block_k = few ? kt.rows_block_k : kt.fwd_block_k;
  // With fewer items than twice the threads, keys are split too (at least two blocks per
  // split); the partial outputs are merged by their softmax statistics in a fixed order (merge_splits).
  const int64_t blocks = (p.Sk + block_k - 1) / block_k;
  const int64_t threads = at::get_num_threads();
  p.nsplit = items >= 2 * threads ? 1
                                  : std::max<int64_t>(1, std::min<int64_t>(blocks / 2, (2 * threads + items - 1) / items));
  at::Tensor out_partial, stats_partial;
  if (p.nsplit > 1) {
    std::vector<int64_t> rows{p.nsplit};
    rows.insert(rows.end(), lse.sizes().begin(), lse.sizes().end());
    std::vector<int64_t> out_shape(rows), stats_shape{kSoftmaxStats};
    out_shape.push_back(p.Dv);
    stats_shape.insert(stats_shape.end(), rows.begin(), rows.end());
    out_partial = at::empty(out_shape, lse.options());
    stats_partial = at::empty(stats_shape, lse.options());
    p.out_partial = out_partial.data_ptr<float>();
    p.row_max_partial = stats_partial[0].data_ptr<float>();
    p.row_sum_partial = stats_partial[1].data_ptr<float>();
  }
  p.threads_own_kv_heads = !few && p.nsplit == 1 && !p.seqs.cu_seqlens_q && !p.seqs.seqlens_k &&
                           (p.B * p.Hkv) % item_workers(items * p.nsplit) == 0;
  const auto kernel = few ? kt.attn_fwd_rows : kt.attn_fwd;
  run_items(items * p.nsplit, [&](int64_t t, int64_t n, int64_t stride) { kernel(p, t, n, stride); });
  if (p.nsplit > 1) merge_splits(out_partial, stats_partial, sink_rows, out, lse, stats);
}

// out (B, Hq, Sq, Dv), lse (B, Hq, Sq) and statistics (2, B, Hq, Sq) of a padded call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_padded_forward(AttnFwdParams& p, const at::TensorOptions& options,
                                                                  const std::optional<at::Tensor>& sinks) {
  const at::Tensor sink_rows = set_sinks(p, sinks, /*head_dim=*/1, /*stat_dims=*/3);
  at::Tensor out = empty_output({p.B, p.Hq, p.Sq, p.Dv}, options);
  at::Tensor lse = at::empty({p.B, p.Hq, p.Sq}, options.dtype(at::kFloat));
  at::Tensor stats = at::empty({kSoftmaxStats, p.B, p.Hq, p.Sq}, options.dtype(at::kFloat));
  run_forward(p, out, lse, stats, sink_rows);
  return {out, lse, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const std::optional<at::Tensor>& mask,
                                                            double scale, int64_t window_left,
                                                            int64_t window_right, bool window_top_left,
                                                            double softcap, double dropout_p,
                                                            const std::optional<at::Tensor>& rng_state,
                                                            const std::optional<at::Tensor>& sinks,
                                                            const std::optional<at::Tensor>& alibi_slopes) {
  const AttnShapes s = check_attention_inputs(q, k, v, softcap);
  AttnFwdParams p;
  set_attention_inputs(p, q, k, v, s, mask, scale, window_params(window_left, window_right, window_top_left),
                       softcap, dropout_params(dropout_p, rng_state));
  p.alibi_slopes = alibi_slopes_ptr(alibi_slopes, s.B, s.Hq);
  return run_padded_forward(p, q.options(), sinks);
}

// Attention of q (B, Hq, Sq, D) against a KV cache: contiguous (B, Hkv, S_max, D) or, with
// block_table (B, max_blocks) int32, pages (num_blocks, Hkv, block_size, D); batch b sees its
// first cache_seqlens[b] keys (int32 (B,), each <= the room of a row; the window aligned
// bottom-right per batch). Forward only.
std::tuple<at::Tensor, at::Tensor> attn_fwd_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                        const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                        const std::optional<at::Tensor>& block_table,
                                                        double scale, int64_t window_left, int64_t window_right,
                                                        double softcap, const std::optional<at::Tensor>& sinks,
                                                        const std::optional<at::Tensor>& alibi_slopes) {
  check_input(q, "q", 4);
  check_input(k_cache, "k_cache", 4);
  check_input(v_cache, "v_cache", 4);
  check_softcap(softcap);
  const int64_t B = q.size(0), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3) && k_cache.size(3) == q.size(3),
              "k_cache must be (.., Hkv, S, D) with q's head dim and v_cache must match it in its first three dims");
  TORCH_CHECK(Hkv > 0 && q.size(1) % Hkv == 0, "the cache's kv heads must divide q's heads");
  TORCH_CHECK(cache_seqlens.device().is_cpu() && cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == B && cache_seqlens.is_contiguous(),
              "cache_seqlens must be a contiguous int32 CPU tensor of shape (", B, ")");
  const int32_t* pages = nullptr;
  int64_t room = k_cache.size(2), max_blocks = 0;
  if (block_table.has_value()) {
    const at::Tensor& table = *block_table;
    TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == B &&
                    table.is_contiguous(),
                "block_table must be a contiguous int32 CPU tensor of shape (", B, ", max_blocks)");
    pages = table.data_ptr<int32_t>();
    max_blocks = table.size(1);
    room = k_cache.size(2) * max_blocks;
    if (table.numel()) {
      const auto [lowest, highest] = at::aminmax(table);
      TORCH_CHECK(lowest.item<int32_t>() >= 0 && highest.item<int32_t>() < k_cache.size(0),
                  "block_table entries must index the cache's ", k_cache.size(0), " pages");
    }
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "a contiguous k_cache must have q's batch size ", B);
  }
  if (B) {
    const auto [shortest, longest] = at::aminmax(cache_seqlens);
    TORCH_CHECK(shortest.item<int32_t>() >= 0 && longest.item<int32_t>() <= room,
                "cache_seqlens must lie in [0, ", room, "] (the room of a row)");
  }
  const AttnShapes s{B, q.size(1), Hkv, q.size(2), room, q.size(3), v_cache.size(3)};
  AttnFwdParams p;
  set_attention_inputs(p, q, k_cache, v_cache, s, std::nullopt, scale, window_params(window_left, window_right, false),
                       softcap, DropoutParams{});
  p.alibi_slopes = alibi_slopes_ptr(alibi_slopes, s.B, s.Hq);
  p.seqs.seqlens_k = cache_seqlens.data_ptr<int32_t>();
  if (pages) {
    p.seqs.block_table = pages;
    p.seqs.block_size = k_cache.size(2);
    p.seqs.max_blocks = max_blocks;
  }
  auto [out, lse, stats] = run_padded_forward(p, q.options(), sinks);  // forward only: no statistics kept
  return {out, lse};
}

// The backward's own inputs against the forward's output shape and statistics shape; returns
// the statistics contiguous.
at::Tensor check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                                 const at::Tensor& softmax_stats, at::IntArrayRef out_shape,
                                 at::IntArrayRef stats_shape) {
  check_input(grad_out, "grad_out", int64_t(out_shape.size()));
  check_input(out, "out", int64_t(out_shape.size()));
  TORCH_CHECK(out.sizes() == out_shape, "out must have shape ", out_shape, ", got ", out.sizes());
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "grad_out must have out's shape ", out.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && grad_out.scalar_type() == q.scalar_type(),
              "out and grad_out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(softmax_stats.device().is_cpu() && softmax_stats.scalar_type() == at::kFloat &&
                  softmax_stats.sizes() == stats_shape,
              "softmax_stats must be a float32 CPU tensor of shape ", stats_shape, ", got ",
              softmax_stats.scalar_type(), " ", softmax_stats.sizes());
  return softmax_stats.contiguous();
}

// Runs the backward kernels on filled-in inputs `p` (shapes, views, mask, rule, sequence
// layout, out, dout, dmask) with the forward's statistics, into contiguous dq, dk and dv.
void run_backward(AttnBwdParams& p, const at::Tensor& stats, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  if (p.Sq == 0 || p.Sk == 0 || p.B == 0 || p.Hq == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return;
  }
  const KernelTable& kt = kernels();
  p.row_max = stats[0].data_ptr<float>();
  p.row_sum = stats[1].data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  // Items are (batch, kv head, key chunk). With fewer (batch, kv head) pairs than twice the
  // threads, keys are split into chunks too; their dq partials are summed afterwards.
  const int64_t pairs = p.B * p.Hkv;
  const int64_t nkb = (p.Sk + kt.bwd_block_k - 1) / kt.bwd_block_k;
  const int64_t threads = at::get_num_threads();
  p.nchunks = pairs >= 2 * threads ? 1 : std::min<int64_t>(nkb, (2 * threads + pairs - 1) / pairs);
  at::Tensor partial;
  if (p.nchunks > 1) {
    std::vector<int64_t> shape{p.nchunks};
    shape.insert(shape.end(), dq.sizes().begin(), dq.sizes().end());
    partial = at::empty(shape, dq.options().dtype(at::kFloat));
    p.dq_partial = partial.data_ptr<float>();
  }
  run_items(pairs * p.nchunks, [&](int64_t t, int64_t n, int64_t stride) { kt.attn_bwd(p, t, n, stride); });
  if (p.nchunks > 1) dq.copy_(partial.sum(0).mul_(p.scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& softmax_stats, const std::optional<at::Tensor>& mask,
    double scale, bool mask_grad, int64_t window_left, int64_t window_right, bool window_top_left,
    double softcap, double dropout_p, const std::optional<at::Tensor>& rng_state,
    const std::optional<at::Tensor>& alibi_slopes) {
  const AttnShapes s = check_attention_inputs(q, k, v, softcap);
  const at::Tensor stats = check_backward_inputs(grad_out, q, out, softmax_stats, {s.B, s.Hq, s.Sq, s.Dv},
                                                 {kSoftmaxStats, s.B, s.Hq, s.Sq});
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), k.options());
  at::Tensor dv = empty_output(v.sizes(), v.options());
  at::Tensor dmask = mask_grad ? at::zeros({s.B, s.Hq, s.Sq, s.Sk}, q.options().dtype(at::kFloat))
                               : at::empty({0}, q.options().dtype(at::kFloat));
  AttnBwdParams p;
  set_attention_inputs(p, q, k, v, s, mask, scale, window_params(window_left, window_right, window_top_left),
                       softcap, dropout_params(dropout_p, rng_state));
  p.alibi_slopes = alibi_slopes_ptr(alibi_slopes, s.B, s.Hq);
  p.out = view4(out);
  p.dout = view4(grad_out);
  p.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  run_backward(p, stats, dq, dk, dv);
  return {dq, dk, dv, dmask};
}

// ---------------------------------------------------------------- packed (varlen) sequences
// q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv): sequence b's queries are rows
// [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q, its keys likewise, each at most max_seqlen_q
// (max_seqlen_k) long; the window is aligned bottom-right within each sequence. Outputs: out
// (total_q, Hq, Dv), lse (Hq, total_q), statistics (2, Hq, total_q).

View4 packed_view(const at::Tensor& t) {  // (rows, heads, dim): no batch stride
  View4 v;
  v.ptr = t.data_ptr();
  v.sh = t.stride(1);
  v.ss = t.stride(0);
  return v;
}

void check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t batch, int64_t total, int64_t max_seqlen,
                      const char* max_name) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous(), name,
              " must be a contiguous 1-d int32 CPU tensor, got ", cu.scalar_type(), " ", cu.sizes());
  TORCH_CHECK(cu.size(0) == batch + 1, name, " must have ", batch + 1, " entries like cu_seqlens_q, got ", cu.size(0));
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK(c[0] == 0 && c[batch] == total, name, " must start at 0 and end at ", total,
              " (the packed rows), got ", c[0], " and ", c[batch]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t(c[b + 1]) - c[b];
    TORCH_CHECK(len >= 0 && len <= max_seqlen, name, " must be non-decreasing with lengths up to ", max_name, "=",
                max_seqlen, "; sequence ", b, " has length ", len);
  }
}

struct PackedShapes {
  AttnShapes s;
  int64_t total_q, total_k;
};

PackedShapes check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, double softcap) {
  check_qkv(q, k, v, 3);
  const int64_t Hq = q.size(1), Hkv = k.size(1), D = q.size(2), Dv = v.size(2);
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == Hkv && Hkv > 0 && Hq % Hkv == 0,
              "k and v must have the same rows and heads, dividing q's heads; got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  check_head_dims(D, k.size(2), Dv);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ",
              max_seqlen_q, " and ", max_seqlen_k);
  check_softcap(softcap);
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, "cu_seqlens_q must be 1-d with at least one entry");
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", batch, q.size(0), max_seqlen_q, "max_seqlen_q");
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", batch, k.size(0), max_seqlen_k, "max_seqlen_k");
  return {{batch, Hq, Hkv, max_seqlen_q, max_seqlen_k, D, Dv}, q.size(0), k.size(0)};
}

// The padded fields with the packed views and layout in place of the padded ones.
template <class Params>
void set_varlen_inputs(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const PackedShapes& ps, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                       double scale, int64_t window_left, int64_t window_right, double softcap,
                       const DropoutParams& dropout) {
  set_attention_inputs(p, q, k, v, ps.s, std::nullopt, scale, window_params(window_left, window_right, false),
                       softcap, dropout);
  p.q = packed_view(q);
  p.k = packed_view(k);
  p.v = packed_view(v);
  SeqLayout L;
  L.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  L.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  L.query_rows = {0, 1, ps.s.Hq};       // out, dq: (total_q, Hq, .)
  L.stat_rows = {0, ps.total_q, 1};     // lse, statistics: (Hq, total_q)
  L.key_rows = {0, 1, ps.s.Hkv};        // dk, dv: (total_k, Hkv, .)
  L.rows = ps.total_q * ps.s.Hq;
  p.seqs = L;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                              int64_t max_seqlen_k, double scale, int64_t window_left,
                                                              int64_t window_right, double softcap,
                                                              double dropout_p,
                                                              const std::optional<at::Tensor>& rng_state,
                                                              const std::optional<at::Tensor>& sinks,
                                                              const std::optional<at::Tensor>& alibi_slopes) {
  const PackedShapes ps =
      check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softcap);
  AttnFwdParams p;
  set_varlen_inputs(p, q, k, v, ps, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right, softcap,
                    dropout_params(dropout_p, rng_state));
  p.alibi_slopes = alibi_slopes_ptr(alibi_slopes, ps.s.B, ps.s.Hq);
  const at::Tensor sink_rows = set_sinks(p, sinks, /*head_dim=*/0, /*stat_dims=*/2);
  at::Tensor out = empty_output({ps.total_q, ps.s.Hq, ps.s.Dv}, q.options());
  at::Tensor lse = at::empty({ps.s.Hq, ps.total_q}, q.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({kSoftmaxStats, ps.s.Hq, ps.total_q}, q.options().dtype(at::kFloat));
  run_forward(p, out.transpose(0, 1), lse, stats, sink_rows);
  return {out, lse, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_stats, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
    double softcap, double dropout_p, const std::optional<at::Tensor>& rng_state,
    const std::optional<at::Tensor>& alibi_slopes) {
  const PackedShapes ps =
      check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softcap);
  const at::Tensor stats = check_backward_inputs(grad_out, q, out, softmax_stats, {ps.total_q, ps.s.Hq, ps.s.Dv},
                                                 {kSoftmaxStats, ps.s.Hq, ps.total_q});
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), k.options());
  at::Tensor dv = empty_output(v.sizes(), v.options());
  AttnBwdParams p;
  set_varlen_inputs(p, q, k, v, ps, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right, softcap,
                    dropout_params(dropout_p, rng_state));
  p.alibi_slopes = alibi_slopes_ptr(alibi_slopes, ps.s.B, ps.s.Hq);
  p.out = packed_view(out);
  p.dout = packed_view(grad_out);
  run_backward(p, stats, dq, dk, dv);
  return {dq, dk, dv};
}

at::Tensor softmax_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                           int64_t window_left, int64_t window_right, bool window_top_left) {
  check_input(x, "x", 4);
  SoftmaxFwdParams p;
  p.dtype = dtype_code(x, "x");
  at::Tensor y = empty_output(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  p.x = view4(x);
  p.B = x.size(0), p.H = x.size(1), p.R = x.size(2), p.C = x.size(3);
  p.mask = mask_view(mask, x.sizes(), x.scalar_type());
  p.scale = float(scale);
  p.window = window_params(window_left, window_right, window_top_left);
  p.y = y.data_ptr();
  const KernelTable& kt = kernels();
  const int64_t grain = std::max<int64_t>(1, 32768 / p.C);  // ~32k elements per task
  at::parallel_for(0, p.B * p.H * p.R, grain, [&](int64_t b, int64_t e) { kt.softmax_fwd(p, b, e); });
  return y;
}

at::Tensor softmax_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& y) {
  check_input(grad_y, "grad_y", 4);
  check_input(y, "y", 4);
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "grad_y must have y's shape ", y.sizes(), ", got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == y.scalar_type(), "grad_y must have y's dtype ", y.scalar_type());
  SoftmaxBwdParams p;
  p.dtype = dtype_code(y, "y");
  at::Tensor gx = empty_output(y.sizes(), y.options());
  if (gx.numel() == 0) return gx;
  p.gy = view4(grad_y);
  p.y = view4(y);
  p.B = y.size(0), p.H = y.size(1), p.R = y.size(2), p.C = y.size(3);
  p.gx = gx.data_ptr();
  const KernelTable& kt = kernels();
  const int64_t grain = std::max<int64_t>(1, 32768 / p.C);
  at::parallel_for(0, p.B * p.H * p.R, grain, [&](int64_t b, int64_t e) { kt.softmax_bwd(p, b, e); });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attn_fwd", &attn_fwd_cpu);
  m.impl("attn_fwd_kvcache", &attn_fwd_kvcache_cpu);
  m.impl("attn_bwd", &attn_bwd_cpu);
  m.impl("varlen_fwd", &varlen_fwd_cpu);
  m.impl("varlen_bwd", &varlen_bwd_cpu);
  m.impl("softmax_fwd", &softmax_fwd_cpu);
  m.impl("softmax_bwd", &softmax_bwd_cpu);
}

const char* kernel_isa() { return kernels().name; }

// `loop(iterations)` on every intra-op thread at once; the FLOPs of all of them.
static int64_t flops_on_every_thread(int64_t (*loop)(int64_t), int64_t iterations) {
  TORCH_CHECK(iterations >= 0, "iterations must be >= 0, got ", iterations);
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> flops{0};
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) flops += loop(iterations);
  });
  return flops.load();
}

int64_t fma_peak_all_threads(int64_t iterations) { return flops_on_every_thread(kernels().fma_peak, iterations); }

int64_t tile_gemm_peak_all_threads(int64_t iterations) {
  return flops_on_every_thread(kernels().tile_gemm_peak, iterations);
}

std::vector<int64_t> forward_phase_ns(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      int64_t window_left, int64_t window_right) {
  const AttnShapes s = check_attention_inputs(q, k, v, 0.0);
  TORCH_CHECK(s.Sq > kFewQueries, "phase timing covers the many-query forward kernel: q needs more than ",
              kFewQueries, " queries, got ", s.Sq);
  AttnFwdParams p;
  set_attention_inputs(p, q, k, v, s, std::nullopt, 1.0 / std::sqrt(double(s.D)),
                       window_params(window_left, window_right, false), 0.0, DropoutParams{});
  std::vector<int64_t> ns(kFwdPhases, 0);
  p.phase_ns = ns.data();
  run_padded_forward(p, q.options(), std::nullopt);
  return ns;
}

std::vector<int64_t> backward_phase_ns(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& grad_out, int64_t window_left, int64_t window_right) {
  const AttnShapes s = check_attention_inputs(q, k, v, 0.0);
  const double scale = 1.0 / std::sqrt(double(s.D));
  const WindowParams window = window_params(window_left, window_right, false);
  AttnFwdParams forward;
  set_attention_inputs(forward, q, k, v, s, std::nullopt, scale, window, 0.0, DropoutParams{});
  const auto [out, lse, stats_out] = run_padded_forward(forward, q.options(), std::nullopt);
  const at::Tensor stats = check_backward_inputs(grad_out, q, out, stats_out, {s.B, s.Hq, s.Sq, s.Dv},
                                                 {kSoftmaxStats, s.B, s.Hq, s.Sq});
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), k.options());
  at::Tensor dv = empty_output(v.sizes(), v.options());
  AttnBwdParams p;
  set_attention_inputs(p, q, k, v, s, std::nullopt, scale, window, 0.0, DropoutParams{});
  p.out = view4(out);
  p.dout = view4(grad_out);
  std::vector<int64_t> ns(kBwdPhases, 0);
  p.phase_ns = ns.data();
  run_backward(p, stats, dq, dk, dv);
  return ns;
}

}  // namespace cpu
}  // namespace fastattn

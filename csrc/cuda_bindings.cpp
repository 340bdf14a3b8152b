// CUDA implementations of the fastattn operators: check tensors, allocate outputs, fill the
// parameter structs of csrc/cuda/fastattn_cuda.h and launch on the current stream.
// Built only where torch has CUDA (setup.py). What the kernels accept is mirrored, for the
// dispatcher, by fastattn/cuda_support.py.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/fastattn_cuda.h"
#include "philox.h"

namespace {

namespace fc = fastattn::cuda;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, " CUDA kernel failed: ", cudaGetErrorString(err));
}

fc::DType dtype_of(const at::Tensor& t, const char* name, bool allow_fp32) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return fc::DType::kFloat16;
    case at::kBFloat16:
      return fc::DType::kBFloat16;
    case at::kFloat:
      if (allow_fp32) return fc::DType::kFloat32;
      break;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "fastattn CUDA: ", name, " must be float16 or bfloat16",
                   allow_fp32 ? " or float32" : "", ", got ", t.scalar_type());
}

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.is_cuda(), "fastattn CUDA: ", name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(t.device() == like.device(), "fastattn CUDA: ", name, " is on ", t.device(),
                    " but q/x is on ", like.device());
}

// How attention operands are laid out: padded batches (B, H, S, D) or packed sequences
// (total, H, D); heads are dim 1 in both.
enum class Layout { kPadded, kPacked };

// Attention operands: the layout's dims, last dim contiguous, 16-byte aligned rows (cp.async
// tiles).
void check_attn_operand(const at::Tensor& t, const char* name, const at::Tensor& q, Layout layout) {
  check_cuda_tensor(t, name, q);
  const int64_t dims = layout == Layout::kPadded ? 4 : 3;
  TORCH_CHECK_VALUE(t.dim() == dims, "fastattn CUDA: ", name, " must be ", dims, "-d ",
                    layout == Layout::kPadded ? "(B, H, S, D)" : "(total, H, D)", ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "fastattn CUDA: ", name, " has dtype ",
                   t.scalar_type(), " but q has ", q.scalar_type());
  TORCH_CHECK_VALUE(t.size(dims - 1) <= 1 || t.stride(dims - 1) == 1, "fastattn CUDA: ", name,
                    " must have a contiguous last dim, got strides ", t.strides());
  for (int64_t i = 0; i < dims - 1; ++i) {
    TORCH_CHECK_VALUE(t.size(i) <= 1 || t.stride(i) % 8 == 0, "fastattn CUDA: ", name,
                      " strides must be multiples of 8 elements, got ", t.strides());
  }
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "fastattn CUDA: ", name,
                    " must be 16-byte aligned");
}

fc::MaskView mask_view(const std::optional<at::Tensor>& mask, const at::Tensor& like,
                       at::IntArrayRef shape) {
  fc::MaskView view;
  if (!mask.has_value()) return view;
  const at::Tensor& m = *mask;
  check_cuda_tensor(m, "mask", like);
  TORCH_CHECK_VALUE(m.sizes() == shape, "fastattn CUDA: mask must be expanded to ", shape,
                    ", got ", m.sizes());
  switch (m.scalar_type()) {
    case at::kBool:
      view.kind = fc::MaskKind::kBool;
      break;
    case at::kHalf:
      view.kind = fc::MaskKind::kFloat16;
      break;
    case at::kBFloat16:
      view.kind = fc::MaskKind::kBFloat16;
      break;
    case at::kFloat:
      view.kind = fc::MaskKind::kFloat32;
      break;
    default:
      TORCH_CHECK_TYPE(false, "fastattn CUDA: mask must be bool or float16/bfloat16/float32, got ",
                       m.scalar_type());
  }
  view.ptr = m.data_ptr();
  view.stride_b = m.stride(0);
  view.stride_h = m.stride(1);
  view.stride_q = m.stride(2);
  view.stride_k = m.stride(3);
  return view;
}

// A per-head float32 constant of the call (sinks, alibi_slopes): nullptr when absent, else its
// data, checked to be a contiguous float32 tensor of `shape` on q's device.
const float* head_constants(const std::optional<at::Tensor>& t, const char* name,
                            at::IntArrayRef shape, const at::Tensor& q) {
  if (!t.has_value()) return nullptr;
  check_cuda_tensor(*t, name, q);
  TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->sizes() == shape && t->is_contiguous(),
                    "fastattn CUDA: ", name, " must be a contiguous float32 tensor of shape ", shape,
                    ", got ", t->scalar_type(), " ", t->sizes(), t->is_contiguous() ? "" : " (not contiguous)");
  return t->data_ptr<float>();
}

// (stride_b, stride_h, stride_s) of a tensor in `layout` (packed: no batch dim, tokens dim 0).
void row_strides(const at::Tensor& t, Layout layout, int64_t& stride_b, int64_t& stride_h, int64_t& stride_s) {
  const bool padded = layout == Layout::kPadded;
  stride_b = padded ? t.stride(0) : 0;
  stride_h = t.stride(1);
  stride_s = t.stride(padded ? 2 : 0);
}

// What padded and packed calls share: q, k, v in `layout` (heads dim 1, head dim last), their
// strides, heads and head dim, scale, softcap and dtype; sizes along the batch and sequence
// dims are the caller's.
fc::AttnFwdParams shared_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                Layout layout, double scale, double softcap, int max_head_dim,
                                const char* k_name = "k", const char* v_name = "v") {
  TORCH_CHECK_VALUE(q.is_cuda(), "fastattn CUDA: q must be a CUDA tensor");
  check_attn_operand(q, "q", q, layout);
  check_attn_operand(k, k_name, q, layout);
  check_attn_operand(v, v_name, q, layout);
  TORCH_CHECK_VALUE(softcap >= 0, "fastattn CUDA: softcap must be >= 0 (0: no cap), got ", softcap);
  const int64_t Hq = q.size(1), Hkv = k.size(1), D = q.size(-1);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0 && v.size(1) == Hkv,
                    "fastattn CUDA: ", k_name, "/", v_name, " heads must divide q heads, got q ", q.sizes(), ", ",
                    k_name, " ", k.sizes(), ", ", v_name, " ", v.sizes());
  TORCH_CHECK_VALUE(k.size(-1) == D, "fastattn CUDA: ", k_name, " head dim must equal q's (", D, "), got ",
                    k.size(-1));
  TORCH_CHECK_VALUE(v.size(-1) == D, "fastattn CUDA: ", v_name, " head dim must equal q's (", D, "), got ",
                    v.size(-1));
  TORCH_CHECK_VALUE(D % fc::kHeadDimMultiple == 0 && D <= max_head_dim,
                    "fastattn CUDA: head dim must be a multiple of ", fc::kHeadDimMultiple,
                    " and at most ", max_head_dim, ", got ", D);
  TORCH_CHECK_VALUE(scale > 0, "fastattn CUDA: scale must be positive, got ", scale);
  fc::AttnFwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  row_strides(q, layout, p.q_stride_b, p.q_stride_h, p.q_stride_s);
  row_strides(k, layout, p.k_stride_b, p.k_stride_h, p.k_stride_s);
  row_strides(v, layout, p.v_stride_b, p.v_stride_h, p.v_stride_s);
  p.hq = Hq, p.hkv = Hkv, p.d = D;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.dtype = dtype_of(q, "q", /*allow_fp32=*/false);
  return p;
}

fc::AttnFwdParams attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, double scale,
                              int64_t window_left, int64_t window_right, bool window_top_left,
                              double softcap, const std::optional<at::Tensor>& alibi_slopes,
                              int max_head_dim) {
  fc::AttnFwdParams p = shared_params(q, k, v, Layout::kPadded, scale, softcap, max_head_dim);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), Sk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B, "fastattn CUDA: q, k, v batch sizes differ");
  TORCH_CHECK_VALUE(v.size(2) == Sk, "fastattn CUDA: k must be (B, Hkv, Sk, D) and v (B, Hkv, Sk, Dv), got k ",
                    k.sizes(), ", v ", v.sizes());
  p.b = B, p.sq = Sq, p.sk = Sk;
  p.vis = fc::visibility(window_left, window_right, window_top_left, Sq, Sk);
  p.diagonal = static_cast<int>(fc::window_diagonal(window_top_left, Sq, Sk));
  p.mask = mask_view(mask, q, {B, Hq, Sq, Sk});
  p.alibi_slopes = head_constants(alibi_slopes, "alibi_slopes", {B, Hq}, q);
  return p;
}

// Packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D), int32 (B + 1) cu_seqlens on
// q's device, read there (the kernels take each sequence's lengths from them; no host sync).
fc::AttnFwdParams varlen_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                int64_t window_left, int64_t window_right, double softcap,
                                const std::optional<at::Tensor>& alibi_slopes, int max_head_dim) {
  fc::AttnFwdParams p = shared_params(q, k, v, Layout::kPacked, scale, softcap, max_head_dim);
  TORCH_CHECK_VALUE(v.size(0) == k.size(0), "fastattn CUDA: k and v must have the same tokens, got k ",
                    k.sizes(), ", v ", v.sizes());
  for (const auto& [cu, name] : {std::pair{&cu_seqlens_q, "cu_seqlens_q"}, std::pair{&cu_seqlens_k, "cu_seqlens_k"}}) {
    check_cuda_tensor(*cu, name, q);
    TORCH_CHECK_VALUE(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->size(0) >= 1 && cu->is_contiguous(),
                      "fastattn CUDA: ", name, " must be a contiguous int32 tensor of B + 1 cumulative lengths, got ",
                      cu->scalar_type(), " ", cu->sizes());
  }
  const int64_t B = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK_VALUE(cu_seqlens_k.size(0) == B + 1, "fastattn CUDA: cu_seqlens_q and cu_seqlens_k must have the "
                    "same length (B + 1), got ", cu_seqlens_q.size(0), " and ", cu_seqlens_k.size(0));
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, "fastattn CUDA: max_seqlen_q and max_seqlen_k must be "
                    ">= 0, got ", max_seqlen_q, " and ", max_seqlen_k);
  p.b = B, p.sq = max_seqlen_q, p.sk = max_seqlen_k;
  p.total_q = q.size(0);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  p.window_left = window_left, p.window_right = window_right;
  p.alibi_slopes = head_constants(alibi_slopes, "alibi_slopes", {B, p.hq}, q);
  return p;
}

// Dropout with probability dropout_p under rng_state (int64 (seed, offset) on q's device),
// which the kernels read from device memory.
void set_dropout(fc::AttnFwdParams& p, double dropout_p, const std::optional<at::Tensor>& rng_state,
                 const at::Tensor& q) {
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p <= 1, "fastattn CUDA: dropout_p must be in [0, 1], got ",
                    dropout_p);
  if (dropout_p == 0) return;
  TORCH_CHECK_VALUE(rng_state.has_value(),
                    "fastattn CUDA: rng_state must be given when dropout_p > 0: an int64 (seed, offset) "
                    "tensor, got None");
  const at::Tensor& state = *rng_state;
  check_cuda_tensor(state, "rng_state", q);
  TORCH_CHECK_VALUE(state.scalar_type() == at::kLong && state.dim() == 1 && state.size(0) == 2 &&
                        state.is_contiguous(),
                    "fastattn CUDA: rng_state must be a contiguous int64 (seed, offset) tensor of shape (2,), got ",
                    state.scalar_type(), " ", state.sizes());
  p.rng_state = state.data_ptr<int64_t>();
  p.drop_threshold = fastattn::philox::drop_threshold(dropout_p);
  p.keep_scale = dropout_p < 1 ? static_cast<float>(1 / (1 - dropout_p)) : 0.f;  // p = 1 drops everything
}

// The forward's softmax statistics (2, B, Hq, Sq), packed (2, Hq, total_q): row max, row sum
// (see csrc/fastattn.cpp).
constexpr int64_t kSoftmaxStats = 2;

// Shape of lse and of each softmax statistic: (B, Hq, Sq), packed (Hq, total_q).
std::vector<int64_t> stat_shape(const fc::AttnFwdParams& p, Layout layout) {
  if (layout == Layout::kPadded) return {p.b, p.hq, p.sq};
  return {p.hq, p.total_q};
}

std::vector<int64_t> stats_shape(const fc::AttnFwdParams& p, Layout layout) {
  std::vector<int64_t> shape = stat_shape(p, layout);
  shape.insert(shape.begin(), kSoftmaxStats);
  return shape;
}

// The forward of p (operands checked) with dropout and sinks: out (q's shape; Dv == D), lse and
// the softmax statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(fc::AttnFwdParams& p, const at::Tensor& q, Layout layout,
                                                       double dropout_p, const std::optional<at::Tensor>& rng_state,
                                                       const std::optional<at::Tensor>& sinks, const char* op) {
  set_dropout(p, dropout_p, rng_state, q);
  p.sinks = head_constants(sinks, "sinks", {p.hq}, q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(stat_shape(p, layout), q.options().dtype(at::kFloat));
  at::Tensor stats = at::empty(stats_shape(p, layout), q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.row_max = stats[0].data_ptr<float>();
  p.row_sum = stats[1].data_ptr<float>();
  row_strides(out, layout, p.o_stride_b, p.o_stride_h, p.o_stride_s);
  check_launch(fc::attn_fwd(p, c10::cuda::getCurrentCUDAStream()), op);
  return {out, lse, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        const std::optional<at::Tensor>& mask,
                                                        double scale, int64_t window_left,
                                                        int64_t window_right, bool window_top_left,
                                                        double softcap, double dropout_p,
                                                        const std::optional<at::Tensor>& rng_state,
                                                        const std::optional<at::Tensor>& sinks,
                                                        const std::optional<at::Tensor>& alibi_slopes) {
  fc::AttnFwdParams p = attn_params(q, k, v, mask, scale, window_left, window_right, window_top_left,
                                    softcap, alibi_slopes, fc::kMaxHeadDimFwd);
  return forward(p, q, Layout::kPadded, dropout_p, rng_state, sinks, "attn_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
    int64_t window_right, double softcap, double dropout_p, const std::optional<at::Tensor>& rng_state,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes) {
  fc::AttnFwdParams p = varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                      window_left, window_right, softcap, alibi_slopes, fc::kMaxHeadDimFwd);
  return forward(p, q, Layout::kPacked, dropout_p, rng_state, sinks, "varlen_fwd");
}

// Attention of q (B, Hq, Sq, D) against a KV cache read in place: k_cache / v_cache contiguous
// (B, Hkv, S_max, D), or with block_table (int32 (B, max_blocks)) pages (num_blocks, Hkv,
// block_size, D) in any order; row b sees its first cache_seqlens[b] keys (int32 (B,), read on
// the device: no host sync, so entries must lie in [0, the room of a row] and the table's
// entries index the cache's pages), the window aligned bottom-right per row. Forward only:
// out (B, Hq, Sq, D) and lse (B, Hq, Sq).
std::tuple<at::Tensor, at::Tensor> attn_fwd_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                    const std::optional<at::Tensor>& block_table, double scale,
                                                    int64_t window_left, int64_t window_right, double softcap,
                                                    const std::optional<at::Tensor>& sinks,
                                                    const std::optional<at::Tensor>& alibi_slopes) {
  fc::KvcacheFwdParams p;
  p.attn = shared_params(q, k_cache, v_cache, Layout::kPadded, scale, softcap, fc::kMaxHeadDimFwd, "k_cache",
                         "v_cache");
  fc::AttnFwdParams& a = p.attn;
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "fastattn CUDA: v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  check_cuda_tensor(cache_seqlens, "cache_seqlens", q);
  TORCH_CHECK_VALUE(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                        cache_seqlens.is_contiguous(),
                    "fastattn CUDA: cache_seqlens must be a contiguous int32 tensor of shape (", B, "), got ",
                    cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  int64_t capacity = k_cache.size(2);
  if (block_table.has_value()) {
    const at::Tensor& table = *block_table;
    check_cuda_tensor(table, "block_table", q);
    TORCH_CHECK_VALUE(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == B && table.is_contiguous(),
                      "fastattn CUDA: block_table must be a contiguous int32 tensor of shape (", B,
                      ", max_blocks), got ", table.scalar_type(), " ", table.sizes());
    TORCH_CHECK_VALUE(k_cache.size(2) > 0 || table.size(1) == 0,
                      "fastattn CUDA: a paged k_cache must have blocks of at least one slot, got ", k_cache.sizes());
    p.block_table = table.data_ptr<int>();
    p.max_blocks = static_cast<int>(table.size(1));
    p.block_size = static_cast<int>(k_cache.size(2));
    capacity = table.size(1) * k_cache.size(2);
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == B, "fastattn CUDA: a contiguous k_cache must have q's batch size ", B,
                      ", got ", k_cache.sizes());
  }
  TORCH_CHECK_VALUE(capacity <= std::numeric_limits<int>::max(), "fastattn CUDA: a cache row must hold fewer than 2^31 "
                    "keys, got ", capacity);
  p.seqlens = cache_seqlens.data_ptr<int>();
  p.capacity = static_cast<int>(capacity);
  a.b = B, a.sq = Sq;
  a.window_left = window_left, a.window_right = window_right;
  a.sinks = head_constants(sinks, "sinks", {Hq}, q);
  a.alibi_slopes = head_constants(alibi_slopes, "alibi_slopes", {B, Hq}, q);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Hq, Sq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  // The split count follows from the device's size only: the result is the same for any
  // (csrc/cuda/decode.cu), so no caller needs to choose it.
  int sms = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.device().index()), "attn_fwd_kvcache");
  p.splits = fc::kvcache_splits(p, sms);
  at::Tensor part_out, part_lse;
  if (p.splits > 1) {
    const int64_t chunks = fc::kvcache_chunks(p.capacity);
    part_out = at::empty({chunks, B * Hq * Sq, D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({chunks, B * Hq * Sq}, q.options().dtype(at::kFloat));
    p.part_out = part_out.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }
  check_launch(fc::attn_fwd_kvcache(p, c10::cuda::getCurrentCUDAStream()), "attn_fwd_kvcache");
  return {out, lse};
}

// The backward of p.fwd (operands checked; dmask set by the caller) with dropout: dq, dk, dv.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(fc::AttnBwdParams& p, const at::Tensor& grad_out,
                                                        const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& out,
                                                        const at::Tensor& stats_in, Layout layout,
                                                        double dropout_p,
                                                        const std::optional<at::Tensor>& rng_state,
                                                        const char* op) {
  fc::AttnFwdParams& f = p.fwd;
  set_dropout(f, dropout_p, rng_state, q);
  check_attn_operand(grad_out, "grad_out", q, layout);
  check_attn_operand(out, "out", q, layout);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "fastattn CUDA: grad_out and out must have q's shape ", q.sizes());
  check_cuda_tensor(stats_in, "softmax_stats", q);
  const std::vector<int64_t> expected_stats = stats_shape(f, layout);
  TORCH_CHECK_VALUE(stats_in.scalar_type() == at::kFloat && stats_in.sizes() == at::IntArrayRef(expected_stats),
                    "fastattn CUDA: softmax_stats must be float32 ", at::IntArrayRef(expected_stats), ", got ",
                    stats_in.scalar_type(), " ", stats_in.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor stats = stats_in.contiguous();

  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), contiguous);
  at::Tensor dk = at::empty(k.sizes(), contiguous);
  at::Tensor dv = at::empty(v.sizes(), contiguous);
  if (f.sq == 0 || f.sk == 0) {  // nothing attends: all gradients are zero
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }
  at::Tensor dsum = at::empty(stat_shape(f, layout), q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty(stat_shape(f, layout), q.options().dtype(at::kFloat));
  f.out = const_cast<void*>(out.data_ptr());
  f.row_max = const_cast<float*>(stats[0].data_ptr<float>());
  f.row_sum = const_cast<float*>(stats[1].data_ptr<float>());
  row_strides(out, layout, f.o_stride_b, f.o_stride_h, f.o_stride_s);
  p.dout = grad_out.data_ptr();
  row_strides(grad_out, layout, p.do_stride_b, p.do_stride_h, p.do_stride_s);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  row_strides(dq, layout, p.dq_stride_b, p.dq_stride_h, p.dq_stride_s);
  row_strides(dk, layout, p.dkv_stride_b, p.dkv_stride_h, p.dkv_stride_s);
  p.dsum = dsum.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  check_launch(fc::attn_bwd(p, c10::cuda::getCurrentCUDAStream()), op);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& stats, const std::optional<at::Tensor>& mask,
    double scale, bool mask_grad, int64_t window_left, int64_t window_right, bool window_top_left,
    double softcap, double dropout_p, const std::optional<at::Tensor>& rng_state,
    const std::optional<at::Tensor>& alibi_slopes) {
  fc::AttnBwdParams p;
  p.fwd = attn_params(q, k, v, mask, scale, window_left, window_right, window_top_left, softcap,
                      alibi_slopes, fc::kMaxHeadDimBwd);
  const fc::AttnFwdParams& f = p.fwd;
  at::Tensor dmask = mask_grad ? at::zeros({f.b, f.hq, f.sq, f.sk}, q.options().dtype(at::kFloat))
                               : at::empty({0}, q.options().dtype(at::kFloat));
  p.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  auto [dq, dk, dv] = backward(p, grad_out, q, k, v, out, stats, Layout::kPadded, dropout_p, rng_state, "attn_bwd");
  return {dq, dk, dv, dmask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, double softcap, double dropout_p,
    const std::optional<at::Tensor>& rng_state, const std::optional<at::Tensor>& alibi_slopes) {
  fc::AttnBwdParams p;
  p.fwd = varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                        window_right, softcap, alibi_slopes, fc::kMaxHeadDimBwd);
  return backward(p, grad_out, q, k, v, out, stats, Layout::kPacked, dropout_p, rng_state, "varlen_bwd");
}

at::Tensor softmax_fwd(const at::Tensor& x_in, const std::optional<at::Tensor>& mask,
                       double scale, int64_t window_left, int64_t window_right,
                       bool window_top_left) {
  TORCH_CHECK_VALUE(x_in.is_cuda(), "fastattn CUDA: x must be a CUDA tensor");
  TORCH_CHECK_VALUE(x_in.dim() == 4, "fastattn CUDA: x must be 4-d (B, H, R, C), got ",
                    x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  // The kernels read rows through strides but need contiguous rows.
  const at::Tensor x = x_in.size(3) <= 1 || x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  fc::SoftmaxFwdParams p;
  p.dtype = dtype_of(x, "x", /*allow_fp32=*/true);
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.x_stride_b = x.stride(0), p.x_stride_h = x.stride(1), p.x_stride_r = x.stride(2);
  p.b = x.size(0), p.h = x.size(1), p.rows = x.size(2), p.cols = x.size(3);
  p.scale = static_cast<float>(scale);
  p.vis = fc::visibility(window_left, window_right, window_top_left, p.rows, p.cols);
  p.mask = mask_view(mask, x, x.sizes());
  check_launch(fc::softmax_fwd(p, c10::cuda::getCurrentCUDAStream()), "softmax_fwd");
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& grad_y_in, const at::Tensor& y_in) {
  TORCH_CHECK_VALUE(y_in.is_cuda(), "fastattn CUDA: y must be a CUDA tensor");
  check_cuda_tensor(grad_y_in, "grad_y", y_in);
  TORCH_CHECK_VALUE(grad_y_in.sizes() == y_in.sizes(), "fastattn CUDA: grad_y ", grad_y_in.sizes(),
                    " and y ", y_in.sizes(), " must have the same shape");
  TORCH_CHECK_TYPE(grad_y_in.scalar_type() == y_in.scalar_type(),
                   "fastattn CUDA: grad_y and y dtypes differ");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor grad_y = grad_y_in.contiguous(), y = y_in.contiguous();
  at::Tensor dx = at::empty(y.sizes(), y.options());
  fc::SoftmaxBwdParams p;
  p.dtype = dtype_of(y, "y", /*allow_fp32=*/true);
  p.dy = grad_y.data_ptr();
  p.y = y.data_ptr();
  p.dx = dx.data_ptr();
  p.cols = y.dim() == 0 ? 1 : y.size(-1);
  p.n_rows = p.cols == 0 ? 0 : y.numel() / p.cols;
  check_launch(fc::softmax_bwd(p, c10::cuda::getCurrentCUDAStream()), "softmax_bwd");
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attn_fwd", &attn_fwd);
  m.impl("attn_bwd", &attn_bwd);
  m.impl("varlen_fwd", &varlen_fwd);
  m.impl("varlen_bwd", &varlen_bwd);
  m.impl("attn_fwd_kvcache", &attn_fwd_kvcache);
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

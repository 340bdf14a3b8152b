// Operator schemas of the `fastattn` namespace and the Python module `fastattn._C`.
//
// Each backend registers its kernels for these schemas in its own file
// (csrc/cpu/*.cpp for CPU, csrc/cuda_bindings.cpp for CUDA). Conventions shared by all:
//   q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), Hq % Hkv == 0, last dim contiguous.
//   mask: None, or a bool (true = attend) / additive float tensor already expanded to
//         (B, Hq, Sq, Sk) (broadcast dims have stride 0).
//   window_left, window_right, window_top_left: query i sees key j iff
//         i' - window_left <= j <= i' + window_right, i' = i + Sk - Sq (or i' = i with
//         window_top_left); a negative side is unbounded. Causal is (-1, 0).
//   softcap: > 0 caps the scaled scores, softcap * tanh(scale * q.k / softcap), before the mask;
//         0 leaves them as they are.
//   sinks: None, or float32 (Hq,) contiguous: one logit per query head that joins every row's
//         softmax denominator and carries no value (attention sinks). The forwards fold it into
//         lse and softmax_stats, so the backwards, given those statistics and the output, need
//         nothing more; the sinks' own gradient is computed by the autograd formula.
//   alibi_slopes: None, or float32 (B, Hq) contiguous (sequence b, query head h): ALiBi adds
//         -alibi_slopes[b][h] * |i' - j| to the (capped) scaled score, before the mask, with i'
//         as in the window rule. A constant of the call: it gets no gradient.
//   dropout_p, rng_state: dropout of the probabilities; with dropout_p > 0, rng_state (int64
//         (seed, offset), on the inputs' device, read there) is required and score (b, h, i, j)
//         is kept under the Philox decision of csrc/philox.h, scaled by 1 / (1 - dropout_p).
//         The statistics and lse stay those of the undropped softmax; the backward takes the
//         same rng_state and regenerates the decisions (no mask is stored).
//   lse: float32 (B, Hq, Sq), natural log; -inf for rows that see no key (their output is 0).
//   softmax_stats: float32 (2, B, Hq, Sq): [0] the row max of the scores (scale*q.k + mask),
//         [1] the row sum of exp(score - row max); lse = [0] + log([1]). The backward
//         recomputes P from these rather than from lse: an fp32 lse keeps the row sum only to
//         |lse| * 2^-24, which at large logits costs P many times PyTorch's accuracy.
//         Rows that see no key: -inf and 0.
//   softmax ops work over the last dim of a 4-d x (B, H, R, C) with the same mask rules;
//   softmax_bwd returns the gradient w.r.t. the softmax input (scale*x + mask).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/params.h"
#include "cuda/limits.h"

TORCH_LIBRARY(fastattn, m) {
  m.def("attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int window_left=-1,"
        " int window_right=-1, bool window_top_left=False, float softcap=0.0, float dropout_p=0.0,"
        " Tensor? rng_state=None, Tensor? sinks=None, Tensor? alibi_slopes=None)"
        " -> (Tensor out, Tensor lse, Tensor softmax_stats)");
  m.def("attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_stats,"
        " Tensor? mask, float scale, bool mask_grad, int window_left=-1, int window_right=-1,"
        " bool window_top_left=False, float softcap=0.0, float dropout_p=0.0, Tensor? rng_state=None,"
        " Tensor? alibi_slopes=None) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  // Forward against a KV cache: k_cache/v_cache contiguous (B, Hkv, S_max, D) or, with an
  // int32 block_table (B, max_blocks), pages (num_blocks, Hkv, block_size, D); batch b sees its
  // first cache_seqlens[b] keys (the window aligned bottom-right per batch).
  m.def("attn_fwd_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens,"
        " Tensor? block_table, float scale, int window_left=-1, int window_right=-1,"
        " float softcap=0.0, Tensor? sinks=None, Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  // Packed (variable-length) sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D/Dv) and
  // int32 cu_seqlens_q/k (B + 1) cumulative lengths; sequence b's queries are rows
  // [cu_seqlens_q[b], cu_seqlens_q[b + 1]) (keys likewise), at most max_seqlen_q/k long; the
  // window is aligned bottom-right within each sequence. out (total_q, Hq, Dv); lse
  // (Hq, total_q); softmax_stats (2, Hq, total_q).
  m.def("varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, float scale, int window_left=-1, int window_right=-1,"
        " float softcap=0.0, float dropout_p=0.0, Tensor? rng_state=None, Tensor? sinks=None,"
        " Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse, Tensor softmax_stats)");
  m.def("varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_stats,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale,"
        " int window_left=-1, int window_right=-1, float softcap=0.0, float dropout_p=0.0,"
        " Tensor? rng_state=None, Tensor? alibi_slopes=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("softmax_fwd(Tensor x, Tensor? mask, float scale, int window_left=-1, int window_right=-1,"
        " bool window_top_left=False) -> Tensor");
  m.def("softmax_bwd(Tensor grad_y, Tensor y) -> Tensor");
  // The dropout decisions (csrc/philox.h) of a (batch, heads, rows, cols) score tensor under
  // rng_state (int64 (seed, offset)); true = kept.
  m.def("dropout_keep_mask(Tensor rng_state, int batch, int heads, int rows, int cols, float p) -> Tensor");
}

namespace fastattn {
namespace cpu {
// The CPU forward's time per phase (FwdPhase, params.h; nanoseconds summed over the threads)
// in one call of attention(q, k, v) under the window (bottom-right; -1: unbounded side).
std::vector<int64_t> forward_phase_ns(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      int64_t window_left, int64_t window_right);
// The same for the backward (BwdPhase) of that call with the gradient grad_out (the forward
// runs first, untimed).
std::vector<int64_t> backward_phase_ns(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& grad_out, int64_t window_left, int64_t window_right);
}  // namespace cpu
}  // namespace fastattn

#ifndef FASTATTN_CUDA_ARCHS
#define FASTATTN_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastattn compiled kernels (operators live in torch.ops.fastattn)";
#ifdef FASTATTN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = FASTATTN_CUDA_ARCHS;

  // What each compiled backend's kernels accept, from the constants the kernels use; read by
  // fastattn/capabilities.py. The CUDA entry is there in CPU-only builds too (for info()).
  namespace py = pybind11;
  py::dict cpu, cuda;
  cpu["attention_dtypes"] = py::make_tuple("float32", "bfloat16", "float16");
  cpu["softmax_dtypes"] = py::make_tuple("float32", "bfloat16", "float16");
  cpu["max_head_dim_fwd"] = fastattn::cpu::kMaxHeadDim;
  cpu["max_head_dim_bwd"] = fastattn::cpu::kMaxHeadDim;
  cpu["head_dim_multiple"] = 1;
  cpu["v_head_dim_may_differ"] = true;
  // kv_cache: attn_fwd_kvcache; varlen: varlen_fwd/bwd; dropout: in attn_fwd/bwd, varlen_fwd/bwd
  cpu["extra_features"] = py::make_tuple("kv_cache", "window", "softcap", "varlen", "dropout", "sinks", "alibi");
  cuda["attention_dtypes"] = py::make_tuple("float16", "bfloat16");
  cuda["softmax_dtypes"] = py::make_tuple("float16", "bfloat16", "float32");
  cuda["max_head_dim_fwd"] = fastattn::cuda::kMaxHeadDimFwd;
  cuda["max_head_dim_bwd"] = fastattn::cuda::kMaxHeadDimBwd;
  cuda["head_dim_multiple"] = fastattn::cuda::kHeadDimMultiple;
  cuda["v_head_dim_may_differ"] = false;
  cuda["min_compute_capability"] = fastattn::cuda::kMinComputeCapability;
  // kv_cache: attn_fwd_kvcache (csrc/cuda/decode.cu); varlen: varlen_fwd/bwd; dropout: in
  // attn_fwd/bwd and varlen_fwd/bwd (csrc/cuda/flash.cuh)
  cuda["extra_features"] = py::make_tuple("kv_cache", "window", "softcap", "varlen", "dropout", "sinks", "alibi");
  py::dict capabilities;
  capabilities["cpu"] = cpu;
  capabilities["cuda"] = cuda;
  m.attr("capabilities") = capabilities;

  m.def("cpu_fma_peak", &fastattn::cpu::fma_peak_all_threads, py::arg("iterations"),
        "Runs a register-resident FMA loop (the CPU kernels' vectors) `iterations` times on every "
        "intra-op thread at once and returns the FLOPs done: timed, the machine's peak FMA rate.");
  m.def("cpu_tile_gemm_peak", &fastattn::cpu::tile_gemm_peak_all_threads, py::arg("iterations"),
        "Runs the CPU kernels' own tile GEMM on one L1-resident 64 x 64 x 64 tile `iterations` times on "
        "every intra-op thread at once and returns the FLOPs done: timed, the rate the kernels' GEMM "
        "phases would reach without cache misses.");
  m.def("cpu_kernel_isa", &fastattn::cpu::kernel_isa,
        "The instruction-set variant the CPU kernels run now: avx512, avx2 or generic (the fastest the "
        "CPU supports, unless FASTATTN_CPU_ISA forces one).");
  m.def("cpu_forward_phase_ns", &fastattn::cpu::forward_phase_ns, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("window_left") = -1, py::arg("window_right") = -1,
        "Runs the CPU attention forward once on q, k, v (scale 1/sqrt(D), the window bottom-right) and "
        "returns the nanoseconds its threads spent in each phase, in the order of cpu_forward_phases.");
  m.def("cpu_backward_phase_ns", &fastattn::cpu::backward_phase_ns, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("grad_out"), py::arg("window_left") = -1, py::arg("window_right") = -1,
        "Runs the CPU attention forward, then times its backward with grad_out: the nanoseconds the "
        "backward's threads spent in each phase, in the order of cpu_backward_phases.");
  py::list forward_phases, backward_phases;
  for (const char* name : fastattn::cpu::kFwdPhaseNames) forward_phases.append(name);
  for (const char* name : fastattn::cpu::kBwdPhaseNames) backward_phases.append(name);
  m.attr("cpu_forward_phases") = py::tuple(forward_phases);
  m.attr("cpu_backward_phases") = py::tuple(backward_phases);
}

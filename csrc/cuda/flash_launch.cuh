// Tile configurations and launch helpers of the flash kernels, shared by the per-head-dim
// translation units (split so that nvcc compiles them in parallel).
#pragma once

#include <type_traits>

#include "flash.cuh"

namespace fastattn {
namespace cuda {
namespace flash {

// Forward: 128 x 64 tiles, 4 warps of 32 query rows. Head dim 256, 128 with a mask (whose
// addressing needs registers too; capped scores may read one), and 96 and 128 of packed
// sequences (their bounds), use 64-row query blocks (16 rows a warp: with 128, capped ones
// spilled 76 bytes and packed ones 16-20, ptxas sm_80/sm_90); head dims 96/128
// with 128-row blocks use 32-key blocks: scores and output accumulator stay in registers.
// Dropout (whose Philox rounds need registers too) always takes 64-row blocks, and 32-key
// blocks from head dim 96: with 128 rows, or 64 keys at 96 (masked) and 256, they spilled 4-40
// bytes (ptxas, sm_90).
template <int kHeadDim, Scores kScores, bool kDropout, bool kPacked>
struct FwdConfig {
  static constexpr bool kMayReadMask = kScores != Scores::kPlain;
  static constexpr int kBlockM =
      kDropout || kHeadDim > 128 || (kMayReadMask && kHeadDim == 128) || (kPacked && kHeadDim >= 96) ? 64 : 128;
  static constexpr int kBlockN =
      (kDropout && kHeadDim >= 96) || ((kHeadDim == 96 || kHeadDim == 128) && kBlockM == 128) ? 32 : 64;
  static constexpr int kNWarps = 4;
};

// Backward: 4 warps of 16 rows own 64 rows (keys for dK/dV, queries for dQ) and step over
// the other sequence kStep at a time (narrower at head dim 128 to keep accumulators in
// registers). Dropout halves the step: at the full step the dK/dV kernel spilled 4-24 bytes
// (ptxas, sm_90).
template <int kHeadDim, bool kDropout>
struct BwdConfig {
  static constexpr int kNWarps = 4;
  static constexpr int kRows = 16 * kNWarps;
  static constexpr int kStep = (kHeadDim >= 96 ? 32 : 64) / (kDropout ? 2 : 1);
};

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                   const Params& p) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Binds kPacked to whether P describes packed sequences (varlen), then runs BODY, except
// for the mask folded into the scores, which packed calls never have (not instantiated).
#define FA_LAYOUT_SWITCH(P, kScores, kPacked, ...)                                     \
  FA_BOOL_SWITCH((P).cu_seqlens_q != nullptr, kPacked, [&] {                           \
    if constexpr (kPacked && kScores == Scores::kMasked) {                             \
      return cudaErrorInvalidValue;                                                    \
    } else {                                                                           \
      return __VA_ARGS__();                                                            \
    }                                                                                  \
  })

template <typename T, int kHeadDim>
cudaError_t run_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  return FA_SCORES_SWITCH(p, kScores, [&] {
    return FA_BOOL_SWITCH(p.rng_state != nullptr, kDropout, [&] {
      return FA_LAYOUT_SWITCH(p, kScores, kPacked, [&] {
        using C = FwdConfig<kHeadDim, kScores, kDropout, kPacked>;
        const dim3 grid(p.b * p.hq, (p.sq + C::kBlockM - 1) / C::kBlockM);
        const size_t smem = (C::kBlockM + 2 * C::kBlockN) * (kHeadDim + 8) * sizeof(T);
        return launch(
            fwd_kernel<T, kHeadDim, C::kBlockM, C::kBlockN, C::kNWarps, kScores, kDropout, kPacked>,
            grid, C::kNWarps * 32, smem, stream, p);
      });
    });
  });
}

template <typename T, int kHeadDim>
cudaError_t run_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  const AttnFwdParams& f = p.fwd;
  const int64_t rows = stat_rows(f);
  cudaError_t err = launch(bwd_dsum_kernel<T>, dim3((rows + 7) / 8), 256, 0, stream, p);
  if (err != cudaSuccess) return err;
  return FA_SCORES_SWITCH(f, kScores, [&] {
    return FA_BOOL_SWITCH(f.rng_state != nullptr, kDropout, [&] {
      return FA_LAYOUT_SWITCH(f, kScores, kPacked, [&] {
        using C = BwdConfig<kHeadDim, kDropout>;
        const size_t tiles = 2 * (C::kRows + C::kStep) * (kHeadDim + 8) * sizeof(T);
        const size_t query_stats = 2 * C::kStep * sizeof(float);  // dK/dV: lse and dsum of a query block
        cudaError_t e = launch(
            bwd_dkdv_kernel<T, kHeadDim, C::kStep, C::kRows, C::kNWarps, kScores, kDropout, kPacked>,
            dim3(f.b * f.hkv, (f.sk + C::kRows - 1) / C::kRows), C::kNWarps * 32, tiles + query_stats, stream, p);
        if (e != cudaSuccess) return e;
        return launch(
            bwd_dq_kernel<T, kHeadDim, C::kRows, C::kStep, C::kNWarps, kScores, kDropout, kPacked>,
            dim3(f.b * f.hq, (f.sq + C::kRows - 1) / C::kRows), C::kNWarps * 32, tiles, stream, p);
      });
    });
  });
}

// Explicit instantiations live in flash_hdim*.cu.
#define FA_INSTANTIATE_FWD(HD)                                                   \
  template cudaError_t run_fwd<__half, HD>(const AttnFwdParams&, cudaStream_t); \
  template cudaError_t run_fwd<__nv_bfloat16, HD>(const AttnFwdParams&, cudaStream_t);
#define FA_INSTANTIATE_BWD(HD)                                                   \
  template cudaError_t run_bwd<__half, HD>(const AttnBwdParams&, cudaStream_t); \
  template cudaError_t run_bwd<__nv_bfloat16, HD>(const AttnBwdParams&, cudaStream_t);

}  // namespace flash
}  // namespace cuda
}  // namespace fastattn

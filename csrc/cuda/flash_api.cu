// Entry points of the flash kernels: runtime dtype / head dim -> compiled instantiation.
#include "flash_launch.cuh"

namespace fastattn {
namespace cuda {

namespace flash {
// Defined (explicitly instantiated) in flash_hdim*.cu.
#define FA_DECLARE(HD)                                                                 \
  extern template cudaError_t run_fwd<__half, HD>(const AttnFwdParams&, cudaStream_t); \
  extern template cudaError_t run_fwd<__nv_bfloat16, HD>(const AttnFwdParams&, cudaStream_t);
FA_DECLARE(32)
FA_DECLARE(64)
FA_DECLARE(96)
FA_DECLARE(128)
FA_DECLARE(256)
#undef FA_DECLARE
#define FA_DECLARE(HD)                                                                 \
  extern template cudaError_t run_bwd<__half, HD>(const AttnBwdParams&, cudaStream_t); \
  extern template cudaError_t run_bwd<__nv_bfloat16, HD>(const AttnBwdParams&, cudaStream_t);
FA_DECLARE(32)
FA_DECLARE(64)
FA_DECLARE(96)
FA_DECLARE(128)
#undef FA_DECLARE
}  // namespace flash

namespace {

template <typename T>
cudaError_t fwd_typed(const AttnFwdParams& p, cudaStream_t stream) {
  return FA_HEADDIM_SWITCH(p.d, kHeadDim, [&] { return flash::run_fwd<T, kHeadDim>(p, stream); });
}

template <typename T, int kHeadDim>
cudaError_t bwd_sized(const AttnBwdParams& p, cudaStream_t stream) {
  if constexpr (kHeadDim > kMaxHeadDimBwd) {
    return cudaErrorInvalidValue;
  } else {
    return flash::run_bwd<T, kHeadDim>(p, stream);
  }
}

template <typename T>
cudaError_t bwd_typed(const AttnBwdParams& p, cudaStream_t stream) {
  return FA_HEADDIM_SWITCH(p.fwd.d, kHeadDim, [&] { return bwd_sized<T, kHeadDim>(p, stream); });
}

}  // namespace

cudaError_t attn_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  if (p.d > kMaxHeadDimFwd || p.d % 8 != 0 || !(p.scale > 0.f)) return cudaErrorInvalidValue;
  if (p.b == 0 || p.hq == 0 || p.sq == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16:
      return fwd_typed<__half>(p, stream);
    case DType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t attn_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  const AttnFwdParams& f = p.fwd;
  if (f.d > kMaxHeadDimBwd || f.d % 8 != 0 || !(f.scale > 0.f)) return cudaErrorInvalidValue;
  if (f.b == 0 || f.hq == 0 || f.sq == 0 || f.sk == 0) return cudaSuccess;
  switch (f.dtype) {
    case DType::kFloat16:
      return bwd_typed<__half>(p, stream);
    case DType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastattn

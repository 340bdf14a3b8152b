// Device helpers shared by the CUDA kernels: the runtime-to-template switch, type
// conversions, mask reads, and the sm_80 PTX wrappers (mma.sync, ldmatrix, cp.async).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "fastattn_cuda.h"

namespace fastattn {
namespace cuda {

// ---------------------------------------------------------------------------------------
// The one way runtime flags become template parameters: each macro calls the trailing
// lambda body with a constexpr NAME bound to the matching value.
#define FA_BOOL_SWITCH(COND, NAME, ...)   \
  [&] {                                   \
    if (COND) {                           \
      constexpr static bool NAME = true;  \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr static bool NAME = false; \
      return __VA_ARGS__();               \
    }                                     \
  }()

// How the flash kernels form their scores, a template parameter so that each variant holds
// only the registers it uses: scale * q.k; with a mask folded into the accumulator; or capped
// (softcap), the mask (if any) then read per element after the cap, since a cap cannot act on
// a score that already holds the mask. ALiBi is a run-time branch of every variant.
enum class Scores { kPlain, kMasked, kCapped };

// Binds `NAME` to the Scores variant of attention parameters `P`.
#define FA_SCORES_SWITCH(P, NAME, ...)                       \
  [&] {                                                      \
    if ((P).softcap > 0.f) {                                 \
      constexpr static Scores NAME = Scores::kCapped;        \
      return __VA_ARGS__();                                  \
    } else if ((P).mask.kind != MaskKind::kNone) {           \
      constexpr static Scores NAME = Scores::kMasked;        \
      return __VA_ARGS__();                                  \
    } else {                                                 \
      constexpr static Scores NAME = Scores::kPlain;         \
      return __VA_ARGS__();                                  \
    }                                                        \
  }()

// Binds `T` to the CUDA element type of a DType.
#define FA_DTYPE_SWITCH(DTYPE, T, ...)                                 \
  [&] {                                                                \
    if ((DTYPE) == ::fastattn::cuda::DType::kFloat16) {                \
      using T = __half;                                                \
      return __VA_ARGS__();                                            \
    } else if ((DTYPE) == ::fastattn::cuda::DType::kBFloat16) {        \
      using T = __nv_bfloat16;                                         \
      return __VA_ARGS__();                                            \
    } else {                                                           \
      using T = float;                                                 \
      return __VA_ARGS__();                                            \
    }                                                                  \
  }()

// Binds kHeadDim to the smallest compiled head dim >= D (callers check D <= the largest).
#define FA_HEADDIM_SWITCH(D, kHeadDim, ...)    \
  [&] {                                        \
    if ((D) <= 32) {                           \
      constexpr static int kHeadDim = 32;      \
      return __VA_ARGS__();                    \
    } else if ((D) <= 64) {                    \
      constexpr static int kHeadDim = 64;      \
      return __VA_ARGS__();                    \
    } else if ((D) <= 96) {                    \
      constexpr static int kHeadDim = 96;      \
      return __VA_ARGS__();                    \
    } else if ((D) <= 128) {                   \
      constexpr static int kHeadDim = 128;     \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr static int kHeadDim = 256;     \
      return __VA_ARGS__();                    \
    }                                          \
  }()

// Binds NAME to the smallest power of two in [1, 64] that is >= N (callers check N <= 64).
#define FA_POW2_SWITCH(N, NAME, ...)                                      \
  [&] {                                                                   \
    if ((N) <= 1) {                                                       \
      constexpr static int NAME = 1;                                      \
      return __VA_ARGS__();                                               \
    } else if ((N) <= 2) {                                                \
      constexpr static int NAME = 2;                                      \
      return __VA_ARGS__();                                               \
    } else if ((N) <= 4) {                                                \
      constexpr static int NAME = 4;                                      \
      return __VA_ARGS__();                                               \
    } else if ((N) <= 8) {                                                \
      constexpr static int NAME = 8;                                      \
      return __VA_ARGS__();                                               \
    } else if ((N) <= 16) {                                               \
      constexpr static int NAME = 16;                                     \
      return __VA_ARGS__();                                               \
    } else if ((N) <= 32) {                                               \
      constexpr static int NAME = 32;                                     \
      return __VA_ARGS__();                                               \
    } else {                                                              \
      constexpr static int NAME = 64;                                     \
      return __VA_ARGS__();                                               \
    }                                                                     \
  }()

// ---------------------------------------------------------------------------------------
// Conversions.
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats packed into one 32-bit register of T (lo in the low half), as mma operands want.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ---------------------------------------------------------------------------------------
// Masks: the value added to a score in natural units (-inf hides the key).
__device__ __forceinline__ float load_mask(const void* ptr, MaskKind kind, int64_t offset) {
  switch (kind) {
    case MaskKind::kBool:
      return static_cast<const bool*>(ptr)[offset] ? 0.f : -INFINITY;
    case MaskKind::kFloat16:
      return __half2float(static_cast<const __half*>(ptr)[offset]);
    case MaskKind::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(ptr)[offset]);
    case MaskKind::kFloat32:
      return static_cast<const float*>(ptr)[offset];
    default:
      return 0.f;
  }
}

// The visibility rule (Visibility, fastattn_cuda.h) per element, and solved for a block of
// queries or of keys; `partial_tile` says whether a tile needs it per element.
__device__ __forceinline__ bool sees(const Visibility& v, int i, int j) {
  return static_cast<unsigned>(j - i - v.lo) <= static_cast<unsigned>(v.span);  // lo <= j - i <= hi
}
// Key blocks [key_block_begin, key_block_end) hold every key queries [m0, m0 + bm) see.
__device__ __forceinline__ int key_block_begin(const Visibility& v, int m0, int bn) { return max(0, m0 + v.lo) / bn; }
__device__ __forceinline__ int key_block_end(const Visibility& v, int m0, int bm, int sk, int bn) {
  const int end = min(sk, m0 + bm + v.hi);
  return end <= 0 ? 0 : (end + bn - 1) / bn;
}
// Query blocks [query_block_begin, query_block_end) hold every query that sees keys [n0, n0 + bn).
__device__ __forceinline__ int query_block_begin(const Visibility& v, int n0, int bm) { return max(0, n0 - v.hi) / bm; }
__device__ __forceinline__ int query_block_end(const Visibility& v, int n0, int bn, int sq, int bm) {
  const int end = min(sq, n0 + bn - v.lo);
  return end <= 0 ? 0 : (end + bm - 1) / bm;
}
// Whether some (query, key) of the tile [m0, m0 + bm) x [n0, n0 + bn) is outside the window.
__device__ __forceinline__ bool partial_tile(const Visibility& v, int m0, int bm, int n0, int bn) {
  return n0 < m0 + bm - 1 + v.lo || n0 + bn - 1 > m0 + v.hi;
}

// The logit cap: softcap * tanh(x / softcap).
__device__ __forceinline__ float cap_score(float x, float softcap) { return softcap * tanhf(x / softcap); }

// ---------------------------------------------------------------------------------------
// Warp reductions.
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// Across the 4 lanes of an mma quad (the lanes holding one accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------
// sm_80 PTX wrappers.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; copies zeros instead when `valid` is false.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// d (16x8 fp32) += a (16x16, row) * b (16x8, col).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace cuda
}  // namespace fastattn

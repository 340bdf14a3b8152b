// Fused scaled masked softmax (forward and backward) over the last dim of (B, H, R, C).
//
// Rows of up to 32 * kMaxElems columns: one warp per row, the row held in registers (one read,
// one write). Longer rows: one block per row, an online (max, sum) pass then a write pass.
// Loads are 16-byte vectors where the row length, strides and pointers allow it. Masks are
// read through their strides (broadcast dims have stride 0); a row sees the columns of its window.
#include <algorithm>

#include "utils.cuh"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kMaxElems = 64;  // per lane: rows up to 2048 columns stay in registers
constexpr int kWarpRowsPerBlock = 4;
constexpr int kBlockThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Where one row of the forward lives.
struct FwdRow {
  const void* x;
  int64_t mask_row;  // offset of the row's first mask entry
  int first, limit;  // the window shows columns [first, limit)
};

__device__ __forceinline__ FwdRow fwd_row(const SoftmaxFwdParams& p, int64_t row) {
  const int r = row % p.rows;
  const int64_t bh = row / p.rows;
  const int b = bh / p.h, h = bh % p.h;
  FwdRow out;
  const int64_t x_off = b * p.x_stride_b + h * p.x_stride_h + r * p.x_stride_r;
  const int elem = p.dtype == DType::kFloat32 ? 4 : 2;
  out.x = static_cast<const char*>(p.x) + x_off * elem;
  out.mask_row = b * p.mask.stride_b + h * p.mask.stride_h + r * p.mask.stride_q;
  out.first = max(0, r + p.vis.lo);
  out.limit = max(0, min(p.cols, r + p.vis.hi + 1));
  return out;
}

// scale * x + mask for N consecutive columns starting at c; an entry the mask hides (-inf)
// stays hidden whatever x is (even NaN), as torch's masked_fill does.
template <typename T, int N, bool kHasMask>
__device__ __forceinline__ void scores(float (&s)[N], const SoftmaxFwdParams& p, const FwdRow& row,
                                       int c) {
  const Vec<T, N> xv = load_vec<T, N>(static_cast<const T*>(row.x) + c);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    float v = to_float(xv.v[j]) * p.scale;
    if constexpr (kHasMask) {
      const float bias = load_mask(p.mask.ptr, p.mask.kind, row.mask_row + (c + j) * p.mask.stride_k);
      v = bias == -INFINITY ? -INFINITY : v + bias;
    }
    s[j] = c + j >= row.first && c + j < row.limit ? v : -INFINITY;
  }
}

template <typename T, int kElems, int kVec, bool kHasMask>
__global__ void __launch_bounds__(32 * kWarpRowsPerBlock, 1)
    softmax_fwd_warp_kernel(const SoftmaxFwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.b) * p.h * p.rows) return;
  const FwdRow fr = fwd_row(p, row);
  float v[kElems];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kElems / kVec; ++i) {
    const int c = (i * 32 + lane) * kVec;
    float s[kVec];
    if (c < p.cols) {
      scores<T, kVec, kHasMask>(s, p, fr, c);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) s[j] = -INFINITY;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      v[i * kVec + j] = s[j];
      mx = fmaxf(mx, s[j]);
    }
  }
  mx = warp_max(mx);
  const float m_use = mx == -INFINITY ? 0.f : mx;  // a row that sees nothing gives zeros
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kElems; ++i) {
    v[i] = __expf(v[i] - m_use);
    sum += v[i];
  }
  sum = warp_sum(sum);
  const float inv = sum == 0.f ? 0.f : 1.f / sum;  // NaN stays NaN
  T* y = static_cast<T*>(p.y) + row * p.cols;
#pragma unroll
  for (int i = 0; i < kElems / kVec; ++i) {
    const int c = (i * 32 + lane) * kVec;
    if (c < p.cols) {
      Vec<T, kVec> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) out.v[j] = from_float<T>(v[i * kVec + j] * inv);
      store_vec<T, kVec>(y + c, out);
    }
  }
}

// (max, sum of exp(x - max)) pairs, merged; -inf max means "nothing seen" (or only NaN,
// which fmaxf drops: the sum then carries it).
__device__ __forceinline__ void merge(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) {
    l += l2;
    return;
  }
  l = l * __expf(m - mn) + l2 * __expf(m2 - mn);
  m = mn;
}

template <typename T, int kVec, bool kHasMask>
__global__ void __launch_bounds__(kBlockThreads) softmax_fwd_block_kernel(const SoftmaxFwdParams p) {
  const int64_t row = blockIdx.x;
  const FwdRow fr = fwd_row(p, row);
  float m = -INFINITY, l = 0.f;
  for (int c = threadIdx.x * kVec; c < p.cols; c += kBlockThreads * kVec) {
    float s[kVec];
    scores<T, kVec, kHasMask>(s, p, fr, c);
    float vm = -INFINITY;
#pragma unroll
    for (int j = 0; j < kVec; ++j) vm = fmaxf(vm, s[j]);
    const float vm_use = vm == -INFINITY ? 0.f : vm;  // hidden entries give 0, NaN gives NaN
    float vl = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) vl += __expf(s[j] - vm_use);
    merge(m, l, vm, vl);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    merge(m, l, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, l, o));
  }
  __shared__ float sm[kBlockThreads / 32], sl[kBlockThreads / 32];
  if (threadIdx.x % 32 == 0) {
    sm[threadIdx.x / 32] = m;
    sl[threadIdx.x / 32] = l;
  }
  __syncthreads();
  m = -INFINITY;
  l = 0.f;
  for (int w = 0; w < kBlockThreads / 32; ++w) merge(m, l, sm[w], sl[w]);
  const float m_use = m == -INFINITY ? 0.f : m;
  const float inv = l == 0.f ? 0.f : 1.f / l;  // NaN stays NaN
  T* y = static_cast<T*>(p.y) + row * p.cols;
  for (int c = threadIdx.x * kVec; c < p.cols; c += kBlockThreads * kVec) {
    float s[kVec];
    scores<T, kVec, kHasMask>(s, p, fr, c);
    Vec<T, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) out.v[j] = from_float<T>(__expf(s[j] - m_use) * inv);
    store_vec<T, kVec>(y + c, out);
  }
}

template <typename T, int kElems, int kVec>
__global__ void __launch_bounds__(32 * kWarpRowsPerBlock, 1)
    softmax_bwd_warp_kernel(const SoftmaxBwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.n_rows) return;
  const T* dy = static_cast<const T*>(p.dy) + row * p.cols;
  const T* y = static_cast<const T*>(p.y) + row * p.cols;
  float vdy[kElems], vy[kElems];
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < kElems / kVec; ++i) {
    const int c = (i * 32 + lane) * kVec;
    if (c < p.cols) {
      const Vec<T, kVec> a = load_vec<T, kVec>(dy + c), b = load_vec<T, kVec>(y + c);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        vdy[i * kVec + j] = to_float(a.v[j]);
        vy[i * kVec + j] = to_float(b.v[j]);
        dot += vdy[i * kVec + j] * vy[i * kVec + j];
      }
    }
  }
  dot = warp_sum(dot);
  T* dx = static_cast<T*>(p.dx) + row * p.cols;
#pragma unroll
  for (int i = 0; i < kElems / kVec; ++i) {
    const int c = (i * 32 + lane) * kVec;
    if (c < p.cols) {
      Vec<T, kVec> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        out.v[j] = from_float<T>(vy[i * kVec + j] * (vdy[i * kVec + j] - dot));
      }
      store_vec<T, kVec>(dx + c, out);
    }
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kBlockThreads) softmax_bwd_block_kernel(const SoftmaxBwdParams p) {
  const int64_t row = blockIdx.x;
  const T* dy = static_cast<const T*>(p.dy) + row * p.cols;
  const T* y = static_cast<const T*>(p.y) + row * p.cols;
  float dot = 0.f;
  for (int c = threadIdx.x * kVec; c < p.cols; c += kBlockThreads * kVec) {
    const Vec<T, kVec> a = load_vec<T, kVec>(dy + c), b = load_vec<T, kVec>(y + c);
#pragma unroll
    for (int j = 0; j < kVec; ++j) dot += to_float(a.v[j]) * to_float(b.v[j]);
  }
  dot = warp_sum(dot);
  __shared__ float partial[kBlockThreads / 32];
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
  __syncthreads();
  dot = 0.f;
  for (int w = 0; w < kBlockThreads / 32; ++w) dot += partial[w];
  T* dx = static_cast<T*>(p.dx) + row * p.cols;
  for (int c = threadIdx.x * kVec; c < p.cols; c += kBlockThreads * kVec) {
    const Vec<T, kVec> a = load_vec<T, kVec>(dy + c), b = load_vec<T, kVec>(y + c);
    Vec<T, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float yv = to_float(b.v[j]);
      out.v[j] = from_float<T>(yv * (to_float(a.v[j]) - dot));
    }
    store_vec<T, kVec>(dx + c, out);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Elements per 16-byte vector of the dtype.
int vec_width(DType dtype) { return dtype == DType::kFloat32 ? 4 : 8; }

}  // namespace

cudaError_t softmax_fwd(const SoftmaxFwdParams& p, cudaStream_t stream) {
  const int64_t n_rows = static_cast<int64_t>(p.b) * p.h * p.rows;
  if (n_rows == 0 || p.cols == 0) return cudaSuccess;
  const int w = vec_width(p.dtype);
  const bool vectorized = p.cols % w == 0 && p.x_stride_b % w == 0 && p.x_stride_h % w == 0 &&
                          p.x_stride_r % w == 0 && aligned16(p.x) && aligned16(p.y);
  const bool has_mask = p.mask.kind != MaskKind::kNone;
  return FA_DTYPE_SWITCH(p.dtype, T, [&] {
    constexpr int kW = 16 / sizeof(T);
    return FA_BOOL_SWITCH(has_mask, kHasMask, [&] {
      if (p.cols <= 32 * kMaxElems) {
        return FA_POW2_SWITCH((p.cols + 31) / 32, kElems, [&] {
          return FA_BOOL_SWITCH(vectorized && p.cols % std::min(kW, kElems) == 0, kVectorized, [&] {
            constexpr int kVec = kVectorized ? std::min(kW, kElems) : 1;
            const int64_t blocks = (n_rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
            softmax_fwd_warp_kernel<T, kElems, kVec, kHasMask>
                <<<blocks, 32 * kWarpRowsPerBlock, 0, stream>>>(p);
            return cudaGetLastError();
          });
        });
      }
      return FA_BOOL_SWITCH(vectorized, kVectorized, [&] {
        softmax_fwd_block_kernel<T, kVectorized ? kW : 1, kHasMask>
            <<<n_rows, kBlockThreads, 0, stream>>>(p);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t softmax_bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.cols == 0) return cudaSuccess;
  const int w = vec_width(p.dtype);
  const bool vectorized = p.cols % w == 0 && aligned16(p.dy) && aligned16(p.y) && aligned16(p.dx);
  return FA_DTYPE_SWITCH(p.dtype, T, [&] {
    constexpr int kW = 16 / sizeof(T);
    if (p.cols <= 32 * kMaxElems) {
      return FA_POW2_SWITCH((p.cols + 31) / 32, kElems, [&] {
        return FA_BOOL_SWITCH(vectorized && p.cols % std::min(kW, kElems) == 0, kVectorized, [&] {
          constexpr int kVec = kVectorized ? std::min(kW, kElems) : 1;
          const int64_t blocks = (p.n_rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
          softmax_bwd_warp_kernel<T, kElems, kVec><<<blocks, 32 * kWarpRowsPerBlock, 0, stream>>>(p);
          return cudaGetLastError();
        });
      });
    }
    return FA_BOOL_SWITCH(vectorized, kVectorized, [&] {
      softmax_bwd_block_kernel<T, kVectorized ? kW : 1><<<p.n_rows, kBlockThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace fastattn

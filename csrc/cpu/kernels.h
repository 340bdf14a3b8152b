// The CPU kernels, written once against `Vec` (vec_avx512.h / vec_avx2.h / vec_generic.h) and
// compiled once per instruction set inside its own namespace (kernels_<isa>.cpp). Includes
// nothing itself: the including unit provides <chrono>, <cmath>, <cstdint>, <cstdlib>, <cstring>,
// <limits>, philox.h, params.h and workspace.h (Scratch), then scalar.h and a Vec.
//
// Attention works on fp32 tiles packed from the inputs (any dtype, any strides), with a
// register-blocked GEMM micro-kernel C[M x NV*W] (+)= A[M x K] * B[K x NV*W] (A broadcast
// along rows, B loaded as vectors). Scores are never materialised beyond one tile.

static constexpr float kInf = std::numeric_limits<float>::infinity();
static constexpr float kLowest = std::numeric_limits<float>::lowest();
// Scores stay in natural units, as torch computes them, and exp(s - max) is evaluated as
// exp2((s - max) * log2(e)): the max is subtracted first, so large logits lose no precision
// to a base-2 rescale, and finite mask values (finfo.min padding) cannot overflow to -inf.
static constexpr float kLog2e = 1.44269504088896341f;
static constexpr int W = Vec::W;
using R = Vec::R;

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
// Row pitch of a packed buffer whose rows hold n floats: whole vectors plus one cache line.
// With a pitch of 256 or 512 bytes the 64 rows of a GEMM operand share 16 or 8 of L1's 64
// sets and, at head dim 128, evict one another (the tile GEMMs alone ran 5-25% slower); an
// odd number of lines spreads them over every set.
static inline int64_t pitch(int64_t n) { return round_up(n, W) + 16; }
static inline int64_t elem_size(int dtype) { return dtype == kF32 ? 4 : dtype == kBool ? 1 : 2; }
static inline const char* at_elem(const void* base, int64_t offset, int dtype) {
  return static_cast<const char*>(base) + offset * elem_size(dtype);
}

static inline void fill(float* p, int64_t n, float x) {
  for (int64_t i = 0; i < n; ++i) p[i] = x;
}

// ---------------------------------------------------------------- row conversions
static inline float load_scalar(const char* p, int dtype) {
  switch (dtype) {
    case kF32: return *reinterpret_cast<const float*>(p);
    case kBF16: return bf16_to_f32(*reinterpret_cast<const uint16_t*>(p));
    case kF16: return f16_to_f32(*reinterpret_cast<const uint16_t*>(p));
    default: return *reinterpret_cast<const uint8_t*>(p) ? 0.f : -kInf;
  }
}

// dst[i] = mul * src[i] in fp32 for i < n (contiguous src). Bool becomes an additive bias
// (0 visible, -inf hidden; mul ignored).
static void load_row(const void* src, int dtype, int64_t n, float* dst, float mul) {
  int64_t i = 0;
  const R m = Vec::set1(mul);
  switch (dtype) {
    case kF32: {
      const float* s = static_cast<const float*>(src);
      for (; i + W <= n; i += W) Vec::store(dst + i, Vec::mul(Vec::load(s + i), m));
      break;
    }
    case kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + W <= n; i += W) Vec::store(dst + i, Vec::mul(Vec::load_bf16(s + i), m));
      break;
    }
    case kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (; i + W <= n; i += W) Vec::store(dst + i, Vec::mul(Vec::load_f16(s + i), m));
      break;
    }
    default: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      for (; i + W <= n; i += W) Vec::store(dst + i, Vec::load_bool_bias(s + i));
      for (; i < n; ++i) dst[i] = s[i] ? 0.f : -kInf;
      return;
    }
  }
  const char* s = static_cast<const char*>(src);
  for (; i < n; ++i) dst[i] = mul * load_scalar(s + i * elem_size(dtype), dtype);
}

// dst[i] = dtype(mul * src[i]) for i < n (contiguous dst, dtype float/bf16/f16).
static void store_row(void* dst, int dtype, int64_t n, const float* src, float mul) {
  int64_t i = 0;
  const R m = Vec::set1(mul);
  if (dtype == kF32) {
    float* d = static_cast<float*>(dst);
    for (; i + W <= n; i += W) Vec::store(d + i, Vec::mul(Vec::load(src + i), m));
    for (; i < n; ++i) d[i] = src[i] * mul;
  } else if (dtype == kBF16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (; i + W <= n; i += W) Vec::store_bf16(d + i, Vec::mul(Vec::load(src + i), m));
    for (; i < n; ++i) d[i] = f32_to_bf16(src[i] * mul);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (; i + W <= n; i += W) Vec::store_f16(d + i, Vec::mul(Vec::load(src + i), m));
    for (; i < n; ++i) d[i] = f32_to_f16(src[i] * mul);
  }
}

// Mask row [k0, k0 + n) of (b, h, row) as an fp32 additive bias in dst; returns whether any
// entry is visible (not -inf; NaN counts as visible, so that it reaches the output).
static bool mask_row(const MaskView& mk, int64_t b, int64_t h, int64_t row, int64_t k0, int64_t n,
                     float* dst) {
  const char* base = at_elem(mk.ptr, b * mk.sb + h * mk.sh + row * mk.sq + k0 * mk.sk, mk.dtype);
  if (mk.sk == 1) {
    load_row(base, mk.dtype, n, dst, 1.f);
  } else if (mk.sk == 0) {
    fill(dst, n, load_scalar(base, mk.dtype));
  } else {
    const int64_t step = mk.sk * elem_size(mk.dtype);
    for (int64_t j = 0; j < n; ++j) dst[j] = load_scalar(base + j * step, mk.dtype);
  }
  // The max finds a finite or +inf entry; the sum is NaN when an entry is NaN (vector max
  // drops NaN operands), and -inf or finite otherwise.
  int64_t j = 0;
  R mx = Vec::set1(-kInf), total = Vec::zero();
  for (; j + W <= n; j += W) {
    const R x = Vec::load(dst + j);
    mx = Vec::max(mx, x);
    total = Vec::add(total, x);
  }
  float m = Vec::hmax(mx), sum = Vec::hsum(total);
  for (; j < n; ++j) m = dst[j] > m ? dst[j] : m, sum += dst[j];
  return m > -kInf || std::isnan(sum);
}

// A score with its mask bias added; a hidden entry (-inf bias, as a False bool becomes) stays
// hidden whatever the score, even NaN, as torch's masked_fill and the skipped blocks do.
static inline float add_bias(float score, float bias) { return bias == -kInf ? -kInf : score + bias; }

// Bias for the (queries [q0, q0+mq)) x (keys [k0, k0+nk)) tile into bias (ld
// `ld`). If the mask does not vary along queries, only row 0 is filled and *per_query is
// false. Returns false when the whole tile is hidden (the caller skips it).
static bool mask_tile(const MaskView& mk, int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t k0,
                      int64_t nk, float* bias, int64_t ld, bool* per_query) {
  *per_query = mk.sq != 0;
  const int64_t rows = *per_query ? mq : 1;
  bool any = false;
  for (int64_t i = 0; i < rows; ++i) any |= mask_row(mk, b, h, q0 + i, k0, nk, bias + i * ld);
  return any;
}

// ---------------------------------------------------------------- GEMM micro-kernel
// C[M x NV*W] (+)= A[M x K] * B[K x NV*W]. A is row-major (element (m, k) at A[m*lda + k]) or,
// with ACOL, column-major (at A[k*lda + m]); B and C are row-major. With col_max (NV*W floats)
// given, each column's max over the M rows of C is folded into it while C is in registers: the
// forward's softmax then needs no pass of its own for a tile's max.
template <int M, int NV, bool ACOL>
static inline void micro_kernel(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                                int64_t ldc, int64_t K, bool accumulate, float* col_max) {
  R c[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) c[m][n] = accumulate ? Vec::load(C + m * ldc + n * W) : Vec::zero();
  for (int64_t k = 0; k < K; ++k) {
    R bv[NV];
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) bv[n] = Vec::load(B + k * ldb + n * W);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const R a = Vec::set1(ACOL ? A[k * lda + m] : A[m * lda + k]);
#pragma GCC unroll 8
      for (int n = 0; n < NV; ++n) c[m][n] = Vec::fma(a, bv[n], c[m][n]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) Vec::store(C + m * ldc + n * W, c[m][n]);
  if (col_max) {
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) {
      R mx = Vec::load(col_max + n * W);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) mx = Vec::max(mx, c[m][n]);
      Vec::store(col_max + n * W, mx);
    }
  }
}

using MicroKernelFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                               bool, float*);

template <int M, bool ACOL>
static MicroKernelFn pick_nv(int nv) {
  switch (nv) {
    case 1: return micro_kernel<M, 1, ACOL>;
    case 2: return micro_kernel<M, 2, ACOL>;
    case 3: return micro_kernel<M, 3, ACOL>;
    default: return micro_kernel<M, 4, ACOL>;
  }
}

template <bool ACOL>
static MicroKernelFn pick_kernel(int m, int nv) {
  switch (m) {
    case 1: return pick_nv<1, ACOL>(nv);
    case 2: return pick_nv<2, ACOL>(nv);
    case 3: return pick_nv<3, ACOL>(nv);
    case 4: return pick_nv<4, ACOL>(nv);
    case 5: return pick_nv<5, ACOL>(nv);
    default: return pick_nv<6, ACOL>(nv);
  }
}

// C[M x NVt*W] (+)= A[M x K] * B[K x NVt*W] (A column-major with ACOL, else row-major); with
// col_max (NVt*W floats), the max of each column of C folded into it.
template <bool ACOL = false>
static void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                 int64_t M, int64_t NVt, int64_t K, bool accumulate, float* col_max = nullptr) {
  if (M <= 0 || NVt <= 0) return;
  const int64_t mstep = ACOL ? 1 : lda;  // distance between consecutive rows of A
  for (int64_t n0 = 0; n0 < NVt; n0 += Vec::NVR) {
    const int nv = int(min64(Vec::NVR, NVt - n0));
    const MicroKernelFn full = pick_kernel<ACOL>(Vec::MR, nv);
    float* max_n = col_max ? col_max + n0 * W : nullptr;
    int64_t m0 = 0;
    for (; m0 + Vec::MR <= M; m0 += Vec::MR)
      full(A + m0 * mstep, lda, B + n0 * W, ldb, C + m0 * ldc + n0 * W, ldc, K, accumulate, max_n);
    if (m0 < M)
      pick_kernel<ACOL>(int(M - m0), nv)(A + m0 * mstep, lda, B + n0 * W, ldb, C + m0 * ldc + n0 * W,
                                         ldc, K, accumulate, max_n);
  }
}

// ---------------------------------------------------------------- row helpers
static inline bool any_nan(const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(x[j])) return true;
  return false;
}
static inline float row_max(const float* x, int64_t n) {  // n multiple of W
  R m = Vec::set1(-kInf);
  for (int64_t j = 0; j < n; j += W) m = Vec::max(m, Vec::load(x + j));
  return Vec::hmax(m);
}
// The max over rows [0, n) of a column of vectors (row pitch ld), in four independent chains:
// one chain waits for vmaxps at every row (4 cycles on Intel cores, against 0.5 a load).
static inline R column_max(const float* x, int64_t ld, int64_t n) {
  R m[4] = {Vec::set1(-kInf), Vec::set1(-kInf), Vec::set1(-kInf), Vec::set1(-kInf)};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int u = 0; u < 4; ++u) m[u] = Vec::max(m[u], Vec::load(x + (j + u) * ld));
  for (; j < n; ++j) m[0] = Vec::max(m[0], Vec::load(x + j * ld));
  return Vec::max(Vec::max(m[0], m[1]), Vec::max(m[2], m[3]));
}
// exp(s - shift) for a vector of scores s (natural units).
static inline R exp_shifted(R s, R shift) { return Vec::exp2(Vec::mul(Vec::sub(s, shift), Vec::set1(kLog2e))); }
static inline float exp_shifted(float s, float shift) { return std::exp2((s - shift) * kLog2e); }

// x = exp(x - shift) in place over n (multiple of W) elements; returns the sum.
static inline float exp_sum(float* x, int64_t n, float shift) {
  const R s = Vec::set1(shift);
  R acc = Vec::zero();
  for (int64_t j = 0; j < n; j += W) {
    const R e = exp_shifted(Vec::load(x + j), s);
    Vec::store(x + j, e);
    acc = Vec::add(acc, e);
  }
  return Vec::hsum(acc);
}
// sum(a[i] * b[i]) for i < n, in double, in eight independent chains: one chain waits for
// the add's latency at every element (the backward's delta took 2-6% of the backward so).
static inline double dot_double(const float* a, const float* b, int64_t n) {
  double acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) acc[u] += double(a[i + u]) * double(b[i + u]);
  for (; i < n; ++i) acc[0] += double(a[i]) * double(b[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
static inline void scale_row(float* x, int64_t n, float a) {  // n multiple of W
  const R s = Vec::set1(a);
  for (int64_t j = 0; j < n; j += W) Vec::store(x + j, Vec::mul(Vec::load(x + j), s));
}

// ---------------------------------------------------------------- score modifiers
// tanh with a few ulp error: an odd Taylor polynomial below |x| = 0.5 (error < 1e-9 there),
// else (1 - e) / (1 + e) with e = exp(-2|x|), which no longer cancels. NaN stays NaN.
static inline R tanh_vec(R x) {
  const R ax = Vec::abs(x);
  const R e = Vec::exp2(Vec::mul(ax, Vec::set1(-2.f * kLog2e)));
  const R one = Vec::set1(1.f);
  const R far = Vec::div(Vec::sub(one, e), Vec::add(one, e));
  const R x2 = Vec::mul(ax, ax);
  R poly = Vec::set1(5.9002744095e-04f);
  poly = Vec::fma(poly, x2, Vec::set1(-1.4558343871e-03f));
  poly = Vec::fma(poly, x2, Vec::set1(3.5921280366e-03f));
  poly = Vec::fma(poly, x2, Vec::set1(-8.8632355299e-03f));
  poly = Vec::fma(poly, x2, Vec::set1(2.1869488536e-02f));
  poly = Vec::fma(poly, x2, Vec::set1(-5.3968253968e-02f));
  poly = Vec::fma(poly, x2, Vec::set1(1.3333333333e-01f));
  poly = Vec::fma(poly, x2, Vec::set1(-3.3333333333e-01f));
  const R near = Vec::fma(Vec::mul(poly, x2), ax, ax);
  return Vec::copysign(Vec::select_lt(ax, Vec::set1(0.5f), near, far), x);
}

// x = softcap * tanh(x / softcap) over n (multiple of W) scores: the logit cap (Gemma 2),
// applied after scaling and before the mask.
static inline void cap_scores(float* x, int64_t n, float softcap) {
  const R c = Vec::set1(softcap), inv = Vec::set1(1.f / softcap);
  for (int64_t j = 0; j < n; j += W) Vec::store(x + j, Vec::mul(c, tanh_vec(Vec::mul(Vec::load(x + j), inv))));
}

// d cap(s) / d s = 1 - (cap(s) / softcap)^2, from the capped scores, over n (multiple of W).
static inline void cap_derivative(const float* capped, int64_t n, float softcap, float* out) {
  const R inv = Vec::set1(1.f / softcap), one = Vec::set1(1.f);
  for (int64_t j = 0; j < n; j += W) {
    const R t = Vec::mul(Vec::load(capped + j), inv);
    Vec::store(out + j, Vec::sub(one, Vec::mul(t, t)));
  }
}

// ---------------------------------------------------------------- ALiBi
// 0, 1, 2, ...: the offsets of the lanes of a row of scores, for distances built in vectors
// (exact in fp32 below 2^24 positions).
static constexpr int64_t kLanes = 128;
struct LaneOffsets {
  float v[kLanes];
  constexpr LaneOffsets() : v() {
    for (int64_t i = 0; i < kLanes; ++i) v[i] = float(i);
  }
};
static constexpr LaneOffsets kLaneOffsets{};

// ALiBi along a row of n scores (n a multiple of W, at most kLanes): x[e] -= slope * |c - e|.
// A row of S^T (key j, queries q0..) takes c = j - i'(q0); a row of S (query i, keys k0..)
// takes c = i' - k0: either way |c - e| is the query-key distance |i' - j|.
static inline void alibi_row(float* x, int64_t n, float slope, int64_t c) {
  const R neg = Vec::set1(-slope), cv = Vec::set1(float(c));
  for (int64_t e = 0; e < n; e += W)
    Vec::store(x + e, Vec::fma(Vec::abs(Vec::sub(cv, Vec::load(kLaneOffsets.v + e))), neg, Vec::load(x + e)));
}

// ALiBi on an S^T tile: keys [k0, k0 + nk) x queries [q0, q0 + BQ) of a sequence whose query
// 0 sits on key `diagonal`.
static void alibi_tile_t(float* st, int64_t BQ, int64_t nk, float slope, int64_t q0, int64_t k0, int64_t diagonal) {
  for (int64_t j = 0; j < nk; ++j) alibi_row(st + j * BQ, BQ, slope, k0 + j - (q0 + diagonal));
}

// ---------------------------------------------------------------- dropout
// The keep decisions of csrc/philox.h (DropoutParams, params.h) generated W lanes at a time,
// bit for bit philox::keep's in every variant, and regenerated by the backward: no mask is
// stored. A kept probability is multiplied by keep_scale, a dropped one by 0.
using U = Vec::U;

// factors[w], lane by lane: the factor of key 4 * key4 + w of query `row` of head bh
// (sequence * Hq + query head); the three counters may differ per lane.
static inline void keep_factors(const DropoutParams& d, U bh, U row, U key4, R factors[4]) {
  U c0 = key4, c1 = row, c2 = bh, c3 = Vec::u_set1(d.offset);
  uint32_t k0 = uint32_t(d.seed), k1 = uint32_t(d.seed >> 32);
  for (int round = 0; round < philox::kRounds; ++round) {
    U hi0, lo0, hi1, lo1;
    Vec::mulhilo(c0, philox::kMul0, &hi0, &lo0);
    Vec::mulhilo(c2, philox::kMul1, &hi1, &lo1);
    c0 = Vec::u_xor(Vec::u_xor(hi1, c1), Vec::u_set1(k0));
    c1 = lo1;
    c2 = Vec::u_xor(Vec::u_xor(hi0, c3), Vec::u_set1(k1));
    c3 = lo0;
    k0 += philox::kWeyl0;
    k1 += philox::kWeyl1;
  }
  const U threshold = Vec::u_set1(d.threshold);
  const R keep = Vec::set1(d.keep_scale);
  const U words[4] = {c0, c1, c2, c3};
  for (int w = 0; w < 4; ++w) factors[w] = Vec::select_ge(words[w], threshold, keep);
}

// Applies dropout to an S^T tile of probabilities in place: keys [k0, k0 + nk) (k0 a multiple
// of 4) in rows of BQ queries [q0, q0 + BQ) of head bh, one key quad and W queries per Philox call.
static void drop_tile_t(const DropoutParams& d, int64_t bh, int64_t q0, int64_t k0, int64_t nk, int64_t BQ,
                        float* st) {
  const U head = Vec::u_set1(uint32_t(bh));
  for (int64_t i = 0; i < BQ; i += W) {
    const U rows = Vec::u_iota(uint32_t(q0 + i));
    for (int64_t j = 0; j < nk; j += 4) {
      R factors[4];
      keep_factors(d, head, rows, Vec::u_set1(uint32_t((k0 + j) / 4)), factors);
      for (int64_t w = 0; w < min64(4, nk - j); ++w) {
        float* x = st + (j + w) * BQ + i;
        Vec::store(x, Vec::mul(Vec::load(x), factors[w]));
      }
    }
  }
}

// Applies dropout to one row of probabilities x[0, nk) in place: keys [k0, k0 + nk) of query
// `row` of head bh, W key quads per Philox call (lanes hold quads, so the factors are
// transposed through a small buffer).
static void drop_row(const DropoutParams& d, int64_t bh, int64_t row, int64_t k0, int64_t nk, float* x) {
  const U head = Vec::u_set1(uint32_t(bh)), rows = Vec::u_set1(uint32_t(row));
  float factor[4][W];
  for (int64_t quad = k0 / 4; quad * 4 < k0 + nk; quad += W) {
    R factors[4];
    keep_factors(d, head, rows, Vec::u_iota(uint32_t(quad)), factors);
    for (int w = 0; w < 4; ++w) Vec::store(factor[w], factors[w]);
    for (int64_t lane = 0; lane < W; ++lane)
      for (int w = 0; w < 4; ++w) {
        const int64_t j = 4 * (quad + lane) + w - k0;
        if (j >= 0 && j < nk) x[j] *= factor[w][lane];
      }
  }
}

// A kernel's entry point that picks its dropout instantiation once per call: WithDropout when
// p > 0, else Without, the path without dropout compiled as before (no per-score test).
template <class Params, void (*WithDropout)(const Params&, int64_t, int64_t, int64_t),
          void (*Without)(const Params&, int64_t, int64_t, int64_t)>
static void choose_dropout(const Params& p, int64_t begin, int64_t end, int64_t stride) {
  (p.dropout.p > 0.f ? WithDropout : Without)(p, begin, end, stride);
}

// ---------------------------------------------------------------- phase timing
// Time per phase (kPhases of them) of one thread's share of a kernel call, added to the
// call's phase_ns when it ends; with phase_ns null (every normal call) each lap is one
// predictable branch.
template <int kPhases>
class PhaseClock {
 public:
  explicit PhaseClock(int64_t* totals) : totals_(totals) {
    if (totals_) last_ = Clock::now();
  }
  ~PhaseClock() {
    if (totals_)
      for (int phase = 0; phase < kPhases; ++phase)
        __atomic_fetch_add(totals_ + phase, local_[phase], __ATOMIC_RELAXED);
  }
  // The time since the previous lap was spent in `phase`.
  void lap(int phase) {
    if (!totals_) return;
    const Clock::time_point now = Clock::now();
    local_[phase] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count();
    last_ = now;
  }

 private:
  using Clock = std::chrono::steady_clock;
  int64_t* totals_;
  int64_t local_[kPhases] = {};
  Clock::time_point last_;
};

// ---------------------------------------------------------------- visibility
// The one visibility rule (WindowParams, params.h) for sq queries against len keys: query i
// sees keys j with i + lo <= j <= i + hi and 0 <= j < len. An unbounded side becomes an offset
// past every key, so every kernel asks the same two-sided question. The range functions below
// are this rule solved for a block of queries or of keys; `classify` says whether a block
// needs the rule applied per element.
enum class Tile { kSkipped, kPartial, kFull };

struct Visibility {
  int64_t lo, hi, len;
  int64_t diagonal;  // i' - i: the key on the diagonal of query 0

  Visibility(const WindowParams& w, int64_t sq, int64_t keys)
      : len(keys), diagonal(w.top_left ? 0 : keys - sq) {
    lo = w.left < 0 ? -(sq + keys) : diagonal - w.left;
    hi = w.right < 0 ? sq + keys : diagonal + w.right;
  }
  // Keys [key_begin, key_end) hold every key a query of [q0, q0 + mq) sees.
  int64_t key_begin(int64_t q0) const { return min64(len, max64(0, q0 + lo)); }
  int64_t key_end(int64_t q0, int64_t mq) const { return max64(0, min64(len, q0 + mq + hi)); }
  // Queries [query_begin, query_end) (of sq) hold every query that sees a key of [k0, k0 + nk).
  int64_t query_begin(int64_t k0) const { return max64(0, k0 - hi); }
  int64_t query_end(int64_t k0, int64_t nk, int64_t sq) const { return max64(0, min64(sq, k0 + nk - lo)); }
  Tile classify(int64_t q0, int64_t mq, int64_t k0, int64_t nk) const {
    if (k0 + nk - 1 < q0 + lo || k0 > q0 + mq - 1 + hi) return Tile::kSkipped;
    if (k0 >= q0 + mq - 1 + lo && k0 + nk - 1 <= q0 + hi && k0 + nk <= len) return Tile::kFull;
    return Tile::kPartial;
  }
};

// ---------------------------------------------------------------- sequence info
// One sequence of a call, seen from one kv head (flash-attention's BlockInfo): where its
// queries and keys start and how many there are (padded batches, packed cu_seqlens, a KV
// cache's per-batch lengths), which keys each query sees (the window rule), where query i (of q, out or dout) and key j
// (of k or v: contiguous rows, or the pages of a paged KV cache) live, and the numbers of its
// output rows. The attention kernels compute no sequence address any other way.
template <class Params>
struct SeqInfo {
  const Params& p;
  const SeqLayout& L;
  int64_t b, hkv;
  int64_t q_start, q_len;  // queries: rows [q_start, q_start + q_len) of the query views
  int64_t k_start, len;    // keys: rows [k_start, k_start + len) of the key views
  Visibility vis;          // the window over this sequence's queries and keys

  SeqInfo(const Params& params, int64_t batch, int64_t kv_head)
      : p(params), L(params.seqs), b(batch), hkv(kv_head),
        q_start(L.cu_seqlens_q ? L.cu_seqlens_q[batch] : 0),
        q_len(L.cu_seqlens_q ? L.cu_seqlens_q[batch + 1] - q_start : params.Sq),
        k_start(L.cu_seqlens_k ? L.cu_seqlens_k[batch] : 0),
        len(L.cu_seqlens_k ? L.cu_seqlens_k[batch + 1] - k_start : L.seqlens_k ? L.seqlens_k[batch] : params.Sk),
        vis(params.window, q_len, len) {}

  // ALiBi's slope for query head h (0: no bias).
  float alibi_slope(int64_t h) const { return p.alibi_slopes ? p.alibi_slopes[b * p.Hq + h] : 0.f; }

  // Query i of query head h in a query-shaped view (q, out, dout).
  const char* query(const View4& t, int64_t h, int64_t i) const {
    return at_elem(t.ptr, b * t.sb + h * t.sh + (q_start + i) * t.ss, p.dtype);
  }
  const char* row(const View4& t, int64_t j) const {
    if (L.block_table == nullptr) return at_elem(t.ptr, b * t.sb + hkv * t.sh + (k_start + j) * t.ss, p.dtype);
    const int64_t page = L.block_table[b * L.max_blocks + j / L.block_size];
    return at_elem(t.ptr, page * t.sb + hkv * t.sh + (j % L.block_size) * t.ss, p.dtype);
  }
  const char* key(int64_t j) const { return row(p.k, j); }
  const char* value(int64_t j) const { return row(p.v, j); }
  // Whether keys [j, j + n) are equally spaced (k.ss / v.ss apart) in memory.
  bool contiguous(int64_t j, int64_t n) const {
    return L.block_table == nullptr || j / L.block_size == (j + n - 1) / L.block_size;
  }
  // Numbers of query i's output row (out, dq), statistics entry, and key j's dk/dv row.
  int64_t query_row(int64_t h, int64_t i) const { return number(L.query_rows, h, q_start + i); }
  int64_t stat(int64_t h, int64_t i) const { return number(L.stat_rows, h, q_start + i); }
  int64_t key_row(int64_t j) const { return number(L.key_rows, hkv, k_start + j); }

 private:
  int64_t number(const RowIndex& r, int64_t h, int64_t i) const { return b * r.sb + h * r.sh + i * r.ss; }
};

// ---------------------------------------------------------------- attention forward
// Per work item (batch, query head, block of BQ queries), over key tiles of BK keys:
//   S^T = K Q^T (keys x queries), so that the online softmax (running max m, running sum l,
//   rescale factor alpha) runs along vectors of queries without horizontal reductions, then
//   O += P V with P^T read as a column-major A operand.
static constexpr int64_t kFwdBQ = 64;  // most queries per work item (multiple of every W)

// Queries per block for Sq queries: as many blocks as kFwdBQ gives (the caller counts items
// that way), each as small as whole vectors allow, so that a short query range does not pay
// for kFwdBQ lanes (40 queries take 48 lanes with W = 16, not 64).
static inline int64_t fwd_block_q(int64_t Sq) {
  return round_up(ceil_div(Sq, ceil_div(Sq, kFwdBQ)), W);
}
static constexpr int64_t kFwdBK = 64;  // keys per tile
// The running max of a row moves only when a tile's scores pass it by more than this (8 in
// base 2, as FlashAttention-4 does): probabilities stay below 2^8, far from fp32 overflow, and
// O is rescaled a few times per row rather than at every new max.
static constexpr float kRescaleMargin = 8.f / kLog2e;

// Masks and, on a partially visible tile (`window` not null), the visibility rule on an S^T
// tile: keys [k0, k0 + nk) x queries [q0, q0 + BQ), of which only the first mq are real.
// bias/per_query come from mask_tile.
static void mask_scores_t(float* st, int64_t BQ, int64_t nk, int64_t mq, const float* bias, int64_t ldb,
                          bool per_query, bool masked, const Visibility* window, int64_t q0, int64_t k0) {
  for (int64_t j = 0; j < nk; ++j) {
    float* srow = st + j * BQ;
    if (masked) {
      if (per_query) {
        for (int64_t i = 0; i < mq; ++i) srow[i] = add_bias(srow[i], bias[i * ldb + j]);
      } else if (bias[j] == -kInf) {
        fill(srow, BQ, -kInf);
      } else {
        const R bj = Vec::set1(bias[j]);
        for (int64_t i = 0; i < BQ; i += W) Vec::store(srow + i, Vec::add(Vec::load(srow + i), bj));
      }
    }
    if (window) {  // key k0 + j is seen by the block's queries [first, end)
      const int64_t first = max64(0, min64(BQ, window->query_begin(k0 + j) - q0));
      const int64_t end = max64(first, window->query_end(k0 + j, 1, q0 + BQ) - q0);
      fill(srow, first, -kInf);
      fill(srow + end, BQ - end, -kInf);
    }
  }
}

// A transposed tile of scores, C = A B (S^T = K Q^T, dP^T = V dO^T: keys [k0, k0 + nk) x queries
// [q0, q0 + BQ)), on a tile the window cuts (a causal diagonal, a sliding window's edge): each
// block of key rows takes only the query vectors that see one of its keys, and the vectors it
// skips are zeroed (mask_scores_t hides them in S^T; in dP^T they meet P = 0).
static void gemm_in_window_t(const Visibility& vis, int64_t q0, int64_t k0, const float* a, int64_t lda,
                             const float* bt, int64_t ldb, float* c, int64_t BQ, int64_t nk, int64_t depth) {
  for (int64_t j0 = 0; j0 < nk; j0 += Vec::MR) {
    const int64_t rows = min64(Vec::MR, nk - j0);
    const int64_t first = min64(BQ, max64(0, vis.query_begin(k0 + j0) - q0)) / W;
    const int64_t end = max64(first, ceil_div(max64(0, vis.query_end(k0 + j0, rows, q0 + BQ) - q0), W));
    float* crows = c + j0 * BQ;
    for (int64_t r = 0; r < rows; ++r) {
      fill(crows + r * BQ, first * W, 0.f);
      fill(crows + r * BQ + end * W, BQ - end * W, 0.f);
    }
    gemm(a + j0 * lda, lda, bt + first * W, ldb, crows + first * W, BQ, rows, end - first, depth, false);
  }
}

// One output row of query head hq from its unnormalised accumulator o (Dvp long, clobbered),
// running max m and sum l: `out_row` and `stat` are its numbers (SeqInfo::query_row,
// SeqInfo::stat). With one key split it goes to out, lse and the statistics, the head's sink
// (if any) joining the sum; else, for split c, as a normalised fp32 partial and its
// statistics, merged (and given the sink) by the caller.
static void store_fwd_row(const AttnFwdParams& p, int64_t c, int64_t hq, int64_t out_row, int64_t stat, float* o,
                          float m, float l) {
  const bool whole = p.nsplit == 1;
  float o_scale = 1.f;
  if (whole && p.sinks) {  // one more logit in the row, with no value: rescale to the new max
    const float sink = p.sinks[hq], m_new = std::max(m, sink);
    o_scale = std::exp(m - m_new);  // 0 for a row that saw no key (m = kLowest)
    l = l * o_scale + std::exp(sink - m_new);
    m = m_new;
  }
  const int64_t partial = c * p.seqs.rows + stat;
  char* orow = whole ? static_cast<char*>(p.out) + out_row * p.Dv * elem_size(p.dtype)
                     : reinterpret_cast<char*>(p.out_partial + partial * p.Dv);
  const int odtype = whole ? p.dtype : int(kF32);
  const int64_t at = whole ? stat : partial;
  float* row_max = (whole ? p.row_max : p.row_max_partial) + at;
  float* row_sum = (whole ? p.row_sum : p.row_sum_partial) + at;
  if (l == 0.f) {  // no visible key: zeros and lse = -inf, never NaN
    fill(o, p.Dv, 0.f);
    store_row(orow, odtype, p.Dv, o, 1.f);
    *row_max = -kInf;
  } else {
    store_row(orow, odtype, p.Dv, o, o_scale / l);
    *row_max = m;
  }
  *row_sum = l;
  if (whole) p.lse[stat] = *row_max + std::log(l);
}

// Key blocks per chunk of the owned-head order below: K and V of a chunk (fp32, padded rows)
// take about 256 KiB, half of a 512 KiB L2, so that they stay there while every query block of
// the head passes over them. Streamed from L3 instead (K and V of a head once per query block),
// the tile GEMMs alone ran at 0.6 of the FMA peak rather than 0.85 while the other core was
// busy too (in the whole forward the gain is within run-to-run noise).
static inline int64_t fwd_chunk_blocks(int64_t ldk, int64_t ldv) {
  return max64(1, (int64_t(256) << 10) / (kFwdBK * (ldk + ldv) * int64_t(sizeof(float))));
}
// At most this many query blocks' states (~80 KiB each at head dim 128) pass over a chunk
// together; the K and V chunks are read again for the next group.
static constexpr int64_t kFwdHeldBlocks = 64;

template <bool DROPOUT>
static void attn_fwd(const AttnFwdParams& p, int64_t begin, int64_t end, int64_t stride) {
  const int64_t BQ = fwd_block_q(p.Sq), BK = kFwdBK;
  const int64_t Dvp = round_up(p.Dv, W);
  const int64_t ldk = pitch(p.D), ldv = pitch(p.Dv), ldq = pitch(BQ), ldo = ldv;  // row pitches
  const int64_t G = p.Hq / p.Hkv;
  const int64_t nqb = ceil_div(p.Sq, BQ), nkb = ceil_div(p.Sk, BK);
  const int64_t esz = elem_size(p.dtype);
  // Query blocks whose state (Q^T, O, running max and sum) a thread holds at once: one, or up
  // to kFwdHeldBlocks (query head, query block)s of an owned kv head.
  const int64_t head_blocks = G * nqb, held = p.threads_own_kv_heads ? min64(head_blocks, kFwdHeldBlocks) : 1;
  // K and V of the current (batch, kv head) in fp32, packed lazily block by block so that
  // blocks the mask or the window hides are never touched.
  Scratch kp(nkb * BK * ldk), vp(nkb * BK * ldv), packed(nkb);
  Scratch qt(held * p.D * ldq), o(held * BQ * ldo), mvec(held * BQ), lvec(held * BQ);
  Scratch st(BK * BQ), tile_max(BQ), alpha(BQ), bias(BQ * BK), row(p.D);
  PhaseClock<kFwdPhases> clock(p.phase_ns);

  // Query block q0 (mq real queries) of head hq: Q^T (times the scale) into qtb, O, max, sum
  // cleared.
  const auto start_block = [&](const SeqInfo<AttnFwdParams>& seq, int64_t hq, int64_t q0, int64_t mq, float* qtb,
                               float* ob, float* mb, float* lb) {
    const char* qbase = seq.query(p.q, hq, q0);
    for (int64_t i = 0; i < mq; ++i) {
      load_row(qbase + i * p.q.ss * esz, p.dtype, p.D, row.p, p.scale);
      for (int64_t d = 0; d < p.D; ++d) qtb[d * ldq + i] = row.p[d];
    }
    for (int64_t d = 0; d < p.D; ++d) fill(qtb + d * ldq + mq, BQ - mq, 0.f);
    fill(mb, BQ, kLowest);  // finite, so that m_old - m_new is never inf - inf
    fill(lb, BQ, 0.f);
    fill(ob, mq * ldo, 0.f);
  };
  // Key block k0 for that query block: K and V packed on first use, S^T = K Q^T, cap, ALiBi,
  // mask, online softmax, O += P V.
  const auto attend_block = [&](const SeqInfo<AttnFwdParams>& seq, int64_t b, int64_t hq, int64_t q0, int64_t mq,
                                int64_t k0, const float* qtb, float* ob, float* mb, float* lb) {
    const int64_t kb = k0 / BK, nk = min64(BK, seq.len - k0);
    bool per_query = false;
    if (p.mask.ptr && !mask_tile(p.mask, b, hq, q0, mq, k0, nk, bias.p, BK, &per_query)) return;
    float* kpb = kp.p + kb * BK * ldk;
    float* vpb = vp.p + kb * BK * ldv;
    if (packed.p[kb] == 0.f) {
      packed.p[kb] = 1.f;
      for (int64_t j = 0; j < nk; ++j) {
        load_row(seq.key(k0 + j), p.dtype, p.D, kpb + j * ldk, 1.f);
        load_row(seq.value(k0 + j), p.dtype, p.Dv, vpb + j * ldv, 1.f);
        fill(vpb + j * ldv + p.Dv, Dvp - p.Dv, 0.f);
      }
    }
    clock.lap(kPhasePack);
    const float slope = seq.alibi_slope(hq);
    const bool partial = seq.vis.classify(q0, mq, k0, nk) == Tile::kPartial;
    // A tile that no modifier touches takes its column max from the GEMM.
    const bool plain = !p.mask.ptr && p.softcap == 0.f && slope == 0.f && !partial;
    if (plain) fill(tile_max.p, BQ, -kInf);
    if (partial)
      gemm_in_window_t(seq.vis, q0, k0, kpb, ldk, qtb, ldq, st.p, BQ, nk, p.D);
    else
      gemm(kpb, ldk, qtb, ldq, st.p, BQ, nk, BQ / W, p.D, false, plain ? tile_max.p : nullptr);
    clock.lap(kPhaseScores);
    if (p.softcap > 0.f) cap_scores(st.p, nk * BQ, p.softcap);
    if (slope != 0.f) alibi_tile_t(st.p, BQ, nk, slope, q0, k0, seq.vis.diagonal);
    mask_scores_t(st.p, BQ, nk, mq, bias.p, BK, per_query, p.mask.ptr != nullptr, partial ? &seq.vis : nullptr, q0,
                  k0);
    // mb holds each row's reference max: moved to the tile's max only past kRescaleMargin.
    const R margin = Vec::set1(kRescaleMargin);
    for (int64_t i = 0; i < BQ; i += W) {
      const R m_old = Vec::load(mb + i);
      const R tmax = plain ? Vec::load(tile_max.p + i) : column_max(st.p + i, BQ, nk);
      const R m_new = Vec::select_lt(Vec::add(m_old, margin), tmax, tmax, m_old);
      const R a = exp_shifted(m_old, m_new);
      R sum = Vec::zero();
      for (int64_t j = 0; j < nk; ++j) {
        const R e = exp_shifted(Vec::load(st.p + j * BQ + i), m_new);
        Vec::store(st.p + j * BQ + i, e);
        sum = Vec::add(sum, e);
      }
      Vec::store(lb + i, Vec::fma(Vec::load(lb + i), a, sum));
      Vec::store(mb + i, m_new);
      Vec::store(alpha.p + i, a);
    }
    for (int64_t i = 0; i < mq; ++i)  // rows whose running max moved
      if (alpha.p[i] != 1.f) scale_row(ob + i * ldo, Dvp, alpha.p[i]);
    // The row sums above are the undropped softmax's; only P V sees the dropped probabilities.
    if constexpr (DROPOUT) drop_tile_t(p.dropout, b * p.Hq + hq, q0, k0, nk, BQ, st.p);
    clock.lap(kPhaseSoftmax);
    if (partial) {
      // Each block of query rows takes only the keys it sees (the others' P is 0).
      for (int64_t i0 = 0; i0 < mq; i0 += Vec::MR) {
        const int64_t rows = min64(Vec::MR, mq - i0);
        const int64_t keys_from = max64(0, seq.vis.key_begin(q0 + i0) - k0);
        const int64_t keys_to = min64(nk, seq.vis.key_end(q0 + i0, rows) - k0);
        if (keys_to > keys_from)
          gemm<true>(st.p + keys_from * BQ + i0, BQ, vpb + keys_from * ldv, ldv, ob + i0 * ldo, ldo, rows, Dvp / W,
                     keys_to - keys_from, true);
      }
    } else {
      gemm<true>(st.p, BQ, vpb, ldv, ob, ldo, mq, Dvp / W, nk, true);
    }
    clock.lap(kPhaseValues);
  };
  // The query block's rows from its state, as split c.
  const auto finish_block = [&](const SeqInfo<AttnFwdParams>& seq, int64_t c, int64_t hq, int64_t q0, int64_t mq,
                                float* ob, const float* mb, const float* lb) {
    for (int64_t i = 0; i < mq; ++i)
      store_fwd_row(p, c, hq, seq.query_row(hq, q0 + i), seq.stat(hq, q0 + i), ob + i * ldo, mb[i], lb[i]);
    clock.lap(kPhaseStore);
  };

  if (p.threads_own_kv_heads) {
    // Whole kv heads begin, begin + stride, ...: key chunk by key chunk, each query block of a
    // group attends to the chunk's blocks (only those its window shows), so the chunk's K and V
    // stay in L2 while the query blocks' states stream through.
    const int64_t chunk = fwd_chunk_blocks(ldk, ldv) * BK;
    for (int64_t unit = begin; unit < p.B * p.Hkv; unit += stride) {
      const int64_t b = unit / p.Hkv, hkv = unit % p.Hkv;
      const SeqInfo<AttnFwdParams> seq(p, b, hkv);
      fill(packed.p, nkb, 0.f);
      for (int64_t s0 = 0; s0 < head_blocks; s0 += held) {
        for (int64_t c0 = 0; c0 < max64(seq.len, 1); c0 += chunk) {
          const bool first = c0 == 0, last = c0 + chunk >= seq.len;
          for (int64_t s = s0; s < min64(s0 + held, head_blocks); ++s) {  // (query head, query block) s
            const int64_t hq = hkv * G + s / nqb, q0 = (s % nqb) * BQ, mq = min64(BQ, seq.q_len - q0);
            float* qtb = qt.p + (s - s0) * p.D * ldq;
            float* ob = o.p + (s - s0) * BQ * ldo;
            float* mb = mvec.p + (s - s0) * BQ;
            float* lb = lvec.p + (s - s0) * BQ;
            if (first) start_block(seq, hq, q0, mq, qtb, ob, mb, lb);
            const int64_t kend = min64(c0 + chunk, seq.vis.key_end(q0, mq));
            for (int64_t k0 = max64(c0, seq.vis.key_begin(q0) / BK * BK); k0 < kend; k0 += BK)
              attend_block(seq, b, hq, q0, mq, k0, qtb, ob, mb, lb);
            if (last) finish_block(seq, 0, hq, q0, mq, ob, mb, lb);
          }
        }
      }
    }
    return;
  }
  // Items begin, begin + stride, ...: (batch, kv head, query head, query block, key split).
  int64_t current = -1;
  for (int64_t it = begin; it < end; it += stride) {
    const int64_t c = it % p.nsplit;  // split c: key blocks [kb0, kb1)
    const int64_t kb0 = c * nkb / p.nsplit, kb1 = (c + 1) * nkb / p.nsplit;
    int64_t rest = it / p.nsplit;
    const int64_t qb = rest % nqb;
    rest /= nqb;
    const int64_t g = rest % G;
    rest /= G;
    const int64_t hkv = rest % p.Hkv, b = rest / p.Hkv, hq = hkv * G + g;
    if (b * p.Hkv + hkv != current) {
      current = b * p.Hkv + hkv;
      fill(packed.p, nkb, 0.f);
    }
    const SeqInfo<AttnFwdParams> seq(p, b, hkv);
    const int64_t q0 = qb * BQ, mq = min64(BQ, seq.q_len - q0);
    if (mq <= 0) continue;  // a packed sequence shorter than the longest
    start_block(seq, hq, q0, mq, qt.p, o.p, mvec.p, lvec.p);
    // Only the key blocks the window shows these queries are visited.
    const int64_t kend = min64(kb1 * BK, seq.vis.key_end(q0, mq));
    for (int64_t k0 = max64(kb0, seq.vis.key_begin(q0) / BK) * BK; k0 < kend; k0 += BK)
      attend_block(seq, b, hq, q0, mq, k0, qt.p, o.p, mvec.p, lvec.p);
    finish_block(seq, c, hq, q0, mq, o.p, mvec.p, lvec.p);
  }
}

// ---------------------------------------------------------------- attention forward, few queries
// Decode shapes (a few queries against many keys) waste the query lanes of the layout above.
// Here a work item is (batch, kv head, key split) and its rows are the G x Sq (query head,
// query) pairs of the group, which share every K/V tile (flash-decoding's grouping); scores
// S = Q K^T are dot products along the head dim (keys read in place, converted on the fly),
// the online softmax runs along each row of keys, and O += P V uses the GEMM micro-kernel
// with V's rows as the B operand.
static constexpr int64_t kDecBK = 128;  // keys per tile (multiple of every W)
// Shortest page a tile follows (shorter pages: tiles of kDecBK keys, packed where they
// straddle pages); chosen without a measurement below it.
static constexpr int64_t kMinPageTile = 32;

// Vector i (elements [i, i + W)) of a row of dtype DT, as fp32.
template <int DT>
static inline R load_as(const void* row, int64_t i) {
  if constexpr (DT == kF32) return Vec::load(static_cast<const float*>(row) + i);
  else if constexpr (DT == kBF16) return Vec::load_bf16(static_cast<const uint16_t*>(row) + i);
  else return Vec::load_f16(static_cast<const uint16_t*>(row) + i);
}

// s[r * ld + j] = q_r . k_j for r < RB rows of q (fp32, ld Dp, zero-padded) and j < nk keys
// (rows of dtype DT, `ldk` elements apart, Dp long: read in place, converted on the fly).
// Four keys at a time, so that the FMA chains are independent.
template <int RB, int DT>
static void dot_rows(const float* q, int64_t Dp, const void* k, int64_t ldk, int64_t nk, float* s,
                     int64_t ld) {
  const auto key = [&](int64_t j) { return at_elem(k, j * ldk, DT); };
  int64_t j = 0;
  for (; j + 4 <= nk; j += 4) {
    R acc[RB][4];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[r][c] = Vec::zero();
    for (int64_t d = 0; d < Dp; d += W) {
      R kv[4];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) kv[c] = load_as<DT>(key(j + c), d);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const R qv = Vec::load(q + r * Dp + d);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[r][c] = Vec::fma(qv, kv[c], acc[r][c]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) Vec::hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s + r * ld + j);
  }
  for (; j < nk; ++j) {
    for (int r = 0; r < RB; ++r) {
      R acc = Vec::zero();
      for (int64_t d = 0; d < Dp; d += W) acc = Vec::fma(Vec::load(q + r * Dp + d), load_as<DT>(key(j), d), acc);
      s[r * ld + j] = Vec::hsum(acc);
    }
  }
}

// Up to kDotRows query rows share each key load (4 x kDotRows accumulators in registers).
static constexpr int kDotRows = W >= 16 ? 4 : 2;

template <int DT>
static void dot_all_rows(const float* q, int64_t rows, int64_t Dp, const void* k, int64_t ldk, int64_t nk,
                         float* s, int64_t ld) {
  int64_t r0 = 0;
  for (; r0 + kDotRows <= rows; r0 += kDotRows)
    dot_rows<kDotRows, DT>(q + r0 * Dp, Dp, k, ldk, nk, s + r0 * ld, ld);
  for (; r0 < rows; ++r0) dot_rows<1, DT>(q + r0 * Dp, Dp, k, ldk, nk, s + r0 * ld, ld);
}

template <bool DROPOUT>
static void attn_fwd_rows(const AttnFwdParams& p, int64_t begin, int64_t end, int64_t stride) {
  const int64_t BK = kDecBK;
  const int64_t Dp = round_up(p.D, W), Dvp = round_up(p.Dv, W);
  const int64_t G = p.Hq / p.Hkv, max_rows = G * p.Sq;
  // K is read in place (converted on the fly) when its rows are whole vectors, else packed
  // per tile; V likewise when fp32 (the GEMM's B operand is fp32).
  const bool k_direct = p.D % W == 0;
  const bool v_direct = p.dtype == kF32 && p.Dv % W == 0;
  // Rows share one mask row when the mask varies along neither heads nor queries.
  const bool shared_mask = p.mask.ptr && p.mask.sh == 0 && p.mask.sq == 0;
  // Keys per tile: BK, or one page of a paged cache whose pages are shorter (but at least
  // kMinPageTile keys), so that tiles do not straddle pages and keys are read in place
  // (bf16, 64-key pages, B=8, Hkv=8, 4096 keys: 1.23x the contiguous cache's time with
  // straddling tiles packed, about 1.0x with tiles following the pages).
  const SeqLayout& L = p.seqs;
  const int64_t tile = L.block_table && L.block_size < BK && L.block_size >= kMinPageTile ? L.block_size : BK;
  const int64_t tile_w = round_up(tile, W);  // width of the softmax row steps (-inf padded)
  Scratch qs(max_rows * Dp), o(max_rows * Dvp), mvec(max_rows), lvec(max_rows), s(max_rows * BK),
      bias(max_rows * BK), visible(max_rows), kp(BK * Dp), vp(BK * Dvp);
  for (int64_t it = begin; it < end; it += stride) {
    const int64_t c = it % p.nsplit, pair = it / p.nsplit;  // split c: key blocks [kb0, kb1)
    const int64_t hkv = pair % p.Hkv, b = pair / p.Hkv;
    const SeqInfo<AttnFwdParams> seq(p, b, hkv);
    const int64_t sq = seq.q_len, rows = G * sq;  // this sequence's (query head, query) rows
    if (rows == 0) continue;
    // The tiles holding every key some query sees (starting on a tile boundary: pages).
    const int64_t kbegin_all = seq.vis.key_begin(0) / tile * tile, kend_all = seq.vis.key_end(0, sq);
    const int64_t nkb = ceil_div(kend_all - kbegin_all, tile);
    const int64_t kb0 = c * nkb / p.nsplit, kb1 = (c + 1) * nkb / p.nsplit;
    for (int64_t r = 0; r < rows; ++r) {  // Q rows with the softmax scale folded in
      load_row(seq.query(p.q, hkv * G + r / sq, r % sq), p.dtype, p.D, qs.p + r * Dp, p.scale);
      fill(qs.p + r * Dp + p.D, Dp - p.D, 0.f);
    }
    fill(mvec.p, rows, kLowest);  // finite, so that m_old - m_new is never inf - inf
    fill(lvec.p, rows, 0.f);
    fill(o.p, rows * Dvp, 0.f);
    for (int64_t k0 = kbegin_all + kb0 * tile; k0 < kbegin_all + kb1 * tile; k0 += tile) {
      const int64_t nk = min64(tile, kend_all - k0);
      bool any = true;
      if (p.mask.ptr) {  // bias rows; a tile no row sees is skipped (key padding)
        any = false;
        for (int64_t r = 0; r < (shared_mask ? 1 : rows); ++r) {
          visible.p[r] = mask_row(p.mask, b, hkv * G + r / sq, r % sq, k0, nk, bias.p + r * BK) ? 1.f : 0.f;
          any |= visible.p[r] != 0.f;
        }
      }
      if (!any) continue;
      // Tiles that cross a page of a paged cache are packed (their rows are not equally spaced).
      const bool tile_contiguous = seq.contiguous(k0, nk);
      if (k_direct && tile_contiguous) {
        const char* kbase = seq.key(k0);
        switch (p.dtype) {
          case kF32: dot_all_rows<kF32>(qs.p, rows, Dp, kbase, p.k.ss, nk, s.p, BK); break;
          case kBF16: dot_all_rows<kBF16>(qs.p, rows, Dp, kbase, p.k.ss, nk, s.p, BK); break;
          default: dot_all_rows<kF16>(qs.p, rows, Dp, kbase, p.k.ss, nk, s.p, BK); break;
        }
      } else {
        for (int64_t j = 0; j < nk; ++j) {
          load_row(seq.key(k0 + j), p.dtype, p.D, kp.p + j * Dp, 1.f);
          fill(kp.p + j * Dp + p.D, Dp - p.D, 0.f);
        }
        dot_all_rows<kF32>(qs.p, rows, Dp, kp.p, Dp, nk, s.p, BK);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* srow = s.p + r * BK;
        if (p.softcap > 0.f) cap_scores(srow, round_up(nk, W), p.softcap);
        const int64_t i = r % sq;
        const float slope = seq.alibi_slope(hkv * G + r / sq);
        if (slope != 0.f) alibi_row(srow, round_up(nk, W), slope, i + seq.vis.diagonal - k0);
        if (p.mask.ptr) {
          const int64_t mr = shared_mask ? 0 : r;
          if (visible.p[mr] == 0.f) {
            fill(srow, tile_w, -kInf);
          } else {
            const float* brow = bias.p + mr * BK;
            for (int64_t j = 0; j < nk; ++j) srow[j] = add_bias(srow[j], brow[j]);
          }
        }
        // Query i sees keys [first, end) of the tile; the padding past nk is hidden too.
        const int64_t first = max64(0, min64(nk, seq.vis.key_begin(i) - k0));
        const int64_t end = max64(first, min64(nk, seq.vis.key_end(i, 1) - k0));
        fill(srow, first, -kInf);
        fill(srow + end, tile_w - end, -kInf);
        const float m_old = mvec.p[r];
        const float mx = row_max(srow, tile_w);
        const float m_new = mx > m_old ? mx : m_old;
        const float sum = exp_sum(srow, tile_w, m_new);
        const float a = exp_shifted(m_old, m_new);
        lvec.p[r] = lvec.p[r] * a + sum;
        mvec.p[r] = m_new;
        if (a != 1.f) scale_row(o.p + r * Dvp, Dvp, a);
        if constexpr (DROPOUT) drop_row(p.dropout, b * p.Hq + hkv * G + r / sq, i, k0, nk, srow);
      }
      const float* vt;
      int64_t ldv;
      if (v_direct && tile_contiguous) {
        vt = reinterpret_cast<const float*>(seq.value(k0)), ldv = p.v.ss;
      } else {
        for (int64_t j = 0; j < nk; ++j) {
          load_row(seq.value(k0 + j), p.dtype, p.Dv, vp.p + j * Dvp, 1.f);
          fill(vp.p + j * Dvp + p.Dv, Dvp - p.Dv, 0.f);
        }
        vt = vp.p, ldv = Dvp;
      }
      gemm(s.p, BK, vt, ldv, o.p, Dvp, rows, Dvp / W, nk, true);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t hq = hkv * G + r / sq, i = r % sq;
      store_fwd_row(p, c, hq, seq.query_row(hq, i), seq.stat(hq, i), o.p + r * Dvp, mvec.p[r], lvec.p[r]);
    }
  }
}

// ---------------------------------------------------------------- attention backward
// Per work item (batch, kv head, chunk of key blocks): for each query head of the group, the
// transposed tiles S^T = K Q^T and dP^T = V dO^T are recomputed from the saved row max and
// row sum (P = exp(S - row_max) / row_sum), and
//   dV += P^T dO,  dK += dS^T Q,  dQ^T += K^T dS^T  (K^T read as a column-major operand).
// Every output element belongs to exactly one item (dq of chunked items goes to a per-chunk
// buffer reduced afterwards in a fixed order), so there are no races and results are
// deterministic.
static constexpr int64_t kBwdBQ = 64;
static constexpr int64_t kBwdBK = 64;
static_assert(kFwdBQ <= kLanes && kDecBK <= kLanes && kBwdBQ <= kLanes, "alibi_row covers a row with kLanes offsets");
// The backward takes the key blocks of a head in groups: each query block is read from cache
// (Q, Q^T, dO, dO^T and dQ^T: 3 * ldd + 2 * lddv floats a query) once per group of key blocks
// instead of once per key block. That pays once a head's query side outgrows the core's L2
// and costs a little while it fits. One thread, fp32, CPU time of the backward with groups of
// 1 / 2 / 4 / 8 key blocks (Xeon AVX-512, 2 MiB L2 | EPYC Zen 1 AVX2, 512 KiB L2):
//   (4, 12, 512, 64)     59.6 / 59.6 / 60.1 / 61.6 ms | 248 / 258 / 260 / 257 ms
//   (2, 8, 1024, 128)    149 / 147 / 143 / 145 ms     | 743 / 694 / 681 / 674 ms
//   (1, 8, 2048, 128)    288 / 274 / 271 / 265 ms     | 1498 / 1380 / 1324 / 1336 ms
//   (1, 12, 2048, 64)    216 / 209 / 206 / 197 ms     | 1099 / 1050 / 1016 / 990 ms
// So a head whose query side fits in 1 MiB (S 512 at head dim 64) takes one key block at a
// time, others as many as keep the group's K and V within 256 KiB (8 at head dim 64, 4 at 128).
static constexpr int64_t kBwdMaxGroup = 8;
static inline int64_t bwd_max_group(int64_t ldd, int64_t lddv) {
  const int64_t kv_bytes = kBwdBK * (ldd + lddv) * int64_t(sizeof(float));
  return max64(1, min64(kBwdMaxGroup, (int64_t(256) << 10) / kv_bytes));
}
static inline int64_t bwd_group(int64_t sq, int64_t ldd, int64_t lddv) {
  const int64_t query_bytes = sq * (3 * ldd + 2 * lddv) * int64_t(sizeof(float));
  return query_bytes <= (int64_t(1) << 20) ? 1 : bwd_max_group(ldd, lddv);
}

template <bool DROPOUT>
static void attn_bwd(const AttnBwdParams& p, int64_t begin, int64_t end, int64_t stride) {
  const int64_t BQ = kBwdBQ, BK = kBwdBK;
  const int64_t Dp = round_up(p.D, W), Dvp = round_up(p.Dv, W);
  const int64_t G = p.Hq / p.Hkv;
  const int64_t Sqp = round_up(p.Sq, BQ), nkb = ceil_div(p.Sk, BK);
  const int64_t esz = elem_size(p.dtype);
  const int64_t max_chunk_keys = ceil_div(nkb, p.nchunks) * BK;
  // The transposed (dim x query) buffers Q^T, dO^T and dQ^T are stored one (dims x BQ) tile
  // per query block, so that a GEMM operand is one contiguous tile: a (dims x Sq) matrix
  // would put each of an operand's rows on its own page once Sq >= 1024 and thrash the TLB.
  // Element (d, i) of a buffer of `dims` rows is at transposed(i, dims) + d * ldt.
  const int64_t ldt = pitch(BQ), ldd = pitch(p.D), lddv = pitch(p.Dv);  // row pitches
  const auto transposed = [BQ, ldt](int64_t i, int64_t dims) { return (i / BQ) * dims * ldt + i % BQ; };
  const int64_t tiles = Sqp / BQ;
  Scratch qt(tiles * Dp * ldt), qr(Sqp * ldd), dot(tiles * Dvp * ldt), dor(Sqp * lddv), delta(Sqp), row_max(Sqp),
      neg_log2_sum(Sqp), dqt(tiles * Dp * ldt);
  // K and V in fp32, packed once per item: with a GQA group, all the item's key blocks stay
  // packed for every query head (G - 1 packs of each saved: the pack phase 10-16% shorter at
  // 4 query heads per kv head); with one query head, only the current key group's, which
  // stays in cache (the whole item's buffer made the pack phase ~8% longer at S 512).
  const bool keep_kv = G > 1;
  const int64_t kv_rows = keep_kv ? max_chunk_keys : bwd_max_group(ldd, lddv) * BK;
  Scratch kr(kv_rows * ldd), vr(kv_rows * lddv), packed(max_chunk_keys / BK), st(BK * BQ),
      dst(BK * BQ), dcap(BK * BQ), bias(BQ * BK), row(Dp > Dvp ? Dp : Dvp), row2(Dvp), dkacc(max_chunk_keys * ldd),
      dvacc(max_chunk_keys * lddv);
  PhaseClock<kBwdPhases> clock(p.phase_ns);
  for (int64_t it = begin; it < end; it += stride) {
    const int64_t c = it % p.nchunks;
    const int64_t rest = it / p.nchunks;
    const int64_t hkv = rest % p.Hkv, b = rest / p.Hkv;
    const SeqInfo<AttnBwdParams> seq(p, b, hkv);
    const int64_t sq = seq.q_len, sk = seq.len, nqb = ceil_div(sq, BQ);
    const Visibility& vis = seq.vis;
    const int64_t kb0 = c * nkb / p.nchunks, kb1 = (c + 1) * nkb / p.nchunks;
    const int64_t group = bwd_group(sq, ldd, lddv);
    // The first packed row of key block kb (of the group that starts at block `first`).
    const auto kv_row = [&](int64_t kb, int64_t first) { return (kb - (keep_kv ? kb0 : first)) * BK; };
    fill(dkacc.p, (kb1 - kb0) * BK * ldd, 0.f);
    fill(dvacc.p, (kb1 - kb0) * BK * lddv, 0.f);
    fill(packed.p, kb1 - kb0, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t hq = hkv * G + g;
      const float slope = seq.alibi_slope(hq);
      // Pack this query head: Q (row-major) and Q^T (times scale), dO and dO^T, delta, the row
      // statistics.
      for (int64_t i = 0; i < sq; ++i) {
        float* qrow = qr.p + i * ldd;
        load_row(seq.query(p.q, hq, i), p.dtype, p.D, qrow, 1.f);
        fill(qrow + p.D, Dp - p.D, 0.f);
        float* qcol = qt.p + transposed(i, Dp);
        for (int64_t d = 0; d < p.D; ++d) qcol[d * ldt] = qrow[d] * p.scale;
        float* dorow = dor.p + i * lddv;
        load_row(seq.query(p.dout, hq, i), p.dtype, p.Dv, dorow, 1.f);
        fill(dorow + p.Dv, Dvp - p.Dv, 0.f);
        float* docol = dot.p + transposed(i, Dvp);
        for (int64_t d = 0; d < p.Dv; ++d) docol[d * ldt] = dorow[d];
        load_row(seq.query(p.out, hq, i), p.dtype, p.Dv, row2.p, 1.f);
        fill(row2.p + p.Dv, Dvp - p.Dv, 0.f);
        // delta = rowsum(dO * O) in double: on nearly one-hot rows dP - delta cancels to
        // almost nothing, so fp32 rounding here would dominate dS (O(Sq * Dv), off the hot path).
        delta.p[i] = float(dot_double(dorow, row2.p, p.Dv));
        // P = exp2((s - row_max) * log2(e) - log2(row_sum)): the max subtracted exactly first,
        // then one fma; log2(row_sum) is small (the sum lies in [1, 2^8 Sk]), so its rounding costs
        // P far less than an fp32 lse would. A row that saw no key has row_sum 0: row_max +inf
        // makes its P (and gradients) exactly 0.
        const int64_t stat = seq.stat(hq, i);
        const float l = p.row_sum[stat];
        row_max.p[i] = l == 0.f ? kInf : p.row_max[stat];
        neg_log2_sum.p[i] = l == 0.f ? 0.f : -std::log2(l);
      }
      for (int64_t i = sq; i < nqb * BQ; ++i) {
        fill(qr.p + i * ldd, Dp, 0.f);
        fill(dor.p + i * lddv, Dvp, 0.f);
        for (int64_t d = 0; d < p.D; ++d) qt.p[transposed(i, Dp) + d * ldt] = 0.f;
        for (int64_t d = 0; d < p.Dv; ++d) dot.p[transposed(i, Dvp) + d * ldt] = 0.f;
        delta.p[i] = 0.f;
        row_max.p[i] = kInf;
        neg_log2_sum.p[i] = 0.f;
      }
      fill(dqt.p, nqb * Dp * ldt, 0.f);
      for (int64_t first = kb0; first < kb1; first += group) {
        // Pack the group's visible key blocks (on the first query head) and find the query
        // blocks that see any of them.
        const int64_t last = min64(kb1, first + group);
        int64_t qb_begin[kBwdMaxGroup], qb_end[kBwdMaxGroup], group_qb_begin = nqb, group_qb_end = 0;
        for (int64_t kb = first; kb < last; ++kb) {
          const int64_t slot = kb - first, k0 = kb * BK, nk = min64(BK, sk - k0);
          qb_begin[slot] = qb_end[slot] = 0;  // no query block sees keys past a packed sequence's end
          if (nk <= 0) continue;
          // Only the query blocks the window shows these keys to are visited.
          const int64_t qstart = vis.query_begin(k0), qend = vis.query_end(k0, nk, sq);
          if (qstart >= qend) continue;
          qb_begin[slot] = qstart / BQ;
          qb_end[slot] = ceil_div(qend, BQ);
          group_qb_begin = min64(group_qb_begin, qb_begin[slot]);
          group_qb_end = max64(group_qb_end, qb_end[slot]);
          if (packed.p[kb - kb0] != 0.f) continue;
          packed.p[kb - kb0] = 1.f;
          const int64_t r0 = kv_row(kb, first);
          for (int64_t j = 0; j < nk; ++j) {
            load_row(seq.key(k0 + j), p.dtype, p.D, kr.p + (r0 + j) * ldd, 1.f);
            load_row(seq.value(k0 + j), p.dtype, p.Dv, vr.p + (r0 + j) * lddv, 1.f);
          }
        }
        for (int64_t qb = group_qb_begin; qb < group_qb_end; ++qb) {
          const int64_t q0 = qb * BQ, mq = min64(BQ, sq - q0);
          for (int64_t kb = first; kb < last; ++kb) {
            const int64_t slot = kb - first;
            if (qb < qb_begin[slot] || qb >= qb_end[slot]) continue;
            const int64_t k0 = kb * BK, nk = min64(BK, sk - k0);
            const float* kt = kr.p + kv_row(kb, first) * ldd;
            const float* vt = vr.p + kv_row(kb, first) * lddv;
            float* dkb = dkacc.p + (kb - kb0) * BK * ldd;
            float* dvb = dvacc.p + (kb - kb0) * BK * lddv;
            bool per_query = false;
            if (p.mask.ptr && !mask_tile(p.mask, b, hq, q0, mq, k0, nk, bias.p, BK, &per_query)) continue;
            clock.lap(kBwdPack);
            const bool partial = vis.classify(q0, mq, k0, nk) == Tile::kPartial;
            if (partial) {
              gemm_in_window_t(vis, q0, k0, kt, ldd, qt.p + transposed(q0, Dp), ldt, st.p, BQ, nk, p.D);
              gemm_in_window_t(vis, q0, k0, vt, lddv, dot.p + transposed(q0, Dvp), ldt, dst.p, BQ, nk, p.Dv);
            } else {
              gemm(kt, ldd, qt.p + transposed(q0, Dp), ldt, st.p, BQ, nk, BQ / W, p.D, false);
              gemm(vt, lddv, dot.p + transposed(q0, Dvp), ldt, dst.p, BQ, nk, BQ / W, p.Dv, false);
            }
            clock.lap(kBwdRecompute);
            if (p.softcap > 0.f) {
              cap_scores(st.p, nk * BQ, p.softcap);
              cap_derivative(st.p, nk * BQ, p.softcap, dcap.p);
            }
            if (slope != 0.f) alibi_tile_t(st.p, BQ, nk, slope, q0, k0, vis.diagonal);
            mask_scores_t(st.p, BQ, nk, mq, bias.p, BK, per_query, p.mask.ptr != nullptr, partial ? &vis : nullptr,
                          q0, k0);
            // P, and dS = P (dP - delta) in place of S^T and dP^T. With dropout (factors Z / (1 - p),
            // regenerated): dP = (dO V^T) Z / (1 - p), and dV takes the dropped P Z / (1 - p).
            const R log2e = Vec::set1(kLog2e);
            const auto probabilities = [&](int64_t j, int64_t i, R factor) {
              float* s = st.p + j * BQ + i;
              float* ds = dst.p + j * BQ + i;
              const R shifted = Vec::sub(Vec::load(s), Vec::load(row_max.p + q0 + i));
              const R pv = Vec::exp2(Vec::fma(shifted, log2e, Vec::load(neg_log2_sum.p + q0 + i)));
              const R dp = DROPOUT ? Vec::mul(Vec::load(ds), factor) : Vec::load(ds);
              Vec::store(ds, Vec::mul(pv, Vec::sub(dp, Vec::load(delta.p + q0 + i))));
              Vec::store(s, DROPOUT ? Vec::mul(pv, factor) : pv);
            };
            if constexpr (DROPOUT) {
              const U head = Vec::u_set1(uint32_t(b * p.Hq + hq));
              for (int64_t i = 0; i < BQ; i += W) {
                const U rows = Vec::u_iota(uint32_t(q0 + i));
                for (int64_t j = 0; j < nk; j += 4) {
                  R factors[4];
                  keep_factors(p.dropout, head, rows, Vec::u_set1(uint32_t((k0 + j) / 4)), factors);
                  for (int64_t w = 0; w < min64(4, nk - j); ++w) probabilities(j + w, i, factors[w]);
                }
              }
            } else {
              for (int64_t j = 0; j < nk; ++j)
                for (int64_t i = 0; i < BQ; i += W) probabilities(j, i, Vec::zero());
            }
            if (p.dmask) {
              float* dm = p.dmask + ((b * p.Hq + hq) * p.Sq + q0) * p.Sk + k0;
              for (int64_t i = 0; i < mq; ++i)
                for (int64_t j = 0; j < nk; ++j) dm[i * p.Sk + j] = dst.p[j * BQ + i];
            }
            // The mask adds to the capped scores; q and k see the cap's slope too.
            if (p.softcap > 0.f)
              for (int64_t e = 0; e < nk * BQ; e += W)
                Vec::store(dst.p + e, Vec::mul(Vec::load(dst.p + e), Vec::load(dcap.p + e)));
            clock.lap(kBwdSoftmax);
            if (partial) {
              // Each block of key rows takes only the queries that see its keys (the others'
              // P and dS are 0).
              for (int64_t j0 = 0; j0 < nk; j0 += Vec::MR) {
                const int64_t rows = min64(Vec::MR, nk - j0);
                const int64_t queries_from = max64(0, vis.query_begin(k0 + j0) - q0);
                const int64_t queries_to = min64(mq, vis.query_end(k0 + j0, rows, sq) - q0);
                if (queries_to <= queries_from) continue;
                const int64_t depth = queries_to - queries_from;
                gemm(st.p + j0 * BQ + queries_from, BQ, dor.p + (q0 + queries_from) * lddv, lddv, dvb + j0 * lddv,
                     lddv, rows, Dvp / W, depth, true);
                gemm(dst.p + j0 * BQ + queries_from, BQ, qr.p + (q0 + queries_from) * ldd, ldd, dkb + j0 * ldd, ldd,
                     rows, Dp / W, depth, true);
              }
            } else {
              gemm(st.p, BQ, dor.p + q0 * lddv, lddv, dvb, lddv, nk, Dvp / W, mq, true);
              gemm(dst.p, BQ, qr.p + q0 * ldd, ldd, dkb, ldd, nk, Dp / W, mq, true);
            }
            gemm<true>(kt, ldd, dst.p, BQ, dqt.p + transposed(q0, Dp), ldt, p.D, BQ / W, nk, true);
            clock.lap(kBwdProducts);
          }
        }
      }
      // dq of this head (transposed back); chunked items write unscaled fp32 partials.
      for (int64_t i = 0; i < sq; ++i) {
        const float* dqcol = dqt.p + transposed(i, Dp);
        for (int64_t d = 0; d < p.D; ++d) row.p[d] = dqcol[d * ldt];
        if (p.nchunks == 1) {
          char* dq = static_cast<char*>(p.dq) + seq.query_row(hq, i) * p.D * esz;
          store_row(dq, p.dtype, p.D, row.p, p.scale);
        } else {
          float* dq = p.dq_partial + (c * p.seqs.rows + seq.query_row(hq, i)) * p.D;
          store_row(dq, kF32, p.D, row.p, 1.f);
        }
      }
      clock.lap(kBwdStore);
    }
    for (int64_t key = kb0 * BK; key < min64(kb1 * BK, sk); ++key) {
      const int64_t local = key - kb0 * BK;
      char* dk = static_cast<char*>(p.dk) + seq.key_row(key) * p.D * esz;
      char* dv = static_cast<char*>(p.dv) + seq.key_row(key) * p.Dv * esz;
      store_row(dk, p.dtype, p.D, dkacc.p + local * ldd, p.scale);
      store_row(dv, p.dtype, p.Dv, dvacc.p + local * lddv, 1.f);
    }
    clock.lap(kBwdStore);
  }
}

// ---------------------------------------------------------------- fused softmax
// Rows of any length: the row is staged once in fp32 (z = scale*x + mask), then max, exp+sum
// and the normalised store each stream over it.
static void softmax_fwd(const SoftmaxFwdParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t Cp = round_up(p.C, W);
  const int64_t esz = elem_size(p.dtype);
  const Visibility vis(p.window, p.R, p.C);
  constexpr int64_t kMaskChunk = 1024;
  Scratch z(Cp), mchunk(kMaskChunk);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t i = r % p.R, bh = r / p.R, h = bh % p.H, b = bh / p.H;
    const char* x = at_elem(p.x.ptr, b * p.x.sb + h * p.x.sh + i * p.x.ss, p.dtype);
    char* y = static_cast<char*>(p.y) + r * p.C * esz;
    // Row i sees columns [first, end): only those are read.
    const int64_t first = vis.key_begin(i), end = max64(first, vis.key_end(i, 1));
    fill(z.p, first, -kInf);
    load_row(at_elem(x, first, p.dtype), p.dtype, end - first, z.p + first, p.scale);
    if (p.mask.ptr) {
      for (int64_t c0 = first; c0 < end; c0 += kMaskChunk) {
        const int64_t n = min64(kMaskChunk, end - c0);
        mask_row(p.mask, b, h, i, c0, n, mchunk.p);
        for (int64_t j = 0; j < n; ++j) z.p[c0 + j] = add_bias(z.p[c0 + j], mchunk.p[j]);
      }
    }
    fill(z.p + end, Cp - end, -kInf);
    const float mx = row_max(z.p, Cp);
    // Nothing visible: zeros. (The vector max drops NaN, so a NaN among hidden entries is
    // looked for on this rare path; exp then carries it through the row.)
    if (mx == -kInf && !any_nan(z.p + first, end - first)) {
      fill(z.p, p.C, 0.f);
      store_row(y, p.dtype, p.C, z.p, 1.f);
      continue;
    }
    const float sum = exp_sum(z.p, Cp, mx);
    store_row(y, p.dtype, p.C, z.p, 1.f / sum);
  }
}

static void softmax_bwd(const SoftmaxBwdParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t Cp = round_up(p.C, W);
  const int64_t esz = elem_size(p.dtype);
  Scratch gy(Cp), y(Cp);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t i = r % p.R, bh = r / p.R, h = bh % p.H, b = bh / p.H;
    load_row(at_elem(p.gy.ptr, b * p.gy.sb + h * p.gy.sh + i * p.gy.ss, p.dtype), p.dtype, p.C, gy.p, 1.f);
    load_row(at_elem(p.y.ptr, b * p.y.sb + h * p.y.sh + i * p.y.ss, p.dtype), p.dtype, p.C, y.p, 1.f);
    fill(gy.p + p.C, Cp - p.C, 0.f);
    fill(y.p + p.C, Cp - p.C, 0.f);
    R acc = Vec::zero();
    for (int64_t j = 0; j < Cp; j += W) acc = Vec::fma(Vec::load(gy.p + j), Vec::load(y.p + j), acc);
    const R dotv = Vec::set1(Vec::hsum(acc));
    for (int64_t j = 0; j < Cp; j += W)
      Vec::store(gy.p + j, Vec::mul(Vec::load(y.p + j), Vec::sub(Vec::load(gy.p + j), dotv)));
    store_row(static_cast<char*>(p.gx) + r * p.C * esz, p.dtype, p.C, gy.p, 1.f);
  }
}

// The peak FMA rate of one core with this variant's vectors, the ceiling the benchmark
// reports attention's GFLOP/s against: kFmaChains independent accumulators stay in registers
// (enough chains to cover the FMA latency on every pipe) and nothing touches memory.
static int64_t fma_peak(int64_t iterations) {
  constexpr int kFmaChains = 12;
  R acc[kFmaChains];
  for (int c = 0; c < kFmaChains; ++c) acc[c] = Vec::set1(1.f + 1e-3f * static_cast<float>(c));
  const R a = Vec::set1(0.999999f), b = Vec::set1(1e-7f);
  for (int64_t i = 0; i < iterations; ++i) {
    for (int c = 0; c < kFmaChains; ++c) acc[c] = Vec::fma(acc[c], a, b);
  }
  for (int c = 1; c < kFmaChains; ++c) acc[0] = Vec::add(acc[0], acc[c]);
  volatile float keep = Vec::hsum(acc[0]);  // the loop's result is used: it cannot be dropped
  (void)keep;
  return 2 * Vec::W * kFmaChains * iterations;
}

// The attention kernels' own tile GEMM (`gemm`, accumulating) on one 64 x 64 x 64 tile that
// stays in L1, `iterations` times on this thread; returns its FLOPs. Timed, the rate their
// GEMM phases would reach with no cache misses: what the micro-kernel's loads, set-up and
// stores leave of the FMA peak.
static int64_t tile_gemm_peak(int64_t iterations) {
  constexpr int64_t T = 64;
  const int64_t ld = pitch(T);
  Scratch a(T * ld), b(T * ld), c(T * ld);
  for (int64_t i = 0; i < T * ld; ++i) {
    a.p[i] = 1e-3f * static_cast<float>(i % 7);
    b.p[i] = 1e-3f * static_cast<float>(i % 5);
    c.p[i] = 0.f;
  }
  for (int64_t i = 0; i < iterations; ++i) gemm(a.p, ld, b.p, ld, c.p, ld, T, T / W, T, true);
  volatile float keep = c.p[0];  // the GEMMs' result is used: they cannot be dropped
  (void)keep;
  return 2 * T * T * T * iterations;
}

static const KernelTable kTable = {
    kIsaName,
    kFwdBQ,
    kFwdBK,
    kDecBK,
    kBwdBK,
    choose_dropout<AttnFwdParams, attn_fwd<true>, attn_fwd<false>>,
    choose_dropout<AttnFwdParams, attn_fwd_rows<true>, attn_fwd_rows<false>>,
    choose_dropout<AttnBwdParams, attn_bwd<true>, attn_bwd<false>>,
    softmax_fwd,
    softmax_bwd,
    fma_peak,
    tile_gemm_peak,
};

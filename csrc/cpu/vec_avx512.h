// 16-lane fp32 vector for AVX-512 (F, BW, VL, DQ). Included inside a per-ISA namespace by
// kernels_avx512.cpp, after <immintrin.h>, under a `target` pragma.
struct Vec {
  using R = __m512;
  static constexpr int W = 16;
  static constexpr int MR = 6;   // micro-kernel rows
  static constexpr int NVR = 4;  // micro-kernel columns, in vectors (6 x 4 = 24 accumulators)

  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R set1(float x) { return _mm512_set1_ps(x); }
  static inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static inline R max(R a, R b) { return _mm512_max_ps(a, b); }
  static inline R div(R a, R b) { return _mm512_div_ps(a, b); }
  static inline R abs(R x) { return _mm512_abs_ps(x); }
  // |magnitude| with the sign of `sign`.
  static inline R copysign(R magnitude, R sign) {
    const R bit = _mm512_set1_ps(-0.f);
    return _mm512_or_ps(_mm512_andnot_ps(bit, magnitude), _mm512_and_ps(bit, sign));
  }
  // Lane-wise a < b ? x : y.
  static inline R select_lt(R a, R b, R x, R y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
  }
  static inline float hsum(R x) { return _mm512_reduce_add_ps(x); }
  static inline float hmax(R x) { return _mm512_reduce_max_ps(x); }
  // out[0..3] = hsum(a), hsum(b), hsum(c), hsum(d): the four reductions share their shuffles.
  static inline void hsum4(R a, R b, R c, R d, float* out) {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], likewise c/d, then [a, b, c, d] partials.
    const R ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const R cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const R x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
    const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1)));
  }

  // 2^x with ~1 ulp error (degree-6 polynomial on [-0.5, 0.5]); exactly 0 for x <= -125,
  // including -inf. Those lanes are zeroed by mask rather than by underflow: results that
  // underflow (or are subnormal) take slow microcode assists, which made masked rows ~8x slower.
  // NaN stays NaN: the unordered compare keeps NaN lanes, and max returns its second operand
  // when either is NaN.
  static inline R exp2(R x) {
    const R lo = _mm512_set1_ps(-125.f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLE_UQ);
    x = _mm512_max_ps(lo, x);
    const R n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R r = _mm512_sub_ps(x, n);
    R p = _mm512_set1_ps(1.5403530393e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291076e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504108665e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022650696e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718056e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(keep, p, n);
  }

  static inline R load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static inline R load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void store_bf16(uint16_t* p, R x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  }
  static inline void store_f16(uint16_t* p, R x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Bool mask bytes -> additive bias: 0 where the byte is non-zero, -inf where it is zero.
  static inline R load_bool_bias(const uint8_t* p) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __mmask16 keep = _mm_test_epi8_mask(b, b);
    return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-__builtin_inff()), _mm512_setzero_ps());
  }

  // 32-bit unsigned lanes, for the dropout generator (Philox, kernels.h).
  using U = __m512i;
  static inline U u_set1(uint32_t x) { return _mm512_set1_epi32(int(x)); }
  static inline U u_iota(uint32_t first) {  // first, first + 1, ...
    return _mm512_add_epi32(u_set1(first), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  static inline U u_xor(U a, U b) { return _mm512_xor_si512(a, b); }
  // The high and low words of a * m (32 x 32 -> 64 bits) per lane: _mm512_mul_epu32 multiplies
  // the even lanes, so the odd ones are shifted down for a second multiply.
  static inline void mulhilo(U a, uint32_t m, U* hi, U* lo) {
    const U mul = u_set1(m);
    const U even = _mm512_mul_epu32(a, mul);
    const U odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), mul);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }
  // Lane-wise word >= threshold (unsigned) ? x : 0.
  static inline R select_ge(U word, U threshold, R x) {
    return _mm512_maskz_mov_ps(_mm512_cmp_epu32_mask(word, threshold, _MM_CMPINT_NLT), x);
  }
};

// 8-lane fp32 vector for AVX2 + FMA + F16C. Included inside a per-ISA namespace by
// kernels_avx2.cpp after <immintrin.h>.
struct Vec {
  using R = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 6;   // micro-kernel rows
  static constexpr int NVR = 2;  // micro-kernel columns in vectors (6 x 2 = 12 of 16 registers)

  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R set1(float x) { return _mm256_set1_ps(x); }
  static inline R load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static inline R max(R a, R b) { return _mm256_max_ps(a, b); }
  static inline R div(R a, R b) { return _mm256_div_ps(a, b); }
  static inline R abs(R x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
  // |magnitude| with the sign of `sign`.
  static inline R copysign(R magnitude, R sign) {
    const R bit = _mm256_set1_ps(-0.f);
    return _mm256_or_ps(_mm256_andnot_ps(bit, magnitude), _mm256_and_ps(bit, sign));
  }
  // Lane-wise a < b ? x : y.
  static inline R select_lt(R a, R b, R x, R y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
  static inline float hsum(R x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[0..3] = hsum(a), hsum(b), hsum(c), hsum(d): the four reductions share their shuffles.
  static inline void hsum4(R a, R b, R c, R d, float* out) {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], likewise c/d, then [a, b, c, d] partials.
    const R ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    const R cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    const R x = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)));
  }
  static inline float hmax(R x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // 2^x within 1.5 ulp (degree-5 minimax polynomial on [-0.5, 0.5], exact at 0); exactly 0
  // for x <= -125 (including -inf), by mask: results that underflow or are subnormal take slow
  // microcode assists. x + 1.5 * 2^23 rounds x to an integer n held in the low mantissa bits;
  // with 127 added there, those bits shifted into the exponent field are 2^n, which saves the
  // round, convert and clamp steps (an exp loop ran 1.2x faster). NaN stays NaN (the unordered
  // compare keeps NaN lanes). x must be < 128 or NaN.
  static inline R exp2(R x) {
    const R shift = _mm256_set1_ps(12582912.f + 127.f);
    const R t = _mm256_add_ps(x, shift);
    const R r = _mm256_sub_ps(x, _mm256_sub_ps(t, shift));  // x - n, in [-0.5, 0.5]
    R p = _mm256_set1_ps(1.3264727313e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.6715129912e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.5507335812e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.4022242427e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.9314700365e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const R two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
    const R keep = _mm256_cmp_ps(x, _mm256_set1_ps(-125.f), _CMP_NLE_UQ);
    return _mm256_and_ps(keep, _mm256_mul_ps(p, two_n));
  }

  static inline R load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static inline R load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline void store_bf16(uint16_t* p, R x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
    __m256i hi = _mm256_srli_epi32(rounded, 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static inline void store_f16(uint16_t* p, R x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline R load_bool_bias(const uint8_t* p) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    R hidden = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, _mm256_setzero_si256()));
    return _mm256_and_ps(hidden, _mm256_set1_ps(-__builtin_inff()));
  }

  // 32-bit unsigned lanes, for the dropout generator (Philox, kernels.h).
  using U = __m256i;
  static inline U u_set1(uint32_t x) { return _mm256_set1_epi32(int(x)); }
  static inline U u_iota(uint32_t first) {  // first, first + 1, ...
    return _mm256_add_epi32(u_set1(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline U u_xor(U a, U b) { return _mm256_xor_si256(a, b); }
  // The high and low words of a * m (32 x 32 -> 64 bits) per lane: _mm256_mul_epu32 multiplies
  // the even lanes, so the odd ones are shifted down for a second multiply.
  static inline void mulhilo(U a, uint32_t m, U* hi, U* lo) {
    const U mul = u_set1(m);
    const U even = _mm256_mul_epu32(a, mul);
    const U odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), mul);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
  // Lane-wise word >= threshold (unsigned) ? x : 0.
  static inline R select_ge(U word, U threshold, R x) {
    const U ge = _mm256_cmpeq_epi32(_mm256_max_epu32(word, threshold), word);
    return _mm256_and_ps(_mm256_castsi256_ps(ge), x);
  }
};

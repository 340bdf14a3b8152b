// Portable 8-lane fp32 "vector" (plain arrays the compiler may auto-vectorise): the fallback
// where no intrinsic variant was compiled. Included inside a per-ISA namespace.
struct Vec {
  struct R {
    float v[8];
  };
  static constexpr int W = 8;
  static constexpr int MR = 4;
  static constexpr int NVR = 2;

  static inline R zero() { return set1(0.f); }
  static inline R set1(float x) {
    R r;
    for (int i = 0; i < W; ++i) r.v[i] = x;
    return r;
  }
  static inline R load(const float* p) {
    R r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static inline void store(float* p, R x) {
    for (int i = 0; i < W; ++i) p[i] = x.v[i];
  }
  static inline R fma(R a, R b, R c) {
    for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static inline R add(R a, R b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static inline R sub(R a, R b) {
    for (int i = 0; i < W; ++i) a.v[i] -= b.v[i];
    return a;
  }
  static inline R mul(R a, R b) {
    for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static inline R max(R a, R b) {
    for (int i = 0; i < W; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static inline R div(R a, R b) {
    for (int i = 0; i < W; ++i) a.v[i] /= b.v[i];
    return a;
  }
  static inline R abs(R x) {
    for (int i = 0; i < W; ++i) x.v[i] = std::fabs(x.v[i]);
    return x;
  }
  static inline R copysign(R magnitude, R sign) {
    for (int i = 0; i < W; ++i) magnitude.v[i] = std::copysign(magnitude.v[i], sign.v[i]);
    return magnitude;
  }
  static inline R select_lt(R a, R b, R x, R y) {
    for (int i = 0; i < W; ++i) x.v[i] = a.v[i] < b.v[i] ? x.v[i] : y.v[i];
    return x;
  }
  static inline float hsum(R x) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += x.v[i];
    return s;
  }
  static inline void hsum4(R a, R b, R c, R d, float* out) {
    out[0] = hsum(a), out[1] = hsum(b), out[2] = hsum(c), out[3] = hsum(d);
  }
  static inline float hmax(R x) {
    float m = x.v[0];
    for (int i = 1; i < W; ++i) m = x.v[i] > m ? x.v[i] : m;
    return m;
  }
  static inline R exp2(R x) {
    for (int i = 0; i < W; ++i) x.v[i] = std::exp2(x.v[i]);
    return x;
  }
  static inline R load_bf16(const uint16_t* p) {
    R r;
    for (int i = 0; i < W; ++i) r.v[i] = bf16_to_f32(p[i]);
    return r;
  }
  static inline R load_f16(const uint16_t* p) {
    R r;
    for (int i = 0; i < W; ++i) r.v[i] = f16_to_f32(p[i]);
    return r;
  }
  static inline void store_bf16(uint16_t* p, R x) {
    for (int i = 0; i < W; ++i) p[i] = f32_to_bf16(x.v[i]);
  }
  static inline void store_f16(uint16_t* p, R x) {
    for (int i = 0; i < W; ++i) p[i] = f32_to_f16(x.v[i]);
  }
  static inline R load_bool_bias(const uint8_t* p) {
    R r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i] ? 0.f : -std::numeric_limits<float>::infinity();
    return r;
  }

  // 32-bit unsigned lanes, for the dropout generator (Philox, kernels.h).
  struct U {
    uint32_t v[8];
  };
  static inline U u_set1(uint32_t x) {
    U r;
    for (int i = 0; i < W; ++i) r.v[i] = x;
    return r;
  }
  static inline U u_iota(uint32_t first) {
    U r;
    for (int i = 0; i < W; ++i) r.v[i] = first + uint32_t(i);
    return r;
  }
  static inline U u_xor(U a, U b) {
    for (int i = 0; i < W; ++i) a.v[i] ^= b.v[i];
    return a;
  }
  static inline void mulhilo(U a, uint32_t m, U* hi, U* lo) {
    for (int i = 0; i < W; ++i) {
      const uint64_t product = uint64_t(a.v[i]) * m;
      hi->v[i] = uint32_t(product >> 32), lo->v[i] = uint32_t(product);
    }
  }
  static inline R select_ge(U word, U threshold, R x) {
    for (int i = 0; i < W; ++i) x.v[i] = word.v[i] >= threshold.v[i] ? x.v[i] : 0.f;
    return x;
  }
};

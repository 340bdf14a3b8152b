// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator behind attention dropout: the keep/drop decision of every score is a
// pure function of (seed, offset, batch, head, query, key, p), so a backward pass regenerates
// it instead of storing a mask, and every backend makes the same decision bit for bit.
// fastattn/philox.py computes the same with torch operations (the reference and the tests).
//
// Plain C++ (no torch headers); the functions are host and device code under nvcc.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;      // round multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;    // key schedule increments
constexpr int kRounds = 10;

struct Block {
  uint32_t x[4];
};

FASTATTN_HOST_DEVICE Block philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                         uint32_t k1) {
  for (int round = 0; round < kRounds; ++round) {
    const uint64_t p0 = uint64_t(kMul0) * c0, p1 = uint64_t(kMul1) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Block{{c0, c1, c2, c3}};
}

// Scores (row `row` of head `bh` = batch * heads + head) are decided four keys per Philox
// block: counter (key / 4, row, bh, offset), key (seed low, seed high), word key % 4. A score is
// kept when its word is >= threshold = floor(p * 2^32).
FASTATTN_HOST_DEVICE uint64_t drop_threshold(double p) { return uint64_t(p * 4294967296.0); }

FASTATTN_HOST_DEVICE Block keep_words(uint64_t seed, uint32_t offset, uint32_t bh, uint32_t row, uint32_t key4) {
  return philox4x32_10(key4, row, bh, offset, uint32_t(seed), uint32_t(seed >> 32));
}

FASTATTN_HOST_DEVICE bool keep(uint64_t seed, uint32_t offset, uint32_t bh, uint32_t row, uint32_t key,
                               uint64_t threshold) {
  return keep_words(seed, offset, bh, row, key / 4).x[key % 4] >= threshold;
}

}  // namespace philox
}  // namespace fastattn

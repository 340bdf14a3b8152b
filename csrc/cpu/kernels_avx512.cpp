// AVX-512 variant of the CPU kernels, chosen at run time on CPUs that have it (the rest of the
// extension is built for AVX2). Standard headers come first, without the target pragma, so no
// out-of-line library code is emitted with AVX-512 instructions; everything compiled under
// the pragma lives in its own namespace.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "../philox.h"
#include "params.h"
#include "workspace.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
// GCC 12 reports false "may be used uninitialized" inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

namespace fastattn {
namespace cpu {
namespace isa_avx512 {
static constexpr const char* kIsaName = "avx512";
#include "scalar.h"
#include "vec_avx512.h"
#include "kernels.h"
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace fastattn

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const fastattn::cpu::KernelTable* fastattn::cpu::kernels_avx512() { return &isa_avx512::kTable; }

#else
const fastattn::cpu::KernelTable* fastattn::cpu::kernels_avx512() { return nullptr; }
#endif

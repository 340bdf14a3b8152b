// AVX2 + FMA + F16C variant of the CPU kernels (the build's baseline flags on x86-64).
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

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace fastattn {
namespace cpu {
namespace isa_avx2 {
static constexpr const char* kIsaName = "avx2";
#include "scalar.h"
#include "vec_avx2.h"
#include "kernels.h"
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace fastattn

const fastattn::cpu::KernelTable* fastattn::cpu::kernels_avx2() { return &isa_avx2::kTable; }

#else
const fastattn::cpu::KernelTable* fastattn::cpu::kernels_avx2() { return nullptr; }
#endif

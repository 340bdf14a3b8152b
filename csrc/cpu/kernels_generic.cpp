// Portable variant of the CPU kernels (plain C++ the compiler auto-vectorises): used on
// CPUs or architectures without a hand-written variant, and as a cross-check in tests.
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

namespace fastattn {
namespace cpu {
namespace isa_generic {
static constexpr const char* kIsaName = "generic";
#include "scalar.h"
#include "vec_generic.h"
#include "kernels.h"
}  // namespace isa_generic
}  // namespace cpu
}  // namespace fastattn

const fastattn::cpu::KernelTable* fastattn::cpu::kernels_generic() { return &isa_generic::kTable; }

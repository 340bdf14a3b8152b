// Flash attention forward kernels for head dims up to 256 (backward stops at 128).
#include "flash_launch.cuh"

namespace fastattn {
namespace cuda {
namespace flash {
FA_INSTANTIATE_FWD(256)
}  // namespace flash
}  // namespace cuda
}  // namespace fastattn

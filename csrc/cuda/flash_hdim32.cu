// Flash attention forward and backward kernels for head dims up to 32.
#include "flash_launch.cuh"

namespace fastattn {
namespace cuda {
namespace flash {
FA_INSTANTIATE_FWD(32)
FA_INSTANTIATE_BWD(32)
}  // namespace flash
}  // namespace cuda
}  // namespace fastattn

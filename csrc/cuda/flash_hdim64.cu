// Flash attention forward and backward kernels for head dims up to 64.
#include "flash_launch.cuh"

namespace fastattn {
namespace cuda {
namespace flash {
FA_INSTANTIATE_FWD(64)
FA_INSTANTIATE_BWD(64)
}  // namespace flash
}  // namespace cuda
}  // namespace fastattn

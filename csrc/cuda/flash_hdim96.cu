// Flash attention forward and backward kernels for head dims up to 96.
#include "flash_launch.cuh"

namespace fastattn {
namespace cuda {
namespace flash {
FA_INSTANTIATE_FWD(96)
FA_INSTANTIATE_BWD(96)
}  // namespace flash
}  // namespace cuda
}  // namespace fastattn

// Flash attention forward and backward kernels for head dims up to 128.
#include "flash_launch.cuh"

namespace fastattn {
namespace cuda {
namespace flash {
FA_INSTANTIATE_FWD(128)
FA_INSTANTIATE_BWD(128)
}  // namespace flash
}  // namespace cuda
}  // namespace fastattn

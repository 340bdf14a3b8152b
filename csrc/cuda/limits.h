// What the CUDA kernels accept, as plain constants: included by the kernels (fastattn_cuda.h)
// and by csrc/fastattn.cpp, which exports them to Python (fastattn._C.capabilities) in every
// build, so dispatch reads the limits from here instead of a copy.
#pragma once

namespace fastattn {
namespace cuda {

// Largest head dim of each kernel; smaller multiples of kHeadDimMultiple are zero-padded up to
// the next instantiated one.
constexpr int kMaxHeadDimFwd = 256;
constexpr int kMaxHeadDimBwd = 128;
// Head dims are read in 16-byte rows of 8 half-precision elements (cp.async, ldmatrix).
constexpr int kHeadDimMultiple = 8;
// mma.sync with bf16 operands and cp.async need sm_80.
constexpr int kMinComputeCapability = 80;

}  // namespace cuda
}  // namespace fastattn

// CPU implementation of fastattn::dropout_keep_mask: the keep/drop decisions the attention
// kernels make for a dropout call (csrc/philox.h), as a bool tensor, so that they can be
// checked against fastattn/philox.py and inspected by users.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../philox.h"

namespace fastattn {
namespace cpu {
namespace {

at::Tensor dropout_keep_mask_cpu(const at::Tensor& rng_state, int64_t batch, int64_t heads, int64_t rows,
                                 int64_t cols, double p) {
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2,
              "rng_state must be an int64 tensor (seed, offset), got ", rng_state.scalar_type(), " ",
              rng_state.sizes());
  TORCH_CHECK(batch >= 0 && heads >= 0 && rows >= 0 && cols >= 0, "sizes must be non-negative, got (",
              batch, ", ", heads, ", ", rows, ", ", cols, ")");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "p must be in [0, 1], got ", p);
  const at::Tensor state = rng_state.cpu().contiguous();
  const uint64_t seed = uint64_t(state.data_ptr<int64_t>()[0]);
  const uint32_t offset = uint32_t(state.data_ptr<int64_t>()[1]);
  const uint64_t threshold = philox::drop_threshold(p);
  at::Tensor mask = at::empty({batch, heads, rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  at::parallel_for(0, batch * heads * rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t bh = uint32_t(r / rows), row = uint32_t(r % rows);
      for (int64_t key4 = 0; key4 * 4 < cols; ++key4) {
        const philox::Block words = philox::keep_words(seed, offset, bh, row, uint32_t(key4));
        for (int64_t w = 0; w < 4 && key4 * 4 + w < cols; ++w) out[r * cols + key4 * 4 + w] = words.x[w] >= threshold;
      }
    }
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) { m.impl("dropout_keep_mask", dropout_keep_mask_cpu); }

}  // namespace cpu
}  // namespace fastattn

#include "workspace.h"

#include <cstdlib>
#include <new>
#include <vector>

// Under AddressSanitizer a kept buffer is poisoned past the size asked for and while released,
// so that overruns and late uses of scratch are still caught although the memory is reused.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace fastattn {
namespace cpu {
namespace {

struct Buffer {
  void* p = nullptr;
  size_t bytes = 0;
};

struct Workspace {
  std::vector<Buffer> slots;  // slot i: the buffer of nesting depth i
  size_t depth = 0;           // buffers in use
  size_t kept = 0;            // bytes held by all slots
  ~Workspace() {
    for (Buffer& b : slots) {
      UNPOISON(b.p, b.bytes);
      std::free(b.p);
    }
  }
};

thread_local Workspace workspace;

}  // namespace

float* acquire_scratch(int64_t n) {
  const size_t bytes = (size_t(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64;
  Workspace& ws = workspace;
  if (ws.depth == ws.slots.size()) ws.slots.emplace_back();
  Buffer& b = ws.slots[ws.depth];
  if (b.bytes < bytes) {
    UNPOISON(b.p, b.bytes);
    std::free(b.p);
    ws.kept -= b.bytes;
    b = Buffer{};
    b.p = std::aligned_alloc(64, bytes);
    if (b.p == nullptr) throw std::bad_alloc();
    b.bytes = bytes;
    ws.kept += bytes;
  }
  UNPOISON(b.p, bytes);
  POISON(static_cast<char*>(b.p) + bytes, b.bytes - bytes);
  ++ws.depth;
  return static_cast<float*>(b.p);
}

void release_scratch() {
  Workspace& ws = workspace;
  Buffer& b = ws.slots[--ws.depth];
  if (ws.kept > kKeptScratchBytes) {
    UNPOISON(b.p, b.bytes);
    std::free(b.p);
    ws.kept -= b.bytes;
    b = Buffer{};
  } else {
    POISON(b.p, b.bytes);
  }
}

}  // namespace cpu
}  // namespace fastattn

// Scratch memory of the CPU kernels, kept by each thread between calls.
//
// Memory fresh from the system costs a page fault on the first touch of every 4 KiB page (a few
// microseconds each on a virtual machine). Allocated and freed by every call, the backward's
// scratch at head dim 128 and 1024 queries (about 4 MiB a thread) cost about two thousand
// faults a call. So each thread keeps its buffers, one per nesting depth: kernels acquire
// scratch as locals, released in the reverse order. Once a thread holds more than
// kKeptScratchBytes, buffers are freed on release instead.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace cpu {

constexpr size_t kKeptScratchBytes = size_t(16) << 20;

// 64-byte aligned room for n floats (contents undefined), this thread's until the matching
// release_scratch().
float* acquire_scratch(int64_t n);
// Releases the buffer this thread acquired last.
void release_scratch();

// Scratch for the lifetime of a local.
struct Scratch {
  float* const p;
  explicit Scratch(int64_t n) : p(acquire_scratch(n)) {}
  ~Scratch() { release_scratch(); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

}  // namespace cpu
}  // namespace fastattn

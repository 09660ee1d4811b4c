// A cache of the CPU kernels' large per-call buffers (the saved gates, the
// outputs, the step gradients: tens to hundreds of MB at the `large` sizes).
//
// glibc serves every block past its mmap threshold (32 MB at most) from a
// fresh mmap and unmaps it on free, so each call of a large layer page-faulted
// its buffers in again: about 10% of an LSTM's or GRU's training step at
// T=200, B=64, H=512. Blocks of at least kHostCacheMinBytes come from here
// instead (4 MB: below that, the per-call buffers of the fused loss's head,
// h's and W_out's gradients and MKL's packed W_out of 8 MB at T=256, B=32,
// H=256, O=8192, allocated and freed by glibc at every call, raised its
// dynamic mmap threshold and left its heap fragmented: bench/loss_memory.py's
// peak growth went from 125-131 MB to 150-230 MB, from run to run): rounded up to 2 MB (aligned, and marked for transparent huge pages
// where the kernel allows it), and kept when their tensor dies, for the next
// call of the same or a slightly smaller size, up to a cap of cached free
// bytes (RNNKERN_HOST_CACHE_MB, default 1024; 0 turns the cache off). As
// torch's CUDA caching allocator does, it keeps memory that a user may see as
// resident; rnnkern.empty_cache() hands it back.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rnnkern::cpu {

inline constexpr std::int64_t kHostCacheMinBytes = std::int64_t(4) << 20;

c10::Allocator* host_cache_allocator();

struct HostCacheInfo {
  std::int64_t cached_bytes = 0;  // free blocks held for reuse
  std::int64_t in_use_bytes = 0;  // blocks some tensor holds
  std::int64_t limit_bytes = 0;   // the cap on cached_bytes
  std::int64_t hits = 0, misses = 0;
};
HostCacheInfo host_cache_info();
// Frees every cached block (blocks in use return to the OS when freed, until
// the cache has room again).
void host_cache_empty();

// at::empty, but a buffer of kHostCacheMinBytes or more comes from the cache.
at::Tensor big_empty(at::IntArrayRef sizes, const at::TensorOptions& opts);
inline at::Tensor big_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return big_empty(sizes, opts).zero_();
}

}  // namespace rnnkern::cpu

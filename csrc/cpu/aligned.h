// Scratch buffers for the vector kernels, aligned to a cache line.
//
// std::vector and new[] align to 16 bytes only, and glibc serves a large block
// (past 128 KB) from mmap at 16 bytes past a page: a packed W_hh that the
// fused steps stream with 64-byte loads would then split every load over two
// cache lines, on every step. Smaller blocks land anywhere mod 64, so their
// speed changed from process to process (the LSTM and GRU forward at seed
// size measured 0.45 or 1.9 ms by the luck of one malloc). ATen's own
// tensors are 64-byte aligned already.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <vector>

namespace rnnkern::cpu {

constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheAligned<T>>;

}  // namespace rnnkern::cpu

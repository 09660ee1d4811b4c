// Reverse with lengths (the reverse direction of a bidirectional layer on
// variable-length input) runs each sequence from its last valid step back to
// time 0, so at one processing step the sequences sit at different time
// indices. The fused steps address one [B, W] time block per step; the time
// loops run such a call as a forward one over each sequence reversed within
// its length, which is this permutation of the rows of a [T,B,W] tensor:
//   (t, b) <-> (len_b - 1 - t, b) for t < len_b; the rows at t >= len_b stay.
// It is its own inverse. Each sequence is moved by one thread, so the bits do
// not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "aligned.h"

namespace rnnkern::cpu {

// dst = the permutation of src, both [T,B,W] contiguous; dst == src permutes in place.
template <typename T>
void reverse_within_lengths(T* dst, const T* src, int64_t T_, int64_t B, int64_t W,
                            const int64_t* lengths) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(T_ * W, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t len = lengths[b];
      auto row = [&](auto* base, int64_t t) { return base + (t * B + b) * W; };
      if (dst == src) {
        for (int64_t t = 0; t < len / 2; ++t) std::swap_ranges(row(dst, t), row(dst, t) + W,
                                                               row(dst, len - 1 - t));
      } else {
        for (int64_t t = 0; t < T_; ++t)
          std::memcpy(row(dst, t), row(src, t < len ? len - 1 - t : t), sizeof(T) * W);
      }
    }
  });
}

// A [T,B,W] copy of src in the reversed-within-lengths order, owned by the
// caller (cache-line aligned: the fused steps read it with vector loads).
template <typename T>
struct ReversedCopy {
  mutable AlignedVector<T> data;  // writable through a const copy, as unique_ptr's get()
  T* get() const { return data.data(); }
};

template <typename T>
ReversedCopy<T> reversed_within_lengths(const T* src, int64_t T_, int64_t B, int64_t W,
                                        const int64_t* lengths) {
  ReversedCopy<T> dst{AlignedVector<T>(size_t(T_ * B * W))};
  reverse_within_lengths(dst.get(), src, T_, B, W, lengths);
  return dst;
}

}  // namespace rnnkern::cpu

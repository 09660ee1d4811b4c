// Parameter gradients summed over the rows inside a fused backward loop, a
// row tile at a time while the tile's rows are in cache (elman_cpu.cpp
// row_sums_in_loop, layer_cpu.cpp gated_row_sums_in_loop): each tile keeps
// its own partial sums, added tile by tile in tile order after the loop, so
// the bits do not depend on how the tiles are split across threads.
#pragma once

#include <algorithm>
#include <cstdint>

#include "vec_kernels.h"

namespace rnnkern::cpu {

// A tile's partial sums of a^T b in atb_block's blocks ([nb][mb] blocks of
// kAtbCols x atb_width, each b column's run of a's columns contiguous), and
// their sum over the tiles into c [M,N] (row-major).
template <typename T>
struct TileAtb {
  int64_t M, N, MR, mb, nb, block;
  TileAtb(const VecKernels<T>& vk, int64_t M_, int64_t N_)
      : M(M_), N(N_), MR(vk.atb_width), mb((M_ + MR - 1) / MR),
        nb((N_ + kAtbCols - 1) / kAtbCols), block(kAtbCols * MR) {}
  int64_t size() const { return mb * nb * block; }
  // part += a^T b over K rows
  void add(const VecKernels<T>& vk, const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K,
           T* part) const {
    for (int64_t ib = 0; ib < mb; ++ib)
      for (int64_t jb = 0; jb < nb; ++jb) {
        const int64_t i0 = ib * MR, n0 = jb * kAtbCols;
        vk.atb_block(a + i0, lda, b + n0, ldb, K, std::min(MR, M - i0),
                     std::min(kAtbCols, N - n0), part + (ib * nb + jb) * block, MR, true);
      }
  }
  // c = the sum over `tiles` partial sums (each `stride` apart), in tile order
  void sum(const T* parts, int64_t tiles, int64_t stride, T* c) const {
    for (int64_t ib = 0; ib < mb; ++ib)
      for (int64_t jb = 0; jb < nb; ++jb) {
        const int64_t i0 = ib * MR, n0 = jb * kAtbCols, off = (ib * nb + jb) * block;
        for (int64_t n = 0; n < std::min(kAtbCols, N - n0); ++n)
          for (int64_t i = 0; i < std::min(MR, M - i0); ++i) {
            T v = parts[off + n * MR + i];
            for (int64_t q = 1; q < tiles; ++q) v += parts[q * stride + off + n * MR + i];
            c[(i0 + i) * N + n0 + n] = v;
          }
      }
  }
};

// c[j] = the sum over `tiles` partial sums (each `stride` apart) of part[j],
// j < n, in tile order
template <typename T>
void sum_over_tiles(const T* parts, int64_t tiles, int64_t stride, int64_t n, T* c) {
  for (int64_t j = 0; j < n; ++j) {
    T v = parts[j];
    for (int64_t q = 1; q < tiles; ++q) v += parts[q * stride + j];
    c[j] = v;
  }
}

}  // namespace rnnkern::cpu

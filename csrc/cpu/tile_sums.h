// Parameter gradients summed over the rows inside a fused backward loop, a
// row tile at a time while the tile's rows are in cache (RowTileSums, used by
// elman_cpu.cpp and layer_cpu.cpp where row_sums_fit): each tile keeps its own
// partial sums, added tile by tile in tile order after the loop, so the bits
// do not depend on how the tiles are split across threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "aligned.h"
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

// Whether a fused backward loop takes its parameter gradients' row sums
// (elman_cpu.cpp row_sums_in_loop, layer_cpu.cpp gated_row_sums_in_loop add
// their own conditions). Separate products over all T*B rows after the loop
// read every row back, half of them from the other core's cache. Intel Xeon,
// 2 threads, bench medians in alternating processes: Elman `seed` training
// step 0.654 -> 0.584 ms, `long` (H = 64) 6.18 -> 5.65 ms; LSTM `seed` 1.39 ->
// 1.22 ms, GRU 1.25 -> 1.07 ms; but Elman `small` (H = 128, a tile's dW_hh
// partial sums past L1) 3.10 -> 3.30 ms, hence kRowSumsMaxH. Not with reverse
// and lengths, whose loops run on a reordered copy of the sequences.
constexpr int64_t kRowSumsMaxH = 64, kRowSumsMaxI = 64;
inline bool row_sums_fit(int64_t rows, int64_t H, int64_t I, bool reverse_with_lengths) {
  return rows > 0 && H > 0 && H <= kRowSumsMaxH && I <= kRowSumsMaxI && !reverse_with_lengths;
}

// The row sums one fused backward loop takes: each term is a product a^T b
// (atb) or column sums (cols) over the rows, each row tile keeping its own
// partial sums of every term (tile(r0) for the tile of row r0), which finish()
// adds in tile order into the terms' outputs.
template <typename T>
class RowTileSums {
 public:
  RowTileSums(const VecKernels<T>& vk, int64_t rows)
      : vk_(vk), rb_(vk.row_block), tiles_((rows + vk.row_block - 1) / vk.row_block) {}
  // Registers c [M,N] (row-major) = the sum over the rows of a^T b.
  int atb(int64_t M, int64_t N, T* c) {
    terms_.push_back({TileAtb<T>(vk_, M, N), 0, stride_, c});
    stride_ += terms_.back().prod.size();
    return int(terms_.size()) - 1;
  }
  // Registers c [n] = the column sums over the rows.
  int cols(int64_t n, T* c) {
    terms_.push_back({TileAtb<T>(vk_, 0, 0), n, stride_, c});
    stride_ += n;
    return int(terms_.size()) - 1;
  }
  // After the terms are registered: every tile's partial sums, zero.
  void start() { parts_.assign(size_t(tiles_ * stride_), T(0)); }
  // f(part, r0, n) for each row tile [r0, r0 + n) of rows [b0, b1), b0 at a
  // tile's start.
  template <class F>
  void for_tiles(int64_t b0, int64_t b1, F&& f) {
    for (int64_t r0 = b0; r0 < b1; r0 += rb_) f(parts_.data() + (r0 / rb_) * stride_, r0, std::min(rb_, b1 - r0));
  }
  // part's term k += a^T b over n rows
  void add_atb(int k, T* part, const T* a, int64_t lda, const T* b, int64_t ldb, int64_t n) const {
    const Term& t = terms_[k];
    t.prod.add(vk_, a, lda, b, ldb, n, part + t.off);
  }
  // part's term k += the column sums of a [n, t.n] (leading dimension lda)
  void add_cols(int k, T* part, const T* a, int64_t n, int64_t lda) const {
    const Term& t = terms_[k];
    vk_.add_column_sums(part + t.off, a, n, t.n, lda);
  }
  void finish() const {
    for (const Term& t : terms_) {
      if (t.n > 0) sum_over_tiles(parts_.data() + t.off, tiles_, stride_, t.n, t.out);
      else t.prod.sum(parts_.data() + t.off, tiles_, stride_, t.out);
    }
  }

 private:
  struct Term {
    TileAtb<T> prod;  // an atb term's blocks (empty for cols)
    int64_t n;        // a cols term's width (0 for atb)
    int64_t off;      // offset in each tile's partial sums
    T* out;
  };
  const VecKernels<T>& vk_;
  int64_t rb_, tiles_, stride_ = 0;
  std::vector<Term> terms_;
  AlignedVector<T> parts_;
};

}  // namespace rnnkern::cpu

// Packing a weight matrix into the panels the register tiles stream.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "aligned.h"

namespace rnnkern::cpu {

// M [K,N] (strides sk, sn) -> panels of pw columns, [ceil(N/pw), K, pw]:
// panel jb holds M[k][jb*pw + l] at (jb*K + k)*pw + l, zero padded. A tile of
// pw columns then reads its k-rows from one contiguous run (with the rows of
// M one after another, a k-row was a cache line 1-2 KB from the next, and the
// tile stalled on those loads). *NP = N rounded up to vl, the columns the
// tiles cover. pack_panels_to writes them into `packed`, whose padding the
// caller has zeroed; with pw >= N, one panel: M as [K, pw] rows.
template <typename T>
void pack_panels_to(T* packed, const T* m, int64_t K, int64_t N, int64_t sk, int64_t sn,
                    int64_t pw) {
  const int64_t NB = (N + pw - 1) / pw;
  for (int64_t jb = 0; jb < NB; ++jb) {
    const int64_t n0 = jb * pw, w = std::min(pw, N - n0);
    T* dst = packed + jb * K * pw;
    for (int64_t k = 0; k < K; ++k, dst += pw) {
      const T* src = m + k * sk + n0 * sn;
      if (sn == 1) std::memcpy(dst, src, sizeof(T) * size_t(w));
      else
        for (int64_t l = 0; l < w; ++l) dst[l] = src[l * sn];
    }
  }
}

// pack_panels_to into a new zeroed buffer of ceil(N/pw) * K * pw elements.
template <typename T>
AlignedVector<T> pack_panels(const T* m, int64_t K, int64_t N, int64_t sk, int64_t sn, int64_t pw,
                             int64_t vl, int64_t* NP) {
  *NP = (N + vl - 1) / vl * vl;
  AlignedVector<T> packed(size_t((N + pw - 1) / pw * K * pw), T(0));
  pack_panels_to(packed.data(), m, K, N, sk, sn, pw);
  return packed;
}

}  // namespace rnnkern::cpu

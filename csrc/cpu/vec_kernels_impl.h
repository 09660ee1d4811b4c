// Included once by each vec_kernels_<cap>.cpp after it has chosen the
// instruction set. Everything here lives in a namespace named after the
// capability, so the three copies never collide at link time.
#pragma once

#ifndef RNNKERN_CAP
#error "define RNNKERN_CAP before including vec_kernels_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../cells/elman.h"
#include "../cells/gru.h"
#include "../cells/lstm.h"
#include "vec_kernels.h"

namespace rnnkern::cpu {
namespace RNNKERN_CAP {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------
// Fused steps: a register tile of RB rows x CB vectors accumulates a[rows,:] M
// over k, then the epilogue finishes each vector in registers.
// ---------------------------------------------------------------------------

template <typename T>
struct Tiling {
  // Accumulators RB*CB, plus CB loads of M and a broadcast, must fit the
  // register file (32 zmm with AVX-512, 16 ymm otherwise).
  static constexpr bool kWide = Vectorized<T>::size() * sizeof(T) >= 64;
  static constexpr int RB = kWide ? 8 : 4;
  static constexpr int CB = 2;                   // VecKernels::panel_width, in vectors
  static constexpr int CB_WIDE = kWide ? 3 : 0;  // VecKernels::wide_panel_width
};

// tanh for float32 as an odd rational function, x P(x^2) / Q(x^2), on x clamped
// to +-7.905, the end of the fit. Its error is at most 7 ulp (4e-7 relative),
// 1 ulp on average (tests/test_activation.py measures it), and it inlines: a
// call to Sleef's tanh inside the fused step spills the whole register tile
// and made tanh 80% of a step. float64 keeps Sleef's 1-ulp tanh.
// Past |x| = 9.0109 (where tanh(x) rounds to +-1 in float32) the result is
// exactly +-1, as ATen's tanh: a saturated unit must have act' = 1 - h^2 = 0,
// or huge inputs leak huge gradients. NaN stays NaN.
// The clamps (here and in the sigmoid below) are raw intrinsics with AVX2 and
// AVX-512: ATen's minimum/maximum add a NaN test and an OR to each, where
// max_ps(c, x) alone returns its second operand x when either is NaN, so NaN
// passes with one instruction. With AVX-512 the saturation is a masked move
// too: ATen's comparisons and blendv turn masks into vectors and back. Perf
// put about a tenth of the LSTM's fused tile in those wrappers (Zen 4).
inline Vectorized<float> clamp_keep_nan(Vectorized<float> x, float lo, float hi) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), x));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), x));
#else
  using V = Vectorized<float>;
  return at::vec::minimum(at::vec::maximum(x, V(lo)), V(hi));
#endif
}

inline Vectorized<float> tanh_rational(Vectorized<float> x_in) {
  using V = Vectorized<float>;
  const V x = clamp_keep_nan(x_in, -7.90531110763549805f, 7.90531110763549805f);
  const V x2 = x * x;
  V p(-2.76076847742355e-16f);
  p = at::vec::fmadd(p, x2, V(2.00018790482477e-13f));
  p = at::vec::fmadd(p, x2, V(-8.60467152213735e-11f));
  p = at::vec::fmadd(p, x2, V(5.12229709037114e-08f));
  p = at::vec::fmadd(p, x2, V(1.48572235717979e-05f));
  p = at::vec::fmadd(p, x2, V(6.37261928875436e-04f));
  p = at::vec::fmadd(p, x2, V(4.89352455891786e-03f));
  V q(1.19825839466702e-06f);
  q = at::vec::fmadd(q, x2, V(1.18534705686654e-04f));
  q = at::vec::fmadd(q, x2, V(2.26843463243900e-03f));
  q = at::vec::fmadd(q, x2, V(4.89352518554385e-03f));
#if defined(CPU_CAPABILITY_AVX512)
  // 1/q by rcp14 and one Newton step (rel. error ~2^-28): a zmm division
  // costs as much as the rest of the function.
  const __m512 qv = q;
  __m512 r = _mm512_rcp14_ps(qv);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(qv, r, _mm512_set1_ps(2.0f)));
  const __m512 y = x * p * V(r);
  const __mmask16 hi = _mm512_cmp_ps_mask(x_in, _mm512_set1_ps(9.01091289520263672f), _CMP_GE_OQ);
  const __mmask16 lo = _mm512_cmp_ps_mask(x_in, _mm512_set1_ps(-9.01091289520263672f), _CMP_LE_OQ);
  return _mm512_mask_mov_ps(_mm512_mask_mov_ps(y, hi, _mm512_set1_ps(1.0f)), lo,
                            _mm512_set1_ps(-1.0f));
#else
  const V y = x * p / q;
  const V sat(9.01091289520263672f);
  return V::blendv(V::blendv(y, V(1.0f), x_in >= sat), V(-1.0f), x_in <= V(-9.01091289520263672f));
#endif
}

inline Vectorized<float> tanh_vec(Vectorized<float> v) { return tanh_rational(v); }
inline Vectorized<double> tanh_vec(Vectorized<double> v) { return v.tanh(); }

// sigmoid(x) = 1 / (1 + exp(-x)) for float32 with exp inlined, for the same
// reason as tanh above: a call to Sleef's exp in the fused LSTM or GRU step
// spills the register tile, three times per row for the LSTM. exp(y) is
// Cephes' expf: y = n ln2 + r with |r| <= ln2/2 (ln2 in two parts), e^r a
// polynomial, times 2^n. The sigmoid is within 3.1 ulp of float64's, 0.5 on
// average (tests/test_activation.py measures it). It is exactly 1 for large
// x and exactly 0 for x < -88.72, where exp(-x) overflows, as it was with
// Sleef's exp; NaN stays NaN (minimum/maximum keep it; x < c is false).
// Only 2^n and the reciprocal differ by instruction set (ExpSteps below).
// Elsewhere (float64, the portable kernels) Sleef's exp, as before.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
struct ExpSteps {
  using V = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  // scalef makes the subnormals, so y can go as low as exp's underflow.
  static constexpr float kLo = -103.972084f, kHi = 88.3762626647949f;
  static V times_pow2(V m, V n) { return _mm512_scalef_ps(m, n); }
  // rcp14 and one Newton step (relative error ~2^-28): a zmm division costs
  // as much as the rest of the function.
  static V reciprocal(V q) {
    const __m512 inv = _mm512_rcp14_ps(q);
    return _mm512_mul_ps(inv, _mm512_fnmadd_ps(q, inv, _mm512_set1_ps(2.0f)));
  }
#else
  // 2^n from exponent bits: n in [-126, 127] (88.0296919 = 127 ln2).
  static constexpr float kLo = -87.3365447505531f, kHi = 88.0296919311130f;
  static V times_pow2(V m, V n) {
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(m, _mm256_castsi256_ps(bits));
  }
  static V reciprocal(V q) { return V(1.0f) / q; }
#endif
};

inline Vectorized<float> sigmoid_inline(Vectorized<float> x) {
  using V = Vectorized<float>;
  using at::vec::fmadd;
  const V y = clamp_keep_nan(V(0.0f) - x, ExpSteps::kLo, ExpSteps::kHi);
  const V n = (y * V(1.44269504088896341f)).round();
  V r = fmadd(n, V(-0.693359375f), y);
  r = fmadd(n, V(2.12194440e-4f), r);
  V p(1.9875691500e-4f);
  p = fmadd(p, r, V(1.3981999507e-3f));
  p = fmadd(p, r, V(8.3334519073e-3f));
  p = fmadd(p, r, V(4.1665795894e-2f));
  p = fmadd(p, r, V(1.6666665459e-1f));
  p = fmadd(p, r, V(5.0000001201e-1f));
  p = fmadd(p, r * r, r);
  const V e = ExpSteps::times_pow2(p + V(1.0f), n);
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-88.7228391f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(__mmask16(~under), ExpSteps::reciprocal(e + V(1.0f)));
#else
  return V::blendv(ExpSteps::reciprocal(e + V(1.0f)), V(0.0f), x < V(-88.7228391f));
#endif
}
inline Vectorized<float> sigmoid_vec(Vectorized<float> x) { return sigmoid_inline(x); }
#else
inline Vectorized<float> sigmoid_vec(Vectorized<float> x) {
  return Vectorized<float>(1.0f) / (Vectorized<float>(1.0f) + (Vectorized<float>(0.0f) - x).exp());
}
#endif
inline Vectorized<double> sigmoid_vec(Vectorized<double> x) {
  return Vectorized<double>(1.0) / (Vectorized<double>(1.0) + (Vectorized<double>(0.0) - x).exp());
}

}  // namespace RNNKERN_CAP
}  // namespace rnnkern::cpu

// The cells' elementary functions on this capability's vectors: Sleef's exp
// (1 ulp), the tanh above, and relu as ATen's (maximum and blendv keep NaN).
namespace rnnkern::cells {
template <typename S>
struct MathOf<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return rnnkern::cpu::RNNKERN_CAP::tanh_vec(x); }
  static V sigmoid(V x) { return rnnkern::cpu::RNNKERN_CAP::sigmoid_vec(x); }
  static V relu(V x) { return at::vec::maximum(x, V(S(0))); }
  static V relu_backward(V g, V h) { return V::blendv(g, V(S(0)), h <= V(S(0))); }
};
}  // namespace rnnkern::cells

namespace rnnkern::cpu {
namespace RNNKERN_CAP {

// The Elman cell's activation and its backward (cells/elman.h), a vector at a time.
template <typename T>
inline Vectorized<T> act_vec(Activation a, Vectorized<T> v) {
  return act_forward(a, v);
}

template <typename T>
inline Vectorized<T> act_backward_vec(Activation a, Vectorized<T> g, Vectorized<T> h) {
  return act_backward(a, g, h);
}

template <typename T>
void act_inplace(Activation a, T* z, int64_t n) {
  using V = Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    act_vec(a, V::loadu(z + i, m)).store(z + i, m);
  }
}

template <typename T>
void act_add(Activation a, T* dst, const T* x, const T* y, int64_t n) {
  using V = Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    act_vec(a, V::loadu(x + i, m) + V::loadu(y + i, m)).store(dst + i, m);
  }
}

template <typename T>
void grad_z(Activation a, T* dz, const T* g, const T* c, const T* h, int64_t n) {
  using V = Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    act_backward_vec(a, V::loadu(g + i, m) + V::loadu(c + i, m), V::loadu(h + i, m))
        .store(dz + i, m);
  }
}

inline bool active(const int64_t* lens, int64_t b, int64_t step) {
  return lens == nullptr || step < lens[b];
}

// The k-loop of a register tile: acc[r][c] += sum_{k < K} a[r*lda + k] *
// m[k*ldm + c*VL ...], C vectors of M loaded per k, shared by R rows. PF:
// prefetch M kPrefetchK rows ahead, for panels streamed from beyond L2.
constexpr int64_t kPrefetchK = 16;
template <typename T, int R, int C, bool PF = false>
inline void tile_fma(Vectorized<T> (&acc)[R][C], const T* a, int64_t lda, const T* m,
                     int64_t ldm, int64_t K) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  for (int64_t k = 0; k < K; ++k, m += ldm) {
    if constexpr (PF)  // past the end of the panel is harmless: a prefetch never faults
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) __builtin_prefetch(m + kPrefetchK * ldm + c * VL, 0, 3);
    V mv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) mv[c] = V::loadu(m + c * VL);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V ar(a[r * lda + k]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(ar, mv[c], acc[r][c]);
    }
  }
}

template <typename T, int R, int C>
inline void tile_zero(Vectorized<T> (&acc)[R][C]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = Vectorized<T>(T(0));
}

// acc[r][c] = sum_k a[r,k] M[k, j0 + c*VL : ...]  (StepArgs)
template <typename T, int R, int C, bool PF>
inline void tile_gemm(const StepArgs<T>& p, int64_t b, int64_t j0, Vectorized<T> (&acc)[R][C]) {
  tile_zero(acc);
  tile_fma<T, R, C, PF>(acc, p.a + b * p.lda, p.lda, p.mp + (j0 / p.pw) * p.K * p.pw, p.pw,
                        p.K);
}

template <typename T, bool kForward, int R, int C, bool PF>
inline void tile(const StepArgs<T>& p, int64_t b, int64_t j0) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  V acc[R][C];
  const bool gemm = kForward || p.a != nullptr;
  if (gemm) tile_gemm<T, R, C, PF>(p, b, j0, acc);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t row = b + r;
    const bool out_active = active(p.lens, row, p.step_out);
    const bool a_active = gemm && active(p.lens, row, p.step_a);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const int64_t j = j0 + c * VL;
      if (j >= p.N) break;
      const int n = int(std::min<int64_t>(VL, p.N - j));
      const int64_t o = row * p.ldz + j;
      if constexpr (kForward) {
        const V v = out_active ? act_vec(p.act, acc[r][c] + V::loadu(p.z + o, n)) : V(T(0));
        v.store(p.z + o, n);
      } else {
        V v(T(0));
        if (out_active) {
          const V carry = a_active ? acc[r][c] : V::loadu(p.pass + row * p.N + j, n);
          v = act_backward_vec(p.act, V::loadu(p.g + o, n) + carry, V::loadu(p.h + o, n));
        }
        v.store(p.dz + o, n);
      }
    }
  }
}

// The tiling of a fused step over rows [b0, b1) and N columns (NP packed in
// panels of pw): one column tile per panel, as wide as the panel's vectors,
// RB rows at a time, then the rows left one at a time. tile is a generic
// lambda called as tile.template operator()<R, C>(b, j0).
template <typename T, int C, typename Tile>
inline void tile_rows(int64_t b0, int64_t b1, int64_t j0, const Tile& tile) {
  constexpr int RB = Tiling<T>::RB;
  int64_t b = b0;
  for (; b + RB <= b1; b += RB) tile.template operator()<RB, C>(b, j0);
  for (; b < b1; ++b) tile.template operator()<1, C>(b, j0);
}

template <typename T, typename Tile>
inline void for_tiles(int64_t N, int64_t NP, int64_t pw, int64_t b0, int64_t b1,
                      const Tile& tile) {
  constexpr int VL = Vectorized<T>::size();
  for (int64_t j0 = 0; j0 < N; j0 += pw) {
    switch (std::min(pw, NP - j0) / VL) {
      case 3:
        if constexpr (Tiling<T>::CB_WIDE == 3) {
          tile_rows<T, 3>(b0, b1, j0, tile);
          break;
        }
        [[fallthrough]];
      case 2: tile_rows<T, 2>(b0, b1, j0, tile); break;
      default: tile_rows<T, 1>(b0, b1, j0, tile); break;
    }
  }
}

template <typename T, bool kForward, bool PF>
void fused_step_pf(const StepArgs<T>& p, int64_t b0, int64_t b1) {
  for_tiles<T>(p.N, p.NP, p.pw, b0, b1, [&]<int R, int C>(int64_t b, int64_t j0) {
    tile<T, kForward, R, C, PF>(p, b, j0);
  });
}

template <typename T, bool kForward>
void fused_step(const StepArgs<T>& p, int64_t b0, int64_t b1) {
  if (p.prefetch_w) fused_step_pf<T, kForward, true>(p, b0, b1);
  else fused_step_pf<T, kForward, false>(p, b0, b1);
}

template <typename T>
T hmax(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int64_t i = 1; i < Vectorized<T>::size(); ++i) m = std::max(m, lanes[i]);
  return m;
}

template <typename T>
T hsum(const Vectorized<T>& v) {
  // A pairwise tree over the lanes in registers (ATen's shuffles; depth log2
  // of the width), not a chain of one dependent add per lane through memory:
  // the MSE head's per-row sum at a small O (the bench's seed, O = 8) spent
  // most of its time in that chain (Intel Xeon, perf: mse_row 14% of an Elman
  // seed elman_loss_fwd at one thread).
  return at::vec::vec_reduce_all<T>(
      [](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v);
}

// exp as ATen's own softmax computes it for float (about 2e-6 relative error
// where Sleef's u10 gives 1e-7, at about half the cost); double keeps exp().
template <typename T>
Vectorized<T> fast_exp(const Vectorized<T>& v) {
  if constexpr (std::is_same_v<T, float>) return v.exp_u20();
  else return v.exp();
}

template <typename T>
Vectorized<T> load_biased(const T* x, const T* b, int64_t i) {
  return b ? Vectorized<T>::loadu(x + i) + Vectorized<T>::loadu(b + i) : Vectorized<T>::loadu(x + i);
}

// Three passes over one row (a row of a few thousand classes stays in L1/L2):
// max and sum of x + b; exp(x + b - max) and its sum, kept in x when the
// gradient is wanted; then the gradient. Full
// vectors first, the tail in scalar code, so no padding lane ever enters a max
// or a sum.
template <typename T>
T ce_row(T* x, const T* b, int64_t O, int64_t y, T eps, T coef, bool grad) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t Ov = O - O % L;
  V vmax(-std::numeric_limits<T>::infinity()), vsum(T(0));
  for (int64_t i = 0; i < Ov; i += L) {
    const V v = load_biased(x, b, i);
    vmax = at::vec::maximum(vmax, v);
    vsum = vsum + v;
  }
  T m = hmax(vmax), sx = hsum(vsum);
  for (int64_t i = Ov; i < O; ++i) {
    const T v = b ? x[i] + b[i] : x[i];
    m = std::max(m, v);
    sx += v;
  }
  const T x_y = b ? x[y] + b[y] : x[y];
  const V vm(m);
  V ve(T(0));
  for (int64_t i = 0; i < Ov; i += L) {
    const V e = fast_exp(load_biased(x, b, i) - vm);
    ve = ve + e;
    if (grad) e.store(x + i);
  }
  T s = hsum(ve);
  for (int64_t i = Ov; i < O; ++i) {
    const T e = std::exp((b ? x[i] + b[i] : x[i]) - m);
    s += e;
    if (grad) x[i] = e;
  }
  const T l = ce_loss(m + std::log(s), x_y, sx / T(O), eps);
  if (grad) {
    const T inv_s = T(1) / s;
    const V vinv(inv_s);
    for (int64_t i = 0; i < Ov; i += L) {
      ce_grad(V::loadu(x + i) * vinv, coef, eps, O).store(x + i);
    }
    for (int64_t i = Ov; i < O; ++i) x[i] = ce_grad(x[i] * inv_s, coef, eps, O);
    x[y] += ce_grad_target_extra(coef, eps);
  }
  return l;
}

// One pass; the tail is a partial vector (its missing lanes load as 0, so they
// add nothing to the sum): with the small O of a regression head (O = 8 is
// half a vector) a scalar tail was most of the head's row time.
template <typename T>
T mse_row(T* x, const T* b, const T* y, int64_t O, T coef, bool grad) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V vsq(T(0));
  for (int64_t i = 0; i < O; i += L) {
    const int n = int(std::min<int64_t>(L, O - i));
    V v = V::loadu(x + i, n);
    if (b) v = v + V::loadu(b + i, n);
    const V d = v - V::loadu(y + i, n);
    vsq = at::vec::fmadd(d, d, vsq);
    if (grad) mse_grad(d, coef, O).store(x + i, n);
  }
  return mse_loss(hsum(vsq), O);
}

// Rows in order: each column's sum has the same order however callers split
// the columns across threads.
// The running sums stay in registers down the rows, NV vectors at a time (the
// same additions in the same order as adding row by row into acc: the same
// bits). Through memory, each row's add waited on the previous row's masked
// store to acc: a GRU backward spent 6% of its time here, 4.5% after.
template <typename T, int NV>
inline void column_sums_run(T* acc, const T* m, int64_t M, int64_t ld, int n_last) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  auto width = [&](int v) { return v == NV - 1 ? n_last : VL; };
  V s[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) s[v] = V::loadu(acc + v * VL, width(v));
  for (int64_t i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) s[v] = s[v] + V::loadu(m + i * ld + v * VL, width(v));
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) s[v].store(acc + v * VL, width(v));
}

template <typename T>
void add_column_sums(T* acc, const T* m, int64_t M, int64_t N, int64_t ld) {
  constexpr int VL = Vectorized<T>::size();
  for (int64_t j = 0; j < N; j += 4 * VL) {
    const int64_t w = std::min<int64_t>(4 * VL, N - j);
    const int nv = int((w + VL - 1) / VL), n_last = int(w - (nv - 1) * VL);
    switch (nv) {
      case 4: column_sums_run<T, 4>(acc + j, m + j, M, ld, n_last); break;
      case 3: column_sums_run<T, 3>(acc + j, m + j, M, ld, n_last); break;
      case 2: column_sums_run<T, 2>(acc + j, m + j, M, ld, n_last); break;
      default: column_sums_run<T, 1>(acc + j, m + j, M, ld, n_last); break;
    }
  }
}

// ---------------------------------------------------------------------------
// The gated cells' rows: cells/lstm.h and cells/gru.h on vectors of units (a
// partial vector at the tail: its missing lanes load as 0 and are not stored).
// ---------------------------------------------------------------------------

template <typename T>
void lstm_fwd_row(int64_t H, const T* ax, const T* ah, const T* c_prev, T* act, T* c, T* m) {
  using V = Vectorized<T>;
  for (int64_t j = 0; j < H; j += V::size()) {
    const int n = int(std::min<int64_t>(V::size(), H - j));
    auto pre = [&](int64_t k) { return V::loadu(ax + k * H + j, n) + V::loadu(ah + k * H + j, n); };
    V i, f, g, o, cn, mn;
    cells::lstm::forward<V>(pre(0), pre(1), pre(2), pre(3), V::loadu(c_prev + j, n), i, f, g, o,
                            cn, mn);
    i.store(act + j, n);
    f.store(act + H + j, n);
    g.store(act + 2 * H + j, n);
    o.store(act + 3 * H + j, n);
    cn.store(c + j, n);
    mn.store(m + j, n);
  }
}

template <typename T>
void lstm_bwd_row(int64_t H, const T* act, const T* c, const T* c_prev, const T* dm, T* dc,
                  T* dax) {
  using V = Vectorized<T>;
  for (int64_t j = 0; j < H; j += V::size()) {
    const int n = int(std::min<int64_t>(V::size(), H - j));
    auto a = [&](int64_t k) { return V::loadu(act + k * H + j, n); };
    V dai, daf, dag, dao, dcp;
    cells::lstm::backward<V>(a(0), a(1), a(2), a(3), V::loadu(c + j, n), V::loadu(c_prev + j, n),
                             V::loadu(dm + j, n), V::loadu(dc + j, n), dai, daf, dag, dao, dcp);
    dai.store(dax + j, n);
    daf.store(dax + H + j, n);
    dag.store(dax + 2 * H + j, n);
    dao.store(dax + 3 * H + j, n);
    dcp.store(dc + j, n);
  }
}

template <typename T>
void gru_fwd_row(int64_t H, const T* ax, const T* ah, const T* b_hh, const T* h_prev, T* act,
                 T* h) {
  using V = Vectorized<T>;
  for (int64_t j = 0; j < H; j += V::size()) {
    const int n = int(std::min<int64_t>(V::size(), H - j));
    auto hid = [&](int64_t k) {
      const V v = V::loadu(ah + k * H + j, n);
      return b_hh ? v + V::loadu(b_hh + k * H + j, n) : v;
    };
    const V ahn = hid(2);
    V r, z, nn, hn;
    cells::gru::forward<V>(V::loadu(ax + j, n), V::loadu(ax + H + j, n), V::loadu(ax + 2 * H + j, n),
                           hid(0), hid(1), ahn, V::loadu(h_prev + j, n), r, z, nn, hn);
    r.store(act + j, n);
    z.store(act + H + j, n);
    nn.store(act + 2 * H + j, n);
    ahn.store(act + 3 * H + j, n);
    hn.store(h + j, n);
  }
}

template <typename T>
void gru_bwd_row(int64_t H, const T* act, const T* h_prev, T* dh, T* dax, T* dahn) {
  using V = Vectorized<T>;
  for (int64_t j = 0; j < H; j += V::size()) {
    const int n = int(std::min<int64_t>(V::size(), H - j));
    auto a = [&](int64_t k) { return V::loadu(act + k * H + j, n); };
    V dar, daz, daxn, dahn_v, direct;
    cells::gru::backward<V>(a(0), a(1), a(2), a(3), V::loadu(h_prev + j, n), V::loadu(dh + j, n),
                            dar, daz, daxn, dahn_v, direct);
    dar.store(dax + j, n);
    daz.store(dax + H + j, n);
    daxn.store(dax + 2 * H + j, n);
    dahn_v.store(dahn + j, n);
    direct.store(dh + j, n);
  }
}

// ---------------------------------------------------------------------------
// The fused gated step: a tile of R rows x NG gate vectors of one unit block.
// ---------------------------------------------------------------------------

template <typename T>
struct GatedTiling {
  // R*NG accumulators + NG loads + a broadcast fill the register file: with
  // AVX-512 6 LSTM rows (29 of 32 zmm) or 8 GRU rows (28). With 16 ymm, 3
  // LSTM rows (12 accumulators; GCC takes one W_hh vector per k as the FMAs'
  // memory operand) or 4 GRU rows (16). Each row of a tile reuses the NG
  // vectors of W_hh loaded per k, so the taller the tile, the fewer times a
  // step streams the packed W_hh from L2. Against 2 LSTM and 3 GRU rows, AMD
  // EPYC Zen 3 (AVX2), interleaved A/B, forward: LSTM -8% to -21% (seed to
  // large), GRU -7% to -10% (even at seed and large); same bits.
  static constexpr bool kWide = Vectorized<T>::size() * sizeof(T) >= 64;
  template <int NG>
  static constexpr int rows = kWide ? (NG == 4 ? 6 : 8) : (NG == 4 ? 3 : 4);
};

// One tile. FX: the input projection in the tile (GatedStepArgs::fused_x),
// the same k-loop over the step's x rows and packed W_ih after the one over
// h_prev; the LSTM adds it to its gates' sums, the GRU to r's and z's. The
// GRU's n needs W_in x apart from W_hn h (n = tanh(W_in x + b_in + r * (W_hn h
// + b_hn))): its h sums are set aside (to the stack: the tile fills the
// register file) and its accumulators restart for W_in x.
template <typename T, int NG, int R, bool FX, bool PF>
inline void gated_tile(const GatedStepArgs<T>& p, int64_t b, int64_t jb) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  constexpr bool kGruX = FX && NG == 3;
  constexpr int64_t ld = NG * VL;  // a packed row of one unit block (pack_gates)
  const int64_t H = p.H;
  V acc[R][NG];
  tile_zero(acc);
  const T* a = p.a + b * H;
  const T* m = p.mp + jb * H * ld;
  {
    // What the epilogue reads and writes, in flight during the k-loop: the
    // input projection's rows were written a whole pass earlier and are out
    // of cache; perf put a fifth of the tile's samples on those loads.
    const int64_t j = jb * VL;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t row = b + r;
      if constexpr (!FX)
#pragma GCC unroll 4
        for (int g = 0; g < NG; ++g) __builtin_prefetch(p.ax + row * NG * H + g * H + j, 0, 3);
      if (p.gates)
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) __builtin_prefetch(p.gates + row * 4 * H + g * H + j, 1, 3);
      __builtin_prefetch(p.out + row * H + j, 1, 3);
      if (NG == 4 && p.cell) __builtin_prefetch(p.cell + row * H + j, 1, 3);
    }
  }
  tile_fma<T, R, NG, PF>(acc, a, H, m, ld, H);
  V ahn[kGruX ? R : 1];  // the GRU's W_hn h, set aside
  if constexpr (FX) {
    if constexpr (kGruX)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) ahn[r] = acc[r][2], acc[r][2] = V(T(0));
    tile_fma<T, R, NG, PF>(acc, p.x + b * p.I, p.I, p.mx + jb * p.I * ld, ld, p.I);
  }
  const int64_t j = jb * VL;
  const int n = int(std::min<int64_t>(VL, H - j));
  const int64_t S = 4 * H;  // the gates' row width, both cells
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t row = b + r;
    T* gr = p.gates ? p.gates + row * S + j : nullptr;  // null: nothing saved
    if (!active(p.lens, row, p.step)) {
      const V zero(T(0));
      zero.store(p.out + row * H + j, n);
      if (gr)
        for (int g = 0; g < 4; ++g) zero.store(gr + g * H, n);
      if (NG == 4 && p.cell) zero.store(p.cell + row * H + j, n);
      continue;
    }
    // What the sums still lack: the input projection with its bias (ax), or
    // with the projection in the tile, the bias (LSTM: b_ih + b_hh; GRU: b_ih).
    const T* add = FX ? p.bias : p.ax + row * NG * H;
    if constexpr (NG == 4) {
      V pre[4] = {acc[r][0], acc[r][1], acc[r][2], acc[r][3]};
      if (add)
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) pre[g] = pre[g] + V::loadu(add + g * H + j, n);
      V i, f, g, o, cn, mn;
      cells::lstm::forward<V>(pre[0], pre[1], pre[2], pre[3], V::loadu(p.c + row * H + j, n),
                              i, f, g, o, cn, mn);
      if (gr) {
        i.store(gr, n);
        f.store(gr + H, n);
        g.store(gr + 2 * H, n);
        o.store(gr + 3 * H, n);
        cn.store(p.cell + row * H + j, n);
      }
      cn.store(p.c + row * H + j, n);
      mn.store(p.out + row * H + j, n);
    } else {
      // ax: the input parts (r, z with FX also their h parts); ah: the h
      // parts with b_hh (r, z with FX: b_hh alone).
      V ax[3], ah[3];
      if constexpr (FX) {
        ax[0] = acc[r][0], ax[1] = acc[r][1], ax[2] = acc[r][2];
        ah[0] = ah[1] = V(T(0)), ah[2] = ahn[kGruX ? r : 0];
        if (add)
          for (int g = 0; g < 3; ++g) ax[g] = ax[g] + V::loadu(add + g * H + j, n);
      } else {
        for (int g = 0; g < 3; ++g) ax[g] = V::loadu(add + g * H + j, n), ah[g] = acc[r][g];
      }
      if (p.b_hh)
        for (int g = 0; g < 3; ++g) ah[g] = ah[g] + V::loadu(p.b_hh + g * H + j, n);
      V rr, z, nn, hn;
      cells::gru::forward<V>(ax[0], ax[1], ax[2], ah[0], ah[1], ah[2],
                             V::loadu(p.a + row * H + j, n), rr, z, nn, hn);
      if (gr) {
        rr.store(gr, n);
        z.store(gr + H, n);
        nn.store(gr + 2 * H, n);
        ah[2].store(gr + 3 * H, n);
      }
      hn.store(p.out + row * H + j, n);
    }
  }
}

// Rows [b0, b1) in tiles of R rows, then what is left in tiles of 4, 2 and 1
// (each row's sums run over k in the same order whatever its tile: the bits
// do not depend on how the rows are split).
template <typename T, int NG, bool FX, bool PF>
void gated_fwd_step_ng(const GatedStepArgs<T>& p, int64_t b0, int64_t b1) {
  constexpr int R = GatedTiling<T>::template rows<NG>;
  for (int64_t jb = p.jb0; jb < p.jb1; ++jb) {
    int64_t b = b0;
    for (; b + R <= b1; b += R) gated_tile<T, NG, R, FX, PF>(p, b, jb);
    if constexpr (R > 4)
      for (; b + 4 <= b1; b += 4) gated_tile<T, NG, 4, FX, PF>(p, b, jb);
    if constexpr (R > 2)
      for (; b + 2 <= b1; b += 2) gated_tile<T, NG, 2, FX, PF>(p, b, jb);
    for (; b < b1; ++b) gated_tile<T, NG, 1, FX, PF>(p, b, jb);
  }
}

template <typename T, bool PF>
void gated_fwd_step_pf(const GatedStepArgs<T>& p, int64_t b0, int64_t b1) {
  if (p.ng == 4 && p.fused_x) gated_fwd_step_ng<T, 4, true, PF>(p, b0, b1);
  else if (p.ng == 4) gated_fwd_step_ng<T, 4, false, PF>(p, b0, b1);
  else if (p.fused_x) gated_fwd_step_ng<T, 3, true, PF>(p, b0, b1);
  else gated_fwd_step_ng<T, 3, false, PF>(p, b0, b1);
}

template <typename T>
void gated_fwd_step(const GatedStepArgs<T>& p, int64_t b0, int64_t b1) {
  if (p.prefetch_w) gated_fwd_step_pf<T, true>(p, b0, b1);
  else gated_fwd_step_pf<T, false>(p, b0, b1);
}

template <typename T, int NG, int R, int C, bool PF>
inline void gated_bwd_tile(const GatedBwdArgs<T>& p, int64_t b, int64_t j0) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  const int64_t H = p.H, S = 4 * H, G = NG * H;
  if (!p.final_carry) {
    // What the epilogue reads and writes, in flight during the k-loop (as in
    // gated_tile): the saved gates and states were written a whole forward
    // pass earlier, and dax, dahn are written for the first time. Interleaved
    // A/B on an AMD EPYC Zen 5, training step, two runs: `small` LSTM +5% /
    // +3%, GRU +3% / 0; `large` within 1%.
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t row = b + r;
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const int64_t j = j0 + c * VL;
        if (j >= H) break;
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) __builtin_prefetch(p.gates + row * S + k * H + j, 0, 3);
        __builtin_prefetch(p.prev + row * H + j, 0, 3);
        __builtin_prefetch(p.grad_out + row * H + j, 0, 3);
        if constexpr (NG == 4) __builtin_prefetch(p.cell + row * H + j, 0, 3);
#pragma GCC unroll 4
        for (int k = 0; k < NG; ++k) __builtin_prefetch(p.dax + row * G + k * H + j, 1, 3);
        if constexpr (NG == 3) __builtin_prefetch(p.dahn + row * H + j, 1, 3);
      }
    }
  }
  V acc[R][C];
  if (p.a) {
    // The carry over k: all of a (the LSTM's dah = dax), or for the GRU a's r,
    // z columns (dax's) then dahn, in the order of one pass over [B,3H] dah.
    tile_zero(acc);
    const T* m = p.mp + (j0 / p.pw) * p.K * p.pw;
    const int64_t k_a = NG == 3 ? 2 * H : p.K;
    tile_fma<T, R, C, PF>(acc, p.a + b * p.lda, p.lda, m, p.pw, k_a);
    if constexpr (NG == 3) tile_fma<T, R, C, PF>(acc, p.a_n + b * H, H, m + k_a * p.pw, p.pw, H);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t row = b + r;
    const bool a_active = p.a != nullptr && active(p.lens, row, p.step_a);
    if (p.final_carry ? !a_active : !active(p.lens, row, p.step)) continue;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const int64_t j = j0 + c * VL;
      if (j >= H) break;
      const int n = int(std::min<int64_t>(VL, H - j));
      T* dh = p.dh + row * H + j;
      if (p.final_carry) {
        (NG == 4 ? acc[r][c] : V::loadu(dh, n) + acc[r][c]).store(dh, n);
        continue;
      }
      const T* gr = p.gates + row * S + j;
      auto gate = [&](int k) { return V::loadu(gr + k * H, n); };
      T* dax = p.dax + row * G + j;
      if constexpr (NG == 4) {
        const V inc = a_active ? acc[r][c] : V::loadu(dh, n);
        const V dm = V::loadu(p.grad_out + row * H + j, n) + inc;
        if (p.dtot) dm.store(p.dtot + row * H + j, n);
        T* dc = p.dc + row * H + j;
        V dai, daf, dag, dao, dcp;
        cells::lstm::backward<V>(gate(0), gate(1), gate(2), gate(3),
                                 V::loadu(p.cell + row * H + j, n),
                                 V::loadu(p.prev + row * H + j, n), dm, V::loadu(dc, n), dai, daf,
                                 dag, dao, dcp);
        dai.store(dax, n);
        daf.store(dax + H, n);
        dag.store(dax + 2 * H, n);
        dao.store(dax + 3 * H, n);
        dcp.store(dc, n);
      } else {
        V inc = V::loadu(dh, n);
        if (a_active) inc = inc + acc[r][c];
        const V dt = V::loadu(p.grad_out + row * H + j, n) + inc;
        if (p.dtot) dt.store(p.dtot + row * H + j, n);
        V dar, daz, daxn, dahn, direct;
        cells::gru::backward<V>(gate(0), gate(1), gate(2), gate(3),
                                V::loadu(p.prev + row * H + j, n), dt, dar, daz, daxn, dahn,
                                direct);
        dar.store(dax, n);
        daz.store(dax + H, n);
        daxn.store(dax + 2 * H, n);
        dahn.store(p.dahn + row * H + j, n);
        direct.store(dh, n);
      }
    }
  }
}

template <typename T, int NG, bool PF>
void gated_bwd_step_ng(const GatedBwdArgs<T>& p, int64_t b0, int64_t b1) {
  for_tiles<T>(p.H, p.NP, p.pw, b0, b1, [&]<int R, int C>(int64_t b, int64_t j0) {
    gated_bwd_tile<T, NG, R, C, PF>(p, b, j0);
  });
}

template <typename T>
void gated_bwd_step(const GatedBwdArgs<T>& p, int64_t b0, int64_t b1) {
  if (p.ng == 4 && p.prefetch_w) gated_bwd_step_ng<T, 4, true>(p, b0, b1);
  else if (p.ng == 4) gated_bwd_step_ng<T, 4, false>(p, b0, b1);
  else if (p.prefetch_w) gated_bwd_step_ng<T, 3, true>(p, b0, b1);
  else gated_bwd_step_ng<T, 3, false>(p, b0, b1);
}

// ---------------------------------------------------------------------------
// Small products (VecKernels::atb_block, row_gemm)
// ---------------------------------------------------------------------------
// Their inner loops are written a * b + c and contracted to FMAs here: with
// at::vec::fmadd, GCC 12 keeps the accumulator arrays in memory too and
// stores every one of them on each k (16 stores per 16 FMAs in atb_run).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// A block of a^T b: NL broadcast columns of b, one or two vectors of a's
// columns (kTwo), the accumulators in registers for the whole of K (every loop
// over them unrolled: indexed at run time, GCC keeps them in memory). kPart:
// the last vector is partial, m_last lanes.
template <typename T, int NL, bool kTwo, bool kPart>
void atb_run(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K, int m_last, T* out,
             int64_t ldo, bool accumulate) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  V acc0[NL], acc1[NL];
#pragma GCC unroll 8
  for (int n = 0; n < NL; ++n) {
    acc0[n] = V(T(0));
    acc1[n] = V(T(0));
  }
  if (accumulate) {
#pragma GCC unroll 8
    for (int n = 0; n < NL; ++n) {
      if constexpr (kTwo) {
        acc0[n] = V::loadu(out + n * ldo);
        acc1[n] = V::loadu(out + n * ldo + VL, kPart ? m_last : VL);
      } else {
        acc0[n] = V::loadu(out + n * ldo, kPart ? m_last : VL);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* ak = a + k * lda;
    const T* bk = b + k * ldb;
    const V a0 = kPart && !kTwo ? V::loadu(ak, m_last) : V::loadu(ak);
    const V a1 = kTwo ? (kPart ? V::loadu(ak + VL, m_last) : V::loadu(ak + VL)) : a0;
#pragma GCC unroll 8
    for (int n = 0; n < NL; ++n) {
      const V bn(bk[n]);
      acc0[n] = a0 * bn + acc0[n];
      if constexpr (kTwo) acc1[n] = a1 * bn + acc1[n];
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < NL; ++n) {
    if constexpr (kTwo) {
      acc0[n].store(out + n * ldo);
      acc1[n].store(out + n * ldo + VL, kPart ? m_last : VL);
    } else {
      acc0[n].store(out + n * ldo, kPart ? m_last : VL);
    }
  }
}

template <typename T, int NL, bool kTwo>
void atb_block_t(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K, int64_t ml, T* out,
                 int64_t ldo, bool accumulate) {
  constexpr int VL = Vectorized<T>::size();
  const int last = int(kTwo ? ml - VL : ml);
  if (last == VL) atb_run<T, NL, kTwo, false>(a, lda, b, ldb, K, last, out, ldo, accumulate);
  else atb_run<T, NL, kTwo, true>(a, lda, b, ldb, K, last, out, ldo, accumulate);
}

template <typename T>
void atb_block(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K, int64_t ml,
               int64_t nl, T* out, int64_t ldo, bool accumulate) {
  const bool two = ml > Vectorized<T>::size();
#define RNNKERN_ATB_CASE(NL)                                                              \
  case NL:                                                                                \
    return two ? atb_block_t<T, NL, true>(a, lda, b, ldb, K, ml, out, ldo, accumulate)    \
               : atb_block_t<T, NL, false>(a, lda, b, ldb, K, ml, out, ldo, accumulate);
  switch (nl) {
    RNNKERN_ATB_CASE(1)
    RNNKERN_ATB_CASE(2)
    RNNKERN_ATB_CASE(3)
    RNNKERN_ATB_CASE(4)
    RNNKERN_ATB_CASE(5)
    RNNKERN_ATB_CASE(6)
    RNNKERN_ATB_CASE(7)
    RNNKERN_ATB_CASE(8)
    default: TORCH_INTERNAL_ASSERT(false, "atb_block: nl = ", nl);
  }
#undef RNNKERN_ATB_CASE
}

// NV vectors of output columns [n0, n0 + nl) for RB rows from r. The rows'
// sums are independent FMA chains: one row alone waits out the FMA latency on
// every k when NV is 1 or 2 (a head with a few classes, a narrow x).
template <typename T, int NV, int RB>
inline void row_gemm_rows(const T* x, int64_t ldx, int64_t r, int64_t K, const T* wt,
                          int64_t NP, int64_t n0, int64_t nl, const T* bias, T* out,
                          int64_t ldo) {
  using V = Vectorized<T>;
  constexpr int VL = V::size();
  V acc[RB][NV];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = bias ? V::loadu(bias + n0 + v * VL) : V(T(0));
  const T* xr = x + r * ldx;
  for (int64_t k = 0; k < K; ++k) {
    const T* w = wt + k * NP + n0;
    V wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = V::loadu(w + v * VL);
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      const V xk(xr[i * ldx + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = xk * wv[v] + acc[i][v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i) {
    T* o = out + (r + i) * ldo + n0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t cnt = std::min<int64_t>(VL, nl - v * VL);
      if (cnt == VL) acc[i][v].store(o + v * VL);
      else acc[i][v].store(o + v * VL, int(cnt));
    }
  }
}

// Rows [r0, r1) in blocks of RB (RB * NV accumulators and NV loads in the
// register file), then one at a time. Each row's sum runs over k in the same
// order whatever its block: the bits do not depend on how the rows are split.
template <typename T, int NV>
void row_gemm_t(const T* x, int64_t ldx, int64_t r0, int64_t r1, int64_t K, const T* wt,
                int64_t NP, int64_t n0, int64_t nl, const T* bias, T* out, int64_t ldo) {
  constexpr int kAcc = Vectorized<T>::size() * sizeof(T) >= 64 ? 16 : 8;
  constexpr int RB = std::min(8, std::max(1, kAcc / NV));
  int64_t r = r0;
  for (; r + RB <= r1; r += RB)
    row_gemm_rows<T, NV, RB>(x, ldx, r, K, wt, NP, n0, nl, bias, out, ldo);
  for (; r < r1; ++r) row_gemm_rows<T, NV, 1>(x, ldx, r, K, wt, NP, n0, nl, bias, out, ldo);
}

template <typename T>
void row_gemm(const T* x, int64_t ldx, int64_t r0, int64_t r1, int64_t K, const T* wt, int64_t N,
              int64_t NP, const T* bias, T* out, int64_t ldo) {
  constexpr int64_t VL = Vectorized<T>::size(), kMaxNV = 4;
  for (int64_t n0 = 0; n0 < N; n0 += kMaxNV * VL) {
    const int64_t nl = std::min(N - n0, kMaxNV * VL);
    switch ((nl + VL - 1) / VL) {
      case 1: row_gemm_t<T, 1>(x, ldx, r0, r1, K, wt, NP, n0, nl, bias, out, ldo); break;
      case 2: row_gemm_t<T, 2>(x, ldx, r0, r1, K, wt, NP, n0, nl, bias, out, ldo); break;
      case 3: row_gemm_t<T, 3>(x, ldx, r0, r1, K, wt, NP, n0, nl, bias, out, ldo); break;
      default: row_gemm_t<T, 4>(x, ldx, r0, r1, K, wt, NP, n0, nl, bias, out, ldo); break;
    }
  }
}

#pragma GCC pop_options

template <typename T>
VecKernels<T> make() {
  return {Vectorized<T>::size(), Tiling<T>::RB, Tiling<T>::CB * Vectorized<T>::size(),
          Tiling<T>::CB_WIDE * Vectorized<T>::size(), &fused_step<T, true>,
          &fused_step<T, false>, &act_inplace<T>, &act_add<T>, &grad_z<T>, &ce_row<T>, &mse_row<T>,
          &add_column_sums<T>, &lstm_fwd_row<T>, &lstm_bwd_row<T>, &gru_fwd_row<T>,
          &gru_bwd_row<T>, &gated_fwd_step<T>, &gated_bwd_step<T>,
          &atb_block<T>, 2 * Vectorized<T>::size(), &row_gemm<T>};
}

}  // namespace RNNKERN_CAP
}  // namespace rnnkern::cpu

#define RNNKERN_STR2(x) #x
#define RNNKERN_STR(x) RNNKERN_STR2(x)
#define RNNKERN_DEFINE_VEC_KERNELS(cap)                                     \
  namespace rnnkern::cpu {                                                  \
  VecKernelTable vec_kernels_##cap() {                                      \
    return {cap::make<float>(), cap::make<double>(), RNNKERN_STR(cap)};     \
  }                                                                         \
  }

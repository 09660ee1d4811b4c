// Included once by each vec_kernels_<cap>.cpp after it has chosen the
// instruction set. Everything here lives in a namespace named after the
// capability, so the three copies never collide at link time.
#pragma once

#ifndef RNNKERN_CAP
#error "define RNNKERN_CAP before including vec_kernels_impl.h"
#endif

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "vec_kernels.h"

namespace rnnkern::cpu {
namespace RNNKERN_CAP {

using at::vec::Vectorized;

template <typename T>
void act_inplace(Activation a, T* z, int64_t n) {
  using V = Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    V v = V::loadu(z + i, m);
    v = a == Activation::kTanh ? v.tanh() : at::vec::maximum(v, V(T(0)));
    v.store(z + i, m);
  }
}

template <typename T>
void act_add(Activation a, T* dst, const T* x, const T* y, int64_t n) {
  using V = Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    V v = V::loadu(x + i, m) + V::loadu(y + i, m);
    v = a == Activation::kTanh ? v.tanh() : at::vec::maximum(v, V(T(0)));
    v.store(dst + i, m);
  }
}

template <typename T>
void grad_z(Activation a, T* dz, const T* g, const T* c, const T* h, int64_t n) {
  using V = Vectorized<T>;
  const V zero(T(0)), one(T(1));
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    const V gc = V::loadu(g + i, m) + V::loadu(c + i, m);
    const V hv = V::loadu(h + i, m);
    const V d = a == Activation::kTanh ? gc * (one - hv * hv)
                                       : V::blendv(zero, gc, hv > zero);
    d.store(dz + i, m);
  }
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
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) s += lanes[i];
  return s;
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
// gradient is wanted; then the gradient, added to db as it is written. Full
// vectors first, the tail in scalar code, so no padding lane ever enters a max
// or a sum.
template <typename T>
T ce_row(T* x, const T* b, T* db, int64_t O, int64_t y, T eps, T coef, bool grad) {
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
      const V g = ce_grad(V::loadu(x + i) * vinv, coef, eps, O);
      g.store(x + i);
      if (db) (V::loadu(db + i) + g).store(db + i);
    }
    for (int64_t i = Ov; i < O; ++i) {
      x[i] = ce_grad(x[i] * inv_s, coef, eps, O);
      if (db) db[i] += x[i];
    }
    x[y] += ce_grad_target_extra(coef, eps);
    if (db) db[y] += ce_grad_target_extra(coef, eps);
  }
  return l;
}

template <typename T>
T mse_row(T* x, const T* b, T* db, const T* y, int64_t O, T coef, bool grad) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t Ov = O - O % L;
  V vsq(T(0));
  for (int64_t i = 0; i < Ov; i += L) {
    const V d = load_biased(x, b, i) - V::loadu(y + i);
    vsq = at::vec::fmadd(d, d, vsq);
    if (grad) {
      const V g = mse_grad(d, coef, O);
      g.store(x + i);
      if (db) (V::loadu(db + i) + g).store(db + i);
    }
  }
  T sq = hsum(vsq);
  for (int64_t i = Ov; i < O; ++i) {
    const T d = (b ? x[i] + b[i] : x[i]) - y[i];
    sq += d * d;
    if (grad) {
      x[i] = mse_grad(d, coef, O);
      if (db) db[i] += x[i];
    }
  }
  return mse_loss(sq, O);
}

template <typename T>
VecKernels<T> make() {
  return {&act_inplace<T>, &act_add<T>, &grad_z<T>, &ce_row<T>, &mse_row<T>};
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

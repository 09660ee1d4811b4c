// Included once by each vec_kernels_<cap>.cpp after it has chosen the
// instruction set. Everything here lives in a namespace named after the
// capability, so the three copies never collide at link time.
#pragma once

#ifndef RNNKERN_CAP
#error "define RNNKERN_CAP before including vec_kernels_impl.h"
#endif

#include <ATen/cpu/vec/vec.h>

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
VecKernels<T> make() {
  return {&act_inplace<T>, &act_add<T>, &grad_z<T>};
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

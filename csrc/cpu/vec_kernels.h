// The element-wise passes of the CPU time loops, compiled once per CPU
// capability (DEFAULT, AVX2, AVX512) in vec_kernels_<cap>.cpp and chosen once at
// run time, as ATen's DispatchStub does. Only this part is vectorised by hand;
// the GEMMs go to BLAS.
//
// In an extension, at::vec::Vectorized<float> is ATen's scalar fallback unless
// the translation unit defines CPU_CAPABILITY_<cap> and enables the matching
// instruction set, which is what the per-capability files do.
#pragma once

#include <cstdint>

#include "../elman.h"
#include "../loss.h"

namespace rnnkern::cpu {

template <typename T>
struct VecKernels {
  // z[0:n] = act(z[0:n])
  void (*act_inplace)(Activation a, T* z, int64_t n);
  // dst[0:n] = act(a[0:n] + b[0:n]); dst may alias a
  void (*act_add)(Activation a, T* dst, const T* x, const T* y, int64_t n);
  // dz[0:n] = (g[0:n] + c[0:n]) * act'(h[0:n]), with act' computed from h = act(z)
  void (*grad_z)(Activation a, T* dz, const T* g, const T* c, const T* h, int64_t n);
  // One row of the head's output x[0:O] + b[0:O] (b may be null: no bias)
  // against class y: returns the cross-entropy with label smoothing eps
  // (loss.h). With grad, x is overwritten with g = coef * dl/dx and, when db is
  // not null, g is added to db[0:O] (the bias gradient, accumulated in the
  // same pass).
  T (*ce_row)(T* x, const T* b, T* db, int64_t O, int64_t y, T eps, T coef, bool grad);
  // The same for the MSE against y[0:O] (loss.h).
  T (*mse_row)(T* x, const T* b, T* db, const T* y, int64_t O, T coef, bool grad);
};

struct VecKernelTable {
  VecKernels<float> f32;
  VecKernels<double> f64;
  const char* capability;
};

// The table for the best capability this CPU supports. RNNKERN_CPU_CAPABILITY
// (DEFAULT, AVX2 or AVX512) lowers the choice, e.g. to test the portable path.
const VecKernelTable& vec_kernels();

template <typename T>
const VecKernels<T>& vec_kernels_for();
template <>
inline const VecKernels<float>& vec_kernels_for<float>() { return vec_kernels().f32; }
template <>
inline const VecKernels<double>& vec_kernels_for<double>() { return vec_kernels().f64; }

VecKernelTable vec_kernels_DEFAULT();
VecKernelTable vec_kernels_AVX2();
VecKernelTable vec_kernels_AVX512();

}  // namespace rnnkern::cpu

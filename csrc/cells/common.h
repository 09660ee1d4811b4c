// What every cell header shares: the host/device marker and the activations
// with their derivatives written in terms of the activation's output, for
// scalar and vector types alike (the CPU vector kernels and, later, CUDA).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RNNKERN_HD __host__ __device__ __forceinline__
#else
#define RNNKERN_HD inline
#endif

namespace rnnkern::cells {

// Elementary functions by type: the scalar ones here; a vector backend
// specialises MathOf for its vector type (csrc/cpu/vec_kernels_impl.h), so the
// cells below run unchanged on scalars and on vectors.
template <typename T>
struct MathOf {
  static RNNKERN_HD T exp(T x) { return std::exp(x); }
  static RNNKERN_HD T sigmoid(T x) { return T(1) / (T(1) + exp(T(0) - x)); }
  static RNNKERN_HD T tanh(T x) { return std::tanh(x); }
  // relu and its backward from the output h: NaN passes through both, as
  // ATen's relu and threshold_backward (h <= 0 is false for NaN).
  static RNNKERN_HD T relu(T x) { return x <= T(0) ? T(0) : x; }
  static RNNKERN_HD T relu_backward(T g, T h) { return h <= T(0) ? T(0) : g; }
};

template <typename T>
RNNKERN_HD T sigmoid(T x) {
  return MathOf<T>::sigmoid(x);
}

template <typename T>
RNNKERN_HD T tanh_(T x) {
  return MathOf<T>::tanh(x);
}

// sigmoid'(x) from s = sigmoid(x); tanh'(x) from t = tanh(x).
template <typename T>
RNNKERN_HD T d_sigmoid(T s) {
  return s * (T(1) - s);
}

template <typename T>
RNNKERN_HD T d_tanh(T t) {
  return T(1) - t * t;
}

}  // namespace rnnkern::cells

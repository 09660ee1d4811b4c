// What every cell header shares: the host/device marker and the activations
// with their derivatives written in terms of the activation's output, for
// scalar types (the CPU loops of csrc/cpu and, later, CUDA).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RNNKERN_HD __host__ __device__ __forceinline__
#else
#define RNNKERN_HD inline
#endif

namespace rnnkern::cells {

template <typename T>
RNNKERN_HD T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
RNNKERN_HD T tanh_(T x) {
  return std::tanh(x);
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

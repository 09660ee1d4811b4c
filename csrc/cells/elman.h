// The Elman cell's math for one element, shared by every backend.
//
// General notes (shape letters are fixed here and used everywhere):
//   T  time steps            B  batch (sequences)
//   I  input features        H  hidden units
//   O  head outputs / classes
// A layer runs h_t = act(z_t),  z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh.
// Backward needs act'(z_t); for both supported activations it is a function of
// the output h_t = act(z_t), so the forward pass never stores z.
#pragma once

#include <cstdint>

#include "common.h"

namespace rnnkern {

// The integer values are part of the op schema (the `activation` argument is
// passed as the nonlinearity's name and mapped here once, in parse_activation).
enum class Activation : int64_t { kTanh = 0, kRelu = 1 };

// T is a scalar or a vector type (MathOf<T> supplies tanh and relu).
template <typename T>
RNNKERN_HD T act_forward(Activation a, T z) {
  return a == Activation::kTanh ? cells::tanh_(z) : cells::MathOf<T>::relu(z);
}

// dL/dz from g = dL/dh and the output h = act(z):
//   tanh: g (1 - h^2)      relu: 0 if h <= 0 else g (NaN passes g, as ATen's
//   threshold_backward)
template <typename T>
RNNKERN_HD T act_backward(Activation a, T g, T h) {
  return a == Activation::kTanh ? g * (T(1) - h * h) : cells::MathOf<T>::relu_backward(g, h);
}

}  // namespace rnnkern

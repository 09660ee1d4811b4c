// The LSTM cell's pointwise math for one hidden unit, shared by every backend.
//
// Shape letters: T steps, B batch, I input, H hidden (the size of c), P the h
// a step emits (P = H, or proj_size with a projection), G = 4H gate rows.
// Gate order is PyTorch's: i, f, g, o. A step, from its pre-activations
//   a = x W_ih^T + b_ih + b_hh + h_prev W_hh^T          [B,4H]
// is, per unit j:
//   i = sigmoid(a_i)  f = sigmoid(a_f)  g = tanh(a_g)  o = sigmoid(a_o)
//   c = f c_prev + i g          m = o tanh(c)
//   h = m (P = H), or h = m W_hr^T (the projection, a GEMM outside the cell)
// Saved for backward: the activations (i, f, g, o) [T,B,4H] and c [T,B,H];
// with a projection also m [T,B,H]. The derivatives are written in terms of
// the activations' outputs (haste's d_sigmoid(sigmoid_out) style).
#pragma once

#include "common.h"

namespace rnnkern::cells::lstm {

constexpr int kGates = 4;

// Forward of unit j: a[0..3] the unit's four pre-activations (strided by H in
// the caller), c_prev; out: gates act[0..3], c, m.
template <typename T>
RNNKERN_HD void forward(T ai, T af, T ag, T ao, T c_prev, T& i, T& f, T& g, T& o, T& c, T& m) {
  i = sigmoid(ai);
  f = sigmoid(af);
  g = tanh_(ag);
  o = sigmoid(ao);
  c = f * c_prev + i * g;
  m = o * tanh_(c);
}

// Backward of unit j: dm = dL/dm_t (from outside and from h_t's future), dc =
// dL/dc_t from step t+1 (the carry); returns the pre-activation gradients and
// the carry dL/dc_prev.
template <typename T>
RNNKERN_HD void backward(T i, T f, T g, T o, T c, T c_prev, T dm, T dc, T& dai, T& daf, T& dag,
                         T& dao, T& dc_prev) {
  const T tc = tanh_(c);
  const T dct = dc + dm * o * d_tanh(tc);
  dao = dm * tc * d_sigmoid(o);
  dai = dct * g * d_sigmoid(i);
  daf = dct * c_prev * d_sigmoid(f);
  dag = dct * i * d_tanh(g);
  dc_prev = dct * f;
}

}  // namespace rnnkern::cells::lstm

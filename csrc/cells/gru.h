// The GRU cell's pointwise math for one hidden unit, shared by every backend.
//
// Shape letters: T steps, B batch, I input, H hidden, G = 3H gate rows, in
// PyTorch's order r, z, n and its "linear before reset" form:
//   ax = x W_ih^T + b_ih          ah = h_prev W_hh^T + b_hh        [B,3H] each
//   r = sigmoid(ax_r + ah_r)      z = sigmoid(ax_z + ah_z)
//   n = tanh(ax_n + r ah_n)       h = (1 - z) n + z h_prev
// Saved for backward, per step [T,B,4H]: r, z, n and ah_n (= W_hn h + b_hn,
// which the gradients of b_hn and W_hn need: they differ from b_in's).
// The backward gives two pre-activation gradients: d ax and d ah, equal but
// for the n block, where d ah_n = d ax_n * r.
#pragma once

#include "common.h"

namespace rnnkern::cells::gru {

constexpr int kGates = 3;
constexpr int kSaved = 4;  // r, z, n, ah_n

template <typename T>
RNNKERN_HD void forward(T axr, T axz, T axn, T ahr, T ahz, T ahn, T h_prev, T& r, T& z, T& n,
                        T& h) {
  r = sigmoid(axr + ahr);
  z = sigmoid(axz + ahz);
  n = tanh_(axn + r * ahn);
  h = (T(1) - z) * n + z * h_prev;
}

// dh: dL/dh_t in total. Returns d ax (r, z, n); d ah is the same but
// dahn = daxn * r; and the direct part of dL/dh_prev (dh z; the GEMM with
// W_hh adds the rest).
template <typename T>
RNNKERN_HD void backward(T r, T z, T n, T ahn, T h_prev, T dh, T& dar, T& daz, T& daxn, T& dahn,
                         T& dh_prev_direct) {
  const T dn = dh * (T(1) - z);
  daz = dh * (h_prev - n) * d_sigmoid(z);
  daxn = dn * d_tanh(n);
  dahn = daxn * r;
  dar = daxn * ahn * d_sigmoid(r);
  dh_prev_direct = dh * z;
}

}  // namespace rnnkern::cells::gru

// The per-step loss's math for one row or one element, shared by every backend,
// and the plain description of a loss that the ATen glue hands to the kernels.
//
// Shape letters as in cells/elman.h: T steps, B batch, H hidden, O head outputs or
// classes. The head is y_t = h_t W_out^T + b_out; each of the T*B rows (t, b)
// has a loss l[t,b] and a weight w[t,b], and every reduction is
//     loss = sum over rows of coef[t,b] * l[t,b]
// with coef from reduction_coef below ('none' takes its coefficients from the
// upstream gradient instead). So a row's gradient is coef * dl/dy, which is
// what lets the kernels compute it during the forward sweep, a chunk at a time.
#pragma once

#include <cstdint>

#include "cells/elman.h"

namespace rnnkern {

// The integer values are internal: the ops take these as strings, mapped once
// in checks (parse_loss, parse_reduction, parse_steps).
enum class LossKind : int64_t { kCrossEntropy = 0, kMse = 1 };
enum class Reduction : int64_t { kSum = 0, kMean = 1, kSeqMean = 2, kSeqSum = 3, kNone = 4 };
enum class Steps : int64_t { kAll = 0, kLast = 1 };

struct LossSpec {
  LossKind kind = LossKind::kCrossEntropy;
  Reduction reduction = Reduction::kMean;
  Steps steps = Steps::kAll;
  int64_t O = 0;  // head outputs / classes
  int64_t ignore_index = -100;
  double label_smoothing = 0;
  // Rows of the head computed at once: a [C,O] block of logits is all of them
  // that is ever held. 0 chooses C from O (about kChunkBytes of logits).
  int64_t chunk_rows = 0;
};

// w[t,b]: 1 for t < len (only t = len - 1 with steps='last'), 0 beyond; times
// the loss mask; 0 where a cross-entropy target equals ignore_index.
template <typename T>
RNNKERN_HD T step_weight(Steps steps, int64_t t, int64_t len, T mask, bool ignored) {
  const bool counted = steps == Steps::kLast ? t == len - 1 : t < len;
  return counted && !ignored ? mask : T(0);
}

// coef[t,b] of row (t,b) with weight w, for a scalar reduction.
//   w_seq = sum_t w[t,b] over the row's sequence, w_all = sum of every w,
//   n_seq = number of sequences with w_seq > 0.
// An all-masked batch (w_all = 0, or no sequence with weight) gives coef 0
// everywhere: the loss is 0 and so is every gradient, never 0/0.
template <typename T>
RNNKERN_HD T reduction_coef(Reduction r, T w, T w_seq, T w_all, int64_t n_seq) {
  switch (r) {
    case Reduction::kSum:
      return w;
    case Reduction::kMean:
      return w_all > T(0) ? w / w_all : T(0);
    case Reduction::kSeqSum:
      return w_seq > T(0) ? w / w_seq : T(0);
    case Reduction::kSeqMean:
      return w_seq > T(0) && n_seq > 0 ? w / (w_seq * T(n_seq)) : T(0);
    case Reduction::kNone:
      return w;  // the forward value of 'none' is w*l; backward brings its own coefficients
  }
  return T(0);
}

// Cross-entropy of one row of logits x against class y with label smoothing
// eps, exactly as torch.nn.functional.cross_entropy defines it:
//   l = (1 - eps) (lse - x_y) + eps (lse - mean_c x_c),   lse = log sum_c exp(x_c)
template <typename T>
RNNKERN_HD T ce_loss(T lse, T x_target, T mean_x, T eps) {
  return (T(1) - eps) * (lse - x_target) + eps * (lse - mean_x);
}

// coef * dl/dx_c = coef * (p_c - eps/O) for every class c, p = softmax(x) ...
// Written for a vector of classes (V = a SIMD vector of T) or a single one (V = T).
template <typename V, typename T>
RNNKERN_HD V ce_grad(V p, T coef, T eps, int64_t O) {
  return V(coef) * p - V(coef * eps / T(O));
}

// ... plus this at the target class, where dl/dx_y has the extra -(1 - eps).
template <typename T>
RNNKERN_HD T ce_grad_target_extra(T coef, T eps) {
  return -coef * (T(1) - eps);
}

// MSE of one row: l = (1/O) sum_o (x_o - y_o)^2, and coef * dl/dx_o = coef * 2 (x_o - y_o) / O.
template <typename T>
RNNKERN_HD T mse_loss(T sum_sq, int64_t O) {
  return sum_sq / T(O);
}

template <typename V, typename T>
RNNKERN_HD V mse_grad(V diff, T coef, int64_t O) {
  return V(T(2) * coef / T(O)) * diff;
}

}  // namespace rnnkern

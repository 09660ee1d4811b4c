// The CPU Elman layer as building blocks for ops: the ops in elman_cpu.cpp and
// fused ops that run a layer inside them (a per-step loss) call these after
// their own argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "../params.h"

namespace rnnkern::cpu {

// b_ih + b_hh, whichever are given; undefined when neither is.
at::Tensor bias_sum(const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh);

// acc [N] += the column sums of m [M, N] (unit column stride), each column
// summed over the rows in order: the same bits at any thread count (ATen's
// sum may split the rows across threads).
void add_column_sums(at::Tensor& acc, const at::Tensor& m);

// out [M,N] (contiguous) = a [M,K] b [K,N]. MKL runs a product with few
// columns N (the logits of a head over a few classes) several times below
// its rate; there the product is formed as (b^T a^T)^T, whose N is M, and
// copied out. The choice depends on the shapes only. (Not for products whose
// K is the T*B rows, such as dW_ih = dz^T x at a small I: transposed, MKL
// splits their K across threads, and the bits then depend on the thread count.)
void mm_wide_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// Runs the layer. `s` comes from check_elman_args with s.lengths pointing at a
// contiguous int64 [B] copy (or null).
//   x [T,B,I] contiguous, hx [B,H], weight_ih [H,I], weight_hh [H,H], bias [H] or undefined
// Returns output [T,B,H] (0 where t >= len_b) and h_n [B,H].
std::tuple<at::Tensor, at::Tensor> elman_forward(const ElmanShape& s, const at::Tensor& x,
                                                 const at::Tensor& hx, const at::Tensor& weight_ih,
                                                 const at::Tensor& weight_hh,
                                                 const at::Tensor& bias);

struct ElmanGrads {
  at::Tensor input;      // [T,B,I]
  at::Tensor hx;         // [B,H]
  at::Tensor weight_ih;  // [H,I]
  at::Tensor weight_hh;  // [H,H]
  at::Tensor bias;       // [H], the gradient of b_ih and of b_hh alike
};

// The whole BPTT (truncated when s.truncate > 0).
//   grad_output [T,B,H] dL/dh_t from outside the recurrence, grad_h_n [B,H],
//   x [T,B,I] contiguous, output [T,B,H] from elman_forward.
// grad_h_norm, when defined: a contiguous [T,B] tensor of the input's dtype that
// receives ||dL/dh_t|| per sequence (through the recurrence included; 0 where t >= len_b).
// grad_input = false: ElmanGrads::input is an empty [0] tensor (not computed).
ElmanGrads elman_backward(const ElmanShape& s, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& hx,
                          const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                          const at::Tensor& output, const at::Tensor& grad_h_norm = at::Tensor(),
                          bool grad_input = true);

}  // namespace rnnkern::cpu

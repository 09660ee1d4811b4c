// Argument checks shared by every backend: each op's implementation calls
// these before it touches memory, so a wrong argument is a clear error naming
// the argument, the value expected and the value given, never a bad access.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "params.h"

namespace rnnkern {

Activation parse_activation(c10::string_view nonlinearity);

// Checks the forward arguments and returns the sizes. `shape.lengths` is left
// null: the caller points it at its own contiguous copy.
//   input [T,B,I]  hx [B,H]  weight_ih [H,I]  weight_hh [H,H]
//   bias_ih, bias_hh [H] or None   lengths [B] int64 on the CPU, or None
ElmanShape check_elman_args(const char* op, const at::Tensor& input, const at::Tensor& hx,
                            const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                            const c10::optional<at::Tensor>& bias_ih,
                            const c10::optional<at::Tensor>& bias_hh,
                            const c10::optional<at::Tensor>& lengths,
                            c10::string_view nonlinearity, bool reverse, int64_t truncate);

// The backward's extra tensors: grad_output and output [T,B,H], grad_h_n [B,H].
void check_elman_bwd_args(const ElmanShape& shape, const at::Tensor& input,
                          const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                          const at::Tensor& output);

}  // namespace rnnkern

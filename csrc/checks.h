// Argument checks shared by every backend: each op's implementation calls
// these before it touches memory, so a wrong argument is a clear error naming
// the argument, the value expected and the value given, never a bad access.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>
#include <c10/util/strides.h>

#include "loss.h"
#include "params.h"

namespace rnnkern {

// t.contiguous() with row-major strides on every axis. contiguous() keeps the
// stride of a size-1 axis as the caller gave it (any value is legal there, and
// views such as a one-channel Conv1d output's transpose make them), while the
// kernels read strides: leading dimensions and their layout asserts. The
// elements of a contiguous tensor are already in place, so as_strided fixes
// the strides without a copy.
inline at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  const auto want = c10::contiguous_strides(c.sizes());
  if (c.strides().equals(want)) return c;
  return c.as_strided(c.sizes(), want, c.storage_offset());
}

Activation parse_activation(const char* op, c10::string_view nonlinearity);

// Checks the forward arguments and returns the sizes. `shape.lengths` is left
// null: the caller points it at its own contiguous copy.
//   input [T,B,I]  hx [B,H]  weight_ih [H,I]  weight_hh [H,H]
//   bias_ih, bias_hh [H] or None   lengths [B] int64 on the CPU or the input's device, or None
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

// The per-step loss's arguments (time-major, after check_elman_args gave `s`):
//   target [T,B] int64 (cross_entropy) or [T,B,O] of the input's dtype (mse);
//   weight_out [O,H]; bias_out [O] or None; loss_mask [T,B] bool or floating, >= 0, or None.
// Also checks the data: cross-entropy targets in [0, O) unless ignore_index, and
// with steps='last' every length >= 1 (a sequence needs a last step).
LossSpec check_loss_args(const char* op, const ElmanShape& s, const at::Tensor& input,
                         const at::Tensor& target, const at::Tensor& weight_out,
                         const c10::optional<at::Tensor>& bias_out,
                         const c10::optional<at::Tensor>& lengths,
                         const c10::optional<at::Tensor>& loss_mask, c10::string_view loss,
                         c10::string_view steps, c10::string_view reduction,
                         int64_t ignore_index, double label_smoothing, int64_t chunk_rows);

// The loss backward's extra tensors: grad_loss [] ([T,B] for 'none'), grad_h_n
// [B,H], output [T,B,H], weight [T,B]; for a scalar reduction also what the
// forward computed: grad_output [T,B,H], grad_weight_out [O,H], grad_bias_out [O]
// (or [0] without bias_out).
void check_loss_bwd_args(const char* op, const ElmanShape& s, const LossSpec& spec,
                         const at::Tensor& input, const at::Tensor& grad_loss,
                         const at::Tensor& grad_h_n, const at::Tensor& output,
                         const at::Tensor& weight, const at::Tensor& grad_output,
                         const at::Tensor& grad_weight_out, const at::Tensor& grad_bias_out,
                         bool has_bias_out);

// lengths [B] int64 with 0 <= len <= T, or None; on the CPU or on `device`
// (the input's: a CUDA op copies CPU lengths to the device once per call).
void check_lengths(const char* op, const c10::optional<at::Tensor>& lengths, int64_t B,
                   int64_t T, const at::Device& device);

// The head op's hidden states h [T,B,P] (any cell's) and lengths; returns the
// sizes with H = P (the head reads P features).
ElmanShape check_head_args(const char* op, const at::Tensor& h,
                           const c10::optional<at::Tensor>& lengths);

// A gated layer's forward arguments ('lstm' or 'gru'); lengths as above.
//   input [T,B,I]  h0 [B,P]  c0 [B,H] (LSTM) or None (GRU)
//   weight_ih [G,I]  weight_hh [G,P]  bias_ih, bias_hh [G] or None
//   weight_hr [P,H] (LSTM projection) or None; G = 4H (LSTM) or 3H (GRU)
LayerShape check_layer_args(const char* op, const at::Tensor& input, const at::Tensor& h0,
                            const c10::optional<at::Tensor>& c0, const at::Tensor& weight_ih,
                            const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
                            const c10::optional<at::Tensor>& bias_hh,
                            const c10::optional<at::Tensor>& weight_hr,
                            const c10::optional<at::Tensor>& lengths, c10::string_view mode,
                            bool reverse, int64_t truncate);

// Its backward's extra tensors: grad_output and output [T,B,P], grad_h_n [B,P],
// grad_c_n [B,H] (LSTM), gates [T,B,4H], cell [T,B,H] (LSTM) or [0],
// proj_in [T,B,H] (projection) or [0].
void check_layer_bwd_args(const char* op, const LayerShape& s, const at::Tensor& input,
                          const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                          const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& output,
                          const at::Tensor& gates, const at::Tensor& cell,
                          const at::Tensor& proj_in);

}  // namespace rnnkern

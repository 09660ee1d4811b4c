// The per-step loss head's sweep as ATen glue, written once for every backend:
// the step weights, the reduction's coefficients, the head over the rows with a
// coefficient, the reduced loss and, with compute_grad and a scalar reduction,
// the head's gradients. Each backend supplies the passes (HeadPasses) from its
// own file (cpu/loss_cpu.cpp, cuda/loss_cuda.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "loss.h"
#include "params.h"

namespace rnnkern {

// The head's gradients, each accumulated over the chunks.
struct HeadGrads {
  at::Tensor output;      // [T*B,H] dL/dh_t through the head at step t
  at::Tensor weight_out;  // [O,H]
  at::Tensor bias_out;    // [O], or [0] without bias_out
};

// A backend's allocator for a sweep's large per-call buffers (the CPU's
// buffer cache, cpu/host_cache.h); null: at::empty.
using EmptyFn = at::Tensor (*)(at::IntArrayRef, const at::TensorOptions&);

// grads.output is left uninitialised: the head writes every row of it.
inline HeadGrads new_head_grads(const LossSpec& spec, const ElmanShape& s, bool has_bias,
                                const at::TensorOptions& opts, EmptyFn empty = nullptr) {
  auto make = [&](at::IntArrayRef sizes) {
    return empty ? empty(sizes, opts) : at::empty(sizes, opts);
  };
  return {make({s.T * s.B, s.H}), make({spec.O, s.H}).zero_(),
          at::zeros({has_bias ? spec.O : 0}, opts)};
}

inline HeadGrads no_head_grads(const at::TensorOptions& opts) {
  return {at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
}

// A backend's passes of the sweep.
struct HeadPasses {
  // w [T,B] (loss.h step_weight)
  at::Tensor (*loss_weights)(const LossSpec&, const ElmanShape&, const at::Tensor& target,
                             const c10::optional<at::Tensor>& loss_mask,
                             const at::TensorOptions&);
  // coef [T,B] of a scalar reduction (loss.h reduction_coef)
  at::Tensor (*reduction_coefs)(const LossSpec&, const ElmanShape&, const at::Tensor& w);
  // the head over h [T,B,H] with coefficients coef [T,B]: l into step_loss,
  // the gradients into *grads (null: none)
  void (*run_head)(const LossSpec&, const ElmanShape&, const at::Tensor& h,
                   const at::Tensor& target, const at::Tensor& w_out,
                   const c10::optional<at::Tensor>& b_out, const at::Tensor& coef,
                   const at::Tensor& step_loss, HeadGrads* grads);
  // sum of coef * l [T,B], a [] tensor, in a fixed order
  at::Tensor (*weighted_sum)(const at::Tensor& coef, const at::Tensor& l);
  // the gradients' allocator (null: at::empty)
  EmptyFn empty = nullptr;
};

struct HeadSweep {
  at::Tensor value;      // [] ([T,B] for 'none')
  at::Tensor step_loss;  // [T,B]
  at::Tensor weight;     // [T,B]
  HeadGrads grads;       // [0]s unless computed
};

// The sweep over h [T,B,H] (contiguous), shared by the fused Elman loss and
// the cell-independent head op.
inline HeadSweep head_sweep(const HeadPasses& pass, const LossSpec& spec, const ElmanShape& s,
                            const at::Tensor& h, const at::Tensor& target,
                            const at::Tensor& weight_out,
                            const c10::optional<at::Tensor>& bias_out,
                            const c10::optional<at::Tensor>& loss_mask, bool compute_grad) {
  const auto opts = h.options();
  HeadSweep r;
  r.weight = pass.loss_weights(spec, s, target, loss_mask, opts);  // [T,B]
  const bool scalar = spec.reduction != Reduction::kNone;
  // 'none' computes l only; its gradient waits for the upstream coefficients.
  const auto coef = scalar ? pass.reduction_coefs(spec, s, r.weight) : r.weight;  // [T,B]
  r.step_loss = at::zeros({s.T, s.B}, opts);                                      // [T,B]
  const bool grads_now = compute_grad && scalar;
  r.grads = grads_now ? new_head_grads(spec, s, bias_out.has_value(), opts, pass.empty)
                       : no_head_grads(opts);
  pass.run_head(spec, s, h, target, weight_out, bias_out, coef, r.step_loss,
                grads_now ? &r.grads : nullptr);
  r.value = scalar ? pass.weighted_sum(coef, r.step_loss) : r.weight.mul(r.step_loss);
  if (grads_now) r.grads.output = r.grads.output.view({s.T, s.B, s.H});
  return r;
}

}  // namespace rnnkern

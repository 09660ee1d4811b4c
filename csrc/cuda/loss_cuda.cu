// The per-step loss head on CUDA and TORCH_LIBRARY_IMPL(rnnkern, CUDA) for
// head_loss_fwd/bwd and elman_loss_fwd/bwd (the Elman layer of
// layer_cuda.cu composed with the head on the device).
//
// As on the CPU (cpu/loss_cpu.cpp), the head y = h W_out^T + b_out runs over
// the T*B rows of h a [C,O] chunk at a time, so the [T,B,O] logits and their
// gradient never exist whole:
//   logits = h_c W_out^T                  one cuBLAS GEMM   [C,O]
//   + b_out, l, coef * dl/dlogits         one fused row kernel (a block per row,
//                                         loss.h's ce_* / mse_*), in place
//   dL/dh_c = dlogits W_out               one GEMM          [C,H]
//   dW_out += dlogits^T h_c               one GEMM
//   db_out += the column sums of dlogits  ordered, no atomics
// Rows whose coefficient is 0 (padding, masked, ignored, steps='last') are
// left out of the sweep: finding them costs the call's one host sync (the
// count of rows), outside the chunk loop. Every reduction here (a row's max
// and sums, the sequences' weights, the loss) runs in a fixed order: the same
// bits on every run.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../checks.h"
#include "../head_sweep.h"
#include "../loss.h"
#include "../params.h"
#include "common_cuda.cuh"

namespace rnnkern::cuda {
namespace {

// About this much of logits per chunk, as on the CPU (GEMMs want tall chunks),
// still far below the [T,B,O] logits it replaces.
constexpr int64_t kChunkBytes = int64_t(32) << 20;

int64_t rows_per_chunk(const LossSpec& spec, int64_t rows, int64_t elem_size) {
  const int64_t auto_rows = std::max<int64_t>(1, kChunkBytes / (spec.O * elem_size));
  const int64_t c = spec.chunk_rows > 0 ? spec.chunk_rows : auto_rows;
  return std::max<int64_t>(1, std::min(c, rows));
}

at::Tensor empty0(const at::TensorOptions& opts) { return at::empty({0}, opts); }

// ---------------------------------------------------------------------------
// Weights and coefficients (loss.h)
// ---------------------------------------------------------------------------

// w[t,b] = step_weight(...) for every row r = t*B + b.
template <typename T>
__global__ void loss_weights_kernel(T* w, int64_t T_, int64_t B, const int64_t* lengths,
                                    const T* mask, const int64_t* target, int64_t ignore_index,
                                    Steps steps) {
  RNNKERN_GRID_STRIDE(r, T_ * B) {
    const int64_t t = r / B, b = r - t * B;
    const int64_t len = lengths ? lengths[b] : T_;
    const bool ignored = target && target[r] == ignore_index;
    w[r] = step_weight(steps, t, len, mask ? mask[r] : T(1), ignored);
  }
}

// One block: w_seq[b] = sum_t w[t,b] (in t order), then w_all and n_seq over
// the sequences in a fixed order -> stats = {w_all, n_seq}.
template <typename T>
__global__ void sequence_sums_kernel(const T* w, int64_t T_, int64_t B, double* w_seq,
                                     double* stats) {
  double all = 0, n = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double acc = 0;
    for (int64_t t = 0; t < T_; ++t) acc += double(w[t * B + b]);
    w_seq[b] = acc;
    all += acc;
    n += acc > 0 ? 1.0 : 0.0;
  }
  all = block_reduce(all, SumOp(), 0.0);
  n = block_reduce(n, SumOp(), 0.0);
  if (threadIdx.x == 0) {
    stats[0] = all;
    stats[1] = n;
  }
}

template <typename T>
__global__ void coef_kernel(T* coef, const T* w, int64_t T_, int64_t B, const double* w_seq,
                            const double* stats, Reduction reduction) {
  RNNKERN_GRID_STRIDE(r, T_ * B) {
    const int64_t b = r - (r / B) * B;
    coef[r] = T(reduction_coef<double>(reduction, double(w[r]), w_seq[b], stats[0],
                                       int64_t(stats[1])));
  }
}

// sum_r coef[r] * l[r] in double, one block in a fixed order -> out [] of T.
template <typename T>
__global__ void weighted_sum_kernel(const T* coef, const T* l, int64_t n, T* out) {
  double acc = 0;
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) acc += double(coef[r] * l[r]);
  acc = block_reduce(acc, SumOp(), 0.0);
  if (threadIdx.x == 0) *out = T(acc);
}

// w [T,B] (loss.h step_weight), in the input's dtype.
at::Tensor loss_weights(const LossSpec& spec, const ElmanShape& s, const at::Tensor& target,
                        const c10::optional<at::Tensor>& loss_mask,
                        const at::TensorOptions& opts) {
  auto w = at::empty({s.T, s.B}, opts);
  const at::Tensor mask =
      loss_mask.has_value() ? loss_mask->to(opts.dtype()).contiguous() : at::Tensor();
  const bool ce = spec.kind == LossKind::kCrossEntropy;
  const at::Tensor tgt = ce ? target.contiguous() : at::Tensor();  // [T,B]
  const int64_t n = s.T * s.B;
  if (n == 0) return w;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "loss_weights_cuda", [&] {
    loss_weights_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), s.T, s.B, s.lengths,
        mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr,
        ce ? tgt.const_data_ptr<int64_t>() : nullptr, spec.ignore_index, spec.steps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return w;
}

// coef [T,B] of a scalar reduction (loss.h reduction_coef), sums in double.
at::Tensor reduction_coefs(const LossSpec& spec, const ElmanShape& s, const at::Tensor& w_in) {
  const auto w = w_in.contiguous();
  auto coef = at::empty_like(w);
  const int64_t n = s.T * s.B;
  if (n == 0) return coef;
  auto dopts = w.options().dtype(at::kDouble);
  auto w_seq = at::empty({s.B}, dopts);
  auto stats = at::empty({2}, dopts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "reduction_coefs_cuda", [&] {
    sequence_sums_kernel<scalar_t><<<1, 1024, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), s.T, s.B, w_seq.data_ptr<double>(), stats.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    coef_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        coef.data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), s.T, s.B,
        w_seq.const_data_ptr<double>(), stats.const_data_ptr<double>(), spec.reduction);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return coef;
}

at::Tensor weighted_sum(const at::Tensor& coef, const at::Tensor& l) {
  auto out = at::empty({}, coef.options());
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "weighted_sum_cuda", [&] {
    weighted_sum_kernel<scalar_t><<<1, 1024, 0, at::cuda::getCurrentCUDAStream()>>>(
        coef.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(), coef.numel(),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------
// The head's rows
// ---------------------------------------------------------------------------

template <typename T>
struct RowArgs {
  T* logits;              // [n,O] of this chunk: h_c W_out^T on entry, coef * dl/dy on exit
  int64_t O, B;
  int64_t c0;             // the chunk's first entry of row_idx (or first row)
  const int64_t* row_idx;  // [n_active] rows of the sweep, or nullptr: rows c0.. in order
  const T* bias;          // [O] or nullptr
  const T* coef;          // [T*B]
  T* step_loss;           // [T*B] receives l, or nullptr
  const int64_t* target;  // [T*B] class indices (cross_entropy)
  const T* mse_target;    // [T,B,O] with unit stride in O (mse)
  int64_t mst, msb;       // its strides in t and b
  T eps;                  // label smoothing
  bool grad;
};

// One block per row of the chunk: the row's loss and, with grad, its gradient in place.
template <typename T, bool kCrossEntropy>
__global__ void head_rows_kernel(RowArgs<T> a) {
  using A = T;  // accumulate in the dtype, as the CPU rows do
  const int64_t i = blockIdx.x;
  const int64_t r = a.row_idx ? a.row_idx[a.c0 + i] : a.c0 + i;
  const int64_t O = a.O;
  T* x = a.logits + i * O;
  const T* bias = a.bias;
  const T coef = a.coef[r];
  auto biased = [&](int64_t k) { return bias ? x[k] + bias[k] : x[k]; };
  T l;
  if constexpr (kCrossEntropy) {
    const int64_t y = a.target[r];
    const T x_y = biased(y);  // read before any thread writes the row
    A m = -std::numeric_limits<A>::infinity(), sx = 0;
    for (int64_t k = threadIdx.x; k < O; k += blockDim.x) {
      const A v = biased(k);
      m = MaxOp()(m, v);
      sx += v;
    }
    m = block_reduce(m, MaxOp(), -std::numeric_limits<A>::infinity());
    sx = block_reduce(sx, SumOp(), A(0));
    A se = 0;
    for (int64_t k = threadIdx.x; k < O; k += blockDim.x) {
      const A e = std::exp(biased(k) - m);
      se += e;
      if (a.grad) x[k] = e;
    }
    se = block_reduce(se, SumOp(), A(0));
    l = ce_loss<T>(m + std::log(se), x_y, sx / T(O), a.eps);
    if (a.grad) {
      const T inv_s = T(1) / se;
      for (int64_t k = threadIdx.x; k < O; k += blockDim.x) {
        T g = ce_grad<T, T>(x[k] * inv_s, coef, a.eps, O);
        if (k == y) g += ce_grad_target_extra(coef, a.eps);
        x[k] = g;
      }
    }
  } else {
    const int64_t t = r / a.B, b = r - t * a.B;
    const T* yv = a.mse_target + t * a.mst + b * a.msb;
    A sq = 0;
    for (int64_t k = threadIdx.x; k < O; k += blockDim.x) {
      const T d = biased(k) - yv[k];
      sq += d * d;
      if (a.grad) x[k] = mse_grad<T, T>(d, coef, O);
    }
    sq = block_reduce(sq, SumOp(), A(0));
    l = mse_loss<T>(sq, O);
  }
  if (threadIdx.x == 0 && a.step_loss) a.step_loss[r] = l;
}

// dst[rows[c0 + i]] = src[i] for the n rows of a chunk (each row once: no races).
template <typename T>
__global__ void scatter_rows_kernel(T* dst, const T* src, const int64_t* rows, int64_t c0,
                                    int64_t n, int64_t H) {
  RNNKERN_GRID_STRIDE(e, n * H) {
    const int64_t i = e / H, j = e - i * H;
    dst[rows[c0 + i] * H + j] = src[e];
  }
}

// The head and the loss over the rows of h whose coefficient is not 0, a chunk
// at a time (cpu/loss_cpu.cpp's head_loss, on the device).
//   h [N,H] contiguous (N = T*B, row r = t*B + b); coef [N] contiguous
//   target: [T,B] int64 contiguous (cross_entropy) or [T,B,O] with unit stride in O (mse)
//   w_out [O,H] contiguous; b_out [O] or undefined
//   step_loss [N] contiguous, receives l of every computed row, or undefined
//   grads: from new_head_grads, or null for no gradient
template <typename T>
void head_loss(const LossSpec& spec, const ElmanShape& s, const at::Tensor& h,
               const at::Tensor& target, const at::Tensor& w_out, const at::Tensor& b_out,
               const at::Tensor& coef, const at::Tensor& step_loss, HeadGrads* grads) {
  const int64_t N = s.T * s.B, H = s.H, O = spec.O;
  if (N == 0) return;
  // The call's one host sync: how many rows the sweep has.
  const at::Tensor rows = coef.ne(0).nonzero().view({-1});  // [n_active] in row order
  const int64_t n_active = rows.numel();
  const bool all_rows = n_active == N;
  if (grads && !all_rows) grads->output.zero_();
  if (n_active == 0) return;
  const int64_t C = rows_per_chunk(spec, n_active, sizeof(T));
  const auto opts = h.options();
  auto logits_buf = at::empty({C, O}, opts);                                  // [C,O]
  auto h_buf = all_rows ? at::Tensor() : at::empty({C, H}, opts);             // [C,H]
  auto dh_buf = all_rows || !grads ? at::Tensor() : at::empty({C, H}, opts);  // [C,H]
  const auto w_t = w_out.t();
  const bool ce = spec.kind == LossKind::kCrossEntropy;

  RowArgs<T> a{};
  a.O = O, a.B = s.B;
  a.row_idx = all_rows ? nullptr : rows.const_data_ptr<int64_t>();
  a.bias = b_out.defined() ? b_out.const_data_ptr<T>() : nullptr;
  a.coef = coef.const_data_ptr<T>();
  a.step_loss = step_loss.defined() ? step_loss.data_ptr<T>() : nullptr;
  a.target = ce ? target.const_data_ptr<int64_t>() : nullptr;
  a.mse_target = ce ? nullptr : target.const_data_ptr<T>();
  a.mst = ce ? 0 : target.stride(0), a.msb = ce ? 0 : target.stride(1);
  a.eps = T(spec.label_smoothing);
  a.grad = grads != nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();

  for (int64_t c0 = 0; c0 < n_active; c0 += C) {
    const int64_t n = std::min(C, n_active - c0);
    at::Tensor hc;
    if (all_rows) {
      hc = h.narrow(0, c0, n);  // [n,H]
    } else {
      hc = h_buf.narrow(0, 0, n);
      at::index_select_out(hc, h, 0, rows.narrow(0, c0, n));
    }
    auto logits = logits_buf.narrow(0, 0, n);  // [n,O]; the bias is added by the row kernel
    at::mm_out(logits, hc, w_t);
    a.logits = logits.data_ptr<T>();
    a.c0 = c0;
    if (ce) head_rows_kernel<T, true><<<unsigned(n), kThreads, 0, stream>>>(a);
    else head_rows_kernel<T, false><<<unsigned(n), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!grads) continue;
    // logits now holds coef * dl/dlogits.
    if (all_rows) {
      auto dh = grads->output.narrow(0, c0, n);
      at::mm_out(dh, logits, w_out);
    } else {
      auto dh = dh_buf.narrow(0, 0, n);
      at::mm_out(dh, logits, w_out);
      scatter_rows_kernel<T><<<blocks_for(n * H), kThreads, 0, stream>>>(
          grads->output.data_ptr<T>(), dh.const_data_ptr<T>(), rows.const_data_ptr<int64_t>(),
          c0, n, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    grads->weight_out.addmm_(logits.t(), hc);
    // The bias gradient sums the rows in order, chunk after chunk.
    if (b_out.defined()) add_column_sums(grads->bias_out, logits);
  }
}

// The head's inputs in the layout head_loss reads.
at::Tensor head_target(const LossSpec& spec, const at::Tensor& target) {
  if (spec.kind == LossKind::kCrossEntropy) return target.contiguous();
  // An mse target is as large as the logits: read it in place when each row is contiguous.
  return target.stride(2) == 1 ? target : target.contiguous();
}

void run_head(const LossSpec& spec, const ElmanShape& s, const at::Tensor& output,
              const at::Tensor& target, const at::Tensor& w_out,
              const c10::optional<at::Tensor>& b_out, const at::Tensor& coef,
              const at::Tensor& step_loss, HeadGrads* grads) {
  // The block reductions' grid: one block per row of a chunk.
  TORCH_CHECK(rows_per_chunk(spec, s.T * s.B, output.element_size()) <= INT32_MAX,
              "rnnkern: chunk_rows must be < 2^31 on CUDA");
  const auto h = output.contiguous().view({s.T * s.B, s.H});
  const auto tgt = head_target(spec, target);
  const auto w = w_out.contiguous();
  const at::Tensor b = b_out.has_value() ? b_out->contiguous() : at::Tensor();
  // An ignored target is never a row of the sweep, whatever weight a direct
  // call of the backward op passes: it is no class index to read.
  const auto c = spec.kind == LossKind::kCrossEntropy
                     ? coef.masked_fill(tgt.eq(spec.ignore_index), 0).contiguous().view({-1})
                     : coef.contiguous().view({-1});
  const at::Tensor l = step_loss.defined() ? step_loss.view({-1}) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "head_loss_cuda", [&] {
    head_loss<scalar_t>(spec, s, h, tgt, w, b, c, l, grads);
  });
}

const HeadPasses kHead{&loss_weights, &reduction_coefs, &run_head, &weighted_sum};


// The head's gradients for a backward call: the forward's scaled by grad_loss
// [] (no .item(): no host sync), or the sweep again ('none', or a forward
// that ran without compute_grad) with the upstream coefficients.
HeadGrads head_backward(const LossSpec& spec, const ElmanShape& s, const at::Tensor& grad_loss,
                        const at::Tensor& h, const at::Tensor& target,
                        const at::Tensor& weight_out, const c10::optional<at::Tensor>& bias_out,
                        const at::Tensor& weight, const at::Tensor& grad_h,
                        const at::Tensor& grad_weight_out, const at::Tensor& grad_bias_out) {
  const bool scalar = spec.reduction != Reduction::kNone;
  if (scalar && grad_h.dim() == 3) {
    return {grad_h.mul(grad_loss), grad_weight_out.mul(grad_loss), grad_bias_out.mul(grad_loss)};
  }
  const auto coef = scalar ? reduction_coefs(spec, s, weight).mul_(grad_loss)  // [T,B]
                           : grad_loss.mul(weight);
  HeadGrads grads = new_head_grads(spec, s, bias_out.has_value(), h.options());
  run_head(spec, s, h, target, weight_out, bias_out, coef, at::Tensor(), &grads);
  grads.output = grads.output.view({s.T, s.B, s.H});
  return grads;
}

// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
elman_loss_fwd_cuda(const at::Tensor& input, const at::Tensor& target, const at::Tensor& hx,
                    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                    const c10::optional<at::Tensor>& bias_ih,
                    const c10::optional<at::Tensor>& bias_hh, const at::Tensor& weight_out,
                    const c10::optional<at::Tensor>& bias_out,
                    const c10::optional<at::Tensor>& lengths,
                    const c10::optional<at::Tensor>& loss_mask, c10::string_view nonlinearity,
                    c10::string_view loss, c10::string_view steps, c10::string_view reduction,
                    int64_t ignore_index, double label_smoothing, bool compute_grad,
                    int64_t chunk_rows, int64_t truncate) {
  const char* op = "rnnkern.elman_loss_fwd";
  ElmanShape s = check_elman_args(op, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                                  nonlinearity, false, truncate);
  const LossSpec spec =
      check_loss_args(op, s, input, target, weight_out, bias_out, lengths, loss_mask, loss, steps,
                      reduction, ignore_index, label_smoothing, chunk_rows);
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceLengths len = device_lengths(lengths, s.T, input.device());
  s.lengths = len.ptr();
  auto [output, h_n] = elman_forward(s, len.max, input.contiguous(), hx, weight_ih, weight_hh,
                                     bias_sum(bias_ih, bias_hh));
  HeadSweep r = head_sweep(kHead, spec, s, output, target, weight_out, bias_out, loss_mask,
                           compute_grad);
  return {r.value, output, h_n, r.step_loss, r.weight, r.grads.output, r.grads.weight_out,
          r.grads.bias_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
elman_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_h_n,
                    const at::Tensor& input, const at::Tensor& target, const at::Tensor& hx,
                    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                    const at::Tensor& weight_out, const c10::optional<at::Tensor>& bias_out,
                    const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                    const at::Tensor& weight, const at::Tensor& grad_output,
                    const at::Tensor& grad_weight_out, const at::Tensor& grad_bias_out,
                    c10::string_view nonlinearity, c10::string_view loss,
                    c10::string_view reduction, int64_t ignore_index, double label_smoothing,
                    int64_t truncate, bool want_grad_norm, int64_t chunk_rows,
                    bool grad_input) {
  const char* op = "rnnkern.elman_loss_bwd";
  ElmanShape s = check_elman_args(op, input, hx, weight_ih, weight_hh, c10::nullopt,
                                  c10::nullopt, lengths, nonlinearity, false, truncate);
  const LossSpec spec =
      check_loss_args(op, s, input, target, weight_out, bias_out, lengths, c10::nullopt, loss,
                      "all", reduction, ignore_index, label_smoothing, chunk_rows);
  check_loss_bwd_args(op, s, spec, input, grad_loss, grad_h_n, output, weight, grad_output,
                      grad_weight_out, grad_bias_out, bias_out.has_value());
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceLengths len = device_lengths(lengths, s.T, input.device());
  s.lengths = len.ptr();
  const auto opts = input.options();
  HeadGrads grads = head_backward(spec, s, grad_loss, output, target, weight_out, bias_out,
                                  weight, grad_output, grad_weight_out, grad_bias_out);
  auto grad_norm = want_grad_norm ? at::zeros({s.T, s.B}, opts) : empty0(opts);
  ElmanGrads g = elman_backward(s, len.max, grads.output, grad_h_n, input.contiguous(), hx,
                                weight_ih, weight_hh, output,
                                want_grad_norm ? grad_norm : at::Tensor(), grad_input);
  return {g.input, g.hx, g.weight_ih, g.weight_hh, g.bias,
          grads.weight_out, grads.bias_out, grad_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
head_loss_fwd_cuda(const at::Tensor& h, const at::Tensor& target, const at::Tensor& weight_out,
                   const c10::optional<at::Tensor>& bias_out,
                   const c10::optional<at::Tensor>& lengths,
                   const c10::optional<at::Tensor>& loss_mask, c10::string_view loss,
                   c10::string_view steps, c10::string_view reduction, int64_t ignore_index,
                   double label_smoothing, bool compute_grad, int64_t chunk_rows) {
  const char* op = "rnnkern.head_loss_fwd";
  ElmanShape s = check_head_args(op, h, lengths);
  const LossSpec spec = check_loss_args(op, s, h, target, weight_out, bias_out, lengths,
                                        loss_mask, loss, steps, reduction, ignore_index,
                                        label_smoothing, chunk_rows);
  const c10::cuda::CUDAGuard guard(h.device());
  const DeviceLengths len = device_lengths(lengths, s.T, h.device());
  s.lengths = len.ptr();
  HeadSweep r = head_sweep(kHead, spec, s, h.contiguous(), target, weight_out, bias_out, loss_mask,
                           compute_grad);
  return {r.value, r.step_loss, r.weight, r.grads.output, r.grads.weight_out, r.grads.bias_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_loss_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& target,
    const at::Tensor& weight_out, const c10::optional<at::Tensor>& bias_out,
    const c10::optional<at::Tensor>& lengths, const at::Tensor& weight,
    const at::Tensor& grad_h, const at::Tensor& grad_weight_out,
    const at::Tensor& grad_bias_out, c10::string_view loss, c10::string_view reduction,
    int64_t ignore_index, double label_smoothing, int64_t chunk_rows) {
  const char* op = "rnnkern.head_loss_bwd";
  ElmanShape s = check_head_args(op, h, lengths);
  const LossSpec spec = check_loss_args(op, s, h, target, weight_out, bias_out, lengths,
                                        c10::nullopt, loss, "all", reduction, ignore_index,
                                        label_smoothing, chunk_rows);
  // The shared check also covers a layer's grad_h_n, which the head has not:
  // a zero [B,P] stands in for it.
  check_loss_bwd_args(op, s, spec, h, grad_loss, at::zeros({s.B, s.H}, h.options()), h, weight,
                      grad_h, grad_weight_out, grad_bias_out, bias_out.has_value());
  const c10::cuda::CUDAGuard guard(h.device());
  const DeviceLengths len = device_lengths(lengths, s.T, h.device());
  s.lengths = len.ptr();
  HeadGrads g = head_backward(spec, s, grad_loss, h, target, weight_out, bias_out, weight, grad_h,
                              grad_weight_out, grad_bias_out);
  return {g.output, g.weight_out, g.bias_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkern, CUDA, m) {
  m.impl("elman_loss_fwd", &elman_loss_fwd_cuda);
  m.impl("elman_loss_bwd", &elman_loss_bwd_cuda);
  m.impl("head_loss_fwd", &head_loss_fwd_cuda);
  m.impl("head_loss_bwd", &head_loss_bwd_cuda);
}

}  // namespace rnnkern::cuda

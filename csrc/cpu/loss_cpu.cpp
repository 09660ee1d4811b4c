// The CPU per-step loss: an Elman layer, the head y_t = h_t W_out^T + b_out and
// a cross-entropy or MSE loss at every step, reduced with weights, as two ops
// (elman_loss_fwd / elman_loss_bwd) + their TORCH_LIBRARY_IMPL.
//
// The layer's time loops are elman_cpu's (elman_forward / elman_backward). What
// is added here is the head, run over the T*B rows of h a [C,O] chunk at a
// time, as Liger-Kernel's fused linear cross-entropy does:
//   logits = h_c W_out^T                   one GEMM        [C,O]
//   + b_out, l, coef * dl/dlogits in place one pass a row  (vec_kernels: ce_row / mse_row),
//     db_out += coef * dl/dlogits           in the same pass
//   dL/dh_c = dlogits W_out                one GEMM        [C,H]
//   dW_out += dlogits^T h_c                one GEMM
// so only O(T*B*H) state and one chunk are ever held, never the [T,B,O] logits
// or their gradient. For a scalar reduction every row's coefficient is known
// before the sweep (loss.h), so the forward computes the gradients too and the
// backward only scales them by the incoming scalar; for 'none' the coefficients
// come with the upstream gradient, so the backward runs the sweep again.
// Rows whose coefficient is 0 (padding, masked, ignored, all but the last step
// with steps='last') are skipped: the head never runs on them.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"
#include "../head_sweep.h"
#include "../loss.h"
#include "host_cache.h"
#include "../params.h"
#include "elman_cpu.h"
#include "vec_kernels.h"

#if AT_MKL_ENABLED()
// MKL's packed GEMM, which libtorch_cpu exports for float32 only (LP64: 32-bit
// integers; the CBLAS enum arguments are passed as the ints they are).
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest);
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc);
}
#endif

namespace rnnkern::cpu {
namespace {

// About this much of logits per chunk: large enough that the chunk GEMMs run
// near BLAS's peak (dW_out += dlogits^T h_c has K = C), small enough to be
// little next to the [T,B,O] logits it replaces. At O = 8192 (1024 rows a
// chunk) the fused step took 9% less time than with 8 MB (256 rows) on a Zen 5,
// for 24 MB more of peak memory, a fiftieth of the logits.
constexpr int64_t kChunkBytes = int64_t(32) << 20;

int64_t rows_per_chunk(const LossSpec& spec, int64_t rows, int64_t elem_size) {
  const int64_t auto_rows = std::max<int64_t>(1, kChunkBytes / (spec.O * elem_size));
  const int64_t c = spec.chunk_rows > 0 ? spec.chunk_rows : auto_rows;
  return std::max<int64_t>(1, std::min(c, rows));
}

// w [T,B] (loss.h step_weight), in the input's dtype.
at::Tensor loss_weights(const LossSpec& spec, const ElmanShape& s, const at::Tensor& target,
                        const c10::optional<at::Tensor>& loss_mask,
                        const at::TensorOptions& opts) {
  auto w = at::empty({s.T, s.B}, opts);
  const at::Tensor mask =
      loss_mask.has_value() ? dense(loss_mask->to(opts.dtype())) : at::Tensor();
  const bool ce = spec.kind == LossKind::kCrossEntropy;
  const at::Tensor tgt = ce ? dense(target) : at::Tensor();  // [T,B]
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "loss_weights", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* mp = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* yp = ce ? tgt.const_data_ptr<int64_t>() : nullptr;
    for (int64_t t = 0; t < s.T; ++t) {
      for (int64_t b = 0; b < s.B; ++b) {
        const int64_t r = t * s.B + b;
        const int64_t len = s.lengths ? s.lengths[b] : s.T;
        const bool ignored = ce && yp[r] == spec.ignore_index;
        wp[r] = step_weight(spec.steps, t, len, mp ? mp[r] : scalar_t(1), ignored);
      }
    }
  });
  return w;
}

// coef [T,B] of a scalar reduction (loss.h reduction_coef), sums in double.
at::Tensor reduction_coefs(const LossSpec& spec, const ElmanShape& s, const at::Tensor& w) {
  auto coef = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "reduction_coefs", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* cp = coef.data_ptr<scalar_t>();
    // Rows are r = t*B + b; nested loops instead of r % B (an integer division
    // per row cost more than the rest of the pass).
    // w_all is the sum of the sequences' sums (one chain of T*B dependent
    // double adds took longer than the rest of the pass).
    std::vector<double> w_seq(s.B, 0.0);
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t b = 0; b < s.B; ++b) w_seq[b] += double(wp[t * s.B + b]);
    double w_all = 0;
    int64_t n_seq = 0;
    for (int64_t b = 0; b < s.B; ++b) {
      w_all += w_seq[b];
      n_seq += w_seq[b] > 0;
    }
    // A row of weight 1 (every counted row without a mask) takes its
    // sequence's coefficient, computed once: the same value, no division.
    std::vector<double> unit(s.B);
    for (int64_t b = 0; b < s.B; ++b)
      unit[b] = reduction_coef<double>(spec.reduction, 1.0, w_seq[b], w_all, n_seq);
    for (int64_t t = 0; t < s.T; ++t) {
      for (int64_t b = 0; b < s.B; ++b) {
        const int64_t r = t * s.B + b;
        const double w = double(wp[r]);
        cp[r] = scalar_t(w == 1.0 ? unit[b]
                                  : reduction_coef<double>(spec.reduction, w, w_seq[b], w_all,
                                                           n_seq));
      }
    }
  });
  return coef;
}

// out[m, n] = a[m, k] op(W), with op(W) = W_out^T [H,O] (the logits) or
// W_out [O,H] (dL/dh), for every chunk of a sweep. A BLAS GEMM packs its whole
// B operand on every call, here all of W_out per chunk; with MKL (float32) it
// is packed once per sweep instead, which saves about a tenth of the head's
// GEMM time at O = 8192. MKL documents a packed B for the m it was packed
// with, so a shorter last chunk takes the plain GEMM. Where the vector kernel
// beats BLAS (a few classes, or H below 16: SmallMatmul), op(W) is packed once
// for it instead.
class HeadWeight {
 public:
  //   w_out [O,H] contiguous; trans: op(W) = W_out^T; rows: the chunk height m
  HeadWeight(const at::Tensor& w_out, bool trans, int64_t rows)
      : small_(trans ? w_out.t() : w_out), rows_(rows) {
#if AT_MKL_ENABLED()
    const int64_t O = w_out.size(0), H = w_out.size(1);
    const int64_t n = trans ? O : H, k = trans ? H : O;
    if (!small_.packed() && w_out.scalar_type() == at::kFloat && rows > 0 && std::max({O, H, rows}) <= INT32_MAX &&
        O * H > 0) {
      constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kBMatrix = 162;
      const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(rows), int(n), int(k));
      packed_ = big_empty({int64_t((bytes + sizeof(float) - 1) / sizeof(float))}, w_out.options());
      cblas_sgemm_pack(kRowMajor, kBMatrix, trans ? kTrans : kNoTrans, int(rows), int(n), int(k),
                       1.0f, w_out.const_data_ptr<float>(), int(H), packed_.data_ptr<float>());
    }
#endif
  }

  //   a [m, k] contiguous rows, out [m, n] contiguous
  void mm_out(at::Tensor& out, const at::Tensor& a) const {
#if AT_MKL_ENABLED()
    if (packed_.defined() && a.size(0) == rows_) {
      constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151;
      const int m = int(a.size(0)), n = int(out.size(1)), k = int(a.size(1));
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, a.const_data_ptr<float>(),
                          int(a.stride(0)), packed_.const_data_ptr<float>(), n, 0.0f,
                          out.data_ptr<float>(), int(out.stride(0)));
      return;
    }
#endif
    small_.mm_out(out, a);
  }

 private:
  SmallMatmul small_;
  at::Tensor packed_;
  int64_t rows_;
};

// Runs the head and the loss over the rows of h whose coefficient is not 0, a
// chunk at a time.
//   h [N,H] contiguous (N = T*B rows, row r = t*B + b); coef [N] contiguous
//   target: [T,B] int64 contiguous (cross_entropy) or [T,B,O] with unit stride in O (mse)
//   w_out [O,H]; b_out [O] or undefined
//   step_loss [N] contiguous, receives l of every computed row, or undefined
//   grads: from new_head_grads, or null for no gradient. Rows not computed get
//   a zero grads->output; weight_out and bias_out are accumulated into.
template <typename T>
void head_loss(const LossSpec& spec, const ElmanShape& s, const at::Tensor& h,
               const at::Tensor& target, const at::Tensor& w_out, const at::Tensor& b_out,
               const at::Tensor& coef, const at::Tensor& step_loss, HeadGrads* grads) {
  const int64_t N = s.T * s.B, H = s.H, O = spec.O;
  // One scan (not a chain of ATen ops, which costs more than a tiny call's
  // whole head): the rows with a coefficient, in row order.
  const T* cp = coef.const_data_ptr<T>();
  int64_t n_active = 0;
  for (int64_t r = 0; r < N; ++r) n_active += cp[r] != T(0);
  const bool all_rows = n_active == N;
  if (grads && !all_rows) grads->output.zero_();
  if (n_active == 0) return;
  // Row indices of the active rows, in row order, unless every row is active.
  at::Tensor rows;
  if (!all_rows) {
    rows = at::empty({n_active}, coef.options().dtype(at::kLong));
    int64_t* ri = rows.data_ptr<int64_t>();
    for (int64_t r = 0; r < N; ++r)
      if (cp[r] != T(0)) *ri++ = r;
  }
  const int64_t* row_idx = all_rows ? nullptr : rows.const_data_ptr<int64_t>();
  const int64_t C = rows_per_chunk(spec, n_active, sizeof(T));

  const auto opts = h.options();
  auto logits_buf = big_empty({C, O}, opts);                            // [C,O]
  auto h_buf = all_rows ? at::Tensor() : at::empty({C, H}, opts);      // [C,H] gathered rows
  auto dh_buf = all_rows || !grads ? at::Tensor() : at::empty({C, H}, opts);  // [C,H]
  // Packing pays only when a sweep has chunks to reuse it (rows 0: no packing).
  const int64_t pack_rows = n_active > C ? C : 0;
  const HeadWeight w_for_logits(w_out, true, pack_rows);
  const HeadWeight w_for_dh(w_out, false, grads ? pack_rows : 0);
  // dW_out, chunk by chunk; added into grads->weight_out after the sweep.
  c10::optional<AtbSum> dw_out;
  if (grads) dw_out.emplace(grads->weight_out);

  T* lp = step_loss.defined() ? step_loss.data_ptr<T>() : nullptr;
  const bool ce = spec.kind == LossKind::kCrossEntropy;
  const int64_t* yp = ce ? target.const_data_ptr<int64_t>() : nullptr;
  const T* mp = ce ? nullptr : target.const_data_ptr<T>();
  const int64_t mst = ce ? 0 : target.stride(0), msb = ce ? 0 : target.stride(1);
  // Row r = t*B + b of an mse target; one multiply when (t, b) are contiguous
  // rows (the usual layout), not a division per row.
  const bool rows_uniform = mst == s.B * msb;
  auto mse_offset = [&](int64_t r) {
    return rows_uniform ? r * msb : (r / s.B) * mst + (r % s.B) * msb;
  };
  const T eps = T(spec.label_smoothing);
  const VecKernels<T>& vk = vec_kernels_for<T>();
  const bool grad = grads != nullptr;
  const T* bp = b_out.defined() ? b_out.const_data_ptr<T>() : nullptr;
  // Rows of a few thousand elements each: a row is one task; tiny rows are batched.
  const int64_t grain = std::max<int64_t>(1, 16384 / O);

  for (int64_t c0 = 0; c0 < n_active; c0 += C) {
    const int64_t n = std::min(C, n_active - c0);
    at::Tensor idx, hc;
    // A sweep of one chunk takes the whole tensors: no narrow (three ATen
    // calls a chunk, as much as a tiny call's head).
    const bool whole = all_rows && n == N;
    if (all_rows) {
      hc = whole ? h : h.narrow(0, c0, n);  // [n,H]
    } else {
      idx = rows.narrow(0, c0, n);
      hc = h_buf.narrow(0, 0, n);
      at::index_select_out(hc, h, 0, idx);
    }
    auto logits = n == C ? logits_buf : logits_buf.narrow(0, 0, n);  // [n,O], bias: the row pass
    w_for_logits.mm_out(logits, hc);

    T* xp = logits.data_ptr<T>();
    at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = all_rows ? c0 + i : row_idx[c0 + i];
        T* x = xp + i * O;
        const T l = ce ? vk.ce_row(x, bp, O, yp[r], eps, cp[r], grad)
                       : vk.mse_row(x, bp, mp + mse_offset(r), O, cp[r], grad);
        if (lp) lp[r] = l;
      }
    });
    if (!grad) continue;
    // logits now holds coef * dl/dlogits.
    if (all_rows) {
      auto dh = whole ? grads->output : grads->output.narrow(0, c0, n);
      w_for_dh.mm_out(dh, logits);
    } else {
      auto dh = dh_buf.narrow(0, 0, n);
      w_for_dh.mm_out(dh, logits);
      grads->output.index_copy_(0, idx, dh);
    }
    dw_out->add(logits, hc);
    // The bias gradient sums the rows in order, chunk after chunk, the
    // threads taking blocks of columns: the same bits at any thread count.
    if (bp) add_column_sums(grads->bias_out, logits);
  }
  if (dw_out) dw_out->finish();
}

// The head's inputs in the layout head_loss reads.
at::Tensor head_target(const LossSpec& spec, const at::Tensor& target) {
  if (spec.kind == LossKind::kCrossEntropy) return dense(target);
  // An mse target is as large as the logits: read it in place when each row is contiguous.
  return target.stride(2) == 1 ? target : dense(target);
}

void run_head(const LossSpec& spec, const ElmanShape& s, const at::Tensor& output,
              const at::Tensor& target, const at::Tensor& w_out,
              const c10::optional<at::Tensor>& b_out, const at::Tensor& coef,
              const at::Tensor& step_loss, HeadGrads* grads) {
  const auto h = output.view({s.T * s.B, s.H});
  const auto tgt = head_target(spec, target);
  const auto w = dense(w_out);
  const at::Tensor b = b_out.has_value() ? dense(*b_out) : at::Tensor();
  // An ignored target is never a row of the sweep, whatever weight a direct
  // call of the backward op passes: it is no class index to read. One scan
  // (an eq and a masked_fill would build two TensorIterators).
  at::Tensor c;
  if (spec.kind == LossKind::kCrossEntropy) {
    TORCH_INTERNAL_ASSERT(coef.numel() == tgt.numel() && tgt.scalar_type() == at::kLong);
    c = at::empty({tgt.numel()}, coef.options());
    const auto cc = dense(coef);
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "head_coefs", [&] {
      const scalar_t* src = cc.const_data_ptr<scalar_t>();
      const int64_t* y = tgt.const_data_ptr<int64_t>();
      scalar_t* dst = c.data_ptr<scalar_t>();
      for (int64_t i = 0; i < c.numel(); ++i)
        dst[i] = y[i] == spec.ignore_index ? scalar_t(0) : src[i];
    });
  } else {
    c = dense(coef).view({-1});
  }
  const at::Tensor l = step_loss.defined() ? step_loss.view({-1}) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "elman_loss_head", [&] {
    head_loss<scalar_t>(spec, s, h, tgt, w, b, c, l, grads);
  });
}

// A 0-dim CPU tensor's value, read in place (item() dispatches twice).
double scalar_value(const at::Tensor& t) {
  return AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "scalar_value",
                                    [&] { return double(*t.const_data_ptr<scalar_t>()); });
}

// sum of coef * l over the rows [T,B], in double and in row order, as one scan
// (cheaper than mul + sum + to at a tiny call's sizes).
at::Tensor weighted_sum(const at::Tensor& coef, const at::Tensor& l) {
  double acc = 0;
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "weighted_sum", [&] {
    const scalar_t* c = coef.const_data_ptr<scalar_t>();
    const scalar_t* lp = l.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < coef.numel(); ++i) acc += double(c[i]) * double(lp[i]);
  });
  return at::scalar_tensor(acc, coef.options());
}

const HeadPasses kHead{&loss_weights, &reduction_coefs, &run_head, &weighted_sum, &big_empty};


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
elman_loss_fwd_cpu(const at::Tensor& input, const at::Tensor& target, const at::Tensor& hx,
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
  const auto x = dense(input);  // [T,B,I]
  const at::Tensor len = lengths.has_value() ? dense(*lengths) : at::Tensor();
  s.lengths = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;

  auto [output, h_n] = elman_forward(s, x, hx, weight_ih, weight_hh, bias_sum(bias_ih, bias_hh));
  HeadSweep r = head_sweep(kHead, spec, s, output, target, weight_out, bias_out, loss_mask,
                           compute_grad);
  return {r.value, output, h_n, r.step_loss, r.weight, r.grads.output, r.grads.weight_out,
          r.grads.bias_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
elman_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_h_n,
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
  const auto x = dense(input);  // [T,B,I]
  const at::Tensor len = lengths.has_value() ? dense(*lengths) : at::Tensor();
  s.lengths = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  const auto opts = input.options();

  HeadGrads grads;
  const bool scalar = spec.reduction != Reduction::kNone;
  if (!scalar || grad_output.dim() == 1) {
    // The sweep again, with the upstream coefficients.
    const auto coef = scalar ? reduction_coefs(spec, s, weight).mul_(grad_loss)  // [T,B]
                             : grad_loss.mul(weight);
    grads = new_head_grads(spec, s, bias_out.has_value(), opts, &big_empty);
    run_head(spec, s, output, target, weight_out, bias_out, coef, at::Tensor(), &grads);
    grads.output = grads.output.view({s.T, s.B, s.H});
  } else if (scalar_value(grad_loss) == 1.0) {
    // The usual loss.backward(): the forward's gradients as they are (the
    // returned ones copied, as an op's outputs never alias its inputs).
    grads = {grad_output, grad_weight_out.clone(), grad_bias_out.clone()};
  } else {
    grads = {grad_output.mul(grad_loss), grad_weight_out.mul(grad_loss),
             grad_bias_out.mul(grad_loss)};
  }
  auto grad_norm = want_grad_norm ? at::empty({s.T, s.B}, opts) : at::empty({0}, opts);
  ElmanGrads g = elman_backward(s, grads.output, grad_h_n, x, hx, weight_ih, weight_hh, output,
                                want_grad_norm ? grad_norm : at::Tensor(), grad_input);
  return {g.input, g.hx, g.weight_ih, g.weight_hh, g.bias,
          grads.weight_out, grads.bias_out, grad_norm};
}

// The head on any cell's hidden states: the same sweep as elman_loss_*, with
// no layer around it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
head_loss_fwd_cpu(const at::Tensor& h, const at::Tensor& target, const at::Tensor& weight_out,
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
  const at::Tensor len = lengths.has_value() ? dense(*lengths) : at::Tensor();
  s.lengths = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  HeadSweep r = head_sweep(kHead, spec, s, dense(h), target, weight_out, bias_out, loss_mask,
                           compute_grad);
  return {r.value, r.step_loss, r.weight, r.grads.output, r.grads.weight_out, r.grads.bias_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_loss_bwd_cpu(
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
  const auto opts = h.options();
  const bool scalar = spec.reduction != Reduction::kNone;
  if (scalar && grad_h.dim() == 3) {
    return {grad_h.mul(grad_loss), grad_weight_out.mul(grad_loss), grad_bias_out.mul(grad_loss)};
  }
  const auto coef = scalar ? reduction_coefs(spec, s, weight).mul_(grad_loss)  // [T,B]
                           : grad_loss.mul(weight);
  HeadGrads grads = new_head_grads(spec, s, bias_out.has_value(), opts, &big_empty);
  run_head(spec, s, dense(h), target, weight_out, bias_out, coef, at::Tensor(), &grads);
  return {grads.output.view({s.T, s.B, s.H}), grads.weight_out, grads.bias_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkern, CPU, m) {
  m.impl("elman_loss_fwd", &elman_loss_fwd_cpu);
  m.impl("elman_loss_bwd", &elman_loss_bwd_cpu);
  m.impl("head_loss_fwd", &head_loss_fwd_cpu);
  m.impl("head_loss_bwd", &head_loss_bwd_cpu);
}

}  // namespace rnnkern::cpu

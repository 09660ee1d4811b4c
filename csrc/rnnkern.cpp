// The rnnkern operator library: every op's schema, once. Backends add only
// TORCH_LIBRARY_IMPL blocks (cpu/elman_cpu.cpp; a CUDA file later).
#include <Python.h>

#include <torch/library.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

#include "checks.h"
#include "cpu/elman_cpu.h"
#include "cpu/host_cache.h"
#include "cpu/vec_kernels.h"

// Importing rnnkern._C loads this library and so registers the ops; the module
// itself only reports build facts (no pybind11).
static PyObject* rnnkern_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(rnnkern::cpu::vec_kernels().capability);
}

// (source, cache file or "", ((kind, backend, tiles seconds, BLAS seconds), ...)):
// rnnkern::cpu::gemm_backend().
static PyObject* rnnkern_gemm_backend(PyObject*, PyObject*) {
  try {
    const auto& g = rnnkern::cpu::gemm_backend();
    PyObject* kinds = PyTuple_New(rnnkern::cpu::kGemmKinds);
    if (!kinds) return nullptr;
    for (int k = 0; k < rnnkern::cpu::kGemmKinds; ++k) {
      const auto& d = g.verdict.kind[k];
      PyObject* item = Py_BuildValue("(ssdd)", rnnkern::cpu::kGemmKindNames[k],
                                     d.tiles ? "rnnkern" : "blas", d.tiles_s, d.blas_s);
      if (!item) {
        Py_DECREF(kinds);
        return nullptr;
      }
      PyTuple_SET_ITEM(kinds, k, item);
    }
    return Py_BuildValue("(ssN)", g.source, g.cache.c_str(), kinds);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

static PyObject* rnnkern_host_cache_info(PyObject*, PyObject*) {
  try {
    const auto i = rnnkern::cpu::host_cache_info();
    return Py_BuildValue("(LLLLL)", static_cast<long long>(i.cached_bytes),
                         static_cast<long long>(i.in_use_bytes),
                         static_cast<long long>(i.limit_bytes), static_cast<long long>(i.hits),
                         static_cast<long long>(i.misses));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

static PyObject* rnnkern_empty_cache(PyObject*, PyObject*) {
  try {
    rnnkern::cpu::host_cache_empty();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

static PyMethodDef rnnkern_methods[] = {
    {"cpu_capability", rnnkern_cpu_capability, METH_NOARGS,
     "The instruction set the CPU kernels' element-wise passes were chosen for."},
    {"gemm_backend", rnnkern_gemm_backend, METH_NOARGS,
     "Who runs the CPU's products over all rows: (source, cache file, ((kind, backend, tiles s, BLAS s), ...))."},
    {"host_cache_info", rnnkern_host_cache_info, METH_NOARGS,
     "The CPU buffer cache: (cached bytes, bytes in use, cap, hits, misses)."},
    {"empty_cache", rnnkern_empty_cache, METH_NOARGS,
     "Frees the CPU buffer cache's free blocks."},
    {nullptr, nullptr, 0, nullptr}};

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          rnnkern_methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rnnkern, m) {
  // One Elman layer, one direction, the whole sequence in one call.
  //   input [T,B,I] -> output [T,B,H] (0 where t >= len_b), h_n [B,H]
  // truncate does not change the forward: it is the truncation of the op's
  // registered backward (rnnkern/_ops.py), 0 for none.
  m.def(
      "elman_fwd(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? lengths, str nonlinearity, "
      "bool reverse, int truncate=0) -> (Tensor output, Tensor h_n)",
      {at::Tag::pt2_compliant_tag});
  // Its whole BPTT in one call. grad_bias is the gradient of bias_ih and of
  // bias_hh alike (they enter z_t as a sum). truncate = 0: no truncation.
  // grad_input=False skips dL/dinput (a [T,B,I] GEMM), returning it as [0].
  m.def(
      "elman_bwd(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor? lengths, "
      "str nonlinearity, bool reverse, int truncate, bool grad_input=True) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  // The layer with a loss at every step through the head y_t = h_t W_out^T + b_out,
  // reduced with per-step weights inside the kernel (csrc/loss.h). The head runs
  // over the T*B rows a [C,O] chunk at a time: the [T,B,O] logits never exist.
  //   target [T,B] int64 (cross_entropy) or [T,B,O] (mse); loss_mask [T,B] or None
  //   -> loss [] ([T,B] = w*l for 'none'), output [T,B,H], h_n [B,H],
  //      step_loss [T,B] (l; 0 where w = 0: those rows are never computed),
  //      weight [T,B] (w),
  //      and, with compute_grad and a scalar reduction, the loss's gradients
  //      computed in the same sweep: grad_output [T,B,H] (through the head at
  //      step t only), grad_weight_out [O,H], grad_bias_out [O]. Each is [0]
  //      when not computed (grad_bias_out also without bias_out).
  // chunk_rows: rows per chunk, 0 for automatic (about 32 MB of logits).
  // truncate: as for elman_fwd, for the registered backward only.
  m.def(
      "elman_loss_fwd(Tensor input, Tensor target, Tensor hx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor weight_out, Tensor? bias_out, "
      "Tensor? lengths, Tensor? loss_mask, str nonlinearity, str loss, str steps, "
      "str reduction, int ignore_index, float label_smoothing, bool compute_grad, "
      "int chunk_rows, int truncate=0) -> (Tensor loss, Tensor output, Tensor h_n, "
      "Tensor step_loss, Tensor weight, Tensor grad_output, Tensor grad_weight_out, "
      "Tensor grad_bias_out)",
      {at::Tag::pt2_compliant_tag});
  // Its backward: the head's gradients (the forward's, scaled by grad_loss []
  // for a scalar reduction; recomputed chunk by chunk for 'none', with
  // coefficients grad_loss * weight [T,B], and for a scalar reduction whose
  // forward ran without compute_grad, passing grad_output, grad_weight_out and
  // grad_bias_out as [0]), then the layer's whole BPTT. grad_bias is the gradient
  // of bias_ih and of bias_hh alike. grad_norm [T,B] (with want_grad_norm,
  // else [0]) is ||dL/dh_t|| per sequence, 0 where t >= len_b.
  m.def(
      "elman_loss_bwd(Tensor grad_loss, Tensor grad_h_n, Tensor input, Tensor target, "
      "Tensor hx, Tensor weight_ih, Tensor weight_hh, Tensor weight_out, Tensor? bias_out, "
      "Tensor? lengths, Tensor output, Tensor weight, Tensor grad_output, "
      "Tensor grad_weight_out, Tensor grad_bias_out, str nonlinearity, str loss, "
      "str reduction, int ignore_index, float label_smoothing, int truncate, "
      "bool want_grad_norm, int chunk_rows, bool grad_input=True) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_weight_out, Tensor grad_bias_out, Tensor grad_norm)",
      {at::Tag::pt2_compliant_tag});
  // One layer of a gated cell, mode 'lstm' or 'gru' (csrc/cells/), one
  // direction, the whole sequence in one call. lengths, reverse and truncate
  // as for elman_fwd/elman_bwd.
  //   input [T,B,I], h0 [B,P], c0 [B,H] (LSTM; None for GRU), weight_ih [G,I],
  //   weight_hh [G,P], biases [G] or None, weight_hr [P,H] or None (the LSTM's
  //   projection; P = H without it); G = 4H (LSTM) or 3H (GRU)
  //   -> output [T,B,P] (0 where t >= len_b), h_n [B,P], c_n [B,H] (LSTM, else [0]),
  //      and what backward reads: gates [T,B,4H] (LSTM i,f,g,o; GRU r,z,n and
  //      W_hn h + b_hn), cell [T,B,H] (LSTM c_t, else [0]), proj_in [T,B,H]
  //      (o * tanh(c_t) with a projection, else [0]).
  //   train=False: no backward will run, and gates, cell and proj_in come back
  //      as [0] (an inference forward writes only h and c), unless autograd
  //      records the call, which needs them.
  m.def(
      "layer_fwd(Tensor input, Tensor h0, Tensor? c0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, Tensor? lengths, str mode, "
      "bool reverse, int truncate=0, bool train=True) -> (Tensor output, Tensor h_n, "
      "Tensor c_n, Tensor gates, Tensor cell, Tensor proj_in)",
      {at::Tag::pt2_compliant_tag});
  // The per-step loss head on the hidden states of any cell, y_t = h_t W_out^T
  // + b_out, with the loss and reduction of elman_loss_fwd (csrc/loss.h), a
  // [C,O] chunk of rows at a time: the [T,B,O] logits never exist.
  //   h [T,B,P], target [T,B] int64 or [T,B,O], weight_out [O,P], bias_out [O]
  //   -> loss [] ([T,B] for 'none'), step_loss [T,B], weight [T,B], and with
  //      compute_grad and a scalar reduction the gradients of the same sweep:
  //      grad_h [T,B,P], grad_weight_out [O,P], grad_bias_out [O] (else [0]).
  m.def(
      "head_loss_fwd(Tensor h, Tensor target, Tensor weight_out, Tensor? bias_out, "
      "Tensor? lengths, Tensor? loss_mask, str loss, str steps, str reduction, "
      "int ignore_index, float label_smoothing, bool compute_grad, int chunk_rows) -> "
      "(Tensor loss, Tensor step_loss, Tensor weight, Tensor grad_h, Tensor grad_weight_out, "
      "Tensor grad_bias_out)",
      {at::Tag::pt2_compliant_tag});
  // head_loss_fwd's checks alone, on the layer's input [T,B,I] with P the
  // features the head will read: rnn_loss calls it before the layer op of an
  // LSTM or GRU runs, so a wrong target or head is refused before any kernel
  // does work (head_loss_fwd checks again: it can be called directly).
  m.def(
      "head_loss_check(Tensor input, int P, Tensor target, Tensor weight_out, Tensor? bias_out, "
      "Tensor? lengths, Tensor? loss_mask, str loss, str steps, str reduction, "
      "int ignore_index, float label_smoothing) -> ()",
      {at::Tag::pt2_compliant_tag});
  // Its backward: the forward's gradients scaled by grad_loss [], or the sweep
  // again ('none', or grad_h passed as [0]) -> grad_h, grad_weight_out, grad_bias_out.
  m.def(
      "head_loss_bwd(Tensor grad_loss, Tensor h, Tensor target, Tensor weight_out, "
      "Tensor? bias_out, Tensor? lengths, Tensor weight, Tensor grad_h, "
      "Tensor grad_weight_out, Tensor grad_bias_out, str loss, str reduction, "
      "int ignore_index, float label_smoothing, int chunk_rows) -> (Tensor grad_h, "
      "Tensor grad_weight_out, Tensor grad_bias_out)",
      {at::Tag::pt2_compliant_tag});
  // Its whole BPTT in one call. grad_c0 is [0] for GRU, grad_weight_hr [0]
  // without a projection, grad_input [0] with grad_input=False; grad_norm [T,B]
  // with want_grad_norm (else [0]) is ||dL/dh_t||, the whole gradient reaching
  // the emitted h_t, 0 where t >= len_b.
  m.def(
      "layer_bwd(Tensor grad_output, Tensor grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor h0, Tensor? c0, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, "
      "Tensor output, Tensor gates, Tensor cell, Tensor proj_in, Tensor? lengths, str mode, "
      "bool reverse, int truncate, bool grad_input=True, bool want_grad_norm=False) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_weight_ih, "
      "Tensor grad_weight_hh, Tensor grad_bias_ih, Tensor grad_bias_hh, Tensor grad_weight_hr, "
      "Tensor grad_norm)",
      {at::Tag::pt2_compliant_tag});
}

namespace rnnkern {
namespace {

// A dtype as Python spells it (torch.float32), so an op's error reads as the API's.
std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A shape as Python prints a tuple: (5, 6), (5,), (). The API's Python side
// (rnnkern/_checks.py, for the reference) writes the same words.
std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << '(';
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

// A schema's non-optional Tensor receives None as an undefined tensor.
void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a tensor, got None");
}

void check_float_like(const char* op, const char* name, const at::Tensor& t,
                      const at::Tensor& input) {
  check_defined(op, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name,
                   " must have the input's dtype ", dtype_str(input.scalar_type()), ", got ",
                   dtype_str(t.scalar_type()));
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the input's device ",
              input.device(), ", got ", t.device());
}

void check_shape(const char* op, const char* name, const at::Tensor& t,
                 std::initializer_list<int64_t> expected, const char* letters) {
  TORCH_CHECK_VALUE(t.sizes().equals(expected), op, ": ", name, " must have shape ", letters,
                    " = ", shape_str(expected), ", got ", shape_str(t.sizes()));
}

// The sequence tensor an op runs over (a layer's input, the head's h): float32
// or float64, 3-D.
void check_steps_tensor(const char* op, const char* name, const at::Tensor& t,
                        const char* letters) {
  check_defined(op, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 or float64, got ", dtype_str(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 3, op, ": ", name, " must be 3-D ", letters, ", got shape ",
                    shape_str(t.sizes()));
}

// weight_ih of the right rows but another width: the input is what is wrong,
// said as nn.RNN says it.
void check_input_size(const char* op, const at::Tensor& input, const at::Tensor& weight_ih,
                      int64_t rows, int64_t I) {
  TORCH_CHECK_VALUE(!(weight_ih.dim() == 2 && weight_ih.size(0) == rows && weight_ih.size(1) != I),
                    op, ": input has inconsistent input_size: got I=", I, ", expected ",
                    weight_ih.size(1), " (weight_ih is ", shape_str(weight_ih.sizes()), ")");
}

// BLAS takes 32-bit sizes.
void check_blas_sizes(const char* op, std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  for (const auto& [name, v] : sizes)
    TORCH_CHECK_VALUE(v <= INT32_MAX, op, ": ", name, " must be < 2^31 (BLAS takes 32-bit sizes), got ",
                      v);
}

}  // namespace

void check_lengths(const char* op, const c10::optional<at::Tensor>& lengths, int64_t B,
                   int64_t T, const at::Device& device) {
  if (!lengths.has_value()) return;
  const at::Tensor& len = *lengths;
  TORCH_CHECK_TYPE(len.scalar_type() == at::kLong, op,
                   ": lengths must be an int64 tensor, got ", dtype_str(len.scalar_type()));
  TORCH_CHECK(len.device().is_cpu() || len.device() == device, op,
              ": lengths must be on the CPU or on the input's device ", device, ", got ",
              len.device());
  check_shape(op, "lengths", len, {B}, "(B,)");
  if (B > 0) {
    // A plain scan: two reductions through the dispatcher cost more than
    // a short layer's whole forward. Lengths on a GPU are copied here once
    // per call (the one host sync they cost), never inside a time loop.
    const at::Tensor lc = len.to(at::kCPU).contiguous();
    const int64_t* l = lc.const_data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(l, l + B);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi <= T, op, ": lengths must be in [0, T=", T,
                      "], got min ", *lo, " and max ", *hi);
  }
}

Activation parse_activation(const char* op, c10::string_view nonlinearity) {
  if (nonlinearity == "tanh") return Activation::kTanh;
  if (nonlinearity == "relu") return Activation::kRelu;
  TORCH_CHECK_VALUE(false, op, ": nonlinearity must be 'tanh' or 'relu', got '",
                    std::string(nonlinearity), "'");
  return Activation::kTanh;  // unreachable
}

ElmanShape check_elman_args(const char* op, const at::Tensor& input, const at::Tensor& hx,
                            const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                            const c10::optional<at::Tensor>& bias_ih,
                            const c10::optional<at::Tensor>& bias_hh,
                            const c10::optional<at::Tensor>& lengths,
                            c10::string_view nonlinearity, bool reverse, int64_t truncate) {
  ElmanShape s;
  s.act = parse_activation(op, nonlinearity);
  s.reverse = reverse;
  TORCH_CHECK_VALUE(truncate >= 0, op, ": truncate must be >= 1 (or 0 for none), got ",
                    truncate);
  s.truncate = truncate;
  check_steps_tensor(op, "input", input, "(T, B, I)");
  check_defined(op, "weight_hh", weight_hh);
  TORCH_CHECK_VALUE(weight_hh.dim() == 2, op, ": weight_hh must be 2-D (H, H), got shape ",
                    shape_str(weight_hh.sizes()));
  s.T = input.size(0);
  s.B = input.size(1);
  s.I = input.size(2);
  s.H = weight_hh.size(0);
  TORCH_CHECK_VALUE(s.H >= 1, op, ": hidden size H must be >= 1, got ", s.H);
  TORCH_CHECK_VALUE(s.B <= INT32_MAX && s.H <= INT32_MAX && s.I <= INT32_MAX, op,
                    ": B, I and H must each be < 2^31, got B=", s.B, " I=", s.I, " H=", s.H);
  check_float_like(op, "weight_hh", weight_hh, input);
  check_shape(op, "weight_hh", weight_hh, {s.H, s.H}, "(H, H)");
  check_float_like(op, "weight_ih", weight_ih, input);
  check_input_size(op, input, weight_ih, s.H, s.I);
  check_shape(op, "weight_ih", weight_ih, {s.H, s.I}, "(H, I)");
  check_float_like(op, "hx", hx, input);
  check_shape(op, "hx", hx, {s.B, s.H}, "(B, H)");
  if (bias_ih.has_value()) {
    check_float_like(op, "bias_ih", *bias_ih, input);
    check_shape(op, "bias_ih", *bias_ih, {s.H}, "(H,)");
  }
  if (bias_hh.has_value()) {
    check_float_like(op, "bias_hh", *bias_hh, input);
    check_shape(op, "bias_hh", *bias_hh, {s.H}, "(H,)");
  }
  check_lengths(op, lengths, s.B, s.T, input.device());
  return s;
}

void check_elman_bwd_args(const ElmanShape& s, const at::Tensor& input,
                          const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                          const at::Tensor& output) {
  const char* op = "rnnkern.elman_bwd";
  check_float_like(op, "grad_output", grad_output, input);
  check_shape(op, "grad_output", grad_output, {s.T, s.B, s.H}, "(T, B, H)");
  check_float_like(op, "output", output, input);
  check_shape(op, "output", output, {s.T, s.B, s.H}, "(T, B, H)");
  check_float_like(op, "grad_h_n", grad_h_n, input);
  check_shape(op, "grad_h_n", grad_h_n, {s.B, s.H}, "(B, H)");
}

LossKind parse_loss(const char* op, c10::string_view loss) {
  if (loss == "cross_entropy") return LossKind::kCrossEntropy;
  if (loss == "mse") return LossKind::kMse;
  TORCH_CHECK_VALUE(false, op, ": loss must be 'cross_entropy' or 'mse', got '", std::string(loss), "'");
  return LossKind::kCrossEntropy;  // unreachable
}

Reduction parse_reduction(const char* op, c10::string_view reduction) {
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "seq_mean") return Reduction::kSeqMean;
  if (reduction == "seq_sum") return Reduction::kSeqSum;
  if (reduction == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, op,
                    ": reduction must be one of 'mean', 'sum', 'seq_mean', 'seq_sum', 'none', got '",
                    std::string(reduction), "'");
  return Reduction::kMean;  // unreachable
}

Steps parse_steps(const char* op, c10::string_view steps) {
  if (steps == "all") return Steps::kAll;
  if (steps == "last") return Steps::kLast;
  TORCH_CHECK_VALUE(false, op, ": steps must be 'all' or 'last', got '", std::string(steps), "'");
  return Steps::kAll;  // unreachable
}

namespace {

// The data checks of the loss's inputs, the only place they are made (the
// Python API converts layouts and leaves them to the op). On the CPU a plain
// scan: a chain of ATen reductions costs more than a tiny layer's whole call.
void check_target_values(const char* op, const at::Tensor& target, int64_t O,
                         int64_t ignore_index) {
  const int64_t T = target.size(0), B = target.size(1);
  auto fail = [&](int64_t t, int64_t b, int64_t v) {
    TORCH_CHECK_VALUE(false, op, ": target must hold class indices in [0, O=", O,
                      ") or ignore_index=", ignore_index, ", got ", v, " at [t=", t, ", b=", b, "]");
  };
  if (target.device().is_cpu()) {
    const at::Tensor tc = target.contiguous();
    const int64_t* p = tc.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < T * B; ++i)
      if (p[i] != ignore_index && (p[i] < 0 || p[i] >= O)) fail(i / B, i % B, p[i]);
    return;
  }
  const auto bad = target.ne(ignore_index).logical_and(target.lt(0).logical_or(target.ge(O)));
  if (bad.any().item<bool>()) {
    const auto where = bad.nonzero()[0];
    const int64_t t = where[0].item<int64_t>(), b = where[1].item<int64_t>();
    fail(t, b, target[t][b].item<int64_t>());
  }
}

// A NaN, infinite or negative weight would make every reduction NaN or meaningless.
void check_mask_values(const char* op, const at::Tensor& m) {
  auto fail = [&](double v) {
    TORCH_CHECK_VALUE(false, op, ": loss_mask must be finite and >= 0, got ", v);
  };
  if (m.numel() == 0) return;
  if (m.device().is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "check_mask", [&] {
      const at::Tensor mc = m.contiguous();
      const scalar_t* p = mc.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < mc.numel(); ++i) {
        const double v = static_cast<double>(p[i]);
        if (!(v >= 0) || !std::isfinite(v)) fail(v);
      }
    });
    return;
  }
  const auto ok = m.ge(0).logical_and_(m.isfinite());
  if (!ok.all().item<bool>()) fail(m.masked_select(ok.logical_not())[0].item<double>());
}

}  // namespace

LossSpec check_loss_args(const char* op, const ElmanShape& s, const at::Tensor& input,
                         const at::Tensor& target, const at::Tensor& weight_out,
                         const c10::optional<at::Tensor>& bias_out,
                         const c10::optional<at::Tensor>& lengths,
                         const c10::optional<at::Tensor>& loss_mask, c10::string_view loss,
                         c10::string_view steps, c10::string_view reduction,
                         int64_t ignore_index, double label_smoothing, int64_t chunk_rows) {
  LossSpec spec;
  spec.kind = parse_loss(op, loss);
  spec.reduction = parse_reduction(op, reduction);
  spec.steps = parse_steps(op, steps);
  spec.ignore_index = ignore_index;
  spec.label_smoothing = label_smoothing;
  spec.chunk_rows = chunk_rows;
  TORCH_CHECK_VALUE(chunk_rows >= 0, op, ": chunk_rows must be >= 0 (0: automatic), got ",
                    chunk_rows);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(spec.kind == LossKind::kCrossEntropy || label_smoothing == 0.0, op,
                    ": label_smoothing applies to loss='cross_entropy' only, got ",
                    label_smoothing, " with loss='mse'");
  check_defined(op, "weight_out", weight_out);
  TORCH_CHECK_VALUE(weight_out.dim() == 2, op, ": weight_out must be 2-D (O, H), got shape ",
                    shape_str(weight_out.sizes()));
  spec.O = weight_out.size(0);
  TORCH_CHECK_VALUE(spec.O >= 1, op, ": the head needs O >= 1 outputs, got weight_out of shape ",
                    shape_str(weight_out.sizes()));
  check_float_like(op, "weight_out", weight_out, input);
  check_shape(op, "weight_out", weight_out, {spec.O, s.H}, "(O, H)");
  if (bias_out.has_value()) {
    check_float_like(op, "bias_out", *bias_out, input);
    check_shape(op, "bias_out", *bias_out, {spec.O}, "(O,)");
  }
  check_defined(op, "target", target);
  TORCH_CHECK(target.device() == input.device(), op, ": target must be on the input's device ",
              input.device(), ", got ", target.device());
  if (spec.kind == LossKind::kCrossEntropy) {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op,
                     ": target must be int64 class indices for loss='cross_entropy', got ",
                     dtype_str(target.scalar_type()));
    check_shape(op, "target", target, {s.T, s.B}, "(T, B)");
    check_target_values(op, target, spec.O, ignore_index);
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == input.scalar_type(), op,
                     ": target must have the input's dtype ", dtype_str(input.scalar_type()),
                     " for loss='mse', got ", dtype_str(target.scalar_type()));
    check_shape(op, "target", target, {s.T, s.B, spec.O}, "(T, B, O)");
  }
  if (loss_mask.has_value()) {
    const at::Tensor& m = *loss_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                     ": loss_mask must be bool or floating, got ", dtype_str(m.scalar_type()));
    TORCH_CHECK(m.device() == input.device(), op, ": loss_mask must be on the input's device ",
                input.device(), ", got ", m.device());
    check_shape(op, "loss_mask", m, {s.T, s.B}, "(T, B)");
    if (m.scalar_type() != at::kBool) check_mask_values(op, m);
  }
  if (spec.steps == Steps::kLast && s.B > 0) {
    // check_lengths ran first: lengths are int64 [B] (on the CPU or the input's device).
    int64_t lo = s.T;
    if (lengths.has_value()) {
      const at::Tensor lc = lengths->to(at::kCPU).contiguous();
      const int64_t* l = lc.const_data_ptr<int64_t>();
      lo = *std::min_element(l, l + s.B);
    }
    TORCH_CHECK_VALUE(lo >= 1, op, ": steps='last' needs every sequence to have a last step: ",
                      lengths.has_value() ? "lengths must be >= 1, got min " : "T must be >= 1, got ",
                      lo);
  }
  return spec;
}

void check_loss_bwd_args(const char* op, const ElmanShape& s, const LossSpec& spec,
                         const at::Tensor& input, const at::Tensor& grad_loss,
                         const at::Tensor& grad_h_n, const at::Tensor& output,
                         const at::Tensor& weight, const at::Tensor& grad_output,
                         const at::Tensor& grad_weight_out, const at::Tensor& grad_bias_out,
                         bool has_bias_out) {
  check_float_like(op, "grad_loss", grad_loss, input);
  if (spec.reduction == Reduction::kNone) {
    check_shape(op, "grad_loss", grad_loss, {s.T, s.B}, "(T, B) (reduction='none')");
  } else if (grad_output.dim() == 1) {
    // The forward ran without compute_grad: the backward recomputes.
    check_shape(op, "grad_loss", grad_loss, {}, "() (a scalar reduction)");
    check_shape(op, "grad_output", grad_output, {0}, "(0,) (recompute) or (T, B, H)");
    check_shape(op, "grad_weight_out", grad_weight_out, {0}, "(0,) (with grad_output (0,))");
    check_shape(op, "grad_bias_out", grad_bias_out, {0}, "(0,) (with grad_output (0,))");
  } else {
    check_shape(op, "grad_loss", grad_loss, {}, "() (a scalar reduction)");
    check_float_like(op, "grad_output", grad_output, input);
    check_shape(op, "grad_output", grad_output, {s.T, s.B, s.H}, "(T, B, H)");
    check_float_like(op, "grad_weight_out", grad_weight_out, input);
    check_shape(op, "grad_weight_out", grad_weight_out, {spec.O, s.H}, "(O, H)");
    check_float_like(op, "grad_bias_out", grad_bias_out, input);
    if (has_bias_out) check_shape(op, "grad_bias_out", grad_bias_out, {spec.O}, "(O,)");
    else check_shape(op, "grad_bias_out", grad_bias_out, {0}, "(0,) (no bias_out)");
  }
  check_float_like(op, "grad_h_n", grad_h_n, input);
  check_shape(op, "grad_h_n", grad_h_n, {s.B, s.H}, "(B, H)");
  check_float_like(op, "output", output, input);
  check_shape(op, "output", output, {s.T, s.B, s.H}, "(T, B, H)");
  check_float_like(op, "weight", weight, input);
  check_shape(op, "weight", weight, {s.T, s.B}, "(T, B)");
}

ElmanShape check_head_args(const char* op, const at::Tensor& h,
                           const c10::optional<at::Tensor>& lengths) {
  check_steps_tensor(op, "h", h, "(T, B, P)");
  ElmanShape s;
  s.T = h.size(0);
  s.B = h.size(1);
  s.H = h.size(2);
  check_blas_sizes(op, {{"B", s.B}, {"P", s.H}});
  check_lengths(op, lengths, s.B, s.T, h.device());
  return s;
}

namespace {

void head_loss_check(const at::Tensor& input, int64_t P, const at::Tensor& target,
                     const at::Tensor& weight_out, const c10::optional<at::Tensor>& bias_out,
                     const c10::optional<at::Tensor>& lengths,
                     const c10::optional<at::Tensor>& loss_mask, c10::string_view loss,
                     c10::string_view steps, c10::string_view reduction, int64_t ignore_index,
                     double label_smoothing) {
  const char* op = "rnnkern.head_loss_fwd";
  check_steps_tensor(op, "input", input, "(T, B, I)");
  TORCH_CHECK_VALUE(P >= 1, op, ": P must be >= 1, got ", P);
  ElmanShape s;
  s.T = input.size(0);
  s.B = input.size(1);
  s.H = P;
  check_lengths(op, lengths, s.B, s.T, input.device());
  check_loss_args(op, s, input, target, weight_out, bias_out, lengths, loss_mask, loss, steps,
                  reduction, ignore_index, label_smoothing, 0);
}

}  // namespace

// The checks read tensors through ATen only, so one function serves both backends.
TORCH_LIBRARY_IMPL(rnnkern, CPU, m) { m.impl("head_loss_check", &head_loss_check); }
TORCH_LIBRARY_IMPL(rnnkern, CUDA, m) { m.impl("head_loss_check", &head_loss_check); }

CellKind parse_cell(const char* op, c10::string_view mode) {
  if (mode == "lstm") return CellKind::kLstm;
  if (mode == "gru") return CellKind::kGru;
  TORCH_CHECK_VALUE(false, op, ": mode must be 'lstm' or 'gru', got '", std::string(mode), "'");
  return CellKind::kLstm;  // unreachable
}

LayerShape check_layer_args(const char* op, const at::Tensor& input, const at::Tensor& h0,
                            const c10::optional<at::Tensor>& c0, const at::Tensor& weight_ih,
                            const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
                            const c10::optional<at::Tensor>& bias_hh,
                            const c10::optional<at::Tensor>& weight_hr,
                            const c10::optional<at::Tensor>& lengths, c10::string_view mode,
                            bool reverse, int64_t truncate) {
  LayerShape s;
  s.cell = parse_cell(op, mode);
  const bool lstm = s.cell == CellKind::kLstm;
  const int64_t gates = lstm ? 4 : 3;
  const char* G = lstm ? "4H" : "3H";
  s.reverse = reverse;
  TORCH_CHECK_VALUE(truncate >= 0, op, ": truncate must be >= 1 (or 0 for none), got ",
                    truncate);
  s.truncate = truncate;
  check_steps_tensor(op, "input", input, "(T, B, I)");
  check_defined(op, "weight_hh", weight_hh);
  TORCH_CHECK_VALUE(weight_hh.dim() == 2, op, ": weight_hh must be 2-D (", G,
                    ", P), got shape ", shape_str(weight_hh.sizes()));
  s.T = input.size(0);
  s.B = input.size(1);
  s.I = input.size(2);
  s.P = weight_hh.size(1);
  TORCH_CHECK_VALUE(weight_hh.size(0) % gates == 0 && weight_hh.size(0) > 0, op,
                    ": weight_hh must have ", G, " rows (", gates, " gates of H >= 1), got shape ",
                    shape_str(weight_hh.sizes()));
  s.H = weight_hh.size(0) / gates;
  s.G = gates * s.H;
  s.proj = weight_hr.has_value();
  TORCH_CHECK_VALUE(lstm || !s.proj, op, ": weight_hr (the projection) applies to mode='lstm' only");
  if (s.proj) {
    check_float_like(op, "weight_hr", *weight_hr, input);
    check_shape(op, "weight_hr", *weight_hr, {s.P, s.H}, "(P, H)");
  } else {
    TORCH_CHECK_VALUE(s.P == s.H, op, ": weight_hh must have shape (", G, ", H) = ",
                      shape_str({s.G, s.H}), " without a projection, got ",
                      shape_str(weight_hh.sizes()));
  }
  check_blas_sizes(op, {{"B", s.B}, {"I", s.I}, {"G", s.G}, {"P", s.P}});
  check_float_like(op, "weight_hh", weight_hh, input);
  check_float_like(op, "weight_ih", weight_ih, input);
  check_input_size(op, input, weight_ih, s.G, s.I);
  check_shape(op, "weight_ih", weight_ih, {s.G, s.I}, lstm ? "(4H, I)" : "(3H, I)");
  check_float_like(op, "h0", h0, input);
  check_shape(op, "h0", h0, {s.B, s.P}, "(B, P)");
  if (lstm) {
    TORCH_CHECK_VALUE(c0.has_value(), op, ": c0 (B, H) is required for mode='lstm'");
    check_float_like(op, "c0", *c0, input);
    check_shape(op, "c0", *c0, {s.B, s.H}, "(B, H)");
  } else {
    TORCH_CHECK_VALUE(!c0.has_value(), op, ": c0 must be None for mode='gru'");
  }
  if (bias_ih.has_value()) {
    check_float_like(op, "bias_ih", *bias_ih, input);
    check_shape(op, "bias_ih", *bias_ih, {s.G}, lstm ? "(4H,)" : "(3H,)");
  }
  if (bias_hh.has_value()) {
    check_float_like(op, "bias_hh", *bias_hh, input);
    check_shape(op, "bias_hh", *bias_hh, {s.G}, lstm ? "(4H,)" : "(3H,)");
  }
  check_lengths(op, lengths, s.B, s.T, input.device());
  return s;
}

void check_layer_bwd_args(const char* op, const LayerShape& s, const at::Tensor& input,
                          const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                          const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& output,
                          const at::Tensor& gates, const at::Tensor& cell,
                          const at::Tensor& proj_in) {
  const bool lstm = s.cell == CellKind::kLstm;
  check_float_like(op, "grad_output", grad_output, input);
  check_shape(op, "grad_output", grad_output, {s.T, s.B, s.P}, "(T, B, P)");
  check_float_like(op, "output", output, input);
  check_shape(op, "output", output, {s.T, s.B, s.P}, "(T, B, P)");
  check_float_like(op, "grad_h_n", grad_h_n, input);
  check_shape(op, "grad_h_n", grad_h_n, {s.B, s.P}, "(B, P)");
  if (lstm) {
    TORCH_CHECK_VALUE(grad_c_n.has_value(), op, ": grad_c_n (B, H) is required for mode='lstm'");
    check_float_like(op, "grad_c_n", *grad_c_n, input);
    check_shape(op, "grad_c_n", *grad_c_n, {s.B, s.H}, "(B, H)");
  }
  check_float_like(op, "gates", gates, input);
  check_shape(op, "gates", gates, {s.T, s.B, 4 * s.H}, "(T, B, 4H)");
  check_float_like(op, "cell", cell, input);
  if (lstm) check_shape(op, "cell", cell, {s.T, s.B, s.H}, "(T, B, H)");
  else check_shape(op, "cell", cell, {0}, "(0,) (mode='gru')");
  check_float_like(op, "proj_in", proj_in, input);
  if (s.proj) check_shape(op, "proj_in", proj_in, {s.T, s.B, s.H}, "(T, B, H)");
  else check_shape(op, "proj_in", proj_in, {0}, "(0,) (no projection)");
}

}  // namespace rnnkern

// The rnnkern operator library: every op's schema, once. Backends add only
// TORCH_LIBRARY_IMPL blocks (cpu/elman_cpu.cpp; a CUDA file later).
#include <Python.h>

#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string>

#include "checks.h"
#include "cpu/vec_kernels.h"

// Importing rnnkern._C loads this library and so registers the ops; the module
// itself only reports build facts (no pybind11).
static PyObject* rnnkern_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(rnnkern::cpu::vec_kernels().capability);
}

static PyMethodDef rnnkern_methods[] = {
    {"cpu_capability", rnnkern_cpu_capability, METH_NOARGS,
     "The instruction set the CPU kernels' element-wise passes were chosen for."},
    {nullptr, nullptr, 0, nullptr}};

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          rnnkern_methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rnnkern, m) {
  // One Elman layer, one direction, the whole sequence in one call.
  //   input [T,B,I] -> output [T,B,H] (0 where t >= len_b), h_n [B,H]
  m.def(
      "elman_fwd(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? lengths, str nonlinearity, "
      "bool reverse) -> (Tensor output, Tensor h_n)",
      {at::Tag::pt2_compliant_tag});
  // Its whole BPTT in one call. grad_bias is the gradient of bias_ih and of
  // bias_hh alike (they enter z_t as a sum). truncate = 0: no truncation.
  m.def(
      "elman_bwd(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor? lengths, "
      "str nonlinearity, bool reverse, int truncate) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
}

namespace rnnkern {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

void check_float_like(const char* op, const char* name, const at::Tensor& t,
                      const at::Tensor& input) {
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name,
                   " must have the input's dtype ", input.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the input's device ",
              input.device(), ", got ", t.device());
}

void check_shape(const char* op, const char* name, const at::Tensor& t,
                 std::initializer_list<int64_t> expected, const char* letters) {
  TORCH_CHECK_VALUE(t.sizes().equals(expected), op, ": ", name, " must have shape ", letters,
                    " = ", shape_str(expected), ", got ", shape_str(t.sizes()));
}

}  // namespace

Activation parse_activation(c10::string_view nonlinearity) {
  if (nonlinearity == "tanh") return Activation::kTanh;
  if (nonlinearity == "relu") return Activation::kRelu;
  TORCH_CHECK_VALUE(false, "nonlinearity must be 'tanh' or 'relu', got '",
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
  s.act = parse_activation(nonlinearity);
  s.reverse = reverse;
  TORCH_CHECK_VALUE(truncate >= 0, op, ": truncate must be >= 1 (or 0 for none), got ",
                    truncate);
  s.truncate = truncate;
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                   ": input must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() == 3, op, ": input must be 3-D [T, B, I], got shape ",
                    shape_str(input.sizes()));
  TORCH_CHECK_VALUE(weight_hh.dim() == 2, op, ": weight_hh must be 2-D [H, H], got shape ",
                    shape_str(weight_hh.sizes()));
  s.T = input.size(0);
  s.B = input.size(1);
  s.I = input.size(2);
  s.H = weight_hh.size(0);
  TORCH_CHECK_VALUE(s.H >= 1, op, ": hidden size H must be >= 1, got ", s.H);
  TORCH_CHECK_VALUE(s.B <= INT32_MAX && s.H <= INT32_MAX && s.I <= INT32_MAX, op,
                    ": B, I and H must each be < 2^31, got B=", s.B, " I=", s.I, " H=", s.H);
  check_float_like(op, "weight_hh", weight_hh, input);
  check_shape(op, "weight_hh", weight_hh, {s.H, s.H}, "[H, H]");
  check_float_like(op, "weight_ih", weight_ih, input);
  check_shape(op, "weight_ih", weight_ih, {s.H, s.I}, "[H, I]");
  check_float_like(op, "hx", hx, input);
  check_shape(op, "hx", hx, {s.B, s.H}, "[B, H]");
  if (bias_ih.has_value()) {
    check_float_like(op, "bias_ih", *bias_ih, input);
    check_shape(op, "bias_ih", *bias_ih, {s.H}, "[H]");
  }
  if (bias_hh.has_value()) {
    check_float_like(op, "bias_hh", *bias_hh, input);
    check_shape(op, "bias_hh", *bias_hh, {s.H}, "[H]");
  }
  if (lengths.has_value()) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK_TYPE(len.scalar_type() == at::kLong, op,
                     ": lengths must be an int64 tensor, got ", len.scalar_type());
    TORCH_CHECK(len.device().is_cpu(), op, ": lengths must be on the CPU, got ", len.device());
    check_shape(op, "lengths", len, {s.B}, "[B]");
    if (s.B > 0) {
      // A plain scan: two reductions through the dispatcher cost more than
      // a short layer's whole forward.
      const at::Tensor lc = len.contiguous();
      const int64_t* l = lc.const_data_ptr<int64_t>();
      const auto [lo, hi] = std::minmax_element(l, l + s.B);
      TORCH_CHECK_VALUE(*lo >= 0 && *hi <= s.T, op, ": lengths must be in [0, T=", s.T,
                        "], got min ", *lo, " and max ", *hi);
    }
  }
  return s;
}

void check_elman_bwd_args(const ElmanShape& s, const at::Tensor& input,
                          const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                          const at::Tensor& output) {
  const char* op = "rnnkern.elman_bwd";
  check_float_like(op, "grad_output", grad_output, input);
  check_shape(op, "grad_output", grad_output, {s.T, s.B, s.H}, "[T, B, H]");
  check_float_like(op, "output", output, input);
  check_shape(op, "output", output, {s.T, s.B, s.H}, "[T, B, H]");
  check_float_like(op, "grad_h_n", grad_h_n, input);
  check_shape(op, "grad_h_n", grad_h_n, {s.B, s.H}, "[B, H]");
}

}  // namespace rnnkern

// The forward ops' autograd, in C++: TORCH_LIBRARY_IMPL(rnnkern, Autograd).
//
// Each forward op (elman_fwd, elman_loss_fwd, layer_fwd, head_loss_fwd) is a
// torch::autograd::Function whose backward is one call of the matching
// backward op. Both calls go through the dispatcher, below autograd, so one
// kernel serves every backend. Eager Python calls the op directly and meets
// this kernel: no Python autograd.Function, setup_context or Python backward
// runs, which at T = B = 1 cost more than the kernels themselves.
//
// rnnkern/functional.py keeps Python Functions (rnnkern/_ops.py's setup and
// backward) for what a C++ Function cannot do: torch.func's transforms,
// Dynamo's tracing of the API, and rnn_loss's grad_norm side output. The two
// backward paths compute the same thing and the tests run both.
//
// Double backward is refused: under create_graph the gradients come back
// attached to a node that raises by name when differentiated.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace rnnkern {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Str = c10::string_view;

template <class Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// An op's kernel below autograd: the backend's (or the next key's).
template <class Sig, class... Args>
auto call_below(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

OptTensor as_optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// True where the call records a graph: grad mode on and a tensor argument
// that requires grad. Otherwise the op runs below autograd at once. A
// forward-mode tangent on an argument is refused by name: the kernels have no
// forward-mode derivative, and running below autograd would drop it silently.
bool records_graph(const char* op, std::initializer_list<const Tensor*> tensors,
                   std::initializer_list<const OptTensor*> optionals) {
  bool wanted = false;
  auto see = [&](const Tensor& t) {
    TORCH_CHECK(!t._fw_grad(/*level=*/0).defined(), "rnnkern: forward-mode AD through ", op,
                " is not supported: the kernels have a fused reverse-mode backward only. Use "
                "reverse mode, or rnnkern.reference for forward mode.");
    wanted = wanted || t.requires_grad();
  };
  for (const Tensor* t : tensors) see(*t);
  for (const OptTensor* t : optionals)
    if (t->has_value() && (*t)->defined()) see(**t);
  return wanted && at::GradMode::is_enabled();
}

// The gradient of an output autograd left out (None: the output was unused).
Tensor or_zeros(const Tensor& grad, const Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like, at::MemoryFormat::Contiguous);
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// ---------------------------------------------------------------------------
// Outputs the caller modifies in place
// ---------------------------------------------------------------------------
// nn.RNN and nn.GRU let a caller modify the output in place before backward
// (`out.relu_()`, `out += x`): their backward never reads it. The layers'
// fused backward does (h_t at every step), so it reads the output as the
// forward left it, through an alias with a version counter of its own
// (variable_data: autograd then has no reason to refuse the modification),
// and this watch on the output's own counter tells it whether the caller
// changed it since. If so, backward runs the forward again from the saved
// inputs, biases included (saved as aliases too: nn's backward does not read
// them either), before its own kernel. The common case costs three shallow
// aliases a call.
struct VersionWatch : torch::CustomClassHolder {
  struct Seen {
    c10::VariableVersion counter;  // disabled: nothing to watch (undefined, inference)
    uint32_t version = 0;
  };
  std::array<Seen, 3> seen;  // the output, bias_ih, bias_hh: no allocation beyond the holder's

  VersionWatch(const Tensor& output, const Tensor& bias_ih, const Tensor& bias_hh)
      : seen{see(output), see(bias_ih), see(bias_hh)} {}

  static Seen see(const Tensor& t) {
    Seen s;
    if (t.defined() && t.unsafeGetTensorImpl()->version_counter().enabled()) {
      s.counter = t.unsafeGetTensorImpl()->version_counter();
      s.version = s.counter.current_version();
    }
    return s;
  }

  bool changed(size_t i) const {
    const Seen& s = seen.at(i);
    return s.counter.enabled() && s.counter.current_version() != s.version;
  }
};

// Watches the output and the biases (in that order) of a forward.
c10::IValue watch(const Tensor& output, const OptTensor& bias_ih, const OptTensor& bias_hh) {
  return c10::IValue::make_capsule(
      c10::make_intrusive<VersionWatch>(output, or_undefined(bias_ih), or_undefined(bias_hh)));
}

// An alias of t that autograd's version checks do not tie to t (undefined stays so).
Tensor untied(const Tensor& t) { return t.defined() ? t.variable_data() : Tensor(); }

Tensor untied(const OptTensor& t) { return untied(or_undefined(t)); }

// Whether backward must recompute the output; refuses, by name, the case it
// cannot: a bias modified in place too.
bool output_modified(AutogradContext* ctx, const char* what) {
  const auto holder = ctx->saved_data["watch"].toCapsule();
  const auto* w = static_cast<const VersionWatch*>(holder.get());
  if (!w->changed(0)) return false;
  TORCH_CHECK(!w->changed(1) && !w->changed(2), "rnnkern: ", what, "'s output and a bias were "
              "both modified in place before backward; backward needs the output as the "
              "forward computed it, and recomputing it needs the biases unchanged. Modify a "
              "copy (out.clone()) instead.");
  return true;
}

// ---------------------------------------------------------------------------
// create_graph: first-order gradients that refuse a second differentiation
// ---------------------------------------------------------------------------

struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
  // grads: the defined first-order gradients; anchors: the tensors they were
  // computed from, so that they require grad and lead back here.
  static variable_list forward(AutogradContext* ctx, at::TensorList grads, at::TensorList anchors,
                               const std::string& name) {
    ctx->saved_data["name"] = name;
    variable_list out;
    out.reserve(grads.size());
    for (const Tensor& g : grads) out.push_back(g.clone());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "rnnkern: double backward through ", ctx->saved_data["name"].toStringRef(),
                " is not supported: its backward is a fused kernel without a derivative of its "
                "own. Use rnnkern.reference for higher-order gradients.");
  }
};

// The gradients as they are, unless backward runs under create_graph.
void first_order(const char* name, variable_list& grads, std::initializer_list<Tensor> anchors) {
  if (!at::GradMode::is_enabled()) return;
  std::vector<Tensor> present, tied;
  for (const Tensor& g : grads)
    if (g.defined()) present.push_back(g);
  for (const Tensor& a : anchors)
    if (a.defined()) tied.push_back(a);
  variable_list linked = NoDoubleBackward::apply(at::TensorList(present), at::TensorList(tied),
                                                 std::string(name));
  size_t i = 0;
  for (Tensor& g : grads)
    if (g.defined()) g = linked[i++];
}

// ---------------------------------------------------------------------------
// elman_fwd
// ---------------------------------------------------------------------------

using ElmanFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, const OptTensor&, const OptTensor&,
                                               const OptTensor&, Str, bool, int64_t);
using ElmanBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const OptTensor&, Str, bool, int64_t, bool);

// Called by the Function and, with no graph to record, directly.
const c10::TypedOperatorHandle<ElmanFwdSig>& elman_fwd_op() {
  static const auto op = op_handle<ElmanFwdSig>("rnnkern::elman_fwd");
  return op;
}

struct ElmanFn : public torch::autograd::Function<ElmanFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx,
                               const Tensor& weight_ih, const Tensor& weight_hh,
                               const OptTensor& bias_ih, const OptTensor& bias_hh,
                               const OptTensor& lengths, Str nonlinearity, bool reverse,
                               int64_t truncate) {
    auto [output, h_n] = call_below(elman_fwd_op(), input, hx, weight_ih, weight_hh, bias_ih,
                                    bias_hh, lengths, nonlinearity, reverse, truncate);
    // Backward needs h at every step (act' is derived from it) and nothing
    // else of the forward pass.
    ctx->save_for_backward({input, hx, weight_ih, weight_hh, untied(output),
                            or_undefined(lengths), untied(bias_ih), untied(bias_hh)});
    ctx->saved_data["watch"] = watch(output, bias_ih, bias_hh);
    ctx->saved_data["config"] = c10::IValue(
        std::vector<int64_t>{reverse, truncate, present(bias_ih), present(bias_hh)});
    ctx->saved_data["nonlinearity"] = std::string(nonlinearity);
    ctx->set_materialize_grads(false);
    return {output, h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<ElmanBwdSig>("rnnkern::elman_bwd");
    auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &hx = saved[1], &weight_ih = saved[2],
                 &weight_hh = saved[3];
    const auto config = ctx->saved_data["config"].toIntVector();
    const std::string nonlinearity = ctx->saved_data["nonlinearity"].toStringRef();
    Tensor output = saved[4];
    if (output_modified(ctx, "rnnkern.functional.rnn")) {
      output = std::get<0>(call_below(elman_fwd_op(), input, hx, weight_ih, weight_hh,
                                      as_optional(saved[6]), as_optional(saved[7]),
                                      as_optional(saved[5]), nonlinearity, config[0] != 0,
                                      config[1]));
    }
    const bool want_input = ctx->needs_input_grad(0);
    variable_list g(5);
    std::tie(g[0], g[1], g[2], g[3], g[4]) =
        call_below(op, or_zeros(grads[0], output), or_zeros(grads[1], hx), input, hx, weight_ih,
                   weight_hh, output, as_optional(saved[5]), nonlinearity, config[0] != 0,
                   config[1], want_input);
    if (!want_input) g[0] = Tensor();
    first_order("rnnkern.functional.rnn", g, {input, hx, weight_ih, weight_hh});
    const Tensor none;
    return {g[0], g[1], g[2], g[3], config[2] ? g[4] : none, config[3] ? g[4] : none, none,
            none, none, none};
  }
};

std::tuple<Tensor, Tensor> elman_fwd_autograd(const Tensor& input, const Tensor& hx,
                                              const Tensor& weight_ih, const Tensor& weight_hh,
                                              const OptTensor& bias_ih, const OptTensor& bias_hh,
                                              const OptTensor& lengths, Str nonlinearity,
                                              bool reverse, int64_t truncate) {
  if (!records_graph("rnnkern::elman_fwd", {&input, &hx, &weight_ih, &weight_hh},
                     {&bias_ih, &bias_hh})) {
    return call_below(elman_fwd_op(), input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                      nonlinearity, reverse, truncate);
  }
  auto out = ElmanFn::apply(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                            nonlinearity, reverse, truncate);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------
// elman_loss_fwd
// ---------------------------------------------------------------------------

using Tensors8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using ElmanLossFwdSig = Tensors8(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&, Str, Str,
                                 Str, Str, int64_t, double, bool, int64_t, int64_t);
using ElmanLossBwdSig = Tensors8(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&, Str, Str, Str,
                                 int64_t, double, int64_t, bool, int64_t, bool);

// The loss's gradient, zeros where it was not used: [] or, for reduction
// 'none', [T,B] like the loss weights.
Tensor loss_grad(const Tensor& grad, const Tensor& weight, const std::string& reduction) {
  if (grad.defined()) return grad;
  return reduction == "none" ? at::zeros_like(weight) : at::zeros({}, weight.options());
}

// Called by the Function and, with no graph to record, directly.
const c10::TypedOperatorHandle<ElmanLossFwdSig>& elman_loss_fwd_op() {
  static const auto op = op_handle<ElmanLossFwdSig>("rnnkern::elman_loss_fwd");
  return op;
}

struct ElmanLossFn : public torch::autograd::Function<ElmanLossFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& target,
                               const Tensor& hx, const Tensor& weight_ih,
                               const Tensor& weight_hh, const OptTensor& bias_ih,
                               const OptTensor& bias_hh, const Tensor& weight_out,
                               const OptTensor& bias_out, const OptTensor& lengths,
                               const OptTensor& loss_mask, Str nonlinearity, Str loss, Str steps,
                               Str reduction, int64_t ignore_index, double label_smoothing,
                               bool compute_grad, int64_t chunk_rows, int64_t truncate) {
    // compute_grad: a backward is to come (autograd records the call), so the
    // forward sweep computes the head's gradients whatever the caller asked
    // (a jit.trace recorded under no_grad then trains at full speed too).
    auto out = call_below(elman_loss_fwd_op(), input, target, hx, weight_ih, weight_hh, bias_ih,
                          bias_hh, weight_out, bias_out, lengths, loss_mask, nonlinearity, loss,
                          steps, reduction, ignore_index, label_smoothing, true, chunk_rows,
                          truncate);
    auto& [value, output, h_n, step_loss, weight, g_out, g_w_out, g_b_out] = out;
    // h at every step for BPTT, the weights, and for a scalar reduction the
    // head's gradients if the forward sweep computed them ([0] otherwise: the
    // backward then runs the sweep again).
    ctx->save_for_backward({input, target, hx, weight_ih, weight_hh, weight_out,
                            or_undefined(bias_out), or_undefined(lengths), output, weight, g_out,
                            g_w_out, g_b_out});
    ctx->saved_data["config"] = c10::IValue(std::vector<int64_t>{
        ignore_index, truncate, chunk_rows, present(bias_ih), present(bias_hh)});
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["names"] = c10::IValue(std::vector<std::string>{
        std::string(nonlinearity), std::string(loss), std::string(reduction)});
    // Only the loss and h_n carry gradients; the rest is the backward's state.
    ctx->mark_non_differentiable({output, step_loss, weight, g_out, g_w_out, g_b_out});
    ctx->set_materialize_grads(false);
    return {value, output, h_n, step_loss, weight, g_out, g_w_out, g_b_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<ElmanLossBwdSig>("rnnkern::elman_loss_bwd");
    auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &target = s[1], &hx = s[2], &weight_ih = s[3],
                 &weight_hh = s[4], &weight_out = s[5], &bias_out = s[6], &output = s[8],
                 &weight = s[9];
    const auto config = ctx->saved_data["config"].toIntVector();
    const auto names = ctx->saved_data["names"].toListRef();
    const std::string nonlinearity = names[0].toStringRef(), loss = names[1].toStringRef(),
                      reduction = names[2].toStringRef();
    const bool want_input = ctx->needs_input_grad(0);
    variable_list g(7);
    std::tie(g[0], g[1], g[2], g[3], g[4], g[5], g[6], std::ignore) = call_below(
        op, loss_grad(grads[0], weight, reduction), or_zeros(grads[2], hx), input, target, hx,
        weight_ih, weight_hh, weight_out, as_optional(bias_out), as_optional(s[7]), output,
        weight, s[10], s[11], s[12], nonlinearity, loss, reduction, config[0],
        ctx->saved_data["label_smoothing"].toDouble(), config[1], false, config[2], want_input);
    if (!want_input) g[0] = Tensor();
    if (!bias_out.defined()) g[6] = Tensor();
    first_order("rnnkern.functional.rnn_loss", g,
                {input, hx, weight_ih, weight_hh, weight_out, bias_out});
    const Tensor none;
    variable_list result(20);
    result[0] = g[0];
    result[2] = g[1];
    result[3] = g[2];
    result[4] = g[3];
    result[5] = config[3] ? g[4] : none;
    result[6] = config[4] ? g[4] : none;
    result[7] = g[5];
    result[8] = g[6];
    return result;
  }
};

Tensors8 elman_loss_fwd_autograd(const Tensor& input, const Tensor& target, const Tensor& hx,
                                 const Tensor& weight_ih, const Tensor& weight_hh,
                                 const OptTensor& bias_ih, const OptTensor& bias_hh,
                                 const Tensor& weight_out, const OptTensor& bias_out,
                                 const OptTensor& lengths, const OptTensor& loss_mask,
                                 Str nonlinearity, Str loss, Str steps, Str reduction,
                                 int64_t ignore_index, double label_smoothing, bool compute_grad,
                                 int64_t chunk_rows, int64_t truncate) {
  if (!records_graph("rnnkern::elman_loss_fwd", {&input, &hx, &weight_ih, &weight_hh, &weight_out},
                     {&bias_ih, &bias_hh, &bias_out})) {
    return call_below(elman_loss_fwd_op(), input, target, hx, weight_ih, weight_hh, bias_ih,
                      bias_hh, weight_out, bias_out, lengths, loss_mask, nonlinearity, loss,
                      steps, reduction, ignore_index, label_smoothing, compute_grad, chunk_rows,
                      truncate);
  }
  auto o = ElmanLossFn::apply(input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                              weight_out, bias_out, lengths, loss_mask, nonlinearity, loss, steps,
                              reduction, ignore_index, label_smoothing, compute_grad, chunk_rows,
                              truncate);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]};
}

// ---------------------------------------------------------------------------
// layer_fwd (LSTM, GRU)
// ---------------------------------------------------------------------------

using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using LayerFwdSig = Tensors6(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                             const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&, Str, bool, int64_t, bool);
using Tensors9 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using LayerBwdSig = Tensors9(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                             const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                             const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const OptTensor&, Str, bool, int64_t, bool, bool);

// Called by the Function and, with no graph to record, directly.
const c10::TypedOperatorHandle<LayerFwdSig>& layer_fwd_op() {
  static const auto op = op_handle<LayerFwdSig>("rnnkern::layer_fwd");
  return op;
}

struct LayerFn : public torch::autograd::Function<LayerFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0,
                               const OptTensor& c0, const Tensor& weight_ih,
                               const Tensor& weight_hh, const OptTensor& bias_ih,
                               const OptTensor& bias_hh, const OptTensor& weight_hr,
                               const OptTensor& lengths, Str mode, bool reverse,
                               int64_t truncate) {
    // train: backward needs the state, whatever the call asked for
    auto [output, h_n, c_n, gates, cell, proj_in] =
        call_below(layer_fwd_op(), input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                   weight_hr, lengths, mode, reverse, truncate, true);
    ctx->save_for_backward({input, h0, or_undefined(c0), weight_ih, weight_hh,
                            or_undefined(weight_hr), untied(output), gates, cell, proj_in,
                            or_undefined(lengths), untied(bias_ih), untied(bias_hh)});
    ctx->saved_data["watch"] = watch(output, bias_ih, bias_hh);
    ctx->saved_data["config"] = c10::IValue(
        std::vector<int64_t>{reverse, truncate, present(bias_ih), present(bias_hh)});
    ctx->saved_data["mode"] = std::string(mode);
    // gates, cell and proj_in are backward's saved state, not results
    ctx->mark_non_differentiable({gates, cell, proj_in});
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n, gates, cell, proj_in};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<LayerBwdSig>("rnnkern::layer_bwd");
    auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &h0 = s[1], &c0 = s[2], &weight_ih = s[3], &weight_hh = s[4],
                 &weight_hr = s[5];
    const auto config = ctx->saved_data["config"].toIntVector();
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const std::string name = "rnnkern.functional." + mode;
    Tensor output = s[6];
    if (output_modified(ctx, name.c_str())) {
      output = std::get<0>(call_below(layer_fwd_op(), input, h0, as_optional(c0), weight_ih,
                                      weight_hh, as_optional(s[11]), as_optional(s[12]),
                                      as_optional(weight_hr), as_optional(s[10]), mode,
                                      config[0] != 0, config[1], true));
    }
    const bool want_input = ctx->needs_input_grad(0);
    variable_list g(8);
    std::tie(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], std::ignore) = call_below(
        op, or_zeros(grads[0], output), or_zeros(grads[1], h0),
        c0.defined() ? OptTensor(or_zeros(grads[2], c0)) : std::nullopt, input, h0,
        as_optional(c0), weight_ih, weight_hh, as_optional(weight_hr), output, s[7], s[8], s[9],
        as_optional(s[10]), mode, config[0] != 0, config[1], want_input, false);
    if (!want_input) g[0] = Tensor();
    if (!c0.defined()) g[2] = Tensor();
    if (!weight_hr.defined()) g[7] = Tensor();
    first_order(name.c_str(), g, {input, h0, c0, weight_ih, weight_hh, weight_hr});
    const Tensor none;
    return {g[0], g[1], g[2], g[3], g[4], config[2] ? g[5] : none, config[3] ? g[6] : none,
            g[7], none, none, none, none};
  }
};

Tensors6 layer_fwd_autograd(const Tensor& input, const Tensor& h0, const OptTensor& c0,
                            const Tensor& weight_ih, const Tensor& weight_hh,
                            const OptTensor& bias_ih, const OptTensor& bias_hh,
                            const OptTensor& weight_hr, const OptTensor& lengths, Str mode,
                            bool reverse, int64_t truncate, bool train) {
  if (!records_graph("rnnkern::layer_fwd", {&input, &h0, &weight_ih, &weight_hh},
                     {&c0, &bias_ih, &bias_hh, &weight_hr})) {
    return call_below(layer_fwd_op(), input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                      weight_hr, lengths, mode, reverse, truncate, train);
  }
  auto o = LayerFn::apply(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                          lengths, mode, reverse, truncate);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

// ---------------------------------------------------------------------------
// head_loss_fwd
// ---------------------------------------------------------------------------

using HeadFwdSig = Tensors6(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                            const OptTensor&, const OptTensor&, Str, Str, Str, int64_t, double,
                            bool, int64_t);
using HeadBwdSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Str, Str,
    int64_t, double, int64_t);

// True where the head's backward is its forward's gradients times 1: a
// scalar loss whose gradients the forward computed (grad_h [T,B,P]), reached
// by an upstream gradient of exactly 1 on the CPU (reading it elsewhere would
// synchronise the device).
bool unit_scale(const Tensor& grad_loss, const Tensor& grad_h) {
  return grad_loss.defined() && grad_loss.dim() == 0 && grad_loss.device().is_cpu() &&
         grad_h.dim() == 3 && grad_loss.item<double>() == 1.0;
}

// Called by the Function and, with no graph to record, directly.
const c10::TypedOperatorHandle<HeadFwdSig>& head_loss_fwd_op() {
  static const auto op = op_handle<HeadFwdSig>("rnnkern::head_loss_fwd");
  return op;
}

struct HeadLossFn : public torch::autograd::Function<HeadLossFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& h, const Tensor& target,
                               const Tensor& weight_out, const OptTensor& bias_out,
                               const OptTensor& lengths, const OptTensor& loss_mask, Str loss,
                               Str steps, Str reduction, int64_t ignore_index,
                               double label_smoothing, bool compute_grad, int64_t chunk_rows) {
    // compute_grad: as in ElmanLossFn, a backward is to come.
    auto [value, step_loss, weight, g_h, g_w_out, g_b_out] =
        call_below(head_loss_fwd_op(), h, target, weight_out, bias_out, lengths, loss_mask, loss,
                   steps, reduction, ignore_index, label_smoothing, true, chunk_rows);
    ctx->save_for_backward({h, target, weight_out, or_undefined(bias_out), or_undefined(lengths),
                            weight, g_h, g_w_out, g_b_out});
    ctx->saved_data["config"] = c10::IValue(std::vector<int64_t>{ignore_index, chunk_rows});
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["names"] =
        c10::IValue(std::vector<std::string>{std::string(loss), std::string(reduction)});
    ctx->mark_non_differentiable({step_loss, weight, g_h, g_w_out, g_b_out});
    ctx->set_materialize_grads(false);
    return {value, step_loss, weight, g_h, g_w_out, g_b_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<HeadBwdSig>("rnnkern::head_loss_bwd");
    auto s = ctx->get_saved_variables();
    const Tensor &h = s[0], &weight_out = s[2], &bias_out = s[3], &weight = s[5];
    const auto config = ctx->saved_data["config"].toIntVector();
    const auto names = ctx->saved_data["names"].toListRef();
    const std::string loss = names[0].toStringRef(), reduction = names[1].toStringRef();
    variable_list g(3);
    if (unit_scale(grads[0], s[6])) {
      // loss.backward(): the forward's gradients as they are. The op would
      // have to copy them (an op's outputs never alias its inputs); autograd
      // takes these as its own once the saved state is released, and copies
      // them where the graph is kept.
      g = {s[6], s[7], s[8]};
    } else {
      std::tie(g[0], g[1], g[2]) = call_below(
          op, loss_grad(grads[0], weight, reduction), h, s[1], weight_out, as_optional(bias_out),
          as_optional(s[4]), weight, s[6], s[7], s[8], loss, reduction, config[0],
          ctx->saved_data["label_smoothing"].toDouble(), config[1]);
    }
    if (!bias_out.defined()) g[2] = Tensor();
    first_order("rnnkern.functional.rnn_loss", g, {h, weight_out, bias_out});
    variable_list result(13);
    result[0] = g[0];
    result[2] = g[1];
    result[3] = g[2];
    return result;
  }
};

Tensors6 head_loss_fwd_autograd(const Tensor& h, const Tensor& target, const Tensor& weight_out,
                                const OptTensor& bias_out, const OptTensor& lengths,
                                const OptTensor& loss_mask, Str loss, Str steps, Str reduction,
                                int64_t ignore_index, double label_smoothing, bool compute_grad,
                                int64_t chunk_rows) {
  if (!records_graph("rnnkern::head_loss_fwd", {&h, &weight_out}, {&bias_out})) {
    return call_below(head_loss_fwd_op(), h, target, weight_out, bias_out, lengths, loss_mask,
                      loss, steps, reduction, ignore_index, label_smoothing, compute_grad,
                      chunk_rows);
  }
  auto o = HeadLossFn::apply(h, target, weight_out, bias_out, lengths, loss_mask, loss, steps,
                             reduction, ignore_index, label_smoothing, compute_grad, chunk_rows);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkern, Autograd, m) {
  m.impl("elman_fwd", &elman_fwd_autograd);
  m.impl("elman_loss_fwd", &elman_loss_fwd_autograd);
  m.impl("layer_fwd", &layer_fwd_autograd);
  m.impl("head_loss_fwd", &head_loss_fwd_autograd);
}

}  // namespace rnnkern

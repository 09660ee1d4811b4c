"""What a reliability probe of rnnkern found, each pinned by a test: saturation
and non-finite values as nn.RNN, the same bits at any thread count and for any
layout, out-of-range arguments refused by name, whole-model checkpoints,
torch.export with gradients, torch.func, and the 2^31 size bound."""

import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import rnnkern
from helpers import grads_of, make_layer, make_loss_problem, product, run_loss
from rnnkern import functional, reference

NAMES = ["input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nn_twin(layer, nonlinearity):
    """nn.RNN with the layer's weights (one layer, time-major)."""
    w_ih = layer["weight_ih"]
    H, I = w_ih.shape
    m = nn.RNN(I, H, nonlinearity=nonlinearity, dtype=w_ih.dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(m, f"{name}_l0").copy_(layer[name])
    return m


def run_pair(layer, nonlinearity):
    """(outputs, gradients) of rnnkern and of nn.RNN on the same inputs."""
    inputs = [layer[k] for k in NAMES]
    out, h_n = functional.rnn(*inputs, nonlinearity=nonlinearity)
    ours = [out, h_n, *grads_of([out, h_n], inputs)]
    m = nn_twin(layer, nonlinearity)
    x = layer["input"].detach().clone().requires_grad_()
    hx = layer["hx"].detach().clone().requires_grad_()
    out_n, h_n_n = m(x, hx[None])
    params = [x, hx, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0]
    theirs = [out_n, h_n_n[0], *grads_of([out_n, h_n_n[0]], params)]
    return ours, theirs


# --- float32 tanh saturates exactly -----------------------------------------


def test_tanh_float32_is_exactly_one_where_tanh_rounds_to_one():
    x = torch.tensor([9.02, 9.5, 20.0, 1e30, float("inf")])
    x = torch.cat([x, -x])
    n = x.numel()
    out, _ = functional.rnn(x.reshape(1, n, 1), torch.zeros(n, 1), torch.ones(1, 1),
                            torch.zeros(1, 1))
    assert torch.equal(out.reshape(-1), torch.tanh(x)), out.reshape(-1)
    assert torch.equal(torch.tanh(x).abs(), torch.ones(n))


@pytest.mark.parametrize("case", product(scaled=["input", "weights"], H=[7, 300]), ids=str)
def test_saturated_tanh_gradients_match_nn(case):
    """Inputs or weights scaled by 1e30 saturate every unit: nn.RNN's gradients
    through them are exactly 0 (float64 too), never huge and never NaN."""
    T, B, I, H = 5, 3, 4, case["H"]
    layer = make_layer(T, B, I, H, dtype=torch.float32)
    with torch.no_grad():
        if case["scaled"] == "input":
            layer["input"].mul_(1e30)
        else:
            layer["weight_ih"].mul_(1e30)
            layer["weight_hh"].mul_(1e30)
    ours, theirs = run_pair(layer, "tanh")
    for name, a, b in zip(["output", "h_n", *NAMES], ours, theirs):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


# --- relu with NaN / Inf: as nn.RNN on every path ----------------------------


@pytest.mark.parametrize("case", product(H=[7, 512, 513], value=["nan", "inf", "-inf"],
                                         where=["input", "weight_hh"]), ids=str)
def test_relu_non_finite_propagates_as_nn(case):
    """A NaN or Inf placed in one entry: where the results are NaN, and the
    finite values, are nn.RNN's, on the fused (H <= 512) and BLAS paths alike."""
    T, B, I, H = 4, 3, 5, case["H"]
    layer = make_layer(T, B, I, H, seed=H)
    with torch.no_grad():
        if case["where"] == "input":
            layer["input"][1, 2, 3] = float(case["value"])
        else:
            layer["weight_hh"][2, 1] = float(case["value"])
    ours, theirs = run_pair(layer, "relu")
    for name, a, b in zip(["output", "h_n", *NAMES], ours, theirs):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN at other places than nn.RNN's"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True, msg=name)


# --- the same bits at any thread count and for any layout --------------------


def _loss_run(threads, problem, **kw):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors, target = problem
        names = list(tensors)
        value = functional.rnn_loss(tensors["input"], target, *(tensors[n] for n in names[1:]),
                                    **kw)
        grads = torch.autograd.grad(value, [tensors[n] for n in names])
        return [value.detach(), *grads]
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("case", product(loss=["cross_entropy", "mse"],
                                         reduction=["mean", "none"], O=[300, 8]), ids=str)
def test_fused_loss_bitwise_equal_at_one_and_two_threads(case):
    """Every reduction (the head's bias gradient included) sums in an order
    that does not depend on the thread count; O = 8 takes the head's
    transposed logits product (mm_wide_out)."""
    problem = make_loss_problem(17, 33, 9, 64, case["O"], loss=case["loss"], dtype=torch.float32,
                                seed=3)[:2]
    kw = dict(loss=case["loss"], reduction=case["reduction"],
              lengths=torch.randint(0, 18, (33,), generator=torch.Generator().manual_seed(1)))
    if case["reduction"] == "none":
        # a fixed random upstream gradient instead of the scalar loss
        up = torch.randn(17, 33, generator=torch.Generator().manual_seed(2))

        def run(threads):
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                tensors, target = problem
                names = list(tensors)
                v = functional.rnn_loss(tensors["input"], target,
                                        *(tensors[n] for n in names[1:]), **kw)
                return [v.detach(), *torch.autograd.grad((v * up).sum(),
                                                         [tensors[n] for n in names])]
            finally:
                torch.set_num_threads(old)
        one, two = run(1), run(2)
    else:
        one, two = _loss_run(1, problem, **kw), _loss_run(2, problem, **kw)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


_THREADS_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from helpers import grads_of, make_layer
from rnnkern import functional
NAMES = ["input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
T, B, I, H = 20, 64, 16, 300  # the BLAS path, with row passes split across threads
layer = make_layer(T, B, I, H, dtype=torch.float32, seed=5)
lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(0))
results = []
for n in (1, 2):
    torch.set_num_threads(n)
    out, h_n = functional.rnn(*(layer[k] for k in NAMES), lengths=lengths)
    results.append([t.detach() for t in
                    [out, h_n, *grads_of([out, h_n], [layer[k] for k in NAMES])]])
torch.save(results, sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["rnnkern", "blas"])
def test_layer_bitwise_equal_at_one_and_two_threads(backend, tmp_path):
    """With the products on rnnkern's tiles every sum runs in an order that
    does not depend on the thread count: the bits are equal. With them on BLAS
    (RNNKERN_GEMM=blas, or where the probe picks it, as on an Intel Xeon) the
    vendor's GEMM may split its sums by thread count (MKL does on the Xeon):
    the results agree to float32 rounding (README, Determinism). Each backend
    in its own process: the choice is made once per process."""
    out = tmp_path / "r.pt"
    env = dict(os.environ, RNNKERN_GEMM=backend)
    subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(out),
                    os.path.dirname(os.path.abspath(__file__))], env=env, check=True)
    one, two = torch.load(out)
    for i, (a, b) in enumerate(zip(one, two)):
        if backend == "rnnkern":
            assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"
        else:
            scale = b.abs().max().item()
            assert (a - b).abs().max().item() <= 1e-5 * scale, f"result {i}"


@pytest.mark.parametrize("strided", ["input", "hx", "weight_ih", "weight_hh", "bias_ih"])
def test_strided_operand_gives_the_same_bits(strided):
    """A strided view and its contiguous copy give bitwise the same outputs and
    gradients: the kernels copy operands into the layout their GEMMs use."""
    T, B, I, H = 6, 5, 4, 7
    layer = make_layer(T, B, I, H, seed=9)
    inputs = [layer[k] for k in NAMES]
    out, h_n = functional.rnn(*inputs)
    ref = [out, h_n, *grads_of([out, h_n], inputs)]
    t = layer[strided].detach()
    big = torch.randn(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    view = big[..., ::2].requires_grad_()
    assert not view.is_contiguous()
    inputs2 = [view if k == strided else layer[k] for k in NAMES]
    out2, h_n2 = functional.rnn(*inputs2)
    got = [out2, h_n2, *grads_of([out2, h_n2], inputs2)]
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"result {i} differs for a strided {strided}"


# --- out-of-range and mistyped arguments, refused by name --------------------


def _layer_args():
    layer = make_layer(5, 3, 4, 6)
    return [layer[k] for k in NAMES]


@pytest.mark.parametrize("kw, exc, match", [
    (dict(truncate=2**63), ValueError, r"truncate must be an int in \[1, 9223372036854775807\], got 9223372036854775808"),
    (dict(reverse="yes"), TypeError, r"reverse must be a bool, got 'yes' \(str\)"),
    (dict(reverse=1), TypeError, r"reverse must be a bool, got 1 \(int\)"),
    (dict(batch_first=None), TypeError, r"batch_first must be a bool, got None"),
    (dict(lengths=torch.tensor([5, 2, 1], device="meta")), RuntimeError,
     r"lengths must be on the CPU or on the input's device cpu, got meta"),

])
def test_rnn_refuses(kw, exc, match):
    with pytest.raises(exc, match=match):
        functional.rnn(*_layer_args(), **kw)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(ignore_index=2**70), ValueError, r"ignore_index must be an int in \[-9223372036854775808, 9223372036854775807\], got 1180591620717411303424"),
    (dict(truncate=2**63), ValueError, r"truncate must be an int in \[1, "),
    (dict(return_details="no"), TypeError, r"return_details must be a bool, got 'no'"),
    (dict(loss_mask=torch.full((5, 3), float("inf"))), ValueError, r"loss_mask must be finite and >= 0, got inf"),
])
def test_rnn_loss_refuses(kw, exc, match):
    tensors, target, _ = make_loss_problem(5, 3, 4, 6, 7)
    names = list(tensors)
    with pytest.raises(exc, match=match):
        functional.rnn_loss(tensors["input"], target, *(tensors[n] for n in names[1:]), **kw)


def test_loss_op_refuses_inf_mask():
    """The op itself refuses it too (a direct call skips Python's checks)."""
    tensors, target, _ = make_loss_problem(5, 3, 4, 6, 7)
    t = {k: (v.detach() if v is not None else None) for k, v in tensors.items()}
    mask = torch.ones(5, 3)
    mask[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"loss_mask must be finite and >= 0, got inf"):
        torch.ops.rnnkern.elman_loss_fwd(
            t["input"], target, t["hx"], t["weight_ih"], t["weight_hh"], t["bias_ih"],
            t["bias_hh"], t["weight_out"], t["bias_out"], None, mask, "tanh", "cross_entropy",
            "all", "mean", -100, 0.0, False, 0)


@pytest.mark.parametrize("kw, name", [(dict(bias=1), "bias"), (dict(batch_first="yes"), "batch_first"),
                                      (dict(bidirectional=0), "bidirectional")])
def test_module_flags_must_be_bools(kw, name):
    with pytest.raises(TypeError, match=rf"{name} must be a bool, got"):
        rnnkern.RNN(4, 6, **kw)


def test_module_device_mismatch_is_runtime_error_as_nn():
    m, m_nn = rnnkern.RNN(4, 6), nn.RNN(4, 6)
    x = torch.randn(5, 3, 4, device="meta")
    with pytest.raises(RuntimeError):
        m_nn(x)
    with pytest.raises(RuntimeError, match=r"input must be on the device of the module's parameters cpu, got meta"):
        m(x)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gated_size_past_int32_refused_before_any_work(cell):
    """The gated layers' GEMMs take B, I, G = 4H or 3H and P as 32-bit sizes."""
    B, H = 2**31, 2
    x = torch.zeros(()).expand(1, B, 3)
    h = torch.zeros(()).expand(B, H)
    G = (4 if cell == "lstm" else 3) * H
    hx = (h, h) if cell == "lstm" else h
    with pytest.raises(ValueError, match=r"B must be < 2\^31 \(BLAS takes 32-bit sizes\), "
                                         r"got 2147483648"):
        getattr(functional, cell)(x, hx, torch.randn(G, 3), torch.randn(G, H))


def test_size_past_int32_refused_before_any_work():
    """BLAS takes 32-bit sizes; B >= 2^31 is refused by name (a zero-stride
    view: nothing of that size is allocated)."""
    B, H = 2**31, 2
    x = torch.zeros(()).expand(1, B, 3)
    hx = torch.zeros(()).expand(B, H)
    w_ih, w_hh = torch.randn(H, 3), torch.randn(H, H)
    with pytest.raises(ValueError, match=r"B, I and H must each be < 2\^31, got B=2147483648"):
        functional.rnn(x, hx, w_ih, w_hh)


# --- whole-model checkpoints --------------------------------------------------


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = rnnkern.RNN(4, 6, num_layers=2, bidirectional=True)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


def _loss_module():
    return rnnkern.RNNLoss(rnnkern.RNN(4, 6), nn.Linear(6, 5))


@pytest.mark.parametrize("which", ["RNN", "LSTM", "GRU", "RNNLoss", "model"])
def test_whole_model_checkpoint_loads_with_weights_only_in_a_fresh_process(which, tmp_path):
    torch.manual_seed(0)
    model = {"RNN": lambda: rnnkern.RNN(4, 6, num_layers=2),
             "LSTM": lambda: rnnkern.LSTM(4, 6, num_layers=2, proj_size=3),
             "GRU": lambda: rnnkern.GRU(4, 6, bidirectional=True), "RNNLoss": _loss_module,
             "model": _Model}[which]()
    x = torch.randn(7, 3, 4)
    target = torch.randint(0, 5, (7, 3))
    with torch.no_grad():
        want = model(x, target) if which == "RNNLoss" else model(x)
        want = want if isinstance(want, torch.Tensor) else want[0]
    path = tmp_path / "model.pt"
    # As for a model of torch.nn modules, the loading code allows the classes
    # it knows the model uses (its own and torch.nn's); rnnkern's own classes
    # need nothing more than importing rnnkern.
    allowed = "[torch.nn.Linear" + (", _Model]" if which == "model" else "]")
    code_model = ("sys.path.insert(0, {tests!r}); from test_reliability import _Model; "
                  f"torch.serialization.add_safe_globals({allowed})")
    torch.save(model, path)
    torch.save((x, target, want), tmp_path / "io.pt")
    code = (
        "import sys, torch, rnnkern\n"
        + code_model.format(tests=os.path.join(ROOT, "tests")) + "\n"
        f"m = torch.load({str(path)!r})\n"  # weights_only=True is the default
        f"x, target, want = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    got = m(x, target) if {which == 'RNNLoss'} else m(x)\n"
        "got = got if isinstance(got, torch.Tensor) else got[0]\n"
        "assert torch.equal(got, want), (got - want).abs().max()\n"
        "print('ok', type(m).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout


def test_state_dict_round_trip_with_nn_rnn():
    ours, theirs = rnnkern.RNN(4, 6, num_layers=2), nn.RNN(4, 6, num_layers=2)
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    ours.load_state_dict(torch.load(buf))
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-5, atol=1e-6)
    back = nn.RNN(4, 6, num_layers=2)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x)[0], ours(x)[0], rtol=1e-5, atol=1e-6)


# --- torch.export with gradients ---------------------------------------------


@pytest.mark.parametrize("case", product(module=["RNN", "LSTM", "GRU", "RNNLoss"],
                                         truncate=[None, 2]), ids=str)
def test_export_runs_with_gradients(case, tmp_path):
    torch.manual_seed(0)
    if case["module"] != "RNNLoss":
        model = getattr(rnnkern, case["module"])(4, 8, num_layers=2, bidirectional=True)

        class Wrap(nn.Module):
            def __init__(self, rnn):
                super().__init__()
                self.rnn = rnn

            def forward(self, x):
                return self.rnn(x, truncate=case["truncate"])[0]
        wrapped = Wrap(model)
        args = (torch.randn(6, 3, 4),)
    else:
        model = _loss_module()

        class Wrap(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x, target):
                return self.m(x, target, truncate=case["truncate"])
        wrapped = Wrap(model)
        args = (torch.randn(6, 3, 4), torch.randint(0, 5, (6, 3)))
    ep = torch.export.export(wrapped, args)
    path = tmp_path / "ep.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    for program in (ep, loaded):
        mod = program.module()
        out = mod(*args)
        want = wrapped(*args)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        # the exported program differentiates as eager does
        g = torch.randn(out.shape) if out.dim() else torch.tensor(1.3)
        got = torch.autograd.grad(out, list(mod.parameters()), g)
        ref = torch.autograd.grad(want, list(wrapped.parameters()), g)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_direct_op_call_differentiates():
    """The op carries its own autograd: a direct call with weights that need
    grad gives the API's gradients."""
    layer = make_layer(5, 3, 4, 6, seed=2)
    inputs = [layer[k] for k in NAMES]
    out, h_n = torch.ops.rnnkern.elman_fwd(*inputs, None, "tanh", False, 2)
    got = grads_of([out, h_n], inputs)
    out2, h_n2 = functional.rnn(*inputs, truncate=2)
    want = grads_of([out2, h_n2], inputs)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", product(mode=["rnn_tanh", "lstm", "gru"],
                                         reduction=["mean", "none"]), ids=str)
def test_cpp_and_python_autograd_give_the_same_bits(case):
    """Eager calls differentiate through the ops' C++ autograd (csrc/autograd.cpp);
    torch.func's transforms go through the Python Functions (rnnkern/_ops.py)
    instead. Both must give the same gradients, bit for bit, and the eager
    graph must hold no Python rnnkern node."""
    mode = case["mode"]
    T, B, I, H, O = 6, 3, 4, 7, 5
    G = {"rnn_tanh": 1, "lstm": 4, "gru": 3}[mode]
    g = torch.Generator().manual_seed(11)
    lengths = torch.tensor([6, 1, 4])
    x = torch.randn(T, B, I, dtype=torch.float64, generator=g)
    w = [torch.randn(*shape, dtype=torch.float64, generator=g) * 0.4
         for shape in ((G * H, I), (G * H, H), (G * H,), (G * H,), (O, H), (O,))]
    target = torch.randint(0, O, (T, B), generator=g)
    h0 = torch.randn(B, H, dtype=torch.float64, generator=g)
    hx = (h0, h0.flip(0)) if mode == "lstm" else h0
    coef = torch.linspace(0.5, 1.5, T * B, dtype=torch.float64).view(T, B)

    def f(x, *w):
        value = functional.rnn_loss(x, target, hx, *w, mode=mode, lengths=lengths, truncate=4,
                                    reduction=case["reduction"])
        return (value * coef).sum() if case["reduction"] == "none" else value

    leaves = [t.clone().requires_grad_() for t in (x, *w)]
    value = f(*leaves)
    chain, seen = [value.grad_fn], set()
    while chain:
        fn = chain.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        assert not isinstance(fn, torch.autograd.function.BackwardCFunction), fn.name()
        chain.extend(fn_ for fn_, _ in fn.next_functions)
    assert any(fn.name().startswith("torch::autograd::CppNode<rnnkern::") for fn in seen)
    eager = torch.autograd.grad(value, leaves)
    func = torch.func.grad(f, argnums=tuple(range(7)))(x, *w)
    for a, b in zip(eager, func):
        assert torch.equal(a, b)


def test_direct_op_call_refuses_a_forward_mode_tangent():
    """A dual input to a direct op call is refused by name, not run below
    autograd with its tangent silently dropped."""
    import torch.autograd.forward_ad as fwAD
    layer = {k: v.detach() for k, v in make_layer(4, 2, 3, 5, seed=3).items()}
    inputs = [layer[k] for k in NAMES]
    with fwAD.dual_level():
        x = fwAD.make_dual(inputs[0], torch.randn_like(inputs[0]))
        with pytest.raises(RuntimeError, match=r"forward-mode AD through rnnkern::elman_fwd "):
            torch.ops.rnnkern.elman_fwd(x, *inputs[1:], None, "tanh", False, 0)
        h = fwAD.make_dual(torch.randn(4, 2, 5), torch.randn(4, 2, 5))
        with pytest.raises(RuntimeError, match=r"forward-mode AD through rnnkern::head_loss_fwd "):
            torch.ops.rnnkern.head_loss_fwd(h, torch.randint(0, 3, (4, 2)), torch.randn(3, 5),
                                            None, None, None, "cross_entropy", "all", "mean",
                                            -100, 0.0, False, 0)


# --- torch.func ---------------------------------------------------------------


def _f(w_hh, layer):
    out, h_n = functional.rnn(layer["input"], layer["hx"], layer["weight_ih"], w_hh,
                              layer["bias_ih"], layer["bias_hh"])
    return out.pow(2).sum() + h_n.sum()


def test_func_grad_and_vjp_work():
    layer = {k: v.detach() for k, v in make_layer(5, 3, 4, 6, seed=4).items()}
    w = layer["weight_hh"]
    want = torch.autograd.grad(_f(w.clone().requires_grad_(), layer),
                               [w.clone().requires_grad_()], allow_unused=True)
    w_req = w.clone().requires_grad_()
    want = torch.autograd.grad(_f(w_req, layer), [w_req])[0]
    torch.testing.assert_close(torch.func.grad(_f)(w, layer), want, rtol=0, atol=0)
    _, vjp = torch.func.vjp(lambda w_: _f(w_, layer), w)
    torch.testing.assert_close(vjp(torch.tensor(1.0, dtype=w.dtype))[0], want, rtol=0, atol=0)
    torch.testing.assert_close(torch.func.jacrev(lambda w_: _f(w_, layer))(w), want, rtol=0, atol=0)


def test_func_transform_over_a_bare_op_call_is_refused_not_wrong():
    """The ops' own autograd is C++, which torch.func does not take: a bare op
    call inside a transform raises (README, torch.func); the functions route
    transforms to their Python Functions instead (the test above)."""
    layer = {k: v.detach() for k, v in make_layer(5, 3, 4, 6, seed=4).items()}

    def f(w_hh):
        out, _ = torch.ops.rnnkern.elman_fwd(layer["input"], layer["hx"], layer["weight_ih"], w_hh,
                                             None, None, None, "tanh", False, 0)
        return out.sum()

    with pytest.raises(RuntimeError, match="C\\+\\+ torch::autograd::Function with functorch"):
        torch.func.grad(f)(layer["weight_hh"])


def test_func_vmap_equals_a_loop():
    layer = {k: v.detach() for k, v in make_layer(5, 3, 4, 6, seed=4).items()}
    ws = torch.randn(3, 6, 6, dtype=torch.float64)
    got = torch.func.vmap(lambda w_: _f(w_, layer))(ws)
    want = torch.stack([_f(w, layer) for w in ws])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


SECOND_ORDER = ["grad(grad)", "jacrev(jacrev)", "vjp(vjp)", "grad(penalty)", "grad then backward"]


@pytest.mark.parametrize("case", product(cell=["RNN", "GRU", "LSTM", "rnn_loss"],
                                         transform=SECOND_ORDER), ids=str)
def test_func_second_order_is_refused_not_zero(case):
    """torch.func's grad transforms run backward with grad mode on, so that
    they nest; a second derivative through the fused backward must raise as
    eager double backward does. It used to come back as zeros: the fused
    backward's outputs were constants to the outer level (a client's
    grad(grad(f)), a gradient penalty under func.grad, a MAML inner step)."""
    torch.manual_seed(3)
    dt = torch.float64
    x = torch.randn(4, 3, 2, dtype=dt)
    if case["cell"] == "rnn_loss":
        tgt = torch.randint(0, 5, (4, 3))
        ws = [torch.randn(12, 2, dtype=dt), torch.randn(12, 4, dtype=dt), torch.randn(12, dtype=dt),
              torch.randn(12, dtype=dt), torch.randn(5, 4, dtype=dt), torch.randn(5, dtype=dt)]

        def loss(x_, w_hh):
            return functional.rnn_loss(x_, tgt, None, ws[0], w_hh, ws[2], ws[3], ws[4], ws[5],
                                       mode="gru", loss="cross_entropy")
    else:
        m = getattr(rnnkern, case["cell"])(2, 3).to(dt)
        w_name = "weight_hh_l0"

        def loss(x_, w_hh):
            params = {k: (w_hh if k == w_name else v.detach()) for k, v in m.named_parameters()}
            return torch.func.functional_call(m, params, (x_,))[0].pow(2).sum()
        ws = [None, getattr(m, w_name).detach()]
    w = ws[1]
    match = r"rnnkern: double backward through rnnkern\.functional\.\w+ is not supported"
    g = torch.func.grad(loss)  # d loss / d x
    # First order is fine and matches eager autograd.
    x_req = x.clone().requires_grad_()
    torch.testing.assert_close(g(x, w), torch.autograd.grad(loss(x_req, w), [x_req])[0],
                               rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match=match):
        t = case["transform"]
        if t == "grad(grad)":
            torch.func.grad(lambda x_: g(x_, w).sum())(x)
        elif t == "jacrev(jacrev)":
            torch.func.jacrev(torch.func.jacrev(lambda x_: loss(x_, w)))(x)
        elif t == "vjp(vjp)":
            _, inner = torch.func.vjp(lambda x_: loss(x_, w), x)
            _, outer = torch.func.vjp(lambda v: inner(v)[0], torch.tensor(1.0, dtype=dt))
            outer(torch.ones_like(x))
        elif t == "grad(penalty)":
            def penalty(x_):
                xr = x_.requires_grad_() if not x_.requires_grad else x_
                (gx,) = torch.autograd.grad(loss(xr, w), [xr], create_graph=True)
                return gx.pow(2).sum()
            torch.func.grad(penalty)(x)
        else:  # a MAML-style inner step under func.grad, the outer step in eager autograd
            w_req = w.clone().requires_grad_()
            adapted = w_req - 0.1 * torch.func.grad(loss, argnums=1)(x, w_req)
            loss(x, adapted).backward()


@pytest.mark.parametrize("case", product(transform=["jvp", "jacfwd", "forward_ad"],
                                         fn=["rnn", "rnn_loss"]), ids=str)
def test_func_forward_mode_is_refused_by_name(case):
    """Forward-mode AD has no fused kernel: refused, never a silent zero tangent."""
    tensors, target, _ = make_loss_problem(5, 3, 4, 6, 7)
    layer = {k: (v.detach() if v is not None else None) for k, v in tensors.items()}
    w = layer["weight_hh"]
    if case["fn"] == "rnn":
        f = lambda w_: _f(w_, layer)  # noqa: E731
    else:
        def f(w_):
            return functional.rnn_loss(layer["input"], target, layer["hx"], layer["weight_ih"], w_,
                                       layer["bias_ih"], layer["bias_hh"], layer["weight_out"],
                                       layer["bias_out"])
    with pytest.raises(RuntimeError, match=r"rnnkern: forward-mode AD through rnnkern\.functional\."
                                           r"rnn(_loss)? .* is not supported"):
        if case["transform"] == "jvp":
            torch.func.jvp(f, (w,), (torch.ones_like(w),))
        elif case["transform"] == "jacfwd":
            torch.func.jacfwd(f)(w)
        else:
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                f(fwAD.make_dual(w, torch.ones_like(w)))


@pytest.mark.parametrize("reduction", ["mean", "seq_sum", "none"])
def test_loss_op_backward_recomputes_without_compute_grad(reduction):
    """A direct op call (or an exported graph) may run the forward with
    compute_grad=False; its registered backward then runs the head sweep again
    and gives the same gradients."""
    tensors, target, _ = make_loss_problem(6, 4, 3, 5, 7, seed=11)
    names = list(tensors)
    leaves = [tensors[n] for n in names]
    grads = []
    for compute_grad in (True, False):
        out = torch.ops.rnnkern.elman_loss_fwd(
            leaves[0], target, *leaves[1:], None, None, "tanh", "cross_entropy", "all",
            reduction, -100, 0.0, compute_grad, 0, 2)
        up = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(0),
                         dtype=out[0].dtype)
        grads.append(torch.autograd.grad((out[0] * up).sum() + out[2].sum(), leaves))
    for name, a, b in zip(names, *grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


# --- lengths: the padding is never read -------------------------------------


def _layer_call(mode, H, P, dtype, g):
    """A random one-layer problem of `mode` and a function running it with lengths."""
    T, B, I = 6, 4, 5
    G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[mode] * H

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / H**0.5).to(dtype)

    params = [rnd(G, I), rnd(G, P), rnd(G), rnd(G)]
    if P != H:
        params.append(rnd(P, H))
    hx = (rnd(B, P), rnd(B, H)) if mode == "lstm" else rnd(B, H)
    x = rnd(T, B, I)

    def run(impl, x, lengths, reverse):
        leaves = [x, *(hx if mode == "lstm" else (hx,)), *params]
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        xl, ps = leaves[0], leaves[-len(params):]
        h = tuple(leaves[1:3]) if mode == "lstm" else leaves[1]
        if mode == "lstm":
            w_hr = ps[4] if P != H else None
            out, (h_n, c_n) = impl.lstm(xl, h, *ps[:4], w_hr, lengths=lengths,
                                              reverse=reverse)
            outs = [out, h_n, c_n]
        elif mode == "gru":
            out, h_n = impl.gru(xl, h, *ps, lengths=lengths, reverse=reverse)
            outs = [out, h_n]
        else:
            out, h_n = impl.rnn(xl, h, *ps, nonlinearity=mode[4:], lengths=lengths,
                                      reverse=reverse)
            outs = [out, h_n]
        return [o.detach() for o in outs] + grads_of(outs, leaves)

    return x, run


@pytest.mark.parametrize("case", product(
    impl=["kernel", "reference"], mode=["rnn_tanh", "rnn_relu", "lstm", "gru", "lstm_proj"],
    H=[7, 300],
    dtype=[torch.float64, torch.float32], value=["nan", "inf"], reverse=[False, True]), ids=str)
def test_padding_holds_anything_with_lengths(case):
    """With lengths= the input is read at t < len_b only, as nn reads a
    PackedSequence: NaN or Inf in the padded positions changes no output and no
    gradient (weight_ih's included, whose product runs over all T*B rows), in the
    kernels and in the reference alike."""
    impl = functional if case["impl"] == "kernel" else reference
    mode, H = case["mode"], case["H"]
    P = H // 2 + 1 if mode == "lstm_proj" else H
    mode = mode.removesuffix("_proj")
    g = torch.Generator().manual_seed(H + len(mode))
    x, run = _layer_call(mode, H, P, case["dtype"], g)
    lengths = torch.tensor([6, 0, 3, 1])
    valid = (torch.arange(6)[:, None] < lengths[None, :])[..., None]  # [T,B,1]
    clean = run(impl, x, lengths, case["reverse"])
    dirty = run(impl, torch.where(valid, x, float(case["value"])), lengths, case["reverse"])
    for i, (a, b) in enumerate(zip(clean, dirty)):
        assert bool(b.isfinite().all()), f"result {i}: not finite"
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"result {i}")


@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_nan_padding_module_equals_packed_nn(cell):
    """A 2-layer bidirectional module with lengths= and NaN padding: nn's result on
    the PackedSequence, every gradient finite."""
    torch.manual_seed(3)
    ours = getattr(rnnkern, cell)(5, 7, num_layers=2, bidirectional=True, batch_first=True,
                                  dtype=torch.float64)
    theirs = getattr(nn, cell)(5, 7, num_layers=2, bidirectional=True, batch_first=True,
                               dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    lengths = torch.tensor([6, 2, 4])
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    x = torch.where((torch.arange(6)[None, :] < lengths[:, None])[..., None], x, float("nan"))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, _ = ours(xa, lengths=lengths)
    packed = nn.utils.rnn.pack_padded_sequence(xb, lengths, batch_first=True,
                                               enforce_sorted=False)
    out_n, _ = nn.utils.rnn.pad_packed_sequence(theirs(packed)[0], batch_first=True)
    got = grads_of([out], [xa, *ours.parameters()])
    want = grads_of([out_n], [xb, *theirs.parameters()])
    torch.testing.assert_close(out, out_n, rtol=1e-10, atol=1e-12)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.isfinite().all(), f"gradient {i}: not finite"
        torch.testing.assert_close(a, b.nan_to_num(), rtol=1e-10, atol=1e-12, msg=f"grad {i}")


@pytest.mark.parametrize("case", product(impl=["kernel", "reference"], O=[8, 300],
                                         value=["nan", "inf"]), ids=str)
def test_padding_holds_anything_in_rnn_loss(case):
    """The fused per-step loss with lengths=: NaN or Inf in the padded input gives
    the loss and the gradients of any other padding."""
    impl = functional if case["impl"] == "kernel" else reference
    T, B = 6, 4
    lengths = torch.tensor([6, 0, 3, 1])
    tensors, target, kw = make_loss_problem(T, B, 5, 7, case["O"], seed=case["O"],
                                            lengths=lengths)
    clean = run_loss(impl, tensors, target, **kw)
    valid = (torch.arange(T)[:, None] < lengths[None, :])[..., None]
    tensors["input"] = torch.where(valid, tensors["input"], float(case["value"]))
    dirty = run_loss(impl, tensors, target, **kw)
    for what, a, b in [("loss", clean[0], dirty[0]), ("h_n", clean[1], dirty[1]),
                       *((name, clean[4][name], dirty[4][name]) for name in clean[4])]:
        assert bool(b.isfinite().all()), f"{what}: not finite"
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=what)


@pytest.mark.parametrize("case", product(impl=["kernel", "reference"],
                                         zero=["padding", "loss_mask"]), ids=str)
def test_mse_target_of_a_row_of_weight_zero_is_never_read(case):
    """NaN in the MSE target where a row has weight 0 (past its length, or
    masked) changes neither the loss nor a gradient."""
    impl = functional if case["impl"] == "kernel" else reference
    T, B = 6, 4
    lengths = torch.tensor([6, 0, 3, 1]) if case["zero"] == "padding" else None
    tensors, target, kw = make_loss_problem(T, B, 5, 7, 9, loss="mse", seed=5, lengths=lengths,
                                            loss_mask="bool" if lengths is None else None)
    counted = (torch.arange(T)[:, None] < lengths[None, :]) if lengths is not None \
        else kw["loss_mask"]
    assert not bool(counted.all())
    clean = run_loss(impl, tensors, target, loss="mse", **kw)
    dirty = run_loss(impl, tensors, torch.where(counted[..., None], target, float("nan")),
                     loss="mse", **kw)
    for what, a, b in [("loss", clean[0], dirty[0]), ("step_loss", clean[2], dirty[2]),
                       *((name, clean[4][name], dirty[4][name]) for name in clean[4])]:
        assert bool(b.isfinite().all()), f"{what}: not finite"
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=what)

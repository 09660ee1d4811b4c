"""torch.compile on models that use rnnkern.RNN, LSTM and GRU: fullgraph,
dynamic T and B, packed input, all against eager; nn.RNN itself cannot compile
fullgraph."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkern
from helpers import TOL, assert_close

I, H, O = 4, 6, 3


class Tagger(nn.Module):
    """An RNN with a linear head at every step: (T, B, I) -> (T, B, O), and h_n."""

    def __init__(self, rnn_cls, **kw):
        super().__init__()
        self.rnn = rnn_cls(I, H, **kw)
        self.head = nn.Linear((2 if self.rnn.bidirectional else 1) * H, O)

    def forward(self, x, hx=None, lengths=None):
        out, h_n = self.rnn(x, hx, lengths=lengths)
        if isinstance(out, PackedSequence):
            out = out.data
        return self.head(out), h_n


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(model, x, *args, **kw):
    """Outputs of the model and the gradients of a loss over them with respect
    to x's data and every parameter."""
    model.zero_grad()
    leaf = x.data if isinstance(x, PackedSequence) else x
    leaf.grad = None
    y, h_n = model(x, *args, **kw)
    states = h_n if isinstance(h_n, tuple) else (h_n,)  # the LSTM's (h_n, c_n)
    (y.square().mean() + sum(h.sin().sum() for h in states)).backward()
    return [y, *states, leaf.grad] + [p.grad for p in model.parameters()]


def assert_all_close(got, want, tol, model):
    params = model.named_parameters()
    states = ["h_n", "c_n"] if isinstance(model.rnn, rnnkern.LSTM) else ["h_n"]
    names = ["y", *states, "grad input"] + [f"grad {n}" for n, _ in params]
    assert len(got) == len(want) == len(names)
    for name, a, b in zip(names, got, want):
        assert_close(a, b, tol, name)


def test_fullgraph_matches_eager():
    model = Tagger(rnnkern.RNN, num_layers=2, bidirectional=True, batch_first=True)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 9, I, requires_grad=True)  # (B, T, I)
    hx = torch.randn(4, 3, H)
    assert_all_close(run(compiled, x, hx), run(model, x, hx), TOL[torch.float32], model)


@pytest.mark.parametrize("cls", [rnnkern.RNN, rnnkern.LSTM, rnnkern.GRU],
                         ids=["rnn", "lstm", "gru"])
def test_dynamic_shapes_compile_once(cls):
    """dynamic=True: new T and B (and lengths) reuse the graph, for every cell.
    B >= 2 since Dynamo specialises sizes 0 and 1."""
    model = Tagger(cls, num_layers=2, bidirectional=True)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for i, (T, B) in enumerate([(5, 2), (11, 4), (3, 7), (8, 3)]):
        x = torch.randn(T, B, I, requires_grad=True)
        lengths = torch.randint(0, T + 1, (B,))
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            got = run(compiled, x, None, lengths)
        assert_all_close(got, run(model, x, None, lengths), TOL[torch.float32], model)


@pytest.mark.parametrize("cls", [rnnkern.RNN, rnnkern.LSTM, rnnkern.GRU],
                         ids=["rnn", "lstm", "gru"])
def test_autocast_compiles_fullgraph_as_eager(cls):
    """Under torch.autocast a Linear before the layer hands it bfloat16; the
    module's autocast test (one C call in eager code, the general test that
    Dynamo traces in compiled code) must take the same branch both ways:
    float32 outputs, equal to eager's, and the same gradients."""
    model = nn.Sequential(nn.Linear(I, I), cls(I, H))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(7, 3, I)
    got, want = [], []
    for fn, into in ((compiled, got), (model, want)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, state = fn(x)
        states = state if isinstance(state, tuple) else (state,)
        assert out.dtype == torch.float32 and all(h.dtype == torch.float32 for h in states)
        (out.square().mean() + sum(h.sin().sum() for h in states)).backward()
        into += [out, *states] + [p.grad for p in model.parameters()]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert_close(a, b, TOL[torch.float32], "autocast compiled vs eager")


def test_packed_input_compiles():
    model = Tagger(rnnkern.RNN, num_layers=2, bidirectional=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(7, 3, I)
    for enforce_sorted, lengths in ((True, [7, 5, 2]), (False, [2, 7, 5])):
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        packed.data.requires_grad_()
        assert_all_close(run(compiled, packed), run(model, packed), TOL[torch.float32], model)


def test_double_backward_raises_when_compiled():
    model = Tagger(rnnkern.RNN).double()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 2, I, dtype=torch.float64, requires_grad=True)
    y, _ = compiled(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_nn_rnn_cannot_compile_fullgraph():
    """Why rnnkern.RNN subclasses nn.RNNBase and not nn.RNN: Dynamo refuses the latter."""
    compiled = torch.compile(Tagger(nn.RNN), fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN"):
        compiled(torch.randn(5, 2, I))


CELLS = [rnnkern.RNN, rnnkern.LSTM, rnnkern.GRU]


def loss_run(loss_fn, x, target, lengths, **kw):
    """rnn_loss through RNNLoss, then backward: the result (and details) and
    every gradient."""
    loss_fn.zero_grad()
    x.grad = None
    result = loss_fn(x, target, lengths=lengths, loss_mask=None, **kw)
    value = result.loss if kw.get("return_details") else result
    (value * 1.5).backward()
    return result, [x.grad] + [p.grad for p in loss_fn.parameters()]


def loss_model(cls):
    return rnnkern.RNNLoss(cls(I, H), nn.Linear(H, O), reduction="seq_mean")


@pytest.mark.parametrize("cls", CELLS, ids=["rnn", "lstm", "gru"])
def test_rnn_loss_trains_fullgraph(cls):
    """RNNLoss compiles fullgraph for training, with lengths, as eager computes it."""
    model = loss_model(cls)
    compiled = torch.compile(model, fullgraph=True)
    T, B = 7, 3
    x = torch.randn(T, B, I, requires_grad=True)
    target = torch.randint(0, O, (T, B))
    lengths = torch.tensor([7, 1, 4])
    got, got_grads = loss_run(compiled, x, target, lengths)
    want, want_grads = loss_run(model, x, target, lengths)
    assert_close(got, want, TOL[torch.float32], "loss")
    names = ["grad input"] + [f"grad {n}" for n, _ in model.named_parameters()]
    for name, a, b in zip(names, got_grads, want_grads, strict=True):
        assert_close(a, b, TOL[torch.float32], name)


@pytest.mark.parametrize("cls", CELLS, ids=["rnn", "lstm", "gru"])
def test_rnn_loss_details_run_eagerly_under_compile(cls):
    """return_details: grad_norm is filled in by backward, which a compiled
    graph cannot express, so the call runs eagerly (a graph break) and gives
    eager's details, grad_norm included; fullgraph=True refuses it by name."""
    model = loss_model(cls)
    T, B = 6, 4
    x = torch.randn(T, B, I, requires_grad=True)
    target = torch.randint(0, O, (T, B))
    lengths = torch.tensor([6, 2, 5, 1])
    got, got_grads = loss_run(torch.compile(model), x, target, lengths, return_details=True)
    want, want_grads = loss_run(model, x, target, lengths, return_details=True)
    assert not got.grad_norm.isnan().any()
    assert (got.grad_norm[1:, 3] == 0).all() and (got.grad_norm[0] > 0).all()
    for name in rnnkern.RNNLossDetails._fields:
        a, b = getattr(got, name), getattr(want, name)
        for i, (a_i, b_i) in enumerate(zip(*((t if isinstance(t, tuple) else (t,)) for t in (a, b)),
                                         strict=True)):  # the LSTM's h_n is (h, c)
            assert_close(a_i, b_i, TOL[torch.float32], f"{name}[{i}]")
    for a, b in zip(got_grads, want_grads, strict=True):
        assert_close(a, b, TOL[torch.float32], "grad")
    with pytest.raises(torch._dynamo.exc.Unsupported,
                       match=r"return_details=True\) runs eagerly: its grad_norm is filled in"):
        torch.compile(model, fullgraph=True)(x, target, return_details=True)


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU], ids=["rnn", "lstm", "gru"])
def test_rnn_loss_over_a_torch_nn_module_compiles_with_a_graph_break(cls):
    """Dynamo refuses nn.RNN/LSTM/GRU instances: RNNLoss over one compiles
    (not fullgraph) and trains as eager; fullgraph names the module."""
    model = loss_model(cls)
    T, B = 5, 3
    x = torch.randn(T, B, I, requires_grad=True)
    target = torch.randint(0, O, (T, B))
    lengths = torch.tensor([5, 2, 4])
    got, got_grads = loss_run(torch.compile(model), x, target, lengths)
    want, want_grads = loss_run(model, x, target, lengths)
    assert_close(got, want, TOL[torch.float32], "loss")
    for a, b in zip(got_grads, want_grads, strict=True):
        assert_close(a, b, TOL[torch.float32], "grad")
    torch._dynamo.reset()  # else the graph-broken frames above are reused
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
        torch.compile(model, fullgraph=True)(x, target)


def test_import_leaves_dynamo_unloaded_and_a_first_details_call_may_be_compiled():
    """import rnnkern does not import Dynamo (1.2 s); the eager wrapper of a
    details call is then made at its first call, which may be inside a
    compiled function: it runs eagerly there, as eager computes it."""
    script = """
import sys, torch, rnnkern
assert "torch._dynamo" not in sys.modules
torch.manual_seed(0)
loss = rnnkern.RNNLoss(rnnkern.GRU(4, 6), torch.nn.Linear(6, 3))
x, t = torch.randn(5, 2, 4), torch.randint(0, 3, (5, 2))
d = torch.compile(loss)(x, t, return_details=True)
d.loss.backward()
e = loss(x, t, return_details=True)
e.loss.backward()
assert torch.allclose(d.loss, e.loss) and torch.allclose(d.grad_norm, e.grad_norm)
assert not d.grad_norm.isnan().any()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_rnn_loss_details_refuse_export(strict):
    """An exported program never runs the backward that fills grad_norm in: a
    details call raises when exported (it would return NaN forever), one
    without details exports."""
    model = loss_model(rnnkern.GRU)

    class Wrap(nn.Module):
        def __init__(self, details):
            super().__init__()
            self.loss, self.details = model, details

        def forward(self, x, target):
            d = self.loss(x, target, return_details=self.details)
            return (d.loss, d.grad_norm) if self.details else d

    x, target = torch.randn(5, 2, I), torch.randint(0, O, (5, 2))
    with pytest.raises(Exception, match=r"return_details=True\) cannot be exported"):
        torch.export.export(Wrap(True), (x, target), strict=strict)
    ep = torch.export.export(Wrap(False), (x, target), strict=strict)
    assert_close(ep.module()(x, target), model(x, target), TOL[torch.float32], "loss")

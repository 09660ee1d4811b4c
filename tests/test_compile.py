"""torch.compile on models that use rnnkern.RNN, LSTM and GRU: fullgraph,
dynamic T and B, packed input, all against eager; nn.RNN itself cannot compile
fullgraph."""

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

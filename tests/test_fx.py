"""torch.fx.symbolic_trace of models that hold rnnkern's modules or call its
functions: each becomes one node of the graph, as torch.nn's recurrent modules
do, and the GraphModule computes what the model computes (rnnkern/_fx.py)."""

import pytest
import torch
from torch import nn
from torch.fx import symbolic_trace

import rnnkern
from rnnkern import functional

CELLS = ("RNN", "GRU", "LSTM")


class Classifier(nn.Module):
    """A recurrent layer, the last step's output, a linear head: the shape of
    many sequence classifiers."""

    def __init__(self, lib, name, **kw):
        super().__init__()
        self.rnn = getattr(lib, name)(5, 7, **kw)
        self.fc = nn.Linear(7 * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def ops(gm):
    return [(n.op, n.target) for n in gm.graph.nodes]


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("kw", [{"batch_first": True},
                                {"batch_first": True, "num_layers": 2, "bidirectional": True}],
                         ids=["one-layer", "two-layer-bidirectional"])
def test_traced_model_is_nn_graph_and_computes_the_model(name, kw):
    torch.manual_seed(0)
    ours = Classifier(rnnkern, name, **kw)
    theirs = Classifier(nn, name, **kw)
    theirs.load_state_dict(ours.state_dict())
    gm, gm_nn = symbolic_trace(ours), symbolic_trace(theirs)
    # The same graph as nn's: the recurrent module is one call_module node.
    assert ops(gm) == ops(gm_nn)
    assert ("call_module", "rnn") in ops(gm)
    assert gm.rnn is ours.rnn  # the GraphModule runs the module itself
    x = torch.randn(4, 9, 5)
    y = gm(x)
    assert torch.equal(y, ours(x))
    torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours(x).square().sum().backward()
    for a, p in zip(grads, ours.parameters()):
        assert torch.equal(a, p.grad)


class Everything(nn.Module):
    """The LSTM's (h0, c0), lengths= and truncate=, a functional call and
    RNNLoss in one traced forward."""

    def __init__(self):
        super().__init__()
        self.rnn = rnnkern.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3,
                                batch_first=True)
        self.loss = rnnkern.RNNLoss(rnnkern.GRU(5, 6), nn.Linear(6, 4))

    def forward(self, x, h0, c0, lengths, target):
        out, (h, c) = self.rnn(x, (h0, c0), lengths=lengths, truncate=2)
        r = self.rnn
        out2, (h2, c2) = functional.lstm(x, None, r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0,
                                         r.bias_hh_l0, r.weight_hr_l0, batch_first=True)
        gru_out, gru_h = functional.gru(x, None, self.loss.rnn.weight_ih_l0,
                                        self.loss.rnn.weight_hh_l0, batch_first=True,
                                        reverse=True)
        loss = self.loss(x.transpose(0, 1), target, lengths=lengths)
        return (out.sum((1, 2)) + h[-1].sum(1) + c[-1].sum(1) + out2.sum((1, 2)) + c2.sum(1)
                + gru_out.sum((1, 2)) + gru_h.sum(1) + loss)


def test_traced_states_lengths_truncate_functions_and_rnn_loss():
    torch.manual_seed(1)
    model = Everything()
    gm = symbolic_trace(model)
    calls = ops(gm)
    assert ("call_module", "rnn") in calls and ("call_module", "loss") in calls
    assert ("call_function", functional.lstm) in calls
    assert ("call_function", functional.gru) in calls
    x, h0, c0 = torch.randn(3, 6, 5), torch.randn(4, 3, 3), torch.randn(4, 3, 7)
    lengths, target = torch.tensor([6, 1, 4]), torch.randint(0, 4, (6, 3))
    got = gm(x, h0, c0, lengths, target)
    assert torch.equal(got, model(x, h0, c0, lengths, target))
    params = list(model.parameters())
    g_traced = torch.autograd.grad(got.sum(), params)
    g_model = torch.autograd.grad(model(x, h0, c0, lengths, target).sum(), params)
    for a, b in zip(g_traced, g_model):
        assert torch.equal(a, b)
    # Another batch and length: the graph holds no size of the traced call.
    x, h0, c0 = torch.randn(2, 11, 5), torch.randn(4, 2, 3), torch.randn(4, 2, 7)
    lengths, target = torch.tensor([11, 3]), torch.randint(0, 4, (11, 2))
    assert torch.equal(gm(x, h0, c0, lengths, target), model(x, h0, c0, lengths, target))


def test_traced_rnn_loss_function_and_details():
    torch.manual_seed(2)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnnkern.RNN(4, 6)
            self.head = nn.Linear(6, 5)
            self.loss = rnnkern.RNNLoss(self.rnn, self.head, reduction="sum")

        def forward(self, x, target):
            r = self.rnn
            a = functional.rnn_loss(x, target, None, r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0,
                                    r.bias_hh_l0, self.head.weight, self.head.bias)
            details = self.loss(x, target, return_details=True)
            return a, details.loss, details.step_loss

    model = M()
    gm = symbolic_trace(model)
    assert ("call_function", functional.rnn_loss) in ops(gm)
    x, target = torch.randn(7, 3, 4), torch.randint(0, 5, (7, 3))
    for a, b in zip(gm(x, target), model(x, target)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CELLS + ("RNNLoss",))
def test_tracing_the_module_itself_names_the_fix(name):
    # torch.nn's modules cannot be the root of a trace either (their forward
    # branches on the input); rnnkern's say what to do.
    module = (rnnkern.RNNLoss(rnnkern.GRU(3, 4), nn.Linear(4, 2)) if name == "RNNLoss"
              else getattr(rnnkern, name)(3, 4))
    with pytest.raises(RuntimeError, match=f"rnnkern.{name} as the root module.*holds it"):
        symbolic_trace(module)


def test_fullgraph_compile_traces_the_fx_check():
    # Dynamo must fold the torch.fx check (no graph break under fullgraph).
    torch._dynamo.reset()
    torch.manual_seed(3)
    m = rnnkern.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    a, b = m(x), compiled(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch._dynamo.reset()


def test_fx_graph_mode_quantization_keeps_the_module_float():
    # torch.ao's FX quantization traces the model, quantizes the Linear head
    # and leaves the recurrent module, one node, to run in float32.
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(4)
    model = Classifier(rnnkern, "LSTM", batch_first=True).eval()
    x = torch.randn(6, 8, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (x,))
        prepared(x)
        quantized = convert_fx(prepared)
    assert type(quantized.rnn) is rnnkern.LSTM
    torch.testing.assert_close(quantized(x), model(x), rtol=0.1, atol=0.05)

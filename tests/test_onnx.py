"""torch.onnx.export of models holding rnnkern's modules (rnnkern/_onnx.py):
each layer and direction becomes ONNX's own RNN, GRU or LSTM operator, and
the exported model, run in onnxruntime, gives the module's outputs."""

import logging
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import rnnkern
from rnnkern import functional

if os.environ.get("CI"):  # CI installs requirements-dev.txt: a missing package must fail
    import onnx
    import onnxruntime as ort
    import onnxscript  # noqa: F401
else:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")


@pytest.fixture(autouse=True)
def quiet_exporter():
    # The exporter reports each step (and onnxscript each optimisation pass).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


class Wrap(nn.Module):
    """The module's outputs flattened: output, then each final state."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx, lengths):
        out, h = self.rnn(x, hx, lengths=lengths)
        return (out, *h) if isinstance(h, tuple) else (out, h)


def export(model, args, tmp_path, **kw):
    program = torch.onnx.export(model, args, dynamo=True, verbose=False, **kw)
    path = str(tmp_path / "model.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    nodes = onnx.load(path).graph.node
    # Standard ONNX operators only: no node of rnnkern's (or any custom) domain.
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}, {n.domain for n in nodes}
    return session, {n.op_type for n in nodes}


def run(session, *tensors):
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})


def state(name, L, B, H, g):
    h = torch.randn(L, B, H, generator=g)
    return (h, torch.randn(L, B, H, generator=g)) if name == "LSTM" else h


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True},
                                {"bias": False}],
                         ids=["one-layer", "two-layer-bidirectional-batch_first", "no-bias"])
def test_exported_model_runs_in_onnxruntime_as_the_module(name, kw, tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rnn = getattr(rnnkern, name)(4, 7, **kw).eval()
    L = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    B, T = 3, 6
    x = torch.randn((B, T, 4) if kw.get("batch_first") else (T, B, 4), generator=g)
    hx = state(name, L, B, 7, g)
    lengths = torch.tensor([6, 1, 4])
    model = Wrap(rnn)
    session, op_types = export(model, (x, hx, lengths), tmp_path)
    # An empty sequence (which nn cannot pack): output 0, final state hx.
    empty = torch.tensor([6, 0, 4])
    hx_in = hx if isinstance(hx, tuple) else (hx,)
    with torch.no_grad():
        want = model(x, hx, empty)
    for a, b in zip(run(session, x, *hx_in, empty), want):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)
    assert name in op_types  # ONNX's own RNN, GRU or LSTM operator
    with torch.no_grad():
        want = model(x, hx, lengths)
    got = run(session, x, *hx_in, lengths)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)
    # And torch.nn's module with the same weights, on the same batch packed.
    theirs = getattr(nn, name)(4, 7, **kw).eval()
    theirs.load_state_dict(rnn.state_dict())
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=rnn.batch_first,
                                               enforce_sorted=False)
    with torch.no_grad():
        out, h = theirs(packed, hx)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=rnn.batch_first, total_length=T)
    for a, b in zip(got, (out, *(h if isinstance(h, tuple) else (h,)))):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)


def test_relu_without_state_or_lengths_and_dynamic_sizes(tmp_path):
    torch.manual_seed(1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnnkern.RNN(3, 5, nonlinearity="relu", bidirectional=True)
            self.fc = nn.Linear(10, 2)

        def forward(self, x):
            out, h = self.rnn(x)
            return self.fc(out[-1]), h

    model = M().eval()
    x = torch.randn(4, 2, 3)
    session, op_types = export(model, (x,), tmp_path, dynamic_shapes=({0: "T", 1: "B"},))
    assert "RNN" in op_types
    for T, B in ((4, 2), (9, 5), (1, 1)):
        x = torch.randn(T, B, 3)
        with torch.no_grad():
            want = model(x)
        for a, b in zip(run(session, x), want):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)


def test_functional_layers_and_new_lengths_in_the_exported_graph(tmp_path):
    torch.manual_seed(2)
    w = [torch.randn(12, 4) * 0.4, torch.randn(12, 3) * 0.4, torch.randn(12) * 0.1, None]
    u = [torch.randn(9, 4) * 0.4, torch.randn(9, 3) * 0.4, None, torch.randn(9) * 0.1]

    class M(nn.Module):
        def forward(self, x, lengths):
            a, (h, c) = functional.lstm(x, None, *w, lengths=lengths, reverse=True)
            b, hg = functional.gru(x, h, *u, lengths=lengths)
            return a + b, c, hg

    model = M()
    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 2, 3])
    session, op_types = export(model, (x, lengths), tmp_path,
                               dynamic_shapes=({0: "T", 1: "B"}, {0: "B"}))
    assert {"LSTM", "GRU"} <= op_types
    for x, lengths in ((x, lengths), (torch.randn(8, 4, 4), torch.tensor([8, 0, 3, 1]))):
        want = model(x, lengths)
        for a, b in zip(run(session, x, lengths), want):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)


def test_projection_is_refused_by_name(tmp_path):
    model = Wrap(rnnkern.LSTM(4, 6, proj_size=2)).eval()
    x = torch.randn(5, 3, 4)
    with pytest.raises(Exception, match="proj_size cannot be exported to ONNX"):
        torch.onnx.export(model, (x, None, None), dynamo=True, verbose=False)


def test_packed_input_and_the_loss_are_refused_with_the_fix():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnnkern.GRU(4, 6)

        def forward(self, x, lengths):
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
            return self.rnn(packed)[1]

    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 2, 3])
    with pytest.raises(Exception, match="PackedSequence input cannot be exported to ONNX.*lengths="):
        torch.onnx.export(Packed().eval(), (x, lengths), dynamo=True, verbose=False)
    loss = rnnkern.RNNLoss(rnnkern.LSTM(4, 6), nn.Linear(6, 3))
    target = torch.randint(0, 3, (5, 3))
    with pytest.raises(Exception, match="rnn_loss .and RNNLoss. cannot be exported to ONNX"):
        torch.onnx.export(loss, (x, target), dynamo=True, verbose=False)


def test_torchscript_exporter_is_refused_with_the_fix(tmp_path):
    model = Wrap(rnnkern.GRU(4, 6)).eval()
    x = torch.randn(5, 3, 4)
    with pytest.raises(RuntimeError, match=r"dynamo=True.*not supported"):
        torch.onnx.export(model, (x, None, None), str(tmp_path / "m.onnx"), dynamo=False)


WRONG_CALLS = {  # name: a functional call with one wrong argument
    "gru weight_ih": lambda x: functional.gru(x, None, torch.randn(12, 4), torch.randn(9, 3)),
    "lstm h0": lambda x: functional.lstm(x, (torch.randn(2, 5), torch.randn(2, 3)),
                                         torch.randn(12, 4), torch.randn(12, 3)),
    "rnn dtype": lambda x: functional.rnn(x, None, torch.randn(3, 4, dtype=torch.float64),
                                          torch.randn(3, 3)),
    "gru lengths": lambda x: functional.gru(x, None, torch.randn(9, 4), torch.randn(9, 3),
                                            lengths=torch.tensor([5, 2, 1])),
    "lstm bias": lambda x: functional.lstm(x, None, torch.randn(12, 4), torch.randn(12, 3),
                                           torch.randn(11), None),
}


@pytest.mark.parametrize("name", list(WRONG_CALLS))
def test_a_wrong_call_is_refused_by_export_with_the_eager_error(name):
    """The op does not run on the export path: the export makes its checks
    (their Python mirror), and the user sees the eager call's error, word for word."""
    call = WRONG_CALLS[name]

    class M(nn.Module):
        def forward(self, x):
            return call(x)[0]

    x = torch.randn(5, 2, 4)
    with pytest.raises((TypeError, ValueError, RuntimeError)) as eager:
        M()(x)
    assert str(eager.value).startswith("rnnkern."), str(eager.value)
    with pytest.raises(Exception) as exported:
        torch.onnx.export(M(), (x,), dynamo=True, verbose=False)
    chain, e = [], exported.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(type(c) is type(eager.value) and str(c) == str(eager.value) for c in chain), \
        [f"{type(c).__name__}: {c}" for c in chain]


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM"])
def test_eager_calls_while_the_export_flag_is_set_run_the_kernels(name):
    # The exporter's flag is the process's, set for a whole export: an eager
    # call meanwhile (a serving thread's) must compute, not emit ONNX nodes
    # (whose torch placeholders are zeros). Setting the flag as the exporter
    # does stands in for the other thread: torch.export itself does not
    # tolerate torch work in another thread while it traces.
    from torch.onnx._internal.exporter import _flags

    torch.manual_seed(5)
    model = Wrap(getattr(rnnkern, name)(4, 6, num_layers=2, bidirectional=True))
    x, lengths = torch.randn(7, 3, 4), torch.tensor([7, 3, 5])
    want = model(x, None, lengths)
    got = _flags.set_onnx_exporting_flag(lambda: model(x, None, lengths))()
    assert _flags._is_onnx_exporting is False
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    got[0].sum().backward()  # and it trained through the kernels' autograd
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_fullgraph_compile_after_importing_torch_onnx():
    # The export check reads torch.onnx's flag: Dynamo must trace it without a
    # graph break (it refuses is_in_onnx_export's globals object).
    import torch.onnx  # noqa: F401

    torch._dynamo.reset()
    torch.manual_seed(3)
    m = rnnkern.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    a, (h, c) = m(x)
    b, (h2, c2) = torch.compile(m, fullgraph=True, backend="eager")(x)
    assert torch.equal(a, b) and torch.equal(h, h2) and torch.equal(c, c2)
    torch._dynamo.reset()

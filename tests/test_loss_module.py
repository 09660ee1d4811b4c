"""rnnkern.RNNLoss: the fused loss as a module over nn.RNN (or any nn.RNNBase of
mode RNN_TANH / RNN_RELU) and nn.Linear."""

import re

import pytest
import torch
import torch.nn.functional as F

from helpers import TOL, assert_close, product
from rnnkern import RNNLoss, functional


@pytest.mark.parametrize("case", product(batch_first=[False, True], nonlinearity=["tanh", "relu"],
                                         bias=[True, False], hx=["none", "3-D", "2-D"]), ids=str)
def test_module_matches_nn(case):
    """reduction='mean', no mask: the module's loss and every parameter's
    gradient equal nn.RNN -> nn.Linear -> F.cross_entropy, in float64."""
    T, B, I, H, O = 11, 4, 5, 7, 9
    bf = case["batch_first"]
    rnn = torch.nn.RNN(I, H, nonlinearity=case["nonlinearity"], bias=case["bias"],
                       batch_first=bf, dtype=torch.float64)
    head = torch.nn.Linear(H, O, dtype=torch.float64)
    model = RNNLoss(rnn, head)
    assert {id(p) for p in model.parameters()} == {id(p) for p in [*rnn.parameters(), *head.parameters()]}
    x = torch.randn((B, T, I) if bf else (T, B, I), dtype=torch.float64)
    y = torch.randint(0, O, (B, T) if bf else (T, B))
    h0 = None if case["hx"] == "none" else torch.randn(1, B, H, dtype=torch.float64)
    got = model(x, y, h0 if case["hx"] != "2-D" else h0[0])
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    out, _ = rnn(x, h0)
    want = F.cross_entropy(head(out).reshape(-1, O), y.reshape(-1))
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    assert_close(got.detach(), want.detach(), TOL[torch.float64], "loss")
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b, TOL[torch.float64], "grad")


def test_module_passes_options_through():
    """Options given to the module and to forward reach rnn_loss unchanged."""
    T, B, I, H, O = 9, 3, 4, 6, 8
    rnn = torch.nn.RNNBase("RNN_RELU", I, H, dtype=torch.float64)  # any nn.RNNBase of mode RNN_*
    head = torch.nn.Linear(H, O, dtype=torch.float64)
    opts = dict(loss="cross_entropy", reduction="seq_mean")
    model = RNNLoss(rnn, head, **opts, steps="all", ignore_index=2, label_smoothing=0.1)
    x = torch.randn(T, B, I, dtype=torch.float64)
    y = torch.randint(0, O, (T, B))
    lengths = torch.tensor([9, 4, 1])
    mask = torch.rand(T, B, dtype=torch.float64)
    got = model(x, y, lengths=lengths, loss_mask=mask, truncate=3, return_details=True)
    want = functional.rnn_loss(x, y, None, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0,
                               rnn.bias_hh_l0, head.weight, head.bias, **opts, nonlinearity="relu",
                               lengths=lengths, loss_mask=mask, truncate=3, ignore_index=2,
                               label_smoothing=0.1, return_details=True)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.step_loss, want.step_loss)
    got.loss.backward()
    assert not torch.isnan(got.grad_norm).any()
    assert "reduction='seq_mean'" in repr(model)


def test_module_trains():
    """A few optimiser steps on a learnable per-step task lower the loss."""
    torch.manual_seed(0)
    T, B, I, H, O = 20, 16, 4, 24, 4
    rnn, head = torch.nn.RNN(I, H), torch.nn.Linear(H, O)
    model = RNNLoss(rnn, head, reduction="seq_mean")
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    x = torch.randn(T, B, I)
    y = x.argmax(-1)  # the class of each step is its largest input feature
    lengths = torch.randint(5, T + 1, (B,))
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = model(x, y, lengths=lengths)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.5 * first


@pytest.mark.parametrize("batch_first", [False, True])
def test_module_over_rnnkern_rnn(batch_first):
    """RNNLoss fuses rnnkern.RNN as it does nn.RNN: same loss and gradients as
    rnnkern.RNN -> nn.Linear -> F.cross_entropy, and it refuses a 2-layer one."""
    import rnnkern

    T, B, I, H, O = 10, 3, 4, 6, 7
    rnn = rnnkern.RNN(I, H, nonlinearity="relu", batch_first=batch_first, dtype=torch.float64)
    head = torch.nn.Linear(H, O, dtype=torch.float64)
    model = RNNLoss(rnn, head, label_smoothing=0.1)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    y = torch.randint(0, O, (B, T) if batch_first else (T, B))
    got = model(x, y)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    out, _ = rnn(x)
    want = F.cross_entropy(head(out).reshape(-1, O), y.reshape(-1), label_smoothing=0.1)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    assert_close(got.detach(), want.detach(), TOL[torch.float64], "loss")
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b, TOL[torch.float64], "grad")
    with pytest.raises(ValueError, match="num_layers=1, got 2"):
        RNNLoss(rnnkern.RNN(I, H, num_layers=2), torch.nn.Linear(H, O))


@pytest.mark.parametrize("cell, proj", [("RNN", 0), ("GRU", 0), ("LSTM", 0), ("LSTM", 3)])
def test_hx_of_more_than_one_layer_is_refused_by_name(cell, proj):
    """hx in torch.nn's (num_layers, B, *) form must have num_layers = 1."""
    H, P, B = 5, proj or 5, 3
    rnn = getattr(torch.nn, cell)(4, H, **({"proj_size": proj} if proj else {}))
    model = RNNLoss(rnn, torch.nn.Linear(P, 3))
    x, y = torch.randn(6, B, 4), torch.randint(0, 3, (6, B))
    if cell == "LSTM":
        good = (torch.randn(1, B, P), torch.randn(1, B, H))
        for i, letter, size in ((0, "P" if proj else "H", P), (1, "H", H)):
            bad = list(good)
            bad[i] = torch.randn(2, B, size)
            with pytest.raises(RuntimeError, match=re.escape(
                    f"hx[{i}] must have shape (1, B, {letter}) (the rnn's one layer) or "
                    f"(B, {letter}), got (2, {B}, {size})")):
                model(x, y, tuple(bad))
        assert torch.isfinite(model(x, y, good))
        return
    with pytest.raises(RuntimeError, match=re.escape(
            f"hx must have shape (1, B, H) (the rnn's one layer) or (B, H), got (2, {B}, {H})")):
        model(x, y, torch.randn(2, B, H))
    assert torch.isfinite(model(x, y, torch.randn(1, B, H)))

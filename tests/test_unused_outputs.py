"""Gradients when only some outputs are used. rnnkern's autograd.Functions
do not zero-fill the gradients of unused outputs (autograd passes None), so
each backward supplies the zeros the op needs: these compare every such case
with the reference in float64."""

import pytest
import torch

from helpers import assert_close, make_loss_problem, product
from rnnkern import functional, reference

TOL = 1e-10


def layer_inputs(cell, T, B, I, H, seed):
    g = torch.Generator().manual_seed(seed)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell] * H

    def rnd(*shape):
        return (torch.randn(*shape, dtype=torch.float64, generator=g) / H**0.5).requires_grad_()

    x, w_ih, w_hh, b_ih, b_hh = rnd(T, B, I), rnd(G, I), rnd(G, H), rnd(G), rnd(G)
    hx = (rnd(B, H), rnd(B, H)) if cell == "lstm" else rnd(B, H)
    leaves = [x, w_ih, w_hh, b_ih, b_hh, *(hx if cell == "lstm" else (hx,))]
    return (x, hx, w_ih, w_hh, b_ih, b_hh), leaves


def outputs(impl, cell, args, **kw):
    """[output, h_n] (+ c_n for the LSTM)."""
    out, state = getattr(impl, cell)(*args, **kw)
    return [out, *(state if cell == "lstm" else (state,))]


@pytest.mark.parametrize("case", product(cell=["rnn", "gru"], used=[0, 1], lengths=[False, True],
                                         reverse=[False, True])
                         + product(cell=["lstm"], used=[0, 1, 2], lengths=[False, True],
                                   reverse=[False, True]), ids=str)
def test_layer_with_one_output_used(case):
    """used: 0 output, 1 h_n, 2 c_n (the LSTM's third output)."""
    cell, used = case["cell"], case["used"]
    T, B, I, H = 5, 3, 2, 7
    args, leaves = layer_inputs(cell, T, B, I, H, seed=3 + used)
    kw = dict(lengths=torch.tensor([5, 1, 3]) if case["lengths"] else None,
              reverse=case["reverse"])
    got, want = outputs(functional, cell, args, **kw), outputs(reference, cell, args, **kw)
    weight = torch.randn_like(want[used])
    g_got = torch.autograd.grad((got[used] * weight).sum(), leaves)
    g_want = torch.autograd.grad((want[used] * weight).sum(), leaves)
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        assert_close(a, b, TOL, f"grad {i} with only output {used} used")


@pytest.mark.parametrize("use", ["loss", "h_n"])
def test_rnn_loss_with_one_output_used(use):
    """The fused loss's differentiable outputs are the loss and h_n."""
    T, B, I, H, O = 6, 3, 4, 5, 7
    tensors, target, kw = make_loss_problem(T, B, I, H, O, seed=9, lengths="random")
    leaves = [t for t in tensors.values() if t is not None]
    names = [k for k, t in tensors.items() if t is not None]
    inputs = list(tensors.values())
    d = functional.rnn_loss(inputs[0], target, *inputs[1:], **kw, return_details=True)
    out, h_n = reference.rnn(*inputs[:6], lengths=kw["lengths"])
    logits = out @ tensors["weight_out"].T + tensors["bias_out"]
    valid = (torch.arange(T)[:, None] < kw["lengths"][None, :]).double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, O), target.reshape(-1),
                                           reduction="none").view(T, B)
    want_loss = (ce * valid).sum() / valid.sum()
    assert_close(d.loss, want_loss, TOL, "loss")
    weight = torch.randn(B, H, dtype=torch.float64)
    got = d.loss if use == "loss" else (d.h_n * weight).sum()
    want = want_loss if use == "loss" else (h_n * weight).sum()
    g_got = torch.autograd.grad(got, leaves, allow_unused=True)
    g_want = torch.autograd.grad(want, leaves, allow_unused=True)
    for name, a, b in zip(names, g_got, g_want):
        if b is None:  # the head does not reach h_n
            assert a is None or not a.any(), name
        else:
            assert_close(a, b, TOL, f"grad {name} with only {use} used")

"""No op reads or returns memory it did not write. ATen's deterministic mode
(torch.use_deterministic_algorithms with fill_uninitialized_memory, its
default) fills every at::empty with NaN, so a kernel that reads an unfilled
buffer, or leaves part of an output unwritten, turns a result NaN. Each case
runs once normally and once poisoned: the results must be the same bits."""

import contextlib

import pytest
import torch

from helpers import product
from rnnkern import functional


@contextlib.contextmanager
def poisoned():
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def problem(cell, T, B, I, H, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell] * H

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / H**0.5).to(dtype)

    x, w_ih, w_hh, b_ih, b_hh = rnd(T, B, I), rnd(G, I), rnd(G, H), rnd(G), rnd(G)
    hx = (rnd(B, H), rnd(B, H)) if cell == "lstm" else rnd(B, H)
    return x, hx, [w_ih, w_hh, b_ih, b_hh]


def layer_results(cell, x, hx, weights, **kw):
    leaves = [t.clone().requires_grad_() for t in (x, *weights)]
    state = tuple(h.clone().requires_grad_() for h in hx) if cell == "lstm" \
        else hx.clone().requires_grad_()
    out, final = getattr(functional, cell)(leaves[0], state, *leaves[1:], **kw)
    outs = [out, *(final if cell == "lstm" else (final,))]
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    wrt = leaves + (list(state) if cell == "lstm" else [state])
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, wrt, ups))


@pytest.mark.parametrize("case", product(cell=["rnn", "lstm", "gru"], H=[7, 40, 300, 513],  # fused: Elman fwd 256, bwd 512; gated 512
                                         lengths=[False, True], reverse=[False, True],
                                         truncate=[None, 3]), ids=str)
def test_layer_reads_and_returns_only_what_it_wrote(case):
    cell, H = case["cell"], case["H"]
    T, B, I = 9, 5, 3
    x, hx, weights = problem(cell, T, B, I, H, seed=H, dtype=torch.float32)
    lengths = torch.tensor([9, 0, 4, 9, 1]) if case["lengths"] else None
    kw = dict(lengths=lengths, reverse=case["reverse"], truncate=case["truncate"])
    want = layer_results(cell, x, hx, weights, **kw)
    with poisoned():
        got = layer_results(cell, x, hx, weights, **kw)
    for i, (a, b) in enumerate(zip(got, want)):
        assert not a.isnan().any(), f"result {i}: NaN, read from memory no kernel wrote"
        assert torch.equal(a, b), f"result {i} differs when unwritten memory is NaN"


def loss_results(mode, x, hx, weights, w_out, b_out, target, **kw):
    leaves = [t.clone().requires_grad_() for t in (x, *weights, w_out, b_out)]
    state = tuple(h.clone().requires_grad_() for h in hx) if mode == "lstm" \
        else hx.clone().requires_grad_()
    d = functional.rnn_loss(leaves[0], target, state, *leaves[1:5], leaves[5], leaves[6],
                            mode=mode, return_details=True, **kw)
    value = d.loss if d.loss.dim() == 0 else d.loss.sum()  # 'none': [T,B]
    wrt = leaves + (list(state) if mode == "lstm" else [state])
    grads = torch.autograd.grad(value, wrt)
    finals = d.h_n if mode == "lstm" else (d.h_n,)  # (h_n, c_n) for the LSTM
    return [d.loss.detach(), *(h.detach() for h in finals), d.step_loss.detach(), d.grad_norm,
            *grads]


@pytest.mark.parametrize("case", product(mode=["rnn_tanh", "lstm", "gru"],
                                         loss=["cross_entropy", "mse"],
                                         reduction=["mean", "seq_mean", "none"],
                                         lengths=[False, True], steps=["all", "last"])
                         + product(mode=["lstm"], loss=["cross_entropy"], reduction=["sum"],
                                   lengths=[True], steps=["all"], truncate=[3], mask=[True]),
                         ids=str)
def test_loss_reads_and_returns_only_what_it_wrote(case):
    mode, T, B, I, H, O = case["mode"], 9, 5, 3, 7, 11
    cell = "rnn" if mode.startswith("rnn") else mode
    x, hx, weights = problem(cell, T, B, I, H, seed=3, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    w_out, b_out = torch.randn(O, H, generator=g), torch.randn(O, generator=g)
    if case["loss"] == "mse":
        target = torch.randn(T, B, O, generator=g)
    else:
        target = torch.randint(0, O, (T, B), generator=g)
        target[2, 3] = -100  # ignored
    lengths = torch.tensor([9, 1, 4, 9, 2]) if case["lengths"] else None
    mask = (torch.rand(T, B, generator=g) > 0.3).float() if case.get("mask") else None
    kw = dict(loss=case["loss"], reduction=case["reduction"], lengths=lengths, loss_mask=mask,
              steps=case["steps"], truncate=case.get("truncate"))
    want = loss_results(mode, x, hx, weights, w_out, b_out, target, **kw)
    with poisoned():
        got = loss_results(mode, x, hx, weights, w_out, b_out, target, **kw)
    for i, (a, b) in enumerate(zip(got, want)):
        assert not a.isnan().any(), f"result {i}: NaN, read from memory no kernel wrote"
        assert torch.equal(a, b), f"result {i} differs when unwritten memory is NaN"

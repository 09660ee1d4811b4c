"""Parametrized weights (torch.nn.utils.parametrize, weight_norm, spectral_norm)
and pruning on rnnkern's modules, against torch.nn's modules with the same
weights and the same parametrization.

rnnkern's forward reads each weight once (getattr per layer and direction);
torch.nn's recurrent modules read a parametrized weight several times per
forward (their flat-weight bookkeeping). A parametrization without state gives
the same weight either way, so the two agree to rounding; one whose state
advances on each read (spectral_norm's power iteration in training mode)
advances once per forward under rnnkern: README, "Parametrized weights"."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import rnnkern
from helpers import TOL, assert_close

PAIRS = {"rnn": (rnnkern.RNN, nn.RNN), "lstm": (rnnkern.LSTM, nn.LSTM),
         "gru": (rnnkern.GRU, nn.GRU)}


def twins(cell, dtype, num_layers=2, bidirectional=True, seed=0):
    ours_cls, nn_cls = PAIRS[cell]
    torch.manual_seed(seed)
    theirs = nn_cls(5, 7, num_layers=num_layers, bidirectional=bidirectional).to(dtype)
    ours = ours_cls(5, 7, num_layers=num_layers, bidirectional=bidirectional).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def run_and_grads(m, x):
    out = m(x)[0]
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_same_run(ours, theirs, x, tol):
    out_a, g_a = run_and_grads(ours, x)
    out_b, g_b = run_and_grads(theirs, x)
    assert_close(out_a, out_b, tol, "output")
    assert g_a.keys() == g_b.keys()
    for name in g_b:
        assert_close(g_a[name], g_b[name], tol, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cell", list(PAIRS))
def test_weight_norm_matches_nn(cell, dtype):
    """weight_norm on a recurrent and an input weight of the second layer's
    reverse direction: outputs and the gradients of original0/original1 (the
    parameters the optimizer steps) match nn's."""
    ours, theirs = twins(cell, dtype)
    for m in (ours, theirs):
        weight_norm(m, "weight_hh_l1_reverse")
        weight_norm(m, "weight_ih_l0")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 3, 5, dtype=dtype)
    assert_same_run(ours, theirs, x, TOL[dtype])


@pytest.mark.parametrize("cell", list(PAIRS))
def test_spectral_norm_matches_nn_in_eval_mode_and_under_cached(cell):
    """spectral_norm reads its power-iteration vectors without updating them in
    eval mode, and parametrize.cached() evaluates each parametrization once
    for every reader: in both, rnnkern's module and nn's see the same weight."""
    dtype = torch.float64
    ours, theirs = twins(cell, dtype, num_layers=1, bidirectional=False)
    for m in (ours, theirs):
        spectral_norm(m, "weight_hh_l0")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 3, 5, dtype=dtype)
    ours.eval(), theirs.eval()
    assert_same_run(ours, theirs, x, TOL[dtype])
    ours.train(), theirs.train()
    for m in (ours, theirs):
        m.zero_grad()
    with parametrize.cached():
        assert_same_run(ours, theirs, x, TOL[dtype])


class Counted(nn.Module):
    """A parametrization that counts its evaluations (and scales by 0.9, so a
    weight read around it would differ)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, w):
        self.calls += 1
        return 0.9 * w


@pytest.mark.parametrize("cell", list(PAIRS))
def test_a_parametrized_weight_is_evaluated_once_per_forward(cell):
    """The documented count: one evaluation per forward, per parametrized
    weight (so spectral_norm takes one power-iteration step per forward), and
    the result is the parametrized weight: nn's module gives the same output."""
    ours, theirs = twins(cell, torch.float64, num_layers=2, bidirectional=True)
    counters = {}
    for m in (ours, theirs):
        counters[m] = [Counted(), Counted()]
        parametrize.register_parametrization(m, "weight_hh_l0", counters[m][0])
        parametrize.register_parametrization(m, "weight_ih_l1_reverse", counters[m][1])
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    base = [c.calls for c in counters[ours]]  # register_parametrization evaluates it once
    for k in (1, 2, 3):
        assert_same_run(ours, theirs, x, TOL[torch.float64])
        assert [c.calls - b for c, b in zip(counters[ours], base)] == [k, k]
    # a forward under no_grad, with a PackedSequence, reads it once too
    with torch.no_grad():
        ours(nn.utils.rnn.pack_padded_sequence(x, [4, 2]))
    assert [c.calls - b for c, b in zip(counters[ours], base)] == [4, 4]


@pytest.mark.parametrize("cell", list(PAIRS))
def test_spectral_norm_in_training_steps_its_power_iteration_once_per_forward(cell):
    """spectral_norm in training mode: each forward of rnnkern's module takes
    one power-iteration step, and computes with the weight spectral_norm gives
    after that step (spectral_norm run alone, on a Linear with the same
    state, one evaluation per forward, gives the same vectors and weight)."""
    dtype = torch.float64
    ours, _ = twins(cell, dtype, num_layers=1, bidirectional=False)
    plain, _ = twins(cell, dtype, num_layers=1, bidirectional=False)
    rows = ours.weight_hh_l0.shape[0]  # G * H
    spectral_norm(ours, "weight_hh_l0")
    probe = nn.Linear(7, rows, bias=False).to(dtype)
    spectral_norm(probe, "weight")
    probe.load_state_dict({k.replace("weight_hh_l0", "weight"): v
                           for k, v in ours.state_dict().items() if "weight_hh_l0" in k})
    x = torch.randn(6, 3, 5, dtype=dtype)
    for _ in range(3):
        with torch.no_grad():
            out = ours(x)[0]
            plain.weight_hh_l0.copy_(probe.weight)  # one step of the probe's iteration
            expected = plain(x)[0]
        assert torch.equal(ours.parametrizations.weight_hh_l0[0]._u,
                           probe.parametrizations.weight[0]._u)
        assert_close(out, expected, TOL[dtype], "output")


@pytest.mark.parametrize("cell", list(PAIRS))
def test_pruning_matches_nn(cell):
    """prune.l1_unstructured reparametrizes through a forward pre-hook
    (weight = weight_orig * weight_mask): outputs and weight_orig's gradient
    match nn's, and pruned entries get no gradient."""
    dtype = torch.float64
    ours, theirs = twins(cell, dtype)
    for m in (ours, theirs):
        prune.l1_unstructured(m, "weight_hh_l0", amount=0.4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 5, dtype=dtype)
    assert_same_run(ours, theirs, x, TOL[dtype])
    mask = ours.weight_hh_l0_mask
    assert (mask == 0).any()
    assert torch.all(ours.weight_hh_l0_orig.grad[mask == 0] == 0)

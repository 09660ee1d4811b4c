"""Property-based agreement of the fused kernels with rnnkern.reference (hypothesis).

Hypothesis draws the sizes (T, B, I, H, O: 1, small values, values around the
vector widths 8 and 16 doubles and the fused-step limit kFusedMaxH = 256 of
csrc/cpu/elman_cpu.cpp), lengths (0 allowed, any order; None), truncate (None
or 1..T+1), reverse, nonlinearity, each bias present or not, hx or None,
batch_first, and for rnn_loss the loss, loss masks (bool and float >= 0, all
masked included), ignore_index hits, steps, every reduction, label smoothing
and the chunk height, and the kernel's thread count (1 or 2). Inputs are fresh
random values (never zeros) from a torch.Generator seeded with a drawn integer.
T = 0 and B = 0 are left to test_elman_edges and test_loss_agreement.

Every output (output and h_n; the loss, h_n, step_loss and grad_norm) and the
gradient of a random-weighted objective with respect to every tensor that
requires grad must agree in float64 elementwise within RTOL/ATOL. Example
counts and seed come from the hypothesis profile in conftest.py ("ci": fixed
seed, 100 examples per test; HYPOTHESIS_PROFILE=dev for more, from a fresh
seed). A failure prints the drawn configuration.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from hypothesis import currently_in_test_context, given, note
from hypothesis import strategies as st

from rnnkern import functional, reference

DTYPE = torch.float64
# Elementwise |kernel - reference| <= ATOL + RTOL * |reference|; the existing
# float64 tests hold max|a-b| / max|b| <= 1e-10 (helpers.TOL).
RTOL, ATOL = 1e-9, 1e-10

# Sizes: small values, 1, and values around the float64 vector widths (8 with
# AVX-512, 4 with AVX2; the fused steps tile columns by 2 vectors and rows by 8).
EDGE_SIZES = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17]
# H around kFusedMaxH = 256 (csrc/cpu/elman_cpu.cpp): above it the steps go to BLAS.
FUSED_LIMIT = [255, 256, 257]

T_SIZES = st.integers(1, 10)
B_SIZES = st.one_of(st.integers(1, 10), st.sampled_from(EDGE_SIZES))
I_SIZES = st.one_of(st.integers(1, 10), st.sampled_from(EDGE_SIZES))
H_SIZES = st.one_of(st.integers(1, 12), st.sampled_from(EDGE_SIZES + [31, 32, 33]),
                    st.sampled_from(FUSED_LIMIT))
O_SIZES = st.one_of(st.integers(1, 12), st.sampled_from(EDGE_SIZES + [31, 32, 33]))
SEEDS = st.integers(0, 2**32 - 1)

LAYER = ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _note(text: str) -> None:
    """hypothesis.note inside a hypothesis test (printed with a failing example), else nothing."""
    if currently_in_test_context():
        note(text)


def assert_agree(name: str, got, want) -> None:
    assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor), (name, got, want)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, equal_nan=False,
                               msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

@st.composite
def lengths_for(draw, B: int, T: int, low: int = 0):
    """None, or B lengths in [low, T] (any order; zeros allowed when low = 0),
    as an int64 tensor or a list of ints (both are accepted)."""
    if draw(st.booleans()):
        return None
    values = draw(st.lists(st.integers(low, T), min_size=B, max_size=B))
    return values if draw(st.booleans()) else torch.tensor(values, dtype=torch.int64)


@st.composite
def layer_configs(draw):
    T, B, I, H = draw(T_SIZES), draw(B_SIZES), draw(I_SIZES), draw(H_SIZES)
    return dict(
        T=T, B=B, I=I, H=H,
        seed=draw(SEEDS),
        nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
        bias_ih=draw(st.booleans()), bias_hh=draw(st.booleans()),
        hx=draw(st.booleans()),
        input_grad=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        reverse=draw(st.booleans()),
        truncate=draw(st.one_of(st.none(), st.integers(1, T + 1))),
        lengths=draw(lengths_for(B, T)),
        scale=draw(st.sampled_from([0.5, 1.0, 2.0])),  # weight scale: small to saturating
        # which outputs the objective weighs (an unused one gets a zero gradient)
        objective=draw(st.sampled_from(["both", "output", "h_n"])),
        # The kernel's results must not depend on the thread count. Mostly 1 (and
        # the reference always runs on 1): on a loaded machine every 2-thread
        # parallel region can wait for a descheduled thread.
        threads=draw(st.sampled_from([1, 1, 2])),
    )


@st.composite
def loss_configs(draw):
    cfg = draw(layer_configs())
    T, B = cfg["T"], cfg["B"]
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    steps = draw(st.sampled_from(["all", "last"]))
    cfg.pop("reverse")  # rnn_loss runs one forward layer
    cfg.update(
        O=draw(O_SIZES),
        loss=loss,
        steps=steps,
        reduction=draw(st.sampled_from(["mean", "sum", "seq_mean", "seq_sum", "none"])),
        # steps='last' needs every length >= 1
        lengths=draw(lengths_for(B, T, low=1 if steps == "last" else 0)),
        bias_out=draw(st.booleans()),
        # None; bool with a drawn fraction kept (0: all masked); float >= 0 with zeros
        loss_mask=draw(st.sampled_from([None, "bool", "float"])),
        mask_keep=draw(st.sampled_from([0.0, 0.5, 0.8, 0.9, 1.0])),
        # cross-entropy: no ignored target; targets set to ignore_index = -100;
        # ignore_index a valid class (so ignoring it cannot pass as a range check)
        ignore=draw(st.sampled_from(["none", "negative", "class"])) if loss == "cross_entropy"
        else "none",
        ignore_frac=draw(st.sampled_from([0.0, 0.2, 0.3, 0.5, 1.0])),  # 1.0: all ignored
        label_smoothing=draw(st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0)))
        if loss == "cross_entropy" else 0.0,
        details=draw(st.booleans()),
        chunk_rows=draw(st.sampled_from([0, 1, 2, 3, 5, 8, 64])),  # 0: automatic (one chunk)
    )
    return cfg


# ---------------------------------------------------------------------------
# Problems and runs
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def rnd(g, *shape, s=1.0):
    return torch.randn(shape, dtype=DTYPE, generator=g) * s


def make_layer(cfg, g):
    T, B, I, H = cfg["T"], cfg["B"], cfg["I"], cfg["H"]
    k = cfg["scale"] / H**0.5
    x_shape = (B, T, I) if cfg["batch_first"] else (T, B, I)
    layer = dict(
        input=rnd(g, *x_shape).requires_grad_(cfg["input_grad"]),
        hx=rnd(g, B, H).requires_grad_() if cfg["hx"] else None,
        weight_ih=rnd(g, H, I, s=k).requires_grad_(),
        weight_hh=rnd(g, H, H, s=k).requires_grad_(),
        bias_ih=rnd(g, H, s=1 / H**0.5).requires_grad_() if cfg["bias_ih"] else None,
        bias_hh=rnd(g, H, s=1 / H**0.5).requires_grad_() if cfg["bias_hh"] else None,
    )
    return layer


def leaves_of(tensors: dict) -> dict:
    """Fresh leaves with the same values (each implementation gets its own)."""
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if v is not None else None)
            for k, v in tensors.items()}


def grads(objective, leaves: dict) -> dict:
    wanted = {k: v for k, v in leaves.items() if v is not None and v.requires_grad}
    got = torch.autograd.grad(objective, list(wanted.values()), allow_unused=True,
                              materialize_grads=True)
    return dict(zip(wanted, got))


def run_rnn(impl, cfg, layer, upstream):
    t = leaves_of(layer)
    output, h_n = impl.rnn(*(t[k] for k in LAYER), nonlinearity=cfg["nonlinearity"],
                           batch_first=cfg["batch_first"], lengths=cfg["lengths"],
                           truncate=cfg["truncate"], reverse=cfg["reverse"])
    r_out, r_h = upstream
    objective = output.new_zeros(())
    if cfg["objective"] in ("both", "output"):
        objective = objective + (output * r_out).sum()
    if cfg["objective"] in ("both", "h_n"):
        objective = objective + (h_n * r_h).sum()
    return output.detach(), h_n.detach(), grads(objective, t)


def check_rnn(cfg, perturb: float = 0.0):
    """Kernel vs reference for one drawn configuration. ``perturb`` scales the
    reference's weight_hh by (1 + perturb): the can-fail test's wrong reference."""
    g = torch.Generator().manual_seed(cfg["seed"])
    layer = make_layer(cfg, g)
    T, B, H = cfg["T"], cfg["B"], cfg["H"]
    out_shape = (B, T, H) if cfg["batch_first"] else (T, B, H)
    upstream = (rnd(g, *out_shape), rnd(g, B, H))
    with num_threads(cfg["threads"]):
        got = run_rnn(functional, cfg, layer, upstream)
    ref_layer = dict(layer)
    if perturb:
        ref_layer["weight_hh"] = (layer["weight_hh"].detach() * (1 + perturb)).requires_grad_()
    with num_threads(1):
        want = run_rnn(reference, cfg, ref_layer, upstream)
    assert_agree("output", got[0], want[0])
    assert_agree("h_n", got[1], want[1])
    assert got[2].keys() == want[2].keys()
    for name in got[2]:
        assert_agree(f"grad of {name}", got[2][name], want[2][name])


def make_loss_problem(cfg, g):
    T, B, H, O = cfg["T"], cfg["B"], cfg["H"], cfg["O"]
    tensors = make_layer(cfg, g)
    tensors["weight_out"] = rnd(g, O, H, s=3 / H**0.5).requires_grad_()
    tensors["bias_out"] = rnd(g, O, s=0.1).requires_grad_() if cfg["bias_out"] else None
    steps = (B, T) if cfg["batch_first"] else (T, B)
    ignore_index = -100
    if cfg["loss"] == "cross_entropy":
        target = torch.randint(0, O, steps, generator=g)
        if cfg["ignore"] != "none":
            if cfg["ignore"] == "class":
                ignore_index = int(torch.randint(0, O, (), generator=g))
            hit = torch.rand(steps, generator=g) < cfg["ignore_frac"]
            target[hit] = ignore_index
    else:
        target = rnd(g, *steps, O)
    mask = None
    if cfg["loss_mask"] == "bool":
        mask = torch.rand(steps, generator=g) < cfg["mask_keep"]
    elif cfg["loss_mask"] == "float":
        mask = torch.rand(steps, dtype=DTYPE, generator=g) * 2
        mask[torch.rand(steps, generator=g) >= cfg["mask_keep"]] = 0
    return tensors, target, mask, ignore_index


def run_loss(impl, cfg, tensors, target, mask, ignore_index, upstream):
    t = leaves_of(tensors)
    extra = {"_chunk_rows": cfg["chunk_rows"]} if impl is functional else {}
    result = impl.rnn_loss(
        t["input"], target, t["hx"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
        t["weight_out"], t["bias_out"], loss=cfg["loss"], nonlinearity=cfg["nonlinearity"],
        batch_first=cfg["batch_first"], lengths=cfg["lengths"], loss_mask=mask,
        steps=cfg["steps"], reduction=cfg["reduction"], ignore_index=ignore_index,
        label_smoothing=cfg["label_smoothing"], truncate=cfg["truncate"],
        return_details=cfg["details"], **extra)
    value = result.loss if cfg["details"] else result
    r_loss, r_scalar, r_h = upstream
    objective = (value * (r_loss if value.dim() > 0 else r_scalar)).sum()
    if cfg["details"] and cfg["objective"] in ("both", "h_n"):
        objective = objective + (result.h_n * r_h).sum()
    g = grads(objective, t)
    if not cfg["details"]:
        return value.detach(), g, None
    # grad_norm is filled in by the backward above
    return value.detach(), g, (result.h_n.detach(), result.step_loss, result.grad_norm)


def check_loss(cfg, perturb: float = 0.0):
    """Kernel vs reference for one drawn rnn_loss configuration; ``perturb`` as
    in check_rnn (applied to the reference's weight_out)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    tensors, target, mask, ignore_index = make_loss_problem(cfg, g)
    _note(f"ignore_index={ignore_index}, target={target.tolist()}, loss_mask={mask}")
    T, B, H = cfg["T"], cfg["B"], cfg["H"]
    steps = (B, T) if cfg["batch_first"] else (T, B)
    upstream = (rnd(g, *steps), rnd(g), rnd(g, B, H))
    with num_threads(cfg["threads"]):
        got = run_loss(functional, cfg, tensors, target, mask, ignore_index, upstream)
    ref = dict(tensors)
    if perturb:
        ref["weight_out"] = (tensors["weight_out"].detach() * (1 + perturb)).requires_grad_()
    with num_threads(1):
        want = run_loss(reference, cfg, ref, target, mask, ignore_index, upstream)
    assert_agree("loss", got[0], want[0])
    if cfg["details"]:
        for name, a, b in zip(("h_n", "step_loss", "grad_norm"), got[2], want[2]):
            assert_agree(name, a, b)
    assert got[1].keys() == want[1].keys()
    for name in got[1]:
        assert_agree(f"grad of {name}", got[1][name], want[1][name])


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

@given(layer_configs())
def test_rnn_agrees_with_reference(cfg):
    check_rnn(cfg)


@given(loss_configs())
def test_rnn_loss_agrees_with_reference(cfg):
    check_loss(cfg)


RNN_EXAMPLE = dict(T=5, B=9, I=3, H=17, seed=1, nonlinearity="tanh", bias_ih=True,
                   bias_hh=True, hx=True, input_grad=True, batch_first=False, reverse=False,
                   truncate=None, lengths=[5, 0, 3, 1, 5, 2, 4, 5, 1], scale=1.0,
                   objective="both", threads=1)
LOSS_EXAMPLE = dict(RNN_EXAMPLE, O=9, loss="cross_entropy", steps="all", reduction="mean",
                    bias_out=True, loss_mask="float", mask_keep=0.9, ignore="class",
                    ignore_frac=0.3, label_smoothing=0.1, details=True, chunk_rows=5)
del LOSS_EXAMPLE["reverse"]


def test_checks_can_fail():
    """The comparisons are not vacuous: the fixed examples pass, and a reference
    whose weight is off by 1e-7 relative fails them."""
    check_rnn(RNN_EXAMPLE)
    check_loss(LOSS_EXAMPLE)
    with pytest.raises(AssertionError):
        check_rnn(RNN_EXAMPLE, perturb=1e-7)
    with pytest.raises(AssertionError):
        check_loss(LOSS_EXAMPLE, perturb=1e-7)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru", "rnn_loss"])
def test_reference_signature_matches_functional(name):
    """reference.rnn / lstm / gru / rnn_loss take the arguments functional's take, with the same
    kinds, defaults and annotations (underscored test hooks aside)."""
    def public(f):
        return [(p.name, p.kind, p.default, p.annotation)
                for p in inspect.signature(f).parameters.values() if not p.name.startswith("_")]

    assert public(getattr(functional, name)) == public(getattr(reference, name))

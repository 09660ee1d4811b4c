"""Odd sizes, degenerate lengths, strides, determinism, threads, the portable
CPU path and inference mode."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import assert_close, grads_of, make_layer, product
import rnnkern
from rnnkern import functional, reference

NAMES = ["input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]


def both(layer, **kw):
    a = functional.rnn(*(layer[k] for k in NAMES), **kw)
    b = reference.rnn(*(layer[k] for k in NAMES), **kw)
    inputs = [layer[k] for k in NAMES]
    return a, b, grads_of(list(a), inputs), grads_of(list(b), inputs)


def check_both(layer, tol=1e-10, **kw):
    (out_a, h_a), (out_b, h_b), ga, gb = both(layer, **kw)
    assert_close(out_a, out_b, tol, "output")
    assert_close(h_a, h_b, tol, "h_n")
    for name, x, y in zip(NAMES, ga, gb):
        if y is not None:
            assert_close(x, y, tol, f"grad {name}")
    return (out_a, h_a), ga


@pytest.mark.parametrize("case", product(TBIH=[(1, 4, 3, 5), (6, 1, 3, 5), (6, 4, 3, 1), (6, 4, 1, 7),
                                              (9, 3, 5, 7), (3, 2, 4, 33), (4, 3, 2, 300),
                                              (3, 2, 2, 512),  # fused steps, W_hh prefetched
                                              (3, 2, 2, 513)],  # BLAS past 512
                                         lengths=[False, True], reverse=[False, True]), ids=str)
def test_odd_sizes(case):
    T, B, I, H = case["TBIH"]
    layer = make_layer(T, B, I, H)
    lengths = torch.randint(0, T + 1, (B,)) if case["lengths"] else None
    check_both(layer, lengths=lengths, truncate=2, reverse=case["reverse"])


@pytest.mark.parametrize("reverse", [False, True])
def test_all_lengths_zero(reverse):
    T, B, I, H = 5, 4, 3, 6
    layer = make_layer(T, B, I, H)
    (out, h_n), grads = check_both(layer, lengths=torch.zeros(B, dtype=torch.int64), reverse=reverse)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(h_n, layer["hx"])
    g_in, g_hx = grads[0], grads[1]
    assert torch.equal(g_in, torch.zeros_like(g_in))
    # the state never moves, so dL/dh0 is dL/dh_n: nonzero
    assert g_hx.abs().max() > 0


@pytest.mark.parametrize("reverse", [False, True])
def test_all_lengths_T_equals_no_lengths(reverse):
    T, B, I, H = 7, 4, 3, 6
    layer = make_layer(T, B, I, H)
    (out_l, h_l), g_l = check_both(layer, lengths=torch.full((B,), T), reverse=reverse)
    (out, h), g = check_both(layer, reverse=reverse)
    assert_close(out_l, out, 1e-14, "output")
    assert_close(h_l, h, 1e-14, "h_n")
    for a, b in zip(g_l, g):
        assert_close(a, b, 1e-14, "grad")


def test_padded_steps_are_zero_and_get_no_gradient():
    T, B, I, H = 8, 3, 2, 5
    layer = make_layer(T, B, I, H)
    lengths = torch.tensor([8, 2, 5])
    out, h_n = functional.rnn(*(layer[k] for k in NAMES), lengths=lengths)
    g_in = grads_of([out, h_n], [layer["input"]])[0]
    for b, L in enumerate(lengths.tolist()):
        assert torch.equal(out[L:, b], torch.zeros_like(out[L:, b]))
        assert torch.equal(g_in[L:, b], torch.zeros_like(g_in[L:, b]))
        assert g_in[:L, b].abs().min() > 0
        assert torch.equal(h_n[b], out[L - 1, b])


def test_empty_sequence_T0():
    layer = make_layer(1, 3, 2, 4)
    x = layer["input"][:0]
    out, h_n = functional.rnn(x, layer["hx"], layer["weight_ih"], layer["weight_hh"])
    assert out.shape == (0, 3, 4)
    assert torch.equal(h_n, layer["hx"])


def test_non_contiguous_inputs():
    T, B, I, H = 6, 5, 4, 7
    layer = make_layer(T, B, I, H)
    # the same values, through transposed / strided views
    strided = dict(layer)
    strided["input"] = layer["input"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    big = torch.randn(H, 2 * I, dtype=torch.float64)
    big[:, ::2] = layer["weight_ih"].detach()
    strided["weight_ih"] = big[:, ::2].requires_grad_()
    strided["weight_hh"] = layer["weight_hh"].detach().t().contiguous().t().requires_grad_()
    strided["hx"] = layer["hx"].detach().t().contiguous().t().requires_grad_()
    assert not strided["weight_ih"].is_contiguous() and not strided["input"].is_contiguous()
    (out_s, h_s), g_s = check_both(strided, lengths=torch.tensor([6, 2, 0, 5, 1]))
    (out, h), g = check_both(layer, lengths=torch.tensor([6, 2, 0, 5, 1]))
    assert torch.equal(out_s, out) and torch.equal(h_s, h)


def test_deterministic_bitwise():
    T, B, I, H = 50, 16, 8, 64
    layer = make_layer(T, B, I, H, dtype=torch.float32)
    lengths = torch.randint(0, T + 1, (B,))
    runs = []
    for _ in range(3):
        out, h_n = functional.rnn(*(layer[k] for k in NAMES), lengths=lengths, truncate=9)
        runs.append([out, h_n, *grads_of([out, h_n], [layer[k] for k in NAMES])])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_respects_thread_count():
    """Results agree (to rounding) whatever torch.set_num_threads says."""
    T, B, I, H = 20, 64, 16, 256  # big enough for the row passes to split
    layer = make_layer(T, B, I, H, dtype=torch.float32)
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, h_n = functional.rnn(*(layer[k] for k in NAMES), lengths=torch.randint(1, T + 1, (B,),
                                      generator=torch.Generator().manual_seed(0)))
            results.append([out, h_n, *grads_of([out, h_n], [layer[k] for k in NAMES])])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert_close(a, b, 1e-5)


@pytest.mark.parametrize("H", [16, 64, 65])
@pytest.mark.parametrize("reverse", [False, True])
def test_same_bits_at_one_and_two_threads(H, reverse):
    """B = 40 rows make five row tiles, 3 + 2 at two threads. Up to H = 64 the
    fused backward sums dW_hh, dW_ih and the bias gradient tile by tile in its
    loop, then over the tiles in order; H = 65 sums after the loop. Either
    way the bits do not depend on the thread count."""
    layer = make_layer(13, 40, 8, H, dtype=torch.float32, seed=3)
    kw = dict(lengths=torch.randint(0, 14, (40,), generator=torch.Generator().manual_seed(1)),
              truncate=5, reverse=reverse)
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, h_n = functional.rnn(*(layer[k] for k in NAMES), **kw)
            results.append([out, h_n, *grads_of([out, h_n], [layer[k] for k in NAMES])])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_lower_cpu_capability_in_subprocess(capability):
    """RNNKERN_CPU_CAPABILITY runs the portable (or AVX2) kernels, as a CPU
    without AVX-512 would: fused steps, element-wise passes, the loss rows
    (with O below and above a vector's width) and the gated cells' rows."""
    if capability == "AVX2" and rnnkern.cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    code = (
        "import torch, rnnkern, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from helpers import make_layer, assert_close\n"
        f"assert rnnkern.cpu_capability() == '{capability}', rnnkern.cpu_capability()\n"
        "from rnnkern import functional, reference\n"
        "for nl, dt, rev in [(n, d, r) for n in ('tanh', 'relu') for d in (torch.float64, torch.float32) for r in (False, True)]:\n"
        "    l = make_layer(9, 5, 3, 19, dtype=dt)\n"
        "    args = [l[k] for k in ('input','hx','weight_ih','weight_hh','bias_ih','bias_hh')]\n"
        "    tol = 1e-10 if dt == torch.float64 else 1e-5\n"
        "    for lens in (None, torch.tensor([9, 0, 4, 1, 7])):\n"
        "        kw = dict(nonlinearity=nl, lengths=lens, reverse=rev, truncate=4)\n"
        "        a, b = functional.rnn(*args, **kw), reference.rnn(*args, **kw)\n"
        "        assert_close(a[0], b[0], tol)\n"
        "        ga = torch.autograd.grad(a[0].sum() + a[1].sum(), args)\n"
        "        gb = torch.autograd.grad(b[0].sum() + b[1].sum(), args)\n"
        "        [assert_close(x, y, tol) for x, y in zip(ga, gb)]\n"
        "for loss, O in (('mse', 8), ('mse', 21), ('cross_entropy', 19)):\n"
        "    l = make_layer(9, 5, 3, 7)\n"
        "    args = [l[k] for k in ('input','hx','weight_ih','weight_hh','bias_ih','bias_hh')]\n"
        "    w_out = torch.randn(O, 7, dtype=torch.float64, requires_grad=True)\n"
        "    b_out = torch.randn(O, dtype=torch.float64, requires_grad=True)\n"
        "    tgt = torch.randn(9, 5, O, dtype=torch.float64) if loss == 'mse' else torch.randint(0, O, (9, 5))\n"
        "    kw = dict(loss=loss, lengths=torch.tensor([9, 0, 4, 1, 7]), reduction='seq_sum')\n"
        "    a = functional.rnn_loss(args[0], tgt, *args[1:], w_out, b_out, **kw)\n"
        "    b = reference.rnn_loss(args[0], tgt, *args[1:], w_out, b_out, **kw)\n"
        "    assert_close(a, b, 1e-10)\n"
        "    ga = torch.autograd.grad(a, args + [w_out, b_out])\n"
        "    gb = torch.autograd.grad(b, args + [w_out, b_out])\n"
        "    [assert_close(x, y, 1e-10) for x, y in zip(ga, gb)]\n"
        "from test_gated import make_gated, run\n"
        "for cell, dt, H in [(c, d, h) for c in ('lstm', 'gru') for d in (torch.float64, torch.float32) for h in (7, 19)]:\n"
        "    d = make_gated(cell, 9, 5, 3, H, P=5 if cell == 'lstm' else None, dtype=dt, seed=H)\n"
        "    tol = 1e-10 if dt == torch.float64 else 1e-5\n"
        "    kw = dict(lengths=torch.tensor([9, 0, 4, 1, 7]), reverse=True, truncate=4)\n"
        "    got, want = run(functional, cell, d, **kw), run(reference, cell, d, **kw)\n"
        "    [assert_close(x, y, tol) for x, y in zip(got[0] + got[1], want[0] + want[1]) if y is not None]\n"
        "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RNNKERN_CPU_CAPABILITY=capability)
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_no_grad_builds_no_graph():
    layer = make_layer(5, 3, 2, 4)
    with torch.no_grad():
        out, h_n = functional.rnn(*(layer[k] for k in NAMES))
    assert out.grad_fn is None and h_n.grad_fn is None
    ref, _ = reference.rnn(*(layer[k] for k in NAMES))
    assert_close(out, ref.detach(), 1e-12)




def test_create_graph_gives_first_order_then_refuses_double_backward():
    layer = make_layer(4, 2, 3, 5)
    inputs = [layer[k] for k in NAMES]
    out, _ = functional.rnn(*inputs)
    (g,) = torch.autograd.grad(out.pow(2).sum(), layer["weight_hh"], create_graph=True)
    (want,) = torch.autograd.grad(functional.rnn(*inputs)[0].pow(2).sum(), layer["weight_hh"])
    assert torch.equal(g, want)
    with pytest.raises(RuntimeError, match="double backward through rnnkern.functional.rnn "):
        g.sum().backward()


@pytest.mark.parametrize("lengths", [False, True])
def test_input_without_grad_skips_its_gradient(lengths):
    """An input that needs no gradient gets none computed (as nn.RNN's first
    layer), and every other gradient is unchanged."""
    T, B, I, H = 7, 4, 3, 6
    layer = make_layer(T, B, I, H)
    lens = torch.tensor([7, 0, 3, 5]) if lengths else None
    full = grads_of(functional.rnn(*(layer[k] for k in NAMES), lengths=lens),
                    [layer[k] for k in NAMES])
    x = layer["input"].detach()
    out, h_n = functional.rnn(x, *(layer[k] for k in NAMES[1:]), lengths=lens)
    part = grads_of([out, h_n], [x] + [layer[k] for k in NAMES[1:]])
    assert part[0] is None
    for a, b in zip(part[1:], full[1:]):
        assert torch.equal(a, b)


def test_raw_bwd_grad_input_false_returns_empty():
    layer = make_layer(5, 3, 2, 4)
    x, h0, wi, wh = (layer[k].detach() for k in ("input", "hx", "weight_ih", "weight_hh"))
    out, h_n = torch.ops.rnnkern.elman_fwd(x, h0, wi, wh, None, None, None, "tanh", False)
    g = torch.randn_like(out)
    with_in = torch.ops.rnnkern.elman_bwd(g, h_n, x, h0, wi, wh, out, None, "tanh", False, 0)
    without = torch.ops.rnnkern.elman_bwd(g, h_n, x, h0, wi, wh, out, None, "tanh", False, 0, False)
    assert without[0].shape == (0,) and with_in[0].shape == x.shape
    for a, b in zip(with_in[1:], without[1:]):
        assert torch.equal(a, b)
    torch.library.opcheck(torch.ops.rnnkern.elman_bwd.default,
                          (g, h_n, x, h0, wi, wh, out, None, "tanh", False, 0, False))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("T", [1, 5])
def test_zero_h0_term_keeps_nan_of_first_step(cell, T):
    """With hx None (h0 = 0) the kernels skip dW_hh's h0 term, which is exactly
    0 unless the first step's gradient is not finite (0 * NaN is NaN): a NaN
    upstream gradient at t = 0 must reach weight_hh.grad as autograd's does,
    and with finite gradients the skip must not change it."""
    g = torch.Generator().manual_seed(5)
    B, I, H = 3, 4, 7
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell] * H
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    ws = [(torch.randn(*shape, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
          for shape in ((G, I), (G, H), (G,), (G,))]
    for poison in (False, True):
        up = torch.randn(T, B, H, generator=g, dtype=torch.float64)
        if poison:
            up[0, 1, 2] = float("nan")
        got = [torch.autograd.grad(getattr(impl, cell)(x, None, *ws)[0], ws[1], up)[0]
               for impl in (functional, reference)]
        assert torch.equal(torch.isnan(got[0]), torch.isnan(got[1])), (poison, got)
        assert torch.isnan(got[0]).any() == poison
        finite = ~torch.isnan(got[1])
        assert_close(got[0][finite], got[1][finite], 1e-10, f"{cell} weight_hh grad")

"""The fused kernel against the reference (the specification) and torch.nn.RNN."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from helpers import (TOL, assert_close, grads_of, make_layer, nn_rnn_like, product, random_lengths,
                     relu_kinks_differ)
from rnnkern import functional, reference

NAMES = ["input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]


def run(impl, layer, **kw):
    return impl.rnn(*(layer[k] for k in NAMES), **kw)


def compare(layer, tol, kw_a, kw_b=None, impl_b=reference):
    """Compares outputs, then gradients; returns False (gradients not compared)
    for a float32 relu draw whose activity patterns differ (see relu_kinks_differ)."""
    out_a, h_a = run(functional, layer, **kw_a)
    out_b, h_b = run(impl_b, layer, **(kw_b or kw_a))
    assert_close(out_a, out_b, tol, "output")
    assert_close(h_a, h_b, tol, "h_n")
    if kw_a.get("nonlinearity") == "relu" and relu_kinks_differ(out_a, out_b):
        return False
    inputs = [layer[k] for k in NAMES]
    for name, ga, gb in zip(NAMES, grads_of([out_a, h_a], inputs), grads_of([out_b, h_b], inputs)):
        if gb is not None:
            assert_close(ga, gb, tol, f"grad {name}")
    return True


@pytest.mark.parametrize("case", product(nonlinearity=["tanh", "relu"], lengths=[False, True],
                                         truncate=[None, 7], reverse=[False, True]),
                         ids=str)
def test_float32_realistic_vs_reference(case):
    # B=32, T=100, I=64, H=128. Both sides use float32 BLAS with different
    # summation orders; 1e-5 relative holds with weights at nn.RNN's init scale.
    T, B, I, H = 100, 32, 64, 128
    for _ in range(5):
        layer = make_layer(T, B, I, H, dtype=torch.float32)
        lengths = random_lengths(B, T) if case["lengths"] else None
        if compare(layer, TOL[torch.float32],
                   dict(nonlinearity=case["nonlinearity"], lengths=lengths,
                        truncate=case["truncate"], reverse=case["reverse"])):
            return
    pytest.fail("5 draws in a row had relu activity patterns that differ")


def nn_rnn_run(layer, nonlinearity, batch_first, lengths):
    m = nn_rnn_like(layer, nonlinearity, batch_first)
    x = layer["input"]
    h0 = layer["hx"][None] if layer["hx"] is not None else None
    if lengths is None:
        out, h_n = m(x, h0)
    else:
        T = x.shape[1] if batch_first else x.shape[0]
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, h_n = m(packed, h0)
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    return m, out, h_n[0]


@pytest.mark.parametrize("trial", range(12))
def test_random_configs_match_nn_rnn(trial):
    """Random sizes and options: outputs and every gradient within 1e-5 relative
    of torch.nn.RNN in float32 (lengths through a PackedSequence)."""
    g = torch.Generator().manual_seed(1000 + trial)
    pick = lambda *opts: opts[int(torch.randint(len(opts), (1,), generator=g))]  # noqa: E731
    T, B = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    I, H = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g))
    nonlinearity, bias, batch_first = pick("tanh", "relu"), pick(True, False), pick(True, False)
    with_lengths, with_hx = trial % 2 == 1, pick(True, False)
    tol = TOL[torch.float32]
    for _ in range(5):
        layer = make_layer(T, B, I, H, dtype=torch.float32, bias=bias, hx=with_hx,
                           batch_first=batch_first)
        lengths = random_lengths(B, T, low=1, g=g) if with_lengths else None
        m, out_ref, h_ref = nn_rnn_run(layer, nonlinearity, batch_first, lengths)
        out, h_n = run(functional, layer, nonlinearity=nonlinearity, batch_first=batch_first,
                       lengths=lengths)
        assert_close(out, out_ref, tol, "output")
        assert_close(h_n, h_ref, tol, "h_n")
        if not (nonlinearity == "relu" and relu_kinks_differ(out, out_ref)):
            break
    else:
        pytest.fail("5 draws in a row had relu activity patterns that differ")
    ours = grads_of([out, h_n], [layer[k] for k in NAMES])
    theirs = grads_of([out_ref, h_ref], [layer["input"], layer["hx"], m.weight_ih_l0, m.weight_hh_l0,
                                         m.bias_ih_l0 if bias else None,
                                         m.bias_hh_l0 if bias else None])
    for name, a, b in zip(NAMES, ours, theirs):
        if b is not None:
            assert_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("case", product(dtype=[torch.float64, torch.float32],
                                         nonlinearity=["tanh", "relu"], lengths=[False, True],
                                         batch_first=[False, True]), ids=str)
def test_matches_nn_rnn(case):
    dtype, bf = case["dtype"], case["batch_first"]
    T, B, I, H = 23, 9, 5, 7
    layer = make_layer(T, B, I, H, dtype=dtype, batch_first=bf)
    lengths = random_lengths(B, T, low=1) if case["lengths"] else None
    m, out_ref, h_ref = nn_rnn_run(layer, case["nonlinearity"], bf, lengths)
    out, h_n = run(functional, layer, nonlinearity=case["nonlinearity"], batch_first=bf,
                   lengths=lengths)
    assert_close(out, out_ref, TOL[dtype], "output")
    assert_close(h_n, h_ref, TOL[dtype], "h_n")


@pytest.mark.parametrize("case", product(lengths=[False, True], batch_first=[False, True]),
                         ids=str)
def test_reverse_matches_bidirectional_nn_rnn(case):
    """reverse=True is the reverse half of a bidirectional nn.RNN, packed included."""
    T, B, I, H = 17, 6, 4, 7
    bf = case["batch_first"]
    fwd = make_layer(T, B, I, H, batch_first=bf, hx=False)
    bwd = make_layer(T, B, I, H, batch_first=bf, hx=False)
    bwd["input"] = fwd["input"]
    m = nn_rnn_like(fwd, "tanh", bf, bidirectional=True, reverse_layer=bwd)
    x = fwd["input"]
    lengths = random_lengths(B, T, low=1) if case["lengths"] else None
    if lengths is None:
        out_ref, h_ref = m(x)
    else:
        out_ref, h_ref = m(pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False))
        out_ref, _ = pad_packed_sequence(out_ref, batch_first=bf, total_length=T)
    out, h_n = run(functional, bwd, batch_first=bf, lengths=lengths, reverse=True)
    assert_close(out, out_ref[..., H:], TOL[torch.float64], "output")
    assert_close(h_n, h_ref[1], TOL[torch.float64], "h_n")


@pytest.mark.parametrize("case", product(lengths=[False, True], K=[1, 3, 10]), ids=str)
def test_truncate_equals_chunked_detach(case):
    """truncate=K gives the gradients of a loop over K-step chunks with
    h = h.detach() between them: the chunks run through torch.nn.RNN where it
    can express them, through the reference (untruncated) otherwise."""
    T, B, I, H, K = 23, 5, 3, 6, case["K"]
    layer = make_layer(T, B, I, H)
    lengths = torch.tensor([23, 0, 11, 1, 17]) if case["lengths"] else None
    out, h_n = run(functional, layer, lengths=lengths, truncate=K)

    m = nn_rnn_like(layer, "tanh", False)
    h, chunks = layer["hx"], []
    for c0 in range(0, T, K):
        x_c = layer["input"][c0:c0 + K]
        if lengths is None:
            o_c, h_c = m(x_c, h[None])
            h_c = h_c[0]
        else:
            # nn.RNN cannot pack zero-length sequences, so these chunks use the reference
            len_c = (lengths - c0).clamp(0, x_c.shape[0])
            o_c, h_c = reference.rnn(x_c, h, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0,
                                     m.bias_hh_l0, lengths=len_c)
        chunks.append(o_c)
        h = h_c.detach() if c0 + K < T else h_c
    out_ref, h_ref = torch.cat(chunks), h
    assert_close(out, out_ref, 1e-10, "output")
    assert_close(h_n, h_ref, 1e-10, "h_n")
    ours = grads_of([out, h_n], [layer[k] for k in NAMES])
    theirs = grads_of([out_ref, h_ref], [layer["input"], layer["hx"], m.weight_ih_l0,
                                         m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0])
    for name, a, b in zip(NAMES, ours, theirs):
        assert_close(a, b, 1e-10, f"grad {name}")
    if K < T:
        # the cut is real: full BPTT differs
        full = grads_of(run(functional, layer, lengths=lengths), [layer["weight_hh"]])[0]
        assert rel_err_gt(full, ours[3], 1e-6)


def rel_err_gt(a, b, tol):
    return (a - b).abs().max().item() > tol * b.abs().max().item()

"""The reference's cells and its time loop (reference.lstm, reference.gru and
rnn_loss with mode='lstm' / 'gru') against torch.nn, in float64.

The reference is the specification the kernels are tested against, so it is
tested here against torch.nn itself: the cells, whole layers, lengths (as nn's
PackedSequence), reverse (as nn's bidirectional reverse half), truncation (as
an explicit loop over chunks that detaches the state) and the per-step loss.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from helpers import assert_close, grads_of, product
from rnnkern import reference

TOL = 1e-10  # relative, float64
DT = torch.float64
GATES = {"lstm": 4, "gru": 3}
# (mode, proj_size): nn.GRU has no projection
CELLS = [("lstm", 0), ("lstm", 3), ("gru", 0)]
# the leaves of one layer, in the order grads are compared
LEAVES = ("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
REDUCTIONS = ["mean", "sum", "seq_mean", "seq_sum", "none"]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def make_params(mode, T, B, I, H, *, P=0, bias=True, hx=True, batch_first=False):
    """Fresh random leaves of one layer, all requiring grad (None where absent):
    input, h0 (B, P or H), c0 (B, H; LSTM only), the weights, weight_hr (P, H)."""
    Ph, G, k = P or H, GATES[mode] * H, H ** -0.5

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, dtype=DT) * s).requires_grad_()

    return dict(
        input=rnd(*((B, T, I) if batch_first else (T, B, I))),
        h0=rnd(B, Ph) if hx else None,
        c0=rnd(B, H) if hx and mode == "lstm" else None,
        weight_ih=rnd(G, I, s=k),
        weight_hh=rnd(G, Ph, s=k),
        bias_ih=rnd(G, s=k) if bias else None,
        bias_hh=rnd(G, s=k) if bias else None,
        weight_hr=rnd(P, H, s=k) if P else None,
    )


def hx_of(mode, p):
    if p["h0"] is None:
        return None
    return (p["h0"], p["c0"]) if mode == "lstm" else p["h0"]


def run_ref(mode, p, **kw):
    """reference.lstm / reference.gru. Returns (output, [h_n] or [h_n, c_n])."""
    args = (p["input"], hx_of(mode, p), p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
    if mode == "lstm":
        out, (h_n, c_n) = reference.lstm(*args, p["weight_hr"], **kw)
        return out, [h_n, c_n]
    out, h_n = reference.gru(*args, **kw)
    return out, [h_n]


def nn_layer(mode, p, *, batch_first, reverse_p=None):
    """nn.LSTM / nn.GRU holding p's weights (and reverse_p's as its reverse direction)."""
    G, I = p["weight_ih"].shape
    H = G // GATES[mode]
    kw = dict(bias=p["bias_ih"] is not None, batch_first=batch_first,
              bidirectional=reverse_p is not None, dtype=DT)
    if mode == "lstm":
        P = 0 if p["weight_hr"] is None else p["weight_hr"].shape[0]
        m = nn.LSTM(I, H, proj_size=P, **kw)
    else:
        m = nn.GRU(I, H, **kw)
    with torch.no_grad():
        for suffix, src in (("", p), ("_reverse", reverse_p)):
            for name in WEIGHTS if src is not None else ():
                if src[name] is not None:
                    getattr(m, f"{name}_l0{suffix}").copy_(src[name])
    return m


def nn_leaves(m, p, suffix=""):
    """The tensors of nn's run that correspond to LEAVES."""
    return [p["input"], p["h0"], p["c0"]] + [
        getattr(m, f"{n}_l0{suffix}") if p[n] is not None else None for n in WEIGHTS]


def nn_hx(mode, *ps):
    """nn's hx (D, B, *) from the h0/c0 of each direction's params."""
    if ps[0]["h0"] is None:
        return None
    h = torch.stack([p["h0"] for p in ps])
    return (h, torch.stack([p["c0"] for p in ps])) if mode == "lstm" else h


def nn_run(mode, m, x, hx, lengths, batch_first):
    """Runs m (packed when lengths is given). Returns (output, [h_n] or [h_n, c_n]), states (D, B, *)."""
    T = x.shape[1] if batch_first else x.shape[0]
    if lengths is not None:
        x = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, state = m(x, hx)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    return out, (list(state) if mode == "lstm" else [state])


def assert_all_close(ours, theirs, ours_in, theirs_in):
    """Outputs, final states and the gradients of a random linear functional of them."""
    (out_a, st_a), (out_b, st_b) = ours, theirs
    assert_close(out_a, out_b, TOL, "output")
    for name, a, b in zip(("h_n", "c_n"), st_a, st_b):
        assert_close(a, b, TOL, name)
    got = grads_of([out_a, *st_a], ours_in)
    want = grads_of([out_b, *st_b], theirs_in)
    for name, a, b in zip(LEAVES, got, want):
        assert (a is None) == (b is None), name
        if b is not None:
            assert_close(a, b, TOL, f"grad {name}")


def random_lengths(B, T, low):
    """In [low, T], with low and T both present (B >= 2), in random order."""
    lens = torch.randint(low, T + 1, (B,))
    lens[0], lens[-1] = low, T
    return lens[torch.randperm(B)]


# ---------------------------------------------------------------------------
# The cells

@pytest.mark.parametrize("case", product(cell=["rnn_tanh", "rnn_relu", "lstm", "gru"],
                                         bias=[True, False], B=[1, 5]), ids=case_id)
def test_cells_match_nn_cells(case):
    mode, B, I, H = case["cell"], case["B"], 3, 7
    G = GATES.get(mode, 1) * H
    if mode == "lstm":
        m = nn.LSTMCell(I, H, bias=case["bias"], dtype=DT)
    elif mode == "gru":
        m = nn.GRUCell(I, H, bias=case["bias"], dtype=DT)
    else:
        m = nn.RNNCell(I, H, bias=case["bias"], nonlinearity=mode[4:], dtype=DT)
    with torch.no_grad():
        for w in m.parameters():
            w.copy_(torch.randn_like(w) * H ** -0.5)
    x = torch.randn(B, I, dtype=DT, requires_grad=True)
    h = torch.randn(B, H, dtype=DT, requires_grad=True)
    c = torch.randn(B, H, dtype=DT, requires_grad=True)
    weights = [m.weight_ih, m.weight_hh] + ([m.bias_ih, m.bias_hh] if case["bias"] else [None, None])
    assert weights[0].shape == (G, I)
    if mode == "lstm":
        ours, theirs = reference.lstm_cell(x, (h, c), *weights), m(x, (h, c))
    elif mode == "gru":
        ours, theirs = (reference.gru_cell(x, h, *weights),), (m(x, h),)
    else:
        ours, theirs = (reference.elman_cell(x, h, *weights, nonlinearity=mode[4:]),), (m(x, h),)
    leaves = [x, h, c] + [w for w in weights if w is not None]
    for a, b in zip(ours, theirs):
        assert_close(a, b, TOL, "state")
    for a, b in zip(grads_of(ours, leaves), grads_of(theirs, leaves)):
        if b is not None:
            assert_close(a, b, TOL, "grad")


# ---------------------------------------------------------------------------
# Whole layers

@pytest.mark.parametrize("case", product(cell=CELLS, bias=[True, False], batch_first=[False, True],
                                         hx=[True, False], size=[(1, 1, 2, 7), (9, 5, 3, 7)]),
                         ids=case_id)
def test_layer_matches_nn(case):
    (mode, P), bf = case["cell"], case["batch_first"]
    T, B, I, H = case["size"]
    p = make_params(mode, T, B, I, H, P=P, bias=case["bias"], hx=case["hx"], batch_first=bf)
    m = nn_layer(mode, p, batch_first=bf)
    out, states = nn_run(mode, m, p["input"], nn_hx(mode, p), None, bf)
    assert_all_close(run_ref(mode, p, batch_first=bf), (out, [s[0] for s in states]),
                     [p[k] for k in LEAVES], nn_leaves(m, p))


@pytest.mark.parametrize("case", product(cell=CELLS, batch_first=[False, True], hx=[True, False]),
                         ids=case_id)
def test_lengths_match_packed_sequence(case):
    (mode, P), bf = case["cell"], case["batch_first"]
    T, B, I, H = 11, 6, 3, 7
    p = make_params(mode, T, B, I, H, P=P, hx=case["hx"], batch_first=bf)
    lengths = random_lengths(B, T, low=1)
    m = nn_layer(mode, p, batch_first=bf)
    out, states = nn_run(mode, m, p["input"], nn_hx(mode, p), lengths, bf)
    assert_all_close(run_ref(mode, p, batch_first=bf, lengths=lengths),
                     (out, [s[0] for s in states]), [p[k] for k in LEAVES], nn_leaves(m, p))


@pytest.mark.parametrize("case", product(cell=CELLS, reverse=[False, True]), ids=case_id)
def test_zero_lengths_keep_hx_and_leave_the_rest_alone(case):
    """nn's packing refuses length 0, so: those sequences' h_n (and c_n) is hx
    exactly, with hx's gradient the upstream one; their output is 0 and their
    input gets no gradient; the other sequences are as in a batch without them."""
    (mode, P), rev = case["cell"], case["reverse"]
    T, B, I, H = 8, 5, 3, 7
    p = make_params(mode, T, B, I, H, P=P)
    lengths = torch.tensor([0, 5, 0, T, 1])[torch.randperm(B)]
    zero, kept = (lengths == 0), (lengths > 0).nonzero()[:, 0]
    out, states = run_ref(mode, p, lengths=lengths, reverse=rev)
    hx = [p["h0"], p["c0"]][:len(states)]
    for s, h0 in zip(states, hx):
        assert torch.equal(s[zero], h0[zero])
    assert (out[:, zero] == 0).all()

    w_out = torch.randn(out.shape, dtype=DT)
    w_states = [torch.randn(s.shape, dtype=DT) for s in states]
    objective = (out * w_out).sum() + sum((s * w).sum() for s, w in zip(states, w_states))
    leaves = [p["input"], *hx, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"]]
    grads = torch.autograd.grad(objective, leaves)
    assert (grads[0][:, zero] == 0).all()
    for g, w in zip(grads[1:1 + len(hx)], w_states):
        assert torch.equal(g[zero], w[zero])

    # the sub-batch's input and hx are slices of the leaves: gradients compare on the leaves
    sub = {k: v[:, kept] if k == "input" else v[kept] if k in ("h0", "c0") and v is not None else v
           for k, v in p.items()}
    out_s, states_s = run_ref(mode, sub, lengths=lengths[kept], reverse=rev)
    assert_close(out[:, kept], out_s, TOL, "output")
    for a, b in zip(states, states_s):
        assert_close(a[kept], b, TOL, "state")
    objective_s = (out_s * w_out[:, kept]).sum() + sum(
        (s * w[kept]).sum() for s, w in zip(states_s, w_states))
    grads_s = torch.autograd.grad(objective_s, leaves)
    assert_close(grads[0][:, kept], grads_s[0][:, kept], TOL, "grad input")
    for g, g_s in zip(grads[1:1 + len(hx)], grads_s[1:1 + len(hx)]):
        assert_close(g[kept], g_s[kept], TOL, "grad hx")
    for g, g_s in zip(grads[1 + len(hx):], grads_s[1 + len(hx):]):
        assert_close(g, g_s, TOL, "grad weight")


@pytest.mark.parametrize("case", product(cell=CELLS, lengths=[False, True],
                                         batch_first=[False, True]), ids=case_id)
def test_reverse_matches_bidirectional_nn(case):
    """reverse=True is the reverse half of a 1-layer bidirectional nn layer,
    packed included, with each direction's own hx."""
    (mode, P), bf = case["cell"], case["batch_first"]
    T, B, I, H = 10, 6, 3, 7
    fwd = make_params(mode, T, B, I, H, P=P, batch_first=bf)
    bwd = make_params(mode, T, B, I, H, P=P, batch_first=bf)
    bwd["input"] = fwd["input"]
    lengths = random_lengths(B, T, low=1) if case["lengths"] else None
    m = nn_layer(mode, fwd, batch_first=bf, reverse_p=bwd)
    out, states = nn_run(mode, m, fwd["input"], nn_hx(mode, fwd, bwd), lengths, bf)
    Ph = P or H
    # only the reverse half enters the objective, so nn's input gradient is the reverse direction's
    assert_all_close(run_ref(mode, bwd, batch_first=bf, lengths=lengths, reverse=True),
                     (out[..., Ph:], [s[1] for s in states]), [bwd[k] for k in LEAVES],
                     nn_leaves(m, bwd, "_reverse"))


def nn_chunked(mode, p, K, lengths):
    """nn.LSTM / nn.GRU over K-step chunks, detaching the state between chunks.
    Per chunk, sequences with steps left run packed; the others keep their state."""
    m = nn_layer(mode, p, batch_first=False)
    x = p["input"]
    T, B = x.shape[:2]
    state = [p["h0"], p["c0"]] if mode == "lstm" else [p["h0"]]
    chunks = []
    for c0 in range(0, T, K):
        x_c = x[c0:c0 + K]
        T_c = x_c.shape[0]
        len_c = torch.full((B,), T_c) if lengths is None else (lengths - c0).clamp(0, T_c)
        idx = (len_c > 0).nonzero()[:, 0]
        o = x_c.new_zeros(T_c, B, state[0].shape[1])
        if idx.numel() > 0:
            hx = [s[idx][None] for s in state]
            o_s, st = nn_run(mode, m, x_c[:, idx], tuple(hx) if mode == "lstm" else hx[0],
                             len_c[idx], False)
            o = o.index_copy(1, idx, o_s)
            state = [s.index_copy(0, idx, n[0]) for s, n in zip(state, st)]
        chunks.append(o)
        if c0 + K < T:
            state = [s.detach() for s in state]
    return m, torch.cat(chunks), state


@pytest.mark.parametrize("case", product(cell=CELLS, K=[1, 3, 20], lengths=[False, True]),
                         ids=case_id)
def test_truncate_equals_chunked_detach(case):
    (mode, P), K = case["cell"], case["K"]
    T, B, I, H = 13, 5, 3, 7
    p = make_params(mode, T, B, I, H, P=P)
    lengths = random_lengths(B, T, low=0) if case["lengths"] else None
    m, out, states = nn_chunked(mode, p, K, lengths)
    ours = run_ref(mode, p, lengths=lengths, truncate=K)
    assert_all_close(ours, (out, states), [p[k] for k in LEAVES], nn_leaves(m, p))
    if K < T:  # the cut is real: full BPTT differs
        full = grads_of([*run_ref(mode, p, lengths=lengths)[1]], [p["weight_hh"]])[0]
        cut = grads_of([*run_ref(mode, p, lengths=lengths, truncate=K)[1]], [p["weight_hh"]])[0]
        assert (full - cut).abs().max() > 1e-6 * full.abs().max()


@pytest.mark.parametrize("case", product(cell=CELLS, truncate=[None, 3]), ids=case_id)
def test_reverse_is_forward_over_flipped_sequences(case):
    """reverse=True (with truncation: counted from each sequence's last step) is
    the forward layer over each sequence's valid steps flipped, flipped back."""
    (mode, P), K = case["cell"], case["truncate"]
    T, B, I, H = 9, 4, 3, 7
    p = make_params(mode, T, B, I, H, P=P)
    lengths = random_lengths(B, T, low=0)
    t = torch.arange(T)[:, None]  # [T,1]
    flip = torch.where(t < lengths, lengths - 1 - t, t)  # [T,B], an involution
    x = p["input"]
    x_flipped = x.gather(0, flip[..., None].expand_as(x))
    out_f, states_f = run_ref(mode, {**p, "input": x_flipped}, lengths=lengths, truncate=K)
    out_f = out_f.gather(0, flip[..., None].expand_as(out_f))
    ours = run_ref(mode, p, lengths=lengths, truncate=K, reverse=True)
    leaves = [p[k] for k in LEAVES]
    assert_all_close(ours, (out_f, states_f), leaves, leaves)


# ---------------------------------------------------------------------------
# The per-step loss on top of the LSTM and the GRU

@pytest.mark.parametrize("case", product(cell=CELLS, loss=["cross_entropy", "mse"],
                                         reduction=REDUCTIONS, batch_first=[False, True]),
                         ids=case_id)
def test_rnn_loss_matches_nn_layer_linear_and_loss(case):
    """rnn_loss(mode=...) is nn.LSTM / nn.GRU (packed) + nn.Linear + the loss of
    every step, weighted by lengths and a mask (one sequence all masked), and
    reduced by hand. grad_norm at each sequence's last step is the norm of the
    gradient reaching nn's output there (it feeds only the head)."""
    (mode, P), bf, loss, reduction = case["cell"], case["batch_first"], case["loss"], case["reduction"]
    T, B, I, H, O = 8, 5, 3, 7, 4
    Ph = P or H
    p = make_params(mode, T, B, I, H, P=P, batch_first=bf)
    w_out = (torch.randn(O, Ph, dtype=DT) * Ph ** -0.5 * 3).requires_grad_()
    b_out = (torch.randn(O, dtype=DT) * 0.1).requires_grad_()
    lengths = random_lengths(B, T, low=1)
    step_shape = (B, T) if bf else (T, B)
    if loss == "cross_entropy":
        target = torch.randint(0, O, step_shape)
    else:
        target = torch.randn(*step_shape, O, dtype=DT)
    mask = torch.rand(step_shape, dtype=DT) * 2
    mask.view(-1)[1::5] = 0
    (mask[int(torch.randint(B, ()))] if bf else mask[:, int(torch.randint(B, ()))]).zero_()

    d = reference.rnn_loss(p["input"], target, hx_of(mode, p), p["weight_ih"], p["weight_hh"],
                           p["bias_ih"], p["bias_hh"], w_out, b_out, mode=mode,
                           weight_hr=p["weight_hr"], loss=loss, reduction=reduction,
                           lengths=lengths, loss_mask=mask, batch_first=bf, return_details=True)

    m = nn_layer(mode, p, batch_first=bf)
    head = nn.Linear(Ph, O, dtype=DT)
    with torch.no_grad():
        head.weight.copy_(w_out)
        head.bias.copy_(b_out)
    out, states = nn_run(mode, m, p["input"], nn_hx(mode, p), lengths, bf)
    y = head(out)
    if loss == "cross_entropy":
        l = F.cross_entropy(y.reshape(-1, O), target.reshape(-1), reduction="none").view(step_shape)
    else:
        l = F.mse_loss(y, target, reduction="none").mean(dim=-1)
    t_axis = 1 if bf else 0
    t = torch.arange(T)[None, :] if bf else torch.arange(T)[:, None]
    b_lens = lengths[:, None] if bf else lengths[None, :]
    w = (t < b_lens).to(DT) * mask
    wl = w * l
    if reduction == "none":
        want = wl
    elif reduction == "sum":
        want = wl.sum()
    elif reduction == "mean":
        want = wl.sum() / w.sum()
    else:
        w_seq = w.sum(dim=t_axis)
        counted = w_seq > 0
        per_seq = wl.sum(dim=t_axis)[counted] / w_seq[counted]
        want = per_seq.sum() if reduction == "seq_sum" else per_seq.mean()

    assert_close(d.loss, want, TOL, "loss")
    h_n = list(d.h_n) if mode == "lstm" else [d.h_n]
    for name, a, b in zip(("h_n", "c_n"), h_n, states):
        assert_close(a, b[0], TOL, name)
    valid = (t < b_lens) & (w > 0)
    assert_close(torch.where(valid, d.step_loss, 0), torch.where(valid, l, 0).detach(), TOL,
                 "step_loss")

    upstream = torch.randn(want.shape, dtype=DT)
    leaves = [p[k] for k in LEAVES] + [w_out, b_out]
    present = [x for x in leaves if x is not None]
    nn_present = [x for x in nn_leaves(m, p) + [head.weight, head.bias] if x is not None]
    got = torch.autograd.grad((d.loss * upstream).sum(), present)
    g_out, *wanted = torch.autograd.grad((want * upstream).sum(), [out] + nn_present)
    for name, a, b in zip([n for n, x in zip(LEAVES + ("weight_out", "bias_out"), leaves)
                           if x is not None], got, wanted):
        assert_close(a, b, TOL, f"grad {name}")

    gn = d.grad_norm.transpose(0, 1) if bf else d.grad_norm  # [T,B]
    g_out = g_out.transpose(0, 1) if bf else g_out  # [T,B,P]
    last = lengths - 1
    rows = torch.arange(B)
    assert_close(gn[last, rows], g_out[last, rows].norm(dim=1), TOL, "grad_norm at the last step")
    assert (gn[torch.arange(T)[:, None] >= lengths[None, :]] == 0).all()


def test_rnn_loss_mode_defaults_to_the_nonlinearity():
    """mode=None is the Elman cell with nonlinearity; an explicit Elman mode
    gives the same; the LSTM and GRU change the value."""
    T, B, I, H, O = 6, 3, 2, 7, 4
    x = torch.randn(T, B, I, dtype=DT)
    target = torch.randint(0, O, (T, B))
    w_out = torch.randn(O, H, dtype=DT)

    def loss_of(mode=None, **kw):
        G = GATES.get(mode, 1) * H
        g = torch.Generator().manual_seed(3)
        w = [torch.randn(*s, dtype=DT, generator=g) * H ** -0.5 for s in ((G, I), (G, H), (G,), (G,))]
        return reference.rnn_loss(x, target, None, *w, w_out, mode=mode, **kw)

    for nl in ("tanh", "relu"):
        assert torch.equal(loss_of(nonlinearity=nl), loss_of(mode=f"rnn_{nl}"))
        assert torch.equal(loss_of(nonlinearity=nl), loss_of(mode=f"rnn_{nl}", nonlinearity=nl))
    assert not torch.equal(loss_of(), loss_of(nonlinearity="relu"))
    values = [loss_of(mode=m) for m in ("rnn_tanh", "lstm", "gru")]
    assert len({float(v) for v in values}) == 3
    with pytest.raises(ValueError, match="nonlinearity='relu' contradicts mode='lstm'"):
        loss_of(mode="lstm", nonlinearity="relu")
    with pytest.raises(ValueError, match="mode must be one of 'rnn_tanh', 'rnn_relu', 'lstm', 'gru'"):
        loss_of(mode="LSTM")
    with pytest.raises(ValueError, match="weight_hr .* applies to mode='lstm' only"):
        loss_of(mode="gru", weight_hr=torch.randn(3, H, dtype=DT))


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_bad_arguments_name_the_argument(mode):
    T, B, I, H = 4, 3, 2, 7
    p = make_params(mode, T, B, I, H)
    G = GATES[mode]

    def call(**over):
        return run_ref(mode, {**p, **over})

    with pytest.raises(ValueError, match=rf"weight_hh must have {G}H rows \({G} gates of H >= 1\), "
                                         rf"got shape \({G * H - 1}, {H}\)"):
        call(weight_hh=torch.randn(G * H - 1, H, dtype=DT))
    with pytest.raises(ValueError, match=rf"input has inconsistent input_size: got I=5, expected {I}"):
        call(input=torch.randn(T, B, 5, dtype=DT))
    with pytest.raises(ValueError, match=rf"bias_ih must have shape \({G}H,\) = \({G * H},\), got \({H},\)"):
        call(bias_ih=torch.randn(H, dtype=DT))
    with pytest.raises(ValueError, match=r"lengths must be in \[0, T=4\], got min 0 and max 5"):
        run_ref(mode, p, lengths=torch.tensor([0, 5, 1]))
    if mode == "lstm":
        with pytest.raises(ValueError, match=rf"c0 must have shape \(B, H\) = \({B}, {H}\)"):

            call(c0=torch.randn(B, H + 1, dtype=DT))
        with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
            reference.lstm(p["input"], p["h0"], p["weight_ih"], p["weight_hh"])
        with pytest.raises(ValueError, match=rf"weight_hr must have shape \(P, H\) = \({H}, {H}\), got \(3, {H}\)"):

            call(weight_hr=torch.randn(3, H, dtype=DT))

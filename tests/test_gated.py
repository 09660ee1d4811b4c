"""LSTM and GRU on the cell-generic time loop: the kernels against the
reference (float64, every gradient), gradcheck, opcheck, determinism, and
rnnkern.LSTM / rnnkern.GRU against torch.nn.LSTM / nn.GRU for every input form
and option; bad input."""

import copy
import io
import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkern
from helpers import TOL, TruncatedProbe, assert_close, grads_of, product
from rnnkern import functional, reference

CELLS = ["lstm", "gru"]


def make_gated(cell, T, B, I, H, *, P=None, dtype=torch.float64, bias=True, hx=True, seed=None):
    """Fresh random inputs of one gated layer, all requiring grad."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    P = P or H
    G = (4 if cell == "lstm" else 3) * H

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, dtype=dtype, generator=g) * s).requires_grad_()

    k = 1.0 / H**0.5
    d = dict(input=rnd(T, B, I), weight_ih=rnd(G, I, s=k), weight_hh=rnd(G, P, s=k),
             bias_ih=rnd(G, s=k) if bias else None, bias_hh=rnd(G, s=k) if bias else None,
             weight_hr=rnd(P, H, s=k) if (cell == "lstm" and P != H) else None)
    if hx:
        d["hx"] = (rnd(B, P), rnd(B, H)) if cell == "lstm" else rnd(B, H)
    else:
        d["hx"] = None
    return d


def leaves(d):
    out = [d["input"], d["weight_ih"], d["weight_hh"], d["bias_ih"], d["bias_hh"], d["weight_hr"]]
    hx = d["hx"]
    out += list(hx) if isinstance(hx, tuple) else [hx]
    return out


def run(impl, cell, d, **kw):
    """(outputs, gradients of a random functional of them) of one layer."""
    args = (d["input"], d["hx"], d["weight_ih"], d["weight_hh"], d["bias_ih"], d["bias_hh"])
    if cell == "lstm":
        out, (h, c) = impl.lstm(*args, d["weight_hr"], **kw)
        outs = [out, h, c]
    else:
        out, h = impl.gru(*args, **kw)
        outs = [out, h]
    return outs, grads_of(outs, leaves(d))


def compare(cell, d, tol, **kw):
    got, g_got = run(functional, cell, d, **kw)
    want, g_want = run(reference, cell, d, **kw)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, tol, f"output {i}")
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        assert (a is None) == (b is None), i
        if b is not None:
            assert_close(a, b, tol, f"grad {i}")
    return got, g_got


@pytest.mark.parametrize("case", product(
    cell=CELLS, TBIH=[(1, 1, 1, 1), (6, 3, 4, 7), (5, 2, 3, 17), (4, 9, 2, 33)],
    lengths=[False, True], reverse=[False, True], truncate=[None, 2]), ids=str)
def test_kernel_equals_reference(case):
    T, B, I, H = case["TBIH"]
    d = make_gated(case["cell"], T, B, I, H)
    lengths = torch.randint(0, T + 1, (B,)) if case["lengths"] else None
    compare(case["cell"], d, 1e-10, lengths=lengths, reverse=case["reverse"],
            truncate=case["truncate"])


@pytest.mark.parametrize("case", product(cell=CELLS, H=[512, 513], lengths=[False, True],
                                         reverse=[False, True]), ids=str)
def test_fused_and_blas_steps_both_equal_the_reference(case):
    """H = 512 runs the fused register-tiled steps (reverse with lengths on the
    sequences reordered within their lengths), H = 513 the BLAS loop; both
    against the reference in float64, B = 5 for a partial row tile."""
    T, B, I, H = 4, 5, 3, case["H"]
    d = make_gated(case["cell"], T, B, I, H, seed=11)
    lengths = torch.tensor([4, 0, 2, 3, 1]) if case["lengths"] else None
    compare(case["cell"], d, 1e-10, lengths=lengths, reverse=case["reverse"], truncate=3)


@pytest.mark.parametrize("case", product(cell=CELLS, BI=[(9, 3), (5, 3), (9, 300), (25, 300), (9, 0)],
                                         lengths=[False, True], reverse=[False, True]), ids=str)
def test_input_projection_in_the_tile_and_as_a_gemm_both_equal_the_reference(case):
    """The fused step computes x W_ih^T in its register tile for B >= 8 when
    W_ih is small (I = 3) or for B >= 24 (B = 25: tiles of 6 or 8 rows and
    one more), and as one GEMM before the loop otherwise: B = 5; B = 9 with
    I = 300 (384 KB of float64 W_ih for the LSTM, 288 KB for the GRU); I = 0,
    which only a direct call reaches (the bias alone). Each against the
    reference in float64, with reverse with lengths on the sequences
    reordered within their lengths."""
    B, I = case["BI"]
    T, H = 4, 40
    d = make_gated(case["cell"], T, B, I, H, seed=13)
    lengths = torch.randint(0, T + 1, (B,), generator=torch.Generator().manual_seed(B))
    compare(case["cell"], d, 1e-10, lengths=lengths if case["lengths"] else None,
            reverse=case["reverse"], truncate=3)


@pytest.mark.parametrize("case", product(cell=CELLS, H=[7, 513], truncate=[0, 2]), ids=str)
def test_op_grad_norm_reverse_with_lengths(case):
    """layer_bwd's ||dL/dh_t|| (want_grad_norm, reachable by a direct op call)
    on reverse with lengths: the fused steps' reordered run (H = 7) and the
    BLAS loop (H = 513) against retain_grad on each step's state in the
    reference, with dL/dx and dL/dW_hh alongside."""
    cell, H, K = case["cell"], case["H"], case["truncate"]
    T, B, I = 6, 4, 3
    d = make_gated(cell, T, B, I, H, seed=5)
    lens = torch.tensor([6, 0, 3, 5])
    x, wi, wh, bi, bh = (d[k].detach() for k in ("input", "weight_ih", "weight_hh", "bias_ih",
                                                 "bias_hh"))
    h0, c0 = ((d["hx"][0].detach(), d["hx"][1].detach()) if cell == "lstm"
              else (d["hx"].detach(), None))
    out, h_n, c_n, gates, cl, pin = torch.ops.rnnkern.layer_fwd(
        x, h0, c0, wi, wh, bi, bh, None, lens, cell, True, K)
    g_out, g_h = torch.randn_like(out), torch.randn_like(h_n)
    g_c = torch.randn_like(c_n) if cell == "lstm" else None
    got = torch.ops.rnnkern.layer_bwd(g_out, g_h, g_c, x, h0, c0, wi, wh, None, out, gates, cl,
                                      pin, lens, cell, True, K, True, True)

    states = []

    def keep(s, state):
        h = state[0] if cell == "lstm" else state
        h.retain_grad()
        states.append(h)
        return state

    leaves_ = [v.clone().requires_grad_() for v in (x, wh)]
    hx = (h0, c0) if cell == "lstm" else h0
    r_out, r_state = getattr(reference, cell)(leaves_[0], hx, wi, leaves_[1], bi, bh,
                                              lengths=lens, reverse=True, truncate=K or None,
                                              _step=keep)
    finals = r_state if cell == "lstm" else (r_state,)
    value = (r_out * g_out).sum() + (finals[0] * g_h).sum()
    if cell == "lstm":
        value = value + (finals[1] * g_c).sum()
    value.backward()
    want = torch.zeros(T, B, dtype=x.dtype)
    for b, n in enumerate(lens.tolist()):
        for s in range(n):  # processing step s of sequence b is its time n - 1 - s
            want[n - 1 - s, b] = states[s].grad[b].norm()
    assert_close(got[-1], want, 1e-10, "grad_norm")
    assert_close(got[0], leaves_[0].grad, 1e-10, "grad input")
    assert_close(got[4], leaves_[1].grad, 1e-10, "grad weight_hh")


@pytest.mark.parametrize("case", product(cell=["lstm"], bias=[True, False], hx=[True, False],
                                         proj=[False, True], batch_first=[False, True])
                         + product(cell=["gru"], bias=[True, False], hx=[True, False],
                                   proj=[False], batch_first=[False, True]), ids=str)
def test_kernel_options_equal_reference(case):
    T, B, I, H = 5, 3, 4, 6
    d = make_gated(case["cell"], T, B, I, H, P=3 if case["proj"] else None, bias=case["bias"],
                   hx=case["hx"])
    if case["batch_first"]:
        d["input"] = d["input"].detach().transpose(0, 1).contiguous().requires_grad_()
    compare(case["cell"], d, 1e-10, batch_first=case["batch_first"],
            lengths=torch.tensor([5, 0, 2]), truncate=3)


@pytest.mark.parametrize("case", product(cell=["lstm"], proj=[False, True], H=[64])
                         + product(cell=["gru"], proj=[False], H=[64])
                         + product(cell=["lstm", "gru"], proj=[False], H=[300]), ids=str)
def test_float32_at_a_realistic_size(case):
    """float32 against the float64 reference, with lengths and truncation. H =
    300 runs the fused steps over a k-loop of 300 and a partial vector block
    (1.4 MB of packed W_hh for the LSTM)."""
    d64 = make_gated(case["cell"], 40, 16, 32, case["H"], P=24 if case["proj"] else None, seed=1)
    d32 = {k: (tuple(t.detach().float().requires_grad_() for t in v) if isinstance(v, tuple)
               else (v.detach().float().requires_grad_() if v is not None else None))
           for k, v in d64.items()}
    lengths = torch.randint(1, 41, (16,), generator=torch.Generator().manual_seed(0))

    def outputs_and_grads(impl, d):
        args = (d["input"], d["hx"], d["weight_ih"], d["weight_hh"], d["bias_ih"], d["bias_hh"])
        if case["cell"] == "lstm":
            out, (h, c) = impl.lstm(*args, d["weight_hr"], lengths=lengths, truncate=7)
            outs = [out, h, c]
        else:
            outs = list(impl.gru(*args, lengths=lengths, truncate=7))
        # one upstream gradient for both dtypes
        g = torch.Generator().manual_seed(0)
        ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
        wanted = [t for t in leaves(d) if t is not None]
        return outs + list(torch.autograd.grad(outs, wanted, ups))

    got = outputs_and_grads(functional, d32)
    want = outputs_and_grads(reference, d64)
    for a, b in zip(got, want):
        assert_close(a.double(), b, 10 * TOL[torch.float32])


@pytest.mark.parametrize("case", product(cell=CELLS, lengths=[False, True], truncate=[None, 2],
                                         reverse=[False, True]), ids=str)
def test_gradcheck(case):
    """float64 gradcheck; with truncate, against the function whose boundary
    states are constants (helpers.TruncatedProbe, as for the Elman kernel)."""
    cell = case["cell"]
    T, B, I, H = 5, 3, 2, 3
    d = make_gated(cell, T, B, I, H, P=2 if cell == "lstm" else None, seed=3)
    lengths = torch.tensor([3, 0, 5]) if case["lengths"] else None
    names = [n for n in ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
             if d[n] is not None]
    hx = list(d["hx"]) if isinstance(d["hx"], tuple) else [d["hx"]]
    P = hx[0].shape[1]
    opts = dict(lengths=lengths, truncate=case["truncate"], reverse=case["reverse"])

    def call(impl, tensors, cut):
        kw = dict(zip(names, tensors[:len(names)]))
        h = tuple(tensors[len(names):]) if cell == "lstm" else tensors[len(names)]
        extra = {}
        if cut is not None:
            # the probe keeps one tensor per boundary: (h, c) travel concatenated
            extra["_cut"] = ((lambda s, st: cut(s, torch.cat(st, 1)).split([P, H], 1))
                             if cell == "lstm" else cut)
        args = (kw["input"], h, kw["weight_ih"], kw["weight_hh"], kw.get("bias_ih"),
                kw.get("bias_hh"))
        if cell == "lstm":
            out, (hn, cn) = impl.lstm(*args, kw.get("weight_hr"), **opts, **extra)
            return out, hn, cn
        return impl.gru(*args, **opts, **extra)

    inputs = tuple(d[n] for n in names) + tuple(hx)
    if case["truncate"] is None:
        f = lambda *t: call(functional, t, None)  # noqa: E731
    else:
        TruncatedProbe.frozen = None
        f = lambda *t: TruncatedProbe.apply(call, *t)  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("case", product(cell=CELLS, dtype=[torch.float32, torch.float64],
                                         lengths=[False, True], reverse=[False, True]), ids=str)
def test_opcheck(case):
    cell = case["cell"]
    T, B, I, H = 5, 3, 2, 4
    P = 3 if cell == "lstm" else H
    d = make_gated(cell, T, B, I, H, P=P, dtype=case["dtype"])
    x, wi, wh, bi, bh, wr = (None if v is None else v.detach() for v in
                             (d["input"], d["weight_ih"], d["weight_hh"], d["bias_ih"],
                              d["bias_hh"], d["weight_hr"]))
    h0, c0 = ((d["hx"][0].detach(), d["hx"][1].detach()) if cell == "lstm"
              else (d["hx"].detach(), None))
    lens = torch.randint(0, T + 1, (B,)) if case["lengths"] else None
    fwd = (x, h0, c0, wi, wh, bi, bh, wr, lens, cell, case["reverse"], 2)
    torch.library.opcheck(torch.ops.rnnkern.layer_fwd.default, fwd)
    out, h_n, c_n, gates, cl, pin = torch.ops.rnnkern.layer_fwd(*fwd)
    bwd = (torch.randn_like(out), torch.randn_like(h_n),
           torch.randn_like(c_n) if cell == "lstm" else None, x, h0, c0, wi, wh, wr, out, gates,
           cl, pin, lens, cell, case["reverse"], 2)
    torch.library.opcheck(torch.ops.rnnkern.layer_bwd.default, bwd)


@pytest.mark.parametrize("cell", CELLS)
def test_bitwise_deterministic(cell):
    d = make_gated(cell, 30, 16, 8, 40, dtype=torch.float32)
    lengths = torch.randint(0, 31, (16,))
    runs = [run(functional, cell, d, lengths=lengths, truncate=9) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0][0] + runs[0][1], other[0] + other[1]):
            assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("H", [16, 48])
@pytest.mark.parametrize("cell", CELLS)
def test_same_bits_at_one_and_two_threads(cell, H):
    # B = 40: five row tiles, split 3 + 2 at two threads. At H = 16 the fused
    # backward sums dW_hh, dW_ih and the biases tile by tile inside its loop;
    # at H = 48 after it, over the T*B = 520 rows (dW_ih, I = 8, in two chunks
    # on the vector kernels).
    d = make_gated(cell, 13, 40, 8, H, dtype=torch.float32, seed=2)
    lengths = torch.randint(0, 14, (40,), generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            res.append(run(functional, cell, d, lengths=lengths))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(res[0][0] + res[0][1], res[1][0] + res[1][1]):
        assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_each_row_has_the_same_bits_whatever_its_tile(cell, threads):
    """The fused forward splits the rows evenly over the threads, then into
    register tiles of 6 (LSTM) or 8 (GRU) rows with AVX-512, the rest in tiles
    of 4, 2 and 1: every B from 1 to 17 lands rows in each kind of tile. A row
    computed in any of them must equal the same row computed on the same path:
    alone for B < 8, where the input projection is one GEMM before the loop,
    and in the whole batch of 17 from B = 8, where it runs in the tile."""
    T_, I_, H_ = 9, 5, 40
    g = torch.Generator().manual_seed(3)
    G = (4 if cell == "lstm" else 3) * H_
    x = torch.randn(T_, 17, I_, generator=g)
    h0 = torch.randn(17, H_, generator=g)
    c0 = torch.randn(17, H_, generator=g) if cell == "lstm" else None
    w = [torch.randn(G, I_, generator=g) * 0.3, torch.randn(G, H_, generator=g) * 0.2,
         torch.randn(G, generator=g), torch.randn(G, generator=g)]
    op = torch.ops.rnnkern.layer_fwd

    def fwd(rows):
        return op(x[:, rows], h0[rows], None if c0 is None else c0[rows], *w, None, None, cell,
                  False, 0)

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        alone = [fwd(slice(b, b + 1)) for b in range(17)]
        whole = fwd(slice(0, 17))
        for B_ in range(1, 18):
            out = fwd(slice(0, B_))
            for b in range(B_):
                ref, rb = (alone[b], 0) if B_ < 8 else (whole, b)
                for k in (0, 1, 3):  # output [T,B,P], h_n [B,P], gates [T,B,4H]
                    got = out[k][:, b] if out[k].dim() == 3 else out[k][b]
                    want = ref[k][:, rb] if ref[k].dim() == 3 else ref[k][rb]
                    assert torch.equal(got, want), (B_, b, k)
    finally:
        torch.set_num_threads(old)


# --- the modules against torch.nn ---------------------------------------------

T, B, I, H = 7, 3, 4, 5
FORMS = ["padded", "packed_sorted", "packed_unsorted", "unbatched"]


def module_pair(cell, num_layers, bias, batch_first, bidirectional, proj_size, dtype, dropout=0.0):
    nn_cls, ours_cls = (nn.LSTM, rnnkern.LSTM) if cell == "lstm" else (nn.GRU, rnnkern.GRU)
    args = (I, H, num_layers, bias, batch_first, dropout, bidirectional)
    kw = dict(proj_size=proj_size) if cell == "lstm" else {}
    theirs = nn_cls(*args, **kw, dtype=dtype)
    ours = ours_cls(*args, **kw, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def make_input(form, batch_first, dtype):
    if form == "unbatched":
        x = torch.randn(T, I, dtype=dtype, requires_grad=True)
        return x, x
    x = torch.randn(*((B, T, I) if batch_first else (T, B, I)), dtype=dtype, requires_grad=True)
    if form == "padded":
        return x, x
    lengths = (torch.randperm(T)[:B] + 1).sort(descending=True).values
    if form == "packed_unsorted":
        lengths = lengths[torch.tensor([2, 0, 1])]
    packed = pack_padded_sequence(x.detach(), lengths, batch_first=batch_first,
                                  enforce_sorted=form == "packed_sorted")
    data = packed.data.requires_grad_()
    return data, PackedSequence(data, *packed[1:])


def make_hx(m, cell, form, dtype):
    LD = m.num_layers * (2 if m.bidirectional else 1)
    P = m.proj_size or H
    lead = (LD,) if form == "unbatched" else (LD, B)
    h = torch.randn(*lead, P, dtype=dtype, requires_grad=True)
    if cell == "lstm":
        return (h, torch.randn(*lead, H, dtype=dtype, requires_grad=True))
    return h


def flat(out, state):
    data = out.data if isinstance(out, PackedSequence) else out
    return [data, *(state if isinstance(state, tuple) else (state,))]


MODULE_AXES = dict(dtype=[torch.float64, torch.float32], layers=[1, 2],
                   bidirectional=[False, True], batch_first=[False, True], bias=[True, False],
                   form=FORMS, hx=[False, True])


@pytest.mark.parametrize("case", product(cell=["lstm"], proj=[0, 2], **MODULE_AXES)
                         + product(cell=["gru"], proj=[0], **MODULE_AXES), ids=str)
def test_module_matches_nn(case):
    cell, dtype = case["cell"], case["dtype"]
    # A seed per case that is the same in every process: hash() of a str is
    # salted per process, which drew new inputs each run and, about once in a
    # few thousand, a float32 outlier (1.3e-5 on a (1, 2) grad of h0).
    torch.manual_seed(zlib.crc32(str(case).encode()))
    ours, theirs = module_pair(cell, case["layers"], case["bias"], case["batch_first"],
                               case["bidirectional"], case["proj"], dtype)
    x, inp = make_input(case["form"], case["batch_first"], dtype)
    hx = make_hx(theirs, cell, case["form"], dtype) if case["hx"] else None
    got = flat(*ours(inp, hx))
    params_o, params_t = list(ours.parameters()), list(theirs.parameters())
    hx_leaves = list(hx) if isinstance(hx, tuple) else ([hx] if hx is not None else [])
    g_got = grads_of(got, [x, *hx_leaves, *params_o])
    want = flat(*theirs(inp, hx))
    g_want = grads_of(want, [x, *hx_leaves, *params_t])
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip(got + g_got, want + g_want)):
        assert_close(a, b, tol, f"result {i}")


@pytest.mark.parametrize("cell", CELLS)
def test_module_lengths_equal_packed_nn(cell):
    torch.manual_seed(0)
    ours, theirs = module_pair(cell, 2, True, True, True, 0, torch.float64)
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 2, 5])
    out, state = ours(x, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_n, state_n = theirs(packed)
    out_n, _ = torch.nn.utils.rnn.pad_packed_sequence(out_n, batch_first=True, total_length=T)
    got, want = flat(out, state), flat(out_n, state_n)
    for a, b in zip(got + grads_of(got, [x, *ours.parameters()]),
                    want + grads_of(want, [x, *theirs.parameters()])):
        assert_close(a, b, 1e-10)


@pytest.mark.parametrize("cell", CELLS)
def test_module_truncate_equals_chunk_loop(cell):
    torch.manual_seed(1)
    ours, theirs = module_pair(cell, 2, True, False, False, 0, torch.float64)
    x = torch.randn(9, B, I, dtype=torch.float64, requires_grad=True)
    out, state = ours(x, truncate=4)
    got = flat(out, state)
    outs, st = [], None
    for t0 in range(0, 9, 4):
        o, st = theirs(x[t0:t0 + 4], st)
        outs.append(o)
        st = tuple(s.detach() for s in st) if isinstance(st, tuple) else st.detach()
    # the last chunk's state is the returned one (its gradient flows)
    want = [torch.cat(outs)]
    g_got = grads_of(got[:1], [x, *ours.parameters()])
    g_want = grads_of(want, [x, *theirs.parameters()])
    for a, b in zip(got[:1] + g_got, want + g_want):
        assert_close(a, b, 1e-10)


def test_lstm_state_dict_both_ways_and_checkpoint(tmp_path):
    theirs = nn.LSTM(4, 6, 2, proj_size=3, bidirectional=True)
    ours = rnnkern.LSTM(4, 6, 2, proj_size=3, bidirectional=True)
    ours.load_state_dict(theirs.state_dict())
    back = nn.LSTM(4, 6, 2, proj_size=3, bidirectional=True)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(ours(x)[0], back(x)[0], rtol=1e-5, atol=1e-6)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True
    assert torch.equal(loaded(x)[0], ours(x)[0])
    assert isinstance(copy.deepcopy(ours), rnnkern.LSTM)


@pytest.mark.parametrize("cell", CELLS)
def test_same_init_as_nn_from_the_same_seed(cell):
    torch.manual_seed(5)
    theirs = (nn.LSTM if cell == "lstm" else nn.GRU)(4, 6, 2)
    torch.manual_seed(5)
    ours = (rnnkern.LSTM if cell == "lstm" else rnnkern.GRU)(4, 6, 2)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("cell", CELLS)
def test_compile_fullgraph(cell):
    m = (rnnkern.LSTM if cell == "lstm" else rnnkern.GRU)(4, 6, 2, bidirectional=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for T_ in (5, 8):
        x = torch.randn(T_, 3, 4)
        got = flat(*compiled(x))
        want = flat(*m(x))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        g1 = torch.autograd.grad(got[0].sum(), list(m.parameters()))
        g2 = torch.autograd.grad(want[0].sum(), list(m.parameters()))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- bad input -----------------------------------------------------------------


def test_lstm_hx_errors_as_nn():
    ours, theirs = rnnkern.LSTM(4, 6), nn.LSTM(4, 6)
    x = torch.randn(5, 3, 4)
    bad_shape = (torch.zeros(1, 3, 6), torch.zeros(1, 2, 6))
    for m in (theirs, ours):
        with pytest.raises(RuntimeError):
            m(x, bad_shape)
        with pytest.raises(RuntimeError):
            m(x, (torch.zeros(3, 6), torch.zeros(3, 6)))  # 2-D states for 3-D input
    with pytest.raises(RuntimeError, match=r"hx\[1\] must have shape \(L\*D, B, \*\) = \(1, 3, 6\)"):
        ours(x, bad_shape)
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\) of two tensors"):
        ours(x, torch.zeros(1, 3, 6))
    with pytest.raises(TypeError, match=r"of length 1"):
        ours(x, (torch.zeros(1, 3, 6),))


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
def test_lstm_hx_structure_errors_catchable_as_nn(layers, bidirectional):
    """An hx that is not a pair: nn.LSTM raises IndexError or RuntimeError
    (which one depends on the case and on L*D); rnnkern's error, a TypeError
    that names hx, is also the exception nn raises in each case, so an
    `except` written for nn.LSTM catches it."""
    ours = rnnkern.LSTM(4, 6, layers, bidirectional=bidirectional)
    theirs = nn.LSTM(4, 6, layers, bidirectional=bidirectional)
    LD = layers * (2 if bidirectional else 1)
    x, h = torch.randn(5, 3, 4), torch.randn(LD, 3, 6)
    for hx in (h, (h,), (h, h, h), [h]):
        with pytest.raises(Exception) as nn_error:
            theirs(x, hx)
        assert type(nn_error.value) in (RuntimeError, IndexError)
        with pytest.raises(type(nn_error.value), match=r"hx must be a tuple \(h_0, c_0\)"):
            ours(x, hx)
        with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
            ours(x, hx)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(weight_ih=torch.randn(12, 4)), ValueError, r"weight_ih must have shape \(4H, I\) = \(24, 3\)"),
    (dict(hx=torch.zeros(2, 6)), TypeError, r"hx must be a tuple \(h_0, c_0\)"),
    (dict(reverse="no"), TypeError, r"reverse must be a bool"),
    (dict(lengths=torch.tensor([1, 9])), ValueError, r"lengths must be in \[0, T=5\], got min 1 and max 9"),
    (dict(truncate=0), ValueError, r"truncate must be an int >= 1 or None, got 0"),
])
def test_functional_lstm_refuses(kw, exc, match):
    args = dict(input=torch.randn(5, 2, 3), hx=None, weight_ih=torch.randn(24, 3),
                weight_hh=torch.randn(24, 6))
    args.update({k: v for k, v in kw.items() if k in args})
    opts = {k: v for k, v in kw.items() if k not in args}
    with pytest.raises(exc, match=match):
        functional.lstm(args["input"], args["hx"], args["weight_ih"], args["weight_hh"], **opts)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="rnn"), r"mode must be 'lstm' or 'gru', got 'rnn'"),
    (dict(c0=None), r"c0 \(B, H\) is required for mode='lstm'"),
    (dict(weight_hh=torch.randn(23, 6)), r"weight_hh must have 4H rows"),
    (dict(h0=torch.randn(3, 6)), r"h0 must have shape \(B, P\) = \(2, 6\), got \(3, 6\)"),
])
def test_op_refuses(kw, match):
    args = dict(input=torch.randn(5, 2, 3), h0=torch.randn(2, 6), c0=torch.randn(2, 6),
                weight_ih=torch.randn(24, 3), weight_hh=torch.randn(24, 6), bias_ih=None,
                bias_hh=None, weight_hr=None, lengths=None, mode="lstm", reverse=False)
    args.update(kw)
    with pytest.raises((ValueError, RuntimeError), match=match):
        torch.ops.rnnkern.layer_fwd(*args.values())


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [1, 3, 4, 5])
def test_few_rows_split_the_units_over_the_threads_with_the_same_bits(cell, B):
    """With B <= 4 and more than one thread the fused forward splits the unit
    blocks over the threads (a barrier per step) rather than the rows: against
    the float64 reference with lengths, reverse and truncation, and bitwise
    equal to one thread's run, which splits nothing (B = 5: the row split)."""
    T_, I_, H_ = 10, 6, 100  # enough work for two threads; 13 float64 unit blocks
    d = make_gated(cell, T_, B, I_, H_, seed=B)
    lengths = torch.tensor([T_, 0, 7, 3, 9][:B])
    old = torch.get_num_threads()
    try:
        res = []
        for n in (2, 1):
            torch.set_num_threads(n)
            for reverse in (False, True):
                res.append(compare(cell, d, 1e-10, lengths=lengths, reverse=reverse, truncate=4))
    finally:
        torch.set_num_threads(old)
    for two, one in zip(res[:2], res[2:]):
        for a, b in zip(two[0] + two[1], one[0] + one[1]):
            assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_wide_inference_splits_the_units_over_the_threads_with_the_same_bits(cell, dtype):
    """At H >= 512 the inference forward (nothing saved) splits the unit blocks
    over two threads, whatever B, and the step tiles prefetch the packed W_hh
    streamed from beyond L2. Its output, h_n and c_n equal bitwise the training
    forward's (the row split) and one thread's, and the float64 reference's."""
    T_, B_, I_, H_ = 30, 6, 5, 512  # T*B*G*H above the fused loop's grain for threads
    d = make_gated(cell, T_, B_, I_, H_, dtype=dtype, seed=5)
    x, wi, wh, bi, bh = (d[k].detach() for k in ("input", "weight_ih", "weight_hh", "bias_ih",
                                                 "bias_hh"))
    h0, c0 = ((d["hx"][0].detach(), d["hx"][1].detach()) if cell == "lstm"
              else (d["hx"].detach(), None))
    lens = torch.tensor([T_, 0, 17, 1, 29, 8])
    args = (x, h0, c0, wi, wh, bi, bh, None, lens, cell, False, 0)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        lean2, full2 = (torch.ops.rnnkern.layer_fwd(*args, train) for train in (False, True))
        torch.set_num_threads(1)
        lean1 = torch.ops.rnnkern.layer_fwd(*args, False)
    finally:
        torch.set_num_threads(old)
    n = 3 if cell == "lstm" else 2
    for k in range(n):
        assert torch.equal(lean2[k], full2[k]), f"result {k}: inference vs training forward"
        assert torch.equal(lean2[k], lean1[k]), f"result {k}: 2 threads vs 1"
    dbl = [t.double() if t is not None else None for t in (x, wi, wh, bi, bh)]
    hx = (h0.double(), c0.double()) if cell == "lstm" else h0.double()
    with torch.no_grad():
        if cell == "lstm":
            out, (h, c) = reference.lstm(dbl[0], hx, *dbl[1:], None, lengths=lens)
            want = [out, h, c]
        else:
            want = list(reference.gru(dbl[0], hx, *dbl[1:], lengths=lens))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for k in range(n):
        assert_close(lean2[k].double(), want[k], tol, f"result {k}")


@pytest.mark.parametrize("case", product(
    cell=CELLS, dtype=[torch.float32, torch.float64], B=[1, 5, 9], H=[7, 513],
    lengths=[False, True], reverse=[False, True]), ids=str)
def test_inference_forward_saves_nothing_and_gives_the_same_bits(case):
    """layer_fwd with train=False (what the modules and functional call when no
    backward can follow) writes no gates or cell on the fused path (H = 7: the
    step tile with nothing saved; H = 513: the BLAS loop) and returns them as
    [0], with output, h_n and c_n bitwise equal to train=True's; B = 9 takes the
    input projection into the tile, B = 1 and 5 do not; with lengths, padded
    steps are zero either way."""
    cell, dtype, B, H = case["cell"], case["dtype"], case["B"], case["H"]
    T, I = 6, 3
    d = make_gated(cell, T, B, I, H, dtype=dtype, seed=B + H)
    x, wi, wh, bi, bh = (d[k].detach() for k in ("input", "weight_ih", "weight_hh", "bias_ih",
                                                 "bias_hh"))
    h0, c0 = ((d["hx"][0].detach(), d["hx"][1].detach()) if cell == "lstm"
              else (d["hx"].detach(), None))
    lens = torch.tensor([T, 0, 4, 1, 5, 6, 2, 3, 6][:B]) if case["lengths"] else None
    args = (x, h0, c0, wi, wh, bi, bh, None, lens, cell, case["reverse"], 0)
    full = torch.ops.rnnkern.layer_fwd(*args, True)
    lean = torch.ops.rnnkern.layer_fwd(*args, False)
    assert full[3].shape == (T, B, 4 * H) and all(t.numel() == 0 for t in lean[3:])
    for a, b in zip(full[:3], lean[:3]):
        assert torch.equal(a, b)
    if not case["reverse"]:
        with torch.no_grad():
            got = run_module(cell, d, lens)
        assert torch.equal(got, full[0]), "module output under no_grad"


def run_module(cell, d, lengths):
    """The output of rnnkern's module with d's weights on d's input and hx."""
    I, H = d["input"].shape[2], d["weight_hh"].shape[1]
    m = getattr(rnnkern, cell.upper())(I, H).to(d["input"].dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(m, name + "_l0").copy_(d[name])
    hx = d["hx"]
    hx = tuple(h[None] for h in hx) if isinstance(hx, tuple) else hx[None]  # [L*D=1,B,*]
    return m(d["input"], hx, lengths=lengths)[0]


@pytest.mark.parametrize("cell", CELLS)
def test_train_false_is_overridden_when_autograd_records_the_call(cell):
    """A direct op call with train=False on inputs that require grad still
    saves what backward reads: the gradients equal train=True's."""
    d = make_gated(cell, 4, 3, 2, 7, seed=1)
    h0, c0 = d["hx"] if cell == "lstm" else (d["hx"], None)
    grads = []
    for train in (True, False):
        out = torch.ops.rnnkern.layer_fwd(d["input"], h0, c0, d["weight_ih"], d["weight_hh"],
                                          d["bias_ih"], d["bias_hh"], None, None, cell, False, 0,
                                          train)
        assert out[3].shape == (4, 3, 28)
        grads.append(torch.autograd.grad((out[0] * torch.arange(7.0, dtype=torch.float64)).sum(),
                                         [d["input"], d["weight_hh"]]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)

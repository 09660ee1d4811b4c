"""The CUDA backend (csrc/cuda/) against the CPU kernels and the reference.

Runs only where a GPU is present and rnnkern was built with its CUDA backend
(make cuda-build builds it on a GPU-less machine, where this whole module
skips). Each test draws fresh random inputs on the CPU, copies them to the GPU
and compares the CUDA result with the CPU kernel's and with the autograd
reference's: outputs and every gradient, over the CPU tests' axes (cells,
lengths with zeros, reverse, truncate, batch_first, bidirectional, layers,
proj_size, losses, reductions, masks, ignore_index, label smoothing, chunks),
at odd sizes (T=1, B=1, H=7). Then float64 gradcheck, bitwise determinism,
the current stream, and the fused loss's peak memory against nn + Linear +
F.cross_entropy.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkern
from helpers import TOL, assert_close, product
from rnnkern import _ops, functional, reference

OPS = ("elman_fwd", "elman_bwd", "elman_loss_fwd", "elman_loss_bwd", "layer_fwd", "layer_bwd",
       "head_loss_fwd", "head_loss_bwd")

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)
if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"rnnkern::{op}", "CUDA") for op in OPS):
    pytest.skip("rnnkern was built without its CUDA backend (RNNKERN_CUDA=1, see README.md)",
                allow_module_level=True)

DEV = torch.device("cuda")
# float64: the GPU's and the CPU's GEMMs round differently, nothing else
# differs. float32 (TF32 off, torch's default for matmul) against the float64
# reference, with the CPU float32 tests' bound at a realistic size.
TOL32 = 10 * TOL[torch.float32]
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru")


def fresh(t, device=None, dtype=None):
    """A new leaf with t's values on device (requires grad where t did)."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(fresh(v, device, dtype) for v in t)
    v = t.detach().to(device=device or t.device, dtype=dtype or t.dtype).clone()
    return v.requires_grad_(t.requires_grad)


def flat_leaves(d):
    out = []
    for k in sorted(d):
        v = d[k]
        out += list(v) if isinstance(v, tuple) else [v]
    return [v for v in out if v is not None]


def with_leaves(d, ts):
    """d with its leaves, in flat_leaves' order, replaced by ts (all of them)."""
    dd, it = dict(d), iter(ts)
    for k in sorted(d):
        if isinstance(d[k], tuple):
            dd[k] = tuple(next(it) for _ in d[k])
        elif d[k] is not None:
            dd[k] = next(it)
    assert next(it, None) is None, "more tensors than leaves"
    return dd


def make_cell(cell, T, B, I, H, *, dtype=torch.float64, bias=True, hx=True, batch_first=False,
              seed=None):
    """Fresh random inputs of one layer of `cell` on the CPU, all requiring grad."""
    g = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator().manual_seed(
        torch.randint(0, 2**31, ()).item())
    base = cell.split("_")[0]
    P = max(1, H // 2) if cell == "lstm_proj" else H
    G = {"rnn": 1, "lstm": 4, "gru": 3}[base] * H

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, dtype=dtype, generator=g) * s).requires_grad_()

    k = 1.0 / H**0.5
    d = dict(input=rnd(*((B, T, I) if batch_first else (T, B, I))), weight_ih=rnd(G, I, s=k),
             weight_hh=rnd(G, P, s=k), bias_ih=rnd(G, s=k) if bias else None,
             bias_hh=rnd(G, s=k) if bias else None,
             weight_hr=rnd(P, H, s=k) if cell == "lstm_proj" else None)
    if not hx:
        d["hx"] = None
    elif base == "lstm":
        d["hx"] = (rnd(B, P), rnd(B, H))
    else:
        d["hx"] = rnd(B, H)
    return d


def run_cell(impl, cell, d, upstream_seed=0, **kw):
    """One layer through impl: outputs, and the gradients of every leaf for a
    fixed random functional of the outputs."""
    args = (d["input"], d["hx"], d["weight_ih"], d["weight_hh"], d["bias_ih"], d["bias_hh"])
    if cell.startswith("rnn"):
        out, h = impl.rnn(*args, nonlinearity=cell[4:], **kw)
        outs = [out, h]
    elif cell.startswith("lstm"):
        out, (h, c) = impl.lstm(*args, d["weight_hr"], **kw)
        outs = [out, h, c]
    else:
        out, h = impl.gru(*args, **kw)
        outs = [out, h]
    g = torch.Generator().manual_seed(upstream_seed)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]
    leaves = flat_leaves(d)
    grads = torch.autograd.grad(outs, leaves, ups)
    return [o.detach() for o in outs] + list(grads)


def assert_all_close(got, want, tol, what=""):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        assert_close(a.detach().cpu().to(b.dtype), b.detach(), tol, f"{what} #{i}")


def three_ways(cell, d, **kw):
    """(CUDA kernel, CPU kernel, reference) for one layer; lengths stay a CPU tensor."""
    cuda = run_cell(functional, cell, fresh_dict(d, DEV), **kw)
    cpu = run_cell(functional, cell, fresh_dict(d), **kw)
    ref = run_cell(reference, cell, fresh_dict(d), **kw)
    return cuda, cpu, ref


def fresh_dict(d, device=None, dtype=None):
    return {k: fresh(v, device, dtype) for k, v in d.items()}


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", product(
    cell=CELLS, TBIH=[(1, 1, 1, 7), (6, 3, 4, 7), (9, 5, 3, 19)], lengths=[False, True],
    reverse=[False, True], truncate=[None, 2]), ids=str)
def test_layer_matches_cpu_and_reference(case):
    T, B, I, H = case["TBIH"]
    d = make_cell(case["cell"], T, B, I, H)
    lengths = None
    if case["lengths"]:
        lengths = torch.randint(0, T + 1, (B,))
        lengths[0] = 0 if B > 1 else lengths[0]  # a sequence with no step at all
    cuda, cpu, ref = three_ways(case["cell"], d, lengths=lengths, reverse=case["reverse"],
                                truncate=case["truncate"])
    assert_all_close(cuda, cpu, TOL[torch.float64], "vs CPU kernel")
    assert_all_close(cuda, ref, TOL[torch.float64], "vs reference")


@pytest.mark.parametrize("case", product(cell=CELLS, bias=[True, False], hx=[True, False],
                                         batch_first=[False, True]), ids=str)
def test_layer_options(case):
    d = make_cell(case["cell"], 5, 3, 4, 6, bias=case["bias"], hx=case["hx"],
                  batch_first=case["batch_first"])
    cuda, cpu, ref = three_ways(case["cell"], d, batch_first=case["batch_first"],
                                lengths=torch.tensor([5, 0, 2]), truncate=3)
    assert_all_close(cuda, cpu, TOL[torch.float64], "vs CPU kernel")
    assert_all_close(cuda, ref, TOL[torch.float64], "vs reference")


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "lstm_proj", "gru"])
def test_layer_float32_at_a_realistic_size(cell):
    d64 = make_cell(cell, 40, 16, 32, 64)
    lengths = torch.randint(1, 41, (16,))
    got = run_cell(functional, cell, fresh_dict(d64, DEV, torch.float32), lengths=lengths,
                   truncate=7)
    want = run_cell(reference, cell, fresh_dict(d64), lengths=lengths, truncate=7)
    assert_all_close(got, want, TOL32, "float32 CUDA vs float64 reference")


@pytest.mark.parametrize("case", product(cell=["rnn_tanh", "rnn_relu", "lstm", "gru"],
                                         TBIH=[(5, 301, 3, 9), (4, 3, 5, 200)],
                                         reverse=[False, True]), ids=str)
def test_persistent_and_per_step_loops_match_the_reference(case):
    """Small layers run each loop as one persistent kernel (W_hh in a block's
    shared memory): H = 9, where B = 301 puts several sequences in each block
    on any GPU of up to 300 multiprocessors, the last block partly empty.
    float64 H = 200 fits no block (320 KB and more) and runs the per-step loop
    of cuBLAS GEMMs and pointwise kernels. Both against the CPU kernel and the
    reference, with lengths (zeros among them), reverse and truncation."""
    T, B, I, H = case["TBIH"]
    d = make_cell(case["cell"], T, B, I, H)
    lengths = torch.randint(0, T + 1, (B,))
    lengths[0] = 0
    lengths[-1] = T
    cuda, cpu, ref = three_ways(case["cell"], d, lengths=lengths, reverse=case["reverse"],
                                truncate=2)
    assert_all_close(cuda, cpu, TOL[torch.float64], "vs CPU kernel")
    assert_all_close(cuda, ref, TOL[torch.float64], "vs reference")


def test_lengths_on_the_device_or_the_cpu_give_the_same_bits():
    """The ops take lengths on the CPU (as the Python API passes them) or on the
    input's device; either way the kernels read the same lengths (from CPU
    lengths the loops skip the steps past the longest sequence, from device
    lengths they run them as all-padding steps: the same bits)."""
    T, B, I, H = 7, 4, 3, 5
    x = torch.randn(T, B, I, dtype=torch.float64, device=DEV)
    h0 = torch.randn(B, H, dtype=torch.float64, device=DEV)
    w_ih = torch.randn(H, I, dtype=torch.float64, device=DEV)
    w_hh = torch.randn(H, H, dtype=torch.float64, device=DEV) / H**0.5
    lengths = torch.tensor([6, 0, 3, 5])  # max < T: the CPU copy lets the loops stop early
    for reverse in (False, True):
        a = _ops.elman_fwd(x, h0, w_ih, w_hh, None, None, lengths, "tanh", reverse)
        b = _ops.elman_fwd(x, h0, w_ih, w_hh, None, None, lengths.to(DEV), "tanh", reverse)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
        g = torch.randn(T, B, H, dtype=torch.float64, device=DEV)
        gh = torch.randn(B, H, dtype=torch.float64, device=DEV)
        ga = _ops.elman_bwd(g, gh, x, h0, w_ih, w_hh, a[0], lengths, "tanh", reverse, 2)
        gb = _ops.elman_bwd(g, gh, x, h0, w_ih, w_hh, a[0], lengths.to(DEV), "tanh", reverse, 2)
        for u, v in zip(ga, gb):
            assert torch.equal(u, v)


@pytest.mark.parametrize("case", product(cell=CELLS, value=["nan", "inf"],
                                         reverse=[False, True],
                                         lengths_on=["cpu", "cuda"]), ids=str)
def test_padding_holds_anything_with_lengths(case):
    """NaN or Inf in the padded input (t >= len_b) changes no output and no
    gradient on the GPU either: the backward zeroes those rows before
    weight_ih's product over all T*B rows (0 * NaN would be NaN)."""
    cell, T, B = case["cell"], 6, 4
    d = make_cell(cell, T, B, 5, 7, seed=11)
    lengths = torch.tensor([6, 0, 3, 1])
    kw = dict(lengths=lengths.to(DEV) if case["lengths_on"] == "cuda" else lengths,
              reverse=case["reverse"])
    clean = run_cell(functional, cell, fresh_dict(d, DEV), **kw)
    valid = (torch.arange(T)[:, None] < lengths[None, :])[..., None]
    d["input"] = torch.where(valid, d["input"].detach(), float(case["value"])).requires_grad_()
    dirty = run_cell(functional, cell, fresh_dict(d, DEV), **kw)
    for i, (a, b) in enumerate(zip(clean, dirty)):
        assert bool(b.isfinite().all()), f"result {i}: not finite"
        assert torch.equal(a, b), f"result {i}"


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------

MODULES = {"RNN": (rnnkern.RNN, {}), "RNN_relu": (rnnkern.RNN, {"nonlinearity": "relu"}),
           "LSTM": (rnnkern.LSTM, {}), "LSTM_proj": (rnnkern.LSTM, {"proj_size": 3}),
           "GRU": (rnnkern.GRU, {})}


def module_grads(m, x, upstream_seed=0, **kw):
    out, state = m(x, **kw)
    outs = [out] + (list(state) if isinstance(state, tuple) else [state])
    g = torch.Generator().manual_seed(upstream_seed)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]
    params = list(m.parameters())
    grads = torch.autograd.grad(outs, [x] + params, ups)
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("case", product(module=list(MODULES), layers=[1, 2],
                                         bidirectional=[False, True], batch_first=[False, True],
                                         lengths=[False, True]), ids=str)
def test_module_cuda_matches_cpu(case):
    cls, extra = MODULES[case["module"]]
    m = cls(4, 7, num_layers=case["layers"], bidirectional=case["bidirectional"],
            batch_first=case["batch_first"], dtype=torch.float64, **extra)
    T, B = 6, 3
    x = torch.randn(*((B, T, 4) if case["batch_first"] else (T, B, 4)), dtype=torch.float64,
                    requires_grad=True)
    kw = dict(lengths=torch.tensor([6, 1, 4]), truncate=4) if case["lengths"] else {}
    want = module_grads(m, x, **kw)
    got = module_grads(m.to(DEV), fresh(x, DEV), **kw)  # .to('cuda') moves the parameters
    assert all(p.is_cuda for p in m.parameters())
    assert_all_close(got, want, TOL[torch.float64], case["module"])


@pytest.mark.parametrize("module", list(MODULES))
def test_module_packed_sequence_on_cuda(module):
    cls, extra = MODULES[module]
    m = cls(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 5, 1])
    want_out, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    m.cuda()
    got_out, _ = m(pack_padded_sequence(x.to(DEV), lengths, enforce_sorted=False))
    assert got_out.data.is_cuda
    assert_close(got_out.data.cpu(), want_out.data, TOL[torch.float64], module)


# ---------------------------------------------------------------------------
# The per-step loss
# ---------------------------------------------------------------------------


def make_loss(mode, T, B, I, H, O, *, loss, dtype=torch.float64, seed=None):
    cell = {"rnn_tanh": "rnn_tanh", "rnn_relu": "rnn_relu", "lstm": "lstm", "gru": "gru"}[mode]
    d = make_cell(cell, T, B, I, H, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    d["weight_out"] = (torch.randn(O, H, dtype=dtype, generator=g) * 3 / H**0.5).requires_grad_()
    d["bias_out"] = (torch.randn(O, dtype=dtype, generator=g) * 0.1).requires_grad_()
    if loss == "cross_entropy":
        target = torch.randint(0, O, (T, B), generator=g)
    else:
        target = torch.randn(T, B, O, dtype=dtype, generator=g)
    return d, target


def run_rnn_loss(impl, mode, d, target, device=None, upstream_seed=0, **kw):
    d = fresh_dict(d, device)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) and k == "loss_mask" and device else v)
          for k, v in kw.items()}
    r = impl.rnn_loss(d["input"], target.to(device) if device else target, d["hx"],
                      d["weight_ih"], d["weight_hh"], d["bias_ih"], d["bias_hh"], d["weight_out"],
                      d["bias_out"], mode=mode, return_details=True, **kw)
    value = r.loss
    if value.dim() > 0:
        g = torch.Generator().manual_seed(upstream_seed)
        value = (value * torch.randn(value.shape, generator=g, dtype=torch.float64).to(value)).sum()
    leaves = flat_leaves(d)
    grads = torch.autograd.grad(value, leaves)
    state = r.h_n if isinstance(r.h_n, tuple) else (r.h_n,)
    return [r.loss.detach(), *(s.detach() for s in state), r.step_loss, r.grad_norm, *grads]


@pytest.mark.parametrize("case", product(
    mode=["rnn_tanh", "lstm", "gru"], loss=["cross_entropy", "mse"],
    reduction=["mean", "sum", "seq_mean", "seq_sum", "none"], chunk=[0, 5]), ids=str)
def test_rnn_loss_matches_cpu_and_reference(case):
    T, B, I, H, O = 7, 4, 3, 7, 11
    d, target = make_loss(case["mode"], T, B, I, H, O, loss=case["loss"])
    mask = torch.rand(T, B) * 2
    mask.view(-1)[1::5] = 0
    kw = dict(loss=case["loss"], reduction=case["reduction"], lengths=torch.tensor([7, 1, 0, 4]),
              loss_mask=mask.double(), truncate=3, _chunk_rows=case["chunk"])
    cuda = run_rnn_loss(functional, case["mode"], d, target, DEV, **kw)
    cpu = run_rnn_loss(functional, case["mode"], d, target, **kw)
    kw.pop("_chunk_rows")
    ref = run_rnn_loss(reference, case["mode"], d, target, **kw)
    assert_all_close(cuda, cpu, TOL[torch.float64], "vs CPU kernel")
    assert_all_close(cuda, ref, TOL[torch.float64], "vs reference")


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_rnn_loss_padding_and_weight_zero_targets_hold_anything(mode):
    """NaN in the padded input and in the MSE target of every row of weight 0
    (padding, masked) changes no result on the GPU: as on the CPU, those rows
    are never read."""
    T, B, I, H, O = 7, 4, 3, 7, 11
    d, target = make_loss(mode, T, B, I, H, O, loss="mse", seed=2)
    lengths = torch.tensor([7, 1, 0, 4])
    mask = torch.rand(T, B, generator=torch.Generator().manual_seed(2)) > 0.3
    kw = dict(loss="mse", reduction="mean", lengths=lengths, loss_mask=mask)
    clean = run_rnn_loss(functional, mode, d, target, DEV, **kw)
    valid = torch.arange(T)[:, None] < lengths[None, :]
    d["input"] = torch.where(valid[..., None], d["input"].detach(), float("nan")).requires_grad_()
    target = torch.where((valid & mask)[..., None], target, float("nan"))
    dirty = run_rnn_loss(functional, mode, d, target, DEV, **kw)
    for i, (a, b) in enumerate(zip(clean, dirty)):
        assert bool(b.isfinite().all()), f"result {i}: not finite"
        assert torch.equal(a, b), f"result {i}"


@pytest.mark.parametrize("case", product(
    mode=["rnn_relu", "lstm", "gru"], steps=["all", "last"], ignore=[False, True],
    smoothing=[0.0, 0.2], batch_first=[False, True]), ids=str)
def test_rnn_loss_cross_entropy_options(case):
    T, B, I, H, O = 6, 3, 4, 5, 9
    d, target = make_loss(case["mode"], T, B, I, H, O, loss="cross_entropy")
    ignore_index = -100
    if case["ignore"]:
        ignore_index = 1
        target.view(-1)[::4] = ignore_index
    if case["batch_first"]:
        d["input"] = d["input"].detach().transpose(0, 1).contiguous().requires_grad_()
        target = target.t().contiguous()
    kw = dict(loss="cross_entropy", steps=case["steps"], ignore_index=ignore_index,
              label_smoothing=case["smoothing"], lengths=torch.tensor([6, 2, 3]),
              batch_first=case["batch_first"])
    cuda = run_rnn_loss(functional, case["mode"], d, target, DEV, **kw)
    cpu = run_rnn_loss(functional, case["mode"], d, target, **kw)
    ref = run_rnn_loss(reference, case["mode"], d, target, **kw)
    assert_all_close(cuda, cpu, TOL[torch.float64], "vs CPU kernel")
    assert_all_close(cuda, ref, TOL[torch.float64], "vs reference")


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_rnn_loss_float32_at_a_realistic_size(mode):
    d, target = make_loss(mode, 50, 16, 32, 64, 1000, loss="cross_entropy")
    kw = dict(loss="cross_entropy", lengths=torch.randint(1, 51, (16,)), truncate=10)
    got = run_rnn_loss(functional, mode, fresh_dict(d, dtype=torch.float32), target, DEV, **kw)
    want = run_rnn_loss(reference, mode, d, target, **kw)
    assert_all_close(got, want, TOL32, "float32 CUDA vs float64 reference")


def test_all_masked_batch_is_zero_on_cuda():
    d, target = make_loss("rnn_tanh", 4, 2, 3, 5, 6, loss="cross_entropy")
    got = run_rnn_loss(functional, "rnn_tanh", d, target, DEV, loss_mask=torch.zeros(4, 2))
    assert got[0].item() == 0.0
    assert all(torch.isfinite(t).all() for t in got[4:])


@pytest.mark.parametrize("case", product(mode=["rnn_tanh", "lstm", "gru"],
                                         loss=["cross_entropy", "mse"]), ids=str)
def test_rnnloss_module_cuda_matches_cpu(case):
    rnn = {"rnn_tanh": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[case["mode"]](
        4, 6, dtype=torch.float64)
    head = nn.Linear(6, 5, dtype=torch.float64)
    crit = rnnkern.RNNLoss(rnn, head, loss=case["loss"], reduction="seq_mean")
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    target = torch.randint(0, 5, (5, 3)) if case["loss"] == "cross_entropy" else \
        torch.randn(5, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])

    def grads(device):
        crit.to(device)
        value = crit(x.to(device), target.to(device), lengths=lengths, truncate=2)
        return [value.detach()] + list(torch.autograd.grad(value, list(crit.parameters())))

    want = grads("cpu")
    got = grads(DEV)
    assert_all_close(got, want, TOL[torch.float64], case["mode"])


@pytest.mark.parametrize("case", product(
    loss=["cross_entropy", "mse"], reduction=["mean", "seq_sum", "none"],
    compute_grad=[True, False]), ids=str)
def test_head_and_elman_loss_ops_match_cpu(case):
    """The four loss ops called directly, both sweeps of the backward: the
    forward's gradients scaled (compute_grad), or the sweep again."""
    T, B, H, O = 5, 3, 6, 8
    h = torch.randn(T, B, H, dtype=torch.float64)
    w_out = torch.randn(O, H, dtype=torch.float64)
    b_out = torch.randn(O, dtype=torch.float64)
    target = torch.randint(0, O, (T, B)) if case["loss"] == "cross_entropy" else \
        torch.randn(T, B, O, dtype=torch.float64)
    lengths = torch.tensor([5, 0, 3])
    scalar = case["reduction"] != "none"
    grad_loss = torch.tensor(0.7, dtype=torch.float64) if scalar else \
        torch.randn(T, B, dtype=torch.float64)
    x = torch.randn(T, B, 4, dtype=torch.float64)
    hx = torch.randn(B, H, dtype=torch.float64)
    w_ih = torch.randn(H, 4, dtype=torch.float64)
    w_hh = torch.randn(H, H, dtype=torch.float64) / H**0.5
    grad_h_n = torch.randn(B, H, dtype=torch.float64)

    def run(dev):
        to = (lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t)
        fwd = _ops.head_loss_fwd(to(h), to(target), to(w_out), to(b_out), lengths, None,
                                 case["loss"], "all", case["reduction"], -100, 0.0,
                                 case["compute_grad"], 2)
        bwd = _ops.head_loss_bwd(to(grad_loss), to(h), to(target), to(w_out), to(b_out), lengths,
                                 fwd[2], fwd[3], fwd[4], fwd[5], case["loss"], case["reduction"],
                                 -100, 0.0, 2)
        efwd = _ops.elman_loss_fwd(to(x), to(target), to(hx), to(w_ih), to(w_hh), None, None,
                                   to(w_out), to(b_out), lengths, None, "tanh", case["loss"], "all",
                                   case["reduction"], -100, 0.0, case["compute_grad"], 2)
        ebwd = _ops.elman_loss_bwd(to(grad_loss), to(grad_h_n), to(x), to(target), to(hx),
                                   to(w_ih), to(w_hh), to(w_out), to(b_out), lengths, efwd[1],
                                   efwd[4], efwd[5], efwd[6], efwd[7], "tanh", case["loss"],
                                   case["reduction"], -100, 0.0, 0, True, 2)
        return [*fwd, *bwd, *efwd, *ebwd]

    got, want = run(DEV), run("cpu")
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        assert_close(a.cpu(), b, TOL[torch.float64], f"output {i}")


# ---------------------------------------------------------------------------
# gradcheck, determinism, streams, dtypes, memory
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", product(cell=CELLS, reverse=[False, True]), ids=str)
def test_gradcheck_layer(case):
    d = fresh_dict(make_cell(case["cell"], 4, 3, 2, 3, seed=5), DEV)
    lengths = torch.tensor([4, 0, 2])
    leaves = flat_leaves(d)

    def f(*ts):
        dd = with_leaves(d, ts)
        args = (dd["input"], dd["hx"], dd["weight_ih"], dd["weight_hh"], dd["bias_ih"],
                dd["bias_hh"])
        cell = case["cell"]
        if cell.startswith("rnn"):
            out, h = functional.rnn(*args, nonlinearity=cell[4:], lengths=lengths,
                                    reverse=case["reverse"])
            return out, h
        if cell.startswith("lstm"):
            out, (h, c) = functional.lstm(*args, dd["weight_hr"], lengths=lengths,
                                          reverse=case["reverse"])
            return out, h, c
        return functional.gru(*args, lengths=lengths, reverse=case["reverse"])

    assert torch.autograd.gradcheck(f, tuple(leaves))


@pytest.mark.parametrize("case", product(mode=["rnn_tanh", "lstm", "gru"],
                                         loss=["cross_entropy", "mse"]), ids=str)
def test_gradcheck_rnn_loss(case):
    d, target = make_loss(case["mode"], 4, 3, 2, 3, 5, loss=case["loss"], seed=2)
    d = fresh_dict(d, DEV)
    target = target.to(DEV)
    leaves = flat_leaves(d)

    def f(*ts):
        dd = with_leaves(d, ts)
        return functional.rnn_loss(dd["input"], target, dd["hx"], dd["weight_ih"],
                                   dd["weight_hh"], dd["bias_ih"], dd["bias_hh"],
                                   dd["weight_out"], dd["bias_out"], loss=case["loss"],
                                   mode=case["mode"], lengths=torch.tensor([4, 1, 3]),
                                   reduction="seq_mean", _chunk_rows=2)

    assert torch.autograd.gradcheck(f, tuple(leaves))


@pytest.mark.parametrize("cell", CELLS)
def test_layer_bitwise_deterministic(cell):
    d = make_cell(cell, 30, 8, 16, 33, dtype=torch.float32)
    kw = dict(lengths=torch.randint(0, 31, (8,)), truncate=7, reverse=True)
    a = run_cell(functional, cell, fresh_dict(d, DEV), **kw)
    b = run_cell(functional, cell, fresh_dict(d, DEV), **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_rnn_loss_bitwise_deterministic(mode):
    d, target = make_loss(mode, 40, 16, 8, 32, 3000, loss="cross_entropy", dtype=torch.float32)
    kw = dict(lengths=torch.randint(1, 41, (16,)), reduction="seq_mean", truncate=9,
              _chunk_rows=97)
    a = run_rnn_loss(functional, mode, d, target, DEV, **kw)
    b = run_rnn_loss(functional, mode, d, target, DEV, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_runs_on_the_current_stream():
    """A side stream gives the default stream's bits: every kernel and GEMM
    follows torch's current stream, with no hidden ordering on another."""
    d, target = make_loss("lstm", 20, 8, 5, 16, 50, loss="cross_entropy", dtype=torch.float32)
    kw = dict(lengths=torch.randint(1, 21, (8,)), truncate=4, _chunk_rows=33)
    want = run_rnn_loss(functional, "lstm", d, target, DEV, **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run_rnn_loss(functional, "lstm", d, target, DEV, **kw)
    side.synchronize()
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    d = make_cell("gru", 6, 3, 4, 5)
    want = run_cell(functional, "gru", fresh_dict(d), lengths=torch.tensor([6, 0, 2]))
    got = run_cell(functional, "gru", fresh_dict(d, torch.device("cuda:1")),
                   lengths=torch.tensor([6, 0, 2]))
    assert all(t.device == torch.device("cuda:1") for t in got)
    assert_all_close(got, want, TOL[torch.float64], "cuda:1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_in_float32_and_the_op_refuses_it(dtype):
    x = torch.randn(4, 2, 3, device=DEV, dtype=dtype)
    w_ih = torch.randn(5, 3, device=DEV, dtype=dtype)
    w_hh = torch.randn(5, 5, device=DEV, dtype=dtype)
    out, h = functional.rnn(x, None, w_ih, w_hh)
    want, want_h = functional.rnn(x.float(), None, w_ih.float(), w_hh.float())
    assert out.dtype == h.dtype == dtype
    assert torch.equal(out, want.to(dtype)) and torch.equal(h, want_h.to(dtype))
    with pytest.raises(TypeError, match=r"rnnkern.elman_fwd: input must be float32 or float64"):
        _ops.elman_fwd(x, torch.zeros(2, 5, device=DEV, dtype=dtype), w_ih, w_hh, None, None,
                       None, "tanh", False)


def test_device_mismatch_is_a_clear_error():
    x = torch.randn(4, 2, 3, device=DEV)
    with pytest.raises(RuntimeError, match="hx must be on the input's device cuda"):
        functional.rnn(x, torch.zeros(2, 5), torch.randn(5, 3, device=DEV),
                       torch.randn(5, 5, device=DEV))
    with pytest.raises(RuntimeError, match="weight_hh must be on the input's device cuda"):
        _ops.elman_fwd(x, torch.zeros(2, 5, device=DEV), torch.randn(5, 3, device=DEV),
                       torch.randn(5, 5), None, None, None, "tanh", False)


def _peak_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_fused_loss_peak_memory_at_least_5x_below_nn():
    """B=32, T=256, I=H=256, O=8192, cross-entropy at every step, forward and
    backward: the fused head never holds the [T,B,O] logits (nor their
    softmax or gradient), nn.RNN + Linear + F.cross_entropy holds several."""
    B, T, I, H, O = 32, 256, 256, 256, 8192
    torch.manual_seed(0)
    rnn = nn.RNN(I, H, device=DEV)
    head = nn.Linear(H, O, device=DEV)
    x = torch.randn(T, B, I, device=DEV)
    target = torch.randint(0, O, (T, B), device=DEV)

    def nn_step():
        out, _ = rnn(x)
        F.cross_entropy(head(out).view(T * B, O), target.view(-1)).backward()

    def fused_step():
        functional.rnn_loss(x, target, None, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0,
                            rnn.bias_hh_l0, head.weight, head.bias).backward()

    for step in (nn_step, fused_step):  # warm-up: cuBLAS/cuDNN workspaces, allocator
        step()
    theirs, ours = _peak_bytes(nn_step), _peak_bytes(fused_step)
    assert ours * 5 <= theirs, f"fused peak {ours / 2**20:.1f} MiB, nn {theirs / 2**20:.1f} MiB"
    for p in itertools.chain(rnn.parameters(), head.parameters()):
        p.grad = None


# ---------------------------------------------------------------------------
# DistributedDataParallel on CUDA tensors
# ---------------------------------------------------------------------------


def _ddp_worker(rank, world, backend, port, path, cell):
    import datetime
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import test_ddp

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # NCCL takes one GPU per rank; gloo runs its ranks on one GPU too.
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        model = DistributedDataParallel(test_ddp.make_model(cell).to(device))
        half = test_ddp.B_HALF * test_ddp.WORLD // world
        test_ddp.train_on(model, slice(rank * half, (rank + 1) * half), device)
        torch.save({k: v.cpu() for k, v in model.module.state_dict().items()}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()
    test_ddp.exit_rank()  # see there: gloo's teardown can abort a finished rank


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_ddp_on_cuda_equals_one_process_on_the_whole_batch(tmp_path, backend, cell):
    """DDP over rnnkern modules on CUDA tensors: NCCL with one rank per GPU (a
    single rank on a one-GPU machine), gloo with two ranks on the GPU(s). The
    parameters after training equal one CPU process's on the whole batches."""
    import torch.multiprocessing as mp

    import test_ddp

    world = min(2, torch.cuda.device_count()) if backend == "nccl" else 2
    path = str(tmp_path / "state")
    mp.spawn(_ddp_worker, args=(world, backend, test_ddp.free_port(), path, cell), nprocs=world,
             join=True)
    single = test_ddp.make_model(cell)
    initial = {n: p.detach().clone() for n, p in single.named_parameters()}
    test_ddp.train(single, slice(None))
    for rank in range(world):
        state = torch.load(f"{path}.{rank}")
        for name, p in single.named_parameters():
            assert test_ddp.rel_change(p, initial[name]) > 1e-3, f"{name} did not train"
            assert_close(state[name], p.detach(), TOL[torch.float64], f"rank {rank} {name}")

"""The per-step loss on the LSTM and the GRU: rnn_loss(mode='lstm'|'gru') is
the layer op and the cell-independent head op (head_loss_fwd/bwd); it must
equal reference.rnn_loss in every output, detail and gradient; RNNLoss takes
nn.LSTM / nn.GRU and rnnkern's drop-ins; gradcheck and opcheck of the head."""

import pytest
import torch
from torch import nn

import rnnkern
from helpers import assert_close, product
from rnnkern import RNNLoss, functional, reference

T, B, I, H, O = 6, 4, 3, 5, 7


def problem(mode, *, proj=False, loss="cross_entropy", seed=0, dtype=torch.float64,
            batch_first=False):
    g = torch.Generator().manual_seed(seed)
    P = 3 if proj else H
    G = (4 if mode == "lstm" else 3) * H

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * s).requires_grad_()

    t = dict(input=rnd(*((B, T, I) if batch_first else (T, B, I))), weight_ih=rnd(G, I, s=0.4),
             weight_hh=rnd(G, P, s=0.4), bias_ih=rnd(G, s=0.3), bias_hh=rnd(G, s=0.3),
             weight_out=rnd(O, P, s=0.5), bias_out=rnd(O, s=0.1),
             weight_hr=rnd(P, H, s=0.4) if proj else None)
    hx = (rnd(B, P), rnd(B, H)) if mode == "lstm" else rnd(B, H)
    steps = (B, T) if batch_first else (T, B)
    target = (torch.randint(0, O, steps, generator=g) if loss == "cross_entropy"
              else torch.randn(*steps, O, generator=g, dtype=dtype))
    return t, hx, target


def leaves(t, hx):
    return [v for v in t.values() if v is not None] + (list(hx) if isinstance(hx, tuple) else [hx])


def run(impl, mode, t, hx, target, **kw):
    d = impl.rnn_loss(t["input"], target, hx, t["weight_ih"], t["weight_hh"], t["bias_ih"],
                      t["bias_hh"], t["weight_out"], t["bias_out"], mode=mode,
                      weight_hr=t["weight_hr"], return_details=True, **kw)
    value = d.loss
    up = torch.randn(value.shape, generator=torch.Generator().manual_seed(1), dtype=value.dtype)
    hn = d.h_n if isinstance(d.h_n, tuple) else (d.h_n,)
    objective = (value * up).sum() + sum(h.sum() for h in hn)
    grads = torch.autograd.grad(objective, leaves(t, hx))
    return [value.detach(), *[h.detach() for h in hn], d.step_loss, d.grad_norm, *grads]


CASES = (product(mode=["lstm"], proj=[False, True], loss=["cross_entropy", "mse"],
                 reduction=["mean", "sum", "seq_mean", "seq_sum", "none"],
                 lengths=[False, True], truncate=[None, 2])
         + product(mode=["gru"], proj=[False], loss=["cross_entropy", "mse"],
                   reduction=["mean", "sum", "seq_mean", "seq_sum", "none"],
                   lengths=[False, True], truncate=[None, 2]))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gated_rnn_loss_equals_reference(case):
    t, hx, target = problem(case["mode"], proj=case["proj"], loss=case["loss"])
    lengths = torch.tensor([6, 0, 3, 5]) if case["lengths"] else None
    mask = torch.rand(T, B, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = dict(loss=case["loss"], reduction=case["reduction"], lengths=lengths, loss_mask=mask,
              truncate=case["truncate"])
    if case["loss"] == "cross_entropy":
        kw.update(label_smoothing=0.1, ignore_index=2)
    got = run(functional, case["mode"], t, hx, target, **kw)
    want = run(reference, case["mode"], t, hx, target, **kw)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-10, f"result {i}")


@pytest.mark.parametrize("case", product(mode=["lstm", "gru"], steps=["all", "last"],
                                         batch_first=[False, True], chunk=[0, 3]), ids=str)
def test_gated_rnn_loss_steps_layout_chunks(case):
    t, hx, target = problem(case["mode"], batch_first=case["batch_first"], seed=4)
    kw = dict(steps=case["steps"], batch_first=case["batch_first"], lengths=[6, 1, 3, 5])
    got = run(functional, case["mode"], t, hx, target, _chunk_rows=case["chunk"], **kw)
    want = run(reference, case["mode"], t, hx, target, **kw)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-10, f"result {i}")


@pytest.mark.parametrize("case", product(cls=["nn.LSTM", "rnnkern.LSTM"], proj=[False, True])
                         + product(cls=["nn.GRU", "rnnkern.GRU"], proj=[False]), ids=str)
def test_rnnloss_module_takes_lstm_and_gru(case):
    torch.manual_seed(0)
    cls = {"nn.LSTM": nn.LSTM, "nn.GRU": nn.GRU, "rnnkern.LSTM": rnnkern.LSTM,
           "rnnkern.GRU": rnnkern.GRU}[case["cls"]]
    kw = dict(proj_size=3) if case["proj"] else {}
    rnn = cls(I, H, batch_first=True, dtype=torch.float64, **kw)
    P = 3 if case["proj"] else H
    head = nn.Linear(P, O, dtype=torch.float64)
    model = RNNLoss(rnn, head, reduction="seq_mean", label_smoothing=0.1)
    x = torch.randn(B, T, I, dtype=torch.float64)
    target = torch.randint(0, O, (B, T))
    lengths = torch.tensor([6, 2, 4, 1])
    value = model(x, target, lengths=lengths)
    got = torch.autograd.grad(value, list(model.parameters()))
    # the same model written out with torch.nn: packed layer, head, masked CE
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
    step = nn.functional.cross_entropy(head(out).reshape(-1, O), target.reshape(-1),
                                       reduction="none", label_smoothing=0.1).view(B, T)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    want_value = ((step * mask).sum(1) / mask.sum(1)).mean()
    want = torch.autograd.grad(want_value, list(model.parameters()))
    assert_close(value.detach(), want_value.detach(), 1e-10)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-10)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gated_rnn_loss_gradcheck(mode):
    t, hx, target = problem(mode, seed=7)
    names = [k for k, v in t.items() if v is not None]
    n_hx = 2 if mode == "lstm" else 1

    def f(*ts):
        kw = dict(zip(names, ts[:len(names)]))
        h = tuple(ts[len(names):]) if mode == "lstm" else ts[len(names)]
        return functional.rnn_loss(kw["input"], target, h, kw["weight_ih"], kw["weight_hh"],
                                   kw["bias_ih"], kw["bias_hh"], kw["weight_out"],
                                   kw["bias_out"], mode=mode, lengths=[6, 0, 3, 5],
                                   reduction="seq_mean")

    inputs = [t[n] for n in names] + (list(hx) if mode == "lstm" else [hx])
    assert len(inputs) == len(names) + n_hx
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("case", product(dtype=[torch.float32, torch.float64],
                                         reduction=["mean", "none"], compute_grad=[True, False]),
                         ids=str)
def test_head_opcheck(case):
    dtype = case["dtype"]
    h = torch.randn(T, B, H, dtype=dtype)
    w, b = torch.randn(O, H, dtype=dtype), torch.randn(O, dtype=dtype)
    target = torch.randint(0, O, (T, B))
    lens = torch.tensor([6, 0, 3, 5])
    fwd = (h, target, w, b, lens, None, "cross_entropy", "all", case["reduction"], -100, 0.0,
           case["compute_grad"], 2)
    torch.library.opcheck(torch.ops.rnnkern.head_loss_fwd.default, fwd)
    value, step_loss, weight, g_h, g_w, g_b = torch.ops.rnnkern.head_loss_fwd(*fwd)
    bwd = (torch.randn_like(value), h, target, w, b, lens, weight, g_h, g_w, g_b, "cross_entropy",
           case["reduction"], -100, 0.0, 2)
    torch.library.opcheck(torch.ops.rnnkern.head_loss_bwd.default, bwd)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(mode="lstm", nonlinearity="relu"), ValueError, r"nonlinearity='relu' contradicts mode='lstm'"),
    (dict(mode="rnn"), ValueError, r"mode must be one of 'rnn_tanh', 'rnn_relu', 'lstm', 'gru', got 'rnn'"),
    (dict(mode="gru", weight_hr=torch.randn(3, H)), ValueError, r"weight_hr .* applies to mode='lstm' only"),
])
def test_gated_rnn_loss_refuses(kw, exc, match):
    t, hx, target = problem("gru")
    with pytest.raises(exc, match=match):
        functional.rnn_loss(t["input"], target, hx, t["weight_ih"], t["weight_hh"], t["bias_ih"],
                            t["bias_hh"], t["weight_out"], t["bias_out"], **kw)


@pytest.mark.parametrize("case", product(mode=["lstm", "gru"], loss=["cross_entropy", "mse"],
                                         reduction=["mean", "seq_sum"]), ids=str)
def test_loss_backward_with_a_unit_upstream_gradient(case):
    """loss.backward() (upstream gradient exactly 1) hands the head's gradients
    from the forward straight to autograd: the reference's gradients; a second
    backward of the kept graph adds the same again (the first left the saved
    state intact), zeroing .grad in place does not reach that state, and an
    upstream 2.5 scales them."""
    mode = case["mode"]
    t, hx, target = problem(mode, loss=case["loss"], seed=3)
    kw = dict(loss=case["loss"], reduction=case["reduction"],
              lengths=torch.tensor([6, 0, 3, 5]))
    ps = leaves(t, hx)

    def call(impl):
        return impl.rnn_loss(t["input"], target, hx, t["weight_ih"], t["weight_hh"],
                             t["bias_ih"], t["bias_hh"], t["weight_out"], t["bias_out"],
                             mode=mode, **kw)

    want = torch.autograd.grad(call(reference), ps)
    value = call(functional)
    value.backward(retain_graph=True)
    first = [p.grad.clone() for p in ps]
    for i, (a, b) in enumerate(zip(first, want)):
        assert_close(a, b, 1e-10, f"grad {i}")
    value.backward(retain_graph=True)
    for p, g in zip(ps, first):
        assert torch.equal(p.grad, 2 * g)
    # .grad shares no memory with the kept state: zeroing it in place (as
    # zero_grad(set_to_none=False) does) leaves the next backward intact.
    for p in ps:
        p.grad.zero_()
    value.backward(retain_graph=True)
    for p, g in zip(ps, first):
        assert torch.equal(p.grad, g)
    for p in ps:
        p.grad = None
    (2.5 * value).backward()
    for i, (p, g) in enumerate(zip(ps, first)):
        assert_close(p.grad, 2.5 * g, 1e-12, f"scaled grad {i}")

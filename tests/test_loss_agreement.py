"""The fused per-step loss against its reference at realistic sizes in float32,
against torch.nn.RNN + nn.Linear + F.cross_entropy / F.mse_loss, and against
the seed's hand-written loops; grad_norm against retain_grad.

Tolerances (relative, max|a-b| / max|b| per tensor, helpers.TOL): float32 1e-5
(the worst seen over repeated draws is about 2e-6: the head's gradients are
sums over T*B rows taken chunk by chunk here and whole there); float64 1e-10.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import TOL, assert_close, make_loss_problem, product, run_loss
from rnnkern import functional, reference

TOL32 = TOL[torch.float32]
TOL64 = TOL[torch.float64]


def compare(a, b, tol, what):
    (va, ha, sa, na, ga), (vb, hb, sb, nb, gb) = a, b
    assert_close(va, vb, tol, f"{what}: loss")
    assert_close(ha, hb, tol, f"{what}: h_n")
    assert_close(sa, sb, tol, f"{what}: step_loss")
    assert_close(na, nb, tol, f"{what}: grad_norm")
    assert ga.keys() == gb.keys()
    for k in ga:
        assert_close(ga[k], gb[k], tol, f"{what}: grad of {k}")


@pytest.mark.parametrize("case", product(loss=["cross_entropy", "mse"],
                                         reduction=["mean", "sum", "seq_mean", "seq_sum", "none"],
                                         steps=["all", "last"], truncate=[None, 7]), ids=str)
def test_float32_agrees_with_reference(case):
    T, B, I, H = 40, 16, 32, 64
    O = 301 if case["loss"] == "cross_entropy" else 37
    tensors, target, kw = make_loss_problem(
        T, B, I, H, O, loss=case["loss"], dtype=torch.float32, lengths="random",
        loss_mask="bool", ignore=case["loss"] == "cross_entropy")
    kw.update(loss=case["loss"], reduction=case["reduction"], steps=case["steps"],
              truncate=case["truncate"],
              label_smoothing=0.1 if case["loss"] == "cross_entropy" else 0.0)
    # chunks of 64 rows: T*B = 640 rows run as several chunks
    got = run_loss(functional, tensors, target, **kw, _chunk_rows=64)
    want = run_loss(reference, tensors, target, **kw)
    compare(got, want, TOL32, str(case))


@pytest.mark.parametrize("case", product(layout=["time-major", "batch_first"],
                                         nonlinearity=["tanh", "relu"],
                                         loss=["cross_entropy", "mse"]), ids=str)
def test_float64_layouts_and_nonlinearities(case):
    """Every per-step tensor follows the input's layout: target, loss_mask, the
    'none' result, step_loss and grad_norm."""
    T, B, I, H, O = 9, 4, 3, 7, 6
    bf = case["layout"] == "batch_first"
    tensors, target, kw = make_loss_problem(
        T, B, I, H, O, loss=case["loss"], batch_first=bf, lengths=torch.tensor([9, 2, 5, 1]),
        loss_mask="float", ignore=case["loss"] == "cross_entropy")
    kw.update(loss=case["loss"], reduction="none", batch_first=bf, truncate=4,
              nonlinearity=case["nonlinearity"])
    got = run_loss(functional, tensors, target, **kw)
    want = run_loss(reference, tensors, target, **kw)
    compare(got, want, TOL64, str(case))
    steps_shape = (B, T) if bf else (T, B)
    for name, t in zip(("loss", "step_loss", "grad_norm"), (got[0], got[2], got[3])):
        assert t.shape == steps_shape, (name, t.shape)


@pytest.mark.parametrize("case", product(loss=["cross_entropy", "mse"],
                                         dtype=[torch.float32, torch.float64],
                                         batch_first=[False, True], bias=[True, False]), ids=str)
def test_matches_torch_nn(case):
    """reduction='mean' with no mask is nn.RNN -> nn.Linear -> F.cross_entropy
    (or F.mse_loss) on every step: the loss and every gradient."""
    T, B, I, H = 23, 5, 6, 17
    O = 29
    dtype, bf = case["dtype"], case["batch_first"]
    rnn = torch.nn.RNN(I, H, batch_first=bf, bias=case["bias"], dtype=dtype)
    head = torch.nn.Linear(H, O, bias=case["bias"], dtype=dtype)
    x = torch.randn((B, T, I) if bf else (T, B, I), dtype=dtype, requires_grad=True)
    h0 = torch.randn(1, B, H, dtype=dtype, requires_grad=True)
    steps = (B, T) if bf else (T, B)
    if case["loss"] == "cross_entropy":
        target = torch.randint(0, O, steps)
    else:
        target = torch.randn(*steps, O, dtype=dtype)

    out, _ = rnn(x, h0)
    y = head(out)
    if case["loss"] == "cross_entropy":
        want = F.cross_entropy(y.reshape(-1, O), target.reshape(-1))
    else:
        want = F.mse_loss(y, target)
    params = [x, h0, *rnn.parameters(), *head.parameters()]
    want_grads = torch.autograd.grad(want, params)

    bias = case["bias"]
    got = functional.rnn_loss(x, target, h0[0], rnn.weight_ih_l0, rnn.weight_hh_l0,
                              rnn.bias_ih_l0 if bias else None, rnn.bias_hh_l0 if bias else None,
                              head.weight, head.bias, loss=case["loss"], batch_first=bf)
    got_grads = torch.autograd.grad(got, params)
    tol = TOL[dtype]
    assert_close(got.detach(), want.detach(), tol, "loss")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, tol, f"grad {i}")


@pytest.mark.parametrize("case", product(label_smoothing=[0.0, 0.15], ignore=[False, True],
                                         lengths=[False, True]), ids=str)
def test_cross_entropy_options_match_F(case):
    """label_smoothing and ignore_index exactly as F.cross_entropy: 'mean'
    divides by the number of counted steps. Padding (lengths) is the same as
    targets set to ignore_index at t >= len_b."""
    T, B, I, H, O = 12, 6, 5, 8, 10
    tensors, target, kw = make_loss_problem(T, B, I, H, O, ignore=case["ignore"])
    lengths = torch.tensor([12, 3, 7, 1, 12, 5]) if case["lengths"] else None
    ls, ii = case["label_smoothing"], kw["ignore_index"]
    names = list(tensors)
    leaves = [tensors[k] for k in names]
    got = functional.rnn_loss(leaves[0], target, *leaves[1:], loss="cross_entropy",
                              lengths=lengths, ignore_index=ii, label_smoothing=ls)
    got_grads = torch.autograd.grad(got, leaves)
    h, _ = reference.rnn(*leaves[:6], lengths=lengths)
    y = h @ tensors["weight_out"].T + tensors["bias_out"]
    t = target.clone()
    if lengths is not None:
        t[torch.arange(T)[:, None] >= lengths[None, :]] = ii
    want = F.cross_entropy(y.reshape(-1, O), t.reshape(-1), ignore_index=ii, label_smoothing=ls)
    want_grads = torch.autograd.grad(want, leaves)
    assert_close(got.detach(), want.detach(), TOL64, "loss")
    for k, a, b in zip(names, got_grads, want_grads):
        assert_close(a, b, TOL64, f"grad of {k}")


def test_steps_last_is_the_seeds_end_of_sequence_loss():
    """steps='last' is seed 000's example 1 (a loss on the last step only), at
    each sequence's own last step len_b - 1."""
    T, B, I, H, O = 10, 5, 4, 6, 7
    tensors, target, _ = make_loss_problem(T, B, I, H, O, loss="mse")
    lengths = torch.tensor([10, 1, 6, 3, 10])
    leaves = list(tensors.values())
    got = functional.rnn_loss(leaves[0], target, *leaves[1:], loss="mse", steps="last",
                              lengths=lengths)
    h, _ = reference.rnn(*leaves[:6], lengths=lengths)
    last = lengths - 1
    y_last = h[last, torch.arange(B)] @ tensors["weight_out"].T + tensors["bias_out"]
    want = F.mse_loss(y_last, target[last, torch.arange(B)])
    assert_close(got.detach(), want.detach(), TOL64, "loss")
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert_close(a, b, TOL64, "grad")


def test_seq_sum_is_the_seeds_masked_example():
    """reduction='seq_sum' with a 0/1 loss_mask is seed 000's example 3, written
    as there: a loop over t, each step's loss times mask[:, t], summed per
    sequence, divided by its number of valid steps, summed over the batch."""
    B, T, I, H, O = 4, 8, 3, 5, 6  # batch_first, as in the seed
    tensors, target, _ = make_loss_problem(T, B, I, H, O, loss="mse", batch_first=True)
    mask = (torch.rand(B, T) > 0.4).double()
    mask[:, 0] = 1  # every sequence has a valid step: the seed divides by it
    leaves = list(tensors.values())
    got = functional.rnn_loss(leaves[0], target, *leaves[1:], loss="mse", batch_first=True,
                              loss_mask=mask, reduction="seq_sum")

    outputs, _ = reference.rnn(*leaves[:6], batch_first=True)
    outputs = outputs @ tensors["weight_out"].T + tensors["bias_out"]  # (B, T, O)
    losses = []
    for t in range(T):
        step_loss = F.mse_loss(outputs[:, t], target[:, t], reduction="none").mean(-1) * mask[:, t]
        losses.append(step_loss)
    valid_steps = mask.sum(axis=1)
    batch_loss = sum(losses)
    want = (batch_loss / valid_steps).sum()
    assert_close(got.detach(), want.detach(), TOL64, "loss")
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert_close(a, b, TOL64, "grad")


@pytest.mark.parametrize("case", product(lengths=[False, True], truncate=[None, 3],
                                         batch_first=[False, True],
                                         reduction=["mean", "none"]), ids=str)
def test_grad_norm_is_the_norm_of_h_grad(case):
    """grad_norm[b,t] = ||dL/dh_t|| for sequence b, with dL/dh_t read with
    retain_grad on each step's state in the reference; L includes a term in
    h_n, so the gradient through the final state counts too."""
    T, B, I, H, O = 11, 4, 3, 6, 5
    bf = case["batch_first"]
    tensors, target, kw = make_loss_problem(T, B, I, H, O, batch_first=bf, loss_mask="float")
    lengths = torch.tensor([11, 4, 0, 7]) if case["lengths"] else None
    leaves = list(tensors.values())
    opts = dict(batch_first=bf, lengths=lengths, truncate=case["truncate"])
    upstream = torch.randn((B, T) if bf else (T, B), dtype=torch.float64)
    h_n_weight = torch.randn(B, H, dtype=torch.float64)

    def total(loss, h_n):
        return (loss * upstream).sum() if case["reduction"] == "none" else loss + (h_n * h_n_weight).sum()

    d = functional.rnn_loss(leaves[0], target, *leaves[1:], **opts, loss_mask=kw["loss_mask"],
                            reduction=case["reduction"], return_details=True)
    assert torch.isnan(d.grad_norm).all(), "grad_norm is NaN until backward"
    total(d.loss, d.h_n).backward()

    states = []

    def keep(s, h):
        h.retain_grad()
        states.append(h)
        return h

    out, h_n = reference.rnn(*leaves[:6], **opts, _step=keep)
    h = out.transpose(0, 1) if bf else out  # [T,B,H]
    y = h @ tensors["weight_out"].T + tensors["bias_out"]
    t = target.transpose(0, 1) if bf else target
    mask = kw["loss_mask"].transpose(0, 1) if bf else kw["loss_mask"]
    lens = lengths if lengths is not None else torch.full((B,), T)
    w = (torch.arange(T)[:, None] < lens[None, :]) * mask  # [T,B]
    l = F.cross_entropy(y.reshape(-1, O), t.reshape(-1), reduction="none").view(T, B)
    if case["reduction"] == "none":
        value = w * l
        value = value.transpose(0, 1) if bf else value
    else:
        value = (w * l).sum() / w.sum()
    total(value, h_n).backward()
    want = torch.stack([s.grad.norm(dim=1) for s in states])  # [T,B]
    want = want.transpose(0, 1) if bf else want
    assert_close(d.grad_norm, want, TOL64, "grad_norm")
    if lengths is not None:
        pad = torch.arange(T)[:, None] >= lengths[None, :]
        assert (d.grad_norm[pad.T if bf else pad] == 0).all()


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_none_with_unit_upstream_equals_sum(loss):
    T, B, I, H, O = 13, 5, 4, 6, 9
    tensors, target, kw = make_loss_problem(T, B, I, H, O, loss=loss, lengths="random",
                                            loss_mask="float")
    leaves = list(tensors.values())
    opts = dict(loss=loss, lengths=kw["lengths"], loss_mask=kw["loss_mask"], truncate=5)
    per_step = functional.rnn_loss(leaves[0], target, *leaves[1:], **opts, reduction="none")
    summed = functional.rnn_loss(leaves[0], target, *leaves[1:], **opts, reduction="sum")
    assert_close(per_step.sum().detach(), summed.detach(), TOL64, "value")
    for a, b in zip(torch.autograd.grad(per_step.sum(), leaves), torch.autograd.grad(summed, leaves)):
        assert_close(a, b, TOL64, "grad")


@pytest.mark.parametrize("case", product(reduction=["mean", "sum", "seq_mean", "seq_sum", "none"],
                                         cause=["loss_mask", "ignore_index", "lengths"],
                                         impl=["functional", "reference"]), ids=str)
def test_all_masked_batch_is_zero_never_nan(case):
    """No step with a positive weight: the loss is 0 (zeros for 'none') and every
    gradient of the loss is 0; nothing is NaN."""
    T, B, I, H, O = 6, 3, 2, 4, 5
    tensors, target, _ = make_loss_problem(T, B, I, H, O)
    opts = dict(reduction=case["reduction"])
    if case["cause"] == "loss_mask":
        opts["loss_mask"] = torch.zeros(T, B, dtype=torch.bool)
    elif case["cause"] == "ignore_index":
        target = torch.full((T, B), -100)
    else:
        opts["lengths"] = torch.zeros(B, dtype=torch.int64)
    impl = functional if case["impl"] == "functional" else reference
    leaves = list(tensors.values())
    value = impl.rnn_loss(leaves[0], target, *leaves[1:], **opts)
    assert not torch.isnan(value).any()
    assert (value == 0).all()
    upstream = value.sum() if value.dim() else value
    for g in torch.autograd.grad(upstream, leaves, allow_unused=True):
        assert g is None or (g == 0).all()


def test_chunking_does_not_change_results():
    T, B, I, H, O = 9, 7, 4, 5, 33
    tensors, target, kw = make_loss_problem(T, B, I, H, O, lengths="random", loss_mask="float",
                                            ignore=True)
    kw.update(label_smoothing=0.05)
    runs = [run_loss(functional, tensors, target, **kw, _chunk_rows=c) for c in (1, 7, 64, 0)]
    for r in runs[1:]:
        compare(r, runs[0], TOL64, "chunk rows")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inference_path(reduction):
    """Under no_grad the kernel skips the gradients; values are the same and
    grad_norm stays NaN (no backward ran)."""
    T, B, I, H, O = 8, 3, 4, 5, 6
    tensors, target, kw = make_loss_problem(T, B, I, H, O, lengths="random", loss_mask="bool")
    leaves = list(tensors.values())
    with_grad = functional.rnn_loss(leaves[0], target, *leaves[1:], **kw, reduction=reduction,
                                    return_details=True)
    with torch.no_grad():
        without = functional.rnn_loss(leaves[0], target, *leaves[1:], **kw, reduction=reduction,
                                      return_details=True)
    assert not without.loss.requires_grad
    assert torch.equal(without.loss, with_grad.loss.detach())
    assert torch.equal(without.step_loss, with_grad.step_loss)
    assert torch.equal(without.h_n, with_grad.h_n.detach())
    assert torch.isnan(without.grad_norm).all()


def test_deterministic():
    T, B, I, H, O = 30, 8, 16, 32, 500
    tensors, target, kw = make_loss_problem(T, B, I, H, O, dtype=torch.float32,
                                            lengths="random", ignore=True)
    a = run_loss(functional, tensors, target, **kw, label_smoothing=0.1)
    b = run_loss(functional, tensors, target, **kw, label_smoothing=0.1)
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    for k in a[4]:
        assert torch.equal(a[4][k], b[4][k]), k


def test_noncontiguous_arguments():
    """Strided input, weights and targets give the same results as contiguous ones."""
    T, B, I, H, O = 7, 4, 3, 5, 6
    tensors, target, kw = make_loss_problem(T, B, I, H, O, loss="mse", lengths="random")
    want = run_loss(functional, tensors, target, loss="mse", **kw)
    strided = {k: v.detach().transpose(0, -1).contiguous().transpose(0, -1)
               if v.dim() >= 2 else v.detach() for k, v in tensors.items()}
    wide = torch.randn(T, B, 2 * O, dtype=torch.float64)
    wide[..., ::2] = target
    got = run_loss(functional, strided, wide[..., ::2], loss="mse", **kw)
    compare(got, want, TOL64, "strided")
    packed = torch.randn(T, B, O + 3, dtype=torch.float64)
    packed[..., :O] = target  # rows of unit stride, read in place
    got = run_loss(functional, strided, packed[..., :O], loss="mse", **kw)
    compare(got, want, TOL64, "row-strided target")


@pytest.mark.parametrize("size", [(1, 1, 1, 1, 1), (1, 3, 2, 7, 4), (6, 1, 3, 1, 2),
                                  (5, 4, 3, 7, 1)], ids=str)
def test_edge_sizes(size):
    """T=1, B=1, H=1, H=7, O=1 (a single class: cross-entropy 0 everywhere)."""
    T, B, I, H, O = size
    for loss in ("cross_entropy", "mse"):
        tensors, target, kw = make_loss_problem(T, B, I, H, O, loss=loss)
        for reduction in ("mean", "none"):
            got = run_loss(functional, tensors, target, loss=loss, reduction=reduction)
            want = run_loss(reference, tensors, target, loss=loss, reduction=reduction)
            compare(got, want, TOL64, f"{size} {loss} {reduction}")


def test_double_backward_raises():
    T, B, I, H, O = 4, 2, 3, 5, 6
    tensors, target, _ = make_loss_problem(T, B, I, H, O)
    leaves = list(tensors.values())
    value = functional.rnn_loss(leaves[0], target, *leaves[1:])
    grads = torch.autograd.grad(value, leaves, create_graph=True)
    want = torch.autograd.grad(functional.rnn_loss(leaves[0], target, *leaves[1:]), leaves)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)
    with pytest.raises(RuntimeError, match="double backward through rnnkern.functional.rnn_loss"):
        grads[3].sum().backward()


@pytest.mark.parametrize("case", product(size=[(0, 3), (4, 0)], loss=["cross_entropy", "mse"],
                                         reduction=["mean", "seq_mean", "none"]), ids=str)
def test_empty_batch_or_no_steps(case):
    """T=0 or B=0: nothing counts, so the loss is 0 (or empty) and h_n is hx."""
    T, B = case["size"]
    tensors, target, _ = make_loss_problem(T, B, 2, 3, 5, loss=case["loss"])
    got = run_loss(functional, tensors, target, loss=case["loss"], reduction=case["reduction"])
    want = run_loss(reference, tensors, target, loss=case["loss"], reduction=case["reduction"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[0] == 0).all()


def test_raw_backward_never_reads_an_ignored_target():
    """A direct call of elman_loss_bwd whose weight is positive at an ignored
    target (-100, no class index) skips that row instead of reading class -100."""
    T, B, I, H, O = 5, 3, 2, 4, 6
    tensors, target, _ = make_loss_problem(T, B, I, H, O)
    t = {k: v.detach() for k, v in tensors.items()}
    target[1, 2] = -100
    fwd = (t["input"], target, t["hx"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
           t["weight_out"], t["bias_out"], None, None, "tanh", "cross_entropy", "all", "none",
           -100, 0.0, True, 0)
    _, out, h_n, _, weight, g_out, g_w, g_b = torch.ops.rnnkern.elman_loss_fwd(*fwd)
    upstream = torch.rand(T, B, dtype=torch.float64)

    def bwd(w):
        return torch.ops.rnnkern.elman_loss_bwd(
            upstream, torch.zeros_like(h_n), t["input"], target, t["hx"], t["weight_ih"],
            t["weight_hh"], t["weight_out"], t["bias_out"], None, out, w, g_out, g_w, g_b, "tanh",
            "cross_entropy", "none", -100, 0.0, 0, False, 0)

    for a, b in zip(bwd(torch.ones_like(weight)), bwd(weight)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_strided_biases_give_the_same_bits(mode):
    """Biases read through strided views (every other element of a longer
    vector; the Elman bias sum and the small products' packing read them by
    stride) give exactly what contiguous copies give: the loss, the layer's
    output and every gradient. O = 3 classes and I = 4 put the head and the
    input projection on the packed small products."""
    T, B, I, H, O = 5, 3, 4, 7, 3
    G = {"rnn_tanh": 1, "lstm": 4, "gru": 3}[mode] * H
    x = torch.randn(T, B, I, dtype=torch.float64)
    target = torch.randint(0, O, (T, B))
    w_ih = torch.randn(G, I, dtype=torch.float64) / 2
    w_hh = torch.randn(G, H, dtype=torch.float64) / 3
    w_out = torch.randn(O, H, dtype=torch.float64)
    wide = [torch.randn(2 * n, dtype=torch.float64) for n in (G, G, O)]

    def run(strided):
        leaves = [w.clone().requires_grad_() for w in wide]
        views = [w[::2] if strided else w[::2].contiguous() for w in leaves]
        assert all(v.is_contiguous() != strided for v in views)
        loss = functional.rnn_loss(x, target, None, w_ih, w_hh, views[0], views[1], w_out,
                                   views[2], mode=mode)
        layer = {"rnn_tanh": functional.rnn, "lstm": functional.lstm, "gru": functional.gru}[mode]
        out = layer(x, None, w_ih, w_hh, views[0], views[1])[0]
        (loss + (out * out).sum()).backward()
        return [loss.detach(), out.detach(), *(w.grad for w in leaves)]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)

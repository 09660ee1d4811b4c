"""float64 gradcheck of the fused per-step loss on tiny sizes, over
loss x reduction x steps x lengths x loss_mask x ignore_index x truncate x
label_smoothing (ignore_index and label_smoothing exist for cross-entropy
only, so mse takes one value of each).

truncate=None: plain (full-Jacobian) gradcheck of rnnkern.functional.rnn_loss,
both outputs (the loss, and h_n, whose gradient enters the BPTT) against finite
differences of the kernel's own forward. truncate=2: the kernel's gradient is
not the Jacobian of its forward, so helpers.TruncatedProbe gradchecks it
against finite differences of the reference with the states crossing each
boundary frozen. Those run gradcheck's fast_mode (u^T J v for random u, v,
finite differences along v): the reference's Python loop per perturbation
would otherwise take minutes; test_truncate_probe_can_fail shows the check
still rejects a wrong (untruncated) gradient.
Every case runs in chunks of 4 rows (T*B = 15), so several chunks, the gather of
active rows and the skipped rows are all exercised.
"""

import pytest
import torch

from helpers import TruncatedProbe, make_layer, product
from rnnkern import functional

T, B, I, H, O = 5, 3, 2, 4, 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny sizes gain nothing from threads, and on a loaded machine each
    parallel region of each of the thousands of tiny calls can wait for a
    descheduled thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

AXES = dict(reduction=["mean", "sum", "seq_mean", "seq_sum", "none"], steps=["all", "last"],
            lengths=[False, True], loss_mask=[False, True], truncate=[None, 2])
CASES = (product(loss=["cross_entropy"], **AXES, ignore_index=[False, True],
                 label_smoothing=[0.0, 0.2])
         + product(loss=["mse"], **AXES, ignore_index=[False], label_smoothing=[0.0]))


def case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def loss_inputs(case, *, batch_first=False, seed=None, dtype=torch.float64):
    """(tensors that take gradients, by name; keyword arguments of rnn_loss)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    layer = make_layer(T, B, I, H, dtype=dtype, batch_first=batch_first, seed=seed)
    layer["weight_out"] = torch.randn(O, H, dtype=dtype, generator=g).requires_grad_()
    layer["bias_out"] = torch.randn(O, dtype=dtype, generator=g).requires_grad_()
    steps_shape = (B, T) if batch_first else (T, B)
    if case["loss"] == "cross_entropy":
        target = torch.randint(0, O, steps_shape, generator=g)
        ignore_index = -100
        if case["ignore_index"]:
            ignore_index = 3  # a valid class index, so ignoring it is not a range check
            target.view(-1)[::4] = ignore_index
    else:
        target = torch.randn(*steps_shape, O, dtype=dtype, generator=g)
        ignore_index = -100
    # len 0 (not allowed with steps='last'), 1, a middle value and T, unsorted
    lengths = None
    if case["lengths"]:
        lengths = torch.tensor([3, 0, 5]) if case["steps"] == "all" else torch.tensor([3, 1, 5])
    loss_mask = None
    if case["loss_mask"]:
        loss_mask = torch.rand(steps_shape, dtype=dtype, generator=g) + 0.1
        loss_mask.view(-1)[1::5] = 0
    kw = dict(loss=case["loss"], reduction=case["reduction"], steps=case["steps"],
              lengths=lengths, loss_mask=loss_mask, ignore_index=ignore_index,
              label_smoothing=case["label_smoothing"], truncate=case["truncate"],
              batch_first=batch_first)
    return layer, target, kw


def call_loss(impl, layer_names, tensors, target, kw, cut=None, **extra):
    t = dict(zip(layer_names, tensors))
    if cut is not None:
        extra["_cut"] = cut
    d = impl.rnn_loss(t["input"], target, t["hx"], t["weight_ih"], t["weight_hh"], t["bias_ih"],
                      t["bias_hh"], t["weight_out"], t["bias_out"], **kw, return_details=True,
                      **extra)
    return d.loss, d.h_n


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck(case):
    layer, target, kw = loss_inputs(case)
    names = list(layer)
    inputs = tuple(layer.values())
    if case["truncate"] is None:
        def f(*t):
            return call_loss(functional, names, t, target, kw, _chunk_rows=4)
    else:
        TruncatedProbe.frozen = None

        def call(impl, tensors, cut):
            extra = {"_chunk_rows": 4} if impl is functional else {}
            return call_loss(impl, names, tensors, target, kw, cut, **extra)

        def f(*t):
            return TruncatedProbe.apply(call, *t)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6,
                                    fast_mode=case["truncate"] is not None)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_truncate_probe_can_fail(reduction):
    """The truncated probe is not vacuous, in fast mode too: the kernel's full
    BPTT gradient fails against the truncated function."""
    case = dict(loss="cross_entropy", reduction=reduction, steps="all", lengths=True,
                loss_mask=False, truncate=2, ignore_index=False, label_smoothing=0.0)
    layer, target, kw = loss_inputs(case)
    names = list(layer)

    def call(impl, tensors, cut):
        if impl is functional:
            return call_loss(impl, names, tensors, target, {**kw, "truncate": None})
        return call_loss(impl, names, tensors, target, kw, cut)

    TruncatedProbe.frozen = None
    assert not torch.autograd.gradcheck(lambda *t: TruncatedProbe.apply(call, *t),
                                        tuple(layer.values()), eps=1e-6, atol=1e-8, rtol=1e-6,
                                        fast_mode=True, raise_exception=False)

"""float64 gradcheck of the fused Elman kernel on tiny sizes, over every
combination of nonlinearity x bias x lengths x truncate x batch_first x reverse.

With truncate=K the kernel's gradient is, by definition, not the Jacobian of
its forward: it is the Jacobian of the function in which the hidden state that
crosses each K-step boundary is a constant. helpers.TruncatedProbe gives
gradcheck exactly that function (the reference with the boundary states frozen
at their values) for its finite differences, and the kernel's backward for its
analytical side.
"""

import pytest
import torch

from helpers import TruncatedProbe, make_layer, product
from rnnkern import functional

CASES = product(nonlinearity=["tanh", "relu"], bias=[True, False], lengths=[False, True],
                truncate=[None, 2], batch_first=[False, True], reverse=[False, True])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradcheck(case):
    T, B, I, H = 5, 3, 2, 4
    layer = make_layer(T, B, I, H, bias=case["bias"], batch_first=case["batch_first"])
    # len 0, a middle value and T, in an unsorted order
    lengths = torch.tensor([3, 0, 5]) if case["lengths"] else None
    names = [k for k, v in layer.items() if v is not None]
    opts = dict(nonlinearity=case["nonlinearity"], batch_first=case["batch_first"],
                lengths=lengths, truncate=case["truncate"], reverse=case["reverse"])

    def call(impl, tensors, cut):
        kw = dict(zip(names, tensors))
        extra = {"_cut": cut} if cut is not None else {}
        return impl.rnn(kw["input"], kw["hx"], kw["weight_ih"], kw["weight_hh"],
                        kw.get("bias_ih"), kw.get("bias_hh"), **opts, **extra)

    inputs = tuple(layer[k] for k in names)
    if case["truncate"] is None:
        f = lambda *t: call(functional, t, None)  # noqa: E731
    else:
        TruncatedProbe.frozen = None
        f = lambda *t: TruncatedProbe.apply(call, *t)  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_truncate_probe_can_fail():
    """The probe is not vacuous: the full-BPTT gradient fails it."""
    T, B, I, H = 5, 3, 2, 4
    layer = make_layer(T, B, I, H)

    def call(impl, tensors, cut):
        if impl is functional:  # full BPTT in backward, truncated function in forward
            return impl.rnn(*tensors)
        return impl.rnn(*tensors, truncate=2, _cut=cut)

    TruncatedProbe.frozen = None
    assert not torch.autograd.gradcheck(lambda *t: TruncatedProbe.apply(call, *t),
                                        tuple(layer.values()), eps=1e-6, atol=1e-8, rtol=1e-6,
                                        raise_exception=False)

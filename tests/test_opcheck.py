"""torch.library.opcheck on each op: schema, fake (meta) kernel and dispatch."""

import pytest
import torch

from helpers import make_layer, product


def op_inputs(T, B, I, H, dtype, lengths, reverse):
    layer = make_layer(T, B, I, H, dtype=dtype)
    x, h0, wi, wh, bi, bh = (v.detach() for v in layer.values())
    lens = torch.randint(0, T + 1, (B,)) if lengths else None
    out, h_n = torch.ops.rnnkern.elman_fwd(x, h0, wi, wh, bi, bh, lens, "tanh", reverse)
    fwd = (x, h0, wi, wh, bi, bh, lens, "tanh", reverse)
    bwd = (torch.randn_like(out), torch.randn_like(h_n), x, h0, wi, wh, out, lens, "tanh", reverse, 2)
    return fwd, bwd


@pytest.mark.parametrize("case", product(dtype=[torch.float32, torch.float64], lengths=[False, True],
                                         reverse=[False, True]), ids=str)
def test_opcheck(case):
    fwd, bwd = op_inputs(7, 3, 2, 5, case["dtype"], case["lengths"], case["reverse"])
    torch.library.opcheck(torch.ops.rnnkern.elman_fwd.default, fwd)
    torch.library.opcheck(torch.ops.rnnkern.elman_bwd.default, bwd)


def loss_op_inputs(T, B, I, H, O, dtype, loss, reduction, lengths):
    layer = make_layer(T, B, I, H, dtype=dtype)
    x, h0, wi, wh, bi, bh = (v.detach() for v in layer.values())
    w_out, b_out = torch.randn(O, H, dtype=dtype), torch.randn(O, dtype=dtype)
    target = torch.randint(0, O, (T, B)) if loss == "cross_entropy" else torch.randn(T, B, O, dtype=dtype)
    lens = torch.randint(1, T + 1, (B,)) if lengths else None
    mask = torch.rand(T, B, dtype=dtype)
    fwd = (x, target, h0, wi, wh, bi, bh, w_out, b_out, lens, mask, "tanh", loss, "all", reduction,
           -100, 0.1 if loss == "cross_entropy" else 0.0, True, 3)
    value, out, h_n, _, weight, g_out, g_w, g_b = torch.ops.rnnkern.elman_loss_fwd(*fwd)
    bwd = (torch.randn_like(value), torch.randn_like(h_n), x, target, h0, wi, wh, w_out, b_out, lens,
           out, weight, g_out, g_w, g_b, "tanh", loss, reduction, -100, fwd[16], 2, True, 3)
    return fwd, bwd


@pytest.mark.parametrize("case", product(dtype=[torch.float32, torch.float64],
                                         loss=["cross_entropy", "mse"], reduction=["mean", "none"],
                                         lengths=[False, True]), ids=str)
def test_opcheck_loss(case):
    fwd, bwd = loss_op_inputs(7, 3, 2, 5, 4, case["dtype"], case["loss"], case["reduction"],
                              case["lengths"])
    torch.library.opcheck(torch.ops.rnnkern.elman_loss_fwd.default, fwd)
    torch.library.opcheck(torch.ops.rnnkern.elman_loss_bwd.default, bwd)

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

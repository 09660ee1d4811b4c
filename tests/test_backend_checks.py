"""The argument checks every backend shares (csrc/checks.h): the CUDA ops call
the same functions as the CPU ops, so what is asserted here on the CPU holds
for both. Half precision is refused by name by every forward op, before any
kernel runs (README.md, CUDA backend: dtypes)."""

import pytest
import torch

from rnnkern import _ops

T, B, I, H, O = 4, 2, 3, 5, 6


def ops_with(dtype):
    def t(*shape):
        return torch.randn(*shape).to(dtype)

    return {
        "elman_fwd": lambda: _ops.elman_fwd(t(T, B, I), t(B, H), t(H, I), t(H, H), None, None,
                                            None, "tanh", False),
        "layer_fwd": lambda: _ops.layer_fwd(t(T, B, I), t(B, H), None, t(3 * H, I), t(3 * H, H),
                                            None, None, None, None, "gru", False),
        "head_loss_fwd": lambda: _ops.head_loss_fwd(t(T, B, H), torch.randint(0, O, (T, B)),
                                                    t(O, H), None, None, None, "cross_entropy",
                                                    "all", "mean", -100, 0.0, True, 0),
        "elman_loss_fwd": lambda: _ops.elman_loss_fwd(
            t(T, B, I), torch.randint(0, O, (T, B)), t(B, H), t(H, I), t(H, H), None, None,
            t(O, H), None, None, None, "tanh", "cross_entropy", "all", "mean", -100, 0.0, True, 0),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["elman_fwd", "layer_fwd", "head_loss_fwd", "elman_loss_fwd"])
def test_half_precision_is_refused_by_name(op, dtype):
    arg = "h" if op == "head_loss_fwd" else "input"
    name = {torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16"}[dtype]
    with pytest.raises(TypeError, match=rf"rnnkern\.{op}: {arg} must be float32 or float64, "
                                        rf"got {name}"):
        ops_with(dtype)[op]()


@pytest.mark.parametrize("op", ["elman_fwd", "layer_fwd", "head_loss_fwd", "elman_loss_fwd"])
def test_the_same_calls_run_in_float32(op):
    # the calls above are otherwise valid: only the dtype is refused
    out = ops_with(torch.float32)[op]()
    assert all(torch.isfinite(o).all() for o in out)

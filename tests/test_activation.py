"""The fused steps' float32 tanh is a rational approximation and their sigmoid
inlines its exp (both so the register tile survives); their errors against
float64 are bounded here."""

import torch

from rnnkern import functional


def ulp_error(x32: torch.Tensor) -> torch.Tensor:
    """One step with W_hh = 0, W_ih = I: output = tanh(x) through the kernel."""
    n = x32.numel()
    x = x32.reshape(1, n, 1)
    out, _ = functional.rnn(x, torch.zeros(n, 1), torch.ones(1, 1), torch.zeros(1, 1))
    ref = torch.tanh(x32.double()).reshape(-1)
    spacing = torch.from_numpy(__import__("numpy").spacing(ref.abs().float().numpy())).double()
    return (out.reshape(-1).double() - ref).abs() / spacing


def test_tanh_float32_within_7_ulp():
    x = torch.cat([torch.linspace(-12, 12, 200_001), torch.logspace(-8, 1, 50_001),
                   -torch.logspace(-8, 1, 50_001), torch.randn(100_000) * 3])
    err = ulp_error(x.float())
    assert err.max() <= 7, f"max error {err.max():.2f} ulp"
    assert err.mean() <= 1.5, f"mean error {err.mean():.2f} ulp"


def test_tanh_saturates_and_keeps_sign():
    x = torch.tensor([-1e30, -50.0, -9.0, -1e-30, 0.0, 1e-30, 9.0, 50.0, 1e30])
    n = x.numel()
    out, _ = functional.rnn(x.reshape(1, n, 1), torch.zeros(n, 1), torch.ones(1, 1), torch.zeros(1, 1))
    out = out.reshape(-1)
    assert torch.all(out[:4] <= 0) and torch.all(out[5:] >= 0) and out[4] == 0
    assert torch.allclose(out[[0, 1, 2, 6, 7, 8]].abs(), torch.ones(6), atol=3e-7)


def lstm_gates(x32: torch.Tensor) -> torch.Tensor:
    """One LSTM step with W_hh = 0, W_ih = 1, no bias: the saved gates are
    (sigmoid(x), sigmoid(x), tanh(x), sigmoid(x)) through the fused kernel."""
    n = x32.numel()
    out = torch.ops.rnnkern.layer_fwd(x32.reshape(1, n, 1), torch.randn(n, 1), torch.randn(n, 1),
                                      torch.ones(4, 1), torch.zeros(4, 1), None, None, None, None,
                                      "lstm", False, 0)
    return out[3].reshape(n, 4)


def test_sigmoid_float32_within_4_ulp():
    """The fused step's float32 sigmoid inlines its exp (csrc/cpu/vec_kernels_impl.h)."""
    import numpy as np

    x = torch.cat([torch.linspace(-20, 20, 200_001), torch.logspace(-8, 2, 50_001),
                   -torch.logspace(-8, 2, 50_001), torch.randn(100_000) * 4]).float()
    gates = lstm_gates(x)
    ref = torch.sigmoid(x.double())
    normal = ref >= torch.finfo(torch.float32).tiny  # an ulp of a subnormal says nothing
    spacing = torch.from_numpy(np.spacing(ref.float().numpy())).double()
    for k in (0, 1, 3):  # i, f, o: the same function on every gate
        err = ((gates[:, k].double() - ref).abs() / spacing)[normal]
        assert err.max() <= 4, f"gate {k}: max error {err.max():.2f} ulp"
        assert err.mean() <= 1, f"gate {k}: mean error {err.mean():.2f} ulp"
        assert (gates[:, k].double() - ref)[~normal].abs().max() < 1e-38


def test_sigmoid_saturates_exactly_and_keeps_nan():
    x = torch.tensor([-float("inf"), -1e30, -100.0, -88.8, 0.0, 30.0, 100.0, 1e30, float("inf"),
                      float("nan")])
    s = lstm_gates(x)[:, 0]
    assert torch.equal(s[:4], torch.zeros(4))  # exp(-x) overflows: 1 / (1 + inf) = 0
    assert s[4] == 0.5
    assert torch.equal(s[5:9], torch.ones(4))
    assert torch.isnan(s[9])

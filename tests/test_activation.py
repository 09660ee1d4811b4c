"""The fused steps' float32 tanh is a rational approximation (inlined so the
register tile survives); its error against float64 tanh is bounded here."""

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

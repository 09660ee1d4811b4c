"""Every wrong argument raises a clear error (argument, expected, given) before
any kernel runs, from the API, the reference and the raw ops alike."""

import numpy as np
import pytest
import torch

from helpers import make_layer
from rnnkern import functional, reference

T, B, I, H = 6, 3, 4, 5


def args(**override):
    layer = make_layer(T, B, I, H, dtype=torch.float32)
    kw = dict(input=layer["input"], hx=layer["hx"], weight_ih=layer["weight_ih"],
              weight_hh=layer["weight_hh"], bias_ih=layer["bias_ih"], bias_hh=layer["bias_hh"])
    opts = {}
    for k, v in override.items():
        (kw if k in kw else opts)[k] = v(kw) if callable(v) else v
    return kw, opts


BAD = {
    "input 2-D": (dict(input=lambda kw: kw["input"][0]), ValueError, r"input must be 3-D \(T, B, I\), got shape \(3, 4\)"),
    "input int": (dict(input=lambda kw: kw["input"].long()), TypeError, r"input must be float32 or float64, got torch.int64"),
    "input size": (dict(input=lambda kw: torch.randn(T, B, I + 1)), ValueError, r"input_size: got I=5, expected 4"),
    "weight_hh shape": (dict(weight_hh=lambda kw: torch.randn(H, H + 1)), ValueError, r"weight_hh must have shape \(H, H\) = \(5, 5\), got \(5, 6\)"),
    "weight_hh 1-D": (dict(weight_hh=lambda kw: torch.randn(H)), ValueError, r"weight_hh must be 2-D \(H, H\), got shape \(5,\)"),
    "weight_ih rows": (dict(weight_ih=lambda kw: torch.randn(H + 1, I)), ValueError, r"weight_ih must have shape \(H, I\) = \(5, 4\), got \(6, 4\)"),
    "weight_ih dtype": (dict(weight_ih=lambda kw: kw["weight_ih"].double()), TypeError, r"weight_ih must have the input's dtype torch.float32, got torch.float64"),
    "hx shape": (dict(hx=lambda kw: torch.randn(1, B, H)), ValueError, r"hx must have shape \(B, H\) = \(3, 5\), got \(1, 3, 5\)"),
    "hx batch": (dict(hx=lambda kw: torch.randn(B + 1, H)), ValueError, r"hx must have shape \(B, H\) = \(3, 5\), got \(4, 5\)"),
    "hx device": (dict(hx=lambda kw: torch.empty(B, H, device="meta")), RuntimeError, r"hx must be on the input's device cpu, got meta"),
    "bias shape": (dict(bias_hh=lambda kw: torch.randn(1, H)), ValueError, r"bias_hh must have shape \(H,\) = \(5,\), got \(1, 5\)"),
    "bias type": (dict(bias_ih=[0.0] * H), RuntimeError, r"Expected a value of type 'Optional\[Tensor\]' for argument 'bias_ih' but instead found type 'list'"),

    "lengths dtype": (dict(lengths=torch.tensor([1.0, 2.0, 3.0])), TypeError, r"lengths must be an integer tensor, a list of ints or None, got a torch.float32 tensor"),
    "lengths bool": (dict(lengths=torch.tensor([True, True, False])), TypeError, r"lengths must be an integer tensor, a list of ints or None, got a torch.bool tensor"),
    "lengths numpy float": (dict(lengths=np.array([1.0, 2.0, 3.0])), TypeError, r"lengths given as a numpy array must have an integer dtype, got float64"),
    "lengths shape": (dict(lengths=torch.tensor([1, 2, 3, 4])), ValueError, r"lengths must have shape \(B,\) = \(3,\), got \(4,\)"),
    "lengths 2-D": (dict(lengths=torch.tensor([[1, 2, 3]])), ValueError, r"lengths must have shape \(B,\) = \(3,\), got \(1, 3\)"),
    "lengths > T": (dict(lengths=torch.tensor([1, 7, 3])), ValueError, r"lengths must be in \[0, T=6\], got min 1 and max 7"),
    "lengths < 0": (dict(lengths=torch.tensor([1, -1, 3])), ValueError, r"lengths must be in \[0, T=6\], got min -1 and max 3"),
    "lengths list": (dict(lengths=[1, 2.5, 3]), TypeError, r"lengths given as a list must hold ints"),
    "truncate 0": (dict(truncate=0), ValueError, r"truncate must be an int >= 1 or None, got 0"),
    "truncate -3": (dict(truncate=-3), ValueError, r"truncate must be an int >= 1 or None, got -3"),
    "truncate float": (dict(truncate=2.5), TypeError, r"truncate must be an int >= 1 or None, got 2.5"),
    "truncate bool": (dict(truncate=True), TypeError, r"truncate must be an int >= 1 or None, got True"),
    "nonlinearity": (dict(nonlinearity="sigmoid"), ValueError, r"nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"),
}


@pytest.mark.parametrize("impl", [functional, reference], ids=["functional", "reference"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(impl, name):
    override, exc, pattern = BAD[name]
    kw, opts = args(**override)
    with pytest.raises(exc, match=pattern):
        impl.rnn(kw["input"], kw["hx"], kw["weight_ih"], kw["weight_hh"], kw["bias_ih"],
                 kw["bias_hh"], **opts)


def test_batch_first_names_its_layout():
    kw, _ = args()
    with pytest.raises(ValueError, match=r"input must be 3-D \(B, T, I\)"):
        functional.rnn(kw["input"][0], None, kw["weight_ih"], kw["weight_hh"], batch_first=True)


# The raw ops check again, since they can be called directly: no argument may
# reach the kernel and touch memory out of bounds.
def raw_fwd(**override):
    kw, _ = args()
    call = dict(input=kw["input"].detach(), hx=kw["hx"].detach(), weight_ih=kw["weight_ih"].detach(),
                weight_hh=kw["weight_hh"].detach(), bias_ih=None, bias_hh=None, lengths=None,
                nonlinearity="tanh", reverse=False)
    call.update(override)
    return torch.ops.rnnkern.elman_fwd(*call.values())


RAW_BAD = {
    "lengths > T": (dict(lengths=torch.tensor([1, 9, 2])), ValueError, r"lengths must be in \[0, T=6\], got min 1 and max 9"),
    "lengths shape": (dict(lengths=torch.tensor([1, 2])), ValueError, r"lengths must have shape \(B,\) = \(3,\), got \(2,\)"),
    "lengths dtype": (dict(lengths=torch.tensor([1, 2, 3], dtype=torch.int32)), TypeError, r"lengths must be an int64 tensor, got torch.int32"),
    "hx shape": (dict(hx=torch.randn(B, H + 2)), ValueError, r"hx must have shape \(B, H\) = \(3, 5\), got \(3, 7\)"),
    "weight_ih shape": (dict(weight_ih=torch.randn(H, I + 1)), ValueError, r"input has inconsistent input_size: got I=4, expected 5 \(weight_ih is \(5, 5\)\)"),
    "bias shape": (dict(bias_ih=torch.randn(H + 1)), ValueError, r"bias_ih must have shape \(H,\) = \(5,\), got \(6,\)"),
    "dtype": (dict(hx=torch.randn(B, H, dtype=torch.float64)), TypeError, r"hx must have the input's dtype torch.float32, got torch.float64"),
    "nonlinearity": (dict(nonlinearity="gelu"), ValueError, r"nonlinearity must be 'tanh' or 'relu', got 'gelu'"),
    "input dim": (dict(input=torch.randn(T, B)), ValueError, r"input must be 3-D \(T, B, I\), got shape \(6, 3\)"),
}


@pytest.mark.parametrize("name", list(RAW_BAD))
def test_raw_op_checks(name):
    override, exc, pattern = RAW_BAD[name]
    with pytest.raises(exc, match=pattern):
        raw_fwd(**override)


def test_raw_bwd_checks_shapes_and_truncate():
    kw, _ = args()
    x, h0, wi, wh = (kw[k].detach() for k in ("input", "hx", "weight_ih", "weight_hh"))
    out, h_n = torch.ops.rnnkern.elman_fwd(x, h0, wi, wh, None, None, None, "tanh", False)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(T, B, H\) = \(6, 3, 5\), got \(5, 3, 5\)"):
        torch.ops.rnnkern.elman_bwd(out[:5], h_n, x, h0, wi, wh, out, None, "tanh", False, 0)
    with pytest.raises(ValueError, match=r"output must have shape \(T, B, H\) = \(6, 3, 5\), got \(6, 3, 4\)"):
        torch.ops.rnnkern.elman_bwd(out, h_n, x, h0, wi, wh, out[..., :4], None, "tanh", False, 0)
    with pytest.raises(ValueError, match=r"truncate must be >= 1 \(or 0 for none\), got -1"):
        torch.ops.rnnkern.elman_bwd(out, h_n, x, h0, wi, wh, out, None, "tanh", False, -1)

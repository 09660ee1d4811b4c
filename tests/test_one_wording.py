"""Each argument check is made once, by the op, and every error has one wording.

For each wrong argument the raw op, the functional API and the reference must
raise the same exception type; the op's message is its name, then the words;
the API's message is the op's own (so the op made the check, not Python), and
the reference (which calls no op) says the same words. See rnnkern/_checks.py.
"""

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rnnkern import functional, reference

T, B, I, H, O = 5, 3, 4, 7, 6


def _raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value).splitlines()[0]


def assert_one_wording(op_name, raw, api, ref, expected):
    """raw, api, ref: calls that must fail alike; expected: a regex the words must match."""
    raw_type, raw_msg = _raised(raw)
    api_type, api_msg = _raised(api)
    ref_type, ref_msg = _raised(ref)
    prefix = f"{op_name}: "
    assert raw_msg.startswith(prefix), raw_msg
    words = raw_msg[len(prefix):]
    assert (api_type, api_msg) == (raw_type, raw_msg), "the API must leave the check to the op"
    assert (ref_type, ref_msg) == (raw_type, words), "the reference must say the op's words"
    assert re.fullmatch(expected, words), words


def elman_args(dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(input=r(T, B, I), hx=r(B, H), weight_ih=r(H, I), weight_hh=r(H, H),
                bias_ih=r(H), bias_hh=r(H), lengths=torch.tensor([5, 1, 3]),
                nonlinearity="tanh")


ELMAN_BAD = {
    "input int": (dict(input=torch.ones(T, B, I, dtype=torch.int64)), r"input must be float32 or float64, got torch.int64"),
    "input 2-D": (dict(input=torch.randn(T, B, dtype=torch.float64)), r"input must be 3-D \(T, B, I\), got shape \(5, 3\)"),
    "weight_hh 1-D": (dict(weight_hh=torch.randn(H, dtype=torch.float64)), r"weight_hh must be 2-D \(H, H\), got shape \(7,\)"),
    "weight_hh shape": (dict(weight_hh=torch.randn(H, H + 1, dtype=torch.float64)), r"weight_hh must have shape \(H, H\) = \(7, 7\), got \(7, 8\)"),
    "weight_hh dtype": (dict(weight_hh=torch.randn(H, H)), r"weight_hh must have the input's dtype torch.float64, got torch.float32"),
    "weight_ih rows": (dict(weight_ih=torch.randn(H + 1, I, dtype=torch.float64)), r"weight_ih must have shape \(H, I\) = \(7, 4\), got \(8, 4\)"),
    "input_size": (dict(weight_ih=torch.randn(H, I + 1, dtype=torch.float64)), r"input has inconsistent input_size: got I=4, expected 5 \(weight_ih is \(7, 5\)\)"),
    "hx shape": (dict(hx=torch.randn(B + 1, H, dtype=torch.float64)), r"hx must have shape \(B, H\) = \(3, 7\), got \(4, 7\)"),
    "hx meta": (dict(hx=torch.empty(B, H, dtype=torch.float64, device="meta")), r"hx must be on the input's device cpu, got meta"),
    "bias_ih shape": (dict(bias_ih=torch.randn(H + 1, dtype=torch.float64)), r"bias_ih must have shape \(H,\) = \(7,\), got \(8,\)"),
    "bias_hh 2-D": (dict(bias_hh=torch.randn(1, H, dtype=torch.float64)), r"bias_hh must have shape \(H,\) = \(7,\), got \(1, 7\)"),
    "lengths shape": (dict(lengths=torch.tensor([1, 2, 3, 4])), r"lengths must have shape \(B,\) = \(3,\), got \(4,\)"),
    "lengths > T": (dict(lengths=torch.tensor([1, 6, 2])), r"lengths must be in \[0, T=5\], got min 1 and max 6"),
    "lengths < 0": (dict(lengths=torch.tensor([1, -2, 2])), r"lengths must be in \[0, T=5\], got min -2 and max 2"),
    "lengths meta": (dict(lengths=torch.empty(B, dtype=torch.int64, device="meta")), r"lengths must be on the CPU or on the input's device cpu, got meta"),
    "nonlinearity": (dict(nonlinearity="gelu"), r"nonlinearity must be 'tanh' or 'relu', got 'gelu'"),
}


@pytest.mark.parametrize("name", list(ELMAN_BAD))
def test_elman_layer_one_wording(name):
    override, expected = ELMAN_BAD[name]
    a = {**elman_args(), **override}
    pos = [a[k] for k in ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    kw = dict(nonlinearity=a["nonlinearity"], lengths=a["lengths"])
    assert_one_wording(
        "rnnkern.elman_fwd",
        lambda: torch.ops.rnnkern.elman_fwd(*pos, a["lengths"], a["nonlinearity"], False),
        lambda: functional.rnn(*pos, **kw),
        lambda: reference.rnn(*pos, **kw), expected)


def gated_args(mode, dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    G = (4 if mode == "lstm" else 3) * H
    return dict(input=r(T, B, I), h0=r(B, H), c0=r(B, H) if mode == "lstm" else None,
                weight_ih=r(G, I), weight_hh=r(G, H), bias_ih=r(G), bias_hh=r(G),
                lengths=torch.tensor([2, 5, 4]))


def gated_bad(mode):
    G, g = ((4 * H, "4H") if mode == "lstm" else (3 * H, "3H"))
    d = torch.float64
    bad = {
        "input 2-D": (dict(input=torch.randn(T, B, dtype=d)), r"input must be 3-D \(T, B, I\), got shape \(5, 3\)"),
        "weight_hh rows": (dict(weight_hh=torch.randn(G - 1, H, dtype=d)), rf"weight_hh must have {g} rows \({G // H} gates of H >= 1\), got shape \({G - 1}, 7\)"),
        "weight_hh width": (dict(weight_hh=torch.randn(G, H + 1, dtype=d)), rf"weight_hh must have shape \({g}, H\) = \({G}, 7\) without a projection, got \({G}, 8\)"),
        "input_size": (dict(weight_ih=torch.randn(G, I + 2, dtype=d)), rf"input has inconsistent input_size: got I=4, expected 6 \(weight_ih is \({G}, 6\)\)"),
        "bias_hh shape": (dict(bias_hh=torch.randn(G + 1, dtype=d)), rf"bias_hh must have shape \({g},\) = \({G},\), got \({G + 1},\)"),
        "h0 shape": (dict(h0=torch.randn(B + 1, H, dtype=d)), r"h0 must have shape \(B, P\) = \(3, 7\), got \(4, 7\)"),
        "h0 dtype": (dict(h0=torch.randn(B, H)), r"h0 must have the input's dtype torch.float64, got torch.float32"),
        "lengths > T": (dict(lengths=torch.tensor([2, 9, 4])), r"lengths must be in \[0, T=5\], got min 2 and max 9"),
    }
    if mode == "lstm":
        bad["c0 shape"] = (dict(c0=torch.randn(B, H + 1, dtype=d)), r"c0 must have shape \(B, H\) = \(3, 7\), got \(3, 8\)")
        bad["weight_hr shape"] = (dict(weight_hr=torch.randn(3, H, dtype=d)), r"weight_hr must have shape \(P, H\) = \(7, 7\), got \(3, 7\)")
    return bad


@pytest.mark.parametrize("mode, name", [(m, n) for m in ("lstm", "gru") for n in gated_bad(m)])
def test_gated_layer_one_wording(mode, name):
    override, expected = gated_bad(mode)[name]
    a = {**gated_args(mode), "weight_hr": None, **override}
    w = [a[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    if mode == "lstm":
        api = lambda: functional.lstm(a["input"], (a["h0"], a["c0"]), *w, a["weight_hr"], lengths=a["lengths"])  # noqa: E731
        ref = lambda: reference.lstm(a["input"], (a["h0"], a["c0"]), *w, a["weight_hr"], lengths=a["lengths"])  # noqa: E731
    else:
        api = lambda: functional.gru(a["input"], a["h0"], *w, lengths=a["lengths"])  # noqa: E731
        ref = lambda: reference.gru(a["input"], a["h0"], *w, lengths=a["lengths"])  # noqa: E731
    raw = lambda: torch.ops.rnnkern.layer_fwd(a["input"], a["h0"], a["c0"], *w, a["weight_hr"],  # noqa: E731
                                              a["lengths"], mode, False)
    assert_one_wording("rnnkern.layer_fwd", raw, api, ref, expected)


def loss_args(loss="cross_entropy", dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    a = elman_args(dtype)
    a["target"] = (torch.randint(0, O, (T, B), generator=g) if loss == "cross_entropy"
                   else torch.randn(T, B, O, generator=g, dtype=dtype))
    a.update(weight_out=torch.randn(O, H, generator=g, dtype=dtype),
             bias_out=torch.randn(O, generator=g, dtype=dtype),
             loss_mask=torch.rand(T, B, generator=g, dtype=dtype), loss=loss, steps="all",
             reduction="mean", label_smoothing=0.0)
    return a


d64 = torch.float64
LOSS_BAD = {
    "target shape": (dict(target=torch.zeros(T, B + 1, dtype=torch.int64)), r"target must have shape \(T, B\) = \(5, 3\), got \(5, 4\)"),
    "target dtype": (dict(target=torch.zeros(T, B)), r"target must be int64 class indices for loss='cross_entropy', got torch.float32"),
    "target range": (dict(target=torch.full((T, B), O)), r"target must hold class indices in \[0, O=6\) or ignore_index=-100, got 6 at \[t=0, b=0\]"),
    "mse target": (dict(loss="mse", target=torch.zeros(T, B, O + 1, dtype=d64)), r"target must have shape \(T, B, O\) = \(5, 3, 6\), got \(5, 3, 7\)"),
    "loss_mask shape": (dict(loss_mask=torch.ones(B, T, dtype=d64)), r"loss_mask must have shape \(T, B\) = \(5, 3\), got \(3, 5\)"),
    "loss_mask negative": (dict(loss_mask=torch.full((T, B), -1.0, dtype=d64)), r"loss_mask must be finite and >= 0, got -1"),
    "loss": (dict(loss="nll"), r"loss must be 'cross_entropy' or 'mse', got 'nll'"),
    "reduction": (dict(reduction="avg"), r"reduction must be one of 'mean', 'sum', 'seq_mean', 'seq_sum', 'none', got 'avg'"),
    "steps": (dict(steps="first"), r"steps must be 'all' or 'last', got 'first'"),
    "label_smoothing": (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\], got 1.5"),
    "weight_out 1-D": (dict(weight_out=torch.randn(O, dtype=d64)), r"weight_out must be 2-D \(O, H\), got shape \(6,\)"),
    "weight_out width": (dict(weight_out=torch.randn(O, H + 1, dtype=d64)), r"weight_out must have shape \(O, H\) = \(6, 7\), got \(6, 8\)"),
    "weight_out empty": (dict(weight_out=torch.randn(0, H, dtype=d64)), r"the head needs O >= 1 outputs, got weight_out of shape \(0, 7\)"),
    "bias_out shape": (dict(bias_out=torch.randn(O + 1, dtype=d64)), r"bias_out must have shape \(O,\) = \(6,\), got \(7,\)"),
    "steps last": (dict(steps="last", lengths=torch.tensor([2, 0, 5])), r"steps='last' needs every sequence to have a last step: lengths must be >= 1, got min 0"),
}


def _loss_call(impl, a, mode=None, hx=None):
    return impl.rnn_loss(a["input"], a["target"], hx if mode else a["hx"], *w_of(a, mode),
                         a["weight_out"], a["bias_out"], loss=a["loss"], mode=mode,
                         lengths=a["lengths"], loss_mask=a["loss_mask"], steps=a["steps"],
                         reduction=a["reduction"], label_smoothing=a["label_smoothing"])


def w_of(a, mode):
    if mode is None:
        return [a[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return [a["gated"][k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


@pytest.mark.parametrize("name", list(LOSS_BAD))
def test_elman_loss_one_wording(name):
    override, expected = LOSS_BAD[name]
    a = {**loss_args(override.get("loss", "cross_entropy")), **override}
    raw = lambda: torch.ops.rnnkern.elman_loss_fwd(  # noqa: E731
        a["input"], a["target"], a["hx"], *w_of(a, None), a["weight_out"], a["bias_out"],
        a["lengths"], a["loss_mask"], "tanh", a["loss"], a["steps"], a["reduction"], -100,
        a["label_smoothing"], True, 0)
    assert_one_wording("rnnkern.elman_loss_fwd", raw, lambda: _loss_call(functional, a),
                       lambda: _loss_call(reference, a), expected)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode, name", [(m, n) for m in ("lstm", "gru") for n in LOSS_BAD])
def test_gated_loss_one_wording_before_the_layer_runs(mode, name):
    """The head's checks run (head_loss_check) before the layer op: a wrong
    target or head never costs a layer's forward."""
    override, expected = LOSS_BAD[name]
    a = {**loss_args(override.get("loss", "cross_entropy")), **override}
    a["gated"] = gated_args(mode)
    hx = (a["gated"]["h0"], a["gated"]["c0"]) if mode == "lstm" else a["gated"]["h0"]
    x = a["input"]
    raw = lambda: torch.ops.rnnkern.head_loss_fwd(  # noqa: E731
        torch.zeros(T, B, H, dtype=x.dtype), a["target"], a["weight_out"], a["bias_out"],
        a["lengths"], a["loss_mask"], a["loss"], a["steps"], a["reduction"], -100,
        a["label_smoothing"], True, 0)
    assert_one_wording("rnnkern.head_loss_fwd", raw, lambda: _loss_call(functional, a, mode, hx),
                       lambda: _loss_call(reference, a, mode, hx), expected)
    log = _OpLog()
    with log, pytest.raises(Exception):
        _loss_call(functional, a, mode, hx)
    assert "rnnkern.head_loss_check" in log.ops and "rnnkern.layer_fwd" not in log.ops, log.ops


def test_none_for_a_required_tensor_is_named():
    a = elman_args()
    with pytest.raises(TypeError, match=r"^rnnkern.elman_fwd: hx must be a tensor, got None"):
        torch.ops.rnnkern.elman_fwd(a["input"], None, a["weight_ih"], a["weight_hh"], None, None,
                                    None, "tanh", False)
    g = gated_args("gru")
    with pytest.raises(TypeError, match=r"^rnnkern.layer_fwd: weight_ih must be a tensor, got None"):
        torch.ops.rnnkern.layer_fwd(g["input"], g["h0"], None, None, g["weight_hh"], None, None,
                                    None, None, "gru", False)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_head_loss_check_opcheck(loss):
    a = loss_args(loss)
    args = (a["input"], H, a["target"], a["weight_out"], a["bias_out"], a["lengths"],
            a["loss_mask"], loss, "all", "mean", -100, 0.0)
    torch.ops.rnnkern.head_loss_check(*args)  # valid: returns nothing
    torch.library.opcheck(torch.ops.rnnkern.head_loss_check.default, args)

"""bfloat16 and float16 outside autocast: a model converted with
``.to(torch.bfloat16)`` (or float16), and the functions called on such tensors,
compute in float32 on their tensors cast up and give their outputs back in the
lower dtype, as torch.nn's modules return them.

The specification (rnnkern/reference.py) is the float32 call with its outputs
rounded; the kernels' float32 sums differ from the reference's in the last
float32 bits, so against it the rounded outputs agree to one unit in the last
place of the lower dtype. Against rnnkern's own float32 call on the same
values they are bitwise equal, gradients included."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkern
from rnnkern import functional, reference

LOW = (torch.bfloat16, torch.float16)
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # spacing at 1
KINDS = ("rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru")


def module_pair(kind, low, **kw):
    """(rnnkern's module in ``low``, the same module in float32, nn's module in ``low``)."""
    torch.manual_seed(11)
    name = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "lstm": "LSTM", "lstm_proj": "LSTM",
            "gru": "GRU"}[kind]
    if kind == "rnn_relu":
        kw["nonlinearity"] = "relu"
    if kind == "lstm_proj":
        kw["proj_size"] = 5
    f32 = getattr(rnnkern, name)(6, 9, **kw)
    ours = getattr(rnnkern, name)(6, 9, **kw).to(low)
    ours.load_state_dict(f32.state_dict())  # rounded to low
    f32.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    theirs = getattr(nn, name)(6, 9, **kw).to(low)
    theirs.load_state_dict(ours.state_dict())
    return ours, f32, theirs


def flat(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["padded", "batch_first", "unbatched", "packed"])
def test_module_is_the_float32_module_rounded_forward_and_backward(kind, low, form):
    """Outputs, final states and every parameter's and the input's gradient
    are those of the float32 module on the values cast up, rounded to ``low``
    (bitwise); their dtypes are nn's (``low`` throughout)."""
    bf = form == "batch_first"
    ours, f32, _ = module_pair(kind, low, num_layers=2, bidirectional=True, batch_first=bf)
    T, B = 7, 3
    x = torch.randn(B if bf else T, T if bf else B, 6).to(low)
    if form == "unbatched":
        x = x[:, 0]
    lengths = [7, 2, 5]

    def run(model, inp):
        inp = inp.detach().requires_grad_()
        fed = pack_padded_sequence(inp, lengths, enforce_sorted=False) if form == "packed" else inp
        out, state = model(fed)
        return inp, (out.data if form == "packed" else out), flat(state)

    xl, out_l, state_l = run(ours, x)
    x32, out_32, state_32 = run(f32, x.float())
    assert out_l.dtype == low and all(s.dtype == low for s in state_l)
    assert torch.equal(out_l, out_32.to(low))
    for a, b in zip(state_l, state_32):
        assert torch.equal(a, b.to(low))
    # The same upstream gradient (a value of the lower dtype) into both.
    g = torch.randn_like(out_32).to(low)
    gs = [torch.randn_like(s).to(low) for s in state_32]
    torch.autograd.backward([out_l, *state_l], [g, *gs])
    torch.autograd.backward([out_32, *state_32], [g.float(), *(s.float() for s in gs)])
    assert xl.grad.dtype == low and torch.equal(xl.grad, x32.grad.to(low))
    for (name, p), q in zip(ours.named_parameters(), f32.parameters()):
        assert p.grad.dtype == low, name
        assert torch.equal(p.grad, q.grad.to(low)), name


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("kind", KINDS)
def test_module_agrees_with_nn_in_the_lower_dtype(kind, low):
    """nn's module in the lower dtype rounds at every operation, rnnkern's once
    at the end: both are near the float32 model, rnnkern's within half a unit
    in the last place of each output (the rounding alone)."""
    ours, f32, theirs = module_pair(kind, low, num_layers=2)
    x = torch.randn(40, 4, 6).to(low)
    out, _ = ours(x)
    out_nn, _ = theirs(x)
    out_32, _ = f32(x.float())
    assert out_nn.dtype == out.dtype == low
    scale = out_32.abs().clamp(min=2.0 ** -6)
    assert ((out.float() - out_32).abs() <= 0.5 * ULP[low] * scale * 1.0001).all()
    torch.testing.assert_close(out.float(), out_nn.float(), rtol=0, atol=40 * ULP[low])


def call(fn_module, kind, args, **kw):
    if kind.startswith("rnn_"):
        return fn_module.rnn(*args, nonlinearity=kind[4:], **kw)
    if kind == "lstm_proj":
        return fn_module.lstm(*args, **kw)
    return getattr(fn_module, kind)(*args, **kw)


def layer_args(kind, low, hx=True, B=3, I=5, H=7, P=4):
    torch.manual_seed(12)
    G = {"rnn_tanh": H, "rnn_relu": H, "lstm": 4 * H, "lstm_proj": 4 * H, "gru": 3 * H}[kind]
    Pk = P if kind == "lstm_proj" else H
    x = torch.randn(6, B, I)
    w_ih, w_hh = torch.randn(G, I) * 0.4, torch.randn(G, Pk) * 0.4
    b_ih, b_hh = torch.randn(G) * 0.1, torch.randn(G) * 0.1
    h0 = torch.randn(B, Pk) if hx else None
    if kind.startswith("lstm") and hx:
        h0 = (h0, torch.randn(B, H))
    args = [x, h0, w_ih, w_hh, b_ih, b_hh]
    if kind == "lstm_proj":
        args.append(torch.randn(P, H) * 0.4)
    cast = lambda a: (tuple(t.to(low) for t in a) if isinstance(a, tuple)
                      else None if a is None else a.to(low))
    return [cast(a) for a in args]


def rounded_grads(fn, args, kw, low):
    """The outputs of fn(*args, **kw) and the gradients of every tensor in args
    under a fixed upstream gradient: values of ``low``, in each output's dtype."""
    leaves = []

    def leaf(a):
        if isinstance(a, tuple):
            return tuple(leaf(t) for t in a)
        if a is None:
            return None
        t = a.detach().requires_grad_()
        leaves.append(t)
        return t

    args = [leaf(a) for a in args]
    out, state = fn(args, kw)
    outs = [out, *flat(state)]
    torch.manual_seed(13)
    grads = [torch.randn(o.shape).to(low).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return outs, [t.grad for t in leaves]


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["plain", "no_hx", "lengths", "truncate_reverse"])
def test_functions_against_the_reference_and_the_float32_call(kind, low, variant):
    kw = {"lengths": [6, 1, 4]} if variant in ("lengths", "truncate_reverse") else {}
    if variant == "truncate_reverse":
        kw.update(truncate=2, reverse=True)
    args = layer_args(kind, low, hx=variant != "no_hx")
    got, got_g = rounded_grads(lambda a, k: call(functional, kind, a, **k), args, kw, low)
    want, want_g = rounded_grads(lambda a, k: call(reference, kind, a, **k), args, kw, low)
    args32 = [tuple(t.float() for t in a) if isinstance(a, tuple)
              else None if a is None else a.float() for a in args]

    def f32_call(a, k):
        out, state = call(functional, kind, a, **k)
        return out, state

    base, base_g = rounded_grads(f32_call, args32, kw, low)
    for g, w, b in zip(got + got_g, want + want_g, base + base_g):
        assert g.dtype == w.dtype == low
        assert torch.equal(g, b.to(low))  # the float32 call, rounded
        # The reference: the same up to the kernels' last float32 bits, which
        # may round the other way.
        torch.testing.assert_close(g.float(), w.float(), rtol=ULP[low], atol=ULP[low] * 2.0 ** -4)


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_rnn_loss_in_the_lower_dtype(mode, low, loss):
    """rnn_loss: the loss, h_n and step_loss in the lower dtype (the float32
    call's, rounded), the gradients in each tensor's dtype; grad_norm stays
    float32 (backward fills that tensor in)."""
    kind = mode
    args = layer_args(kind, low)
    x = args[0]
    O = 5
    torch.manual_seed(14)
    w_out, b_out = (torch.randn(O, 7) * 0.4).to(low), (torch.randn(O) * 0.1).to(low)
    target = (torch.randint(0, O, x.shape[:2]) if loss == "cross_entropy"
              else torch.randn(*x.shape[:2], O).to(low))
    kw = dict(loss=loss, mode=mode, lengths=[6, 2, 5], reduction="seq_mean", return_details=True)

    def run(fn, cast):
        leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a
                  for a in (args[0], cast(args[2]), cast(args[3]), cast(args[4]), cast(args[5]),
                            cast(w_out), cast(b_out))]
        hx = args[1] if not isinstance(args[1], tuple) else tuple(cast(h) for h in args[1])
        xx = cast(leaves[0])
        t = target if target.dtype == torch.int64 else cast(target)
        d = fn(xx, t, cast(hx) if isinstance(hx, torch.Tensor) else hx, *leaves[1:5],
               leaves[5], leaves[6], **kw)
        d.loss.backward()
        return d, [leaves[0].grad, *(l.grad for l in leaves[1:])]

    same = lambda a: a
    up = lambda a: a.float() if isinstance(a, torch.Tensor) else a
    d, g = run(functional.rnn_loss, same)
    r, rg = run(reference.rnn_loss, same)
    b, bg = run(functional.rnn_loss, up)
    assert d.loss.dtype == d.step_loss.dtype == low
    assert all(h.dtype == low for h in flat(d.h_n))
    assert d.grad_norm.dtype == torch.float32 and torch.isfinite(d.grad_norm).all()
    assert torch.equal(d.grad_norm, b.grad_norm)
    assert torch.equal(d.loss, b.loss.to(low))
    assert torch.equal(d.step_loss, b.step_loss.to(low))
    for h, hb in zip(flat(d.h_n), flat(b.h_n)):
        assert torch.equal(h, hb.to(low))
    for got, want in zip(g, rg):
        assert got.dtype == low
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * ULP[low],
                                   atol=ULP[low] * 2.0 ** -4)
    torch.testing.assert_close(d.loss.float(), r.loss.float(), rtol=ULP[low], atol=0)
    # Without details, the loss alone, the same value.
    plain = functional.rnn_loss(x, target, args[1], *args[2:6], w_out, b_out,
                                **{**kw, "return_details": False})
    assert plain.dtype == low and torch.equal(plain, d.loss)


@pytest.mark.parametrize("low", LOW)
def test_rnnloss_module_of_a_lower_precision_model(low):
    torch.manual_seed(15)
    rnn, head = rnnkern.GRU(4, 7), nn.Linear(7, 5)
    loss32 = rnnkern.RNNLoss(rnn, head)
    loss_low = rnnkern.RNNLoss(rnnkern.GRU(4, 7).to(low), nn.Linear(7, 5).to(low))
    loss_low.load_state_dict(loss32.state_dict())
    loss32.load_state_dict({k: v.float() for k, v in loss_low.state_dict().items()})
    x, target = torch.randn(6, 3, 4).to(low), torch.randint(0, 5, (6, 3))
    value = loss_low(x, target)
    value32 = loss32(x.float(), target)
    assert value.dtype == low and torch.equal(value, value32.to(low))
    value.backward()
    value32.backward()
    for p, q in zip(loss_low.parameters(), loss32.parameters()):
        assert p.grad.dtype == low and torch.equal(p.grad, q.grad.to(low))


@pytest.mark.parametrize("low", LOW)
def test_mixed_dtypes_are_refused_by_name(low):
    """Outside autocast a lower-precision call takes one dtype: each other
    tensor is named, with the input's dtype and its own."""
    x, hx, w_ih, w_hh, b_ih, b_hh = layer_args("gru", low)
    for i, name in [(1, "hx"), (2, "weight_ih"), (3, "weight_hh"), (5, "bias_hh")]:
        args = [x, hx, w_ih, w_hh, b_ih, b_hh]
        args[i] = args[i].float()
        for fn in (functional.gru, reference.gru):
            with pytest.raises(TypeError, match=rf"^{name} must have the input's dtype "
                                                rf"{low}, got torch.float32$"):
                fn(*args)
    other = torch.float16 if low == torch.bfloat16 else torch.bfloat16
    with pytest.raises(TypeError, match=rf"^weight_out must have the input's dtype {low}, "
                                        rf"got {other}$"):
        functional.rnn_loss(x, torch.randint(0, 5, (6, 3)), None, w_ih, w_hh, b_ih, b_hh,
                            torch.randn(5, 7).to(other), mode="gru")
    # The target's rule depends on the loss; each message names the dtype given.
    for fn in (functional.rnn_loss, reference.rnn_loss):
        for bad in (torch.randn(6, 3, 5), torch.randint(0, 5, (6, 3, 5))):
            with pytest.raises(TypeError, match=rf"^target must have the input's dtype {low} "
                                                rf"for loss='mse', got {bad.dtype}$"):
                fn(x, bad, None, w_ih, w_hh, b_ih, b_hh, torch.randn(5, 7).to(low), mode="gru",
                   loss="mse")
    with pytest.raises(TypeError, match=rf"target must be int64 class indices for "
                                        rf"loss='cross_entropy', got {low}"):
        functional.rnn_loss(x, torch.randn(6, 3).to(low), None, w_ih, w_hh, b_ih, b_hh,
                            torch.randn(5, 7).to(low), mode="gru")
    # A float32 input with a lower-precision weight: the op names the weight.
    with pytest.raises(TypeError, match=rf"weight_ih must have the input's dtype torch.float32, "
                                        rf"got {low}"):
        functional.gru(x.float(), None, w_ih, w_hh.float())
    # Modules: nn's check, with both ways out named.
    model = rnnkern.LSTM(5, 7).to(low)
    with pytest.raises(ValueError, match=rf"input dtype \(torch.float32\) does not match the "
                                         rf"RNN's weight dtype \({low}\): convert the input with "
                                         rf"input.to\({low}\) or the model with "
                                         rf"model.to\(torch.float32\)"):
        model(x.float())
    with pytest.raises(RuntimeError, match=rf"hx\[1\] must have the input's dtype {low}, "
                                           rf"got torch.float32"):
        model(x, (torch.randn(1, 3, 7).to(low), torch.randn(1, 3, 7)))
    with pytest.raises(ValueError, match=rf"input dtype \({low}\) does not match the RNN's "
                                         rf"weight dtype \(torch.float32\)"):
        rnnkern.LSTM(5, 7)(x)
    # A parameter left in another dtype is named, not run in float32 with the rest.
    for other in (torch.float32, torch.float64):
        mixed = rnnkern.GRU(5, 7, num_layers=2).to(low)
        mixed.bias_hh_l1.data = mixed.bias_hh_l1.data.to(other)
        with pytest.raises(TypeError, match=rf"^bias_hh_l1 must have the model's dtype {low} "
                                            rf"\(that of weight_ih_l0\), got {other}$"):
            mixed(x)


@pytest.mark.parametrize("low", LOW)
def test_autocast_keeps_its_float32_policy(low):
    """Under autocast a lower-precision model still runs and returns float32
    (autocast's policy for the ops it keeps in float32), as before."""
    ours, f32, _ = module_pair("lstm", low)
    x = torch.randn(5, 3, 6)
    with torch.autocast("cpu", dtype=low):
        out, (h, c) = ours(x.to(low))
    assert out.dtype == h.dtype == c.dtype == torch.float32
    assert torch.equal(out, f32(x.to(low).float())[0])


def test_compiled_bfloat16_model_matches_eager():
    torch._dynamo.reset()
    ours, _, _ = module_pair("gru", torch.bfloat16, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 6).bfloat16()
    compiled = torch.compile(ours, fullgraph=True)
    out, h = compiled(x)
    want, want_h = ours(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want) and torch.equal(h, want_h)
    torch._dynamo.reset()

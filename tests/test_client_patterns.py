"""Patterns of client code that torch.nn's recurrent modules allow, with
rnnkern's modules in their place: the output modified in place before
backward, torch.compile(fullgraph=True) for inference, torch.jit.trace, and
torch.autocast feeding bfloat16 or float16 activations (or a bfloat16 model)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkern
from rnnkern import functional, reference
from helpers import TOL, assert_close

CELLS = ("RNN", "GRU", "LSTM")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pair(name, dtype=torch.float64, **kw):
    """nn's module and rnnkern's with the same weights."""
    torch.manual_seed(7)
    ours = getattr(rnnkern, name)(4, 7, dtype=dtype, **kw)
    theirs = getattr(nn, name)(4, 7, dtype=dtype, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def modified_in_place(module, x):
    """A loss over the output changed in place before backward (a residual add
    and an in-place relu), and the gradients of x and every parameter."""
    x = x.detach().requires_grad_()
    module.zero_grad()
    out, _ = module(x)
    out += 0.5
    out.relu_()
    (out * out.detach().cos()).sum().backward()
    return [x.grad] + [p.grad for p in module.parameters()]


# nn.LSTM's float32 CPU path (oneDNN) refuses the in-place change itself; its
# float64 path, which these compare with, allows it, as nn.RNN and nn.GRU do.
@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bias": False}, {"batch_first": True}],
                         ids=["one-layer", "two-layer-nobias", "batch_first"])
def test_output_modified_in_place_before_backward_matches_nn(name, kw):
    ours, theirs = pair(name, **kw)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    for a, b in zip(modified_in_place(ours, x), modified_in_place(theirs, x)):
        assert_close(a, b, TOL[torch.float64], name)


@pytest.mark.parametrize("name", CELLS)
def test_output_modified_under_no_grad_before_backward_matches_nn(name):
    """A change under torch.no_grad() is no part of the graph: the gradients are
    those of the unchanged output, as nn's (the version counter still moves, so
    backward recomputes the output it reads)."""
    ours, theirs = pair(name)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    results = []
    for m in (ours, theirs):
        m.zero_grad()
        out, _ = m(x)
        with torch.no_grad():
            out.mul_(-2.0).add_(1.0)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append([p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert_close(a, b, TOL[torch.float64], name)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_output_modified_in_place_with_lengths_truncate_reverse_matches_reference(cell):
    """The recomputed output is the forward's exactly: lengths, truncation and
    the reverse direction included, in float32 (the kernels' bits)."""
    g = torch.Generator().manual_seed(3)
    T, B, I, H = 9, 4, 3, 5
    G = {"rnn": 1, "gru": 3, "lstm": 4}[cell] * H
    x = torch.randn(T, B, I, generator=g)
    ws = [torch.randn(*s, generator=g) * 0.4 for s in ((G, I), (G, H), (G,), (G,))]
    lengths = torch.tensor([9, 1, 6, 0])
    results = []
    for impl in (functional, reference):
        leaves = [t.clone().requires_grad_() for t in [x, *ws]]
        out, _ = getattr(impl, cell)(leaves[0], None, *leaves[1:], lengths=lengths, truncate=2,
                                     reverse=True)
        out.mul_(3.0)
        out.tanh_()
        out.sum().backward()
        results.append([t.grad for t in leaves])
    for a, b in zip(*results):
        assert_close(a, b, TOL[torch.float32], cell)


@pytest.mark.parametrize("name", CELLS)
def test_output_and_bias_both_modified_raises(name):
    ours, _ = pair(name)
    out, _ = ours(torch.randn(5, 3, 4, dtype=torch.float64))
    out.relu_()
    with torch.no_grad():
        ours.bias_ih_l0.add_(1.0)
    with pytest.raises(RuntimeError, match=r"output and a bias were both modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("name", ("RNN", "GRU"))
def test_output_modified_in_place_in_compile_fullgraph_code_matches_nn(name):
    """Dynamo's traced Functions do not check saved tensors' versions: the
    compiled path saves its own copy of the output, or these would differ."""
    ours, theirs = pair(name, dtype=torch.float32)
    x = torch.randn(5, 3, 4)

    def step(m):
        out, _ = m(x)
        out.relu_()
        return (out * 2).sum()

    torch.compile(step, fullgraph=True)(ours).backward()
    step(theirs).backward()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert_close(a.grad, b.grad, TOL[torch.float32], name)


@pytest.mark.parametrize("name", CELLS)
def test_compile_fullgraph_for_inference(name):
    """fullgraph under no_grad and inference_mode, as an evaluation loop after
    torch.compile runs it: no input needs a gradient there."""
    ours, _ = pair(name, dtype=torch.float32, num_layers=2)
    x = torch.randn(5, 3, 4)
    expected = ours(x)[0]
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x)[0], expected)
    with torch.inference_mode():
        assert torch.equal(compiled(x)[0], expected)
    head = nn.Linear(7, 5)
    loss = rnnkern.RNNLoss(getattr(rnnkern, name)(4, 7), head)
    target = torch.randint(0, 5, (5, 3))
    with torch.no_grad():
        assert torch.equal(torch.compile(loss, fullgraph=True)(x, target), loss(x, target))


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("grad", [True, False], ids=["traced-with-grad", "traced-no-grad"])
def test_jit_trace_runs_in_both_grad_modes(name, grad):
    """torch.jit.trace's check re-runs the module: the graph must not depend on
    the grad mode of the tracing call. The traced module then trains and infers
    as the eager one."""
    ours, _ = pair(name, dtype=torch.float32)
    x = torch.randn(5, 3, 4)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(ours, x)
    with torch.no_grad():
        assert torch.equal(traced(x)[0], ours(x)[0])
    traced(x)[0].square().sum().backward()
    traced_grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours(x)[0].square().sum().backward()
    for a, p in zip(traced_grads, ours.parameters()):
        assert torch.equal(a, p.grad)


class PackedTagger(nn.Module):
    """pack (unsorted or sorted), the RNN, pad back: the serving idiom."""

    def __init__(self, rnn, sort: bool):
        super().__init__()
        self.rnn, self.sort = rnn, sort

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=self.sort)
        out, h_n = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, h_n[0] if isinstance(h_n, tuple) else h_n


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("sort", [False, True], ids=["unsorted", "sorted"])
def test_jit_trace_of_packed_input_follows_new_batch_and_lengths(name, sort):
    """A trace of PackedSequence input holds no batch size or length of the
    tracing call: larger and smaller B, new T and lengths give nn's results."""
    ours, theirs = pair(name, batch_first=True, num_layers=2)
    traced_at = (torch.randn(4, 6, 4, dtype=torch.float64), torch.tensor([6, 2, 5, 1]))
    if sort:
        traced_at = (traced_at[0], traced_at[1].sort(descending=True).values)
    traced = torch.jit.trace(PackedTagger(ours, sort), traced_at, check_trace=False)
    for B, T in ((6, 6), (2, 9), (4, 3), (1, 1)):
        x = torch.randn(B, T, 4, dtype=torch.float64, requires_grad=True)
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        if sort:
            lengths = lengths.sort(descending=True).values
        got = traced(x, lengths)
        want = PackedTagger(theirs, sort)(x, lengths)
        for a, b, what in zip(got, want, ("output", "h_n"), strict=True):
            assert_close(a, b, TOL[torch.float64], f"{name} B={B} T={T} {what}")
        (g,) = torch.autograd.grad(got[0].sum() + got[1].sum(), x)
        (h,) = torch.autograd.grad(want[0].sum() + want[1].sum(), x)
        assert_close(g, h, TOL[torch.float64], f"{name} B={B} T={T} grad input")


@pytest.mark.parametrize("name", CELLS)
def test_jit_trace_of_rnnloss_under_no_grad_then_trains(name):
    torch.manual_seed(0)
    loss = rnnkern.RNNLoss(getattr(rnnkern, name)(4, 7), nn.Linear(7, 5))
    x, target = torch.randn(5, 3, 4), torch.randint(0, 5, (5, 3))
    with torch.no_grad():
        traced = torch.jit.trace(loss, (x, target))
    traced(x, target).backward()
    traced_grads = [p.grad.clone() for p in loss.parameters()]
    loss.zero_grad()
    loss(x, target).backward()
    for a, p in zip(traced_grads, loss.parameters()):
        assert torch.equal(a, p.grad)


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_autocast_lower_precision_input_runs_in_float32(name, low, packed):
    """Under autocast a Linear before the layer hands it bfloat16 (or float16):
    the layer runs float32 on that input cast up, returns float32, and the
    gradient reaches the Linear through the cast."""
    torch.manual_seed(1)
    proj = nn.Linear(6, 4)
    ours = getattr(rnnkern, name)(4, 7, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 6)
    lengths = [5, 2, 4]

    def run(inp):
        if packed:
            inp = pack_padded_sequence(inp, lengths, enforce_sorted=False)
        out, state = ours(inp)
        return out.data if packed else out

    with torch.autocast("cpu", dtype=low):
        y = proj(x)
        assert y.dtype == low
        out = run(y)
    assert out.dtype == torch.float32
    assert torch.equal(out, run(y.detach().float()))
    out.square().sum().backward()
    assert proj.weight.grad.dtype == torch.float32 and proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CELLS)
def test_autocast_bfloat16_model_runs_in_float32(name):
    """A model converted with .to(torch.bfloat16) runs under autocast (in
    float32, its weights cast up; their gradients come back bfloat16); a
    float32 input to it outside autocast is refused, as nn refuses it, with
    both ways out named (tests/test_lower_precision.py: the bfloat16 model on
    bfloat16 input outside autocast)."""
    torch.manual_seed(2)
    ours = getattr(rnnkern, name)(4, 7).to(torch.bfloat16)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(x)
    assert out.dtype == torch.float32
    reference_model = getattr(rnnkern, name)(4, 7)
    reference_model.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    assert torch.equal(out, reference_model(x)[0])
    out.sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in ours.parameters())
    with pytest.raises(ValueError, match=r"input dtype \(torch.float32\) does not match the RNN's "
                                         r"weight dtype \(torch.bfloat16\): convert the input "
                                         r"with input.to\(torch.bfloat16\)"):
        ours(x)
    with pytest.raises(ValueError, match=r"input dtype \(torch.bfloat16\) does not match .*"
                                         r"model with model.to\(torch.bfloat16\)"):
        reference_model(x.bfloat16())


def test_autocast_functional_and_loss_take_lower_precision_tensors():
    torch.manual_seed(3)
    x = torch.randn(5, 3, 4)
    w_ih, w_hh = torch.randn(21, 4) * 0.3, torch.randn(21, 7) * 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h = functional.gru(x.bfloat16(), None, w_ih.bfloat16(), w_hh)
    assert out.dtype == torch.float32
    assert torch.equal(out, functional.gru(x.bfloat16().float(), None,
                                           w_ih.bfloat16().float(), w_hh)[0])
    loss = rnnkern.RNNLoss(rnnkern.LSTM(4, 7), nn.Linear(7, 5))
    target = torch.randint(0, 5, (5, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x.bfloat16(), target)
    assert value.dtype == torch.float32
    assert torch.equal(value, loss(x.bfloat16().float(), target))
    with pytest.raises(TypeError, match=r"weight_ih must have the input's dtype torch.bfloat16, "
                                        r"got torch.float32"):
        functional.gru(x.bfloat16(), None, w_ih, w_hh)


@pytest.mark.parametrize("name", ("RNN", "GRU"))
def test_proj_size_refused_as_nn_refuses_it(name):
    for value in (0, 3):
        with pytest.raises(ValueError) as ours:
            getattr(rnnkern, name)(4, 7, proj_size=value)
        with pytest.raises(ValueError) as theirs:
            getattr(nn, name)(4, 7, proj_size=value)
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name", CELLS)
def test_lengths_of_any_integer_type_as_pack_padded_sequence_takes_them(name):
    """Lengths from a collate function are often int32 tensors or numpy arrays;
    pack_padded_sequence takes them, and so does lengths=: the same outputs and
    gradients as int64 lengths, bit for bit. Floats and bools are refused."""
    torch.manual_seed(11)
    rnn = getattr(rnnkern, name)(4, 7)
    x = torch.randn(5, 3, 4)
    want = torch.tensor([5, 2, 4])

    def run(lengths):
        xg = x.clone().requires_grad_()
        rnn.zero_grad()
        out, _ = rnn(xg, lengths=lengths)
        out.square().sum().backward()
        return [out, xg.grad] + [p.grad for p in rnn.parameters()]

    expected = run(want)
    for given in (want.int(), want.short(), want.to(torch.uint8), np.array([5, 2, 4], dtype=np.int32),
                  np.array([5, 2, 4]), np.array([5, 2, 4], dtype=np.uint16), (5, 2, 4),
                  list(np.array([5, 2, 4]))):
        for a, b in zip(run(given), expected):
            assert torch.equal(a, b), given
    for bad, words in ((want.float(), r"got a torch.float32 tensor"),
                       (torch.tensor([True, True, False]), r"got a torch.bool tensor"),
                       (np.array([5.0, 2.0, 4.0]), r"numpy array must have an integer dtype, got float64"),
                       ("5,2,4", r"lengths must be an integer tensor, a list of ints or None, got str"),
                       ([True, 2, 4], r"lengths given as a list must hold ints")):
        with pytest.raises(TypeError, match=words):
            rnn(x, lengths=bad)
    with pytest.raises(ValueError, match=r"lengths must have shape \(B,\) = \(1,\), got \(\)"):
        rnn(x[:, 0], lengths=np.array(5))  # a 0-d array stays 0-d, as a 0-d tensor
    # the loss takes them alike, and the reference (the specification) too
    head = torch.nn.Linear(7, 6)
    target = torch.randint(0, 6, (5, 3))
    loss = rnnkern.RNNLoss(rnn, head)
    assert torch.equal(loss(x, target, lengths=np.array([5, 2, 4], dtype=np.int32)),
                       loss(x, target, lengths=want))
    fn = getattr(reference, name.lower())
    ws = [p.detach() for p in rnn.parameters()]
    assert torch.equal(fn(x, None, *ws, lengths=want.int())[0], fn(x, None, *ws, lengths=want)[0])


@pytest.mark.parametrize("name", CELLS)
def test_numpy_bool_flags_are_bools(name):
    """A numpy bool (from a config array) is a bool, as nn takes it; an int is
    still refused (bidirectional=1 is a mistake, not a truth value)."""
    torch.manual_seed(4)
    ours = getattr(rnnkern, name)(4, 7, bias=np.bool_(False), batch_first=np.bool_(True),
                                  bidirectional=np.bool_(True))
    assert (ours.bias, ours.batch_first, ours.bidirectional) == (False, True, True)
    assert all(type(f) is bool for f in (ours.bias, ours.batch_first, ours.bidirectional))
    plain = getattr(rnnkern, name)(4, 7, bias=False, batch_first=True, bidirectional=True)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 4)
    assert torch.equal(ours(x)[0], plain(x)[0])
    with pytest.raises(TypeError, match=r"bidirectional must be a bool, got 1 \(int\)"):
        getattr(rnnkern, name)(4, 7, bidirectional=1)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 2, 3)], ids=["2-D", "4-D"])
def test_input_not_3d_without_hx_is_refused_by_the_op(cell, shape):
    """Without hx the functions pass the op a placeholder state, so the op's
    own check names the input (None would fail in the dispatcher first, with
    'tensor does not have a device')."""
    G = {"rnn": 1, "gru": 3, "lstm": 4}[cell] * 5
    x = torch.randn(*shape)
    layer = getattr(functional, cell)
    with pytest.raises(ValueError, match=rf"input must be 3-D \(T, B, I\), got shape \({', '.join(map(str, shape))}\)"):
        layer(x, None, torch.randn(G, 3), torch.randn(G, 5))
    rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](3, 5)
    with pytest.raises(ValueError, match=r"input must be 3-D \(T, B, I\)"):
        rnnkern.RNNLoss(rnn, nn.Linear(5, 7))(x, torch.randint(0, 7, shape[:-1]),
                                              return_details=True)


@pytest.mark.parametrize("name,kw", [("RNN", {}), ("GRU", {}), ("LSTM", {}),
                                     ("LSTM", {"proj_size": 3})], ids=str)
def test_meta_tensors_give_nn_shapes_forward_and_backward(name, kw):
    """Shape inference and deferred initialisation run models on the meta
    device, as nn's modules allow; the layers used to fail there in the
    autocast check ('unknown device type for autocast')."""
    with torch.device("meta"):
        ours = getattr(rnnkern, name)(5, 7, num_layers=2, bidirectional=True, batch_first=True, **kw)
        theirs = getattr(nn, name)(5, 7, num_layers=2, bidirectional=True, batch_first=True, **kw)
    x = torch.empty(2, 6, 5, device="meta", requires_grad=True)
    got, want = ours(x), theirs(x)
    flat = lambda r: [r[0], *(r[1] if isinstance(r[1], tuple) else (r[1],))]  # noqa: E731
    assert [(t.shape, t.device.type) for t in flat(got)] == [(t.shape, t.device.type) for t in flat(want)]
    got[0].sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    assert all(p.grad is not None and p.grad.shape == p.shape for p in ours.parameters())
    # The functions and the fused loss too.
    G = {"RNN": 1, "GRU": 3, "LSTM": 4}[name] * 7
    w = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    layer = getattr(functional, name.lower())
    assert layer(w(6, 2, 5), None, w(G, 5), w(G, 7), w(G), w(G))[0].shape == (6, 2, 7)
    if not kw:
        mode = {"RNN": "rnn_tanh", "GRU": "gru", "LSTM": "lstm"}[name]
        loss = functional.rnn_loss(w(6, 2, 5), torch.empty(6, 2, dtype=torch.int64, device="meta"),
                                   None, w(G, 5), w(G, 7), w(G), w(G), w(4, 7), w(4), mode=mode)
        assert loss.shape == () and loss.device.type == "meta"


def odd_size1_strides(t):
    """t's values in a view torch calls contiguous whose size-1 axes carry
    stride 5 (legal there, and what permutes and slices make)."""
    strides, step = [], 1
    for d in reversed(t.shape):
        strides.append(5 if d == 1 else step)
        step *= d
    strides.reverse()
    size = 1 + sum((d - 1) * s for d, s in zip(t.shape, strides))
    view = torch.empty(size + 8, dtype=t.dtype).as_strided(t.shape, strides)
    view.copy_(t.detach())
    assert view.is_contiguous()
    return view


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (4, 1, 1, 3), (4, 3, 1, 3), (3, 2, 4, 1)],
                         ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_size1_axes_with_any_stride_match_nn(name, shape):
    """A contiguous tensor may carry any stride on a size-1 axis (a one-channel
    Conv1d output transposed to (B, T, 1) has one): the kernels must not read
    it as a layout, in forward or backward, for input, hx and every weight."""
    T, B, I, H = shape
    torch.manual_seed(7)
    ours = getattr(rnnkern, name)(I, H, dtype=torch.float64)
    theirs = getattr(nn, name)(I, H, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x, h0, c0 = (torch.randn(*s, dtype=torch.float64) for s in ((T, B, I), (1, B, H), (1, B, H)))
    grads = []
    for module, view in ((theirs, lambda t: t.clone()), (ours, odd_size1_strides)):
        for pname in module._flat_weights_names:  # the weights as odd-strided non-leaf views
            raw = nn.Parameter(view(getattr(module, pname)))
            del module._parameters[pname]
            module.register_parameter(pname + "_raw", raw)
            setattr(module, pname, raw.view(raw.shape))
        xx, hh, cc = (view(t).requires_grad_() for t in (x, h0, c0))
        out, h_n = module(xx, (hh, cc) if name == "LSTM" else hh)
        states = h_n if isinstance(h_n, tuple) else (h_n,)
        (out.sin().sum() + sum(s.square().sum() for s in states)).backward()
        grads.append([out, *states, xx.grad, hh.grad] + (([cc.grad] if name == "LSTM" else [])) +
                     [p.grad for p in module.parameters()])
    for got, want in zip(grads[1], grads[0], strict=True):
        assert_close(got, want, TOL[torch.float64], name)


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_size1_axes_with_any_stride_in_rnn_loss(mode):
    """rnn_loss (layer and head ops) on odd-strided size-1 axes: h of one unit,
    one sequence, one class, as the reference computes it."""
    T, B, I, H, O = 5, 1, 1, 1, 1
    G = {"rnn_tanh": 1, "lstm": 4, "gru": 3}[mode] * H
    tensors = [torch.randn(*s, dtype=torch.float64) for s in
               ((T, B, I), (B, H), (G, I), (G, H), (G,), (G,), (O, H), (O,))]
    target = torch.randn(T, B, O, dtype=torch.float64)
    results = []
    for fn, view in ((reference.rnn_loss, lambda t: t.clone()), (functional.rnn_loss, odd_size1_strides)):
        args = [view(t).requires_grad_() for t in tensors]
        hx = (args[1], view(args[1].detach() * 0.5)) if mode == "lstm" else args[1]
        value = fn(args[0], view(target), hx, *args[2:], loss="mse", mode=mode)
        value.backward()
        results.append([value] + [a.grad for a in args])
    for got, want in zip(results[1], results[0], strict=True):
        assert_close(got, want, TOL[torch.float64], mode)


def _detach_in_place_tbptt(module, chunks, form):
    """Truncated BPTT as older client code writes it: the returned state
    detached in place (``hidden.detach_()``) before it feeds the next chunk.
    Returns, per chunk, whether detach_ raised (its type), the loss, and the
    parameters' gradients."""
    module.zero_grad()
    hidden, record = None, []
    for x in chunks:
        if form == "unbatched":
            x = x[:, 0]
        elif form == "batch_first":
            x = x.transpose(0, 1)
        out, hidden = module(x, hidden)
        states = hidden if isinstance(hidden, tuple) else (hidden,)
        loss = out.tanh().sum() + sum(s.square().sum() for s in states)
        loss.backward()
        raised = None
        for s in states:
            try:
                s.detach_()
            except RuntimeError as e:
                raised = type(e)
        if raised is not None:
            hidden = tuple(s.detach() for s in states) if len(states) > 1 else states[0].detach()
        record.append((raised, loss.detach()))
    return record, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("form", ["padded", "batch_first", "unbatched", "two-layer-bidir"])
def test_state_detached_in_place_between_chunks_as_nn(name, form):
    """h_n (and c_n) detach_() as nn's do: where nn's state is its own tensor
    (padded, batch_first, multi-layer) ours is too, so the in-place detach
    works; where nn's is a view (unbatched input) both refuse it alike. The
    losses and gradients of the chunk loop then equal nn's."""
    kw = {"num_layers": 2, "bidirectional": True} if form == "two-layer-bidir" else {}
    kw["batch_first"] = form == "batch_first"
    ours, theirs = pair(name, **kw)
    g = torch.Generator().manual_seed(11)
    chunks = [torch.randn(3, 2, 4, dtype=torch.float64, generator=g) for _ in range(3)]
    got = _detach_in_place_tbptt(ours, chunks, form)
    want = _detach_in_place_tbptt(theirs, chunks, form)
    for (r_got, l_got), (r_want, l_want) in zip(got[0], want[0], strict=True):
        assert r_got == r_want, f"{name} {form}: detach_ raised {r_got}, nn's {r_want}"
        assert_close(l_got, l_want, TOL[torch.float64], name)
    for a, b in zip(got[1], want[1], strict=True):
        assert_close(a, b, TOL[torch.float64], name)

"""torch.jit.script: rnnkern's modules script, as torch.nn's do, alone or
inside a model, and the scripted module computes what the eager one does, bit
for bit (the same ops with the same arguments), gradients included."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkern

# torch 2.13 deprecates TorchScript, which users still script models with.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

T, B, I, H = 6, 3, 4, 7

CELLS = {  # name: (class, constructor keywords)
    "rnn_tanh": (rnnkern.RNN, {}),
    "rnn_relu": (rnnkern.RNN, dict(nonlinearity="relu")),
    "gru": (rnnkern.GRU, {}),
    "lstm": (rnnkern.LSTM, {}),
    "lstm_proj": (rnnkern.LSTM, dict(proj_size=3)),
}
SHAPES = {  # name: constructor keywords
    "one layer": {},
    "2-layer bidirectional batch_first": dict(num_layers=2, bidirectional=True, batch_first=True),
    "no bias": dict(bias=False),
}


def make(cell, shape, seed=0, **extra):
    torch.manual_seed(seed)
    cls, kw = CELLS[cell]
    return cls(I, H, **kw, **SHAPES[shape], **extra)


def state_for(m, batch=B):
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    if isinstance(m, rnnkern.LSTM):
        return (torch.randn(m.num_layers * D, batch, P), torch.randn(m.num_layers * D, batch, H))
    return torch.randn(m.num_layers * D, batch, H)


def run(module, x, hx, **kw):
    """outputs, final states, and the gradients of x, hx and every parameter."""
    x = x.clone().requires_grad_()
    hx = None if hx is None else (tuple(h.clone().requires_grad_() for h in hx)
                                  if isinstance(hx, tuple) else hx.clone().requires_grad_())
    for p in module.parameters():
        p.grad = None
    out, state = module(x, hx, **kw)
    states = state if isinstance(state, tuple) else (state,)
    (out.square().sum() + sum(s.sin().sum() for s in states)).backward()
    hxs = () if hx is None else (hx if isinstance(hx, tuple) else (hx,))
    return [out, *states, x.grad, *(h.grad for h in hxs), *(p.grad for p in module.parameters())]


def assert_equal(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), i


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cell", list(CELLS))
def test_scripted_module_is_the_eager_module_bit_for_bit(cell, shape):
    m = make(cell, shape)
    s = torch.jit.script(m)
    assert isinstance(s, torch.jit.ScriptModule)
    torch.manual_seed(1)
    x = torch.randn(B, T, I) if m.batch_first else torch.randn(T, B, I)
    hx = state_for(m)
    lengths = torch.tensor([T, 1, 4])
    for kw in ({}, dict(lengths=lengths), dict(lengths=lengths, truncate=2), dict(truncate=1)):
        for h in (None, hx):
            assert_equal(run(s, x, h, **kw), run(m, x, h, **kw))


@pytest.mark.parametrize("cell", list(CELLS))
def test_unbatched_input_and_int32_lengths(cell):
    m = make(cell, "2-layer bidirectional batch_first")
    s = torch.jit.script(m)
    x = torch.randn(T, I)
    hx = state_for(m, batch=1)
    hx = tuple(h[:, 0] for h in hx) if isinstance(hx, tuple) else hx[:, 0]
    assert_equal(run(s, x, hx), run(m, x, hx))
    x = torch.randn(B, T, I)
    for dtype in (torch.int32, torch.uint8, torch.uint16):
        lengths = torch.tensor([2, T, 5], dtype=dtype)
        assert_equal(run(s, x, None, lengths=lengths), run(m, x, None, lengths=lengths.long()))


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_draws_as_eager_and_a_bfloat16_model(cell):
    m = make(cell, "2-layer bidirectional batch_first", dropout=0.5)
    s = torch.jit.script(m)
    x = torch.randn(B, T, I)
    torch.manual_seed(5)
    ours = run(s, x, None)
    torch.manual_seed(5)
    assert_equal(ours, run(m, x, None))
    m.eval()
    s = torch.jit.script(m)
    assert_equal(run(s, x, None), run(m, x, None))
    low = make(cell, "one layer").to(torch.bfloat16)
    x = torch.randn(T, B, I, dtype=torch.bfloat16)
    ours = torch.jit.script(low)(x)
    theirs = low(x)
    assert ours[0].dtype == torch.bfloat16
    assert torch.equal(ours[0], theirs[0])


class Tagger(nn.Module):
    """A client model: embedding, a recurrent layer, a linear head."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(11, I)
        self.rnn = rnn
        self.head = nn.Linear(2 * H if rnn.bidirectional else H, 5)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens), lengths=lengths)
        return self.head(out)


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_a_model_holding_the_module_scripts_trains_saves_and_loads(cell):
    torch.manual_seed(2)
    eager = Tagger(make(cell, "2-layer bidirectional batch_first"))
    twin = copy.deepcopy(eager)
    scripted = torch.jit.script(twin)
    assert type(twin.rnn) is CELLS[cell][0]  # scripting left the eager model as it was
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, scripted)]
    for step in range(3):
        tokens = torch.randint(0, 11, (B, T))
        lengths = torch.tensor([T, 2, 5])
        target = torch.randint(0, 5, (B, T))
        for model, opt in zip((eager, scripted), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(model(tokens, lengths).flatten(0, 1),
                                        target.flatten()).backward()
            opt.step()
    for (name, a), b in zip(eager.named_parameters(), scripted.parameters()):
        assert torch.equal(a, b), name
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    tokens = torch.randint(0, 11, (B, T))
    lengths = torch.tensor([1, T, 3])
    assert torch.equal(loaded(tokens, lengths), eager(tokens, lengths))
    assert set(loaded.state_dict()) == set(eager.state_dict())


BAD = {  # name: (input, hx, keywords)
    "truncate 0": lambda m: (torch.randn(T, B, I), None, dict(truncate=0)),
    "input 4-D": lambda m: (torch.randn(T, B, I, 1), None, {}),
    "input size": lambda m: (torch.randn(T, B, I + 1), None, {}),
    "hx 2-D for 3-D input": lambda m: (torch.randn(T, B, I), _hx(m, (1, H)), {}),
    "hx batch": lambda m: (torch.randn(T, B, I), _hx(m, (1, B + 1, H)), {}),
    "hx layers": lambda m: (torch.randn(T, B, I), _hx(m, (2, B, H)), {}),
    "hx unbatched": lambda m: (torch.randn(T, I), _hx(m, (1, H + 1)), {}),
}


def _hx(m, shape):
    h = torch.randn(*shape)
    return (h, h.clone()) if isinstance(m, rnnkern.LSTM) else h


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_bad_input_gets_the_eager_error(cell, name):
    m = make(cell, "one layer")
    s = torch.jit.script(m)
    x, hx, kw = BAD[name](m)
    with pytest.raises((ValueError, RuntimeError)) as eager:
        m(x, hx, **kw)
    with pytest.raises(torch.jit.Error) as scripted:
        s(x, hx, **kw)
    assert str(eager.value) in str(scripted.value)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_a_lower_precision_model_checks_the_dtypes_as_eager(low):
    m = make("lstm", "one layer").to(low)
    s = torch.jit.script(m)
    x = torch.randn(T, B, I)
    h = torch.randn(1, B, H)
    calls = [(x, None), (x.double(), None), (x.to(low), (h, h.to(low))),
             (x.to(torch.bfloat16 if low == torch.float16 else torch.float16), None)]
    for x_, hx in calls:
        with pytest.raises((ValueError, RuntimeError)) as eager:
            m(x_, hx)
        with pytest.raises(torch.jit.Error) as scripted:
            s(x_, hx)
        assert str(eager.value) in str(scripted.value)
    m.weight_hh_l0.data = m.weight_hh_l0.data.float()  # one weight left in another dtype
    with pytest.raises(TypeError) as eager:
        m(x.to(low))
    with pytest.raises(torch.jit.Error) as scripted:
        torch.jit.script(m)(x.to(low))
    assert "weight_hh_l0 must have the model's dtype" in str(eager.value)
    assert str(eager.value) in str(scripted.value)


def test_scripting_reads_the_parameters_as_they_are_and_refuses_a_parametrization():
    m = make("gru", "one layer")
    x = torch.randn(T, B, I)
    m(x)
    # a parameter replaced without Module.__setattr__ (as accelerate and FSDP2 do)
    new = nn.Parameter(torch.randn_like(m.weight_hh_l0))
    m._parameters["weight_hh_l0"] = new
    s = torch.jit.script(m)
    assert torch.equal(s(x)[0], m(x)[0])
    s(x)[0].sum().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    w = nn.utils.parametrizations.weight_norm(make("lstm", "one layer"), "weight_hh_l0")
    with pytest.raises(RuntimeError, match=r"an rnnkern.LSTM with a parametrization \(e.g. "
                                           r"weight_norm\) cannot be scripted"):
        torch.jit.script(w)
    with pytest.raises(RuntimeError, match=r"with a parametrization"):
        torch.jit.script(Tagger(nn.utils.parametrizations.weight_norm(make("gru", "one layer"),
                                                                      "weight_ih_l0")))


def test_what_the_scripted_module_leaves_to_eager_is_refused():
    m = rnnkern.GRU(I, H)
    s = torch.jit.script(m)
    x = torch.randn(T, B, I)
    packed = pack_padded_sequence(x, [T, 3, 2])
    with pytest.raises(RuntimeError, match=r"Expected a value of type 'Tensor'.*input"):
        s(packed)
    # the op refuses what the module passes on: a wrong dtype, float lengths
    with pytest.raises(RuntimeError, match=r"rnnkern.layer_fwd: weight_hh must have the input's "
                                           r"dtype torch.float64, got torch.float32"):
        s(x.double())
    with pytest.raises(RuntimeError, match=r"rnnkern.layer_fwd: lengths must be an int64 tensor, "
                                           r"got torch.float32"):
        s(x, None, torch.tensor([1.0, 2.0, 3.0]))

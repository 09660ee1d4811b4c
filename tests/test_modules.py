"""rnnkern.RNN, the drop-in for torch.nn.RNN: outputs, h_n and every gradient
against nn.RNN for every input form and option; dropout; lengths= and
truncate=; the nn.RNN API (state_dict, all_weights, copies, repr); bad input."""

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnkern
from helpers import TOL, assert_close, grads_of, product, rel_err, relu_kinks_differ
from rnnkern import reference

T, B, I, H = 7, 3, 4, 5
FORMS = ["padded", "packed_sorted", "packed_unsorted", "unbatched"]


def pair(num_layers, nonlinearity="tanh", bias=True, batch_first=False, dropout=0.0,
         bidirectional=False, dtype=torch.float64):
    """An nn.RNN and an rnnkern.RNN with the same weights, both built with
    nn.RNN's positional argument order."""
    args = (I, H, num_layers, nonlinearity, bias, batch_first, dropout, bidirectional)
    theirs = nn.RNN(*args, dtype=dtype)
    ours = rnnkern.RNN(*args, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def make_input(form, batch_first, dtype):
    """Fresh input of one form. Returns (x, input): x the leaf tensor that gets
    the gradient (a PackedSequence's data), input what the RNN is called with."""
    if form == "unbatched":
        x = torch.randn(T, I, dtype=dtype, requires_grad=True)
        return x, x
    x = torch.randn(*((B, T, I) if batch_first else (T, B, I)), dtype=dtype, requires_grad=True)
    if form == "padded":
        return x, x
    lengths = (torch.randperm(T)[:B] + 1).sort(descending=True).values  # distinct, in [1, T]
    if form == "packed_unsorted":
        lengths = lengths[torch.tensor([2, 0, 1])]  # shortest first: not sorted
    packed = pack_padded_sequence(x.detach(), lengths, batch_first=batch_first,
                                  enforce_sorted=form == "packed_sorted")
    data = packed.data.requires_grad_()  # [N,I]
    return data, PackedSequence(data, *packed[1:])


def make_hx(m, form, dtype):
    D = 2 if m.bidirectional else 1
    shape = (m.num_layers * D, H) if form == "unbatched" else (m.num_layers * D, B, H)
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def data_of(out):
    return out.data if isinstance(out, PackedSequence) else out


def layer_of(name):
    return int(re.search(r"_l(\d+)", name).group(1))


def activity_differs(ours, theirs, input, hx):
    """relu_kinks_differ on the output of every layer, not only the last: a
    unit that flips in layer k changes the gradients although the last layer's
    output barely moves. Layer k's output is that of the first k layers."""
    D = 2 if ours.bidirectional else 1
    for k in range(1, ours.num_layers + 1):
        subs = []
        for m in (ours, theirs):
            sub = type(m)(I, H, k, m.nonlinearity, m.bias, m.batch_first, 0.0, m.bidirectional,
                          dtype=m.weight_ih_l0.dtype)
            sub.load_state_dict({n: p for n, p in m.state_dict().items() if layer_of(n) < k})
            subs.append(sub)
        with torch.no_grad():
            h0 = None if hx is None else hx[:k * D]
            outs = [data_of(sub(input, h0)[0]) for sub in subs]
        if relu_kinks_differ(*outs):
            return True
    return False


def compare(ours, theirs, x, input, hx, tol, **kw):
    """Outputs (layout included), h_n and the gradients of a random functional
    of both with respect to the input, hx and every parameter."""
    out_a, h_a = ours(input, hx, **kw)
    out_b, h_b = theirs(input, hx)
    assert type(out_a) is type(out_b)
    if isinstance(out_b, PackedSequence):
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(out_a, field), getattr(out_b, field)
            assert (a is None and b is None) or torch.equal(a, b), field
    assert_runs_match((data_of(out_a), h_a), (data_of(out_b), h_b), ours, theirs, x, hx, tol)


def assert_runs_match(run_a, run_b, model_a, model_b, x, hx, tol):
    """(output, h_n) of two runs, and the gradients of a random functional of
    them with respect to x, hx and every parameter of the model behind each run."""
    (out_a, h_a), (out_b, h_b) = run_a, run_b
    assert_close(out_a, out_b, tol, "output")
    assert_close(h_a, h_b, tol, "h_n")
    names = ["input", "hx"] + [n for n, _ in model_b.named_parameters()]
    ga = grads_of([out_a, h_a], [x, hx, *model_a.parameters()])
    gb = grads_of([out_b, h_b], [x, hx, *model_b.parameters()])
    for name, a, b in zip(names, ga, gb):
        assert (a is None) == (b is None), name
        if b is not None:
            assert_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("case", product(
    dtype=[torch.float64, torch.float32], num_layers=[1, 2, 3], bidirectional=[False, True],
    batch_first=[False, True], nonlinearity=["tanh", "relu"], bias=[True, False], form=FORMS,
    hx=[True, False]), ids=str)
def test_matches_nn_rnn(case):
    dtype, form = case["dtype"], case["form"]
    ours, theirs = pair(case["num_layers"], case["nonlinearity"], case["bias"],
                        case["batch_first"], 0.0, case["bidirectional"], dtype)
    # float32 relu: redraw inputs whose relu activity differs between the two
    # (see relu_kinks_differ); float64 rounding is far too small to flip a unit.
    for _ in range(5):
        x, input = make_input(form, case["batch_first"], dtype)
        hx = make_hx(ours, form, dtype) if case["hx"] else None
        if not (dtype == torch.float32 and case["nonlinearity"] == "relu"
                and activity_differs(ours, theirs, input, hx)):
            break
    else:
        pytest.fail("5 draws in a row had relu activity patterns that differ")
    compare(ours, theirs, x, input, hx, TOL[dtype])


# -- lengths= and truncate= ---------------------------------------------------

@pytest.mark.parametrize("case", product(num_layers=[1, 3], bidirectional=[False, True],
                                         batch_first=[False, True], hx=[True, False]), ids=str)
def test_lengths_match_packed_nn_rnn(case):
    """Padded input with lengths= equals nn.RNN on the packed input, padded back
    (zeros at padded steps), with the same gradients."""
    bf = case["batch_first"]
    ours, theirs = pair(case["num_layers"], batch_first=bf, bidirectional=case["bidirectional"])
    x, _ = make_input("padded", bf, torch.float64)
    hx = make_hx(ours, "padded", torch.float64) if case["hx"] else None
    lengths = torch.randint(1, T + 1, (B,))
    out_a, h_a = ours(x, hx, lengths=lengths)
    out_b, h_b = theirs(pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False), hx)
    out_b, _ = pad_packed_sequence(out_b, batch_first=bf, total_length=T)
    assert_runs_match((out_a, h_a), (out_b, h_b), ours, theirs, x, hx, TOL[torch.float64])


@pytest.mark.parametrize("case", product(num_layers=[1, 2, 3], K=[1, 3], batch_first=[False, True]),
                         ids=str)
def test_truncate_is_chunked_detach_through_nn_rnn(case):
    """truncate=K on a stack is the loop a user would write with nn.RNN: run
    K-step chunks, detaching the state of every layer between them."""
    K, bf = case["K"], case["batch_first"]
    ours, theirs = pair(case["num_layers"], batch_first=bf)
    x, _ = make_input("padded", bf, torch.float64)
    hx = make_hx(ours, "padded", torch.float64)
    out_a, h_a = ours(x, hx, truncate=K)
    h, chunks = hx, []
    for c0 in range(0, T, K):
        out_c, h = theirs(x[:, c0:c0 + K] if bf else x[c0:c0 + K], h if c0 == 0 else h.detach())
        chunks.append(out_c)
    out_b, h_b = torch.cat(chunks, 1 if bf else 0), h
    assert_runs_match((out_a, h_a), (out_b, h_b), ours, theirs, x, hx, TOL[torch.float64])


def reference_stack(m, x, hx, lengths, truncate):
    """The stack spelled out with rnnkern.reference.rnn: layer k reads layer
    k-1's output (directions concatenated); lengths and truncate on every layer."""
    D = 2 if m.bidirectional else 1
    layer_input, h_n = x, []
    for k in range(m.num_layers):
        outputs = []
        for d in range(D):
            w = m.all_weights[k * D + d]
            out, h = reference.rnn(layer_input, None if hx is None else hx[k * D + d], *w,
                                   *([None, None] if not m.bias else []),
                                   nonlinearity=m.nonlinearity, lengths=lengths,
                                   truncate=truncate, reverse=d == 1)
            outputs.append(out)
            h_n.append(h)
        layer_input = torch.cat(outputs, 2)
    return layer_input, torch.stack(h_n)


@pytest.mark.parametrize("case", product(num_layers=[1, 3], bidirectional=[False, True],
                                         truncate=[None, 1, 3], form=["padded", "unbatched"],
                                         bias=[True, False]), ids=str)
def test_lengths_and_truncate_match_reference_stack(case):
    """Zero lengths, the reverse direction and truncation together, which
    nn.RNN cannot express, against the reference layers stacked by hand."""
    ours, _ = pair(case["num_layers"], "relu", case["bias"], False, 0.0, case["bidirectional"])
    x, _ = make_input(case["form"], False, torch.float64)
    hx = make_hx(ours, case["form"], torch.float64)
    if case["form"] == "unbatched":
        lengths = torch.tensor([4])
        x_b, hx_b = x[:, None], hx[:, None]
    else:
        lengths = torch.tensor([T, 0, 4])
        x_b, hx_b = x, hx
    out_a, h_a = ours(x, hx, lengths=lengths, truncate=case["truncate"])
    out_b, h_b = reference_stack(ours, x_b, hx_b, lengths, case["truncate"])
    if case["form"] == "unbatched":
        out_b, h_b = out_b[:, 0], h_b[:, 0]
    assert_runs_match((out_a, h_a), (out_b, h_b), ours, ours, x, hx, TOL[torch.float64])


# -- dropout -------------------------------------------------------------------

@pytest.mark.parametrize("case", product(form=["padded", "packed_unsorted", "unbatched"],
                                         bidirectional=[False, True], batch_first=[False, True]),
                         ids=str)
def test_dropout_in_eval_mode_is_off(case):
    ours, theirs = pair(3, dropout=0.5, batch_first=case["batch_first"],
                        bidirectional=case["bidirectional"])
    ours.eval()
    theirs.eval()
    x, input = make_input(case["form"], case["batch_first"], torch.float64)
    compare(ours, theirs, x, input, None, TOL[torch.float64])


@pytest.mark.parametrize("case", product(form=["padded", "packed_unsorted", "unbatched"],
                                         bidirectional=[False, True], batch_first=[False, True]),
                         ids=str)
def test_dropout_in_training_uses_nn_rnn_masks(case):
    """From the same RNG state, training mode draws nn.RNN's dropout masks (same
    shapes, same order), so the two agree exactly: dropout acts on the output of
    each layer but the last, as in nn.RNN, and nowhere else."""
    ours, theirs = pair(3, dropout=0.5, batch_first=case["batch_first"],
                        bidirectional=case["bidirectional"])
    x, input = make_input(case["form"], case["batch_first"], torch.float64)
    seed = int(torch.randint(2**31, ()))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out_a, h_a = ours(input)
        torch.manual_seed(seed + 1)
        out_other = ours(input)[0]
        torch.manual_seed(seed)
        out_b, h_b = theirs(input)
    tol = TOL[torch.float64]
    # The masks matter: another seed gives another output.
    assert rel_err(data_of(out_other), data_of(out_a)) > 1e-3
    assert_close(data_of(out_a), data_of(out_b), tol, "output")
    assert_close(h_a, h_b, tol, "h_n")
    names = ["input"] + [n for n, _ in theirs.named_parameters()]
    for name, a, b in zip(names, grads_of([data_of(out_a), h_a], [x, *ours.parameters()]),
                          grads_of([data_of(out_b), h_b], [x, *theirs.parameters()])):
        assert_close(a, b, tol, f"grad {name}")


# -- inference -----------------------------------------------------------------

def count_saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return len(saved), out


@pytest.mark.parametrize("form", ["padded", "packed_unsorted", "unbatched"])
def test_inference_saves_nothing_for_backward(form):
    ours, _ = pair(2, bidirectional=True)
    x, input = make_input(form, False, torch.float64)
    n, _ = count_saved(lambda: ours(input))
    assert n > 0  # the probe sees what training saves
    ours.eval()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            n, (out, h_n) = count_saved(lambda: ours(input))
        assert n == 0 and data_of(out).grad_fn is None and h_n.grad_fn is None
    ours.requires_grad_(False)
    x.requires_grad_(False)
    n, (out, _) = count_saved(lambda: ours(input))
    assert n == 0 and data_of(out).grad_fn is None


# -- the nn.RNN API --------------------------------------------------------------

@pytest.mark.parametrize("case", product(num_layers=[1, 3], bidirectional=[False, True],
                                         bias=[True, False]), ids=str)
def test_state_dict_loads_both_ways(case):
    kw = dict(num_layers=case["num_layers"], bidirectional=case["bidirectional"], bias=case["bias"])
    theirs, ours = nn.RNN(I, H, **kw), rnnkern.RNN(I, H, **kw)
    shapes = lambda m: [(n, tuple(p.shape)) for n, p in m.state_dict().items()]  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(T, B, I)
    assert_close(ours(x)[0], theirs(x)[0], TOL[torch.float32], "after nn.RNN -> rnnkern")
    back = nn.RNN(I, H, **kw)
    back.load_state_dict(rnnkern.RNN(I, H, **kw).state_dict())
    ours.load_state_dict(back.state_dict())
    assert_close(ours(x)[0], back(x)[0], TOL[torch.float32], "after rnnkern -> nn.RNN")


@pytest.mark.parametrize("case", product(num_layers=[1, 2], bidirectional=[False, True]), ids=str)
def test_same_initialisation_as_nn_rnn(case):
    """Same RNG state, same parameters: the same distribution drawn in the same order."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, ())))
        state = torch.get_rng_state()
        theirs = nn.RNN(I, H, **case)
        torch.set_rng_state(state)
        ours = rnnkern.RNN(I, H, **case)
    for (n, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b), n
        assert a.abs().max() <= H**-0.5


def test_constructor_positional_order_and_attributes():
    m = rnnkern.RNN(I, H, 2, "relu", False, True, 0.25, True, None, torch.float64)
    # nn.RNN documents device and dtype as positional too, but passes them on
    # to RNNBase as proj_size and device (torch 2.13); ours takes them as documented.
    ref = nn.RNN(I, H, 2, "relu", False, True, 0.25, True, dtype=torch.float64)
    for attr in ("input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first",
                 "dropout", "bidirectional", "mode", "proj_size"):
        assert getattr(m, attr) == getattr(ref, attr), attr
    assert m.weight_ih_l0.dtype == torch.float64
    assert isinstance(m, nn.RNNBase) and not isinstance(m, nn.RNN)
    assert [[tuple(p.shape) for p in w] for w in m.all_weights] == \
        [[tuple(p.shape) for p in w] for w in ref.all_weights]
    assert repr(m) == repr(ref)


CONSTRUCTOR_ERRORS = {
    "nonlinearity": dict(nonlinearity="sigmoid"),
    "dropout > 1": dict(dropout=1.5),
    "dropout bool": dict(dropout=True),
    "hidden_size 0": dict(hidden_size=0),
    "num_layers 0": dict(num_layers=0),
    "bias int": dict(bias=1),
    "batch_first str": dict(batch_first="yes"),
    "input_size float": dict(input_size=4.0),
}


@pytest.mark.parametrize("name", list(CONSTRUCTOR_ERRORS))
def test_constructor_errors_like_nn_rnn(name):
    kw = dict(input_size=I, hidden_size=H) | CONSTRUCTOR_ERRORS[name]
    with pytest.raises(Exception) as theirs:
        nn.RNN(**kw)
    with pytest.raises(type(theirs.value)) as ours:
        rnnkern.RNN(**kw)
    bad = next(k for k in CONSTRUCTOR_ERRORS[name])
    assert bad in str(ours.value), str(ours.value)


def test_dropout_with_one_layer_warns_like_nn_rnn():
    for cls in (nn.RNN, rnnkern.RNN):
        with pytest.warns(UserWarning, match="num_layers greater than 1"):
            cls(I, H, 1, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnnkern.RNN(I, H, 2, dropout=0.5)


def test_conversions_and_copies_keep_working():
    m = rnnkern.RNN(I, H, 2, bidirectional=True, batch_first=True)
    m.flatten_parameters()
    x = torch.randn(B, T, I, dtype=torch.float64)
    out64, h64 = m.double()(x)
    assert out64.dtype == torch.float64 and m.weight_hh_l1_reverse.dtype == torch.float64
    out32, _ = m.to(torch.float32)(x.float())
    assert_close(out32, out64.float(), TOL[torch.float32], "float32 after .to()")
    m.double()
    copies = {
        "deepcopy": copy.deepcopy(m),
        "pickle": pickle.loads(pickle.dumps(m)),
    }
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    copies["torch.save"] = torch.load(buf, weights_only=False)
    for name, c in copies.items():
        assert type(c) is rnnkern.RNN, name
        out, h = c(x)
        assert torch.equal(out, out64) and torch.equal(h, h64), name
        with torch.no_grad():
            c.weight_ih_l0.add_(1.0)
        assert not torch.equal(c.weight_ih_l0, m.weight_ih_l0), f"{name} shares parameters"
        assert c.all_weights[0][0] is c.weight_ih_l0, name


# -- bad input -----------------------------------------------------------------

L_BAD, D_BAD = 2, 2  # the module of the bad-input tests: 2 layers, bidirectional
LD = L_BAD * D_BAD


def packed(x_tbi):
    return pack_padded_sequence(x_tbi, torch.tensor([T, 2, 5]), enforce_sorted=False)


# name: (input, hx), the exception nn.RNN raises too, a pattern of our message
BAD_LIKE_NN_RNN = {
    "input 4-D": (lambda: (torch.randn(T, B, I, 1), None), ValueError,
                  r"input must be 3-D \(T, B, I\) or 2-D unbatched \(T, I\), got 4-D"),
    "input 1-D": (lambda: (torch.randn(T), None), ValueError, r"got 1-D of shape \(7,\)"),
    "input size": (lambda: (torch.randn(T, B, I + 1), None), RuntimeError,
                   r"input_size: expected I=4, got 5"),
    "input size unbatched": (lambda: (torch.randn(T, I + 2), None), RuntimeError,
                             r"input_size: expected I=4, got 6"),
    "input size packed": (lambda: (packed(torch.randn(T, B, I + 1)), None), RuntimeError,
                          r"input_size: expected I=4, got 5"),
    "input dtype": (lambda: (torch.randn(T, B, I, dtype=torch.float64), None), ValueError,
                    r"input dtype \(torch.float64\) does not match the RNN's weight dtype"),
    "hx 2-D for batched": (lambda: (torch.randn(T, B, I), torch.randn(LD, H)), RuntimeError,
                           r"hx must be 3-D \(L\*D, B, H\), got 2-D"),
    "hx 3-D for unbatched": (lambda: (torch.randn(T, I), torch.randn(LD, 1, H)), RuntimeError,
                             r"hx must be 2-D \(L\*D, H\) for unbatched 2-D input, got 3-D"),
    "hx layers": (lambda: (torch.randn(T, B, I), torch.randn(L_BAD, B, H)), RuntimeError,
                  r"hx must have shape \(L\*D, B, H\) = \(4, 3, 5\) \(num_layers=2, D=2\), "
                  r"got \(2, 3, 5\)"),
    "hx batch": (lambda: (torch.randn(T, B, I), torch.randn(LD, B + 1, H)), RuntimeError,
                 r"= \(4, 3, 5\) .*got \(4, 4, 5\)"),
    "hx hidden": (lambda: (torch.randn(T, B, I), torch.randn(LD, B, H + 1)), RuntimeError,
                  r"= \(4, 3, 5\) .*got \(4, 3, 6\)"),
    "hx unbatched shape": (lambda: (torch.randn(T, I), torch.randn(LD, H - 1)), RuntimeError,
                           r"hx must have shape \(L\*D, H\) = \(4, 5\) .*got \(4, 4\)"),
    "hx packed batch": (lambda: (packed(torch.randn(T, B, I)), torch.randn(LD, B - 1, H)),
                        RuntimeError, r"= \(4, 3, 5\) .*got \(4, 2, 5\)"),
    "hx dtype": (lambda: (torch.randn(T, B, I), torch.randn(LD, B, H, dtype=torch.float64)),
                 RuntimeError, r"hx must have the input's dtype torch.float32, got torch.float64"),
    "hx device": (lambda: (torch.randn(T, B, I), torch.empty(LD, B, H, device="meta")),
                  RuntimeError, r"hx must be on the input's device cpu, got meta"),
}


@pytest.mark.parametrize("name", list(BAD_LIKE_NN_RNN))
def test_bad_input_raises_like_nn_rnn(name):
    make, exc, pattern = BAD_LIKE_NN_RNN[name]
    input, hx = make()
    ours, theirs = pair(L_BAD, bidirectional=True, dtype=torch.float32)
    with pytest.raises(exc):
        theirs(input, hx)
    with pytest.raises(exc, match=pattern):
        ours(input, hx)


# name: (input, hx, keywords), the exception, a pattern of the message
BAD_OURS_ONLY = {
    "input list": (lambda: ([[0.0] * I] * T, None, {}), TypeError,
                   r"input must be a torch.Tensor or a PackedSequence, got list"),
    "hx list": (lambda: (torch.randn(T, B, I), [0.0], {}), TypeError,
                r"hx must be a torch.Tensor or None, got list"),
    "lengths > T": (lambda: (torch.randn(T, B, I), None, dict(lengths=torch.tensor([1, 8, 3]))),
                    ValueError, r"lengths must be in \[0, T=7\], got min 1 and max 8"),
    "lengths shape": (lambda: (torch.randn(T, B, I), None, dict(lengths=torch.tensor([1, 2]))),
                      ValueError, r"lengths must have shape \(B,\) = \(3,\), got \(2,\)"),
    "lengths dtype": (lambda: (torch.randn(T, B, I), None,
                               dict(lengths=torch.tensor([1.0, 2.0, 3.0]))),
                      TypeError, r"lengths must be an integer tensor, a list of ints or None, "
                                 r"got a torch.float32 tensor"),
    "lengths unbatched": (lambda: (torch.randn(T, I), None, dict(lengths=torch.tensor(3))),
                          ValueError, r"lengths must have shape \(B,\) = \(1,\), got \(\)"),
    "lengths with packed": (lambda: (packed(torch.randn(T, B, I)), None, dict(lengths=[7, 2, 5])),
                            ValueError, r"lengths must be None for a PackedSequence input"),
    "truncate 0": (lambda: (torch.randn(T, B, I), None, dict(truncate=0)), ValueError,
                   r"truncate must be an int >= 1 or None, got 0"),
    "truncate float": (lambda: (torch.randn(T, B, I), None, dict(truncate=2.5)), TypeError,
                       r"truncate must be an int >= 1 or None, got 2.5"),
}


@pytest.mark.parametrize("name", list(BAD_OURS_ONLY))
def test_bad_input_raises(name):
    make, exc, pattern = BAD_OURS_ONLY[name]
    input, hx, kw = make()
    ours, _ = pair(L_BAD, bidirectional=True, dtype=torch.float32)
    with pytest.raises(exc, match=pattern):
        ours(input, hx, **kw)


def test_float16_model_runs_in_float32_and_returns_float16():
    """tests/test_lower_precision.py holds the whole of it; here the module
    tests' own sizes."""
    m = rnnkern.RNN(I, H, dtype=torch.float16)
    x = torch.randn(T, B, I, dtype=torch.float16)
    out, h = m(x)
    m32 = rnnkern.RNN(I, H)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    out32, h32 = m32(x.float())
    assert out.dtype == h.dtype == torch.float16
    assert torch.equal(out, out32.half()) and torch.equal(h, h32.half())


@pytest.mark.parametrize("name, kw", [("RNN", {}), ("GRU", {"batch_first": True}),
                                      ("LSTM", {}), ("LSTM", {"proj_size": 2, "num_layers": 2})],
                         ids=["rnn", "gru", "lstm", "lstm-proj"])
def test_nn_state_helpers_answer_as_nn(name, kw):
    """nn's public helpers that client code calls on the module
    (check_forward_args, permute_hidden, get_expected_*) on its state form."""
    ours, theirs = getattr(rnnkern, name)(I, H, **kw), getattr(nn, name)(I, H, **kw)
    P = kw.get("proj_size") or H
    L = kw.get("num_layers", 1)
    x = torch.randn(B, T, I) if kw.get("batch_first") else torch.randn(T, B, I)
    h = torch.randn(L, B, P)
    hidden = (h, torch.randn(L, B, H)) if name == "LSTM" else h
    perm = torch.tensor([2, 0, 1])
    for m in (ours, theirs):
        m.check_forward_args(x, hidden, None)
        got = m.permute_hidden(hidden, perm)
        for a, b in zip(got if name == "LSTM" else (got,),
                        hidden if name == "LSTM" else (hidden,), strict=True):
            assert torch.equal(a, b.index_select(1, perm))
        assert m.get_expected_hidden_size(x, None) == (L, B, P)
    if name == "LSTM":
        assert ours.get_expected_cell_size(x, None) == theirs.get_expected_cell_size(x, None)
        bad = (hidden[0], torch.randn(L, B + 1, H))
    else:
        bad = torch.randn(L, B + 1, P)
    errors = []
    for m in (ours, theirs):
        with pytest.raises(RuntimeError) as info:
            m.check_forward_args(x, bad, None)
        errors.append(str(info.value))
    assert errors[0] == errors[1]

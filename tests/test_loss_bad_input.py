"""Every wrong argument of the per-step loss raises a clear error (argument,
expected, given) before any kernel runs: from the API and the reference alike
(same checks, same words), from the raw ops (the C++ checks), and from RNNLoss."""

import pytest
import torch

from helpers import make_loss_problem
from rnnkern import RNNLoss, functional, reference

T, B, I, H, O = 6, 3, 4, 5, 7


def problem(loss="cross_entropy"):
    tensors, target, _ = make_loss_problem(T, B, I, H, O, loss=loss, dtype=torch.float32)
    return tensors, target


BAD = {
    # target
    "target shape": (dict(target=torch.zeros(T, B + 1, dtype=torch.int64)), ValueError,
                     r"target must have shape \(T, B\) = \(6, 3\), got \(6, 4\)"),
    "target 3-D for ce": (dict(target=torch.zeros(T, B, O, dtype=torch.int64)), ValueError,
                          r"target must have shape \(T, B\) = \(6, 3\), got \(6, 3, 7\)"),
    "target float for ce": (dict(target=torch.zeros(T, B)), TypeError,
                            r"target must be int64 class indices for loss='cross_entropy', got torch.float32"),
    "target int32": (dict(target=torch.zeros(T, B, dtype=torch.int32)), TypeError,
                     r"target must be int64 class indices for loss='cross_entropy', got torch.int32"),
    "target too large": (dict(target=lambda t: t.index_put((torch.tensor(2), torch.tensor(1)), torch.tensor(O))),
                         ValueError, r"target must hold class indices in \[0, O=7\) or ignore_index=-100, got 7 at \[t=2, b=1\]"),
    "target negative": (dict(target=lambda t: t.index_put((torch.tensor(0), torch.tensor(2)), torch.tensor(-1))),
                        ValueError, r"target must hold class indices in \[0, O=7\) or ignore_index=-100, got -1 at \[t=0, b=2\]"),
    "target batch_first position": (dict(batch_first=True, input=lambda t: torch.randn(B, T, I),
                                         target=torch.full((B, T), 9)), ValueError,
                                    r"got 9 at \[t=0, b=0\]"),
    "target list": (dict(target=[[0] * B] * T), RuntimeError,
                    r"Expected a value of type 'Tensor' for argument 'target' but instead found type 'list'"),
    "target mse shape": (dict(loss="mse", target=torch.zeros(T, B, O + 1)), ValueError,
                         r"target must have shape \(T, B, O\) = \(6, 3, 7\), got \(6, 3, 8\)"),
    "target mse dtype": (dict(loss="mse", target=torch.zeros(T, B, O, dtype=torch.float64)), TypeError,
                         r"target must have the input's dtype torch.float32 for loss='mse', got torch.float64"),
    "target mse int": (dict(loss="mse", target=torch.zeros(T, B, O, dtype=torch.int64)), TypeError,
                       r"target must have the input's dtype torch.float32 for loss='mse', got torch.int64"),
    "target requires grad": (dict(loss="mse", target=torch.zeros(T, B, O, requires_grad=True)), ValueError,
                             r"target must not require grad: rnn_loss gives no gradient to target"),
    # loss_mask
    "loss_mask shape": (dict(loss_mask=torch.ones(B, T, dtype=torch.bool)), ValueError,
                        r"loss_mask must have shape \(T, B\) = \(6, 3\), got \(3, 6\)"),
    "loss_mask 1-D": (dict(loss_mask=torch.ones(T * B)), ValueError,
                      r"loss_mask must have shape \(T, B\) = \(6, 3\), got \(18,\)"),
    "loss_mask int": (dict(loss_mask=torch.ones(T, B, dtype=torch.int64)), TypeError,
                      r"loss_mask must be bool or floating, got torch.int64"),
    "loss_mask negative": (dict(loss_mask=torch.full((T, B), -0.5)), ValueError,
                           r"loss_mask must be finite and >= 0, got -0.5"),
    "loss_mask nan": (dict(loss_mask=torch.full((T, B), float("nan"))), ValueError,
                      r"loss_mask must be finite and >= 0, got nan"),
    "loss_mask requires grad": (dict(loss_mask=torch.ones(T, B, requires_grad=True)), ValueError,
                                r"loss_mask must not require grad"),
    "loss_mask list": (dict(loss_mask=[1.0] * T), RuntimeError,
                       r"Expected a value of type 'Optional\[Tensor\]' for argument 'loss_mask' but instead found type 'list'"),
    # options
    "loss unknown": (dict(loss="nll"), ValueError, r"loss must be 'cross_entropy' or 'mse', got 'nll'"),
    "reduction unknown": (dict(reduction="avg"), ValueError,
                          r"reduction must be one of 'mean', 'sum', 'seq_mean', 'seq_sum', 'none', got 'avg'"),
    "steps unknown": (dict(steps="first"), ValueError, r"steps must be 'all' or 'last', got 'first'"),
    "steps last len 0": (dict(steps="last", lengths=torch.tensor([3, 0, 6])), ValueError,
                         r"steps='last' needs every sequence to have a last step: lengths must be >= 1, got min 0"),
    "ignore_index float": (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int, got 1.5"),
    "label_smoothing > 1": (dict(label_smoothing=1.5), ValueError,
                            r"label_smoothing must be in \[0, 1\], got 1.5"),
    "label_smoothing < 0": (dict(label_smoothing=-0.1), ValueError,
                            r"label_smoothing must be in \[0, 1\], got -0.1"),
    "label_smoothing mse": (dict(loss="mse", target=torch.zeros(T, B, O), label_smoothing=0.1), ValueError,
                            r"label_smoothing applies to loss='cross_entropy' only, got 0.1 with loss='mse'"),
    # head
    "weight_out H": (dict(weight_out=torch.randn(O, H + 1)), ValueError,
                     r"weight_out must have shape \(O, H\) = \(7, 5\), got \(7, 6\)"),
    "weight_out 1-D": (dict(weight_out=torch.randn(O)), ValueError,
                       r"weight_out must be 2-D \(O, H\), got shape \(7,\)"),
    "weight_out dtype": (dict(weight_out=torch.randn(O, H, dtype=torch.float64)), TypeError,
                         r"weight_out must have the input's dtype torch.float32, got torch.float64"),
    "weight_out empty": (dict(weight_out=torch.randn(0, H)), ValueError,
                         r"the head needs O >= 1 outputs, got weight_out of shape \(0, 5\)"
),
    "bias_out shape": (dict(bias_out=torch.randn(O + 1)), ValueError,
                       r"bias_out must have shape \(O,\) = \(7,\), got \(8,\)"),
    # the layer's checks still apply
    "hx shape": (dict(hx=torch.randn(B, H + 1)), ValueError, r"hx must have shape \(B, H\) = \(3, 5\), got \(3, 6\)"),
    "truncate 0": (dict(truncate=0), ValueError, r"truncate must be an int >= 1 or None, got 0"),
}


@pytest.mark.parametrize("impl", [functional, reference], ids=["functional", "reference"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(impl, name):
    override, exc, pattern = BAD[name]
    override = dict(override)
    tensors, target = problem(override.get("loss", "cross_entropy"))
    kw = {k: v.detach() if v is not None else None for k, v in tensors.items()}
    for k in list(override):
        if k in kw or k == "target":
            v = override.pop(k)
            base = target if k == "target" else kw[k]
            value = v(base) if callable(v) else v
            if k == "target":
                target = value
            else:
                kw[k] = value
    with pytest.raises(exc, match=pattern):
        impl.rnn_loss(kw["input"], target, kw["hx"], kw["weight_ih"], kw["weight_hh"],
                      kw["bias_ih"], kw["bias_hh"], kw["weight_out"], kw["bias_out"], **override)


def raw_fwd_args(**override):
    tensors, target = problem(override.pop("loss_kind", "cross_entropy"))
    t = {k: v.detach() for k, v in tensors.items()}
    args = dict(input=t["input"], target=target, hx=t["hx"], weight_ih=t["weight_ih"],
                weight_hh=t["weight_hh"], bias_ih=t["bias_ih"], bias_hh=t["bias_hh"],
                weight_out=t["weight_out"], bias_out=t["bias_out"], lengths=None, loss_mask=None,
                nonlinearity="tanh", loss="cross_entropy", steps="all", reduction="mean",
                ignore_index=-100, label_smoothing=0.0, compute_grad=True, chunk_rows=0)
    args.update(override)
    return args


RAW_BAD = {
    "target range": (dict(target=torch.full((T, B), O)), ValueError,
                     r"rnnkern.elman_loss_fwd: target must hold class indices in \[0, O=7\) or ignore_index=-100, got 7 at \[t=0, b=0\]"),
    "target dtype": (dict(target=torch.zeros(T, B)), TypeError,
                     r"rnnkern.elman_loss_fwd: target must be int64 class indices for loss='cross_entropy', got torch.float32"),
    "target shape": (dict(target=torch.zeros(B, T, dtype=torch.int64)), ValueError,
                     r"rnnkern.elman_loss_fwd: target must have shape \(T, B\) = \(6, 3\), got \(3, 6\)"),
    "mse target shape": (dict(loss="mse", target=torch.zeros(T, B, O - 1)), ValueError,
                         r"target must have shape \(T, B, O\) = \(6, 3, 7\), got \(6, 3, 6\)"),
    "loss_mask shape": (dict(loss_mask=torch.ones(T, B + 1)), ValueError,
                        r"loss_mask must have shape \(T, B\) = \(6, 3\), got \(6, 4\)"),
    "loss_mask negative": (dict(loss_mask=torch.full((T, B), -2.0)), ValueError,
                           r"loss_mask must be finite and >= 0, got -2"),
    "loss": (dict(loss="hinge"), ValueError, r"loss must be 'cross_entropy' or 'mse', got 'hinge'"),
    "reduction": (dict(reduction="max"), ValueError, r"reduction must be one of .*, got 'max'"),
    "steps": (dict(steps="every"), ValueError, r"steps must be 'all' or 'last', got 'every'"),
    "steps last len 0": (dict(steps="last", lengths=torch.tensor([0, 6, 6])), ValueError,
                         r"lengths must be >= 1, got min 0"),
    "label_smoothing": (dict(label_smoothing=2.0), ValueError, r"label_smoothing must be in \[0, 1\], got 2"),
    "weight_out": (dict(weight_out=torch.randn(O, H - 1)), ValueError,
                   r"weight_out must have shape \(O, H\) = \(7, 5\), got \(7, 4\)"),
    "chunk_rows": (dict(chunk_rows=-1), ValueError, r"chunk_rows must be >= 0 \(0: automatic\), got -1"),
}


@pytest.mark.parametrize("name", list(RAW_BAD))
def test_raw_op_checks(name):
    """The C++ checks guard direct calls of the op, before any kernel runs."""
    override, exc, pattern = RAW_BAD[name]
    with pytest.raises(exc, match=pattern):
        torch.ops.rnnkern.elman_loss_fwd(**raw_fwd_args(**override))


def test_raw_bwd_checks_grad_loss_shape():
    args = raw_fwd_args()
    value, output, h_n, _, weight, g_out, g_w, g_b = torch.ops.rnnkern.elman_loss_fwd(**args)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \(\) \(a scalar reduction\) = \(\), got \(6, 3\)"):
        torch.ops.rnnkern.elman_loss_bwd(
            torch.ones(T, B), torch.zeros(B, H), args["input"], args["target"], args["hx"],
            args["weight_ih"], args["weight_hh"], args["weight_out"], args["bias_out"], None,
            output, weight, g_out, g_w, g_b, "tanh", "cross_entropy", "mean", -100, 0.0, 0, False, 0)


MODULE_BAD = {
    "two layers": (lambda: torch.nn.RNN(I, H, num_layers=2), lambda: torch.nn.Linear(H, O), ValueError,
                   r"RNNLoss fuses a one-layer RNN only: rnn must have num_layers=1, got 2"),
    "bidirectional": (lambda: torch.nn.RNN(I, H, bidirectional=True), lambda: torch.nn.Linear(H, O),
                      ValueError, r"rnn must have bidirectional=False, got True"),
    "dropout": (lambda: torch.nn.RNN(I, H, num_layers=1, dropout=0.3), lambda: torch.nn.Linear(H, O),
                ValueError, r"RNNLoss cannot fuse dropout: rnn must have dropout=0, got 0.3"),
    "lstm head size": (lambda: torch.nn.LSTM(I, H, proj_size=3), lambda: torch.nn.Linear(H, O),
                       ValueError, r"head must take the rnn's proj_size=3 features, got in_features=5"),
    "two-layer gru": (lambda: torch.nn.GRU(I, H, num_layers=2), lambda: torch.nn.Linear(H, O),
                      ValueError, r"rnn must have num_layers=1, got 2"),
    "not an rnn": (lambda: torch.nn.Linear(I, H), lambda: torch.nn.Linear(H, O), TypeError,
                   r"rnn must be a torch.nn.RNN, LSTM or GRU .*, got Linear"),
    "head type": (lambda: torch.nn.RNN(I, H), lambda: torch.nn.Sequential(torch.nn.Linear(H, O)),
                  TypeError, r"head must be a torch.nn.Linear, got Sequential"),
    "head size": (lambda: torch.nn.RNN(I, H), lambda: torch.nn.Linear(H + 2, O), ValueError,
                  r"head must take the rnn's hidden_size=5 features, got in_features=7"),
}


@pytest.mark.filterwarnings("ignore:dropout option adds dropout")
@pytest.mark.parametrize("name", list(MODULE_BAD))
def test_module_refuses_what_it_cannot_fuse(name):
    rnn, head, exc, pattern = MODULE_BAD[name]
    with pytest.raises(exc, match=pattern):
        RNNLoss(rnn(), head())


@pytest.mark.parametrize("kw,pattern", [
    (dict(loss="l1"), r"loss must be 'cross_entropy' or 'mse', got 'l1'"),
    (dict(reduction="batchmean"), r"reduction must be one of .*, got 'batchmean'"),
    (dict(steps="first"), r"steps must be 'all' or 'last', got 'first'"),
    (dict(loss="mse", label_smoothing=0.2), r"label_smoothing applies to loss='cross_entropy' only"),
], ids=str)
def test_module_checks_options_at_construction(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        RNNLoss(torch.nn.RNN(I, H), torch.nn.Linear(H, O), **kw)

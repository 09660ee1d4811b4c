"""The functional API over the fused kernels.

Each forward op carries its own autograd (C++, csrc/autograd.cpp), so these
functions only convert layouts and call it: eager, torch.compile and
torch.export programs differentiate alike. The op checks every argument
(shapes, dtypes, devices, values) before its kernel runs; these functions
check only what the op cannot see: the Python types its schema would accept
(truncate=True, reverse=1), and the user's layout (batch_first), which they
convert (rnnkern/_checks.py).
"""

from __future__ import annotations

import sys
from typing import Optional, Union

import torch

from . import _fx, _onnx, _ops
from ._checks import (LAYER_TENSORS, LOSS_TENSORS, LengthsLike, cast_down, cast_loss_down,
                      layer_api_args, loss_api_args, loss_target_up, lower_precision_up,
                      lstm_state, op_elman_checks, op_layer_checks)
from ._details import RNNLossDetails

LSTMState = tuple  # (h (B, P), c (B, H))
HxLike = Union[torch.Tensor, LSTMState, None]  # the cell's hx: h, or (h, c) for the LSTM

__all__ = ["rnn", "lstm", "gru", "rnn_loss", "RNNLossDetails"]


@_fx.leaf_function
def rnn(
    input: torch.Tensor,
    hx: Optional[torch.Tensor],
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor] = None,
    bias_hh: Optional[torch.Tensor] = None,
    *,
    nonlinearity: str = "tanh",
    batch_first: bool = False,
    lengths: LengthsLike = None,
    truncate: Optional[int] = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Elman layer, one direction, forward and whole BPTT each in one kernel call.

    h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act = tanh or relu.

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``. float32 or float64;
            any strides. bfloat16 or float16, with hx and the weights of the
            same dtype: computed in float32 on them cast up, the outputs
            rounded back to that dtype. Under torch.autocast, bfloat16 and
            float16 tensors (input, hx, weights) are cast to float32 and the
            output is float32. The same holds for lstm, gru and rnn_loss.
        hx: (B, H) initial state, or None for zeros.
        weight_ih: (H, I).  weight_hh: (H, H).  bias_ih, bias_hh: (H,) or None.
        nonlinearity: 'tanh' or 'relu'.
        lengths: (B,) int64, 0 <= len <= T, in any order. A list of ints, another
            integer dtype or a numpy integer array is converted to int64.
            The semantics of nn.RNN on a PackedSequence with enforce_sorted=False,
            without sorting or packing: output is 0 for t >= len_b, the state is
            frozen there, h_n[b] is the state after step len_b - 1 (hx[b] if
            len_b = 0) and padded positions of input get zero gradient.
        truncate: K >= 1 for truncated BPTT: the gradient through the hidden
            state is cut between steps jK-1 and jK, exactly as running the RNN
            over K-step chunks with ``h = h.detach()`` between them. Forward is
            unchanged. None: full BPTT.
        reverse: process each sequence from its last valid step back to step 0
            (the reverse direction of a bidirectional layer); truncation chunks
            then count from that first processed step.

    Returns:
        (output, h_n): output (T, B, H) or (B, T, H); h_n (B, H).

    Double backward is not supported and raises.
    """
    (input, hx, weight_ih, weight_hh, bias_ih, bias_hh), low = lower_precision_up(
        LAYER_TENSORS, input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    x, lengths, truncate = layer_api_args(input, batch_first=batch_first, lengths=lengths,
                                          truncate=truncate, reverse=reverse)  # x [T,B,I]
    output, h_n = _elman_layer(x, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                               nonlinearity=nonlinearity, lengths=lengths, truncate=truncate,
                               reverse=reverse)
    if batch_first:
        output = output.transpose(0, 1)
    return cast_down(low, output, h_n)


def _elman_layer(x, hx, weight_ih, weight_hh, bias_ih, bias_hh, *, nonlinearity, lengths,
                 truncate, reverse):
    """One Elman layer, time-major, x [T,B,I] -> output [T,B,H], h_n [B,H]. The
    arguments are the op's to check (the modules call this directly: their
    parameters have the right shapes, and the op checks every call anyway)."""
    if _onnx.exporting(x):  # torch.onnx.export: ONNX's RNN operator
        _onnx.check("rnnkern.elman_fwd", op_elman_checks, x, _elman_state(x, hx, weight_hh),
                    weight_ih, weight_hh, bias_ih, bias_hh, lengths, nonlinearity, truncate or 0)
        return _onnx.layer(f"rnn_{nonlinearity}", x, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                           None, lengths, reverse)[:2]
    inputs = (x, _elman_state(x, hx, weight_hh), weight_ih, weight_hh, bias_ih, bias_hh, lengths,
              nonlinearity, reverse, truncate or 0)
    return _apply_elman(*inputs)


def _dims(t, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == n


def _elman_state(x, hx, weight_hh):
    """hx, or zeros [B,H] for None; where x or weight_hh is not what the op
    takes, a [0] placeholder, for the op to report that first (its schema
    takes a tensor: None would fail in the dispatcher, before its checks)."""
    if hx is None and _dims(x, 3) and _dims(weight_hh, 2):
        return x.new_zeros(x.shape[1], weight_hh.shape[0])
    return _placeholder(x) if hx is None else hx


def _placeholder(x):
    """A [0] tensor on x's device and of its dtype (None where x is not a
    tensor: the op's schema refuses x first)."""
    return x.new_empty(0) if isinstance(x, torch.Tensor) else None


class _Elman(torch.autograd.Function):
    """functional.rnn's autograd.Function: ``rnnkern::elman_fwd`` with the
    op's own backward (rnnkern/_ops.py). The op alone differentiates too (its
    autograd is registered: torch.export graphs hold it); going through a
    Function with setup_context is what torch.func's transforms need."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return _ops.elman_fwd(*inputs)

    setup_context = staticmethod(_ops.elman_fwd_setup)
    backward = staticmethod(_ops.elman_fwd_backward)


class _Layer(torch.autograd.Function):
    """lstm's and gru's autograd.Function: ``rnnkern::layer_fwd`` with the op's
    own backward (rnnkern/_ops.py), as _Elman; grad_norm (None, or a [T,B]
    tensor) receives ||dL/dh_t|| in backward, for rnn_loss's details."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_norm, *inputs):
        return _ops.layer_fwd(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _ops.layer_fwd_setup(ctx, inputs[1:], output)
        ctx.grad_norm = inputs[0]

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_saved):
        grads = _ops.layer_fwd_backward(ctx, grad_output, grad_h_n, grad_c_n,
                                        want_input=ctx.needs_input_grad[1],
                                        grad_norm=ctx.grad_norm)
        return (None, *grads)


class _HeadLoss(torch.autograd.Function):
    """The per-step loss head on any cell's states: ``rnnkern::head_loss_fwd``
    and its backward (rnnkern/_ops.py). Returns the op's outputs; only the
    loss is differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return _ops.head_loss_fwd(*inputs)

    setup_context = staticmethod(_ops.head_loss_setup)
    backward = staticmethod(_ops.head_loss_backward)


def _records_graph(tensors) -> bool:
    """Whether autograd records a call on these arguments: grad mode on and a
    tensor among them that requires grad."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any() over a generator: 1 us less per call at T = B = 1
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def _grad_ahead(tensors) -> bool:
    """Whether a backward is to come, for the ops' flags that save state for
    it (layer_fwd's train, the loss ops' compute_grad): _records_graph, but
    False under torch.jit.trace, whose graph must not bake in the grad mode of
    the tracing call; the op's autograd sets the flag itself whenever it
    records the call."""
    return not torch.jit.is_tracing() and _records_graph(tensors)


def _variants(base, what: str, op, *, side_output: bool = False):
    """How a Function ``base`` (setup_context style) is applied, by context.
    Plain eager calls the op itself, whose autograd is C++ (csrc/autograd.cpp):
    no Python autograd.Function runs, which at small sizes cost more than the
    kernels. Compiled code applies ``base`` (Dynamo traces it); torch.func's
    transforms, which take no C++ Function, apply it with a jvp that refuses
    forward mode by name (Dynamo traces no Function with a jvp); and an old-style
    twin that calls the op below autograd serves what the op alone cannot: a
    forward-AD level (to refuse forward mode by name) and, with
    ``side_output``, a grad_norm tensor (the Function's first input; None: not
    wanted) that backward fills in."""

    def jvp(ctx, *tangents):
        _ops.no_forward_ad(what)

    eager = type(base.__name__ + "Eager", (base,), {"jvp": staticmethod(jvp)})

    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            output = base.forward(*inputs)
        base.setup_context(ctx, inputs, output)
        # An unused output's gradient comes to backward as None, not as a
        # zero-filled tensor: the saved state (gates, cell, dL/dh from the
        # head: [T,B,*] each) is an output, and filling its zeros cost a
        # tenth of a small training step.
        ctx.set_materialize_grads(False)
        return output

    fast = type(base.__name__ + "Fast", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(base.backward),
                 "jvp": staticmethod(jvp)})

    def apply(*inputs):
        if torch.compiler.is_compiling():
            # With no gradient to record, the op alone (Dynamo inlines a
            # Function's forward there, and would hand this one a ctx).
            if not _records_graph(inputs):
                return op(*inputs[1:]) if side_output else op(*inputs)
            return base.apply(*inputs)
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return eager.apply(*inputs)
        if torch.autograd.forward_ad._current_level >= 0:
            return fast.apply(*inputs)
        if side_output:
            if inputs[0] is not None:
                return fast.apply(*inputs)
            return op(*inputs[1:])
        return op(*inputs)

    return apply


_apply_elman = _variants(_Elman, "rnnkern.functional.rnn", torch.ops.rnnkern.elman_fwd.default)
_apply_layer = _variants(_Layer, "rnnkern.functional.lstm / gru",
                         torch.ops.rnnkern.layer_fwd.default, side_output=True)
_apply_head_loss = _variants(_HeadLoss, "rnnkern.functional.rnn_loss",
                             torch.ops.rnnkern.head_loss_fwd.default)


def _gated(mode, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, *, batch_first,
           lengths, truncate, reverse):
    (input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), low = lower_precision_up(
        LAYER_TENSORS, input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
        weight_hr)
    x, lengths, truncate = layer_api_args(input, batch_first=batch_first, lengths=lengths,
                                          truncate=truncate, reverse=reverse)  # x [T,B,I]
    if mode == "lstm":
        hx = lstm_state(hx)
    H, P = _gated_sizes(mode, weight_hh, weight_hr)
    output, h_n, c_n = _gated_layer(mode, x, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                    weight_hr, H=H, P=P, lengths=lengths, truncate=truncate,
                                    reverse=reverse)
    if batch_first:
        output = output.transpose(0, 1)
    return cast_down(low, output, ((h_n, c_n) if mode == "lstm" else h_n))


def _gated_sizes(mode, weight_hh, weight_hr) -> tuple:
    """(H, P) as the weights give them, for the zero state; (None, None) where
    they cannot (the op then reports what is wrong with them)."""
    gates = 4 if mode == "lstm" else 3
    if not _dims(weight_hh, 2) or weight_hh.shape[0] % gates or not weight_hh.shape[0]:
        return None, None
    return weight_hh.shape[0] // gates, weight_hh.shape[1]  # (weight_hr, if any: (P, H))


def _gated_state(mode, x, hx, H, P) -> tuple:
    """(h0, c0) as layer_fwd takes them: hx's, or zeros [B,P] and [B,H] (the
    LSTM's c0; None for the GRU); where x or the sizes are not what the op
    takes, a [0] placeholder h0 (as _elman_state), for the op to report that
    first."""
    if hx is not None:
        return tuple(hx) if mode == "lstm" else (hx, None)
    if not _dims(x, 3) or H is None:
        return _placeholder(x), None
    B = x.shape[1]
    return (x.new_zeros(B, P), x.new_zeros(B, H)) if mode == "lstm" else (x.new_zeros(B, H), None)


def _gated_layer(mode, x, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, *, H, P, lengths,
                 truncate, reverse, grad_norm=None):
    """One gated layer, time-major: x [T,B,I] -> output [T,B,P], h_n, c_n; hx
    the cell's state ((h_0, c_0) for the LSTM) or None for zeros (H or P None:
    left to the op to refuse). The op checks the arguments (the modules call
    this directly, as _elman_layer)."""
    h0, c0 = _gated_state(mode, x, hx, H, P)
    if _onnx.exporting(x):  # torch.onnx.export: ONNX's LSTM or GRU operator
        _onnx.check("rnnkern.layer_fwd", op_layer_checks, mode, x, h0, c0, weight_ih, weight_hh,
                    bias_ih, bias_hh, weight_hr, lengths, truncate or 0)
        return _onnx.layer(mode, x, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                           lengths, reverse)
    # Without a backward to come, the op saves no state for it (gates, cell).
    train = _grad_ahead((x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr))
    inputs = (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, mode, reverse,
              truncate or 0, train)
    output, h_n, c_n, *_ = _apply_layer(grad_norm, *inputs)
    return output, h_n, c_n


@_fx.leaf_function
def lstm(
    input: torch.Tensor,
    hx: Optional[LSTMState],
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor] = None,
    bias_hh: Optional[torch.Tensor] = None,
    weight_hr: Optional[torch.Tensor] = None,
    *,
    batch_first: bool = False,
    lengths: LengthsLike = None,
    truncate: Optional[int] = None,
    reverse: bool = False,
):
    """One LSTM layer, one direction (nn.LSTM's math and gate order i, f, g, o),
    forward and whole BPTT each in one kernel call.

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``; float32 or float64.
        hx: (h_0 (B, P), c_0 (B, H)), or None for zeros.
        weight_ih: (4H, I).  weight_hh: (4H, P).  bias_ih, bias_hh: (4H,) or None.
        weight_hr: (P, H), the projection (nn.LSTM's proj_size = P), or None (P = H).
        lengths, truncate, reverse, batch_first: as in ``rnn``; the lengths mask
            and truncation act on h and c alike.

    Returns:
        (output, (h_n, c_n)): output (T, B, P) or (B, T, P); h_n (B, P); c_n (B, H).
    """
    return _gated("lstm", input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                  batch_first=batch_first, lengths=lengths, truncate=truncate, reverse=reverse)


@_fx.leaf_function
def gru(
    input: torch.Tensor,
    hx: Optional[torch.Tensor],
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor] = None,
    bias_hh: Optional[torch.Tensor] = None,
    *,
    batch_first: bool = False,
    lengths: LengthsLike = None,
    truncate: Optional[int] = None,
    reverse: bool = False,
):
    """One GRU layer, one direction (nn.GRU's math: gates r, z, n, the reset
    gate applied after the hidden product), forward and whole BPTT each in one
    kernel call.

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``; float32 or float64.
        hx: (B, H), or None for zeros.
        weight_ih: (3H, I).  weight_hh: (3H, H).  bias_ih, bias_hh: (3H,) or None.
        lengths, truncate, reverse, batch_first: as in ``rnn``.

    Returns:
        (output, h_n): output (T, B, H) or (B, T, H); h_n (B, H).
    """
    return _gated("gru", input, hx, weight_ih, weight_hh, bias_ih, bias_hh, None,
                  batch_first=batch_first, lengths=lengths, truncate=truncate, reverse=reverse)


class _ElmanLoss(torch.autograd.Function):
    """rnn_loss's autograd.Function: ``rnnkern::elman_loss_fwd`` and the op's
    own backward, which also hands ||dL/dh_t|| to the caller's grad_norm
    tensor (None: not wanted), a side output only eager autograd delivers.
    Returns the op's outputs; only the loss and h_n are differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_norm, *inputs):
        return _ops.elman_loss_fwd(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_norm, *op_inputs = inputs
        _ops.elman_loss_setup(ctx, op_inputs, output)
        ctx.grad_norm = grad_norm
        ctx.mark_non_differentiable(*(o for i, o in enumerate(output) if i not in (0, 2)))

    @staticmethod
    def backward(ctx, grad_loss, _g_output, grad_h_n, *_rest):
        want_norm = ctx.grad_norm is not None
        grads, grad_norm = _ops.elman_loss_backward(ctx, grad_loss, grad_h_n,
                                                    ctx.needs_input_grad[1], want_norm)
        if want_norm:
            ctx.grad_norm.copy_(grad_norm)
        return (None, *grads, *([None] * 9))


_apply_elman_loss = _variants(_ElmanLoss, "rnnkern.functional.rnn_loss",
                              torch.ops.rnnkern.elman_loss_fwd.default, side_output=True)


@_fx.leaf_function
def rnn_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    hx: HxLike,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
    weight_out: torch.Tensor,
    bias_out: Optional[torch.Tensor] = None,
    *,
    loss: str = "cross_entropy",
    mode: Optional[str] = None,
    nonlinearity: str = "tanh",
    weight_hr: Optional[torch.Tensor] = None,
    batch_first: bool = False,
    lengths: LengthsLike = None,
    loss_mask: Optional[torch.Tensor] = None,
    steps: str = "all",
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    truncate: Optional[int] = None,
    return_details: bool = False,
    _chunk_rows: int = 0,
):
    """One recurrent layer (any cell), the head y_t = h_t W_out^T + b_out and a
    loss at every step, reduced with weights; for the Elman cell in one fused
    kernel call each way, for the LSTM and GRU one layer call and one head call. The (T, B, O)
    head output and its gradient are never held whole: the head runs over the
    T*B rows a chunk at a time, computing each chunk's loss and its gradient in
    the forward sweep.

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``; float32 or float64,
            or bfloat16 or float16 as in ``rnn`` (the loss, h_n and step_loss
            then come back in that dtype; grad_norm stays float32).
        target: laid out like the steps. loss='cross_entropy': (T, B) int64 class
            indices in [0, O), or ignore_index. loss='mse': (T, B, O) of the
            input's dtype. Takes no gradient.
        hx: (B, H) initial state, or None for zeros.
        weight_ih (G, I), weight_hh (G, P), bias_ih, bias_hh (G,) or None: the
            layer (G = H, 4H or 3H rows; P = H but for a projected LSTM).
        weight_out (O, P), bias_out (O,) or None: the head.
        mode: the cell, 'rnn_tanh', 'rnn_relu', 'lstm' or 'gru'; None (the
            default) is 'rnn_' + nonlinearity. hx is then the cell's: (h_0, c_0)
            for 'lstm'.
        weight_hr: (P, H), the LSTM's projection, or None.
        loss: 'cross_entropy' (with ``label_smoothing`` exactly as
            F.cross_entropy) or 'mse' (the mean over O of the squared error).
        nonlinearity, lengths, truncate: as in ``rnn``.
        loss_mask: (T, B) (or (B, T)) bool or floating >= 0, or None; multiplies
            the weights. Takes no gradient.
        steps: 'all', or 'last' to keep only t = len_b - 1 (needs every length >= 1).
        reduction: with weights w[t,b] = [t < len_b] (or [t = len_b - 1]) *
            loss_mask * [target != ignore_index] and the per-step loss l:
            'sum' sum w*l; 'mean' sum w*l / sum w; 'seq_sum' the sum over
            sequences with sum_t w > 0 of sum_t w*l / sum_t w; 'seq_mean' the mean
            of those; 'none' w*l laid out like the steps (any upstream gradient
            works). An all-masked batch (no positive weight) gives 0 and zero
            gradients, never NaN.
        return_details: also return h_n, step_loss and grad_norm (RNNLossDetails).

    Returns:
        the loss; or RNNLossDetails(loss, h_n, step_loss, grad_norm) with per-step
        tensors laid out like the steps. grad_norm is NaN until backward through
        this loss, which fills in ||dL/dh_t|| per sequence. Under torch.compile
        a call with return_details runs eagerly (a graph break; fullgraph=True
        raises), since a compiled graph cannot have backward fill in an output.

    Double backward is not supported and raises.
    """
    if _onnx.exporting(input):
        raise RuntimeError("rnn_loss (and RNNLoss) cannot be exported to ONNX: it is a "
                           "training loss; export the model's forward without it")
    if return_details and _exporting():
        raise RuntimeError("rnn_loss(return_details=True) cannot be exported: its grad_norm is "
                           "filled in by backward, which an exported program does not run; "
                           "export the call without return_details")
    (input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out, bias_out,
     weight_hr), low = lower_precision_up(LOSS_TENSORS, input, hx, weight_ih, weight_hh,
                                          bias_ih, bias_hh, weight_out, bias_out, weight_hr)
    target = loss_target_up(target, loss, low, input)
    run = _rnn_loss_details if return_details else _rnn_loss
    result = run(input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out, bias_out,
                 loss=loss, mode=mode, nonlinearity=nonlinearity, weight_hr=weight_hr,
                 batch_first=batch_first, lengths=lengths, loss_mask=loss_mask, steps=steps,
                 reduction=reduction, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, truncate=truncate,
                 return_details=return_details, chunk_rows=_chunk_rows)
    return cast_loss_down(low, result)


def _rnn_loss(input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out, bias_out, *,
              loss, mode, nonlinearity, weight_hr, batch_first, lengths, loss_mask, steps,
              reduction, ignore_index, label_smoothing, truncate, return_details, chunk_rows):
    """rnn_loss in float32 or float64 (after lower_precision_up)."""
    mode, x, target, loss_mask, lengths, truncate, label_smoothing = loss_api_args(
        input, target, weight_out, weight_hr, loss_mask, mode=mode, nonlinearity=nonlinearity,
        batch_first=batch_first, lengths=lengths, truncate=truncate,
        return_details=return_details, loss=loss, ignore_index=ignore_index,
        label_smoothing=label_smoothing)  # x, target, loss_mask time-major
    if mode in ("lstm", "gru"):
        return _gated_loss(mode, x, target, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                           weight_out, bias_out, weight_hr, loss=loss, batch_first=batch_first,
                           lengths=lengths, loss_mask=loss_mask, steps=steps,
                           reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, truncate=truncate,
                           return_details=return_details, chunk_rows=chunk_rows)
    nonlinearity = mode[len("rnn_"):]
    args = (x, target, _elman_state(x, hx, weight_hh), weight_ih, weight_hh, bias_ih, bias_hh,
            weight_out, bias_out, lengths, loss_mask)
    # With a gradient ahead, the forward sweep computes the head's gradients
    # too (a scalar reduction's are known then); in inference it runs once.
    needs_grad = _grad_ahead(args)
    inputs = (*args, nonlinearity, loss, steps, reduction, ignore_index, label_smoothing,
              needs_grad, int(chunk_rows), truncate or 0)
    grad_norm = _nan_norms(x) if return_details else None  # [T,B]
    value, _, h_n, step_loss, *_ = _apply_elman_loss(grad_norm, *inputs)
    if reduction == "none" and batch_first:
        value = value.transpose(0, 1)
    if not return_details:
        return value
    if batch_first:
        step_loss, grad_norm = step_loss.transpose(0, 1), grad_norm.transpose(0, 1)
    return RNNLossDetails(value, h_n, step_loss, grad_norm)


# grad_norm is written by backward into a tensor that forward returned. A
# compiled graph cannot express that (AOTAutograd would have a forward output
# depend on the backward graph), so with details rnn_loss runs eagerly: a graph
# break under torch.compile, and under fullgraph=True Dynamo's error with this
# reason. An export never runs that backward: rnn_loss refuses it first.
_EAGER_REASON = ("rnnkern.rnn_loss(return_details=True) runs eagerly: its grad_norm is filled "
                 "in by backward, which a compiled graph cannot express; compile the call "
                 "without return_details, or without fullgraph=True")


def _eager(fn):
    """torch.compiler.disable(fn), with the reason where this torch takes one (2.8+)."""
    try:
        return torch.compiler.disable(fn, reason=_EAGER_REASON)
    except TypeError:
        return torch.compiler.disable(fn)


# torch.compiler.disable imports Dynamo (about 1.2 s), which a process that
# never compiles (or builds no optimizer, which imports it too) need not pay:
# the wrapper is made at import only where Dynamo is loaded already, else at
# the first call with details. A first call traced by Dynamo still runs
# eagerly (Dynamo breaks the graph at torch.compiler.disable itself).
_rnn_loss_eager = _eager(_rnn_loss) if "torch._dynamo" in sys.modules else None


_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch 2.5+


def _rnn_loss_details(*args, **kwargs):
    global _rnn_loss_eager
    if _rnn_loss_eager is None:
        _rnn_loss_eager = _eager(_rnn_loss)
    return _rnn_loss_eager(*args, **kwargs)


def _nan_norms(x):
    """grad_norm's tensor [T,B], NaN until backward fills it in (None where x is
    not a 3-D tensor: the op refuses it)."""
    return x.new_full((x.shape[0], x.shape[1]), float("nan")) if _dims(x, 3) else None


def _gated_loss(mode, x, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out,
                bias_out, weight_hr, *, loss, batch_first, lengths, loss_mask, steps, reduction,
                ignore_index, label_smoothing, truncate, return_details, chunk_rows):
    """rnn_loss for the LSTM and the GRU, after rnn_loss's conversions (x,
    target and loss_mask time-major): the layer op, then the head op on its
    states (the [T,B,O] logits never exist: the head runs a chunk of rows at a
    time); autograd chains the two backward ops."""
    if mode == "lstm":
        hx = lstm_state(hx)
    H, P = _gated_sizes(mode, weight_hh, weight_hr)
    if P is not None and _dims(x, 3) and not torch.compiler.is_compiling() \
            and torch._C._functorch.peek_interpreter_stack() is None:
        # The head op's checks before the layer op runs (else a wrong target
        # would be refused only after the layer's kernel); with P unknown the
        # layer op refuses weight_hh first.
        torch.ops.rnnkern.head_loss_check(x, P, target, weight_out, bias_out, lengths, loss_mask,
                                          loss, steps, reduction, ignore_index, label_smoothing)
    grad_norm = _nan_norms(x) if return_details else None  # [T,B]
    output, h_n, c_n = _gated_layer(mode, x, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                    weight_hr, H=H, P=P, lengths=lengths, truncate=truncate,
                                    reverse=False, grad_norm=grad_norm)  # output [T,B,P]
    needs_grad = _grad_ahead((output, weight_out, bias_out))
    value, step_loss, *_ = _apply_head_loss(output, target, weight_out, bias_out, lengths, loss_mask,
                                    loss, steps, reduction, ignore_index, label_smoothing,
                                    needs_grad, int(chunk_rows))
    if reduction == "none" and batch_first:
        value = value.transpose(0, 1)
    if not return_details:
        return value
    state = (h_n, c_n) if mode == "lstm" else h_n
    if batch_first:
        step_loss, grad_norm = step_loss.transpose(0, 1), grad_norm.transpose(0, 1)
    return RNNLossDetails(value, state, step_loss, grad_norm)

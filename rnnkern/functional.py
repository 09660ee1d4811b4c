"""The functional API over the fused kernels, and its autograd.Function."""

from __future__ import annotations

from typing import Optional

import torch

from . import _ops
from ._checks import LengthsLike, check_loss_args, check_rnn_args
from ._details import RNNLossDetails

__all__ = ["rnn", "rnn_loss", "ElmanFunction", "ElmanLossFunction", "RNNLossDetails"]


def _no_double_backward(name: str) -> None:
    # Backward runs with grad mode on only under create_graph=True.
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"rnnkern: double backward through {name} is not supported: its backward is a "
            "fused kernel without a derivative of its own. Use rnnkern.reference for "
            "higher-order gradients.")


class ElmanFunction(torch.autograd.Function):
    """One Elman layer: forward is ``rnnkern::elman_fwd`` and backward the whole
    BPTT in one ``rnnkern::elman_bwd`` call. Inputs are time-major:
    input [T,B,I], hx [B,H], weight_ih [H,I], weight_hh [H,H], biases [H] or None,
    lengths [B] int64 or None; truncate is 0 for none. Returns output [T,B,H], h_n [B,H].
    """

    @staticmethod
    def forward(ctx, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                nonlinearity: str, reverse: bool, truncate: int):
        output, h_n = _ops.elman_fwd(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                     lengths, nonlinearity, reverse)
        # Backward needs h at every step (act' is derived from it) and nothing else
        # of the forward pass.
        ctx.save_for_backward(input, hx, weight_ih, weight_hh, output, lengths)
        ctx.config = (nonlinearity, reverse, truncate, bias_ih is not None, bias_hh is not None)
        return output, h_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n):
        _no_double_backward("rnnkern.functional.rnn")
        input, hx, weight_ih, weight_hh, output, lengths = ctx.saved_tensors
        nonlinearity, reverse, truncate, has_b_ih, has_b_hh = ctx.config
        want_in = ctx.needs_input_grad[0]
        g_in, g_hx, g_w_ih, g_w_hh, g_b = _ops.elman_bwd(
            grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, lengths,
            nonlinearity, reverse, truncate, want_in)
        return (g_in if want_in else None, g_hx, g_w_ih, g_w_hh, g_b if has_b_ih else None,
                g_b if has_b_hh else None, None, None, None, None)


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
            any strides.
        hx: (B, H) initial state, or None for zeros.
        weight_ih: (H, I).  weight_hh: (H, H).  bias_ih, bias_hh: (H,) or None.
        nonlinearity: 'tanh' or 'relu'.
        lengths: (B,) int64 (or a list of ints), 0 <= len <= T, in any order.
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
    lengths, truncate = check_rnn_args(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity=nonlinearity,
        batch_first=batch_first, lengths=lengths, truncate=truncate)
    x = input.transpose(0, 1) if batch_first else input  # [T,B,I]
    if hx is None:
        hx = x.new_zeros(x.shape[1], weight_hh.shape[0])
    args = (x, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if needs_grad:
        output, h_n = ElmanFunction.apply(*args, nonlinearity, bool(reverse), truncate or 0)
    else:
        # Inference: no autograd node, nothing saved.
        output, h_n = _ops.elman_fwd(*args, nonlinearity, bool(reverse))
    if batch_first:
        output = output.transpose(0, 1)
    return output, h_n


class ElmanLossFunction(torch.autograd.Function):
    """One Elman layer with a loss at every step through a linear head: forward is
    ``rnnkern::elman_loss_fwd``, backward ``rnnkern::elman_loss_bwd`` (the head's
    gradients, then the whole BPTT). Inputs are time-major: input [T,B,I],
    target [T,B] or [T,B,O], hx [B,H], weight_ih [H,I], weight_hh [H,H], biases
    [H] or None, weight_out [O,H], bias_out [O] or None, lengths [B] or None,
    loss_mask [T,B] or None. ``config`` holds (nonlinearity, loss, steps,
    reduction, ignore_index, label_smoothing, truncate (0: none), chunk_rows);
    grad_norm is a [T,B] tensor that backward fills with ||dL/dh_t||, or None.
    Returns loss ([] or [T,B]), h_n [B,H], step_loss [T,B] (not differentiable).
    """

    @staticmethod
    def forward(ctx, input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out,
                bias_out, lengths, loss_mask, config, grad_norm):
        nonlinearity, loss, steps, reduction, ignore_index, label_smoothing, _, chunk_rows = config
        value, output, h_n, step_loss, weight, g_out, g_w_out, g_b_out = _ops.elman_loss_fwd(
            input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out, bias_out,
            lengths, loss_mask, nonlinearity, loss, steps, reduction, ignore_index,
            label_smoothing, True, chunk_rows)
        # h at every step for BPTT, the weights for 'none', and for a scalar
        # reduction the head's gradients the forward sweep already computed.
        ctx.save_for_backward(input, target, hx, weight_ih, weight_hh, weight_out, bias_out,
                              lengths, output, weight, g_out, g_w_out, g_b_out)
        ctx.config = config
        ctx.has_bias = (bias_ih is not None, bias_hh is not None, bias_out is not None)
        ctx.grad_norm = grad_norm
        ctx.mark_non_differentiable(step_loss)
        return value, h_n, step_loss

    @staticmethod
    def backward(ctx, grad_loss, grad_h_n, _grad_step_loss):
        _no_double_backward("rnnkern.functional.rnn_loss")
        (input, target, hx, weight_ih, weight_hh, weight_out, bias_out, lengths, output, weight,
         g_out, g_w_out, g_b_out) = ctx.saved_tensors
        nonlinearity, loss, _, reduction, ignore_index, label_smoothing, truncate, chunk_rows = \
            ctx.config
        has_b_ih, has_b_hh, has_b_out = ctx.has_bias
        g_in, g_hx, g_w_ih, g_w_hh, g_b, g_w_out, g_b_out, grad_norm = _ops.elman_loss_bwd(
            grad_loss, grad_h_n, input, target, hx, weight_ih, weight_hh, weight_out, bias_out,
            lengths, output, weight, g_out, g_w_out, g_b_out, nonlinearity, loss, reduction,
            ignore_index, label_smoothing, truncate, ctx.grad_norm is not None, chunk_rows,
            ctx.needs_input_grad[0])
        if ctx.grad_norm is not None:
            ctx.grad_norm.copy_(grad_norm)
        return (g_in if ctx.needs_input_grad[0] else None, None, g_hx, g_w_ih, g_w_hh,
                g_b if has_b_ih else None, g_b if has_b_hh else None, g_w_out,
                g_b_out if has_b_out else None, None, None, None, None)


def rnn_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    hx: Optional[torch.Tensor],
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
    weight_out: torch.Tensor,
    bias_out: Optional[torch.Tensor] = None,
    *,
    loss: str = "cross_entropy",
    nonlinearity: str = "tanh",
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
    """One Elman layer, the head y_t = h_t W_out^T + b_out and a loss at every
    step, reduced with weights, in one fused kernel call each way. The (T, B, O)
    head output and its gradient are never held whole: the head runs over the
    T*B rows a chunk at a time, computing each chunk's loss and its gradient in
    the forward sweep.

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``; float32 or float64.
        target: laid out like the steps. loss='cross_entropy': (T, B) int64 class
            indices in [0, O), or ignore_index. loss='mse': (T, B, O) of the
            input's dtype. Takes no gradient.
        hx: (B, H) initial state, or None for zeros.
        weight_ih (H, I), weight_hh (H, H), bias_ih, bias_hh (H,) or None: the layer.
        weight_out (O, H), bias_out (O,) or None: the head.
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
        this loss, which fills in ||dL/dh_t|| per sequence.

    Double backward is not supported and raises.
    """
    lengths, truncate = check_rnn_args(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity=nonlinearity,
        batch_first=batch_first, lengths=lengths, truncate=truncate)
    H = weight_hh.shape[0]
    O, target, loss_mask, label_smoothing = check_loss_args(
        input, target, weight_out, bias_out, H=H, lengths=lengths, batch_first=batch_first,
        loss=loss, loss_mask=loss_mask, steps=steps, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing)  # target, loss_mask time-major
    x = input.transpose(0, 1) if batch_first else input  # [T,B,I]
    T, B, _ = x.shape
    if hx is None:
        hx = x.new_zeros(B, H)
    args = (x, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out, bias_out,
            lengths, loss_mask)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    grad_norm = x.new_full((T, B), float("nan")) if return_details else None  # [T,B]
    config = (nonlinearity, loss, steps, reduction, ignore_index, label_smoothing,
              truncate or 0, int(_chunk_rows))
    if needs_grad:
        value, h_n, step_loss = ElmanLossFunction.apply(*args, config, grad_norm)
    else:
        # Inference: the head runs once per chunk, no gradient, no autograd node.
        value, _, h_n, step_loss, *_ = _ops.elman_loss_fwd(
            *args, nonlinearity, loss, steps, reduction, ignore_index, label_smoothing, False,
            int(_chunk_rows))
    if reduction == "none" and batch_first:
        value = value.transpose(0, 1)
    if not return_details:
        return value
    if batch_first:
        step_loss, grad_norm = step_loss.transpose(0, 1), grad_norm.transpose(0, 1)
    return RNNLossDetails(value, h_n, step_loss, grad_norm)

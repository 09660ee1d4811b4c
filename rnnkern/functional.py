"""The functional API over the fused kernels, and its autograd.Function."""

from __future__ import annotations

from typing import Optional

import torch

from . import _ops
from ._checks import LengthsLike, check_rnn_args

__all__ = ["rnn", "ElmanFunction"]


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
        g_in, g_hx, g_w_ih, g_w_hh, g_b = _ops.elman_bwd(
            grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, lengths,
            nonlinearity, reverse, truncate)
        return (g_in, g_hx, g_w_ih, g_w_hh, g_b if has_b_ih else None,
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

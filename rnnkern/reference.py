"""The pure-PyTorch autograd reference: the specification of every kernel.

Plain autograd code with an explicit loop over time. Slow by design; the tests
compare the fused kernels against it. Shape letters: T steps, B batch, I input
features, H hidden units, O head outputs or classes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import LengthsLike, check_loss_args, check_rnn_args
from ._details import RNNLossDetails

__all__ = ["rnn", "rnn_loss"]


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
    _cut=None,
    _step=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Elman layer, one direction: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh).

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``.
        hx: (B, H) initial state, or None for zeros.
        weight_ih: (H, I).  weight_hh: (H, H).  bias_ih, bias_hh: (H,) or None.
        nonlinearity: 'tanh' or 'relu'.
        lengths: (B,) int64, 0 <= len <= T, any order, or None (all T). Step t of
            sequence b runs only for t < len_b; beyond it the output is 0 and the
            state is frozen, as nn.RNN does on a PackedSequence.
        truncate: K >= 1 cuts the gradient through the hidden state between step
            jK-1 and step jK (steps counted in processing order from 0), which is
            ``h = h.detach()`` every K steps. None: full BPTT. Forward is unchanged.
        reverse: run each sequence from its last valid step (len_b - 1) down to
            0, the reverse direction of a bidirectional layer.
        _cut: for tests only: ``_cut(step, h)`` replaces ``h.detach()`` at each
            truncation boundary (so a test can hold the boundary states fixed).

    Returns:
        output: (T, B, H) or (B, T, H), zero at padded steps.
        h_n: (B, H), the state after each sequence's last step (h0 when len_b = 0).
    """
    lengths, truncate = check_rnn_args(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity=nonlinearity,
        batch_first=batch_first, lengths=lengths, truncate=truncate)
    x = input.transpose(0, 1) if batch_first else input  # [T,B,I]
    T, B, _ = x.shape
    H = weight_hh.shape[0]
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    lens = torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths  # [B]
    lens = lens.to(x.device)
    rows = torch.arange(B, device=x.device)
    h = x.new_zeros(B, H) if hx is None else hx  # [B,H]

    step_outputs = []  # [B,H] each, in processing order
    for s in range(T):
        if truncate is not None and s > 0 and s % truncate == 0:
            h = h.detach() if _cut is None else _cut(s, h)
        t = (lens - 1 - s).clamp(min=0) if reverse else torch.full_like(lens, s)  # [B]
        z = x[t, rows] @ weight_ih.T + h @ weight_hh.T  # [B,H]
        if bias_ih is not None:
            z = z + bias_ih
        if bias_hh is not None:
            z = z + bias_hh
        h_new = act(z)
        if _step is not None:
            h_new = _step(s, h_new)
        active = (s < lens)[:, None]  # [B,1]
        h = torch.where(active, h_new, h)
        step_outputs.append(torch.where(active, h_new, torch.zeros_like(h_new)))

    if T == 0:
        output = x.new_zeros(0, B, H)
    else:
        steps = torch.stack(step_outputs)  # [T,B,H], processing order
        time = torch.arange(T, device=x.device)[:, None]  # [T,1]
        # Time t of sequence b was processed at step len_b-1-t (reverse) or t.
        step_of = (lens[None, :] - 1 - time).clamp(min=0) if reverse else time.expand(T, B)
        output = steps.gather(0, step_of[..., None].expand(T, B, H))
        output = torch.where((time < lens[None, :])[..., None], output, torch.zeros_like(output))
    if batch_first:
        output = output.transpose(0, 1)
    return output, h


def step_weights(T: int, B: int, *, lengths: Optional[torch.Tensor], steps: str,
                 loss_mask: Optional[torch.Tensor], ignored: Optional[torch.Tensor],
                 dtype: torch.dtype, device) -> torch.Tensor:
    """w (T, B): 1 for t < len_b (only t = len_b - 1 with steps='last'), 0 beyond;
    times loss_mask (T, B); 0 where ``ignored`` (T, B) is True."""
    lens = torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths  # [B]
    lens = lens.to(device)
    t = torch.arange(T, device=device)[:, None]  # [T,1]
    counted = (t == lens[None, :] - 1) if steps == "last" else (t < lens[None, :])  # [T,B]
    w = counted.to(dtype)
    if loss_mask is not None:
        w = w * loss_mask.to(dtype)
    if ignored is not None:
        w = torch.where(ignored, torch.zeros_like(w), w)
    return w


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
    _cut=None,
):
    """One Elman layer (``rnn`` above), the head y_t = h_t W_out^T + b_out and a
    loss at every step, reduced with weights: the specification of
    rnnkern.functional.rnn_loss, written with the whole (T, B, O) head output.

    Per-step tensors follow the input's layout, (T, B, ...) or (B, T, ...) with
    batch_first:
        target: (T, B) int64 class indices for loss='cross_entropy'; (T, B, O)
            of the input's dtype for loss='mse'.
        loss_mask: (T, B) bool or floating >= 0, or None.
    weight_out: (O, H); bias_out: (O,) or None. Other arguments as in ``rnn``.

    The per-step loss l[t,b]:
        'cross_entropy': F.cross_entropy(y[t,b], target[t,b], label_smoothing=...)
        'mse': mean over o of (y[t,b,o] - target[t,b,o])^2
    Its weight w[t,b] (step_weights): 1 for t < len_b (only t = len_b - 1 with
    steps='last'), 0 beyond; times loss_mask; 0 where target == ignore_index.
    Reductions: 'sum' sum w*l; 'mean' sum w*l / sum w; 'seq_sum' the sum over
    sequences with sum_t w > 0 of sum_t w*l / sum_t w; 'seq_mean' the mean of
    those; 'none' w*l (T, B). An all-masked batch (no positive weight) gives 0.
    target and loss_mask are data: they take no gradient.

    Returns the loss, or with return_details an RNNLossDetails(loss, h_n,
    step_loss, grad_norm); grad_norm is filled in by backward.
    """
    lengths, truncate = check_rnn_args(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity=nonlinearity,
        batch_first=batch_first, lengths=lengths, truncate=truncate)
    H = weight_hh.shape[0]
    O, target, loss_mask, label_smoothing = check_loss_args(
        input, target, weight_out, bias_out, H=H, lengths=lengths, batch_first=batch_first,
        loss=loss, loss_mask=loss_mask, steps=steps, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing)  # target, loss_mask time-major
    T, B = (input.shape[1], input.shape[0]) if batch_first else input.shape[:2]

    norms = input.new_full((T, B), float("nan"))  # [T,B], filled by backward

    def on_step(s, h):  # h [B,H]: the state of step s, whose gradient is all of dL/dh_s
        def record(g):  # returns None: the gradient itself is left as it is
            norms[s] = g.detach().norm(dim=1)

        if return_details and h.requires_grad:
            h.register_hook(record)
        return h

    output, h_n = rnn(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                      nonlinearity=nonlinearity, batch_first=batch_first, lengths=lengths,
                      truncate=truncate, _cut=_cut, _step=on_step)
    h = output.transpose(0, 1) if batch_first else output  # [T,B,H]
    y = h @ weight_out.T  # [T,B,O]
    if bias_out is not None:
        y = y + bias_out
    if loss == "cross_entropy":
        l = F.cross_entropy(y.reshape(T * B, O), target.reshape(T * B), reduction="none",
                            ignore_index=ignore_index,
                            label_smoothing=label_smoothing).view(T, B)
        ignored = target == ignore_index
    else:
        l = ((y - target) ** 2).mean(dim=-1)  # [T,B]
        ignored = None
    w = step_weights(T, B, lengths=lengths, steps=steps, loss_mask=loss_mask, ignored=ignored,
                     dtype=input.dtype, device=input.device)  # [T,B]
    # Rows of weight 0 do not count (the kernel never computes them).
    l = torch.where(w > 0, l, torch.zeros_like(l))
    wl = w * l  # [T,B]

    if reduction == "none":
        value = wl.transpose(0, 1) if batch_first else wl
    elif reduction == "sum":
        value = wl.sum()
    elif reduction == "mean":
        total, w_all = wl.sum(), w.sum()
        # All masked: every w*l is 0, so is total, and so is its gradient.
        value = total / w_all if w_all > 0 else total
    else:
        w_seq = w.sum(dim=0)  # [B]
        counted = w_seq > 0
        per_seq = wl.sum(dim=0) / torch.where(counted, w_seq, torch.ones_like(w_seq))  # [B]
        value = per_seq.sum()
        n_seq = int(counted.sum())
        if reduction == "seq_mean" and n_seq > 0:
            value = value / n_seq

    if not return_details:
        return value
    step_loss = l.detach()
    if batch_first:  # views: the hooks keep writing into norms
        return RNNLossDetails(value, h_n, step_loss.transpose(0, 1), norms.transpose(0, 1))
    return RNNLossDetails(value, h_n, step_loss, norms)

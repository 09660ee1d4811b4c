"""The pure-PyTorch autograd reference: the specification of every kernel.

Plain autograd code with an explicit loop over time. Slow by design; the tests
compare the fused kernels against it. Shape letters: T steps, B batch, I input
features, H hidden units.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import LengthsLike, check_rnn_args

__all__ = ["rnn"]


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

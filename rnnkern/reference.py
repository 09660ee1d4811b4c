"""The pure-PyTorch autograd reference: the specification of every kernel.

Plain autograd code with an explicit loop over time, in the shape the kernels
have: a cell is one step's math (``elman_cell``, ``lstm_cell``, ``gru_cell``);
one time loop (``scan``) runs any cell and owns lengths, reverse and
truncation; the layers (``rnn``, ``lstm``, ``gru``) put the two together; and
``rnn_loss`` puts the per-step head and loss on top of the hidden states,
whatever cell made them. Slow by design; the tests compare the fused kernels
against it.

Shape letters: T steps, B batch, I input features, H hidden units (also the
size of an LSTM's cell state c), P the state h that a step emits and feeds back
(P = H except for an LSTM with a projection, nn.LSTM's proj_size), G gate rows
of weight_ih and weight_hh (H for Elman, 4H for LSTM, 3H for GRU), O head
outputs or classes.

Gate order and formulas are PyTorch's, so the weights of nn.RNN, nn.LSTM and
nn.GRU (and of nn.RNNCell, nn.LSTMCell, nn.GRUCell) load unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ._checks import (LAYER_TENSORS, LOSS_TENSORS, MODES, LengthsLike, cast_down,
                      cast_loss_down, layer_api_args, loss_api_args, loss_target_up,
                      lower_precision_up, lstm_state, op_elman_checks, op_layer_checks,
                      op_loss_checks)
from ._details import RNNLossDetails

__all__ = ["MODES", "elman_cell", "lstm_cell", "gru_cell", "scan", "rnn", "lstm", "gru",
           "rnn_loss"]


State = tuple  # of tensors (B, *): (h,) for Elman and GRU, (h, c) for LSTM; h comes first
Cell = Callable[[torch.Tensor, State], State]
StateHook = Callable[[int, State], State]
LSTMState = tuple  # (h (B, P), c (B, H))
HxLike = Union[torch.Tensor, LSTMState, None]


# ---------------------------------------------------------------------------
# Cells: one step. Each takes (x_t, state, weights) as torch's cells do; the
# kernels compute x W_ih^T of all steps before the loop, which changes nothing
# but rounding.

def elman_cell(input: torch.Tensor, hx: torch.Tensor, weight_ih: torch.Tensor,
               weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor] = None,
               bias_hh: Optional[torch.Tensor] = None,
               nonlinearity: str = "tanh") -> torch.Tensor:
    """One Elman step (nn.RNNCell): h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh).

    input: (B, I); hx: (B, H); weight_ih: (H, I); weight_hh: (H, H);
    bias_ih, bias_hh: (H,) or None; nonlinearity: 'tanh' or 'relu'.
    Returns h' (B, H).
    """
    z = input @ weight_ih.T + hx @ weight_hh.T  # [B,H]
    if bias_ih is not None:
        z = z + bias_ih
    if bias_hh is not None:
        z = z + bias_hh
    return torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z)


def lstm_cell(input: torch.Tensor, hx: LSTMState, weight_ih: torch.Tensor,
              weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor] = None,
              bias_hh: Optional[torch.Tensor] = None,
              weight_hr: Optional[torch.Tensor] = None) -> LSTMState:
    """One LSTM step (nn.LSTMCell, plus nn.LSTM's projection). With (h, c) = hx:

        i, f, g, o = x W_ih^T + b_ih + h W_hh^T + b_hh, split in 4 chunks of H (that order)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c'), then h' W_hr^T when weight_hr is given

    input: (B, I); hx: (h (B, P), c (B, H)); weight_ih: (4H, I); weight_hh: (4H, P);
    bias_ih, bias_hh: (4H,) or None; weight_hr: (P, H), or None (then P = H).
    Returns (h' (B, P), c' (B, H)).
    """
    h, c = hx
    gates = input @ weight_ih.T + h @ weight_hh.T  # [B,4H]
    if bias_ih is not None:
        gates = gates + bias_ih
    if bias_hh is not None:
        gates = gates + bias_hh
    i, f, g, o = gates.chunk(4, dim=1)  # [B,H] each
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # [B,H]
    h_new = torch.sigmoid(o) * torch.tanh(c_new)  # [B,H]
    if weight_hr is not None:
        h_new = h_new @ weight_hr.T  # [B,P]
    return h_new, c_new


def gru_cell(input: torch.Tensor, hx: torch.Tensor, weight_ih: torch.Tensor,
             weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor] = None,
             bias_hh: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One GRU step (nn.GRUCell), the reset gate applied after the hidden
    product ("linear before reset"):

        r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)
        z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
        n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
        h' = (1 - z) * n + z * h

    where W_i* (H, I) and W_h* (H, H) are the three chunks of rows of weight_ih
    and weight_hh in the order r, z, n (likewise the biases).

    input: (B, I); hx: (B, H); weight_ih: (3H, I); weight_hh: (3H, H);
    bias_ih, bias_hh: (3H,) or None. Returns h' (B, H).
    """
    gi = input @ weight_ih.T  # [B,3H]
    gh = hx @ weight_hh.T  # [B,3H]
    if bias_ih is not None:
        gi = gi + bias_ih
    if bias_hh is not None:
        gh = gh + bias_hh
    i_r, i_z, i_n = gi.chunk(3, dim=1)  # [B,H] each
    h_r, h_z, h_n = gh.chunk(3, dim=1)  # [B,H] each
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * hx


# ---------------------------------------------------------------------------
# The time loop, one for every cell.

def scan(cell: Cell, input: torch.Tensor, state: State, *,
         lengths: Optional[torch.Tensor] = None, truncate: Optional[int] = None,
         reverse: bool = False, _cut: Optional[StateHook] = None,
         _step: Optional[StateHook] = None) -> tuple[torch.Tensor, State]:
    """Runs ``cell`` over the steps of every sequence (arguments already checked).

    Args:
        cell: one step, ``cell(x_t, state) -> state'`` with x_t (B, I) and a
            state tuple of (B, *) tensors whose first is the h (B, P) that the
            step emits: (h,) for Elman and GRU, (h, c) for LSTM.
        input: (T, B, I), time-major.
        state: the initial state tuple.
        lengths: (B,) int64 with 0 <= len <= T, or None (all T). Sequence b
            takes its steps t < len_b only; for t >= len_b its whole state is
            frozen and its output is 0, as nn's layers do on a PackedSequence,
            and its input is never read (it may hold anything, NaN included).
            So the final state of b is the state after its step len_b - 1, or
            the initial state when len_b = 0.
        truncate: None for full BPTT, or K >= 1: every state tensor is detached
            before processing steps K, 2K, ... (each sequence counts its steps
            from 0 in its own processing order), which cuts the gradient
            through the state between chunks of K steps and leaves the forward
            unchanged. States of finished sequences are detached too, so the
            gradient of their final state stops at the last boundary before T.
        reverse: sequence b runs from its last valid step len_b - 1 down to 0
            (processing step s reads time len_b - 1 - s), the reverse direction
            of a bidirectional layer; the output stays in time order.
        _cut: tests only: ``_cut(s, state) -> state`` replaces the detach before
            processing step s (so a test can hold the boundary states fixed).
        _step: tests only: ``_step(s, state') -> state'`` sees the new state of
            processing step s before the lengths mask (to hook its gradient).

    Returns:
        output: (T, B, P), the h of each step in time order, 0 at padded steps.
        state: the final state tuple.
    """
    T, B = input.shape[:2]
    lens = torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths  # [B]
    lens = lens.to(input.device)
    rows = torch.arange(B, device=input.device)
    time = torch.arange(T, device=input.device)[:, None]  # [T,1]
    valid = (time < lens[None, :])[..., None]  # [T,B,1]: t < len_b
    if lengths is not None:
        # The padding is never read: a NaN there would reach weight_ih's gradient
        # through the discarded steps (0 * NaN), which nn's PackedSequence never sees.
        input = torch.where(valid, input, torch.zeros((), dtype=input.dtype, device=input.device))
    state = tuple(state)

    step_outputs = []  # [B,P] each, in processing order
    for s in range(T):
        if truncate is not None and s > 0 and s % truncate == 0:
            state = tuple(v.detach() for v in state) if _cut is None else tuple(_cut(s, state))
        t = (lens - 1 - s).clamp(min=0) if reverse else torch.full_like(lens, s)  # [B]
        new = tuple(cell(input[t, rows], state))
        if _step is not None:
            new = tuple(_step(s, new))
        active = (s < lens)[:, None]  # [B,1]
        state = tuple(torch.where(active, v_new, v) for v_new, v in zip(new, state))
        step_outputs.append(torch.where(active, new[0], torch.zeros_like(new[0])))

    P = state[0].shape[1]
    if T == 0:
        return input.new_zeros(0, B, P), state
    steps = torch.stack(step_outputs)  # [T,B,P], processing order
    # Time t of sequence b was processed at step len_b-1-t (reverse) or t.
    step_of = (lens[None, :] - 1 - time).clamp(min=0) if reverse else time.expand(T, B)
    output = steps.gather(0, step_of[..., None].expand(T, B, P))
    output = torch.where(valid, output, torch.zeros_like(output))
    return output, state


# ---------------------------------------------------------------------------
# Layers: a cell and the loop, in the API's layout.

def _cell_of(mode, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) -> Cell:
    """The step of ``mode`` on scan's state tuples."""
    if mode == "lstm":
        return lambda x_t, state: lstm_cell(x_t, state, weight_ih, weight_hh, bias_ih, bias_hh,
                                            weight_hr)
    if mode == "gru":
        return lambda x_t, state: (gru_cell(x_t, state[0], weight_ih, weight_hh, bias_ih,
                                            bias_hh),)
    nonlinearity = mode[len("rnn_"):]
    return lambda x_t, state: (elman_cell(x_t, state[0], weight_ih, weight_hh, bias_ih, bias_hh,
                                          nonlinearity),)


def _layer(mode, x, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, *, H, P,
           batch_first, lengths, truncate, reverse, _cut, _step):
    """One layer of any cell on checked arguments, x time-major [T,B,I]; the
    output is laid out batch-first if ``batch_first``. hx, the returned final
    state and the hooks' states take the form of the cell's hx: h, or (h, c)
    for LSTM; scan sees tuples."""
    lstm = mode == "lstm"

    def as_state(hx_form):
        return tuple(hx_form) if lstm else (hx_form,)

    def as_hx(state):
        return tuple(state) if lstm else state[0]

    def hook(f):
        return None if f is None else (lambda s, state: as_state(f(s, as_hx(state))))

    B = x.shape[1]
    if hx is None:
        hx = (x.new_zeros(B, P), x.new_zeros(B, H)) if lstm else x.new_zeros(B, H)
    output, state = scan(_cell_of(mode, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), x,
                         as_state(hx), lengths=lengths, truncate=truncate, reverse=reverse,
                         _cut=hook(_cut), _step=hook(_step))
    if batch_first:
        output = output.transpose(0, 1)
    return output, as_hx(state)


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
    """One Elman layer, one direction (nn.RNN): h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh).

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``.
        hx: (B, H) initial state, or None for zeros.
        weight_ih: (H, I).  weight_hh: (H, H).  bias_ih, bias_hh: (H,) or None.
        nonlinearity: 'tanh' or 'relu'.
        lengths: (B,) int64 (converted as ``functional.rnn`` converts it),
            0 <= len <= T, any order, or None (all T). Step t of
            sequence b runs only for t < len_b; beyond it the output is 0 and the
            state is frozen, as nn.RNN does on a PackedSequence.
        truncate: K >= 1 cuts the gradient through the hidden state between step
            jK-1 and step jK (steps counted in processing order from 0), which is
            ``h = h.detach()`` every K steps. None: full BPTT. Forward is unchanged.
        reverse: run each sequence from its last valid step (len_b - 1) down to
            0, the reverse direction of a bidirectional layer.
        _cut: for tests only: ``_cut(step, h)`` replaces ``h.detach()`` at each
            truncation boundary (so a test can hold the boundary states fixed).
        _step: for tests only: ``_step(step, h)`` sees each step's new state.

    Returns:
        output: (T, B, H) or (B, T, H), zero at padded steps.
        h_n: (B, H), the state after each sequence's last step (h0 when len_b = 0).

    See ``scan`` for lengths, truncate and reverse in full.
    """
    (input, hx, weight_ih, weight_hh, bias_ih, bias_hh), low = lower_precision_up(
        LAYER_TENSORS, input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    if low is not None:  # bfloat16 / float16: the float32 call, its outputs rounded
        return cast_down(low, *rnn(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                   nonlinearity=nonlinearity, batch_first=batch_first,
                                   lengths=lengths, truncate=truncate, reverse=reverse,
                                   _cut=_cut, _step=_step))
    # The API's conversions, then the op's checks (rnnkern/_checks.py: same words).
    x, lengths, truncate = layer_api_args(input, batch_first=batch_first, lengths=lengths,
                                          truncate=truncate, reverse=reverse)  # x [T,B,I]
    H = op_elman_checks(x, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, nonlinearity,
                        truncate or 0)
    return _layer("rnn_" + nonlinearity, x, hx, weight_ih, weight_hh, bias_ih, bias_hh, None,
                  H=H, P=H, batch_first=batch_first, lengths=lengths, truncate=truncate,
                  reverse=reverse, _cut=_cut, _step=_step)


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
    _cut=None,
    _step=None,
) -> tuple[torch.Tensor, LSTMState]:
    """One LSTM layer, one direction (nn.LSTM, proj_size included); the step is ``lstm_cell``.

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``.
        hx: a tuple (h_0 (B, P), c_0 (B, H)), or None for zeros.
        weight_ih: (4H, I).  weight_hh: (4H, P).  bias_ih, bias_hh: (4H,) or None.
            Rows in nn.LSTM's gate order i, f, g, o.
        weight_hr: (P, H), nn.LSTM's weight_hr_l0 with proj_size = P, or None
            (no projection: P = H).
        lengths, truncate, reverse: as in ``rnn`` (see ``scan``); truncation and
            the lengths mask act on h and c alike.
        _cut, _step: for tests only, as in ``rnn``, on the tuple (h, c).

    Returns:
        output: (T, B, P) or (B, T, P), zero at padded steps.
        (h_n (B, P), c_n (B, H)): the state after each sequence's last step
            (hx when len_b = 0).
    """
    (input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), low = lower_precision_up(
        LAYER_TENSORS, input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
        weight_hr)
    if low is not None:  # bfloat16 / float16: the float32 call, its outputs rounded
        return cast_down(low, *lstm(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                    batch_first=batch_first, lengths=lengths,
                                    truncate=truncate, reverse=reverse, _cut=_cut, _step=_step))
    x, lengths, truncate = layer_api_args(input, batch_first=batch_first, lengths=lengths,
                                          truncate=truncate, reverse=reverse)  # x [T,B,I]
    hx = lstm_state(hx)
    H, P = op_layer_checks("lstm", x, *(hx or (None, None)), weight_ih, weight_hh, bias_ih,
                           bias_hh, weight_hr, lengths, truncate or 0)
    return _layer("lstm", x, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, H=H, P=P,
                  batch_first=batch_first, lengths=lengths, truncate=truncate, reverse=reverse,
                  _cut=_cut, _step=_step)


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
    _cut=None,
    _step=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer, one direction (nn.GRU); the step is ``gru_cell``.

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``.
        hx: (B, H) initial state, or None for zeros.
        weight_ih: (3H, I).  weight_hh: (3H, H).  bias_ih, bias_hh: (3H,) or None.
            Rows in nn.GRU's gate order r, z, n.
        lengths, truncate, reverse: as in ``rnn`` (see ``scan``).
        _cut, _step: for tests only, as in ``rnn``.

    Returns:
        output: (T, B, H) or (B, T, H), zero at padded steps.
        h_n: (B, H), the state after each sequence's last step (hx when len_b = 0).
    """
    (input, hx, weight_ih, weight_hh, bias_ih, bias_hh), low = lower_precision_up(
        LAYER_TENSORS, input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    if low is not None:  # bfloat16 / float16: the float32 call, its outputs rounded
        return cast_down(low, *gru(input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                   batch_first=batch_first, lengths=lengths, truncate=truncate,
                                   reverse=reverse, _cut=_cut, _step=_step))
    x, lengths, truncate = layer_api_args(input, batch_first=batch_first, lengths=lengths,
                                          truncate=truncate, reverse=reverse)  # x [T,B,I]
    H, P = op_layer_checks("gru", x, hx, None, weight_ih, weight_hh, bias_ih, bias_hh, None,
                           lengths, truncate or 0)
    return _layer("gru", x, hx, weight_ih, weight_hh, bias_ih, bias_hh, None, H=H, P=P,
                  batch_first=batch_first, lengths=lengths, truncate=truncate, reverse=reverse,
                  _cut=_cut, _step=_step)


# ---------------------------------------------------------------------------
# The per-step loss on top of a layer.

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
    _cut=None,
):
    """One layer of any cell, the head y_t = h_t W_out^T + b_out and a loss at
    every step, reduced with weights: the specification of
    rnnkern.functional.rnn_loss, written with the whole (T, B, O) head output.

    The layer:
        mode: the cell, one of MODES: 'rnn_tanh', 'rnn_relu' (``rnn``), 'lstm'
            (``lstm``), 'gru' (``gru``); None (default) means 'rnn_' + nonlinearity.
        nonlinearity: 'tanh' or 'relu', the Elman activation when mode is None;
            a value that contradicts a given mode is refused.
        hx, weight_ih, weight_hh, bias_ih, bias_hh: as the cell's layer function
            takes them (for 'lstm' hx is a tuple (h_0, c_0) or None).
        weight_hr: (P, H), the LSTM's projection, or None; 'lstm' only.
        batch_first, lengths, truncate: as in ``rnn``.
    The head reads the emitted state h (B, P) of each step (P = H but for a
    projected LSTM): weight_out (O, P); bias_out (O,) or None.

    Per-step tensors follow the input's layout, (T, B, ...) or (B, T, ...) with
    batch_first:
        target: (T, B) int64 class indices for loss='cross_entropy'; (T, B, O)
            of the input's dtype for loss='mse'.
        loss_mask: (T, B) bool or floating >= 0, or None.

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
    step_loss, grad_norm); h_n is the layer's final state in hx's form ((h_n,
    c_n) for 'lstm'); grad_norm (T, B) is ||dL/dh_t|| of the emitted state h_t
    (not c_t), filled in by backward. ``_cut`` is for tests, as in the layer.
    """
    (input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out, bias_out,
     weight_hr), low = lower_precision_up(LOSS_TENSORS, input, hx, weight_ih, weight_hh,
                                          bias_ih, bias_hh, weight_out, bias_out, weight_hr)
    target = loss_target_up(target, loss, low, input)
    if low is not None:  # bfloat16 / float16: the float32 call, its outputs rounded
        result = rnn_loss(input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out,
                          bias_out, loss=loss, mode=mode, nonlinearity=nonlinearity,
                          weight_hr=weight_hr, batch_first=batch_first, lengths=lengths,
                          loss_mask=loss_mask, steps=steps, reduction=reduction,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          truncate=truncate, return_details=return_details, _cut=_cut)
        return cast_loss_down(low, result)
    # The API's conversions (functional.rnn_loss's), then the ops' checks.
    mode, x, target, loss_mask, lengths, truncate, label_smoothing = loss_api_args(
        input, target, weight_out, weight_hr, loss_mask, mode=mode, nonlinearity=nonlinearity,
        batch_first=batch_first, lengths=lengths, truncate=truncate,
        return_details=return_details, loss=loss, ignore_index=ignore_index,
        label_smoothing=label_smoothing)  # x, target, loss_mask time-major
    if mode == "lstm":
        hx = lstm_state(hx)
        H, P = op_layer_checks(mode, x, *(hx or (None, None)), weight_ih, weight_hh, bias_ih,
                               bias_hh, weight_hr, lengths, truncate or 0)
    elif mode == "gru":
        H, P = op_layer_checks(mode, x, hx, None, weight_ih, weight_hh, bias_ih, bias_hh,
                               weight_hr, lengths, truncate or 0)
    else:
        H = P = op_elman_checks(x, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                                mode[len("rnn_"):], truncate or 0)
    O = op_loss_checks(x, P, target, weight_out, bias_out, lengths, loss_mask, loss=loss,
                       steps=steps, reduction=reduction, ignore_index=ignore_index,
                       label_smoothing=label_smoothing)  # target, loss_mask time-major
    T, B = x.shape[0], x.shape[1]

    norms = input.new_full((T, B), float("nan"))  # [T,B], filled by backward

    def on_step(s, state):  # the new state of step s; its h's gradient is all of dL/dh_s
        h = state[0] if mode == "lstm" else state  # [B,P]

        def record(g):  # returns None: the gradient itself is left as it is
            norms[s] = g.detach().norm(dim=1)

        if return_details and h.requires_grad:
            h.register_hook(record)
        return state

    h, h_n = _layer(mode, x, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, H=H, P=P,
                    batch_first=False, lengths=lengths, truncate=truncate, reverse=False,
                    _cut=_cut, _step=on_step)  # h [T,B,P]
    y = h @ weight_out.T  # [T,B,O]
    if bias_out is not None:
        y = y + bias_out
    ignored = target == ignore_index if loss == "cross_entropy" else None
    w = step_weights(T, B, lengths=lengths, steps=steps, loss_mask=loss_mask, ignored=ignored,
                     dtype=input.dtype, device=input.device)  # [T,B]
    live = w > 0  # [T,B]: the rows that count
    if loss == "cross_entropy":
        l = F.cross_entropy(y.reshape(T * B, O), target.reshape(T * B), reduction="none",
                            ignore_index=ignore_index,
                            label_smoothing=label_smoothing).view(T, B)
    else:
        # The target of a row of weight 0 is never read, so NaN there (in the
        # padding, say) cannot reach a gradient through 0 * NaN.
        read = torch.where(live[..., None], target, torch.zeros((), dtype=target.dtype,
                                                                device=target.device))
        l = ((y - read) ** 2).mean(dim=-1)  # [T,B]
    # Rows of weight 0 do not count (the kernel never computes them).
    l = torch.where(live, l, torch.zeros_like(l))
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

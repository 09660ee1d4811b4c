"""RNNLoss: a one-layer RNN, LSTM or GRU and a linear head trained with a per-step loss, fused."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _fx, functional
from ._checks import LengthsLike, check_loss_options

__all__ = ["RNNLoss"]

_MODES = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}


class RNNLoss(nn.Module):
    """Wraps a one-layer, one-direction recurrent layer (torch.nn.RNN, LSTM or
    GRU, or rnnkern's drop-ins: any nn.RNNBase) and an nn.Linear head, and
    computes ``loss(head(rnn(input)), target)`` at every step with
    rnnkern.functional.rnn_loss, without the (T, B, O) head output: for the
    Elman cell one fused kernel call each way, for the LSTM and GRU a layer
    call and a head call. The modules' parameters are used as they are (the
    wrapped modules own them; optimise either).

    Args:
        rnn: the recurrent layer: num_layers=1, bidirectional=False, dropout=0
            (an LSTM's proj_size is supported).
        head: nn.Linear(P, O), P = the LSTM's proj_size, else hidden_size.
        loss, reduction, steps, ignore_index, label_smoothing: as in rnn_loss.

    forward(input, target, hx=None, *, lengths=None, loss_mask=None,
    truncate=None, return_details=False): input, target and loss_mask laid out
    as the rnn's batch_first says; hx as the torch.nn module takes it
    ((1, B, H), or the tuple of (1, B, P) and (1, B, H) for an LSTM), without
    the leading 1, or None. Returns what rnn_loss returns.
    """

    def __init__(self, rnn: nn.Module, head: nn.Module, loss: str = "cross_entropy",
                 reduction: str = "mean", *, steps: str = "all", ignore_index: int = -100,
                 label_smoothing: float = 0.0):
        super().__init__()
        if not isinstance(rnn, nn.RNNBase) or getattr(rnn, "mode", None) not in _MODES:
            got = getattr(rnn, "mode", None) if isinstance(rnn, nn.RNNBase) else type(rnn).__name__
            raise TypeError("RNNLoss: rnn must be a torch.nn.RNN, LSTM or GRU (an nn.RNNBase of "
                            f"mode RNN_TANH, RNN_RELU, LSTM or GRU), got {got}")
        if rnn.num_layers != 1:
            raise ValueError(f"RNNLoss fuses a one-layer RNN only: rnn must have num_layers=1, "
                             f"got {rnn.num_layers}")
        if rnn.bidirectional:
            raise ValueError("RNNLoss fuses one direction only: rnn must have bidirectional=False, "
                             "got True")
        if rnn.dropout != 0:
            raise ValueError(f"RNNLoss cannot fuse dropout: rnn must have dropout=0, got {rnn.dropout}")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"RNNLoss: head must be a torch.nn.Linear, got {type(head).__name__}")
        P = getattr(rnn, "proj_size", 0) or rnn.hidden_size
        if head.in_features != P:
            what = "proj_size" if getattr(rnn, "proj_size", 0) else "hidden_size"
            raise ValueError(f"RNNLoss: head must take the rnn's {what}={P} "
                             f"features, got in_features={head.in_features}")
        self.label_smoothing = check_loss_options(
            loss=loss, reduction=reduction, steps=steps, ignore_index=ignore_index,
            label_smoothing=label_smoothing)
        self.rnn = rnn
        self.head = head
        self.loss = loss
        self.reduction = reduction
        self.steps = steps
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, reduction={self.reduction!r}, steps={self.steps!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}")

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                hx: Optional[torch.Tensor] = None, *, lengths: LengthsLike = None,
                loss_mask: Optional[torch.Tensor] = None, truncate: Optional[int] = None,
                return_details: bool = False):
        kwargs = {"lengths": lengths, "loss_mask": loss_mask, "truncate": truncate}
        if return_details is not False:  # an identity test: under torch.fx it may be a Proxy
            kwargs["return_details"] = return_details
        node = _fx.module_node(self, (input, target, hx), kwargs)
        if node is not None:  # torch.fx: one call_module node, as for torch.nn's modules
            return node
        rnn = self.rnn

        def strip(h, name, letter="H"):  # torch.nn's (num_layers=1, B, *) -> (B, *)
            if not (isinstance(h, torch.Tensor) and h.dim() == 3):
                return h  # the op checks the rest
            if h.shape[0] != 1:
                raise RuntimeError(f"{name} must have shape (1, B, {letter}) (the rnn's one "
                                   f"layer) or (B, {letter}), got {tuple(h.shape)}")
            return h[0]

        if isinstance(hx, (tuple, list)):  # the LSTM's (h_0 [*,B,P], c_0 [*,B,H])
            hx = tuple(strip(h, f"hx[{i}]", "P" if i == 0 and getattr(rnn, "proj_size", 0)
                             else "H") for i, h in enumerate(hx))
        else:
            hx = strip(hx, "hx")
        return functional.rnn_loss(
            input, target, hx, rnn.weight_ih_l0, rnn.weight_hh_l0,
            rnn.bias_ih_l0 if rnn.bias else None, rnn.bias_hh_l0 if rnn.bias else None,
            self.head.weight, self.head.bias, loss=self.loss, mode=_MODES[rnn.mode],
            weight_hr=getattr(rnn, "weight_hr_l0", None), batch_first=rnn.batch_first,
            lengths=lengths, loss_mask=loss_mask, steps=self.steps, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            truncate=truncate, return_details=return_details)

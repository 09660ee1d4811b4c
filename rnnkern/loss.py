"""RNNLoss: a one-layer RNN and a linear head trained with a per-step loss, fused."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional
from ._checks import LengthsLike, check_loss_options

__all__ = ["RNNLoss"]

_NONLINEARITY = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}


class RNNLoss(nn.Module):
    """Wraps a one-layer, one-direction Elman RNN (torch.nn.RNN, or any
    nn.RNNBase of mode RNN_TANH / RNN_RELU, such as rnnkern's) and an nn.Linear
    head, and computes ``loss(head(rnn(input)), target)`` at every step with
    rnnkern.functional.rnn_loss: one fused kernel call each way, without the
    (T, B, O) head output. The modules' parameters are used as they are (the
    wrapped modules own them; optimise either).

    Args:
        rnn: the recurrent layer: num_layers=1, bidirectional=False, dropout=0.
        head: nn.Linear(rnn.hidden_size, O).
        loss, reduction, steps, ignore_index, label_smoothing: as in rnn_loss.

    forward(input, target, hx=None, *, lengths=None, loss_mask=None,
    truncate=None, return_details=False): input, target and loss_mask laid out
    as the rnn's batch_first says; hx (1, B, H) as nn.RNN takes it, (B, H), or
    None. Returns what rnn_loss returns.
    """

    def __init__(self, rnn: nn.Module, head: nn.Module, loss: str = "cross_entropy",
                 reduction: str = "mean", *, steps: str = "all", ignore_index: int = -100,
                 label_smoothing: float = 0.0):
        super().__init__()
        if not isinstance(rnn, nn.RNNBase) or getattr(rnn, "mode", None) not in _NONLINEARITY:
            got = getattr(rnn, "mode", None) if isinstance(rnn, nn.RNNBase) else type(rnn).__name__
            raise TypeError("RNNLoss: rnn must be a torch.nn.RNN (an nn.RNNBase of mode RNN_TANH or "
                            f"RNN_RELU), got {got}")
        if rnn.num_layers != 1:
            raise ValueError(f"RNNLoss fuses a one-layer RNN only: rnn must have num_layers=1, "
                             f"got {rnn.num_layers}")
        if rnn.bidirectional:
            raise ValueError("RNNLoss fuses one direction only: rnn must have bidirectional=False, "
                             "got True")
        if rnn.dropout != 0:
            raise ValueError(f"RNNLoss cannot fuse dropout: rnn must have dropout=0, got {rnn.dropout}")
        if getattr(rnn, "proj_size", 0):
            raise ValueError(f"RNNLoss cannot fuse a projection: rnn must have proj_size=0, "
                             f"got {rnn.proj_size}")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"RNNLoss: head must be a torch.nn.Linear, got {type(head).__name__}")
        if head.in_features != rnn.hidden_size:
            raise ValueError(f"RNNLoss: head must take the rnn's hidden_size={rnn.hidden_size} "
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
        rnn = self.rnn
        if isinstance(hx, torch.Tensor) and hx.dim() == 3 and hx.shape[0] == 1:
            hx = hx[0]  # nn.RNN's (num_layers=1, B, H)
        return functional.rnn_loss(
            input, target, hx, rnn.weight_ih_l0, rnn.weight_hh_l0,
            rnn.bias_ih_l0 if rnn.bias else None, rnn.bias_hh_l0 if rnn.bias else None,
            self.head.weight, self.head.bias, loss=self.loss,
            nonlinearity=_NONLINEARITY[rnn.mode], batch_first=rnn.batch_first,
            lengths=lengths, loss_mask=loss_mask, steps=self.steps, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            truncate=truncate, return_details=return_details)

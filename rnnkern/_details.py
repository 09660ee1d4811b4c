"""The named tuple that rnn_loss returns with ``return_details=True`` (kernel and reference alike)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RNNLossDetails(NamedTuple):
    """What ``rnn_loss(..., return_details=True)`` returns. Per-step tensors follow
    the input's layout: (T, B), or (B, T) with batch_first.

    loss: the reduced loss (as without details).
    h_n: (B, H), the state after each sequence's last step.
    step_loss: the unweighted per-step loss l, detached; 0 where the weight w is 0
        (those rows are never computed).
    grad_norm: ||dL/dh_t|| per sequence, the whole gradient reaching h_t (through
        the loss at t and through the recurrence; truncated with ``truncate``);
        0 where t >= len_b. NaN until backward runs; filled in by backward with
        no extra pass, and overwritten by each later backward through this loss.
    """

    loss: torch.Tensor
    h_n: torch.Tensor
    step_loss: torch.Tensor
    grad_norm: torch.Tensor

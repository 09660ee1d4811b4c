"""nn.Module(s) over the fused kernels: ``rnnkern.RNN``, the drop-in for torch.nn.RNN.

Shape letters: T steps, B batch, I input features, H hidden units, L layers
(``num_layers``), D directions (2 if ``bidirectional`` else 1), N the number of
valid steps in a PackedSequence (sum of its lengths).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import functional
from ._checks import (LengthsLike, check_bool, check_lengths, check_nonlinearity,
                      check_truncate)

__all__ = ["RNN"]


class RNN(nn.RNNBase):
    """A multi-layer Elman RNN with tanh or relu, the drop-in for ``torch.nn.RNN``.

    Same constructor (positional order included), parameters (names, shapes,
    initialisation), state_dict, input forms and outputs as ``torch.nn.RNN``;
    each layer and direction runs its forward pass and its whole BPTT as one
    fused kernel call (``rnnkern.functional.rnn``).

    It subclasses ``nn.RNNBase`` and not ``nn.RNN``: Dynamo refuses to trace any
    ``nn.RNN``/``GRU``/``LSTM`` instance, and ``torch.compile(fullgraph=True)``
    must work on models that use this module. ``isinstance(m, nn.RNNBase)``,
    ``all_weights``, ``flatten_parameters()``, ``.to()``, deepcopy and pickling
    come from ``nn.RNNBase`` as for ``nn.RNN``.

    Args:
        input_size: I.  hidden_size: H.  num_layers: L (default 1).
        nonlinearity: 'tanh' or 'relu'.  bias: use bias_ih and bias_hh.
        batch_first: batched input and output are (B, T, ·) instead of (T, B, ·);
            hx and h_n are not affected, and unbatched input ignores it.
        dropout: probability of dropout on the output of every layer but the
            last, in training mode, as nn.RNN.
        bidirectional: D = 2; the reverse direction of layer k is
            ``weight_ih_l{k}_reverse`` etc.
        device, dtype: of the parameters. The kernels run float32 and float64.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None):
        check_nonlinearity(nonlinearity)
        for name, flag in (("bias", bias), ("batch_first", batch_first),
                           ("bidirectional", bidirectional)):
            check_bool(name, flag)
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        # RNNBase checks the other arguments with nn.RNN's words, warns about
        # dropout with one layer, creates the parameters and initialises them.
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(
        self,
        input: Union[torch.Tensor, PackedSequence],
        hx: Optional[torch.Tensor] = None,
        *,
        lengths: LengthsLike = None,
        truncate: Optional[int] = None,
    ):
        """Runs the L layers, both directions of each when bidirectional.

        Args:
            input: (T, B, I), or (B, T, I) with ``batch_first``; unbatched (T, I);
                or a PackedSequence (sorted or not) of I features.
            hx: (L*D, B, H) initial states, layer-major then direction as nn.RNN;
                (L*D, H) for unbatched input; None for zeros.
            lengths: padded input only: (B,) int64 (or a list of ints),
                0 <= len <= T, in any order; (1,) for unbatched input. Gives the
                PackedSequence semantics without packing: output is 0 for
                t >= len_b, h_n[:, b] is the state after step len_b - 1 (the
                reverse direction runs from len_b - 1 down to 0).
            truncate: K >= 1: truncated BPTT on every layer and direction, the
                gradient through the hidden state cut every K steps counted from
                the first step each direction processes. None: full BPTT.

        Returns:
            (output, h_n) in nn.RNN's layout: output (T, B, D*H) or (B, T, D*H),
            (T, D*H) unbatched, or a PackedSequence of D*H features with the
            input's batch_sizes and indices; h_n (L*D, B, H), or (L*D, H) unbatched.
        """
        truncate = check_truncate(truncate)
        if hx is not None and not isinstance(hx, torch.Tensor):
            raise TypeError(f"hx must be a torch.Tensor or None, got {type(hx).__name__}")
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, lengths, truncate)
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor or a PackedSequence, "
                            f"got {type(input).__name__}")
        if input.dim() not in (2, 3):
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"input must be 3-D {layout} or 2-D unbatched (T, I), "
                             f"got {input.dim()}-D of shape {tuple(input.shape)}")
        batched = input.dim() == 3
        if hx is not None and hx.dim() != input.dim():
            expected = "3-D (L*D, B, H)" if batched else "2-D (L*D, H) for unbatched 2-D input"
            raise RuntimeError(f"hx must be {expected}, "
                               f"got {hx.dim()}-D of shape {tuple(hx.shape)}")
        self._check_input(input)
        if not batched:
            x = input.unsqueeze(1)  # [T,1,I]
            hx = hx.unsqueeze(1) if hx is not None else None  # [L*D,1,H]
        else:
            x = input.transpose(0, 1) if self.batch_first else input  # [T,B,I]
        T, B = x.shape[0], x.shape[1]
        self._check_hx(hx, B, x, batched)
        lengths = check_lengths(lengths, B, T)
        output, h_n = self._layers(x, hx, lengths, truncate, None)
        if not batched:
            return output.squeeze(1), h_n.squeeze(1)
        return (output.transpose(0, 1) if self.batch_first else output), h_n

    def _forward_packed(
        self,
        input: PackedSequence,  # data [N,I], batch_sizes [T] int64 CPU
        hx: Optional[torch.Tensor],  # [L*D,B,H], the user's batch order
        lengths: LengthsLike,
        truncate: Optional[int],
    ) -> tuple[PackedSequence, torch.Tensor]:  # output data [N,D*H], h_n [L*D,B,H]
        if lengths is not None:
            raise ValueError("lengths must be None for a PackedSequence input, which carries "
                             f"its own lengths; got {type(lengths).__name__}")
        data, batch_sizes, sorted_indices, unsorted_indices = input
        if data.dim() != 2:
            raise RuntimeError(f"a PackedSequence's data must be 2-D (N, I), "
                               f"got shape {tuple(data.shape)}")
        self._check_input(data)
        T, B = batch_sizes.shape[0], int(batch_sizes[0])
        if hx is not None and hx.dim() != 3:
            raise RuntimeError(f"hx must be 3-D (L*D, B, H) for a PackedSequence input, "
                               f"got {hx.dim()}-D of shape {tuple(hx.shape)}")
        self._check_hx(hx, B, data, True)
        # Packed data is time-major over the batch sorted by decreasing length:
        # row t of the padded (sorted) batch holds its first batch_sizes[t] entries.
        valid = torch.arange(B) < batch_sizes[:, None]  # [T,B] bool, CPU
        lengths = valid.sum(0)  # [B] int64, decreasing
        valid_dev = valid.to(data.device)
        x = data.new_zeros(T, B, data.shape[1]).index_put((valid_dev,), data)  # [T,B,I]
        if hx is not None and sorted_indices is not None:
            hx = hx.index_select(1, sorted_indices)  # user's batch order -> packed order
        output, h_n = self._layers(x, hx, lengths, truncate, valid_dev)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
        return PackedSequence(output[valid_dev], batch_sizes, sorted_indices, unsorted_indices), h_n

    def _layers(
        self,
        x: torch.Tensor,  # [T,B,I]
        hx: Optional[torch.Tensor],  # [L*D,B,H]
        lengths: Optional[torch.Tensor],  # [B] int64, CPU
        truncate: Optional[int],
        packed: Optional[torch.Tensor],  # [T,B] bool: the valid steps of a packed input
    ) -> tuple[torch.Tensor, torch.Tensor]:  # output [T,B,D*H], h_n [L*D,B,H]
        D = 2 if self.bidirectional else 1
        nonlinearity = "tanh" if self.mode == "RNN_TANH" else "relu"
        h_n = []
        layer_input = x
        for k in range(self.num_layers):
            outputs = []
            for d in range(D):
                weights = [getattr(self, name) for name in self._all_weights[k * D + d]]
                w_ih, w_hh, b_ih, b_hh = weights if self.bias else (*weights, None, None)
                out, h = functional.rnn(
                    layer_input, None if hx is None else hx[k * D + d], w_ih, w_hh, b_ih, b_hh,
                    nonlinearity=nonlinearity, lengths=lengths, truncate=truncate,
                    reverse=d == 1)
                outputs.append(out)  # [T,B,H]
                h_n.append(h)  # [B,H]
            layer_input = outputs[0] if D == 1 else torch.cat(outputs, 2)  # [T,B,D*H]
            if self.dropout > 0 and self.training and k < self.num_layers - 1:
                layer_input = _dropout(layer_input, self.dropout, packed)
        return layer_input, torch.stack(h_n)

    def _check_input(self, input: torch.Tensor) -> None:
        """The checks nn.RNN makes first (dtype, then input_size), with its exception types."""
        w = self.weight_ih_l0
        if input.dtype != w.dtype:
            raise ValueError(f"input dtype ({input.dtype}) does not match the RNN's weight dtype "
                             f"({w.dtype}): convert the input with input.to({w.dtype}) or the "
                             f"model with model.to({input.dtype})")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size: expected "
                               f"I={self.input_size}, got {input.shape[-1]} (input shape "
                               f"{tuple(input.shape)})")

    def _check_hx(
        self,
        hx: Optional[torch.Tensor],  # [L*D,B,H] (unbatched: [L*D,1,H] after unsqueeze)
        B: int,
        like: torch.Tensor,  # the input, for dtype and device
        batched: bool,
    ) -> None:
        if hx is None:
            return
        LD = self.num_layers * (2 if self.bidirectional else 1)
        expected = (LD, B, self.hidden_size)
        if tuple(hx.shape) != expected:
            # Speak the caller's layout: unbatched hx was (L*D, H) before unsqueeze.
            given = tuple(hx.shape) if batched else (hx.shape[0], hx.shape[2])
            want = expected if batched else (LD, self.hidden_size)
            letters = "(L*D, B, H)" if batched else "(L*D, H)"
            raise RuntimeError(f"hx must have shape {letters} = {want} "
                               f"(num_layers={self.num_layers}, D={LD // self.num_layers}), "
                               f"got {given}")
        # RuntimeError, not ValueError: nn.RNN raises RuntimeError for these two.
        if hx.dtype != like.dtype:
            raise RuntimeError(f"hx must have the input's dtype {like.dtype}, got {hx.dtype}")
        if hx.device != like.device:
            raise RuntimeError(f"hx must be on the input's device {like.device}, got {hx.device}")


def _dropout(
    y: torch.Tensor,  # [T,B,D*H]
    p: float,
    packed: Optional[torch.Tensor],  # [T,B] bool or None
) -> torch.Tensor:
    """Dropout on a layer's output as nn.RNN draws it: nn.RNN drops out the packed
    data [N, D*H] of a packed input and the whole [T, B, D*H] otherwise, so
    drawing the same shapes makes runs from the same RNG state use nn.RNN's masks."""
    if packed is None:
        return F.dropout(y, p, training=True)
    return torch.zeros_like(y).index_put((packed,), F.dropout(y[packed], p, training=True))

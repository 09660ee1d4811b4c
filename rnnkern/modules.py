"""nn.Module drop-ins over the fused kernels: ``rnnkern.RNN``, ``rnnkern.LSTM``
and ``rnnkern.GRU`` for torch.nn.RNN, LSTM and GRU.

One base owns what the three share (input forms, packing, layers, directions,
dropout, checks); a cell's module only says how one layer of it runs. States
are tuples inside: (h,) for RNN and GRU, (h, c) for LSTM.

Shape letters: T steps, B batch, I input features, H hidden units, P the h an
LSTM emits (its proj_size, else H), L layers (``num_layers``), D directions (2
if ``bidirectional`` else 1), N the number of valid steps in a PackedSequence
(sum of its lengths).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import _fx, _onnx, functional
from ._checks import (LOWER_PRECISION, LengthsLike, autocast_on_for, cast_down, cast_up,
                      check_bool, check_nonlinearity, check_truncate, lengths_arg, lstm_state)

__all__ = ["RNN", "LSTM", "GRU"]

State = tuple  # of tensors: (h,) or (h, c), each [L*D,B,*] (or per layer [B,*])


class _RecurrentBase(nn.RNNBase):
    """What RNN, LSTM and GRU share. It subclasses ``nn.RNNBase`` and not
    ``nn.RNN``/``LSTM``/``GRU``: Dynamo refuses to trace any instance of those,
    and ``torch.compile(fullgraph=True)`` must work on models that use these
    modules. ``isinstance(m, nn.RNNBase)``, ``all_weights``,
    ``flatten_parameters()``, ``.to()``, deepcopy and pickling come from
    ``nn.RNNBase`` as for torch.nn's modules."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int,
                 bias: bool, batch_first: bool, dropout: float, bidirectional: bool,
                 proj_size: int = 0, device=None, dtype=None):
        bias, batch_first, bidirectional = (
            check_bool(name, flag) for name, flag in
            (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)))
        # RNNBase checks the other arguments with torch.nn's words, warns about
        # dropout with one layer, creates the parameters and initialises them.
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size=proj_size, device=device, dtype=dtype)

    # -- what a cell's module says ------------------------------------------

    _feature_letter = "H"  # the state's feature axis in error messages

    def _state_sizes(self) -> tuple:
        """The feature size of each state tensor."""
        return (self.hidden_size,)

    def _run_layer(self, x, state, weights, lengths, truncate, reverse):
        """One layer, one direction: x [T,B,*], state tuple of [B,*] or None
        -> (output [T,B,*], final state tuple)."""
        raise NotImplementedError

    def _hx_in(self, hx) -> Optional[State]:
        """The user's hx as a state tuple (checked for type only)."""
        if hx is not None and not isinstance(hx, torch.Tensor):
            raise TypeError(f"hx must be a torch.Tensor or None, got {type(hx).__name__}")
        return None if hx is None else (hx,)

    def _hx_out(self, state: State):
        return state[0]

    # -- shared ---------------------------------------------------------------

    if TYPE_CHECKING:
        # What eager code takes, for type checkers (mypy, pyright): any input
        # form and any lengths form. TorchScript compiles the definition in the
        # else branch, whose annotations are its scripted subset.
        @overload
        def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None,
                    lengths: LengthsLike = None, truncate: Optional[int] = None,
                    ) -> Tuple[torch.Tensor, torch.Tensor]: ...

        @overload
        def forward(self, input: PackedSequence, hx: Optional[torch.Tensor] = None,
                    lengths: None = None, truncate: Optional[int] = None,
                    ) -> Tuple[PackedSequence, torch.Tensor]: ...

        def forward(self, input, hx=None, lengths=None, truncate=None): ...
    else:
        def forward(
            self,
            input: torch.Tensor,
            hx: Optional[torch.Tensor] = None,
            lengths: Optional[torch.Tensor] = None,
            truncate: Optional[int] = None,
        ) -> Tuple[torch.Tensor, torch.Tensor]:
            """Runs the L layers, both directions of each when bidirectional.

            Args:
                input: (T, B, I), or (B, T, I) with ``batch_first``; unbatched (T, I);
                    or a PackedSequence (sorted or not) of I features.
                hx: the initial state as torch.nn's module takes it: (L*D, B, H)
                    for RNN and GRU, the tuple ((L*D, B, P), (L*D, B, H)) for LSTM;
                    without the B axis for unbatched input; None for zeros.
                lengths: padded input only: (B,) int64 (a list of ints, another
                    integer dtype or a numpy integer array is converted),
                    0 <= len <= T, in any order; (1,) for unbatched input. Gives the
                    PackedSequence semantics without packing: output is 0 for
                    t >= len_b, the final state of b is its state after step
                    len_b - 1 (the reverse direction runs from len_b - 1 down to 0).
                truncate: K >= 1: truncated BPTT on every layer and direction, the
                    gradient through the state cut every K steps counted from the
                    first step each direction processes. None: full BPTT.

            Returns:
                (output, h_n) in torch.nn's layout (for LSTM, (output, (h_n, c_n))):
                output (T, B, D*P) or (B, T, D*P), (T, D*P) unbatched, or a
                PackedSequence with the input's batch_sizes and indices; each final
                state (L*D, B, *), or (L*D, *) unbatched.
            """
            if not torch.jit.is_scripting():
                return self._forward(input, hx, lengths=lengths, truncate=truncate)
            output, state = self._scripted(input, [] if hx is None else [hx], lengths, truncate)
            return output, state[0]

    def _forward(
        self,
        input: Union[torch.Tensor, PackedSequence],
        hx=None,
        *,
        lengths: LengthsLike = None,
        truncate: Optional[int] = None,
    ):
        """forward in eager code (and under torch.compile, torch.fx, torch.onnx)."""
        if _fx.tracing():  # torch.fx: one call_module node, as for torch.nn's modules
            node = _fx.module_node(self, (input, hx), {"lengths": lengths, "truncate": truncate})
            if node is not None:
                return node
        truncate = check_truncate(truncate)
        state = self._hx_in(hx)
        w0 = self._weight("weight_ih_l0")
        # Under torch.autocast on the weights' device: the input, hx and the
        # weights cast up to float32 (autocast's float32 policy, as in
        # _checks.autocast_on_for), the outputs left float32.
        autocast = autocast_on_for(w0)
        if autocast:
            if isinstance(input, PackedSequence):
                data, state = cast_up((input.data, state))
                input = PackedSequence(data, *input[1:])
            else:
                input, state = cast_up((input, state))
        # A bfloat16 or float16 model outside autocast runs float32 on its
        # tensors cast up and gives its outputs back in its dtype, after the
        # checks (made on the dtypes the caller gave).
        w_dtype = w0.dtype
        low = w_dtype if w_dtype in LOWER_PRECISION and not autocast else None
        if isinstance(input, PackedSequence):
            output, state = self._forward_packed(input, state, lengths, truncate, low, autocast)
            if low is not None:
                output = PackedSequence(output.data.to(low), *output[1:])
            return output, self._hx_out(cast_down(low, state)[0])
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor or a PackedSequence, "
                            f"got {type(input).__name__}")
        if input.dim() not in (2, 3):
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"input must be 3-D {layout} or 2-D unbatched (T, I), "
                             f"got {input.dim()}-D of shape {tuple(input.shape)}")
        batched = input.dim() == 3
        if state is not None and any(h.dim() != input.dim() for h in state):
            raise RuntimeError(_hx_dims_message(list(state), batched, self._feature_letter))
        self._check_input(input, autocast)
        if not batched:
            x = input.unsqueeze(1)  # [T,1,I]
            state = None if state is None else tuple(h.unsqueeze(1) for h in state)  # [L*D,1,*]
        else:
            x = input.transpose(0, 1) if self.batch_first else input  # [T,B,I]
        B = x.shape[1]
        self._check_hx(state, B, x, batched)
        # Their dtype, shape and range are checked by each layer's op.
        lengths = lengths_arg(lengths)
        if low is not None:
            x, state = cast_up((x, state))
        output, state = self._layers(x, state, lengths, truncate, None, low, autocast)
        if low is not None:
            output, state = cast_down(low, output, state)
        if not batched:
            return output.squeeze(1), self._hx_out(tuple(h.squeeze(1) for h in state))
        return (output.transpose(0, 1) if self.batch_first else output), self._hx_out(state)

    def _forward_packed(
        self,
        input: PackedSequence,  # data [N,I], batch_sizes [T] int64 CPU
        hx: Optional[State],  # [L*D,B,*] each, the user's batch order
        lengths: LengthsLike,
        truncate: Optional[int],
        low: Optional[torch.dtype],  # the model's lower-precision dtype outside autocast
        autocast: bool,  # under torch.autocast on the weights' device
    ) -> tuple[PackedSequence, State]:  # output data [N,D*P], final states [L*D,B,*]
        if lengths is not None:
            raise ValueError("lengths must be None for a PackedSequence input, which carries "
                             f"its own lengths; got {type(lengths).__name__}")
        if _onnx.exporting(input.data):  # its batch sizes are data, which torch.export cannot trace
            raise RuntimeError("a PackedSequence input cannot be exported to ONNX; pass the "
                               "padded batch with lengths= instead")
        data, batch_sizes, sorted_indices, unsorted_indices = input
        if data.dim() != 2:
            raise RuntimeError(f"a PackedSequence's data must be 2-D (N, I), "
                               f"got shape {tuple(data.shape)}")
        self._check_input(data, autocast)
        x, lengths, valid = _padded(data, batch_sizes)  # valid on data's device
        B = x.shape[1]
        if hx is not None and any(h.dim() != 3 for h in hx):
            got = ", ".join(f"{h.dim()}-D of shape {tuple(h.shape)}" for h in hx)
            raise RuntimeError(f"hx must be 3-D (L*D, B, {self._feature_letter}) for a "
                               f"PackedSequence input, got {got}")
        self._check_hx(hx, B, data, True)
        if low is not None:
            x, hx = cast_up((x, hx))
        if hx is not None and sorted_indices is not None:
            hx = tuple(h.index_select(1, sorted_indices) for h in hx)  # -> packed order
        output, h_n = self._layers(x, hx, lengths, truncate, valid, low, autocast)
        if unsorted_indices is not None:
            h_n = tuple(h.index_select(1, unsorted_indices) for h in h_n)
        return PackedSequence(output[valid], batch_sizes, sorted_indices, unsorted_indices), h_n

    def _layers(
        self,
        x: torch.Tensor,  # [T,B,I]
        hx: Optional[State],  # [L*D,B,*] each
        lengths: Optional[torch.Tensor],  # [B] int64, CPU
        truncate: Optional[int],
        packed: Optional[torch.Tensor],  # [T,B] bool: the valid steps of a packed input
        low: Optional[torch.dtype],  # the model's bfloat16 or float16, outside autocast
        autocast: bool,  # under torch.autocast on the weights' device: weights cast up
    ) -> tuple[torch.Tensor, State]:  # output [T,B,D*P], final states [L*D,B,*]
        D = 2 if self.bidirectional else 1
        finals = []  # a state tuple per layer and direction
        layer_input = x
        weight = self._weight
        for k in range(self.num_layers):
            outputs = []
            for d in range(D):
                names = self._all_weights[k * D + d]
                weights = tuple([weight(name) for name in names])
                if low is not None:  # one dtype: a parameter left in another is a mistake
                    for name, w in zip(names, weights):
                        if w is not None and w.dtype != low:
                            raise TypeError(f"{name} must have the model's dtype {low} (that of "
                                            f"weight_ih_l0), got {w.dtype}")
                if low is not None or autocast:
                    weights = cast_up(weights)
                state = None if hx is None else tuple([h[k * D + d] for h in hx])
                out, final = self._run_layer(layer_input, state, weights, lengths, truncate,
                                             reverse=d == 1)
                outputs.append(out)  # [T,B,P]
                finals.append(final)
            layer_input = outputs[0] if D == 1 else torch.cat(outputs, 2)  # [T,B,D*P]
            if self.dropout > 0 and self.training and k < self.num_layers - 1:
                layer_input = _dropout(layer_input, self.dropout, packed)
        return layer_input, tuple([torch.stack(states) for states in zip(*finals)])

    # -- torch.jit.script --------------------------------------------------------
    # forward's branch under torch.jit.is_scripting(), which TorchScript
    # compiles (the eager branch it skips): padded or unbatched input, hx,
    # lengths and truncate, every layer and direction, dropout, a bfloat16 or
    # float16 model, through the ops the eager path calls, with the same
    # arguments, so with the same bits. A PackedSequence input and autocast
    # are eager only (forward's annotations are TorchScript's and say Tensor).
    # The module's own checks are the eager ones, in the same words (dtypes
    # spelled by _dtype_text: TorchScript prints a dtype as a number); the
    # device checks, and the dtype checks of a float32 or float64 model, are
    # the ops'.

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: the scripted forward reads the
        weights from nn.RNNBase's _flat_weights, which is rebuilt here from the
        parameters as they are now (one replaced through _parameters, as
        accelerate and FSDP2 do, included). A parametrized weight (weight_norm)
        would be read once, at scripting, and its parameters would get no
        gradient: it is refused, as torch.nn's modules refuse it."""
        if torch.nn.utils.parametrize.is_parametrized(self):
            name = next(c.__name__ for c in type(self).__mro__ if c.__module__ == __name__)
            raise RuntimeError(f"an rnnkern.{name} with a parametrization (e.g. "
                               f"weight_norm) cannot be scripted: the scripted forward would "
                               f"read its weights once; use it eagerly or with torch.compile")
        self._init_flat_weights()
        return self

    def _scripted(
        self,
        input: torch.Tensor,
        hx: List[torch.Tensor],  # the state tensors, (h,) or (h, c); empty for zeros
        lengths: Optional[torch.Tensor],
        truncate: Optional[int],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        K = 0
        if truncate is not None:
            if truncate < 1:
                raise ValueError(f"truncate must be an int >= 1 or None, got {truncate}")
            K = truncate
        if input.dim() != 2 and input.dim() != 3:
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"input must be 3-D {layout} or 2-D unbatched (T, I), "
                             f"got {input.dim()}-D of shape {_shape_text(input.shape)}")
        batched = input.dim() == 3
        f = "*" if self.mode == "LSTM" else "H"
        for h in hx:
            if h.dim() != input.dim():
                raise RuntimeError(_hx_dims_message(hx, batched, f))
        if input.shape[-1] != self.input_size:
            raise RuntimeError(_input_size_message(self.input_size, input.shape))
        if not batched:
            x = input.unsqueeze(1)
            hx = [h.unsqueeze(1) for h in hx]
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        T, B = x.shape[0], x.shape[1]
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        P = self.proj_size if self.proj_size > 0 else H
        sizes = [P, H] if self.mode == "LSTM" else [H]
        for i in range(len(hx)):
            h = hx[i]
            if list(h.shape) != [self.num_layers * D, B, sizes[i]]:
                name = "hx" if len(hx) == 1 else f"hx[{i}]"
                raise RuntimeError(_hx_shape_message(name, list(h.shape), batched, f, B, sizes[i],
                                                     self.num_layers, D))
        if lengths is not None:
            if (lengths.dtype != torch.int64 and lengths.dtype != torch.bool
                    and not lengths.is_floating_point() and not lengths.is_complex()):
                lengths = lengths.to(torch.int64)  # lengths_arg's rule (the op refuses the rest)
            if lengths.device.type != "cpu" and lengths.device.type != "meta":
                lengths = lengths.cpu()
        low = self._flat_weights[0].dtype
        lower = low == torch.bfloat16 or low == torch.float16
        if lower:
            # The op sees float32 only: the eager module's checks of the
            # caller's dtypes, before the casts.
            if input.dtype != low:
                raise ValueError(f"input dtype ({_dtype_text(input.dtype)}) does not match the "
                                 f"RNN's weight dtype ({_dtype_text(low)}): convert the input "
                                 f"with input.to({_dtype_text(low)}) or the model with "
                                 f"model.to({_dtype_text(input.dtype)})")
            for i in range(len(hx)):
                if hx[i].dtype != input.dtype:
                    name = "hx" if len(hx) == 1 else f"hx[{i}]"
                    raise RuntimeError(f"{name} must have the input's dtype "
                                       f"{_dtype_text(input.dtype)}, got {_dtype_text(hx[i].dtype)}")
            for i in range(len(self._flat_weights)):
                if self._flat_weights[i].dtype != low:
                    raise TypeError(f"{self._flat_weights_names[i]} must have the model's dtype "
                                    f"{_dtype_text(low)} (that of weight_ih_l0), got "
                                    f"{_dtype_text(self._flat_weights[i].dtype)}")
            x = x.float()
            hx = [h.float() for h in hx]
        n = len(self._flat_weights) // (self.num_layers * D)  # weights per layer and direction
        finals: List[List[torch.Tensor]] = [[] for _ in sizes]
        for k in range(self.num_layers):
            outputs: List[torch.Tensor] = []
            for d in range(D):
                j = k * D + d
                w = [v.float() if lower else v for v in self._flat_weights[j * n:(j + 1) * n]]
                b_ih: Optional[torch.Tensor] = None
                b_hh: Optional[torch.Tensor] = None
                if self.bias:
                    b_ih, b_hh = w[2], w[3]
                h0 = hx[0][j] if len(hx) > 0 else x.new_zeros(B, P)
                if self.mode == "LSTM" or self.mode == "GRU":
                    c0: Optional[torch.Tensor] = None
                    if self.mode == "LSTM":
                        c0 = hx[1][j] if len(hx) > 0 else x.new_zeros(B, H)
                    w_hr: Optional[torch.Tensor] = None
                    if self.proj_size > 0:
                        w_hr = w[n - 1]
                    r = torch.ops.rnnkern.layer_fwd(x, h0, c0, w[0], w[1], b_ih, b_hh, w_hr,
                                                    lengths, self.mode.lower(), d == 1, K, False)
                    out, states = r[0], [r[1], r[2]]
                else:
                    nonlinearity = "tanh" if self.mode == "RNN_TANH" else "relu"
                    r = torch.ops.rnnkern.elman_fwd(x, h0, w[0], w[1], b_ih, b_hh, lengths,
                                                    nonlinearity, d == 1, K)
                    out, states = r[0], [r[1]]
                outputs.append(out)
                for i in range(len(sizes)):
                    finals[i].append(states[i])
            x = outputs[0] if D == 1 else torch.cat(outputs, 2)
            if self.dropout > 0 and self.training and k < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        state = [torch.stack(v) for v in finals]
        if lower:
            x = x.to(low)
            state = [h.to(low) for h in state]
        if not batched:
            return x.squeeze(1), [h.squeeze(1) for h in state]
        return (x.transpose(0, 1) if self.batch_first else x), state

    def _weight(self, name: str) -> torch.Tensor:
        """getattr(self, name), without nn.Module.__getattr__'s cost for a plain
        parameter (a tenth of a small call's Python time went to it). Anything
        else (a parametrization such as weight_norm, a tensor put in the
        parameter's place by torch.func.functional_call or pruning) is not in
        _parameters and takes getattr, which computes it."""
        w = self._parameters.get(name)
        return w if w is not None else getattr(self, name)

    def _check_input(self, input: torch.Tensor, autocast: bool) -> None:
        """The checks nn.RNN makes first (dtype, then input_size), with its exception types."""
        w = self._weight("weight_ih_l0")
        # Under autocast the input is cast already, and the weights will be.
        w_dtype = torch.float32 if autocast and w.dtype in LOWER_PRECISION else w.dtype
        if input.dtype != w_dtype:
            raise ValueError(f"input dtype ({input.dtype}) does not match the RNN's weight dtype "
                             f"({w.dtype}): convert the input with input.to({w.dtype}) or the "
                             f"model with model.to({input.dtype})")
        if not (input.is_cpu and w.is_cpu) and input.device != w.device:
            # RuntimeError, as nn.RNN's "Input and parameter tensors are not at the same device"
            raise RuntimeError(f"input must be on the device of the module's parameters "
                               f"{w.device}, got {input.device}")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(_input_size_message(self.input_size, list(input.shape)))

    def _check_hx(
        self,
        hx: Optional[State],  # [L*D,B,*] each (unbatched: [L*D,1,*] after unsqueeze)
        B: int,
        like: torch.Tensor,  # the input, for dtype and device
        batched: bool,
    ) -> None:
        if hx is None:
            return
        LD = self.num_layers * (2 if self.bidirectional else 1)
        for i, (h, size) in enumerate(zip(hx, self._state_sizes())):
            name = "hx" if len(hx) == 1 else f"hx[{i}]"
            if tuple(h.shape) != (LD, B, size):
                raise RuntimeError(_hx_shape_message(name, list(h.shape), batched,
                                                     self._feature_letter, B, size,
                                                     self.num_layers, LD // self.num_layers))
            # RuntimeError, not ValueError: torch.nn raises RuntimeError for these two.
            if h.dtype != like.dtype:
                raise RuntimeError(f"{name} must have the input's dtype {like.dtype}, got {h.dtype}")
            if h.device != like.device:
                raise RuntimeError(f"{name} must be on the input's device {like.device}, "
                                   f"got {h.device}")


# The module's messages that the eager and the scripted forward share, written
# once in what TorchScript compiles.

def _hx_dims_message(hx: List[torch.Tensor], batched: bool, f: str) -> str:
    expected = f"3-D (L*D, B, {f})" if batched else f"2-D (L*D, {f}) for unbatched 2-D input"
    got = ", ".join([f"{h.dim()}-D of shape {_shape_text(h.shape)}" for h in hx])
    return f"hx must be {expected}, got {got}"


def _input_size_message(input_size: int, shape: List[int]) -> str:
    return (f"input.size(-1) must be equal to input_size: expected I={input_size}, "
            f"got {shape[-1]} (input shape {_shape_text(shape)})")


def _hx_shape_message(name: str, shape: List[int], batched: bool, f: str, B: int, size: int,
                      num_layers: int, D: int) -> str:
    """shape: the state's as the module holds it, (L*D, B, *) (unbatched: B = 1
    after unsqueeze); the message speaks the caller's layout, (L*D, *) there."""
    LD = num_layers * D
    letters = f"(L*D, B, {f})" if batched else f"(L*D, {f})"
    want = [LD, B, size] if batched else [LD, size]
    given = shape if batched else [shape[0], shape[2]]
    return (f"{name} must have shape {letters} = {_shape_text(want)} "
            f"(num_layers={num_layers}, D={D}), got {_shape_text(given)}")


def _dtype_text(dtype: torch.dtype) -> str:
    """A dtype as Python prints it, in TorchScript too (which prints a number)."""
    names = {torch.float32: "torch.float32", torch.float64: "torch.float64",
             torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16",
             torch.int64: "torch.int64", torch.int32: "torch.int32", torch.int16: "torch.int16",
             torch.int8: "torch.int8", torch.uint8: "torch.uint8", torch.bool: "torch.bool",
             torch.complex64: "torch.complex64", torch.complex128: "torch.complex128"}
    return names.get(dtype, "another dtype")


def _shape_text(shape: List[int]) -> str:
    """A shape as Python prints a tuple of it, (3, 4) or (5,), in TorchScript too."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join([str(v) for v in shape]) + ")"


def _padded(data: torch.Tensor, batch_sizes: torch.Tensor) -> tuple:
    """A PackedSequence's data [N,I] padded to x [T,B,I] in its packed (sorted)
    order, with lengths [B] int64 on the CPU and the valid steps [T,B] bool on
    the data's device. Packed data is time-major over the batch sorted by decreasing length:
    row t of the padded batch holds its first batch_sizes[t] entries."""
    T = batch_sizes.size(0)
    if torch.jit.is_tracing():
        # torch.jit.trace records torch's op (called as pad_packed_sequence
        # calls it, which keeps T a traced size), and B stays a traced size,
        # where int(batch_sizes[0]) below would be a constant of the trace.
        # Dynamo cannot run that op on fake tensors, so only tracing takes it.
        x, lengths = torch._VF._pad_packed_sequence(data, batch_sizes, False, 0.0, T)
        return x, lengths, (torch.arange(T)[:, None] < lengths).to(data.device)
    valid = torch.arange(int(batch_sizes[0])) < batch_sizes[:, None]
    valid_dev = valid.to(data.device)
    x = data.new_zeros(T, valid.shape[1], data.shape[1]).index_put((valid_dev,), data)
    return x, valid.sum(0), valid_dev


_ABSENT = object()  # a keyword not given


def _refuse_proj_size(proj_size) -> None:
    """torch.nn.RNN and torch.nn.GRU refuse a proj_size keyword, whatever its value."""
    if proj_size is not _ABSENT:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class RNN(_RecurrentBase):
    """A multi-layer Elman RNN with tanh or relu, the drop-in for ``torch.nn.RNN``.

    Same constructor (positional order included), parameters (names, shapes,
    initialisation), state_dict, input forms and outputs as ``torch.nn.RNN``;
    each layer and direction runs its forward pass and its whole BPTT as one
    fused kernel call (``rnnkern.functional.rnn``).

    Args:
        input_size: I.  hidden_size: H.  num_layers: L (default 1).
        nonlinearity: 'tanh' or 'relu'.  bias: use bias_ih and bias_hh.
        batch_first: batched input and output are (B, T, ·) instead of (T, B, ·);
            hx and h_n are not affected, and unbatched input ignores it.
        dropout: probability of dropout on the output of every layer but the
            last, in training mode, as nn.RNN.
        bidirectional: D = 2; the reverse direction of layer k is
            ``weight_ih_l{k}_reverse`` etc.
        device, dtype: of the parameters. The kernels run float32 and float64;
            a bfloat16 or float16 model on input of its dtype runs them in
            float32 and returns its outputs in its dtype (gradients too);
            under torch.autocast a bfloat16 or float16 input or model runs in
            float32 and returns float32.

    The output may be modified in place before backward, as nn.RNN allows (the
    backward then recomputes the layer's states from its saved inputs).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
                 proj_size=_ABSENT):
        _refuse_proj_size(proj_size)
        check_nonlinearity(nonlinearity)
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def _run_layer(self, x, state, weights, lengths, truncate, reverse):
        w_ih, w_hh, b_ih, b_hh = weights if self.bias else (*weights, None, None)
        out, h = functional._elman_layer(
            x, None if state is None else state[0], w_ih, w_hh, b_ih, b_hh,
            nonlinearity="tanh" if self.mode == "RNN_TANH" else "relu", lengths=lengths,
            truncate=truncate, reverse=reverse)
        return out, (h,)


class GRU(_RecurrentBase):
    """A multi-layer GRU, the drop-in for ``torch.nn.GRU`` (gates r, z, n; the
    reset gate applied after the hidden product, as torch.nn). Same
    constructor, parameters, initialisation, state_dict, input forms and
    outputs as ``torch.nn.GRU``; each layer and direction is one fused kernel
    call each way (``rnnkern.functional.gru``).

    Args: as torch.nn.GRU (input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device, dtype).
    forward(input, hx=None, lengths=None, truncate=None): as rnnkern.RNN.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, proj_size=_ABSENT):
        _refuse_proj_size(proj_size)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)

    def _run_layer(self, x, state, weights, lengths, truncate, reverse):
        w_ih, w_hh, b_ih, b_hh = weights if self.bias else (*weights, None, None)
        H = self.hidden_size
        out, h, _ = functional._gated_layer("gru", x, None if state is None else state[0], w_ih, w_hh, b_ih, b_hh, None, H=H,
                                            P=H, lengths=lengths, truncate=truncate,
                                            reverse=reverse)
        return out, (h,)


class LSTM(_RecurrentBase):
    """A multi-layer LSTM, the drop-in for ``torch.nn.LSTM`` (gates i, f, g, o;
    ``proj_size`` supported: h_t = W_hr (o * tanh(c_t))). Same constructor,
    parameters, initialisation, state_dict, input forms and outputs as
    ``torch.nn.LSTM``: hx and the returned state are the tuple (h, c), h of
    P = proj_size (or H) features, c of H. Each layer and direction is one
    fused kernel call each way (``rnnkern.functional.lstm``).

    Args: as torch.nn.LSTM (input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0, device,
    dtype). forward(input, hx=None, lengths=None, truncate=None): as
    rnnkern.RNN, with hx = (h_0, c_0).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size=proj_size, device=device, dtype=dtype)

    _feature_letter = "*"  # h has P features, c has H

    # nn.LSTM's public helpers for its (h, c) state, which RNNBase's versions
    # (for one tensor) do not take; they read only what nn.RNNBase holds.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    if TYPE_CHECKING:  # as in _RecurrentBase: eager's forms for type checkers
        @overload
        def forward(self, input: torch.Tensor,
                    hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                    lengths: LengthsLike = None, truncate: Optional[int] = None,
                    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]: ...

        @overload
        def forward(self, input: PackedSequence,
                    hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                    lengths: None = None, truncate: Optional[int] = None,
                    ) -> Tuple[PackedSequence, Tuple[torch.Tensor, torch.Tensor]]: ...

        def forward(self, input, hx=None, lengths=None, truncate=None): ...
    else:
        def forward(
            self,
            input: torch.Tensor,
            hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
            lengths: Optional[torch.Tensor] = None,
            truncate: Optional[int] = None,
        ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
            """As rnnkern.RNN's forward, with hx and the final state the tuple (h, c)."""
            if not torch.jit.is_scripting():
                return self._forward(input, hx, lengths=lengths, truncate=truncate)
            output, state = self._scripted(input, [] if hx is None else [hx[0], hx[1]],
                                           lengths, truncate)
            return output, (state[0], state[1])

    def _state_sizes(self) -> tuple:
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _hx_in(self, hx) -> Optional[State]:
        return lstm_state(hx)

    def _hx_out(self, state: State):
        return state

    def _run_layer(self, x, state, weights, lengths, truncate, reverse):
        if self.bias:
            w_ih, w_hh, b_ih, b_hh, *w_hr = weights
        else:
            (w_ih, w_hh, *w_hr), b_ih, b_hh = weights, None, None
        H = self.hidden_size
        out, h, c = functional._gated_layer("lstm", x, state, w_ih, w_hh, b_ih, b_hh,
                                            w_hr[0] if w_hr else None, H=H,
                                            P=self.proj_size or H, lengths=lengths,
                                            truncate=truncate, reverse=reverse)
        return out, (h, c)


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

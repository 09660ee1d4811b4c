"""Argument handling of the public API, in two parts, so that each check is
made once and every error has one wording.

1. **Conversions** (``layer_api_args`` and ``loss_api_args``, made of
   ``check_bool``, ``check_truncate``, ``lengths_arg``, ``time_major_input``,
   ``steps_to_time_major``, ``lstm_state``, ``resolve_mode``; and
   ``check_loss_options``): what the Python API does before it calls an op.
   They refuse what an op's schema cannot express or would accept silently
   (truncate=True, reverse=1, a list of floats as lengths, an LSTM state that
   is not a pair) and turn the user's layout (batch_first) into the ops'
   time-major one, so an error about a layout speaks that layout.

2. **The ops' checks** (``op_elman_checks``, ``op_layer_checks``,
   ``op_loss_checks``, ``op_length_checks``): shapes,
   dtypes, devices and values are checked by the op itself (csrc/rnnkern.cpp),
   which direct op calls need too; ``rnnkern.functional`` and the modules leave
   them to it. These functions are the same checks in the same order with the
   same words, for ``rnnkern.reference``, which calls no op. (The op prefixes
   its name, e.g. "rnnkern.elman_fwd: "; the words after it are these.)
   tests/test_*_bad_input.py hold the API, the reference and the ops to one
   wording.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

NONLINEARITIES = ("tanh", "relu")

LengthsLike = Union[torch.Tensor, Sequence[int], np.ndarray, None]

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
INT32_MAX = 2**31 - 1


def _shape(t) -> tuple:
    return tuple(t.shape)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------------------
# 1. Conversions: the Python API's own arguments and the user's layout.

LOWER_PRECISION = (torch.bfloat16, torch.float16)


def autocast_on_for(t) -> bool:
    """Whether torch.autocast is on for t's device (the CPU's for what is not a
    tensor: the op refuses it). Under it, the calls' bfloat16 and float16
    tensors are cast up (cast_up): the kernels run float32 and float64, so the
    layers and the loss take autocast's float32 policy, as its numerically
    sensitive ops do. Outputs are float32, and the casts' own backward brings
    the gradients down to their tensors' dtypes.

    Eager code with no autocast on anywhere is answered by one C call, without
    building the device object (it and the two lookups were 1 us of a 70 us
    module call at T = B = 1); compiled code takes the general test, which
    Dynamo traces."""
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return False
    # No autocast on a device without it (meta: shape inference runs the
    # layers on meta tensors, as it runs nn's).
    device_type = t.device.type if isinstance(t, torch.Tensor) else "cpu"
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from _tensors(a)


def cast_up(args):
    """args with their bfloat16 and float16 tensors (nested in tuples or lists
    too) cast to float32."""
    def up(a):
        if isinstance(a, torch.Tensor):
            return a.float() if a.dtype in LOWER_PRECISION else a
        if isinstance(a, (tuple, list)):
            return type(a)(up(b) for b in a)
        return a

    return tuple(up(a) for a in args)


# The tensors of the functions' calls that lower_precision_up sees, in order
# (rnn_loss's target has its own rule: loss_target_up).
LAYER_TENSORS = ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
LOSS_TENSORS = ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_out",
                "bias_out", "weight_hr")


def lower_precision_up(names: Sequence[str], *args):
    """(args, low): the float32 form of a lower-precision call, and the dtype
    to give its floating outputs back. ``names`` name args (the first is the
    input), for the error below.

    - Under torch.autocast on the input's device: cast_up(args), low None
      (the outputs stay float32: autocast's float32 policy).
    - Outside it, with a bfloat16 or float16 input: every other floating tensor
      of args (nested in tuples or lists too) must have the input's dtype
      (a TypeError names the first that has not). args come back with those
      tensors cast to float32, and low is the input's dtype. The kernels then
      compute in float32 (every product summed in float32, the state carried
      in float32 from step to step) and the caller rounds its outputs to
      ``low``: what a bfloat16 or float16 model gets from torch.nn, with the
      rounding once at the end rather than at every operation.
    - Otherwise (a float32 or float64 input): args as they are, low None; the
      ops refuse what they cannot take, by name.
    The casts' own backward hands each tensor its gradient in its own dtype."""
    x = args[0]
    if autocast_on_for(x):
        return cast_up(args), None
    if not isinstance(x, torch.Tensor) or x.dtype not in LOWER_PRECISION:
        return args, None
    for name, a in zip(names[1:], args[1:]):
        for t in _tensors((a,)):
            if t.is_floating_point() and t.dtype != x.dtype:
                raise TypeError(f"{name} must have the input's dtype {x.dtype}, got {t.dtype}")
    return cast_up(args), x.dtype


def loss_target_up(target, loss: str, low: Optional[torch.dtype], input):
    """rnn_loss's target beside lower_precision_up's (args, low) of the same
    call (``input`` for its device): under autocast cast up as the rest; with a
    lower-precision input, an MSE target must have the input's dtype and is
    cast up with it, and a cross-entropy one is left to the op's check (int64
    class indices), which then names the dtype the caller gave."""
    if low is None:
        return cast_up((target,))[0] if autocast_on_for(input) else target
    if not isinstance(target, torch.Tensor) or loss != "mse":
        return target
    if target.dtype != low:
        raise TypeError(f"target must have the input's dtype {low} for loss='mse', "
                        f"got {target.dtype}")
    return target.float()


def cast_loss_down(low: Optional[torch.dtype], result):
    """rnn_loss's result (the loss, or RNNLossDetails) rounded to low: the loss,
    h_n and step_loss; grad_norm stays float32 (backward fills that very
    tensor in)."""
    if low is None:
        return result
    if isinstance(result, torch.Tensor):
        return result.to(low)
    value, h_n, step_loss = cast_down(low, result.loss, result.h_n, result.step_loss)
    return result._replace(loss=value, h_n=h_n, step_loss=step_loss)


def cast_down(low: Optional[torch.dtype], *outputs):
    """outputs with their floating tensors (nested in tuples too) cast to low;
    as they are for low None."""
    if low is None:
        return outputs

    def down(a):
        if isinstance(a, torch.Tensor):
            return a.to(low) if a.is_floating_point() else a
        if isinstance(a, tuple):
            return tuple(down(b) for b in a)
        return a

    return tuple(down(a) for a in outputs)


def check_nonlinearity(nonlinearity) -> str:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity


def check_bool(name: str, value) -> bool:
    """A flag: True or False only (reverse='yes' or 1 is a mistake, not a truth
    value); a numpy bool (from a config array, say) is one, and comes back as
    Python's."""
    if isinstance(value, np.bool_):
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_int64(name: str, value, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """An int (not a bool) in [lo, hi]; the ops take int64, so larger ints are refused here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value}")
    return value


def check_truncate(truncate) -> Optional[int]:
    """None or an int >= 1 (bools are refused: truncate=True is a mistake). The
    ops take 0 for None, so the API refuses 0 itself."""
    if truncate is None:
        return None
    if isinstance(truncate, bool) or not isinstance(truncate, int):
        raise TypeError(f"truncate must be an int >= 1 or None, got {truncate!r} ({type(truncate).__name__})")
    if truncate < 1:
        raise ValueError(f"truncate must be an int >= 1 or None, got {truncate}")
    return check_int64("truncate", truncate, 1)


def lengths_arg(lengths: LengthsLike) -> Optional[torch.Tensor]:
    """lengths as the ops take them, an int64 tensor: a list of ints, a tensor of
    another integer dtype (int32 from a collate function) or a numpy integer
    array is converted, as ``pack_padded_sequence`` converts them; a float or
    bool tensor is refused, not truncated. A tensor on an accelerator is brought
    to the CPU once (nn.RNN's packing keeps lengths there too, and each layer's
    op then reads them without a copy). Everything else about them (shape,
    device, range) is the op's check."""
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        # ints, numpy's included (a list of a numpy array's items); not bools
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                   for v in lengths):
            raise TypeError(f"lengths given as a list must hold ints, got {lengths!r}")
        return torch.tensor([int(v) for v in lengths], dtype=torch.int64)
    if isinstance(lengths, np.ndarray):
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"lengths given as a numpy array must have an integer dtype, "
                            f"got {lengths.dtype}")
        # np.array copies to a contiguous int64 array and keeps a 0-d one 0-d
        # (for the op to refuse its shape, as it refuses a 0-d tensor)
        return torch.from_numpy(np.array(lengths, dtype=np.int64))
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be an integer tensor, a list of ints or None, "
                        f"got {type(lengths).__name__}")
    if lengths.dtype != torch.int64:
        if lengths.dtype == torch.bool or lengths.dtype.is_floating_point or lengths.dtype.is_complex:
            raise TypeError(f"lengths must be an integer tensor, a list of ints or None, "
                            f"got a {lengths.dtype} tensor")
        lengths = lengths.to(torch.int64)
    if lengths.device.type not in ("cpu", "meta"):
        return lengths.cpu()
    return lengths


def time_major_input(input, batch_first: bool):
    """The input as the ops take it, [T,B,I]. With batch_first the input must be
    3-D to be transposed, and the error says (B, T, I); time-major input goes to
    the op as it is, and the op checks it."""
    check_bool("batch_first", batch_first)
    if not batch_first:
        return input
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 3:
        raise ValueError(f"input must be 3-D (B, T, I), got shape {_shape(input)}")
    return input.transpose(0, 1)


def steps_to_time_major(name: str, t, shape: Optional[tuple], letters: str):
    """A batch-first per-step tensor (target or loss_mask) made time-major. Its
    shape is checked first, in the user's (B, T, ...) terms (the op, which sees
    (T, B, ...), would report the transposed shape); shape None: not known
    here, left to the op."""
    if not isinstance(t, torch.Tensor):
        return t
    if shape is not None and _shape(t) != shape:
        raise ValueError(f"{name} must have shape {letters} = {shape}, got {_shape(t)}")
    return t.transpose(0, 1) if t.dim() >= 2 else t


def layer_api_args(input, *, batch_first, lengths, truncate, reverse) -> tuple:
    """The conversions of a layer function (functional.rnn / lstm / gru and the
    reference's): -> (x [T,B,I], lengths, truncate as an int or None)."""
    truncate = check_truncate(truncate)
    check_bool("reverse", reverse)
    return time_major_input(input, batch_first), lengths_arg(lengths), truncate


def loss_api_args(input, target, weight_out, weight_hr, loss_mask, *, mode, nonlinearity,
                  batch_first, lengths, truncate, return_details, loss, ignore_index,
                  label_smoothing) -> tuple:
    """The conversions of rnn_loss (functional's and the reference's) ->
    (mode, x [T,B,I], target and loss_mask time-major, lengths, truncate,
    label_smoothing as a float)."""
    mode = resolve_mode(mode, nonlinearity)
    if weight_hr is not None and mode.startswith("rnn_"):  # the Elman op has no such argument
        raise ValueError(f"weight_hr (the projection) applies to mode='lstm' only, "
                         f"got mode={mode!r}")
    truncate = check_truncate(truncate)
    check_bool("return_details", return_details)
    label_smoothing = loss_scalars(ignore_index, label_smoothing)
    no_grad_wanted("target", target)
    no_grad_wanted("loss_mask", loss_mask)
    lengths = lengths_arg(lengths)
    x = time_major_input(input, batch_first)  # [T,B,I]
    if batch_first:  # x is 3-D: target and loss_mask to (T, B, ...)
        T, B = x.shape[0], x.shape[1]
        if loss == "mse":  # O from the head, where it can be read
            O = weight_out.shape[0] if isinstance(weight_out, torch.Tensor) and \
                weight_out.dim() == 2 else None
            target = steps_to_time_major("target", target, None if O is None else (B, T, O),
                                         "(B, T, O)")
        else:
            target = steps_to_time_major("target", target, (B, T), "(B, T)")
        loss_mask = steps_to_time_major("loss_mask", loss_mask, (B, T), "(B, T)")
    return mode, x, target, loss_mask, lengths, truncate, label_smoothing


class LSTMStateError(TypeError, RuntimeError, IndexError):
    """An LSTM hx that is not a pair (h_0, c_0) of tensors. A TypeError, and
    also each exception nn.LSTM raises for such an hx (RuntimeError "lstm
    expects two hidden states" for three, IndexError for one tensor or a
    1-tuple), so that code written against nn.LSTM catches it."""


def lstm_state(hx):
    """The LSTM's hx: None or a pair (h_0, c_0) of tensors, nn.LSTM's form."""
    if hx is None:
        return None
    if not isinstance(hx, (tuple, list)) or len(hx) != 2 or \
            not all(isinstance(h, torch.Tensor) for h in hx):
        raise LSTMStateError("hx must be a tuple (h_0, c_0) of two tensors, or None, got "
                             f"{type(hx).__name__}"
                             + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
    return tuple(hx)


# The cells rnn_loss can put its head on (nn.RNNBase's mode names, lower case).
MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def resolve_mode(mode: Optional[str], nonlinearity: str) -> str:
    """mode=None means the Elman cell with ``nonlinearity`` (rnn_loss before it had cells)."""
    if mode is None:
        return "rnn_" + check_nonlinearity(nonlinearity)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    # nonlinearity's default 'tanh' cannot be told from an explicit one, so
    # only a non-default value can contradict the mode
    if nonlinearity != "tanh" and mode != "rnn_" + nonlinearity:
        raise ValueError(f"nonlinearity={nonlinearity!r} contradicts mode={mode!r}: nonlinearity "
                         "chooses the Elman activation when mode is None; with mode given, "
                         "leave it out")
    return mode


LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum", "seq_mean", "seq_sum", "none")
STEPS = ("all", "last")


def _check_option(name: str, value, options) -> None:
    # csrc/rnnkern.cpp parse_loss / parse_reduction / parse_steps
    if value not in options:
        if len(options) == 2:
            allowed = f"{options[0]!r} or {options[1]!r}"
        else:
            allowed = "one of " + ", ".join(repr(o) for o in options)
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_loss_options(*, loss, reduction, steps, ignore_index, label_smoothing) -> float:
    """The per-step loss's options, checked where an op cannot be asked (the
    RNNLoss constructor) and by the reference; the API passes them to the op.
    ignore_index and label_smoothing are also a conversion (an int64 and a
    float, not a bool). Returns label_smoothing as a float."""
    _check_option("loss", loss, LOSSES)
    _check_option("reduction", reduction, REDUCTIONS)
    _check_option("steps", steps, STEPS)
    label_smoothing = loss_scalars(ignore_index, label_smoothing)
    _check_label_smoothing(loss, label_smoothing)
    return label_smoothing


def loss_scalars(ignore_index, label_smoothing) -> float:
    """ignore_index an int64 and label_smoothing a number (not a bool): the
    conversion the API makes before the op. Returns label_smoothing as a float."""
    check_int64("ignore_index", ignore_index)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r} "
                        f"({type(label_smoothing).__name__})")
    return float(label_smoothing)


def _check_label_smoothing(loss, label_smoothing: float) -> None:
    # csrc/rnnkern.cpp check_loss_args
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing:g}")
    if loss == "mse" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to loss='cross_entropy' only, got "
                         f"{label_smoothing:g} with loss='mse'")


def no_grad_wanted(name: str, t) -> None:
    """target and loss_mask are data: a silent None gradient would be wrong."""
    if isinstance(t, torch.Tensor) and torch.is_grad_enabled() and t.requires_grad:
        raise ValueError(f"{name} must not require grad: rnn_loss gives no gradient to {name} "
                         "(detach it)")


# ---------------------------------------------------------------------------
# 2. The ops' checks (csrc/rnnkern.cpp), same order and words, for the reference.

def _tensor(name: str, t, optional: bool = False) -> None:
    # The dispatcher's words for an argument of the wrong type.
    if t is None and not optional:
        raise TypeError(f"{name} must be a tensor, got None")
    if t is not None and not isinstance(t, torch.Tensor):
        kind = "Optional[Tensor]" if optional else "Tensor"
        raise RuntimeError(f"Expected a value of type '{kind}' for argument '{name}' but instead "
                           f"found type '{type(t).__name__}'.")


def _float_like(name: str, t, like: torch.Tensor) -> None:
    _tensor(name, t)
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the input's dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise RuntimeError(f"{name} must be on the input's device {like.device}, got {t.device}")


def _shape_is(name: str, t: torch.Tensor, shape: tuple, letters: str) -> None:
    if _shape(t) != tuple(shape):
        raise ValueError(f"{name} must have shape {letters} = {tuple(shape)}, got {_shape(t)}")


def _input(x) -> None:
    _tensor("input", x)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"input must be float32 or float64, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"input must be 3-D (T, B, I), got shape {_shape(x)}")


def _input_size(x: torch.Tensor, weight_ih: torch.Tensor, rows: int) -> None:
    I = x.shape[2]
    if weight_ih.dim() == 2 and weight_ih.shape[0] == rows and weight_ih.shape[1] != I:
        raise ValueError(f"input has inconsistent input_size: got I={I}, expected "
                         f"{weight_ih.shape[1]} (weight_ih is {_shape(weight_ih)})")


def _sizes_fit(pairs) -> None:
    for name, v in pairs:
        if v > INT32_MAX:
            raise ValueError(f"{name} must be < 2^31 (BLAS takes 32-bit sizes), got {v}")


def op_length_checks(lengths, B: int, T: int, device) -> None:
    """check_lengths: int64 (B,) on the CPU or the input's device, 0 <= len <= T."""
    if lengths is None:
        return
    _tensor("lengths", lengths, optional=True)
    if lengths.dtype != torch.int64:
        raise TypeError(f"lengths must be an int64 tensor, got {lengths.dtype}")
    if lengths.device.type != "cpu" and lengths.device != device:
        raise RuntimeError(f"lengths must be on the CPU or on the input's device {device}, "
                           f"got {lengths.device}")
    _shape_is("lengths", lengths, (B,), "(B,)")
    if B > 0 and not _compiling() and lengths.device.type != "meta":
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            raise ValueError(f"lengths must be in [0, T={T}], got min {lo} and max {hi}")


def _layer_start(x, weight_hh, truncate: int, hh_letters: str) -> None:
    # What check_elman_args and check_layer_args check first, in this order.
    if truncate < 0:
        raise ValueError(f"truncate must be >= 1 (or 0 for none), got {truncate}")
    _input(x)
    _tensor("weight_hh", weight_hh)
    if weight_hh.dim() != 2:
        raise ValueError(f"weight_hh must be 2-D {hh_letters}, got shape {_shape(weight_hh)}")


def _layer_end(x, bias_ih, bias_hh, rows: int, letters: str, lengths) -> None:
    # ... and last: the biases, then the lengths.
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        _tensor(name, b, optional=True)
        if b is not None:
            _float_like(name, b, x)
            _shape_is(name, b, (rows,), letters)
    op_length_checks(lengths, x.shape[1], x.shape[0], x.device)


def op_elman_checks(x, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, nonlinearity,
                    truncate: int) -> int:
    """check_elman_args on the time-major input (hx None: zeros). Returns H."""
    check_nonlinearity(nonlinearity)
    _layer_start(x, weight_hh, truncate, "(H, H)")
    T, B, I = x.shape
    H = weight_hh.shape[0]
    if H < 1:
        raise ValueError(f"hidden size H must be >= 1, got {H}")
    if max(B, H, I) > INT32_MAX:
        raise ValueError(f"B, I and H must each be < 2^31, got B={B} I={I} H={H}")
    _float_like("weight_hh", weight_hh, x)
    _shape_is("weight_hh", weight_hh, (H, H), "(H, H)")
    _float_like("weight_ih", weight_ih, x)
    _input_size(x, weight_ih, H)
    _shape_is("weight_ih", weight_ih, (H, I), "(H, I)")
    if hx is not None:
        _float_like("hx", hx, x)
        _shape_is("hx", hx, (B, H), "(B, H)")
    _layer_end(x, bias_ih, bias_hh, H, "(H,)", lengths)
    return H


def op_layer_checks(mode: str, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                    lengths, truncate: int) -> tuple:
    """check_layer_args for 'lstm' and 'gru' on the time-major input (h0, c0
    None: zeros). Returns (H, P)."""
    if mode not in ("lstm", "gru"):
        raise ValueError(f"mode must be 'lstm' or 'gru', got {mode!r}")
    lstm = mode == "lstm"
    gates, G = (4, "4H") if lstm else (3, "3H")
    _layer_start(x, weight_hh, truncate, f"({G}, P)")
    T, B, I = x.shape
    P = weight_hh.shape[1]
    if weight_hh.shape[0] % gates != 0 or weight_hh.shape[0] == 0:
        raise ValueError(f"weight_hh must have {G} rows ({gates} gates of H >= 1), got shape "
                         f"{_shape(weight_hh)}")
    H = weight_hh.shape[0] // gates
    _tensor("weight_hr", weight_hr, optional=True)
    if weight_hr is not None:
        if not lstm:
            raise ValueError("weight_hr (the projection) applies to mode='lstm' only")
        _float_like("weight_hr", weight_hr, x)
        _shape_is("weight_hr", weight_hr, (P, H), "(P, H)")
    elif P != H:
        raise ValueError(f"weight_hh must have shape ({G}, H) = {(gates * H, H)} without a "
                         f"projection, got {_shape(weight_hh)}")
    _sizes_fit((("B", B), ("I", I), ("G", gates * H), ("P", P)))
    _float_like("weight_hh", weight_hh, x)
    _float_like("weight_ih", weight_ih, x)
    _input_size(x, weight_ih, gates * H)
    _shape_is("weight_ih", weight_ih, (gates * H, I), f"({G}, I)")
    if h0 is not None:
        _float_like("h0", h0, x)
        _shape_is("h0", h0, (B, P), "(B, P)")
    if c0 is not None:
        if not lstm:
            raise ValueError("c0 must be None for mode='gru'")
        _float_like("c0", c0, x)
        _shape_is("c0", c0, (B, H), "(B, H)")
    _layer_end(x, bias_ih, bias_hh, gates * H, f"({G},)", lengths)
    return H, P


def op_loss_checks(x, P: int, target, weight_out, bias_out, lengths, loss_mask, *, loss, steps,
                   reduction, ignore_index, label_smoothing: float) -> int:
    """check_loss_args (the fused Elman loss and the head op alike) on the
    time-major input x [T,B,*] whose states have P features, target and
    loss_mask time-major; the layer's checks (lengths included) ran first.
    Returns O."""
    _check_option("loss", loss, LOSSES)
    _check_option("reduction", reduction, REDUCTIONS)
    _check_option("steps", steps, STEPS)
    _check_label_smoothing(loss, label_smoothing)
    T, B = x.shape[0], x.shape[1]
    _tensor("weight_out", weight_out)
    if weight_out.dim() != 2:
        raise ValueError(f"weight_out must be 2-D (O, H), got shape {_shape(weight_out)}")
    O = weight_out.shape[0]
    if O < 1:
        raise ValueError(f"the head needs O >= 1 outputs, got weight_out of shape "
                         f"{_shape(weight_out)}")
    _float_like("weight_out", weight_out, x)
    _shape_is("weight_out", weight_out, (O, P), "(O, H)")
    _tensor("bias_out", bias_out, optional=True)
    if bias_out is not None:
        _float_like("bias_out", bias_out, x)
        _shape_is("bias_out", bias_out, (O,), "(O,)")
    _tensor("target", target)
    if target.device != x.device:
        raise RuntimeError(f"target must be on the input's device {x.device}, got {target.device}")
    if loss == "cross_entropy":
        if target.dtype != torch.int64:
            raise TypeError(f"target must be int64 class indices for loss='cross_entropy', "
                            f"got {target.dtype}")
        _shape_is("target", target, (T, B), "(T, B)")
        if target.numel() > 0 and not _compiling():
            bad = (target != ignore_index) & ((target < 0) | (target >= O))
            if bool(bad.any()):
                t, b = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"target must hold class indices in [0, O={O}) or "
                                 f"ignore_index={ignore_index}, got {int(target[t, b])} "
                                 f"at [t={t}, b={b}]")
    else:
        if target.dtype != x.dtype:
            raise TypeError(f"target must have the input's dtype {x.dtype} for loss='mse', "
                            f"got {target.dtype}")
        _shape_is("target", target, (T, B, O), "(T, B, O)")
    _tensor("loss_mask", loss_mask, optional=True)
    if loss_mask is not None:
        if loss_mask.dtype != torch.bool and not loss_mask.dtype.is_floating_point:
            raise TypeError(f"loss_mask must be bool or floating, got {loss_mask.dtype}")
        if loss_mask.device != x.device:
            raise RuntimeError(f"loss_mask must be on the input's device {x.device}, "
                               f"got {loss_mask.device}")
        _shape_is("loss_mask", loss_mask, (T, B), "(T, B)")
        if loss_mask.dtype != torch.bool and loss_mask.numel() > 0 and not _compiling():
            ok = (loss_mask >= 0) & loss_mask.isfinite()  # NaN or inf makes the loss NaN
            if not bool(ok.all()):
                raise ValueError(f"loss_mask must be finite and >= 0, got "
                                 f"{float(loss_mask[~ok][0]):g}")
    if steps == "last" and B > 0 and not _compiling():
        lo = T if lengths is None else int(lengths.min())
        if lo < 1:
            which = "lengths must be >= 1, got min " if lengths is not None else "T must be >= 1, got "
            raise ValueError(f"steps='last' needs every sequence to have a last step: {which}{lo}")
    return O

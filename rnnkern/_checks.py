"""Argument checks of the public API, shared by the kernels' wrappers and the
reference so both reject the same inputs with the same words.

Each check raises before any kernel runs and names the argument, what was
expected and what was given, in the API's layout (batch_first or not). Checks
that read a tensor's values (the lengths' range, the targets' class range, the
loss mask's values, steps='last' against the lengths) are made once, by the op
(csrc/rnnkern.cpp), which direct op calls need too; the API leaves them to it.
The reference, which calls no op, makes them with the same words through
``check_length_values`` and ``check_loss_values``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

NONLINEARITIES = ("tanh", "relu")

LengthsLike = Union[torch.Tensor, Sequence[int], None]


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name: str, t, *, shape: tuple, like: torch.Tensor, letters: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {letters} = {shape}, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the input's dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        # RuntimeError, as torch (and nn.RNN) raise for a device mismatch.
        raise RuntimeError(f"{name} must be on the input's device {like.device}, got {t.device}")
    if _shape(t) != tuple(shape):
        raise ValueError(f"{name} must have shape {letters} = {tuple(shape)}, got {_shape(t)}")


def check_nonlinearity(nonlinearity) -> str:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def check_bool(name: str, value) -> bool:
    """A flag: True or False only (reverse='yes' or 1 is a mistake, not a truth value)."""
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
    """None or an int >= 1 (bools are refused: truncate=True is a mistake)."""
    if truncate is None:
        return None
    if isinstance(truncate, bool) or not isinstance(truncate, int):
        raise TypeError(f"truncate must be an int >= 1 or None, got {truncate!r} ({type(truncate).__name__})")
    if truncate < 1:
        raise ValueError(f"truncate must be an int >= 1 or None, got {truncate}")
    return check_int64("truncate", truncate, 1)


def check_lengths(lengths: LengthsLike, B: int, T: int) -> Optional[torch.Tensor]:
    """lengths: (B,) int64, or a list of B ints. Returns an int64 CPU tensor
    (nn.RNN's packing also keeps lengths on the CPU). Their range, 0 <= len <= T,
    is the op's check (check_length_values for the reference)."""
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
            raise TypeError(f"lengths given as a list must hold ints, got {lengths!r}")
        lengths = torch.tensor(lengths, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be an int64 tensor of shape (B,) = ({B},), got {type(lengths).__name__}")
    if lengths.dtype != torch.int64:
        raise TypeError(f"lengths must be an int64 tensor, got {lengths.dtype}")
    if _shape(lengths) != (B,):
        raise ValueError(f"lengths must have shape (B,) = ({B},), got {_shape(lengths)}")
    if lengths.device.type == "meta":
        raise RuntimeError("lengths must hold values, on the CPU (or the input's device), "
                           "got a tensor on the meta device")
    return lengths.cpu()


def check_length_values(lengths: Optional[torch.Tensor], T: int) -> None:
    """The op's lengths range check (csrc/rnnkern.cpp check_lengths), same words,
    for the reference, which calls no op."""
    if lengths is not None and lengths.numel() > 0 and not _compiling():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            raise ValueError(f"lengths must be in [0, T={T}], got min {lo} and max {hi}")


def check_rnn_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, *, nonlinearity,
                   batch_first, lengths, truncate):
    """Checks the arguments of rnnkern.functional.rnn / rnnkern.reference.rnn.

    Returns (lengths as an int64 CPU tensor or None, truncate as an int or None)."""
    check_nonlinearity(nonlinearity)
    check_bool("batch_first", batch_first)
    truncate = check_truncate(truncate)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    layout = "(B, T, I)" if batch_first else "(T, B, I)"
    if input.dim() != 3:
        raise ValueError(f"input must be 3-D {layout}, got shape {_shape(input)}")
    if input.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"input must be float32 or float64, got {input.dtype}")
    if batch_first:
        B, T, I = input.shape
    else:
        T, B, I = input.shape
    if not isinstance(weight_hh, torch.Tensor) or weight_hh.dim() != 2:
        got = _shape(weight_hh) if isinstance(weight_hh, torch.Tensor) else type(weight_hh).__name__
        raise ValueError(f"weight_hh must be a 2-D tensor (H, H), got {got}")
    H = weight_hh.shape[0]
    check_tensor("weight_hh", weight_hh, shape=(H, H), like=input, letters="(H, H)")
    if isinstance(weight_ih, torch.Tensor) and weight_ih.dim() == 2 and weight_ih.shape[0] == H \
            and weight_ih.shape[1] != I:
        raise ValueError(f"input has inconsistent input_size: got I={I}, expected {weight_ih.shape[1]} "
                         f"(weight_ih is {_shape(weight_ih)})")
    check_tensor("weight_ih", weight_ih, shape=(H, I), like=input, letters="(H, I)")
    if hx is not None:
        check_tensor("hx", hx, shape=(B, H), like=input, letters="(B, H)")
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            check_tensor(name, b, shape=(H,), like=input, letters="(H,)")
    return check_lengths(lengths, B, T), truncate


def _any_shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_gated_args(mode, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, *,
                      batch_first, lengths, truncate):
    """check_rnn_args for the LSTM and the GRU. Returns (lengths, truncate, H, P)."""
    lstm = mode == "lstm"
    truncate = check_truncate(truncate)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    layout = "(B, T, I)" if batch_first else "(T, B, I)"
    if input.dim() != 3:
        raise ValueError(f"input must be 3-D {layout}, got shape {_any_shape(input)}")
    if input.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"input must be float32 or float64, got {input.dtype}")
    B, T, I = input.shape if batch_first else (input.shape[1], input.shape[0], input.shape[2])

    gates, G = (4, "4H") if lstm else (3, "3H")
    hh_letters = f"({G}, P)" if lstm else f"({G}, H)"
    if not isinstance(weight_hh, torch.Tensor) or weight_hh.dim() != 2:
        raise ValueError(f"weight_hh must be a 2-D tensor {hh_letters}, got {_any_shape(weight_hh)}")
    if weight_hr is not None:
        if not lstm:
            raise ValueError(f"weight_hr (the projection) applies to mode='lstm' only, got mode={mode!r}")
        if not isinstance(weight_hr, torch.Tensor) or weight_hr.dim() != 2:
            raise ValueError(f"weight_hr must be a 2-D tensor (P, H), got {_any_shape(weight_hr)}")
        P, H = weight_hr.shape
        check_tensor("weight_hr", weight_hr, shape=(P, H), like=input, letters="(P, H)")
    else:
        H = P = weight_hh.shape[1]
    check_tensor("weight_hh", weight_hh, shape=(gates * H, P), like=input, letters=hh_letters)
    if isinstance(weight_ih, torch.Tensor) and weight_ih.dim() == 2 \
            and weight_ih.shape[0] == gates * H and weight_ih.shape[1] != I:
        raise ValueError(f"input has inconsistent input_size: got I={I}, expected {weight_ih.shape[1]} "
                         f"(weight_ih is {_any_shape(weight_ih)})")
    check_tensor("weight_ih", weight_ih, shape=(gates * H, I), like=input, letters=f"({G}, I)")
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            check_tensor(name, b, shape=(gates * H,), like=input, letters=f"({G},)")
    if hx is not None and lstm:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx must be a tuple (h_0, c_0) of shapes (B, P) = ({B}, {P}) and "
                            f"(B, H) = ({B}, {H}), or None, got {type(hx).__name__}")
        check_tensor("hx[0] (h_0)", hx[0], shape=(B, P), like=input, letters="(B, P)")
        check_tensor("hx[1] (c_0)", hx[1], shape=(B, H), like=input, letters="(B, H)")
    elif hx is not None:
        check_tensor("hx", hx, shape=(B, H), like=input, letters="(B, H)")
    return check_lengths(lengths, B, T), truncate, H, P


def check_layer_args(mode, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, *,
                      batch_first, lengths, truncate):
    """Checks one layer's arguments for any cell. Returns (lengths, truncate, H, P)."""
    if mode in ("lstm", "gru"):
        return check_gated_args(mode, input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                 weight_hr, batch_first=batch_first, lengths=lengths,
                                 truncate=truncate)
    lengths, truncate = check_rnn_args(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity=mode[len("rnn_"):],
        batch_first=batch_first, lengths=lengths, truncate=truncate)
    if weight_hr is not None:
        raise ValueError(f"weight_hr (the projection) applies to mode='lstm' only, got mode={mode!r}")
    H = weight_hh.shape[0]
    return lengths, truncate, H, H


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


def _names(options) -> str:
    return ", ".join(repr(o) for o in options)


def check_loss_options(*, loss, reduction, steps, ignore_index, label_smoothing) -> float:
    """The per-step loss's non-tensor options. Returns label_smoothing as a float."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {_names(LOSSES)}, got {loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {_names(REDUCTIONS)}, got {reduction!r}")
    if steps not in STEPS:
        raise ValueError(f"steps must be one of {_names(STEPS)}, got {steps!r}")
    check_int64("ignore_index", ignore_index)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r} "
                        f"({type(label_smoothing).__name__})")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing}")
    if loss == "mse" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to loss='cross_entropy' only, got {label_smoothing} "
                         "with loss='mse'")
    return float(label_smoothing)


def _no_grad_wanted(name: str, t: torch.Tensor) -> None:
    # The kernel treats targets and masks as data; a silent None gradient would be wrong.
    if torch.is_grad_enabled() and t.requires_grad:
        raise ValueError(f"{name} must not require grad: rnn_loss gives no gradient to {name} "
                         "(detach it)")


def check_loss_args(input, target, weight_out, bias_out, *, H, lengths, batch_first, loss,
                    loss_mask, steps, reduction, ignore_index, label_smoothing):
    """Checks the loss arguments of rnnkern.functional.rnn_loss / rnnkern.reference.rnn_loss,
    after check_rnn_args checked the layer's (so input is a 3-D float tensor and
    lengths an int64 CPU tensor or None). The values of target, loss_mask and
    lengths are the op's checks (check_loss_values for the reference).

    Returns (O, target, loss_mask, label_smoothing) with target and loss_mask
    time-major: target (T, B) or (T, B, O), loss_mask (T, B) or None."""
    label_smoothing = check_loss_options(loss=loss, reduction=reduction, steps=steps,
                                         ignore_index=ignore_index,
                                         label_smoothing=label_smoothing)
    if batch_first:
        B, T, _ = input.shape
    else:
        T, B, _ = input.shape
    steps_layout = ("(B, T)", (B, T)) if batch_first else ("(T, B)", (T, B))

    if not isinstance(weight_out, torch.Tensor) or weight_out.dim() != 2:
        got = _shape(weight_out) if isinstance(weight_out, torch.Tensor) else type(weight_out).__name__
        raise ValueError(f"weight_out must be a 2-D tensor (O, H) with H={H}, got {got}")
    O = weight_out.shape[0]
    if O < 1:
        raise ValueError(f"weight_out must have O >= 1 rows (outputs or classes), got {_shape(weight_out)}")
    check_tensor("weight_out", weight_out, shape=(O, H), like=input, letters="(O, H)")
    if bias_out is not None:
        check_tensor("bias_out", bias_out, shape=(O,), like=input, letters="(O,)")

    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise RuntimeError(f"target must be on the input's device {input.device}, got {target.device}")
    if loss == "cross_entropy":
        letters, shape = steps_layout
        if target.dtype != torch.int64:
            raise TypeError(f"target must be int64 class indices for loss='cross_entropy', got {target.dtype}")
        if _shape(target) != shape:
            raise ValueError(f"target must have shape {letters} = {shape} for loss='cross_entropy', "
                             f"got {_shape(target)}")
    else:
        letters = "(B, T, O)" if batch_first else "(T, B, O)"
        shape = (B, T, O) if batch_first else (T, B, O)
        if target.dtype != input.dtype:
            raise TypeError(f"target must have the input's dtype {input.dtype} for loss='mse', "
                            f"got {target.dtype}")
        if _shape(target) != shape:
            raise ValueError(f"target must have shape {letters} = {shape} for loss='mse', "
                             f"got {_shape(target)}")
        _no_grad_wanted("target", target)

    if loss_mask is not None:
        letters, shape = steps_layout
        if not isinstance(loss_mask, torch.Tensor):
            raise TypeError(f"loss_mask must be a bool or floating tensor of shape {letters} = {shape}, "
                            f"got {type(loss_mask).__name__}")
        if loss_mask.dtype != torch.bool and not loss_mask.dtype.is_floating_point:
            raise TypeError(f"loss_mask must be bool or floating, got {loss_mask.dtype}")
        if loss_mask.device != input.device:
            raise RuntimeError(f"loss_mask must be on the input's device {input.device}, "
                               f"got {loss_mask.device}")
        if _shape(loss_mask) != shape:
            raise ValueError(f"loss_mask must have shape {letters} = {shape}, got {_shape(loss_mask)}")
        _no_grad_wanted("loss_mask", loss_mask)

    def tm(t):
        return t.transpose(0, 1) if (batch_first and t is not None) else t

    return O, tm(target), tm(loss_mask), label_smoothing


def check_loss_values(target, loss_mask, lengths, *, O, loss, steps, ignore_index) -> None:
    """The op's data checks of the loss (csrc/rnnkern.cpp), same words, for the
    reference, which calls no op. target and loss_mask time-major: (T, B)."""
    if _compiling():
        return
    T, B = target.shape[:2]
    if loss == "cross_entropy" and target.numel() > 0:
        bad = (target != ignore_index) & ((target < 0) | (target >= O))
        if bool(bad.any()):
            t, b = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"target must hold class indices in [0, O={O}) or "
                             f"ignore_index={ignore_index}, got {int(target[t, b])} at [t={t}, b={b}]")
    if loss_mask is not None and loss_mask.dtype != torch.bool and loss_mask.numel() > 0:
        ok = (loss_mask >= 0) & loss_mask.isfinite()  # NaN or inf makes the loss NaN
        if not bool(ok.all()):
            raise ValueError(f"loss_mask must be finite and >= 0, got {float(loss_mask[~ok][0]):g}")
    if steps == "last" and B > 0:
        if lengths is None and T < 1:
            raise ValueError(f"steps='last' needs every sequence to have a last step: T must be >= 1, got {T}")
        if lengths is not None and int(lengths.min()) < 1:
            raise ValueError("steps='last' needs every sequence to have a last step: lengths must be "
                             f">= 1, got min {int(lengths.min())}")

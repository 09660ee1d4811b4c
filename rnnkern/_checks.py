"""Argument checks of the public API, shared by the kernels' wrappers and the
reference so both reject the same inputs with the same words.

Each check raises before any kernel runs and names the argument, what was
expected and what was given. The C++ ops check again (csrc/checks.h), since
they can be called directly; these checks speak the API's layout.
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
        raise ValueError(f"{name} must be on the input's device {like.device}, got {t.device}")
    if _shape(t) != tuple(shape):
        raise ValueError(f"{name} must have shape {letters} = {tuple(shape)}, got {_shape(t)}")


def check_nonlinearity(nonlinearity) -> str:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity


def check_truncate(truncate) -> Optional[int]:
    """None or an int >= 1 (bools are refused: truncate=True is a mistake)."""
    if truncate is None:
        return None
    if isinstance(truncate, bool) or not isinstance(truncate, int):
        raise TypeError(f"truncate must be an int >= 1 or None, got {truncate!r} ({type(truncate).__name__})")
    if truncate < 1:
        raise ValueError(f"truncate must be an int >= 1 or None, got {truncate}")
    return truncate


def check_lengths(lengths: LengthsLike, B: int, T: int) -> Optional[torch.Tensor]:
    """lengths: (B,) int64 with 0 <= len <= T, or a list of B ints. Returns an
    int64 CPU tensor (nn.RNN's packing also keeps lengths on the CPU)."""
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
            raise TypeError(f"lengths given as a list must hold ints, got {lengths!r}")
        lengths = torch.tensor(lengths, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be an int64 tensor of shape (B,) = ({B},), got {type(lengths).__name__}")
    if lengths.dtype != torch.int64:
        raise TypeError(f"lengths must be an int64 tensor, got dtype {lengths.dtype}")
    if _shape(lengths) != (B,):
        raise ValueError(f"lengths must have shape (B,) = ({B},), got {_shape(lengths)}")
    lengths = lengths.cpu()
    if not _compiling() and B > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            raise ValueError(f"lengths must be in [0, T={T}], got min {lo} and max {hi}")
    return lengths


def check_rnn_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, *, nonlinearity,
                   batch_first, lengths, truncate):
    """Checks the arguments of rnnkern.functional.rnn / rnnkern.reference.rnn.

    Returns (lengths as an int64 CPU tensor or None, truncate as an int or None)."""
    check_nonlinearity(nonlinearity)
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

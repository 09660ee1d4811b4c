"""Typed wrappers over ``torch.ops.rnnkern.*`` and a fake kernel for every op.

The schemas live in csrc/rnnkern.cpp. The fakes give shapes to torch.compile and
check them with ``torch._check`` only; the real checks are in csrc/checks.h.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)

__all__ = ["elman_fwd", "elman_bwd", "cpu_capability"]


def cpu_capability() -> str:
    """The instruction set (DEFAULT, AVX2 or AVX512) the CPU kernels run with."""
    return _C.cpu_capability()


def elman_fwd(
    input: torch.Tensor,  # [T,B,I]
    hx: torch.Tensor,  # [B,H]
    weight_ih: torch.Tensor,  # [H,I]
    weight_hh: torch.Tensor,  # [H,H]
    bias_ih: Optional[torch.Tensor],  # [H]
    bias_hh: Optional[torch.Tensor],  # [H]
    lengths: Optional[torch.Tensor],  # [B] int64, CPU
    nonlinearity: str,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # output [T,B,H], h_n [B,H]
    return torch.ops.rnnkern.elman_fwd.default(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, nonlinearity, reverse
    )


def elman_bwd(
    grad_output: torch.Tensor,  # [T,B,H]
    grad_h_n: torch.Tensor,  # [B,H]
    input: torch.Tensor,  # [T,B,I]
    hx: torch.Tensor,  # [B,H]
    weight_ih: torch.Tensor,  # [H,I]
    weight_hh: torch.Tensor,  # [H,H]
    output: torch.Tensor,  # [T,B,H]
    lengths: Optional[torch.Tensor],  # [B]
    nonlinearity: str,
    reverse: bool,
    truncate: int,  # 0: none
) -> tuple[torch.Tensor, ...]:  # grad_input, grad_hx, grad_weight_ih, grad_weight_hh, grad_bias
    return torch.ops.rnnkern.elman_bwd.default(
        grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, lengths,
        nonlinearity, reverse, truncate,
    )


@torch.library.register_fake("rnnkern::elman_fwd")
def _elman_fwd_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, nonlinearity, reverse):
    torch._check(input.dim() == 3, lambda: f"input must be 3-D [T, B, I], got {tuple(input.shape)}")
    T, B, _ = input.shape
    H = weight_hh.shape[0]
    torch._check(hx.shape == (B, H), lambda: f"hx must be [B, H] = {(B, H)}, got {tuple(hx.shape)}")
    return input.new_empty((T, B, H)), input.new_empty((B, H))


@torch.library.register_fake("rnnkern::elman_bwd")
def _elman_bwd_fake(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, lengths,
                    nonlinearity, reverse, truncate):
    torch._check(grad_output.shape == output.shape, lambda: "grad_output must match output")
    H = weight_hh.shape[0]
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        hx.new_empty(hx.shape),
        weight_ih.new_empty(weight_ih.shape),
        weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty((H,)),
    )

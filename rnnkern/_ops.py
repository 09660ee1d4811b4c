"""Typed wrappers over ``torch.ops.rnnkern.*`` and a fake kernel for every op.

The schemas live in csrc/rnnkern.cpp. The fakes give shapes to torch.compile and
check them with ``torch._check`` only; the real checks are in csrc/checks.h.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)

__all__ = ["elman_fwd", "elman_bwd", "elman_loss_fwd", "elman_loss_bwd", "cpu_capability"]


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
    grad_input: bool = True,  # False: grad_input comes back as [0], not computed
) -> tuple[torch.Tensor, ...]:  # grad_input, grad_hx, grad_weight_ih, grad_weight_hh, grad_bias
    return torch.ops.rnnkern.elman_bwd.default(
        grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, lengths,
        nonlinearity, reverse, truncate, grad_input,
    )


def elman_loss_fwd(
    input: torch.Tensor,  # [T,B,I]
    target: torch.Tensor,  # [T,B] int64 (cross_entropy) or [T,B,O] (mse)
    hx: torch.Tensor,  # [B,H]
    weight_ih: torch.Tensor,  # [H,I]
    weight_hh: torch.Tensor,  # [H,H]
    bias_ih: Optional[torch.Tensor],  # [H]
    bias_hh: Optional[torch.Tensor],  # [H]
    weight_out: torch.Tensor,  # [O,H]
    bias_out: Optional[torch.Tensor],  # [O]
    lengths: Optional[torch.Tensor],  # [B] int64, CPU
    loss_mask: Optional[torch.Tensor],  # [T,B] bool or floating
    nonlinearity: str,
    loss: str,  # 'cross_entropy' | 'mse'
    steps: str,  # 'all' | 'last'
    reduction: str,  # 'mean' | 'sum' | 'seq_mean' | 'seq_sum' | 'none'
    ignore_index: int,
    label_smoothing: float,
    compute_grad: bool,
    chunk_rows: int,  # 0: automatic
) -> tuple[torch.Tensor, ...]:
    """-> loss [] ([T,B] for 'none'), output [T,B,H], h_n [B,H], step_loss [T,B],
    weight [T,B], grad_output [T,B,H], grad_weight_out [O,H], grad_bias_out [O]
    (the last three [0] unless computed; see csrc/rnnkern.cpp)."""
    return torch.ops.rnnkern.elman_loss_fwd.default(
        input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out, bias_out,
        lengths, loss_mask, nonlinearity, loss, steps, reduction, ignore_index,
        float(label_smoothing), compute_grad, chunk_rows,
    )


def elman_loss_bwd(
    grad_loss: torch.Tensor,  # [] ([T,B] for 'none')
    grad_h_n: torch.Tensor,  # [B,H]
    input: torch.Tensor,  # [T,B,I]
    target: torch.Tensor,  # [T,B] or [T,B,O]
    hx: torch.Tensor,  # [B,H]
    weight_ih: torch.Tensor,  # [H,I]
    weight_hh: torch.Tensor,  # [H,H]
    weight_out: torch.Tensor,  # [O,H]
    bias_out: Optional[torch.Tensor],  # [O]
    lengths: Optional[torch.Tensor],  # [B]
    output: torch.Tensor,  # [T,B,H]
    weight: torch.Tensor,  # [T,B]
    grad_output: torch.Tensor,  # [T,B,H], or [0] for 'none'
    grad_weight_out: torch.Tensor,  # [O,H], or [0] for 'none'
    grad_bias_out: torch.Tensor,  # [O], or [0]
    nonlinearity: str,
    loss: str,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    truncate: int,  # 0: none
    want_grad_norm: bool,
    chunk_rows: int,
    grad_input: bool = True,  # False: grad_input comes back as [0], not computed
) -> tuple[torch.Tensor, ...]:
    """-> grad_input, grad_hx, grad_weight_ih, grad_weight_hh, grad_bias,
    grad_weight_out, grad_bias_out, grad_norm [T,B] (or [0])."""
    return torch.ops.rnnkern.elman_loss_bwd.default(
        grad_loss, grad_h_n, input, target, hx, weight_ih, weight_hh, weight_out, bias_out,
        lengths, output, weight, grad_output, grad_weight_out, grad_bias_out, nonlinearity, loss,
        reduction, ignore_index, float(label_smoothing), truncate, want_grad_norm, chunk_rows,
        grad_input,
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
                    nonlinearity, reverse, truncate, grad_input=True):
    torch._check(grad_output.shape == output.shape, lambda: "grad_output must match output")
    return _layer_grads_fake(input, hx, weight_ih, weight_hh, grad_input)


def _layer_grads_fake(input, hx, weight_ih, weight_hh, grad_input):
    """grad_input ([0] when not wanted), grad_hx, grad_weight_ih, grad_weight_hh,
    grad_bias: what both backward ops return for the layer."""
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if grad_input
        else input.new_empty((0,)),
        hx.new_empty(hx.shape),
        weight_ih.new_empty(weight_ih.shape),
        weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty((weight_hh.shape[0],)),
    )


@torch.library.register_fake("rnnkern::elman_loss_fwd")
def _elman_loss_fwd_fake(input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out,
                         bias_out, lengths, loss_mask, nonlinearity, loss, steps, reduction,
                         ignore_index, label_smoothing, compute_grad, chunk_rows):
    torch._check(input.dim() == 3, lambda: f"input must be 3-D [T, B, I], got {tuple(input.shape)}")
    T, B, _ = input.shape
    H = weight_hh.shape[0]
    O = weight_out.shape[0]
    torch._check(weight_out.shape == (O, H), lambda: f"weight_out must be [O, H], got {tuple(weight_out.shape)}")
    scalar = reduction != "none"
    grads = compute_grad and scalar
    return (
        input.new_empty(() if scalar else (T, B)),
        input.new_empty((T, B, H)),
        input.new_empty((B, H)),
        input.new_empty((T, B)),
        input.new_empty((T, B)),
        input.new_empty((T, B, H) if grads else (0,)),
        input.new_empty((O, H) if grads else (0,)),
        input.new_empty((O,) if grads and bias_out is not None else (0,)),
    )


@torch.library.register_fake("rnnkern::elman_loss_bwd")
def _elman_loss_bwd_fake(grad_loss, grad_h_n, input, target, hx, weight_ih, weight_hh, weight_out,
                         bias_out, lengths, output, weight, grad_output, grad_weight_out,
                         grad_bias_out, nonlinearity, loss, reduction, ignore_index,
                         label_smoothing, truncate, want_grad_norm, chunk_rows, grad_input=True):
    torch._check(output.dim() == 3, lambda: f"output must be 3-D [T, B, H], got {tuple(output.shape)}")
    T, B, H = output.shape
    O = weight_out.shape[0]
    return (
        *_layer_grads_fake(input, hx, weight_ih, weight_hh, grad_input),
        weight_out.new_empty((O, H)),
        weight_out.new_empty((O,) if bias_out is not None else (0,)),
        output.new_empty((T, B) if want_grad_norm else (0,)),
    )

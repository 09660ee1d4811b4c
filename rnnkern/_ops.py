"""Typed wrappers over ``torch.ops.rnnkern.*`` and a fake kernel for every op.

The schemas live in csrc/rnnkern.cpp. The fakes give shapes to torch.compile and
check them with ``torch._check`` only; the real checks are in csrc/checks.h.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)

__all__ = ["elman_fwd", "elman_bwd", "elman_loss_fwd", "elman_loss_bwd", "layer_fwd", "layer_bwd",
           "head_loss_fwd", "head_loss_bwd", "cpu_capability", "gemm_backend", "empty_cache", "cache_info"]


def cpu_capability() -> str:
    """The instruction set (DEFAULT, AVX2 or AVX512) the CPU kernels run with."""
    return _C.cpu_capability()


def gemm_backend() -> str:
    """Who runs the CPU kernels' products over all rows (the input projection,
    the head, dW_ih, dW_hh, dW_out): 'rnnkern' (its own register tiles) or
    'blas' (MKL through ATen) for all of them, or, where the two rank
    differently by kind, the choice per kind, e.g.
    'xw=rnnkern,atb=rnnkern,large=blas'. The kinds: 'xw', products x W whose
    W [K,N] holds at most 65536 elements; 'atb', weight gradients a^T b whose
    output holds at most 65536; 'large', the larger ones of both (the gated
    cells' projections at H = 512, a loss head over many classes). Narrow
    products (a side below 16) run on the tiles either way.

    ``RNNKERN_GEMM=blas`` or ``=rnnkern`` sets every kind. By default
    (``auto``) a probe (about 0.5 s on a 2-core Zen 4), at the first product
    that needs the choice (or at this call), times both on products of each
    kind and takes the tiles for a kind where they are faster by its margin
    (5% for 'xw' and 'atb', 25% for 'large'). Its verdict is stored, and
    later processes on the same CPU and build (at any thread count) read it
    instead of probing, so that they all compute the same bits. The file lies
    in ``$RNNKERN_CACHE_DIR`` (else ``$XDG_CACHE_HOME/rnnkern``, else
    ``~/.cache/rnnkern``); ``RNNKERN_CACHE_DIR=`` (empty) probes in every
    process. Raises ValueError when RNNKERN_GEMM is not auto, blas or
    rnnkern."""
    _, _, kinds = _C.gemm_backend()
    names = {who for _, who, _, _ in kinds}
    if len(names) == 1:
        return names.pop()
    return ",".join(f"{kind}={who}" for kind, who, _, _ in kinds)


def empty_cache() -> None:
    """Frees the CPU buffers rnnkern keeps for reuse (as torch.cuda.empty_cache
    does for torch's GPU allocator).

    The CPU kernels take each per-call buffer of 4 MB or more (the saved
    gates, the outputs, the step gradients of a large layer, the loss head's
    logits chunk and gradients) from a cache:
    when the tensor dies its block is kept, and the next call of the same or
    a slightly smaller size reuses it instead of page-faulting fresh memory
    in (glibc maps and unmaps every block past 32 MB). The cache holds at
    most ``RNNKERN_HOST_CACHE_MB`` megabytes of free blocks (read at the first
    such buffer; default 1024, 0 turns caching off) and frees the oldest
    beyond that. Blocks that tensors still hold are not affected."""
    _C.empty_cache()


def cache_info() -> dict:
    """The CPU buffer cache (see empty_cache): ``cached_bytes`` (free blocks
    kept), ``in_use_bytes`` (blocks tensors hold), ``limit_bytes`` (the cap
    on cached_bytes), ``hits`` and ``misses`` (allocations served from a kept
    block, or from the OS). Raises ValueError if RNNKERN_HOST_CACHE_MB is not
    a whole number >= 0."""
    cached, in_use, limit, hits, misses = _C.host_cache_info()
    return dict(cached_bytes=cached, in_use_bytes=in_use, limit_bytes=limit, hits=hits,
                misses=misses)


def gemm_backend_line() -> str:
    """gemm_backend() and why, for the bench's header."""
    source, cache, kinds = _C.gemm_backend()

    def who(name: str) -> str:
        return "rnnkern's tiles" if name == "rnnkern" else "BLAS"

    if source == "RNNKERN_GEMM":
        return f"products on {who(kinds[0][1])} (RNNKERN_GEMM={kinds[0][1]})"
    if source == "capability":
        return "products on BLAS (no vector unit)"

    stored = (f"read from {cache}" if source == "cache" else
              f"stored in {cache}" if cache else "not stored")
    each = ", ".join(f"{kind} on {who(name)} ({tiles_s * 1e3:.2f} ms on the tiles vs "
                     f"{blas_s * 1e3:.2f} ms on BLAS)" for kind, name, tiles_s, blas_s in kinds)
    return f"products by the probe: {each}, {stored}"


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
    truncate: int = 0,  # for the registered backward; 0: none
) -> tuple[torch.Tensor, torch.Tensor]:  # output [T,B,H], h_n [B,H]
    return torch.ops.rnnkern.elman_fwd.default(
        input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, nonlinearity, reverse,
        truncate,
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
    truncate: int = 0,  # for the registered backward; 0: none
) -> tuple[torch.Tensor, ...]:
    """-> loss [] ([T,B] for 'none'), output [T,B,H], h_n [B,H], step_loss [T,B],
    weight [T,B], grad_output [T,B,H], grad_weight_out [O,H], grad_bias_out [O]
    (the last three [0] unless computed; see csrc/rnnkern.cpp)."""
    return torch.ops.rnnkern.elman_loss_fwd.default(
        input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out, bias_out,
        lengths, loss_mask, nonlinearity, loss, steps, reduction, ignore_index,
        float(label_smoothing), compute_grad, chunk_rows, truncate,
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


def _same_device(op: str, input, lengths=None, **tensors) -> None:
    """The ops' device checks (csrc/rnnkern.cpp), same words, in the fakes: a
    meta tensor among CPU ones sends the call to the fake, which must refuse
    it as the real kernel would."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{op}: {name} must be on the input's device {input.device}, "
                               f"got {t.device}")
    if lengths is not None and lengths.device.type != "cpu" and lengths.device != input.device:
        raise RuntimeError(f"{op}: lengths must be on the CPU or on the input's device "
                           f"{input.device}, got {lengths.device}")


@torch.library.register_fake("rnnkern::elman_fwd")
def _elman_fwd_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, nonlinearity, reverse,
                    truncate=0):
    _same_device("rnnkern.elman_fwd", input, lengths, hx=hx, weight_ih=weight_ih,
                 weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh)
    torch._check(input.dim() == 3, lambda: f"input must be 3-D (T, B, I), got shape {tuple(input.shape)}")
    T, B, _ = input.shape
    H = weight_hh.shape[0]
    torch._check(hx.shape == (B, H), lambda: f"hx must have shape (B, H) = {(B, H)}, got {tuple(hx.shape)}")
    return input.new_empty((T, B, H)), input.new_empty((B, H))


@torch.library.register_fake("rnnkern::elman_bwd")
def _elman_bwd_fake(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, lengths,
                    nonlinearity, reverse, truncate, grad_input=True):
    _same_device("rnnkern.elman_bwd", input, lengths, grad_output=grad_output, grad_h_n=grad_h_n,
                 hx=hx, weight_ih=weight_ih, weight_hh=weight_hh, output=output)
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
                         ignore_index, label_smoothing, compute_grad, chunk_rows, truncate=0):
    _same_device("rnnkern.elman_loss_fwd", input, lengths, target=target, hx=hx,
                 weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
                 weight_out=weight_out, bias_out=bias_out, loss_mask=loss_mask)
    torch._check(input.dim() == 3, lambda: f"input must be 3-D (T, B, I), got shape {tuple(input.shape)}")
    T, B, _ = input.shape
    H = weight_hh.shape[0]
    O = weight_out.shape[0]
    torch._check(weight_out.shape == (O, H), lambda: f"weight_out must have shape (O, H) = {(O, H)}, got {tuple(weight_out.shape)}")
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
    _same_device("rnnkern.elman_loss_bwd", input, lengths, grad_loss=grad_loss, grad_h_n=grad_h_n,
                 target=target, hx=hx, weight_ih=weight_ih, weight_hh=weight_hh,
                 weight_out=weight_out, output=output)
    torch._check(output.dim() == 3, lambda: f"output must be 3-D (T, B, H), got shape {tuple(output.shape)}")
    T, B, H = output.shape
    O = weight_out.shape[0]
    return (
        *_layer_grads_fake(input, hx, weight_ih, weight_hh, grad_input),
        weight_out.new_empty((O, H)),
        weight_out.new_empty((O,) if bias_out is not None else (0,)),
        output.new_empty((T, B) if want_grad_norm else (0,)),
    )


# ---------------------------------------------------------------------------
# Autograd of the Python Functions in rnnkern/functional.py (torch.func's
# transforms, Dynamo, rnn_loss's grad_norm). The ops' own autograd, which
# eager calls, torch.export graphs and direct op calls meet, is the C++ one in
# csrc/autograd.cpp; the two compute the same thing. Backward is one fused
# kernel call with no derivative of its own.
# ---------------------------------------------------------------------------


class _NoDoubleBackward(torch.autograd.Function):
    """The first-order gradients (cloned), attached to the tensors they were
    computed from so that create_graph=True works; differentiating them again
    raises, since the fused backward has no derivative of its own."""

    generate_vmap_rule = True  # jacrev and vmap(grad) run backward under vmap

    @staticmethod
    def forward(name, n, *tensors):
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"rnnkern: double backward through {ctx.name} is not supported: its backward is a "
            "fused kernel without a derivative of its own. Use rnnkern.reference for "
            "higher-order gradients.")


def _first_order(name: str, grads: tuple, anchors: tuple) -> tuple:
    """grads linked to their anchors through _NoDoubleBackward when backward
    runs with grad mode on (create_graph=True, and always under torch.func's
    grad transforms, which run backward that way so that they can nest): a
    second derivative then raises instead of reading the fused backward's
    outputs as constants (torch.func's grad(grad(f)) got zeros)."""
    if not torch.is_grad_enabled():
        return grads
    present = [g for g in grads if g is not None]
    linked = iter(_NoDoubleBackward.apply(name, len(present), *present,
                                          *(a for a in anchors if a is not None)))
    return tuple(next(linked) if g is not None else None for g in grads)


def _saved_output(output: torch.Tensor) -> torch.Tensor:
    """The layer's output as backward is to read it. Under torch.compile a
    copy: Dynamo's traced Functions do not check saved tensors' versions, so
    an in-place change of the output before backward (`out.relu_()`, `out +=
    x`, which nn.RNN and nn.GRU allow) would reach backward unnoticed and give
    wrong gradients. Eager autograd checks the version (and the ops' C++
    autograd, csrc/autograd.cpp, recomputes the output in that case)."""
    return output.clone() if torch.compiler.is_compiling() else output


def elman_fwd_setup(ctx, inputs, output):
    input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, nonlinearity, reverse, *rest = inputs
    # Backward needs h at every step (act' is derived from it) and nothing else
    # of the forward pass.
    ctx.save_for_backward(input, hx, weight_ih, weight_hh, _saved_output(output[0]), lengths)
    ctx.config = (nonlinearity, reverse, rest[0] if rest else 0, bias_ih is not None,
                  bias_hh is not None)


def _zeros_for(grad, like):
    """An output's gradient as the op takes it: zeros where autograd passed
    None (an unused output, when the Function does not materialise grads)."""
    return torch.zeros_like(like) if grad is None else grad


def _loss_grad(grad_loss, weight, reduction):
    """The loss's gradient, zeros where it was not used (None): [] or, for
    reduction 'none', [T,B] like the loss weights."""
    if grad_loss is not None:
        return grad_loss
    return weight.new_zeros(weight.shape if reduction == "none" else ())


def elman_fwd_backward(ctx, grad_output, grad_h_n):
    input, hx, weight_ih, weight_hh, output, lengths = ctx.saved_tensors
    grad_output, grad_h_n = _zeros_for(grad_output, output), _zeros_for(grad_h_n, hx)
    nonlinearity, reverse, truncate, has_b_ih, has_b_hh = ctx.config
    want_in = ctx.needs_input_grad[0]
    g_in, g_hx, g_w_ih, g_w_hh, g_b = elman_bwd(
        grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output, lengths, nonlinearity,
        reverse, truncate, want_in)
    grads = _first_order("rnnkern.functional.rnn", (g_in if want_in else None, g_hx, g_w_ih,
                                                     g_w_hh, g_b), (input, hx, weight_ih, weight_hh))
    g_in, g_hx, g_w_ih, g_w_hh, g_b = grads
    return (g_in, g_hx, g_w_ih, g_w_hh, g_b if has_b_ih else None, g_b if has_b_hh else None,
            None, None, None, None)


def elman_loss_setup(ctx, inputs, output):
    """Saves what elman_loss_backward needs (shared by the registered autograd
    and rnnkern.functional's grad_norm path)."""
    (input, target, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_out, bias_out, lengths,
     _loss_mask, nonlinearity, loss, _steps, reduction, ignore_index, label_smoothing,
     _compute_grad, chunk_rows, *rest) = inputs
    _value, out, _h_n, _step_loss, weight, g_out, g_w_out, g_b_out = output
    # h at every step for BPTT, the weights, and for a scalar reduction the
    # head's gradients if the forward sweep computed them ([0] otherwise: the
    # backward then runs the sweep again).
    ctx.save_for_backward(input, target, hx, weight_ih, weight_hh, weight_out, bias_out,
                          lengths, out, weight, g_out, g_w_out, g_b_out)
    ctx.loss_config = (nonlinearity, loss, reduction, ignore_index, label_smoothing,
                       rest[0] if rest else 0, chunk_rows)
    ctx.has_bias = (bias_ih is not None, bias_hh is not None, bias_out is not None)


def elman_loss_backward(ctx, grad_loss, grad_h_n, want_input: bool, want_grad_norm: bool):
    """The gradients of elman_loss_fwd's tensor inputs (the input's only with
    want_input), and grad_norm [T,B] or None."""
    (input, target, hx, weight_ih, weight_hh, weight_out, bias_out, lengths, output, weight,
     g_out, g_w_out, g_b_out) = ctx.saved_tensors
    nonlinearity, loss, reduction, ignore_index, label_smoothing, truncate, chunk_rows = \
        ctx.loss_config
    grad_loss, grad_h_n = _loss_grad(grad_loss, weight, reduction), _zeros_for(grad_h_n, hx)
    has_b_ih, has_b_hh, has_b_out = ctx.has_bias
    want_in = want_input
    g_in, g_hx, g_w_ih, g_w_hh, g_b, g_w_out, g_b_out, grad_norm = elman_loss_bwd(
        grad_loss, grad_h_n, input, target, hx, weight_ih, weight_hh, weight_out, bias_out,
        lengths, output, weight, g_out, g_w_out, g_b_out, nonlinearity, loss, reduction,
        ignore_index, label_smoothing, truncate, want_grad_norm, chunk_rows, want_in)
    g_in, g_hx, g_w_ih, g_w_hh, g_b, g_w_out, g_b_out = _first_order(
        "rnnkern.functional.rnn_loss",
        (g_in if want_in else None, g_hx, g_w_ih, g_w_hh, g_b, g_w_out,
         g_b_out if has_b_out else None),
        (input, hx, weight_ih, weight_hh, weight_out, bias_out))
    grads = (g_in, None, g_hx, g_w_ih, g_w_hh, g_b if has_b_ih else None,
             g_b if has_b_hh else None, g_w_out, g_b_out, None, None)
    return grads, (grad_norm if want_grad_norm else None)


def no_forward_ad(name: str):
    """The jvp of rnnkern's autograd.Functions: refuse, naming what works."""
    raise RuntimeError(
        f"rnnkern: forward-mode AD through {name} (torch.func.jvp, torch.func.jacfwd, "
        "torch.autograd.forward_ad) is not supported: the kernels have a fused reverse-mode "
        "backward only. Use reverse mode (backward, torch.func.grad, vjp, jacrev; vmap works "
        "too), or rnnkern.reference for forward mode.")


# ---------------------------------------------------------------------------
# Gated layers (LSTM, GRU): layer_fwd / layer_bwd
# ---------------------------------------------------------------------------


def layer_fwd(
    input: torch.Tensor,  # [T,B,I]
    h0: torch.Tensor,  # [B,P]
    c0: Optional[torch.Tensor],  # [B,H] LSTM, None for GRU
    weight_ih: torch.Tensor,  # [G,I]
    weight_hh: torch.Tensor,  # [G,P]
    bias_ih: Optional[torch.Tensor],  # [G]
    bias_hh: Optional[torch.Tensor],  # [G]
    weight_hr: Optional[torch.Tensor],  # [P,H] LSTM projection
    lengths: Optional[torch.Tensor],  # [B] int64, CPU
    mode: str,  # 'lstm' | 'gru'
    reverse: bool,
    truncate: int = 0,  # for the registered backward; 0: none
    train: bool = True,  # False: no backward will run (no state is saved)
) -> tuple[torch.Tensor, ...]:
    """-> output [T,B,P], h_n [B,P], c_n [B,H] ([0] for GRU), gates [T,B,4H],
    cell [T,B,H] ([0] for GRU), proj_in [T,B,H] ([0] without projection); the
    last three [0] with train=False."""
    return torch.ops.rnnkern.layer_fwd.default(
        input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, mode, reverse,
        truncate, train)


def layer_bwd(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
              output, gates, cell, proj_in, lengths, mode, reverse, truncate, grad_input=True,
              want_grad_norm=False):
    """-> grad_input ([0] unless grad_input), grad_h0, grad_c0 ([0] for GRU),
    grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_weight_hr
    ([0] without projection), grad_norm [T,B] ||dL/dh_t|| ([0] unless
    want_grad_norm); shapes as layer_fwd's arguments."""
    return torch.ops.rnnkern.layer_bwd.default(
        grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr, output,
        gates, cell, proj_in, lengths, mode, reverse, truncate, grad_input, want_grad_norm)


@torch.library.register_fake("rnnkern::layer_fwd")
def _layer_fwd_fake(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
                    mode, reverse, truncate=0, train=True):
    _same_device("rnnkern.layer_fwd", input, lengths, h0=h0, c0=c0, weight_ih=weight_ih,
                 weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh, weight_hr=weight_hr)
    torch._check(input.dim() == 3, lambda: f"input must be 3-D (T, B, I), got shape {tuple(input.shape)}")
    T, B, _ = input.shape
    lstm = mode == "lstm"
    H = weight_hh.shape[0] // (4 if lstm else 3)
    P = weight_hh.shape[1]
    torch._check(h0.shape == (B, P), lambda: f"h0 must have shape (B, P) = {(B, P)}, got {tuple(h0.shape)}")
    proj = weight_hr is not None
    return (input.new_empty((T, B, P)), input.new_empty((B, P)),
            input.new_empty((B, H) if lstm else (0,)),
            input.new_empty((T, B, 4 * H) if train else (0,)),
            input.new_empty((T, B, H) if lstm and train else (0,)),
            input.new_empty((T, B, H) if proj and train else (0,)))


@torch.library.register_fake("rnnkern::layer_bwd")
def _layer_bwd_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh,
                    weight_hr, output, gates, cell, proj_in, lengths, mode, reverse, truncate,
                    grad_input=True, want_grad_norm=False):
    _same_device("rnnkern.layer_bwd", input, lengths, grad_output=grad_output, grad_h_n=grad_h_n,
                 grad_c_n=grad_c_n, h0=h0, c0=c0, weight_ih=weight_ih, weight_hh=weight_hh,
                 weight_hr=weight_hr, output=output)
    torch._check(grad_output.shape == output.shape, lambda: "grad_output must match output")
    G = weight_hh.shape[0]
    return (torch.empty_like(input, memory_format=torch.contiguous_format) if grad_input
            else input.new_empty((0,)),
            h0.new_empty(h0.shape),
            c0.new_empty(c0.shape) if c0 is not None else input.new_empty((0,)),
            weight_ih.new_empty(weight_ih.shape), weight_hh.new_empty(weight_hh.shape),
            weight_hh.new_empty((G,)), weight_hh.new_empty((G,)),
            weight_hr.new_empty(weight_hr.shape) if weight_hr is not None
            else input.new_empty((0,)),
            output.new_empty(output.shape[:2] if want_grad_norm else (0,)))


def layer_fwd_setup(ctx, inputs, output):
    (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, mode, reverse,
     *rest) = inputs
    out, _h_n, _c_n, gates, cell, proj_in = output
    ctx.save_for_backward(input, h0, c0, weight_ih, weight_hh, weight_hr, _saved_output(out),
                          gates, cell, proj_in, lengths)
    ctx.config = (mode, reverse, rest[0] if rest else 0, bias_ih is not None,
                  bias_hh is not None)
    # gates, cell and proj_in are backward's saved state, not results
    ctx.mark_non_differentiable(gates, cell, proj_in)


def layer_fwd_backward(ctx, grad_output, grad_h_n, grad_c_n, *, want_input, grad_norm):
    """The gradients of layer_fwd's inputs (the input's only with want_input);
    with grad_norm (a [T,B] tensor), ||dL/dh_t|| is written into it too."""
    (input, h0, c0, weight_ih, weight_hh, weight_hr, out, gates, cell, proj_in,
     lengths) = ctx.saved_tensors
    mode, reverse, truncate, has_b_ih, has_b_hh = ctx.config
    want_in = want_input
    grad_output, grad_h_n = _zeros_for(grad_output, out), _zeros_for(grad_h_n, h0)
    if c0 is not None:
        grad_c_n = _zeros_for(grad_c_n, c0)
    g_in, g_h0, g_c0, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr, norms = layer_bwd(
        grad_output, grad_h_n, grad_c_n if c0 is not None else None, input, h0, c0, weight_ih,
        weight_hh, weight_hr, out, gates, cell, proj_in, lengths, mode, reverse, truncate,
        want_in, grad_norm is not None)
    if grad_norm is not None:
        grad_norm.copy_(norms)
    g_in, g_h0, g_c0, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr = _first_order(
        f"rnnkern.functional.{mode}",
        (g_in if want_in else None, g_h0, g_c0 if c0 is not None else None, g_w_ih, g_w_hh,
         g_b_ih, g_b_hh, g_w_hr if weight_hr is not None else None),
        (input, h0, c0, weight_ih, weight_hh, weight_hr))
    return (g_in, g_h0, g_c0, g_w_ih, g_w_hh, g_b_ih if has_b_ih else None,
            g_b_hh if has_b_hh else None, g_w_hr, None, None, None, None, None)


# ---------------------------------------------------------------------------
# The per-step loss head on any cell's hidden states: head_loss_fwd / _bwd
# ---------------------------------------------------------------------------


def head_loss_fwd(h, target, weight_out, bias_out, lengths, loss_mask, loss, steps, reduction,
                  ignore_index, label_smoothing, compute_grad, chunk_rows):
    """h [T,B,P] -> loss [] ([T,B] for 'none'), step_loss [T,B], weight [T,B],
    grad_h [T,B,P], grad_weight_out [O,P], grad_bias_out [O] (the last three [0]
    unless computed; see csrc/rnnkern.cpp)."""
    return torch.ops.rnnkern.head_loss_fwd.default(
        h, target, weight_out, bias_out, lengths, loss_mask, loss, steps, reduction, ignore_index,
        float(label_smoothing), compute_grad, chunk_rows)


def head_loss_bwd(grad_loss, h, target, weight_out, bias_out, lengths, weight, grad_h,
                  grad_weight_out, grad_bias_out, loss, reduction, ignore_index, label_smoothing,
                  chunk_rows):
    """-> grad_h [T,B,P], grad_weight_out [O,P], grad_bias_out [O] ([0] without bias)."""
    return torch.ops.rnnkern.head_loss_bwd.default(
        grad_loss, h, target, weight_out, bias_out, lengths, weight, grad_h, grad_weight_out,
        grad_bias_out, loss, reduction, ignore_index, float(label_smoothing), chunk_rows)


@torch.library.register_fake("rnnkern::head_loss_fwd")
def _head_loss_fwd_fake(h, target, weight_out, bias_out, lengths, loss_mask, loss, steps,
                        reduction, ignore_index, label_smoothing, compute_grad, chunk_rows):
    _same_device("rnnkern.head_loss_fwd", h, lengths, target=target, weight_out=weight_out,
                 bias_out=bias_out, loss_mask=loss_mask)
    torch._check(h.dim() == 3, lambda: f"h must be 3-D (T, B, P), got shape {tuple(h.shape)}")
    T, B, P = h.shape
    O = weight_out.shape[0]
    scalar = reduction != "none"
    grads = compute_grad and scalar
    return (h.new_empty(() if scalar else (T, B)), h.new_empty((T, B)), h.new_empty((T, B)),
            h.new_empty((T, B, P) if grads else (0,)), h.new_empty((O, P) if grads else (0,)),
            h.new_empty((O,) if grads and bias_out is not None else (0,)))


@torch.library.register_fake("rnnkern::head_loss_check")
def _head_loss_check_fake(input, P, target, weight_out, bias_out, lengths, loss_mask, loss, steps,
                          reduction, ignore_index, label_smoothing):
    _same_device("rnnkern.head_loss_fwd", input, lengths, target=target, weight_out=weight_out,
                 bias_out=bias_out, loss_mask=loss_mask)
    return None  # the checks read values; traced programs have the fakes' shape checks


@torch.library.register_fake("rnnkern::head_loss_bwd")
def _head_loss_bwd_fake(grad_loss, h, target, weight_out, bias_out, lengths, weight, grad_h,
                        grad_weight_out, grad_bias_out, loss, reduction, ignore_index,
                        label_smoothing, chunk_rows):
    O, P = weight_out.shape
    return (h.new_empty(h.shape), h.new_empty((O, P)),
            h.new_empty((O,) if bias_out is not None else (0,)))


def head_loss_setup(ctx, inputs, output):
    (h, target, weight_out, bias_out, lengths, _mask, loss, _steps, reduction, ignore_index,
     label_smoothing, _compute_grad, chunk_rows) = inputs
    _value, _step_loss, weight, g_h, g_w_out, g_b_out = output
    ctx.save_for_backward(h, target, weight_out, bias_out, lengths, weight, g_h, g_w_out,
                          g_b_out)
    ctx.head_config = (loss, reduction, ignore_index, label_smoothing, chunk_rows)
    ctx.mark_non_differentiable(*output[1:])


def head_loss_backward(ctx, grad_loss, *_rest):
    h, target, weight_out, bias_out, lengths, weight, g_h, g_w_out, g_b_out = ctx.saved_tensors
    loss, reduction, ignore_index, label_smoothing, chunk_rows = ctx.head_config
    grad_loss = _loss_grad(grad_loss, weight, reduction)
    g_h, g_w_out, g_b_out = head_loss_bwd(grad_loss, h, target, weight_out, bias_out, lengths,
                                          weight, g_h, g_w_out, g_b_out, loss, reduction,
                                          ignore_index, label_smoothing, chunk_rows)
    g_h, g_w_out, g_b_out = _first_order(
        "rnnkern.functional.rnn_loss", (g_h, g_w_out, g_b_out if bias_out is not None else None),
        (h, weight_out, bias_out))
    return (g_h, None, g_w_out, g_b_out, *([None] * 9))


"""Shared test helpers: random inputs, error measures, nn.RNN with given weights."""

from __future__ import annotations

import itertools

import torch

from rnnkern import functional, reference

# Relative error bounds, as max|a-b| / max|b| over a tensor.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def product(**axes):
    """itertools.product over named axes, as dicts (for pytest.mark.parametrize)."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    return err / scale if scale > 0 else err


def assert_close(a, b, tol, what=""):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def relu_kinks_differ(out_a: torch.Tensor, out_b: torch.Tensor) -> bool:
    """True where two relu runs disagree on which units are active (h > 0).

    relu' jumps from 0 to 1 at z = 0, so when float32 rounding puts one
    pre-activation on different sides of 0 in two implementations, their
    gradients differ by O(1) there although both are right. Tests in float32
    redraw such inputs (a handful of times at most) instead of loosening tolerances;
    the outputs are still compared on every draw."""
    return bool(((out_a > 0) != (out_b > 0)).any())


def make_layer(T, B, I, H, *, dtype=torch.float64, bias=True, hx=True, seed=None,
               batch_first=False, scale=1.0):
    """Fresh random inputs of one layer, all requiring grad. Returns a dict."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, dtype=dtype, generator=g) * s).requires_grad_()

    k = 1.0 / H**0.5
    x_shape = (B, T, I) if batch_first else (T, B, I)
    return dict(
        input=rnd(*x_shape),
        hx=rnd(B, H) if hx else None,
        weight_ih=rnd(H, I, s=k * scale),
        weight_hh=rnd(H, H, s=k * scale),
        bias_ih=rnd(H, s=k) if bias else None,
        bias_hh=rnd(H, s=k) if bias else None,
    )


def random_lengths(B, T, *, low=0, g=None):
    return torch.randint(low, T + 1, (B,), generator=g)


def grads_of(outputs, inputs, seed=0):
    """Gradients of a random linear functional of `outputs` w.r.t. the tensors in
    `inputs` that require grad (None where not)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def nn_rnn_like(layer, nonlinearity, batch_first, bidirectional=False, reverse_layer=None):
    """A torch.nn.RNN holding `layer`'s weights (and `reverse_layer`'s as _reverse)."""
    w_ih = layer["weight_ih"]
    H, I = w_ih.shape
    bias = layer["bias_ih"] is not None
    m = torch.nn.RNN(I, H, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
                     bidirectional=bidirectional, dtype=w_ih.dtype)
    with torch.no_grad():
        for suffix, src in (("", layer), ("_reverse", reverse_layer)):
            if src is None:
                continue
            getattr(m, f"weight_ih_l0{suffix}").copy_(src["weight_ih"])
            getattr(m, f"weight_hh_l0{suffix}").copy_(src["weight_hh"])
            if bias:
                getattr(m, f"bias_ih_l0{suffix}").copy_(src["bias_ih"])
                getattr(m, f"bias_hh_l0{suffix}").copy_(src["bias_hh"])
    return m


class TruncatedProbe(torch.autograd.Function):
    """gradcheck for truncated BPTT. With truncate=K the kernel's gradient is the
    Jacobian of the function in which each state crossing a K-step boundary is
    a constant. This Function's forward is exactly that function: the reference
    with the boundary states frozen at their values at the first (unperturbed)
    call; its backward is the kernel's.

    ``call(impl, tensors, cut)`` runs impl (functional or reference) on the
    tensors and returns a tuple of differentiable outputs; ``cut`` is None for
    the kernel and the reference's ``_cut`` hook otherwise. Set
    ``TruncatedProbe.frozen = None`` before each gradcheck."""

    frozen = None

    @staticmethod
    def forward(ctx, call, *tensors):
        boundary = []
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in tensors]
            outs_k = call(functional, leaves, None)
            # record the states at each cut of this (unperturbed) point
            call(reference, [t.detach() for t in tensors], lambda s, h: boundary.append(h) or h)
        ctx.graph = (leaves, outs_k)
        # gradcheck perturbs inputs and calls forward again: a fresh ctx, so the
        # boundary states come from TruncatedProbe.frozen, set on the first call
        if TruncatedProbe.frozen is None:
            TruncatedProbe.frozen = boundary
        it = iter(TruncatedProbe.frozen)
        outs = call(reference, [t.detach() for t in tensors], lambda s, h: next(it).detach())
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        leaves, outs_k = ctx.graph
        return (None, *torch.autograd.grad(outs_k, leaves, grads, retain_graph=True))


LAYER_NAMES = ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_out",
               "bias_out")


def make_loss_problem(T, B, I, H, O, *, loss="cross_entropy", dtype=torch.float64, seed=None,
                      batch_first=False, bias=True, lengths=None, loss_mask=None, ignore=False,
                      scale=1.0):
    """Fresh random inputs of rnn_loss. Returns (tensors, target, kw):
    tensors: dict over LAYER_NAMES (all requiring grad; biases None without bias);
    target laid out like the steps; kw: lengths, loss_mask, ignore_index.

    lengths: None, 'random' (in [1, T]), or a tensor.
    loss_mask: None, 'bool' or 'float' (>= 0, some zeros).
    ignore: cross-entropy only; mark every 4th target with ignore_index = 1
    (a valid class, so ignoring it cannot pass as a range check)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    layer = make_layer(T, B, I, H, dtype=dtype, bias=bias, seed=seed, batch_first=batch_first,
                       scale=scale)
    layer["weight_out"] = (torch.randn(O, H, dtype=dtype, generator=g) / H**0.5 * 3).requires_grad_()
    layer["bias_out"] = (torch.randn(O, dtype=dtype, generator=g) * 0.1).requires_grad_() if bias else None
    steps = (B, T) if batch_first else (T, B)
    ignore_index = -100
    if loss == "cross_entropy":
        target = torch.randint(0, O, steps, generator=g)
        if ignore:
            ignore_index = 1
            target.view(-1)[::4] = ignore_index
    else:
        target = torch.randn(*steps, O, dtype=dtype, generator=g)
    if isinstance(lengths, str):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = None
    if loss_mask == "bool":
        mask = torch.rand(steps, generator=g) > 0.3
    elif loss_mask == "float":
        mask = torch.rand(steps, dtype=dtype, generator=g) * 2
        mask.view(-1)[1::5] = 0
    return layer, target, dict(lengths=lengths, loss_mask=mask, ignore_index=ignore_index)


def run_loss(impl, tensors, target, upstream_seed=0, **kw):
    """rnn_loss of impl with details, then backward (for 'none', of a fixed
    random weighting). Returns (loss, h_n, step_loss, grad_norm, grads by name)."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
              for k, v in tensors.items()}
    d = impl.rnn_loss(leaves["input"], target, leaves["hx"], leaves["weight_ih"],
                      leaves["weight_hh"], leaves["bias_ih"], leaves["bias_hh"],
                      leaves["weight_out"], leaves["bias_out"], **kw, return_details=True)
    value = d.loss
    if value.dim() > 0:
        gen = torch.Generator().manual_seed(upstream_seed)
        value = (value * torch.randn(value.shape, generator=gen, dtype=value.dtype)).sum()
    value.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return d.loss.detach(), d.h_n.detach(), d.step_loss, d.grad_norm, grads

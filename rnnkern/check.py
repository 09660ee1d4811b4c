"""``rnnkern.gradcheck`` and ``python -m rnnkern check``: the fused kernels'
outputs and gradients against the plain-autograd reference."""

from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Optional, Sequence, Union

import torch

from . import functional, reference

# max|kernel - reference| / max|reference| per tensor
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
CELLS = ("rnn", "lstm", "gru")


@dataclasses.dataclass
class TensorError:
    name: str
    max_abs: float
    max_rel: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tol


@dataclasses.dataclass
class CheckResult:
    config: dict
    errors: list

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.errors)

    def format(self) -> str:
        cfg = " ".join(f"{k}={v}" for k, v in self.config.items())
        lines = [f"{'PASS' if self.passed else 'FAIL'}  {cfg}"]
        for e in self.errors:
            lines.append(f"    {e.name:12s} max abs err {e.max_abs:9.2e}  max rel err {e.max_rel:9.2e}"
                         f"  tol {e.tol:.0e}  {'PASS' if e.passed else 'FAIL'}")
        return "\n".join(lines)


def _error(name, a, b, tol) -> TensorError:
    if b.numel() == 0:
        return TensorError(name, 0.0, 0.0, tol)
    abs_err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return TensorError(name, abs_err, abs_err / scale if scale > 0 else abs_err, tol)


def gradcheck(T: int = 20, B: int = 5, I: int = 4, H: int = 7, *, cell: str = "rnn",
              nonlinearity: str = "tanh",
              lengths: Union[None, str, Sequence[int], torch.Tensor] = None,
              truncate: Optional[int] = None, loss: Optional[str] = None,
              reverse: bool = False, batch_first: bool = False, bias: bool = True,
              dtype: torch.dtype = torch.float64, seed: int = 0,
              tol: Optional[float] = None) -> CheckResult:
    """Runs one configuration through the fused kernel and the reference on the
    same random inputs and compares every output and every gradient.

    cell: 'rnn' (Elman, with ``nonlinearity``), 'lstm' or 'gru'.
    lengths: None (all T), 'random' (uniform in [0, T]) or B ints.
    loss: None compares output and the final state under a random linear loss; 'mse' or
        'cross_entropy' compares rnnkern.functional.rnn_loss with the cell (head
        with O = I, reduction 'seq_mean'; its loss, final state and every
        gradient). It runs the layer forward in time: not with ``reverse``.
    Returns a CheckResult; ``.passed`` is False if any tensor's relative error
    (max abs error / max abs value) exceeds ``tol`` (default 1e-10 in float64,
    1e-4 in float32). An option it cannot take (T or B < 0, I or H < 1,
    lengths not B ints in [0, T], ...) raises ValueError before anything runs.
    """
    check_options(T=T, B=B, I=I, H=H, cell=cell, nonlinearity=nonlinearity, lengths=lengths,
                  truncate=truncate, loss=loss, reverse=reverse)
    g = torch.Generator().manual_seed(seed)
    tol = TOLERANCE[dtype] if tol is None else tol

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    if isinstance(lengths, str):  # 'random'
        lengths = torch.randint(0, T + 1, (B,), generator=g)
    elif lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
    k = H ** -0.5
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell] * H
    x = rnd(*((B, T, I) if batch_first else (T, B, I)))
    tensors = {"input": x, "hx": rnd(B, H)}
    if cell == "lstm":
        tensors["cx"] = rnd(B, H)
    tensors.update(weight_ih=rnd(G, I, scale=k), weight_hh=rnd(G, H, scale=k))
    if bias:
        tensors.update(bias_ih=rnd(G, scale=k), bias_hh=rnd(G, scale=k))
    opts = dict(nonlinearity=nonlinearity, batch_first=batch_first, lengths=lengths,
                truncate=truncate)
    config = dict(cell=cell, T=T, B=B, I=I, H=H, nonlinearity=nonlinearity,
                  lengths=None if lengths is None else lengths.tolist(), truncate=truncate,
                  loss=loss, reverse=reverse, batch_first=batch_first, bias=bias,
                  dtype=str(dtype).replace("torch.", ""))
    if cell != "rnn":
        del config["nonlinearity"]
        del opts["nonlinearity"]
    hx = (tensors["hx"], tensors["cx"]) if cell == "lstm" else tensors["hx"]
    args = [tensors["input"], hx, tensors["weight_ih"], tensors["weight_hh"],
            tensors.get("bias_ih"), tensors.get("bias_hh")]

    if loss is None:
        w_out = None

        def run(impl):
            nonlocal w_out
            out, state = getattr(impl, cell)(*args, reverse=reverse, **opts)
            outs = {"output": out, **({"h_n": state[0], "c_n": state[1]} if cell == "lstm"
                                      else {"h_n": state})}
            if w_out is None:
                w_out = {n: torch.randn(v.shape, generator=g, dtype=dtype)
                         for n, v in outs.items()}
            return outs, sum((v * w_out[n]).sum() for n, v in outs.items())
    else:
        if not hasattr(functional, "rnn_loss"):
            raise ValueError("loss= needs rnnkern.functional.rnn_loss, which this build lacks")
        O = I
        tensors["weight_out"] = rnd(O, H, scale=k)
        tensors["bias_out"] = rnd(O, scale=k)
        tshape = (B, T) if batch_first else (T, B)
        target = (torch.randn(*tshape, O, generator=g, dtype=dtype) if loss == "mse"
                  else torch.randint(0, O, tshape, generator=g))

        mode = {} if cell == "rnn" else {"mode": cell}

        def run(impl):
            d = impl.rnn_loss(args[0], target, *args[1:], tensors["weight_out"],
                              tensors["bias_out"], loss=loss, reduction="seq_mean",
                              return_details=True, **mode, **opts)
            states = ({"h_n": d.h_n[0], "c_n": d.h_n[1]} if cell == "lstm"
                      else {"h_n": d.h_n})
            return {"loss": d.loss, **states}, d.loss + sum(h.sum() for h in states.values())

    results = {}
    for impl in (functional, reference):
        outs, objective = run(impl)
        names = list(tensors)
        # T = 0: the reference's graph never reaches the input (zeros, as the kernel's)
        grads = torch.autograd.grad(objective, [tensors[n] for n in names], allow_unused=True,
                                    materialize_grads=True)
        results[impl] = {**{k: v.detach() for k, v in outs.items()},
                         **{f"d_{n}": gr for n, gr in zip(names, grads)}}
    errors = [_error(name, results[functional][name], results[reference][name], tol)
              for name in results[reference]]
    return CheckResult(config, errors)


def check_options(*, T, B, I, H, cell, nonlinearity, lengths, truncate, loss, reverse) -> None:
    """gradcheck's own options, checked before anything runs: ValueError
    naming the option, the value expected and the value given."""
    for name, value, least in (("T", T, 0), ("B", B, 0), ("I", I, 1), ("H", H, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if cell not in CELLS:
        raise ValueError(f"cell must be 'rnn', 'lstm' or 'gru', got {cell!r}")
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    if cell != "rnn" and nonlinearity != "tanh":
        raise ValueError(f"nonlinearity is the Elman cell's ('rnn'): it must be 'tanh' (the "
                         f"default) with cell={cell!r}, got {nonlinearity!r}")
    if isinstance(lengths, str) and lengths != "random":
        raise ValueError(f"lengths must be None, 'random' or B ints, got {lengths!r}")
    if lengths is not None and not isinstance(lengths, str):
        given = torch.as_tensor(lengths).tolist()
        if (not isinstance(given, list) or len(given) != B or
                any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= T
                    for v in given)):
            raise ValueError(f"lengths must be B = {B} ints in [0, T = {T}], got {given}")
    if truncate is not None and (isinstance(truncate, bool) or not isinstance(truncate, int)
                                 or truncate < 1):
        raise ValueError(f"truncate must be None or an int >= 1, got {truncate!r}")
    if loss not in (None, "mse", "cross_entropy"):
        raise ValueError(f"loss must be None, 'mse' or 'cross_entropy', got {loss!r}")
    if loss is not None and reverse:
        raise ValueError(f"loss={loss!r} runs rnn_loss, whose layer runs forward in time: "
                         f"reverse must be False with it, got True")


def grid(dtype: torch.dtype, losses: Sequence[Optional[str]], cells: Sequence[str] = CELLS,
         seed: int = 1):
    """The default grid of `python -m rnnkern check`."""
    for cell in cells:
        nonlinearities = ("tanh", "relu") if cell == "rnn" else ("tanh",)
        for nl, lengths, truncate, loss, reverse in itertools.product(
                nonlinearities, (None, "random"), (None, 5), losses, (False, True)):
            if loss is not None and reverse:
                continue  # rnn_loss runs its layer forward in time
            yield dict(T=23, B=6, I=5, H=9, cell=cell, nonlinearity=nl, lengths=lengths,
                       truncate=truncate, loss=loss, reverse=reverse, dtype=dtype, seed=seed)


def main(args) -> int:
    dtypes = {"float64": [torch.float64], "float32": [torch.float32],
              "both": [torch.float64, torch.float32]}[args.dtype]
    single = any(v is not None for v in (args.T, args.B, args.I, args.H, args.nonlinearity,
                                         args.lengths, args.truncate, args.loss)) or args.reverse
    runs = []
    for dtype in dtypes:
        if single:
            lengths = args.lengths
            if lengths not in (None, "random"):
                try:
                    lengths = [int(v) for v in lengths.split(",")]
                except ValueError:
                    return _usage_error(f"--lengths must be 'random' or comma-separated ints, "
                                        f"got {lengths!r}")
            given = {k: v for k, v in dict(T=args.T, B=args.B, I=args.I, H=args.H).items()
                     if v is not None}  # 0 is a size too
            for cell in args.cell or ["rnn"]:
                runs.append(dict(dict(T=20, B=5, I=4, H=7), **given, cell=cell,
                                 nonlinearity=args.nonlinearity or "tanh", lengths=lengths,
                                 truncate=args.truncate, loss=args.loss, reverse=args.reverse,
                                 dtype=dtype, seed=0 if args.seed is None else args.seed))
        else:
            losses = [None] + (["mse", "cross_entropy"] if hasattr(functional, "rnn_loss") else [])
            runs.extend(grid(dtype, losses, args.cell or CELLS,
                             1 if args.seed is None else args.seed))
    for kw in runs:  # a bad option is the user's: no traceback, before anything runs
        try:
            check_options(**{k: v for k, v in kw.items() if k not in ("dtype", "seed")})
        except ValueError as e:
            return _usage_error(str(e))
    failed = 0
    for kw in runs:
        result = gradcheck(**kw)
        failed += not result.passed
        print(result.format(), flush=True)
    print(f"{len(runs) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _usage_error(message: str) -> int:
    """As argparse reports a bad option: the message on stderr, exit status 2."""
    print(f"rnnkern check: error: {message}", file=sys.stderr)
    return 2

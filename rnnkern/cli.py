"""The ``python -m rnnkern`` command line.

    python -m rnnkern bench   time rnnkern against nn.RNN and the reference
    python -m rnnkern check   compare the kernels' outputs and gradients with
                              the autograd reference (exit status 1 on failure)
    python -m rnnkern demo    train a small model with the fused kernel and
                              compare its gradients with the reference
"""

from __future__ import annotations

import argparse
import time

import torch

from . import functional, reference
from ._ops import cpu_capability


def _max_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    abs_err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return abs_err, abs_err / scale if scale > 0 else abs_err


def demo(args) -> int:
    """Learn to output, at every step, the running mean of the inputs seen so
    far in each (variable-length) sequence, with truncated BPTT; then check the
    kernel's gradients against the autograd reference in float64."""
    torch.manual_seed(args.seed)
    T, B, I, H = 40, 32, 4, 32
    print(f"rnnkern demo: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU kernels for {cpu_capability()}")
    print(f"task: running mean of the inputs, T={T} B={B} I={I} H={H}, lengths in [T/2, T], "
          f"truncate=10")
    w_ih = (torch.randn(H, I) / I**0.5).requires_grad_()
    w_hh = (torch.randn(H, H) * 0.5 / H**0.5).requires_grad_()
    b_ih = torch.zeros(H, requires_grad=True)
    b_hh = torch.zeros(H, requires_grad=True)
    head = torch.nn.Linear(H, I)
    params = [w_ih, w_hh, b_ih, b_hh, *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def batch():
        x = torch.randn(T, B, I)
        lengths = torch.randint(T // 2, T + 1, (B,))
        steps = torch.arange(1, T + 1, dtype=x.dtype)[:, None, None]
        target = x.cumsum(0) / steps
        mask = (torch.arange(T)[:, None] < lengths[None, :]).to(x.dtype)  # [T,B]
        return x, lengths, target, mask

    start = time.perf_counter()
    for step in range(args.steps + 1):
        x, lengths, target, mask = batch()
        out, _ = functional.rnn(x, None, w_ih, w_hh, b_ih, b_hh, lengths=lengths, truncate=10)
        err = ((head(out) - target) ** 2).mean(-1)  # [T,B]
        loss = (err * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0:
            print(f"  step {step:4d}  masked MSE {loss.item():.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.2f} s")

    print("gradients, fused kernel vs autograd reference (float64, same batch):")
    x, lengths, target, mask = batch()
    tensors = [t.detach().double().requires_grad_() for t in (x, w_ih, w_hh, b_ih, b_hh)]
    h0 = torch.randn(B, H, dtype=torch.double, requires_grad=True)
    names = ["input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    grads = {}
    for impl in (functional, reference):
        out, h_n = impl.rnn(tensors[0], h0, *tensors[1:], lengths=lengths, truncate=10)
        loss = (out**2).sum() + h_n.sum()
        grads[impl.__name__] = torch.autograd.grad(loss, [tensors[0], h0, *tensors[1:]])
    ok = True
    for name, g_k, g_r in zip(names, grads[functional.__name__], grads[reference.__name__]):
        abs_err, rel_err = _max_errors(g_k, g_r)
        passed = rel_err < 1e-10
        ok &= passed
        print(f"  {name:10s} max abs err {abs_err:.2e}  max rel err {rel_err:.2e}  "
              f"{'PASS' if passed else 'FAIL'}")
    return 0 if ok else 1


def _check(args) -> int:
    from . import check

    return check.main(args)


def _bench(args) -> int:
    from . import bench

    return bench.main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rnnkern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="benchmark rnnkern against nn.RNN and the reference")
    p.add_argument("--quick", action="store_true",
                   help="the short suite: 5 repeats, the baselines only, no peak memory "
                        "(45 s on a 2-core Zen 5)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per implementation")
    p.add_argument("--config", action="append", help="run only this configuration (repeatable)")
    p.add_argument("--cell", action="append", choices=["rnn", "lstm", "gru"],
                   help="run only this cell (repeatable; default: all three)")
    p.add_argument("--json", metavar="FILE", help="write machine-readable results")
    p.add_argument("--plot", metavar="FILE", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--no-reference", action="store_true", help="skip the slow autograd reference")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (default), or cuda: rnnkern's CUDA backend against torch.nn on "
                        "cuDNN, timed with CUDA events (needs a GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="of the data and parameters (default float32); bfloat16 times each "
                        "implementation's bfloat16 model (rnnkern's computes in float32)")
    p.set_defaults(func=_bench)
    p = sub.add_parser("check", help="compare kernels with the autograd reference")
    p.add_argument("-T", type=int)
    p.add_argument("-B", type=int)
    p.add_argument("-I", type=int)
    p.add_argument("-H", type=int)
    p.add_argument("--cell", action="append", choices=["rnn", "lstm", "gru"],
                   help="the cell (repeatable: the grid, or the configuration, for each; "
                        "default: all three for the grid, rnn for a configuration)")
    p.add_argument("--nonlinearity", choices=["tanh", "relu"], help="the rnn cell's")
    p.add_argument("--lengths", help="'random' or comma-separated B ints")
    p.add_argument("--truncate", type=int)
    p.add_argument("--loss", choices=["mse", "cross_entropy"])
    p.add_argument("--reverse", action="store_true")
    p.add_argument("--dtype", choices=["float64", "float32", "both"], default="both")
    p.add_argument("--seed", type=int, help="of the random inputs (default 0; the grid's 1)")
    p.set_defaults(func=_check)
    p = sub.add_parser("demo", help="train a small model and compare gradients with the reference")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)

"""Memory and speed of one training step (forward + backward) with a per-step
cross-entropy loss: rnnkern's fused rnn_loss (through rnnkern.RNNLoss) against
nn.RNN -> nn.Linear -> F.cross_entropy, the way it is written without rnnkern.

    .venv/bin/python bench/loss_memory.py            # B=32 T=256 I=H=256 O=8192, float32, 2 threads

Each implementation runs in a separate process. Memory is the growth of the
process's peak resident set (VmHWM from /proc, reset after setup; ru_maxrss
where that reset is unavailable) over its resident set after setup: model,
data and imports are excluded, and everything a step allocates, including its
first (warm-up) step and the gradients, is included. Time is the median over
--repeats steps after --warmup steps. The two processes alternate for --rounds
rounds and each implementation keeps its best round (lowest median; its peak
growth is the largest seen), so load from other processes on the machine
skews the ratio less. Both use the same seed, so their losses must agree; the
script checks that too. Exit status 0 when both targets are met.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TARGET_MEMORY_RATIO = 5.0  # fused peak growth at most 1/5 of the baseline's
TARGET_SPEEDUP = 1.5


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    import gc

    import torch
    import torch.nn.functional as F

    import rnnkern

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T, B, I, H, O = args.T, args.B, args.I, args.H, args.O
    rnn = torch.nn.RNN(I, H)
    head = torch.nn.Linear(H, O)
    x = torch.randn(T, B, I)
    y = torch.randint(0, O, (T, B))
    params = list(rnn.parameters()) + list(head.parameters())

    if args.worker == "fused":
        model = rnnkern.RNNLoss(rnn, head, loss="cross_entropy", reduction="mean")

        def step():
            loss = model(x, y)
            loss.backward()
            return loss
    else:
        def step():
            out, _ = rnn(x)  # [T,B,H]
            logits = head(out)  # [T,B,O]
            loss = F.cross_entropy(logits.view(T * B, O), y.view(T * B))
            loss.backward()
            return loss

    gc.collect()
    base_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    times, loss_value = [], None
    for i in range(args.warmup + args.repeats):
        for p in params:
            p.grad = None  # every step allocates its gradients, as after zero_grad()
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        if i == 0:
            loss_value = float(loss.detach())
        if i >= args.warmup:
            times.append(dt)
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(impl=args.worker, loss=loss_value, median_s=statistics.median(times),
                          min_s=min(times), base_mb=base_kb / 1024,
                          growth_mb=(peak_kb - base_kb) / 1024,
                          peak_source="VmHWM (reset after setup)" if reset else "ru_maxrss",
                          threads=torch.get_num_threads())))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--I", type=int, default=256)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--O", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", choices=["fused", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    print(f"training step (forward + backward), per-step cross-entropy: T={args.T} B={args.B} "
          f"I={args.I} H={args.H} O={args.O}, float32, {args.threads} threads; "
          f"median of {args.repeats} after {args.warmup} warm-up, best of {args.rounds} rounds")
    res = {}
    for _ in range(args.rounds):
        for impl in ("baseline", "fused"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl] + sys.argv[1:]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            best = res.setdefault(impl, r)
            best["growth_mb"] = max(best["growth_mb"], r["growth_mb"])
            if r["median_s"] < best["median_s"]:
                best.update(median_s=r["median_s"], min_s=r["min_s"])
    names = {"baseline": "nn.RNN -> nn.Linear -> F.cross_entropy", "fused": "rnnkern.RNNLoss (fused)"}
    print(f"{'implementation':42s} {'median step':>12s} {'peak RSS growth':>16s} {'loss':>10s}")
    for impl, r in res.items():
        print(f"{names[impl]:42s} {r['median_s'] * 1e3:10.1f} ms {r['growth_mb']:13.1f} MB "
              f"{r['loss']:10.6f}")
    b, f = res["baseline"], res["fused"]
    speedup = b["median_s"] / f["median_s"]
    mem_ratio = b["growth_mb"] / max(f["growth_mb"], 1e-9)
    print(f"peak memory from {f['peak_source']}")
    print(f"speed-up {speedup:.2f}x (target >= {TARGET_SPEEDUP}x); memory growth "
          f"{f['growth_mb']:.1f} / {b['growth_mb']:.1f} MB = 1/{mem_ratio:.1f} of the baseline's "
          f"(target <= 1/{TARGET_MEMORY_RATIO:g})")
    agree = abs(b["loss"] - f["loss"]) <= 1e-4 * abs(b["loss"])
    print(f"losses agree to 1e-4 relative: {agree}")
    ok = speedup >= TARGET_SPEEDUP and mem_ratio >= TARGET_MEMORY_RATIO and agree
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

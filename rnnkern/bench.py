"""The benchmark suite behind ``python -m rnnkern bench``.

Each configuration is a training problem: one recurrent layer (an Elman RNN,
an LSTM or a GRU: ``--cell``; ``bidir-lengths`` runs the cell's 2-layer
bidirectional module instead) with a per-step MSE loss over a linear head with
O = I, reduced as in seed 000, example 3 (each
sequence's mean over its valid steps, summed over the batch). Every
implementation is timed interleaved with the others in the same run (medians
over repeats after a warm-up), so the ratios hold on a shared, noisy machine.

``--device cuda`` runs the same problems on the GPU (rnnkern's CUDA backend
against torch.nn's modules on cuDNN), each call timed with CUDA events and the
peak memory read from torch's CUDA allocator; it needs a GPU and rnnkern built
with RNNKERN_CUDA=1, and says so otherwise.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Callable, NamedTuple, Optional

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import functional, reference
from ._ops import cpu_capability, empty_cache, gemm_backend_line


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    B: int
    T: int
    I: int
    H: int
    lengths: bool = False  # lengths uniform in [T/2, T]
    truncate: Optional[int] = None
    cell: str = "rnn"  # 'rnn' | 'lstm' | 'gru'
    layers: int = 1
    bidirectional: bool = False

    @property
    def stacked(self) -> bool:
        """Run through the modules (rnnkern.RNN and torch.nn.RNN, say), not one layer."""
        return self.layers > 1 or self.bidirectional

    @property
    def label(self) -> str:
        extra = " lengths~U[T/2,T]" if self.lengths else ""
        extra += f" truncate={self.truncate}" if self.truncate else ""
        extra += f" layers={self.layers}" if self.layers > 1 else ""
        extra += " bidirectional" if self.bidirectional else ""
        return (f"{self.cell} {self.name} (B={self.B}, T={self.T}, I={self.I}, H={self.H}, "
                f"O={self.I}){extra}")

    @property
    def nn_name(self) -> str:
        return {"rnn": "nn.RNN", "lstm": "nn.LSTM", "gru": "nn.GRU"}[self.cell]


CELLS = ("rnn", "lstm", "gru")
SUITE = [
    Config("tiny", 1, 1, 1, 1),  # per-call cost: nothing but fixed costs
    Config("seed", 64, 50, 8, 32),
    Config("small", 32, 100, 64, 128),
    Config("long", 16, 1000, 32, 64),
    Config("large", 64, 200, 256, 512),
    Config("long-lengths", 16, 1000, 32, 64, lengths=True),
    Config("long-truncate", 16, 1000, 32, 64, truncate=10),
    # The reverse direction runs each sequence from its own last step.
    Config("bidir-lengths", 16, 1000, 32, 64, lengths=True, layers=2, bidirectional=True),
]


# Left out of --quick unless named with --config: four layer-directions over
# T = 1000 against packed modules would take the quick suite past 2 minutes.
FULL_SUITE_ONLY = ("bidir-lengths",)


def suite(cells=CELLS, names=None) -> list:
    """The configurations for each cell, cell-major."""
    return [dataclasses.replace(c, cell=cell) for cell in cells for c in SUITE
            if not names or c.name in names]


class Problem:
    """One configuration's data and parameters, shared by every implementation.
    Drawn on the CPU (the same numbers for either device), then moved to
    `device`; lengths stay on the CPU, where packing and rnnkern take them."""

    def __init__(self, cfg: Config, seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        B, T, I, H = cfg.B, cfg.T, cfg.I, cfg.H
        torch.manual_seed(seed)
        rnn = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cfg.cell](
            I, H, num_layers=cfg.layers, bidirectional=cfg.bidirectional)
        self.rnn = rnn.to(device, dtype)
        self.head = torch.nn.Linear(H * (2 if cfg.bidirectional else 1), I).to(device, dtype)
        self.params = [*self.rnn.parameters(), *self.head.parameters()]
        self.module = None  # rnnkern's module with the same weights, for a stacked config
        if cfg.stacked:
            import rnnkern

            self.module = getattr(rnnkern, type(rnn).__name__)(
                I, H, num_layers=cfg.layers, bidirectional=cfg.bidirectional).to(device, dtype)
            self.module.load_state_dict(self.rnn.state_dict())
            self.params += list(self.module.parameters())
        self.x = torch.randn(T, B, I, generator=g).to(device, dtype)  # [T,B,I]
        self.target = torch.randn(T, B, I, generator=g).to(device, dtype)  # [T,B,O]
        if cfg.lengths:
            self.lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        else:
            self.lengths = torch.full((B,), T, dtype=torch.int64)
        self.mask = (torch.arange(T)[:, None] < self.lengths[None, :]).float().to(device)  # [T,B]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def weights(self):
        r = self.rnn
        return (r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0, r.bias_hh_l0)

    def masked_loss(self, out, mask=None, target=None):
        """Seed 000, example 3: per-step MSE, each sequence's mean over its valid
        steps, summed over the batch. out [T,B,H] -> scalar."""
        mask = self.mask if mask is None else mask
        target = self.target if target is None else target
        step = ((self.head(out) - target) ** 2).mean(-1)  # [T,B]
        return ((step * mask).sum(0) / self.mask.sum(0).clamp(min=1)).sum()


# ---------------------------------------------------------------------------
# Implementations: each gives a forward-only callable and a training step.
# ---------------------------------------------------------------------------


MODES = {"rnn": "rnn_tanh", "lstm": "lstm", "gru": "gru"}  # rnn_loss's mode of each cell


def _layer(p: Problem, impl, **kw):
    """One layer of the problem's cell through impl (functional or reference);
    rnnkern's module for a stacked configuration."""
    if p.cfg.stacked:
        assert impl is functional, "the reference runs single-layer configurations only"
        return p.module(p.x, **kw)[0]
    return getattr(impl, p.cfg.cell)(p.x, None, *p.weights(), **kw)[0]


def _rnnkern_loss(p: Problem, impl):
    lengths = p.lengths if p.cfg.lengths else None
    if not p.cfg.stacked:  # the fused per-step loss, on any cell
        return impl.rnn_loss(p.x, p.target, None, *p.weights(), p.head.weight, p.head.bias,
                             loss="mse", mode=MODES[p.cfg.cell], lengths=lengths,
                             reduction="seq_sum", truncate=p.cfg.truncate)
    return p.masked_loss(_layer(p, impl, lengths=lengths, truncate=p.cfg.truncate))


def impl_rnnkern(p: Problem):
    lengths = p.lengths if p.cfg.lengths else None

    def forward():
        with torch.no_grad():
            _layer(p, functional, lengths=lengths)

    def train():
        _rnnkern_loss(p, functional).backward()

    return forward, train


def impl_reference(p: Problem):
    lengths = p.lengths if p.cfg.lengths else None

    def forward():
        with torch.no_grad():
            _layer(p, reference, lengths=lengths)

    def train():
        _rnnkern_loss(p, reference).backward()

    return forward, train


def impl_nn_rnn(p: Problem):
    def forward():
        with torch.no_grad():
            p.rnn(p.x)

    def train():
        out, _ = p.rnn(p.x)
        p.masked_loss(out).backward()

    return forward, train


def impl_nn_rnn_packed(p: Problem):
    def run():
        packed = pack_padded_sequence(p.x, p.lengths, enforce_sorted=False)
        out, _ = p.rnn(packed)
        out, _ = pad_packed_sequence(out, total_length=p.cfg.T)
        return out

    def forward():
        with torch.no_grad():
            run()

    def train():
        p.masked_loss(run()).backward()

    return forward, train


def impl_nn_rnn_chunked(p: Problem):
    """Truncated BPTT as users write it: K-step chunks, backward per chunk, detach."""
    K = p.cfg.truncate

    def forward():
        with torch.no_grad():
            h = None
            for c0 in range(0, p.cfg.T, K):
                _, h = p.rnn(p.x[c0:c0 + K], h)

    def train():
        h = None
        for c0 in range(0, p.cfg.T, K):
            out, h = p.rnn(p.x[c0:c0 + K], h)
            p.masked_loss(out, p.mask[c0:c0 + K], p.target[c0:c0 + K]).backward()
            h = tuple(v.detach() for v in h) if isinstance(h, tuple) else h.detach()

    return forward, train


def implementations(cfg: Config, with_reference: bool = True, baselines_only: bool = False):
    """(name, make) for each implementation timed on cfg. With
    ``baselines_only`` (the quick suite), a lengths or truncate configuration
    leaves out the padded, unchunked torch.nn row: it is not the baseline there,
    and at T = 1000 it costs as much as the baseline."""
    impls = [("rnnkern", impl_rnnkern)]
    if not (baselines_only and (cfg.lengths or cfg.truncate)):
        impls.append((cfg.nn_name, impl_nn_rnn))
    if cfg.lengths:
        impls.append((f"{cfg.nn_name} packed", impl_nn_rnn_packed))
    if cfg.truncate:
        impls.append((f"{cfg.nn_name} chunked K={cfg.truncate}", impl_nn_rnn_chunked))
    if with_reference and not cfg.stacked:
        impls.append(("reference", impl_reference))
    return impls


def baseline_name(cfg: Config) -> str:
    """The alternative a user would otherwise write for this configuration."""
    if cfg.lengths:
        return f"{cfg.nn_name} packed"
    if cfg.truncate:
        return f"{cfg.nn_name} chunked K={cfg.truncate}"
    return cfg.nn_name


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (figures differ between the project's Intel and AMD machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _time_once(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time_once_cuda(fn: Callable[[], None]) -> float:
    """Seconds of GPU time from a CUDA event before fn's work to one after it
    (the queue drained first, so nothing earlier is counted)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def timer(device: str) -> Callable[[Callable[[], None]], float]:
    return _time_once_cuda if device == "cuda" else _time_once


# A timing shorter than this is taken over a loop of calls (timeit's way): one
# call of the tiny configuration lasts tens of microseconds, near the timer's
# own cost, and a lone call after another implementation's runs cold (its
# caches and allocator state are the other's). The count is set once per
# implementation and phase, from the warm-up call's time.
MIN_TIMING_S = 0.02
MAX_CALLS_PER_TIMING = 1000


def calls_per_timing(seconds: float) -> int:
    """How many calls one timing takes for a call that lasted `seconds`."""
    if seconds >= MIN_TIMING_S:
        return 1
    return min(MAX_CALLS_PER_TIMING, math.ceil(MIN_TIMING_S / max(seconds, 1e-7)))


def time_calls(time_once: Callable[[Callable[[], None]], float], fn: Callable[[], None],
               calls: int) -> float:
    """Seconds per call of `fn`, from one timing of `calls` calls in a row."""
    if calls == 1:
        return time_once(fn)

    def loop():
        for _ in range(calls):
            fn()

    return time_once(loop) / calls


CUDA_OPS = ("elman_fwd", "elman_bwd", "elman_loss_fwd", "elman_loss_bwd", "layer_fwd",
            "layer_bwd", "head_loss_fwd", "head_loss_bwd")


def check_device(device: str) -> None:
    """Refuses --device cuda, saying why, where it cannot run."""
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise SystemExit(f"rnnkern bench --device cuda: no CUDA GPU is available "
                         f"(torch.cuda.is_available() is False; torch {torch.__version__} is "
                         f"{build}). Run it on a machine with a GPU, or use --device cpu.")
    missing = [op for op in CUDA_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"rnnkern::{op}", "CUDA")]
    if missing:
        raise SystemExit("rnnkern bench --device cuda: rnnkern was built without its CUDA "
                         f"backend (no CUDA kernel for {', '.join(missing)}); rebuild it with "
                         "RNNKERN_CUDA=1 (README.md, CUDA backend).")


def gpu_name() -> str:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"


_libc = None


def _glibc():
    """glibc, for malloc_trim and mallopt; None where the C library is another."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
        except OSError:
            lib = None
        _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
    return _libc or None


def _trim():
    gc.collect()
    empty_cache()  # else a kept block is resident before the call and not counted
    if _glibc():
        _glibc().malloc_trim(0)


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest
_TRIM_THRESHOLD = 512 * 2**20


def steady_malloc() -> Optional[str]:
    """Fixes glibc malloc's thresholds for this process, so that a block freed
    after one call is reused by the next instead of going back to the OS and
    being faulted in again (zeroed page by page). With glibc's default, dynamic
    thresholds, whether that happens depends on the heap's layout, which
    differs from process to process: a GRU forward at seed size measured
    0.45 ms in some processes and 2 ms in others, all of the difference page
    faults. Every implementation runs under the same setting. Returns what was
    set, for the header, or None where this is not glibc."""
    libc = _glibc()
    if not (libc and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1):
        return None
    return (f"glibc malloc with fixed thresholds (mmap {_MMAP_THRESHOLD >> 20} MB, trim "
            f"{_TRIM_THRESHOLD >> 20} MB)")


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_growth_mb(fn: Callable[[], None]) -> Optional[float]:
    """Peak resident memory that `fn` adds, in MB, from the OS (Linux: reset
    the high-water mark via /proc/self/clear_refs, run, read VmHWM)."""
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if base is None or peak is None:
        return None
    return max(0.0, (peak - base) / 1024)


def peak_cuda_growth_mb(fn: Callable[[], None]) -> float:
    """Peak GPU memory that `fn` adds, in MB, from torch's CUDA allocator."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return max(0.0, (torch.cuda.max_memory_allocated() - base) / 2**20)


def _mm_gflops(M: int, K: int, N: int, repeats: int, pick, device: str = "cpu") -> float:
    """The float32 rate of an [M,K] x [K,N] torch.mm in this run, from the
    `pick` (statistics.median, min) of `repeats` timings after one warm-up."""
    a, w = torch.randn(M, K, device=device), torch.randn(K, N, device=device)
    out = torch.empty(M, N, device=device)
    torch.mm(a, w, out=out)
    time_once = timer(device)
    t = pick([time_once(lambda: torch.mm(a, w, out=out)) for _ in range(repeats)])
    return 2 * M * K * N / t / 1e9


def sgemm_gflops(cfg: Config, repeats: int = 5, device: str = "cpu") -> float:
    """Throughput of one large float32 GEMM of the problem's size in this run:
    the ceiling for work that is all GEMM."""
    return _mm_gflops(cfg.T * cfg.B, cfg.H, cfg.H, repeats, statistics.median, device)


def forward_flops(cfg: Config) -> float:
    """Multiply-add work of the layer's forward: the input projection and the
    recurrence (G = H, 4H or 3H gate rows)."""
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cfg.cell] * cfg.H
    return 2 * cfg.T * cfg.B * (cfg.I * G + cfg.H * G)


def train_flops(cfg: Config) -> float:
    """Multiply-add work of a training step: forward GEMMs (input projection,
    recurrence, head of O = I outputs) and twice that in backward (inputs' and
    weights' gradients)."""
    return 3 * (forward_flops(cfg) + 2 * cfg.T * cfg.B * cfg.H * cfg.I)


_best_sgemm = 0.0  # the fastest rate peak_sgemm_gflops has seen in this process


def peak_sgemm_gflops(repeats: int = 15) -> float:
    """This run's float32 GEMM rate at a size where BLAS runs at its best
    (1024^3): no kernel does a step's multiply-adds faster than this. The best
    rate seen so far in the run: a neighbour's load can only slow a
    measurement, never speed it up, and a ceiling must not be too low."""
    global _best_sgemm
    _best_sgemm = max(_best_sgemm, _mm_gflops(1024, 1024, 1024, repeats, min))
    return _best_sgemm


def ceiling(cfg: Config, base: "Row", gflops: float) -> dict:
    """The most any implementation could be faster than the baseline row if it
    did the configuration's GEMM work (forward_flops, train_flops) at `gflops`
    and nothing else: the bound a speed target must stay under to be reachable
    on this machine."""
    fwd_s, train_s = forward_flops(cfg) / gflops / 1e9, train_flops(cfg) / gflops / 1e9
    return {"sgemm_gflops": gflops, "forward_x": base.forward_ms * 1e-3 / fwd_s,
            "train_x": base.train_ms * 1e-3 / train_s}


@dataclasses.dataclass
class Row:
    impl: str
    forward_ms: float  # medians
    train_ms: float
    peak_mb: Optional[float]
    # The spread of the repeats: the interquartile range over the median. A row
    # whose spread passes NOISY_SPREAD is flagged: its median is not to be trusted.
    forward_spread: float = 0.0
    train_spread: float = 0.0
    forward_min_ms: float = 0.0
    forward_max_ms: float = 0.0
    train_min_ms: float = 0.0
    train_max_ms: float = 0.0
    # Calls per timing (MIN_TIMING_S): the figures above are per call.
    forward_calls: int = 1
    train_calls: int = 1

    @property
    def noisy(self) -> bool:
        return max(self.forward_spread, self.train_spread) > NOISY_SPREAD


# Interquartile range / median above which a row's timings are flagged: the
# quartiles of a quiet run on the 2-core VMs differ by 10-45% of the median; a
# stalled parallel region (a busy machine) spreads them far wider.
NOISY_SPREAD = 0.5


def spread(times: list) -> float:
    """Interquartile range over the median of repeated timings."""
    if len(times) < 2:
        return 0.0
    q = statistics.quantiles(times, n=4, method="inclusive")
    med = statistics.median(times)
    return (q[2] - q[0]) / med if med > 0 else 0.0


class CpuSnapshot(NamedTuple):
    wall: float  # perf_counter seconds
    own: float  # this process's CPU seconds
    busy: float  # every CPU's busy seconds (/proc/stat)
    cpus: int
    # Summed over this process's threads (/proc/self/task/*/schedstat): seconds
    # run, and seconds spent runnable but waiting for a CPU. None where the
    # kernel keeps no schedstat.
    ran: Optional[float]
    waited: Optional[float]


# The share of its threads' time the bench may spend waiting for a CPU before a
# timing is flagged: a quiet 2-core VM measures 0.0-0.2% (1 or 2 threads); two
# processes spinning beside it, 30-50%.
WAIT_LIMIT = 0.05
# Without schedstat: cores' worth of CPU that other processes (and the
# hypervisor, as steal) may take beyond the cores the bench's threads leave idle.
SPARE_CORES = 0.25


def _threads_schedstat() -> tuple:
    ran = waited = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                fields = f.read().split()
        except OSError:  # a thread that ended meanwhile
            continue
        ran += int(fields[0])
        waited += int(fields[1])
    return ran / 1e9, waited / 1e9


def cpu_snapshot() -> Optional[CpuSnapshot]:
    """The machine's and this process's CPU accounts now, from /proc (busy is
    user + nice + system + irq + softirq + steal; steal is time the hypervisor
    gave a vCPU to another guest). None where there is no /proc/stat (macOS,
    Windows)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(v) for v in lines[0].split()[1:]]
    if len(fields) < 8:
        return None
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) \
        / os.sysconf("SC_CLK_TCK")
    try:
        ran, waited = _threads_schedstat()
    except (OSError, ValueError, IndexError):
        ran = waited = None
    return CpuSnapshot(time.perf_counter(), time.process_time(), busy, cpus, ran, waited)


def other_cores(before: Optional[CpuSnapshot], after: Optional[CpuSnapshot]) -> Optional[float]:
    """How many cores' worth of CPU everything but this process used between two
    snapshots: the machine's busy time less this process's own (its OpenMP
    threads' spinning included, which /proc/stat counts as busy too), over the
    wall time. None without /proc/stat."""
    if before is None or after is None or after.wall <= before.wall:
        return None
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own))
               / (after.wall - before.wall))


def waited_share(before: Optional[CpuSnapshot], after: Optional[CpuSnapshot]) -> Optional[float]:
    """The share of its threads' busy time this process spent runnable but
    waiting for a CPU between two snapshots: what a neighbour costs the bench,
    whichever cores it runs on. None where the kernel keeps no schedstat (no
    run time counted)."""
    if before is None or after is None or before.ran is None or after.ran is None:
        return None
    ran, waited = after.ran - before.ran, after.waited - before.waited
    if ran <= 0:
        return None
    return max(0.0, waited) / (ran + max(0.0, waited))


def contended(waited: Optional[float], others: Optional[float], cores: int, threads: int) -> bool:
    """Whether the bench's threads were kept from the CPUs: they waited for one
    more than WAIT_LIMIT of their time; without schedstat, other processes
    used more than the cores the bench's threads leave idle (SPARE_CORES of
    slack). Its parallel regions then wait for descheduled threads, and the
    timings measure the neighbours."""
    if waited is not None:
        return waited > WAIT_LIMIT
    return others is not None and others > max(0, cores - threads) + SPARE_CORES


def contention(before: Optional[CpuSnapshot], after: Optional[CpuSnapshot]) -> dict:
    """other_cores, waited_share and the contended verdict between two snapshots."""
    others, waited = other_cores(before, after), waited_share(before, after)
    cores = after.cpus if after is not None and after.cpus else (os.cpu_count() or 1)
    return {"other_cores": others, "waited_share": waited, "cores": cores,
            "contended": contended(waited, others, cores, torch.get_num_threads())}


def machine_load(calibration_s: float = 0.05, sample_s: float = 0.5) -> dict:
    """Whether the machine looks busy before timing: a calibration loop run for
    ``sample_s`` and timed twice (on a quiet machine the two agree closely),
    during which the bench's threads may not wait for a CPU (contention; the
    load average where there is no /proc). Returns the figures and a verdict."""
    threads = torch.get_num_threads()
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    a = torch.randn(256, 256)

    def loop(seconds):
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, a)
            n += 1
        return (time.perf_counter() - t0) / n

    loop(calibration_s)  # warm-up
    before = cpu_snapshot()
    t1 = loop(sample_s / 2)
    t2 = loop(sample_s / 2)
    c = contention(before, cpu_snapshot())
    drift = abs(t1 - t2) / min(t1, t2)
    reasons = []
    if c["contended"]:
        if c["waited_share"] is not None:
            reasons.append(f"the bench's {threads} thread(s) waited for a CPU "
                           f"{100 * c['waited_share']:.0f}% of the time; other processes used "
                           f"{c['other_cores']:.2f} of {c['cores']} cores")
        else:
            reasons.append(f"other processes are using {c['other_cores']:.2f} of {c['cores']} "
                           f"cores, and the bench runs {threads} thread(s)")
    # The load average still counts the last minute's work (a previous bench
    # run, say): it decides only where /proc cannot say what runs now, and then
    # only more runnable threads than cores is taken as busy.
    if before is None and load1 is not None and load1 > c["cores"]:
        reasons.append(f"load average {load1:.2f} on {c['cores']} cores")
    if drift > 0.2:
        reasons.append(f"a calibration loop timed twice differed by {100 * drift:.0f}%")
    return {"load1": load1, "cores": c["cores"], "threads": threads,
            "other_cores": c["other_cores"], "waited_share": c["waited_share"],
            "calibration_drift": drift, "busy": bool(reasons), "reasons": reasons}


def autograd_floor(p: Problem) -> Callable[[], None]:
    """A training step of torch's autograd alone on the problem's parameters:
    each summed, the sums stacked and summed, backward, then zero_grad. What a
    step at the tiny configuration costs before any recurrent work: the graph,
    the engine, one gradient to accumulate per parameter, and the Python
    around them (it runs 2 + len(params) small ops forward, where a fused step
    runs one or two)."""
    def step():
        p.zero_grad()
        torch.stack([w.sum() for w in p.params]).sum().backward()

    return step


def run_config(cfg: Config, *, repeats: int, warmup: int, with_reference: bool,
               progress: Callable[[str], None], device: str = "cpu",
               quick: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """Times every implementation on cfg. ``quick``: the baselines only (see
    implementations) and no peak-memory column. ``dtype``: of the problem's
    data and parameters (bfloat16: each implementation's bfloat16 path)."""
    problem = Problem(cfg, device=device, dtype=dtype)
    time_once = timer(device)
    peak_mb = peak_cuda_growth_mb if device == "cuda" else peak_rss_growth_mb
    impls = [(name, *make(problem))
             for name, make in implementations(cfg, with_reference, baselines_only=quick)]
    times = {name: {"forward": [], "train": []} for name, _, _ in impls}
    calls = {name: {"forward": 1, "train": 1} for name, _, _ in impls}

    def train_step(fn):
        problem.zero_grad()
        fn()

    floor = autograd_floor(problem) if cfg.name == "tiny" else None
    floor_times, floor_calls = [], 1
    for name, fwd, train in impls:
        for _ in range(warmup):
            t_fwd = time_once(fwd)
            t_train = time_once(lambda: train_step(train))
        if warmup:  # the last warm-up call sets the calls per timing
            calls[name] = {"forward": calls_per_timing(t_fwd), "train": calls_per_timing(t_train)}
    if floor is not None:
        for _ in range(max(1, warmup)):
            t_floor = time_once(floor)
        floor_calls = calls_per_timing(t_floor)
    # Interleaved, so that every implementation sees the same noise, in a new
    # order each repeat: in a fixed order, the one timed right after another
    # measured up to 25% slower or faster than the same code elsewhere in the
    # order. Python's cyclic GC is off while timing (as in timeit), so that a
    # collection the others' garbage set off is not charged to whoever runs.
    order = random.Random(0)
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    # What other processes ran while this configuration was timed: the busy
    # check before the run cannot see a neighbour that starts later.
    before = cpu_snapshot()
    try:
        for rep in range(repeats):
            progress(f"  {cfg.name}: repeat {rep + 1}/{repeats}")
            for name, fwd, train in order.sample(impls, len(impls)):
                n = calls[name]
                times[name]["forward"].append(time_calls(time_once, fwd, n["forward"]))
                times[name]["train"].append(
                    time_calls(time_once, lambda: train_step(train), n["train"]))
            if floor is not None:
                floor_times.append(time_calls(time_once, floor, floor_calls))
    finally:
        after = cpu_snapshot()
        if gc_was_on:
            gc.enable()
    busy = contention(before, after)
    # After the timing: measuring the CPU peak hands the free heap back to the
    # OS (malloc_trim), which the next calls would pay for in page faults.
    peaks = {name: None if quick else peak_mb(lambda: train_step(train))
             for name, _, train in impls}
    def row(name):
        f, t = times[name]["forward"], times[name]["train"]
        return Row(name, statistics.median(f) * 1e3, statistics.median(t) * 1e3, peaks[name],
                   forward_spread=spread(f), train_spread=spread(t),
                   forward_min_ms=min(f) * 1e3, forward_max_ms=max(f) * 1e3,
                   train_min_ms=min(t) * 1e3, train_max_ms=max(t) * 1e3,
                   forward_calls=calls[name]["forward"], train_calls=calls[name]["train"])

    rows = [row(name) for name, _, _ in impls]
    result = {"config": dataclasses.asdict(cfg), "label": cfg.label, "baseline": baseline_name(cfg),
              "rows": [dict(dataclasses.asdict(r), noisy=r.noisy) for r in rows],
              "other_cores": busy["other_cores"], "waited_share": busy["waited_share"],
              "contended": busy["contended"]}
    # The ceiling and the sgemm share are float32 figures (nn's bfloat16 paths
    # may run bfloat16 GEMMs faster than any float32 one).
    plain = not (cfg.stacked or cfg.lengths or cfg.truncate) and dtype == torch.float32
    if device == "cpu" and cfg.name != "tiny" and plain:
        base = next(r for r in rows if r.impl == result["baseline"])
        result["ceiling"] = ceiling(cfg, base, peak_sgemm_gflops())
    if floor_times:
        result["autograd_floor"] = {"params": len(problem.params),
                                    "train_ms": statistics.median(floor_times) * 1e3,
                                    "train_min_ms": min(floor_times) * 1e3}
    if cfg.name == "large" and dtype == torch.float32:
        gf = sgemm_gflops(cfg, device=device)
        ours = next(r for r in rows if r.impl == "rnnkern")
        result["sgemm_gflops"] = gf
        result["rnnkern_train_gflops"] = train_flops(cfg) / (ours.train_ms * 1e-3) / 1e9
    return result


def format_table(result: dict) -> str:
    rows = result["rows"]
    ours = next(r for r in rows if r["impl"] == "rnnkern")
    lines = [result["label"],
             f"  {'implementation':24s} {'forward ms':>11s} {'train ms':>10s} "
             f"{'rnnkern fwd x':>14s} {'rnnkern train x':>16s} {'peak MB':>8s} {'IQR/median':>11s}"]
    for r in rows:
        peak = f"{r['peak_mb']:.1f}" if r["peak_mb"] is not None else "n/a"
        sp = f"{100 * r.get('forward_spread', 0):.0f}%/{100 * r.get('train_spread', 0):.0f}%"
        flag = "  NOISY" if r.get("noisy") else ""
        lines.append(f"  {r['impl']:24s} {r['forward_ms']:11.3f} {r['train_ms']:10.3f} "
                     f"{r['forward_ms'] / ours['forward_ms']:14.2f} "
                     f"{r['train_ms'] / ours['train_ms']:16.2f} {peak:>8s} {sp:>11s}{flag}")
    if result.get("contended"):
        waited = result.get("waited_share")
        lines.append("  CONTENDED: while this configuration was timed, "
                     + (f"the bench's threads waited for a CPU {100 * waited:.0f}% of the time and "
                        if waited is not None else "")
                     + f"other processes used {result['other_cores']:.2f} cores: its figures "
                     "measure them too")
    if "sgemm_gflops" in result:
        eff = result["rnnkern_train_gflops"] / result["sgemm_gflops"]
        lines.append(f"  rnnkern training step: {result['rnnkern_train_gflops']:.1f} GFLOP/s = "
                     f"{100 * eff:.0f}% of this run's sgemm ({result['sgemm_gflops']:.1f} GFLOP/s)")
    if "autograd_floor" in result:
        f = result["autograd_floor"]
        lines.append(f"  floor: torch's autograd alone on the step's {f['params']} parameters (each "
                     f"summed, stacked, summed; backward) takes {f['train_ms']:.3f} ms (median; "
                     f"fastest {f['train_min_ms']:.3f} ms)")
    if "ceiling" in result:
        c = result["ceiling"]
        lines.append(f"  ceiling: the step's GEMM work alone, at the run's best sgemm rate so far "
                     f"({c['sgemm_gflops']:.0f} GFLOP/s), is {c['forward_x']:.2f}x (forward) and "
                     f"{c['train_x']:.2f}x (training) faster than {result['baseline']}")
    return "\n".join(lines)


def speedups(result: dict) -> dict:
    """rnnkern's forward and training speedups over the configuration's baseline."""
    rows = {r["impl"]: r for r in result["rows"]}
    ours, base = rows["rnnkern"], rows[result["baseline"]]
    return {"forward": base["forward_ms"] / ours["forward_ms"],
            "train": base["train_ms"] / ours["train_ms"]}


def plot(results: list, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # matplotlib is the optional `bench` extra
        raise SystemExit(f"--plot needs matplotlib: pip install matplotlib ({e})")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [f"{r['config']['cell']} {r['config']['name']}" for r in results]
    for ax, kind in zip(axes, ("forward", "train")):
        vals = [speedups(r)[kind] for r in results]
        ax.bar(names, vals, color="tab:blue")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"rnnkern {kind} speedup over the baseline")
        ax.set_ylabel("x faster")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}x", ha="center", va="bottom")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args) -> int:
    device = getattr(args, "device", "cpu")
    check_device(device)
    torch.set_num_threads(args.threads)
    configs = suite(args.cell or CELLS, args.config)
    if args.quick and not args.config:
        configs = [c for c in configs if c.name not in FULL_SUITE_ONLY]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[getattr(args, "dtype",
                                                                           "float32")]
    dtype_name = str(dtype).replace("torch.", "")
    with_reference = not args.no_reference
    if args.quick:
        # The autograd reference is the specification, not a baseline: at T=1000
        # its Python loop alone would take most of the quick suite's 2 minutes.
        repeats, warmup, with_reference = 5, 1, False
    else:
        repeats, warmup = args.repeats, 2
    timing = (f"median of {repeats} interleaved repeats in shuffled order, a call under "
              f"{MIN_TIMING_S * 1e3:.0f} ms timed in a loop of calls"
              + ("; quick suite: the baselines only, no peak memory" if args.quick else ""))
    if device == "cuda":
        header = (f"rnnkern bench: torch {torch.__version__}, {dtype_name} on {gpu_name()} (CUDA "
                  f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), rnnkern's "
                  f"CUDA kernels against torch.nn on cuDNN, timed with CUDA events, {timing}")
    else:
        malloc = steady_malloc()
        peak_sgemm_gflops()  # a first measurement before any configuration
        header = (f"rnnkern bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"{dtype_name}, CPU kernels for {cpu_capability()}, {gemm_backend_line()}, "
                  f"{os.cpu_count()} CPUs ({cpu_name()}), {timing}"
                  + (f", {malloc}" if malloc else ""))
    print(header, flush=True)
    load = machine_load()
    if load["busy"]:
        print(f"WARNING: this machine looks busy ({'; '.join(load['reasons'])}): timings and "
              "ratios below may be far off. Rerun on a quiet machine.", flush=True)
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.no_progress \
        else (lambda msg: None)
    results = []
    start = time.perf_counter()
    for cfg in configs:
        progress(f"[{len(results) + 1}/{len(configs)}] {cfg.label}")
        result = run_config(cfg, repeats=repeats, warmup=warmup, with_reference=with_reference,
                            progress=progress, device=device, quick=args.quick, dtype=dtype)
        results.append(result)
        print("\n" + format_table(result), flush=True)
    print("\nSpeedup of rnnkern over the baseline (the cell's torch.nn module; packed for "
          "lengths; chunked for truncate):")
    for r in results:
        s = speedups(r)
        name = f"{r['config']['cell']} {r['config']['name']}"
        print(f"  {name:18s} forward {s['forward']:6.2f}x   training step {s['train']:6.2f}x")
    noisy = [f"{r['config']['cell']} {r['config']['name']}: {row['impl']}"
             for r in results for row in r["rows"] if row.get("noisy")]
    if noisy:
        print(f"WARNING: {len(noisy)} row(s) spread beyond {100 * NOISY_SPREAD:.0f}% "
              f"(interquartile range over median), marked NOISY: {', '.join(noisy)}")
    busy_configs = [f"{r['config']['cell']} {r['config']['name']}"
                    for r in results if r.get("contended")]
    if busy_configs:
        print(f"WARNING: other processes took CPU from the bench's {torch.get_num_threads()} "
              f"thread(s) while {len(busy_configs)} configuration(s) were timed, marked CONTENDED: "
              f"{', '.join(busy_configs)}. Rerun on a quiet machine.")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "dtype": dtype_name, "machine_load": load,
                       "noisy_rows": noisy, "contended_configs": busy_configs,
                       "results": results}, f, indent=2)
    if args.plot:
        plot(results, args.plot)
    return 0

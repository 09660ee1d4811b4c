"""DistributedDataParallel over rnnkern.RNN, LSTM and GRU: two processes
(gloo, 127.0.0.1) each train on half of every batch; their parameters must
equal those of one process trained on the whole batches."""

import datetime
import faulthandler
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pytest

import rnnkern
from helpers import TOL, assert_close

WORLD, STEPS = 2, 3
T, B_HALF, I, H, O = 9, 3, 4, 5, 2


CELLS = {"rnn": rnnkern.RNN, "lstm": rnnkern.LSTM, "gru": rnnkern.GRU}


class Tagger(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = CELLS[cell](I, H, 2, batch_first=True, bidirectional=True, dtype=torch.float64)
        self.head = nn.Linear(2 * H, O, dtype=torch.float64)

    def forward(self, x, lengths):
        return self.head(self.rnn(x, lengths=lengths)[0])  # (B, T, O)


def make_model(cell):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Tagger(cell)


def batch(step):
    """The whole batch of one step: x (2*B_HALF, T, I), lengths, target (2*B_HALF, T, O)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * B_HALF, T, I, dtype=torch.float64, generator=g)
    lengths = torch.randint(1, T + 1, (WORLD * B_HALF,), generator=g)
    target = torch.randn(WORLD * B_HALF, T, O, dtype=torch.float64, generator=g)
    return x, lengths, target


def train(model, rows):
    """SGD over STEPS batches, each restricted to `rows`. The loss is a mean over
    equal halves, so DDP's average of the two ranks' gradients is the gradient
    of the mean over the whole batch."""
    train_on(model, rows, torch.device("cpu"))


def train_on(model, rows, device):
    """train() with the batches' x and target on `device` (lengths stay on the
    CPU, as a user passes them)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        x, lengths, target = (t[rows] for t in batch(step))
        x, target = x.to(device), target.to(device)
        opt.zero_grad()
        (model(x, lengths) - target).square().mean().backward()
        opt.step()


def worker(rank, port, path, cell):
    faulthandler.enable(all_threads=True)  # a crash in a rank prints its Python stacks
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = DistributedDataParallel(make_model(cell))
        train(model, slice(rank * B_HALF, (rank + 1) * B_HALF))
        torch.save(model.module.state_dict(), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()
    exit_rank()


def exit_rank():
    """End a rank that finished its work (its parameters are saved) without
    running interpreter finalization. About 1 run in 30 on this project's
    machines, a rank aborted at exit with "terminate called without an active
    exception": a backtrace showed a gloo worker thread
    (c10d::ProcessGroupGloo::runLoop) calling into torch's Python bindings and
    waiting for the GIL while the interpreter finalized, and CPython ending
    that thread with pthread_exit through a noexcept frame. It is torch's
    teardown, after the training under test; a rank that fails still raises
    before this, and mp.spawn reports it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_change(p, p0):
    return ((p - p0).abs().max() / p0.abs().max()).item()


@pytest.mark.parametrize("cell", list(CELLS))
def test_ddp_equals_one_process_on_the_whole_batch(tmp_path, cell):
    path = str(tmp_path / "state")
    mp.spawn(worker, args=(free_port(), path, cell), nprocs=WORLD, join=True)
    single = make_model(cell)
    initial = {n: p.detach().clone() for n, p in single.named_parameters()}
    train(single, slice(None))
    for rank in range(WORLD):
        state = torch.load(f"{path}.{rank}")
        for name, p in single.named_parameters():
            assert rel_change(p, initial[name]) > 1e-3, f"{name} did not train"
            assert_close(state[name], p.detach(), TOL[torch.float64], f"rank {rank} {name}")

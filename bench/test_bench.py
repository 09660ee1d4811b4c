"""pytest-benchmark suites over the configurations of `python -m rnnkern bench`.

    pytest bench/ --benchmark-only                 # all
    pytest bench/ --benchmark-only -k "rnn-seed"   # one cell's configuration

Each configuration and phase (forward, train) is one benchmark group, so
pytest-benchmark's comparison table shows rnnkern beside the cell's torch.nn module (and the
packed / chunked baselines and the reference) in the same table. Threads:
RNNKERN_BENCH_THREADS (default 2).
"""

import pytest

from rnnkern import bench

CASES = [(cfg, name, make) for cfg in bench.suite()
         for name, make in bench.implementations(cfg, with_reference=True)]


def _id(case):
    cfg, name, _ = case
    return f"{cfg.cell}-{cfg.name}-{name.replace(' ', '_')}"


_problems = {}


def problem(cfg):
    if cfg not in _problems:
        _problems[cfg] = bench.Problem(cfg)
    return _problems[cfg]


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_forward(benchmark, case):
    cfg, name, make = case
    benchmark.group = f"{cfg.cell} {cfg.name} forward"
    forward, _ = make(problem(cfg))
    benchmark(forward)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_train(benchmark, case):
    cfg, name, make = case
    benchmark.group = f"{cfg.cell} {cfg.name} train"
    p = problem(cfg)
    _, train = make(p)

    def step():
        p.zero_grad()
        train()

    benchmark(step)

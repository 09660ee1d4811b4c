import os

import torch


def pytest_configure(config):
    # The same fixed thread count as `python -m rnnkern bench` (default 2).
    torch.set_num_threads(int(os.environ.get("RNNKERN_BENCH_THREADS", "2")))

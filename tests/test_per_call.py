"""bench/per_call.py, the per-call cost figures' command: every row it names
runs, is timed and printed, and bad arguments are refused by name."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("per_call", os.path.join(ROOT, "bench", "per_call.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


per_call = _load()


@pytest.fixture(autouse=True)
def _threads():
    # main() sets torch's thread count for its own process; keep the suite's.
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_each_row_runs_a_forward_and_backward_that_reaches_every_parameter(cell):
    fns = per_call.calls([cell])
    assert len(fns) == 4  # rnn_loss, rnnkern module, nn module, nn.Linear floor
    for f in fns.values():
        f()  # raises if a call's backward breaks


def test_the_printout_has_one_timed_row_per_call(capsys):
    assert per_call.main(["--calls", "3", "--warmup", "1", "--cell", "gru"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^  (.+?)\s+(\d+\.\d) us  \((\d+\.\d)\)$", out, flags=re.M)
    names = [r[0] for r in rows]
    assert names == ["gru: rnn_loss(...).backward()", "gru: rnnkern.GRU + out.sum()",
                     "gru: nn.GRU + out.sum()", "nn.Linear(1, 1) + out.sum()"], out
    for _, fastest, median in rows:
        assert 0 < float(fastest) <= float(median)


@pytest.mark.parametrize("argv, named", [(["--calls", "0"], "--calls 0"),
                                         (["--threads", "0"], "--threads 0"),
                                         (["--warmup", "-1"], "--warmup -1"),
                                         (["--cell", "elman"], "elman")])
def test_bad_arguments_are_refused_by_name(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        per_call.main(argv)
    assert e.value.code == 2
    assert named in capsys.readouterr().err

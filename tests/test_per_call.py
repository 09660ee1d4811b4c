"""bench/per_call.py, the per-call cost figures' command: every row it names
runs, is timed and printed, and bad arguments are refused by name."""

import importlib.util
import os
import re

import pytest
import torch

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
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_each_row_gives_every_parameter_its_gradient(cell):
    fns = per_call.calls([cell])
    assert len(fns) == 4  # rnn_loss, rnnkern module, nn module, nn.Linear floor
    for name, c in fns.items():
        for p in c.params:
            p.grad = torch.full_like(p, float("nan"))  # each call must set them afresh
        c.run()
        for p in c.params:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The drop-in is timed on the computation nn's module does: same weights
    # (loaded from it), same gradients.
    ours = [c for n, c in fns.items() if "rnnkern." in n][0]
    theirs = [c for n, c in fns.items() if ": nn." in n][0]
    assert len(ours.params) == len(theirs.params) == 4
    for a, b in zip(ours.params, theirs.params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


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

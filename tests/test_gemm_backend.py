"""The products over all rows (input projection, head, dW_ih, dW_hh, dW_out)
run on BLAS or on rnnkern's register tiles, chosen once per machine and build
for each kind of product (rnnkern.gemm_backend(), RNNKERN_GEMM). Whichever this machine's probe picks,
both are checked here against the reference, each in its own process, at
sizes past the narrow rule (every side >= 16) and with enough rows that the
a^T b sums run over several chunks and, for the LSTM, several chunk groups."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import rnnkern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, **env),
                          capture_output=True, text=True)


KINDS = ("xw", "atb", "large")
MARGINS = {"xw": 1.05, "atb": 1.05, "large": 1.25}


def verdict_file(*names, times=((0.5, 0.25), (0.125, 0.0625), (2.0, 4.0))) -> str:
    return "".join(f"{k} {n} {t} {b}\n" for k, n, (t, b) in zip(KINDS, names, times))


def reported(names) -> str:
    """What rnnkern.gemm_backend() says for these per-kind choices."""
    return names[0] if len(set(names)) == 1 else ",".join(f"{k}={n}" for k, n in zip(KINDS, names))


def test_the_choice_is_reported():
    source, cache, kinds = rnnkern._C.gemm_backend()
    assert tuple(k[0] for k in kinds) == KINDS
    names = [k[1] for k in kinds]
    assert set(names) <= {"rnnkern", "blas"}
    assert rnnkern.gemm_backend() == reported(names)
    assert source in ("probe", "cache", "RNNKERN_GEMM", "capability")
    if source in ("probe", "cache"):  # both were timed; the tiles win only by the kind's margin
        for kind, name, tiles_s, blas_s in kinds:
            assert min(tiles_s, blas_s) > 0
            assert (name == "rnnkern") == (tiles_s * MARGINS[kind] < blas_s), kinds
    else:
        assert len(set(names)) == 1 and all(k[2:] == (0.0, 0.0) for k in kinds)
    if source == "cache":
        assert os.path.isfile(cache)


CHOICE = "import rnnkern; print(repr(rnnkern._C.gemm_backend()))"


def choice(**env):
    r = run_python(CHOICE, **env)
    assert r.returncode == 0, r.stderr[-3000:]
    return eval(r.stdout.strip())


def test_the_probe_verdict_is_kept_for_later_processes(tmp_path):
    """The first process probes and stores its verdict; the next ones read it
    (so a CPU where the two backends run close cannot flip between processes
    and with it the bits), and a stored verdict decides even against what a
    probe would say."""
    env = dict(RNNKERN_CACHE_DIR=str(tmp_path / "c"), RNNKERN_GEMM="auto")
    first = choice(**env)
    source, path, kinds = first
    if source == "capability":
        pytest.skip("the portable kernels never probe")
    assert source == "probe" and os.path.dirname(path) == str(tmp_path / "c")
    assert os.listdir(tmp_path / "c") == [os.path.basename(path)]
    for _ in range(2):
        assert choice(**env) == ("cache", path, kinds)
    # Each kind's stored verdict decides, against what a probe would say.
    for names in (("blas", "rnnkern", "blas"), ("rnnkern", "blas", "rnnkern"),
                  ("rnnkern",) * 3):
        with open(path, "w") as f:
            f.write(verdict_file(*names))
        assert choice(**env) == ("cache", path, (("xw", names[0], 0.5, 0.25),
                                                 ("atb", names[1], 0.125, 0.0625),
                                                 ("large", names[2], 2.0, 4.0)))
        r = run_python("import rnnkern; print(rnnkern.gemm_backend())", **env)
        assert r.stdout.strip() == reported(names), r.stderr
    # The stored verdict runs the products, a different backend per kind
    # within one layer: the grid agrees with the reference on it.
    mixed = tuple("blas" if k[1] == "rnnkern" else "rnnkern" for k in kinds)
    if len(set(mixed)) == 1:
        mixed = (mixed[0], "blas" if mixed[0] == "rnnkern" else "rnnkern", mixed[0])
    with open(path, "w") as f:
        f.write(verdict_file(*mixed))
    r = run_python(AGREEMENT.replace("WANT", repr(mixed)).replace("'RNNKERN_GEMM'", "'cache'"),
                   **env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    # A file that does not parse (an older build's two-line verdict among
    # them, a kind missing or out of order) is probed over and replaced.
    for bad in ("mkl fast\n", "blas 0.5 0.25\nrnnkern 0.125 0.0625\n",
                verdict_file("blas", "blas", "blas").replace("large", "wide"),
                verdict_file("blas", "mkl", "blas"),
                "".join(reversed(verdict_file("blas", "blas", "blas").splitlines(True)))):
        with open(path, "w") as f:
            f.write(bad)
        again = choice(**env)
        assert again[:2] == ("probe", path)
        assert choice(**env) == ("cache", path, again[2])


def test_the_verdict_is_shared_by_every_thread_count_and_can_be_turned_off(tmp_path):
    d = tmp_path / "c"
    env = dict(RNNKERN_CACHE_DIR=str(d), RNNKERN_GEMM="auto")
    first = choice(**env)
    if first[0] == "capability":
        pytest.skip("the portable kernels never probe")
    one = run_python("import torch, rnnkern; torch.set_num_threads(1); "
                     "print(repr(rnnkern._C.gemm_backend()))", **env)
    assert one.returncode == 0, one.stderr
    one = eval(one.stdout.strip())
    # One file per CPU and build: a verdict per thread count could differ
    # between counts, and so would the bits.
    assert one == ("cache", first[1], first[2])
    assert len(os.listdir(d)) == 1
    off = choice(RNNKERN_CACHE_DIR="", RNNKERN_GEMM="auto")
    assert off[:2] == ("probe", "")
    # A pinned backend neither reads nor writes the cache.
    pinned = choice(RNNKERN_CACHE_DIR=str(tmp_path / "p"), RNNKERN_GEMM="blas")
    assert pinned == ("RNNKERN_GEMM", "", tuple((k, "blas", 0.0, 0.0) for k in KINDS))
    assert not (tmp_path / "p").exists()
    # An unwritable place: the probe still decides, for this process only.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    nowhere = choice(RNNKERN_CACHE_DIR=str(blocker / "c"), RNNKERN_GEMM="auto")
    assert nowhere[:2] == ("probe", "")


THREADS_BITS = r"""
import hashlib, sys, torch, rnnkern
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
h = hashlib.sha256()
for cls in (rnnkern.RNN, rnnkern.GRU, rnnkern.LSTM):
    m = cls(16, 64)
    out, _ = m(torch.randn(20, 16, 16))
    out.square().sum().backward()
    for t in (out, *(p.grad for p in m.parameters())):
        h.update(t.detach().numpy().tobytes())
print(rnnkern.gemm_backend(), h.hexdigest())
"""


def test_processes_at_different_thread_counts_compute_the_same_bits(tmp_path):
    """With the default RNNKERN_GEMM=auto and a fresh cache, a process at 2
    threads and one at 1 (each probing or reading the verdict) give the same
    bits: outputs and every gradient of the three cells."""
    env = dict(RNNKERN_CACHE_DIR=str(tmp_path / "c"), RNNKERN_GEMM="auto")
    runs = []
    for threads in ("2", "1", "2"):
        r = subprocess.run([sys.executable, "-c", THREADS_BITS, threads], cwd=ROOT,
                           env=dict(os.environ, **env), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        runs.append(r.stdout.split())
    assert runs[0] == runs[1] == runs[2], runs


AGREEMENT = r"""
import sys, torch, rnnkern
sys.path.insert(0, 'tests')
from helpers import make_layer, assert_close
from rnnkern import functional, reference
from test_gated import make_gated, run
g = rnnkern._C.gemm_backend()
want = WANT if isinstance(WANT, tuple) else (WANT,) * 3
assert g[0] == 'RNNKERN_GEMM' and tuple(k[1] for k in g[2]) == want, g
# Elman: T*B = 1073 rows (three 512-row chunks of a^T b), I = 24, H = 40.
for dt in (torch.float64, torch.float32):
    tol = 1e-10 if dt == torch.float64 else 1e-5
    l = make_layer(37, 29, 24, 40, dtype=dt, seed=1)
    args = [l[k] for k in ('input', 'hx', 'weight_ih', 'weight_hh', 'bias_ih', 'bias_hh')]
    lens = torch.randint(0, 38, (29,), generator=torch.Generator().manual_seed(2))
    for kw in (dict(), dict(lengths=lens, reverse=True, truncate=5)):
        a, b = functional.rnn(*args, **kw), reference.rnn(*args, **kw)
        assert_close(a[0], b[0], tol, 'rnn output')
        w = torch.randn_like(a[0])
        ga = torch.autograd.grad((a[0] * w).sum() + a[1].sum(), args)
        gb = torch.autograd.grad((b[0] * w).sum() + b[1].sum(), args)
        [assert_close(x, y, tol, 'rnn grad') for x, y in zip(ga, gb)]
    # The fused loss: the head's products and dW_out (O = 33) on the same choice.
    w_out = torch.randn(33, 40, dtype=dt, requires_grad=True)
    b_out = torch.randn(33, dtype=dt, requires_grad=True)
    for loss, tgt in (('mse', torch.randn(37, 29, 33, dtype=dt)), ('cross_entropy', torch.randint(0, 33, (37, 29)))):
        for mode in ('rnn_tanh', 'gru'):
            if mode == 'gru':
                d = make_gated('gru', 37, 29, 24, 40, dtype=dt, seed=3)
                largs = [d[k] for k in ('input', 'hx', 'weight_ih', 'weight_hh', 'bias_ih', 'bias_hh')]
            else:
                largs = args
            kw = dict(loss=loss, mode=mode, lengths=lens, reduction='seq_sum')
            a = functional.rnn_loss(largs[0], tgt, *largs[1:], w_out, b_out, **kw)
            b = reference.rnn_loss(largs[0], tgt, *largs[1:], w_out, b_out, **kw)
            assert_close(a, b, tol, 'loss')
            ga = torch.autograd.grad(a, largs + [w_out, b_out])
            gb = torch.autograd.grad(b, largs + [w_out, b_out])
            [assert_close(x, y, tol, mode + ' loss grad') for x, y in zip(ga, gb)]
# LSTM, H = 256: dW_hh [1024, 256] over T*B = 2145 rows, five chunks whose
# partial sums run in groups (float64: three groups; float32: two).
for dt in (torch.float64, torch.float32):
    tol = 1e-10 if dt == torch.float64 else 1e-5
    d = make_gated('lstm', 33, 65, 20, 256, dtype=dt, seed=4)
    got, want = run(functional, 'lstm', d), run(reference, 'lstm', d)
    [assert_close(x, y, tol, 'lstm') for x, y in zip(got[0] + got[1], want[0] + want[1]) if y is not None]
# Large products (a panel past 65536 elements, decided apart; so are the
# LSTM's above): a GRU with G = 3 * 347 = 1041 gate rows, and a
# cross-entropy head over 1031 classes on it.
for dt in (torch.float64, torch.float32):
    tol = 1e-10 if dt == torch.float64 else 1e-5
    d = make_gated('gru', 9, 7, 20, 347, dtype=dt, seed=5)
    got, want = run(functional, 'gru', d), run(reference, 'gru', d)
    [assert_close(x, y, tol, 'wide gru') for x, y in zip(got[0] + got[1], want[0] + want[1]) if y is not None]
    largs = [d[k] for k in ('input', 'hx', 'weight_ih', 'weight_hh', 'bias_ih', 'bias_hh')]
    w_out = torch.randn(1031, 347, dtype=dt, requires_grad=True)
    b_out = torch.randn(1031, dtype=dt, requires_grad=True)
    tgt = torch.randint(0, 1031, (9, 7), generator=torch.Generator().manual_seed(6))
    a = functional.rnn_loss(largs[0], tgt, *largs[1:], w_out, b_out, mode='gru')
    b = reference.rnn_loss(largs[0], tgt, *largs[1:], w_out, b_out, mode='gru')
    assert_close(a, b, tol, 'wide loss')
    ga = torch.autograd.grad(a, largs + [w_out, b_out])
    gb = torch.autograd.grad(b, largs + [w_out, b_out])
    [assert_close(x, y, tol, 'wide loss grad') for x, y in zip(ga, gb)]
print('ok')
"""


@pytest.mark.parametrize("backend", ["rnnkern", "blas"])
def test_each_backend_agrees_with_the_reference(backend):
    r = run_python(AGREEMENT.replace("WANT", repr(backend)), RNNKERN_GEMM=backend)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_a_wrong_setting_is_refused_by_name():
    code = ("import torch, rnnkern\n"
            "try:\n"
            "    rnnkern.gemm_backend()\n"
            "except ValueError as e:\n"
            "    print(e)\n"
            "x = torch.randn(5, 3, 32)\n"
            "try:\n"
            "    rnnkern.functional.rnn(x, None, torch.randn(32, 32), torch.randn(32, 32), None, None)\n"
            "except RuntimeError as e:\n"
            "    print(str(e).splitlines()[0])\n")
    r = run_python(code, RNNKERN_GEMM="mkl")
    want = "RNNKERN_GEMM must be 'auto', 'blas' or 'rnnkern', got 'mkl'"
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(want in line for line in lines), r.stdout

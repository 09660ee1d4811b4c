"""The products over all rows (input projection, head, dW_ih, dW_hh, dW_out)
run on BLAS or on rnnkern's register tiles, chosen once per process
(rnnkern.gemm_backend(), RNNKERN_GEMM). Whichever this machine's probe picks,
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


def test_the_choice_is_reported():
    name, source, tiles_s, blas_s = rnnkern._C.gemm_backend()
    assert name == rnnkern.gemm_backend() and name in ("rnnkern", "blas")
    assert source in ("probe", "RNNKERN_GEMM", "capability")
    if source == "probe":  # both were timed; the tiles win only by the margin
        assert tiles_s > 0 and blas_s > 0
        assert (name == "rnnkern") == (tiles_s * 1.15 < blas_s)


AGREEMENT = r"""
import sys, torch, rnnkern
sys.path.insert(0, 'tests')
from helpers import make_layer, assert_close
from rnnkern import functional, reference
from test_gated import make_gated, run
assert rnnkern._C.gemm_backend()[:2] == (WANT, 'RNNKERN_GEMM'), rnnkern._C.gemm_backend()
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

"""The CPU buffer cache (csrc/cpu/host_cache.*): per-call buffers of 4 MB or
more are kept when their tensor dies and reused by the next call. A reused
block holds the last call's values, so every case checks that a call on
reused blocks gives the bits of a call on fresh ones, and that the cache's
accounting, its cap, rnnkern.empty_cache() and RNNKERN_HOST_CACHE_MB do what
they say."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rnnkern
from rnnkern import functional, reference

MB = 2**20
# T*B*H*4 bytes = 16 MB: the Elman output and step gradients, the LSTM's and
# GRU's [T,B,4H] gates and step gradients are all past the 4 MB threshold.
T, B, I, H = 1024, 64, 5, 64


def problem(cell, seed):
    g = torch.Generator().manual_seed(seed)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell] * H
    x = torch.randn(T, B, I, generator=g)
    weights = [torch.randn(G, I, generator=g) / H**0.5, torch.randn(G, H, generator=g) / H**0.5,
               torch.randn(G, generator=g) * 0.1, torch.randn(G, generator=g) * 0.1]
    return x, weights


def run(cell, x, weights, **kw):
    xs = x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in weights]
    out, h_n = getattr(functional, cell)(xs, None, *ws, **kw)
    h_last = h_n[0] if cell == "lstm" else h_n
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * up).sum() + h_last.sum(), [xs, *ws])
    return [out.detach(), h_last.detach(), *grads]


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("lengths", [False, True])
def test_a_call_on_reused_blocks_gives_the_bits_of_a_call_on_fresh_ones(cell, lengths):
    rnnkern.empty_cache()
    x, weights = problem(cell, seed=3)
    kw = {"lengths": torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(4))} \
        if lengths else {}
    before = rnnkern.cache_info()
    fresh = run(cell, x, weights, **kw)
    after_fresh = rnnkern.cache_info()
    assert after_fresh["misses"] > before["misses"], "the call took no buffer from the cache"
    # Stale values in every kept block: a different problem's results.
    run(cell, *problem(cell, seed=5), **kw)
    hits = rnnkern.cache_info()["hits"]
    reused = run(cell, x, weights, **kw)
    assert rnnkern.cache_info()["hits"] > hits, "the call reused no kept block"
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)
    # And both are right: torch.nn on the same problem (padded, no lengths).
    if not lengths:
        nn = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](I, H)
        with torch.no_grad():
            for p, w in zip(nn.parameters(), weights):
                p.copy_(w)
            ref = nn(x)[0]
        torch.testing.assert_close(fresh[0], ref, rtol=1e-5, atol=1e-5)


def loss_problem(mode, seed, O):
    """A fused-loss problem whose head buffers are past the threshold: h's
    gradient [T*B,H] and W_out's [O,H] over 4 MB, the logits chunk and MKL's
    packed W_out copies as large or larger."""
    g = torch.Generator().manual_seed(seed)
    T_, B_, I_, H_ = 33, 127, 9, 257
    G = {"rnn_tanh": 1, "lstm": 4, "gru": 3}[mode] * H_
    x = torch.randn(T_, B_, I_, generator=g)
    target = torch.randint(0, O, (T_, B_), generator=g)
    weights = [torch.randn(G, I_, generator=g) / H_**0.5, torch.randn(G, H_, generator=g) / H_**0.5,
               torch.randn(G, generator=g) * 0.1, torch.randn(G, generator=g) * 0.1,
               torch.randn(O, H_, generator=g) / H_**0.5, torch.randn(O, generator=g) * 0.1]
    return x, target, weights


def run_loss(impl, x, target, weights, mode, **kw):
    xs = x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in weights]
    loss = impl.rnn_loss(xs, target, None, *ws, mode=mode, **kw)
    return [loss.detach(), *torch.autograd.grad(loss, [xs, *ws])]


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_fused_loss_on_reused_blocks_gives_the_bits_of_fresh_ones(mode, masked):
    """The loss head's buffers (h's and W_out's gradients, the logits chunk,
    the packed W_out, the transposed dW_out product) come from the cache too:
    allocated and freed at every call, they left glibc's heap fragmented
    (bench/loss_memory.py's peak growth moved between 1/5 and 1/9 of the
    baseline's). A kept block holds the last call's values, which a call must
    never read: every result keeps the bits of a call on fresh blocks."""
    O = 4099
    x, target, weights = loss_problem(mode, 12, O)
    kw = {}
    if masked:  # rows without a coefficient: the head gathers the others
        kw["loss_mask"] = torch.rand(target.shape, generator=torch.Generator().manual_seed(13)) < 0.7
    rnnkern.empty_cache()
    misses = rnnkern.cache_info()["misses"]
    fresh = run_loss(functional, x, target, weights, mode, **kw)
    assert rnnkern.cache_info()["misses"] > misses, "the call took no buffer from the cache"
    run_loss(functional, *loss_problem(mode, 14, O), mode, **kw)  # stale values in every kept block
    hits = rnnkern.cache_info()["hits"]
    reused = run_loss(functional, x, target, weights, mode, **kw)
    assert rnnkern.cache_info()["hits"] > hits, "the call reused no kept block"
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)
    # And right: the plain-autograd reference on the same problem.
    ref = run_loss(reference, x, target, weights, mode, **kw)
    for a, b in zip(fresh, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_poisoned_block_changes_no_result():
    """Under torch.use_deterministic_algorithms with fill_uninitialized_memory,
    a block from the cache is filled with NaN as at::empty's are, so a kernel
    reading a kept block's stale values turns a result NaN."""
    x, weights = problem("lstm", seed=8)
    normal = run("lstm", x, weights)
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        hits = rnnkern.cache_info()["hits"]
        poisoned = run("lstm", x, weights)
        assert rnnkern.cache_info()["hits"] > hits
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    for a, b in zip(normal, poisoned):
        assert torch.equal(a, b)


def test_empty_cache_frees_the_kept_blocks_and_not_the_held_ones():
    x, weights = problem("gru", seed=9)
    held = run("gru", x, weights)  # the output's block stays held
    info = rnnkern.cache_info()
    assert info["cached_bytes"] > 0 and info["in_use_bytes"] >= 16 * MB
    rnnkern.empty_cache()
    info = rnnkern.cache_info()
    assert info["cached_bytes"] == 0 and info["in_use_bytes"] >= 16 * MB
    assert torch.isfinite(held[0]).all()  # still readable
    in_use = info["in_use_bytes"]
    del held
    assert rnnkern.cache_info()["in_use_bytes"] < in_use


def test_a_kept_block_resizes_and_outlives_the_cache_as_any_tensor():
    x, weights = problem("rnn", seed=10)
    out = run("rnn", x, weights)[0]
    copy = out.clone()
    rnnkern.empty_cache()
    out.resize_(T + 3, B, H)  # past its block: a new one, the values copied
    assert torch.equal(out[:T], copy)


def _subprocess(code, env_value):
    env = dict(os.environ, RNNKERN_HOST_CACHE_MB=env_value)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


CALL = f"""
    import json, torch, rnnkern
    from test_host_cache import problem, run
    x, weights = problem("lstm", seed=11)
    a = run("lstm", x, weights)
    b = run("lstm", x, weights)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    print(json.dumps(rnnkern.cache_info()))
"""


@pytest.mark.parametrize("mb", [0, 20])
def test_the_cap_bounds_the_kept_bytes_in_a_subprocess(mb):
    r = _subprocess(CALL, str(mb))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["limit_bytes"] == mb * MB
    assert 0 <= info["cached_bytes"] <= mb * MB
    if mb == 0:
        assert info["hits"] == 0 and info["cached_bytes"] == 0


@pytest.mark.parametrize("value", ["lots", "-1", "1.5", " 8"])
def test_a_bad_cap_is_refused_by_name_in_a_subprocess(value):
    r = _subprocess(CALL, value)
    assert r.returncode != 0
    assert f"RNNKERN_HOST_CACHE_MB must be a whole number of MB >= 0, got '{value}'" in r.stderr

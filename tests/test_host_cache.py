"""The CPU buffer cache (csrc/cpu/host_cache.*): per-call buffers of 16 MB or
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
from rnnkern import functional

MB = 2**20
# T*B*H*4 bytes = 16 MB: the Elman output and step gradients, the LSTM's and
# GRU's [T,B,4H] gates and step gradients are all at least the 16 MB threshold.
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

"""The command-line tools: check (exit status, failure detection), bench
(tables, JSON, ratios) and demo."""

import gc
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import rnnkern
from rnnkern import bench, check, cli, functional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "rnnkern", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_check_single_config_passes():
    r = run_module("check", "-T", "6", "-B", "3", "-H", "5", "--lengths", "6,0,2",
                   "--truncate", "2", "--nonlinearity", "relu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed, 0 failed" in r.stdout
    assert "d_weight_hh" in r.stdout and "max rel err" in r.stdout


def test_check_single_config_keeps_zero_sizes_and_runs_every_cell():
    """-T 0 -B 0 checks T = B = 0 (not the defaults); --cell twice, both cells."""
    r = run_module("check", "-T", "0", "-B", "0", "--cell", "lstm", "--cell", "gru",
                   "--dtype", "float64")
    assert r.returncode == 0, r.stdout + r.stderr
    heads = [line for line in r.stdout.splitlines() if line.startswith("PASS")]
    assert [line.split()[1:4] for line in heads] == [["cell=lstm", "T=0", "B=0"],
                                                     ["cell=gru", "T=0", "B=0"]]


@pytest.mark.parametrize("argv, message", [
    (["--truncate", "0"], "truncate must be None or an int >= 1, got 0"),
    (["--lengths", "3,x"], "--lengths must be 'random' or comma-separated ints, got '3,x'"),
    (["--lengths", "1,2"], "lengths must be B = 5 ints in [0, T = 20], got [1, 2]"),
    (["-T", "3", "-B", "2", "--lengths", "1,4"], "lengths must be B = 2 ints in [0, T = 3], got [1, 4]"),
    (["--loss", "mse", "--reverse"], "reverse must be False with it, got True"),
    (["-H", "0"], "H must be an int >= 1, got 0"),
    (["-T", "-1"], "T must be an int >= 0, got -1"),
    (["--cell", "gru", "--nonlinearity", "relu"],
     "it must be 'tanh' (the default) with cell='gru', got 'relu'"),
])
def test_check_bad_option_is_a_usage_error(argv, message):
    r = run_module("check", "--dtype", "float64", *argv)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "rnnkern check: error:" in r.stderr and message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_gradcheck_of_the_per_step_loss_for_every_cell(cell, loss):
    res = rnnkern.gradcheck(T=7, B=3, I=5, H=6, cell=cell, loss=loss, lengths=[7, 0, 3],
                            truncate=2)
    assert res.passed, res.format()
    names = [e.name for e in res.errors]
    states = ["h_n", "c_n"] if cell == "lstm" else ["h_n"]
    tensors = ["input", "hx"] + (["cx"] if cell == "lstm" else []) + [
        "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_out", "bias_out"]
    assert names == ["loss", *states] + [f"d_{n}" for n in tensors]


def test_check_lets_a_kernels_value_error_through(monkeypatch):
    """Only the options are usage errors: a ValueError raised while the
    kernels run is a failure to see, with its traceback."""
    def broken(*args, **kw):
        raise ValueError("the kernel broke")

    monkeypatch.setattr(functional, "gru", broken)
    with pytest.raises(ValueError, match="the kernel broke"):
        cli.main(["check", "--cell", "gru", "-T", "4", "--dtype", "float64"])


def test_check_default_grid_covers_every_cells_loss():
    rows = list(check.grid(torch.float64, [None, "mse", "cross_entropy"]))
    for cell in check.CELLS:
        assert {r["loss"] for r in rows if r["cell"] == cell} == {None, "mse", "cross_entropy"}
    assert not any(r["loss"] is not None and r["reverse"] for r in rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradcheck_api_reports_every_tensor(dtype):
    res = rnnkern.gradcheck(T=9, B=4, I=3, H=7, lengths="random", truncate=3, dtype=dtype)
    assert res.passed
    names = [e.name for e in res.errors]
    assert names == ["output", "h_n", "d_input", "d_hx", "d_weight_ih", "d_weight_hh",
                     "d_bias_ih", "d_bias_hh"]
    assert all(e.max_rel <= check.TOLERANCE[dtype] for e in res.errors)


def test_check_detects_a_wrong_kernel(monkeypatch, capsys):
    """A kernel whose gradient is off by 0.1% must FAIL and exit 1."""
    real = functional.rnn

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.001

    def wrong_rnn(*args, **kw):
        out, h_n = real(*args, **kw)
        return Scale.apply(out), h_n

    monkeypatch.setattr(functional, "rnn", wrong_rnn)
    rc = cli.main(["check", "-T", "5", "-B", "2", "--dtype", "float64"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "0 passed, 1 failed" in out


def test_bench_tables_and_json(tmp_path, monkeypatch, capsys):
    tiny = [bench.Config("seed", 4, 6, 3, 5), bench.Config("long-lengths", 3, 12, 2, 4, lengths=True),
            bench.Config("long-truncate", 3, 12, 2, 4, truncate=5)]
    monkeypatch.setattr(bench, "SUITE", tiny)
    out_json = tmp_path / "bench.json"
    rc = cli.main(["bench", "--repeats", "2", "--threads", "1", "--json", str(out_json),
                   "--no-progress", "--cell", "rnn", "--cell", "lstm"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "1 threads" in text and "nn.RNN packed" in text and "nn.RNN chunked K=5" in text
    assert "nn.LSTM packed" in text and "nn.LSTM chunked K=5" in text and "nn.GRU" not in text
    data = json.loads(out_json.read_text())
    assert [(r["config"]["cell"], r["config"]["name"]) for r in data["results"]] == [
        (cell, name) for cell in ("rnn", "lstm") for name in ("seed", "long-lengths", "long-truncate")]
    assert set(data["machine_load"]) >= {"load1", "cores", "threads", "other_cores", "waited_share",
                                         "calibration_drift", "busy", "reasons"}
    assert data["contended_configs"] == [
        f"{r['config']['cell']} {r['config']['name']}" for r in data["results"] if r["contended"]]
    # One marker under each contended configuration, and a summary naming them
    # all (or none of either on a quiet machine): the test runs on a busy one too.
    busy = data["contended_configs"]
    assert text.count("CONTENDED: while this configuration was timed") == len(busy)
    assert ("marked CONTENDED: " + ", ".join(busy) + ". Rerun" in text) == bool(busy)
    assert text.count("marked CONTENDED:") == (1 if busy else 0)
    assert isinstance(data["noisy_rows"], list)
    assert "IQR/median" in text
    for r in data["results"]:
        impls = [row["impl"] for row in r["rows"]]
        assert impls[0] == "rnnkern" and "reference" in impls and r["baseline"] in impls
        assert r["other_cores"] is None or r["other_cores"] >= 0
        assert r["waited_share"] is None or 0 <= r["waited_share"] <= 1
        assert isinstance(r["contended"], bool)
        for row in r["rows"]:
            assert row["forward_ms"] > 0 and row["train_ms"] > 0
            assert row["train_min_ms"] <= row["train_ms"] <= row["train_max_ms"]
            assert row["forward_min_ms"] <= row["forward_ms"] <= row["forward_max_ms"]
            assert row["noisy"] == (max(row["forward_spread"], row["train_spread"])
                                    > bench.NOISY_SPREAD)
        s = bench.speedups(r)
        assert s["forward"] > 0 and s["train"] > 0
        plain = r["config"]["name"] == "seed"
        assert ("ceiling" in r) == plain  # only where the FLOP count is the config's own
        if plain:
            c = r["ceiling"]
            assert c["sgemm_gflops"] > 0 and c["forward_x"] > 0 and c["train_x"] > 0
    assert text.count("ceiling: the step's GEMM work alone") == 2


def test_bench_bfloat16_times_each_implementations_bfloat16_model(tmp_path, monkeypatch, capsys):
    """--dtype bfloat16: the problem's data and parameters are bfloat16, every
    implementation trains it (rnnkern's gradients are its float32 ones
    rounded), the header and the JSON say so, and no float32 ceiling is
    printed."""
    monkeypatch.setattr(bench, "SUITE", [bench.Config("seed", 4, 6, 3, 5)])
    out_json = tmp_path / "bench.json"
    rc = cli.main(["bench", "--repeats", "2", "--threads", "1", "--json", str(out_json),
                   "--no-progress", "--cell", "lstm", "--dtype", "bfloat16"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "1 threads, bfloat16, CPU kernels" in text and "ceiling" not in text
    data = json.loads(out_json.read_text())
    assert data["dtype"] == "bfloat16"
    (r,) = data["results"]
    assert {row["impl"] for row in r["rows"]} >= {"rnnkern", "nn.LSTM", "reference"}
    assert all(row["train_ms"] > 0 for row in r["rows"])
    cfg = bench.Config("seed", 4, 6, 3, 5, cell="gru")
    low, f32 = bench.Problem(cfg, dtype=torch.bfloat16), bench.Problem(cfg)
    assert all(q.dtype == torch.bfloat16 for q in low.params) and low.x.dtype == torch.bfloat16
    with torch.no_grad():
        for a, b in zip(f32.params, low.params):
            a.copy_(b.float())
    f32.x, f32.target = low.x.float(), low.target.float()
    for p in (low, f32):
        p.zero_grad()
        dict(bench.implementations(cfg))["rnnkern"](p)[1]()
    for a, b in zip(low.params, f32.params):
        assert a.grad.dtype == torch.bfloat16 and torch.equal(a.grad, b.grad.bfloat16())


def test_bench_tiny_reports_the_autograd_floor(monkeypatch, capsys, tmp_path):
    """The tiny configuration (per-call cost) reports torch's autograd alone on
    the step's parameters, timed with the implementations; no other does."""
    monkeypatch.setattr(bench, "SUITE", [bench.Config("tiny", 1, 1, 1, 1),
                                         bench.Config("seed", 2, 3, 2, 3)])
    out_json = tmp_path / "bench.json"
    rc = cli.main(["bench", "--repeats", "3", "--threads", "1", "--json", str(out_json),
                   "--no-progress", "--no-reference", "--cell", "gru"])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.count("floor: torch's autograd alone on the step's 6 parameters") == 1
    tiny, seed = json.loads(out_json.read_text())["results"]
    f = tiny["autograd_floor"]
    assert f["params"] == 6 and 0 < f["train_min_ms"] <= f["train_ms"]
    assert "autograd_floor" not in seed


def test_bench_autograd_floor_step_reaches_every_parameter():
    """The floor's step is a real backward: every parameter gets a gradient of
    ones (d sum_p sum(p) / dp), and the step starts from zero_grad."""
    p = bench.Problem(bench.Config("tiny", 1, 1, 1, 1, cell="lstm"))
    step = bench.autograd_floor(p)
    for _ in range(2):  # a second step must not accumulate onto the first
        step()
        for w in p.params:
            assert w.grad is not None and torch.equal(w.grad, torch.ones_like(w))


def test_bench_training_steps_compute_the_same_loss_gradients():
    """Every implementation the bench times trains the same problem: their
    gradients agree with rnnkern's (the ratios compare equal work)."""
    for cfg in [bench.Config(n, 3, 12, 2, 4, lengths=n == "l", truncate=5 if n == "k" else None,
                             cell=cell) for cell in bench.CELLS for n in ("t", "l", "k")]:
        p = bench.Problem(cfg)
        grads = {}
        for name, make in bench.implementations(cfg):
            if name == cfg.nn_name and cfg.lengths:
                continue  # runs the padding: a speed baseline, not the same computation
            if name == cfg.nn_name and cfg.truncate:
                continue  # full BPTT
            p.zero_grad()
            make(p)[1]()
            grads[name] = [q.grad.clone() for q in p.params]
        ours = grads.pop("rnnkern")
        for name, g in grads.items():
            for a, b in zip(ours, g):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (cfg, name)


def test_demo_runs():
    r = run_module("demo", "--steps", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("PASS") == 6


def test_bench_plot_png_or_clear_error(tmp_path):
    results = [{"config": {"name": n, "cell": "rnn"}, "baseline": "nn.RNN",
                "rows": [{"impl": "rnnkern", "forward_ms": 1.0, "train_ms": 2.0},
                         {"impl": "nn.RNN", "forward_ms": 3.0, "train_ms": 9.0}]}
               for n in ("seed", "long")]
    out = tmp_path / "bench.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="--plot needs matplotlib"):
            bench.plot(results, str(out))
        return
    bench.plot(results, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_installed():
    script = os.path.join(os.path.dirname(sys.executable), "rnnkern")
    assert os.path.exists(script), "pip install -e . installs the rnnkern console script"
    r = subprocess.run([script, "check", "-T", "3", "-B", "2", "--dtype", "float64"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 passed, 0 failed" in r.stdout, r.stdout + r.stderr


def test_bench_spread_flags_noisy_repeats():
    """The interquartile range over the median: 0 for equal repeats, large when
    one machine hiccup dominates; a row past NOISY_SPREAD is flagged."""
    assert bench.spread([2.0, 2.0, 2.0, 2.0, 2.0]) == 0.0
    assert abs(bench.spread([1.0, 2.0, 3.0, 4.0, 5.0]) - 2.0 / 3.0) < 1e-12
    quiet = bench.Row("rnnkern", 1.0, 2.0, None, forward_spread=0.05, train_spread=0.1)
    loud = bench.Row("nn.RNN", 1.0, 2.0, None, forward_spread=0.05, train_spread=0.9)
    assert not quiet.noisy and loud.noisy


def test_bench_times_in_a_new_order_each_repeat_with_the_gc_off(monkeypatch):
    """run_config interleaves the implementations in a shuffled order (no one
    is always timed right after another) and keeps Python's cyclic GC off
    while timing only: it is back on afterwards."""
    log = []

    def recording(name):
        def make(problem):
            def fwd():
                log.append((name, gc.isenabled()))
            return fwd, fwd
        return make

    names = ("rnnkern", "nn.RNN", "nn.RNN packed")
    monkeypatch.setattr(bench, "implementations", lambda cfg, with_reference, baselines_only: [
        (n, recording(n)) for n in names])
    cfg = bench.Config("t", 2, 3, 2, 3, lengths=True)  # no ceiling: no sgemm timing
    bench.run_config(cfg, repeats=12, warmup=0, with_reference=False, progress=lambda s: None)
    timed = [entry for entry in log[:12 * 6]]
    assert not any(on for _, on in timed), "the GC ran during the timing"
    orders = {tuple(n for n, _ in timed[r * 6:(r + 1) * 6:2]) for r in range(12)}
    assert len(orders) > 2 and all(sorted(o) == sorted(names) for o in orders), orders
    assert gc.isenabled()


def test_bench_times_a_short_call_in_a_loop_and_reports_per_call():
    """A call shorter than MIN_TIMING_S is timed in a loop of calls, so many
    that the loop lasts MIN_TIMING_S (at most MAX_CALLS_PER_TIMING), and the
    figure is the loop's time over the count; a long call is timed alone."""
    assert bench.calls_per_timing(bench.MIN_TIMING_S) == 1
    assert bench.calls_per_timing(3.0) == 1
    assert bench.calls_per_timing(bench.MIN_TIMING_S / 4) == 4
    assert bench.calls_per_timing(bench.MIN_TIMING_S / 4.5) == 5
    assert bench.calls_per_timing(1e-9) == bench.MAX_CALLS_PER_TIMING
    log = []
    clock = iter([10.0, 10.7])  # one timing of 7 calls: 0.7 s in all

    def fake_time_once(fn):
        t0 = next(clock)
        fn()
        return next(clock) - t0

    per_call = bench.time_calls(fake_time_once, lambda: log.append(1), 7)
    assert len(log) == 7 and abs(per_call - 0.1) < 1e-12
    clock = iter([1.0, 3.5])
    assert bench.time_calls(fake_time_once, lambda: log.append(1), 1) == 2.5 and len(log) == 8


def test_bench_sets_the_calls_per_timing_from_the_warm_up(monkeypatch):
    """run_config's warm-up sets each implementation's and phase's calls per
    timing; every repeat then makes that many calls, and the row records it."""
    counts = {"fast": 0, "slow": 0}

    def make(name, seconds):
        def fn():
            counts[name] += 1
            time.sleep(seconds)
        return lambda problem: (fn, fn)

    monkeypatch.setattr(bench, "implementations", lambda cfg, with_reference, baselines_only: [
        ("fast", make("fast", 0.0)), ("slow", make("slow", 1.5 * bench.MIN_TIMING_S))])
    cfg = bench.Config("t", 2, 3, 2, 3, lengths=True)
    result = bench.run_config(cfg, repeats=3, warmup=1, with_reference=False,
                              progress=lambda s: None, quick=True)
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["slow"]["forward_calls"] == rows["slow"]["train_calls"] == 1
    assert counts["slow"] == 2 + 3 * 2  # quick: no peak-memory call
    n_f, n_t = rows["fast"]["forward_calls"], rows["fast"]["train_calls"]
    assert n_f > 1 and n_t > 1
    assert counts["fast"] == 2 + 3 * (n_f + n_t)
    assert rows["fast"]["peak_mb"] is None and rows["slow"]["peak_mb"] is None


def test_quick_bench_times_only_the_baselines_of_lengths_and_truncate():
    """The quick suite leaves the padded, unchunked module out where it is not
    the baseline (lengths, truncate); the full suite keeps it."""
    for cfg in bench.suite():
        full = [n for n, _ in bench.implementations(cfg, with_reference=False)]
        quick = [n for n, _ in bench.implementations(cfg, with_reference=False,
                                                     baselines_only=True)]
        assert full[0] == quick[0] == "rnnkern" and bench.baseline_name(cfg) in quick
        if cfg.lengths or cfg.truncate:
            assert cfg.nn_name in full and quick == ["rnnkern", bench.baseline_name(cfg)]
        else:
            assert quick == full


@pytest.mark.parametrize("cell, gates", [("rnn", 1), ("lstm", 4), ("gru", 3)])
def test_bench_ceiling_is_the_gemm_work_at_the_sgemm_rate(cell, gates):
    """The ceiling line: the baseline's time over the time the configuration's
    multiply-adds take at the given GFLOP/s, counted here by hand for one
    layer: x W_ih^T and h W_hh^T each step (G = gates * H rows), the head
    (O = I outputs), and backward twice the forward."""
    B, T, I, H = 3, 7, 5, 11
    cfg = bench.Config("small", B, T, I, H, cell=cell)
    G = gates * H
    fwd = T * (2 * B * I * G + 2 * B * H * G)
    train = 3 * (fwd + T * 2 * B * H * I)
    base = bench.Row("nn", forward_ms=2.0, train_ms=5.0, peak_mb=None)
    c = bench.ceiling(cfg, base, gflops=40.0)
    assert c["sgemm_gflops"] == 40.0
    assert abs(c["forward_x"] - 2.0e-3 / (fwd / 40e9)) < 1e-9 * c["forward_x"]
    assert abs(c["train_x"] - 5.0e-3 / (train / 40e9)) < 1e-9 * c["train_x"]
    first = bench.peak_sgemm_gflops(repeats=2)
    assert first > 0 and bench.peak_sgemm_gflops(repeats=1) >= first  # the run's best so far


def test_bench_machine_load_reports_a_verdict():
    load = bench.machine_load(calibration_s=0.01, sample_s=0.05)
    assert load["cores"] >= 1 and load["calibration_drift"] >= 0
    assert load["threads"] == torch.get_num_threads()
    assert load["other_cores"] is None or load["other_cores"] >= 0
    assert load["waited_share"] is None or 0 <= load["waited_share"] <= 1
    assert load["busy"] == bool(load["reasons"])


def spin(n):
    """n processes that spin on the CPU until killed, already spinning."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.3)
    return procs


def stop(procs):
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.skipif(bench.cpu_snapshot() is None, reason="no /proc/stat on this OS")
@pytest.mark.parametrize("threads", [1, 2])
def test_bench_machine_load_sees_other_processes_spinning(threads):
    """As many spinning processes as cores, beside the bench's threads, make
    it busy, whatever ran in the minute before (the load average lags)."""
    cores = bench.cpu_snapshot().cpus
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    procs = spin(cores)
    try:
        load = bench.machine_load(calibration_s=0.01, sample_s=0.5)
    finally:
        stop(procs)
        torch.set_num_threads(was)
    assert load["other_cores"] > 0.5, load  # their fair share: cores * cores / (cores + threads)
    assert load["waited_share"] is None or load["waited_share"] > bench.WAIT_LIMIT, load
    assert load["busy"] and any("waited for a CPU" in r or "other processes are using" in r
                                for r in load["reasons"]), load


@pytest.mark.skipif(bench.cpu_snapshot() is None, reason="no /proc/stat on this OS")
def test_bench_marks_a_configuration_timed_beside_spinning_processes(tmp_path, monkeypatch, capsys):
    """A neighbour that starts after the busy check still shows: each
    configuration measures what other processes ran while it was timed. Twice
    as many spinners as cores: with only as many, the bench's one thread went
    through a short timing unqueued (waited 0-4%) in 2 of 6 runs on the Intel
    Xeon, as a fair scheduler may."""
    monkeypatch.setattr(bench, "SUITE", [bench.Config("seed", 4, 6, 3, 5)])
    monkeypatch.setattr(bench, "machine_load", lambda: {"busy": False, "reasons": []})
    procs = spin(2 * bench.cpu_snapshot().cpus)
    try:
        rc = cli.main(["bench", "--quick", "--threads", "1", "--no-progress", "--cell", "gru",
                       "--json", str(tmp_path / "b.json")])
    finally:
        stop(procs)
    assert rc == 0
    text = capsys.readouterr().out
    data = json.loads((tmp_path / "b.json").read_text())
    (r,) = data["results"]
    assert r["contended"] and r["other_cores"] > 0.5, {k: r.get(k) for k in ("contended", "other_cores", "waited_share")}
    assert data["contended_configs"] == ["gru seed"]
    assert "CONTENDED: while this configuration was timed" in text
    assert "marked CONTENDED: gru seed" in text and "Rerun on a quiet machine" in text


def snap(wall, own, busy, ran=None, waited=None, cpus=4):
    return bench.CpuSnapshot(wall, own, busy, cpus, ran, waited)


def test_bench_contention_from_snapshots():
    """other_cores: the machine's busy time less this process's, over the wall
    time. waited_share: this process's threads' wait over their run + wait.
    Contended on the wait where the kernel keeps schedstat, else when other
    processes leave the bench's threads fewer idle cores than they need."""
    a, b = snap(10.0, 3.0, 100.0, 5.0, 1.0), snap(12.0, 6.0, 105.0, 8.0, 2.0)
    assert bench.other_cores(a, b) == pytest.approx(1.0)  # (5 - 3) s busy elsewhere in 2 s
    assert bench.other_cores(a, snap(12.0, 8.0, 105.0)) == 0.0  # never negative (tick rounding)
    assert bench.other_cores(None, b) is None and bench.other_cores(b, a) is None
    assert bench.waited_share(a, b) == pytest.approx(1.0 / 4.0)  # waited 1 s, ran 3 s
    assert bench.waited_share(snap(0, 0, 0), snap(1, 1, 1)) is None  # no schedstat
    assert bench.waited_share(a, snap(12.0, 6.0, 105.0, 5.0, 1.0)) is None  # nothing ran
    assert bench.contended(bench.WAIT_LIMIT + 0.01, 0.0, cores=4, threads=2)
    assert not bench.contended(bench.WAIT_LIMIT - 0.01, 3.9, cores=4, threads=2)  # the wait decides
    assert not bench.contended(None, 1.0, cores=4, threads=2)  # two cores spare, one taken
    assert bench.contended(None, 2.5, cores=4, threads=2)
    assert bench.contended(None, bench.SPARE_CORES + 0.01, cores=2, threads=2)
    assert not bench.contended(None, bench.SPARE_CORES - 0.01, cores=2, threads=2)
    assert not bench.contended(None, None, cores=2, threads=2)
    c = bench.contention(a, b)
    assert c["cores"] == 4 and c["contended"] == (0.25 > bench.WAIT_LIMIT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_device_cuda_without_a_gpu_is_a_clear_error():
    r = run_module("bench", "--device", "cuda", "--quick", "--no-progress")
    assert r.returncode != 0
    assert "rnnkern bench --device cuda: no CUDA GPU is available" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "", r.stdout  # refused before any timing


def test_bench_device_cuda_refusals(monkeypatch):
    """Either reason, whatever this machine has: no GPU, or an rnnkern built
    without its CUDA backend."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"no CUDA GPU is available \(torch.cuda.is_available\(\) "
                                         r"is False; torch .* is a"):
        cli.main(["bench", "--device", "cuda", "--quick", "--no-progress"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    with pytest.raises(SystemExit, match=r"rnnkern was built without its CUDA backend \(no CUDA "
                                         r"kernel for elman_fwd, .*\); rebuild it with "
                                         r"RNNKERN_CUDA=1"):
        cli.main(["bench", "--device", "cuda", "--quick", "--no-progress"])


def test_bench_steady_malloc_keeps_freed_buffers_resident():
    """After steady_malloc (which the CPU bench calls before timing), a buffer
    freed by one call is reused by the next, not faulted in again page by page.
    In a subprocess: the setting is process-wide."""
    code = (
        "import resource, torch\n"
        "from rnnkern import bench\n"
        "got = bench.steady_malloc()\n"
        "assert got is not None and '32 MB' in got and '512 MB' in got, got\n"
        "def churn():\n"
        "    for _ in range(20):\n"
        "        t = torch.empty(3 * 2**20)  # 12 MB, 3072 pages\n"
        "        t.fill_(1.0)\n"
        "        del t\n"
        "churn()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "churn()\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "assert faults < 3072, f'{faults} page faults for 20 reuses of one 12 MB buffer'\n"
        "print('ok', faults)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")

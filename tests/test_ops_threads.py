"""fastrnn.ops from several Python threads at once: each call gets the
results it would get alone; workspaces are independent of each other; the
kernel thread count does not change results."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastrnn
from fastrnn import _backend

ITERATIONS = 12     # calls per problem and thread


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_concurrent_calls_match_sequential(backend, kind, rng, kernels):
    # Two threads, each with its own problem (different shapes and masks).
    problems = [
        kernels.make_problem(rng, kind, 4, 20, 6, 17, np.float64,
                             mask="random"),
        kernels.make_problem(rng, kind, 3, 25, 5, 9, np.float64,
                             go_backwards=True),
    ]
    expected = [kernels.run_ops(p, backend) for p in problems]

    def work(i):
        return [kernels.run_ops(problems[i], backend) for _ in range(ITERATIONS)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(work, i) for i in (0, 1, 0, 1)]
        results = [f.result() for f in futures]
    for i, runs in zip((0, 1, 0, 1), results):
        for r in runs:
            kernels.assert_results_close(r, expected[i], f"{backend} thread {i}")


def test_workspaces_are_independent(backend, rng, kernels):
    """Two forwards, then their backwards in the other order, equal each
    forward-backward pair run alone."""
    from fastrnn import ops
    p = [kernels.make_problem(rng, "lstm", 3, 6, 4, 5, np.float32,
                              mask=mask) for mask in (None, "left_padded")]
    alone = [kernels.run_ops(q, backend) for q in p]
    ws = [ops.lstm_forward(q["x"], q["kernel"], q["recurrent_kernel"],
                           q["bias"], q["h0"], q["c0"], mask=q["mask"],
                           backend=backend, return_workspace=True).workspace
          for q in p]
    for i in (1, 0):
        g = ops.lstm_backward(ws[i], p[i]["d_outputs"], p[i]["d_h"],
                              p[i]["d_c"])
        np.testing.assert_array_equal(g.x, alone[i]["d_x"])
        np.testing.assert_array_equal(g.recurrent_kernel,
                                      alone[i]["d_recurrent_kernel"])


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_thread_count_does_not_change_results(backend, kind, rng, kernels,
                                              monkeypatch):
    monkeypatch.setattr(_backend, "_num_threads", None)
    p = kernels.make_problem(rng, kind, 8, 10, 5, 33, np.float64,
                             mask="random")
    fastrnn.set_num_threads(1)
    one = kernels.run_ops(p, backend)
    fastrnn.set_num_threads(2)
    assert fastrnn.get_num_threads() == 2
    kernels.assert_results_close(kernels.run_ops(p, backend), one, backend)


COMPILED = [b for b in ("cython", "numba") if b in fastrnn.available_backends()]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_concurrent_calls_share_the_team_safely(backend, kind, rng, kernels,
                                                monkeypatch):
    """Three Python threads call multi-threaded kernels at once (cython: one
    gets the team, the others run on their own threads; numba: they share
    the worker pool); all results are right.  B = 5 splits hidden units,
    B = 9 and 12 batch rows."""
    kernels.threads_at_any_size(monkeypatch, 2)
    problems = [kernels.make_problem(rng, kind, B, 30, 6, 40, np.float64,
                                     mask="random" if i else None)
                for i, B in enumerate((5, 9, 12))]
    expected = [kernels.run_ops(p, "numpy") for p in problems]

    def work(i):
        return [kernels.run_ops(problems[i], backend) for _ in range(ITERATIONS)]

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(work, range(3)))
    for i, runs in enumerate(results):
        for r in runs:
            kernels.assert_results_close(r, expected[i], f"thread {i}")


def _child(conn, run_ops, p, backend):
    # fork copies the parent's settings (threads everywhere, 2 threads)
    conn.send(run_ops(p, backend))
    conn.close()


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("B, H", [(4, 48), (8, 16)], ids=["units-split", "rows-split"])
def test_threads_work_in_a_forked_child(backend, B, H, rng, kernels, monkeypatch):
    """After the parent has started its kernel threads, a fork()ed child
    (multiprocessing's default on Linux) gets working threads of its own."""
    import multiprocessing as mp
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork() on this platform")
    kernels.threads_at_any_size(monkeypatch, 2)
    p = kernels.make_problem(rng, "lstm", B, 12, 5, H, np.float64)
    parent = kernels.run_ops(p, backend)           # threads now exist
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, kernels.run_ops, p, backend))
    proc.start()
    assert recv.poll(120), "the child produced nothing in 120 s (hung?)"
    child = recv.recv()
    proc.join(30)
    assert proc.exitcode == 0
    kernels.assert_results_close(child, parent, "forked child")


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B, H, split", [(16, 16, "rows"), (5, 48, "units")])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_late_workers(kind, dtype, B, H, split, go_backwards, rng, kernels,
                      monkeypatch):
    """Workers that start 20 ms late (on purpose): a row-split call does
    their share itself and they skip it (counted), a unit-split call waits
    for them; the results are right either way, forward and backward, with
    masks, read forwards (x batch-major: each block of rows projects its
    own) and backwards (a time-major copy, projected in pieces first)."""
    from fastrnn import _cykernels
    kernels.threads_at_any_size(monkeypatch, 2)
    assert _cykernels.team_plan(2, B, H) == (2, split)
    p = kernels.make_problem(rng, kind, B, 9, 5, H, dtype, mask="random",
                             go_backwards=go_backwards)
    expected = kernels.run_ops(p, "numpy")
    kernels.run_ops(p, "cython")                    # the workers exist
    before = _cykernels.team_stats()["skipped_workers"]
    _cykernels._set_worker_delay_us(20000)
    try:
        got = kernels.run_ops(p, "cython")
    finally:
        _cykernels._set_worker_delay_us(0)
    kernels.assert_results_close(got, expected, f"{split} split")
    skipped = _cykernels.team_stats()["skipped_workers"] - before
    if split == "rows":
        assert skipped >= 1      # at least one of its forward/backward calls
    else:
        assert skipped == 0


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_threaded_calls_prime_the_team_first(kind, rng, kernels, monkeypatch):
    """fastrnn.ops wakes the team's sleeping workers (prime_team) before it
    checks and allocates for a threaded call, so that their wake-up
    overlaps that work; a call on one thread wakes nobody."""
    from fastrnn import _cykernels
    events = []
    monkeypatch.setattr(_cykernels, "prime_team", lambda: events.append("prime"))
    for name in (f"{kind}_forward", f"{kind}_backward"):
        def logged(*args, _real=getattr(_cykernels, name), _name=name, **kw):
            events.append(_name)
            return _real(*args, **kw)
        monkeypatch.setattr(_cykernels, name, logged)
    kernels.threads_at_any_size(monkeypatch, 2)
    p = kernels.make_problem(rng, kind, 8, 5, 3, 16, np.float32)
    expected = kernels.run_ops(p, "numpy")
    got = kernels.run_ops(p, "cython")    # inference, training, backward
    fwd, bwd = f"{kind}_forward", f"{kind}_backward"
    assert events == ["prime", fwd, "prime", fwd, "prime", bwd]
    kernels.assert_results_close(got, expected, "primed calls")
    events.clear()
    monkeypatch.setattr(_backend, "_num_threads", 1)
    kernels.run_ops(p, "cython")
    assert events == [fwd, fwd, bwd]


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
def test_prime_wakes_sleeping_workers(rng, kernels, monkeypatch):
    """Once the team's workers sleep (idle for more than 50 us), prime_team
    wakes them (counted); a threaded call right after is still right."""
    import time
    from fastrnn import _cykernels
    kernels.threads_at_any_size(monkeypatch, 2)
    p = kernels.make_problem(rng, "lstm", 6, 4, 3, 16, np.float64)
    expected = kernels.run_ops(p, "numpy")
    kernels.run_ops(p, "cython")          # the workers exist
    for _ in range(100):                  # (a loaded machine may be slow to let them sleep)
        time.sleep(0.01)
        before = _cykernels._team_primes()
        _cykernels.prime_team()
        if _cykernels._team_primes() > before:
            break
    else:
        pytest.fail("prime_team never found a sleeping worker to wake")
    kernels.assert_results_close(kernels.run_ops(p, "cython"), expected,
                                 "right after a prime")

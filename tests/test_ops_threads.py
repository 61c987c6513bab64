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

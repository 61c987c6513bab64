"""The compiled kernels' multi-threaded paths against the reference: hidden
units split between threads (a barrier per step; at batch 1 each thread's
columns of U are packed once for one GEMV per step), and batch rows split
between threads (when there are more threads than 16-unit chunks).

These tests keep every call on the kernels' own threads (see
``fastrnn._backend.thread_plan``) and ask for 2, 3 and 8 threads, so rows
and units split unevenly, units into slices that are not a multiple of the
SIMD width, and into fewer slices than threads.
"""
import os

import numpy as np
import pytest

import fastrnn
from fastrnn import _backend, ops

COMPILED = [b for b in ("cython", "numba") if b in fastrnn.available_backends()]


@pytest.fixture
def threaded(monkeypatch, kernels):
    kernels.threads_at_any_size(monkeypatch)
    old = _backend.get_num_threads()
    yield
    fastrnn.set_num_threads(old)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("H", [1, 17, 40, 67])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("B", [1, 3, 13],
                         ids=["batch1-packed-units", "units-split", "rows-split"])
def test_threaded_kernels_match_reference(threaded, backend, threads, H, kind,
                                          masked, B):
    fastrnn.set_num_threads(threads)
    rng = np.random.default_rng(H * 31 + threads + B)
    T, I = 9, 5
    G = 4 if kind == "lstm" else 1
    x = rng.standard_normal((B, T, I))
    W = rng.standard_normal((I, G * H)) / np.sqrt(I)
    U = rng.standard_normal((H, G * H)) / np.sqrt(H)
    b = rng.standard_normal(G * H) * 0.1
    h0 = rng.standard_normal((B, H))
    c0 = rng.standard_normal((B, H))
    mask = rng.random((B, T)) > 0.3 if masked else None
    d_out = rng.standard_normal((B, T, H))
    d_h = rng.standard_normal((B, H))

    def run(be):
        if kind == "lstm":
            r = ops.lstm_forward(x, W, U, b, h0, c0, mask=mask,
                                 return_workspace=True, backend=be)
            return list(r[:3]) + list(ops.lstm_backward(r.workspace, d_out, d_h, h0))
        r = ops.rnn_forward(x, W, U, b, h0, mask=mask, return_workspace=True,
                            backend=be)
        return list(r[:2]) + list(ops.rnn_backward(r.workspace, d_out, d_h))

    for got, want in zip(run(backend), run("numpy")):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
@pytest.mark.skipif(bool(os.environ.get("FASTRNN_SPLIT")),
                    reason="FASTRNN_SPLIT forces a split (a measurement knob)")
@pytest.mark.parametrize("threads, B, H, plan", [
    (1, 64, 256, (1, "units")),     # one thread: serial
    (2, 1, 256, (2, "units")),      # batch 1: units
    (2, 64, 256, (2, "units")),     # units whenever there are enough
    (8, 3, 40, (3, "units")),       # 3 chunks of 16 units, too few rows
    (2, 13, 1, (2, "rows")),        # 1 chunk of units, 13 rows
    (3, 13, 17, (3, "rows")),       # 2 chunks, 3 threads, >= 4 rows each
    (3, 13, 20, (3, "rows")),       # test_ops_chunks' B = 13 case
    (3, 4, 20, (2, "units")),       # test_ops_chunks' B = 4 case
    (8, 13, 1, (1, "units")),       # not enough rows for 8, one chunk
    (2, 128, 64, (2, "rows")),      # small layer, many rows
    (2, 128, 65, (2, "units")),     # past FR_SMALL_H
    (2, 7, 64, (2, "units")),       # small layer, too few rows
])
def test_team_plan(threads, B, H, plan, monkeypatch):
    """Which split the tests above exercise (and the rule itself)."""
    from fastrnn import _cykernels
    assert _cykernels.team_plan(threads, B, H) == plan
    assert _cykernels.team_plan(threads, B, H, G=4) == plan   # LSTM forward: the same


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
@pytest.mark.skipif(bool(os.environ.get("FASTRNN_SPLIT")),
                    reason="FASTRNN_SPLIT forces a split (a measurement knob)")
@pytest.mark.parametrize("threads, B, H, plan", [
    (2, 32, 128, (2, "rows")),      # an RNN step of 128 units: rows
    (2, 64, 256, (2, "rows")),      # up to 4 * FR_SMALL_H
    (2, 64, 257, (2, "units")),     # past it
    (2, 7, 128, (2, "units")),      # too few rows
    (3, 13, 67, (3, "rows")),       # test_threaded_kernels_match_reference's rows case
    (2, 1, 256, (2, "units")),      # batch 1
])
def test_rnn_forward_team_plan(threads, B, H, plan):
    """The RNN forward splits rows for steps up to 256 units wide (its
    backward, as the LSTM's, from 64 units on splits the units)."""
    from fastrnn import _cykernels
    assert _cykernels.team_plan(threads, B, H, G=1) == plan
    if H > 64 and B > 1:
        assert _cykernels.team_plan(threads, B, H)[1] == "units"


@pytest.mark.skipif("numba" not in fastrnn.available_backends(),
                    reason="numba is not installed")
@pytest.mark.parametrize("threads, B, G, H, plan", [
    (1, 64, 4, 256, ("rows", [(0, 64)])),               # one thread: serial
    (2, 1, 4, 256, ("units", [(0, 128), (128, 256)])),  # batch 1, 262K
    (2, 1, 1, 256, ("units", [(0, 128), (128, 256)])),  # batch 1, 65K
    (2, 1, 1, 128, ("rows", [(0, 1)])),                 # batch 1, 16K: serial
    (2, 16, 4, 512, ("units", [(0, 256), (256, 512)])),     # 16.8M
    (2, 64, 4, 256, ("rows", [(0, 32), (32, 64)])),     # 16.8M, 32 rows each
    (2, 32, 4, 128, ("rows", [(0, 16), (16, 32)])),     # 2.1M, rows fit
    (8, 3, 4, 40, ("rows", [(0, 3)])),                  # 19K: serial
    (2, 7, 4, 64, ("units", [(0, 32), (32, 64)])),      # too few rows, 115K
    (2, 7, 1, 64, ("rows", [(0, 7)])),                  # too few rows, 29K: serial
    (2, 7, 4, 96, ("units", [(0, 48), (48, 96)])),      # too few rows, 258K
    (2, 13, 1, 1, ("rows", [(0, 6), (6, 13)])),         # one unit slice
])
def test_numba_split_plan(threads, B, G, H, plan):
    """The numba backend's split (the tests above run both)."""
    from fastrnn import _numba_kernels
    assert _numba_kernels._split_plan(B, G, H, threads) == plan


def _lstm_kernel_inputs(rng, T, B, I, H, dtype):
    """x (T, B, I) time-major, W, U, bias and a uint8 mask (T, B) for the C
    LSTM kernels called directly."""
    x = rng.standard_normal((T, B, I)).astype(dtype)
    W = (rng.standard_normal((I, 4 * H)) / 3).astype(dtype)
    U = (rng.standard_normal((H, 4 * H)) / 7).astype(dtype)
    b = (rng.standard_normal(4 * H) / 5).astype(dtype)
    mask = (rng.random((T, B)) > 0.2).astype(np.uint8)
    return x, W, U, b, mask


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B, H", [(1, 40), (3, 40), (6, 40), (7, 33), (13, 40), (9, 67),
                                  (20, 16), (17, 1), (16, 64), (8, 96)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_with_packed_weights_matches_plain_blas(training, threads, B, H,
                                                        dtype):
    """The C LSTM forward with its work scratch (float32: the threads' U
    packed in panels for the register-blocked product, one-row path at
    batch 1; float64 at batch 1 with threads: one GEMV per step on packed
    columns) against the same call without it (BLAS on U as it is)."""
    from fastrnn import _cykernels
    rng = np.random.default_rng(B * 100 + H + threads)
    T, I = 7, 5
    x, W, U, b, mask = _lstm_kernel_inputs(rng, T, B, I, H, dtype)
    h0 = rng.standard_normal((B, H))
    runs = []
    for work in (np.empty(_cykernels.lstm_forward_work_len(B, I, H, threads), dtype),
                 np.empty(0, dtype)):
        hs = np.zeros((2, B, H), dtype)
        hs[0] = h0
        cs = np.zeros((T + 1 if training else 2, B, H), dtype)
        gates = np.empty((T, B, 4 * H), dtype)
        out = np.full((B, T, H), np.nan, dtype)
        _cykernels.lstm_forward(x, W, U, b, mask, hs, cs, gates, out, work, training,
                                threads)
        runs.append((hs, cs, gates if training else None, out))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    taken = mask.astype(bool)       # masked rows' gates are scratch, not output
    for k, (got, want) in enumerate(zip(runs[0], runs[1])):
        if want is not None:
            np.testing.assert_allclose(got[taken] if k == 2 else got,
                                       want[taken] if k == 2 else want, **tol)
    hs, _, _, out = runs[0]
    # the last state is in slot T % 2 (and the outputs hold every step's)
    np.testing.assert_array_equal(out[:, -1], hs[T % 2])


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B, I", [(1, 5), (3, 0), (9, 5), (20, 100), (64, 3)])
@pytest.mark.parametrize("layer", ["lstm", "rnn"])
def test_forward_reads_x_batch_major_as_the_time_major_copy(layer, B, I, threads,
                                                            dtype, backend):
    """The forward kernels read x batch-major (batch_major=True: each batch
    row's run of steps projected as one block, into rows B apart) with the
    results of its time-major copy, to round-off (the product's tiles, and
    so its order of summation, follow the blocks' row counts): with the
    projection on packed W (float32 from 8 rows) and by BLAS, both splits."""
    if backend not in fastrnn.available_backends():
        pytest.skip(f"{backend} is not available")
    module = _backend.module(backend)
    rng = np.random.default_rng(B * 7 + I + threads)
    T, H = 6, 24
    G = 4 if layer == "lstm" else 1
    x = rng.standard_normal((B, T, I)).astype(dtype)
    W = (rng.standard_normal((I, G * H)) / 3).astype(dtype)
    U = (rng.standard_normal((H, G * H)) / 7).astype(dtype)
    b = (rng.standard_normal(G * H) / 5).astype(dtype)
    mask = (rng.random((T, B)) > 0.2).astype(np.uint8)
    h0 = rng.standard_normal((B, H)).astype(dtype)
    runs = []
    for batch_major in (True, False):
        xin = x if batch_major else np.ascontiguousarray(x.swapaxes(0, 1))
        out = np.full((B, T, H), np.nan, dtype)
        if layer == "lstm":
            n = module.lstm_forward_work_len(B, I, H, threads) if backend == "cython" else 0
            hs = np.zeros((2, B, H), dtype)
            hs[0] = h0
            cs = np.zeros((T + 1, B, H), dtype)
            gates = np.empty((T, B, 4 * H), dtype)
            module.lstm_forward(xin, W, U, b, mask, hs, cs, gates, out, np.empty(n, dtype),
                                True, threads, batch_major=batch_major)
            runs.append((out, hs, cs, gates[mask.astype(bool)]))
        else:
            n = module.rnn_work_len(B, I, H, threads) if backend == "cython" else 0
            module.rnn_forward(xin, W, U, b, mask, h0, out, np.empty(n, dtype), 0, threads,
                               batch_major=batch_major)
            runs.append((out,))
    assert not np.isnan(runs[0][0]).any()
    for got, want in zip(*runs):   # round-off relative to the array's scale
        scale = max(1.0, float(np.abs(want).max()))
        tol = (dict(rtol=1e-5, atol=1e-5 * scale) if dtype == np.float32
               else dict(rtol=1e-13, atol=1e-14 * scale))
        np.testing.assert_allclose(got, want, **tol)


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("B, T, I, H", [(37, 9, 45, 23), (3, 300, 7, 50), (130, 2, 1, 9)])
def test_float32_weight_gradients_match_float64(threaded, B, T, I, H, kind, threads,
                                                monkeypatch):
    """The C backward's float32 weight gradients dW = x^T dz and dU = h^T dz
    (products on the stack-packed panels of dz, A read transposed, in
    blocks of 128 rows that accumulate) against float64's (BLAS), on the
    same inputs: chunks of 300-333 rows (several blocks, and chunks that
    add to the previous ones), column ranges that end in part of a panel,
    row counts that leave 4-, 2- and 1-row tiles."""
    from fastrnn import _backend
    monkeypatch.setattr(_backend, "_num_threads", threads)
    rng = np.random.default_rng(B + T + I + H + threads)
    G = 4 if kind == "lstm" else 1
    x = rng.standard_normal((B, T, I))
    W = rng.standard_normal((I, G * H)) / np.sqrt(I)
    U = rng.standard_normal((H, G * H)) / np.sqrt(H)
    b = rng.standard_normal(G * H) / 5
    d_out = rng.standard_normal((B, T, H))
    grads = {}
    for dt in (np.float32, np.float64):
        a = [v.astype(dt) for v in (x, W, U, b)]
        if kind == "lstm":
            r = ops.lstm_forward(*a, return_workspace=True, backend="cython")
            g = ops.lstm_backward(r.workspace, d_out.astype(dt))
        else:
            r = ops.rnn_forward(*a, return_workspace=True, backend="cython")
            g = ops.rnn_backward(r.workspace, d_out.astype(dt))
        grads[dt] = g
    for name in ("kernel", "recurrent_kernel", "bias", "x"):
        got, want = getattr(grads[np.float32], name), getattr(grads[np.float64], name)
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_backward_packs_w_transposed_from_8_rows(threads):
    """From 8 rows on (with input features) the backward's pack also holds
    W^T packed, for dx = dz W^T on the panel kernel; under 8 rows, or
    without features, dx is BLAS's (so the tests above run both ways).  The
    forward's work and the pack are one pool buffer of the larger length."""
    from fastrnn import _cykernels as cy
    from fastrnn import ops
    for B, I, H in [(20, 100, 16), (16, 100, 64), (3, 100, 40), (16, 0, 64)]:
        base = (H + 32 * threads) * (4 * H + B)
        n = cy.lstm_backward_work_len(B, I, H, threads)
        packs = B >= 8 and I > 0
        assert n == base + (4 * H * 32 * -(-I // 32) if packs else 0), (B, I, H)
        assert ops._pack_len("cython", B, I, H, threads) == max(
            n, cy.lstm_forward_work_len(B, I, H, threads))


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
def test_forward_rejects_a_short_work_buffer():
    from fastrnn import _cykernels
    T, B, I, H = 3, 2, 4, 8
    need = _cykernels.lstm_forward_work_len(B, I, H, 2)
    assert need == (4 * H + 32 * 2) * (H + B)
    # from 8 rows on, float32 also packs W there (the input projection)
    assert _cykernels.lstm_forward_work_len(8, I, H, 2) == (4 * H + 32 * 2) * (H + 8 + I)
    with pytest.raises(ValueError, match=f"work must have at least {need} elements"):
        _cykernels.lstm_forward(np.zeros((T, B, I)), np.zeros((I, 4 * H)),
                                np.zeros((H, 4 * H)), np.zeros(4 * H),
                                np.zeros((0, 0), np.uint8), np.zeros((2, B, H)),
                                np.zeros((2, B, H)), np.empty((T, B, 4 * H)),
                                np.empty((B, T, H)), np.empty(need - 1), False, 2)


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B, H", [(1, 40), (3, 40), (6, 40), (7, 33), (13, 40), (9, 67),
                                  (20, 16), (17, 1), (16, 64), (8, 96)])
@pytest.mark.parametrize("Tc", [3, 7], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("I", [5, 100])
def test_backward_with_packed_weights_matches_plain_blas(threads, B, H, Tc, I):
    """The C LSTM backward with its pack scratch (float32: the threads'
    rows of U packed, transposed, in panels for dz U^T, and W^T for dx
    where it fits) against the same call without it (BLAS)."""
    from fastrnn import _cykernels
    dt = np.float32
    rng = np.random.default_rng(B * 100 + H + threads + Tc + I)
    T = 7
    x, W, U, b, mask = _lstm_kernel_inputs(rng, T, B, I, H, dt)
    h0 = rng.standard_normal((B, H)).astype(dt)
    hs = np.zeros((2, B, H), dt)
    hs[0] = h0
    cs = np.zeros((T + 1, B, H), dt)
    gates = np.empty((T, B, 4 * H), dt)
    h_out = np.empty((B, T, H), dt)
    _cykernels.lstm_forward(x, W, U, b, mask, hs, cs, gates, h_out,
                            np.empty(0, dt), True, 1)
    d_out = rng.standard_normal((B, T, H)).astype(dt)
    d_h = rng.standard_normal((B, H)).astype(dt)
    d_c = rng.standard_normal((B, H)).astype(dt)
    x_bm = np.ascontiguousarray(x.swapaxes(0, 1))   # the backward's layout
    xs = np.empty(Tc * B * (2 * I + H), dt)
    runs = []
    for pack in (np.empty(_cykernels.lstm_backward_work_len(B, I, H, threads), dt),
                 np.empty(0, dt)):
        out = dict(dh=d_h.copy(), dc=d_c.copy(), dx=np.empty((B, T, I), dt),
                   dW=np.empty((I, 4 * H), dt), dU=np.empty((H, 4 * H), dt),
                   db=np.empty(4 * H, dt))
        _cykernels.lstm_backward(x_bm, h0, h_out, False, W, U, mask, cs, gates, d_out,
                                 out["dh"], out["dc"], out["dx"], out["dW"], out["dU"],
                                 out["db"], np.empty((Tc, B, 4 * H), dt),
                                 np.empty((B, H), dt), pack, xs, threads)
        runs.append(out)
    for k in runs[0]:
        np.testing.assert_allclose(runs[0][k], runs[1][k], rtol=1e-4, atol=1e-5,
                                   err_msg=k)
    args = (x_bm, h0, h_out, False, W, U, mask, cs, gates, d_out, d_h.copy(), d_c.copy(),
            np.empty((B, T, I), dt), np.empty((I, 4 * H), dt),
            np.empty((H, 4 * H), dt), np.empty(4 * H, dt),
            np.empty((Tc, B, 4 * H), dt), np.empty((B, H), dt))
    with pytest.raises(ValueError, match="pack must have at least"):
        _cykernels.lstm_backward(*args, np.empty(5, dt), xs, threads)
    with pytest.raises(ValueError, match="xs must have at least"):
        _cykernels.lstm_backward(*args, np.empty(0, dt), xs[:-1], threads)


@pytest.mark.skipif("cython" not in fastrnn.available_backends(),
                    reason="the cython backend is not built")
@pytest.mark.parametrize("act", [0, 1, 2], ids=["tanh", "relu", "linear"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B, H", [(1, 40), (3, 40), (6, 40), (7, 33), (13, 40), (9, 67),
                                  (20, 16), (17, 1), (16, 64), (8, 96)])
@pytest.mark.parametrize("I", [5, 100])
def test_rnn_with_packed_weights_matches_plain_blas(act, threads, B, H, I):
    """The C RNN forward (work) and backward (pack) with the float32 packed
    panels against the same calls without them (BLAS)."""
    from fastrnn import _cykernels
    dt = np.float32
    rng = np.random.default_rng(B * 100 + H + threads + act + I)
    T, Tc = 7, 3
    x = rng.standard_normal((T, B, I)).astype(dt)
    W = (rng.standard_normal((I, H)) / 3).astype(dt)
    U = (rng.standard_normal((H, H)) / 7).astype(dt)
    b = (rng.standard_normal(H) / 5).astype(dt)
    mask = (rng.random((T, B)) > 0.2).astype(np.uint8)
    h0 = rng.standard_normal((B, H)).astype(dt)
    d_out = rng.standard_normal((B, T, H)).astype(dt)
    d_h = rng.standard_normal((B, H)).astype(dt)
    n = _cykernels.rnn_work_len(B, I, H, threads)
    runs = []
    for scratch in (np.empty(n, dt), np.empty(0, dt)):
        outputs = np.full((B, T, H), np.nan, dt)
        _cykernels.rnn_forward(x, W, U, b, mask, h0, outputs, scratch, act, threads)
        out = dict(outputs=outputs, dh=d_h.copy(), dx=np.empty((B, T, I), dt),
                   dW=np.empty((I, H), dt), dU=np.empty((H, H), dt), db=np.empty(H, dt))
        _cykernels.rnn_backward(np.ascontiguousarray(x.swapaxes(0, 1)), h0, outputs,
                                False, W, U, mask, act, d_out, out["dh"], out["dx"],
                                out["dW"], out["dU"], out["db"],
                                np.empty((Tc, B, H), dt), np.empty((B, H), dt),
                                scratch, np.empty(Tc * B * (2 * I + H), dt), threads)
        runs.append(out)
    for k in runs[0]:   # float32 round-off, relative to the array's scale
        scale = max(1.0, float(np.abs(runs[1][k]).max()))
        np.testing.assert_allclose(runs[0][k], runs[1][k], rtol=2e-4,
                                   atol=2e-5 * scale, err_msg=k)
    with pytest.raises(ValueError, match="work must have at least"):
        _cykernels.rnn_forward(x, W, U, b, mask, h0,
                               np.empty((B, T, H), dt), np.empty(2, dt), act, threads)


@pytest.mark.skipif("numba" not in fastrnn.available_backends(),
                    reason="numba is not installed")
def test_numba_barrier_counts_meetings_and_slow_waits():
    """A thread that arrives 50 ms late makes the other wait past its
    spinning: one meeting, one slow wait."""
    import threading
    import time
    from fastrnn import _numba_kernels as nk
    state = np.zeros(4, np.int64)
    late = threading.Thread(target=lambda: (time.sleep(0.05), nk._barrier(state, 2, 0)))
    late.start()
    assert nk._barrier(state, 2, 0) == 1
    late.join()
    assert list(state) == [0, 1, 1, 1]
    # both on time (two meetings in a row, sense flips back): no slow wait
    t = threading.Thread(target=lambda: nk._barrier(state, 2, 1))
    t.start()
    nk._barrier(state, 2, 1)
    t.join()
    assert state[2] == 2 and state[1] == 0


@pytest.mark.skipif("numba" not in fastrnn.available_backends(),
                    reason="numba is not installed")
def test_numba_backs_off_after_stalled_unit_split_calls(monkeypatch):
    """Three stalled unit-split calls in a row: the next 4 run on one thread,
    then threads again; stalls that persist double the back-off; a clean
    call ends it.  Row-split plans are never backed off."""
    from fastrnn import _numba_kernels as nk
    monkeypatch.setattr(nk, "_stall", {"team_calls": 0, "stalled_calls": 0,
                                       "backoff_calls": 0, "streak": 0, "left": 0,
                                       "len": 0})
    units = ("units", [(0, 128), (128, 256)])
    serial = ("rows", [(0, 1)])
    assert nk._plan(1, 4, 256, 2) == units
    for _ in range(2):
        nk._note_call(100, 60)                  # stalled: 60 of 100 meetings
    nk._note_call(100, 20)                      # a quarter or less: clean
    assert nk._plan(1, 4, 256, 2) == units
    for _ in range(3):
        nk._note_call(100, 60)
    assert [nk._plan(1, 4, 256, 2) for _ in range(4)] == [serial] * 4
    assert nk._plan(64, 4, 256, 2)[0] == "rows"          # never backed off
    assert nk._plan(1, 4, 256, 2) == units
    nk._note_call(100, 60)                                # stalls persist
    assert [nk._plan(1, 4, 256, 2) for _ in range(8)] == [serial] * 8
    assert nk._plan(1, 4, 256, 2) == units
    nk._note_call(100, 0)                                 # clean: reset
    assert nk._stall["len"] == 0 and nk._stall["streak"] == 0
    stats = nk.team_stats()
    assert stats == {"team_calls": 8, "stalled_calls": 6, "backoff_calls": 12}


def _team_parts():
    from numba import njit
    from fastrnn import _numba_kernels as nk

    @njit(nogil=True)
    def part(i, n, state, out, fail):
        nk._team_start(state, i)
        if i == fail:
            raise ValueError("part failed")
        out[i] = i + 1
        if fail < 0:
            nk._barrier(state, n, 0)
        nk._team_end(state, i, n)

    @njit(nogil=True)
    def silent(i, out):   # never lets the workers go
        out[i] = 1
    return part, silent


def _wait_until(cond, timeout=5.0):
    import time
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.skipif("numba" not in fastrnn.available_backends(),
                    reason="numba is not installed")
def test_numba_spin_team_runs_parts_sleeps_and_wakes():
    """The spin team runs part 0 here and the others on its workers, which
    meet it at the barrier; idle, the workers go to sleep and the next call
    wakes them; a worker's error is re-raised by the caller; a part 0 that
    fails before letting the workers go (or never does) leaves the team
    usable; closed, the workers end."""
    from fastrnn import _numba_kernels as nk
    part, silent = _team_parts()
    team = nk._SpinTeam(2)
    try:
        for rnd in range(3):
            out = np.zeros(3, np.int64)
            st = team.state
            team.run(lambda i: part(i, 3, st, out, -1), [(0,), (1,), (2,)])
            assert list(out) == [1, 2, 3]
            assert st[2] == 1 and st[nk._DONE] == 2      # one meeting, both back
            assert _wait_until(lambda: team.sleeping == 2), "the workers never slept"
        # two parts on a team of two workers: the second worker sits it out
        out = np.zeros(2, np.int64)
        team.run(lambda i: part(i, 2, team.state, out, -1), [(0,), (1,)])
        assert list(out) == [1, 2]
        # a worker's error comes back to the caller
        out = np.zeros(3, np.int64)
        with pytest.raises(ValueError, match="part failed"):
            team.run(lambda i: part(i, 3, team.state, out, 2), [(0,), (1,), (2,)])
        assert list(out) == [1, 2, 0]
        # part 0 fails before the workers go (here: in Python)
        def broken(i):
            if i == 0:
                raise TypeError("no such signature")
            part(i, 3, team.state, out, -1)
        with pytest.raises(TypeError, match="no such signature"):
            team.run(broken, [(0,), (1,), (2,)])
        with pytest.raises(RuntimeError, match="did not call _team_start"):
            team.run(lambda i: silent(i, out), [(0,), (1,), (2,)])
        assert _wait_until(lambda: team.sleeping == 2)
        out = np.zeros(3, np.int64)
        team.run(lambda i: part(i, 3, team.state, out, -1), [(0,), (1,), (2,)])
        assert list(out) == [1, 2, 3]
    finally:
        team.close()
    for t in team.threads:
        t.join(timeout=5)
        assert not t.is_alive()


@pytest.mark.skipif("numba" not in fastrnn.available_backends(),
                    reason="numba is not installed")
def test_numba_kernels_run_their_parts_on_the_spin_team(rng, monkeypatch):
    """A threaded numba call goes through the spin team (its GO count
    grows), and gives the results of the one-thread call, also after the
    workers fell asleep."""
    import time
    from fastrnn import _numba_kernels as nk
    monkeypatch.setattr(nk, "_stall", {"team_calls": 0, "stalled_calls": 0,
                                       "backoff_calls": 0, "streak": 0, "left": 0,
                                       "len": 0})
    B, T, I, H = 1, 12, 9, 256   # batch 1: the units are split
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    W = (rng.standard_normal((I, 4 * H)) / 5).astype(np.float32)
    U = (rng.standard_normal((H, 4 * H)) / 20).astype(np.float32)
    b = np.zeros(4 * H, np.float32)
    monkeypatch.setattr(_backend, "_num_threads", 1)
    want = ops.lstm_forward(x, W, U, b, backend="numba").outputs
    monkeypatch.setattr(_backend, "_num_threads", 2)
    assert nk._split_plan(B, 4, H, 2)[0] == "units"
    for pause in (0, 0.05):
        time.sleep(pause)
        before = nk._spin_team(1).state[nk._GO]
        got = ops.lstm_forward(x, W, U, b, backend="numba").outputs
        assert nk._spin_team(1).state[nk._GO] > before
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

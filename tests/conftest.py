"""Shared fixtures: the available backends, the float dtypes with their
tolerances, a seeded random generator, and an array comparison helper.

Fixtures other than ``rng`` are session-scoped so that hypothesis tests may
use them.
"""
import numpy as np
import pytest

import fastrnn



def pytest_configure(config):
    """Numba's performance warnings (an array it would have to copy, a loop
    it cannot parallelise) fail the tests: the numba kernels must not
    trigger them."""
    if "numba" in fastrnn.available_backends():
        config.addinivalue_line(
            "filterwarnings", "error::numba.core.errors.NumbaPerformanceWarning")


# Relative tolerance per dtype; ``assert_close`` scales the absolute part by
# the magnitude of the expected array.
TOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-9}


def assert_close(actual, expected, err_msg=""):
    """Assert ``actual`` matches ``expected`` (a NumPy array) in shape, dtype
    and values: |a - e| <= tol * (|e| + max(1, max|e|)), with ``tol`` from
    ``TOL`` for expected's dtype.  NaN must sit at the same positions, and
    infinities must match exactly."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{err_msg}: shape {actual.shape} != {expected.shape}")
    assert actual.dtype == expected.dtype, (
        f"{err_msg}: dtype {actual.dtype} != {expected.dtype}")
    tol = TOL[expected.dtype]
    finite = np.isfinite(expected)
    scale = max(1.0, float(np.max(np.abs(expected[finite]), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale,
                               equal_nan=True, err_msg=err_msg)


@pytest.fixture(scope="session", params=fastrnn.available_backends(),
                ids=lambda name: name)
def backend(request):
    """Each backend available here ("cython", "numba", "numpy")."""
    return request.param


@pytest.fixture(scope="session", params=[np.float32, np.float64],
                ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(scope="session", name="TOL")
def tol_fixture():
    """``{dtype: relative tolerance}`` used by ``assert_close``."""
    return TOL


@pytest.fixture(scope="session", name="assert_close")
def assert_close_fixture():
    return assert_close


@pytest.fixture
def rng():
    """A fresh, fixed-seed ``numpy.random.Generator`` per test."""
    return np.random.default_rng(20240611)


# ------------------------------------------------- kernel test problems ---
# Shared by the tests of fastrnn.ops: a random problem, run through ops on a
# backend or through fastrnn.reference, with every result in one dict.

MASK_KINDS = ("random", "left_padded", "right_padded", "empty_rows", "all_true")


def make_mask(rng, kind, B, T):
    """(B, T) bool mask.  ``left_padded``: each row starts with a random
    number of masked steps; ``right_padded``: ends with them; ``empty_rows``:
    random, with rows 0 and 2 (when present) entirely masked."""
    if kind == "all_true":
        return np.ones((B, T), bool)
    if kind == "random" or kind == "empty_rows":
        mask = rng.random((B, T)) < 0.6
        if kind == "empty_rows":
            mask[::2] = False
        return mask
    steps = np.arange(T)[None, :]
    lengths = rng.integers(0, T + 1, size=(B, 1))
    if kind == "left_padded":
        return steps >= T - lengths
    if kind == "right_padded":
        return steps < lengths
    raise ValueError(kind)


def make_problem(rng, kind, B, T, I, H, dtype, *, activation="tanh",
                 bias=True, h0=True, c0=True, mask=None, go_backwards=False,
                 d_h=True, d_c=True):
    """A random call of ``ops.<kind>_forward``/``_backward`` as a dict of its
    arguments.  Booleans pick given (random) vs None for the optional
    arrays; ``mask`` is None, a kind from ``MASK_KINDS`` or an array.
    Weights are scaled so that T in the hundreds neither explodes nor
    vanishes to nothing."""
    G = 4 if kind == "lstm" else 1
    dt = np.dtype(dtype)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dt)

    if isinstance(mask, str):
        mask = make_mask(rng, mask, B, T)
    return dict(
        kind=kind, activation=activation, go_backwards=go_backwards,
        x=normal(B, T, I),
        kernel=normal(I, G * H, scale=1.0 / np.sqrt(max(I, 1))),
        recurrent_kernel=normal(H, G * H, scale=0.5 / np.sqrt(max(H, 1))),
        bias=normal(G * H, scale=0.5) if bias else None,
        h0=normal(B, H, scale=0.5) if h0 else None,
        c0=normal(B, H, scale=0.5) if (c0 and kind == "lstm") else None,
        mask=mask,
        d_outputs=normal(B, T, H),
        d_h=normal(B, H) if d_h else None,
        d_c=normal(B, H) if (d_c and kind == "lstm") else None,
    )


def run_ops(p, backend, **overrides):
    """Forward (inference and training) and backward through fastrnn.ops.

    Returns a dict: outputs, h, [c,] their ``*_inference`` twins from
    ``return_workspace=False``, and d_x, d_h0, [d_c0,] d_kernel,
    d_recurrent_kernel, d_bias (None without bias).  ``overrides`` replace
    arguments of ``p`` (e.g. differently laid-out copies)."""
    from fastrnn import ops
    p = {**p, **overrides}
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], p["h0"])
    kw = dict(mask=p["mask"], go_backwards=p["go_backwards"], backend=backend)
    res = {}
    if p["kind"] == "lstm":
        args += (p["c0"],)
        inf = ops.lstm_forward(*args, **kw)
        r = ops.lstm_forward(*args, return_workspace=True, **kw)
        g = ops.lstm_backward(r.workspace, p["d_outputs"], p["d_h"], p["d_c"])
        res.update(c=r.c, c_inference=inf.c, d_c0=g.c0)
    else:
        kw["activation"] = p["activation"]
        inf = ops.rnn_forward(*args, **kw)
        r = ops.rnn_forward(*args, return_workspace=True, **kw)
        g = ops.rnn_backward(r.workspace, p["d_outputs"], p["d_h"])
    assert inf.workspace is None
    assert r.workspace.backend == backend
    res.update(outputs=r.outputs, h=r.h, outputs_inference=inf.outputs,
               h_inference=inf.h, d_x=g.x, d_h0=g.h0, d_kernel=g.kernel,
               d_recurrent_kernel=g.recurrent_kernel, d_bias=g.bias)
    return res


def run_reference(p):
    """The same dict as ``run_ops``, computed by fastrnn.reference."""
    from fastrnn import reference
    B, T, _ = p["x"].shape
    U = p["recurrent_kernel"]
    H, dt = U.shape[0], p["x"].dtype

    def given(a, shape):
        return np.zeros(shape, dt) if a is None else a

    b = given(p["bias"], (U.shape[1],))
    h0 = given(p["h0"], (B, H))
    mask = None if p["mask"] is None else np.asarray(p["mask"], bool)
    res = {}
    if p["kind"] == "lstm":
        out, h, c, ws = reference.lstm_forward(
            p["x"], p["kernel"], U, b, h0, given(p["c0"], (B, H)), mask,
            p["go_backwards"])
        g = reference.lstm_backward(ws, p["d_outputs"], given(p["d_h"], (B, H)),
                                    given(p["d_c"], (B, H)))
        res.update(c=c, c_inference=c, d_c0=g["c0"])
    else:
        out, h, ws = reference.rnn_forward(
            p["x"], p["kernel"], U, b, h0, p["activation"], mask,
            p["go_backwards"])
        g = reference.rnn_backward(ws, p["d_outputs"], given(p["d_h"], (B, H)))
    res.update(outputs=out, h=h, outputs_inference=out, h_inference=h,
               d_x=g["x"], d_h0=g["h0"], d_kernel=g["kernel"],
               d_recurrent_kernel=g["recurrent_kernel"],
               d_bias=None if p["bias"] is None else g["bias"])
    return res


def assert_results_close(actual, expected, label=""):
    """Compare two ``run_ops``/``run_reference`` dicts entry by entry."""
    assert sorted(actual) == sorted(expected)
    for key, want in expected.items():
        if want is None:
            assert actual[key] is None, f"{label} {key}: expected None"
        else:
            assert_close(actual[key], want, err_msg=f"{label} {key}")


def threads_at_any_size(monkeypatch, n=None):
    """Kernel threads whatever the work per step (cython's team; numba's
    unit split whenever the rows cannot be split, its row split otherwise),
    with numba's contention back-off off so that the unit split really
    runs; with n, every call asks for n threads."""
    from fastrnn import _backend
    monkeypatch.setattr(_backend, "PARALLEL_STEP_WORK", 0)
    if "numba" in fastrnn.available_backends():
        from fastrnn import _numba_kernels
        monkeypatch.setattr(_numba_kernels, "UNITS_WORK_FEW_ROWS", 0)
        monkeypatch.setattr(_numba_kernels, "STALL_STREAK", 1 << 30)
    if n is not None:
        monkeypatch.setattr(_backend, "_num_threads", n)


@pytest.fixture(scope="session")
def kernels():
    """The kernel-problem helpers above, for tests of fastrnn.ops:
    ``make_problem``, ``make_mask``, ``run_ops``, ``run_reference``,
    ``assert_results_close``, ``threads_at_any_size``."""
    from types import SimpleNamespace
    return SimpleNamespace(make_problem=make_problem, make_mask=make_mask,
                           run_ops=run_ops, run_reference=run_reference,
                           assert_results_close=assert_results_close,
                           threads_at_any_size=threads_at_any_size,
                           MASK_KINDS=MASK_KINDS)

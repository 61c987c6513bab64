"""The compiled backends' float32 activations, in units in the last place
(ulp) of float32, against float64 tanh and sigmoid: the kernels compute them
with their own exp (no libm), and the tests elsewhere compare outputs with
an absolute tolerance, which could not see a tanh that loses its relative
accuracy near zero.  Each is read through a kernel: a one-step SimpleRNN with
W = identity and U = 0 gives h = tanh(x); a one-step LSTM with W copying x
into every gate block keeps the activated gates sigmoid(x), sigmoid(x),
tanh(x), sigmoid(x) in its workspace, and h = o * tanh(c)."""
import numpy as np
import pytest

import fastrnn
from fastrnn import ops

COMPILED = [b for b in fastrnn.available_backends() if b != "numpy"]
MAX_ULP = 3.0


def _inputs():
    rng = np.random.default_rng(7)
    tiny = 10.0 ** rng.uniform(-30, -2, 2000)
    xs = np.concatenate([np.linspace(-12, 12, 6001), tiny, -tiny,
                         [0.0, 30.0, -30.0, 90.0, -90.0, 1e30, -1e30]])
    return xs.astype(np.float32)


def _ulps(got, want):
    """|got - want| in ulps of float32 at want (float64)."""
    got = np.asarray(got, np.float64)
    spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(got - want) / np.maximum(spacing, np.finfo(np.float32).smallest_subnormal)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))    # float64, no overflow


@pytest.mark.parametrize("backend", COMPILED)
def test_rnn_tanh_within_3_ulp(backend):
    x = _inputs()
    n = x.size
    eye = np.eye(n, dtype=np.float32)
    h = ops.rnn_forward(x[None, None, :], eye, np.zeros((n, n), np.float32),
                        np.zeros(n, np.float32), backend=backend).outputs[0, 0]
    ulps = _ulps(h, np.tanh(x.astype(np.float64)))
    assert ulps.max() <= MAX_ULP, (x[ulps.argmax()], ulps.max())


@pytest.mark.parametrize("backend", COMPILED)
def test_lstm_sigmoid_and_tanh_within_3_ulp(backend):
    x = _inputs()[::4]
    n = x.size
    W = np.tile(np.eye(n, dtype=np.float32), (1, 4))    # x into each gate block
    r = ops.lstm_forward(x[None, None, :], W, np.zeros((n, 4 * n), np.float32),
                         np.zeros(4 * n, np.float32), return_workspace=True,
                         backend=backend)
    i, f, g, o = np.split(r.workspace.data["gates"][0, 0], 4)
    x64 = x.astype(np.float64)
    for name, got, want in (("i", i, _sigmoid(x64)), ("f", f, _sigmoid(x64)),
                            ("o", o, _sigmoid(x64)), ("g", g, np.tanh(x64))):
        ulps = _ulps(got, want)
        assert ulps.max() <= MAX_ULP, (name, x[ulps.argmax()], ulps.max())
    # h = o * tanh(c), c = i * g (c0 = 0): against float64 from the kernel's
    # own o and c (one more rounding, in the product)
    c = r.workspace.data["cs"][1, 0].astype(np.float64)
    want = o.astype(np.float64) * np.tanh(c)
    ulps = _ulps(r.outputs[0, 0], want)
    assert ulps.max() <= MAX_ULP + 0.5, (x[ulps.argmax()], ulps.max())


@pytest.mark.parametrize("backend", COMPILED)
def test_activations_keep_nan_and_saturate_at_inf(backend):
    x = np.array([np.nan, np.inf, -np.inf, 0.0], np.float32)   # one per batch row
    one = np.ones((1, 1), np.float32)
    h = ops.rnn_forward(x[:, None, None], one, np.zeros((1, 1), np.float32),
                        np.zeros(1, np.float32), backend=backend).outputs[:, 0, 0]
    assert np.isnan(h[0]) and list(h[1:]) == [1.0, -1.0, 0.0]
    r = ops.lstm_forward(x[:, None, None], np.ones((1, 4), np.float32),
                         np.zeros((1, 4), np.float32), np.zeros(4, np.float32),
                         return_workspace=True, backend=backend)
    gates = r.workspace.data["gates"][0]          # (B, 4): i, f, g, o
    assert np.isnan(gates[0]).all()
    # (sigmoid(-inf): e^88 clamps the exponential, so a tiny positive number)
    np.testing.assert_allclose(gates[1:], [[1, 1, 1, 1], [0, 0, -1, 0], [0.5, 0.5, 0, 0.5]],
                               rtol=0, atol=1e-37)

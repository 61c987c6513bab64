"""fastrnn.reference, the specification every backend is tested against:
its gradients against central finite differences (float64, small shapes,
with masks and go_backwards), a hand-computed step, and empty shapes."""
import math

import numpy as np
import pytest

from fastrnn import reference

CELLS = {"lstm": ("lstm", "tanh"), "rnn_tanh": ("rnn", "tanh"),
         "rnn_relu": ("rnn", "relu"), "rnn_linear": ("rnn", "linear")}
PARAMS = {"lstm": ("x", "h0", "c0", "kernel", "recurrent_kernel", "bias"),
          "rnn": ("x", "h0", "kernel", "recurrent_kernel", "bias")}


def _forward(kind, activation, a, mask, go_backwards):
    if kind == "lstm":
        out, h, c, ws = reference.lstm_forward(
            a["x"], a["kernel"], a["recurrent_kernel"], a["bias"], a["h0"],
            a["c0"], mask, go_backwards)
        return (out, h, c), ws
    out, h, ws = reference.rnn_forward(
        a["x"], a["kernel"], a["recurrent_kernel"], a["bias"], a["h0"],
        activation, mask, go_backwards)
    return (out, h), ws


def _loss(results, seeds):
    """A scalar whose gradient w.r.t. (outputs, h[, c]) is ``seeds``."""
    return sum(float(np.sum(r * s)) for r, s in zip(results, seeds))


@pytest.mark.parametrize("mask", [None, "random", "left_padded"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_gradients_match_finite_differences(cell, go_backwards, mask, rng,
                                            kernels):
    kind, activation = CELLS[cell]
    B, T, I, H = 3, 4, 2, 3
    p = kernels.make_problem(rng, kind, B, T, I, H, np.float64,
                             activation=activation, mask=mask,
                             go_backwards=go_backwards)
    if mask is not None:
        p["mask"][0] = False          # a row that never steps
        p["mask"][1, :2] = False      # and one that starts late
    a = {name: p[name] for name in PARAMS[kind]}
    seeds = [p["d_outputs"], p["d_h"]] + ([p["d_c"]] if kind == "lstm" else [])

    _, ws = _forward(kind, activation, a, p["mask"], go_backwards)
    backward = reference.lstm_backward if kind == "lstm" else reference.rnn_backward
    grads = backward(ws, *seeds)

    eps = 1e-6
    for name in PARAMS[kind]:
        numeric = np.zeros_like(a[name])
        for idx in np.ndindex(a[name].shape):
            value = a[name][idx]
            losses = []
            for step in (eps, -eps):
                a[name][idx] = value + step
                losses.append(_loss(_forward(kind, activation, a, p["mask"],
                                             go_backwards)[0], seeds))
            a[name][idx] = value
            numeric[idx] = (losses[0] - losses[1]) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7,
                                   err_msg=f"d_{name}")


def test_lstm_single_step_by_hand():
    """B = T = I = H = 1, gates i, f, c, o computed with scalar math."""
    x, h0, c0 = 0.7, -0.3, 0.4
    W = np.array([[0.5, -0.2, 0.9, 0.1]])
    U = np.array([[0.3, 0.8, -0.6, 0.2]])
    b = np.array([0.1, 1.0, -0.1, 0.0])
    z = [x * W[0, k] + h0 * U[0, k] + b[k] for k in range(4)]
    sig = [1 / (1 + math.exp(-v)) for v in z]
    c = sig[1] * c0 + sig[0] * math.tanh(z[2])
    h = sig[3] * math.tanh(c)
    out, h_ref, c_ref, _ = reference.lstm_forward(
        np.full((1, 1, 1), x), W, U, b, np.full((1, 1), h0),
        np.full((1, 1), c0))
    assert out.shape == (1, 1, 1)
    assert out[0, 0, 0] == pytest.approx(h, rel=1e-14)
    assert h_ref[0, 0] == pytest.approx(h, rel=1e-14)
    assert c_ref[0, 0] == pytest.approx(c, rel=1e-14)


def test_linear_rnn_closed_form(rng):
    """With a linear activation, h_T = h0 U^T + sum_t (x_t W + b) U^(T-1-t)."""
    B, T, I, H = 2, 5, 3, 4
    x = rng.standard_normal((B, T, I))
    W = rng.standard_normal((I, H))
    U = 0.5 * rng.standard_normal((H, H))
    b = rng.standard_normal(H)
    h0 = rng.standard_normal((B, H))
    expected = h0 @ np.linalg.matrix_power(U, T)
    for t in range(T):
        expected += (x[:, t] @ W + b) @ np.linalg.matrix_power(U, T - 1 - t)
    out, h, _ = reference.rnn_forward(x, W, U, b, h0, "linear")
    np.testing.assert_allclose(h, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out[:, -1], h)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("B,T", [(0, 3), (2, 0), (0, 0)])
def test_empty_shapes(kind, B, T, rng, kernels):
    I, H = 3, 4
    p = kernels.make_problem(rng, kind, B, T, I, H, np.float64)
    r = kernels.run_reference(p)
    G = 4 if kind == "lstm" else 1
    assert r["outputs"].shape == (B, T, H)
    assert r["d_x"].shape == (B, T, I)
    assert r["d_kernel"].shape == (I, G * H)
    np.testing.assert_array_equal(r["h"], p["h0"])
    np.testing.assert_array_equal(r["d_h0"], p["d_h"])
    np.testing.assert_array_equal(r["d_kernel"], 0)


def test_unknown_activation_is_rejected(rng):
    with pytest.raises(ValueError, match="activation"):
        reference.rnn_forward(np.zeros((1, 2, 1)), np.zeros((1, 1)),
                              np.zeros((1, 1)), np.zeros(1), np.zeros((1, 1)),
                              "softsign")

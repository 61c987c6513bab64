"""Every backend of fastrnn.ops against fastrnn.reference: forward results
(with and without a workspace) and every gradient, for the LSTM and the
simple RNN, over shapes with size-1 dimensions, odd sizes, hidden sizes that
are not a multiple of a SIMD width, I = 0, T = 1, T >= 500 and 8+ batch
rows; with masks of every kind and go_backwards.  Also Keras's masking
rules checked directly."""
import numpy as np
import pytest

import fastrnn
from fastrnn import ops

# (B, T, I, H)
SHAPES = [
    (1, 1, 1, 1),
    (1, 6, 3, 4),
    (3, 1, 2, 5),
    (2, 4, 1, 3),
    (4, 3, 5, 1),
    (3, 5, 0, 4),      # no input features
    (5, 6, 7, 17),
    (2, 4, 3, 33),
    (2, 520, 2, 3),    # long sequence, small everything else
    (9, 4, 33, 20),    # 8+ rows: float32 input projection on packed W
    (12, 4, 100, 16),  # ... and dx on packed W^T (it fits the forward's work)
    (16, 3, 0, 40),    # 8+ rows, no input features
]
SHAPE_IDS = ["B{}T{}I{}H{}".format(*s) for s in SHAPES]

# Which optional arrays are given (True) or None (False).
OPTIONS = {
    "all_given": dict(bias=True, h0=True, c0=True, d_h=True, d_c=True),
    "none_given": dict(bias=False, h0=False, c0=False, d_h=False, d_c=False),
    "mixed": dict(bias=False, h0=True, c0=False, d_h=False, d_c=True),
}

# (kind, activation): the LSTM and the simple RNN with each activation.
CELLS = {"lstm": ("lstm", "tanh"), "rnn_tanh": ("rnn", "tanh"),
         "rnn_relu": ("rnn", "relu"), "rnn_linear": ("rnn", "linear")}


@pytest.fixture(params=list(CELLS), scope="module")
def cell(request):
    return CELLS[request.param]


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(backend, dtype, cell, shape, options, rng, kernels):
    kind, activation = cell
    p = kernels.make_problem(rng, kind, *shape, dtype, activation=activation,
                             **OPTIONS[options])
    kernels.assert_results_close(kernels.run_ops(p, backend),
                                 kernels.run_reference(p), f"{backend}")


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("mask", [None, "random", "left_padded",
                                  "right_padded", "empty_rows", "all_true"])
def test_masks_and_go_backwards_match_reference(backend, dtype, cell, mask,
                                                go_backwards, rng, kernels):
    kind, activation = cell
    p = kernels.make_problem(rng, kind, 5, 7, 3, 6, dtype,
                             activation=activation, mask=mask,
                             go_backwards=go_backwards)
    kernels.assert_results_close(kernels.run_ops(p, backend),
                                 kernels.run_reference(p), f"{backend}")


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
def test_long_masked_sequence_matches_reference(backend, dtype, go_backwards,
                                                rng, kernels):
    p = kernels.make_problem(rng, "lstm", 3, 510, 2, 5, dtype, mask="random",
                             go_backwards=go_backwards)
    kernels.assert_results_close(kernels.run_ops(p, backend),
                                 kernels.run_reference(p), f"{backend}")


def test_keras_masking_rules(backend, dtype, cell, rng, kernels):
    """Checked directly: zeros before a row's first step (while its state is
    h0), outputs repeat over masked steps, an all-masked row keeps h0/c0 and
    passes d_h/d_c straight through, masked steps get no input gradient."""
    kind, activation = cell
    B, T = 4, 6
    mask = np.array([[0, 0, 1, 1, 0, 1],     # left padding, then a hole
                     [1, 1, 1, 0, 0, 0],     # right padding
                     [0, 0, 0, 0, 0, 0],     # entirely masked
                     [0, 1, 0, 1, 1, 0]], bool)
    p = kernels.make_problem(rng, kind, B, T, 3, 5, dtype,
                             activation=activation, mask=mask)
    r = kernels.run_ops(p, backend)
    out, x_grad = r["outputs"], r["d_x"]
    for b in range(B):
        steps = np.flatnonzero(mask[b])
        first = steps[0] if steps.size else T
        np.testing.assert_array_equal(out[b, :first], 0)
        for t in range(first + 1, T):
            if not mask[b, t]:
                np.testing.assert_array_equal(out[b, t], out[b, t - 1])
        np.testing.assert_array_equal(x_grad[b, ~mask[b]], 0)
        if steps.size:
            np.testing.assert_array_equal(r["h"][b], out[b, steps[-1]])
    np.testing.assert_array_equal(r["h"][2], p["h0"][2])
    np.testing.assert_array_equal(r["d_h0"][2], p["d_h"][2])
    if kind == "lstm":
        np.testing.assert_array_equal(r["c"][2], p["c0"][2])
        np.testing.assert_array_equal(r["d_c0"][2], p["d_c"][2])


@pytest.mark.parametrize("mask", [None, "random"])
def test_go_backwards_equals_reversed_input(backend, dtype, cell, mask, rng,
                                            kernels):
    """go_backwards=True on x is go_backwards=False on x[:, ::-1], with
    outputs in reading order."""
    kind, activation = cell
    p = kernels.make_problem(rng, kind, 3, 5, 4, 6, dtype,
                             activation=activation, mask=mask,
                             go_backwards=True)
    flipped = dict(go_backwards=False, x=np.ascontiguousarray(p["x"][:, ::-1]))
    if mask is not None:
        flipped["mask"] = np.ascontiguousarray(p["mask"][:, ::-1])
    back = kernels.run_ops(p, backend)
    forw = kernels.run_ops(p, backend, **flipped)
    back["d_x"] = back["d_x"][:, ::-1]
    kernels.assert_results_close(back, forw, f"{backend}")


def test_all_true_mask_equals_no_mask(backend, dtype, cell, rng, kernels):
    kind, activation = cell
    p = kernels.make_problem(rng, kind, 3, 6, 2, 5, dtype,
                             activation=activation, mask="all_true")
    kernels.assert_results_close(kernels.run_ops(p, backend),
                                 kernels.run_ops(p, backend, mask=None))


@pytest.mark.parametrize("shape", [(1, 4, 2, 3), (3, 1, 2, 3), (3, 4, 2, 3)],
                         ids=["B1", "T1", "B3T4"])
@pytest.mark.parametrize("mask", [None, "empty_rows"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
def test_inputs_are_not_modified(backend, cell, shape, mask, go_backwards,
                                 rng, kernels):
    kind, activation = cell
    p = kernels.make_problem(rng, kind, *shape, np.float64,
                             activation=activation, mask=mask,
                             go_backwards=go_backwards)
    before = {k: v.copy() for k, v in p.items() if isinstance(v, np.ndarray)}
    kernels.run_ops(p, backend)
    for name, value in before.items():
        np.testing.assert_array_equal(p[name], value, err_msg=name)


def test_backward_is_repeatable(backend, dtype, cell, rng, kernels):
    """Backward does not modify the workspace: a second call on the same
    workspace gives the same gradients."""
    kind, activation = cell
    p = kernels.make_problem(rng, kind, 3, 5, 2, 4, dtype,
                             activation=activation, mask="random")
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], p["h0"])
    if kind == "lstm":
        ws = ops.lstm_forward(*args, p["c0"], mask=p["mask"], backend=backend,
                              return_workspace=True).workspace
        grads = [ops.lstm_backward(ws, p["d_outputs"], p["d_h"], p["d_c"])
                 for _ in range(2)]
    else:
        ws = ops.rnn_forward(*args, activation=activation, mask=p["mask"],
                             backend=backend, return_workspace=True).workspace
        grads = [ops.rnn_backward(ws, p["d_outputs"], p["d_h"])
                 for _ in range(2)]
    for first, second in zip(*grads):
        np.testing.assert_array_equal(first, second)


def test_workspace_keeps_its_own_arrays(backend, dtype, cell, rng, kernels):
    """Changing x, h0 or the returned outputs after the forward pass does not
    change the gradients: the workspace keeps copies of what its backward
    pass reads (the outputs are the states h it reads h_{t-1} from)."""
    kind, activation = cell
    p = kernels.make_problem(rng, kind, 3, 5, 2, 4, dtype,
                             activation=activation, mask="left_padded")
    expected = kernels.run_ops(p, backend)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], p["h0"])
    if kind == "lstm":
        r = ops.lstm_forward(*args, p["c0"], mask=p["mask"], backend=backend,
                             return_workspace=True)
    else:
        r = ops.rnn_forward(*args, activation=activation, mask=p["mask"],
                            backend=backend, return_workspace=True)
    for a in (p["x"], p["h0"], r.outputs):
        a[...] = 7
    if kind == "lstm":
        got = ops.lstm_backward(r.workspace, p["d_outputs"], p["d_h"], p["d_c"])
    else:
        got = ops.rnn_backward(r.workspace, p["d_outputs"], p["d_h"])
    for name, value in got._asdict().items():
        want = expected["d_" + name]
        if value is None:
            assert want is None
        else:
            np.testing.assert_array_equal(value, want, err_msg=name)


@pytest.mark.parametrize("backend", [b for b in fastrnn.available_backends()
                                     if b != "numpy"])
def test_workspace_refers_to_its_arrays_without_copies(backend, cell, rng, kernels):
    """With ``_copy_arrays=False`` (fastrnn.keras, whose tensors cannot
    change) a compiled workspace refers to x, h0 and the outputs as they
    are, and keeps no other (B, T, H) or (T+1, B, H) array: the states h
    are kept once, as the outputs."""
    kind, activation = cell
    B, T, I, H = 3, 5, 2, 4
    p = kernels.make_problem(rng, kind, B, T, I, H, np.float32,
                             activation=activation, mask="random")
    x = np.ascontiguousarray(p["x"])
    h0 = np.ascontiguousarray(p["h0"])
    args = (x, p["kernel"], p["recurrent_kernel"], p["bias"], h0)
    kw = dict(mask=p["mask"], backend=backend, return_workspace=True,
              _copy_arrays=False)
    if kind == "lstm":
        r = ops.lstm_forward(*args, p["c0"], **kw)
    else:
        r = ops.rnn_forward(*args, activation=activation, **kw)
    data = r.workspace.data
    assert data["x"] is x and data["h0"] is h0 and data["outputs"] is r.outputs
    states = [k for k, a in data.items() if isinstance(a, np.ndarray)
              and a.shape in ((B, T, H), (T + 1, B, H)) and k != "outputs"]
    assert states == (["cs"] if kind == "lstm" else [])


def test_result_types(backend, rng, kernels):
    p = kernels.make_problem(rng, "lstm", 2, 3, 4, 5, np.float32, bias=False)
    r = ops.lstm_forward(p["x"], p["kernel"], p["recurrent_kernel"],
                         backend=backend, return_workspace=True)
    assert isinstance(r, ops.LSTMResult)
    ws = r.workspace
    assert isinstance(ws, ops.Workspace)
    assert (ws.kind, ws.backend, ws.shape, ws.dtype) == (
        "lstm", backend, (2, 3, 4, 5), np.float32)
    g = ops.lstm_backward(ws, p["d_outputs"])
    assert isinstance(g, ops.LSTMGrads)
    assert g.bias is None
    r = ops.rnn_forward(p["x"], p["kernel"][:, :5], p["recurrent_kernel"][:, :5],
                        np.zeros(5, np.float32), backend=backend,
                        return_workspace=True)
    assert isinstance(r, ops.RNNResult)
    assert (r.workspace.kind, r.workspace.activation) == ("rnn", "tanh")
    g = ops.rnn_backward(r.workspace, None)
    assert isinstance(g, ops.RNNGrads)
    assert g.bias.shape == (5,)
    np.testing.assert_array_equal(g.x, 0)

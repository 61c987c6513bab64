"""fastrnn.ops at its edges: bad arguments raise ValueError/TypeError naming
the argument; any memory layout (non-contiguous, Fortran, negative strides,
read-only) gives the same results; empty batches and sequences give empty
results of the right shapes; NaN and inf propagate as in the reference."""
import numpy as np
import pytest

import fastrnn
from fastrnn import ops

B, T, I, H = 2, 3, 4, 5


def _arrays(G, dtype=np.float64):
    rng = np.random.default_rng(0)
    return dict(x=rng.standard_normal((B, T, I)).astype(dtype),
                kernel=rng.standard_normal((I, G * H)).astype(dtype),
                recurrent_kernel=rng.standard_normal((H, G * H)).astype(dtype),
                bias=np.zeros(G * H, dtype), h0=np.zeros((B, H), dtype),
                c0=np.zeros((B, H), dtype))


KEYWORDS = ("mask", "go_backwards", "return_workspace", "activation")


def _call(kind, backend, **changes):
    """A valid small forward call of ``kind`` with ``changes`` applied; a
    change may be a function ``(valid arrays, G) -> value``."""
    G = 4 if kind == "lstm" else 1
    a = _arrays(G)
    for name, value in changes.items():
        a[name] = value(a, G) if callable(value) else value
    kw = {k: a[k] for k in KEYWORDS if k in a}
    args = [a["x"], a["kernel"], a["recurrent_kernel"], a["bias"], a["h0"]]
    if kind == "lstm":
        return ops.lstm_forward(*args, a["c0"], backend=backend, **kw)
    return ops.rnn_forward(*args, backend=backend, **kw)


def _as(dtype, name):
    return lambda a, G: a[name].astype(dtype)


def _add_axis(name):
    return lambda a, G: a[name][None]


f32 = np.float32
# id -> (changes to a valid call, exception, message pattern)
BAD_FORWARD = {
    "x_rank2": (dict(x=np.zeros((B, T))), ValueError, r"x must have rank 3"),
    "x_rank4": (dict(x=np.zeros((B, T, I, 1))), ValueError, r"x must have rank 3"),
    "x_none": (dict(x=None), TypeError, r"\bx\b"),
    "x_int": (dict(x=np.zeros((B, T, I), np.int64)), TypeError,
              r"x must have dtype float32 or float64"),
    "x_float16": (dict(x=np.zeros((B, T, I), np.float16)), TypeError, r"\bx\b"),
    "x_strings": (dict(x=np.full((B, T, I), "a")), TypeError, r"\bx\b"),
    "kernel_rank1": (dict(kernel=np.zeros(I)), ValueError, r"kernel must have rank 2"),
    "kernel_wrong_I": (dict(kernel=lambda a, G: np.zeros((I + 1, G * H))),
                       ValueError, r"^kernel must have shape"),
    "kernel_wrong_H": (dict(kernel=lambda a, G: np.zeros((I, G * H + 1))),
                       ValueError, r"^kernel must have shape"),
    "kernel_int": (dict(kernel=_as(np.int32, "kernel")), TypeError,
                   r"^kernel must have dtype"),
    "kernel_f32_x_f64": (dict(kernel=_as(f32, "kernel")), TypeError,
                         r"kernel has dtype float32 but x has float64"),
    "recurrent_kernel_wrong_H": (
        dict(recurrent_kernel=lambda a, G: np.zeros((H, G * H + 1))),
        ValueError, r"recurrent_kernel must have shape"),
    "recurrent_kernel_rank3": (dict(recurrent_kernel=_add_axis("recurrent_kernel")),
                               ValueError, r"recurrent_kernel must have rank 2"),
    "recurrent_kernel_f32": (dict(recurrent_kernel=_as(f32, "recurrent_kernel")),
                             TypeError, r"recurrent_kernel has dtype float32"),
    "bias_wrong_length": (dict(bias=np.zeros(7)), ValueError, r"bias must have shape"),
    "bias_rank2": (dict(bias=_add_axis("bias")), ValueError, r"bias must have rank 1"),
    "bias_f32": (dict(bias=_as(f32, "bias")), TypeError, r"bias has dtype float32"),
    "h0_wrong_B": (dict(h0=np.zeros((B + 1, H))), ValueError, r"h0 must have shape"),
    "h0_wrong_H": (dict(h0=np.zeros((B, H + 1))), ValueError, r"h0 must have shape"),
    "h0_rank1": (dict(h0=np.zeros(H)), ValueError, r"h0 must have rank 2"),
    "h0_int": (dict(h0=np.zeros((B, H), int)), TypeError, r"h0 must have dtype"),
    "h0_f32": (dict(h0=np.zeros((B, H), f32)), TypeError, r"h0 has dtype float32"),
    "mask_wrong_T": (dict(mask=np.ones((B, T + 1), bool)), ValueError,
                     r"mask must have shape \(B, T\)"),
    "mask_rank1": (dict(mask=np.ones(B, bool)), ValueError, r"mask must have shape"),
    "mask_float": (dict(mask=np.ones((B, T))), TypeError, r"mask must be a bool"),
    "go_backwards_str": (dict(go_backwards="yes"), TypeError,
                         r"go_backwards must be a bool"),
    "return_workspace_int": (dict(return_workspace=1), TypeError,
                             r"return_workspace must be a bool"),
}
BAD_LSTM_ONLY = {
    "c0_wrong_shape": (dict(c0=np.zeros((B, H + 1))), ValueError, r"c0 must have shape"),
    "c0_f32": (dict(c0=np.zeros((B, H), f32)), TypeError, r"c0 has dtype float32"),
}
BAD_RNN_ONLY = {
    "activation_unknown": (dict(activation="sigmoid"), ValueError,
                           r"activation must be one of .*tanh.*relu.*linear.*sigmoid"),
    "activation_not_str": (dict(activation=3), ValueError, r"activation must be one of"),
}


@pytest.mark.parametrize("case", list({**BAD_FORWARD, **BAD_LSTM_ONLY}))
def test_lstm_forward_rejects(case, backend):
    changes, exc, match = {**BAD_FORWARD, **BAD_LSTM_ONLY}[case]
    with pytest.raises(exc, match=match):
        _call("lstm", backend, **changes)


@pytest.mark.parametrize("case", list({**BAD_FORWARD, **BAD_RNN_ONLY}))
def test_rnn_forward_rejects(case, backend):
    changes, exc, match = {**BAD_FORWARD, **BAD_RNN_ONLY}[case]
    with pytest.raises(exc, match=match):
        _call("rnn", backend, **changes)


def test_lstm_weights_given_to_rnn_are_rejected(backend):
    a = _arrays(4)
    with pytest.raises(ValueError, match="recurrent_kernel must have shape"):
        ops.rnn_forward(a["x"], a["kernel"], a["recurrent_kernel"],
                        backend=backend)


@pytest.mark.parametrize("name", ["cuda", ""])
def test_unknown_backend_is_rejected(name):
    with pytest.raises(ValueError, match=r"backend.*cython.*numba.*numpy"):
        _call("lstm", name)


def test_non_string_backend_is_rejected():
    with pytest.raises(TypeError, match="backend must be a string"):
        _call("lstm", 3)


@pytest.fixture
def workspaces(backend):
    return {kind: _call(kind, backend, return_workspace=True).workspace
            for kind in ("lstm", "rnn")}


D_OUT = np.zeros((B, T, H))
# id -> (kind, d_outputs, extra keywords, exception, pattern)
BAD_BACKWARD = {
    "d_outputs_other_call_shape": ("lstm", np.zeros((B, T + 1, H)), {},
                                   ValueError, r"d_outputs must have shape"),
    "d_outputs_other_B": ("rnn", np.zeros((B + 1, T, H)), {}, ValueError,
                          r"d_outputs must have shape"),
    "d_outputs_rank2": ("lstm", np.zeros((B, H)), {}, ValueError,
                        r"d_outputs must have rank 3"),
    "d_outputs_f32": ("rnn", D_OUT.astype(np.float32), {}, TypeError, r"d_outputs"),
    "d_outputs_int": ("lstm", D_OUT.astype(int), {}, TypeError, r"d_outputs"),
    "d_h_wrong_shape": ("lstm", D_OUT, dict(d_h=np.zeros((B, H + 1))),
                        ValueError, r"d_h must have shape"),
    "d_h_rnn_wrong_shape": ("rnn", D_OUT, dict(d_h=np.zeros((B + 1, H))),
                            ValueError, r"d_h must have shape"),
    "d_c_wrong_shape": ("lstm", D_OUT, dict(d_c=np.zeros((H,))), ValueError,
                        r"d_c must have rank 2"),
    "d_c_f32": ("lstm", D_OUT, dict(d_c=np.zeros((B, H), f32)), TypeError, r"d_c"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_backward_rejects(case, workspaces):
    kind, d_out, kw, exc, match = BAD_BACKWARD[case]
    backward = ops.lstm_backward if kind == "lstm" else ops.rnn_backward
    with pytest.raises(exc, match=match):
        backward(workspaces[kind], d_out, **kw)


def test_workspace_of_the_wrong_kind_is_rejected(workspaces):
    with pytest.raises(ValueError, match="workspace was made by rnn_forward"):
        ops.lstm_backward(workspaces["rnn"], D_OUT)
    with pytest.raises(ValueError, match="workspace was made by lstm_forward"):
        ops.rnn_backward(workspaces["lstm"], D_OUT)


# (kind, name in Workspace.data, replacement): arrays the compiled backward
# kernels read, replaced by ones of another shape or dtype, or dropped
TAMPERED = {
    "outputs_short": ("lstm", "outputs", np.zeros((B, T - 1, H))),
    "outputs_f32": ("rnn", "outputs", np.zeros((B, T, H), f32)),
    "h0_rows": ("rnn", "h0", np.zeros((B - 1, H))),
    "x_features": ("lstm", "x", np.zeros((B, T, I + 1))),
    "x_dropped": ("rnn", "x", None),
    "W_transposed": ("rnn", "W", np.zeros((H, I))),
    "cs_steps": ("lstm", "cs", np.zeros((T, B, H))),
    "gates_list": ("lstm", "gates", [[0.0]]),
    "mask_shape": ("rnn", "mask_tm", np.ones((B, T), np.uint8)),
    "mask_bool": ("lstm", "mask_tm", np.ones((T, B), bool)),
}


@pytest.mark.parametrize("backend", [b for b in fastrnn.available_backends()
                                     if b != "numpy"])
@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_workspace_is_rejected_before_the_kernel(case, backend):
    """A workspace is opaque, but one of a compiled backend whose arrays were
    replaced fails with a ValueError naming the array (the kernels would
    otherwise read out of bounds)."""
    kind, name, bad = TAMPERED[case]
    ws = _call(kind, backend, return_workspace=True).workspace
    if bad is None:
        del ws.data[name]
    else:
        ws.data[name] = bad
    backward = ops.lstm_backward if kind == "lstm" else ops.rnn_backward
    with pytest.raises(ValueError, match=rf"workspace.data\['{name}'\] must be"):
        backward(ws, D_OUT)


@pytest.mark.parametrize("not_a_workspace", [None, {}, "ws", (1, 2)],
                         ids=["None", "dict", "str", "tuple"])
def test_non_workspace_is_rejected(not_a_workspace):
    with pytest.raises(TypeError, match="workspace must be the Workspace"):
        ops.lstm_backward(not_a_workspace, D_OUT)
    with pytest.raises(TypeError, match="workspace must be the Workspace"):
        ops.rnn_backward(not_a_workspace, D_OUT)


def test_forward_result_is_not_a_workspace(backend):
    """Passing the LSTMResult itself, or the workspace of an inference-only
    call (None), is a TypeError."""
    r = _call("lstm", backend)
    for wrong in (r, r.workspace):
        with pytest.raises(TypeError, match="workspace"):
            ops.lstm_backward(wrong, D_OUT)


# ---------------------------------------------------------------- layouts ---
def _fortran(a):
    return np.asfortranarray(a)


def _strided(a):
    """The same values as every other element of a larger array."""
    big = np.zeros(tuple(2 * n + 1 for n in a.shape), a.dtype)
    view = big[tuple(slice(1, None, 2) for _ in a.shape)]
    view[...] = a
    return view


def _reversed(a):
    """The same values, with negative strides on every axis."""
    flipped = np.ascontiguousarray(a[tuple(slice(None, None, -1) for _ in a.shape)])
    return flipped[tuple(slice(None, None, -1) for _ in a.shape)]


def _read_only(a):
    a = a.copy()
    a.setflags(write=False)
    return a


def _read_only_strided(a):
    a = _strided(a)
    a.setflags(write=False)
    return a


LAYOUTS = {"fortran": _fortran, "strided": _strided, "reversed": _reversed,
           "read_only": _read_only, "read_only_strided": _read_only_strided}
ARRAY_ARGS = ("x", "kernel", "recurrent_kernel", "bias", "h0", "c0", "mask",
              "d_outputs", "d_h", "d_c")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape,mask", [((1, 4, 3, 5), "empty_rows"),
                                        ((3, 1, 2, 4), "empty_rows"),
                                        ((3, 4, 3, 5), None)],
                         ids=["B1_masked", "T1_masked", "B3T4"])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_any_memory_layout_gives_the_same_results(backend, dtype, kind, shape,
                                                   mask, layout, rng, kernels):
    p = kernels.make_problem(rng, kind, *shape, dtype, mask=mask)
    expected = kernels.run_ops(p, backend)
    changed = {k: LAYOUTS[layout](p[k]) for k in ARRAY_ARGS
               if p[k] is not None}
    kernels.assert_results_close(kernels.run_ops(p, backend, **changed),
                                 expected, f"{backend} {layout}")
    kernels.assert_results_close(expected, kernels.run_reference(p), backend)


# ------------------------------------------------------------ empty sizes ---
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("B_,T_,H_", [(0, 3, 4), (2, 0, 4), (0, 0, 4),
                                      (2, 3, 0)],
                         ids=["B0", "T0", "B0T0", "H0"])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_empty_sizes_give_empty_results(backend, dtype, kind, B_, T_, H_,
                                        masked, rng, kernels):
    I_ = 3
    p = kernels.make_problem(rng, kind, B_, T_, I_, H_, dtype,
                             mask="random" if masked else None)
    r = kernels.run_ops(p, backend)
    G = 4 if kind == "lstm" else 1
    shapes = dict(outputs=(B_, T_, H_), h=(B_, H_), d_x=(B_, T_, I_),
                  d_h0=(B_, H_), d_kernel=(I_, G * H_),
                  d_recurrent_kernel=(H_, G * H_), d_bias=(G * H_,))
    for name, shape in shapes.items():
        assert r[name].shape == shape, name
        assert r[name].dtype == dtype, name
    np.testing.assert_array_equal(r["h"], p["h0"])
    if T_ == 0:
        np.testing.assert_array_equal(r["d_h0"], p["d_h"])
        np.testing.assert_array_equal(r["d_kernel"], 0)
    kernels.assert_results_close(r, kernels.run_reference(p), backend)


# ------------------------------------------------------------ NaN and inf ---
CELLS = {"lstm": ("lstm", "tanh"), "rnn_tanh": ("rnn", "tanh"),
         "rnn_relu": ("rnn", "relu"), "rnn_linear": ("rnn", "linear")}


def _problem(kernels, rng, cell, dtype, **kw):
    kind, activation = CELLS[cell]
    return kernels.make_problem(rng, kind, 3, 5, 2, 4, dtype,
                                activation=activation, **kw)


@pytest.mark.parametrize("cell", list(CELLS))
def test_nan_in_x_propagates_like_the_reference(backend, dtype, cell, rng,
                                                kernels):
    p = _problem(kernels, rng, cell, dtype)
    p["x"][1, 2, 0] = np.nan
    with np.errstate(invalid="ignore", over="ignore"):
        expected = kernels.run_reference(p)
        actual = kernels.run_ops(p, backend)
    assert np.isnan(expected["outputs"][1, 2:]).all()
    assert not np.isnan(expected["outputs"][0]).any()
    kernels.assert_results_close(actual, expected, backend)


FORWARD_KEYS = ("outputs", "h", "c", "outputs_inference", "h_inference",
                "c_inference")


def _forward_close(actual, expected, assert_close, label):
    for key in FORWARD_KEYS:
        if key in expected:
            assert_close(actual[key], expected[key], f"{label} {key}")


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("where,value", [("x", np.inf), ("x", -np.inf),
                                         ("x", np.nan), ("h0", np.inf),
                                         ("kernel", np.nan)],
                         ids=["x_inf", "x_-inf", "x_nan", "h0_inf",
                              "kernel_nan"])
def test_non_finite_forward_like_the_reference(backend, dtype, cell, where,
                                               value, rng, kernels,
                                               assert_close):
    p = _problem(kernels, rng, cell, dtype)
    p[where][(0,) * p[where].ndim] = value
    with np.errstate(invalid="ignore", over="ignore"):
        expected = kernels.run_reference(p)
        actual = kernels.run_ops(p, backend)
    _forward_close(actual, expected, assert_close, backend)


@pytest.mark.parametrize("cell", list(CELLS))
def test_nan_at_masked_steps_is_ignored(backend, dtype, cell, rng, kernels,
                                        assert_close):
    """Padding may hold garbage: x at masked steps never reaches a result."""
    p = _problem(kernels, rng, cell, dtype, mask="random")
    p["mask"][:, 0] = False
    p["x"][~p["mask"]] = np.nan
    actual = kernels.run_ops(p, backend)
    expected = kernels.run_reference(p)
    for key in FORWARD_KEYS:
        if key in expected:
            assert np.isfinite(expected[key]).all()
    _forward_close(actual, expected, assert_close, backend)


@pytest.mark.parametrize("cell", list(CELLS))
def test_nan_h0_of_a_row_not_yet_started(backend, dtype, cell, rng, kernels,
                                         assert_close):
    """A row's outputs are zero before its first step even when its h0 is
    NaN; the NaN state shows from the first step on."""
    p = _problem(kernels, rng, cell, dtype, mask="left_padded")
    p["mask"][0] = [False, False, True, True, True]
    p["mask"][1] = False
    p["h0"][:2] = np.nan
    with np.errstate(invalid="ignore"):
        expected = kernels.run_reference(p)
        actual = kernels.run_ops(p, backend)
    np.testing.assert_array_equal(expected["outputs"][:2, :2], 0)
    assert np.isnan(expected["outputs"][0, 2:]).all()
    _forward_close(actual, expected, assert_close, backend)


@pytest.mark.skipif("numba" not in fastrnn.available_backends(),
                    reason="the numba backend is not available")
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_numba_kernels_reject_rows_that_are_not_contiguous(kind):
    """The numba kernels loop over rows through raw pointers: an array
    whose last axis is strided (fastrnn.ops never passes one) is a
    ValueError at the kernel's entry, not a read of the wrong memory."""
    from fastrnn import _numba_kernels as nk
    G = 4 if kind == "lstm" else 1
    a = _arrays(G, np.float32)
    x = a["x"].swapaxes(0, 1).copy()               # (T, B, I), reading order
    W, U, b = a["kernel"], a["recurrent_kernel"], a["bias"]
    mask = np.zeros((0, 0), np.uint8)
    out = np.zeros((B, T, 2 * H), np.float32)[:, :, ::2]   # strided last axis
    work = np.zeros(0, np.float32)
    with pytest.raises(ValueError, match="last axis is contiguous"):
        if kind == "lstm":
            hs = np.zeros((2, B, H), np.float32)
            cs = np.zeros((2, B, H), np.float32)
            gates = np.zeros((T, B, 4 * H), np.float32)
            nk.lstm_forward(x, W, U, b, mask, hs, cs, gates, out, work, False, 1)
        else:
            nk.rnn_forward(x, W, U, b, mask, np.zeros((B, H), np.float32), out,
                           work, 0, 1)

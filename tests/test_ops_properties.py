"""Property tests (hypothesis) of fastrnn.ops over random shapes, masks and
options: every backend matches the reference; masked steps' inputs never
matter; running a sequence in two pieces equals running it whole."""
import numpy as np
from hypothesis import given, settings, strategies as st

from fastrnn import ops

CELLS = [("lstm", "tanh"), ("rnn", "tanh"), ("rnn", "relu"), ("rnn", "linear")]
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def problems(draw, kernels, dtype, min_T=0):
    """A random ``make_problem`` dict: any cell, shape, mask and options."""
    kind, activation = draw(st.sampled_from(CELLS))
    B = draw(st.integers(0, 12))   # 8+: the float32 input projection on packed W
    T = draw(st.integers(min_T, 9))
    I = draw(st.integers(0, 40))
    H = draw(st.integers(1, 9))
    mask = draw(st.sampled_from((None,) + kernels.MASK_KINDS))
    options = {name: draw(st.booleans())
               for name in ("bias", "h0", "c0", "d_h", "d_c", "go_backwards")}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return kernels.make_problem(rng, kind, B, T, I, H, dtype,
                                activation=activation, mask=mask, **options)


@SETTINGS
@given(data=st.data())
def test_backends_match_reference(backend, dtype, kernels, data):
    p = data.draw(problems(kernels, dtype))
    kernels.assert_results_close(kernels.run_ops(p, backend),
                                 kernels.run_reference(p), backend)


@SETTINGS
@given(data=st.data())
def test_masked_steps_inputs_do_not_matter(backend, dtype, kernels, data):
    p = data.draw(problems(kernels, dtype, min_T=1))
    if p["mask"] is None:
        p["mask"] = kernels.make_mask(np.random.default_rng(0), "random",
                                      *p["x"].shape[:2])
    r = kernels.run_ops(p, backend)
    x = p["x"].copy()
    x[~p["mask"]] = 1e3 * np.random.default_rng(1).standard_normal(x.shape)[~p["mask"]]
    forward = ("outputs", "h", "c", "outputs_inference", "h_inference",
               "c_inference", "d_x")
    with np.errstate(over="ignore"):
        changed = kernels.run_ops(p, backend, x=x)
    for key in forward:
        if key in r:
            np.testing.assert_array_equal(changed[key], r[key], err_msg=key)
    np.testing.assert_array_equal(r["d_x"][~p["mask"]], 0)


@SETTINGS
@given(data=st.data(), split=st.floats(0, 1))
def test_two_pieces_equal_the_whole(backend, dtype, kernels, assert_close,
                                    data, split):
    """Forward over x[:, :k] then x[:, k:] from the first piece's final state
    gives the same outputs and final state as one call over x."""
    p = data.draw(problems(kernels, dtype, min_T=2))
    kind, T = p["kind"], p["x"].shape[1]
    k = min(max(1, int(split * T)), T - 1)
    common = dict(mask=None, go_backwards=False, backend=backend)
    if kind == "lstm":
        def run(x, h0, c0):
            return ops.lstm_forward(x, p["kernel"], p["recurrent_kernel"],
                                    p["bias"], h0, c0, **common)
        whole = run(p["x"], p["h0"], p["c0"])
        first = run(p["x"][:, :k], p["h0"], p["c0"])
        second = run(p["x"][:, k:], first.h, first.c)
        assert_close(second.c, whole.c, "c")
    else:
        def run(x, h0):
            return ops.rnn_forward(x, p["kernel"], p["recurrent_kernel"],
                                   p["bias"], h0, activation=p["activation"],
                                   **common)
        whole = run(p["x"], p["h0"])
        first = run(p["x"][:, :k], p["h0"])
        second = run(p["x"][:, k:], first.h)
    assert_close(second.h, whole.h, "h")
    assert_close(np.concatenate([first.outputs, second.outputs], axis=1),
                 whole.outputs, "outputs")

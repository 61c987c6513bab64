"""fastrnn.keras._tf_ops, the TensorFlow ops under the layers, against
fastrnn.ops called directly: gradients in graph and eager mode, how the
workspace travels from the forward to the backward op, empty shapes."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn import ops  # noqa: E402
from fastrnn.keras import _tf_ops  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

BACKENDS = fastrnn.available_backends()
COMPILED = [b for b in BACKENDS if b != "numpy"]
G = {"lstm": 4, "rnn": 1}


def inputs(kind, B=3, T=5, I=4, H=6, masked=True, seed=0):
    """The op's inputs as NumPy arrays: x, states, kernel, recurrent_kernel,
    bias, mask."""
    rng = np.random.default_rng(seed)
    n_states = 2 if kind == "lstm" else 1
    a = dict(x=rng.standard_normal((B, T, I)).astype("float32"),
             states=[0.5 * rng.standard_normal((B, H)).astype("float32")
                     for _ in range(n_states)],
             W=0.4 * rng.standard_normal((I, G[kind] * H)).astype("float32"),
             U=0.4 * rng.standard_normal((H, G[kind] * H)).astype("float32"),
             b=0.1 * rng.standard_normal(G[kind] * H).astype("float32"),
             mask=None)
    if masked:
        mask = rng.random((B, T)) < 0.7
        mask[0] = True
        a["mask"] = mask
    return a


def upstream(kind, a, use_states):
    """Fixed gradients for the op's outputs (None: output unused)."""
    rng = np.random.default_rng(7)
    B, T, _ = a["x"].shape
    H = a["U"].shape[0]
    ups = [rng.standard_normal((B, T, H)).astype("float32")]
    n_states = len(a["states"])
    ups += [rng.standard_normal((B, H)).astype("float32") if use_states else None
            for _ in range(n_states)]
    return ups


def op_grads(kind, a, ups, go_backwards, backend, graph, persistent=False,
             zero_states=False):
    """Gradients of sum(output * upstream) through _tf_ops (twice when
    persistent, from one tape).  zero_states: the op gets no initial states
    (None: zeros), and no gradient is taken for them."""
    fn = _tf_ops.lstm if kind == "lstm" else _tf_ops.rnn
    want_states = any(u is not None for u in ups[1:])

    def run(x, states, W, U, b, mask):
        with tf.GradientTape(persistent=persistent) as tape:
            tape.watch([x, *states, W, U, b])
            args = [None] * len(states) if zero_states else states
            outs = fn(x, *args, W, U, b, mask, go_backwards=go_backwards,
                      backend=backend, states=want_states)
            assert all(o is None for o in outs[1:]) != want_states
            loss = sum(tf.reduce_sum(o * u) for o, u in zip(outs, ups)
                       if u is not None)
        sources = [x] + ([] if zero_states else [*states]) + [W, U, b]
        grads = [tape.gradient(loss, sources)]
        if persistent:
            grads.append(tape.gradient(loss, sources))
        return grads

    if graph:
        run = tf.function(run)
    mask = None if a["mask"] is None else tf.constant(a["mask"])
    got = run(tf.constant(a["x"]), [tf.constant(s) for s in a["states"]],
              tf.constant(a["W"]), tf.constant(a["U"]), tf.constant(a["b"]),
              mask)
    return [[g.numpy() for g in gs] for gs in got]


def ops_grads(kind, a, ups, go_backwards, backend, zero_states=False):
    """The same gradients from fastrnn.ops directly."""
    states = [None] * len(a["states"]) if zero_states else a["states"]
    if kind == "lstm":
        r = ops.lstm_forward(a["x"], a["W"], a["U"], a["b"], *states,
                             mask=a["mask"], go_backwards=go_backwards,
                             return_workspace=True, backend=backend)
        g = ops.lstm_backward(r.workspace, *ups)
        d_states = [] if zero_states else [g.h0, g.c0]
    else:
        r = ops.rnn_forward(a["x"], a["W"], a["U"], a["b"], *states,
                            mask=a["mask"], go_backwards=go_backwards,
                            return_workspace=True, backend=backend)
        g = ops.rnn_backward(r.workspace, *ups)
        d_states = [] if zero_states else [g.h0]
    return [g.x, *d_states, g.kernel, g.recurrent_kernel, g.bias]


def assert_grads_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("zero_states", [False, True], ids=["h0", "zeros"])
@pytest.mark.parametrize("use_states", [False, True])
@pytest.mark.parametrize("kind", sorted(G))
def test_gradients_equal_ops(kind, use_states, zero_states, masked,
                             go_backwards, graph, backend):
    a = inputs(kind, masked=masked)
    ups = upstream(kind, a, use_states)
    got, = op_grads(kind, a, ups, go_backwards, backend, graph,
                    zero_states=zero_states)
    assert_grads_equal(got, ops_grads(kind, a, ups, go_backwards, backend,
                                      zero_states))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(G))
def test_persistent_tape_reuses_workspace(kind, backend):
    """Two gradients from one persistent tape: the backward op leaves the
    saved workspace as it found it."""
    a = inputs(kind, seed=1)
    ups = upstream(kind, a, True)
    first, second = op_grads(kind, a, ups, True, backend, graph=True,
                             persistent=True)
    want = ops_grads(kind, a, ups, True, backend)
    assert_grads_equal(first, want)
    assert_grads_equal(second, want)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", sorted(G))
def test_compiled_workspace_arrays_are_not_pickled(kind, masked, backend,
                                                   monkeypatch):
    """The forward op hands the workspace's own arrays to TensorFlow as one
    buffer, of which they are views; only its small metadata is pickled."""
    split = []
    real = _tf_ops._split

    def spy(ws):
        out = real(ws)
        split.append((ws, out))
        return out
    monkeypatch.setattr(_tf_ops, "_split", spy)
    a = inputs(kind, B=8, T=20, I=16, H=32, masked=masked, seed=2)
    ups = upstream(kind, a, True)
    got, = op_grads(kind, a, ups, False, backend, graph=True)
    assert_grads_equal(got, ops_grads(kind, a, ups, False, backend))
    (ws, (blob, arena)), = split
    assert blob.dtype == np.uint8 and blob.size < 1024
    assert arena is ws.data["arena"]
    assert arena.size == 0 or arena.ctypes.data % 64 == 0
    names = (["cs", "gates"] if kind == "lstm" else []) + (
        ["mask_tm", "seen"] if masked else [])
    for name in names:
        assert ws.data[name].base is arena.base
    assert arena.nbytes >= sum(ws.data[n].nbytes for n in names)


@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 0, 3, 5)],
                         ids=["no-batch", "no-steps"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(G))
def test_empty_shapes(kind, backend, shape):
    """Empty batches or sequences (run by the reference on every backend,
    whose workspace is pickled whole) still differentiate."""
    B, T, I, H = shape
    a = inputs(kind, B, T, I, H, masked=False, seed=3)
    ups = upstream(kind, a, True)
    got, = op_grads(kind, a, ups, False, backend, graph=True)
    want = ops_grads(kind, a, ups, False, backend)
    assert_grads_equal(got, want)
    if T == 0:   # h = h0: its gradient is the upstream one
        np.testing.assert_array_equal(got[1], ups[1])


def test_numpy_function_wraps_aligned_results_without_a_copy():
    """What the glue relies on for memory: TensorFlow takes a result in the
    buffer pool's memory (64-byte aligned) as it is, and copies a result
    that is not aligned so."""
    from fastrnn._buffers import pool
    kept = {}

    def results(x):
        kept["pool"] = pool.empty((256, 1024), np.float32)
        kept["pool"][...] = 1
        raw = np.ones(256 * 1024 + 1, np.float32)
        off = 1 if raw.ctypes.data % 64 == 0 else 0   # any non-64-byte-aligned start
        kept["plain"] = raw[off:off + 256 * 1024].reshape(256, 1024)
        return kept["pool"], kept["plain"]

    f = tf.function(lambda x: tf.numpy_function(results, [x], [tf.float32] * 2))
    from_pool, from_plain = f(tf.constant(1.0))
    kept["pool"][0, 0] = kept["plain"][0, 0] = 42
    assert from_pool.numpy()[0, 0] == 42       # the same memory
    assert from_plain.numpy()[0, 0] == 1       # a copy

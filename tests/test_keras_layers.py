"""fastrnn.keras.LSTM / SimpleRNN against the stock Keras layers: outputs and
gradients (inputs, initial state, weights) over masks, directions, return
modes, statefulness, Bidirectional, dropout, dtypes; fallbacks; bad input."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import threading  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import fastrnn  # noqa: E402
import fastrnn.keras as fk  # noqa: E402
from fastrnn import ops  # noqa: E402

# TensorFlow's numpy_function trips over NumPy 2's __array__(copy=...) protocol.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

B, T, I, H = 4, 7, 5, 6
KINDS = {"lstm": (fk.LSTM, keras.layers.LSTM, 2),
         "rnn": (fk.SimpleRNN, keras.layers.SimpleRNN, 1)}


def make_mask(pattern, seed=0):
    """(B, T) bool masks, or None."""
    if pattern == "none":
        return None
    lengths = np.array([T, 5, 3, 1])
    right = np.arange(T)[None, :] < lengths[:, None]
    if pattern == "right":
        return right
    if pattern == "left":
        return right[:, ::-1].copy()
    rng = np.random.default_rng(seed)
    m = rng.random((B, T)) < 0.6
    m[1] = False           # a fully masked row
    m[2, 0] = False
    m[3] = True
    return m


def data(seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, I)).astype(dtype)
    states = [rng.standard_normal((B, H)).astype(dtype) * 0.5 for _ in range(2)]
    return x, states


def pair(kind, **kwargs):
    """A stock layer and a fastrnn layer with the same weights."""
    ours_cls, stock_cls, _ = KINDS[kind]
    stock = stock_cls(H, **kwargs)
    ours = ours_cls(H, **kwargs)
    stock.build((B, T, I))
    ours.build((B, T, I))
    ours.set_weights(stock.get_weights())
    return stock, ours


class CountCalls:
    """Counts calls to fastrnn.ops' kernel entry points (and what they got)."""

    NAMES = ("lstm_forward", "lstm_backward", "rnn_forward", "rnn_backward")

    def __init__(self, monkeypatch):
        self.calls = {n: [] for n in self.NAMES}
        for name in self.NAMES:
            real = getattr(ops, name)

            def wrapper(*args, _real=real, _name=name, **kwargs):
                self.calls[_name].append(dict(kwargs, args=args))
                return _real(*args, **kwargs)
            monkeypatch.setattr(ops, name, wrapper)

    def count(self, name):
        return len(self.calls[name])

    def total(self):
        return sum(len(v) for v in self.calls.values())


@pytest.fixture
def counter(monkeypatch):
    return CountCalls(monkeypatch)


def run(layer, x, states, mask, n_states, training=False, use_state=True):
    """Outputs of layer and gradients of a fixed random projection of them
    w.r.t. x, the initial states and the trainable weights."""
    x = tf.constant(x)
    init = [tf.constant(s) for s in states[:n_states]] if use_state else None
    with tf.GradientTape() as tape:
        tape.watch(x)
        if init:
            tape.watch(init)
        out = layer(x, initial_state=init,
                    mask=None if mask is None else tf.constant(mask),
                    training=training)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = 0.0
        for k, o in enumerate(outs):
            w = np.random.default_rng(10 + k).standard_normal(o.shape)
            loss += tf.reduce_sum(tf.cast(o, tf.float64) * w)
    sources = [x] + (init or []) + list(layer.trainable_weights)
    grads = tape.gradient(loss, sources)
    return [o.numpy() for o in outs], [g.numpy() for g in grads]


def assert_same(a, b, atol=2e-5):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.shape == v.shape
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=atol)


# ------------------------------------------------------------- the grid ---
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("mask", ["none", "right", "left", "random"])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
def test_matches_stock(kind, mask, go_backwards, return_sequences,
                       return_state, counter):
    n_states = KINDS[kind][2]
    stock, ours = pair(kind, go_backwards=go_backwards,
                       return_sequences=return_sequences,
                       return_state=return_state)
    x, states = data()
    m = make_mask(mask)
    want = run(stock, x, states, m, n_states)
    assert counter.total() == 0
    got = run(ours, x, states, m, n_states)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert counter.count(f"{kind}_forward") == 1
    assert counter.count(f"{kind}_backward") == 1


@pytest.mark.parametrize("backend", fastrnn.available_backends())
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_backend(kind, backend, counter):
    stock, _ = pair(kind, return_sequences=True, return_state=True)
    ours = KINDS[kind][0](H, return_sequences=True, return_state=True,
                          backend=backend)
    ours.build((B, T, I))
    ours.set_weights(stock.get_weights())
    x, states = data(1)
    m = make_mask("random", 1)
    want = run(stock, x, states, m, KINDS[kind][2])
    got = run(ours, x, states, m, KINDS[kind][2])
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert {c["backend"] for c in counter.calls[f"{kind}_forward"]} == {backend}


@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_default_initial_state(kind, return_state, counter):
    """Without initial_state the kernels start from zeros themselves: the
    op passes them no states (and asks no gradient for them)."""
    stock, ours = pair(kind, return_sequences=True, return_state=return_state)
    x, states = data(2)
    m = make_mask("left")
    want = run(stock, x, states, m, 0, use_state=False)
    got = run(ours, x, states, m, 0, use_state=False)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    n_states = KINDS[kind][2]
    args, = [c["args"] for c in counter.calls[f"{kind}_forward"]]
    assert args[4:4 + n_states] == (None,) * n_states      # h0 (, c0)
    # given ones are passed
    run(ours, x, states, m, n_states)
    args = counter.calls[f"{kind}_forward"][-1]["args"]
    assert all(isinstance(a, np.ndarray) for a in args[4:4 + n_states])


def _py_funcs(fn, *args):
    """(number of inputs, number of results) of each tf.numpy_function in
    the graph of tf.function ``fn``, in graph order."""
    graph = fn.get_concrete_function(*args).graph
    return [(len(op.inputs), len(op.outputs)) for op in graph.get_operations()
            if op.type == "PyFuncStateless"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_ops_take_and_return_only_what_the_layer_uses(kind):
    """Each input and result of a tf.numpy_function costs time on every
    call: the forward op takes x, the weights and given initial states, and
    returns the outputs (and the final states only when the layer returns
    or keeps them) and the workspace (metadata and one buffer); the
    backward op takes the used results' gradients, the workspace, x, h0
    when given, the kernels and the outputs, and returns the gradients of
    what it took."""
    n_states = KINDS[kind][2]
    x = tf.constant(data(4)[0])
    init = [tf.constant(s) for s in data(4)[1][:n_states]]

    def step(layer, initial_state):
        @tf.function
        def f(x, init):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = layer(x, initial_state=init if initial_state else None)
                out = out if isinstance(out, (list, tuple)) else [out]
                loss = sum(tf.reduce_sum(o * o) for o in out)
            return tape.gradient(loss, [x] + list(layer.trainable_weights))
        return _py_funcs(f, x, init)

    _, plain = pair(kind, return_sequences=True)
    # forward: x, W, U, b -> outputs, blob, arena; backward: d_outputs,
    # blob, arena, x, W, U, outputs -> dx, dW, dU, db
    assert step(plain, False) == [(4, 3), (7, 4)]
    _, full = pair(kind, return_sequences=True, return_state=True)
    # + initial states, final states and their gradients, h0 for backward
    assert step(full, True) == [(4 + n_states, 3 + n_states),
                                (7 + n_states + 1, 4 + n_states)]
    _, last = pair(kind)          # last output only: still no final states
    assert step(last, False) == [(4, 3), (7, 4)]
    # inference: x, W, U, b -> outputs
    assert _py_funcs(tf.function(lambda x: plain(x)), x) == [(4, 1)]


@pytest.mark.parametrize("activation", ["relu", "linear", None])
def test_simple_rnn_activations(activation, counter):
    stock, ours = pair("rnn", activation=activation, return_sequences=True)
    x, states = data(3)
    x *= 0.3
    m = make_mask("random", 3)
    want = run(stock, x, states, m, 1)
    got = run(ours, x, states, m, 1)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert counter.count("rnn_forward") == 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_no_bias(kind, counter):
    stock, ours = pair(kind, use_bias=False, return_state=True)
    x, states = data(4)
    want = run(stock, x, states, make_mask("right"), KINDS[kind][2])
    got = run(ours, x, states, make_mask("right"), KINDS[kind][2])
    assert len(ours.trainable_weights) == 2
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert counter.count(f"{kind}_forward") == 1


# ------------------------------------------------------------- dropout ---
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_input_dropout_matches_stock_with_same_seed(kind, counter):
    stock, ours = pair(kind, dropout=0.4, seed=7, return_sequences=True)
    x, states = data(5)
    m = make_mask("random", 5)
    for _ in range(2):      # a fresh mask each call, the same in both
        want = run(stock, x, states, m, KINDS[kind][2], training=True)
        got = run(ours, x, states, m, KINDS[kind][2], training=True)
        assert_same(got[0], want[0])
        assert_same(got[1], want[1])
    assert counter.count(f"{kind}_forward") == 2
    # inference ignores dropout
    plain = run(ours, x, states, m, KINDS[kind][2], training=False)
    assert not np.allclose(plain[0][0], got[0][0])


# ------------------------------------------------------------ stateful ---
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("go_backwards", [False, True])
def test_stateful_and_reset(kind, go_backwards, counter):
    stock, ours = pair(kind, stateful=True, return_sequences=True,
                       go_backwards=go_backwards)
    x, _ = data(6)
    m = make_mask("random", 6)
    for step in range(3):
        if step == 2:
            stock.reset_states()
            ours.reset_states()
        want = stock(x, mask=m).numpy()
        got = ours(x, mask=m).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
        for a, b in zip(ours.states, stock.states):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4,
                                       atol=2e-5)
    assert counter.count(f"{kind}_forward") == 3


# -------------------------------------------------------- Bidirectional ---
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("mask", ["none", "left", "random"])
def test_bidirectional(kind, return_sequences, return_state, mask, counter):
    ours_cls, stock_cls, n_states = KINDS[kind]
    kw = dict(return_sequences=return_sequences, return_state=return_state)
    stock = keras.layers.Bidirectional(stock_cls(H, **kw))
    ours = keras.layers.Bidirectional(ours_cls(H, **kw))
    stock.build((B, T, I))
    ours.build((B, T, I))
    ours.set_weights(stock.get_weights())
    assert isinstance(ours.forward_layer, ours_cls)
    assert isinstance(ours.backward_layer, ours_cls)
    assert ours.forward_layer.zero_output_for_mask == return_sequences
    x, _ = data(7)
    m = make_mask(mask, 7)
    want = run(stock, x, [], m, 0, use_state=False)
    got = run(ours, x, [], m, 0, use_state=False)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert counter.count(f"{kind}_forward") == 2


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_zero_output_for_mask(kind):
    ours_cls, stock_cls, n = KINDS[kind]
    stock = stock_cls(H, return_sequences=True, zero_output_for_mask=True,
                      go_backwards=True)
    ours = ours_cls(H, return_sequences=True, zero_output_for_mask=True,
                    go_backwards=True)
    stock.build((B, T, I))
    ours.build((B, T, I))
    ours.set_weights(stock.get_weights())
    x, states = data(8)
    m = make_mask("random", 8)
    want = run(stock, x, states, m, n)
    got = run(ours, x, states, m, n)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert np.all(got[0][0][~m[:, ::-1]] == 0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unknown_batch_and_time_dimensions(kind, counter):
    """A traced function for any (batch, time), called with two shapes."""
    stock, ours = pair(kind, return_sequences=True, return_state=True)
    spec = [tf.TensorSpec([None, None, I]), tf.TensorSpec([None, None], tf.bool)]

    def fn(layer):
        @tf.function(input_signature=spec)
        def f(x, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outs = layer(x, mask=mask)
                loss = sum(tf.reduce_sum(o * o) for o in outs)
            return outs, tape.gradient(loss, [x] + list(layer.trainable_weights))
        return f

    f_stock, f_ours = fn(stock), fn(ours)
    for seed, (b, t) in enumerate([(3, 4), (5, 9)]):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((b, t, I)).astype("float32")
        m = rng.random((b, t)) < 0.7
        (wo, wg), (go, gg) = f_stock(x, m), f_ours(x, m)
        assert go[0].shape == (b, t, H)
        assert_same([o.numpy() for o in go], [o.numpy() for o in wo])
        assert_same([g.numpy() for g in gg], [g.numpy() for g in wg])
    assert counter.count(f"{kind}_forward") == 2


# -------------------------------------------------------- tf.function ---
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tf_function_matches_eager_and_stock(kind, counter):
    stock, ours = pair(kind, return_sequences=True, return_state=True)
    x, states = data(9)
    m = make_mask("random", 9)
    n = KINDS[kind][2]

    def step(layer):
        @tf.function
        def f(x, init, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                tape.watch(init)
                outs = layer(x, initial_state=init, mask=mask)
                loss = sum(tf.reduce_sum(tf.sin(o)) for o in outs)
            return outs, tape.gradient(
                loss, [x] + init + list(layer.trainable_weights))
        return f(tf.constant(x), [tf.constant(s) for s in states[:n]],
                 tf.constant(m))

    want_out, want_g = step(stock)
    got_out, got_g = step(ours)
    assert_same([o.numpy() for o in got_out], [o.numpy() for o in want_out])
    assert_same([g.numpy() for g in got_g], [g.numpy() for g in want_g])
    # the tape inside the traced function asked for a workspace
    assert [c["return_workspace"] for c in counter.calls[f"{kind}_forward"]] == [True]
    assert counter.count(f"{kind}_backward") == 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_graph_gradients_without_tape_rebuild_workspace(kind, counter):
    """tf.gradients in a graph built without a tape: the backward pass
    reruns the forward pass to get a workspace, with the same result."""
    stock, ours = pair(kind, return_sequences=True)
    x, _ = data(10)
    m = make_mask("left", 10)

    def grads(layer):
        @tf.function
        def f(x):
            y = layer(x, mask=tf.constant(m))
            return tf.gradients(tf.reduce_sum(y * y), [x] + list(layer.trainable_weights))
        return [g.numpy() for g in f(tf.constant(x))]

    assert_same(grads(ours), grads(stock))
    flags = [c["return_workspace"] for c in counter.calls[f"{kind}_forward"]]
    assert flags == [False, True]
    assert counter.count(f"{kind}_backward") == 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_no_workspace_without_tape(kind, counter):
    _, ours = pair(kind)
    x, _ = data(11)
    ours(x)
    assert [c["return_workspace"] for c in counter.calls[f"{kind}_forward"]] == [False]


def test_concurrent_calls_from_threads():
    stock, ours = pair("lstm", return_sequences=True)
    xs = [data(20 + k)[0] for k in range(6)]
    want = [stock(x).numpy() for x in xs]
    got = [None] * len(xs)

    def work(k):
        got[k] = ours(xs[k]).numpy()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_concurrent_calls_with_and_without_initial_states(kind):
    """Whether a call gave initial states is the calling thread's: two
    threads inside one layer at once, one with states and one without, get
    each its own result."""
    n_states = KINDS[kind][2]
    stock, ours = pair(kind, return_sequences=True)
    x, states = data(30)
    init = [tf.constant(s) for s in states[:n_states]]
    want = {True: stock(x, initial_state=init).numpy(), False: stock(x).numpy()}
    barrier = threading.Barrier(2, timeout=30)
    arrived = threading.Event()
    real = ours._check_inputs

    def check_inputs(*args):          # both threads are inside call() here
        arrived.set()
        barrier.wait()
        return real(*args)
    ours._check_inputs = check_inputs
    got = {}

    def work(given):
        got[given] = ours(x, initial_state=init if given else None).numpy()
    # the thread with states enters first, the other one after it
    threads = [threading.Thread(target=work, args=(g,)) for g in (True, False)]
    threads[0].start()
    assert arrived.wait(30)
    threads[1].start()
    for t in threads:
        t.join()
    for given in (True, False):
        np.testing.assert_allclose(got[given], want[given], rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------- dtypes ---
@pytest.fixture
def float64():
    """floatx float64 (and the default dtype policy that Keras derived from
    floatx once it was first asked for), restored afterwards."""
    old_floatx, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_float64(kind, float64, counter):
    stock, ours = pair(kind, return_sequences=True, return_state=True)
    x, states = data(12, "float64")
    m = make_mask("random", 12)
    want = run(stock, x, states, m, KINDS[kind][2])
    got = run(ours, x, states, m, KINDS[kind][2])
    assert got[0][0].dtype == np.float64
    assert all(g.dtype == np.float64 for g in got[1])
    assert_same(got[0], want[0], atol=1e-12)
    assert_same(got[1], want[1], atol=1e-12)
    assert counter.count(f"{kind}_forward") == 1


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mixed_precision(kind, policy, counter):
    ours_cls, stock_cls, n = KINDS[kind]
    ref = stock_cls(H, return_sequences=True, return_state=True)
    ours = ours_cls(H, return_sequences=True, return_state=True, dtype=policy)
    ref.build((B, T, I))
    ours.build((B, T, I))
    ours.set_weights(ref.get_weights())
    x, states = data(13)
    m = make_mask("random", 13)
    want = run(ref, x, states, m, n)
    # inputs as the policy's compute dtype would deliver them
    compute = keras.dtype_policies.get(policy).compute_dtype
    x_c = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(x, compute), "float32"))
    want_c = run(ref, x_c, states, m, n)
    got = run(ours, x, states, m, n)
    out = ours(x, mask=m)
    assert all(o.dtype == compute for o in out)
    tol = 1e-2 if policy == "mixed_float16" else 3e-2
    # float32 math inside: as close to float32 on rounded inputs as the
    # output rounding allows
    for g, w in zip(got[0], want_c[0]):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=tol)
    for g, w in zip(got[1][n + 1:], want[1][n + 1:]):   # weight grads
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=0.05, atol=0.05 * np.abs(w).max())
    assert counter.count(f"{kind}_forward") == 2


def test_mixed_precision_global_policy(counter):
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = fk.LSTM(H, return_sequences=True)
        y = layer(data(14)[0])
        assert y.dtype == "float16"
        assert layer.cell.kernel.dtype == "float32"
    finally:
        keras.config.set_dtype_policy(old)
    assert counter.count("lstm_forward") == 1


# ----------------------------------------------------------- fallbacks ---
FALLBACKS = [
    ("lstm", dict(activation="relu"), False),
    ("lstm", dict(recurrent_activation="hard_sigmoid"), False),
    ("lstm", dict(recurrent_dropout=0.3, seed=3), True),
    ("lstm", dict(implementation=1, dropout=0.3, seed=3), True),
    ("lstm", dict(unroll=True), False),
    ("rnn", dict(activation="sigmoid"), False),
    ("rnn", dict(recurrent_dropout=0.3, seed=3), True),
    ("rnn", dict(unroll=True), False),
]


@pytest.mark.parametrize("kind,kwargs,training", FALLBACKS)
def test_fallback_to_stock_loop(kind, kwargs, training, counter):
    stock, ours = pair(kind, return_sequences=True, return_state=True,
                       **kwargs)
    if kwargs.get("implementation") == 1:
        # stock LSTM's cuDNN attempt crashes on the 4 dropout masks of
        # implementation=1 in training; its generic loop is the reference
        stock.use_cudnn = False
    x, states = data(15)
    m = make_mask("random", 15)
    want = run(stock, x, states, m, KINDS[kind][2], training=training)
    got = run(ours, x, states, m, KINDS[kind][2], training=training)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert counter.total() == 0


def test_implementation_1_without_dropout_uses_kernels(counter):
    stock, ours = pair("lstm", implementation=1, dropout=0.3,
                       return_sequences=True)
    x, states = data(16)
    want = run(stock, x, states, None, 2, training=False)
    got = run(ours, x, states, None, 2, training=False)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert counter.count("lstm_forward") == 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_xla_falls_back(kind, counter):
    stock, ours = pair(kind, return_sequences=True)
    x, _ = data(17)
    m = tf.constant(make_mask("random", 17))
    assert ours.supports_jit is False

    def f(layer):
        return tf.function(lambda x: layer(x, mask=m), jit_compile=True)(
            tf.constant(x)).numpy()
    np.testing.assert_allclose(f(ours), f(stock), rtol=1e-4, atol=2e-5)
    assert counter.total() == 0
    # the same layer outside XLA uses the kernels
    np.testing.assert_allclose(ours(x, mask=m), f(stock), rtol=1e-4, atol=2e-5)
    assert counter.total() == 1


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                    reason="with a GPU, use_cudnn=True runs cuDNN")
def test_use_cudnn_true_without_gpu_raises_as_stock(counter):
    x, _ = data(21)
    with pytest.raises(ValueError, match="use_cudnn=True"):
        keras.layers.LSTM(H, use_cudnn=True)(x)
    with pytest.raises(ValueError, match="use_cudnn=True"):
        fk.LSTM(H, use_cudnn=True)(x)
    stock, ours = pair("lstm", use_cudnn=False, return_sequences=True)
    np.testing.assert_allclose(ours(x), stock(x), rtol=1e-4, atol=2e-5)
    assert counter.count("lstm_forward") == 1


def test_jit_compile_model_setting_is_refused():
    model = keras.Sequential([keras.Input((T, I)), fk.LSTM(H)])
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(loss="mse", jit_compile=True)
    assert model.jit_compile is False
    # fallback configurations keep XLA available, as in Keras
    assert fk.LSTM(H, unroll=True).supports_jit is True


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_savedmodel_export_falls_back(kind, tmp_path, counter):
    ours_cls = KINDS[kind][0]
    model = keras.Sequential([keras.Input((T, I)),
                              ours_cls(H, return_sequences=True)])
    x, _ = data(18)
    want = model.predict(x, verbose=0)
    n = counter.total()
    assert n == 1
    model.export(str(tmp_path / "sm"), verbose=False)
    assert counter.total() == n      # tracing for export used Keras's loop
    reloaded = tf.saved_model.load(str(tmp_path / "sm"))
    got = reloaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------ bad input ---
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_wrong_feature_size(kind):
    _, ours = pair(kind)
    with pytest.raises(ValueError, match="built for 5"):
        ours(np.zeros((B, T, 3), "float32"))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_wrong_rank(kind):
    _, ours = pair(kind)
    with pytest.raises(ValueError, match="ndim=3"):
        ours(np.zeros((B, T), "float32"))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_wrong_mask_shape(kind):
    _, ours = pair(kind)
    with pytest.raises(ValueError, match="mask must have shape"):
        ours(np.zeros((B, T, I), "float32"), mask=np.ones((B, T - 1), bool))


def test_mask_with_trailing_axis(counter):
    stock, ours = pair("lstm", return_sequences=True)
    x, _ = data(19)
    m = make_mask("random", 19)
    want = stock(x, mask=m).numpy()
    got = ours(x, mask=tf.constant(m[:, :, None])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be None or one of"):
        fk.LSTM(H, backend="fortran")

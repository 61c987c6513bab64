"""Models with fastrnn layers train like the same models with stock layers:
per-epoch losses of model.fit (same initial weights, shuffle=False) match to
1e-4, and predict/evaluate agree."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import keras  # noqa: E402

import fastrnn.keras as fk  # noqa: E402
from fastrnn import ops  # noqa: E402

# TensorFlow's numpy_function trips over NumPy 2's __array__(copy=...) protocol.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

N, T, VOCAB, CLASSES = 16, 7, 20, 3
STOCK = keras.layers
LAYERS = {"stock": (keras.layers.LSTM, keras.layers.SimpleRNN),
          "fastrnn": (fk.LSTM, fk.SimpleRNN)}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts forward and backward kernel calls made through fastrnn.ops."""
    calls = {"forward": 0, "backward": 0}
    for name in ("lstm_forward", "rnn_forward", "lstm_backward", "rnn_backward"):
        real = getattr(ops, name)

        def wrapper(*a, _real=real, _key=name.split("_")[1], **k):
            calls[_key] += 1
            return _real(*a, **k)
        monkeypatch.setattr(ops, name, wrapper)
    return calls


def token_data(seed=0):
    """Integer sequences padded with 0 on the right, the left or inside."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(N, T))
    for i in range(N):
        n = rng.integers(0, T)
        if i % 3 == 0:
            x[i, T - n:] = 0
        elif i % 3 == 1:
            x[i, :n] = 0
        else:
            x[i, rng.random(T) < 0.3] = 0
    x[5] = 0                                    # an all-padding row
    y = rng.integers(0, CLASSES, size=N)
    return x, y


def embedding_lstm(kind):
    LSTM, _ = LAYERS[kind]
    return keras.Sequential([
        keras.Input((T,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 8, mask_zero=True),
        LSTM(6),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ])


def stacked_with_dropout(kind):
    LSTM, SimpleRNN = LAYERS[kind]
    return keras.Sequential([
        keras.Input((T,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 5, mask_zero=True),
        SimpleRNN(6, return_sequences=True, dropout=0.25, seed=1),
        keras.layers.Bidirectional(LSTM(4, return_sequences=True, go_backwards=False,
                                        dropout=0.2, seed=2)),
        SimpleRNN(5, activation="relu", go_backwards=True),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ])


def encoder_decoder(kind):
    """An encoder's final states are the decoder's initial state."""
    LSTM, SimpleRNN = LAYERS[kind]
    src = keras.Input((T,), dtype="int32")
    emb = keras.layers.Embedding(VOCAB, 5, mask_zero=True)(src)
    _, h, c = LSTM(6, return_state=True)(emb)
    seq = LSTM(6, return_sequences=True)(emb, initial_state=[h, c])
    _, s = SimpleRNN(6, return_state=True)(seq, initial_state=h)
    out = keras.layers.Dense(CLASSES, activation="softmax")(s)
    return keras.Model(src, out)


def fit_pair(build, epochs=3, seed=0, **fit_kwargs):
    """Train the stock and the fastrnn model from the same weights."""
    x, y = token_data(seed)
    histories, models = {}, {}
    weights = None
    for kind in ("stock", "fastrnn"):
        model = build(kind)
        if weights is None:
            weights = model.get_weights()
        else:
            model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.Adam(0.01),
                      loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        histories[kind] = model.fit(x, y, epochs=epochs, shuffle=False,
                                    verbose=0, **fit_kwargs).history["loss"]
        models[kind] = model
    return histories, models, (x, y)


@pytest.mark.parametrize("build", [embedding_lstm, stacked_with_dropout,
                                   encoder_decoder])
def test_fit_losses_match_stock(build, kernel_calls):
    hist, models, (x, y) = fit_pair(build, batch_size=4)
    assert kernel_calls["forward"] > 0 and kernel_calls["backward"] > 0
    np.testing.assert_allclose(hist["fastrnn"], hist["stock"], atol=1e-4)
    assert hist["fastrnn"][-1] < hist["fastrnn"][0]      # it learns
    for a, b in zip(models["fastrnn"].get_weights(), models["stock"].get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(models["fastrnn"].predict(x, verbose=0),
                               models["stock"].predict(x, verbose=0), atol=1e-5)
    np.testing.assert_allclose(models["fastrnn"].evaluate(x, y, verbose=0),
                               models["stock"].evaluate(x, y, verbose=0), atol=1e-5)


def test_predict_and_evaluate_use_kernels_without_workspace(monkeypatch):
    flags = []
    real = ops.lstm_forward

    def spy(*a, **k):
        flags.append(k["return_workspace"])
        return real(*a, **k)
    monkeypatch.setattr(ops, "lstm_forward", spy)
    model = embedding_lstm("fastrnn")
    model.compile(loss="sparse_categorical_crossentropy")
    x, y = token_data(1)
    model.predict(x, batch_size=8, verbose=0)
    model.evaluate(x, y, batch_size=8, verbose=0)
    assert flags == [False] * 4
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert flags[4:] == [True, True]


def test_stateful_fit_matches_stock(kernel_calls):
    def build(kind):
        LSTM, SimpleRNN = LAYERS[kind]
        return keras.Sequential([
            keras.Input((T,), batch_size=4, dtype="int32"),
            keras.layers.Embedding(VOCAB, 5, mask_zero=True),
            SimpleRNN(6, stateful=True, return_sequences=True),
            LSTM(6, stateful=True),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ])
    hist, models, (x, _) = fit_pair(build, epochs=2, batch_size=4)
    np.testing.assert_allclose(hist["fastrnn"], hist["stock"], atol=1e-4)
    for model in models.values():
        for layer in model.layers:
            if getattr(layer, "stateful", False):
                layer.reset_states()
    np.testing.assert_allclose(models["fastrnn"].predict(x, batch_size=4, verbose=0),
                               models["stock"].predict(x, batch_size=4, verbose=0),
                               atol=1e-5)
    assert kernel_calls["backward"] > 0


def test_float_inputs_with_masking_layer(kernel_calls):
    """Masking layer (float inputs, zero rows masked) into both layer kinds."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, T, 4)).astype("float32")
    x[rng.random((N, T)) < 0.3] = 0.0
    y = rng.standard_normal((N, 2)).astype("float32")

    def build(kind):
        LSTM, SimpleRNN = LAYERS[kind]
        return keras.Sequential([
            keras.Input((T, 4)), keras.layers.Masking(0.0),
            LSTM(5, return_sequences=True), SimpleRNN(3), keras.layers.Dense(2)])
    losses = {}
    init = None
    for kind in ("stock", "fastrnn"):
        model = build(kind)
        init = init or model.get_weights()
        model.set_weights(init)
        model.compile(optimizer="sgd", loss="mse")
        losses[kind] = model.fit(x, y, batch_size=4, epochs=3, shuffle=False,
                                 verbose=0).history["loss"]
    np.testing.assert_allclose(losses["fastrnn"], losses["stock"], atol=1e-4)
    assert kernel_calls["forward"] > 0

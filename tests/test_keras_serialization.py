"""fastrnn.keras layers are stock-compatible in constructor, config and
weights: get_config/from_config round trips, .keras files save and load
(after ``import fastrnn.keras``), and weights move between stock and fastrnn
layers untouched."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import keras  # noqa: E402

import fastrnn.keras as fk  # noqa: E402

# TensorFlow's numpy_function trips over NumPy 2's __array__(copy=...) protocol.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
PAIRS = {"lstm": (fk.LSTM, keras.layers.LSTM),
         "rnn": (fk.SimpleRNN, keras.layers.SimpleRNN)}
COMMON = dict(activation="relu", use_bias=False, kernel_initializer="ones",
              recurrent_initializer="zeros", bias_initializer="ones",
              kernel_regularizer="l2", recurrent_regularizer="l1",
              bias_regularizer="l1", activity_regularizer="l2",
              kernel_constraint="non_neg", recurrent_constraint="unit_norm",
              bias_constraint="max_norm", dropout=0.1, recurrent_dropout=0.2,
              seed=5, return_sequences=True, return_state=True,
              go_backwards=True, stateful=True, unroll=True,
              zero_output_for_mask=True, trainable=False, name="rec")
EXTRA = {"lstm": dict(recurrent_activation="hard_sigmoid",
                      unit_forget_bias=False, use_cudnn=False,
                      implementation=1),
         "rnn": {}}


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("custom", [False, True])
def test_config_equals_stock(kind, custom):
    ours_cls, stock_cls = PAIRS[kind]
    kwargs = {**COMMON, **EXTRA[kind]} if custom else {"name": "rec"}
    ours, stock = ours_cls(7, **kwargs), stock_cls(7, **kwargs)
    assert ours.get_config() == stock.get_config()
    # and the layer behaves as configured
    assert ours.units == 7 and ours.return_state == stock.return_state
    assert ours.cell.activation is stock.cell.activation


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_positional_arguments_as_stock(kind):
    ours_cls, stock_cls = PAIRS[kind]
    assert ours_cls(4, "relu").get_config()["activation"] == "relu"
    assert (ours_cls(4, "relu", name="a").get_config()
            == stock_cls(4, "relu", name="a").get_config())


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_from_config_round_trip(kind):
    ours_cls, _ = PAIRS[kind]
    layer = ours_cls(5, **{k: v for k, v in COMMON.items() if k != "name"})
    clone = ours_cls.from_config(layer.get_config())
    assert type(clone) is ours_cls
    assert clone.get_config() == layer.get_config()
    generic = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(generic) is ours_cls
    assert generic.get_config() == layer.get_config()


def test_backend_option_in_config_only_when_set():
    assert "backend" not in fk.LSTM(3).get_config()
    layer = fk.SimpleRNN(3, backend="numpy")
    assert layer.get_config()["backend"] == "numpy"
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert clone.fastrnn_backend == "numpy"


def test_registered_names():
    assert keras.saving.get_registered_name(fk.LSTM) == "fastrnn>LSTM"
    assert keras.saving.get_registered_name(fk.SimpleRNN) == "fastrnn>SimpleRNN"


def test_bad_use_cudnn_rejected_as_stock():
    with pytest.raises(ValueError, match="use_cudnn"):
        fk.LSTM(3, use_cudnn="sometimes")


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_same_weights_names_shapes_order(kind):
    ours_cls, stock_cls = PAIRS[kind]
    ours, stock = ours_cls(6), stock_cls(6)
    ours.build((2, 3, 5))
    stock.build((2, 3, 5))
    assert ([(w.name, tuple(w.shape)) for w in ours.weights]
            == [(w.name, tuple(w.shape)) for w in stock.weights])
    assert [w.name for w in ours.weights] == ["kernel", "recurrent_kernel", "bias"]


def build_model(LSTM, SimpleRNN):
    inp = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(12, 4, mask_zero=True)(inp)
    x = keras.layers.Bidirectional(LSTM(5, return_sequences=True))(x)
    x = SimpleRNN(3, return_sequences=True, go_backwards=True)(x)
    x = LSTM(4)(x)
    return keras.Model(inp, keras.layers.Dense(2)(x))


def inputs():
    x = np.random.default_rng(0).integers(0, 12, size=(5, 6))
    x[1] = 0
    x[2, 3:] = 0
    return x


def test_keras_file_round_trip(tmp_path):
    model = build_model(fk.LSTM, fk.SimpleRNN)
    x = inputs()
    want = model.predict(x, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    kinds = {type(layer).__name__ + ":" + type(layer).__module__
             for layer in loaded.layers}
    assert "SimpleRNN:fastrnn.keras.layers" in kinds
    assert "LSTM:fastrnn.keras.layers" in kinds
    assert isinstance(loaded.layers[2].forward_layer, fk.LSTM)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=1e-6)


def test_keras_file_loads_in_new_process_after_import(tmp_path):
    model = build_model(fk.LSTM, fk.SimpleRNN)
    x = inputs()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    model.save(tmp_path / "m.keras")
    script = textwrap.dedent(f"""
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import numpy as np, keras
        path = {str(tmp_path)!r}
        try:
            keras.models.load_model(path + "/m.keras")
        except Exception as exc:
            assert "fastrnn" in str(exc), exc
        else:
            raise SystemExit("loaded without the fastrnn layers registered")
        import fastrnn.keras
        model = keras.models.load_model(path + "/m.keras")
        assert type(model.layers[-2]) is fastrnn.keras.LSTM
        got = model.predict(np.load(path + "/x.npy"), verbose=0)
        np.testing.assert_allclose(got, np.load(path + "/y.npy"), atol=1e-6)
        print("OK")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_weights_move_between_stock_and_fastrnn(tmp_path):
    stock = build_model(keras.layers.LSTM, keras.layers.SimpleRNN)
    ours = build_model(fk.LSTM, fk.SimpleRNN)
    x = inputs()
    want = stock.predict(x, verbose=0)
    # through a weights file
    stock.save_weights(tmp_path / "w.weights.h5")
    ours.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_allclose(ours.predict(x, verbose=0), want, atol=1e-5)
    # through a full stock .keras file
    stock.save(tmp_path / "stock.keras")
    ours2 = build_model(fk.LSTM, fk.SimpleRNN)
    ours2.load_weights(tmp_path / "stock.keras")
    np.testing.assert_allclose(ours2.predict(x, verbose=0), want, atol=1e-5)
    # and back, with get_weights/set_weights
    back = build_model(keras.layers.LSTM, keras.layers.SimpleRNN)
    back.set_weights(ours.get_weights())
    np.testing.assert_allclose(back.predict(x, verbose=0), want, atol=1e-5)

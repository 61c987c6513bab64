"""Data-parallel training: a model with fastrnn layers trains under
tf.distribute.MirroredStrategy over two logical CPU devices with the same
per-epoch losses as on one device.  Runs in a subprocess, because logical
devices must be configured before TensorFlow initializes."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import fastrnn.keras as fk
from fastrnn import ops

calls = {"forward": 0, "backward": 0}
for name in ("lstm_forward", "rnn_forward", "lstm_backward", "rnn_backward"):
    real = getattr(ops, name)
    def wrapper(*a, _real=real, _key=name.split("_")[1], **k):
        calls[_key] += 1
        return _real(*a, **k)
    setattr(ops, name, wrapper)

rng = np.random.default_rng(0)
x = rng.integers(1, 20, size=(16, 7))
x[::3, 4:] = 0
x[1::3, :2] = 0
y = rng.integers(0, 3, size=16)


def build():
    return keras.Sequential([
        keras.Input((7,), dtype="int32"),
        keras.layers.Embedding(20, 5, mask_zero=True),
        keras.layers.Bidirectional(fk.SimpleRNN(4, return_sequences=True)),
        fk.LSTM(6),
        keras.layers.Dense(3, activation="softmax"),
    ])


def train(model, weights):
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(0.2),
                  loss="sparse_categorical_crossentropy")
    return model.fit(x, y, batch_size=8, epochs=3, shuffle=False,
                     verbose=0).history["loss"]


weights = build().get_weights()
single = train(build(), weights)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
calls_before = dict(calls)
with strategy.scope():
    model = build()
mirrored = train(model, weights)
print("RESULT" + json.dumps(dict(
    single=single, mirrored=mirrored, replicas=strategy.num_replicas_in_sync,
    forward=calls["forward"] - calls_before["forward"],
    backward=calls["backward"] - calls_before["backward"])))
'''


def test_mirrored_strategy_matches_single_device(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                          cwd=tmp_path, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    r = json.loads(line[len("RESULT"):])
    assert r["replicas"] == 2
    # 2 replicas x 2 steps x 3 epochs x 3 recurrent layers (Bidirectional: 2)
    assert r["forward"] >= 2 * 2 * 3 * 3
    assert r["backward"] >= 2 * 2 * 3 * 3
    np.testing.assert_allclose(r["mirrored"], r["single"], rtol=1e-5, atol=1e-5)
    assert r["single"][-1] < r["single"][0]

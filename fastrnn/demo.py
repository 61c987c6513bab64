"""The ``fastrnn demo`` and ``fastrnn generate`` commands: a character-level
language model, ``Embedding -> LSTM -> Dense(vocab, softmax)``, trained with
``fastrnn.keras.LSTM`` and, for comparison, with the stock
``keras.layers.LSTM`` from the same initial weights.

The default text is a slice of "tiny shakespeare" bundled in
``fastrnn/data`` (see its README).  The pieces are small functions:
data preparation (:func:`load_text`, :func:`encode`, :func:`make_windows`),
model building (:func:`build_model`), training with timing (:func:`train`)
and sampling (:func:`sample`).

The vocabulary travels inside the saved ``.keras`` file: the model's first
layer is ``CharVocabulary``, an identity layer whose config holds the
characters (and the training sequence length).  Loading such a file needs
this module's :func:`vocabulary_layer` to have been called, which
:func:`load_model` does.

TensorFlow and Keras are imported lazily, by the functions that need them.
"""
import dataclasses
import gzip
import os
import statistics
import time
from collections import namedtuple
from importlib import resources

import numpy as np

DATA_FILE = "tinyshakespeare.txt.gz"
DATA_SOURCE = ("a slice of 'tiny shakespeare' (public-domain Shakespeare; "
               "karpathy/char-rnn data/tinyshakespeare/input.txt)")
INSTALL_HINT = 'pip install "fastrnn[tensorflow]"'

TrainResult = namedtuple("TrainResult", "epoch_times losses")
TrainResult.__doc__ = """Per-epoch wall times (s) and training losses."""


class DemoError(Exception):
    """A problem the user can fix (bad file, bad size, missing package);
    the CLI prints it as one line."""


@dataclasses.dataclass
class DemoConfig:
    """The demo's settings; the CLI's flags and defaults come from here.

    The defaults train both models (fastrnn's and stock Keras's) in about
    two minutes on two cores.
    """
    text: str = None            # path of a UTF-8 text; None: the bundled one
    max_chars: int = 0          # use at most this many characters (0: all)
    epochs: int = 10
    units: int = 256
    embedding_dim: int = 32
    seq_len: int = 64
    batch_size: int = 64
    learning_rate: float = 0.005
    seed: int = 0
    backend: str = "auto"       # fastrnn's kernels: auto, cython, numba, numpy
    compare: bool = True        # also train the stock keras.layers.LSTM
    save: str = None            # save the fastrnn model to this .keras path
    sample_length: int = 300
    temperature: float = 0.8


# -------------------------------------------------------------- keras ---
def import_keras():
    """Import and return ``keras``, or raise DemoError saying how to get it."""
    try:
        import tensorflow  # noqa: F401  (Keras's backend for fastrnn.keras)
        import keras
    except ImportError as exc:
        raise DemoError(f"this command needs TensorFlow and Keras 3, which are "
                        f"not installed ({exc}); install them with: "
                        f"{INSTALL_HINT}") from exc
    return keras


_vocabulary_layer = None


def vocabulary_layer():
    """The ``CharVocabulary`` layer class (defined and registered with Keras
    on first call, as ``fastrnn>CharVocabulary``)."""
    global _vocabulary_layer
    if _vocabulary_layer is not None:
        return _vocabulary_layer
    keras = import_keras()

    @keras.saving.register_keras_serializable(package="fastrnn")
    class CharVocabulary(keras.layers.Layer):
        """Identity on (B, T) character ids; its config carries the
        vocabulary (``chars[i]`` is id ``i``) and the training ``seq_len``."""

        def __init__(self, chars, seq_len, **kwargs):
            super().__init__(**kwargs)
            self.chars = str(chars)
            self.seq_len = int(seq_len)

        def call(self, ids):
            return ids

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "chars": self.chars,
                    "seq_len": self.seq_len}

    _vocabulary_layer = CharVocabulary
    return CharVocabulary


def fastrnn_lstm():
    """The ``fastrnn.keras.LSTM`` class."""
    import_keras()
    from .keras import LSTM
    return LSTM


# --------------------------------------------------------------- data ---
def load_text(path=None, max_chars=None):
    """The text at ``path`` (UTF-8), or the bundled one when ``path`` is
    None, cut to its first ``max_chars`` characters when given (0 or None:
    all).  Raises DemoError for an unreadable, non-UTF-8 or empty file."""
    if path is None:
        blob = resources.files("fastrnn").joinpath("data", DATA_FILE).read_bytes()
        text = gzip.decompress(blob).decode("utf-8")
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise DemoError(f"--text {path}: not UTF-8 text ({exc.reason} at "
                            f"byte {exc.start})") from exc
        except OSError as exc:
            raise DemoError(f"--text {path}: cannot read it "
                            f"({exc.strerror or exc})") from exc
        if not text:
            raise DemoError(f"--text {path}: the file is empty")
    return text[:max_chars] if max_chars else text


def build_vocabulary(text):
    """The sorted distinct characters of ``text``, as one string."""
    return "".join(sorted(set(text)))


def encode(text, chars):
    """``text`` as int32 ids (N,), id ``i`` meaning ``chars[i]``.  Raises
    DemoError naming the characters that are not in ``chars``."""
    index = {c: i for i, c in enumerate(chars)}
    missing = sorted(set(text) - index.keys())
    if missing:
        raise DemoError(f"characters not in the vocabulary: "
                        f"{''.join(missing)!r}")
    return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))


def make_windows(ids, seq_len, name="the text"):
    """Cut ids (N,) into non-overlapping training windows.

    Returns ``x``, ``y``, both int32 (W, seq_len) with W = (N - 1) // seq_len:
    ``y[w, t]`` is the character after ``x[w, t]``.  Raises DemoError when
    the text (called ``name`` in the message) is too short for one window.
    """
    if seq_len < 1:
        raise DemoError(f"--seq-len must be a positive integer, got {seq_len}")
    n_windows = (len(ids) - 1) // seq_len
    if n_windows < 1:
        raise DemoError(f"{name} has {len(ids)} characters, too short for "
                        f"--seq-len {seq_len} (it needs at least {seq_len + 1})")
    used = n_windows * seq_len
    x = ids[:used].reshape(n_windows, seq_len)
    y = ids[1:used + 1].reshape(n_windows, seq_len)
    return x, y


# -------------------------------------------------------------- model ---
def build_model(lstm_class, chars, *, seq_len, units, embedding_dim, **lstm_options):
    """``CharVocabulary -> Embedding -> lstm_class(units, **lstm_options) ->
    Dense(softmax)`` on (B, T) int ids, giving (B, T, len(chars))
    next-character probabilities.  Not compiled."""
    keras = import_keras()
    vocab = len(chars)
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    h = vocabulary_layer()(chars, seq_len, name="vocabulary")(ids)
    h = keras.layers.Embedding(vocab, embedding_dim, name="embedding")(h)
    h = lstm_class(units, return_sequences=True, name="lstm", **lstm_options)(h)
    probs = keras.layers.Dense(vocab, activation="softmax", name="next_char")(h)
    return keras.Model(ids, probs, name="char_lm")


def compile_model(model, learning_rate):
    """Compile with Adam and sparse categorical cross-entropy."""
    keras = import_keras()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy")


# ----------------------------------------------------------- training ---
def _epoch_timer():
    keras = import_keras()

    class EpochTimer(keras.callbacks.Callback):
        """Records each epoch's wall time in ``self.times`` (s)."""

        def on_train_begin(self, logs=None):
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    return EpochTimer()


def train(model, x, y, *, epochs, batch_size, seed, verbose=1):
    """Fit ``model`` on windows ``x``, ``y`` (W, T) for ``epochs`` epochs,
    with Keras's progress bars when ``verbose``.  The shuffling is seeded,
    so two models trained with the same ``seed`` see the same batches."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    timer = _epoch_timer()
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size,
                        shuffle=True, callbacks=[timer], verbose=verbose)
    return TrainResult(timer.times, [float(v) for v in history.history["loss"]])


def steady_epoch_time(times):
    """The median epoch time after the first (which includes tracing), or
    the only epoch's time when there is one."""
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


# ----------------------------------------------------------- sampling ---
def _last_step_predictor(model):
    """``model`` as a traced-once function: (B, T) int32 ids, any T ->
    (B, vocab) probabilities of the character after the last one."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def predict(ids):
        return model(ids, training=False)[:, -1]
    return predict


def sample(model, chars, prompt, *, length, temperature, seq_len, rng):
    """Extend ``prompt`` by ``length`` characters drawn from ``model``, whose
    softmax output is sharpened (``temperature`` < 1) or flattened (> 1).
    The model sees at most the last ``seq_len`` characters.  Returns the
    generated characters (without the prompt)."""
    if not temperature > 0:
        raise DemoError(f"--temperature must be positive, got {temperature}")
    if not prompt:
        raise DemoError("the prompt is empty")
    unknown = sorted(set(prompt) - set(chars))
    if unknown:
        raise DemoError(f"the prompt has characters that the model's "
                        f"vocabulary lacks: {''.join(unknown)!r}")
    ids = list(encode(prompt, chars))
    predict = _last_step_predictor(model)
    out = []
    for _ in range(length):
        context = np.asarray(ids[-seq_len:], dtype=np.int32)[None, :]
        probs = np.asarray(predict(context))[0].astype(np.float64)
        logits = np.log(np.maximum(probs, 1e-12)) / temperature
        p = np.exp(logits - logits.max())
        nxt = int(rng.choice(len(chars), p=p / p.sum()))
        ids.append(nxt)
        out.append(chars[nxt])
    return "".join(out)


def default_prompt(chars):
    """A newline when the vocabulary has one, else its first character."""
    return "\n" if "\n" in chars else chars[0]


# ----------------------------------------------------------- commands ---
def _check_save_path(path):
    if not path.endswith(".keras"):
        raise DemoError(f"--save {path}: the file name must end in .keras")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DemoError(f"--save {path}: the folder {folder} does not exist")


def _positive(name, value):
    if value < 1:
        raise DemoError(f"--{name} must be a positive integer, got {value}")


def run_demo(config, out=print):
    """Run the demo described by ``config`` (a DemoConfig), printing with
    ``out``.  Returns a dict of results: ``fastrnn`` and ``keras`` (a
    TrainResult, ``keras`` None without comparison) and ``sample``."""
    for name in ("epochs", "units", "embedding_dim", "seq_len", "batch_size"):
        _positive(name.replace("_", "-"), getattr(config, name))
    if config.max_chars is not None and config.max_chars < 0:
        raise DemoError(f"--max-chars must be >= 0, got {config.max_chars}")
    if config.save:
        _check_save_path(config.save)
    text = load_text(config.text, config.max_chars)
    chars = build_vocabulary(text)
    name = f"--text {config.text}" if config.text else "the bundled text"
    if config.max_chars and len(text) == config.max_chars:
        name += f" (cut by --max-chars {config.max_chars})"
    x, y = make_windows(encode(text, chars), config.seq_len, name)
    keras = import_keras()
    fast_lstm = fastrnn_lstm()
    source = config.text or DATA_SOURCE
    out(f"text: {source}: {len(text):,} characters, {len(chars)} distinct; "
        f"{len(x):,} windows of {config.seq_len}")
    sizes = dict(seq_len=config.seq_len, units=config.units,
                 embedding_dim=config.embedding_dim)

    kernels = _kernels(config.backend)
    keras.utils.set_random_seed(config.seed)
    fast_model = build_model(fast_lstm, chars, **sizes, backend=(
        None if config.backend == "auto" else config.backend))
    initial = [layer.get_weights() for layer in fast_model.layers]
    compile_model(fast_model, config.learning_rate)
    results = {"fastrnn": None, "keras": None}
    fit = dict(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed)
    out(f"\nmodel: Embedding({len(chars)}, {config.embedding_dim}) -> "
        f"LSTM({config.units}) -> Dense({len(chars)}, softmax); "
        f"adam, lr {config.learning_rate}; batch {config.batch_size}")
    out(f"\ntraining with fastrnn.keras.LSTM ({kernels})")
    results["fastrnn"] = train(fast_model, x, y, **fit)

    if config.compare:
        stock_model = build_model(keras.layers.LSTM, chars, **sizes)
        for layer, weights in zip(stock_model.layers, initial):
            layer.set_weights(weights)
        compile_model(stock_model, config.learning_rate)
        out("\ntraining with keras.layers.LSTM (same initial weights, same batches)")
        results["keras"] = train(stock_model, x, y, **fit)
    _report(results, out)

    if config.save:
        fast_model.save(config.save)
        out(f"\nsaved the fastrnn model to {config.save} "
            f"(generate with: fastrnn generate {config.save} --prompt TEXT)")

    prompt = default_prompt(chars)
    rng = np.random.default_rng(config.seed)
    results["sample"] = sample(fast_model, chars, prompt,
                               length=config.sample_length,
                               temperature=config.temperature,
                               seq_len=config.seq_len, rng=rng)
    out(f"\nsampled text (temperature {config.temperature}):\n")
    out(prompt.lstrip("\n") + results["sample"])
    return results


def _kernels(backend):
    """Which of fastrnn's kernels ``backend`` means here, in words; raises
    DemoError for one that is not available."""
    import warnings

    from . import _backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            name = _backend.resolve(backend)
        except ValueError as exc:
            raise DemoError(f"--backend {backend}: {exc}") from exc
    threads = _backend.get_num_threads()
    return f"{name} backend, {threads} thread{'s' if threads > 1 else ''}"


def _report(results, out):
    """Print time per epoch, speed-up and final losses."""
    rows = [("fastrnn.keras.LSTM", results["fastrnn"])]
    if results["keras"] is not None:
        rows.append(("keras.layers.LSTM", results["keras"]))
    n = len(rows[0][1].epoch_times)
    if n == 1:
        how = "the only epoch, which includes tracing; use --epochs 2 or more"
    else:
        steady = "epoch 2" if n == 2 else f"the median of epochs 2-{n}"
        how = f"{steady}; epoch 1, which includes tracing, is not counted"
    out(f"\n{'':20s} {'s/epoch':>9s} {'epoch 1 s':>10s} {'final loss':>11s}")
    for name, res in rows:
        out(f"{name:20s} {steady_epoch_time(res.epoch_times):9.2f} "
            f"{res.epoch_times[0]:10.2f} {res.losses[-1]:11.4f}")
    out(f"(s/epoch: {how})")
    if results["keras"] is not None:
        speedup = (steady_epoch_time(results["keras"].epoch_times)
                   / steady_epoch_time(results["fastrnn"].epoch_times))
        out(f"speed-up of fastrnn.keras.LSTM over keras.layers.LSTM: {speedup:.2f}x")


def load_model(path):
    """Load a model saved by ``fastrnn demo --save``.  Returns
    ``(model, chars, seq_len)``; raises DemoError for a missing file or a
    model without a CharVocabulary layer."""
    if not os.path.isfile(path):
        raise DemoError(f"{path}: no such file")
    keras = import_keras()
    vocab_class = vocabulary_layer()
    fastrnn_lstm()  # registers fastrnn's layers for deserialization
    try:
        model = keras.models.load_model(path)
    except Exception as exc:  # Keras raises many kinds for a bad file
        raise DemoError(f"{path}: cannot load it as a Keras model "
                        f"({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    vocab = [layer for layer in model.layers if isinstance(layer, vocab_class)]
    if not vocab:
        raise DemoError(f"{path}: not a model saved by `fastrnn demo --save` "
                        f"(it has no CharVocabulary layer)")
    return model, vocab[0].chars, vocab[0].seq_len


def run_generate(path, prompt=None, *, length=300, temperature=0.8, seed=None,
                 out=print):
    """Print ``prompt`` followed by ``length`` characters sampled from the
    model saved at ``path``.  Returns the generated characters."""
    if length < 0:
        raise DemoError(f"--length must be >= 0, got {length}")
    model, chars, seq_len = load_model(path)
    if prompt is None:
        prompt = default_prompt(chars)
    text = sample(model, chars, prompt, length=length, temperature=temperature,
                  seq_len=seq_len, rng=np.random.default_rng(seed))
    out(prompt + text)
    return text

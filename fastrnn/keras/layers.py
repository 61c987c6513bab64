"""Drop-in Keras 3 ``LSTM`` and ``SimpleRNN`` layers running on fastrnn's
kernels.

Each class subclasses its stock Keras layer and overrides only
``inner_loop``, the hook through which Keras itself swaps in cuDNN: the
constructor, the weights (``kernel``, ``recurrent_kernel``, ``bias``), the
call signature, masking, statefulness, ``Bidirectional`` support and the
serialized config are the stock layer's.  Whenever the kernels can't serve
a call, the layer runs the stock Keras loop instead (see the class
docstrings for the list), so a result is never wrong, only slower.
"""
import threading

import keras
from keras import activations
from keras.src.backend import AutocastScope, cudnn_ok

from .._backend import BACKENDS

__all__ = ["LSTM", "SimpleRNN"]

_BACKEND_CHOICES = ("auto",) + BACKENDS
_zero_state_calls = threading.local()   # .layers: ids of layers in such calls
_CUDNN = "Keras uses cuDNN"
_OTHER_BACKEND = "Keras backend is not TensorFlow"
_RNN_ACTIVATIONS = ((activations.tanh, "tanh"), (activations.relu, "relu"),
                    (activations.linear, "linear"))


def _rnn_activation_name(fn):
    """The kernels' name for a SimpleRNN activation, or None."""
    return next((name for f, name in _RNN_ACTIVATIONS if fn is f), None)


def _check_backend(backend):
    if backend is not None and backend not in _BACKEND_CHOICES:
        raise ValueError(f"backend must be None or one of {_BACKEND_CHOICES}, "
                         f"got {backend!r}")
    return backend


class _FastRNNMixin:
    """What the two layers share: the ``backend`` option, input checks and
    the choice between fastrnn's kernels and the stock loop."""

    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fastrnn_backend = _check_backend(backend)
        if self._static_fallback_reason() is None:
            # tf.numpy_function can't be XLA-compiled: let
            # jit_compile="auto" choose the non-XLA path.
            self.supports_jit = False

    def call(self, sequences, initial_state=None, mask=None, training=False):
        # Whether the initial states are Keras's zeros (RNN.call makes them
        # when none are given): the kernels then start from zeros without
        # taking them as inputs (see _tf_ops).  Per thread: RNN.call runs
        # inner_loop on the calling thread, and another thread may call the
        # same layer with states of its own meanwhile.
        calls = _zero_state_calls.__dict__.setdefault("layers", set())
        zero = initial_state is None and not self.stateful
        if zero:
            calls.add(id(self))
        try:
            return super().call(sequences, initial_state=initial_state,
                                mask=mask, training=training)
        finally:
            calls.discard(id(self))

    def _zero_initial_states(self):
        """Whether this thread's current call gives no initial states."""
        return id(self) in getattr(_zero_state_calls, "layers", ())

    def get_config(self):
        config = super().get_config()
        if self.fastrnn_backend is not None:
            config["backend"] = self.fastrnn_backend
        return config

    def _static_fallback_reason(self):
        """Why this layer's configuration can't use the kernels, or None."""
        if keras.backend.backend() != "tensorflow":
            return _OTHER_BACKEND
        if self.unroll:
            return "unroll=True"
        if self.cell.recurrent_dropout > 0:
            return "recurrent_dropout > 0"
        return self._activation_fallback_reason()

    def _check_inputs(self, sequences, mask):
        """Clear errors for inputs that disagree with the built weights."""
        shape = tuple(sequences.shape)
        if len(shape) != 3:
            raise ValueError(f"{self.name}: inputs must have rank 3, "
                             f"(batch, timesteps, features), got shape {shape}")
        features = self.cell.kernel.shape[0]
        if shape[2] is not None and shape[2] != features:
            raise ValueError(
                f"{self.name}: inputs have {shape[2]} features (last axis of "
                f"shape {shape}) but the layer was built for {features}")
        if mask is None:
            return None
        mshape = tuple(mask.shape)
        if len(mshape) == 3 and mshape[2] == 1:
            mask = mask[:, :, 0]
            mshape = mshape[:2]
        ok = len(mshape) == 2 and all(
            m is None or s is None or m == s for m, s in zip(mshape, shape[:2]))
        if not ok:
            raise ValueError(f"{self.name}: mask must have shape (batch, "
                             f"timesteps) = {shape[:2]}, got {mshape}")
        return mask

    def _prepare(self, sequences, initial_state, mask, training):
        """Returns (reason, args): reason is why the stock loop must run
        (None when the kernels run); args are the kernel inputs x (dropout
        applied), states, weights and mask, in the kernels' dtype."""
        if keras.tree.is_nested(mask):
            mask = mask[0]
        mask = self._check_inputs(sequences, mask)
        reason = self._static_fallback_reason()
        if reason is None:
            reason = self._call_fallback_reason(training)
        if reason is None:
            from ._tf_ops import graph_fallback_reason
            reason = graph_fallback_reason()
        if reason is not None:
            return reason, None

        import tensorflow as tf
        compute = sequences.dtype
        kdt = tf.float64 if compute == tf.float64 else tf.float32
        x = self._apply_input_dropout(sequences, training)
        cell = self.cell
        # Read the variables at full precision (no mixed-precision autocast):
        # the kernels compute in float32 and the result is cast back.
        with AutocastScope(None):
            weights = [cell.kernel.value, cell.recurrent_kernel.value,
                       cell.bias.value if cell.use_bias else None]
        zero_states = self._zero_initial_states()
        args = dict(
            x=tf.cast(x, kdt),
            states=[None if zero_states else tf.cast(s, kdt) for s in initial_state],
            # RNN.call uses the final states only for these
            want_states=self.return_state or self.stateful,
            weights=[None if w is None else tf.cast(w, kdt) for w in weights],
            mask=None if mask is None else tf.cast(mask, tf.bool),
            backend=self.fastrnn_backend or "auto")
        return None, args

    def _finish(self, outputs, states, mask, dtype):
        """(last_output, outputs, states) as Keras's loop returns them.
        States None (not computed: RNN.call drops them unless return_state
        or stateful) are returned as the last output, which it drops."""
        import tensorflow as tf
        if mask is not None and self.zero_output_for_mask:
            m = tf.cast(mask, tf.bool)
            if self.go_backwards:
                m = tf.reverse(m, [1])
            outputs = tf.where(m[:, :, None], outputs, tf.zeros_like(outputs))
        outputs = tf.cast(outputs, dtype)
        last = outputs[:, -1]
        return last, outputs, [last if s is None else tf.cast(s, dtype) for s in states]


@keras.saving.register_keras_serializable(package="fastrnn")
class LSTM(_FastRNNMixin, keras.layers.LSTM):
    """``keras.layers.LSTM`` running on fastrnn's fused CPU kernels.

    Takes exactly the arguments of ``keras.layers.LSTM`` (same defaults and
    meaning) plus an optional ``backend`` (``None``/"auto", "cython",
    "numba" or "numpy"; stored in the config only when set).  Same weights,
    call arguments, masking, ``return_sequences``/``return_state``/
    ``go_backwards``/``stateful`` behaviour and ``Bidirectional`` support;
    outputs and gradients equal the stock layer's to float32 round-off.
    Under a mixed-precision policy the kernels compute in float32 and the
    layer returns the policy's compute dtype.  Input ``dropout`` runs
    through the kernels (one mask per sequence, as Keras draws it).

    Falls back to the stock Keras loop (same results, Keras's speed) when:

    * ``activation`` is not tanh or ``recurrent_activation`` not sigmoid;
    * ``recurrent_dropout > 0``, or ``implementation=1`` with input
      dropout in training (four dropout masks);
    * ``unroll=True``;
    * the call is traced for XLA (``jit_compile=True``) or for a SavedModel
      (``model.export``);
    * Keras runs on a backend other than TensorFlow;
    * Keras would use cuDNN (``use_cudnn`` "auto" or True with a GPU
      present); ``use_cudnn=True`` without a GPU raises, as in Keras.

    The layer sets ``supports_jit = False`` when it can use the kernels, so
    ``jit_compile="auto"`` picks the non-XLA path.
    """

    def _activation_fallback_reason(self):
        if self.cell.activation is not activations.tanh:
            return "activation is not tanh"
        if self.cell.recurrent_activation is not activations.sigmoid:
            return "recurrent_activation is not sigmoid"
        return None

    def _call_fallback_reason(self, training):
        if self.use_cudnn is True or (
                self.use_cudnn == "auto" and cudnn_ok(
                    self.cell.activation, self.cell.recurrent_activation,
                    self.unroll, self.cell.use_bias)):
            return _CUDNN
        if (training and 0.0 < self.cell.dropout < 1.0
                and self.cell.implementation == 1):
            return "implementation=1 with dropout"
        return None

    def _apply_input_dropout(self, sequences, training):
        # As LSTM.inner_loop's cuDNN path: the cell's mask for the first
        # step (drawn once per call by RNN.call), broadcast over time.
        if training and 0.0 < self.cell.dropout < 1.0:
            dp_mask = self.cell.get_dropout_mask(sequences[:, 0, :])
            return sequences * keras.ops.expand_dims(dp_mask, axis=1)
        return sequences

    def inner_loop(self, sequences, initial_state, mask, training=False):
        reason, a = self._prepare(sequences, initial_state, mask, training)
        if reason in (_CUDNN, _OTHER_BACKEND):
            # Keras's own choice: cuDNN, or its other backends' LSTM.
            return super().inner_loop(sequences, initial_state, mask=mask,
                                      training=training)
        if reason is not None:
            # The generic loop, as stock LSTM ends up running on a CPU
            # (its cuDNN attempt crashes with implementation=1 + dropout).
            return keras.layers.RNN.inner_loop(
                self, sequences, initial_state, mask=mask, training=training)
        from . import _tf_ops
        outputs, h, c = _tf_ops.lstm(
            a["x"], *a["states"], *a["weights"], a["mask"],
            go_backwards=self.go_backwards, backend=a["backend"],
            states=a["want_states"])
        return self._finish(outputs, [h, c], a["mask"], sequences.dtype)


@keras.saving.register_keras_serializable(package="fastrnn")
class SimpleRNN(_FastRNNMixin, keras.layers.SimpleRNN):
    """``keras.layers.SimpleRNN`` running on fastrnn's fused CPU kernels.

    Takes exactly the arguments of ``keras.layers.SimpleRNN`` (same
    defaults and meaning) plus an optional ``backend`` (``None``/"auto",
    "cython", "numba" or "numpy"; stored in the config only when set).
    Same weights, call arguments, masking, ``return_sequences``/
    ``return_state``/``go_backwards``/``stateful`` behaviour and
    ``Bidirectional`` support; outputs and gradients equal the stock
    layer's to float32 round-off.  Under a mixed-precision policy the
    kernels compute in float32 and the layer returns the policy's compute
    dtype.  Input ``dropout`` runs through the kernels with the cell's own
    mask (one per sequence, as the stock loop uses it).

    Falls back to the stock Keras loop (same results, Keras's speed) when:

    * ``activation`` is not tanh, relu or linear (``None``);
    * ``recurrent_dropout > 0``;
    * ``unroll=True``;
    * the call is traced for XLA (``jit_compile=True``) or for a SavedModel
      (``model.export``);
    * Keras runs on a backend other than TensorFlow.

    The layer sets ``supports_jit = False`` when it can use the kernels, so
    ``jit_compile="auto"`` picks the non-XLA path.
    """

    def _activation_fallback_reason(self):
        if _rnn_activation_name(self.cell.activation) is None:
            return "activation is not tanh, relu or linear"
        return None

    def _call_fallback_reason(self, training):
        return None

    def _apply_input_dropout(self, sequences, training):
        # SimpleRNNCell.call multiplies every step by this same cached mask.
        dp_mask = self.cell.get_dropout_mask(sequences[:, 0, :])
        if training and dp_mask is not None:
            return sequences * keras.ops.expand_dims(dp_mask, axis=1)
        return sequences

    def inner_loop(self, sequences, initial_state, mask, training=False):
        reason, a = self._prepare(sequences, initial_state, mask, training)
        if reason is not None:
            return super().inner_loop(sequences, initial_state, mask=mask,
                                      training=training)
        from . import _tf_ops
        outputs, h = _tf_ops.rnn(
            a["x"], *a["states"], *a["weights"], a["mask"],
            activation=_rnn_activation_name(self.cell.activation),
            go_backwards=self.go_backwards, backend=a["backend"],
            states=a["want_states"])
        return self._finish(outputs, [h], a["mask"], sequences.dtype)

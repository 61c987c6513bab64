"""TensorFlow glue: fastrnn's NumPy kernels as differentiable TF ops.

``lstm`` and ``rnn`` wrap :func:`fastrnn.ops.lstm_forward` /
:func:`fastrnn.ops.rnn_forward` in ``tf.numpy_function`` and attach their
backward passes with ``tf.custom_gradient``, so they work eagerly, inside
``tf.function`` and in ``model.fit``.

The forward pass's workspace travels to the backward pass as tensors, so
TensorFlow owns its lifetime: nothing is kept in a Python registry, nothing
leaks when no gradient is taken, and concurrent calls (threads, replicas of
a ``tf.distribute`` strategy) share no state.  Its big arrays (cell states,
gates, mask) are extra outputs of the forward op; the backward op gets them
back as NumPy views of the tensors' memory, and with them the forward's
inputs x, h0, kernel, recurrent_kernel and its outputs (the states h of
every step, which the backward pass reads: they are kept once).
(``tf.numpy_function`` wraps a result whose data is 64-byte aligned, as
every large buffer of fastrnn.ops is, without a copy, and copies other
results; checked in tests/test_keras_tf_ops.py.)  The rest
(backend, shape, flags) travels as a small pickled
:class:`fastrnn.ops.Workspace` with those arrays left out.  The numpy
backend's workspace (also used for empty shapes) is pickled whole: it is a
reference, not a fast path.

The workspace is only made when a gradient tape could be recording at call
(or trace) time; when a gradient is asked for without one (e.g.
``tf.gradients`` in a graph built without a tape), the backward pass reruns
the forward pass to rebuild it.

The pickled buffers are produced and consumed only by this module, inside
one process; they never come from outside.
"""
import dataclasses
import pickle

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.ops import control_flow_util
from tensorflow.python.saved_model import save_context

from .. import ops

# The compiled backends' Workspace.data entries that travel as extra outputs
# of the forward op, with their dtypes (None: the float dtype of the call).
# Left out: the arrays the op already has as tensors (the forward refers to
# them without copies, see _JOINED), which the backward op gets directly.
_ARRAYS = {"lstm": (("mask_tm", np.uint8), ("cs", None), ("gates", None),
                    ("seen", np.bool_)),
           "rnn": (("mask_tm", np.uint8), ("seen", np.bool_))}
_JOINED = ("x", "h0", "W", "U", "outputs")


def graph_fallback_reason():
    """Why the kernels can't run in the graph being traced now, or None.

    ``tf.numpy_function`` can neither be compiled by XLA nor saved in a
    SavedModel, so both contexts take Keras's own loop.
    """
    if control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()):
        return "XLA compilation (jit_compile=True)"
    if save_context.in_save_context():
        return "SavedModel export"
    return None


def _split(ws, fields):
    """Workspace -> [blob, *arrays]: the arrays named in ``fields`` (an
    empty placeholder for a None entry) and a uint8 blob holding the pickled
    rest.  A reference workspace is pickled whole (placeholders only)."""
    reference = "reference" in ws.data
    arrays = [None if reference else ws.data[name] for name, _ in fields]
    dt = ws.dtype
    if not reference:
        ws = dataclasses.replace(ws, data={n: a for (n, _), a in zip(fields, arrays)
                                           if a is None})
    blob = np.frombuffer(pickle.dumps(ws, protocol=pickle.HIGHEST_PROTOCOL),
                         dtype=np.uint8)
    return [blob] + [np.zeros(0, dt if adt is None else adt) if a is None else a
                     for (_, adt), a in zip(fields, arrays)]


def _join(blob, arrays, fields, joined):
    """Inverse of ``_split``, given the op's inputs x, h0, kernel,
    recurrent_kernel and its outputs (``_JOINED``)."""
    ws = pickle.loads(memoryview(np.ascontiguousarray(blob)))
    if "reference" not in ws.data:
        ws.data = dict(zip((name for name, _ in fields), arrays), **ws.data,
                       **dict(zip(_JOINED, joined)))
    return ws


def _fused(kind, forward_np, backward_np, tensors, n_diff, out_shapes, dtype):
    """Build the differentiable op.

    forward_np(keep_workspace, *arrays) -> (*outputs, workspace or None)
    backward_np(workspace, upstream_arrays) -> list of n_diff gradients,
    upstream_arrays holding None for outputs without a gradient.
    tensors: the op's inputs x, states, kernel, recurrent_kernel, [bias],
    then the non-differentiable ones (the mask); the first n_diff are
    differentiable.  out_shapes: static shapes of the outputs.
    """
    keep = record.could_possibly_record()
    n_out = len(out_shapes)
    n_states = n_out - 1
    fields = _ARRAYS[kind]
    np_dtype = dtype.as_numpy_dtype
    ws_dtypes = [tf.uint8] + [dtype if adt is None else tf.as_dtype(adt)
                              for _, adt in fields]

    def forward(*arrays):
        *outs, ws = forward_np(keep, *arrays)
        return outs + (_split(ws, fields) if keep else [])

    @tf.custom_gradient
    def op(*inputs):
        results = tf.numpy_function(forward, list(inputs),
                                    [dtype] * n_out + (ws_dtypes if keep else []),
                                    stateful=False)
        outs, saved = results[:n_out], results[n_out:]
        for t, shape in zip(outs, out_shapes):
            t.set_shape(shape)
        # the arrays _JOINED names, in its order
        joined = [inputs[0], inputs[1], inputs[1 + n_states],
                  inputs[2 + n_states], outs[0]]

        def grad(*upstream):
            given = [u is not None for u in upstream]

            def backward(*arrays):
                it = iter(arrays)
                ups = [next(it) if g else None for g in given]
                if keep:
                    blob, *rest = it
                    ws = _join(blob, rest[:len(fields)], fields, rest[len(fields):])
                else:   # no tape at forward time: rebuild the workspace
                    ws = forward_np(True, *it)[-1]
                return [np.asarray(g, dtype=np_dtype) for g in backward_np(ws, ups)]

            # Without a workspace, the backward pass needs all the inputs.
            grads = tf.numpy_function(
                backward,
                [u for u in upstream if u is not None]
                + (saved + joined if keep else list(inputs)),
                [dtype] * n_diff, stateful=False)
            for g, t in zip(grads, inputs):
                g.set_shape(t.shape)
            return list(grads) + [None] * (len(inputs) - n_diff)

        return outs, grad

    return op(*tensors)


def lstm(x, h0, c0, kernel, recurrent_kernel, bias=None, mask=None, *,
         go_backwards=False, backend="auto"):
    """Differentiable LSTM over fastrnn's kernels.

    x (B, T, I); h0, c0 (B, H); kernel (I, 4H); recurrent_kernel (H, 4H);
    bias (4H,) or None; mask (B, T) bool or None.  All float tensors share
    one dtype, float32 or float64.  Returns outputs (B, T, H), h, c (B, H);
    with go_backwards the sequence is read from its end and the outputs are
    in reading order, as in Keras.
    """
    has_bias, has_mask = bias is not None, mask is not None
    diff = [x, h0, c0, kernel, recurrent_kernel] + ([bias] if has_bias else [])
    extra = [mask] if has_mask else []
    B, T, H = x.shape[0], x.shape[1], recurrent_kernel.shape[0]

    def forward_np(keep, x, h0, c0, W, U, *rest):
        b = rest[0] if has_bias else None
        m = rest[-1] if has_mask else None
        r = ops.lstm_forward(x, W, U, b, h0, c0, mask=m,
                             go_backwards=go_backwards,
                             return_workspace=keep, backend=backend,
                             _copy_arrays=False)
        return r.outputs, r.h, r.c, r.workspace

    def backward_np(ws, upstream):
        g = ops.lstm_backward(ws, *upstream)
        return [g.x, g.h0, g.c0, g.kernel, g.recurrent_kernel] + (
            [g.bias] if has_bias else [])

    return _fused("lstm", forward_np, backward_np, diff + extra, len(diff),
                  [(B, T, H), (B, H), (B, H)], x.dtype)


def rnn(x, h0, kernel, recurrent_kernel, bias=None, mask=None, *,
        activation="tanh", go_backwards=False, backend="auto"):
    """Differentiable simple RNN over fastrnn's kernels.

    x (B, T, I); h0 (B, H); kernel (I, H); recurrent_kernel (H, H);
    bias (H,) or None; mask (B, T) bool or None; activation "tanh", "relu"
    or "linear".  Returns outputs (B, T, H), h (B, H) (go_backwards as in
    ``lstm``).
    """
    has_bias, has_mask = bias is not None, mask is not None
    diff = [x, h0, kernel, recurrent_kernel] + ([bias] if has_bias else [])
    extra = [mask] if has_mask else []
    B, T, H = x.shape[0], x.shape[1], recurrent_kernel.shape[0]

    def forward_np(keep, x, h0, W, U, *rest):
        b = rest[0] if has_bias else None
        m = rest[-1] if has_mask else None
        r = ops.rnn_forward(x, W, U, b, h0, activation=activation, mask=m,
                            go_backwards=go_backwards,
                            return_workspace=keep, backend=backend,
                            _copy_arrays=False)
        return r.outputs, r.h, r.workspace

    def backward_np(ws, upstream):
        g = ops.rnn_backward(ws, *upstream)
        return [g.x, g.h0, g.kernel, g.recurrent_kernel] + (
            [g.bias] if has_bias else [])

    return _fused("rnn", forward_np, backward_np, diff + extra, len(diff),
                  [(B, T, H), (B, H)], x.dtype)

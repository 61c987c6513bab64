"""TensorFlow glue: fastrnn's NumPy kernels as differentiable TF ops.

``lstm`` and ``rnn`` wrap :func:`fastrnn.ops.lstm_forward` /
:func:`fastrnn.ops.rnn_forward` in ``tf.numpy_function`` and attach their
backward passes with ``tf.custom_gradient``, so they work eagerly, inside
``tf.function`` and in ``model.fit``.

The forward pass's workspace travels to the backward pass as a tensor (a
``uint8`` buffer holding the pickled :class:`fastrnn.ops.Workspace`), so
TensorFlow owns its lifetime: nothing is kept in a Python registry, nothing
leaks when no gradient is taken, and concurrent calls (threads, replicas of
a ``tf.distribute`` strategy) share no state.  The workspace is only made
when a gradient tape could be recording at call (or trace) time; when a
gradient is asked for without one (e.g. ``tf.gradients`` in a graph built
without a tape), the backward pass reruns the forward pass to rebuild it.

The buffer is produced and consumed only by this module, inside one
process; it never comes from outside.
"""
import pickle

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.ops import control_flow_util
from tensorflow.python.saved_model import save_context

from .. import ops

_EMPTY = np.zeros(0, dtype=np.uint8)


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


def _pack(workspace):
    return np.frombuffer(pickle.dumps(workspace, protocol=pickle.HIGHEST_PROTOCOL),
                         dtype=np.uint8)


def _unpack(blob):
    return pickle.loads(memoryview(np.ascontiguousarray(blob)))


def _zeros_if_none(grads, like):
    return [tf.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def _fused(forward_np, backward_np, tensors, n_diff, out_shapes, dtype):
    """Build the differentiable op.

    forward_np(keep_workspace, *arrays) -> (*outputs, workspace or None)
    backward_np(workspace, upstream_arrays) -> list of n_diff gradients
    tensors: the op's inputs; the first n_diff are differentiable, the rest
    (the mask) are not.  out_shapes: static shapes of the outputs.
    """
    keep = record.could_possibly_record()
    n_out = len(out_shapes)

    def forward(*arrays):
        *outs, ws = forward_np(keep, *arrays)
        return [*outs, _pack(ws) if keep else _EMPTY]

    @tf.custom_gradient
    def op(*inputs):
        *outs, blob = tf.numpy_function(forward, list(inputs),
                                        [dtype] * n_out + [tf.uint8],
                                        stateful=False)
        for t, shape in zip(outs, out_shapes):
            t.set_shape(shape)
        blob.set_shape([None])

        def grad(*upstream):
            upstream = _zeros_if_none(upstream, outs)

            def backward(blob_np, *arrays):
                ups, rest = arrays[:n_out], arrays[n_out:]
                if blob_np.size:
                    ws = _unpack(blob_np)
                else:   # no tape at forward time: rebuild the workspace
                    ws = forward_np(True, *rest)[-1]
                return [np.asarray(g, dtype=dtype.as_numpy_dtype)
                        for g in backward_np(ws, ups)]

            # Without a workspace, the backward pass needs the inputs again.
            grads = tf.numpy_function(
                backward, [blob, *upstream, *(() if keep else inputs)],
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
                             return_workspace=keep, backend=backend)
        return r.outputs, r.h, r.c, r.workspace

    def backward_np(ws, upstream):
        g = ops.lstm_backward(ws, *upstream)
        return [g.x, g.h0, g.c0, g.kernel, g.recurrent_kernel] + (
            [g.bias] if has_bias else [])

    return _fused(forward_np, backward_np, diff + extra, len(diff),
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
                            return_workspace=keep, backend=backend)
        return r.outputs, r.h, r.workspace

    def backward_np(ws, upstream):
        g = ops.rnn_backward(ws, *upstream)
        return [g.x, g.h0, g.kernel, g.recurrent_kernel] + (
            [g.bias] if has_bias else [])

    return _fused(forward_np, backward_np, diff + extra, len(diff),
                  [(B, T, H), (B, H)], x.dtype)

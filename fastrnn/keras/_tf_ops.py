"""TensorFlow glue: fastrnn's NumPy kernels as differentiable TF ops.

``lstm`` and ``rnn`` wrap :func:`fastrnn.ops.lstm_forward` /
:func:`fastrnn.ops.rnn_forward` in ``tf.numpy_function`` and attach their
backward passes with ``tf.custom_gradient``, so they work eagerly, inside
``tf.function`` and in ``model.fit``.

The forward pass's workspace travels to the backward pass as tensors, so
TensorFlow owns its lifetime: nothing is kept in a Python registry, nothing
leaks when no gradient is taken, and concurrent calls (threads, replicas of
a ``tf.distribute`` strategy) share no state.  The arrays the forward makes
for the backward (cell states, gates, the mask) are views of one buffer,
the workspace's "arena", which is an extra output of the forward op; the
backward op gets it back as a NumPy view of the tensor's memory, and with
it the forward's inputs x, h0, kernel, recurrent_kernel and its outputs
(the states h of every step, which the backward pass reads: they are kept
once).  (``tf.numpy_function`` wraps a result whose data is 64-byte
aligned, as every large buffer of fastrnn.ops is, without a copy, and
copies other results; checked in tests/test_keras_tf_ops.py.)  The rest
(backend, shape, flags) travels as a small pickled
:class:`fastrnn.ops.Workspace` with the arrays left out.  The numpy
backend's workspace (also used for empty shapes) is pickled whole: it is a
reference, not a fast path.

Every input and result of a ``tf.numpy_function`` costs some microseconds
per call (8 and 5 here, on a 0.17 ms call), so the ops take and return
only what the layer uses: no initial states when they are zeros (nor their
gradients), no final states unless the layer returns or keeps them.

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

# The op inputs the backward op reads back (besides the workspace and the
# forward's outputs), when present.
_JOINED = ("x", "h0", "W", "U")


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


def _split(ws):
    """Workspace -> (blob, arena): a uint8 blob holding the pickled
    workspace without its arrays, and the buffer its own arrays are views
    of.  A reference workspace is pickled whole (an empty arena)."""
    if "reference" in ws.data:
        arena = np.zeros(0, np.uint8)
    else:
        arena = ws.data["arena"]
        ws = dataclasses.replace(ws, data={})
    blob = np.frombuffer(pickle.dumps(ws, protocol=pickle.HIGHEST_PROTOCOL),
                         dtype=np.uint8)
    return blob, arena


def _join(blob, arena, joined):
    """Inverse of ``_split``, given the arrays ``joined`` (name -> array: x,
    h0 when the forward had one, W, U and outputs)."""
    ws = pickle.loads(memoryview(np.ascontiguousarray(blob)))
    if "reference" not in ws.data:
        if "h0" not in joined:
            B, _, _, H = ws.shape
            joined = dict(joined, h0=np.zeros((B, H), ws.dtype))
        ws.data = dict(ops._saved_arrays(ws.kind, ws.shape, ws.dtype, ws.masked,
                                         arena), **joined)
    return ws


def _fused(forward_np, backward_np, inputs, diff, outs, out_shapes, dtype):
    """Build the differentiable op and apply it.

    inputs: name -> tensor, in the op's order (x, h0, c0, W, U, b, mask;
    those left out are absent); diff: the names of the differentiable ones
    (the first len(diff)).  outs: the names of the results wanted, "outputs"
    first, then any of "h", "c"; out_shapes their static shapes.
    forward_np(keep_workspace, arrays by name) -> (results by name,
    workspace or None); backward_np(workspace, upstream by result name, None
    for a result without a gradient) -> gradients by input name.
    Returns the results, in the order of ``outs``.
    """
    keep = record.could_possibly_record()
    names = list(inputs)
    tensors = [inputs[n] for n in names]
    np_dtype = dtype.as_numpy_dtype
    joined_names = [n for n in _JOINED if n in inputs] + ["outputs"]

    def forward(*arrays):
        results, ws = forward_np(keep, dict(zip(names, arrays)))
        return [results[n] for n in outs] + (list(_split(ws)) if keep else [])

    @tf.custom_gradient
    def op(*tensors):
        results = tf.numpy_function(forward, list(tensors),
                                    [dtype] * len(outs) + ([tf.uint8] * 2 if keep else []),
                                    stateful=False)
        if isinstance(results, tf.Tensor):   # one result is not given as a list
            results = [results]
        res, saved = results[:len(outs)], results[len(outs):]
        for t, shape in zip(res, out_shapes):
            t.set_shape(shape)
        joined = [tensors[names.index(n)] for n in joined_names[:-1]] + [res[0]]

        def grad(*upstream):
            given = [u is not None for u in upstream]

            def backward(*arrays):
                it = iter(arrays)
                ups = {n: next(it) if g else None for n, g in zip(outs, given)}
                if keep:
                    blob, arena, *rest = it
                    ws = _join(blob, arena, dict(zip(joined_names, rest)))
                else:   # no tape at forward time: rebuild the workspace
                    ws = forward_np(True, dict(zip(names, it)))[1]
                grads = backward_np(ws, ups)
                return [np.asarray(grads[n], dtype=np_dtype) for n in diff]

            # Without a workspace, the backward pass needs all the inputs.
            grads = tf.numpy_function(
                backward,
                [u for u in upstream if u is not None]
                + (saved + joined if keep else list(tensors)),
                [dtype] * len(diff), stateful=False)
            for g, n in zip(grads, diff):
                g.set_shape(inputs[n].shape)
            return list(grads) + [None] * (len(tensors) - len(diff))

        return res, grad

    return op(*tensors)


def _op_inputs(x, states, weights, mask):
    """(inputs by name, differentiable names), leaving out the Nones."""
    named = dict(x=x, **states, W=weights[0], U=weights[1], b=weights[2])
    inputs = {n: t for n, t in named.items() if t is not None}
    diff = list(inputs)
    if mask is not None:
        inputs["mask"] = mask
    return inputs, diff


def lstm(x, h0, c0, kernel, recurrent_kernel, bias=None, mask=None, *,
         go_backwards=False, backend="auto", states=True):
    """Differentiable LSTM over fastrnn's kernels.

    x (B, T, I); h0, c0 (B, H) or None (zeros; no gradient is returned for
    them then); kernel (I, 4H); recurrent_kernel (H, 4H); bias (4H,) or
    None; mask (B, T) bool or None.  All float tensors share one dtype,
    float32 or float64.  Returns outputs (B, T, H), h, c (B, H) (None unless
    ``states``); with go_backwards the sequence is read from its end and the
    outputs are in reading order, as in Keras.
    """
    inputs, diff = _op_inputs(x, dict(h0=h0, c0=c0),
                              (kernel, recurrent_kernel, bias), mask)
    B, T, H = x.shape[0], x.shape[1], recurrent_kernel.shape[0]
    outs = ["outputs", "h", "c"] if states else ["outputs"]

    def forward_np(keep, a):
        r = ops.lstm_forward(a["x"], a["W"], a["U"], a.get("b"), a.get("h0"),
                             a.get("c0"), mask=a.get("mask"),
                             go_backwards=go_backwards,
                             return_workspace=keep, backend=backend,
                             _copy_arrays=False)
        return {"outputs": r.outputs, "h": r.h, "c": r.c}, r.workspace

    def backward_np(ws, ups):
        g = ops.lstm_backward(ws, ups["outputs"], ups.get("h"), ups.get("c"))
        return {"x": g.x, "h0": g.h0, "c0": g.c0, "W": g.kernel,
                "U": g.recurrent_kernel, "b": g.bias}

    res = _fused(forward_np, backward_np, inputs, diff, outs,
                 [(B, T, H), (B, H), (B, H)], x.dtype)
    return tuple(res) if states else (res[0], None, None)


def rnn(x, h0, kernel, recurrent_kernel, bias=None, mask=None, *,
        activation="tanh", go_backwards=False, backend="auto", states=True):
    """Differentiable simple RNN over fastrnn's kernels.

    x (B, T, I); h0 (B, H) or None (zeros); kernel (I, H); recurrent_kernel
    (H, H); bias (H,) or None; mask (B, T) bool or None; activation "tanh",
    "relu" or "linear".  Returns outputs (B, T, H), h (B, H) (None unless
    ``states``; go_backwards as in ``lstm``).
    """
    inputs, diff = _op_inputs(x, dict(h0=h0),
                              (kernel, recurrent_kernel, bias), mask)
    B, T, H = x.shape[0], x.shape[1], recurrent_kernel.shape[0]
    outs = ["outputs", "h"] if states else ["outputs"]

    def forward_np(keep, a):
        r = ops.rnn_forward(a["x"], a["W"], a["U"], a.get("b"), a.get("h0"),
                            activation=activation, mask=a.get("mask"),
                            go_backwards=go_backwards,
                            return_workspace=keep, backend=backend,
                            _copy_arrays=False)
        return {"outputs": r.outputs, "h": r.h}, r.workspace

    def backward_np(ws, ups):
        g = ops.rnn_backward(ws, ups["outputs"], ups.get("h"))
        return {"x": g.x, "h0": g.h0, "W": g.kernel, "U": g.recurrent_kernel,
                "b": g.bias}

    res = _fused(forward_np, backward_np, inputs, diff, outs,
                 [(B, T, H), (B, H)], x.dtype)
    return tuple(res) if states else (res[0], None)

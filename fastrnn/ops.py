"""fastrnn's kernels on NumPy arrays: forward and backward (BPTT) of the
tanh-RNN and the LSTM, in Keras's weight layout.

Shapes: ``x`` (B, T, I); ``kernel`` (I, G*H); ``recurrent_kernel`` (H, G*H);
``bias`` (G*H,) or None; ``h0``/``c0`` (B, H) or None (zeros);
``mask`` (B, T) bool or None.  G = 4 for the LSTM (gate blocks i, f, c, o),
G = 1 for the RNN.  float32 and float64 are supported; results have the
inputs' dtype.  The math is specified by :mod:`fastrnn.reference`.

The compiled backends run in time-major, reading order internally; they
read x and write the outputs batch-major, as given (only go_backwards makes
the forward pass a time-major copy of x), and their backward passes read
x and d_outputs and write dx batch-major too (a chunk of time steps at a
time is gathered into scratch), keeping the pre-activation gradients of one
chunk at a time (see ``_chunk_steps``).  The states h of every step are kept
once, as the outputs: the backward passes read h_{t-1} from them (and h0),
so a training forward keeps no time-major copy of them.  This module
allocates every buffer and calls one kernel entry point per pass.
"""
import math
from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np

from . import _backend, _checks, reference
from ._buffers import pool as _pool

__all__ = ["lstm_forward", "lstm_backward", "rnn_forward", "rnn_backward",
           "release_buffers",
           "LSTMResult", "RNNResult", "LSTMGrads", "RNNGrads", "Workspace"]

LSTMResult = namedtuple("LSTMResult", "outputs h c workspace")
RNNResult = namedtuple("RNNResult", "outputs h workspace")
LSTMGrads = namedtuple("LSTMGrads", "x h0 c0 kernel recurrent_kernel bias")
RNNGrads = namedtuple("RNNGrads", "x h0 kernel recurrent_kernel bias")

ACTIVATIONS = {"tanh": 0, "relu": 1, "linear": 2}
_NO_MASK = np.zeros((0, 0), dtype=np.uint8)
_UINT8, _BOOL = np.dtype(np.uint8), np.dtype(np.bool_)


@dataclass(eq=False)
class Workspace:
    """What a forward pass keeps for its backward pass.

    Opaque to users: pass it to ``lstm_backward``/``rnn_backward``.  Backward
    runs on the backend that made it and does not modify it.
    """
    kind: str                 # "lstm" or "rnn"
    backend: str              # the backend that made it
    shape: tuple              # (B, T, I, H)
    dtype: np.dtype
    go_backwards: bool
    has_bias: bool
    activation: str = "tanh"
    masked: bool = False
    data: dict = field(default_factory=dict, repr=False)


# ----------------------------------------------------------------- layout ---
def _time_major(a, go_backwards):
    """(B, T, ...) -> contiguous (T, B, ...) in reading order (a pooled
    buffer, see fastrnn._buffers)."""
    a = a.swapaxes(0, 1)
    if go_backwards:
        a = a[::-1]
    return _pool.copy(a)


def _kernel_input(x, go_backwards):
    """(x, batch_major): x as the forward kernels read it.  Read forwards,
    as given (batch-major, C-contiguous); one step's x is the same bytes
    time-major (so its projection stays one product over all rows, not one
    per batch row); else a time-major copy in reading order."""
    B, T, I = x.shape
    if T == 1:
        return np.ascontiguousarray(x).reshape(1, B, I), False
    if go_backwards:
        return _time_major(x, True), False
    return np.ascontiguousarray(x), True


def _seen(mask_tm, out=None):
    """(T, B, 1): whether the row has had an unmasked step yet (its output is
    zero before that, while its state is still h0); into ``out`` if given."""
    if out is None:
        out = np.empty(mask_tm.shape + (1,), np.bool_)
    np.logical_or.accumulate(mask_tm.view(np.bool_), axis=0, out=out[:, :, 0])
    return out


def _saved_arrays(kind, shape, dtype, masked, arena=None):
    """The arrays a training forward makes for its backward pass, as views
    of one 64-byte-aligned buffer, the "arena" (so that fastrnn.keras hands
    TensorFlow one array, not four): for the LSTM cs (T+1, B, H) and gates
    (T, B, 4H), and with a mask mask_tm (T, B) uint8 and seen (T, B, 1).
    Returns a dict of them and "arena"; ``arena`` None allocates one (from
    the buffer pool), else it is carved as the forward pass carved it."""
    B, T, _, H = shape
    dtype = np.dtype(dtype)
    items = [("cs", (T + 1, B, H), dtype), ("gates", (T, B, 4 * H), dtype)
             ] if kind == "lstm" else []
    if masked:
        items += [("mask_tm", (T, B), _UINT8), ("seen", (T, B, 1), _BOOL)]
    spans, size = [], 0
    for name, shp, dt in items:
        n = math.prod(shp) * dt.itemsize
        spans.append((name, shp, dt, size, n))
        size += -(-n // 64) * 64
    if arena is None:
        arena = _pool.empty((size,), _UINT8)
    elif not (isinstance(arena, np.ndarray) and arena.dtype == _UINT8
              and arena.shape == (size,)):
        raise ValueError(f"workspace arena must be a uint8 array of shape "
                         f"{(size,)}, got {_describe(arena)}")
    arrays = {name: arena[off:off + n].view(dt).reshape(shp)
              for name, shp, dt, off, n in spans}
    if not masked:
        arrays.update(mask_tm=_NO_MASK, seen=None)
    arrays["arena"] = arena
    return arrays


def _aligned_empty(shape, dt):
    """An uninitialised array whose data starts on a 64-byte boundary (SIMD
    loads, and TensorFlow's own alignment), from the buffer pool
    (fastrnn._buffers: reused memory, no page faults)."""
    return _pool.empty(shape, dt)


def release_buffers():
    """Let go of the memory fastrnn keeps for reuse between calls (see
    ``FASTRNN_BUFFER_POOL_MB`` in the README); buffers still in use are
    freed when their last array goes."""
    _pool.release()


def _zero_unseen(outputs, seen):
    """Keras's rule for masked sequences, in place: the outputs (B, T, H),
    which the kernels fill with the carried state, are zero where ``seen``
    (T, B, 1; None: no mask) is False (before a row's first step)."""
    if seen is not None:
        np.copyto(outputs, 0, where=~seen.swapaxes(0, 1))


def _degenerate(B, T, H):
    return B == 0 or T == 0 or H == 0


# ------------------------------------------------------------------- LSTM ---
def lstm_forward(x, kernel, recurrent_kernel, bias=None, h0=None, c0=None, *,
                 mask=None, go_backwards=False, return_workspace=False,
                 backend="auto", _copy_arrays=True):
    """LSTM forward pass.

    Returns ``LSTMResult(outputs (B, T, H), h (B, H), c (B, H), workspace)``;
    ``workspace`` is None unless ``return_workspace=True``.  The workspace
    keeps its own copies of ``x``, ``h0`` and the outputs, which its backward
    pass reads (``_copy_arrays=False``, for fastrnn.keras, whose tensors
    cannot change: it keeps the arrays themselves).
    """
    x, W, U, b, (B, T, I, H) = _checks.weights(x, kernel, recurrent_kernel,
                                               bias, 4)
    h0 = _checks.optional_state("h0", h0, B, H, x.dtype)
    c0 = _checks.optional_state("c0", c0, B, H, x.dtype)
    mask = _checks.mask_array(mask, B, T)
    go_backwards = _checks.flag("go_backwards", go_backwards)
    training = _checks.flag("return_workspace", return_workspace)
    name = _backend.resolve(backend)
    threads, blas = _backend.thread_plan(name, B, 4, H)
    _backend.prime(name, threads)
    ws = Workspace("lstm", name, (B, T, I, H), x.dtype, go_backwards,
                   bias is not None)

    if name == "numpy" or _degenerate(B, T, H):
        # (the reference's workspace refers to its x: give it its own)
        out, h, c, ref_ws = reference.lstm_forward(x.copy() if training else x,
                                                   W, U, b, h0, c0, mask,
                                                   go_backwards)
        ws.data = {"reference": ref_ws}
        return LSTMResult(out, h, c, ws if training else None)

    dt = x.dtype
    x_in, batch_major = _kernel_input(x, go_backwards)
    ws.masked = mask is not None
    # h in two slots that alternate (the outputs keep every step's h, which
    # the kernel writes itself); c of every step when training (the
    # backward reads them), else two slots too
    hs = _aligned_empty((2, B, H), dt)
    hs[0] = h0
    if training:
        saved = _saved_arrays("lstm", ws.shape, dt, ws.masked)
        cs, gates, mask_tm = saved["cs"], saved["gates"], _mask_tm(mask, go_backwards,
                                                                   saved["mask_tm"])
    else:
        cs = _aligned_empty((2, B, H), dt)
        gates = _aligned_empty((T, B, 4 * H), dt)
        mask_tm = _mask_tm(mask, go_backwards)
    cs[0] = c0
    outputs = _aligned_empty((B, T, H), dt)
    # the kernel's packed copy of the weights (see csrc/fastrnn.h)
    work = _aligned_empty((_pack_len(name, B, I, H, threads)
                           if dt == np.float32 or (B == 1 and threads > 1) else 0,), dt)
    with blas:
        _backend.module(name).lstm_forward(
            x_in, np.ascontiguousarray(W), np.ascontiguousarray(U),
            np.ascontiguousarray(b), mask_tm, hs, cs, gates, outputs, work,
            training, threads, batch_major=batch_major)
    seen = None if mask is None else _seen(mask_tm, saved["seen"] if training else None)
    _zero_unseen(outputs, seen)
    if training:
        ws.data = dict(_saved(x=x, h0=h0, outputs=outputs, copy=_copy_arrays),
                       W=W, U=U, **saved)
    return LSTMResult(outputs, hs[T % 2].copy(),
                      cs[T if training else T % 2].copy(), ws if training else None)


def _mask_tm(mask, go_backwards, out=None):
    """The mask as the kernels read it: (T, B) uint8 in reading order (into
    ``out`` if given), or an empty (0, 0) array for no mask."""
    if mask is None:
        return _NO_MASK
    if out is None:
        return _time_major(mask, go_backwards).view(np.uint8)
    m = mask.swapaxes(0, 1)
    np.copyto(out, m[::-1] if go_backwards else m)
    return out


def _saved(copy, **arrays):
    """What a workspace keeps of the arrays its backward pass reads and the
    caller holds too (x, h0, the outputs): copies (the caller may change
    them before the backward pass), or the arrays themselves when not
    ``copy``."""
    return {k: _pool.copy(a) if copy else a for k, a in arrays.items()}


def _pack_len(backend, B, I, H, threads, kind="lstm"):
    """Length of the scratch the cython kernels pack the weights into (0 for
    other backends): one size for the forward's ``work`` and the backward's
    ``pack``, so that the buffer pool hands the forward's, freed, to the
    backward pass instead of holding two."""
    module = _backend.module(backend)
    if not hasattr(module, "lstm_forward_work_len"):
        return 0
    if kind == "rnn":
        return module.rnn_work_len(B, I, H, threads)
    return max(module.lstm_forward_work_len(B, I, H, threads),
               module.lstm_backward_work_len(B, I, H, threads))


# The backward pass keeps the pre-activation gradients dz of a chunk of time
# steps only, and runs the weight-gradient GEMMs after each chunk: a chunk has
# at least _CHUNK_ROWS (t, b) rows (so the GEMMs stay efficient) and at least
# _MIN_CHUNK_STEPS steps.  256 rows: as fast as 1024 on the issue-4 grid
# (ops[cython] fwd+bwd, 2 threads) and the chunk's dz is up to 6x smaller (LSTM
# 16x100x128x512: 2.2 MB instead of 13).  2 steps (not 4) at 128 rows and more:
# as fast (LSTM 128x20x32x64 backward 0.65-0.67 ms either way) and a training
# step's memory 0.33 MB smaller there (5.4 MiB instead of 5.7-5.8).
_CHUNK_ROWS = 256
_MIN_CHUNK_STEPS = 2


def _chunk_steps(T, B):
    """Steps per backward chunk, 1 <= Tc <= T: as many chunks as fit the
    minimum size, cut evenly (the last one may be shorter)."""
    tc = min(T, max(_MIN_CHUNK_STEPS, -(-_CHUNK_ROWS // B)))
    n_chunks = T // tc
    return -(-T // n_chunks)


def _check_workspace(workspace, kind):
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be the Workspace returned by "
                        f"{kind}_forward(..., return_workspace=True), "
                        f"got {type(workspace).__name__}")
    if workspace.kind != kind:
        raise ValueError(f"workspace was made by {workspace.kind}_forward, "
                         f"not {kind}_forward")


def _d_arrays(workspace, d_outputs, states):
    B, T, I, H = workspace.shape
    dt = workspace.dtype
    if d_outputs is None:
        d_out = np.zeros((B, T, H), dt)
    else:
        d_out = _checks.as_float_array("d_outputs", d_outputs, 3, dt)
        _checks.check_shape("d_outputs", d_out, (B, T, H))
    ds = [_checks.optional_state(n, a, B, H, dt) for n, a in states]
    return d_out, ds


def _kernel_d_out(d_out, seen):
    """d_outputs as the kernels read it: C-contiguous (B, T, H), zero where
    the forward's output was forced to zero (before a row's first step)."""
    if seen is not None:
        d_out = np.where(seen.swapaxes(0, 1), d_out, d_out.dtype.type(0))
    return np.ascontiguousarray(d_out)


def lstm_backward(workspace, d_outputs, d_h=None, d_c=None):
    """Backward pass of ``lstm_forward``.

    d_outputs (B, T, H), d_h, d_c (B, H): gradients of the loss with respect
    to the forward's outputs, h and c (None means zeros).  Returns
    ``LSTMGrads(x, h0, c0, kernel, recurrent_kernel, bias)``; ``bias`` is None
    when the forward had no bias.
    """
    _check_workspace(workspace, "lstm")
    B, T, I, H = workspace.shape
    threads, blas = _backend.thread_plan(workspace.backend, B, 4, H)
    _backend.prime(workspace.backend, threads)
    d_out, (d_h, d_c) = _d_arrays(workspace, d_outputs,
                                  [("d_h", d_h), ("d_c", d_c)])
    dt = workspace.dtype
    if "reference" in workspace.data:
        g = reference.lstm_backward(workspace.data["reference"], d_out, d_h, d_c)
        return LSTMGrads(g["x"], g["h0"], g["c0"], g["kernel"],
                         g["recurrent_kernel"],
                         g["bias"] if workspace.has_bias else None)
    d = _kernel_workspace(workspace, 4)
    d_out = _kernel_d_out(d_out, workspace.data["seen"])   # in reading order
    dh = np.array(d_h, dtype=dt, order="C", copy=True)
    dc = np.array(d_c, dtype=dt, order="C", copy=True)
    module = _backend.module(workspace.backend)
    # first, so that the pool hands it the forward's work buffer (same size)
    pack = _aligned_empty((_pack_len(workspace.backend, B, I, H, threads)
                           if dt == np.float32 else 0,), dt)
    # aligned: fastrnn.keras hands them to TensorFlow without a copy
    dx = _aligned_empty((B, T, I), dt)
    dW = _aligned_empty((I, 4 * H), dt)
    dU = _aligned_empty((H, 4 * H), dt)
    db = np.empty(4 * H, dt)
    Tc = _chunk_steps(T, B)
    dz = _aligned_empty((Tc, B, 4 * H), dt)
    xs = _aligned_empty((_gather_len(Tc, B, I, H),), dt)
    work = np.empty((B, H), dt)
    with blas:
        module.lstm_backward(
            d["x"], d["h0"], d["outputs"], workspace.go_backwards, d["W"], d["U"],
            d["mask_tm"], d["cs"], d["gates"], d_out, dh, dc, dx, dW, dU, db, dz,
            work, pack, xs, threads)
    return LSTMGrads(dx, dh, dc, dW, dU, db if workspace.has_bias else None)


def _kernel_workspace(workspace, G):
    """A compiled workspace's arrays as the backward kernels read them,
    C-contiguous: x (B, T, I), h0 (B, H), outputs (B, T, H), W, U, mask_tm
    (T, B) uint8 (or none), and for the LSTM cs (T+1, B, H) and gates
    (T, B, 4H).  A workspace is opaque, but one whose arrays were replaced or
    dropped fails here with a ValueError, not in a kernel."""
    B, T, I, H = workspace.shape
    dt = workspace.dtype
    want = {"x": (B, T, I), "h0": (B, H), "outputs": (B, T, H),
            "W": (I, G * H), "U": (H, G * H)}
    if G == 4:
        want.update(cs=(T + 1, B, H), gates=(T, B, 4 * H))
    d, arrays = workspace.data, {}
    for name, shape in want.items():
        a = d.get(name)
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dt:
            raise ValueError(f"workspace.data[{name!r}] must be a {dt} array of shape "
                             f"{shape} (a workspace is made by the forward pass and "
                             f"not changed), got {_describe(a)}")
        arrays[name] = np.ascontiguousarray(a)
    m = d.get("mask_tm")
    if (not isinstance(m, np.ndarray) or m.dtype != np.uint8
            or m.shape not in ((T, B), (0, 0))):
        raise ValueError(f"workspace.data['mask_tm'] must be a uint8 array of shape "
                         f"{(T, B)} or (0, 0), got {_describe(m)}")
    arrays["mask_tm"] = np.ascontiguousarray(m)
    return arrays


def _describe(a):
    if isinstance(a, np.ndarray):
        return f"a {a.dtype} array of shape {a.shape}"
    return type(a).__name__


def _gather_len(Tc, B, I, H):
    """Length of the backward passes' ``xs`` scratch: one chunk's rows of x,
    of dx and of h_{t-1}."""
    return Tc * B * (2 * I + H)


# -------------------------------------------------------------------- RNN ---
def _activation_code(activation):
    if activation is None:
        activation = "linear"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, "
                         f"got {activation!r}")
    return activation


def rnn_forward(x, kernel, recurrent_kernel, bias=None, h0=None, *,
                activation="tanh", mask=None, go_backwards=False,
                return_workspace=False, backend="auto", _copy_arrays=True):
    """Simple RNN forward pass,
    ``h_t = activation(x_t @ kernel + h_{t-1} @ recurrent_kernel + bias)``.

    Returns ``RNNResult(outputs (B, T, H), h (B, H), workspace)`` (the
    workspace as in ``lstm_forward``).
    """
    x, W, U, b, (B, T, I, H) = _checks.weights(x, kernel, recurrent_kernel,
                                               bias, 1)
    h0 = _checks.optional_state("h0", h0, B, H, x.dtype)
    mask = _checks.mask_array(mask, B, T)
    activation = _activation_code(activation)
    go_backwards = _checks.flag("go_backwards", go_backwards)
    training = _checks.flag("return_workspace", return_workspace)
    name = _backend.resolve(backend)
    threads, blas = _backend.thread_plan(name, B, 1, H)
    _backend.prime(name, threads)
    ws = Workspace("rnn", name, (B, T, I, H), x.dtype, go_backwards,
                   bias is not None, activation)

    if name == "numpy" or _degenerate(B, T, H):
        out, h, ref_ws = reference.rnn_forward(x.copy() if training else x,
                                               W, U, b, h0, activation, mask,
                                               go_backwards)
        ws.data = {"reference": ref_ws}
        return RNNResult(out, h, ws if training else None)

    dt = x.dtype
    x_in, batch_major = _kernel_input(x, go_backwards)
    ws.masked = mask is not None
    saved = _saved_arrays("rnn", ws.shape, dt, ws.masked) if training else None
    mask_tm = _mask_tm(mask, go_backwards, saved["mask_tm"] if training else None)
    # the kernel computes the pre-activations into the outputs and each
    # step's h in place there (no other buffer)
    h0 = np.ascontiguousarray(h0)
    outputs = _aligned_empty((B, T, H), dt)
    work = _aligned_empty((_pack_len(name, B, I, H, threads, "rnn")
                           if dt == np.float32 else 0,), dt)
    with blas:
        _backend.module(name).rnn_forward(
            x_in, np.ascontiguousarray(W), np.ascontiguousarray(U),
            np.ascontiguousarray(b), mask_tm, h0, outputs, work,
            ACTIVATIONS[activation], threads, batch_major=batch_major)
    h = outputs[:, T - 1].copy()   # (before unseen outputs are zeroed)
    seen = None if mask is None else _seen(mask_tm, saved["seen"] if training else None)
    _zero_unseen(outputs, seen)
    if training:
        ws.data = dict(_saved(x=x, h0=h0, outputs=outputs, copy=_copy_arrays),
                       W=W, U=U, **saved)
    return RNNResult(outputs, h, ws if training else None)


def rnn_backward(workspace, d_outputs, d_h=None):
    """Backward pass of ``rnn_forward``.  Returns
    ``RNNGrads(x, h0, kernel, recurrent_kernel, bias)``."""
    _check_workspace(workspace, "rnn")
    B, T, I, H = workspace.shape
    threads, blas = _backend.thread_plan(workspace.backend, B, 1, H)
    _backend.prime(workspace.backend, threads)
    d_out, (d_h,) = _d_arrays(workspace, d_outputs, [("d_h", d_h)])
    dt = workspace.dtype
    if "reference" in workspace.data:
        g = reference.rnn_backward(workspace.data["reference"], d_out, d_h)
        return RNNGrads(g["x"], g["h0"], g["kernel"], g["recurrent_kernel"],
                        g["bias"] if workspace.has_bias else None)
    d = _kernel_workspace(workspace, 1)
    d_out = _kernel_d_out(d_out, workspace.data["seen"])   # in reading order
    dh = np.array(d_h, dtype=dt, order="C", copy=True)
    # first, so that the pool hands it the forward's work buffer (same size)
    pack = _aligned_empty((_pack_len(workspace.backend, B, I, H, threads, "rnn")
                           if dt == np.float32 else 0,), dt)
    # aligned: fastrnn.keras hands them to TensorFlow without a copy
    dx = _aligned_empty((B, T, I), dt)
    dW = _aligned_empty((I, H), dt)
    dU = _aligned_empty((H, H), dt)
    db = np.empty(H, dt)
    Tc = _chunk_steps(T, B)
    dz = _aligned_empty((Tc, B, H), dt)
    xs = _aligned_empty((_gather_len(Tc, B, I, H),), dt)
    work = np.empty((B, H), dt)
    with blas:
        _backend.module(workspace.backend).rnn_backward(
            d["x"], d["h0"], d["outputs"], workspace.go_backwards, d["W"], d["U"],
            d["mask_tm"], ACTIVATIONS[workspace.activation], d_out, dh, dx, dW, dU,
            db, dz, work, pack, xs, threads)
    return RNNGrads(dx, dh, dW, dU, db if workspace.has_bias else None)

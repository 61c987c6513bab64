"""The Numba backend: fused LSTM and tanh/relu/linear-RNN kernels.

Same contract as the Cython backend (see :mod:`fastrnn.ops`, which allocates
every buffer and calls the four entry points ``lstm_forward``,
``lstm_backward``, ``rnn_forward`` and ``rnn_backward``).  Arrays are
C-contiguous; the time axis is in reading order unless said otherwise.
``mask_tm`` uint8 (T, B), or (0, 0) for "no mask"; the forward's x is
(B, T, I) batch-major when ``batch_major`` (read forwards), else (T, B, I)
time-major.  The states h of every step are kept only once, in the outputs
``out`` (B, T, H), batch-major (out[:, t] = h after step t; masked rows:
the state they carry): the LSTM's forward keeps h in two alternating slots
``hs`` (2, B, H) besides (c in ``cs``, every step's when training), the
RNN's forward computes the pre-activations into out and each h_t in place
there, from h0 (B, H).  The backward passes read h_{t-1} from h0 and out
(h0 up to a row's first unmasked step, before which ops has zeroed the
outputs: ``_first_steps``); their ``x`` and ``dx`` (B, T, I) and ``d_out``
(B, T, H) are batch-major too (x and dx in the caller's time order,
reversed when ``reverse``); a chunk's rows of x, dx and h_{t-1} are
gathered into the scratch ``xs`` (Tc * B * (2 * I + H),).

Per call: the input projection of all steps (float32: each thread's part
on W packed in panels, as the recurrent product; float64: BLAS); per step the
recurrent product on weights packed once per call (float32: register-blocked
tiles in LLVM vector code, ``_numba_panels``; float64: BLAS, GEMV at batch
1), into a buffer allocated once per call, and one elementwise pass; in the
backward pass, after each chunk
of time steps (it keeps one chunk's pre-activation gradients), the weight
gradients as GEMMs over that chunk's rows.  Compilation is lazy (on first
call per dtype and read-only-ness of the arguments) and cached on disk.

Threading (``_split_plan``): with ``nthreads`` > 1, large steps split the
hidden units between threads, each multiplying by its own columns of U
(packed once per call, so they stay in its core's cache) and meeting the
others once per step at a barrier built from LLVM atomics (``_barrier``);
otherwise the batch rows are split, when there are at least 4 per thread:
each block's time loop runs on its own thread without meetings.  After
unit-split calls that stalled (a thread of the call not running), the next
ones run on one thread for a while (``_plan``, ``_note_call``).
The kernels release the GIL; a call's parts run on this thread and on the
workers of a spin team (``_SpinTeam``: Python threads that spin between
calls, so handing them a call costs no wake-up), or on a thread pool's
while another thread's call holds the team.  BLAS stays single-threaded
in every thread.
"""
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ._numba_panels import (cols, pack_columns, pack_rows_t, product, product_tn2,
                             project)

# Fast-math flags that keep NaN/inf semantics (no "nnan"/"ninf").
_JIT = dict(nogil=True, cache=True, error_model="numpy",
            fastmath={"contract", "arcp", "nsz", "afn"})

TANH, RELU, LINEAR = 0, 1, 2

# exp: Cody-Waite reduction by ln 2 (fdlibm's split), Taylor polynomial to r^13.
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10, _E11, _E12, _E13 = (
    1.0 / math.factorial(k) for k in range(2, 14))
# Taylor coefficients of tanh(x)/x - 1 in powers of x^2 (x^3 ... x^15 terms).
_T3, _T5, _T7, _T9, _T11, _T13, _T15 = (
    -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075,
    -929569 / 638512875)
# float32: Cephes expf (ln 2 split in two, degree-6 polynomial).
_F = np.float32
_F_HI, _F_LO = _F(88.0), _F(-87.0)           # exp's argument range
_F_LOG2E, _F_ROUND = _F(_LOG2E), _F(12582912.0)   # 1.5 * 2**23 rounds
_F_LN2_HI, _F_LN2_LO = _F(0.693359375), _F(-2.12194440e-4)
_F_P = tuple(_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                             4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_F0, _F1, _F2 = _F(0), _F(1), _F(2)


# ---------------------------------------------------- elementwise math ---
# libm's exp/tanh are scalar calls (tanh ~10x slower than exp); these are
# branch-free float64 arithmetic that LLVM vectorises inside the fused loops.
@intrinsic
def _pow2(typingctx, n):
    """2.0**n as a float64 for an int64 -1022 <= n <= 1023 (exponent bits)."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        bits = builder.shl(builder.add(args[0], ir.Constant(i64, 1023)),
                           ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _pow2f(typingctx, n):
    """2.0**n as a float32 for an int32 -126 <= n <= 127 (exponent bits)."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 127)),
                           ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", **_JIT)
def _exp(x):
    """exp(x) for a float64 x, within 1 ulp (subnormal results included);
    NaN, +-inf, overflow and underflow as np.exp."""
    xc = min(max(x, -746.0), 710.0)
    n = np.floor(xc * _LOG2E + 0.5)
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = 1.0 + r * (1.0 + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (
        _E6 + r * (_E7 + r * (_E8 + r * (_E9 + r * (_E10 + r * (
            _E11 + r * (_E12 + r * _E13))))))))))))
    ni = np.int64(n)
    n1 = ni >> 1            # 2**n in two factors: n may exceed the exponent range
    y = (p * _pow2(n1)) * _pow2(ni - n1)
    return x if x != x else y


@njit(inline="always", **_JIT)
def _sigmoid64(x):
    """1 / (1 + exp(-x)) as a float64."""
    return 1.0 / (1.0 + _exp(-np.float64(x)))


@njit(inline="always", **_JIT)
def _tanh64(x):
    """tanh(x) as a float64, within a few ulps: (1 - e)/(1 + e) with
    e = exp(-2|x|), and a Taylor series below |x| = 0.1 where that cancels."""
    a = abs(np.float64(x))
    s = a * a
    small = a + a * s * (_T3 + s * (_T5 + s * (_T7 + s * (
        _T9 + s * (_T11 + s * (_T13 + s * _T15))))))
    e = _exp(-2.0 * a)
    r = small if a < 0.1 else (1.0 - e) / (1.0 + e)
    return r if x >= 0 else -r


@njit(inline="always", **_JIT)
def _exp32_reduced(x):
    """(e^r - 1, 2^n) for a float32 x = n ln 2 + r within [-87, 88] (or
    NaN): Cephes expf's polynomial without its leading 1."""
    n = x * _F_LOG2E + _F_ROUND
    n = n - _F_ROUND                   # round(x / ln 2), no libm call
    r = x - n * _F_LN2_HI - n * _F_LN2_LO
    p = _F_P[0]
    p = p * r + _F_P[1]
    p = p * r + _F_P[2]
    p = p * r + _F_P[3]
    p = p * r + _F_P[4]
    p = p * r + _F_P[5]
    return p * r * r + r, _pow2f(np.int32(n))


@njit(inline="always", **_JIT)
def _exp32(x):
    """exp(x) for a float32 x within about 1 ulp, x clamped to [-87, 88]
    (no overflow to inf nor underflow to 0); NaN propagates."""
    x = _F_HI if x > _F_HI else x
    x = _F_LO if x < _F_LO else x
    em1, scale = _exp32_reduced(x)
    return (em1 + _F1) * scale


@njit(inline="always", **_JIT)
def _sigmoid32(x):
    """1 / (1 + exp(-x)) for a float32 x, in float32."""
    return _F1 / (_F1 + _exp32(-x))


@njit(inline="always", **_JIT)
def _expm1_neg32(x):
    """exp(x) - 1 for a float32 x <= 0 (clamped at -87), accurate also near
    0: 2^n (e^r - 1) + (2^n - 1); NaN propagates."""
    x = _F_LO if x < _F_LO else x
    em1, scale = _exp32_reduced(x)
    return scale * em1 + (scale - _F1)


@njit(inline="always", **_JIT)
def _tanh32(x):
    """tanh(x) for a float32 x, in float32: -m / (2 + m) with
    m = exp(-2|x|) - 1, the sign of x restored (one exponential, one
    division, no branch; as the cython kernels' fr_tanhf)."""
    a = -x if x < _F0 else x
    m = _expm1_neg32(-_F2 * a)
    t = -m / (_F2 + m)
    return -t if x < _F0 else t


def _sigmoid(x):
    """The logistic function in the precision of x (typing stub)."""


def _tanh(x):
    """tanh in the precision of x (typing stub)."""


@overload(_sigmoid, jit_options=_JIT)
def _sigmoid_impl(x):
    if x == types.float32:
        return lambda x: _sigmoid32(x)
    return lambda x: _sigmoid64(x)


@overload(_tanh, jit_options=_JIT)
def _tanh_impl(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: _tanh64(x)


# ---------------------------------------------------------- team barrier ---
# The unit split needs the threads of a call to meet once per step: a
# sense-reversing barrier on an int64 array, from LLVM atomics (Numba has
# none of its own), spinning, then yielding the CPU while it waits long.
def _item_pointer(context, builder, aryty, ary, indices):
    """LLVM pointer to ary[indices] (a list of intp values, not negative)."""
    from numba.core import cgutils
    return cgutils.get_item_pointer(context, builder, aryty,
                                    context.make_array(aryty)(context, builder, ary),
                                    indices)


@intrinsic
def _ptr(typingctx, arr, idx):
    """A pointer p to arr[idx] (idx: a tuple of arr.ndim indices, none
    negative), for a loop over the elements that follow it along the last
    axis, p[0], p[1], ..., which must be contiguous (as every array the
    kernels loop over row by row is: ``_unit_strides``).  A view of the
    row would do the same, but each view costs reference counting (some
    60 ns a row: at H = 64 more than the row's arithmetic); a pointer costs
    nothing, and LLVM vectorises loops over pointers as over views."""
    if not (isinstance(arr, types.Array) and isinstance(idx, types.BaseTuple)
            and len(idx) == arr.ndim
            and all(isinstance(i, types.Integer) for i in idx)):
        return None
    sig = types.CPointer(arr.dtype)(arr, idx)

    def codegen(context, builder, sig, args):
        from numba.core import cgutils
        aryty, idxty = sig.args
        inds = [context.cast(builder, v, t, types.intp)
                for v, t in zip(cgutils.unpack_tuple(builder, args[1]), idxty)]
        return _item_pointer(context, builder, aryty, args[0], inds)
    return sig, codegen


def _unit_strides(*arrays):
    """The kernels loop over rows through pointers (``_ptr``): every array's
    last axis must be contiguous (fastrnn.ops passes such arrays)."""
    for a in arrays:
        if a.size and a.strides[-1] != a.itemsize:
            raise ValueError(f"numba kernels need arrays whose last axis is "
                             f"contiguous, got strides {a.strides} for shape "
                             f"{a.shape}")


@intrinsic
def _atomic_add(typingctx, arr, index, value):
    """arr[index] += value atomically (int64 array); returns the old value."""
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig.args[0], args[0], [args[1]])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")
    return sig, codegen


@intrinsic
def _atomic_load(typingctx, arr, index):
    """arr[index] (int64 array), an acquire load."""
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig.args[0], args[0], [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)
    return sig, codegen


@intrinsic
def _atomic_store(typingctx, arr, index, value):
    """arr[index] = value (int64 array), a release store."""
    sig = types.void(arr, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig.args[0], args[0], [args[1]])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _sched_yield(typingctx):
    """Give up the CPU (POSIX sched_yield; elsewhere nothing: keep spinning)."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        if os.name == "posix":
            from numba.core import cgutils
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()
    return sig, codegen


_SPINS = 1 << 14      # spins (5-10 us here) before yielding


@njit(**_JIT)
def _barrier(state, n, sense):
    """Wait until all n threads of a call have arrived; state is the call's
    int64 array [count, sense, meetings, slow waits] (zeros at first),
    sense this thread's last (0 at first).  Returns this thread's new
    sense.  Counts the meetings, and the waits that outlasted the spinning
    (another thread of the call was not running: see ``_note_call``)."""
    s = 1 - sense
    if _atomic_add(state, 0, 1) == n - 1:
        _atomic_store(state, 0, 0)
        _atomic_add(state, 2, 1)
        _atomic_store(state, 1, s)
        return s
    i = 0
    while _atomic_load(state, 1) != s:
        i += 1
        if i == _SPINS:
            _atomic_add(state, 3, 1)
        if i > _SPINS:
            _sched_yield()
    return s


# A call's state array: the barrier's four slots, then the spin team's
# (``_SpinTeam``): GO counts the calls part 0 let go, DONE the workers
# back from this call, TEAM is 1 on the spin team's array.
_GO, _DONE, _TEAM = 4, 5, 6
_STATE_LEN = 8
_IDLE_SPINS = 1 << 18   # a spin-team worker spins this long for the next call (~50-100 us)


@njit(**_JIT)
def _team_start(state, i):
    """A part's first act: on the spin team, part 0 lets its workers go
    (they spin on state[_GO]: this thread has released the GIL by now, so
    they take it without waiting)."""
    if i == 0 and state[_TEAM] != 0:
        _atomic_add(state, _GO, 1)


@njit(**_JIT)
def _team_end(state, i, n):
    """A part's last act: on the spin team, part 0 waits until the n - 1
    workers are back in their idle wait (having given the GIL back), so
    that this thread takes the GIL without waiting for it."""
    if i == 0 and state[_TEAM] != 0:
        _team_wait(state, n - 1)


@njit(**_JIT)
def _team_wait(state, workers):
    """Wait until state[_DONE] reaches workers."""
    k = 0
    while _atomic_load(state, _DONE) < workers:
        k += 1
        if k > _SPINS:
            _sched_yield()


@njit(**_JIT)
def _team_idle(state, seen, done, spins):
    """A spin-team worker between calls: count itself back (when done),
    then spin up to ``spins`` times until state[_GO] differs from seen.
    Returns state[_GO], or -1 when it did not change."""
    if done:
        _atomic_add(state, _DONE, 1)
    for _ in range(spins):
        go = _atomic_load(state, _GO)
        if go != seen:
            return go
    return -1


# ---------------------------------------------------------------- shared ---
@njit(**_JIT)
def _project_block(x, bm, P, G, H, j0, w, Z, b0, b1):
    """The input projection of batch rows [b0, b1), units [j0, j0 + w) of
    each gate block (W's columns packed into P by ``pack_columns``), into
    Z (T, B, G*H): from x batch-major (B, T, I) when bm (a row's run of
    steps at a time, into Z's rows B apart), else from x time-major in
    reading order (T, B, I): all rows at once, or a step at a time."""
    if bm:
        for b in range(b0, b1):
            project(x[b], P, G, H, j0, w, Z[:, b])
    elif b0 == 0 and b1 == x.shape[1]:
        T, B, I = x.shape
        project(x.reshape(T * B, I), P, G, H, j0, w, Z.reshape(T * B, Z.shape[2]))
    else:
        for t in range(x.shape[0]):
            project(x[t, b0:b1], P, G, H, j0, w, Z[t, b0:b1])


@njit(**_JIT)
def _chunk_views(xs, R, I, H):
    """The backward scratch xs (Tc * B * (2 * I + H),) as a chunk's rows of
    x and of dx, (R, I) each, and of h_{t-1}, (R, H)."""
    return (xs[:R * I].reshape(R, I), xs[R * I:2 * R * I].reshape(R, I),
            xs[2 * R * I:2 * R * I + R * H].reshape(R, H))


@njit(inline="always", **_JIT)
def _copy_n(dst, src, n):
    """dst[:n] = src[:n] for two pointers (``_ptr``; a plain loop, which
    LLVM vectorises)."""
    for k in range(n):
        dst[k] = src[k]


@njit(**_JIT)
def _first_steps(mask_tm, B):
    """first[b]: row b's first reading-order step taken (T when none; 0 for
    every row without a mask).  Up to that step the row's state is h0 (its
    outputs were zeroed there), so the backward reads h_{t-1} from h0 for
    t <= first[b] and from the outputs out[b, t-1] after it."""
    first = np.zeros(B, np.int64)
    T = mask_tm.shape[0]
    if T == 0:
        return first
    first[:] = T
    for t in range(T - 1, -1, -1):
        row = mask_tm[t]
        for b in range(B):
            if row[b] != 0:
                first[b] = t
    return first


@njit(**_JIT)
def _tm_row(B, T, reverse, t0, r):
    """(b, time index) in batch-major (B, T, ...) of row r of the chunk that
    starts at reading-order step t0 (rows in (t, b) order)."""
    t = t0 + r // B
    return r % B, (T - 1 - t) if reverse else t


@njit(**_JIT)
def _grads_rows(x, h0, out, first, reverse, WT, dz, t0, t1, r0, r1, xs, dx):
    """Rows [r0, r1) of the chunk of steps [t0, t1) (rows of the flattened
    (t, b) chunk): h_{t-1}'s rows gathered into xs's third part (from h0
    up to step first[b], from the outputs out (B, T, H) after it: see
    ``_first_steps``) and x's into its first (for dU and dW), and dx's =
    dz @ W.T (WT: W.T packed by ``_pack_wt``), through xs's second part,
    scattered to dx; x, dx batch-major (B, T, I), time reversed when
    reverse (out in reading order)."""
    B, T, I = x.shape
    R = (t1 - t0) * B
    if r1 <= r0:
        return
    H = out.shape[2]
    xc, dxc, hc = _chunk_views(xs, R, I, H)
    for r in range(r0, r1):
        b = r % B
        t = t0 + r // B
        if t <= first[b]:
            _copy_n(_ptr(hc, (r, 0)), _ptr(h0, (b, 0)), H)
        else:
            _copy_n(_ptr(hc, (r, 0)), _ptr(out, (b, t - 1, 0)), H)
    if I == 0:
        return
    for r in range(r0, r1):
        b, tt = _tm_row(B, T, reverse, t0, r)
        _copy_n(_ptr(xc, (r, 0)), _ptr(x, (b, tt, 0)), I)
    dz2 = dz[:t1 - t0].reshape(R, dz.shape[2])
    project(dz2[r0:r1], WT, 1, I, 0, I, dxc[r0:r1])
    for r in range(r0, r1):
        b, tt = _tm_row(B, T, reverse, t0, r)
        _copy_n(_ptr(dx, (b, tt, 0)), _ptr(dxc, (r, 0)), I)


@njit(**_JIT)
def _grads_cols(dz, t0, t1, c0, c1, first, xs, dW, dU, db):
    """Columns [c0, c1) of dW += x^T dz and dU += h_{t-1}^T dz (x's and
    h_{t-1}'s chunk rows in xs, gathered by ``_grads_rows``) and db +=
    column sums of dz, for the chunk of steps [t0, t1) (set on the first
    chunk)."""
    I, H = dW.shape[0], dU.shape[0]
    G_H = dz.shape[2]
    R = (t1 - t0) * dz.shape[1]
    if c1 <= c0:
        return
    dz2 = dz[:t1 - t0].reshape(R, G_H)
    xc, _, hc = _chunk_views(xs, R, I, H)
    product_tn2(xc, hc, dz2, c0, dW[:, c0:c1], dU[:, c0:c1], db[c0:c1], not first)


@njit(**_JIT)
def _weight_grads(x, h0, out, first, reverse, W, dz, t0, t1, first_chunk, xs, dx,
                  dW, dU, db):
    """The chunk's dx, dW, dU and db on one thread (``_grads_rows`` and
    ``_grads_cols`` over all rows and columns)."""
    _grads_rows(x, h0, out, first, reverse, W, dz, t0, t1, 0,
                (t1 - t0) * x.shape[0], xs, dx)
    _grads_cols(dz, t0, t1, 0, dz.shape[2], first_chunk, xs, dW, dU, db)


@njit(inline="always", **_JIT)
def _taken(mask_tm, t, b):
    """Whether row b takes step t (no mask: always)."""
    return mask_tm.shape[0] == 0 or mask_tm[t, b] != 0


# ------------------------------------------------------------------- LSTM ---
@njit(**_JIT)
def _lstm_cell(mask_tm, t, gates_t, rec, bias, h_prev, c_prev, h_next,
               c_next, out_t, j0, j1):
    """One step's fused pass for hidden units [j0, j1) of every row: gate
    pre-activations gates_t + rec + bias, activations (stored back into
    gates_t: kept for the backward pass when training, scratch otherwise),
    new c and h (also into out_t, the step's outputs, a strided view of the
    batch-major outputs).  rec (B, 4w) holds the units' h U, gate blocks of w.
    Masked rows carry h and c.  Row by row through pointers (``_ptr``), in
    loops that each touch few arrays, which LLVM vectorises (one fused loop
    it does not)."""
    B, H = h_prev.shape
    w = j1 - j0
    cast = h_prev.dtype.type
    bi, bf = _ptr(bias, (j0,)), _ptr(bias, (H + j0,))
    bg, bo = _ptr(bias, (2 * H + j0,)), _ptr(bias, (3 * H + j0,))
    for b in range(B):
        hn, cn, on = _ptr(h_next, (b, j0)), _ptr(c_next, (b, j0)), _ptr(out_t, (b, j0))
        hp, cp = _ptr(h_prev, (b, j0)), _ptr(c_prev, (b, j0))
        if not _taken(mask_tm, t, b):
            for u in range(w):
                hn[u] = hp[u]
                on[u] = hp[u]
                cn[u] = cp[u]
            continue
        gi, gf = _ptr(gates_t, (b, j0)), _ptr(gates_t, (b, H + j0))
        gg, go = _ptr(gates_t, (b, 2 * H + j0)), _ptr(gates_t, (b, 3 * H + j0))
        ri, rf = _ptr(rec, (b, 0)), _ptr(rec, (b, w))
        rg, ro = _ptr(rec, (b, 2 * w)), _ptr(rec, (b, 3 * w))
        for u in range(w):
            gi[u] = cast(_sigmoid(gi[u] + ri[u] + bi[u]))
        for u in range(w):
            gf[u] = cast(_sigmoid(gf[u] + rf[u] + bf[u]))
        for u in range(w):
            gg[u] = cast(_tanh(gg[u] + rg[u] + bg[u]))
        for u in range(w):
            go[u] = cast(_sigmoid(go[u] + ro[u] + bo[u]))
        for u in range(w):
            cn[u] = gf[u] * cp[u] + gi[u] * gg[u]
        for u in range(w):
            hn[u] = go[u] * cast(_tanh(cn[u]))
        for u in range(w):
            on[u] = hn[u]


@njit(**_JIT)
def _slot(training, t):
    """Index in cs of the cell state after step t (t = -1: the initial
    state): every step's when training, else two that alternate (as h's
    always do in hs: ``_slot(False, t)``)."""
    return t + 1 if training else (t + 1) % 2


@njit(**_JIT)
def _lstm_steps(mask_tm, Up, bias, hs, cs, gates, out, training, b0, b1):
    """The forward time loop over batch rows [b0, b1) (a thread's block);
    gates (T, B, 4H) hold x_t W on entry; Up is all of U packed
    (``pack_columns``).  mask_tm holds those rows' columns only."""
    T, H = gates.shape[0], hs.shape[2]
    rec = np.empty((b1 - b0, cols(Up)), gates.dtype)
    for t in range(T):
        p, q = _slot(False, t - 1), _slot(False, t)
        pc, qc = _slot(training, t - 1), _slot(training, t)
        product(hs[p, b0:b1], Up, rec)
        _lstm_cell(mask_tm, t, gates[t, b0:b1], rec, bias, hs[p, b0:b1],
                   cs[pc, b0:b1], hs[q, b0:b1], cs[qc, b0:b1], out[b0:b1, t], 0, H)


@njit(**_JIT)
def _lstm_cell_grad(mask_tm, t, gates_t, c_prev, c_t, d_out_t, dh, dc,
                          dz_t, j0, j1):
    """One backward step's pass for units [j0, j1): dh += d_out_t; for taken
    rows the gate pre-activation gradients dz_t and dc <- dc at c_prev;
    masked rows get dz_t = 0 and keep dc.  Row by row through pointers, in
    short loops that LLVM vectorises (dz_t's o block holds tanh(c) until its
    last use)."""
    B, H = dh.shape
    w = j1 - j0
    cast = dh.dtype.type
    one = cast(1)
    zero = cast(0)
    for b in range(B):
        dhr, dor = _ptr(dh, (b, j0)), _ptr(d_out_t, (b, j0))
        for u in range(w):
            dhr[u] += dor[u]
        di, df = _ptr(dz_t, (b, j0)), _ptr(dz_t, (b, H + j0))
        dg, do = _ptr(dz_t, (b, 2 * H + j0)), _ptr(dz_t, (b, 3 * H + j0))
        if not _taken(mask_tm, t, b):
            for u in range(w):
                di[u] = zero
                df[u] = zero
                dg[u] = zero
                do[u] = zero
            continue
        gi, gf = _ptr(gates_t, (b, j0)), _ptr(gates_t, (b, H + j0))
        gg, go = _ptr(gates_t, (b, 2 * H + j0)), _ptr(gates_t, (b, 3 * H + j0))
        dcr, cpr, cr = _ptr(dc, (b, j0)), _ptr(c_prev, (b, j0)), _ptr(c_t, (b, j0))
        for u in range(w):
            do[u] = cast(_tanh(cr[u]))
        for u in range(w):
            o = go[u]
            tc = do[u]
            dcr[u] += dhr[u] * o * (one - tc * tc)
            do[u] = dhr[u] * tc * o * (one - o)
        for u in range(w):
            di[u] = dcr[u] * gg[u] * gi[u] * (one - gi[u])
        for u in range(w):
            df[u] = dcr[u] * cpr[u] * gf[u] * (one - gf[u])
        for u in range(w):
            dg[u] = dcr[u] * gi[u] * (one - gg[u] * gg[u])
        for u in range(w):
            dcr[u] *= gf[u]


@njit(**_JIT)
def _take_dh(mask_tm, t, part, dh, j0, j1):
    """dh[:, j0:j1] <- part[:, :j1 - j0] on the rows that took step t."""
    for b in range(dh.shape[0]):
        if _taken(mask_tm, t, b):
            _copy_n(_ptr(dh, (b, j0)), _ptr(part, (b, 0)), j1 - j0)


@njit(**_JIT)
def _lstm_chunk_grad_steps(UT, mask_tm, cs, gates, d_out, dh, dc, dz, work,
                           t0, t1, b0, b1):
    """Steps t1-1 down to t0 of the backward time loop for batch rows
    [b0, b1) (dz[t - t0] gets step t's pre-activation gradients; mask_tm
    holds those rows' columns only); UT is U.T packed (``pack_rows_t``),
    work (b1 - b0, cols(UT)) scratch."""
    H = dh.shape[1]
    for t in range(t1 - 1, t0 - 1, -1):
        dzt = dz[t - t0, b0:b1]
        _lstm_cell_grad(mask_tm, t, gates[t, b0:b1], cs[t, b0:b1],
                        cs[t + 1, b0:b1], d_out[b0:b1, t], dh[b0:b1],
                        dc[b0:b1], dzt, 0, H)
        product(dzt, UT, work)
        _take_dh(mask_tm, t, work, dh[b0:b1], 0, H)


@njit(**_JIT)
def _lstm_grad_steps(x, h0, out, first, reverse, W, U, mask_tm, cs, gates,
                     d_out, dh, dc, dx, dW, dU, db, dz, xs):
    """The backward time loop, in chunks of dz.shape[0] steps from the end,
    each followed by its weight gradients; dh, dc end at step 0."""
    T, Tc = gates.shape[0], dz.shape[0]
    UT = pack_rows_t(U, 0, U.shape[0])
    work = np.empty((dh.shape[0], cols(UT)), dh.dtype)
    for t1 in range(T, 0, -Tc):
        t0 = max(t1 - Tc, 0)
        _lstm_chunk_grad_steps(UT, mask_tm, cs, gates, d_out, dh, dc, dz, work,
                               t0, t1, 0, dh.shape[0])
        _weight_grads(x, h0, out, first, reverse, W, dz, t0, t1, t1 == T, xs, dx,
                      dW, dU, db)


# ----------------------------------------------------- LSTM, unit split ---
@njit(**_JIT)
def _lstm_steps_units(mask_tm, U, bias, hs, cs, gates, out, training, j0, j1,
                      bar, n, sense):
    """The forward time loop for units [j0, j1) of every row, meeting the
    call's other n - 1 threads at bar after each step (the next step reads
    every unit of h)."""
    T = gates.shape[0]
    Uj = pack_columns(U, 4, j0, j1)
    rec = np.empty((hs.shape[1], cols(Uj)), gates.dtype)
    for t in range(T):
        p, q = _slot(False, t - 1), _slot(False, t)
        pc, qc = _slot(training, t - 1), _slot(training, t)
        product(hs[p], Uj, rec)
        _lstm_cell(mask_tm, t, gates[t], rec, bias, hs[p], cs[pc], hs[q], cs[qc],
                   out[:, t], j0, j1)
        sense = _barrier(bar, n, sense)
    return sense


@njit(**_JIT)
def _lstm_chunk_grad_steps_units(U, mask_tm, cs, gates, d_out, dh, dc, dz, t0,
                                 t1, j0, j1, bar, n, sense):
    """Steps t1-1 down to t0 of the backward time loop for units [j0, j1)
    of every row, meeting the other threads after each step's gate pass
    (dh_{t-1}'s product reads every unit of dz_t)."""
    UjT = pack_rows_t(U, j0, j1)           # U[j0:j1].T, (4H, w)
    part = np.empty((dh.shape[0], cols(UjT)), dh.dtype)
    for t in range(t1 - 1, t0 - 1, -1):
        dzt = dz[t - t0]
        _lstm_cell_grad(mask_tm, t, gates[t], cs[t], cs[t + 1], d_out[:, t], dh,
                        dc, dzt, j0, j1)
        sense = _barrier(bar, n, sense)
        product(dzt, UjT, part)
        _take_dh(mask_tm, t, part, dh, j0, j1)
    return sense



@njit(**_JIT)
def _part(n_items, k, i, align):
    """Part i of k of range(n_items), cut at multiples of align (``_split``)."""
    chunks = (n_items + align - 1) // align
    lo, hi = chunks * i // k * align, chunks * (i + 1) // k * align
    return min(lo, n_items), min(hi, n_items)


@njit(**_JIT)
def _mask_rows(mask_tm, b0, b1):
    """The mask's columns for rows [b0, b1) ((0, 0): no mask)."""
    return mask_tm if mask_tm.shape[0] == 0 else mask_tm[:, b0:b1]


@njit(**_JIT)
def _lstm_forward_part(i, n, units, p0, p1, x, bm, W, Wp, U, Up, bias, mask_tm,
                       hs, cs, gates, out, training, bar):
    """Part i of n of a threaded forward pass (one call per thread, all at
    once): the input projection of what the thread will need (so no thread
    waits for another before the first step), then the time loop for units
    [p0, p1) of every row (units: each thread packs its own columns of W and
    U) or for rows [p0, p1) (on Wp, Up: all of W and U packed once)."""
    _team_start(bar, i)
    H = U.shape[0]
    if units:
        _project_block(x, bm, pack_columns(W, 4, p0, p1), 4, H, p0, p1 - p0, gates,
                       0, gates.shape[1])
        _lstm_steps_units(mask_tm, U, bias, hs, cs, gates, out, training, p0, p1,
                          bar, n, 0)
    else:
        _project_block(x, bm, Wp, 4, H, 0, H, gates, p0, p1)
        _lstm_steps(_mask_rows(mask_tm, p0, p1), Up, bias, hs, cs, gates, out,
                    training, p0, p1)
    _team_end(bar, i, n)


@njit(**_JIT)
def _lstm_backward_part(i, n, units, p0, p1, x, h0, out, first, reverse, W, U,
                        UT, mask_tm, cs, gates, d_out, dh, dc, dx, dW, dU, db,
                        dz, xs, bar):
    """Part i of n of a threaded backward pass (one call per thread, all at
    once), chunk by chunk: the time loop (units, or rows [p0, p1) on UT, U.T
    packed once), then, meeting the others between phases, its rows of dx
    (x and h_{t-1} gathered) and its columns of dW, dU and db."""
    _team_start(bar, i)
    T, Tc, B, GH = gates.shape[0], dz.shape[0], dh.shape[0], dz.shape[2]
    sense = 0
    work = np.empty((0 if units else p1 - p0, cols(UT)), dh.dtype)
    for t1 in range(T, 0, -Tc):
        t0 = max(t1 - Tc, 0)
        if units:
            sense = _lstm_chunk_grad_steps_units(U, mask_tm, cs, gates, d_out, dh,
                                                 dc, dz, t0, t1, p0, p1, bar, n,
                                                 sense)
        else:
            _lstm_chunk_grad_steps(UT, _mask_rows(mask_tm, p0, p1), cs, gates,
                                   d_out, dh, dc, dz, work, t0, t1, p0, p1)
        sense = _weight_grads_part(i, n, x, h0, out, first, reverse, W, dz, t0,
                                   t1, t1 == T, xs, dx, dW, dU, db, bar, sense)
    _team_end(bar, i, n)


@njit(**_JIT)
def _weight_grads_part(i, n, x, h0, out, first, reverse, W, dz, t0, t1,
                       first_chunk, xs, dx, dW, dU, db, bar, sense):
    """Part i of n of a chunk's weight gradients, between meetings of the n
    threads (the chunk's dz complete; x's and h_{t-1}'s rows gathered;
    done)."""
    R, GH = (t1 - t0) * x.shape[0], dz.shape[2]
    sense = _barrier(bar, n, sense)
    r0, r1 = _part(R, n, i, 1)
    _grads_rows(x, h0, out, first, reverse, W, dz, t0, t1, r0, r1, xs, dx)
    sense = _barrier(bar, n, sense)
    c0, c1 = _part(GH, n, i, UNIT_CHUNK)
    _grads_cols(dz, t0, t1, c0, c1, first_chunk, xs, dW, dU, db)
    return _barrier(bar, n, sense)


@njit(**_JIT)
def _pack_all(U, G, units):
    """All of U packed for the row split's blocks (``pack_columns``), or,
    when the units are split (each thread packs its own), an empty pack."""
    return pack_columns(U, G, 0, 0 if units else U.shape[1] // G)


@njit(**_JIT)
def _pack_wt(W):
    """W (I, G*H) transposed for dx = dz W^T: panels of its rows (float32),
    the transposed view (float64), as ``pack_rows_t``."""
    return pack_rows_t(W, 0, W.shape[0])


@njit(**_JIT)
def _pack_all_t(U, units):
    """U.T packed for the row split's backward blocks (``pack_rows_t``), or
    an empty pack when the units are split."""
    return pack_rows_t(U, 0, 0 if units else U.shape[0])


def _run_parts(fn, split, blocks):
    """fn(i, n, units, p0, p1, bar) for every part, all at once (they meet
    at bar): the first on this thread, the rest on the spin team's workers
    (``_SpinTeam``), or, while another thread's call holds the team, on
    the thread pool's."""
    n = len(blocks)
    units = split == "units"
    team = _spin_team(n - 1)
    if team.lock.acquire(blocking=False):
        try:
            bar = team.state
            team.run(lambda i: fn(i, n, units, *blocks[i], bar),
                     [(i,) for i in range(n)])
            meetings, slow_waits = int(bar[2]), int(bar[3])
        finally:
            team.lock.release()
    else:
        bar = np.zeros(_STATE_LEN, np.int64)
        _run_parallel(lambda i: fn(i, n, units, *blocks[i], bar),
                      [(i,) for i in range(n)])
        meetings, slow_waits = bar[2], bar[3]
    if units:
        _note_call(meetings, slow_waits)


def _kernel_x(x, batch_major):
    """(x, bm): x as the LSTM's forward reads it, batch-major (bm) only in
    float32 (the projection on packed panels, a batch row's run of steps at
    a time, into the time-major gates; float64 makes one GEMM of all rows,
    time-major, in reading order).  (The RNN's projects into the
    batch-major outputs: it reads x as given.)"""
    if batch_major and x.dtype != np.float32:
        return np.ascontiguousarray(x.swapaxes(0, 1)), False
    return x, batch_major


def lstm_forward(x, W, U, bias, mask_tm, hs, cs, gates, out, work, training,
                 nthreads, batch_major=False):
    """LSTM forward.  hs (2, B, H) and cs ((T+1 if training else 2), B, H)
    hold h0, c0 at index 0 on entry; on exit h after step t is at
    hs[(t+1) % 2] (two slots that alternate) and c at cs[t+1] (training)
    or cs[(t+1) % 2]; out (B, T, H) holds the outputs, batch-major
    (out[:, t]: h after step t; masked rows: the state they carry), the
    only place every step's h is kept.  gates
    (T, B, 4H): when training, on exit the activated gates i, f, g, o of
    taken rows.  work (the cython kernel's scratch for packed weights) is
    not used: the weights are packed here (``_numba_panels``).  x is
    (T, B, I) in reading order, or (B, T, I) read forwards when batch_major."""
    _unit_strides(x, bias, hs, cs, gates, out)
    x, bm = _kernel_x(x, batch_major)
    B = gates.shape[1]
    split, blocks = _plan(B, 4, U.shape[0], nthreads)
    units = split == "units" and len(blocks) > 1
    Wp, Up = _pack_all(W, 4, units), _pack_all(U, 4, units)
    if len(blocks) == 1:
        _project_block(x, bm, Wp, 4, U.shape[0], 0, U.shape[0], gates, 0, B)
        _lstm_steps(mask_tm, Up, bias, hs, cs, gates, out, training, 0, B)
        return
    _run_parts(lambda i, n, units, p0, p1, bar: _lstm_forward_part(
        i, n, units, p0, p1, x, bm, W, Wp, U, Up, bias, mask_tm, hs, cs, gates,
        out, training, bar), split, blocks)


def lstm_backward(x, h0, out, reverse, W, U, mask_tm, cs, gates, d_out, dh, dc,
                  dx, dW, dU, db, dz, work, pack, xs, nthreads):
    """LSTM backward through time, from the forward's x, h0 (B, H), outputs
    out (B, T, H), cell states cs (T+1, B, H) and gates (T, B, 4H).  x, dx
    (B, T, I), out and d_out (B, T, H) are batch-major; x and dx in the
    caller's time order (reading order is reversed when reverse), out and
    d_out in reading order.  out may be zero before a row's first unmasked
    step (Keras's rule): h_{t-1} is read from h0 up to that step, from
    out[:, t-1] after it (it is used for dU only).  dh, dc (B, H): dL/dh_T,
    dL/dc_T on entry, dL/dh0, dL/dc0 on exit.  Writes dx, dW, dU and db;
    dz (Tc, B, 4H), for chunks of 1 <= Tc <= T steps, and xs
    (Tc * B * (2 * I + H),: a chunk's rows of x, of dx and of h_{t-1}) are
    scratch; work and pack (the cython kernel's scratch) are not used.
    x, h0 and out may be read-only."""
    _unit_strides(x, h0, out, cs, gates, d_out, dh, dc, dx, dz, xs)
    split, blocks = _plan(x.shape[0], 4, U.shape[0], nthreads)
    W = _pack_wt(W)   # (the weight gradients' dx = dz W^T)
    first = _first_steps(mask_tm, x.shape[0])
    if len(blocks) == 1:
        _lstm_grad_steps(x, h0, out, first, reverse, W, U, mask_tm, cs, gates,
                         d_out, dh, dc, dx, dW, dU, db, dz, xs)
        return
    UT = _pack_all_t(U, split == "units")
    _run_parts(lambda i, n, units, p0, p1, bar: _lstm_backward_part(
        i, n, units, p0, p1, x, h0, out, first, reverse, W, U, UT, mask_tm, cs,
        gates, d_out, dh, dc, dx, dW, dU, db, dz, xs, bar), split, blocks)


# -------------------------------------------------------------------- RNN ---
def _project_into(A, P, j0, w, Z):
    """Z[:, j0:j0 + w] = A @ W's columns packed by ``pack_columns(W, 1, j0,
    j0 + w)`` into P (``project`` with one gate block); float64 into
    contiguous rows, all units: one BLAS product straight into Z (typing
    stub)."""


@overload(_project_into, jit_options=_JIT)
def _project_into_impl(A, P, j0, w, Z):
    if P.ndim == 2 and Z.layout == "C":
        def direct(A, P, j0, w, Z):
            if w == Z.shape[1] and A.shape[0] > 0 and A.shape[1] > 0:
                np.dot(np.ascontiguousarray(A), P, Z)
            else:
                project(A, P, 1, Z.shape[1], j0, w, Z)
        return direct
    return lambda A, P, j0, w, Z: project(A, P, 1, Z.shape[1], j0, w, Z)


@njit(**_JIT)
def _rnn_project(x, bm, P, j0, w, out, b0, b1):
    """The input projection x_t W of batch rows [b0, b1), units [j0, j0 + w)
    (W's columns packed into P by ``pack_columns``), into the outputs out
    (B, T, H), which hold the pre-activations until each step turns them
    into h_t: from x batch-major (B, T, I) when bm, one product over the
    rows' runs of steps (in out's order); else from x time-major in reading
    order (T, B, I): at T = 1 one product too, else a row's run of steps
    (rows B*I apart in x) or a step's rows (T*H apart in out) at a time,
    whichever makes the fewer products."""
    T, H = out.shape[1], out.shape[2]
    nb = b1 - b0
    if nb <= 0 or T == 0:
        return
    if bm:
        _project_into(x[b0:b1].reshape(nb * T, x.shape[2]), P, j0, w,
                      out[b0:b1].reshape(nb * T, H))
    elif T == 1:
        _project_into(x[0, b0:b1], P, j0, w, out[b0:b1].reshape(nb, H))
    elif T >= nb:
        for b in range(b0, b1):
            _project_into(x[:, b], P, j0, w, out[b])
    else:
        for t in range(T):
            _project_into(x[t, b0:b1], P, j0, w, out[b0:b1, t])


@njit(**_JIT)
def _rnn_cell(mask_tm, t, rec, bias, act, h0, out, j0, j1):
    """One step's fused pass for units [j0, j1) of the rows of out (B, T, H)
    (a block's: h0 (B, H) and mask_tm hold the same rows), in place:
    out[:, t] holds x_t W on entry and h_t = act(x_t W + rec + bias) on exit
    on taken rows (rec (B, j1 - j0): the units' h_{t-1} U); masked rows
    carry h_{t-1} (h0 at t = 0, else out[:, t-1]).  Row by row over
    contiguous views, one array read and written: LLVM vectorises it (with
    x_t W in a second array aliasing h it did not)."""
    B = out.shape[0]
    w = j1 - j0
    cast = out.dtype.type
    zero = cast(0)
    bj = _ptr(bias, (j0,))
    for b in range(B):
        hr, r = _ptr(out, (b, t, j0)), _ptr(rec, (b, 0))
        if not _taken(mask_tm, t, b):
            if t == 0:
                _copy_n(hr, _ptr(h0, (b, j0)), w)
            else:
                _copy_n(hr, _ptr(out, (b, t - 1, j0)), w)
        elif act == TANH:
            for u in range(w):
                hr[u] = cast(_tanh(hr[u] + r[u] + bj[u]))
        elif act == RELU:
            for u in range(w):
                v = hr[u] + r[u] + bj[u]
                hr[u] = zero if v < zero else v   # NaN propagates
        else:
            for u in range(w):
                hr[u] += r[u] + bj[u]


@njit(**_JIT)
def _rnn_steps(mask_tm, Up, bias, h0, out, act):
    """The forward time loop over the rows of out (B, T, H) (a block's:
    mask_tm's columns and h0 (B, H) hold the same rows); out holds x_t W on
    entry, h_t on exit; Up is U packed."""
    T, H = out.shape[1], out.shape[2]
    rec = np.empty((out.shape[0], cols(Up)), out.dtype)
    for t in range(T):
        if t == 0:
            product(h0, Up, rec)
        else:
            product(out[:, t - 1], Up, rec)
        _rnn_cell(mask_tm, t, rec, bias, act, h0, out, 0, H)


# ------------------------------------------------------ RNN, unit split ---
@njit(**_JIT)
def _rnn_steps_units(mask_tm, U, bias, h0, out, act, j0, j1, bar, n, sense):
    """The forward time loop for units [j0, j1) of every row (out holds x W
    on entry, as in ``_rnn_steps``), meeting the other n - 1 threads at bar
    after each step (the next step reads every unit of out[:, t])."""
    T, B = out.shape[1], out.shape[0]
    Uj = pack_columns(U, 1, j0, j1)
    rec = np.empty((B, cols(Uj)), out.dtype)
    for t in range(T):
        if t == 0:
            product(h0, Uj, rec)
        else:
            product(out[:, t - 1], Uj, rec)
        _rnn_cell(mask_tm, t, rec, bias, act, h0, out, j0, j1)
        sense = _barrier(bar, n, sense)
    return sense


@njit(**_JIT)
def _rnn_chunk_grad_steps_units(U, mask_tm, out, act, d_out, dh, dz, t0, t1, j0,
                                j1, bar, n, sense):
    """Steps t1-1 down to t0 of the backward time loop for units [j0, j1)
    of every row (as ``_lstm_chunk_grad_steps_units``)."""
    B = dh.shape[0]
    UjT = pack_rows_t(U, j0, j1)
    part = np.empty((B, cols(UjT)), dh.dtype)
    for t in range(t1 - 1, t0 - 1, -1):
        dzt = dz[t - t0]
        _rnn_cell_grad(mask_tm, t, act, out, d_out, dh, dzt, j0, j1)
        sense = _barrier(bar, n, sense)
        product(dzt, UjT, part)
        _take_dh(mask_tm, t, part, dh, j0, j1)
    return sense


@njit(**_JIT)
def _rnn_forward_part(i, n, units, p0, p1, x, bm, W, Wp, U, Up, bias, mask_tm,
                      h0, out, act, bar):
    """Part i of n of a threaded RNN forward pass (as ``_lstm_forward_part``;
    the input projection goes into out)."""
    _team_start(bar, i)
    H = U.shape[0]
    if units:
        _rnn_project(x, bm, pack_columns(W, 1, p0, p1), p0, p1 - p0, out, 0,
                     out.shape[0])
        _rnn_steps_units(mask_tm, U, bias, h0, out, act, p0, p1, bar, n, 0)
    else:
        _rnn_project(x, bm, Wp, 0, H, out, p0, p1)
        _rnn_steps(_mask_rows(mask_tm, p0, p1), Up, bias, h0[p0:p1], out[p0:p1],
                   act)
    _team_end(bar, i, n)


@njit(**_JIT)
def _rnn_backward_part(i, n, units, p0, p1, x, h0, out, first, reverse, W, U, UT,
                       mask_tm, act, d_out, dh, dx, dW, dU, db, dz, xs, bar):
    """Part i of n of a threaded RNN backward pass (as
    ``_lstm_backward_part``)."""
    _team_start(bar, i)
    T, Tc = x.shape[1], dz.shape[0]
    sense = 0
    work = np.empty((0 if units else p1 - p0, cols(UT)), dh.dtype)
    for t1 in range(T, 0, -Tc):
        t0 = max(t1 - Tc, 0)
        if units:
            sense = _rnn_chunk_grad_steps_units(U, mask_tm, out, act, d_out, dh, dz,
                                                t0, t1, p0, p1, bar, n, sense)
        else:
            _rnn_chunk_grad_steps(UT, _mask_rows(mask_tm, p0, p1), out, act, d_out,
                                  dh, dz, work, t0, t1, p0, p1)
        sense = _weight_grads_part(i, n, x, h0, out, first, reverse, W, dz, t0,
                                   t1, t1 == T, xs, dx, dW, dU, db, bar, sense)
    _team_end(bar, i, n)


def rnn_forward(x, W, U, bias, mask_tm, h0, out, work, act, nthreads,
                batch_major=False):
    """RNN forward: h_t = act(x_t @ W + h_{t-1} @ U + bias) for taken rows
    (masked rows carry h_{t-1}), from h0 (B, H) (may be read-only), into
    out (B, T, H), batch-major in reading order (out[:, t] = h_t; the final
    state is out[:, T-1]), which also holds x_t @ W while it is computed
    (no other buffer).  act 0 tanh, 1 relu, 2 linear.  work (the cython
    kernel's packed weights) is not used: the weights are packed here.  x
    as for ``lstm_forward`` (float64 too reads a batch-major x as it is:
    its projection is one product into out)."""
    B, H = out.shape[0], out.shape[2]
    _unit_strides(x, bias, h0, out)
    split, blocks = _plan(B, 1, H, nthreads)
    units = split == "units" and len(blocks) > 1
    Wp, Up = _pack_all(W, 1, units), _pack_all(U, 1, units)
    bm = bool(batch_major)
    if len(blocks) == 1:
        _rnn_project(x, bm, Wp, 0, H, out, 0, B)
        _rnn_steps(mask_tm, Up, bias, h0, out, act)
        return
    _run_parts(lambda i, n, units, p0, p1, bar: _rnn_forward_part(
        i, n, units, p0, p1, x, bm, W, Wp, U, Up, bias, mask_tm, h0, out, act, bar),
        split, blocks)


@njit(**_JIT)
def _rnn_cell_grad(mask_tm, t, act, out, d_out, dh, dz_t, j0, j1):
    """For units [j0, j1) of the rows of out and d_out (B, T, H) (a block's:
    dh (B, H), dz_t and mask_tm hold the same rows): dh += d_out[:, t];
    dz_t = dh * act'(h_t) on taken rows (h_t = out[:, t]), 0 on masked
    rows."""
    B = dh.shape[0]
    w = j1 - j0
    zero = dh.dtype.type(0)
    one = dh.dtype.type(1)
    for b in range(B):
        dhr, dor = _ptr(dh, (b, j0)), _ptr(d_out, (b, t, j0))
        dzr, hr = _ptr(dz_t, (b, j0)), _ptr(out, (b, t, j0))
        for u in range(w):
            dhr[u] += dor[u]
        if not _taken(mask_tm, t, b):
            for u in range(w):
                dzr[u] = zero
        elif act == TANH:
            for u in range(w):
                dzr[u] = dhr[u] * (one - hr[u] * hr[u])
        elif act == RELU:
            for u in range(w):
                dzr[u] = dhr[u] if hr[u] > zero else zero
        else:
            _copy_n(dzr, dhr, w)


@njit(**_JIT)
def _rnn_chunk_grad_steps(UT, mask_tm, out, act, d_out, dh, dz, work, t0, t1,
                          b0, b1):
    """Steps t1-1 down to t0 of the backward time loop for batch rows
    [b0, b1) (as ``_lstm_chunk_grad_steps``; h_t is read from out)."""
    H = dh.shape[1]
    outb, doutb, dhb = out[b0:b1], d_out[b0:b1], dh[b0:b1]
    for t in range(t1 - 1, t0 - 1, -1):
        dzt = dz[t - t0, b0:b1]
        _rnn_cell_grad(mask_tm, t, act, outb, doutb, dhb, dzt, 0, H)
        product(dzt, UT, work)
        _take_dh(mask_tm, t, work, dhb, 0, H)


@njit(**_JIT)
def _rnn_grad_steps(x, h0, out, first, reverse, W, U, mask_tm, act, d_out, dh,
                    dx, dW, dU, db, dz, xs):
    """The backward time loop, in chunks as ``_lstm_grad_steps``; dh ends at
    step 0."""
    T, Tc = x.shape[1], dz.shape[0]
    UT = pack_rows_t(U, 0, U.shape[0])
    work = np.empty((dh.shape[0], cols(UT)), dh.dtype)
    for t1 in range(T, 0, -Tc):
        t0 = max(t1 - Tc, 0)
        _rnn_chunk_grad_steps(UT, mask_tm, out, act, d_out, dh, dz, work, t0, t1,
                              0, dh.shape[0])
        _weight_grads(x, h0, out, first, reverse, W, dz, t0, t1, t1 == T, xs, dx,
                      dW, dU, db)


def rnn_backward(x, h0, out, reverse, W, U, mask_tm, act, d_out, dh, dx, dW, dU,
                 db, dz, work, pack, xs, nthreads):
    """RNN backward through time; arguments as ``lstm_backward`` without the
    cell state (dz (Tc, B, H)); act'(z_t) is taken from h_t = out[:, t].
    dh (B, H): dL/dh_T on entry, dL/dh0 on exit."""
    _unit_strides(x, h0, out, d_out, dh, dx, dz, xs)
    split, blocks = _plan(x.shape[0], 1, U.shape[0], nthreads)
    W = _pack_wt(W)   # (the weight gradients' dx = dz W^T)
    first = _first_steps(mask_tm, x.shape[0])
    if len(blocks) == 1:
        _rnn_grad_steps(x, h0, out, first, reverse, W, U, mask_tm, act, d_out,
                        dh, dx, dW, dU, db, dz, xs)
        return
    UT = _pack_all_t(U, split == "units")
    _run_parts(lambda i, n, units, p0, p1, bar: _rnn_backward_part(
        i, n, units, p0, p1, x, h0, out, first, reverse, W, U, UT, mask_tm, act,
        d_out, dh, dx, dW, dU, db, dz, xs, bar), split, blocks)


# -------------------------------------------------------------- threads ---
MIN_ROWS = 4          # fewest batch rows a thread owns


def _split(n_items, k, i, align=1):
    """Part i of k of range(n_items), cut at multiples of align."""
    chunks = -(-n_items // align)
    lo, hi = chunks * i // k * align, chunks * (i + 1) // k * align
    return min(lo, n_items), min(hi, n_items)


def _row_blocks(B, nthreads):
    """[(b0, b1)]: one block of batch rows per thread, at least MIN_ROWS
    each; a single block runs serially."""
    n = max(1, min(int(nthreads), B // MIN_ROWS))
    return [_split(B, n, i) for i in range(n)]


UNIT_CHUNK = 16       # unit slices are multiples of this


# When the units are split (measured here, 2 threads, numba 0.68): never
# with 16 rows or more per thread (each thread's per-step GEMM is efficient:
# LSTM 64x50x256x256 fwd+bwd 37 ms by rows, 44 by units); with fewer, when
# a step's recurrent product (B*G*H*H multiply-adds) is at least
# UNITS_WORK (LSTM 16x100x128x512 fwd 33 -> 22 ms by units; SimpleRNN
# 32x100x64x128 fwd 0.8 ms by rows, 1.8 by units), or, when the rows cannot
# be split at all (fewer than 4 per thread), at least UNITS_WORK_FEW_ROWS
# (LSTM 1x100x128x256 fwd 1.4 -> 0.8 ms; SimpleRNN 1x100x128x256, 64K, fwd
# 0.34 -> 0.28 ms, fwd+bwd 0.83 -> 0.68 on the packed float32 product: with
# BLAS's GEMV it was slower than one thread).
ROWS_PER_THREAD = 16
UNITS_WORK = 1 << 22
UNITS_WORK_FEW_ROWS = 1 << 15


def _split_plan(B, G, H, nthreads):
    """("units", [(j0, j1)]) or ("rows", [(b0, b1)]): how a call's threads
    share its work (see ``UNITS_WORK``); one part runs serially."""
    n = max(1, int(nthreads))
    chunks = -(-H // UNIT_CHUNK)
    work = B * G * H * H
    if n > 1 and chunks > 1 and B < n * ROWS_PER_THREAD:
        rows_fit = B >= n * MIN_ROWS
        if work >= (UNITS_WORK if rows_fit else UNITS_WORK_FEW_ROWS):
            k = min(n, chunks)
            return "units", [_split(H, k, i, UNIT_CHUNK) for i in range(k)]
    return "rows", _row_blocks(B, n)


# Contention back-off (as the cython kernels' team, csrc/fr_pool.c): a
# unit-split call (a meeting per step) "stalls" when more than a quarter of
# its meetings had a thread wait past its spinning, i.e. a thread of the
# call was not running (the cores are shared with other busy threads; on this project's
# 2-core VM, threads of TensorFlow and of the cython kernels' team in the
# same process sometimes left both of a call's threads on one core for the
# whole process: LSTM 1x100x128x256 fwd+bwd 4.0-4.4 ms instead of 1.9).
# After STALL_STREAK stalled calls in a row, the next unit-split calls run
# on one thread (BACKOFF_FIRST calls, doubling while stalls persist, up to
# BACKOFF_MAX); a clean one resets it.  (The row split meets a few times a
# call, after long phases whose lengths differ: its waits say nothing.)
STALL_STREAK = 3
BACKOFF_FIRST = 4
BACKOFF_MAX = 64
_stall_lock = threading.Lock()
_stall = {"team_calls": 0, "stalled_calls": 0, "backoff_calls": 0,
          "streak": 0, "left": 0, "len": 0}


def _plan(B, G, H, nthreads):
    """``_split_plan``; a unit split runs on one thread while backing off."""
    split, blocks = _split_plan(B, G, H, nthreads)
    if split == "units":
        with _stall_lock:
            if _stall["left"] > 0:
                _stall["left"] -= 1
                _stall["backoff_calls"] += 1
                return _split_plan(B, G, H, 1)
    return split, blocks


def _note_call(meetings, slow_waits):
    """Count a threaded call; start or extend the back-off after stalls."""
    with _stall_lock:
        _stall["team_calls"] += 1
        if slow_waits > max(1, meetings // 4):
            _stall["stalled_calls"] += 1
            _stall["streak"] += 1
            if _stall["streak"] >= STALL_STREAK:
                _stall["len"] = min(2 * _stall["len"] or BACKOFF_FIRST, BACKOFF_MAX)
                _stall["left"] = _stall["len"]
        else:
            _stall["streak"] = _stall["len"] = 0


def team_stats():
    """Unit-split calls since the process started: {"team_calls",
    "stalled_calls", "backoff_calls"} (calls run on one thread while
    backing off)."""
    with _stall_lock:
        return {k: _stall[k] for k in ("team_calls", "stalled_calls", "backoff_calls")}


_executor = None
_executor_key = None
_executor_lock = threading.Lock()


def _serial_blas_in_this_thread():
    from . import _backend
    fn = _backend._local_threads_setter()
    if fn is not None:
        fn(1)


def _workers(n):
    """A thread pool of at least n workers, BLAS single-threaded in each
    (a fresh one after fork: the parent's threads do not exist there)."""
    global _executor, _executor_key
    with _executor_lock:
        key = os.getpid()
        if _executor is None or _executor_key[0] != key or _executor_key[1] < n:
            _executor = ThreadPoolExecutor(
                max_workers=n, thread_name_prefix="fastrnn-numba",
                initializer=_serial_blas_in_this_thread)
            _executor_key = (key, n)
        return _executor


class _SpinTeam:
    """Worker threads for the parts of a call, kept spinning for a while
    between calls (as the cython kernels' team, csrc/fr_pool.c).

    A thread pool hands a part to a sleeping worker and waits on a
    condition for it (two wake-ups, about 50 us a call here, a third of a
    SimpleRNN 1x100x128x256 forward).  Here the caller announces the call
    (``job``), then runs part 0, whose first act (``_team_start``, the GIL
    already released) bumps state[_GO]; the workers, spinning on it in
    ``_team_idle``, take the GIL (free) and run their parts; part 0's
    last act (``_team_end``) waits until every worker is back in
    ``_team_idle`` (GIL released again).  So no thread ever waits for the
    GIL or for a wake-up while the team is busy.  A worker that saw no call
    for ``_IDLE_SPINS`` spins sleeps on a condition until the next one is
    announced.  One call at a time (``lock``)."""

    def __init__(self, workers):
        self.pid = os.getpid()
        self.state = np.zeros(_STATE_LEN, np.int64)
        self.state[_TEAM] = 1
        self.lock = threading.Lock()
        self.cond = threading.Condition()
        self.posted = 0       # the ticket (state[_GO] value) of the last call
        self.sleeping = 0
        self.closed = False
        self.job = (0, None, ())
        self.errors = []
        self.threads = [threading.Thread(target=self._work, args=(k,), daemon=True,
                                         name=f"fastrnn-numba-team-{k}")
                        for k in range(workers)]
        for t in self.threads:
            t.start()

    def _work(self, k):
        _serial_blas_in_this_thread()
        seen, done = 0, False
        while True:
            go = _team_idle(self.state, seen, done, _IDLE_SPINS)
            done = False
            if go < 0:
                with self.cond:
                    if self.closed:
                        return
                    if self.posted == seen:
                        self.sleeping += 1
                        self.cond.wait()
                        self.sleeping -= 1
                continue
            seen = go
            ticket, fn, parts = self.job
            if ticket == go and k + 1 < len(parts):
                try:
                    fn(*parts[k + 1])
                except BaseException as e:   # re-raised by the caller
                    self.errors.append(e)
                done = True

    def run(self, fn, parts):
        """fn(*part) for every part, the first on this thread, at most
        len(self.threads) + 1 of them; re-raises the first error."""
        st = self.state
        st[:_GO] = 0
        st[_DONE] = 0
        ticket = int(st[_GO]) + 1
        self.errors = []
        self.job = (ticket, fn, parts)
        with self.cond:
            self.posted = ticket
            if self.sleeping:
                self.cond.notify_all()
        try:
            fn(*parts[0])
        except BaseException:
            if st[_GO] == ticket:   # let go: wait for the workers
                _team_wait(st, len(parts) - 1)
            else:                   # failed before: nobody started
                with self.cond:
                    self.posted = ticket - 1
            raise
        if st[_GO] != ticket:   # part 0 never let the workers go
            with self.cond:
                self.posted = ticket - 1
            raise RuntimeError("fastrnn: a spin-team call's part 0 did not "
                               "call _team_start")
        if self.errors:
            raise self.errors[0]

    def close(self):
        """Let the workers end once idle (a larger team replaces this one)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


_team = None
_team_lock = threading.Lock()


def _spin_team(workers):
    """The process's spin team, with at least ``workers`` workers (a fresh
    one after fork: the parent's threads do not exist there)."""
    global _team
    with _team_lock:
        t = _team
        if t is None or t.pid != os.getpid() or len(t.threads) < workers:
            if t is not None and t.pid == os.getpid():
                t.close()
            _team = t = _SpinTeam(workers)
        return t


def _run_parallel(fn, parts):
    """fn(*part) for every part: the first on this thread, the rest on the
    pool's threads (the kernels release the GIL); returns when all are done
    and re-raises the first error."""
    futures = [_workers(len(parts) - 1).submit(fn, *p) for p in parts[1:]]
    try:
        fn(*parts[0])
    finally:
        for f in futures:
            f.exception()           # wait for every part
    for f in futures:
        f.result()

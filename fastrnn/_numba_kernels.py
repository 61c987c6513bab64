"""The Numba backend: fused LSTM and tanh/relu/linear-RNN kernels.

Same contract as the Cython backend (see :mod:`fastrnn.ops`, which allocates
every buffer and calls the four entry points ``lstm_forward``,
``lstm_backward``, ``rnn_forward`` and ``rnn_backward``).  Arrays are
C-contiguous and time-major, in reading order: ``x_tm`` (T, B, I),
``hs`` (T+1, B, H), ``mask_tm`` uint8 (T, B), or (0, 0) for "no mask".

Per call: one GEMM for the input projection of all steps; per step one GEMM
for the recurrent projection (into a buffer allocated once per call) and one
fused elementwise pass; after the backward time loop, the weight gradients as
GEMMs over all T*B rows.  Compilation is lazy (on first call per dtype and
read-only-ness of the arguments) and cached on disk.
"""
import numpy as np
from numba import njit

# Fast-math flags that keep NaN/inf semantics (no "nnan"/"ninf").
_JIT = dict(nogil=True, cache=True,
            fastmath={"contract", "arcp", "nsz", "afn"})

TANH, RELU, LINEAR = 0, 1, 2

# Taylor coefficients of tanh(x)/x - 1 in powers of x^2 (x^3 ... x^15 terms).
_T3, _T5, _T7, _T9, _T11, _T13, _T15 = (
    -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075,
    -929569 / 638512875)


# ---------------------------------------------------------------- shared ---
@njit(**_JIT)
def _tanh(x):
    """tanh(x) as a float64, within a few float64 ulps, from one exp: libm's
    tanh/tanhf are several times slower.  Taylor series below |x| = 0.1
    (where (1 - e)/(1 + e) would cancel); NaN and +-inf as np.tanh."""
    a = abs(np.float64(x))
    if a < 0.1:
        s = a * a
        r = a + a * s * (_T3 + s * (_T5 + s * (_T7 + s * (
            _T9 + s * (_T11 + s * (_T13 + s * _T15))))))
    else:
        e = np.exp(-2.0 * a)
        r = (1.0 - e) / (1.0 + e)
    return r if x >= 0 else -r


@njit(**_JIT)
def _input_gemm(x_tm, W, out):
    """out (T, B, G*H) = x_tm (T, B, I) @ W (I, G*H), as one GEMM."""
    T, B, I = x_tm.shape
    out2 = out.reshape(T * B, out.shape[2])
    if I == 0:
        out2[:] = 0
    else:
        np.dot(x_tm.reshape(T * B, I), W, out2)


@njit(**_JIT)
def _weight_grads(x_tm, W, hs, dz, dx_tm, dW, dU, db):
    """From dz (T, B, G*H): dx_tm = dz @ W.T, dW = x^T dz, dU = hs[:T]^T dz
    (over all T*B rows) and db = column sums of dz."""
    T, B, I = x_tm.shape
    H = hs.shape[2]
    G_H = dz.shape[2]
    dz2 = dz.reshape(T * B, G_H)
    if I > 0:
        x2 = x_tm.reshape(T * B, I)
        np.dot(dz2, W.T, dx_tm.reshape(T * B, I))
        np.dot(x2.T, dz2, dW)
    np.dot(hs[0:T].reshape(T * B, H).T, dz2, dU)
    db[:] = 0
    for r in range(T * B):
        for k in range(G_H):
            db[k] += dz2[r, k]


@njit(**_JIT)
def _taken(mask_tm, t, b):
    """Whether row b takes step t (no mask: always)."""
    return mask_tm.shape[0] == 0 or mask_tm[t, b] != 0


# ------------------------------------------------------------------- LSTM ---
@njit(**_JIT)
def _lstm_cell(mask_tm, t, gates_t, rec, bias, h_prev, c_prev, h_next, c_next,
               training):
    """One step's fused pass over (b, j): gate pre-activations
    gates_t + rec + bias (B, 4H), activations, new c and h.  Masked rows carry
    h and c.  When training, the activated i, f, g, o go back to gates_t."""
    B, H = h_prev.shape
    cast = h_prev.dtype.type
    one = cast(1)
    for b in range(B):
        if not _taken(mask_tm, t, b):
            h_next[b, :] = h_prev[b, :]
            c_next[b, :] = c_prev[b, :]
            continue
        for j in range(H):
            zi = gates_t[b, j] + rec[b, j] + bias[j]
            zf = gates_t[b, H + j] + rec[b, H + j] + bias[H + j]
            zg = gates_t[b, 2 * H + j] + rec[b, 2 * H + j] + bias[2 * H + j]
            zo = gates_t[b, 3 * H + j] + rec[b, 3 * H + j] + bias[3 * H + j]
            i = one / (one + np.exp(-zi))
            f = one / (one + np.exp(-zf))
            g = cast(_tanh(zg))
            o = one / (one + np.exp(-zo))
            c = f * c_prev[b, j] + i * g
            c_next[b, j] = c
            h_next[b, j] = o * cast(_tanh(c))
            if training:
                gates_t[b, j] = i
                gates_t[b, H + j] = f
                gates_t[b, 2 * H + j] = g
                gates_t[b, 3 * H + j] = o


@njit(**_JIT)
def lstm_forward(x_tm, W, U, bias, mask_tm, hs, cs, gates, training, nthreads):
    """LSTM forward.  hs (T+1, B, H) and cs ((T+1 if training else 2), B, H)
    hold h0, c0 at index 0 on entry; on exit hs[t+1] is h after step t and the
    c after step t is at cs[t+1] (training) or cs[(t+1) % 2].  gates
    (T, B, 4H): when training, the activated gates i, f, g, o."""
    T, B, _ = x_tm.shape
    _input_gemm(x_tm, W, gates)
    rec = np.empty((B, gates.shape[2]), gates.dtype)
    for t in range(T):
        np.dot(hs[t], U, rec)
        if training:
            c_prev, c_next = cs[t], cs[t + 1]
        else:
            c_prev, c_next = cs[t % 2], cs[(t + 1) % 2]
        _lstm_cell(mask_tm, t, gates[t], rec, bias, hs[t], c_prev, hs[t + 1],
                   c_next, training)


@njit(**_JIT)
def _lstm_cell_grad(mask_tm, t, gates_t, c_prev, c_t, d_out_t, dh, dc, dz_t):
    """One backward step's fused pass: dh += d_out_t; for taken rows the gate
    pre-activation gradients dz_t (B, 4H) and dc <- dc at c_prev; masked rows
    get dz_t = 0 and keep dc."""
    B, H = dh.shape
    cast = dh.dtype.type
    one = cast(1)
    for b in range(B):
        if not _taken(mask_tm, t, b):
            for j in range(H):
                dh[b, j] += d_out_t[b, j]
            dz_t[b, :] = 0
            continue
        for j in range(H):
            i = gates_t[b, j]
            f = gates_t[b, H + j]
            g = gates_t[b, 2 * H + j]
            o = gates_t[b, 3 * H + j]
            dhv = dh[b, j] + d_out_t[b, j]
            tc = cast(_tanh(c_t[b, j]))
            dcc = dc[b, j] + dhv * o * (one - tc * tc)
            dz_t[b, j] = dcc * g * i * (one - i)
            dz_t[b, H + j] = dcc * c_prev[b, j] * f * (one - f)
            dz_t[b, 2 * H + j] = dcc * i * (one - g * g)
            dz_t[b, 3 * H + j] = dhv * tc * o * (one - o)
            dc[b, j] = dcc * f


@njit(**_JIT)
def _take_dh(mask_tm, t, work, dh):
    """dh <- work (= dz_t @ U.T) on the rows that took step t."""
    B = dh.shape[0]
    for b in range(B):
        if _taken(mask_tm, t, b):
            dh[b, :] = work[b, :]


@njit(**_JIT)
def lstm_backward(x_tm, W, U, mask_tm, hs, cs, gates, d_out_tm, dh, dc,
                  dx_tm, dW, dU, db, dz, work, nthreads):
    """LSTM backward through time.  dh, dc (B, H): dL/dh_T, dL/dc_T on entry,
    dL/dh0, dL/dc0 on exit.  Writes dx_tm (T, B, I), dW, dU, db and
    dz (T, B, 4H); work (B, H) is scratch."""
    T = x_tm.shape[0]
    UT = U.T
    for t in range(T - 1, -1, -1):
        _lstm_cell_grad(mask_tm, t, gates[t], cs[t], cs[t + 1], d_out_tm[t],
                        dh, dc, dz[t])
        np.dot(dz[t], UT, work)
        _take_dh(mask_tm, t, work, dh)
    _weight_grads(x_tm, W, hs, dz, dx_tm, dW, dU, db)


# -------------------------------------------------------------------- RNN ---
@njit(**_JIT)
def _rnn_cell(mask_tm, t, z_t, rec, bias, act, h_prev, h_next):
    """One step's fused pass: h_next = act(z_t + rec + bias) (B, H) on taken
    rows; masked rows carry h_prev."""
    B, H = h_prev.shape
    zero = h_prev.dtype.type(0)
    for b in range(B):
        if not _taken(mask_tm, t, b):
            h_next[b, :] = h_prev[b, :]
            continue
        for j in range(H):
            z = z_t[b, j] + rec[b, j] + bias[j]
            if act == TANH:
                h_next[b, j] = _tanh(z)
            elif act == RELU:
                h_next[b, j] = zero if z < zero else z   # NaN propagates
            else:
                h_next[b, j] = z


@njit(**_JIT)
def rnn_forward(x_tm, W, U, bias, mask_tm, hs, z, act, nthreads):
    """RNN forward: hs[t+1] = act(x_t @ W + hs[t] @ U + bias) for taken rows.
    z (T, B, H) is scratch; act 0 tanh, 1 relu, 2 linear."""
    T, B, _ = x_tm.shape
    _input_gemm(x_tm, W, z)
    rec = np.empty((B, z.shape[2]), z.dtype)
    for t in range(T):
        np.dot(hs[t], U, rec)
        _rnn_cell(mask_tm, t, z[t], rec, bias, act, hs[t], hs[t + 1])


@njit(**_JIT)
def _rnn_cell_grad(mask_tm, t, act, h_t, d_out_t, dh, dz_t):
    """dh += d_out_t; dz_t = dh * act'(h_t) on taken rows, 0 on masked rows."""
    B, H = dh.shape
    zero = dh.dtype.type(0)
    one = dh.dtype.type(1)
    for b in range(B):
        taken = _taken(mask_tm, t, b)
        for j in range(H):
            dhv = dh[b, j] + d_out_t[b, j]
            if not taken:
                dh[b, j] = dhv
                dz_t[b, j] = zero
            elif act == TANH:
                dz_t[b, j] = dhv * (one - h_t[b, j] * h_t[b, j])
            elif act == RELU:
                dz_t[b, j] = dhv if h_t[b, j] > zero else zero
            else:
                dz_t[b, j] = dhv


@njit(**_JIT)
def rnn_backward(x_tm, W, U, mask_tm, hs, act, d_out_tm, dh, dx_tm, dW, dU,
                 db, dz, work, nthreads):
    """RNN backward through time.  dh (B, H): dL/dh_T on entry, dL/dh0 on
    exit.  Writes dx_tm (T, B, I), dW, dU, db and dz (T, B, H); work (B, H)
    is scratch."""
    T = x_tm.shape[0]
    UT = U.T
    for t in range(T - 1, -1, -1):
        _rnn_cell_grad(mask_tm, t, act, hs[t + 1], d_out_tm[t], dh, dz[t])
        np.dot(dz[t], UT, work)
        _take_dh(mask_tm, t, work, dh)
    _weight_grads(x_tm, W, hs, dz, dx_tm, dW, dU, db)

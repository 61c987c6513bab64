"""The cython backend: thin typed wrappers over the C kernels in csrc/.

Each function checks the buffers' shapes against each other (a wrong shape
raises ValueError, never reaches C), takes SciPy's BLAS from
``scipy.linalg.cython_blas`` and calls the kernel without the GIL.  The
contract (reading-order buffers, time-major but for d_out) is documented in csrc/fastrnn.h
and in fastrnn/ops.py, which is the only caller.
"""
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

cdef extern from "fastrnn.h" nogil:
    ctypedef void (*fr_sgemm_fn)(char*, char*, int*, int*, int*, float*, float*,
                                 int*, float*, int*, float*, float*, int*)
    ctypedef void (*fr_dgemm_fn)(char*, char*, int*, int*, int*, double*, double*,
                                 int*, double*, int*, double*, double*, int*)
    ctypedef void (*fr_sgemv_fn)(char*, int*, int*, float*, float*, int*, float*,
                                 int*, float*, float*, int*)
    ctypedef void (*fr_dgemv_fn)(char*, int*, int*, double*, double*, int*, double*,
                                 int*, double*, double*, int*)
    ctypedef struct fr_sblas:
        fr_sgemm_fn gemm
        fr_sgemv_fn gemv
    ctypedef struct fr_dblas:
        fr_dgemm_fn gemm
        fr_dgemv_fn gemv
    int fr_lstm_forward_f32(const fr_sblas*, int, int, int, int, int, int, int,
                            const float*, const float*, const float*, const float*,
                            const unsigned char*, float*, float*, float*, float*, float*)
    int fr_lstm_forward_f64(const fr_dblas*, int, int, int, int, int, int, int,
                            const double*, const double*, const double*, const double*,
                            const unsigned char*, double*, double*, double*, double*,
                            double*)
    int fr_lstm_backward_f32(const fr_sblas*, int, int, int, int, int, int, int,
                             const float*, const float*, const float*,
                             const unsigned char*, const float*, const float*, const float*,
                             const float*, const float*, float*, float*, float*,
                             float*, float*, float*, float*, float*, float*, float*)
    int fr_lstm_backward_f64(const fr_dblas*, int, int, int, int, int, int, int,
                             const double*, const double*, const double*,
                             const unsigned char*, const double*, const double*, const double*,
                             const double*, const double*, double*, double*, double*,
                             double*, double*, double*, double*, double*, double*, double*)
    int fr_rnn_forward_f32(const fr_sblas*, int, int, int, int, int, int, int,
                           const float*, const float*, const float*, const float*,
                           const unsigned char*, const float*, float*, float*)
    int fr_rnn_forward_f64(const fr_dblas*, int, int, int, int, int, int, int,
                           const double*, const double*, const double*, const double*,
                           const unsigned char*, const double*, double*, double*)
    int fr_rnn_backward_f32(const fr_sblas*, int, int, int, int, int, int, int, int,
                            const float*, const float*, const float*,
                            const unsigned char*, const float*, const float*, const float*,
                            float*, float*, float*, float*, float*, float*, float*, float*,
                            float*)
    int fr_rnn_backward_f64(const fr_dblas*, int, int, int, int, int, int, int, int,
                            const double*, const double*, const double*,
                            const unsigned char*, const double*, const double*, const double*,
                            double*, double*, double*, double*, double*, double*, double*, double*,
                            double*)
    const char *fr_compiler()
    int fr_has_threads()
    void fr_set_blas_threads_fn(int (*fn)(int))
    void fr_team_stats(long *team_calls, long *stalled_calls, long *backoff_calls)
    long fr_team_skipped_workers()
    void fr_team_set_worker_delay_us(long us)
    void fr_team_prime()
    long fr_team_primes()
    int fr_team_plan(int nthreads, int B, int H, int *rows)
    int fr_forward_team_plan(int nthreads, int G, int B, int H, int *rows)
    size_t fr_lstm_forward_work(int B, int I, int H, int nthreads)
    size_t fr_lstm_backward_work(int B, int I, int H, int nthreads)
    size_t fr_rnn_work(int B, int I, int H, int nthreads)


cdef fr_sblas _SBLAS
_SBLAS.gemm = <fr_sgemm_fn>sgemm
_SBLAS.gemv = <fr_sgemv_fn>sgemv
cdef fr_dblas _DBLAS
_DBLAS.gemm = <fr_dgemm_fn>dgemm
_DBLAS.gemv = <fr_dgemv_fn>dgemv


def build_info():
    """How the extension was built: {"compiler": str, "threads": str}.
    (Its BLAS is SciPy's, through scipy.linalg.cython_blas.)"""
    return {"compiler": fr_compiler().decode(),
            "threads": "own team (POSIX threads)" if fr_has_threads() else "no"}


def lstm_forward_work_len(int B, int I, int H, int nthreads):
    """Elements of the scratch lstm_forward takes for B rows, I inputs, H
    units and nthreads threads (its packed weights; see csrc/fastrnn.h)."""
    return fr_lstm_forward_work(B, I, H, nthreads)


def rnn_work_len(int B, int I, int H, int nthreads):
    """Elements of the scratch rnn_forward (work) and rnn_backward (pack)
    take for B rows, I inputs, H units and nthreads threads."""
    return fr_rnn_work(B, I, H, nthreads)


def lstm_backward_work_len(int B, int I, int H, int nthreads):
    """Elements of the scratch lstm_backward takes as ``pack`` for B rows,
    I inputs, H units and nthreads threads (see csrc/fastrnn.h)."""
    return fr_lstm_backward_work(B, I, H, nthreads)


def team_plan(int nthreads, int B, int H, int G=0):
    """(threads, split) a kernel call gets for nthreads, B rows, H units:
    split is "rows" or "units" (see csrc/rnn_kernels.c).  G = 0: a backward
    pass (or an LSTM forward); G = 4 or 1: an LSTM or RNN forward pass."""
    cdef int rows = 0
    cdef int n = (fr_forward_team_plan(nthreads, G, B, H, &rows) if G > 0
                  else fr_team_plan(nthreads, B, H, &rows))
    return n, ("rows" if rows else "units")


def team_stats():
    """The kernels' thread team since the process started: {"team_calls",
    "stalled_calls", "backoff_calls", "skipped_workers"} (see
    csrc/fr_pool.h)."""
    cdef long team = 0, stalled = 0, backoff = 0
    fr_team_stats(&team, &stalled, &backoff)
    return {"team_calls": team, "stalled_calls": stalled, "backoff_calls": backoff,
            "skipped_workers": fr_team_skipped_workers()}


def prime_team():
    """Wake the team's sleeping workers (if any) to spin for a call about to
    come, so that their wake-up overlaps the caller's preparing (see
    csrc/fr_pool.h, fr_pool_prime)."""
    fr_team_prime()


def _team_primes():
    """Tests: the wake-ups ``prime_team`` has sent so far."""
    return fr_team_primes()


def _set_worker_delay_us(long us):
    """Tests only: the team's workers sleep ``us`` microseconds before each
    job (0: none), so that they start late on purpose."""
    fr_team_set_worker_delay_us(us)


def set_blas_threads_fn(size_t address):
    """Hand the kernels' worker threads ``int fn(int)`` at ``address`` (the C
    address of OpenBLAS's openblas_set_num_threads_local), which each worker
    calls with 1 so that BLAS inside a team stays single-threaded.  0 unsets."""
    fr_set_blas_threads_fn(<int (*)(int) noexcept nogil>address)


cdef inline void _expect(str name, tuple got, tuple want) except *:
    if got != want:
        raise ValueError(f"{name} must have shape {want}, got {got}")


cdef inline floating* _scratch(floating[::1] buf, str name, size_t need) except? NULL:
    """The scratch buffer's data, or NULL for an empty one (no packing)."""
    if buf.shape[0] == 0:
        return NULL
    if <size_t>buf.shape[0] < need:
        raise ValueError(f"{name} must have at least {need} elements, got {buf.shape[0]}")
    return &buf[0]


cdef inline floating* _gather_scratch(floating[::1] xs, Py_ssize_t Tc, Py_ssize_t B,
                                      Py_ssize_t I, Py_ssize_t H) except NULL:
    """The backward passes' xs: Tc * B * (2 * I + H) elements."""
    cdef size_t need = <size_t>Tc * <size_t>B * (2 * <size_t>I + <size_t>H)
    if <size_t>xs.shape[0] < need or need == 0:   # (need >= 1 for valid sizes)
        raise ValueError(f"xs must have at least Tc * B * (2 * I + H) = {need} "
                         f"elements, got {xs.shape[0]}")
    return &xs[0]


cdef inline void _expect_saved(const floating[:, ::1] h0, const floating[:, :, ::1] out,
                               Py_ssize_t B, Py_ssize_t T, Py_ssize_t H) except *:
    """The forward's h0 (B, H) and outputs (B, T, H), which backward reads."""
    _expect("h0", (h0.shape[0], h0.shape[1]), (B, H))
    _expect("out", (out.shape[0], out.shape[1], out.shape[2]), (B, T, H))


cdef inline const unsigned char* _mask_ptr(const unsigned char[:, ::1] mask,
                                           Py_ssize_t T, Py_ssize_t B) except? NULL:
    if mask.shape[0] == 0:
        return NULL
    _expect("mask", (mask.shape[0], mask.shape[1]), (T, B))
    return &mask[0, 0]


def lstm_forward(const floating[:, :, ::1] x, const floating[:, ::1] W,
                 const floating[:, ::1] U, const floating[::1] bias,
                 const unsigned char[:, ::1] mask, floating[:, :, ::1] hs,
                 floating[:, :, ::1] cs, floating[:, :, ::1] gates,
                 floating[:, :, ::1] out, floating[::1] work, bint training,
                 int nthreads, bint batch_major=False):
    """x is (T, B, I) in reading order, or (B, T, I) read forwards when
    batch_major (see csrc/fastrnn.h)."""
    cdef Py_ssize_t T = x.shape[1 if batch_major else 0], B = x.shape[0 if batch_major else 1]
    cdef Py_ssize_t I = x.shape[2], H = U.shape[0]
    _expect("W", (W.shape[0], W.shape[1]), (I, 4 * H))
    _expect("U", (U.shape[0], U.shape[1]), (H, 4 * H))
    _expect("bias", (bias.shape[0],), (4 * H,))
    _expect("hs", (hs.shape[0], hs.shape[1], hs.shape[2]), (2, B, H))
    _expect("cs", (cs.shape[0], cs.shape[1], cs.shape[2]), (T + 1 if training else 2, B, H))
    _expect("gates", (gates.shape[0], gates.shape[1], gates.shape[2]), (T, B, 4 * H))
    _expect("out", (out.shape[0], out.shape[1], out.shape[2]), (B, T, H))
    cdef size_t need = fr_lstm_forward_work(B, I, H, nthreads)
    if work.shape[0] != 0 and <size_t>work.shape[0] < need:
        raise ValueError(f"work must have at least {need} elements "
                         f"(lstm_forward_work_len), got {work.shape[0]}")
    if T < 1 or B < 1 or H < 1:
        raise ValueError("T, B and H must be at least 1")
    cdef floating* pwork = &work[0] if work.shape[0] > 0 else NULL
    cdef const unsigned char* m = _mask_ptr(mask, T, B)
    cdef const floating* px = &x[0, 0, 0] if I > 0 else NULL
    cdef const floating* pW = &W[0, 0] if I > 0 else NULL
    cdef int rc
    with nogil:
        if floating is float:
            rc = fr_lstm_forward_f32(&_SBLAS, nthreads, training, batch_major, T, B, I, H,
                                     px, pW, &U[0, 0], &bias[0], m,
                                     &hs[0, 0, 0], &cs[0, 0, 0], &gates[0, 0, 0],
                                     &out[0, 0, 0], pwork)
        else:
            rc = fr_lstm_forward_f64(&_DBLAS, nthreads, training, batch_major, T, B, I, H,
                                     px, pW, &U[0, 0], &bias[0], m,
                                     &hs[0, 0, 0], &cs[0, 0, 0], &gates[0, 0, 0],
                                     &out[0, 0, 0], pwork)
    if rc:
        raise ValueError("fastrnn: lstm_forward rejected its sizes")


def lstm_backward(const floating[:, :, ::1] x, const floating[:, ::1] h0,
                  const floating[:, :, ::1] out, bint reverse, const floating[:, ::1] W,
                  const floating[:, ::1] U, const unsigned char[:, ::1] mask,
                  const floating[:, :, ::1] cs,
                  const floating[:, :, ::1] gates, const floating[:, :, ::1] d_out,
                  floating[:, ::1] dh, floating[:, ::1] dc, floating[:, :, ::1] dx,
                  floating[:, ::1] dW, floating[:, ::1] dU, floating[::1] db,
                  floating[:, :, ::1] dz, floating[:, ::1] work, floating[::1] pack,
                  floating[::1] xs, int nthreads):
    """x and dx batch-major (B, T, I); see csrc/fastrnn.h."""
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], I = x.shape[2], H = U.shape[0]
    _expect("W", (W.shape[0], W.shape[1]), (I, 4 * H))
    _expect("U", (U.shape[0], U.shape[1]), (H, 4 * H))
    _expect_saved(h0, out, B, T, H)
    _expect("cs", (cs.shape[0], cs.shape[1], cs.shape[2]), (T + 1, B, H))
    _expect("gates", (gates.shape[0], gates.shape[1], gates.shape[2]), (T, B, 4 * H))
    _expect("d_out", (d_out.shape[0], d_out.shape[1], d_out.shape[2]), (B, T, H))
    _expect("dh", (dh.shape[0], dh.shape[1]), (B, H))
    _expect("dc", (dc.shape[0], dc.shape[1]), (B, H))
    _expect("dx", (dx.shape[0], dx.shape[1], dx.shape[2]), (B, T, I))
    _expect("dW", (dW.shape[0], dW.shape[1]), (I, 4 * H))
    _expect("dU", (dU.shape[0], dU.shape[1]), (H, 4 * H))
    _expect("db", (db.shape[0],), (4 * H,))
    cdef Py_ssize_t Tc = dz.shape[0]
    _expect("dz", (dz.shape[0], dz.shape[1], dz.shape[2]), (Tc, B, 4 * H))
    _expect("work", (work.shape[0], work.shape[1]), (B, H))
    cdef size_t need = fr_lstm_backward_work(B, I, H, nthreads)
    if pack.shape[0] != 0 and <size_t>pack.shape[0] < need:
        raise ValueError(f"pack must have at least {need} elements "
                         f"(lstm_backward_work_len), got {pack.shape[0]}")
    if T < 1 or B < 1 or H < 1:
        raise ValueError("T, B and H must be at least 1")
    if Tc < 1 or Tc > T:
        raise ValueError(f"dz must hold 1 to T={T} steps, got {Tc}")
    cdef floating* pxs = _gather_scratch(xs, Tc, B, I, H)
    cdef floating* ppack = &pack[0] if pack.shape[0] > 0 else NULL
    cdef const unsigned char* m = _mask_ptr(mask, T, B)
    cdef const floating* px = &x[0, 0, 0] if I > 0 else NULL
    cdef const floating* pW = &W[0, 0] if I > 0 else NULL
    cdef floating* pdx = &dx[0, 0, 0] if I > 0 else NULL
    cdef floating* pdW = &dW[0, 0] if I > 0 else NULL
    cdef int rc
    with nogil:
        if floating is float:
            rc = fr_lstm_backward_f32(&_SBLAS, nthreads, reverse, T, Tc, B, I, H,
                                      px, pW, &U[0, 0], m, &h0[0, 0], &out[0, 0, 0],
                                      &cs[0, 0, 0],
                                      &gates[0, 0, 0], &d_out[0, 0, 0], &dh[0, 0],
                                      &dc[0, 0], pdx, pdW, &dU[0, 0], &db[0],
                                      &dz[0, 0, 0], &work[0, 0], ppack, pxs)
        else:
            rc = fr_lstm_backward_f64(&_DBLAS, nthreads, reverse, T, Tc, B, I, H,
                                      px, pW, &U[0, 0], m, &h0[0, 0], &out[0, 0, 0],
                                      &cs[0, 0, 0],
                                      &gates[0, 0, 0], &d_out[0, 0, 0], &dh[0, 0],
                                      &dc[0, 0], pdx, pdW, &dU[0, 0], &db[0],
                                      &dz[0, 0, 0], &work[0, 0], ppack, pxs)
    if rc:
        raise ValueError("fastrnn: lstm_backward rejected its sizes")


def rnn_forward(const floating[:, :, ::1] x, const floating[:, ::1] W,
                const floating[:, ::1] U, const floating[::1] bias,
                const unsigned char[:, ::1] mask, const floating[:, ::1] h0,
                floating[:, :, ::1] out, floating[::1] work, int act, int nthreads,
                bint batch_major=False):
    """x as for lstm_forward; h0 (B, H); out (B, T, H) the states after each
    step (see csrc/fastrnn.h)."""
    cdef Py_ssize_t T = x.shape[1 if batch_major else 0], B = x.shape[0 if batch_major else 1]
    cdef Py_ssize_t I = x.shape[2], H = U.shape[0]
    _expect("W", (W.shape[0], W.shape[1]), (I, H))
    _expect("U", (U.shape[0], U.shape[1]), (H, H))
    _expect("bias", (bias.shape[0],), (H,))
    _expect("h0", (h0.shape[0], h0.shape[1]), (B, H))
    _expect("out", (out.shape[0], out.shape[1], out.shape[2]), (B, T, H))
    if T < 1 or B < 1 or H < 1:
        raise ValueError("T, B and H must be at least 1")
    if act < 0 or act > 2:
        raise ValueError(f"act must be 0 (tanh), 1 (relu) or 2 (linear), got {act}")
    cdef floating* pwork = _scratch(work, "work", fr_rnn_work(B, I, H, nthreads))
    cdef const unsigned char* m = _mask_ptr(mask, T, B)
    cdef const floating* px = &x[0, 0, 0] if I > 0 else NULL
    cdef const floating* pW = &W[0, 0] if I > 0 else NULL
    cdef int rc
    with nogil:
        if floating is float:
            rc = fr_rnn_forward_f32(&_SBLAS, nthreads, act, batch_major, T, B, I, H,
                                    px, pW, &U[0, 0], &bias[0], m, &h0[0, 0],
                                    &out[0, 0, 0], pwork)
        else:
            rc = fr_rnn_forward_f64(&_DBLAS, nthreads, act, batch_major, T, B, I, H,
                                    px, pW, &U[0, 0], &bias[0], m, &h0[0, 0],
                                    &out[0, 0, 0], pwork)
    if rc:
        raise ValueError("fastrnn: rnn_forward rejected its sizes")


def rnn_backward(const floating[:, :, ::1] x, const floating[:, ::1] h0,
                 const floating[:, :, ::1] out, bint reverse, const floating[:, ::1] W,
                 const floating[:, ::1] U, const unsigned char[:, ::1] mask, int act,
                 const floating[:, :, ::1] d_out, floating[:, ::1] dh,
                 floating[:, :, ::1] dx, floating[:, ::1] dW, floating[:, ::1] dU,
                 floating[::1] db, floating[:, :, ::1] dz, floating[:, ::1] work, floating[::1] pack,
                 floating[::1] xs, int nthreads):
    """x and dx batch-major (B, T, I); see csrc/fastrnn.h."""
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], I = x.shape[2], H = U.shape[0]
    _expect("W", (W.shape[0], W.shape[1]), (I, H))
    _expect("U", (U.shape[0], U.shape[1]), (H, H))
    _expect_saved(h0, out, B, T, H)
    _expect("d_out", (d_out.shape[0], d_out.shape[1], d_out.shape[2]), (B, T, H))
    _expect("dh", (dh.shape[0], dh.shape[1]), (B, H))
    _expect("dx", (dx.shape[0], dx.shape[1], dx.shape[2]), (B, T, I))
    _expect("dW", (dW.shape[0], dW.shape[1]), (I, H))
    _expect("dU", (dU.shape[0], dU.shape[1]), (H, H))
    _expect("db", (db.shape[0],), (H,))
    cdef Py_ssize_t Tc = dz.shape[0]
    _expect("dz", (dz.shape[0], dz.shape[1], dz.shape[2]), (Tc, B, H))
    _expect("work", (work.shape[0], work.shape[1]), (B, H))
    if T < 1 or B < 1 or H < 1:
        raise ValueError("T, B and H must be at least 1")
    if Tc < 1 or Tc > T:
        raise ValueError(f"dz must hold 1 to T={T} steps, got {Tc}")
    if act < 0 or act > 2:
        raise ValueError(f"act must be 0 (tanh), 1 (relu) or 2 (linear), got {act}")
    cdef floating* pxs = _gather_scratch(xs, Tc, B, I, H)
    cdef floating* ppack = _scratch(pack, "pack", fr_rnn_work(B, I, H, nthreads))
    cdef const unsigned char* m = _mask_ptr(mask, T, B)
    cdef const floating* px = &x[0, 0, 0] if I > 0 else NULL
    cdef const floating* pW = &W[0, 0] if I > 0 else NULL
    cdef floating* pdx = &dx[0, 0, 0] if I > 0 else NULL
    cdef floating* pdW = &dW[0, 0] if I > 0 else NULL
    cdef int rc
    with nogil:
        if floating is float:
            rc = fr_rnn_backward_f32(&_SBLAS, nthreads, act, reverse, T, Tc, B, I, H,
                                     px, pW, &U[0, 0], m, &h0[0, 0], &out[0, 0, 0],
                                     &d_out[0, 0, 0],
                                     &dh[0, 0], pdx, pdW, &dU[0, 0], &db[0],
                                     &dz[0, 0, 0], &work[0, 0], ppack, pxs)
        else:
            rc = fr_rnn_backward_f64(&_DBLAS, nthreads, act, reverse, T, Tc, B, I, H,
                                     px, pW, &U[0, 0], m, &h0[0, 0], &out[0, 0, 0],
                                     &d_out[0, 0, 0],
                                     &dh[0, 0], pdx, pdW, &dU[0, 0], &db[0],
                                     &dz[0, 0, 0], &work[0, 0], ppack, pxs)
    if rc:
        raise ValueError("fastrnn: rnn_backward rejected its sizes")

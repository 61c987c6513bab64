/*
 * fastrnn: fused tanh-RNN and LSTM kernels (forward and BPTT backward).
 *
 * Every entry point works on caller-allocated, C-contiguous buffers in
 * time-major *reading order* unless noted (the caller reverses the time axis
 * for go_backwards; the backward passes take x and dx batch-major instead,
 * the forward passes may take x batch-major (batch_major) and write the
 * outputs batch-major), with Keras's weight layout:
 *
 *   T, B, I, H   time steps, batch rows, input features, hidden units
 *                (T, B, H >= 1; I >= 0)
 *   x     (T, B, I)       inputs
 *   W     (I, G*H)        kernel; LSTM gate blocks i, f, c, o (G = 4); RNN G = 1
 *   U     (H, G*H)        recurrent kernel
 *   bias  (G*H)           bias (zeros when the layer has none)
 *   mask  (T, B) uint8    nonzero = row b takes step t; NULL = no mask.
 *                         A masked row carries its state over unchanged.
 *   out   (B, T, H)       the outputs, batch-major in reading order: out[:, t]
 *                         is h after step t (masked rows: the state they
 *                         carry).  The states h are kept only there: the
 *                         backward passes read h_{t-1} from out and h0.
 *
 * BLAS is passed in as function pointers (the caller hands in SciPy's
 * ?gemm/?gemv from scipy.linalg.cython_blas), so nothing else is linked.
 * Functions return 0 on success, nonzero on bad arguments.  They are safe
 * to call from several threads at once: one call at a time gets the thread
 * team, the others run on their caller's thread.
 */
#ifndef FASTRNN_H
#define FASTRNN_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*fr_sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                            float *alpha, float *a, int *lda, float *b, int *ldb,
                            float *beta, float *c, int *ldc);
typedef void (*fr_dgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                            double *alpha, double *a, int *lda, double *b, int *ldb,
                            double *beta, double *c, int *ldc);

typedef void (*fr_sgemv_fn)(char *trans, int *m, int *n, float *alpha, float *a,
                            int *lda, float *x, int *incx, float *beta, float *y,
                            int *incy);
typedef void (*fr_dgemv_fn)(char *trans, int *m, int *n, double *alpha, double *a,
                            int *lda, double *x, int *incx, double *beta, double *y,
                            int *incy);

/* The BLAS routines the kernels call (Fortran calling convention). */
typedef struct { fr_sgemm_fn gemm; fr_sgemv_fn gemv; } fr_sblas;
typedef struct { fr_dgemm_fn gemm; fr_dgemv_fn gemv; } fr_dblas;

enum { FR_ACT_TANH = 0, FR_ACT_RELU = 1, FR_ACT_LINEAR = 2 };

/*
 * LSTM forward.
 *   batch_major  nonzero: x is (B, T, I), batch-major, read forwards (no
 *          time-major copy needed); zero: x is (T, B, I) in reading order.
 *   hs     (2, B, H): hs[0] = h0 on entry; h after step t is in
 *          hs[(t+1) % 2] (and in out[:, t])
 *   cs     (T+1, B, H) when training, else (2, B, H): cs[0] = c0 on entry;
 *          the cell state after step t is in cs[t+1] (training) or
 *          cs[(t+1) % 2] (inference).
 *   out    (B, T, H)  the outputs (see above)
 *   gates  (T, B, 4H) scratch; when training, holds on exit the activated
 *          gates i, f, g, o that lstm_backward needs.
 *   work   fr_lstm_forward_work(B, I, H, nthreads) scratch, or NULL: the
 *          threads' packed copies of their columns of U and one step's h U
 *          (float32, or batch 1 with several threads) and, in float32 from
 *          8 rows on, of their columns of W for the input projection.  With
 *          NULL, BLAS multiplies by U and W as they are (slower).
 *   nthreads  threads of the team (fr_pool.h) that split the hidden units;
 *          1 runs on the caller's thread only.
 */
int fr_lstm_forward_f32(const fr_sblas *blas, int nthreads, int training,
                        int batch_major, int T, int B, int I, int H,
                        const float *x, const float *W, const float *U,
                        const float *bias, const unsigned char *mask,
                        float *hs, float *cs, float *gates, float *out, float *work);
int fr_lstm_forward_f64(const fr_dblas *blas, int nthreads, int training,
                        int batch_major, int T, int B, int I, int H,
                        const double *x, const double *W, const double *U,
                        const double *bias, const unsigned char *mask,
                        double *hs, double *cs, double *gates, double *out,
                        double *work);

/*
 * LSTM backward (BPTT), from the forward's outputs, cell states cs
 * (T+1, B, H) and activated gates (T, B, 4H).  The time loop runs in chunks of Tc steps
 * (1 <= Tc <= T) from the end; after each chunk, that chunk's share of dx,
 * dW, dU and db is computed by GEMMs over its Tc*B rows, so the
 * pre-activation gradients are kept for one chunk only.  Unlike the rest,
 * x and dx are batch-major, in the caller's time order (no time-major
 * copies of them are made: a chunk's rows are gathered into xs).
 *   reverse  nonzero when the forward read the sequence from its end
 *          (go_backwards): reading-order step t is x[:, T-1-t]
 *   x      (B, T, I)   the forward's inputs, batch-major
 *   h0     (B, H)      the forward's initial state
 *   out    (B, T, H)   the forward's outputs, where they may have been
 *                      zeroed before a row's first unmasked step (Keras's
 *                      rule for masked sequences): h_{t-1} is read from
 *                      out[:, t-1], or from h0 up to that first step
 *   d_out  (B, T, H)   gradient w.r.t. the outputs out, batch-major in
 *                      reading order (the caller has folded in Keras's
 *                      zero-output-before-first-step rule)
 *   dh, dc (B, H)      in: gradient w.r.t. the final h and c;
 *                      out: gradient w.r.t. h0 and c0
 *   dx (B, T, I), dW (I, 4H), dU (H, 4H), db (4H)   outputs (dx batch-major,
 *                      like x)
 *   dz     (Tc, B, 4H) scratch: one chunk's pre-activation gradients
 *   work   (B, H)      scratch
 *   pack   fr_lstm_backward_work(B, I, H, nthreads) scratch, or NULL:
 *          float32, the threads' packed (transposed) rows of U for dz U^T
 *          and, from 8 rows on, W^T packed for dx = dz W^T
 *   xs     Tc * B * (2 * I + H) scratch: one chunk's rows of x, of dx
 *          and of h_{t-1}
 */
int fr_lstm_backward_f32(const fr_sblas *blas, int nthreads, int reverse, int T, int Tc,
                         int B, int I, int H, const float *x, const float *W,
                         const float *U, const unsigned char *mask, const float *h0,
                         const float *out, const float *cs, const float *gates,
                         const float *d_out,
                         float *dh, float *dc, float *dx, float *dW, float *dU,
                         float *db, float *dz, float *work, float *pack, float *xs);
int fr_lstm_backward_f64(const fr_dblas *blas, int nthreads, int reverse, int T, int Tc,
                         int B, int I, int H, const double *x, const double *W,
                         const double *U, const unsigned char *mask, const double *h0,
                         const double *out, const double *cs, const double *gates,
                         const double *d_out,
                         double *dh, double *dc, double *dx, double *dW, double *dU,
                         double *db, double *dz, double *work, double *pack, double *xs);

/*
 * Simple RNN forward: h_t = act(x[t] W + h_{t-1} U + bias).
 *   batch_major  as for the LSTM
 *   h0   (B, H) the initial state
 *   out  (B, T, H): the outputs h_t, batch-major (as the LSTM's); it also
 *        holds the pre-activations while they are computed (no other
 *        buffer)
 *   work fr_rnn_work(B, I, H, nthreads) scratch, or NULL: float32, the
 *        threads' packed columns of U and, from 8 rows on, of W (with NULL,
 *        BLAS on U and W as they are)
 *   act  FR_ACT_TANH, FR_ACT_RELU or FR_ACT_LINEAR
 */
int fr_rnn_forward_f32(const fr_sblas *blas, int nthreads, int act, int batch_major,
                       int T, int B, int I, int H,
                       const float *x, const float *W, const float *U,
                       const float *bias, const unsigned char *mask,
                       const float *h0, float *out, float *work);
int fr_rnn_forward_f64(const fr_dblas *blas, int nthreads, int act, int batch_major,
                       int T, int B, int I, int H,
                       const double *x, const double *W, const double *U,
                       const double *bias, const unsigned char *mask,
                       const double *h0, double *out, double *work);

/*
 * Simple RNN backward, with the activation's derivative taken from the saved
 * outputs.  Arguments as for the LSTM (x and dx batch-major, reverse, h0,
 * out, xs), without the cell state; dz is (Tc, B, H); pack is
 * fr_rnn_work(B, I, H, nthreads) long, or NULL.
 */
int fr_rnn_backward_f32(const fr_sblas *blas, int nthreads, int act, int reverse, int T,
                        int Tc, int B, int I, int H, const float *x, const float *W,
                        const float *U, const unsigned char *mask, const float *h0,
                        const float *out, const float *d_out, float *dh, float *dx,
                        float *dW, float *dU, float *db, float *dz, float *work,
                        float *pack, float *xs);
int fr_rnn_backward_f64(const fr_dblas *blas, int nthreads, int act, int reverse, int T,
                        int Tc, int B, int I, int H, const double *x, const double *W,
                        const double *U, const unsigned char *mask, const double *h0,
                        const double *out, const double *d_out, double *dh, double *dx,
                        double *dW, double *dU, double *db, double *dz, double *work,
                        double *pack, double *xs);

/* How the kernels were built: the compiler; 1 if the kernels can run on a
 * team of threads (POSIX threads), 0 if they always run on the caller's. */
const char *fr_compiler(void);
int fr_has_threads(void);

/* The lengths of fr_lstm_forward's work and fr_lstm_backward's pack
 * buffers, in elements. */
size_t fr_lstm_forward_work(int B, int I, int H, int nthreads);
size_t fr_lstm_backward_work(int B, int I, int H, int nthreads);
size_t fr_rnn_work(int B, int I, int H, int nthreads);   /* the RNN's work and pack */

/* Give the kernels' worker threads a function that sets the calling thread's
 * BLAS thread count (OpenBLAS's openblas_set_num_threads_local): each worker
 * calls it with 1, so BLAS inside a team stays single-threaded.  The caller
 * sets its own thread's count. */
void fr_set_blas_threads_fn(int (*fn)(int));

/* The team a kernel call with nthreads threads, B rows and H units gets:
 * returns its size; *rows = 1 if it splits batch rows, 0 if hidden units
 * (when the pool is free and not backing off). */
int fr_team_plan(int nthreads, int B, int H, int *rows);

/* The same for a forward pass with G gate blocks (4 LSTM, 1 RNN), whose
 * row split also covers small steps by width G*H (see rnn_kernels.c). */
int fr_forward_team_plan(int nthreads, int G, int B, int H, int *rows);

/* The thread team's counters: calls run by a team, team calls that stalled
 * (threads asleep > 1/3 of the call: oversubscribed cores), and calls run
 * on the caller's thread alone during the back-off that follows a stall
 * (unit-split calls only: see fr_pool_run_flexible). */
void fr_team_stats(long *team_calls, long *stalled_calls, long *backoff_calls);

/* Workers that skipped a row-split call because they started after the
 * other threads had done all of its work (row-split calls never wait for a
 * late worker).  And, for tests: make workers start each call us
 * microseconds late. */
long fr_team_skipped_workers(void);
void fr_team_set_worker_delay_us(long us);

/* Wake the team's sleeping workers for a call about to come (a caller's
 * preparing overlaps their wake-up; see fr_pool_prime), and the number of
 * such wake-ups sent so far. */
void fr_team_prime(void);
long fr_team_primes(void);

#ifdef __cplusplus
}
#endif
#endif /* FASTRNN_H */

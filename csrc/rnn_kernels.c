/*
 * fastrnn's C kernels: see fastrnn.h for the contract.  The bodies live in
 * rnn_kernels_impl.h and are instantiated here for float and double.
 *
 * float uses a vectorisable exp (Cephes-style: range reduction, a degree-6
 * polynomial, 2^n through the exponent bits; about 1 ulp) and tanh built on
 * it, so that the gate pass compiles to SIMD code; double, used for gradient
 * checks, uses libm.  NaN propagates through both.
 */
#include <math.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "fastrnn.h"
#include "fr_pool.h"

/* The gate passes are compiled for AVX-512, AVX2 and baseline x86-64 and the
 * best one is picked at load time (GCC function multi-versioning). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(FASTRNN_NO_MULTIVERSION)
#define FR_VECTORIZE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FR_VECTORIZE
#endif

/* --- threading: each kernel is one job for the team of fr_pool.h --- */
#define FR_CHUNK 16    /* unit slices are multiples of one AVX-512 vector */
#define FR_NR_ALL 32   /* padding per thread in the forward's work buffer */

/* Part tid of n of [0, n_items), cut at multiples of align. */
static void fr_split(int n_items, int align, int tid, int n, int *lo, int *hi)
{
    long chunks = ((long)n_items + align - 1) / align;
    long a = chunks * tid / n * align, b = chunks * (tid + 1) / n * align;
    *lo = (int)(a < n_items ? a : n_items);
    *hi = (int)(b < n_items ? b : n_items);
}

/* How a team splits a kernel.  Each thread owns a slice of the hidden units
 * (whole FR_CHUNKs): per step it multiplies by its own columns of U, which
 * stay in its core's cache, and the team meets once per step.  When there
 * are more threads than chunks of units and enough batch rows, the batch
 * rows are split instead: blocks of rows (up to 4 per thread) that run the
 * whole time loop (rows never interact), claimed one at a time by
 * whichever threads are running, so a thread that starts late (asleep,
 * descheduled) leaves its share to the others instead of holding them up
 * (fr_pool_run_flexible); the other phases (input projection, each
 * backward chunk's weight gradients) are claimed in pieces the same way.
 * The rows are split too for small layers (H <= FR_SMALL_H), where a step
 * is too little work per thread to be worth a meeting.
 * FASTRNN_SPLIT=units|rows forces one (for measurements). */
#define FR_MIN_ROWS 4    /* fewest batch rows per thread, and per block, in the row split */
#define FR_SMALL_H 64    /* up to this many units, every thread can keep all of U
                          * in cache, and the row split measured as fast or
                          * faster (and meets its team less often) */

static int fr_forced_split(void)
{
    static int forced = -1;      /* 0 units, 1 rows, 2 automatic */
    if (forced < 0) {
        const char *e = getenv("FASTRNN_SPLIT");
        forced = e && !strcmp(e, "units") ? 0 : e && !strcmp(e, "rows") ? 1 : 2;
    }
    return forced;
}

static int fr_unit_chunks(int H)
{
    return (H + FR_CHUNK - 1) / FR_CHUNK;
}

/* Whether a team of n splits the rows (else the units): when there are more
 * threads than chunks of units, or at most small_h units, and enough rows. */
static int fr_split_rows_upto(int B, int H, int n, int small_h)
{
    if (n <= 1)
        return 0;
    int forced = fr_forced_split();
    if (forced < 2)
        return forced && B >= n;
    return (n > fr_unit_chunks(H) || H <= small_h) && B >= n * FR_MIN_ROWS;
}

static int fr_split_rows(int B, int H, int n)
{
    return fr_split_rows_upto(B, H, n, FR_SMALL_H);
}

/* The forward's choice, with the small-layer bound on a step's width G*H:
 * an RNN step (G = 1) is a quarter of an LSTM step of the same H, so the
 * row split pays up to 4*FR_SMALL_H units there (ops, SimpleRNN forward,
 * 2 threads, units / rows, ms: 8x100x64x128 0.16-0.18 / 0.15,
 * 16x100x64x128 0.29 / 0.25-0.27, 32x100x64x128 0.52-0.55 / 0.50,
 * 64x50x128x256 1.54-1.57 / 1.46-1.50, 32x100x128x256 1.52 / 1.54-1.55).
 * The backward keeps fr_split_rows: its row split measured slower there
 * (SimpleRNN 32x100x64x128 fwd+bwd 1.73-1.85 / 2.16-2.23). */
static int fr_forward_split_rows(int B, int G, int H, int n)
{
    return fr_split_rows_upto(B, H, n, 4 * FR_SMALL_H / G);
}

/* Work items for a flexible (row split) job on n threads: up to 4 per
 * thread, so that a thread that starts late leaves its share to the
 * others, each at least min_items of the items long. */
static int fr_pieces(int items, int min_items, int n)
{
    int k = 4 * n, most = items / min_items;
    if (k > most)
        k = most;
    return k < 1 ? 1 : k;
}

/* Threads for a kernel: the caller's choice (fastrnn/_backend.py decides
 * when threads pay), at most one per chunk of units or, in the row split,
 * one per FR_MIN_ROWS rows. */
static int fr_team(int nthreads, int B, int H)
{
    if (nthreads <= 1)
        return 1;
    if (fr_split_rows(B, H, nthreads))
        return nthreads;
    int most = fr_unit_chunks(H);
    if (fr_forced_split() == 1)
        most = B;
    return nthreads < most ? nthreads : most;
}

/* The gate passes' streams never overlap (distinct buffers, or distinct gate
 * blocks of one row): tell the vectoriser not to version the loops. */
#if defined(__GNUC__) && !defined(__clang__)
#define FR_IVDEP _Pragma("GCC ivdep")
#else
#define FR_IVDEP
#endif

/* x = n ln 2 + r (x within [-87, 88], or NaN): returns e^r - 1 (Cephes
 * expf's degree-6 polynomial, without its leading 1) and sets *scale = 2^n. */
static inline float fr_exp_reduced(float x, float *scale)
{
    /* n = round(x / ln 2), exactly, without libm */
    float fn = x * 1.44269504088896341f + 12582912.0f;
    fn -= 12582912.0f;
    float r = x - fn * 0.693359375f;
    r = r + fn * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    int32_t bits = ((int32_t)fn + 127) << 23;
    memcpy(scale, &bits, sizeof *scale);
    return p * r * r + r;
}

static inline float fr_expf(float x)
{
    /* clamp to the finite range; comparisons leave NaN untouched */
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
    float scale, em1 = fr_exp_reduced(x, &scale);
    return (em1 + 1.0f) * scale;
}

static inline float fr_sigmoidf(float x)
{
    return 1.0f / (1.0f + fr_expf(-x));
}

/* e^x - 1 for x <= 0 (and NaN), accurate also near 0: 2^n (e^r - 1) +
 * (2^n - 1) (for n = 0, the polynomial alone). */
static inline float fr_expm1f_neg(float x)
{
    x = x < -87.0f ? -87.0f : x;
    float scale, em1 = fr_exp_reduced(x, &scale);
    return scale * em1 + (scale - 1.0f);
}

/* tanh x = -m / (2 + m) with m = e^(-2|x|) - 1, the sign of x restored:
 * one exponential and one division, no branch (within 2.5 ulp of tanh
 * over [-10, 10] and at tiny |x|, where m keeps its relative accuracy;
 * NaN stays NaN). */
static inline float fr_tanhf(float x)
{
    float ax = x < 0 ? -x : x;
    float m = fr_expm1f_neg(-2.0f * ax);
    float t = -m / (2.0f + m);
    return x < 0 ? -t : t;
}

static inline double fr_sigmoid(double x)
{
    return 1.0 / (1.0 + exp(-x));
}


/* ---------------------------------------------- float32 packed GEMM --- */
/* The LSTM forward's per-step product h U for a thread's units, on weights
 * packed once per call: OpenBLAS packs its operand again on every call,
 * which for one step's small product (B rows) is as much memory traffic as
 * the product itself, and more than a core's L2 holds for large H.  U's
 * columns are packed in panels of FR_NR, each K x FR_NR contiguous (so one
 * step streams each panel once, from L2 where it fits), and a register-
 * blocked kernel of FR_MR rows x FR_NR columns multiplies them.  GCC vector
 * types: 16 floats, compiled for AVX-512, AVX2 and baseline x86-64. */
typedef float fr_v16 __attribute__((vector_size(64)));
#define FR_NR FR_NR_ALL   /* panel width: two vectors */
#define FR_MR 8     /* rows per register block: 16 accumulators */
#ifndef FR_PANEL_MIN_ROWS
#define FR_PANEL_MIN_ROWS 1   /* fewest rows the packed product is used for */
#endif
#define FR_KU 4     /* k steps at once in the one-row product: 8 accumulators */

static int fr_panels(int n)
{
    return (n + FR_NR - 1) / FR_NR;
}

/* Pack the G gate blocks' columns [j0, j0 + w) of U (K x G*H, row-major)
 * as the n = G*w columns q*w + u (gate q, unit j0 + u), in panels; padding
 * columns are zero. */
static void fr_pack_panels(int K, int H, int G, int j0, int w, const float *U,
                           float *panels)
{
    const int n = G * w, np = fr_panels(n);
    for (int p = 0; p < np; p++)
        for (int k = 0; k < K; k++)
            for (int c = n - p * FR_NR; c < FR_NR; c++)
                if (c >= 0)
                    panels[((size_t)p * K + k) * FR_NR + c] = 0;
    for (int k = 0; k < K; k++)
        for (int q = 0; q < G; q++) {
            const float *src = U + (size_t)k * G * H + (size_t)q * H + j0;
            /* columns q*w .. q*w + w - 1, in runs that stay in one panel */
            for (int u = 0, run; u < w; u += run) {
                const int j = q * w + u;
                run = FR_NR - j % FR_NR;
                run = run < w - u ? run : w - u;
                memcpy(panels + ((size_t)(j / FR_NR) * K + k) * FR_NR + j % FR_NR,
                       src + u, (size_t)run * sizeof(float));
            }
        }
}

/* Pack the transpose of U's rows [j0, j0 + w) (U: w rows of K, row-major,
 * from row j0) as the K x w matrix of columns u = U[j0 + u, :], in panels;
 * padding columns are zero.  (The backward pass's product dz U^T.) */
static void fr_pack_t_panels(int K, int j0, int w, const float *U, float *panels)
{
    const int np = fr_panels(w);
    for (int p = 0; p < np; p++)
        for (int k = 0; k < K; k++)
            for (int c = w - p * FR_NR; c < FR_NR; c++)
                if (c >= 0)
                    panels[((size_t)p * K + k) * FR_NR + c] = 0;
    for (int u = 0; u < w; u++) {
        const float *row = U + (size_t)(j0 + u) * K;
        float *dst = panels + (size_t)(u / FR_NR) * K * FR_NR + u % FR_NR;
        for (int k = 0; k < K; k++)
            dst[(size_t)k * FR_NR] = row[k];
    }
}

/* C rows [0, R) (row stride ldc) = A's rows (stride lda, K long) times one
 * panel (K x FR_NR), with KU k-steps in flight: R * 2 * KU accumulators in
 * registers (R and KU are constants once inlined: R = 8, 4, 2, 1 with KU =
 * 1, 1, 2, 4, so that the narrow tiles still cover the multiply-add
 * latency).  TA (a constant too): A is given transposed, row r of A is
 * column r of a (a: K rows, lda apart), as in the weight gradients x^T dz;
 * ACC: C += the product instead of C = the product. */
static inline __attribute__((always_inline)) void
fr_panel_tile_ta(int R, int KU, int TA, int ACC, int K, const float *restrict a,
                 int lda, const float *restrict B, float *restrict C, int ldc)
{
    fr_v16 acc[2 * FR_MR];   /* (r, half, u): R * 2 * KU <= 16 */
    size_t off[FR_MR];       /* the rows' offsets, independent of one another */
    const size_t ks = TA ? (size_t)lda : 1;   /* from one k-step to the next */
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        off[r] = TA ? (size_t)r : (size_t)r * lda;
#pragma GCC unroll 16
    for (int v = 0; v < 2 * R * KU; v++)
        acc[v] = (fr_v16){0};
    const int kmain = K - K % KU;
    for (int k = 0; k < kmain; k += KU) {
        const float *ak = a + (size_t)k * ks;
#pragma GCC unroll 4
        for (int u = 0; u < KU; u++) {
            fr_v16 b0, b1;
            memcpy(&b0, B + (size_t)(k + u) * FR_NR, sizeof b0);
            memcpy(&b1, B + (size_t)(k + u) * FR_NR + 16, sizeof b1);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                float av = ak[off[r] + u * ks];
                acc[(2 * r) * KU + u] += av * b0;
                acc[(2 * r + 1) * KU + u] += av * b1;
            }
        }
    }
    for (int k = kmain; k < K; k++) {
        fr_v16 b0, b1;
        memcpy(&b0, B + (size_t)k * FR_NR, sizeof b0);
        memcpy(&b1, B + (size_t)k * FR_NR + 16, sizeof b1);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            float av = a[off[r] + k * ks];
            acc[(2 * r) * KU] += av * b0;
            acc[(2 * r + 1) * KU] += av * b1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            fr_v16 sum = acc[(2 * r + h) * KU];
#pragma GCC unroll 4
            for (int u = 1; u < KU; u++)
                sum += acc[(2 * r + h) * KU + u];
            if (ACC) {
                fr_v16 old;
                memcpy(&old, C + (size_t)r * ldc + 16 * h, sizeof old);
                sum += old;
            }
            memcpy(C + (size_t)r * ldc + 16 * h, &sum, sizeof sum);
        }
}

static inline __attribute__((always_inline)) void
fr_panel_tile(int R, int KU, int K, const float *restrict a, int lda,
              const float *restrict B, float *restrict C, int ldc)
{
    fr_panel_tile_ta(R, KU, 0, 0, K, a, lda, B, C, ldc);
}

/* C (M x FR_NR*np, row stride ldc) = A (M x K, row stride lda) * panels:
 * per panel, tiles of 8 rows, then 4, 2 and 1 for the rest (at batch 1 a
 * matrix-vector product, bound by streaming the panels). */
FR_VECTORIZE
static void fr_sgemm_panels(int M, int K, int np, const float *restrict A, int lda,
                            const float *restrict panels, float *restrict C, int ldc)
{
    for (int p = 0; p < np; p++) {
        const float *B = panels + (size_t)p * K * FR_NR;
        float *Cp = C + (size_t)p * FR_NR;
        int r = 0;
        for (; r + FR_MR <= M; r += FR_MR)
            fr_panel_tile(FR_MR, 1, K, A + (size_t)r * lda, lda, B, Cp + (size_t)r * ldc, ldc);
        if (r + 4 <= M) {
            fr_panel_tile(4, 1, K, A + (size_t)r * lda, lda, B, Cp + (size_t)r * ldc, ldc);
            r += 4;
        }
        if (r + 2 <= M) {
            fr_panel_tile(2, 2, K, A + (size_t)r * lda, lda, B, Cp + (size_t)r * ldc, ldc);
            r += 2;
        }
        if (r < M)
            fr_panel_tile(1, FR_KU, K, A + (size_t)r * lda, lda, B, Cp + (size_t)r * ldc, ldc);
    }
}

/* C rows [0, M) (row stride ldc, nc <= FR_NR columns) = A^T panel, or +=
 * when add: A is kk x M (rows lda apart), the panel kk x FR_NR; tiles of
 * 8, 4, 2, 1 rows that read A transposed (fr_panel_tile_ta).  Always
 * inlined, so that it is compiled for each target of its caller's clones. */
static inline __attribute__((always_inline)) void fr_tn_rows(int M, int kk, const float *restrict A, int lda,
                              const float *restrict panel, int nc, int add,
                              float *restrict C, int ldc, float *restrict tmp)
{
    int m = 0;
    if (nc == FR_NR) {   /* whole panels: straight into C */
        for (; m + FR_MR <= M; m += FR_MR) {
            if (add)
                fr_panel_tile_ta(FR_MR, 1, 1, 1, kk, A + m, lda, panel,
                                 C + (size_t)m * ldc, ldc);
            else
                fr_panel_tile_ta(FR_MR, 1, 1, 0, kk, A + m, lda, panel,
                                 C + (size_t)m * ldc, ldc);
        }
    }
    /* the rest (and every row of a partial panel) through tmp */
    for (; m < M;) {
        const int r = M - m >= FR_MR ? FR_MR : M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
        if (r == FR_MR)
            fr_panel_tile_ta(FR_MR, 1, 1, 0, kk, A + m, lda, panel, tmp, FR_NR);
        else if (r == 4)
            fr_panel_tile_ta(4, 1, 1, 0, kk, A + m, lda, panel, tmp, FR_NR);
        else if (r == 2)
            fr_panel_tile_ta(2, 2, 1, 0, kk, A + m, lda, panel, tmp, FR_NR);
        else
            fr_panel_tile_ta(1, FR_KU, 1, 0, kk, A + m, lda, panel, tmp, FR_NR);
        for (int i = 0; i < r; i++) {
            float *row = C + (size_t)(m + i) * ldc;
            const float *t = tmp + (size_t)i * FR_NR;
            if (add)
                for (int c = 0; c < nc; c++)
                    row[c] += t[c];
            else
                memcpy(row, t, (size_t)nc * sizeof(float));
        }
        m += r;
    }
}

/* The weight gradients of a chunk of K (t, b) rows, for a thread's n
 * columns: C1 = A1^T Bm (M1 x n), C2 = A2^T Bm (M2 x n) and the column sums
 * of Bm into s (n), or all three added to when acc.  A1 is K x M1, A2 K x
 * M2, Bm K x n (rows lda1, lda2, ldb apart); C1 and C2 have row stride ldc.
 * The backward's dW = x^T dz, dU = h^T dz and db = sum dz: blocks of
 * FR_TN_KB rows of dz are packed, a panel at a time, into a buffer on the
 * stack (summing its columns on the way), once for both products; every
 * row of C1 and C2 is multiplied by it (fr_tn_rows).  No BLAS call (whose
 * speed on these machines depends on OPENBLAS_CORETYPE) and no scratch
 * from the caller.  M1 may be 0 (no input: dW is empty). */
#define FR_TN_KB 128
FR_VECTORIZE
static void fr_sgemm_tn2(int M1, const float *restrict A1, int lda1,
                         int M2, const float *restrict A2, int lda2,
                         int K, int n, const float *restrict Bm, int ldb,
                         float *restrict C1, float *restrict C2, int ldc,
                         float *restrict s, int acc)
{
    float panel[FR_TN_KB * FR_NR] __attribute__((aligned(64)));
    float tmp[FR_MR * FR_NR] __attribute__((aligned(64)));
    if (!acc)
        memset(s, 0, (size_t)n * sizeof(float));
    if (K <= 0) {   /* an empty sum */
        for (int m = 0; m < M1 && !acc; m++)
            memset(C1 + (size_t)m * ldc, 0, (size_t)n * sizeof(float));
        for (int m = 0; m < M2 && !acc; m++)
            memset(C2 + (size_t)m * ldc, 0, (size_t)n * sizeof(float));
        return;
    }
    for (int kb = 0; kb < K; kb += FR_TN_KB) {
        const int kk = K - kb < FR_TN_KB ? K - kb : FR_TN_KB;
        const int add = acc || kb > 0;
        for (int c0 = 0; c0 < n; c0 += FR_NR) {
            const int nc = n - c0 < FR_NR ? n - c0 : FR_NR;
            float sum[FR_NR] __attribute__((aligned(64))) = {0};
            for (int k = 0; k < kk; k++) {
                const float *restrict src = Bm + (size_t)(kb + k) * ldb + c0;
                float *restrict dst = panel + (size_t)k * FR_NR;
                if (nc == FR_NR) {
                    for (int c = 0; c < FR_NR; c++) {
                        dst[c] = src[c];
                        sum[c] += src[c];
                    }
                } else {
                    for (int c = 0; c < nc; c++) {
                        dst[c] = src[c];
                        sum[c] += src[c];
                    }
                    for (int c = nc; c < FR_NR; c++)
                        dst[c] = 0;
                }
            }
            for (int c = 0; c < nc; c++)
                s[c0 + c] += sum[c];
            if (M1 > 0)
                fr_tn_rows(M1, kk, A1 + (size_t)kb * lda1, lda1, panel, nc, add,
                           C1 + c0, ldc, tmp);
            fr_tn_rows(M2, kk, A2 + (size_t)kb * lda2, lda2, panel, nc, add,
                       C2 + c0, ldc, tmp);
        }
    }
}

/* The input projection x W on W's columns packed in panels (float32, at
 * least FR_PROJ_MIN_B batch rows; fewer use BLAS and no extra scratch): the
 * same register-blocked product as the steps', which needs no packing of x
 * and, unlike OpenBLAS, keeps its packed W for the whole call.  The same
 * tile (the numba backend's copy) ran 3200x256 x 256x512 and 1600x128 x
 * 128x1024 products at 245-255 GFLOP/s on one thread, OpenBLAS at 205-220
 * (115-120 with OPENBLAS_CORETYPE=Haswell, which this project's machines
 * set); ops[cython] LSTM 64x50x256x256 fwd 9.4-9.6 -> 8.8-9.4 ms. */
#define FR_PROJ_MIN_B 8
#define FR_PROJ_ROWS 64   /* rows of x per block: every panel passes over it in cache */

/* The M rows of z (row stride ldz, rows of G*H) = x (M rows of K,
 * contiguous) times the n = G*w columns packed by fr_pack_panels(K, H, G,
 * j0, w, W, panels): packed column q*w + u lands in z's column q*H + j0 + u.
 * A panel whose columns are one run of one gate block is stored in place,
 * others through tmp. */
static void fr_project_panels(int M, int K, int H, int G, int j0, int w,
                              const float *x, const float *panels, float *z,
                              size_t ldz)
{
    const int n = G * w, np = fr_panels(n);
    float tmp[FR_PROJ_ROWS * FR_NR] __attribute__((aligned(64)));
    for (int rb = 0; rb < M; rb += FR_PROJ_ROWS) {
        const int m = M - rb < FR_PROJ_ROWS ? M - rb : FR_PROJ_ROWS;
        const float *A = x + (size_t)rb * K;
        float *zb = z + (size_t)rb * ldz;
        for (int p = 0; p < np; p++) {
            const float *P = panels + (size_t)p * K * FR_NR;
            const int c0 = p * FR_NR, q = c0 / w, u = c0 - q * w;
            if (u + FR_NR <= w) {
                fr_sgemm_panels(m, K, 1, A, K, P, zb + (size_t)q * H + j0 + u, (int)ldz);
                continue;
            }
            fr_sgemm_panels(m, K, 1, A, K, P, tmp, FR_NR);
            for (int c = 0; c < FR_NR && c0 + c < n; c++) {
                const int qq = (c0 + c) / w, uu = c0 + c - qq * w;
                float *col = zb + (size_t)qq * H + j0 + uu;
                for (int r = 0; r < m; r++)
                    col[(size_t)r * ldz] = tmp[r * FR_NR + c];
            }
        }
    }
}

/* Scratch sizes (defined at the end): whether a backward call's pack holds
 * W^T packed for dx. */
static size_t fr_forward_work(int G, int B, int I, int H, int nthreads);
static int fr_backward_packs_wt(int G, int B, int I, int H, int nthreads);

#define FR_F32 1
#define REAL float
#define SUF f32
#define BLAS_T fr_sblas
#define SIGMOID(v) fr_sigmoidf(v)
#define TANH(v) fr_tanhf(v)
#include "rnn_kernels_impl.h"
#undef REAL
#undef SUF
#undef BLAS_T
#undef SIGMOID
#undef TANH

#undef FR_F32
#define REAL double
#define SUF f64
#define BLAS_T fr_dblas
#define SIGMOID(v) fr_sigmoid(v)
#define TANH(v) tanh(v)
#include "rnn_kernels_impl.h"

const char *fr_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
    return "msvc";
#else
    return "unknown";
#endif
}

/* The backward's pack: the packed U^T (G*H rows of H + FR_NR_ALL*n
 * columns) and the product rows (B); then, from FR_PROJ_MIN_B rows on, the
 * packed W^T (G*H rows of I rounded up to panels) for dx = dz W^T.  The
 * forward's work and this share one pool buffer of the larger size
 * (fastrnn/ops.py), so W^T adds to a training step's memory only what the
 * pack outgrows the work by (LSTM 64x50x256x256: nothing; 32x100x64x128:
 * 32 KiB; 16x100x128x512: 256 KiB). */
static size_t fr_backward_base(int G, int B, int H, int nthreads)
{
    return ((size_t)H + (size_t)FR_NR_ALL * nthreads) * ((size_t)G * H + B);
}

static size_t fr_backward_wt(int G, int B, int I, int H)
{
    if (B < FR_PROJ_MIN_B || I < 1)
        return 0;
    return (size_t)G * H * FR_NR * fr_panels(I);
}

static size_t fr_backward_work(int G, int B, int I, int H, int nthreads)
{
    if (B < 1 || H < 1 || I < 0)
        return 0;
    if (nthreads < 1)
        nthreads = 1;
    return fr_backward_base(G, B, H, nthreads) + fr_backward_wt(G, B, I, H);
}

static int fr_backward_packs_wt(int G, int B, int I, int H, int nthreads)
{
    (void)nthreads;
    return fr_backward_wt(G, B, I, H) > 0;
}

size_t fr_lstm_backward_work(int B, int I, int H, int nthreads)
{
    return fr_backward_work(4, B, I, H, nthreads);
}

/* The packed U (K = H rows), the product rows (B) and, from FR_PROJ_MIN_B
 * rows on, the packed W (I rows), of G*H + FR_NR_ALL*n columns each. */
static size_t fr_forward_work(int G, int B, int I, int H, int nthreads)
{
    if (B < 1 || H < 1 || I < 0)
        return 0;
    if (nthreads < 1)
        nthreads = 1;
    const size_t rows = (size_t)H + B + (B >= FR_PROJ_MIN_B ? (size_t)I : 0);
    return ((size_t)G * H + (size_t)FR_NR_ALL * nthreads) * rows;
}

size_t fr_rnn_work(int B, int I, int H, int nthreads)
{
    const size_t f = fr_forward_work(1, B, I, H, nthreads);
    const size_t b = fr_backward_work(1, B, I, H, nthreads);
    return f > b ? f : b;
}

size_t fr_lstm_forward_work(int B, int I, int H, int nthreads)
{
    return fr_forward_work(4, B, I, H, nthreads);
}

void fr_set_blas_threads_fn(int (*fn)(int))
{
    fr_pool_set_blas_threads_fn(fn);
}

int fr_has_threads(void)
{
    return fr_pool_threads_available();
}

int fr_team_plan(int nthreads, int B, int H, int *rows)
{
    int n = fr_team(nthreads, B, H);
    *rows = fr_split_rows(B, H, n);
    return n;
}

int fr_forward_team_plan(int nthreads, int G, int B, int H, int *rows)
{
    const int r = fr_forward_split_rows(B, G, H, nthreads);
    const int n = r ? nthreads : fr_team(nthreads, B, H);
    *rows = n > 1 && r;
    return n;
}

void fr_team_stats(long *team_calls, long *stalled_calls, long *backoff_calls)
{
    fr_pool_stats(team_calls, stalled_calls, backoff_calls);
}

long fr_team_skipped_workers(void)
{
    return fr_pool_skipped_workers();
}

void fr_team_set_worker_delay_us(long us)
{
    fr_pool_set_worker_delay_us(us);
}

void fr_team_prime(void)
{
    fr_pool_prime();
}

long fr_team_primes(void)
{
    return fr_pool_primes();
}

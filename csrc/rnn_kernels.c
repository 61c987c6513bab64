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
 * are more threads than chunks of units and enough batch rows, each thread
 * owns a block of rows instead and runs the whole time loop on its own
 * (rows never interact): the team meets only around the large GEMMs.  The
 * rows are split too for small layers (H <= FR_SMALL_H), where a step is
 * too little work per thread to be worth a meeting.
 * FASTRNN_SPLIT=units|rows forces one (for measurements). */
#define FR_MIN_ROWS 4    /* fewest batch rows a thread owns in the row split */
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

/* Whether a team of n splits the rows (else the units). */
static int fr_split_rows(int B, int H, int n)
{
    if (n <= 1)
        return 0;
    int forced = fr_forced_split();
    if (forced < 2)
        return forced && B >= n;
    return (n > fr_unit_chunks(H) || H <= FR_SMALL_H) && B >= n * FR_MIN_ROWS;
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

static inline float fr_expf(float x)
{
    /* clamp to the finite range; comparisons leave NaN untouched */
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
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
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)fn + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float fr_sigmoidf(float x)
{
    return 1.0f / (1.0f + fr_expf(-x));
}

static inline float fr_tanhf(float x)
{
    float ax = x < 0 ? -x : x;
    /* small |x|: odd polynomial (Cephes tanhf), no cancellation */
    float z = x * x;
    float small = ((((-5.70498872745E-3f * z + 2.06390887954E-2f) * z
                     - 5.37397155531E-2f) * z + 1.33314422036E-1f) * z
                   - 3.33332819422E-1f) * z * x + x;
    /* larger |x|: 1 - 2 / (exp(2|x|) + 1), with the sign of x */
    float e = fr_expf(2.0f * ax);
    float big = 1.0f - 2.0f / (e + 1.0f);
    big = x < 0 ? -big : big;
    return ax < 0.625f ? small : big;   /* NaN: takes big, which is NaN */
}

static inline double fr_sigmoid(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

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

void fr_team_stats(long *team_calls, long *stalled_calls, long *backoff_calls)
{
    fr_pool_stats(team_calls, stalled_calls, backoff_calls);
}

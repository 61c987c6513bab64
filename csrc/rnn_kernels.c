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
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fastrnn.h"

/* The gate passes are compiled for AVX-512, AVX2 and baseline x86-64 and the
 * best one is picked at load time (GCC function multi-versioning). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(FASTRNN_NO_MULTIVERSION)
#define FR_VECTORIZE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FR_VECTORIZE
#endif

/* --- threading: one parallel region per kernel, see rnn_kernels_impl.h --- */
#define FR_CHUNK 16    /* unit slices are multiples of one AVX-512 vector */
#ifdef _OPENMP
#include <sched.h>
#include <stdatomic.h>
#define FR_PARALLEL(nt) _Pragma("omp parallel num_threads(nt)")
#define FR_TID() omp_get_thread_num()
#define FR_NT() omp_get_num_threads()

/* The team meets once per time step.  OpenMP's own barrier spins for a long
 * time before sleeping, which is ruinous when the cores are shared (another
 * process, TensorFlow's threads): a waiting thread keeps its core from the
 * thread it waits for.  This one spins briefly, then yields. */
typedef struct { atomic_int count; atomic_int sense; } fr_barrier;
#define FR_BARRIER_INIT(b) do { atomic_init(&(b).count, 0); atomic_init(&(b).sense, 0); } while (0)

static void fr_barrier_wait(fr_barrier *b, int n, int *local_sense)
{
    if (n <= 1)
        return;
    int s = !*local_sense;
    *local_sense = s;
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == n - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_store_explicit(&b->sense, s, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->sense, memory_order_acquire) != s; spins++) {
        if (spins < 2000) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
}
#else
#define FR_PARALLEL(nt)
#define FR_TID() 0
#define FR_NT() 1
typedef struct { int unused; } fr_barrier;
#define FR_BARRIER_INIT(b) ((b).unused = 0)
static void fr_barrier_wait(fr_barrier *b, int n, int *local_sense)
{
    (void)b; (void)n; (void)local_sense;
}
#endif

/* Part tid of n of [0, n_items), cut at multiples of align. */
static void fr_split(int n_items, int align, int tid, int n, int *lo, int *hi)
{
    long chunks = ((long)n_items + align - 1) / align;
    long a = chunks * tid / n * align, b = chunks * (tid + 1) / n * align;
    *lo = (int)(a < n_items ? a : n_items);
    *hi = (int)(b < n_items ? b : n_items);
}

/* Threads for a kernel: the caller's choice, at most one per FR_CHUNK
 * hidden units (fastrnn/_backend.py decides when threads pay). */
static int fr_team(int nthreads, int H)
{
#ifdef _OPENMP
    int most = (H + FR_CHUNK - 1) / FR_CHUNK;
    if (nthreads > most)
        nthreads = most;
    return nthreads < 1 ? 1 : nthreads;
#else
    (void)H;
    (void)nthreads;
    return 1;
#endif
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

int fr_openmp_version(void)
{
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}

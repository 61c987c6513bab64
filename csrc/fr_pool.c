/*
 * fastrnn's thread team (see fr_pool.h).
 *
 * Workers are started on first use, one per extra thread asked for, and
 * kept.  Each has its own "go" counter: the caller bumps the counters of the
 * workers it needs, runs its own share, and waits until they are done.  An
 * idle worker spins for FR_IDLE_SPIN_NS, then sleeps on a condition
 * variable, so idle workers never hold a core for long.  Waits inside a job
 * spin up to FR_SPIN_NS, then sleep on a futex.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1    /* syscall(), clock_gettime() under strict -std */
#endif
#include "fr_pool.h"

#include <stddef.h>
#include <stdint.h>

#if defined(__unix__) || defined(__APPLE__)
#define FR_HAVE_PTHREADS 1
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#endif

static inline void fr_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ------------------------------------------------- waiting, futex --- */

#define FR_SPIN_NS 200000L   /* spin this long before sleeping */

#ifdef FR_HAVE_PTHREADS
static long fr_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}
#endif

#if defined(__linux__)
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
/* Sleep while *addr == expected (returns at once if it differs). */
static void fr_futex_wait(atomic_int *addr, int expected)
{
    syscall(SYS_futex, (int *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}
static void fr_futex_wake_all(atomic_int *addr)
{
    syscall(SYS_futex, (int *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}
#define FR_HAVE_FUTEX 1
#endif

/* Nanoseconds team threads spent asleep waiting for each other (stalls). */
static atomic_long fr_waited_ns;

/* Wait until *word != value: spin up to FR_SPIN_NS, then sleep (futex) or
 * yield, adding the time asleep to fr_waited_ns.  *sleepers counts the
 * threads asleep on word, for fr_wake. */
static void fr_wait_while(atomic_int *word, int value, atomic_int *sleepers)
{
#ifdef FR_HAVE_PTHREADS
    long until = 0;
    for (int i = 0; atomic_load_explicit(word, memory_order_acquire) == value; i++) {
        fr_pause();
        if ((i & 15) != 15)
            continue;
        long now = fr_now_ns();
        if (!until) {
            until = now + FR_SPIN_NS;
        } else if (now > until) {
#ifdef FR_HAVE_FUTEX
            atomic_fetch_add(sleepers, 1);       /* seq_cst: see fr_wake */
            while (atomic_load(word) == value)
                fr_futex_wait(word, value);
            atomic_fetch_sub(sleepers, 1);
#else
            (void)sleepers;
            while (atomic_load(word) == value)
                sched_yield();
#endif
            atomic_fetch_add(&fr_waited_ns, fr_now_ns() - until);
            return;
        }
    }
#else
    (void)sleepers;
    while (atomic_load_explicit(word, memory_order_acquire) == value)
        fr_pause();
#endif
}

/* After changing *word (seq_cst): wake the threads asleep on it. */
static void fr_wake(atomic_int *word, atomic_int *sleepers)
{
#ifdef FR_HAVE_FUTEX
    if (atomic_load(sleepers) > 0)
        fr_futex_wake_all(word);
#else
    (void)word;
    (void)sleepers;
#endif
}

/* --------------------------------------------------------- barrier --- */

void fr_barrier_init(fr_barrier *b)
{
    atomic_init(&b->count, 0);
    atomic_init(&b->sense, 0);
    atomic_init(&b->sleepers, 0);
}

/* Sense-reversing barrier for the n threads of a team. */
void fr_barrier_wait(fr_barrier *b, int n, int *local_sense)
{
    if (n <= 1)
        return;
    int s = !*local_sense;
    *local_sense = s;
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == n - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_store(&b->sense, s);
        fr_wake(&b->sense, &b->sleepers);
        return;
    }
    fr_wait_while(&b->sense, !s, &b->sleepers);
}

/* ------------------------------------------------------------ work --- */

void fr_work_init(fr_work *w)
{
    atomic_init(&w->next, 0);
    atomic_init(&w->done, 0);
    atomic_init(&w->sleepers, 0);
}

int fr_work_claim(fr_work *w, int nitems)
{
    if (atomic_load_explicit(&w->next, memory_order_relaxed) >= nitems)
        return -1;
    int i = atomic_fetch_add_explicit(&w->next, 1, memory_order_acq_rel);
    return i < nitems ? i : -1;
}

void fr_work_finish(fr_work *w)
{
    atomic_fetch_add(&w->done, 1);       /* seq_cst, then wake: see fr_wake */
    fr_wake(&w->done, &w->sleepers);
}

void fr_work_wait(fr_work *w, int nitems)
{
    int d;
    while ((d = atomic_load_explicit(&w->done, memory_order_acquire)) < nitems)
        fr_wait_while(&w->done, d, &w->sleepers);
}

/* ------------------------------------------------------------ pool --- */

#ifdef FR_HAVE_PTHREADS

#define FR_IDLE_SPIN_NS 50000L   /* an idle worker spins, then sleeps */

/* A worker's state for the current job (changed by compare-and-swap, so
 * that a flexible job's caller and a late worker agree on who runs). */
enum { FR_IDLE, FR_ASSIGNED, FR_RUNNING, FR_SKIPPED };

typedef struct {
    atomic_uint go;              /* bumped by the caller: run the current job */
    atomic_int state;
    char pad[64 - sizeof(atomic_uint) - sizeof(atomic_int)];
} fr_slot;

static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;   /* one caller at a time */
static pthread_mutex_t sleep_mx = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sleep_cv = PTHREAD_COND_INITIALIZER;
static atomic_int sleepers;
static atomic_uint prime_epoch;          /* bumped by fr_pool_prime */
static int nworkers;                     /* started workers, tids 1..nworkers */
static fr_slot slots[FR_MAX_THREADS];
static fr_job_fn job_fn;                 /* the current job, written under busy */
static void *job_arg;
static int job_n;
static atomic_int pending;               /* workers still running the job */
static atomic_int pending_sleepers;
static int (*volatile blas_threads_fn)(int);
static int atfork_registered;
/* Contention back-off: when FR_STALL_STREAK team calls in a row spent a
 * large share of their time with threads asleep waiting for each other
 * (threads of the team descheduled: more runnable threads than cores), the
 * next backoff_left calls run on the caller's thread alone; the back-off
 * doubles while stalls persist (up to FR_BACKOFF_MAX calls) and resets
 * after a clean team call.  Isolated stalls do not count: on a virtual
 * machine a CPU now and then takes milliseconds to wake.  Protected by
 * busy. */
#define FR_STALL_STREAK 3
#define FR_BACKOFF_FIRST 4
#define FR_BACKOFF_MAX 64
static int backoff_left, backoff_len, stall_streak;
static long stat_team_calls, stat_stalled_calls, stat_backoff_calls;
static atomic_long stat_skipped;
static atomic_long worker_delay_us;      /* tests: late workers on purpose */

static void *fr_worker(void *p)
{
    const int tid = (int)(intptr_t)p;
    fr_slot *slot = &slots[tid];
    unsigned seen = 0;   /* fr_pool_grow zeroed go before starting us */
    int (*applied)(int) = NULL;
    for (;;) {
        unsigned g = atomic_load_explicit(&slot->go, memory_order_acquire);
        if (g == seen) {
            long until = fr_now_ns() + FR_IDLE_SPIN_NS;
            for (int i = 0; g == seen; i++) {
                fr_pause();
                g = atomic_load_explicit(&slot->go, memory_order_acquire);
                if ((i & 63) == 63 && fr_now_ns() > until)
                    break;
            }
        }
        if (g == seen) {
            pthread_mutex_lock(&sleep_mx);
            atomic_fetch_add(&sleepers, 1);
            const unsigned epoch = atomic_load(&prime_epoch);
            while ((g = atomic_load_explicit(&slot->go, memory_order_acquire)) == seen
                   && atomic_load(&prime_epoch) == epoch)
                pthread_cond_wait(&sleep_cv, &sleep_mx);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_mx);
            if (g == seen)      /* primed: spin again for the coming job */
                continue;
        }
        seen = g;
        long delay = atomic_load_explicit(&worker_delay_us, memory_order_relaxed);
        if (delay > 0) {
            struct timespec ts = {delay / 1000000, (delay % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
        int expected = FR_ASSIGNED;
        if (!atomic_compare_exchange_strong(&slot->state, &expected, FR_RUNNING)) {
            /* the caller of a flexible job finished without us (it counted
             * us out of pending); a newer job, if any, re-assigns us */
            expected = FR_SKIPPED;
            atomic_compare_exchange_strong(&slot->state, &expected, FR_IDLE);
            continue;
        }
        int (*fn)(int) = blas_threads_fn;
        if (fn != applied && fn != NULL) {
            fn(1);
            applied = fn;
        }
        job_fn(job_arg, tid, job_n);
        atomic_store(&slot->state, FR_IDLE);
        if (atomic_fetch_sub(&pending, 1) == 1)
            fr_wake(&pending, &pending_sleepers);
    }
    return NULL;
}

/* In a forked child only the forking thread exists: forget the workers. */
static void fr_pool_atfork_child(void)
{
    pthread_mutex_init(&busy, NULL);
    pthread_mutex_init(&sleep_mx, NULL);
    pthread_cond_init(&sleep_cv, NULL);
    atomic_store(&sleepers, 0);
    atomic_store(&pending, 0);
    atomic_store(&pending_sleepers, 0);
    nworkers = 0;
    backoff_left = backoff_len = stall_streak = 0;
}

/* Start workers up to tid want - 1; returns the team size available. */
static int fr_pool_grow(int want)
{
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, fr_pool_atfork_child) != 0)
            return 1;
        atfork_registered = 1;
    }
    while (nworkers < want - 1) {
        pthread_t th;
        pthread_attr_t attr;
        if (pthread_attr_init(&attr) != 0)
            break;
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        atomic_store(&slots[nworkers + 1].go, 0);
        atomic_store(&slots[nworkers + 1].state, FR_IDLE);
        int rc = pthread_create(&th, &attr, fr_worker, (void *)(intptr_t)(nworkers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0)
            break;
        nworkers++;
    }
    return nworkers + 1 < want ? nworkers + 1 : want;
}

static void fr_pool_run_team(int nthreads, fr_job_fn job, void *arg, int flexible);

void fr_pool_run(int nthreads, fr_job_fn job, void *arg)
{
    fr_pool_run_team(nthreads, job, arg, 0);
}

void fr_pool_run_flexible(int nthreads, fr_job_fn job, void *arg)
{
    fr_pool_run_team(nthreads, job, arg, 1);
}

static void fr_pool_run_team(int nthreads, fr_job_fn job, void *arg, int flexible)
{
    if (nthreads > FR_MAX_THREADS)
        nthreads = FR_MAX_THREADS;
    if (nthreads <= 1 || pthread_mutex_trylock(&busy) != 0) {
        job(arg, 0, 1);
        return;
    }
    const int n = backoff_left > 0 && !flexible ? 1 : fr_pool_grow(nthreads);
    if (n <= 1) {
        if (backoff_left > 0) {
            backoff_left--;
            stat_backoff_calls++;
        }
        pthread_mutex_unlock(&busy);
        job(arg, 0, 1);
        return;
    }
    const long t0 = fr_now_ns(), w0 = atomic_load(&fr_waited_ns);
    job_fn = job;
    job_arg = arg;
    job_n = n;
    atomic_store_explicit(&pending, n - 1, memory_order_relaxed);
    /* under sleep_mx, so that a worker going to sleep cannot miss its go */
    pthread_mutex_lock(&sleep_mx);
    for (int t = 1; t < n; t++) {
        atomic_store(&slots[t].state, FR_ASSIGNED);
        atomic_fetch_add_explicit(&slots[t].go, 1, memory_order_release);
    }
    if (atomic_load(&sleepers) > 0)
        pthread_cond_broadcast(&sleep_cv);
    pthread_mutex_unlock(&sleep_mx);
    job(arg, 0, n);
    if (flexible)       /* all its work is done: skip the workers not started */
        for (int t = 1; t < n; t++) {
            int expected = FR_ASSIGNED;
            if (atomic_compare_exchange_strong(&slots[t].state, &expected, FR_SKIPPED)) {
                atomic_fetch_sub(&pending, 1);
                atomic_fetch_add(&stat_skipped, 1);
            }
        }
    int left;
    while ((left = atomic_load(&pending)) > 0)
        fr_wait_while(&pending, left, &pending_sleepers);
    const long waited = atomic_load(&fr_waited_ns) - w0, wall = fr_now_ns() - t0;
    stat_team_calls++;
    if (flexible) {
        /* late workers cost such a job nothing: no back-off */
    } else if (waited > 200000L && 3 * waited > wall) {   /* > 1/3 and > 200 us asleep */
        stat_stalled_calls++;
        if (++stall_streak >= FR_STALL_STREAK) {
            backoff_len = backoff_len ? 2 * backoff_len : FR_BACKOFF_FIRST;
            if (backoff_len > FR_BACKOFF_MAX)
                backoff_len = FR_BACKOFF_MAX;
            backoff_left = backoff_len;
        }
    } else {
        stall_streak = 0;
        backoff_len = 0;
    }
    pthread_mutex_unlock(&busy);
}

void fr_pool_stats(long *team_calls, long *stalled_calls, long *backoff_calls)
{
    pthread_mutex_lock(&busy);
    *team_calls = stat_team_calls;
    *stalled_calls = stat_stalled_calls;
    *backoff_calls = stat_backoff_calls;
    pthread_mutex_unlock(&busy);
}

long fr_pool_skipped_workers(void)
{
    return atomic_load(&stat_skipped);
}

void fr_pool_set_worker_delay_us(long us)
{
    atomic_store(&worker_delay_us, us > 0 ? us : 0);
}

void fr_pool_prime(void)
{
    if (atomic_load(&sleepers) == 0)
        return;
    pthread_mutex_lock(&sleep_mx);
    atomic_fetch_add(&prime_epoch, 1);
    pthread_cond_broadcast(&sleep_cv);
    pthread_mutex_unlock(&sleep_mx);
}

long fr_pool_primes(void)
{
    return (long)atomic_load(&prime_epoch);
}

void fr_pool_set_blas_threads_fn(int (*fn)(int))
{
    blas_threads_fn = fn;
}

int fr_pool_threads_available(void)
{
    return 1;
}

#else /* no POSIX threads: every job runs on the caller's thread */

void fr_pool_stats(long *team_calls, long *stalled_calls, long *backoff_calls)
{
    *team_calls = *stalled_calls = *backoff_calls = 0;
}

void fr_pool_run(int nthreads, fr_job_fn job, void *arg)
{
    (void)nthreads;
    job(arg, 0, 1);
}

void fr_pool_run_flexible(int nthreads, fr_job_fn job, void *arg)
{
    (void)nthreads;
    job(arg, 0, 1);
}

long fr_pool_skipped_workers(void)
{
    return 0;
}

void fr_pool_set_worker_delay_us(long us)
{
    (void)us;
}

void fr_pool_prime(void)
{
}

long fr_pool_primes(void)
{
    return 0;
}

void fr_pool_set_blas_threads_fn(int (*fn)(int))
{
    (void)fn;
}

int fr_pool_threads_available(void)
{
    return 0;
}

#endif

/*
 * fastrnn's thread team: a small pool of persistent worker threads that run
 * one job at a time, plus the per-step barrier the kernels meet at.
 *
 * Why not OpenMP: libgomp keeps one set of workers per calling thread and
 * lets each spin for a long time (GOMP_SPINCOUNT, milliseconds on current
 * x86 cores) after a parallel region ends.  TensorFlow calls the kernels
 * from several of its own threads (forward on one, backward on another), so
 * idle spinning workers took the cores the next kernel's team needed, and
 * fwd+bwd steps stalled for milliseconds.  This pool is one per process,
 * its idle workers spin for 50 us before sleeping, and it is used by one
 * caller at a time: a concurrent caller simply runs its kernel on its own
 * thread.  When the cores are oversubscribed it falls back to serial calls
 * for a while (see fr_pool_run).  Jobs whose work can be claimed in items
 * by whichever threads run (fr_work) need no meeting of all threads: they
 * run "flexible", and a worker that starts after the work is done skips
 * the job instead of being waited for (fr_pool_run_flexible).
 */
#ifndef FR_POOL_H
#define FR_POOL_H

#include <stdatomic.h>

/* A job: run by threads tid = 0 .. n-1 of a team of n (tid 0 is the
 * caller's thread). */
typedef void (*fr_job_fn)(void *arg, int tid, int n);

/* Most threads in a team (the caller included). */
#define FR_MAX_THREADS 64

/* Run job(arg, tid, n) on a team of up to nthreads threads and return when
 * all are done.  Runs it serially (n = 1) when nthreads <= 1, when threads
 * are unavailable, when the pool is busy with another caller's job, or
 * during a back-off after team calls that stalled (threads of the team
 * descheduled for long: the cores are oversubscribed; see fr_pool.c). */
void fr_pool_run(int nthreads, fr_job_fn job, void *arg);

/* As fr_pool_run, for a job whose threads never wait for one another
 * except through fr_work (below), so that whichever of them run can do all
 * of its work: once the caller's thread has returned from the job, the
 * workers that have not started it yet are told to skip it instead of
 * being waited for (a sleeping worker can take long to wake, on a busy or
 * virtual machine).  Stalls are not counted and cause no back-off. */
void fr_pool_run_flexible(int nthreads, fr_job_fn job, void *arg);

/* Counters since the process started: team calls, those that stalled, and
 * calls run serially during a back-off; workers that skipped a flexible job
 * because they started too late. */
void fr_pool_stats(long *team_calls, long *stalled_calls, long *backoff_calls);
long fr_pool_skipped_workers(void);

/* Tests only: workers sleep this many microseconds before they start each
 * job (0: no delay), to make late workers happen on purpose. */
void fr_pool_set_worker_delay_us(long us);

/* Wake the sleeping workers, if any, to spin (FR_IDLE_SPIN_NS) for a job
 * about to come: a caller with some preparing left to do before its
 * fr_pool_run calls this first, so that the workers' wake-up (tens of
 * microseconds on a virtual machine) overlaps the preparing.  Does nothing
 * (no system call) when no worker sleeps.  fr_pool_primes: the wake-ups
 * sent so far (tests). */
void fr_pool_prime(void);
long fr_pool_primes(void);

/* A function that sets the calling thread's BLAS thread count (OpenBLAS's
 * openblas_set_num_threads_local); the pool's workers call it with 1 when
 * they start, so BLAS calls inside a team never start BLAS threads. */
void fr_pool_set_blas_threads_fn(int (*fn)(int));

/* 1 when the pool can start threads (POSIX threads available). */
int fr_pool_threads_available(void);

/* The team's per-step meeting point: a waiting thread spins up to 200 us
 * (longer than a step takes when both threads run, so that the common case
 * never sleeps: an idle virtual CPU can take milliseconds to wake), then
 * sleeps (a futex on Linux), so that a thread that only waits does not hold
 * a core the thread it waits for could use. */
typedef struct { atomic_int count; atomic_int sense; atomic_int sleepers; } fr_barrier;
void fr_barrier_init(fr_barrier *b);
void fr_barrier_wait(fr_barrier *b, int n, int *local_sense);

/* A phase of work cut into nitems items that a team's threads claim one at
 * a time, in any number: a thread that comes late claims fewer (or none).
 * fr_work_wait waits (spin, then sleep) until every item is done. */
typedef struct { atomic_int next; atomic_int done; atomic_int sleepers; } fr_work;
void fr_work_init(fr_work *w);
int fr_work_claim(fr_work *w, int nitems);   /* an item, or -1: none left */
void fr_work_finish(fr_work *w);             /* a claimed item is done */
void fr_work_wait(fr_work *w, int nitems);

#endif /* FR_POOL_H */

/* One backward ALS sweep of AIR (Eqs. 5-6) over a row-major residual, fused so that each rank step reads the
 * residual and the weights once.
 *
 * The torch path in air_ft/linalg.py (als_sweep) is the reference; this file computes the same updates in the same
 * order. State on entry and on exit: R = W' - US^T VS (m x n), US rows u_r (k x m, sigma folded in), VS rows v_r
 * (k x n). Step r (r = k-1, ..., 0) with E_r = R + u_r v_r^T:
 *     b_j  = sum_i C_ij E_ij u_i / den_r[j]          (Eq. 5; den_r[j] = sum_i C_ij u_r[i]^2, given, >= tiny)
 *     u~_i = sum_j C_ij E_ij b_j / sum_j C_ij b_j^2  (Eq. 6; denominator clamped to >= tiny)
 *     R    = E_r - u~ b^T
 * b needs column sums of the whole of E_r; u~_i needs only row i. So a single pass over the rows finishes step r
 * for row i (u~_i, the downdate) and starts step r-1 for it (the add-back of u_{r-1} v_{r-1}^T and row i's share of
 * the column sums of Eq. 5), while the row is in L1. Rows are split over threads; per-thread column sums are
 * double-buffered by step parity, so one barrier per step suffices.
 *
 * Built at run time by air_ft/native.py (cc -O3 -march=native -fopenmp-simd); no Python headers, called by ctypes,
 * which releases the GIL for the duration. */

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    atomic_int count;
    atomic_int phase;
    int n;
} barrier_t;

static void barrier_wait(barrier_t *b) {
    int phase = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == b->n - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, phase + 1, memory_order_release);
        return;
    }
    /* spin briefly (the usual case: the threads are on their own cores), then yield the core */
    for (long spins = 0; atomic_load_explicit(&b->phase, memory_order_acquire) == phase; ++spins)
        if (spins > 2000) sched_yield();
}

#define DEFINE_SWEEP(T, SUFFIX)                                                                                  \
    typedef struct {                                                                                             \
        T *R; const T *C; T *US; T *VS; const T *DEN;                                                            \
        int64_t m, n, k, i0, i1, tid, nthreads;                                                                  \
        T tiny;                                                                                                  \
        T *acc;  /* 2 x nthreads x n column sums, by step parity */                                             \
        T *b, *b2; /* this thread's copy of b and b^2 (n each) */                                                \
        double *obj; /* nthreads x k, or NULL */                                                                 \
        barrier_t *bar;                                                                                          \
        atomic_int *gate; /* 0: wait, 1: go, -1: abandon (a thread could not be started) */                     \
    } job_##SUFFIX;                                                                                              \
                                                                                                                 \
    static void *sweep_worker_##SUFFIX(void *arg) {                                                              \
        job_##SUFFIX *J = (job_##SUFFIX *)arg;                                                                   \
        int g;                                                                                                   \
        while ((g = atomic_load_explicit(J->gate, memory_order_acquire)) == 0) sched_yield();                    \
        if (g < 0) return NULL;                                                                                  \
        const int64_t m = J->m, n = J->n, k = J->k, nt = J->nthreads;                                            \
        T *restrict b = J->b, *restrict b2 = J->b2;                                                              \
        /* prologue: add back component k-1 and take this block's share of its Eq. 5 column sums */              \
        {                                                                                                        \
            T *restrict acc = J->acc + (((k - 1) & 1) * nt + J->tid) * n;                                        \
            const T *restrict v = J->VS + (k - 1) * n;                                                           \
            memset(acc, 0, sizeof(T) * (size_t)n);                                                               \
            for (int64_t i = J->i0; i < J->i1; ++i) {                                                            \
                T *restrict row = J->R + i * n;                                                                  \
                const T *restrict c = J->C + i * n;                                                              \
                const T a = J->US[(k - 1) * m + i];                                                              \
                _Pragma("omp simd")                                                                              \
                for (int64_t j = 0; j < n; ++j) {                                                                \
                    const T e = row[j] + a * v[j];                                                               \
                    row[j] = e;                                                                                  \
                    acc[j] += c[j] * e * a;                                                                      \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        barrier_wait(J->bar);                                                                                    \
        for (int64_t r = k - 1; r >= 0; --r) {                                                                   \
            /* Eq. 5: b from every block's column sums (each thread forms the whole of b for itself) */          \
            const T *restrict den = J->DEN + r * n;                                                              \
            const T *accs = J->acc + (r & 1) * nt * n;                                                           \
            for (int64_t j = 0; j < n; ++j) {                                                                    \
                T s = 0;                                                                                         \
                for (int64_t t = 0; t < nt; ++t) s += accs[t * n + j];                                           \
                b[j] = s / den[j];                                                                               \
                b2[j] = b[j] * b[j];                                                                             \
            }                                                                                                    \
            if (J->tid == 0) memcpy(J->VS + r * n, b, sizeof(T) * (size_t)n);                                    \
            T *restrict acc = J->acc + (((r - 1) & 1) * nt + J->tid) * n;                                        \
            if (r > 0) memset(acc, 0, sizeof(T) * (size_t)n);                                                    \
            const T *restrict v = J->VS + (r > 0 ? r - 1 : 0) * n; /* component r-1, read only when r > 0 */     \
            double obj = 0.0;                                                                                    \
            for (int64_t i = J->i0; i < J->i1; ++i) {                                                            \
                T *restrict row = J->R + i * n;                                                                  \
                const T *restrict c = J->C + i * n;                                                              \
                /* Eq. 6 for row i */                                                                            \
                T num = 0, dd = 0;                                                                               \
                _Pragma("omp simd reduction(+:num,dd)")                                                          \
                for (int64_t j = 0; j < n; ++j) {                                                                \
                    num += c[j] * row[j] * b[j];                                                                 \
                    dd += c[j] * b2[j];                                                                          \
                }                                                                                                \
                const T u = num / (dd > J->tiny ? dd : J->tiny);                                                 \
                J->US[r * m + i] = u;                                                                            \
                if (J->obj) {                                                                                    \
                    /* the objective of the working-precision state, accumulated in double */                   \
                    double o = 0;                                                                                \
                    _Pragma("omp simd reduction(+:o)")                                                           \
                    for (int64_t j = 0; j < n; ++j) {                                                            \
                        const T d = row[j] - u * b[j];                                                           \
                        o += (double)c[j] * (double)d * (double)d;                                               \
                    }                                                                                            \
                    obj += o;                                                                                    \
                }                                                                                                \
                if (r > 0) {                                                                                     \
                    /* downdate step r, add back component r-1, and its Eq. 5 column sums */                     \
                    const T a = J->US[(r - 1) * m + i];                                                          \
                    _Pragma("omp simd")                                                                          \
                    for (int64_t j = 0; j < n; ++j) {                                                            \
                        const T e = row[j] - u * b[j] + a * v[j];                                                \
                        row[j] = e;                                                                              \
                        acc[j] += c[j] * e * a;                                                                  \
                    }                                                                                            \
                } else {                                                                                         \
                    _Pragma("omp simd")                                                                          \
                    for (int64_t j = 0; j < n; ++j) row[j] -= u * b[j];                                          \
                }                                                                                                \
            }                                                                                                    \
            if (J->obj) J->obj[J->tid * k + r] = obj;                                                            \
            if (r > 0) barrier_wait(J->bar);                                                                     \
        }                                                                                                        \
        return NULL;                                                                                             \
    }                                                                                                            \
                                                                                                                 \
    int als_sweep_##SUFFIX(T *R, const T *C, T *US, T *VS, const T *DEN, int64_t m, int64_t n, int64_t k,       \
                           T tiny, int64_t nthreads, double *obj) {                                              \
        if (k <= 0) return 0;                                                                                    \
        if (nthreads < 1) nthreads = 1;                                                                          \
        if (nthreads > m) nthreads = m;                                                                          \
        T *acc = (T *)calloc((size_t)(4 * nthreads * n), sizeof(T)); /* column sums, then b and b^2 */          \
        job_##SUFFIX *jobs = (job_##SUFFIX *)calloc((size_t)nthreads, sizeof(job_##SUFFIX));                     \
        pthread_t *th = (pthread_t *)calloc((size_t)nthreads, sizeof(pthread_t));                                \
        if (!acc || !jobs || !th) { free(acc); free(jobs); free(th); return 1; }                                 \
        barrier_t bar;                                                                                           \
        atomic_init(&bar.count, 0);                                                                              \
        atomic_init(&bar.phase, 0);                                                                              \
        bar.n = (int)nthreads;                                                                                   \
        atomic_int gate;                                                                                         \
        atomic_init(&gate, 0);                                                                                   \
        for (int64_t t = 0; t < nthreads; ++t) {                                                                 \
            job_##SUFFIX J = {R, C, US, VS, DEN, m, n, k, m * t / nthreads, m * (t + 1) / nthreads, t,           \
                              nthreads, tiny, acc, acc + (2 * nthreads + 2 * t) * n,                               \
                              acc + (2 * nthreads + 2 * t + 1) * n, obj, &bar, &gate};                            \
            jobs[t] = J;                                                                                         \
        }                                                                                                        \
        int64_t started = 1;                                                                                     \
        for (; started < nthreads; ++started)                                                                    \
            if (pthread_create(&th[started], NULL, sweep_worker_##SUFFIX, &jobs[started])) break;                \
        atomic_store_explicit(&gate, started == nthreads ? 1 : -1, memory_order_release);                        \
        if (started < nthreads) {                                                                                \
            for (int64_t t = 1; t < started; ++t) pthread_join(th[t], NULL);                                     \
            free(acc); free(jobs); free(th);                                                                     \
            return 2;                                                                                            \
        }                                                                                                        \
        sweep_worker_##SUFFIX(&jobs[0]);                                                                         \
        for (int64_t t = 1; t < nthreads; ++t) pthread_join(th[t], NULL);                                        \
        free(acc); free(jobs); free(th);                                                                         \
        return 0;                                                                                                \
    }

DEFINE_SWEEP(float, f32)
DEFINE_SWEEP(double, f64)

/*
 * The kernels' bodies, written once and included twice by rnn_kernels.c:
 * with REAL = float (SUF f32) and with REAL = double (SUF f64).
 * Expected macros: REAL, SUF, BLAS_T, SIGMOID(x), TANH(x); FR_F32 in the
 * float instantiation (the packed-panel kernels); and from rnn_kernels.c:
 * FR_VECTORIZE, FR_IVDEP, FR_CHUNK, FR_NR_ALL, fr_split, fr_split_rows,
 * fr_forward_split_rows,
 * fr_team; the team (fr_pool_run, fr_barrier) from fr_pool.h.
 *
 * Threading: each kernel is one job for the team ("persistent threads").
 * Either thread k of n owns a slice [j0, j1) of the hidden units: per step
 * it computes the recurrent product for its slice's columns of every gate
 * block and the gate pass for its slice, then the team meets once at a
 * barrier; or (fr_split_rows) it owns a block of batch rows [b0, b1) and
 * runs the whole time loop for them without meeting the others.  The
 * large GEMMs outside the time loop are split by rows or columns: the
 * input projection (float32 from FR_PROJ_MIN_B rows: each thread's own
 * columns on its packed columns of W, so that the unit split starts its
 * steps without a meeting; else BLAS by rows) and the backward pass's
 * weight-gradient GEMMs after each chunk of steps (single-threaded BLAS
 * calls).  With one thread the code is the plain serial algorithm.
 */
#define FR_CAT_(a, b) a##_##b
#define FR_CAT(a, b) FR_CAT_(a, b)
#define FN(name) FR_CAT(name, SUF)

/* Row-major C (M x N) = alpha * op(A) (M x K) * op(B) (K x N) + beta * C,
 * computed by the column-major BLAS as C^T = op(B)^T op(A)^T: operands are
 * swapped, never copied. */
static void FN(gemm_rm)(const BLAS_T *blas, int ta, int tb, int M, int N, int K,
                        REAL alpha, const REAL *A, int lda, const REAL *Bm,
                        int ldb, REAL beta, REAL *C, int ldc)
{
    if (M <= 0 || N <= 0)
        return;
    if (K <= 0) {
        for (int r = 0; r < M; r++)
            for (int c = 0; c < N; c++)
                C[(size_t)r * ldc + c] = beta == 0 ? (REAL)0 : beta * C[(size_t)r * ldc + c];
        return;
    }
    if (M == 1 && !ta) {
        /* one row (batch 1): c^T = op(B)^T a^T by GEMV, which unlike GEMM
         * does not pack B on every call */
        int one = 1;
        char tr = tb ? 'T' : 'N';
        int m = tb ? K : N, n = tb ? N : K;
        blas->gemv(&tr, &m, &n, &alpha, (REAL *)Bm, &ldb, (REAL *)A, &one,
                   &beta, C, &one);
        return;
    }
    char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    blas->gemm(&cb, &ca, &N, &M, &K, &alpha, (REAL *)Bm, &ldb, (REAL *)A, &lda,
               &beta, C, &ldc);
}

/* ------------------------------------------- packed-weight scratch --- */

/* A thread's places in a kernel's packed-weights scratch, which holds
 * (G*H + FR_NR_ALL*nmax) * (K + B) elements: first its packed weights (K
 * rows of its G*w columns, at most (G*w + FR_NR_ALL) * K elements; in the
 * row split one copy at the start, shared), then its product rows (Bk of
 * at most G*w + FR_NR_ALL, *ld apart).  The sizes are fr_*_work's. */
static void FN(scratch_slots)(REAL *buf, int K, int G, int H, int B, int nmax,
                              int tid, int rows, int j0, int w, int b0,
                              REAL **weights, REAL **prod, int *ld)
{
    const size_t slot = (size_t)G * j0 + (size_t)FR_NR_ALL * tid;
    const size_t base = ((size_t)G * H + (size_t)FR_NR_ALL * nmax) * K;
    *ld = ((G * w + FR_NR_ALL - 1) / FR_NR_ALL) * FR_NR_ALL;
    *weights = buf + (rows ? 0 : slot * K);
    *prod = buf + base + (rows ? (size_t)b0 * *ld : (size_t)B * slot);
}

#ifdef FR_F32
/* Where a forward's work buffer keeps the packed columns of W (float32,
 * from FR_PROJ_MIN_B rows): after the packed U (H rows) and the product
 * rows (B), I rows of G*H + FR_NR_ALL*nmax columns, a thread's slot as in
 * scratch_slots (the row split's one shared copy at the start). */
static REAL *FN(w_panels_slot)(REAL *buf, int G, int I, int H, int B, int nmax,
                               int tid, int rows, int j0)
{
    const size_t cols = (size_t)G * H + (size_t)FR_NR_ALL * nmax;
    const size_t slot = (size_t)G * j0 + (size_t)FR_NR_ALL * tid;
    return buf + cols * ((size_t)H + B) + (rows ? 0 : slot * (size_t)I);
}

/* dh[b, j0:j0+w] = (dz U^T)[b, :] for the rows that took the step, the
 * product on U's rows packed by fr_pack_t_panels (K = G*H) through tmp. */
static void FN(packed_recurrent_grad)(int Bk, int K, int H, int j0, int w,
                                      const unsigned char *m, const REAL *dzt,
                                      const REAL *panels, REAL *tmp, int ldt,
                                      REAL *dh)
{
    fr_sgemm_panels(Bk, K, fr_panels(w), dzt, K, panels, tmp, ldt);
    for (int b = 0; b < Bk; b++)
        if (!m || m[b])
            memcpy(dh + (size_t)b * H + j0, tmp + (size_t)b * ldt,
                   (size_t)w * sizeof(REAL));
}
#endif

/* ------------------------------------------------------------- LSTM --- */

/* One step's gate pass over all B rows, for hidden units [j0, j1).  z
 * (B, 4H) holds the step's pre-activations x W + h U, or only x W when rec
 * is given: then rec (B, ldr) holds h U for these units, gate block q of
 * row b at rec[b * ldr + q * (j1 - j0)].  Writes h and c of the next step,
 * h also into the outputs (row b at hout + b * ldo), and stores the
 * activated gates i, f, g, o back into z (kept for backward). */
#define FR_LSTM_GATES(RI, RF, RG, RO)                                   \
    FR_IVDEP                                                            \
    for (int j = 0; j < w; j++) {                                       \
        REAL i = SIGMOID(zi[j] + RI + bi[j]);                           \
        REAL f = SIGMOID(zf[j] + RF + bf[j]);                           \
        REAL g = TANH(zg[j] + RG + bg[j]);                              \
        REAL o = SIGMOID(zo[j] + RO + bo[j]);                           \
        REAL c = f * cp[j] + i * g;                                     \
        REAL h = o * TANH(c);                                           \
        cn[j] = c;                                                      \
        hn[j] = h;                                                      \
        ho[j] = h;                                                      \
        zi[j] = i;                                                      \
        zf[j] = f;                                                      \
        zg[j] = g;                                                      \
        zo[j] = o;                                                      \
    }

FR_VECTORIZE
static void FN(lstm_cell)(int B, int H, int j0, int j1,
                          const REAL *restrict bias, const unsigned char *mask,
                          REAL *restrict z, const REAL *restrict rec, size_t ldr,
                          const REAL *restrict hprev,
                          const REAL *restrict cprev, REAL *restrict hnext,
                          REAL *restrict cnext, REAL *restrict hout, size_t ldo)
{
    const int w = j1 - j0;
    for (int b = 0; b < B; b++) {
        REAL *restrict zr = z + (size_t)b * 4 * H + j0;
        const REAL *restrict hp = hprev + (size_t)b * H + j0;
        const REAL *restrict cp = cprev + (size_t)b * H + j0;
        REAL *restrict hn = hnext + (size_t)b * H + j0;
        REAL *restrict cn = cnext + (size_t)b * H + j0;
        REAL *restrict ho = hout + (size_t)b * ldo + j0;
        if (mask && !mask[b]) {
            FR_IVDEP
            for (int j = 0; j < w; j++) {
                hn[j] = hp[j];
                ho[j] = hp[j];
                cn[j] = cp[j];
            }
            continue;
        }
        /* one restrict pointer per gate block, so the compiler knows the
         * streams never overlap */
        REAL *restrict zi = zr, *restrict zf = zr + H;
        REAL *restrict zg = zr + 2 * H, *restrict zo = zr + 3 * H;
        const REAL *restrict bi = bias + j0, *restrict bf = bias + H + j0;
        const REAL *restrict bg = bias + 2 * H + j0, *restrict bo = bias + 3 * H + j0;
        if (rec) {
            const REAL *restrict rr = rec + (size_t)b * ldr;
            const REAL *restrict ri = rr, *restrict rf = rr + w;
            const REAL *restrict rg = rr + 2 * w, *restrict ro = rr + 3 * w;
            FR_LSTM_GATES(ri[j], rf[j], rg[j], ro[j])
        } else {
            FR_LSTM_GATES(0, 0, 0, 0)
        }
    }
}
#undef FR_LSTM_GATES

/* One step's backward gate pass, units [j0, j1).  dh already includes the
 * step's output gradient; on exit dc holds the gradient w.r.t. c_{t-1} and
 * dz the pre-activation gradients (zero for masked rows). */
FR_VECTORIZE
static void FN(lstm_cell_grad)(int B, int H, int j0, int j1,
                               const unsigned char *mask,
                               const REAL *restrict gates,
                               const REAL *restrict c, const REAL *restrict cprev,
                               const REAL *restrict dh, REAL *restrict dc,
                               REAL *restrict dz)
{
    for (int b = 0; b < B; b++) {
        const REAL *restrict gr = gates + (size_t)b * 4 * H;
        REAL *restrict dzr = dz + (size_t)b * 4 * H;
        const REAL *restrict cr = c + (size_t)b * H;
        const REAL *restrict cpr = cprev + (size_t)b * H;
        const REAL *restrict dhr = dh + (size_t)b * H;
        REAL *restrict dcr = dc + (size_t)b * H;
        REAL *restrict dzi = dzr, *restrict dzf = dzr + H;
        REAL *restrict dzg = dzr + 2 * H, *restrict dzo = dzr + 3 * H;
        if (mask && !mask[b]) {
            FR_IVDEP
            for (int j = j0; j < j1; j++)
                dzi[j] = dzf[j] = dzg[j] = dzo[j] = 0;
            continue;
        }
        const REAL *restrict gi = gr, *restrict gf = gr + H;
        const REAL *restrict gg = gr + 2 * H, *restrict go = gr + 3 * H;
        FR_IVDEP
        for (int j = j0; j < j1; j++) {
            REAL i = gi[j], f = gf[j], g = gg[j], o = go[j];
            REAL tc = TANH(cr[j]);
            REAL dcc = dcr[j] + dhr[j] * o * (1 - tc * tc);
            dzi[j] = dcc * g * i * (1 - i);
            dzf[j] = dcc * cpr[j] * f * (1 - f);
            dzg[j] = dcc * i * (1 - g * g);
            dzo[j] = dhr[j] * tc * o * (1 - o);
            dcr[j] = dcc * f;
        }
    }
}

static int FN(check_sizes)(int T, int B, int I, int H, int G)
{
    if (T < 1 || B < 1 || I < 0 || H < 1)
        return 1;
    /* every product used as a BLAS dimension or stride must fit an int */
    if ((long long)T * B > 2147483647LL || (long long)B * G * H > 2147483647LL ||
        (long long)T * H > 2147483647LL)
        return 1;
    return 0;
}

/* Rows [r0, r1) of the input projection z = x W of every step (G gate
 * blocks: 4 for the LSTM, 1 for the RNN), counted in x's memory order: x
 * is time-major (T, B, I) in reading order, or, when xbm, batch-major
 * (B, T, I) read forwards (row r = b*T + t).  z is time-major (T, B, G*H),
 * or batch-major (B, T, G*H) when zbm (the RNN's outputs); where the two
 * orders differ, each run of rows of x is one product into z rows B (or
 * T) apart.  float32 with panels: units [j0, j0 + w) of each gate block,
 * on W's columns packed by fr_pack_panels(I, H, G, j0, w, W, panels); else
 * every column by BLAS. */
static void FN(project)(const BLAS_T *blas, const REAL *panels, int xbm, int zbm,
                        int r0, int r1, int G, int T, int B, int I, int H, int j0,
                        int w, const REAL *x, const REAL *W, REAL *z)
{
    const size_t GH = (size_t)G * H;
    for (int r = r0; r < r1;) {
        int m = r1 - r;
        size_t zr = (size_t)r * GH, ldz = GH;
        if (xbm && !zbm) {   /* a batch row's steps, B rows apart in z */
            const int b = r / T, t = r % T;
            if (m > T - t)
                m = T - t;
            zr = ((size_t)t * B + b) * GH;
            ldz = (size_t)B * GH;
        } else if (!xbm && zbm) {   /* a step's batch rows, T rows apart in z */
            const int t = r / B, b = r % B;
            if (m > B - b)
                m = B - b;
            zr = ((size_t)b * T + t) * GH;
            ldz = (size_t)T * GH;
        }
        const REAL *A = x + (size_t)r * I;
#ifdef FR_F32
        if (panels)
            fr_project_panels(m, I, H, G, j0, w, A, panels, z + zr, ldz);
        else
#else
        (void)panels, (void)j0, (void)w;
#endif
        FN(gemm_rm)(blas, 0, 0, m, (int)GH, I, 1, A, I > 0 ? I : 1, W, (int)GH, 0,
                    z + zr, (int)ldz);
        r += m;
    }
}

/* z[:, q*H + j0 : q*H + j1] += h U[:, same columns], for each gate block q
 * (rows of h ldh apart, of z ldz apart). */
static void FN(recurrent_projection)(const BLAS_T *blas, int G, int B, int H, int j0,
                                     int j1, const REAL *h, int ldh, const REAL *U,
                                     REAL *z, int ldz)
{
    const int GH = G * H;
    if (j0 == 0 && j1 == H) {   /* the whole layer: one GEMM */
        FN(gemm_rm)(blas, 0, 0, B, GH, H, 1, h, ldh, U, GH, 1, z, ldz);
        return;
    }
    for (int q = 0; q < G; q++)
        FN(gemm_rm)(blas, 0, 0, B, j1 - j0, H, 1, h, ldh, U + q * H + j0, GH,
                    1, z + q * H + j0, ldz);
}

/* What the team of one forward call (LSTM or RNN) shares: rows, the team
 * splits the batch rows (flexible job: fr_pool_run_flexible, work items
 * claimed from items[0] (input projection pieces) and items[1] (row
 * blocks), no barrier), else the hidden units (a barrier per step); proj,
 * float32: the input projection on packed W (fr_project_panels); xbm: x
 * is batch-major, zbm: the projection too (the RNN's, into the outputs;
 * see project). */
typedef struct {
    int nthreads, rows, npieces, nblocks, proj, xbm, zbm;
    fr_barrier bar;
    fr_work items[2];
} FN(fwd_team);

/* The arguments of one LSTM forward call, shared by its team. */
typedef struct {
    const BLAS_T *blas;
    int training, T, B, I, H;
    const REAL *x, *W, *U, *bias;
    const unsigned char *mask;
    REAL *hs, *cs, *gates, *out, *work;
    FN(fwd_team) tm;
} FN(lstm_fwd_args);

/* Slot of the state after step t (t = -1: the initial state) in cs:
 * every step's when training, else two that alternate (as always in hs). */
static inline size_t FN(state_slot)(int training, int t)
{
    return (size_t)(training ? t + 1 : (t + 1) & 1);
}

/* Run a forward job (LSTM, G = 4, or RNN, G = 1) whose arguments arg hold
 * team tm: on a team that splits the hidden units, or, for the row split,
 * a flexible team, with U (and W, when the projection runs on it) packed
 * once by the caller first (float32 with work). */
static void FN(run_forward)(FN(fwd_team) *tm, fr_job_fn job, void *arg, int nthreads,
                            int xbm, int G, int T, int B, int I, int H, const REAL *W,
                            const REAL *U, REAL *work)
{
    const int rows = fr_forward_split_rows(B, G, H, nthreads);
    const int n = rows ? nthreads : fr_team(nthreads, B, H);
    tm->nthreads = nthreads < 1 ? 1 : nthreads;
    tm->xbm = xbm != 0;
    tm->zbm = G == 1;   /* the RNN projects into its (batch-major) outputs */
    tm->rows = n > 1 && rows;
    tm->proj = 0;
#ifdef FR_F32
    tm->proj = work && I > 0 && B >= FR_PROJ_MIN_B;
#else
    (void)G, (void)T, (void)I, (void)W, (void)U, (void)work;
#endif
    fr_barrier_init(&tm->bar);
    if (!tm->rows) {
        fr_pool_run(n, job, arg);
        return;
    }
    tm->npieces = fr_pieces(T * B, 64, n);
    tm->nblocks = fr_pieces(B, FR_MIN_ROWS, n);
    fr_work_init(&tm->items[0]);
    fr_work_init(&tm->items[1]);
#ifdef FR_F32
    if (work)   /* one shared copy of U (and W) in panels, before the team starts */
        fr_pack_panels(H, H, G, 0, H, U, work);
    if (tm->proj)
        fr_pack_panels(I, H, G, 0, H, W,
                       FN(w_panels_slot)(work, G, I, H, B, tm->nthreads, 0, 1, 0));
#endif
    fr_pool_run_flexible(n, job, arg);
}

/* Pieces [r0, r1) (in x's order, see project) of a forward's input
 * projection z = x W (G gate blocks), on the shared packed W when the team
 * projects on panels, else by BLAS. */
static void FN(project_rows)(const BLAS_T *blas, const FN(fwd_team) *tm, REAL *work,
                             int r0, int r1, int G, int T, int B, int I, int H,
                             const REAL *x, const REAL *W, REAL *z)
{
    const REAL *panels = NULL;
#ifdef FR_F32
    if (tm->proj)
        panels = FN(w_panels_slot)(work, G, I, H, B, tm->nthreads, 0, 1, 0);
#else
    (void)work;
#endif
    FN(project)(blas, panels, tm->xbm, tm->zbm, r0, r1, G, T, B, I, H, 0, H, x, W, z);
}

/* The unit split's input projection: a thread's own columns (units
 * [j0, j0 + w) of each gate block) of every row on its packed columns of
 * W, so that no thread waits for another before the first step (proj);
 * else its rows [r0, r1) of all columns by BLAS (and the team meets
 * before the first step).  Returns whether the team must meet. */
static int FN(project_own)(const BLAS_T *blas, const FN(fwd_team) *tm, REAL *work,
                           int tid, int n, int G, int T, int B, int I, int H, int j0,
                           int w, const REAL *x, const REAL *W, REAL *z)
{
#ifdef FR_F32
    if (tm->proj) {
        if (w > 0) {
            REAL *Wp = FN(w_panels_slot)(work, G, I, H, B, tm->nthreads, tid, 0, j0);
            fr_pack_panels(I, H, G, j0, w, W, Wp);
            FN(project)(blas, Wp, tm->xbm, tm->zbm, 0, T * B, G, T, B, I, H, j0, w, x, W,
                        z);
        }
        return 0;
    }
#else
    (void)work, (void)j0, (void)w;
#endif
    int r0, r1;
    fr_split(T * B, 1, tid, n, &r0, &r1);
    FN(project)(blas, NULL, tm->xbm, tm->zbm, r0, r1, G, T, B, I, H, 0, H, x, W, z);
    return 1;
}

/* The row split's input projection.  With x batch-major, each block of
 * batch rows projects its own rows just before its steps (project_block),
 * so that its pre-activations are still in cache when its steps read them
 * (all of them at once can outgrow the cache: LSTM 128x20x32x64, 2.6 MB).
 * Else (a time-major copy of x) pieces of all rows first, claimed by
 * whichever threads run, before any block starts. */
static void FN(project_pieces)(FN(fwd_team) *tm, const BLAS_T *blas, REAL *work, int G,
                               int T, int B, int I, int H, const REAL *x, const REAL *W,
                               REAL *z)
{
    int k;
    if (tm->xbm)
        return;
    while ((k = fr_work_claim(&tm->items[0], tm->npieces)) >= 0) {
        int r0, r1;
        fr_split(T * B, 1, k, tm->npieces, &r0, &r1);
        FN(project_rows)(blas, tm, work, r0, r1, G, T, B, I, H, x, W, z);
        fr_work_finish(&tm->items[0]);
    }
    fr_work_wait(&tm->items[0], tm->npieces);
}

static void FN(project_block)(FN(fwd_team) *tm, const BLAS_T *blas, REAL *work, int G,
                              int T, int B, int I, int H, const REAL *x, const REAL *W,
                              REAL *z, int b0, int b1)
{
    if (tm->xbm)   /* x's rows b * T + t of batch rows [b0, b1) */
        FN(project_rows)(blas, tm, work, b0 * T, b1 * T, G, T, B, I, H, x, W, z);
}

/* The row split: the input projection (project_pieces, project_block),
 * and blocks of batch rows that run the whole time loop, claimed by
 * whichever threads are running (a late thread takes fewer; work's shared
 * packed U was packed by the caller before the team started). */
static void FN(lstm_forward_rows)(FN(lstm_fwd_args) *a)
{
    const int T = a->T, B = a->B, H = a->H, training = a->training;
    const size_t BH = (size_t)B * H, BG = (size_t)B * 4 * H;
    int k;
    FN(project_pieces)(&a->tm, a->blas, a->work, 4, T, B, a->I, H, a->x, a->W, a->gates);
    while ((k = fr_work_claim(&a->tm.items[1], a->tm.nblocks)) >= 0) {
        int b0, b1;
        fr_split(B, 1, k, a->tm.nblocks, &b0, &b1);
        FN(project_block)(&a->tm, a->blas, a->work, 4, T, B, a->I, H, a->x, a->W,
                          a->gates, b0, b1);
        const int Bk = b1 - b0;
        const size_t oh = (size_t)b0 * H, og = (size_t)b0 * 4 * H;
        REAL *Up = NULL, *rec = NULL;   /* (float64: BLAS, rec stays NULL) */
        int ldr = 0;
        (void)Up;
#ifdef FR_F32
        const int np = fr_panels(4 * H);
        if (a->work)   /* float32: the shared panels, this block's rec rows */
            FN(scratch_slots)(a->work, H, 4, H, B, a->tm.nthreads, 0, 1, 0, H, b0,
                              &Up, &rec, &ldr);
#endif
        for (int t = 0; t < T; t++) {
            REAL *z = a->gates + t * BG + og;
            const size_t prev = FN(state_slot)(training, t - 1) * BH + oh;
            const size_t next = FN(state_slot)(training, t) * BH + oh;
            const unsigned char *m = a->mask ? a->mask + (size_t)t * B + b0 : NULL;
            const REAL *hp = a->hs + FN(state_slot)(0, t - 1) * BH + oh;
#ifdef FR_F32
            if (rec)
                fr_sgemm_panels(Bk, H, np, hp, H, Up, rec, ldr);
            else
#endif
            FN(recurrent_projection)(a->blas, 4, Bk, H, 0, H, hp, H, a->U, z, 4 * H);
            FN(lstm_cell)(Bk, H, 0, H, a->bias, m, z, rec, (size_t)ldr, hp, a->cs + prev,
                          a->hs + FN(state_slot)(0, t) * BH + oh, a->cs + next,
                          a->out + ((size_t)b0 * T + t) * H,
                          (size_t)T * H);
        }
        fr_work_finish(&a->tm.items[1]);
    }
}

/* The unit split (or one thread): each thread owns hidden units [j0, j1),
 * whose columns of U stay in its cache; the team meets once per step. */
static void FN(lstm_forward_job)(void *arg, int tid, int n)
{
    FN(lstm_fwd_args) *a = arg;
    if (a->tm.rows) {
        FN(lstm_forward_rows)(a);
        return;
    }
    const int T = a->T, B = a->B, H = a->H, training = a->training;
    const size_t BH = (size_t)B * H, BG = (size_t)B * 4 * H;
    int sense = 0;
    int j0, j1;
    fr_split(H, FR_CHUNK, tid, n, &j0, &j1);
    const int w = j1 - j0;
    const int meet = FN(project_own)(a->blas, &a->tm, a->work, tid, n, 4, T, B, a->I, H,
                                     j0, w, a->x, a->W, a->gates);
    /* The step's h U for this thread's units, by the fastest means:
     * - float32: this thread's columns of U packed once in panels
     *   (fr_sgemm_panels), one product per step into rec;
     * - float64 at batch 1 with several threads: its columns of U packed
     *   once, gate blocks side by side (H, 4w), one GEMV per step into rec
     *   (not one per gate block), on a block that stays in this core's cache;
     * - otherwise BLAS adds h U into z in place (one GEMM for the whole
     *   layer, or one per gate block).
     * work (see fr_lstm_forward_work) holds the packed weights, then rec. */
    int mode = 0;                                     /* 0 BLAS, 1 GEMV, 2 panels */
    if (a->work && w > 0) {
#ifdef FR_F32
        if (B >= FR_PANEL_MIN_ROWS)
            mode = 2;
        else
#endif
        if (B == 1 && w < H)
            mode = 1;
    }
    REAL *Up = NULL, *rec = NULL;
    int ldr = 4 * w;
    if (mode) {
        FN(scratch_slots)(a->work, H, 4, H, B, a->tm.nthreads, tid, 0, j0, w, 0,
                          &Up, &rec, &ldr);
        if (mode == 1)
            ldr = 4 * w;
    }
#ifdef FR_F32
    const int np = fr_panels(4 * w);
    if (mode == 2)
        fr_pack_panels(H, H, 4, j0, w, a->U, Up);
#endif
    if (mode == 1) {
        for (int k = 0; k < H; k++)
            for (int q = 0; q < 4; q++)
                memcpy(Up + (size_t)k * 4 * w + (size_t)q * w,
                       a->U + (size_t)k * 4 * H + (size_t)q * H + j0,
                       (size_t)w * sizeof(REAL));
    }
    if (meet)   /* every row's input projection done */
        fr_barrier_wait(&a->tm.bar, n, &sense);
    for (int t = 0; t < T; t++) {
        REAL *z = a->gates + t * BG;
        const size_t prev = FN(state_slot)(training, t - 1) * BH;
        const size_t next = FN(state_slot)(training, t) * BH;
        const REAL *hp = a->hs + FN(state_slot)(0, t - 1) * BH;
        const unsigned char *m = a->mask ? a->mask + (size_t)t * B : NULL;
        if (w > 0) {
#ifdef FR_F32
            if (mode == 2)
                fr_sgemm_panels(B, H, np, hp, H, Up, rec, ldr);
            else
#endif
            if (mode == 1)
                FN(gemm_rm)(a->blas, 0, 0, 1, 4 * w, H, 1, hp, H, Up, 4 * w, 0,
                            rec, 4 * w);
            else
                FN(recurrent_projection)(a->blas, 4, B, H, j0, j1, hp, H, a->U, z, 4 * H);
            FN(lstm_cell)(B, H, j0, j1, a->bias, m, z, rec, (size_t)ldr, hp, a->cs + prev,
                          a->hs + FN(state_slot)(0, t) * BH, a->cs + next,
                          a->out + (size_t)t * H, (size_t)T * H);
        }
        fr_barrier_wait(&a->tm.bar, n, &sense);
    }
}

int FN(fr_lstm_forward)(const BLAS_T *blas, int nthreads, int training,
                        int batch_major, int T, int B,
                        int I, int H, const REAL *x, const REAL *W,
                        const REAL *U, const REAL *bias,
                        const unsigned char *mask, REAL *hs, REAL *cs,
                        REAL *gates, REAL *out, REAL *work)
{
    if (!blas || !blas->gemm || !blas->gemv || !out || FN(check_sizes)(T, B, I, H, 4))
        return 1;
    FN(lstm_fwd_args) a = {blas, training, T, B, I, H, x, W, U, bias, mask,
                           hs, cs, gates, out, work};
    FN(run_forward)(&a.tm, FN(lstm_forward_job), &a, nthreads, batch_major, 4, T, B, I, H,
                    W, U, work);
    return 0;
}

/* Row (t, b) of the reading-order, time-major view of a batch-major
 * (B, T, I) array a: time step t, or T-1-t when reverse. */
static inline size_t FN(tm_row)(int T, int B, int I, int reverse, size_t r)
{
    const size_t t = r / (size_t)B, b = r % (size_t)B;
    return (b * (size_t)T + (reverse ? (size_t)T - 1 - t : t)) * (size_t)I;
}

/* Row b of h_{t-1}, which the forward kept in its outputs out (B, T, H):
 * out[b, t-1], or h0[b] up to the row's first unmasked step first[b]
 * (first NULL: no mask), before which out holds zeros (Keras's rule). */
static inline const REAL *FN(h_prev)(const REAL *h0, const REAL *out, const int *first,
                                     int T, int H, int t, int b)
{
    if (first ? t <= first[b] : t == 0)
        return h0 + (size_t)b * H;
    return out + ((size_t)b * T + t - 1) * H;
}

/* The weight gradients of the chunk of steps [t0, t1), whose
 * pre-activation gradients are in dz (t1 - t0, B, G*H), with x and dx
 * batch-major (B, T, I) (time reversed when reverse), in two parts:
 * rows [r0, r1) of the chunk: x's rows gathered into xs, dx's rows =
 * dz W^T computed into xs's second part and scattered to dx, and the rows
 * of h_{t-1} gathered into its third part; then, once every row is in xs,
 * columns [c0, c1): dW = x^T dz, dU = h_{t-1}^T dz and db = column sums of
 * dz, set on the first chunk and accumulated after.  xs:
 * (t1 - t0) * B * (2 * I + H) scratch. */
static void FN(weight_grads_rows)(const BLAS_T *blas, int r0, int r1, int t0, int t1,
                                  int T, int B, int I, int H, int GH, int reverse,
                                  const REAL *x, const REAL *W, const REAL *Wt,
                                  const REAL *h0, const REAL *out, const int *first,
                                  const REAL *dz, REAL *xs, REAL *dx)
{
    const int R = (t1 - t0) * B;
    const size_t row0 = (size_t)t0 * B;   /* the chunk's first (t, b) row */
    if (r1 <= r0)
        return;
    REAL *hc = xs + (size_t)2 * R * I;
    for (int r = r0; r < r1; r++) {
        const int t = t0 + r / B, b = r % B;
        memcpy(hc + (size_t)r * H, FN(h_prev)(h0, out, first, T, H, t, b),
               (size_t)H * sizeof(REAL));
    }
    if (I <= 0)
        return;
    REAL *xc = xs + (size_t)r0 * I, *dxc = xs + ((size_t)R + r0) * I;
    for (int r = r0; r < r1; r++)
        memcpy(xc + (size_t)(r - r0) * I, x + FN(tm_row)(T, B, I, reverse, row0 + r),
               (size_t)I * sizeof(REAL));
#ifdef FR_F32
    if (Wt)   /* W^T packed in panels (float32, from FR_PROJ_MIN_B rows) */
        fr_project_panels(r1 - r0, GH, I, 1, 0, I, dz + (size_t)r0 * GH, Wt, dxc,
                          (size_t)I);
    else
#endif
    FN(gemm_rm)(blas, 0, 1, r1 - r0, I, GH, 1, dz + (size_t)r0 * GH, GH, W, GH,
                0, dxc, I);
    for (int r = r0; r < r1; r++)
        memcpy(dx + FN(tm_row)(T, B, I, reverse, row0 + r), dxc + (size_t)(r - r0) * I,
               (size_t)I * sizeof(REAL));
}

static void FN(weight_grads_cols)(const BLAS_T *blas, int c0, int c1, int first,
                                  int t0, int t1, int B, int I, int H, int GH,
                                  const REAL *dz, const REAL *xs,
                                  REAL *dW, REAL *dU, REAL *db)
{
    const int R = (t1 - t0) * B, ld_x = I > 0 ? I : 1;
    const REAL *hc = xs + (size_t)2 * R * I;   /* the rows of h_{t-1} */
    const REAL beta = first ? 0 : 1;
    if (c1 <= c0)
        return;
#ifdef FR_F32
    (void)blas, (void)ld_x, (void)beta;
    fr_sgemm_tn2(I, xs, ld_x, H, hc, H, R, c1 - c0, dz + c0, GH,
                 dW + c0, dU + c0, GH, db + c0, !first);
#else
    if (I > 0)
        FN(gemm_rm)(blas, 1, 0, I, c1 - c0, R, 1, xs, ld_x, dz + c0, GH,
                    beta, dW + c0, GH);
    FN(gemm_rm)(blas, 1, 0, H, c1 - c0, R, 1, hc, H, dz + c0, GH,
                beta, dU + c0, GH);
    if (first)
        for (int j = c0; j < c1; j++)
            db[j] = 0;
    for (size_t r = 0; r < (size_t)R; r++) {
        const REAL *row = dz + r * GH;
        for (int j = c0; j < c1; j++)
            db[j] += row[j];
    }
#endif
}

/* Both parts on a team of n that meets at bar (thread tid's rows and
 * columns), or, with items (a flexible job: two fr_work phases), in pieces
 * claimed by whichever threads run. */
static void FN(weight_grads)(const BLAS_T *blas, int tid, int n, fr_barrier *bar,
                             int *sense, fr_work *items, int first, int t0, int t1,
                             int T, int B, int I, int H, int G, int reverse,
                             const REAL *x, const REAL *W, const REAL *Wt,
                             const REAL *h0, const REAL *out, const int *firsts,
                             const REAL *dz, REAL *xs, REAL *dx,
                             REAL *dW, REAL *dU, REAL *db)
{
    const int GH = G * H, R = (t1 - t0) * B;
    int r0, r1, c0, c1;
    if (!items) {
        fr_split(R, 1, tid, n, &r0, &r1);
        FN(weight_grads_rows)(blas, r0, r1, t0, t1, T, B, I, H, GH, reverse, x, W, Wt,
                              h0, out, firsts, dz, xs, dx);
        fr_barrier_wait(bar, n, sense);   /* the chunk's x rows are all in xs */
        fr_split(GH, FR_CHUNK, tid, n, &c0, &c1);
        FN(weight_grads_cols)(blas, c0, c1, first, t0, t1, B, I, H, GH, dz, xs,
                              dW, dU, db);
        return;
    }
    const int nr = fr_pieces(R, 64, n), nc = fr_pieces(GH, FR_CHUNK, n);
    int k;
    while ((k = fr_work_claim(&items[0], nr)) >= 0) {
        fr_split(R, 1, k, nr, &r0, &r1);
        FN(weight_grads_rows)(blas, r0, r1, t0, t1, T, B, I, H, GH, reverse, x, W, Wt,
                              h0, out, firsts, dz, xs, dx);
        fr_work_finish(&items[0]);
    }
    fr_work_wait(&items[0], nr);
    while ((k = fr_work_claim(&items[1], nc)) >= 0) {
        fr_split(GH, FR_CHUNK, k, nc, &c0, &c1);
        FN(weight_grads_cols)(blas, c0, c1, first, t0, t1, B, I, H, GH, dz, xs,
                              dW, dU, db);
        fr_work_finish(&items[1]);
    }
    fr_work_wait(&items[1], nc);
}

/* dh[:, j0:j1] += d[:, j0:j1], d's rows ld apart */
static void FN(add_cols)(int B, int H, int j0, int j1, const REAL *restrict d,
                         size_t ld, REAL *restrict dh)
{
    for (int b = 0; b < B; b++)
        FR_IVDEP
        for (int j = j0; j < j1; j++)
            dh[(size_t)b * H + j] += d[(size_t)b * ld + j];
}

/* dh_{t-1}[:, j0:j1] = dz_t U[j0:j1, :]^T; masked rows keep dh. */
static void FN(recurrent_grad)(const BLAS_T *blas, int G, int B, int H, int j0,
                               int j1, const unsigned char *m, const REAL *dzt,
                               const REAL *U, REAL *dh, REAL *work)
{
    const int GH = G * H;
    const REAL *Uj = U + (size_t)j0 * GH;
    if (!m) {
        FN(gemm_rm)(blas, 0, 1, B, j1 - j0, GH, 1, dzt, GH, Uj, GH, 0, dh + j0, H);
        return;
    }
    FN(gemm_rm)(blas, 0, 1, B, j1 - j0, GH, 1, dzt, GH, Uj, GH, 0, work + j0, H);
    for (int b = 0; b < B; b++)
        if (m[b])
            FR_IVDEP
            for (int j = j0; j < j1; j++)
                dh[(size_t)b * H + j] = work[(size_t)b * H + j];
}

/* The arguments of one backward call, LSTM (G = 4) or RNN (G = 1, act; cs
 * and gates NULL); rows and items as in the forward's (items: three fr_work
 * phases per chunk: row blocks, then the weight gradients' rows and
 * columns). */
typedef struct {
    const BLAS_T *blas;
    int G, act, T, Tc, B, I, H;
    const REAL *x, *W, *U;
    const unsigned char *mask;
    const REAL *h0, *out, *cs, *gates, *d_out;
    REAL *dh, *dc, *dx, *dW, *dU, *db, *dz, *work, *pack, *xs;
    int reverse, nthreads, rows, nblocks;
    int *first;   /* with a mask: each row's first unmasked step (T: none) */
    REAL *Wt;   /* float32 from FR_PROJ_MIN_B rows: W^T packed in panels (for dx) */
    fr_barrier bar;
    fr_work *items;
} FN(bwd_args);

/* -------------------------------------------------------------- RNN --- */

FR_VECTORIZE
static void FN(rnn_cell)(int B, int H, int j0, int j1, int act,
                         const REAL *restrict bias, const unsigned char *mask,
                         const REAL *restrict hprev, size_t ldp, REAL *restrict h,
                         size_t ldh)
{
    /* h (rows ldh apart: the outputs) holds the step's pre-activations
     * x W + h U on entry, and the new h on exit (in place: the forward pass
     * keeps no other buffer); rows of h_{t-1} ldp apart */
    for (int b = 0; b < B; b++) {
        const REAL *restrict hp = hprev + (size_t)b * ldp;
        REAL *restrict hn = h + (size_t)b * ldh;
        if (mask && !mask[b]) {
            FR_IVDEP
            for (int j = j0; j < j1; j++)
                hn[j] = hp[j];
        } else if (act == FR_ACT_TANH) {
            FR_IVDEP
            for (int j = j0; j < j1; j++)
                hn[j] = TANH(hn[j] + bias[j]);
        } else if (act == FR_ACT_RELU) {
            FR_IVDEP
            for (int j = j0; j < j1; j++) {
                REAL v = hn[j] + bias[j];
                hn[j] = v > 0 ? v : (v == v ? (REAL)0 : v);   /* NaN stays NaN */
            }
        } else {
            FR_IVDEP
            for (int j = j0; j < j1; j++)
                hn[j] += bias[j];
        }
    }
}

FR_VECTORIZE
static void FN(rnn_cell_grad)(int B, int H, int j0, int j1, int act,
                              const unsigned char *mask,
                              const REAL *restrict h, size_t ldh, const REAL *restrict dh,
                              REAL *restrict dz)
{
    for (int b = 0; b < B; b++) {
        const REAL *restrict hr = h + (size_t)b * ldh;
        const REAL *restrict dhr = dh + (size_t)b * H;
        REAL *restrict dzr = dz + (size_t)b * H;
        if (mask && !mask[b]) {
            FR_IVDEP
            for (int j = j0; j < j1; j++)
                dzr[j] = 0;
        } else if (act == FR_ACT_TANH) {
            FR_IVDEP
            for (int j = j0; j < j1; j++)
                dzr[j] = dhr[j] * (1 - hr[j] * hr[j]);
        } else if (act == FR_ACT_RELU) {
            FR_IVDEP
            for (int j = j0; j < j1; j++)
                dzr[j] = dhr[j] * (hr[j] > 0 ? (REAL)1 : (REAL)0);
        } else {
            FR_IVDEP
            for (int j = j0; j < j1; j++)
                dzr[j] = dhr[j];
        }
    }
}

/* The arguments of one RNN forward call; rows and items as in the LSTM's. */
typedef struct {
    const BLAS_T *blas;
    int act, T, B, I, H;
    const REAL *x, *W, *U, *bias;
    const unsigned char *mask;
    const REAL *h0;
    REAL *out, *work;
    FN(fwd_team) tm;
} FN(rnn_fwd_args);

/* Steps 0..T-1 for batch rows [b0, b1) and units [j0, j1) (meeting at bar
 * after each step when given): h U on Up (float32 panels, into rec, then
 * added) or by BLAS, into out[:, t], which holds x W (see rnn_cell);
 * h_{t-1} is h0 or out[:, t-1]. */
static void FN(rnn_steps)(FN(rnn_fwd_args) *a, int b0, int b1, int j0, int j1,
                          const REAL *Up, REAL *rec, int ldr, fr_barrier *bar, int n,
                          int *sense)
{
    const int T = a->T, B = a->B, H = a->H, Bk = b1 - b0, w = j1 - j0;
    const int ldo = T * H;   /* (fits an int: check_sizes) */
    REAL *const ob = a->out + (size_t)b0 * ldo;
    for (int t = 0; t < T; t++) {
        REAL *zt = ob + (size_t)t * H;   /* x W, then h */
        const REAL *hp = t ? zt - H : a->h0 + (size_t)b0 * H;
        const int ldp = t ? ldo : H;
        const unsigned char *m = a->mask ? a->mask + (size_t)t * B + b0 : NULL;
        if (w > 0 && Bk > 0) {
#ifdef FR_F32
            if (rec) {
                fr_sgemm_panels(Bk, H, fr_panels(w), hp, ldp, Up, rec, ldr);
                for (int b = 0; b < Bk; b++) {
                    REAL *restrict zr = zt + (size_t)b * ldo + j0;
                    const REAL *restrict rr = rec + (size_t)b * ldr;
                    FR_IVDEP
                    for (int u = 0; u < w; u++)
                        zr[u] += rr[u];
                }
            } else
#endif
            FN(recurrent_projection)(a->blas, 1, Bk, H, j0, j1, hp, ldp, a->U, zt, ldo);
            FN(rnn_cell)(Bk, H, j0, j1, a->act, a->bias, m, hp, (size_t)ldp, zt,
                         (size_t)ldo);
        }
        if (bar)
            fr_barrier_wait(bar, n, sense);
    }
}

static void FN(rnn_forward_job)(void *arg, int tid, int n)
{
    FN(rnn_fwd_args) *a = arg;
    const int T = a->T, B = a->B, H = a->H;
    int sense = 0, k;
    REAL *Up = NULL, *rec = NULL;
    int ldr = 0;
    if (a->tm.rows) {   /* as the LSTM's lstm_forward_rows */
        FN(project_pieces)(&a->tm, a->blas, a->work, 1, T, B, a->I, H, a->x, a->W,
                           a->out);
        while ((k = fr_work_claim(&a->tm.items[1], a->tm.nblocks)) >= 0) {
            int b0, b1;
            fr_split(B, 1, k, a->tm.nblocks, &b0, &b1);
            FN(project_block)(&a->tm, a->blas, a->work, 1, T, B, a->I, H, a->x, a->W,
                              a->out, b0, b1);
#ifdef FR_F32
            if (a->work)
                FN(scratch_slots)(a->work, H, 1, H, B, a->tm.nthreads, 0, 1, 0, H, b0,
                                  &Up, &rec, &ldr);
#endif
            FN(rnn_steps)(a, b0, b1, 0, H, Up, rec, ldr, NULL, 1, &sense);
            fr_work_finish(&a->tm.items[1]);
        }
        return;
    }
    int j0, j1;
    fr_split(H, FR_CHUNK, tid, n, &j0, &j1);
    const int w = j1 - j0;
    /* the pre-activations go straight into the outputs (see rnn_cell) */
    const int meet = FN(project_own)(a->blas, &a->tm, a->work, tid, n, 1, T, B, a->I, H,
                                     j0, w, a->x, a->W, a->out);
    /* float32 with work: the step's h U on this thread's columns of U
     * packed once in panels, as in the LSTM forward (rec, then added into
     * out[:, t]); else BLAS adds it there in place. */
#ifdef FR_F32
    if (a->work && w > 0) {
        FN(scratch_slots)(a->work, H, 1, H, B, a->tm.nthreads, tid, 0, j0, w, 0,
                          &Up, &rec, &ldr);
        fr_pack_panels(H, H, 1, j0, w, a->U, Up);
    }
#endif
    if (meet)
        fr_barrier_wait(&a->tm.bar, n, &sense);
    FN(rnn_steps)(a, 0, B, j0, j1, Up, rec, ldr, &a->tm.bar, n, &sense);
}

int FN(fr_rnn_forward)(const BLAS_T *blas, int nthreads, int act, int batch_major,
                       int T, int B, int I,
                       int H, const REAL *x, const REAL *W, const REAL *U,
                       const REAL *bias, const unsigned char *mask, const REAL *h0,
                       REAL *out, REAL *work)
{
    if (!blas || !blas->gemm || !blas->gemv || !out || !h0 ||
        FN(check_sizes)(T, B, I, H, 1) || act < 0 || act > 2)
        return 1;
    FN(rnn_fwd_args) a = {blas, act, T, B, I, H, x, W, U, bias, mask, h0, out, work};
    FN(run_forward)(&a.tm, FN(rnn_forward_job), &a, nthreads, batch_major, 1, T, B, I, H,
                    W, U, work);
    return 0;
}

/* Steps t1-1 down to t0 for batch rows [b0, b1) and units [j0, j1), LSTM
 * (G = 4) or RNN (G = 1): add the output gradient, the gate pass, and
 * (after the team meets, when bar is given: the unit split, where the
 * product reads every thread's dz_t) dh_{t-1} = dz_t U^T, on Pk (float32
 * packed panels, through tmp) or BLAS. */
static void FN(grad_steps)(FN(bwd_args) *a, int t0, int t1, int b0, int b1,
                           int j0, int j1, const REAL *Pk, REAL *tmp, int ldt,
                           fr_barrier *bar, int n, int *sense)
{
    const int T = a->T, B = a->B, H = a->H, G = a->G, Bk = b1 - b0, w = j1 - j0;
    const size_t BH = (size_t)B * H, BG = (size_t)B * G * H, ld_out = (size_t)T * H;
    const size_t oh = (size_t)b0 * H, og = (size_t)b0 * G * H;
    for (int t = t1 - 1; t >= t0; t--) {
        const unsigned char *m = a->mask ? a->mask + (size_t)t * B + b0 : NULL;
        REAL *dzt = a->dz + (size_t)(t - t0) * BG;
        if (w > 0 && Bk > 0) {
            FN(add_cols)(Bk, H, j0, j1, a->d_out + (size_t)b0 * ld_out + (size_t)t * H,
                         ld_out, a->dh + oh);
            if (G == 4)
                FN(lstm_cell_grad)(Bk, H, j0, j1, m, a->gates + t * BG + og,
                                   a->cs + (t + 1) * BH + oh, a->cs + t * BH + oh,
                                   a->dh + oh, a->dc + oh, dzt + og);
            else
                FN(rnn_cell_grad)(Bk, H, j0, j1, a->act, m,
                                  a->out + (size_t)b0 * ld_out + (size_t)t * H, ld_out,
                                  a->dh + oh, dzt + og);
        }
        if (bar)
            fr_barrier_wait(bar, n, sense);
        if (w > 0 && Bk > 0) {
#ifdef FR_F32
            if (tmp)
                FN(packed_recurrent_grad)(Bk, G * H, H, j0, w, m, dzt + og, Pk,
                                          tmp, ldt, a->dh + oh);
            else
#endif
            FN(recurrent_grad)(a->blas, G, Bk, H, j0, j1, m, dzt + og, a->U,
                               a->dh + oh, a->work + oh);
        }
    }
}

/* -------------------------------------------------- backward, both --- */

/* A backward pass's team job, LSTM or RNN: chunks of Tc steps from the
 * end, each a time loop (units split: this thread's units of every row,
 * meeting per step; row split: row blocks claimed from the chunk's items)
 * followed by the chunk's weight gradients. */
static void FN(backward_job)(void *arg, int tid, int n)
{
    FN(bwd_args) *a = arg;
    const int T = a->T, Tc = a->Tc, B = a->B, H = a->H, GH = a->G * H;
    int sense = 0, j0 = 0, j1 = H;
    if (!a->rows)
        fr_split(H, FR_CHUNK, tid, n, &j0, &j1);
    const int w = j1 - j0;
    (void)w, (void)GH;   /* float64: BLAS only */
    /* float32 with pack: dz U^T on U's rows packed once (transposed, in
     * panels; the row split shares one copy the caller packed) into tmp, as
     * in the forward pass; else BLAS. */
    REAL *Pk = NULL, *tmp = NULL;
    int ldt = 0;
#ifdef FR_F32
    if (a->pack && w > 0 && !a->rows) {
        FN(scratch_slots)(a->pack, GH, 1, H, B, a->nthreads, tid, 0, j0, w, 0,
                          &Pk, &tmp, &ldt);
        fr_pack_t_panels(GH, j0, w, a->U, Pk);
    }
    if (a->Wt && !a->rows) {   /* this thread's panels of W^T, used after a meeting */
        int i0, i1;
        fr_split(a->I, FR_NR, tid, n, &i0, &i1);
        if (i1 > i0)
            fr_pack_t_panels(GH, i0, i1 - i0, a->W, a->Wt + (size_t)(i0 / FR_NR) * GH * FR_NR);
    }
#endif
    /* chunks [t0, t1) of Tc steps from the end; step t's dz is dz[t - t0] */
    fr_work *items = a->items;
    for (int t1 = T; t1 > 0; t1 -= Tc) {
        const int t0 = t1 > Tc ? t1 - Tc : 0;
        if (!a->rows) {
            /* units split: the last step's meeting completes the chunk's dz */
            FN(grad_steps)(a, t0, t1, 0, B, j0, j1, Pk, tmp, ldt, &a->bar, n, &sense);
        } else {
            int k;
            while ((k = fr_work_claim(&items[0], a->nblocks)) >= 0) {
                int b0, b1;
                fr_split(B, 1, k, a->nblocks, &b0, &b1);
#ifdef FR_F32
                if (a->pack)
                    FN(scratch_slots)(a->pack, GH, 1, H, B, a->nthreads, 0, 1, 0,
                                      H, b0, &Pk, &tmp, &ldt);
#endif
                FN(grad_steps)(a, t0, t1, b0, b1, 0, H, Pk, tmp, ldt, NULL, 1, &sense);
                fr_work_finish(&items[0]);
            }
            fr_work_wait(&items[0], a->nblocks);
        }
        FN(weight_grads)(a->blas, tid, n, &a->bar, &sense, a->rows ? items + 1 : NULL,
                         t1 == T, t0, t1, T, B, a->I, H, a->G, a->reverse, a->x,
                         a->W, a->Wt, a->h0, a->out, a->first, a->dz, a->xs, a->dx,
                         a->dW, a->dU, a->db);
        if (a->rows)
            items += 3;
        else if (t0 > 0)
            fr_barrier_wait(&a->bar, n, &sense);   /* the next chunk overwrites dz */
    }
}

/* Run a backward pass whose arguments a are filled in but for the team
 * fields and first: on a team that splits the hidden units, or, for the
 * row split, a flexible team with three fr_work phases per chunk and the
 * weights packed once by the caller (returns nonzero when the phases
 * cannot be allocated). */
static int FN(run_backward_team)(FN(bwd_args) *a, int nthreads)
{
    const int B = a->B, H = a->H, n = fr_team(nthreads, B, H);
    a->nthreads = nthreads < 1 ? 1 : nthreads;
    a->rows = n > 1 && fr_split_rows(B, H, n);
    a->nblocks = fr_pieces(B, FR_MIN_ROWS, n);
    a->items = NULL;
    a->Wt = NULL;
#ifdef FR_F32
    if (a->pack && fr_backward_packs_wt(a->G, B, a->I, H, a->nthreads))   /* after U^T */
        a->Wt = a->pack + ((size_t)H + (size_t)FR_NR_ALL * a->nthreads) * ((size_t)a->G * H + B);
#endif
    fr_barrier_init(&a->bar);
    if (!a->rows) {
        fr_pool_run(n, FN(backward_job), a);
        return 0;
    }
    const int nchunks = (a->T + a->Tc - 1) / a->Tc;
    fr_work *w = malloc((size_t)3 * nchunks * sizeof *w);
    if (!w)
        return 1;
    for (int i = 0; i < 3 * nchunks; i++)
        fr_work_init(&w[i]);
    a->items = w;
#ifdef FR_F32
    if (a->pack)   /* one shared copy (and of W^T), before the team starts */
        fr_pack_t_panels(a->G * H, 0, H, a->U, a->pack);
    if (a->Wt)
        fr_pack_t_panels(a->G * H, 0, a->I, a->W, a->Wt);
#endif
    fr_pool_run_flexible(n, FN(backward_job), a);
    free(w);
    return 0;
}

/* run_backward_team, with each row's first unmasked step found first when
 * there is a mask (see h_prev). */
static int FN(run_backward)(FN(bwd_args) *a, int nthreads)
{
    a->first = NULL;
    if (a->mask) {
        const int T = a->T, B = a->B;
        a->first = malloc((size_t)B * sizeof *a->first);
        if (!a->first)
            return 1;
        for (int b = 0; b < B; b++)
            a->first[b] = T;
        for (int t = T - 1; t >= 0; t--)
            for (int b = 0; b < B; b++)
                if (a->mask[(size_t)t * B + b])
                    a->first[b] = t;
    }
    const int rc = FN(run_backward_team)(a, nthreads);
    free(a->first);
    return rc;
}

int FN(fr_lstm_backward)(const BLAS_T *blas, int nthreads, int reverse, int T, int Tc,
                         int B, int I, int H, const REAL *x, const REAL *W,
                         const REAL *U, const unsigned char *mask, const REAL *h0,
                         const REAL *out, const REAL *cs, const REAL *gates,
                         const REAL *d_out, REAL *dh, REAL *dc, REAL *dx, REAL *dW,
                         REAL *dU, REAL *db, REAL *dz, REAL *work, REAL *pack, REAL *xs)
{
    if (!blas || !blas->gemm || !blas->gemv || FN(check_sizes)(T, B, I, H, 4) ||
        Tc < 1 || Tc > T || !xs || !h0 || !out)
        return 1;
    FN(bwd_args) a = {blas, 4, 0, T, Tc, B, I, H, x, W, U, mask, h0, out, cs, gates,
                      d_out, dh, dc, dx, dW, dU, db, dz, work, pack, xs,
                      reverse != 0};
    return FN(run_backward)(&a, nthreads);
}

int FN(fr_rnn_backward)(const BLAS_T *blas, int nthreads, int act, int reverse, int T,
                        int Tc, int B, int I, int H, const REAL *x, const REAL *W,
                        const REAL *U, const unsigned char *mask, const REAL *h0,
                        const REAL *out, const REAL *d_out, REAL *dh, REAL *dx,
                        REAL *dW, REAL *dU, REAL *db, REAL *dz, REAL *work, REAL *pack,
                        REAL *xs)
{
    if (!blas || !blas->gemm || !blas->gemv || FN(check_sizes)(T, B, I, H, 1) ||
        Tc < 1 || Tc > T || act < 0 || act > 2 || !xs || !h0 || !out)
        return 1;
    FN(bwd_args) a = {blas, 1, act, T, Tc, B, I, H, x, W, U, mask, h0, out, NULL, NULL,
                      d_out, dh, NULL, dx, dW, dU, db, dz, work, pack, xs,
                      reverse != 0};
    return FN(run_backward)(&a, nthreads);
}

#undef FN
#undef FR_CAT
#undef FR_CAT_

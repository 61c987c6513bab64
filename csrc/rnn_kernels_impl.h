/*
 * The kernels' bodies, written once and included twice by rnn_kernels.c:
 * with REAL = float (SUF f32) and with REAL = double (SUF f64).
 * Expected macros: REAL, SUF, GEMM_T, SIGMOID(x), TANH(x).
 */
#define FR_CAT_(a, b) a##_##b
#define FR_CAT(a, b) FR_CAT_(a, b)
#define FN(name) FR_CAT(name, SUF)

/* Row-major C (M x N) = alpha * op(A) (M x K) * op(B) (K x N) + beta * C,
 * computed by the column-major BLAS as C^T = op(B)^T op(A)^T: operands are
 * swapped, never copied. */
static void FN(gemm_rm)(GEMM_T gemm, int ta, int tb, int M, int N, int K,
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
    char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    gemm(&cb, &ca, &N, &M, &K, &alpha, (REAL *)Bm, &ldb, (REAL *)A, &lda,
         &beta, C, &ldc);
}

/* ------------------------------------------------------------- LSTM --- */

/* One step's gate pass for rows [b0, b1): z (B, 4H) holds x W + h U for the
 * step; writes h and c of the next step, and the activated gates back into
 * z. */
FR_VECTORIZE
static void FN(lstm_cell_rows)(int b0, int b1, int H,
                               const REAL *restrict bias,
                               const unsigned char *mask, REAL *restrict z,
                               const REAL *restrict hprev, const REAL *restrict cprev,
                               REAL *restrict hnext, REAL *restrict cnext)
{
    for (int b = b0; b < b1; b++) {
        REAL *restrict zr = z + (size_t)b * 4 * H;
        const REAL *restrict hp = hprev + (size_t)b * H;
        const REAL *restrict cp = cprev + (size_t)b * H;
        REAL *restrict hn = hnext + (size_t)b * H;
        REAL *restrict cn = cnext + (size_t)b * H;
        if (mask && !mask[b]) {
            for (int j = 0; j < H; j++) {
                hn[j] = hp[j];
                cn[j] = cp[j];
            }
            continue;
        }
        for (int j = 0; j < H; j++) {
            REAL i = SIGMOID(zr[j] + bias[j]);
            REAL f = SIGMOID(zr[H + j] + bias[H + j]);
            REAL g = TANH(zr[2 * H + j] + bias[2 * H + j]);
            REAL o = SIGMOID(zr[3 * H + j] + bias[3 * H + j]);
            REAL c = f * cp[j] + i * g;
            cn[j] = c;
            hn[j] = o * TANH(c);
            /* kept for backward; harmless scratch writes in inference */
            zr[j] = i;
            zr[H + j] = f;
            zr[2 * H + j] = g;
            zr[3 * H + j] = o;
        }
    }
}

/* One step's backward gate pass for rows [b0, b1).  dh already includes the
 * step's output gradient; on exit dc holds the gradient w.r.t. c_{t-1} and
 * dz the pre-activation gradients (zero for masked rows). */
FR_VECTORIZE
static void FN(lstm_cell_grad_rows)(int b0, int b1, int H,
                                    const unsigned char *mask,
                                    const REAL *restrict gates,
                                    const REAL *restrict c, const REAL *restrict cprev,
                                    const REAL *restrict dh, REAL *restrict dc,
                                    REAL *restrict dz)
{
    for (int b = b0; b < b1; b++) {
        const REAL *restrict gr = gates + (size_t)b * 4 * H;
        REAL *restrict dzr = dz + (size_t)b * 4 * H;
        const REAL *restrict cr = c + (size_t)b * H;
        const REAL *restrict cpr = cprev + (size_t)b * H;
        const REAL *restrict dhr = dh + (size_t)b * H;
        REAL *restrict dcr = dc + (size_t)b * H;
        if (mask && !mask[b]) {
            for (int j = 0; j < 4 * H; j++)
                dzr[j] = 0;
            continue;
        }
        for (int j = 0; j < H; j++) {
            REAL i = gr[j], f = gr[H + j], g = gr[2 * H + j], o = gr[3 * H + j];
            REAL tc = TANH(cr[j]);
            REAL dcc = dcr[j] + dhr[j] * o * (1 - tc * tc);
            dzr[j] = dcc * g * i * (1 - i);
            dzr[H + j] = dcc * cpr[j] * f * (1 - f);
            dzr[2 * H + j] = dcc * i * (1 - g * g);
            dzr[3 * H + j] = dhr[j] * tc * o * (1 - o);
            dcr[j] = dcc * f;
        }
    }
}

/* Split rows over OpenMP threads when there is enough work per step. */
#ifdef _OPENMP
#define FR_PAR_ROWS(B, H, nthreads, CALL)                                      \
    do {                                                                       \
        int nt_ = (nthreads);                                                  \
        if ((long)(B) * (H) < 16384 || nt_ <= 1 || (B) < 2) {                  \
            int b0 = 0, b1 = (B);                                              \
            CALL;                                                              \
        } else {                                                               \
            if (nt_ > (B)) nt_ = (B);                                          \
            _Pragma("omp parallel num_threads(nt_)")                           \
            {                                                                  \
                int tid_ = omp_get_thread_num(), n_ = omp_get_num_threads();   \
                int b0 = (int)((long)(B) * tid_ / n_);                         \
                int b1 = (int)((long)(B) * (tid_ + 1) / n_);                   \
                CALL;                                                          \
            }                                                                  \
        }                                                                      \
    } while (0)
#else
#define FR_PAR_ROWS(B, H, nthreads, CALL)                                      \
    do { int b0 = 0, b1 = (B); (void)(nthreads); CALL; } while (0)
#endif

static int FN(check_sizes)(int T, int B, int I, int H, int G)
{
    if (T < 1 || B < 1 || I < 0 || H < 1)
        return 1;
    /* every product used as a BLAS dimension must fit an int */
    if ((long long)T * B > 2147483647LL || (long long)G * H > 2147483647LL)
        return 1;
    return 0;
}

int FN(fr_lstm_forward)(GEMM_T gemm, int nthreads, int training, int T, int B,
                        int I, int H, const REAL *x, const REAL *W,
                        const REAL *U, const REAL *bias,
                        const unsigned char *mask, REAL *hs, REAL *cs,
                        REAL *gates)
{
    if (!gemm || FN(check_sizes)(T, B, I, H, 4))
        return 1;
    const size_t BH = (size_t)B * H, BG = (size_t)B * 4 * H;
    const int G4 = 4 * H, lda_x = I > 0 ? I : 1;
    /* the input projection of every step: one GEMM (T*B, I) x (I, 4H) */
    FN(gemm_rm)(gemm, 0, 0, T * B, G4, I, 1, x, lda_x, W, G4, 0, gates, G4);
    for (int t = 0; t < T; t++) {
        REAL *z = gates + t * BG;
        const REAL *hp = hs + t * BH;
        const REAL *cp = cs + (size_t)(training ? t : (t & 1)) * BH;
        REAL *cn = cs + (size_t)(training ? t + 1 : ((t + 1) & 1)) * BH;
        const unsigned char *m = mask ? mask + (size_t)t * B : NULL;
        /* the recurrent projection: one GEMM (B, H) x (H, 4H) */
        FN(gemm_rm)(gemm, 0, 0, B, G4, H, 1, hp, H, U, G4, 1, z, G4);
        FR_PAR_ROWS(B, H, nthreads,
                    FN(lstm_cell_rows)(b0, b1, H, bias, m, z, hp, cp,
                                       hs + (t + 1) * BH, cn));
    }
    return 0;
}

/* After the time loop: dx = dz W^T, dW = x^T dz, dU = hs[0:T]^T dz and
 * db = column sums of dz, as GEMMs over all T*B rows. */
static void FN(weight_grads)(GEMM_T gemm, int T, int B, int I, int H, int G,
                             const REAL *x, const REAL *W, const REAL *hs,
                             const REAL *dz, REAL *dx, REAL *dW, REAL *dU,
                             REAL *db)
{
    const int GH = G * H, TB = T * B, ld_x = I > 0 ? I : 1;
    FN(gemm_rm)(gemm, 0, 1, TB, I, GH, 1, dz, GH, W, GH, 0, dx, ld_x);
    FN(gemm_rm)(gemm, 1, 0, I, GH, TB, 1, x, ld_x, dz, GH, 0, dW, GH);
    FN(gemm_rm)(gemm, 1, 0, H, GH, TB, 1, hs, H, dz, GH, 0, dU, GH);
    for (int j = 0; j < GH; j++)
        db[j] = 0;
    for (size_t r = 0; r < (size_t)TB; r++) {
        const REAL *row = dz + r * GH;
        for (int j = 0; j < GH; j++)
            db[j] += row[j];
    }
}

/* dh = work on the rows that took the step; masked rows keep dh. */
static void FN(take_rows)(int B, int H, const unsigned char *m,
                          const REAL *work, REAL *dh)
{
    for (int b = 0; b < B; b++)
        if (m[b])
            for (int j = 0; j < H; j++)
                dh[(size_t)b * H + j] = work[(size_t)b * H + j];
}

static void FN(add_into)(size_t n, const REAL *restrict a, REAL *restrict acc)
{
    for (size_t k = 0; k < n; k++)
        acc[k] += a[k];
}

int FN(fr_lstm_backward)(GEMM_T gemm, int nthreads, int T, int B, int I, int H,
                         const REAL *x, const REAL *W, const REAL *U,
                         const unsigned char *mask, const REAL *hs,
                         const REAL *cs, const REAL *gates, const REAL *d_out,
                         REAL *dh, REAL *dc, REAL *dx, REAL *dW, REAL *dU,
                         REAL *db, REAL *dz, REAL *work)
{
    if (!gemm || FN(check_sizes)(T, B, I, H, 4))
        return 1;
    const size_t BH = (size_t)B * H, BG = (size_t)B * 4 * H;
    const int G4 = 4 * H;
    for (int t = T - 1; t >= 0; t--) {
        const unsigned char *m = mask ? mask + (size_t)t * B : NULL;
        REAL *dzt = dz + t * BG;
        FN(add_into)(BH, d_out + t * BH, dh);
        FR_PAR_ROWS(B, H, nthreads,
                    FN(lstm_cell_grad_rows)(b0, b1, H, m, gates + t * BG,
                                            cs + (t + 1) * BH, cs + t * BH,
                                            dh, dc, dzt));
        /* dh_{t-1} = dz_t U^T: one GEMM (B, 4H) x (4H, H) */
        if (m) {
            FN(gemm_rm)(gemm, 0, 1, B, H, G4, 1, dzt, G4, U, G4, 0, work, H);
            FN(take_rows)(B, H, m, work, dh);
        } else {
            FN(gemm_rm)(gemm, 0, 1, B, H, G4, 1, dzt, G4, U, G4, 0, dh, H);
        }
    }
    FN(weight_grads)(gemm, T, B, I, H, 4, x, W, hs, dz, dx, dW, dU, db);
    return 0;
}

/* -------------------------------------------------------------- RNN --- */

FR_VECTORIZE
static void FN(rnn_cell_rows)(int b0, int b1, int H, int act,
                              const REAL *restrict bias,
                              const unsigned char *mask, const REAL *restrict z,
                              const REAL *restrict hprev, REAL *restrict hnext)
{
    for (int b = b0; b < b1; b++) {
        const REAL *restrict zr = z + (size_t)b * H;
        const REAL *restrict hp = hprev + (size_t)b * H;
        REAL *restrict hn = hnext + (size_t)b * H;
        if (mask && !mask[b]) {
            for (int j = 0; j < H; j++)
                hn[j] = hp[j];
        } else if (act == FR_ACT_TANH) {
            for (int j = 0; j < H; j++)
                hn[j] = TANH(zr[j] + bias[j]);
        } else if (act == FR_ACT_RELU) {
            for (int j = 0; j < H; j++) {
                REAL v = zr[j] + bias[j];
                hn[j] = v > 0 ? v : (v == v ? (REAL)0 : v);   /* NaN stays NaN */
            }
        } else {
            for (int j = 0; j < H; j++)
                hn[j] = zr[j] + bias[j];
        }
    }
}

FR_VECTORIZE
static void FN(rnn_cell_grad_rows)(int b0, int b1, int H, int act,
                                   const unsigned char *mask,
                                   const REAL *restrict h, const REAL *restrict dh,
                                   REAL *restrict dz)
{
    for (int b = b0; b < b1; b++) {
        const REAL *restrict hr = h + (size_t)b * H;
        const REAL *restrict dhr = dh + (size_t)b * H;
        REAL *restrict dzr = dz + (size_t)b * H;
        if (mask && !mask[b]) {
            for (int j = 0; j < H; j++)
                dzr[j] = 0;
        } else if (act == FR_ACT_TANH) {
            for (int j = 0; j < H; j++)
                dzr[j] = dhr[j] * (1 - hr[j] * hr[j]);
        } else if (act == FR_ACT_RELU) {
            for (int j = 0; j < H; j++)
                dzr[j] = dhr[j] * (hr[j] > 0 ? (REAL)1 : (REAL)0);
        } else {
            for (int j = 0; j < H; j++)
                dzr[j] = dhr[j];
        }
    }
}

int FN(fr_rnn_forward)(GEMM_T gemm, int nthreads, int act, int T, int B, int I,
                       int H, const REAL *x, const REAL *W, const REAL *U,
                       const REAL *bias, const unsigned char *mask, REAL *hs,
                       REAL *z)
{
    if (!gemm || FN(check_sizes)(T, B, I, H, 1) || act < 0 || act > 2)
        return 1;
    const size_t BH = (size_t)B * H;
    FN(gemm_rm)(gemm, 0, 0, T * B, H, I, 1, x, I > 0 ? I : 1, W, H, 0, z, H);
    for (int t = 0; t < T; t++) {
        REAL *zt = z + t * BH;
        const unsigned char *m = mask ? mask + (size_t)t * B : NULL;
        FN(gemm_rm)(gemm, 0, 0, B, H, H, 1, hs + t * BH, H, U, H, 1, zt, H);
        FR_PAR_ROWS(B, H, nthreads,
                    FN(rnn_cell_rows)(b0, b1, H, act, bias, m, zt, hs + t * BH,
                                      hs + (t + 1) * BH));
    }
    return 0;
}

int FN(fr_rnn_backward)(GEMM_T gemm, int nthreads, int act, int T, int B, int I,
                        int H, const REAL *x, const REAL *W, const REAL *U,
                        const unsigned char *mask, const REAL *hs,
                        const REAL *d_out, REAL *dh, REAL *dx, REAL *dW,
                        REAL *dU, REAL *db, REAL *dz, REAL *work)
{
    if (!gemm || FN(check_sizes)(T, B, I, H, 1) || act < 0 || act > 2)
        return 1;
    const size_t BH = (size_t)B * H;
    for (int t = T - 1; t >= 0; t--) {
        const unsigned char *m = mask ? mask + (size_t)t * B : NULL;
        REAL *dzt = dz + t * BH;
        FN(add_into)(BH, d_out + t * BH, dh);
        FR_PAR_ROWS(B, H, nthreads,
                    FN(rnn_cell_grad_rows)(b0, b1, H, act, m, hs + (t + 1) * BH,
                                           dh, dzt));
        if (m) {
            FN(gemm_rm)(gemm, 0, 1, B, H, H, 1, dzt, H, U, H, 0, work, H);
            FN(take_rows)(B, H, m, work, dh);
        } else {
            FN(gemm_rm)(gemm, 0, 1, B, H, H, 1, dzt, H, U, H, 0, dh, H);
        }
    }
    FN(weight_grads)(gemm, T, B, I, H, 1, x, W, hs, dz, dx, dW, dU, db);
    return 0;
}

#undef FN
#undef FR_CAT
#undef FR_CAT_

/* y = x W' + b for CPU inference in float32: nn.Linear's product as one register-blocked kernel, a
 * third backend of storm_vlm.model.matmul_backend (beside torch's BLAS and oneDNN, timed against them
 * per shape); built with the scan kernel (cpu_kernel.py), same vector width.
 *
 * Why: the products of a model at small widths (an inner dimension of 72-1184, a few thousand rows)
 * are where BLAS libraries fall furthest below the core's multiply-add rate — their packing and
 * blocking are sized for large matrices. Here the weight is packed once by the caller (transposed to
 * (in, out), out padded with zeros to whole vectors) and each block of MR rows x NV output vectors is
 * held in registers over the whole inner dimension: every weight vector loaded is used for MR rows,
 * every x value broadcast once for NV vectors. Rows go in blocks of ROWS so a block of x stays in
 * L1 / L2 while the column blocks of the weight pass. Each output is bias + the products summed in
 * order of the inner index, whatever the row blocks or threads: the same result on every split.
 */
#include "_vec.h"

#if LANES == 16
#define MR 8 /* 24 accumulators + 3 weight vectors + 1 broadcast of the 32 vector registers */
#define NV 3
#else
#define MR 4 /* 12 + 3 + 1 of 16 */
#define NV 3
#endif
#define ROWS 64

/* the first n (0 < n < LANES) lanes of v into p (a masked store where the instruction set has one: a
 * variable-length memcpy is a library call) */
static inline void store_part(float *p, int64_t n, vf v) {
#if LANES == 16 && defined(__AVX512F__)
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
#else
    memcpy(p, &v, (size_t)n * sizeof(float));
#endif
}

/* y rows i < mr (ldy apart), columns [0, n) of nv vectors: bias (whole vectors, or 0) + sum_p x[i][p] w[p][..];
 * x rows ldx apart, w: k rows ldw apart. mr and nv are constants after inlining. */
static inline __attribute__((always_inline)) void block(const float *x, int64_t ldx, const float *w, int64_t ldw,
                                                        int64_t k, const float *bias, float *y, int64_t ldy, int64_t n,
                                                        int mr, int nv) {
    vf acc[MR][NV];
#pragma GCC unroll 8
    for (int j = 0; j < nv; j++) {
        const vf b0 = bias ? loadu(bias + j * LANES) : splat(0.0f);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) acc[i][j] = b0;
    }
    for (int64_t p = 0; p < k; p++) {
        vf wv[NV];
#pragma GCC unroll 8
        for (int j = 0; j < nv; j++) wv[j] = loadu(w + p * ldw + j * LANES);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            const vf xv = splat(x[i * ldx + p]);
#pragma GCC unroll 8
            for (int j = 0; j < nv; j++) acc[i][j] += xv * wv[j];
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nv; j++) {
            const int64_t rest = n - (int64_t)j * LANES;
            if (rest >= LANES)
                storeu(y + i * ldy + j * LANES, acc[i][j]);
            else if (rest > 0)
                store_part(y + i * ldy + j * LANES, rest, acc[i][j]);
        }
}

#define BLOCK(M, N) block(x + r * ldx, ldx, w + col, ldw, k, bias ? bias + col : NULL, y + r * ldy + col, ldy, n - col, M, N)
#define BY_NV(M)                                                                                                      \
    switch (nv) {                                                                                                     \
    case 1: BLOCK(M, 1); break;                                                                                       \
    case 2: BLOCK(M, 2); break;                                                                                       \
    default: BLOCK(M, 3);                                                                                             \
    }

/* rows r0 <= r < r1 of y (n floats each, ldy apart) = x (rows of k floats, ldx apart) w + bias; w: the
 * weight transposed, k rows of ldw floats (ldw = n rounded up to whole vectors, zero-padded); bias: ldw
 * floats (zero-padded) or NULL */
void storm_linear_f32(const float *x, int64_t ldx, int64_t k, const float *w, int64_t ldw, const float *bias, float *y,
                      int64_t ldy, int64_t n, int64_t r0, int64_t r1) {
    const int64_t vecs = (n + LANES - 1) / LANES;
    for (int64_t rb = r0; rb < r1; rb += ROWS) {
        const int64_t re = rb + ROWS < r1 ? rb + ROWS : r1;
        for (int64_t v0 = 0; v0 < vecs;) {
            const int64_t left = vecs - v0;
            const int nv = (int)(left <= NV ? left : left < 2 * NV ? (left + 1) / 2 : NV);
            const int64_t col = v0 * LANES;
            v0 += nv;
            for (int64_t r = rb; r < re; r += MR) {
                switch (re - r < MR ? re - r : MR) {
                case 1: BY_NV(1) break;
                case 2: BY_NV(2) break;
                case 3: BY_NV(3) break;
#if MR == 8
                case 4: BY_NV(4) break;
                case 5: BY_NV(5) break;
                case 6: BY_NV(6) break;
                case 7: BY_NV(7) break;
#endif
                default: BY_NV(MR)
                }
            }
        }
    }
}

/* 12 independent chains of vector multiply-adds, n steps each, nothing but registers: the core's
 * multiply-add peak at this vector width (storm_vlm.perf.host.fma_peak), which every float32 kernel
 * here is bounded by. Returns the chains' sum so the compiler keeps them. */
float storm_fma_chains(int64_t n) {
    const vf m = splat(0.999999f), c = splat(1e-7f);
    vf a[12];
    for (int i = 0; i < 12; i++) a[i] = splat((float)i);
    for (int64_t s = 0; s < n; s++)
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) a[i] = a[i] * m + c;
    vf sum = splat(0.0f);
    for (int i = 0; i < 12; i++) sum += a[i];
    return hsum(sum);
}

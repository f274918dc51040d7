/* ViT encoder layers (SigLIP's: pre-LayerNorm multi-head attention, then a tanh-GELU MLP, each with
 * its residual add), one or several in a row, run a few frames at a time, for CPU inference in
 * float32; called through storm_vlm.model.cpu_vit_layer; built with the scan kernel (cpu_kernel.py),
 * same vector width.
 *
 * Why: at small widths a layer's products are short in their inner dimension, so a BLAS call spends
 * much of its time packing and streaming whole-video activations (megabytes, far beyond L2) between
 * a dozen separate passes (LayerNorms, q/k/v, attention, out, residuals, fc1, GELU, fc2). Here a
 * frame's activations stay in L1 / L2 from the first LayerNorm to the last residual add.
 *
 * Layout: inside the kernel a frame is held feature-major — D rows of its T tokens, padded to TP, a
 * whole number of vectors — so every product is W · X with the weight in nn.Linear's own (out, in)
 * layout (no packing) and the tokens along the vectors: no output width (72, 269, ...) is ever
 * rounded up to whole vectors, only T is. The attention works on the transposed scores S' = K Q'
 * (keys x queries): the softmax runs down each column, every lane a different query, and the output
 * O' = V' P' is again feature-major. All products go through one register-blocked kernel (`block`:
 * MR output rows x NV vectors of tokens in registers, each weight broadcast once for NV vectors and
 * each token vector loaded once for MR rows) whose bias, residual add and GELU are applied to the
 * registers before the single store.
 *
 * Same arithmetic as transformers' layer in float32 up to the order of additions (a product's bias
 * and residual enter its sum first; the softmax is normalised before the value product).
 */
#include "_vec.h"

#if LANES == 16
#define MR 6 /* 24 accumulators + 4 token vectors + 1 broadcast of the 32 vector registers */
#define NV 4
#else
#define MR 4 /* 12 + 3 + 1 of 16 */
#define NV 3
#endif

#define TWO_C 1.5957691216057308f /* 2 sqrt(2 / pi), as _elementwise_kernel.c */

static inline vf gelu_tanh(vf x) {
    const vf two_u = x * (TWO_C + (0.044715f * TWO_C) * x * x);
    return x / (1.0f + vexp2(-two_u * LOG2E));
}

/* Full-width interleaves of two vectors: lanes a0 b0 a1 b1 ... of their lower halves (LO), of their
 * upper halves (HI) */
#if LANES == 16
#define LO_LANES 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define HI_LANES 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#elif LANES == 8
#define LO_LANES 0, 8, 1, 9, 2, 10, 3, 11
#define HI_LANES 4, 12, 5, 13, 6, 14, 7, 15
#else
#define LO_LANES 0, 4, 1, 5
#define HI_LANES 2, 6, 3, 7
#endif
#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* dst[j][i] = src[i][j] for i < rows, j < cols (src rows ss apart, dst rows ds apart): LANES x LANES
 * blocks in registers — log2(LANES) rounds of interleaving row i with row i + LANES / 2 (the perfect
 * shuffle) — and the edges one float at a time */
static void transpose(const float *src, int64_t ss, float *dst, int64_t ds, int64_t rows, int64_t cols) {
    const int64_t rb = rows / LANES * LANES, cb = cols / LANES * LANES;
    for (int64_t i0 = 0; i0 < rb; i0 += LANES)
        for (int64_t j0 = 0; j0 < cb; j0 += LANES) {
            vf r[LANES], n[LANES];
            for (int i = 0; i < LANES; i++) r[i] = loadu(src + (i0 + i) * ss + j0);
            for (int round = 1; round < LANES; round *= 2) {
                for (int i = 0; i < LANES / 2; i++) {
                    n[2 * i] = SHUFFLE(r[i], r[i + LANES / 2], LO_LANES);
                    n[2 * i + 1] = SHUFFLE(r[i], r[i + LANES / 2], HI_LANES);
                }
                memcpy(r, n, sizeof r);
            }
            for (int j = 0; j < LANES; j++) storeu(dst + (j0 + j) * ds + i0, r[j]);
        }
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = i < rb ? cb : 0; j < cols; j++) dst[j * ds + i] = src[i * ss + j];
}

/* c[i][0 .. nv vectors) for rows i < mr (ldc apart) = (bias[i], or 0) + (c's own value when add)
 * + sum_p a(i, p) b[p][..], then GELU when gelu; a(i, p) = a[i * ars + p * acs], b: k rows ldb apart.
 * mr and nv are constants after inlining, so acc lives in registers. */
static inline __attribute__((always_inline)) void block(const float *a, int64_t ars, int64_t acs, const float *b,
                                                        int64_t ldb, int64_t k, const float *bias, float *c,
                                                        int64_t ldc, int mr, int nv, int add, int gelu) {
    vf acc[MR][NV];
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        const vf b0 = splat(bias ? bias[i] : 0.0f);
#pragma GCC unroll 8
        for (int j = 0; j < nv; j++) acc[i][j] = add ? b0 + loadu(c + i * ldc + j * LANES) : b0;
    }
    for (int64_t p = 0; p < k; p++) {
        vf bv[NV];
#pragma GCC unroll 8
        for (int j = 0; j < nv; j++) bv[j] = loadu(b + p * ldb + j * LANES);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            const vf av = splat(a[i * ars + p * acs]);
#pragma GCC unroll 8
            for (int j = 0; j < nv; j++) acc[i][j] += av * bv[j];
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int j = 0; j < nv; j++) storeu(c + i * ldc + j * LANES, gelu ? gelu_tanh(acc[i][j]) : acc[i][j]);
}

#define BLOCK(M, N)                                                                                                   \
    block(a + r * ars, ars, acs, b + col, ldb, k, bias ? bias + r : NULL, c + r * ldc + col, ldc, M, N, add, gelu)
#if NV == 4
#define BY_NV(M)                                                                                                      \
    switch (nv) {                                                                                                     \
    case 1: BLOCK(M, 1); break;                                                                                       \
    case 2: BLOCK(M, 2); break;                                                                                       \
    case 3: BLOCK(M, 3); break;                                                                                       \
    default: BLOCK(M, 4);                                                                                             \
    }
#else
#define BY_NV(M)                                                                                                      \
    switch (nv) {                                                                                                     \
    case 1: BLOCK(M, 1); break;                                                                                       \
    case 2: BLOCK(M, 2); break;                                                                                       \
    default: BLOCK(M, 3);                                                                                             \
    }
#endif

/* c (m rows ldc apart, vecs vectors each) = [c +] bias + a (m x k) b (k rows ldb apart), GELU'd when gelu
 * (`block`). Column blocks of NV vectors (the last two shared evenly, so none is much narrower), each
 * over all rows in MR-row blocks: a column block of b (k x NV vectors) stays in L1 while the rows pass. */
static void gemm(const float *a, int64_t ars, int64_t acs, int64_t m, int64_t k, const float *b, int64_t ldb,
                 const float *bias, float *c, int64_t ldc, int64_t vecs, int add, int gelu) {
    for (int64_t v0 = 0; v0 < vecs;) {
        const int64_t left = vecs - v0;
        const int nv = (int)(left <= NV ? left : left < 2 * NV ? (left + 1) / 2 : NV);
        const int64_t col = v0 * LANES;
        v0 += nv;
        for (int64_t r = 0; r < m; r += MR) {
            switch (m - r < MR ? m - r : MR) {
            case 1: BY_NV(1) break;
            case 2: BY_NV(2) break;
            case 3: BY_NV(3) break;
#if MR == 6
            case 4: BY_NV(4) break;
            case 5: BY_NV(5) break;
#endif
            default: BY_NV(MR)
            }
        }
    }
}

/* y = LayerNorm(x) over the d rows of each token column (x, y: d rows of tp floats), mean and variance
 * in float32, every lane a token */
static void layer_norm_cols(const float *x, float *y, int64_t d, int64_t tp, const float *w, const float *b,
                            float eps) {
    for (int64_t j = 0; j < tp; j += LANES) {
        vf sum = splat(0.0f), sq = splat(0.0f);
        for (int64_t c = 0; c < d; c++) sum += loadu(x + c * tp + j);
        const vf mean = sum / (float)d;
        for (int64_t c = 0; c < d; c++) {
            const vf e = loadu(x + c * tp + j) - mean;
            sq += e * e;
        }
        vf inv;
        for (int l = 0; l < LANES; l++) inv[l] = 1.0f / __builtin_sqrtf(sq[l] / (float)d + eps);
        for (int64_t c = 0; c < d; c++) storeu(y + c * tp + j, (loadu(x + c * tp + j) - mean) * inv * w[c] + b[c]);
    }
}

/* softmax(scale * column) in place down each column of s (t rows of tp floats: keys x queries) */
static void softmax_cols(float *s, int64_t t, int64_t tp, float scale) {
    const float k = scale * LOG2E;
    for (int64_t j = 0; j < tp; j += LANES) {
        vf mx = splat(-__builtin_inff());
        for (int64_t r = 0; r < t; r++) mx = vmax_keepnan(mx, loadu(s + r * tp + j));
        vf sum = splat(0.0f);
        for (int64_t r = 0; r < t; r++) {
            const vf e = vexp2((loadu(s + r * tp + j) - mx) * k);
            storeu(s + r * tp + j, e);
            sum += e;
        }
        const vf inv = 1.0f / sum;
        for (int64_t r = 0; r < t; r++) storeu(s + r * tp + j, loadu(s + r * tp + j) * inv);
    }
}

/* One layer's sizes and parameters: weights in nn.Linear's layout (out, in), contiguous — wq, wk, wv,
 * wo (d, d), w1 (i_dim, d), w2 (d, i_dim) — biases (out), LayerNorm weights and biases (d) */
typedef struct {
    int64_t d, i_dim, heads;
    float eps1, eps2, scale;
    const float *ln1w, *ln1b, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo, *ln2w, *ln2b, *w1, *b1, *w2, *b2;
} storm_vit_layer;

/* One frame through layer L in place on h (d rows of tp floats: the frame's t tokens, feature-major):
 *   h = h + attn(ln1(h)) Wo' + bo,  h = h + gelu(ln2(h) W1' + b1) W2' + b2,
 * attn: L->heads heads of d / heads channels, softmax(scale q k') v. xn, q, kk, v, o: d rows of tp; s: t
 * rows of tp; hid: L->i_dim rows of tp. */
static void frame_layer(const storm_vit_layer *L, float *h, float *xn, float *q, float *kk, float *v, float *s,
                        float *o, float *hid, int64_t t, int64_t tp) {
    const int64_t d = L->d, i_dim = L->i_dim, hd = d / L->heads, vecs = tp / LANES;
    layer_norm_cols(h, xn, d, tp, L->ln1w, L->ln1b, L->eps1);
    gemm(L->wq, d, 1, d, d, xn, tp, L->bq, q, tp, vecs, 0, 0);
    gemm(L->wk, d, 1, d, d, xn, tp, L->bk, kk, tp, vecs, 0, 0);
    gemm(L->wv, d, 1, d, d, xn, tp, L->bv, v, tp, vecs, 0, 0);
    for (int64_t e = 0; e < L->heads; e++) {
        const int64_t c0 = e * hd * tp;
        gemm(kk + c0, 1, tp, t, hd, q + c0, tp, NULL, s, tp, vecs, 0, 0); /* S' = K Q': row j = key j */
        softmax_cols(s, t, tp, L->scale);
        gemm(v + c0, tp, 1, hd, t, s, tp, NULL, o + c0, tp, vecs, 0, 0); /* O' = V' P' */
    }
    gemm(L->wo, d, 1, d, d, o, tp, L->bo, h, tp, vecs, 1, 0);
    layer_norm_cols(h, xn, d, tp, L->ln2w, L->ln2b, L->eps2);
    gemm(L->w1, d, 1, i_dim, d, xn, tp, L->b1, hid, tp, vecs, 0, 1);
    gemm(L->w2, i_dim, 1, d, i_dim, hid, tp, L->b2, h, tp, vecs, 1, 0);
}

/* Frames through the layers together: as many as keep their residual streams within GROUP_BYTES (with
 * one layer's weights and the scratch, in L2 at the bench widths), at most MAX_GROUP; one frame at a
 * time where a frame alone is larger (real SigLIP widths). */
#define GROUP_BYTES (256 * 1024)
#define MAX_GROUP 16

/* Frames f0 <= f < f1 of x (frame f, token i, channel c at x[f * xf + i * xt + c * xc], float32) through
 * layers[0], ..., layers[n - 1] (one width d) into y (frames x t x d, contiguous). Frames go in groups
 * (GROUP_BYTES), each group through every layer before the next group, held feature-major in cache from
 * the first layer to the last: a layer's weights are read once per group, the frames are transposed
 * once per group, and running n layers here is the same arithmetic as n calls of one layer.
 * Returns 0, or 1 when the scratch could not be allocated. */
int storm_vit_layers_f32(const storm_vit_layer *const *layers, int64_t n, const float *x, int64_t xf, int64_t xt,
                         int64_t xc, float *y, int64_t t, int64_t f0, int64_t f1) {
    const int64_t d = layers[0]->d, tp = (t + LANES - 1) / LANES * LANES;
    int64_t i_dim = 0;
    for (int64_t l = 0; l < n; l++) i_dim = layers[l]->i_dim > i_dim ? layers[l]->i_dim : i_dim;
    const int64_t per_frame = d * tp * (int64_t)sizeof(float), fit = GROUP_BYTES / per_frame;
    const int64_t group = fit < 1 ? 1 : fit > MAX_GROUP ? MAX_GROUP : fit;
    /* The group's h, then xn, q, k, v (d rows each), scores (t), o (d), MLP hidden (i_dim): rows of
     * tp floats. Padding tokens (columns t..tp) never reach a real token's column — the scores use
     * keys below t only — so their values do not matter; they start as zeros and are reset to zeros
     * for every frame so their arithmetic stays on ordinary numbers (no NaN or denormal there). */
    float *buf = calloc((size_t)(((group + 5) * d + t + i_dim) * tp), sizeof(float));
    if (!buf) return 1;
    float *xn = buf + group * d * tp, *q = xn + d * tp, *kk = q + d * tp, *v = kk + d * tp, *s = v + d * tp,
          *o = s + t * tp, *hid = o + d * tp;
    for (int64_t g = f0; g < f1; g += group) {
        const int64_t frames = f1 - g < group ? f1 - g : group;
        for (int64_t f = 0; f < frames; f++) {
            const float *xs = x + (g + f) * xf;
            float *h = buf + f * d * tp;
            if (xt == 1) /* feature-major already (the patch embedding's output): row copies */
                for (int64_t c = 0; c < d; c++) memcpy(h + c * tp, xs + c * xc, (size_t)t * sizeof(float));
            else if (xc == 1)
                transpose(xs, xt, h, tp, t, d);
            else
                for (int64_t i = 0; i < t; i++)
                    for (int64_t c = 0; c < d; c++) h[c * tp + i] = xs[i * xt + c * xc];
            for (int64_t c = 0; c < d; c++)
                for (int64_t i = t; i < tp; i++) h[c * tp + i] = 0.0f;
        }
        for (int64_t l = 0; l < n; l++)
            for (int64_t f = 0; f < frames; f++) frame_layer(layers[l], buf + f * d * tp, xn, q, kk, v, s, o, hid, t, tp);
        for (int64_t f = 0; f < frames; f++) transpose(buf + f * d * tp, tp, y + (g + f) * t * d, d, d, t);
    }
    free(buf);
    return 0;
}

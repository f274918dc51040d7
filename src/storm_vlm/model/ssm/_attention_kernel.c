/* LayerNorm (with the residual add), RMSNorm and softmax attention, for CPU inference: a ViT encoder
 * layer's (SigLIP's) and the LLM's causal grouped-query prefill attention, called through
 * storm_vlm.model.cpu_attention; built with the scan kernel (cpu_kernel.py), same vector width.
 *
 * LayerNorm, optionally after the residual add: PyTorch takes a pass for the add and a slow per-row
 * kernel for the norm at small widths.
 *
 * Attention: for each (batch, KV head), K is transposed into blocks of keys so a vector of LANES scores
 * is hd multiply-adds with no horizontal sum, and four query rows at a time share each key load; the
 * softmax runs on those four rows of scores, each held whole (exp2 of _vec.h; causal rows stop at
 * their own position, after any cached positions); the values, copied with their columns padded to
 * whole vectors, are summed into four rows of outputs at a time. A frame's keys (64-1024) stay in
 * L1 / L2; an LLM prompt's transposed keys take 4 * Lk * hd bytes per thread. Differs from PyTorch's
 * SDPA by float rounding only; a NaN query row gives NaN, as eager attention does (PyTorch's CPU
 * flash kernel writes 0). bfloat16 arrays (under autocast) are widened as they are copied and the
 * output rounded as torch rounds; the arithmetic is float32 either way.
 */
#include "_vec.h"

#define QROWS 4 /* query rows per block */
#define KVECS 4 /* score vectors per block */
#define VVECS 6 /* output vectors per block at most (QROWS x VVECS accumulators + VVECS loads fit in 32 registers) */

/* rows r0 <= r < r1 of x (rows of d floats): with res, x[r] += res[r] first (x is then the new
 * residual stream); y[r] = (x[r] - mean) / sqrt(var + eps) * w + b, mean and variance over the row in
 * float32 (two passes over a row that sits in L1). y may be x. */
void storm_add_layer_norm_f32(float *x, const float *res, const float *w, const float *b, float eps, float *y,
                              int64_t d, int64_t r0, int64_t r1) {
    const int64_t dv = d / LANES * LANES;
    for (int64_t r = r0; r < r1; r++) {
        float *xr = x + r * d, *yr = y + r * d;
        vf acc = splat(0.0f);
        float tail = 0.0f;
        int64_t c = 0;
        for (; c < dv; c += LANES) {
            vf v = loadu(xr + c);
            if (res) storeu(xr + c, v += loadu(res + r * d + c));
            acc += v;
        }
        for (; c < d; c++) tail += res ? (xr[c] += res[r * d + c]) : xr[c];
        const float mean = (hsum(acc) + tail) / (float)d;
        acc = splat(0.0f);
        tail = 0.0f;
        for (c = 0; c < dv; c += LANES) {
            const vf e = loadu(xr + c) - mean;
            acc += e * e;
        }
        for (; c < d; c++) tail += (xr[c] - mean) * (xr[c] - mean);
        const float inv = 1.0f / __builtin_sqrtf((hsum(acc) + tail) / (float)d + eps);
        for (c = 0; c < dv; c += LANES)
            storeu(yr + c, (loadu(xr + c) - mean) * inv * loadu(w + c) + loadu(b + c));
        for (; c < d; c++) yr[c] = (xr[c] - mean) * inv * w[c] + b[c];
    }
}

/* rows r0 <= r < r1 of x (rows of d floats): y[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)) (Llama's /
 * Qwen2's RMSNorm, in transformers' order of operations), float32. y may be x. */
void storm_rms_norm_f32(const float *x, const float *w, float eps, float *y, int64_t d, int64_t r0, int64_t r1) {
    const int64_t dv = d / LANES * LANES;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        vf acc = splat(0.0f);
        float tail = 0.0f;
        int64_t c = 0;
        for (; c < dv; c += LANES) {
            const vf v = loadu(xr + c);
            acc += v * v;
        }
        for (; c < d; c++) tail += xr[c] * xr[c];
        const float inv = 1.0f / __builtin_sqrtf((hsum(acc) + tail) / (float)d + eps);
        for (c = 0; c < dv; c += LANES) storeu(yr + c, loadu(w + c) * (loadu(xr + c) * inv));
        for (; c < d; c++) yr[c] = w[c] * (xr[c] * inv);
    }
}

/* scores of query rows q[0..QROWS) (pointers to hd floats) against nv vectors of keys starting at
 * kt (hd rows of lp floats, keys along a row), into s (QROWS rows of lp floats), times `scale` */
static inline __attribute__((always_inline)) void scores(const float *const *q, const float *kt, int64_t lp,
                                                         int64_t hd, int nv, float scale, float *s) {
    vf acc[QROWS][KVECS] = {{{0}}};
    for (int64_t c = 0; c < hd; c++) {
        vf kv[KVECS];
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++) kv[j] = loadu(kt + c * lp + j * LANES);
#pragma GCC unroll 4
        for (int r = 0; r < QROWS; r++) {
            const vf qv = splat(q[r][c]);
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++) acc[r][j] += qv * kv[j];
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < QROWS; r++)
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++) storeu(s + r * lp + j * LANES, acc[r][j] * scale);
}

/* out rows o[0..QROWS) columns [c0, c0 + nv * LANES) = sum_j p[r][j] vp[j] over the L keys (vp: L rows of
 * hdp floats), divided by the row's softmax sum; the last row block and the last vector stop at `cols` */
static inline __attribute__((always_inline)) void values(const float *p, int64_t lp, const float *vp, int64_t hdp,
                                                         int64_t L, int64_t c0, int nv, const float *inv,
                                                         float *const *o, int rows, int64_t cols) {
    vf acc[QROWS][VVECS] = {{{0}}};
    for (int64_t j = 0; j < L; j++) {
        vf vv[VVECS];
#pragma GCC unroll 6
        for (int i = 0; i < nv; i++) vv[i] = loadu(vp + j * hdp + c0 + i * LANES);
#pragma GCC unroll 4
        for (int r = 0; r < QROWS; r++) {
            const vf pv = splat(p[r * lp + j]);
#pragma GCC unroll 6
            for (int i = 0; i < nv; i++) acc[r][i] += pv * vv[i];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < nv; i++) {
            const int64_t c = c0 + i * LANES;
            const vf out = acc[r][i] * inv[r];
            if (c + LANES <= cols)
                storeu(o[r] + c, out);
            else
                memcpy(o[r] + c, &out, (size_t)(cols - c) * sizeof(float));
        }
}

/* element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array */
static inline float element(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* o = softmax(scale q k^T) v per (batch, head): every key visible, or causal (query t sees keys
 * 0..Lk - L + t: the last L of Lk positions, as after a cache of Lk - L). q, o: element (b, h, t, c)
 * at b * s[0] + h * s[1] + t * s[2] + c (strides in elements); k, v: the same with kv head
 * g = h / (heads / kv_heads) (grouped-query heads share their KV head). L queries, Lk >= L keys
 * (Lk = L without causal), head size hd. bf16 = 0: every array float32; 1: every array bfloat16
 * (computed in float32, o rounded as torch rounds). Runs the pairs p0 <= p < p1, p = b * heads + h;
 * consecutive heads of one KV head reuse its transposed keys. Returns 0, or 1 when its scratch could
 * not be allocated (nothing written then). */
int storm_attention(const void *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v,
                    const int64_t *vs, void *o, const int64_t *os, int64_t heads, int64_t kv_heads, int64_t L,
                    int64_t Lk, int64_t hd, float scale, int causal, int bf16, int64_t p0, int64_t p1) {
    const int64_t lp = (Lk + LANES - 1) / LANES * LANES, hdp = (hd + LANES - 1) / LANES * LANES;
    const int64_t offset = Lk - L; /* causal: query t is at key position offset + t */
    const int64_t group = heads / kv_heads;
    /* transposed keys, padded values, four rows of scores; for bf16, four query rows and output rows */
    float *kt = malloc(sizeof(float) * (size_t)(hd * lp + Lk * hdp + QROWS * lp + QROWS * (hd + hdp)));
    if (!kt) return 1;
    float *vp = kt + hd * lp, *s = vp + Lk * hdp, *qbuf = s + QROWS * lp, *obuf = qbuf + QROWS * hd;
    const float scale2 = scale * LOG2E; /* scores in base 2 */
    int64_t loaded = -1;                /* the (batch, kv head) in kt / vp */
    for (int64_t p = p0; p < p1; p++) {
        const int64_t b = p / heads, h = p % heads, kv = b * kv_heads + h / group;
        if (kv != loaded) {
            const int64_t kb = b * ks[0] + (h / group) * ks[1], vb = b * vs[0] + (h / group) * vs[1];
            for (int64_t j = 0; j < lp; j++)
                for (int64_t c = 0; c < hd; c++) kt[c * lp + j] = j < Lk ? element(k, kb + j * ks[2] + c, bf16) : 0.0f;
            for (int64_t j = 0; j < Lk; j++) {
                for (int64_t c = 0; c < hd; c++) vp[j * hdp + c] = element(v, vb + j * vs[2] + c, bf16);
                memset(vp + j * hdp + hd, 0, (size_t)(hdp - hd) * sizeof(float));
            }
            loaded = kv;
        }
        const int64_t qb = b * qs[0] + h * qs[1], ob = b * os[0] + h * os[1];
        for (int64_t i0 = 0; i0 < L; i0 += QROWS) {
            const int rows = L - i0 < QROWS ? (int)(L - i0) : QROWS;
            const int64_t nk = causal ? offset + i0 + rows : Lk; /* keys any row of the block sees */
            const int64_t lk = (nk + LANES - 1) / LANES * LANES;
            const float *qr[QROWS];
            float *orow[QROWS];
            for (int r = 0; r < QROWS; r++) { /* a short last block repeats its last row, stored once */
                const int64_t t = i0 + (r < rows ? r : rows - 1);
                if (bf16) {
                    for (int64_t c = 0; c < hd; c++) qbuf[r * hd + c] = element(q, qb + t * qs[2] + c, 1);
                    qr[r] = qbuf + r * hd;
                    orow[r] = obuf + r * hdp;
                } else {
                    qr[r] = (const float *)q + qb + t * qs[2];
                    orow[r] = (float *)o + ob + t * os[2];
                }
            }
            int64_t j0 = 0;
            for (; j0 + KVECS * LANES <= lk; j0 += KVECS * LANES) scores(qr, kt + j0, lp, hd, KVECS, scale2, s + j0);
            for (; j0 < lk; j0 += LANES) scores(qr, kt + j0, lp, hd, 1, scale2, s + j0);
            float inv[QROWS];
            for (int r = 0; r < QROWS; r++) {
                float *sr = s + r * lp;
                const int64_t seen = causal ? offset + i0 + (r < rows ? r : rows - 1) + 1 : Lk;
                for (int64_t j = seen; j < lk; j++) sr[j] = -__builtin_inff();
                vf m = splat(-__builtin_inff());
                for (int64_t j = 0; j < lk; j += LANES) m = vmax_keepnan(m, loadu(sr + j));
                float mx = m[0];
                for (int i = 1; i < LANES; i++) mx = mx > m[i] || mx != mx ? mx : m[i];
                vf sum = splat(0.0f);
                for (int64_t j = 0; j < lk; j += LANES) {
                    const vf e = vexp2(loadu(sr + j) - mx);
                    storeu(sr + j, e);
                    sum += e;
                }
                inv[r] = 1.0f / hsum(sum);
            }
            for (int64_t c0 = 0; c0 < hdp; c0 += VVECS * LANES) {
                switch ((hdp - c0) / LANES) { /* a constant vector count in each case: the loops unroll */
                case 1: values(s, lp, vp, hdp, nk, c0, 1, inv, orow, rows, hd); break;
                case 2: values(s, lp, vp, hdp, nk, c0, 2, inv, orow, rows, hd); break;
                case 3: values(s, lp, vp, hdp, nk, c0, 3, inv, orow, rows, hd); break;
                case 4: values(s, lp, vp, hdp, nk, c0, 4, inv, orow, rows, hd); break;
                case 5: values(s, lp, vp, hdp, nk, c0, 5, inv, orow, rows, hd); break;
                default: values(s, lp, vp, hdp, nk, c0, VVECS, inv, orow, rows, hd);
                }
            }
            for (int r = 0; bf16 && r < rows; r++) {
                uint16_t *dst = (uint16_t *)o + ob + (i0 + r) * os[2];
                int64_t c = 0;
                for (; c + LANES <= hd; c += LANES) {
                    const vbf out = __builtin_convertvector(round_bf16(loadu(obuf + r * hdp + c)), vbf);
                    memcpy(dst + c, &out, sizeof out);
                }
                for (; c < hd; c++) dst[c] = f32_to_bf16(obuf[r * hdp + c]);
            }
        }
    }
    free(kt);
    return 0;
}

/* Two pieces of a ViT encoder layer (SigLIP's) in one pass each, for float32 CPU inference. Called by
 * storm_vlm.model.fast_paths (`_LeanSiglipLayer`); built with the scan kernel (cpu_kernel.py), same
 * vector width.
 *
 * LayerNorm, optionally after the residual add: PyTorch takes a pass for the add and a slow per-row
 * kernel for the norm at small widths.
 *
 * Attention over short sequences with every key visible (one frame's patches): for each (sequence,
 * head), K is transposed into blocks of keys so a vector of LANES scores is hd multiply-adds with no
 * horizontal sum, four query rows at a time share each key load; the softmax runs on those four rows
 * of scores (exp2 of _vec.h); the values, copied with their columns padded to whole vectors, are
 * summed into four rows of outputs at a time. Everything a (sequence, head) touches stays in L1 / L2
 * for the sequence lengths of a frame. Differs from PyTorch's SDPA by float rounding only.
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

/* o = softmax(scale q k^T) v for sequences of L rows, every key visible. q, k, v: row t of sequence s
 * at (s * L + t) * ld, head h at column h * hd (so q, k, v may be column slices of one fused tensor);
 * o likewise with row stride ldo. Runs the (sequence, head) pairs p0 <= p < p1, p = s * heads + h.
 * Returns 0, or 1 when its scratch could not be allocated (nothing written then). */
int storm_frame_attention_f32(const float *q, const float *k, const float *v, int64_t ld, float *o, int64_t ldo,
                              int64_t L, int64_t heads, int64_t hd, float scale, int64_t p0, int64_t p1) {
    const int64_t lp = (L + LANES - 1) / LANES * LANES, hdp = (hd + LANES - 1) / LANES * LANES;
    float *kt = malloc(sizeof(float) * (size_t)(hd * lp + L * hdp + QROWS * lp));
    if (!kt) return 1;
    float *vp = kt + hd * lp, *s = vp + L * hdp;
    const float scale2 = scale * LOG2E; /* scores in base 2 */
    for (int64_t p = p0; p < p1; p++) {
        const int64_t base = (p / heads) * L, col = (p % heads) * hd;
        for (int64_t j = 0; j < lp; j++)
            for (int64_t c = 0; c < hd; c++) kt[c * lp + j] = j < L ? k[(base + j) * ld + col + c] : 0.0f;
        for (int64_t j = 0; j < L; j++) {
            memcpy(vp + j * hdp, v + (base + j) * ld + col, (size_t)hd * sizeof(float));
            memset(vp + j * hdp + hd, 0, (size_t)(hdp - hd) * sizeof(float));
        }
        for (int64_t i0 = 0; i0 < L; i0 += QROWS) {
            const int rows = L - i0 < QROWS ? (int)(L - i0) : QROWS;
            const float *qr[QROWS];
            float *orow[QROWS];
            for (int r = 0; r < QROWS; r++) { /* a short last block repeats its last row, stored once */
                const int64_t t = base + i0 + (r < rows ? r : rows - 1);
                qr[r] = q + t * ld + col;
                orow[r] = o + t * ldo + col;
            }
            int64_t j0 = 0;
            for (; j0 + KVECS * LANES <= lp; j0 += KVECS * LANES) scores(qr, kt + j0, lp, hd, KVECS, scale2, s + j0);
            for (; j0 < lp; j0 += LANES) scores(qr, kt + j0, lp, hd, 1, scale2, s + j0);
            float inv[QROWS];
            for (int r = 0; r < QROWS; r++) {
                float *sr = s + r * lp;
                for (int64_t j = L; j < lp; j++) sr[j] = -__builtin_inff();
                vf m = splat(-__builtin_inff());
                for (int64_t j = 0; j < lp; j += LANES) m = vmax_keepnan(m, loadu(sr + j));
                float mx = m[0];
                for (int i = 1; i < LANES; i++) mx = mx > m[i] || mx != mx ? mx : m[i];
                vf sum = splat(0.0f);
                for (int64_t j = 0; j < lp; j += LANES) {
                    const vf e = vexp2(loadu(sr + j) - mx);
                    storeu(sr + j, e);
                    sum += e;
                }
                inv[r] = 1.0f / hsum(sum);
            }
            for (int64_t c0 = 0; c0 < hdp; c0 += VVECS * LANES) {
                switch ((hdp - c0) / LANES) { /* a constant vector count in each case: the loops unroll */
                case 1: values(s, lp, vp, hdp, L, c0, 1, inv, orow, rows, hd); break;
                case 2: values(s, lp, vp, hdp, L, c0, 2, inv, orow, rows, hd); break;
                case 3: values(s, lp, vp, hdp, L, c0, 3, inv, orow, rows, hd); break;
                case 4: values(s, lp, vp, hdp, L, c0, 4, inv, orow, rows, hd); break;
                case 5: values(s, lp, vp, hdp, L, c0, 5, inv, orow, rows, hd); break;
                default: values(s, lp, vp, hdp, L, c0, VVECS, inv, orow, rows, hd);
                }
            }
        }
    }
    free(kt);
    return 0;
}

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
 * output rounded as torch rounds, the arithmetic float32; the avx512bf16 build (CPUs with
 * AVX512-BF16) takes their products as bf16 dot products instead (`vdpbf16ps`: two multiply-adds per
 * float32 lane, twice the float32 rate; products exact, sums in float32): keys and values are laid
 * out in pairs of bf16 (two head columns of a key, two keys of a value column), and the softmax
 * probabilities are rounded to bf16 before the value product, as PyTorch's bf16 SDPA rounds them;
 * the softmax itself and its row sums stay float32.
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

/* v into columns c.. of row o, stopping at column `cols` (a row's last, partial vector) */
static inline void store_cols(float *o, int64_t c, int64_t cols, vf v) {
    if (c + LANES <= cols)
        storeu(o + c, v);
    else
        memcpy(o + c, &v, (size_t)(cols - c) * sizeof(float));
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
        for (int i = 0; i < nv; i++) store_cols(o[r], c0 + i * LANES, cols, acc[r][i] * inv[r]);
}

/* The softmax of QROWS rows of scores s (rows of lp floats, the first lk computed) in place: row r
 * keeps keys j < its `seen` (the rest become 0), each row divided by its sum later (inv[r]) */
static inline void softmax_rows(float *s, int64_t lp, int64_t lk, const int64_t *seen, float *inv) {
    for (int r = 0; r < QROWS; r++) {
        float *sr = s + r * lp;
        for (int64_t j = seen[r]; j < lk; j++) sr[j] = -__builtin_inff();
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
}

/* the block's first `rows` output rows (obuf, rows of hdp floats) rounded to bf16 into o's rows i0..
 * (hd columns, rows os2 apart, from offset ob) */
static inline void store_bf16_rows(const float *obuf, int64_t hdp, int rows, uint16_t *o, int64_t ob, int64_t os2,
                                   int64_t i0, int64_t hd) {
    for (int r = 0; r < rows; r++) {
        uint16_t *dst = o + ob + (i0 + r) * os2;
        int64_t c = 0;
        for (; c + LANES <= hd; c += LANES) store_bf16(dst + c, loadu(obuf + r * hdp + c));
        for (; c < hd; c++) dst[c] = f32_to_bf16(obuf[r * hdp + c]);
    }
}

#ifdef __AVX512BF16__

/* a row of n bf16 as (n + 1) / 2 32-bit words, stride apart in dst: word i holds elements 2i (low
 * half) and 2i + 1 (high half; 0 past n). In memory a pair already is that word. */
static inline void copy_pairs(const uint16_t *row, int64_t n, uint32_t *dst, int64_t stride) {
    int64_t i = 0;
    for (; 2 * i + 1 < n; i++) memcpy(dst + i * stride, row + 2 * i, sizeof(uint32_t));
    if (n % 2) dst[i * stride] = row[n - 1];
}

static inline __m512bh bf16_splat(uint32_t pair) { return (__m512bh)_mm512_set1_epi32((int)pair); }
static inline __m512bh bf16_load(const uint32_t *p) { return (__m512bh)_mm512_loadu_si512(p); }

/* `scores` on bf16 pairs: q2 rows of hd2 pairs, kt2 hd2 rows of lp pairs (a key's two columns) */
static inline __attribute__((always_inline)) void scores_dp(const uint32_t *q2, int64_t hd2, const uint32_t *kt2,
                                                            int64_t lp, int nv, float scale, float *s) {
    __m512 acc[QROWS][KVECS];
    for (int r = 0; r < QROWS; r++)
        for (int j = 0; j < KVECS; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < hd2; c++) {
        __m512bh kv[KVECS];
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++) kv[j] = bf16_load(kt2 + c * lp + j * LANES);
#pragma GCC unroll 4
        for (int r = 0; r < QROWS; r++) {
            const __m512bh qv = bf16_splat(q2[r * hd2 + c]);
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], qv, kv[j]);
        }
    }
    const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 4
    for (int r = 0; r < QROWS; r++)
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++) _mm512_storeu_ps(s + r * lp + j * LANES, _mm512_mul_ps(acc[r][j], sc));
}

/* `values` on bf16 pairs: p QROWS rows of lp bf16 probabilities, vp2 rows of hdp pairs (a column's
 * value at two consecutive keys), L2 key pairs */
static inline __attribute__((always_inline)) void values_dp(const uint16_t *p, int64_t lp, const uint32_t *vp2,
                                                            int64_t hdp, int64_t L2, int64_t c0, int nv,
                                                            const float *inv, float *const *o, int rows,
                                                            int64_t cols) {
    __m512 acc[QROWS][VVECS];
    for (int r = 0; r < QROWS; r++)
        for (int i = 0; i < VVECS; i++) acc[r][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L2; j++) {
        __m512bh vv[VVECS];
#pragma GCC unroll 6
        for (int i = 0; i < nv; i++) vv[i] = bf16_load(vp2 + j * hdp + c0 + i * LANES);
#pragma GCC unroll 4
        for (int r = 0; r < QROWS; r++) {
            uint32_t pair;
            memcpy(&pair, p + r * lp + 2 * j, sizeof pair);
            const __m512bh pv = bf16_splat(pair);
#pragma GCC unroll 6
            for (int i = 0; i < nv; i++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], pv, vv[i]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < nv; i++) store_cols(o[r], c0 + i * LANES, cols, (vf)acc[r][i] * inv[r]);
}

/* storm_attention for bf16 arrays through bf16 dot products (see the top of the file) */
static int attention_dp(const uint16_t *q, const int64_t *qs, const uint16_t *k, const int64_t *ks,
                        const uint16_t *v, const int64_t *vs, uint16_t *o, const int64_t *os, int64_t heads,
                        int64_t kv_heads, int64_t L, int64_t Lk, int64_t hd, float scale, int causal, int64_t p0,
                        int64_t p1) {
    const int64_t lp = (Lk + LANES - 1) / LANES * LANES, hdp = (hd + LANES - 1) / LANES * LANES;
    const int64_t hd2 = (hd + 1) / 2, offset = Lk - L, group = heads / kv_heads;
    /* key pairs (hd2 x lp), value pairs (lp / 2 x hdp), four rows of scores, of bf16 probabilities,
     * of query pairs and of outputs */
    const size_t words = (size_t)(hd2 * lp + lp / 2 * hdp + QROWS * lp + QROWS * lp / 2 + QROWS * hd2 + QROWS * hdp);
    uint32_t *kt2 = malloc(sizeof(uint32_t) * words);
    if (!kt2) return 1;
    uint32_t *vp2 = kt2 + hd2 * lp, *q2 = vp2 + lp / 2 * hdp;
    float *s = (float *)(q2 + QROWS * hd2), *obuf = s + QROWS * lp;
    uint16_t *pb = (uint16_t *)(obuf + QROWS * hdp);
    const float scale2 = scale * LOG2E;
    int64_t loaded = -1;
    for (int64_t p = p0; p < p1; p++) {
        const int64_t b = p / heads, h = p % heads, kv = b * kv_heads + h / group;
        if (kv != loaded) {
            const uint16_t *kb = k + b * ks[0] + (h / group) * ks[1], *vb = v + b * vs[0] + (h / group) * vs[1];
            for (int64_t j = 0; j < lp; j++)
                if (j >= Lk)
                    for (int64_t c = 0; c < hd2; c++) kt2[c * lp + j] = 0;
                else
                    copy_pairs(kb + j * ks[2], hd, kt2 + j, lp);
            for (int64_t j = 0; j < lp; j += 2) { /* a value column's pairs: keys j and j + 1 */
                const uint16_t *r0 = j < Lk ? vb + j * vs[2] : NULL, *r1 = j + 1 < Lk ? vb + (j + 1) * vs[2] : NULL;
                uint32_t *dst = vp2 + j / 2 * hdp;
                int64_t c = 0;
                for (; r0 && c + LANES <= hd; c += LANES) {
                    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r0 + c)));
                    const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r1 + c)))
                                          : _mm512_setzero_si512();
                    _mm512_storeu_si512(dst + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                }
                for (; c < hdp; c++) {
                    const uint32_t lo = r0 && c < hd ? r0[c] : 0, hi = r1 && c < hd ? r1[c] : 0;
                    dst[c] = lo | hi << 16;
                }
            }
            loaded = kv;
        }
        const int64_t qb = b * qs[0] + h * qs[1], ob = b * os[0] + h * os[1];
        for (int64_t i0 = 0; i0 < L; i0 += QROWS) {
            const int rows = L - i0 < QROWS ? (int)(L - i0) : QROWS;
            const int64_t nk = causal ? offset + i0 + rows : Lk;
            const int64_t lk = (nk + LANES - 1) / LANES * LANES;
            float *orow[QROWS];
            int64_t seen[QROWS];
            for (int r = 0; r < QROWS; r++) { /* a short last block repeats its last row, stored once */
                const int64_t t = i0 + (r < rows ? r : rows - 1);
                copy_pairs(q + qb + t * qs[2], hd, q2 + r * hd2, 1);
                orow[r] = obuf + r * hdp;
                seen[r] = causal ? offset + t + 1 : Lk;
            }
            int64_t j0 = 0;
            for (; j0 + KVECS * LANES <= lk; j0 += KVECS * LANES)
                scores_dp(q2, hd2, kt2 + j0, lp, KVECS, scale2, s + j0);
            for (; j0 < lk; j0 += LANES) scores_dp(q2, hd2, kt2 + j0, lp, 1, scale2, s + j0);
            float inv[QROWS];
            softmax_rows(s, lp, lk, seen, inv);
            /* probabilities past a row's keys are 0, so a last odd key pairs with 0 */
            for (int r = 0; r < QROWS; r++)
                for (int64_t j = 0; j < lk; j += LANES)
                    store_bf16(pb + r * lp + j, loadu(s + r * lp + j));
            const int64_t L2 = (nk + 1) / 2;
            for (int64_t c0 = 0; c0 < hdp; c0 += VVECS * LANES) {
                switch ((hdp - c0) / LANES) {
                case 1: values_dp(pb, lp, vp2, hdp, L2, c0, 1, inv, orow, rows, hd); break;
                case 2: values_dp(pb, lp, vp2, hdp, L2, c0, 2, inv, orow, rows, hd); break;
                case 3: values_dp(pb, lp, vp2, hdp, L2, c0, 3, inv, orow, rows, hd); break;
                case 4: values_dp(pb, lp, vp2, hdp, L2, c0, 4, inv, orow, rows, hd); break;
                case 5: values_dp(pb, lp, vp2, hdp, L2, c0, 5, inv, orow, rows, hd); break;
                default: values_dp(pb, lp, vp2, hdp, L2, c0, VVECS, inv, orow, rows, hd);
                }
            }
            store_bf16_rows(obuf, hdp, rows, o, ob, os[2], i0, hd);
        }
    }
    free(kt2);
    return 0;
}
#endif

/* o = softmax(scale q k^T) v per (batch, head): every key visible, or causal (query t sees keys
 * 0..Lk - L + t: the last L of Lk positions, as after a cache of Lk - L). q, o: element (b, h, t, c)
 * at b * s[0] + h * s[1] + t * s[2] + c (strides in elements); k, v: the same with kv head
 * g = h / (heads / kv_heads) (grouped-query heads share their KV head). L queries, Lk >= L keys
 * (Lk = L without causal), head size hd. bf16 = 0: every array float32; 1: every array bfloat16
 * (computed in float32, or in bf16 dot products in the avx512bf16 build; o rounded as torch
 * rounds). Runs the pairs p0 <= p < p1, p = b * heads + h;
 * consecutive heads of one KV head reuse its transposed keys. Returns 0, or 1 when its scratch could
 * not be allocated (nothing written then). */
int storm_attention(const void *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v,
                    const int64_t *vs, void *o, const int64_t *os, int64_t heads, int64_t kv_heads, int64_t L,
                    int64_t Lk, int64_t hd, float scale, int causal, int bf16, int64_t p0, int64_t p1) {
#ifdef __AVX512BF16__
    if (bf16)
        return attention_dp(q, qs, k, ks, v, vs, o, os, heads, kv_heads, L, Lk, hd, scale, causal, p0, p1);
#endif
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
                for (int64_t c = 0; c < hd; c++) kt[c * lp + j] = j < Lk ? wide_at(k, kb + j * ks[2] + c, bf16) : 0.0f;
            for (int64_t j = 0; j < Lk; j++) {
                for (int64_t c = 0; c < hd; c++) vp[j * hdp + c] = wide_at(v, vb + j * vs[2] + c, bf16);
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
            int64_t seen[QROWS];
            for (int r = 0; r < QROWS; r++) { /* a short last block repeats its last row, stored once */
                const int64_t t = i0 + (r < rows ? r : rows - 1);
                seen[r] = causal ? offset + t + 1 : Lk;
                if (bf16) {
                    for (int64_t c = 0; c < hd; c++) qbuf[r * hd + c] = wide_at(q, qb + t * qs[2] + c, 1);
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
            softmax_rows(s, lp, lk, seen, inv);
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
            if (bf16) store_bf16_rows(obuf, hdp, rows, o, ob, os[2], i0, hd);
        }
    }
    free(kt);
    return 0;
}

/* One decode step of a Llama-style decoder stack (Qwen2, Llama) for one token per sequence of a batch,
 * float32, on the CPU, in one call: per layer RMSNorm, the q/k/v products, the rotary embedding, the
 * KV-cache write, grouped-query attention over the cached positions (a left-padded sequence's from its
 * first real one), the output product and residual, RMSNorm, the gate/up products, SiLU(gate) * up, the
 * down product and residual; then the final RMSNorm and the LM head. Called by
 * storm_vlm.model.decode.DecodeStep; built with the scan kernel (cpu_kernel.py), same vector width.
 *
 * A step reads every weight once (for up to ROWS_MAX tokens at a time), so its time is set by how fast the
 * weights stream from memory. Each product reads the model's own (out, in) matrix one whole row after the
 * other — one sequential stream, which the hardware prefetcher follows best — with no copy of any weight.
 * The small operations around the products (norms, rotary, softmax, the gate) cost microseconds here,
 * where each is a separate tensor operation in PyTorch. The KV cache may hold bfloat16 (a prefill under
 * bf16 autocast): it is read and written as such. The projections' weights and biases (and, apart, the LM
 * head's) may be bfloat16 too (the bfloat16 precision on CPU): half the bytes to stream, widened to
 * float32 as they are read; the arithmetic is float32 either way.
 */
#include "_vec.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

/* For each of nb rows x_b of x (row b at x + b * ldx, k floats): y_b = (accumulate ? y_b : 0) + (bias ? bias : 0)
 * + W @ x_b, y_b at y + b * ldy (n floats); W (n, k) row-major (nn.Linear's own layout), bias (n); W and
 * bias float32 or, with wbf16, bfloat16. Row of W after row: the matrix is read as one sequential stream,
 * which the hardware prefetcher follows best (interleaving even two rows' streams halves the rate on
 * some CPUs), and each of its vectors is loaded once for the nb rows of x: a batch of tokens costs one
 * pass over the weights. Two chains of sums per row, so the adds do not wait on each other; each row's
 * sums are added in the same order whatever nb is (a token's result does not depend on its batch).
 * Inlined with constant nb (<= ROWS_MAX: the 2 nb sums stay in the vector registers) and wbf16. */
#define ROWS_MAX (LANES == 16 ? 8 : 4)
static inline __attribute__((always_inline)) void gemv(const float *x, int64_t ldx, const void *W, const void *bias,
                                                       float *y, int64_t ldy, int64_t k, int64_t n, int accumulate,
                                                       int wbf16, const int nb) {
    const int64_t kv = k / LANES * LANES;
    for (int64_t j = 0; j < n; j++) {
        const int64_t row = j * k;
        vf a[ROWS_MAX], c[ROWS_MAX];
        for (int b = 0; b < nb; b++) a[b] = c[b] = splat(0.0f);
        int64_t i = 0;
        for (; i + 2 * LANES <= kv; i += 2 * LANES) {
            const vf w0 = load_wide(W, row + i, wbf16), w1 = load_wide(W, row + i + LANES, wbf16);
            for (int b = 0; b < nb; b++) {
                a[b] += w0 * loadu(x + b * ldx + i);
                c[b] += w1 * loadu(x + b * ldx + i + LANES);
            }
        }
        if (i < kv) {
            const vf w0 = load_wide(W, row + i, wbf16);
            for (int b = 0; b < nb; b++) a[b] += w0 * loadu(x + b * ldx + i);
        }
        const float add = bias ? wide_at(bias, j, wbf16) : 0.0f;
        for (int b = 0; b < nb; b++) {
            float v = hsum(a[b] + c[b]);
            for (i = kv; i < k; i++) v += wide_at(W, row + i, wbf16) * x[b * ldx + i];
            y[b * ldy + j] = v + add + (accumulate ? y[b * ldy + j] : 0.0f);
        }
    }
}

/* from _attention_kernel.c and _elementwise_kernel.c (one library) */
void storm_rms_norm_f32(const float *x, const float *w, float eps, float *y, int64_t d, int64_t r0, int64_t r1);
void storm_silu_mul_f32(const float *g, const float *u, float *y, int64_t n);

/* v = v * cos + rotate_half(v) * sin for each of `count` vectors of hd (rotate_half(v) = (-v2, v1)) */
static void rotary(float *v, int64_t count, int64_t hd, const float *cos, const float *sin) {
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < count; h++, v += hd)
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

/* p[t] = exp(p[t] - max) for t < T; returns their sum */
static float exp_shifted(float *p, int64_t T) {
    int64_t t = 0;
    float mx = p[0];
    if (T >= LANES) {
        vf m = loadu(p);
        for (t = LANES; t + LANES <= T; t += LANES) {
            const vf x = loadu(p + t);
            m = sel(x > m, x, m);
        }
        for (int i = 0; i < LANES; i++) mx = m[i] > mx ? m[i] : mx;
    }
    for (; t < T; t++) mx = p[t] > mx ? p[t] : mx;
    const vf m2 = splat(mx * LOG2E);
    vf s = splat(0.0f);
    t = 0;
    for (; t + LANES <= T; t += LANES) {
        const vf e = vexp2(loadu(p + t) * LOG2E - m2);
        storeu(p + t, e);
        s += e;
    }
    float sum = hsum(s);
    for (; t < T; t++) {
        p[t] = vexp2(splat(p[t] * LOG2E) - m2)[0];
        sum += p[t];
    }
    return sum;
}

/* n values of src at element `off` of a cache buffer */
static void store_kv(void *p, int64_t off, const float *src, int64_t n, int bf16) {
    if (!bf16) {
        memcpy((float *)p + off, src, (size_t)n * sizeof(float));
        return;
    }
    for (int64_t i = 0; i < n; i++) ((uint16_t *)p)[off + i] = f32_to_bf16(src[i]);
}

/* Keys laid out for vector-wide scores: KV head g's positions in blocks of LANES, each block (hd, LANES)
 * (lane i of row c holds component c of position block * LANES + i), so that one vector of LANES scores
 * is hd multiply-adds with no horizontal sum; a score per position in the cache's own layout needs a
 * horizontal sum of hd products each. Copies positions from..T-1 of keys K (element `off` + t * st). */
static void transpose_keys(const void *K, int kbf16, int64_t off, int64_t st, int64_t from, int64_t T, int64_t hd,
                           float *kt) {
    for (int64_t t = from; t < T; t++) {
        float *dst = kt + t / LANES * hd * LANES + t % LANES;
        for (int64_t c = 0; c < hd; c++) dst[c * LANES] = wide_at(K, off + t * st + c, kbf16);
    }
}

/* the hd components of x from element `off` (float32, or bfloat16 with xbf16) as ceil(hd / 2) bf16 pairs,
 * the low half the even component, at dst, dst + stride, ... (an odd hd's last pair padded with 0) */
static void to_pairs(const void *x, int64_t off, int xbf16, int64_t hd, uint32_t *dst, int64_t stride) {
    for (int64_t c = 0; 2 * c < hd; c++) {
        const float lo = wide_at(x, off + 2 * c, xbf16);
        const float hi = 2 * c + 1 < hd ? wide_at(x, off + 2 * c + 1, xbf16) : 0.0f;
        dst[c * stride] = (uint32_t)f32_to_bf16(lo) | (uint32_t)f32_to_bf16(hi) << 16;
    }
}

/* Keys for scores on bf16 q and k (under bf16 autocast: what SDPA's bf16 attention multiplies), as bf16
 * pairs: block b of KV head g holds hd2 = ceil(hd / 2) rows of LANES pairs, row c2 lane i the pair
 * (component 2 c2, component 2 c2 + 1) of position b * LANES + i, each rounded to bf16 (an odd hd's last
 * pair padded with 0). Half the bytes of transpose_keys' float32, and a row of pairs is one operand of
 * AVX512-BF16's dot product. */
static void transpose_key_pairs(const void *K, int kbf16, int64_t off, int64_t st, int64_t from, int64_t T,
                                int64_t hd, uint32_t *kt) {
    const int64_t hd2 = (hd + 1) / 2;
    for (int64_t t = from; t < T; t++)
        to_pairs(K, off + t * st, kbf16, hd, kt + t / LANES * hd2 * LANES + t % LANES, LANES);
}

#define VALUE_BLOCK 64 /* positions of values summed per pass over the heads: 8 KB of float32 at hd 32 */
#define GROUP_MAX (LANES == 16 ? 8 : 4) /* query heads whose sums stay in the vector registers together */
#define PREFETCH_BYTES 4096 /* how far ahead of its use a key block is prefetched */

/* The attention's inner loops, for a group of NH query heads of one KV head: each key or value vector
 * is loaded once for the NH heads (a load per multiply-add leaves the loads the bottleneck), with CH
 * independent chains of sums per head so the adds do not wait on each other (NH * CH >= 4).
 *
 * NAME_NH: s[j * Tp + 0..LANES) = scaling * q_j . (the LANES keys of block kb), for heads j < NH (q_j at
 * q + j * n), over n words of type T per key: scores_NH on float32 components (kb as transpose_keys lays
 * it out, (hd, LANES)), scores_pairs_NH on bf16 pairs (kb as transpose_key_pairs lays it out,
 * (hd2, LANES)). LOAD reads the LANES words of one row into a vector of type KV; MADD adds one row's
 * products with q_j's word to a sum. */
#define SCORES(NAME, T, KV, LOAD, MADD, NH, CH)                                                          \
    static void NAME##_##NH(const T *q, const T *kb, int64_t n, float scaling, float *s, int64_t Tp) {    \
        vf a[CH][NH];                                                                                     \
        for (int u = 0; u < CH; u++)                                                                      \
            for (int j = 0; j < NH; j++) a[u][j] = splat(0.0f);                                           \
        int64_t c = 0;                                                                                    \
        for (; c + CH <= n; c += CH)                                                                      \
            for (int u = 0; u < CH; u++) {                                                                \
                const KV k = LOAD(kb + (c + u) * LANES);                                                  \
                for (int j = 0; j < NH; j++) MADD(a[u][j], k, q[j * n + c + u]);                          \
            }                                                                                             \
        for (; c < n; c++) {                                                                              \
            const KV k = LOAD(kb + c * LANES);                                                            \
            for (int j = 0; j < NH; j++) MADD(a[0][j], k, q[j * n + c]);                                  \
        }                                                                                                 \
        for (int j = 0; j < NH; j++) {                                                                    \
            vf sum = a[0][j];                                                                             \
            for (int u = 1; u < CH; u++) sum += a[u][j];                                                  \
            storeu(s + j * Tp, sum * scaling);                                                            \
        }                                                                                                 \
    }

#define FLOAT_MADD(a, k, q) ((a) += (q) * (k))

/* a += the products of the LANES key pairs k with the query pair q, summed in float32: one AVX512-BF16
 * dot product, or widened (a pair's low half is its even component, its high half its odd one) */
#ifdef __AVX512BF16__
#define PAIR_MADD(a, k, q) \
    ((a) = (vf)_mm512_dpbf16_ps((__m512)(a), (__m512bh)(k), (__m512bh)_mm512_set1_epi32((int)(q))))
#else
#define PAIR_MADD(a, k, q)                                              \
    ((a) += (vf)((k) << 16) * bf16_to_f32((uint16_t)(q))                \
            + (vf)((k) & 0xffff0000u) * bf16_to_f32((uint16_t)((q) >> 16)))
#endif

static inline vu load_pairs(const uint32_t *p) {
    vu k;
    memcpy(&k, p, sizeof k);
    return k;
}

#define SCORES_F32(NH, CH) SCORES(scores, float, vf, loadu, FLOAT_MADD, NH, CH)
#define SCORES_PAIRS(NH, CH) SCORES(scores_pairs, uint32_t, vu, load_pairs, PAIR_MADD, NH, CH)

/* values_NH: o_j[c .. c + NV * LANES) += sum over t0 <= t < t1 of p_j[t] * V[t][c ..], heads j < NH
 * (p_j at p + j * Tp, o_j at o + j * hd); V's position t at element vg + t * st. */
#define VALUES(NH, CH)                                                                                    \
    static void values_##NH(const float *p, int64_t Tp, const void *V, int vbf16, int64_t vg, int64_t st,   \
                            int64_t t0, int64_t t1, int64_t c, int nv, float *o, int64_t hd) {             \
        vf a[CH][NH][2];                                                                                  \
        for (int j = 0; j < NH; j++)                                                                      \
            for (int v = 0; v < 2; v++) {                                                                 \
                a[0][j][v] = v < nv ? loadu(o + j * hd + c + v * LANES) : splat(0.0f);                    \
                for (int u = 1; u < CH; u++) a[u][j][v] = splat(0.0f);                                    \
            }                                                                                             \
        int64_t t = t0;                                                                                   \
        for (; t + CH <= t1; t += CH)                                                                     \
            for (int u = 0; u < CH; u++) {                                                                \
                const vf x0 = load_wide(V, vg + (t + u) * st + c, vbf16);                                   \
                const vf x1 = nv > 1 ? load_wide(V, vg + (t + u) * st + c + LANES, vbf16) : x0;             \
                for (int j = 0; j < NH; j++) {                                                            \
                    const float pj = p[j * Tp + t + u];                                                   \
                    a[u][j][0] += pj * x0;                                                                \
                    a[u][j][1] += pj * x1;                                                                \
                }                                                                                         \
            }                                                                                             \
        for (; t < t1; t++) {                                                                             \
            const vf x0 = load_wide(V, vg + t * st + c, vbf16);                                             \
            const vf x1 = nv > 1 ? load_wide(V, vg + t * st + c + LANES, vbf16) : x0;                       \
            for (int j = 0; j < NH; j++) {                                                                \
                a[0][j][0] += p[j * Tp + t] * x0;                                                         \
                a[0][j][1] += p[j * Tp + t] * x1;                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int j = 0; j < NH; j++)                                                                      \
            for (int v = 0; v < nv; v++) {                                                                \
                vf sum = a[0][j][v];                                                                      \
                for (int u = 1; u < CH; u++) sum += a[u][j][v];                                           \
                storeu(o + j * hd + c + v * LANES, sum);                                                  \
            }                                                                                             \
    }

SCORES_F32(1, 4) SCORES_F32(2, 2) SCORES_F32(3, 2) SCORES_F32(4, 1)
SCORES_PAIRS(1, 4) SCORES_PAIRS(2, 2) SCORES_PAIRS(3, 2) SCORES_PAIRS(4, 1)
VALUES(1, 2) VALUES(2, 1) VALUES(3, 1) VALUES(4, 1)
#if GROUP_MAX == 8
SCORES_F32(5, 1) SCORES_F32(6, 1) SCORES_F32(7, 1) SCORES_F32(8, 1)
SCORES_PAIRS(5, 1) SCORES_PAIRS(6, 1) SCORES_PAIRS(7, 1) SCORES_PAIRS(8, 1)
VALUES(5, 1) VALUES(6, 1) VALUES(7, 1) VALUES(8, 1)
#endif
typedef void (*scores_fn)(const float *, const float *, int64_t, float, float *, int64_t);
typedef void (*scores_pairs_fn)(const uint32_t *, const uint32_t *, int64_t, float, float *, int64_t);
typedef void (*values_fn)(const float *, int64_t, const void *, int, int64_t, int64_t, int64_t, int64_t, int64_t,
                          int, float *, int64_t);
static const scores_fn SCORES_FOR[GROUP_MAX] = {scores_1, scores_2, scores_3, scores_4,
#if GROUP_MAX == 8
                                                scores_5, scores_6, scores_7, scores_8
#endif
};
static const scores_pairs_fn SCORES_PAIRS_FOR[GROUP_MAX] = {scores_pairs_1, scores_pairs_2, scores_pairs_3,
                                                             scores_pairs_4,
#if GROUP_MAX == 8
                                                             scores_pairs_5, scores_pairs_6, scores_pairs_7,
                                                             scores_pairs_8
#endif
};
static const values_fn VALUES_FOR[GROUP_MAX] = {values_1, values_2, values_3, values_4,
#if GROUP_MAX == 8
                                                values_5, values_6, values_7, values_8
#endif
};

/* Floats of scratch one thread's `attend` takes: r * (T rounded up to LANES) scores, r sums, the r query
 * heads as bf16 pairs (hd floats' room each). */
static int64_t attend_scratch(int64_t r, int64_t T, int64_t hd) {
    return r * ((T + LANES - 1) / LANES * LANES + 1 + hd);
}

/* Grouped-query attention of one token over cached positions from..T-1 (the ones before `from`: a
 * left-padded row's padding). q, out (heads, hd); KT: the keys as
 * transpose_keys lays them out (float32), or with `pairs` as transpose_key_pairs does (the scores then
 * multiply q and k rounded to bf16), KV head g from 4-byte word g * ktg; V: KV head g, position t at element
 * g * sg + t * st (hd contiguous), float32 or bfloat16 (vbf16). Each KV head's keys and values are
 * read once from memory for its r query heads, in groups of up to GROUP_MAX heads (the keys one block
 * at a time, prefetched PREFETCH_BYTES ahead: the score loop's work per byte is too small for the
 * hardware prefetcher alone to keep the stream ahead; the values in blocks of VALUE_BLOCK positions
 * that stay in cache across the groups). Only query heads h0 <= head < h1 (a thread's share).
 * scores: attend_scratch(r, T, hd) floats. */
static void attend(const float *q, const void *KT, int pairs, int64_t ktg, const void *V, int vbf16, int64_t sg,
                   int64_t st, int64_t from, int64_t T, int64_t heads, int64_t kv_heads, int64_t hd, float scaling,
                   float *scores, float *out, int64_t h0, int64_t h1) {
    const int64_t r = heads / kv_heads, blocks = (T + LANES - 1) / LANES, Tp = blocks * LANES, hd2 = (hd + 1) / 2;
    const int64_t block = (pairs ? hd2 : hd) * LANES; /* 4-byte words: floats, or pairs */
    const int64_t ahead = (PREFETCH_BYTES / 4 + block - 1) / block;
    float *sums = scores + r * Tp;
    uint32_t *q2 = (uint32_t *)(sums + r);
    for (int64_t g = 0; g < kv_heads; g++) {
        const float *qg = q + g * r * hd;
        float *og = out + g * r * hd;
        const int64_t j0 = h0 - g * r > 0 ? h0 - g * r : 0, j1 = h1 - g * r < r ? h1 - g * r : r;
        if (j0 >= j1) continue;
        const float *kg = (const float *)KT + g * ktg;
        if (pairs)
            for (int64_t j = j0; j < j1; j++) to_pairs(qg, j * hd, 0, hd, q2 + j * hd2, 1);
        for (int64_t b = from / LANES; b < blocks; b++) {
            if (b + ahead < blocks)
                for (int64_t i = 0; i < block; i += 16) __builtin_prefetch(kg + (b + ahead) * block + i);
            for (int64_t j = j0; j < j1; j += GROUP_MAX) {
                const int64_t n = j1 - j < GROUP_MAX ? j1 - j : GROUP_MAX;
                if (pairs)
                    SCORES_PAIRS_FOR[n - 1](q2 + j * hd2, (const uint32_t *)kg + b * block, hd2, scaling,
                                            scores + j * Tp + b * LANES, Tp);
                else
                    SCORES_FOR[n - 1](qg + j * hd, kg + b * block, hd, scaling, scores + j * Tp + b * LANES, Tp);
            }
        }
        for (int64_t j = j0; j < j1; j++) sums[j] = exp_shifted(scores + j * Tp + from, T - from);
        for (int64_t i = j0 * hd; i < j1 * hd; i++) og[i] = 0.0f;
        const int64_t hv = hd / LANES * LANES, vg = g * sg;
        for (int64_t t0 = from; t0 < T; t0 += VALUE_BLOCK) {
            const int64_t t1 = t0 + VALUE_BLOCK < T ? t0 + VALUE_BLOCK : T;
            for (int64_t j = j0; j < j1; j += GROUP_MAX) {
                const int64_t n = j1 - j < GROUP_MAX ? j1 - j : GROUP_MAX;
                for (int64_t c = 0; c < hv; c += 2 * LANES)
                    VALUES_FOR[n - 1](scores + j * Tp, Tp, V, vbf16, vg, st, t0, t1, c, hv - c > LANES ? 2 : 1,
                                      og + j * hd, hd);
                for (int64_t jj = j; jj < j + n; jj++)
                    for (int64_t c = hv; c < hd; c++) {
                        float a = og[jj * hd + c];
                        for (int64_t t = t0; t < t1; t++) a += scores[jj * Tp + t] * wide_at(V, vg + t * st + c, vbf16);
                        og[jj * hd + c] = a;
                    }
            }
        }
        for (int64_t j = j0; j < j1; j++) {
            const float inv = 1.0f / sums[j];
            for (int64_t c = 0; c < hd; c++) og[j * hd + c] *= inv;
        }
    }
}

/* Floats of scratch storm_decode_f32 needs for `rows` tokens, a cache of T positions and `threads` threads. */
int64_t storm_decode_scratch(int64_t rows, int64_t d, int64_t heads, int64_t kv_heads, int64_t hd, int64_t inter,
                             int64_t T, int64_t threads) {
    return rows * (2 * d + (heads + 2 * kv_heads) * hd + heads * hd + 2 * inter)
           + threads * attend_scratch(heads / kv_heads, T, hd);
}

/* A sense-reversing spin barrier for the step's threads (one wait per product: microseconds apart, so
 * sleeping in the kernel would cost more than the wait); it yields the core after a while of spinning,
 * for hosts with fewer free cores than threads. */
typedef struct {
    atomic_int count, sense;
    int n;
} spin_barrier;

static void barrier_wait(spin_barrier *b, int *local) {
    if (b->n == 1) return;
    *local = !*local;
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == b->n - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_store_explicit(&b->sense, *local, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->sense, memory_order_acquire) != *local; spins++) {
        if (spins > 2000) sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        else __builtin_ia32_pause();
#endif
    }
}

typedef struct {
    int64_t rows, layers, d, heads, kv_heads, hd, inter, pos, sb, sg, st, ktb, ktg, kt_from, vocab;
    float eps, scaling, norm_eps;
    const int64_t *from;
    const float *cos, *sin, *norm_w;
    const void *head_w, *head_b;
    const void *const *w;
    void *const *kv;
    void *const *kt;
    float *logits, *scratch;
    int kv_bf16, w_bf16, head_bf16, threads;
    spin_barrier barrier;
} step_args;

#define GEMV_ROWS(NB)                                                                                       \
    case NB:                                                                                                \
        if (wbf16)                                                                                          \
            gemv(x + b * ldx, ldx, w, bias ? (const char *)bias + (size_t)j0 * size : NULL, y + b * ldy + j0, ldy, \
                 k, j1 - j0, accumulate, 1, NB);                                                            \
        else                                                                                                \
            gemv(x + b * ldx, ldx, w, bias ? (const char *)bias + (size_t)j0 * size : NULL, y + b * ldy + j0, ldy, \
                 k, j1 - j0, accumulate, 0, NB);                                                            \
        break;

/* Output rows [n * tid / threads, n * (tid + 1) / threads) of gemv for a->rows rows of x (ldx apart) into
 * y (ldy apart), ROWS_MAX rows of x per pass over W; W and bias float32 or (wbf16) bfloat16 */
static void gemv_part(const step_args *a, int tid, const float *x, int64_t ldx, const void *W, const void *bias,
                      float *y, int64_t ldy, int64_t k, int64_t n, int accumulate, int wbf16) {
    const int64_t j0 = n * tid / a->threads, j1 = n * (tid + 1) / a->threads;
    const size_t size = wbf16 ? 2 : 4;
    const char *w = (const char *)W + (size_t)(j0 * k) * size;
    for (int64_t b = 0; b < a->rows; b += ROWS_MAX) {
        switch (a->rows - b < ROWS_MAX ? a->rows - b : ROWS_MAX) {
            GEMV_ROWS(1) GEMV_ROWS(2) GEMV_ROWS(3) GEMV_ROWS(4)
#if ROWS_MAX == 8
            GEMV_ROWS(5) GEMV_ROWS(6) GEMV_ROWS(7) GEMV_ROWS(8)
#endif
        }
    }
}

/* The step as thread `tid` of a->threads runs it: every product's rows and the attention's query heads
 * split between the threads, the small operations on thread 0, a barrier between dependent parts. Each
 * token's activations are one row of h, x, qkv, att and gu. */
static void step_run(step_args *a, int tid) {
    const int64_t rows = a->rows, d = a->d, heads = a->heads, kv_heads = a->kv_heads, hd = a->hd, inter = a->inter;
    const int64_t nq = heads * hd, nk = kv_heads * hd, nqkv = nq + 2 * nk, T = a->pos + 1, r = heads / kv_heads;
    float *h = a->scratch, *x = h + rows * d, *qkv = x + rows * d, *att = qkv + rows * nqkv, *gu = att + rows * nq;
    float *scores = gu + rows * 2 * inter + tid * attend_scratch(r, T, hd);
    const int64_t h0 = heads * tid / a->threads, h1 = heads * (tid + 1) / a->threads;
    int sense = 0;
    const void *const *w = a->w;
    const int wb = a->w_bf16;
    void *const *kv = a->kv;
    void *const *kt = a->kt;
    const int pairs = (a->kv_bf16 & 4) != 0;
    for (int64_t l = 0; l < a->layers; l++, w += 16, kv += 2, kt++) {
        if (tid == 0) storm_rms_norm_f32(h, w[0], a->eps, x, d, 0, rows);
        barrier_wait(&a->barrier, &sense);
        gemv_part(a, tid, x, d, w[2], w[3], qkv, nqkv, d, nq, 0, wb);
        gemv_part(a, tid, x, d, w[4], w[5], qkv + nq, nqkv, d, nk, 0, wb);
        gemv_part(a, tid, x, d, w[6], w[7], qkv + nq + nk, nqkv, d, nk, 0, wb);
        barrier_wait(&a->barrier, &sense);
        if (tid == 0)
            for (int64_t b = 0; b < rows; b++) {
                float *qkv_b = qkv + b * nqkv;
                /* q and k heads are adjacent */
                rotary(qkv_b, heads + kv_heads, hd, a->cos + b * hd, a->sin + b * hd);
                for (int64_t g = 0; g < kv_heads; g++) {
                    const int64_t off = b * a->sb + g * a->sg;
                    store_kv(kv[0], off + a->pos * a->st, qkv_b + nq + g * hd, hd, a->kv_bf16 & 1);
                    store_kv(kv[1], off + a->pos * a->st, qkv_b + nq + nk + g * hd, hd, a->kv_bf16 & 2);
                    if (pairs)
                        transpose_key_pairs(kv[0], a->kv_bf16 & 1, off, a->st, a->kt_from, T, hd,
                                            (uint32_t *)kt[0] + b * a->ktb + g * a->ktg);
                    else
                        transpose_keys(kv[0], a->kv_bf16 & 1, off, a->st, a->kt_from, T, hd,
                                       (float *)kt[0] + b * a->ktb + g * a->ktg);
                }
            }
        barrier_wait(&a->barrier, &sense);
        for (int64_t b = 0; b < rows; b++)
            attend(qkv + b * nqkv, (const float *)kt[0] + b * a->ktb, pairs, a->ktg, (const char *)kv[1]
                   + (size_t)(b * a->sb) * ((a->kv_bf16 & 2) ? 2 : 4), a->kv_bf16 & 2, a->sg, a->st,
                   a->from ? a->from[b] : 0, T, heads, kv_heads, hd, a->scaling, scores, att + b * nq, h0, h1);
        barrier_wait(&a->barrier, &sense);
        gemv_part(a, tid, att, nq, w[8], w[9], h, d, nq, d, 1, wb);
        barrier_wait(&a->barrier, &sense);
        if (tid == 0) storm_rms_norm_f32(h, w[1], a->eps, x, d, 0, rows);
        barrier_wait(&a->barrier, &sense);
        gemv_part(a, tid, x, d, w[10], w[11], gu, 2 * inter, d, inter, 0, wb);
        gemv_part(a, tid, x, d, w[12], w[13], gu + inter, 2 * inter, d, inter, 0, wb);
        barrier_wait(&a->barrier, &sense);
        if (tid == 0)
            for (int64_t b = 0; b < rows; b++) storm_silu_mul_f32(gu + b * 2 * inter, gu + b * 2 * inter + inter,
                                                                  gu + b * 2 * inter, inter);
        barrier_wait(&a->barrier, &sense);
        gemv_part(a, tid, gu, 2 * inter, w[14], w[15], h, d, inter, d, 1, wb);
        barrier_wait(&a->barrier, &sense);
    }
    if (tid == 0) storm_rms_norm_f32(h, a->norm_w, a->norm_eps, x, d, 0, rows);
    barrier_wait(&a->barrier, &sense);
    gemv_part(a, tid, x, d, a->head_w, a->head_b, a->logits, a->vocab, d, a->vocab, 0, a->head_bf16);
}

typedef struct {
    step_args *args;
    int tid;
    atomic_int *go; /* 0: wait, 1: run, -1: not all threads started, return */
} step_thread;

static void *step_thread_main(void *p) {
    step_thread *t = p;
    int g;
    for (int spins = 0; (g = atomic_load_explicit(t->go, memory_order_acquire)) == 0; spins++)
        if (spins > 2000) sched_yield();
    if (g == 1) step_run(t->args, t->tid);
    return NULL;
}

/* Every layer for `rows` tokens, one per sequence of a batch (token b's row of the embedding table embed
 * (vocab, d) is its input), then the final norm and the LM head, on `threads` threads (this one and
 * threads - 1 started here). Writes each layer's keys and values at position `pos` of sequence b's cache
 * buffers and attends over its positions from[b]..pos (from NULL: 0..pos; the positions before from[b]:
 * a left-padded sequence's padding). Every weight is read once for the whole batch (ROWS_MAX tokens per pass).
 *   w: 16 pointers per layer, every matrix (out, in) row-major as nn.Linear holds it, each bias or NULL:
 *      input RMSNorm weight (d), post-attention RMSNorm weight (d), q (heads hd, d), its bias,
 *      k (kv_heads hd, d), its bias, v (kv_heads hd, d), its bias, o (d, heads hd), its bias,
 *      gate (inter, d), its bias, up (inter, d), its bias, down (d, inter), its bias; the norms'
 *      weights float32, the projections' weights and biases float32, or bfloat16 with w_bf16;
 *   kv: 2 pointers per layer, the key and the value buffer, both with element strides sb (sequence), sg
 *      (KV head) and st (position), hd contiguous; float32, or bfloat16 where bit 0 (keys) / bit 1
 *      (values) of kv_bf16 is set;
 *   kt: 1 pointer per layer, its keys as transpose_keys lays them out (float32), or, where bit 2 of kv_bf16
 *      is set, as transpose_key_pairs does (the scores then on q and k rounded to bf16, as SDPA's bf16
 *      attention under autocast), sequence b's KV head g from 4-byte word b * ktb + g * ktg, with room for
 *      position pos; positions 0..kt_from-1 already there, the rest copied here;
 *   cos, sin (rows, hd): each token's rotary embedding, as the model's rotary module returns it;
 *   norm_w (d), norm_eps, head_w (vocab, d), head_b (vocab) or NULL: the final RMSNorm and the LM head,
 *      whose product of each token's h goes to its row of logits (rows, vocab); head_w and head_b float32,
 *      or bfloat16 with head_bf16;
 *   scratch: at least storm_decode_scratch(rows, ..., pos + 1, threads) floats. Returns 0. (Where a thread
 *      cannot be started, the step runs on this one.) */
int storm_decode_f32(int64_t rows, int64_t layers, int64_t d, int64_t heads, int64_t kv_heads, int64_t hd,
                     int64_t inter, float eps, float scaling, int64_t pos, const int64_t *from, const float *embed,
                     const int64_t *tokens, const float *cos, const float *sin, const void *const *w, int w_bf16,
                     void *const *kv, int64_t sb, int64_t sg, int64_t st, int kv_bf16, void *const *kt, int64_t ktb,
                     int64_t ktg, int64_t kt_from, const float *norm_w, float norm_eps, const void *head_w,
                     const void *head_b, int head_bf16, int64_t vocab, float *logits, float *scratch, int threads) {
    if (threads < 1) threads = 1;
    if (threads > heads) threads = (int)heads;
    step_args a = {rows, layers, d, heads, kv_heads, hd, inter, pos, sb, sg, st, ktb, ktg, kt_from, vocab, eps,
                   scaling, norm_eps, from, cos, sin, norm_w, head_w, head_b, w, kv, kt, logits, scratch, kv_bf16,
                   w_bf16, head_bf16, threads,
                   {0, 0, threads}};
    pthread_t ids[threads];
    step_thread ts[threads];
    atomic_int go = 0;
    int started = 0;
    for (; started < threads - 1; started++) {
        ts[started] = (step_thread){&a, started + 1, &go};
        if (pthread_create(&ids[started], NULL, step_thread_main, &ts[started]) != 0) break;
    }
    for (int64_t b = 0; b < rows; b++) memcpy(scratch + b * d, embed + tokens[b] * d, (size_t)d * sizeof(float));
    if (started < threads - 1) { /* a thread would not start: release the others, run on this one */
        atomic_store_explicit(&go, -1, memory_order_release);
        for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
        started = 0;
        a.threads = 1;
        a.barrier.n = 1;
    } else {
        atomic_store_explicit(&go, 1, memory_order_release);
    }
    step_run(&a, 0);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
    return 0;
}

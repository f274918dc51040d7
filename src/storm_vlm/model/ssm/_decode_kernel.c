/* One greedy decode step of a Llama-style decoder stack (Qwen2, Llama) for one token, float32, on the
 * CPU, in one call: per layer RMSNorm, the q/k/v products, the rotary embedding, the KV-cache write,
 * grouped-query attention over positions 0..pos, the output product and residual, RMSNorm, the
 * gate/up products, SiLU(gate) * up, the down product and residual. Called by
 * storm_vlm.model.fast_paths.DecodeStep; built with the scan kernel (cpu_kernel.py), same vector width.
 *
 * A step reads every weight once, so its time is set by how fast the weights stream from memory.
 * Each product reads the model's own (out, in) matrix one whole row after the other — one sequential
 * stream, which the hardware prefetcher follows best — with no copy of any weight. The small
 * operations around the products (norms, rotary, softmax, the gate) cost microseconds here, where
 * each is a separate tensor operation in PyTorch. The KV cache may hold bfloat16 (a prefill under
 * bf16 autocast): it is read and written as such.
 */
#include "_vec.h"

#define LOG2E 1.4426950408889634f

/* y = (accumulate ? y : 0) + (bias ? bias : 0) + W @ x; x (k), W (n, k) row-major (nn.Linear's own
 * layout), y and bias (n). Row after row: the matrix is read as one sequential stream, which the
 * hardware prefetcher follows best (interleaving even two rows' streams halves the rate on some CPUs). */
static void gemv(const float *x, const float *W, const float *bias, float *y, int64_t k, int64_t n,
                 int accumulate) {
    const int64_t kv = k / LANES * LANES;
    for (int64_t j = 0; j < n; j++) {
        const float *w = W + j * k;
        vf a = splat(0.0f), b = splat(0.0f);
        int64_t i = 0;
        for (; i + 2 * LANES <= kv; i += 2 * LANES) {
            a += loadu(w + i) * loadu(x + i);
            b += loadu(w + i + LANES) * loadu(x + i + LANES);
        }
        if (i < kv) a += loadu(w + i) * loadu(x + i);
        float v = hsum(a + b);
        for (i = kv; i < k; i++) v += w[i] * x[i];
        y[j] = v + (bias ? bias[j] : 0.0f) + (accumulate ? y[j] : 0.0f);
    }
}

/* sum of a[i] * b[i], i < n */
static inline float dot(const float *a, const float *b, int64_t n) {
    vf s = splat(0.0f);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) s += loadu(a + i) * loadu(b + i);
    float out = hsum(s);
    for (; i < n; i++) out += a[i] * b[i];
    return out;
}

/* out = weight * (x / sqrt(mean(x^2) + eps)) (Llama's RMSNorm), x and out (d) */
static void rms_norm(const float *x, const float *weight, float *out, int64_t d, float eps) {
    const float r = 1.0f / __builtin_sqrtf(dot(x, x, d) / (float)d + eps);
    for (int64_t i = 0; i < d; i++) out[i] = weight[i] * (x[i] * r);
}

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
    float mx = p[0];
    for (int64_t t = 1; t < T; t++) mx = p[t] > mx ? p[t] : mx;
    const vf m2 = splat(mx * LOG2E);
    vf s = splat(0.0f);
    int64_t t = 0;
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

/* The KV cache holds float32, or bfloat16 (the upper half of a float32) where the prefill ran under
 * bf16 autocast. Loads widen bf16 to float32 exactly; stores round to nearest even as torch does. */
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));

static inline vf load_kv(const void *p, int64_t i, int bf16) {
    if (!bf16) return loadu((const float *)p + i);
    vh b;
    memcpy(&b, (const uint16_t *)p + i, sizeof b);
    return (vf)(__builtin_convertvector(b, vi) << 16);
}

static inline float kv_at(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    const uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as torch writes it */
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

/* n values of src at element `off` of a cache buffer */
static void store_kv(void *p, int64_t off, const float *src, int64_t n, int bf16) {
    if (!bf16) {
        memcpy((float *)p + off, src, (size_t)n * sizeof(float));
        return;
    }
    for (int64_t i = 0; i < n; i++) ((uint16_t *)p)[off + i] = to_bf16(src[i]);
}

/* q . (the cached row at element `off`), n values */
static inline float dot_kv(const float *q, const void *K, int64_t off, int64_t n, int bf16) {
    vf s = splat(0.0f);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) s += loadu(q + i) * load_kv(K, off + i, bf16);
    float out = hsum(s);
    for (; i < n; i++) out += q[i] * kv_at(K, off + i, bf16);
    return out;
}

/* Grouped-query attention of one token over T cached positions. q, out (heads, hd); K, V: KV head g,
 * position t at element g * sg + t * st (hd contiguous), float32 or bfloat16 (kbf16, vbf16). Each KV
 * head is read once for its r query heads. scores: r * T floats of scratch. */
static void attend(const float *q, const void *K, const void *V, int kbf16, int vbf16, int64_t sg, int64_t st,
                   int64_t T,
                   int64_t heads, int64_t kv_heads, int64_t hd, float scaling, float *scores, float *out) {
    const int64_t r = heads / kv_heads;
    for (int64_t g = 0; g < kv_heads; g++) {
        const float *qg = q + g * r * hd;
        float *og = out + g * r * hd;
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < r; j++)
                scores[j * T + t] = dot_kv(qg + j * hd, K, g * sg + t * st, hd, kbf16) * scaling;
        for (int64_t j = 0; j < r; j++) {
            const float inv = 1.0f / exp_shifted(scores + j * T, T);
            for (int64_t t = 0; t < T; t++) scores[j * T + t] *= inv;
        }
        for (int64_t i = 0; i < r * hd; i++) og[i] = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            const int64_t vt = g * sg + t * st;
            for (int64_t j = 0; j < r; j++) {
                const float p = scores[j * T + t];
                float *o = og + j * hd;
                int64_t i = 0;
                for (; i + LANES <= hd; i += LANES) storeu(o + i, loadu(o + i) + p * load_kv(V, vt + i, vbf16));
                for (; i < hd; i++) o[i] += p * kv_at(V, vt + i, vbf16);
            }
        }
    }
}

/* gu[i] = silu(gu[i]) * gu[inter + i] for i < inter, in place in the first half */
static void silu_mul(float *gu, int64_t inter) {
    int64_t i = 0;
    for (; i + LANES <= inter; i += LANES) {
        const vf g = loadu(gu + i);
        storeu(gu + i, g / (1.0f + vexp2(-g * LOG2E)) * loadu(gu + inter + i));
    }
    for (; i < inter; i++) {
        const float g = gu[i];
        gu[i] = g / (1.0f + vexp2(splat(-g * LOG2E))[0]) * gu[inter + i];
    }
}

/* Floats of scratch storm_decode_f32 needs for a cache of T positions. */
int64_t storm_decode_scratch(int64_t d, int64_t heads, int64_t kv_heads, int64_t hd, int64_t inter, int64_t T) {
    return d + (heads + 2 * kv_heads) * hd + heads * hd + 2 * inter + heads / kv_heads * T;
}

/* Every layer for one token: h (d) in, h out. Writes each layer's key and value at position `pos`
 * of its cache buffers and attends over positions 0..pos.
 *   w: 16 pointers per layer, every matrix (out, in) row-major as nn.Linear holds it, each bias or NULL:
 *      input RMSNorm weight (d), post-attention RMSNorm weight (d), q (heads hd, d), its bias,
 *      k (kv_heads hd, d), its bias, v (kv_heads hd, d), its bias, o (d, heads hd), its bias,
 *      gate (inter, d), its bias, up (inter, d), its bias, down (d, inter), its bias;
 *   kv: 2 pointers per layer, the key and the value buffer, both with element strides sg (KV head)
 *      and st (position), hd contiguous; float32, or bfloat16 where bit 0 (keys) / bit 1 (values) of
 *      kv_bf16 is set (under bf16 autocast the keys come out of the rotary embedding in float32);
 *   cos, sin (hd): the rotary embedding at `pos`, as the model's rotary module returns it;
 *   scratch: at least storm_decode_scratch(..., pos + 1) floats. Returns 0. */
int storm_decode_f32(int64_t layers, int64_t d, int64_t heads, int64_t kv_heads, int64_t hd, int64_t inter,
                     float eps, float scaling, int64_t pos, float *h, const float *cos, const float *sin,
                     const float *const *w, void *const *kv, int64_t sg, int64_t st, int kv_bf16, float *scratch) {
    const int64_t nq = heads * hd, nk = kv_heads * hd, T = pos + 1;
    float *x = scratch, *qkv = x + d, *att = qkv + nq + 2 * nk, *gu = att + nq, *scores = gu + 2 * inter;
    for (int64_t l = 0; l < layers; l++, w += 16, kv += 2) {
        rms_norm(h, w[0], x, d, eps);
        gemv(x, w[2], w[3], qkv, d, nq, 0);
        gemv(x, w[4], w[5], qkv + nq, d, nk, 0);
        gemv(x, w[6], w[7], qkv + nq + nk, d, nk, 0);
        rotary(qkv, heads + kv_heads, hd, cos, sin); /* q and k heads are adjacent */
        for (int64_t g = 0; g < kv_heads; g++) {
            store_kv(kv[0], g * sg + pos * st, qkv + nq + g * hd, hd, kv_bf16 & 1);
            store_kv(kv[1], g * sg + pos * st, qkv + nq + nk + g * hd, hd, kv_bf16 & 2);
        }
        attend(qkv, kv[0], kv[1], kv_bf16 & 1, kv_bf16 & 2, sg, st, T, heads, kv_heads, hd, scaling, scores, att);
        gemv(att, w[8], w[9], h, nq, d, 1);
        rms_norm(h, w[1], x, d, eps);
        gemv(x, w[10], w[11], gu, d, inter, 0);
        gemv(x, w[12], w[13], gu + inter, d, inter, 0);
        silu_mul(gu, inter);
        gemv(gu, w[14], w[15], h, inter, d, 1);
    }
    return 0;
}

/* Element-wise functions that PyTorch computes in several passes over memory, in one pass here.
 * Called by storm_vlm.model.fast_paths (GELU) and storm_vlm.model.ssm.mixer (conv + SiLU); built with the
 * scan kernel (cpu_kernel.py), same vector width.
 *
 * tanh-GELU (SigLIP's gelu_pytorch_tanh): 0.5 x (1 + tanh(u)) = x * sigmoid(2u),
 * 2u = x (c + c * 0.044715 x^2), c = 2 sqrt(2 / pi), with sigmoid through the exp2 of _vec.h: float32
 * math, within float rounding of the tanh form. PyTorch takes four passes for it in float32 (or one
 * pass through a slow vectorised tanh), and in bfloat16 one pass that is slower still.
 *
 * SiLU gate (Llama's / Qwen2's MLP): silu(g) * u in one pass, where PyTorch takes two (and a tensor
 * between them the size of the MLP's activation).
 */
#include "_vec.h"

#define TWO_C 1.5957691216057308f /* 2 sqrt(2 / pi) */

static inline vf gelu_tanh(vf x) {
    const vf two_u = x * (TWO_C + (0.044715f * TWO_C) * x * x);
    return x / (1.0f + vexp2(-two_u * LOG2E));
}

/* y[i] = gelu_tanh(x[i]), i < n, float32 (y may be x) */
void storm_gelu_tanh_f32(const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) storeu(y + i, gelu_tanh(loadu(x + i)));
    for (; i < n; i++) y[i] = gelu_tanh(splat(x[i]))[0];
}

/* The same on bfloat16 values, computed in float32 and rounded as torch rounds (_vec.h) */
void storm_gelu_tanh_bf16(const uint16_t *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) store_bf16(y + i, gelu_tanh(load_bf16(x + i)));
    for (; i < n; i++) y[i] = f32_to_bf16(gelu_tanh(splat(bf16_to_f32(x[i])))[0]);
}

/* y[i] = silu(g[i]) * u[i], i < n, float32 (y may be g or u) */
void storm_silu_mul_f32(const float *g, const float *u, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) storeu(y + i, vsilu(loadu(g + i)) * loadu(u + i));
    for (; i < n; i++) y[i] = vsilu(splat(g[i]))[0] * u[i];
}

/* The same on bfloat16 values, computed in float32 and rounded once as torch rounds */
void storm_silu_mul_bf16(const uint16_t *g, const uint16_t *u, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) store_bf16(y + i, vsilu(load_bf16(g + i)) * load_bf16(u + i));
    for (; i < n; i++)
        y[i] = f32_to_bf16(vsilu(splat(bf16_to_f32(g[i])))[0] * bf16_to_f32(u[i]));
}

/* Mamba's depthwise causal conv and SiLU, one pass: out[t, c] = silu(bias[c] + sum_k w[k, c] x[t + k - K + 1, c])
 * for rows t0 <= t < t1 of one sequence, x (L, d) time-major with rows xs elements apart (channels
 * contiguous: a column slice of the in-projection's output needs no copy), out (L, d) contiguous,
 * both float32 or, with bf16, both bfloat16 (the in-projection's output under autocast: widened as
 * read, float32 math, rounded once as torch rounds), wT the conv weight transposed to (K, d), bias
 * (d) or NULL; before the sequence, prefix (K - 1, d) float32 (a carried conv state), or zeros where
 * NULL. reverse: the same conv over x flipped along L, flipped back (anti-causal: tap k reads
 * x[t + K - 1 - k], zeros after the end; prefix unused). PyTorch takes six passes for it (a padded
 * copy, one multiply-add per tap, the SiLU). */
static inline float tap_value(const void *x, int bf16, int64_t xs, const float *prefix, int64_t s, int64_t L,
                              int64_t d, int64_t c, int64_t K) {
    if (s >= 0 && s < L) return wide_at(x, s * xs + c, bf16);
    return (s < 0 && prefix) ? prefix[(s + K - 1) * d + c] : 0.0f;
}

static inline __attribute__((always_inline)) void dwconv_silu(const void *x, int bf16, int64_t xs, const float *wT,
                                                              const float *bias, const float *prefix, void *out,
                                                              int64_t L, int64_t d, int64_t K, int reverse,
                                                              int64_t t0, int64_t t1) {
    const int64_t dv = d / LANES * LANES;
    for (int64_t t = t0; t < t1; t++) {
        /* rows whose taps all lie inside x take the vector loop; the first / last K - 1 rows the generic one */
        const int inside = reverse ? t + K - 1 < L : t - K + 1 >= 0;
        int64_t c = 0;
        if (inside) {
            for (; c < dv; c += LANES) {
                vf acc = bias ? loadu(bias + c) : splat(0.0f);
                for (int64_t k = 0; k < K; k++) {
                    const int64_t s = reverse ? t + K - 1 - k : t + k - K + 1;
                    acc += loadu(wT + k * d + c) * load_wide(x, s * xs + c, bf16);
                }
                store_wide(out, t * d + c, vsilu(acc), bf16);
            }
        }
        for (; c < d; c++) {
            float acc = bias ? bias[c] : 0.0f;
            for (int64_t k = 0; k < K; k++)
                acc += wT[k * d + c] * tap_value(x, bf16, xs, reverse ? NULL : prefix,
                                                 reverse ? t + K - 1 - k : t + k - K + 1, L, d, c, K);
            set_wide(out, t * d + c, vsilu(splat(acc))[0], bf16);
        }
    }
}

void storm_dwconv_silu_f32(const float *x, int64_t xs, const float *wT, const float *bias, const float *prefix,
                           float *out, int64_t L, int64_t d, int64_t K, int reverse, int64_t t0, int64_t t1) {
    dwconv_silu(x, 0, xs, wT, bias, prefix, out, L, d, K, reverse, t0, t1);
}

void storm_dwconv_silu_bf16(const uint16_t *x, int64_t xs, const float *wT, const float *bias, const float *prefix,
                            uint16_t *out, int64_t L, int64_t d, int64_t K, int reverse, int64_t t0, int64_t t1) {
    dwconv_silu(x, 1, xs, wT, bias, prefix, out, L, d, K, reverse, t0, t1);
}

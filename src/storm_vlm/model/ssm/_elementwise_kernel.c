/* Element-wise functions that PyTorch computes in several passes over memory, in one pass here.
 * Called by storm_vlm.model.fast_paths; built with the scan kernel (cpu_kernel.py), same vector width.
 *
 * tanh-GELU (SigLIP's gelu_pytorch_tanh): 0.5 x (1 + tanh(u)) = x * sigmoid(2u),
 * 2u = x (c + c * 0.044715 x^2), c = 2 sqrt(2 / pi), with sigmoid through the exp2 of _vec.h: float32
 * math, within float rounding of the tanh form. PyTorch takes four passes for it in float32 (or one
 * pass through a slow vectorised tanh), and in bfloat16 one pass that is slower still.
 */
#include "_vec.h"

#define LOG2E 1.4426950408889634f
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

/* The same on bfloat16 values (the upper halves of float32), computed in float32 and rounded to the
 * nearest even as torch rounds (NaN stays NaN) */
typedef uint16_t vbf __attribute__((vector_size(2 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));

static inline vu round_bf16(vf v) {
    const vu b = (vu)v;
    const vu rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const vu nan = (vu)((b & 0x7fffffffu) > 0x7f800000u);
    return (nan & 0x7fc0u) | (~nan & rounded);
}

void storm_gelu_tanh_bf16(const uint16_t *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vbf b;
        memcpy(&b, x + i, sizeof b);
        const vf v = (vf)(__builtin_convertvector(b, vu) << 16);
        const vbf out = __builtin_convertvector(round_bf16(gelu_tanh(v)), vbf);
        memcpy(y + i, &out, sizeof out);
    }
    for (; i < n; i++) {
        const uint32_t b = (uint32_t)x[i] << 16;
        float f;
        memcpy(&f, &b, sizeof f);
        y[i] = (uint16_t)round_bf16(gelu_tanh(splat(f)))[0];
    }
}

/* Vector basics shared by the CPU kernels (_scan_kernel.c, _decode_kernel.c, _elementwise_kernel.c): a
 * float vector of STORM_LANES lanes through GCC/Clang vector extensions (the compiler splits a vector
 * wider than the target's registers), lane select, NaN-keeping max/min, horizontal sum, unaligned
 * load/store, exp2 and SiLU, and bfloat16 loads and rounding. Built by storm_vlm/model/ssm/cpu_kernel.py with -DSTORM_LANES=16 (AVX-512 flags), 8 (AVX2 + FMA)
 * or 4 (the compiler's baseline flags).
 *
 * exp2 is a degree-6 polynomial on [-0.5, 0.5] scaled by 2^k through the exponent bits
 * (relative error <= 1e-7, about one float32 ulp); NaN in, NaN out. On AVX-512 it takes three
 * instructions for the rest (round, reduce, scale) and rounds results below 2^-126 to subnormals; the
 * other builds clamp, build 2^k from exponent bits and flush below 2^-127 to 0.
 */
#ifndef STORM_VEC_H
#define STORM_VEC_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef STORM_LANES
#define STORM_LANES 8
#endif
#define LANES STORM_LANES

#if LANES != 4 && LANES != 8 && LANES != 16
#error "STORM_LANES must be 4, 8 or 16"
#endif

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

/* every lane x: -0 + x is x for every x (NaN, -0 included), so this compiles to a broadcast alone,
 * where 0 + x would cost an add per call (and make -0 into +0) */
static inline vf splat(float x) { return -(vf){0} + x; }
/* m ? a : b per lane, m from a vector comparison (all ones or zero) */
static inline vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }

#if LANES == 16 && defined(__AVX512F__)
#include <immintrin.h>
#define STORM_VECTOR_ISA "avx512"
/* max/min that return their second operand when it is NaN (x86 semantics), so NaN survives */
static inline vf vmax_keepnan(vf lo, vf x) { return (vf)_mm512_max_ps((__m512)lo, (__m512)x); }
static inline vf vmin_keepnan(vf hi, vf x) { return (vf)_mm512_min_ps((__m512)hi, (__m512)x); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#elif LANES == 8 && defined(__AVX__)
#include <immintrin.h>
#define STORM_VECTOR_ISA "avx"
static inline vf vmax_keepnan(vf lo, vf x) { return (vf)_mm256_max_ps((__m256)lo, (__m256)x); }
static inline vf vmin_keepnan(vf hi, vf x) { return (vf)_mm256_min_ps((__m256)hi, (__m256)x); }
static inline float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#define STORM_VECTOR_ISA "generic"
/* pairwise: lane i + lane i + LANES/2, and so on down (the AVX version's order for 8 lanes) */
static inline float hsum(vf v) {
    float s[LANES];
    memcpy(s, &v, sizeof v);
    for (int w = LANES / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) s[i] += s[i + w];
    return s[0];
}
static inline vf vmax_keepnan(vf lo, vf x) { return sel(x < lo, lo, x); }
static inline vf vmin_keepnan(vf hi, vf x) { return sel(x > hi, hi, x); }
#endif

/* 2^f for f in [-0.5, 0.5] */
static inline vf exp2_poly(vf f) {
    vf q = splat(0.00015370726760011166f);
    q = q * f + 0.0013399848248809576f;
    q = q * f + 0.009618373587727547f;
    q = q * f + 0.05550329014658928f;
    q = q * f + 0.24022647738456726f;
    q = q * f + 0.6931471824645996f;
    return q * f + 1.0f;
}

#if LANES == 16 && defined(__AVX512F__)
static inline vf vexp2(vf x) {
    /* k = round(x) and f = x - k (vreduceps: 0 for +-inf, so no clamp), then p(f) * 2^k by vscalefps,
     * which rounds a result below 2^-126 to the nearest subnormal (or 0) and one above the float
     * range to +inf; NaN stays NaN */
    const int near = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 k = _mm512_roundscale_ps((__m512)x, near);
    return (vf)_mm512_scalef_ps((__m512)exp2_poly((vf)_mm512_reduce_ps((__m512)x, near)), k);
}
#else
static inline vf vexp2(vf x) {
    /* clamp to [-127, 128]; 2^k is then built from exponent bits 0 (k = -127: flushes to 0) to
     * 255 (k = 128: +inf), and multiplying by it keeps NaN as NaN */
    vf xc = vmin_keepnan(splat(128.0f), vmax_keepnan(splat(-127.0f), x));
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf r = xc + magic;
    vf k = r - magic;
    vi ki = (vi)r - (vi)magic;
    return exp2_poly(xc - k) * (vf)((ki + 127) << 23); /* f = xc - k in [-0.5, 0.5] */
}
#endif

#define LOG2E 1.4426950408889634f

/* x * sigmoid(x) */
static inline vf vsilu(vf x) { return x / (1.0f + vexp2(-x * LOG2E)); }

/* bfloat16 is the upper half of a float32: widened exactly, and rounded to the nearest even as torch
 * rounds (NaN stays NaN: written as c10's scalar conversion writes it, 0x7fc0, except by AVX512-BF16's
 * own conversion, which keeps the sign and top bits) */
typedef uint16_t vbf __attribute__((vector_size(2 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));

static inline vf load_bf16(const uint16_t *p) {
#if LANES == 16 && defined(__AVX512F__) /* one zero-extending load (the generic form compiles to five) */
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif LANES == 8 && defined(__AVX2__)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    vbf b;
    memcpy(&b, p, sizeof b);
    return (vf)(__builtin_convertvector(b, vu) << 16);
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

/* the bf16 bits of each lane, in the low 16 bits */
static inline vu round_bf16(vf v) {
    const vu b = (vu)v;
    const vu rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const vu nan = (vu)((b & 0x7fffffffu) > 0x7f800000u);
    return (nan & 0x7fc0u) | (~nan & rounded);
}

static inline uint16_t f32_to_bf16(float f) { return (uint16_t)round_bf16(splat(f))[0]; }

static inline void store_bf16(uint16_t *p, vf v) {
#if defined(__AVX512BF16__) /* the same rounding in one instruction (a NaN keeps its sign and top bits) */
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh((__m512)v));
#elif LANES == 16 && defined(__AVX512F__) /* one narrowing move (the generic form compiles to a permute) */
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16((__m512i)round_bf16(v)));
#else
    const vbf b = __builtin_convertvector(round_bf16(v), vbf);
    memcpy(p, &b, sizeof b);
#endif
}

/* unaligned vector load / store (memcpy compiles to one unaligned vector move) */
static inline vf loadu(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void storeu(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Elements i.. of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array as float32: a vector, one value
 * (the KV cache and the LLM's weights under the bfloat16 precision, activations under autocast) */
static inline vf load_wide(const void *p, int64_t i, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)p + i) : loadu((const float *)p + i);
}

static inline float wide_at(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* one value into element i of a float32 or bfloat16 array (rounded as torch rounds) */
static inline void set_wide(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* a vector into elements i.. of a float32 or bfloat16 array (rounded as torch rounds) */
static inline void store_wide(void *p, int64_t i, vf v, int bf16) {
    if (bf16)
        store_bf16((uint16_t *)p + i, v);
    else
        storeu((float *)p + i, v);
}

#endif

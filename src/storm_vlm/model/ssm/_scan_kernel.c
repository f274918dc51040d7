/* Fused selective scan for the CPU (float32), forward and backward: one pass over time per block of
 * LANES channels (the forward takes the blocks of SPAN channels through one time tile before the next),
 * everything (bias, softplus, the L*D*N decays, the state update, y = C.h + D*u, the silu(z) gate)
 * in registers and L1. Compiled on first use by storm_vlm/ssm/cpu_kernel.py, once per
 * instruction set: -DSTORM_LANES=16 with AVX-512 flags, 8 with AVX2 + FMA, 4 with the compiler's
 * baseline flags (SSE2 on x86-64, NEON on aarch64) as the portable fallback. GCC/Clang vector
 * extensions carry the arithmetic at any width (the compiler splits a vector wider than the
 * target's registers); only max/min and the horizontal sum use intrinsics where they exist.
 *
 * Layout: u, delta, z are (batch, L, dim) or (batch, dim, L) through explicit element strides (the
 * forward also reads them, and writes out, in bfloat16); A (dim, N) contiguous; BT, CT are (batch, L,
 * groups, N), each step's groups x N values contiguous, steps and batch elements through explicit
 * strides in the forward (B and C read where the mixer's x_proj wrote them) and contiguous in the
 * backward; out has explicit strides. Channel c uses group c / (dim / groups).
 *
 * Why vectorise over channels (not over N): with time-major inputs, LANES neighbouring channels are
 * one load per step, and y = sum_n C[n] h[n] needs no horizontal sum.
 * The vector type, exp2 and the other basics are in _vec.h (shared with _decode_kernel.c).
 */
#include "_vec.h"

#define TILE 64 /* time steps loaded per block (registers and L1) */
#define SPAN 512 /* channels whose blocks take each time tile in turn (a multiple of every LANES) */

/* The build's vector width and instruction set, checked by the loader. */
int storm_scan_lanes(void) { return LANES; }
const char *storm_scan_vector_isa(void) { return STORM_VECTOR_ISA; }

/* torch's softplus (beta 1, threshold 20): x > 20 ? x : log1p(exp(x)), as max(x, 0) + log1p(exp(-|x|)),
 * log1p(t) = 2 atanh(s) with s = t / (2 + t) in [0, 1/3] (an odd series to s^15): one division and no
 * log, accurate to a few float32 ulps like torch's (NaN stays NaN) */
static inline vf vsoftplus(vf x) {
    const vf t = vexp2((vf)((vi)x | (vi)splat(-0.0f)) * LOG2E); /* exp(-|x|) */
    const vf s = t / (2.0f + t), s2 = s * s;
    vf p = splat(1.0f / 15.0f);
    p = p * s2 + (1.0f / 13.0f);
    p = p * s2 + (1.0f / 11.0f);
    p = p * s2 + (1.0f / 9.0f);
    p = p * s2 + (1.0f / 7.0f);
    p = p * s2 + (1.0f / 5.0f);
    p = p * s2 + (1.0f / 3.0f);
    const vf log1p_t = 2.0f * s + 2.0f * s * s2 * p;
    return sel(x > 20.0f, x, vmax_keepnan(splat(0.0f), x) + log1p_t);
}

/* An array read or written through element strides (batch, time, channel), float32 or, with bf16,
 * bfloat16 (the forward's inputs and output under bf16 autocast: widened as read, rounded as
 * written, as torch rounds) */
typedef struct {
    const void *p;
    int64_t sb, st, sc;
    int bf16;
} strided;

typedef struct {
    void *p;
    int64_t sb, st, sc;
    int bf16, add; /* add: the values are added to what the array holds */
} strided_out;

#define AT(s, b, t, c) ((b) * (s).sb + (t) * (s).st + (c) * (s).sc) /* element (b, t, c)'s offset */

/* tile[t][lane] = element off + t * st + lane * sc of s for t < nt, lane < w; zero elsewhere */
static void load_tile(vf *tile, strided s, int64_t off, int64_t nt, int64_t w) {
    if (s.sc == 1 && w == LANES) {
        for (int64_t t = 0; t < nt; t++) tile[t] = load_wide(s.p, off + t * s.st, s.bf16);
        return;
    }
    memset(tile, 0, (size_t)nt * sizeof(vf));
    for (int64_t l = 0; l < w; l++)
        for (int64_t t = 0; t < nt; t++) ((float *)&tile[t])[l] = wide_at(s.p, off + l * s.sc + t * s.st, s.bf16);
}

static void store_tile(const vf *tile, strided_out s, int64_t off, int64_t nt, int64_t w) {
    if (s.sc == 1 && w == LANES) {
        for (int64_t t = 0; t < nt; t++) {
            const int64_t i = off + t * s.st;
            store_wide(s.p, i, s.add ? load_wide(s.p, i, s.bf16) + tile[t] : tile[t], s.bf16);
        }
        return;
    }
    for (int64_t l = 0; l < w; l++)
        for (int64_t t = 0; t < nt; t++) {
            const int64_t i = off + l * s.sc + t * s.st;
            const float v = ((const float *)&tile[t])[l];
            set_wide(s.p, i, s.add ? wide_at(s.p, i, s.bf16) + v : v, s.bf16);
        }
}

/* Everything one call scans. B and C are either per step, BT/CT (batch, L, groups, N) with element
 * strides bt_sb, bt_st (ct_sb, ct_st) per batch element and step, or constant per channel (bconst /
 * cconst), (dim, N) contiguous like A (mamba-ssm's constant B/C). */
typedef struct {
    int64_t batch, L, dim, groups, N, chunk;
    strided u, dl, z;
    const float *A, *BT, *CT, *Dv, *bias;
    int64_t bt_sb, bt_st, ct_sb, ct_st;
    int softplus, reverse;
    const float *dtW; /* forward only: NULL, or (dim, R) contiguous when dl holds delta's low-rank factor */
    int64_t R;
} scan_args;

/* B[n] (or C[n]) of this step: a broadcast scalar, or the block's constant vector */
#define BN(n) (bconst ? bv[n] : splat(Bt[n]))
#define CN(n) (cconst ? cv[n] : splat(Ct[n]))

/* a (dim, N) array's values for channels [c, c + w) as N vectors (zero in unused lanes) */
static inline void load_cols(vf *dst, const float *src, int64_t c, int64_t w, int64_t N) {
    for (int64_t n = 0; n < N; n++) {
        dst[n] = splat(0.0f);
        for (int64_t l = 0; l < w; l++) dst[n][l] = src[(c + l) * N + n];
    }
}

/* tile[t] = sum_r W[r] * dt[off + t * st + r * sr] for t < nt (dt.sc steps over r): delta's tile from
 * its low-rank factor dt (the mixer's dt_proj product done here, where its L x dim result never goes
 * through memory) */
static void lowrank_tile(vf *tile, const vf *W, strided dt, int64_t off, int64_t nt, int64_t R) {
    const int64_t sr = dt.sc;
    for (int64_t t = 0; t < nt; t++) {
        const int64_t row = off + t * dt.st;
        vf acc0 = splat(0.0f), acc1 = splat(0.0f);
        int64_t r = 0;
        for (; r + 1 < R; r += 2) {
            acc0 += W[r] * wide_at(dt.p, row + r * sr, dt.bf16);
            acc1 += W[r + 1] * wide_at(dt.p, row + (r + 1) * sr, dt.bf16);
        }
        if (r < R) acc0 += W[r] * wide_at(dt.p, row + r * sr, dt.bf16);
        tile[t] = acc0 + acc1;
    }
}

static void *aligned_buf(size_t count) { /* count vectors, aligned to a vector */
    return aligned_alloc(sizeof(vf), (count ? count : 1) * sizeof(vf));
}

/* One block's vectors between tiles: its state h (N), then the constants it reads every step:
 * A2 = A log2(e) (N), dt_proj's weights (R), constant B and C (N each), D and the step-size bias. */
static inline int64_t block_vectors(const scan_args *a) { return 4 * a->N + a->R + 2; }

/* Set up one block (batch b, channels [c, c + w) of group grp) in mem (block_vectors(a) vectors):
 * its state from h0 (NULL: zeros; else (batch, dim, N)) and its constants, lanes past w zero. */
static void block_init(const scan_args *a, vf *mem, int64_t b, int64_t c, int64_t w, const float *h0, int bconst,
                       int cconst) {
    const int64_t N = a->N, dim = a->dim;
    vf *h = mem, *a2 = h + N, *wdt = a2 + N, *bv = wdt + a->R, *cv = bv + N, *dv = cv + N;
    load_cols(a2, a->A, c, w, N);
    for (int64_t n = 0; n < N; n++) a2[n] *= LOG2E;
    if (a->dtW) load_cols(wdt, a->dtW, c, w, a->R);
    if (bconst) load_cols(bv, a->BT, c, w, N);
    if (cconst) load_cols(cv, a->CT, c, w, N);
    for (int64_t n = 0; n < N; n++) {
        h[n] = splat(0.0f);
        if (h0)
            for (int64_t l = 0; l < w; l++) h[n][l] = h0[(b * dim + c + l) * N + n];
    }
    dv[0] = dv[1] = splat(0.0f);
    for (int64_t l = 0; l < w; l++) {
        if (a->Dv) dv[0][l] = a->Dv[c + l];
        if (a->bias) dv[1][l] = a->bias[c + l];
    }
}

/* One tile (the i-th in processing order) of one block set up by block_init in mem; the block's
 * state stays in mem for its next tile. */
static inline __attribute__((always_inline)) void scan_tile(const scan_args *a, vf *mem, int64_t i, int64_t b,
                                                            int64_t c, int64_t w, int64_t grp, strided_out o,
                                                            float *states, const int bconst, const int cconst) {
    const int64_t L = a->L, N = a->N, chunk = a->chunk;
    const int reverse = a->reverse, softplus = a->softplus;
    const strided u = a->u, dl = a->dl, z = a->z;
    const int64_t hd = a->dim / a->groups;
    vf *h = mem, *a2 = h + N, *wdt = a2 + N, *bv = wdt + a->R, *cv = bv + N;
    const vf Dvec = cv[N], bvec = cv[N + 1];
    vf tu[TILE], td[TILE], tz[TILE], ty[TILE];
    const int64_t ntiles = (L + TILE - 1) / TILE;
    const int64_t nchunks = chunk > 0 ? (L + chunk - 1) / chunk : 0;
    const int64_t tile = reverse ? ntiles - 1 - i : i;
    const int64_t t0 = tile * TILE;
    const int64_t nt = (L - t0) < TILE ? (L - t0) : TILE;
    load_tile(tu, u, AT(u, b, t0, c), nt, w);
    if (a->dtW)
        lowrank_tile(td, wdt, dl, AT(dl, b, t0, 0), nt, a->R);
    else
        load_tile(td, dl, AT(dl, b, t0, c), nt, w);
    if (z.p) load_tile(tz, z, AT(z, b, t0, c), nt, w);
    /* the step sizes of the whole tile first: the softplus is a long chain of dependent operations
     * (exp2, a division, a series), which inside the time loop would delay every step's decays */
    for (int64_t k = 0; k < nt; k++) td[k] = softplus ? vsoftplus(td[k] + bvec) : td[k] + bvec;
    for (int64_t j = 0; j < nt; j++) {
        const int64_t k = reverse ? nt - 1 - j : j;
        const int64_t t = t0 + k;
        const vf dt = td[k];
        const vf du = dt * tu[k];
        const float *Bt = bconst ? NULL : a->BT + b * a->bt_sb + t * a->bt_st + grp * N;
        const float *Ct = cconst ? NULL : a->CT + b * a->ct_sb + t * a->ct_st + grp * N;
        vf y0 = Dvec * tu[k], y1 = splat(0.0f);
        int64_t n = 0;
        for (; n + 1 < N; n += 2) {
            h[n] = vexp2(dt * a2[n]) * h[n] + du * BN(n);
            h[n + 1] = vexp2(dt * a2[n + 1]) * h[n + 1] + du * BN(n + 1);
            y0 += CN(n) * h[n];
            y1 += CN(n + 1) * h[n + 1];
        }
        if (n < N) {
            h[n] = vexp2(dt * a2[n]) * h[n] + du * BN(n);
            y0 += CN(n) * h[n];
        }
        ty[k] = y0 + y1;
        if (states) {
            /* the state entering each processed chunk, as the recomputing backward expects */
            int64_t kk = -1;
            if (!reverse && ((t + 1) % chunk == 0 || t == L - 1)) kk = t / chunk + 1;
            if (reverse && t % chunk == 0) kk = nchunks - t / chunk;
            if (kk >= 0) {
                float *s = states + (((kk * a->batch + b) * a->groups + grp) * N) * hd + (c - grp * hd);
                for (int64_t m = 0; m < N; m++)
                    for (int64_t l = 0; l < w; l++) s[m * hd + l] = h[m][l];
            }
        }
    }
    if (z.p) /* the gate, off the time loop likewise */
        for (int64_t k = 0; k < nt; k++) ty[k] *= vsilu(tz[k]);
    store_tile(ty, o, AT(o, b, t0, c), nt, w);
}

/* the four specialisations (per-step or constant B, C), so neither choice costs a branch per step */
#define SCAN_TILE(bc, cc)                                                                                      \
    static void scan_tile_##bc##cc(const scan_args *a, vf *mem, int64_t i, int64_t b, int64_t c, int64_t w,    \
                                   int64_t grp, strided_out o, float *states) {                                \
        scan_tile(a, mem, i, b, c, w, grp, o, states, bc, cc);                                                 \
    }
SCAN_TILE(0, 0)
SCAN_TILE(0, 1)
SCAN_TILE(1, 0)
SCAN_TILE(1, 1)

/* Scan channels [c0, c1) of every batch element. delta: (batch, L, dim) through its strides or, when
 * dtW (dim, R) is given, its low-rank factor dt (batch, L, R) through the same strides (the channel
 * stride then steps over R), delta = dt dtW^T computed tile by tile. bconst / cconst: B / C are
 * (dim, N) constants; h0: NULL (start from 0) or the initial state (batch, dim, N); states: NULL, or
 * (L/chunk + 1, batch, groups, N, dim/groups) receiving the state entering each processed chunk
 * (index 0 is left alone); last: NULL, or (batch, dim, N) receiving the final state. io_bf16: u,
 * delta (or dt), z and out are bfloat16 (inference under bf16 autocast: no float32 copies of them),
 * else float32; everything else is float32 and the arithmetic float32 either way.
 * SPAN channels at a time, time tile by time tile, each tile through every block of the span (the
 * blocks' states wait in a buffer in between): time-major tensors' rows are then read and written
 * in runs of up to SPAN channels while they are in cache, where a block running through all of time
 * would stride across every row, and a tile of a span of channel-major tensors (SPAN rows of TILE
 * steps) still fits in L2.
 * Returns 0, or 1 when the block buffer cannot be allocated. */
int storm_scan_fwd_f32(int64_t batch, int64_t L, int64_t dim, int64_t groups, int64_t N, const void *u,
                       int64_t u_sb, int64_t u_st, int64_t u_sc, const void *delta, int64_t d_sb, int64_t d_st,
                       int64_t d_sc, const float *dtW, int64_t R, const void *z, int64_t z_sb, int64_t z_st,
                       int64_t z_sc, const float *A, const float *BT, int64_t bt_sb, int64_t bt_st,
                       const float *CT, int64_t ct_sb, int64_t ct_st, int bconst, int cconst, const float *Dv,
                       const float *bias, int softplus, int reverse, const float *h0, void *out, int64_t o_sb,
                       int64_t o_st, int64_t o_sc, float *states, int64_t chunk, float *last, int64_t c0, int64_t c1,
                       int io_bf16) {
    const int64_t hd = dim / groups;
    const scan_args a = {batch, L, dim, groups, N, chunk, {u, u_sb, u_st, u_sc, io_bf16},
                         {delta, d_sb, d_st, d_sc, io_bf16}, {z, z_sb, z_st, z_sc, io_bf16}, A, BT, CT, Dv, bias,
                         bt_sb, bt_st, ct_sb, ct_st, softplus, reverse, dtW, dtW ? R : 0};
    const strided_out o = {out, o_sb, o_st, o_sc, io_bf16, 0};
    void (*tile)(const scan_args *, vf *, int64_t, int64_t, int64_t, int64_t, int64_t, strided_out, float *) =
        bconst ? (cconst ? scan_tile_11 : scan_tile_10) : (cconst ? scan_tile_01 : scan_tile_00);
    const int64_t S = block_vectors(&a), ntiles = (L + TILE - 1) / TILE;
    vf *mem = aligned_buf((size_t)(SPAN / LANES) * S);
    if (!mem) return 1;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t grp = 0; grp < groups; grp++) {
            const int64_t lo = grp * hd > c0 ? grp * hd : c0, hi = (grp + 1) * hd < c1 ? (grp + 1) * hd : c1;
            for (int64_t s0 = lo; s0 < hi; s0 += SPAN) {
                const int64_t s1 = hi - s0 < SPAN ? hi : s0 + SPAN;
                for (int64_t c = s0; c < s1; c += LANES)
                    block_init(&a, mem + (c - s0) / LANES * S, b, c, s1 - c < LANES ? s1 - c : LANES, h0, bconst,
                               cconst);
                for (int64_t i = 0; i < ntiles; i++)
                    for (int64_t c = s0; c < s1; c += LANES)
                        tile(&a, mem + (c - s0) / LANES * S, i, b, c, s1 - c < LANES ? s1 - c : LANES, grp, o,
                             states);
                if (last)
                    for (int64_t c = s0; c < s1; c++)
                        for (int64_t m = 0; m < N; m++)
                            last[(b * dim + c) * N + m] = mem[(c - s0) / LANES * S + m][(c - s0) % LANES];
            }
        }
    free(mem);
    return 0;
}

/* in _elementwise_kernel.c and _linear_kernel.c (the same library) */
void storm_dwconv_silu_f32(const float *x, int64_t xs, const float *wT, const float *bias, const float *prefix,
                           float *out, int64_t L, int64_t d, int64_t K, int reverse, int64_t t0, int64_t t1);
void storm_linear_f32(const float *x, int64_t ldx, int64_t k, const float *w, int64_t ldw, const float *bias, float *y,
                      int64_t ldy, int64_t n, int64_t r0, int64_t r1);

/* One direction of a Mamba mixer in inference, from x (after in_proj) to the gated y: the depthwise
 * conv + SiLU (u), x_proj (dt | B | C) and the selective scan with delta = softplus(dt dtW' + dt_bias),
 * time tile by time tile, so each tile of u and x_proj's output is read back while it is in cache and
 * the three steps are one call. Every block of channels takes a tile before the next tile (x_proj needs
 * all of a step's channels), so the blocks' states for all dim channels wait in one buffer: meant for
 * widths up to about SPAN channels. The arithmetic is the separate kernels' (storm_dwconv_silu_f32,
 * storm_linear_f32, the forward scan), so the results are theirs bit for bit.
 * x, z: (batch, L, dim), channels contiguous, steps x_st / z_st apart; convT (K, dim), conv_bias (dim)
 * or NULL; xw: x_proj's weight packed as storm_linear_f32 reads it ((dim, xw_ld), columns dt (R), B (N),
 * C (N)), xw_bias likewise or NULL; dtW (dim, R), A (dim, N), Dv, dt_bias (dim) contiguous; out (batch,
 * L, dim) contiguous, with add: y is added to what out holds (out + y rounded once, as a separate
 * addition gives: how a bidirectional mixer sums its directions); u (L, dim) and xd (L, R + 2N):
 * scratch. reverse: the anti-causal direction (conv and scan over the sequence flipped). Returns 0, or
 * 1 when the block buffer cannot be allocated. */
int storm_mixer_direction_f32(int64_t batch, int64_t L, int64_t dim, int64_t N, int64_t R, int64_t K,
                              const float *x, int64_t x_sb, int64_t x_st, const float *convT, const float *conv_bias,
                              const float *xw, int64_t xw_ld, const float *xw_bias, const float *dtW, const float *A,
                              const float *Dv, const float *dt_bias, const float *z, int64_t z_sb, int64_t z_st,
                              float *out, int add, int reverse, float *u, float *xd) {
    const scan_args widths = {.N = N, .R = R};
    const int64_t W = R + 2 * N, ntiles = (L + TILE - 1) / TILE, S = block_vectors(&widths);
    vf *mem = aligned_buf((size_t)((dim + LANES - 1) / LANES) * S);
    if (!mem) return 1;
    for (int64_t b = 0; b < batch; b++) {
        const scan_args a = {1, L, dim, 1, N, 0, {u, 0, dim, 1, 0}, {xd, 0, W, 1, 0}, {z + b * z_sb, 0, z_st, 1, 0},
                             A, xd + R, xd + R + N, Dv, dt_bias, 0, W, 0, W, 1, reverse, dtW, R};
        const strided_out o = {out + b * L * dim, 0, dim, 1, 0, add};
        for (int64_t c = 0; c < dim; c += LANES)
            block_init(&a, mem + c / LANES * S, 0, c, dim - c < LANES ? dim - c : LANES, NULL, 0, 0);
        for (int64_t i = 0; i < ntiles; i++) {
            const int64_t t0 = (reverse ? ntiles - 1 - i : i) * TILE, t1 = t0 + TILE < L ? t0 + TILE : L;
            storm_dwconv_silu_f32(x + b * x_sb, x_st, convT, conv_bias, NULL, u, L, dim, K, reverse, t0, t1);
            storm_linear_f32(u, dim, dim, xw, xw_ld, xw_bias, xd, W, W, t0, t1);
            for (int64_t c = 0; c < dim; c += LANES)
                scan_tile_00(&a, mem + c / LANES * S, i, 0, c, dim - c < LANES ? dim - c : LANES, 0, o, NULL);
        }
    }
    free(mem);
    return 0;
}

/* ------------------------------------------------------------------------------------------ backward
 * Per block of LANES channels, chunk by chunk in the reverse of the forward's processing order: the
 * chunk's decays a_t and states h_t are recomputed from the saved state entering it (``states``,
 * as the forward wrote them, index 0 holding the initial state), then the adjoint recurrence
 * G_t = gy_t C_t + a_{t+1} G_{t+1} runs backwards through it. Per-step B and C gradients are sums
 * over channels: each call adds its channels' share into gBT / gCT, (batch, L, groups, N), which
 * the caller zeroes (one pair per thread). Constant B and C have per-channel gradients, (dim, N),
 * accumulated like gA. What is left of the adjoint after the first step is the initial state's
 * gradient. */

typedef struct {
    strided go;
    const float *states, *glast;
    strided_out gu, gdl, gz;
    float *gA, *gD, *gbias, *gBT, *gCT, *gh0;
} grad_args;

static inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp2(-x * LOG2E)); }

static inline __attribute__((always_inline)) int bwd_block(const scan_args *a, const grad_args *g, int64_t b,
                                                           int64_t c, int64_t w, int64_t grp, const int bconst,
                                                           const int cconst) {
    const int64_t L = a->L, dim = a->dim, N = a->N, T = a->chunk;
    const int reverse = a->reverse, softplus = a->softplus;
    const strided u = a->u, dl = a->dl, z = a->z, go = g->go;
    const int64_t hd = dim / a->groups;
    const int64_t nchunks = (L + T - 1) / T;
    const size_t gstride = (size_t)a->groups * N;
    /* one allocation for every work buffer: H, Ab (T x N each), 9 tiles of T, 12 vectors of N */
    vf *mem = aligned_buf((size_t)(2 * T * N + 9 * T + 12 * N));
    if (!mem) return 1;
    vf *H = mem, *Ab = H + T * N, *tu = Ab + T * N, *td = tu + T, *tz = td + T, *tg = tz + T, *tsig = tg + T;
    vf *ty = tsig + T, *ogu = ty + T, *ogd = ogu + T, *ogz = ogd + T, *an = ogz + T, *a2 = an + N;
    vf *carry = a2 + N, *gAacc = carry + N, *h0 = gAacc + N, *gAc = h0 + N;
    vf *bv = gAc + N, *cv = bv + N, *gBacc = cv + N, *gCacc = gBacc + N, *gBc = gCacc + N, *gCc = gBc + N;
    vf Dvec = splat(0.0f), bvec = splat(0.0f), gDacc = splat(0.0f), gbacc = splat(0.0f);
    load_cols(a2, a->A, c, w, N);
    if (bconst) load_cols(bv, a->BT, c, w, N);
    if (cconst) load_cols(cv, a->CT, c, w, N);
    for (int64_t n = 0; n < N; n++) {
        carry[n] = splat(0.0f);
        gAacc[n] = gBacc[n] = gCacc[n] = splat(0.0f);
        if (g->glast)
            for (int64_t l = 0; l < w; l++) carry[n][l] = g->glast[(b * dim + c + l) * N + n];
        a2[n] *= LOG2E;
        an[n] = a2[n] * 0.693147180559945f; /* A as the forward's decays see it */
    }
    for (int64_t l = 0; l < w; l++) {
        if (a->Dv) Dvec[l] = a->Dv[c + l];
        if (a->bias) bvec[l] = a->bias[c + l];
    }
    for (int64_t k = nchunks - 1; k >= 0; k--) {
        const int64_t ci = reverse ? nchunks - 1 - k : k;
        const int64_t s = ci * T, nt = (L - s) < T ? (L - s) : T;
        load_tile(tu, u, AT(u, b, s, c), nt, w);
        load_tile(td, dl, AT(dl, b, s, c), nt, w);
        load_tile(tg, go, AT(go, b, s, c), nt, w);
        if (z.p) load_tile(tz, z, AT(z, b, s, c), nt, w);
        const float *hs = g->states + (((k * a->batch + b) * a->groups + grp) * N) * hd + (c - grp * hd);
        for (int64_t n = 0; n < N; n++) {
            h0[n] = splat(0.0f);
            for (int64_t l = 0; l < w; l++) h0[n][l] = hs[n * hd + l];
        }
        /* the chunk's step sizes and softplus' derivative (tsig: sigmoid of the raw step) first, off
         * the time loops (see scan_block) */
        for (int64_t kk = 0; kk < nt; kk++) {
            const vf raw = td[kk] + bvec;
            td[kk] = softplus ? vsoftplus(raw) : raw;
            if (softplus) tsig[kk] = vsigmoid(raw);
        }
        /* recompute: j runs in processing order, position s + kk */
        for (int64_t j = 0; j < nt; j++) {
            const int64_t kk = reverse ? nt - 1 - j : j;
            const int64_t t = s + kk;
            const vf dt = td[kk];
            const vf du = dt * tu[kk];
            const float *Bt = bconst ? NULL : a->BT + b * a->bt_sb + t * a->bt_st + grp * N;
            const float *Ct = cconst ? NULL : a->CT + b * a->ct_sb + t * a->ct_st + grp * N;
            const vf *hp = j ? H + (reverse ? kk + 1 : kk - 1) * N : h0;
            vf *hc = H + kk * N, *ac = Ab + kk * N;
            vf y = Dvec * tu[kk];
            for (int64_t n = 0; n < N; n++) {
                ac[n] = vexp2(dt * a2[n]);
                hc[n] = ac[n] * hp[n] + du * BN(n);
                y += CN(n) * hc[n];
            }
            ty[kk] = y;
        }
        /* adjoint: j runs backwards through the processing order. Sums over time go into per-chunk
         * partials first (two-level summation: the error grows with chunk + L / chunk, not L). */
        vf gDc = splat(0.0f), gbc = splat(0.0f);
        for (int64_t n = 0; n < N; n++) gAc[n] = gBc[n] = gCc[n] = splat(0.0f);
        if (z.p) /* through the gate: z's gradient, and y's in tg */
            for (int64_t kk = 0; kk < nt; kk++) {
                const vf gy = tg[kk], zz = tz[kk], sz = vsigmoid(zz);
                ogz[kk] = gy * ty[kk] * sz * (1.0f + zz * (1.0f - sz));
                tg[kk] = gy * zz * sz;
            }
        for (int64_t j = nt - 1; j >= 0; j--) {
            const int64_t kk = reverse ? nt - 1 - j : j;
            const int64_t t = s + kk;
            const vf dt = td[kk], uu = tu[kk], gy = tg[kk];
            gDc += gy * uu;
            const vf du = dt * uu;
            const float *Bt = bconst ? NULL : a->BT + b * a->bt_sb + t * a->bt_st + grp * N;
            const float *Ct = cconst ? NULL : a->CT + b * a->ct_sb + t * a->ct_st + grp * N;
            float *gBt = bconst ? NULL : g->gBT + ((size_t)(b * L + t)) * gstride + grp * N;
            float *gCt = cconst ? NULL : g->gCT + ((size_t)(b * L + t)) * gstride + grp * N;
            const vf *hp = j ? H + (reverse ? kk + 1 : kk - 1) * N : h0;
            const vf *hc = H + kk * N, *ac = Ab + kk * N;
            vf gdu = splat(0.0f), gdtA = splat(0.0f);
            for (int64_t n = 0; n < N; n++) {
                const vf G = gy * CN(n) + carry[n];
                if (cconst)
                    gCc[n] += gy * hc[n];
                else
                    gCt[n] += hsum(gy * hc[n]);
                if (bconst)
                    gBc[n] += G * du;
                else
                    gBt[n] += hsum(G * du);
                gdu += G * BN(n);
                const vf wgt = G * hp[n] * ac[n]; /* dLoss / d(dt * A[n]) */
                gAc[n] += wgt * dt;
                gdtA += wgt * an[n];
                carry[n] = ac[n] * G;
            }
            vf gdt = gdtA + gdu * uu;
            if (softplus) gdt *= tsig[kk];
            gbc += gdt;
            ogd[kk] = gdt;
            ogu[kk] = gdu * dt + gy * Dvec;
        }
        gDacc += gDc;
        gbacc += gbc;
        for (int64_t n = 0; n < N; n++) {
            gAacc[n] += gAc[n];
            if (bconst) gBacc[n] += gBc[n];
            if (cconst) gCacc[n] += gCc[n];
        }
        store_tile(ogu, g->gu, AT(g->gu, b, s, c), nt, w);
        store_tile(ogd, g->gdl, AT(g->gdl, b, s, c), nt, w);
        if (z.p) store_tile(ogz, g->gz, AT(g->gz, b, s, c), nt, w);
    }
    for (int64_t l = 0; l < w; l++) { /* channels belong to one call: plain stores, summed over batch */
        for (int64_t n = 0; n < N; n++) {
            g->gA[(c + l) * N + n] += gAacc[n][l];
            if (bconst) g->gBT[(c + l) * N + n] += gBacc[n][l];
            if (cconst) g->gCT[(c + l) * N + n] += gCacc[n][l];
            if (g->gh0) g->gh0[(b * dim + c + l) * N + n] = carry[n][l];
        }
        if (g->gD) g->gD[c + l] += gDacc[l];
        if (g->gbias) g->gbias[c + l] += gbacc[l];
    }
    free(mem);
    return 0;
}

#define BWD_BLOCK(bc, cc)                                                                                      \
    static int bwd_block_##bc##cc(const scan_args *a, const grad_args *g, int64_t b, int64_t c, int64_t w,     \
                                  int64_t grp) {                                                              \
        return bwd_block(a, g, b, c, w, grp, bc, cc);                                                         \
    }
BWD_BLOCK(0, 0)
BWD_BLOCK(0, 1)
BWD_BLOCK(1, 0)
BWD_BLOCK(1, 1)

/* Backward of channels [c0, c1). gA (dim, N), gD and gbias (dim), and gBT / gCT ((batch, L, groups,
 * N), or (dim, N) when constant) are accumulated (+=) and must be zeroed by the caller. gh0: NULL,
 * or (batch, dim, N) receiving the initial state's gradient. Returns 0, or 1 when out of memory. */
int storm_scan_bwd_f32(int64_t batch, int64_t L, int64_t dim, int64_t groups, int64_t N, const float *u,
                       int64_t u_sb, int64_t u_st, int64_t u_sc, const float *delta, int64_t d_sb, int64_t d_st,
                       int64_t d_sc, const float *z, int64_t z_sb, int64_t z_st, int64_t z_sc, const float *gout,
                       int64_t g_sb, int64_t g_st, int64_t g_sc, const float *A, const float *BT, const float *CT,
                       int bconst, int cconst, const float *Dv, const float *bias, int softplus, int reverse,
                       const float *states, int64_t chunk, const float *glast, float *gu, int64_t gu_sb,
                       int64_t gu_st, int64_t gu_sc, float *gdelta, int64_t gd_sb, int64_t gd_st, int64_t gd_sc,
                       float *gz, int64_t gz_sb, int64_t gz_st, int64_t gz_sc, float *gA, float *gD, float *gbias,
                       float *gBT, float *gCT, float *gh0, int64_t c0, int64_t c1) {
    const int64_t hd = dim / groups, step = groups * N; /* BT, CT contiguous */
    const scan_args a = {batch, L, dim, groups, N, chunk, {u, u_sb, u_st, u_sc, 0}, {delta, d_sb, d_st, d_sc, 0},
                         {z, z_sb, z_st, z_sc, 0}, A, BT, CT, Dv, bias, L * step, step, L * step, step, softplus,
                         reverse, NULL, 0};
    const grad_args g = {{gout, g_sb, g_st, g_sc, 0}, states, glast, {gu, gu_sb, gu_st, gu_sc, 0},
                         {gdelta, gd_sb, gd_st, gd_sc, 0}, {gz, gz_sb, gz_st, gz_sc, 0}, gA, gD, gbias, gBT, gCT,
                         gh0};
    int (*block)(const scan_args *, const grad_args *, int64_t, int64_t, int64_t, int64_t) =
        bconst ? (cconst ? bwd_block_11 : bwd_block_10) : (cconst ? bwd_block_01 : bwd_block_00);
    for (int64_t b = 0; b < batch; b++)
        for (int64_t grp = 0; grp < groups; grp++) {
            int64_t lo = grp * hd > c0 ? grp * hd : c0, hi = (grp + 1) * hd < c1 ? (grp + 1) * hd : c1;
            for (int64_t c = lo; c < hi; c += LANES) {
                const int64_t w = hi - c < LANES ? hi - c : LANES;
                if (block(&a, &g, b, c, w, grp)) return 1;
            }
        }
    return 0;
}

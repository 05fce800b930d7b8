/* Causal attention of the sequences of a padding-free row on the CPU, forward and backward, for
 * bf16 q, k, v with fp32 accumulation: AVX512-BF16 dot products in tiles of 8 queries x 32 keys
 * kept in registers, flash-attention style (online softmax forward, probabilities recomputed from
 * the log-sum-exp backward), so no score matrix is ever stored and the masked upper triangle is
 * skipped tile by tile. Built and loaded by accel/cpu/native.py; HEAD_DIM is fixed when compiling.
 *
 * A work item is one sequence [a, b) of the row and one key/value head with its `groups` query
 * heads; tensors are addressed by element strides (per head, per token; the head dimension is
 * contiguous), so the model's own layouts need no copies.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#define D HEAD_DIM
#define PAIRS (D / 2)   /* bf16 pairs along a row of q, k, v */
#define DV (D / 16)     /* 16-lane fp32 vectors per row */
#define R 8             /* query rows per tile */
#define C 32            /* keys per tile */

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define NAME(f) CAT(f, HEAD_DIM)

typedef uint16_t bf16;

static inline __m512 exp512(__m512 x) {
    /* exp(x) = 2^n 2^f, n = round(x log2 e), |f| <= 1/2; 2^f by a degree-6 polynomial
     * (relative error below 2e-7, far under bf16's rounding of the probabilities). */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_set1_ps(1.5353362e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline uint32_t pair_word(const bf16 *row, int p) { return (uint32_t)row[2 * p] | ((uint32_t)row[2 * p + 1] << 16); }

/* [tiles][PAIRS][C]: word (t, p, j) = pair p of row t*C + j of x (zero past the sequence): the
 * right-hand side of a product that reduces over the head dimension (q k^T, dO v^T). */
static void pack_by_dim(const bf16 *x, long stride, int rows, int tiles, uint32_t *out) {
    for (int t = 0; t < tiles; t++)
        for (int j = 0; j < C; j++) {
            int row = t * C + j;
            const bf16 *src = x + (long)row * stride;
            for (int p = 0; p < PAIRS; p++) out[((long)t * PAIRS + p) * C + j] = row < rows ? pair_word(src, p) : 0;
        }
}

/* (a0, b0, a1, b1, ...): two bf16 vectors of 32 interleaved into 64 pair words (lo, hi). */
static inline void interleave(__m512i a, __m512i b, uint32_t *out) {
    static const uint16_t index[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    __m512i lo = _mm512_loadu_si512(index), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi16(a, hi, b));
}

/* [pairs of rows][D]: word (i, d) = (x[2i][d], x[2i+1][d]) (zero past the sequence): the
 * right-hand side of a product that reduces over rows (p v, dS k, dS^T q, p^T dO). */
static void pack_by_row(const bf16 *x, long stride, int rows, int pairs, uint32_t *out) {
    const __m512i zero = _mm512_setzero_si512();
    for (int i = 0; i < pairs; i++) {
        const bf16 *r0 = x + (long)(2 * i) * stride, *r1 = x + (long)(2 * i + 1) * stride;
        for (int d = 0; d < D; d += 32)
            interleave(2 * i < rows ? _mm512_loadu_si512(r0 + d) : zero,
                       2 * i + 1 < rows ? _mm512_loadu_si512(r1 + d) : zero, out + (long)i * D + d);
    }
}

/* s[r][0..1] = x_r . packed keys of one tile (R rows of x as pair words, C keys). */
static inline void tile_dot(const uint32_t *const rows[R], const uint32_t *tile, __m512 s[R][2]) {
    for (int r = 0; r < R; r++) s[r][0] = s[r][1] = _mm512_setzero_ps();
    for (int p = 0; p < PAIRS; p++) {
        __m512bh k0 = (__m512bh)_mm512_loadu_si512(tile + p * C), k1 = (__m512bh)_mm512_loadu_si512(tile + p * C + 16);
        for (int r = 0; r < R; r++) {
            __m512bh x = (__m512bh)_mm512_set1_epi32((int)rows[r][p]);
            s[r][0] = _mm512_dpbf16_ps(s[r][0], x, k0);
            s[r][1] = _mm512_dpbf16_ps(s[r][1], x, k1);
        }
    }
}

/* acc[R][D] (fp32) += w[R][C] (bf16 rows) @ rhs (C keys packed by row: C/2 pair rows of D). */
static inline void tile_accumulate(float acc[R][D], const bf16 (*w)[C], const uint32_t *rhs) {
    for (int r = 0; r < R; r += 2) {
        __m512 o[2][DV];
        for (int x = 0; x < 2; x++)
            for (int c = 0; c < DV; c++) o[x][c] = _mm512_load_ps(acc[r + x] + 16 * c);
        const uint32_t *w0 = (const uint32_t *)w[r], *w1 = (const uint32_t *)w[r + 1];
        for (int jp = 0; jp < C / 2; jp++) {
            __m512bh b0 = (__m512bh)_mm512_set1_epi32((int)w0[jp]), b1 = (__m512bh)_mm512_set1_epi32((int)w1[jp]);
            for (int c = 0; c < DV; c++) {
                __m512bh v = (__m512bh)_mm512_loadu_si512(rhs + jp * D + 16 * c);
                o[0][c] = _mm512_dpbf16_ps(o[0][c], b0, v);
                o[1][c] = _mm512_dpbf16_ps(o[1][c], b1, v);
            }
        }
        for (int x = 0; x < 2; x++)
            for (int c = 0; c < DV; c++) _mm512_store_ps(acc[r + x] + 16 * c, o[x][c]);
    }
}

/* acc[C][D] (fp32, one key tile) += w^T @ x: w [2 pairs][C] bf16 (rows = queries), x packed by
 * row (`pairs` pair rows of D: the same queries). Two keys at a time: 2 x D/16 independent sums. */
static inline void tile_accumulate_transposed(float acc[C][D], const bf16 (*w)[C], const uint32_t *x, int pairs) {
    uint32_t wt[C / 2][C] __attribute__((aligned(64))); /* word (ip, j) = (w[2ip][j], w[2ip+1][j]) */
    for (int ip = 0; ip < pairs; ip++) interleave(_mm512_load_si512(w[2 * ip]), _mm512_load_si512(w[2 * ip + 1]), wt[ip]);
    for (int j = 0; j < C; j += 2) {
        __m512 o0[DV], o1[DV];
        for (int c = 0; c < DV; c++) o0[c] = _mm512_load_ps(acc[j] + 16 * c), o1[c] = _mm512_load_ps(acc[j + 1] + 16 * c);
        for (int ip = 0; ip < pairs; ip++) {
            __m512bh b0 = (__m512bh)_mm512_set1_epi32((int)wt[ip][j]), b1 = (__m512bh)_mm512_set1_epi32((int)wt[ip][j + 1]);
            for (int c = 0; c < DV; c++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(x + ip * D + 16 * c);
                o0[c] = _mm512_dpbf16_ps(o0[c], b0, xv);
                o1[c] = _mm512_dpbf16_ps(o1[c], b1, xv);
            }
        }
        for (int c = 0; c < DV; c++) _mm512_store_ps(acc[j] + 16 * c, o0[c]), _mm512_store_ps(acc[j + 1] + 16 * c, o1[c]);
    }
}

static inline __m512i lanes(void) { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }

/* The lanes of a tile row's two score vectors (keys 0-15, 16-31 of the tile) a query may see:
 * keys j <= last, the query's position relative to the tile's first key. */
static inline void causal_masks(int last, __mmask16 *m0, __mmask16 *m1) {
    *m0 = _mm512_cmple_epi32_mask(lanes(), _mm512_set1_epi32(last));
    *m1 = _mm512_cmple_epi32_mask(lanes(), _mm512_set1_epi32(last - 16));
}

static inline void store_bf16_row(bf16 *dst, const float *src, float scale) {
    for (int c = 0; c < D; c += 32) {
        __m512 x0 = _mm512_mul_ps(_mm512_load_ps(src + c), _mm512_set1_ps(scale));
        __m512 x1 = _mm512_mul_ps(_mm512_load_ps(src + c + 16), _mm512_set1_ps(scale));
        _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
    }
}

/* Pointers to the R rows of a tile (rows past the sequence repeat its first: computed, never stored). */
static inline void tile_rows(const bf16 *x, long stride, int first, int rows, const uint32_t *out[R]) {
    for (int r = 0; r < R; r++) out[r] = (const uint32_t *)(x + (long)(first + (r < rows ? r : 0)) * stride);
}

static long tiles_of(int n) { return (n + C - 1) / C; }

/* Rows a..b-1 of one key/value head's `groups` query heads: out = softmax(scale q k^T) v, causal,
 * and lse = the log-sum-exp of each row's scaled scores (fp32, one per head and token). */
static void attention_forward(const bf16 *q, long qh, long qt, const bf16 *k, long kt, const bf16 *v, long vt,
                              bf16 *out, long oh, long ot, float *lse, long lh, int groups, int a, int b,
                              float scale, uint32_t *work) {
    int n = b - a;
    long tiles = tiles_of(n);
    uint32_t *keys = work, *values = work + tiles * PAIRS * C;
    pack_by_dim(k + a * kt, kt, n, (int)tiles, keys);
    pack_by_row(v + a * vt, vt, n, (int)tiles * C / 2, values);
    float acc[R][D] __attribute__((aligned(64)));
    bf16 probs[R][C] __attribute__((aligned(64)));
    const __m512 sc = _mm512_set1_ps(scale), minus_inf = _mm512_set1_ps(-INFINITY);
    for (int g = 0; g < groups; g++) {
        for (int i0 = 0; i0 < n; i0 += R) {
            int rows = n - i0 < R ? n - i0 : R;
            float top[R], total[R];
            const uint32_t *qrows[R];
            tile_rows(q + g * qh, qt, a + i0, rows, qrows);
            for (int r = 0; r < R; r++) top[r] = -INFINITY, total[r] = 0.f;
            memset(acc, 0, sizeof acc);
            for (int t = 0; t <= (i0 + rows - 1) / C; t++) {
                __m512 s[R][2];
                tile_dot(qrows, keys + (long)t * PAIRS * C, s);
                for (int r = 0; r < R; r++) {
                    __mmask16 m0, m1;
                    causal_masks(i0 + r - t * C, &m0, &m1);
                    __m512 s0 = _mm512_mask_mul_ps(minus_inf, m0, s[r][0], sc);
                    __m512 s1 = _mm512_mask_mul_ps(minus_inf, m1, s[r][1], sc);
                    float high = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
                    float new_top = high > top[r] ? high : top[r];
                    __m512 shift = _mm512_set1_ps(new_top);
                    __m512 p0 = _mm512_maskz_mov_ps(m0, exp512(_mm512_sub_ps(s0, shift)));
                    __m512 p1 = _mm512_maskz_mov_ps(m1, exp512(_mm512_sub_ps(s1, shift)));
                    float rescale = top[r] == -INFINITY ? 0.f : expf(top[r] - new_top);
                    total[r] = total[r] * rescale + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
                    top[r] = new_top;
                    _mm512_store_si512(probs[r], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
                    if (rescale != 1.f)
                        for (int c = 0; c < D; c += 16)
                            _mm512_store_ps(acc[r] + c, _mm512_mul_ps(_mm512_load_ps(acc[r] + c), _mm512_set1_ps(rescale)));
                }
                tile_accumulate(acc, probs, values + (long)t * (C / 2) * D);
            }
            for (int r = 0; r < rows; r++) {
                store_bf16_row(out + g * oh + (long)(a + i0 + r) * ot, acc[r], 1.f / total[r]);
                lse[g * lh + a + i0 + r] = top[r] + logf(total[r]);
            }
        }
    }
}

static long forward_work(int n) { return tiles_of(n) * PAIRS * C + tiles_of(n) * (C / 2) * D; }

static long backward_work(int n, int groups) {
    long tiles = tiles_of(n), padded = tiles * C;
    return 2 * tiles * PAIRS * C            /* k, v packed by dimension */
           + (padded / 2) * D               /* k packed by row */
           + 2 * groups * (padded / 2) * D  /* q, dO packed by row, per head */
           + groups * padded * D            /* dq, fp32 */
           + 2 * C * D                      /* dk, dv of one key tile, fp32 */
           + groups * padded;               /* rowsum(dO * out), fp32 */
}

/* Gradients of attention_forward for the same rows and heads: dq (the `groups` heads), dk, dv
 * (this key/value head, summed over its query heads), from out, dO and the forward's lse. */
static void attention_backward(const bf16 *q, long qh, long qt, const bf16 *k, long kt, const bf16 *v, long vt,
                               const bf16 *out, long oh, long ot, const bf16 *dout, long dh, long dt,
                               const float *lse, long lh, bf16 *dq, long gqh, long gqt, bf16 *dk, long gkt,
                               bf16 *dv, long gvt, int groups, int a, int b, float scale, uint32_t *work) {
    int n = b - a;
    long tiles = tiles_of(n), padded = tiles * C;
    uint32_t *keys = work, *values = keys + tiles * PAIRS * C, *key_rows = values + tiles * PAIRS * C;
    uint32_t *q_rows = key_rows + (padded / 2) * D, *dout_rows = q_rows + groups * (padded / 2) * D;
    float *dq_acc = (float *)(dout_rows + groups * (padded / 2) * D);
    float (*dk_acc)[D] = (float (*)[D])(dq_acc + groups * padded * D), (*dv_acc)[D] = dk_acc + C;
    float *delta = (float *)(dv_acc + C);
    pack_by_dim(k + a * kt, kt, n, (int)tiles, keys);
    pack_by_dim(v + a * vt, vt, n, (int)tiles, values);
    pack_by_row(k + a * kt, kt, n, (int)padded / 2, key_rows);
    for (int g = 0; g < groups; g++) {
        pack_by_row(q + g * qh + a * qt, qt, n, (int)padded / 2, q_rows + g * (padded / 2) * D);
        pack_by_row(dout + g * dh + a * dt, dt, n, (int)padded / 2, dout_rows + g * (padded / 2) * D);
        for (int i = 0; i < n; i++) { /* rowsum(dO * out) = rowsum(dP * P) */
            const bf16 *o = out + g * oh + (long)(a + i) * ot, *d = dout + g * dh + (long)(a + i) * dt;
            __m512 sum = _mm512_setzero_ps();
            for (int c = 0; c < D; c += 16) {
                __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(o + c))), 16));
                __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(d + c))), 16));
                sum = _mm512_fmadd_ps(x, y, sum);
            }
            delta[g * padded + i] = _mm512_reduce_add_ps(sum);
        }
    }
    memset(dq_acc, 0, sizeof(float) * groups * padded * D);
    /* a block of C queries' probabilities and score gradients, for the key tile's dk and dv */
    bf16 probs[C][C] __attribute__((aligned(64))), dscores[C][C] __attribute__((aligned(64)));
    const __m512 sc = _mm512_set1_ps(scale);
    for (long t = 0; t < tiles; t++) {
        memset(dk_acc, 0, sizeof(float) * 2 * C * D);
        for (int g = 0; g < groups; g++) {
            const float *lse_g = lse + g * lh + a, *delta_g = delta + g * padded;
            for (int block = (int)t * C; block < n; block += C) { /* the queries that see this key tile */
                int block_rows = n - block < C ? n - block : C;
                for (int i0 = block; i0 < block + C; i0 += R) {
                    bf16 (*p)[C] = probs + (i0 - block), (*ds)[C] = dscores + (i0 - block);
                    if (i0 >= n) {
                        memset(p, 0, sizeof(bf16) * R * C), memset(ds, 0, sizeof(bf16) * R * C);
                        continue;
                    }
                    int rows = n - i0 < R ? n - i0 : R;
                    const uint32_t *qrows[R], *orows[R];
                    tile_rows(q + g * qh, qt, a + i0, rows, qrows);
                    tile_rows(dout + g * dh, dt, a + i0, rows, orows);
                    __m512 s[R][2], dp[R][2];
                    tile_dot(qrows, keys + t * PAIRS * C, s);
                    tile_dot(orows, values + t * PAIRS * C, dp);
                    for (int r = 0; r < R; r++) {
                        __mmask16 m0 = 0, m1 = 0;
                        if (r < rows) causal_masks(i0 + r - (int)t * C, &m0, &m1);
                        int row = r < rows ? i0 + r : i0;
                        __m512 l = _mm512_set1_ps(lse_g[row]), dl = _mm512_set1_ps(delta_g[row]);
                        __m512 p0 = _mm512_maskz_mov_ps(m0, exp512(_mm512_fmsub_ps(s[r][0], sc, l)));
                        __m512 p1 = _mm512_maskz_mov_ps(m1, exp512(_mm512_fmsub_ps(s[r][1], sc, l)));
                        _mm512_store_si512(p[r], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
                        /* dS = P (dP - delta), times the scale of the scores */
                        __m512 g0 = _mm512_mul_ps(_mm512_mul_ps(p0, _mm512_sub_ps(dp[r][0], dl)), sc);
                        __m512 g1 = _mm512_mul_ps(_mm512_mul_ps(p1, _mm512_sub_ps(dp[r][1], dl)), sc);
                        _mm512_store_si512(ds[r], (__m512i)_mm512_cvtne2ps_pbh(g1, g0));
                    }
                    tile_accumulate((float (*)[D])(dq_acc + ((long)g * padded + i0) * D), ds, key_rows + t * (C / 2) * D);
                }
                int pairs = (block_rows + 1) / 2;
                tile_accumulate_transposed(dv_acc, probs, dout_rows + (g * (padded / 2) + block / 2) * D, pairs);
                tile_accumulate_transposed(dk_acc, dscores, q_rows + (g * (padded / 2) + block / 2) * D, pairs);
            }
        }
        for (int j = 0; j < C && t * C + j < n; j++) {
            store_bf16_row(dk + (a + t * C + j) * gkt, dk_acc[j], 1.f);
            store_bf16_row(dv + (a + t * C + j) * gvt, dv_acc[j], 1.f);
        }
    }
    for (int g = 0; g < groups; g++)
        for (int i = 0; i < n; i++) store_bf16_row(dq + g * gqh + (long)(a + i) * gqt, dq_acc + ((long)g * padded + i) * D, 1.f);
}

/* The entry points: `items` holds (start, end, key/value head) triples; each tensor comes as a
 * pointer and its (head, token) strides in elements; `work` holds work_words(longest) words. */
long NAME(work_words_)(int longest, int groups) {
    long f = forward_work(longest), b = backward_work(longest, groups);
    return f > b ? f : b;
}

void NAME(forward_)(const bf16 *q, long qh, long qt, const bf16 *k, long kh, long kt, const bf16 *v, long vh, long vt,
                    bf16 *out, long oh, long ot, float *lse, long lh, int groups, float scale,
                    const int *items, int count, uint32_t *work) {
    for (int i = 0; i < count; i++) {
        int a = items[3 * i], b = items[3 * i + 1], h = items[3 * i + 2];
        attention_forward(q + h * groups * qh, qh, qt, k + h * kh, kt, v + h * vh, vt, out + h * groups * oh, oh, ot,
                          lse + h * groups * lh, lh, groups, a, b, scale, work);
    }
}

void NAME(backward_)(const bf16 *q, long qh, long qt, const bf16 *k, long kh, long kt, const bf16 *v, long vh, long vt,
                     const bf16 *out, long oh, long ot, const bf16 *dout, long dh, long dt, const float *lse, long lh,
                     bf16 *dq, long gqh, long gqt, bf16 *dk, long gkh, long gkt, bf16 *dv, long gvh, long gvt,
                     int groups, float scale, const int *items, int count, uint32_t *work) {
    for (int i = 0; i < count; i++) {
        int a = items[3 * i], b = items[3 * i + 1], h = items[3 * i + 2];
        attention_backward(q + h * groups * qh, qh, qt, k + h * kh, kt, v + h * vh, vt, out + h * groups * oh, oh, ot,
                           dout + h * groups * dh, dh, dt, lse + h * groups * lh, lh, dq + h * groups * gqh, gqh, gqt,
                           dk + h * gkh, gkt, dv + h * gvh, gvt, groups, a, b, scale, work);
    }
}

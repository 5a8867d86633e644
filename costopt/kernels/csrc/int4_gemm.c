/* Grouped INT4 weight-only matrix multiply with fp32 activations, for small batches on AVX2 CPUs.
 *
 *   y[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, k/g]) * scale[n, k/g]
 *           = sum_grp scale[n, grp] * (sum_{k in grp} q[n, k] x[m, k] - zero[n, grp] * xsum[m, grp])
 *
 * x fp32 [M, K]; w uint8 [N, K/2] holding codes 0..15, k = 2j in the low nibble of byte j and k = 2j + 1
 * in the high nibble (the canonical storage format, read as is); scale, zero fp32 [N, K/g]; y fp32 [M, N].
 *
 * Batch-1 decode is bound by reading weights, and INT4 is 8x fewer bytes than fp32. Instead of
 * interleaving each weight row's nibbles back into k order (shuffles per weight), the activations are
 * permuted once per call (by each thread): within each block of 16 k, the 8 even k, then the 8 odd. Then 8
 * weight bytes widen to 8 int32 lanes (one vpmovzxbd), AND 0xF gives the 8 even codes and a shift by 4
 * the 8 odd ones, each lined up with 8 consecutive permuted activations. The zero term uses per-group
 * sums of x, computed once per activation row and shared by all N rows.
 *
 * Measured choices (costopt/kernelbench.py and a C harness, this Zen 3 CPU): the group size is a compile
 * time constant for g = 32, 64, 128 (a runtime g left the short group loops rolled: 1.5-3x slower);
 * two weight rows share every activation load (M = 1: 15-25% faster than one row; 3 or 4 rows: no
 * better); for M > 1 each weight vector is multiplied by its group scale once and reused for up to MT
 * activation rows (15-25% faster than per-group partial sums). Converting codes with the float
 * magic-number trick instead of vcvtdq2ps, more accumulator chains, or blocking weight rows so one
 * activation tile stays in L1, measured no faster. At M = 8 this matches MKL's fp32 SGEMM per
 * multiply-add; at M = 48 it reaches ~70% of it, which with the de-quantization cost sets the crossover.
 * Needs g % 16 == 0 (the caller checks). Rows of w are split across OpenMP threads.
 * Compiled on first use by costopt/kernels.py.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <omp.h>

#define MT 4 /* activation rows per tile: 2 x 4 accumulators + 4 weights + scales + 1 x of 16 ymm */
#define PREFETCH 1152 /* bytes ahead in the weights; M = 1 reading a two-row pair from DRAM (the LM head)
                       * ran 5-10% faster with it (the same in W8A8 fixed a 1.6x slowdown there) */
#define INLINE static inline __attribute__((always_inline))

INLINE float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 0x55));
    return _mm_cvtss_f32(lo);
}

/* 8 packed bytes -> the 8 even codes (*ev) and the 8 odd codes (*od) as fp32 */
INLINE void unpack16(const uint8_t *p, __m256 *ev, __m256 *od) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *ev = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF)));
    *od = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

/* x [M, K] -> xp [M, K] (evens then odds within each block of 16) and xs [M, K/g] (group sums) */
static void prepare_x(const float *x, float *xp, float *xs, int M, int K, int g) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        float *pr = xp + (size_t)m * K;
        for (int k0 = 0; k0 < K; k0 += 16) {
            __m256 a = _mm256_loadu_ps(xr + k0), b = _mm256_loadu_ps(xr + k0 + 8);
            /* per 128-bit lane: [a0 a2 b0 b2 | a4 a6 b4 b6]; the 64-bit permute puts them in order */
            __m256 ev = _mm256_shuffle_ps(a, b, 0x88), od = _mm256_shuffle_ps(a, b, 0xDD);
            _mm256_storeu_ps(pr + k0, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
            _mm256_storeu_ps(pr + k0 + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)));
        }
        for (int grp = 0; grp < K / g; grp++) {
            __m256 a = _mm256_setzero_ps();
            for (int k = grp * g; k < (grp + 1) * g; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(xr + k));
            xs[(size_t)m * (K / g) + grp] = hsum256(a);
        }
    }
}

/* sum over groups of scale * zero * xsum: the zero-point term of one output */
INLINE float zero_term(const float *sr, const float *zr, const float *xs, int G) {
    __m256 c = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= G; i += 8)
        c = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sr + i), _mm256_loadu_ps(zr + i)),
                            _mm256_loadu_ps(xs + i), c);
    float t = hsum256(c);
    for (; i < G; i++) t += sr[i] * zr[i] * xs[i];
    return t;
}

/* M = 1: two weight rows (w0 and the next) against one activation row -> y[0], y[1]. */
INLINE void dot2(const float *xp, const float *xs, const uint8_t *w0, const float *s0, const float *z0,
                 float *y, const int K, const int g) {
    const int G = K / g;
    const uint8_t *w1 = w0 + K / 2;
    const float *s1 = s0 + G, *z1 = z0 + G;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, e0, o0, e1, o1;
    for (int grp = 0; grp < G; grp++) {
        const uint8_t *wg0 = w0 + (size_t)grp * (g / 2), *wg1 = w1 + (size_t)grp * (g / 2);
        const float *xg = xp + (size_t)grp * g;
        __m256 pe0 = _mm256_setzero_ps(), po0 = pe0, pe1 = pe0, po1 = pe0;
        for (int k = 0; k < g; k += 16) {
            if (((grp * (g / 2) + k / 2) & 63) == 0) { /* once per cache line of each row */
                _mm_prefetch((const char *)(wg0 + k / 2 + PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(wg1 + k / 2 + PREFETCH), _MM_HINT_T0);
            }
            unpack16(wg0 + k / 2, &e0, &o0);
            unpack16(wg1 + k / 2, &e1, &o1);
            __m256 xe = _mm256_loadu_ps(xg + k), xo = _mm256_loadu_ps(xg + k + 8);
            pe0 = _mm256_fmadd_ps(e0, xe, pe0);
            po0 = _mm256_fmadd_ps(o0, xo, po0);
            pe1 = _mm256_fmadd_ps(e1, xe, pe1);
            po1 = _mm256_fmadd_ps(o1, xo, po1);
        }
        a0 = _mm256_fmadd_ps(_mm256_add_ps(pe0, po0), _mm256_broadcast_ss(s0 + grp), a0);
        a1 = _mm256_fmadd_ps(_mm256_add_ps(pe1, po1), _mm256_broadcast_ss(s1 + grp), a1);
    }
    y[0] = hsum256(a0) - zero_term(s0, z0, xs, G);
    y[1] = hsum256(a1) - zero_term(s1, z1, xs, G);
}

/* One weight row against mt <= MT activation rows (the last row when N is odd). */
INLINE void tile1(const float *xp, const float *xs, const uint8_t *wr, const float *sr, const float *zr,
                  float *y, const int mt, const int N, const int K, const int g) {
    const int G = K / g;
    __m256 acc[MT], pe[MT], po[MT], ev, od;
    for (int m = 0; m < mt; m++) acc[m] = _mm256_setzero_ps();
    for (int grp = 0; grp < G; grp++) {
        const uint8_t *wg = wr + (size_t)grp * (g / 2);
        const float *xg = xp + (size_t)grp * g;
        for (int m = 0; m < mt; m++) pe[m] = po[m] = _mm256_setzero_ps();
        for (int k = 0; k < g; k += 16) {
            unpack16(wg + k / 2, &ev, &od);
            for (int m = 0; m < mt; m++) {
                pe[m] = _mm256_fmadd_ps(ev, _mm256_loadu_ps(xg + (size_t)m * K + k), pe[m]);
                po[m] = _mm256_fmadd_ps(od, _mm256_loadu_ps(xg + (size_t)m * K + k + 8), po[m]);
            }
        }
        __m256 s = _mm256_broadcast_ss(sr + grp);
        for (int m = 0; m < mt; m++) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(pe[m], po[m]), s, acc[m]);
    }
    for (int m = 0; m < mt; m++)
        y[(size_t)m * N] = hsum256(acc[m]) - zero_term(sr, zr, xs + (size_t)m * G, G);
}

/* Two weight rows x mt <= MT activation rows: group-scaled weights go straight into the accumulators. */
INLINE void tile2(const float *xp, const float *xs, const uint8_t *w0, const float *s0, const float *z0,
                  float *y, const int mt, const int N, const int K, const int g) {
    const int G = K / g;
    const uint8_t *w1 = w0 + K / 2;
    const float *s1 = s0 + G, *z1 = z0 + G;
    __m256 a0[MT], a1[MT], e0, o0, e1, o1;
    for (int m = 0; m < mt; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    for (int grp = 0; grp < G; grp++) {
        const float *xg = xp + (size_t)grp * g;
        const __m256 c0 = _mm256_broadcast_ss(s0 + grp), c1 = _mm256_broadcast_ss(s1 + grp);
        for (int k = 0; k < g; k += 16) {
            unpack16(w0 + (size_t)grp * (g / 2) + k / 2, &e0, &o0);
            unpack16(w1 + (size_t)grp * (g / 2) + k / 2, &e1, &o1);
            e0 = _mm256_mul_ps(e0, c0);
            o0 = _mm256_mul_ps(o0, c0);
            e1 = _mm256_mul_ps(e1, c1);
            o1 = _mm256_mul_ps(o1, c1);
            for (int m = 0; m < mt; m++) {
                __m256 xe = _mm256_loadu_ps(xg + (size_t)m * K + k);
                __m256 xo = _mm256_loadu_ps(xg + (size_t)m * K + k + 8);
                a0[m] = _mm256_fmadd_ps(e0, xe, a0[m]);
                a1[m] = _mm256_fmadd_ps(e1, xe, a1[m]);
                a0[m] = _mm256_fmadd_ps(o0, xo, a0[m]);
                a1[m] = _mm256_fmadd_ps(o1, xo, a1[m]);
            }
        }
    }
    for (int m = 0; m < mt; m++) {
        y[(size_t)m * N] = hsum256(a0[m]) - zero_term(s0, z0, xs + (size_t)m * G, G);
        y[(size_t)m * N + 1] = hsum256(a1[m]) - zero_term(s1, z1, xs + (size_t)m * G, G);
    }
}

/* Output rows n (and n + 1 when pair) for all M activation rows, g a compile-time constant once inlined.
 * The switch on the tile height makes the m loops constant-trip, so the accumulators stay in registers. */
INLINE void rows(const float *xp, const float *xs, const uint8_t *w, const float *scale, const float *zero,
                 float *y, int n, int pair, int M, int N, int K, const int g) {
    const int G = K / g;
    const uint8_t *wr = w + (size_t)n * (K / 2);
    const float *sr = scale + (size_t)n * G, *zr = zero + (size_t)n * G;
    if (M == 1 && pair) {
        dot2(xp, xs, wr, sr, zr, y + n, K, g);
        return;
    }
    for (int m0 = 0; m0 < M; m0 += MT) {
        const float *xt = xp + (size_t)m0 * K, *st = xs + (size_t)m0 * G;
        float *yt = y + (size_t)m0 * N + n;
        switch ((M - m0 < MT ? M - m0 : MT) * 2 + pair) {
        case 2: tile1(xt, st, wr, sr, zr, yt, 1, N, K, g); break;
        case 4: tile1(xt, st, wr, sr, zr, yt, 2, N, K, g); break;
        case 6: tile1(xt, st, wr, sr, zr, yt, 3, N, K, g); break;
        case 8: tile1(xt, st, wr, sr, zr, yt, 4, N, K, g); break;
        case 3: tile2(xt, st, wr, sr, zr, yt, 1, N, K, g); break;
        case 5: tile2(xt, st, wr, sr, zr, yt, 2, N, K, g); break;
        case 7: tile2(xt, st, wr, sr, zr, yt, 3, N, K, g); break;
        case 9: tile2(xt, st, wr, sr, zr, yt, 4, N, K, g); break;
        }
    }
}

typedef void (*rows_fn)(const float *, const float *, const uint8_t *, const float *, const float *, float *,
                        int, int, int, int, int);
#define ROWS_FIXED_G(G)                                                                          \
    static void rows_g##G(const float *xp, const float *xs, const uint8_t *w, const float *s,         \
                          const float *z, float *y, int n, int pair, int M, int N, int K) {           \
        rows(xp, xs, w, s, z, y, n, pair, M, N, K, G);                                           \
    }
ROWS_FIXED_G(32)
ROWS_FIXED_G(64)
ROWS_FIXED_G(128)

/* Returns 0, or -1 if the activation scratch buffer could not be allocated. */
int costopt_int4_gemm(const float *x, const uint8_t *w, const float *scale, const float *zero, float *y,
                      int M, int N, int K, int g, int threads) {
    const int G = K / g;
    const size_t per = ((size_t)M * K + (size_t)M * G + 15) & ~(size_t)15; /* floats, whole cache lines */
    threads = threads < 1 ? 1 : threads;
    float *scratch = aligned_alloc(64, sizeof(float) * per * threads);
    if (scratch == NULL) return -1;
    rows_fn fixed = g == 32 ? rows_g32 : g == 64 ? rows_g64 : g == 128 ? rows_g128 : NULL;
    #pragma omp parallel num_threads(threads)
    {
        /* Each thread permutes its own copy of x: a copy written by another core is fetched from that
         * core's cache line by line on every call, which made 2 threads slower than 1 on 192x576. */
        float *xp = scratch + per * omp_get_thread_num(), *xs = xp + (size_t)M * K;
        prepare_x(x, xp, xs, M, K, g);
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n += 2) {
            int pair = n + 1 < N;
            if (fixed) fixed(xp, xs, w, scale, zero, y, n, pair, M, N, K);
            else rows(xp, xs, w, scale, zero, y, n, pair, M, N, K, g);
        }
    }
    free(scratch);
    return 0;
}

/* De-quantize to fp32 [N, K] in k order: out = (q - zero) * scale, rounded exactly as torch computes it
 * (a subtract, then a multiply), so it equals the pure-torch `dequantize_int4` bit for bit. Large batches
 * de-quantize and call BLAS; in one pass over the weight this is several times faster than torch's
 * unpack, convert, subtract, multiply. Needs g % 16 == 0. */
void costopt_int4_dequant(const uint8_t *w, const float *scale, const float *zero, float *out,
                          int N, int K, int g, int threads) {
    const int G = K / g;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *wr = w + (size_t)n * (K / 2);
        float *o = out + (size_t)n * K;
        for (int grp = 0; grp < G; grp++) {
            const __m256 s = _mm256_set1_ps(scale[(size_t)n * G + grp]);
            const __m256 z = _mm256_set1_ps(zero[(size_t)n * G + grp]);
            for (int k = grp * g; k < (grp + 1) * g; k += 16) {
                __m256 ev, od;
                unpack16(wr + k / 2, &ev, &od);
                ev = _mm256_mul_ps(_mm256_sub_ps(ev, z), s); /* k = 0, 2, .., 14 of this block */
                od = _mm256_mul_ps(_mm256_sub_ps(od, z), s); /* k = 1, 3, .., 15 */
                /* interleave per 128-bit lane, then put the lanes in k order */
                __m256 lo = _mm256_unpacklo_ps(ev, od), hi = _mm256_unpackhi_ps(ev, od);
                _mm256_storeu_ps(o + k, _mm256_permute2f128_ps(lo, hi, 0x20));
                _mm256_storeu_ps(o + k + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
            }
        }
    }
}

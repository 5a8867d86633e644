/* W8A8 matrix multiply: INT8 activations x INT8 weights with int32 accumulation, on AVX2 CPUs.
 *
 *   xq[m, k] = clamp(round_half_even(x[m, k] / s[m]), -127, 127)
 *   y[m, n]  = (float(sum_k xq[m, k] * w[n, k]) * s[m]) * wscale[n]
 *
 * x fp32 [M, K], w int8 [N, K], wscale fp32 [N], y fp32 [M, N]. s[m] = act_scale when act_scale > 0
 * (static per-tensor), else absmax(x[m]) / 127 per row (dynamic per-token; 1 for an all-zero row).
 *
 * Without VNNI the densest integer multiply-add on AVX2 is vpmaddwd: 16 int16 x int16 products summed
 * pairwise into 8 int32 lanes per instruction. Activations are quantized once per call straight to
 * int16 codes; each weight row is sign-extended int8 -> int16 in registers (one vpmovsxbw per 16) and
 * reused for up to MT activation rows; two weight rows share every activation load (for M > 1 that
 * measured 30% faster than one row; MT = 6 measured slower than 4). That is 3 instructions per 16
 * multiply-adds against about 8 for the fp32 path of the INT8 weight-only kernel. |code| <= 127, so a
 * dot product is at most K * 127^2 and int32 cannot overflow for K < 2^31 / 127^2, about 133 000 (the
 * caller checks). Rows of w are split across OpenMP threads, two at a time.
 * Compiled on first use by costopt/kernels.py.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <math.h>

#define MT 4 /* activation rows per tile: 2 x 4 accumulators + 2 weights + 1 activation of 16 ymm */
#define PREFETCH 1152 /* bytes ahead in the weights: reading two rows at once from DRAM (M = 1 on the LM
                       * head) ran 1.6x slower than one row at a time without it, and on par with it */
#define INLINE static inline __attribute__((always_inline))
#define ROUND_EVEN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) /* half to even, like torch.round */

/* 16 int8 weights sign-extended to 16 int16 lanes */
INLINE __m256i widen(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }

static inline int32_t hsum_epi32(__m256i v) {
    __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4E));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xB1));
    return _mm_cvtsi128_si32(a);
}

/* One row: fp32 [K] -> int16 codes [Kp] (zero padded) with scale s; returns s. */
static float quantize_row(const float *x, int16_t *q, int K, int Kp, float act_scale) {
    float s = act_scale;
    if (!(s > 0.f)) {
        __m256 amax = _mm256_setzero_ps();
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        int k = 0;
        for (; k + 8 <= K; k += 8)
            amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
        float lanes[8], a = 0.f;
        _mm256_storeu_ps(lanes, amax);
        for (int i = 0; i < 8; i++) a = lanes[i] > a ? lanes[i] : a;
        for (; k < K; k++) a = fabsf(x[k]) > a ? fabsf(x[k]) : a;
        s = a > 0.f ? a / 127.f : 1.f;
    }
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        /* true division (not x * (1/s)) so the codes equal torch's round(x / s) bit for bit */
        __m256 a = _mm256_div_ps(_mm256_loadu_ps(x + k), vs);
        __m256 b = _mm256_div_ps(_mm256_loadu_ps(x + k + 8), vs);
        a = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(a, ROUND_EVEN), lo), hi);
        b = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(b, ROUND_EVEN), lo), hi);
        __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permute4x64_epi64(p, 0xD8)); /* undo lane interleave */
    }
    for (; k < K; k++) {
        float v = nearbyintf(x[k] / s);
        q[k] = (int16_t)(v < -127.f ? -127.f : v > 127.f ? 127.f : v);
    }
    for (; k < Kp; k++) q[k] = 0;
    return s;
}


/* M = 1: two weight rows share every activation load. */
/* M = 1: two weight rows (w0 and w0 + K) against one activation row; each activation load feeds both. */
INLINE void dot2(const int16_t *xq, const int8_t *w0, int32_t *out, int K) {
    const int8_t *w1 = w0 + K;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char *)(w0 + k + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + k + PREFETCH), _MM_HINT_T0);
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + k));
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + k + 16));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(widen(w0 + k), x0));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(widen(w0 + k + 16), x1));
        b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(widen(w1 + k), x0));
        b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(widen(w1 + k + 16), x1));
    }
    int32_t ta = 0, tb = 0;
    for (; k < K; k++) {
        ta += (int32_t)w0[k] * xq[k];
        tb += (int32_t)w1[k] * xq[k];
    }
    out[0] = hsum_epi32(_mm256_add_epi32(a0, a1)) + ta;
    out[1] = hsum_epi32(_mm256_add_epi32(b0, b1)) + tb;
}

/* nr (1 or 2) weight rows x mt <= MT activation rows -> out[r * MT + m] */
INLINE void tile(const int16_t *xq, int Kp, const int8_t *w0, int32_t *out, const int nr, const int mt,
                 int K) {
    __m256i acc[2][MT];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mt; m++) acc[r][m] = _mm256_setzero_si256();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256i wv[2];
        for (int r = 0; r < nr; r++) wv[r] = widen(w0 + (size_t)r * K + k);
        for (int m = 0; m < mt; m++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * Kp + k));
            for (int r = 0; r < nr; r++)
                acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(wv[r], xv));
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mt; m++) {
            int32_t tail = 0;
            for (int kk = k; kk < K; kk++) tail += (int32_t)w0[(size_t)r * K + kk] * xq[(size_t)m * Kp + kk];
            out[r * MT + m] = hsum_epi32(acc[r][m]) + tail;
        }
}

/* The switch makes nr and mt constants in `tile`, so its accumulators stay in registers. */
static void tiles(const int16_t *xq, int Kp, const int8_t *w0, int32_t *out, int nr, int mt, int K) {
    switch (mt * 2 + nr - 1) {
    case 2: tile(xq, Kp, w0, out, 1, 1, K); break;
    case 3: tile(xq, Kp, w0, out, 2, 1, K); break;
    case 4: tile(xq, Kp, w0, out, 1, 2, K); break;
    case 5: tile(xq, Kp, w0, out, 2, 2, K); break;
    case 6: tile(xq, Kp, w0, out, 1, 3, K); break;
    case 7: tile(xq, Kp, w0, out, 2, 3, K); break;
    case 8: tile(xq, Kp, w0, out, 1, 4, K); break;
    case 9: tile(xq, Kp, w0, out, 2, 4, K); break;
    }
}

/* Returns 0, or -1 if the scratch buffer could not be allocated. act_scale <= 0 means dynamic. */
int costopt_w8a8_gemm(const float *x, const int8_t *w, const float *wscale, float act_scale, float *y,
                      int M, int N, int K, int threads) {
    const int Kp = (K + 15) & ~15; /* 32-byte rows keep the int16 loads from straddling cache lines */
    int16_t *xq = aligned_alloc(32, sizeof(int16_t) * (size_t)M * Kp + 32);
    float *s = malloc(sizeof(float) * (size_t)M + 4);
    if (xq == NULL || s == NULL) {
        free(xq);
        free(s);
        return -1;
    }
    for (int m = 0; m < M; m++) s[m] = quantize_row(x + (size_t)m * K, xq + (size_t)m * Kp, K, Kp, act_scale);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n += 2) {
        const int nr = n + 1 < N ? 2 : 1;
        const int8_t *wr = w + (size_t)n * K;
        int32_t dots[2 * MT];
        if (M == 1 && nr == 2) {
            dot2(xq, wr, dots, K);
            y[n] = ((float)dots[0] * s[0]) * wscale[n];
            y[n + 1] = ((float)dots[1] * s[0]) * wscale[n + 1];
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += MT) {
            int mt = M - m0 < MT ? M - m0 : MT;
            tiles(xq + (size_t)m0 * Kp, Kp, wr, dots, nr, mt, K);
            for (int r = 0; r < nr; r++)
                for (int m = 0; m < mt; m++)
                    y[(size_t)(m0 + m) * N + n + r] = ((float)dots[r * MT + m] * s[m0 + m]) * wscale[n + r];
        }
    }
    free(xq);
    free(s);
    return 0;
}

/* INT8 weight-only matrix multiply with fp32 activations, for small batches on AVX2 CPUs.
 *
 *   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]      x fp32 [M, K], w int8 [N, K], y fp32 [M, N]
 *
 * Batch-1 decode is bound by reading weights: int8 weights are 4x fewer bytes than fp32. Each weight
 * row is widened to fp32 in registers (8 lanes at a time) and reused for up to 4 activation rows, so
 * the int8 -> fp32 conversion is paid once per row tile. Rows of w are split across OpenMP threads.
 * Compiled on first use by costopt/kernels.py (cc -O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>

#define MT 4 /* activation rows per tile: 2 x 4 accumulators + temporaries fit the 16 ymm registers */

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 0x55));
    return _mm_cvtss_f32(lo);
}

/* 16 int8 weights -> two vectors of 8 fp32 */
static inline void widen16(const int8_t *p, __m256 *lo, __m256 *hi) {
    __m128i w16 = _mm_loadu_si128((const __m128i *)p);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w16));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w16, 8)));
}

/* One weight row against one activation row. Four independent accumulators hide the FMA latency,
 * which otherwise bounds batch-1 decode well below memory bandwidth. */
static float dot1(const float *x, const int8_t *wr, int K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, w0, w1, w2, w3;
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        widen16(wr + k, &w0, &w1);
        widen16(wr + k + 16, &w2, &w3);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + k + 24), a3);
    }
    float tail = 0.f;
    for (; k < K; k++) tail += (float)wr[k] * x[k];
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail;
}

/* One weight row against up to MT activation rows: each widened weight vector is reused MT times. */
static void row_tile(const float *x, const int8_t *wr, float s, float *y, int mt, int N, int K) {
    __m256 acc0[MT], acc1[MT], w0, w1;
    for (int m = 0; m < mt; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        widen16(wr + k, &w0, &w1);
        for (int m = 0; m < mt; m++) {
            acc0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (size_t)m * K + k), acc0[m]);
            acc1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + (size_t)m * K + k + 8), acc1[m]);
        }
    }
    for (int m = 0; m < mt; m++) {
        float tail = 0.f;
        for (int kk = k; kk < K; kk++) tail += (float)wr[kk] * x[(size_t)m * K + kk];
        y[(size_t)m * N] = s * (hsum256(_mm256_add_ps(acc0[m], acc1[m])) + tail);
    }
}

void costopt_int8_gemm(const float *x, const int8_t *w, const float *scale, float *y,
                       int M, int N, int K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *wr = w + (size_t)n * K;
        if (M == 1) {
            y[n] = scale[n] * dot1(x, wr, K);
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += MT) {
            int mt = M - m0 < MT ? M - m0 : MT;
            row_tile(x + (size_t)m0 * K, wr, scale[n], y + (size_t)m0 * N + n, mt, N, K);
        }
    }
}

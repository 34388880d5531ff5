/* One core's peak for fused multiply-adds of 8 f32 lanes (AVX2 + FMA): twelve independent
 * accumulators, so that the loop waits on no result, and the GFLOP/s it reached. Run two at
 * once to see two cores' worth. With -DWIDE, 16 lanes (AVX-512F).
 *
 *   gcc -O3 -mavx2 -mfma scripts/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *   gcc -O3 -mavx512f -DWIDE scripts/fma_peak.c -o /tmp/fma_peak512 && /tmp/fma_peak512
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#ifdef WIDE
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define FIRST(v) _mm512_cvtss_f32(v)
#else
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define FIRST(v) _mm256_cvtss_f32(v)
#endif

int main(void) {
    enum { ACC = 12 };
    const long steps = 400000000;
    vec acc[ACC];
    for (int i = 0; i < ACC; i++) acc[i] = SET1(i * 0.001f);
    const vec a = SET1(0.9999f), b = SET1(0.0001f);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < steps; k++)
        for (int i = 0; i < ACC; i++) acc[i] = FMA(acc[i], a, b);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    float keep = 0; /* uses every accumulator, so none is optimised away */
    for (int i = 0; i < ACC; i++) keep += FIRST(acc[i]);
    printf("%.1f GFLOP/s on one thread (%d lanes; checksum %f)\n",
           steps * (double)ACC * LANES * 2 / s / 1e9, LANES, keep);
    return 0;
}

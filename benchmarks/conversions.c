/* Throughput of the float32 <-> double conversions that bnfast's exact arithmetic needs,
 * in cycles per 8 elements, from L1.  Not part of the build or the tests:
 *
 *     gcc -O2 -march=x86-64-v4 benchmarks/conversions.c -o /tmp/conversions && /tmp/conversions
 *
 * The clock is estimated by a chain of dependent integer adds (one a cycle).  On the
 * Zen 4 dev VM: vcvtps2pd 1.93-1.97 cycles per 8 floats at either width, vcvtpd2ps
 * 2.94-3.06 per 8 doubles, the integer widening 1.76-1.80 and half of each 1.71 (the
 * same pipes).  README: "The conversions set a floor". */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define N 4096 /* 16 KB of floats, 32 KB of doubles: L1 */
static float fbuf[N] __attribute__((aligned(64)));
static double dbuf[N] __attribute__((aligned(64)));

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double clock_hz(void)
{
    long n = 1000000000L, x = 0;
    double t0 = now();
    for (long i = 0; i < n; i++) __asm__ volatile("add $1, %0" : "+r"(x));
    return n / (now() - t0);
}

/* four independent sums, so that the multiply-adds' latency is not the bound */
__attribute__((noinline)) static double widen_zmm(long reps)
{
    __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, one = _mm512_set1_pd(1.0);
    for (long k = 0; k < reps; k++)
        for (int i = 0; i < N; i += 32) {
            s0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_load_ps(fbuf + i)), one, s0);
            s1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_load_ps(fbuf + i + 8)), one, s1);
            s2 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_load_ps(fbuf + i + 16)), one, s2);
            s3 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_load_ps(fbuf + i + 24)), one, s3);
        }
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0, s1), _mm512_add_pd(s2, s3)));
}

__attribute__((noinline)) static double widen_ymm(long reps)
{
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, one = _mm256_set1_pd(1.0);
    for (long k = 0; k < reps; k++)
        for (int i = 0; i < N; i += 16) {
            s0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_load_ps(fbuf + i)), one, s0);
            s1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_load_ps(fbuf + i + 4)), one, s1);
            s2 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_load_ps(fbuf + i + 8)), one, s2);
            s3 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_load_ps(fbuf + i + 12)), one, s3);
        }
    __m256d s = _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3));
    double a[4];
    _mm256_storeu_pd(a, s);
    return a[0] + a[1] + a[2] + a[3];
}

/* A normal or subnormal float's bits, sign apart, shifted into a double's mantissa and
 * exponent give the float times 2^-896 exactly (a multiply-add by 2^896 restores it); 16
 * floats a 512-bit load, the even and odd lanes apart.  (Infinities and NaNs would need a
 * check of their own.) */
__attribute__((noinline)) static double widen_int(long reps, int mixed)
{
    __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, one = _mm512_set1_pd(1.0);
    const __m512i keep = _mm512_set1_epi64((long long)0x8FFFFFFFE0000000ULL);
    const __m512d scale = _mm512_set1_pd(0x1p896);
    for (long k = 0; k < reps; k++)
        for (int i = 0; i < N; i += 32) {
            if (mixed) {
                s0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_load_ps(fbuf + i)), one, s0);
                s1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_load_ps(fbuf + i + 8)), one, s1);
            } else {
                __m512i q = _mm512_load_si512(fbuf + i);
                __m512d odd = _mm512_castsi512_pd(_mm512_and_si512(_mm512_srai_epi64(q, 3), keep));
                __m512d even = _mm512_castsi512_pd(
                    _mm512_and_si512(_mm512_srai_epi64(_mm512_slli_epi64(q, 32), 3), keep));
                s0 = _mm512_fmadd_pd(even, scale, s0);
                s1 = _mm512_fmadd_pd(odd, scale, s1);
            }
            __m512i q = _mm512_load_si512(fbuf + i + 16);
            __m512d odd = _mm512_castsi512_pd(_mm512_and_si512(_mm512_srai_epi64(q, 3), keep));
            __m512d even = _mm512_castsi512_pd(
                _mm512_and_si512(_mm512_srai_epi64(_mm512_slli_epi64(q, 32), 3), keep));
            s2 = _mm512_fmadd_pd(even, scale, s2);
            s3 = _mm512_fmadd_pd(odd, scale, s3);
        }
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0, s1), _mm512_add_pd(s2, s3)));
}

__attribute__((noinline)) static void narrow_zmm(long reps)
{
    for (long k = 0; k < reps; k++)
        for (int i = 0; i < N; i += 16) {
            _mm256_store_ps(fbuf + i, _mm512_cvtpd_ps(_mm512_load_pd(dbuf + i)));
            _mm256_store_ps(fbuf + i + 8, _mm512_cvtpd_ps(_mm512_load_pd(dbuf + i + 8)));
        }
}

__attribute__((noinline)) static void narrow_ymm(long reps)
{
    for (long k = 0; k < reps; k++)
        for (int i = 0; i < N; i += 8) {
            _mm_store_ps(fbuf + i, _mm256_cvtpd_ps(_mm256_load_pd(dbuf + i)));
            _mm_store_ps(fbuf + i + 4, _mm256_cvtpd_ps(_mm256_load_pd(dbuf + i + 4)));
        }
}

int main(void)
{
    const long reps = 200000;
    const double per = reps * (N / 8.0), hz = clock_hz();
    double t, check = 0;
    for (int i = 0; i < N; i++) {
        fbuf[i] = (float)(i % 100) * 0.37f - 3.0f;
        dbuf[i] = i * 0.1;
    }
    printf("clock about %.2f GHz; cycles per 8 elements:\n", hz * 1e-9);
    for (int round = 0; round < 3; round++) {
        t = now(), check += widen_zmm(reps), t = now() - t;
        printf("  vcvtps2pd zmm <- ymm    %.2f\n", t * hz / per);
        t = now(), check += widen_ymm(reps), t = now() - t;
        printf("  vcvtps2pd ymm <- xmm    %.2f\n", t * hz / per);
        t = now(), check += widen_int(reps, 0), t = now() - t;
        printf("  integer widening        %.2f\n", t * hz / per);
        t = now(), check += widen_int(reps, 1), t = now() - t;
        printf("  half of each            %.2f\n", t * hz / per);
        t = now(), narrow_zmm(reps), t = now() - t;
        printf("  vcvtpd2ps ymm <- zmm    %.2f\n", t * hz / per);
        t = now(), narrow_ymm(reps), t = now() - t;
        printf("  vcvtpd2ps xmm <- ymm    %.2f\n", t * hz / per);
    }
    return check == 0.123; /* keeps the sums live */
}

/* bnfast C inner loops: see bnfast_kernels.h for the layout and the numerics. */
#include "bnfast_kernels.h"

/* Runtime SIMD dispatch without -march: gcc/clang on x86-64 build one clone per ISA and
 * pick at load time (ifunc).  Elsewhere the kernels are built for the baseline. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) \
    && !defined(BNFAST_NO_CLONES)
#define BNF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BNF_CLONES
#endif

/* Helpers are inlined into each ISA clone: a call would run the baseline version. */
#if defined(__GNUC__)
#define BNF_INLINE __attribute__((always_inline))
#else
#define BNF_INLINE
#endif

/* Streaming (non-temporal) stores for large outputs: the line is written without being
 * read first, and without evicting the input from cache.  SSE2 is the x86-64 baseline,
 * so every ISA clone can use them; elsewhere a plain copy. */
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define BNF_HAVE_STREAM 1
#else
#define BNF_HAVE_STREAM 0
#endif
#include <stdint.h>
#include <string.h>

static inline BNF_INLINE void bnf_stream_f32(float *dst, const float *src, ptrdiff_t n)
{
#if BNF_HAVE_STREAM
    ptrdiff_t i = 0;
    for (; i < n && ((uintptr_t)(dst + i) & 15); i++) dst[i] = src[i];
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; i++) dst[i] = src[i];
#else
    memcpy(dst, src, (size_t)n * sizeof(float));
#endif
}

static inline BNF_INLINE void bnf_stream_f64(double *dst, const double *src, ptrdiff_t n)
{
#if BNF_HAVE_STREAM
    ptrdiff_t i = 0;
    for (; i < n && ((uintptr_t)(dst + i) & 15); i++) dst[i] = src[i];
    for (; i + 2 <= n; i += 2) _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
    for (; i < n; i++) dst[i] = src[i];
#else
    memcpy(dst, src, (size_t)n * sizeof(double));
#endif
}

/* Streaming stores are weakly ordered: the caller fences once per work unit, before
 * other threads may read the output. */
void bnf_stream_fence(void)
{
#if BNF_HAVE_STREAM
    _mm_sfence();
#endif
}

/* Elements per chunk staged in L1 before a streaming store. */
#define BNF_CHUNK 1024

/* Accumulator lanes: a fixed count, so sums are identical for every vector width. */
#define BNF_LANES 32

static inline BNF_INLINE double bnf_sum_lanes(const double *acc)
{
    /* Pairwise over the lanes, in a fixed order. */
    double t[BNF_LANES / 2];
    for (int l = 0; l < BNF_LANES / 2; l++) t[l] = acc[l] + acc[l + BNF_LANES / 2];
    for (int w = BNF_LANES / 4; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) t[l] = t[l] + t[l + w];
    return t[0];
}

const char *bnf_simd_isa(void)
{
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) \
    && !defined(BNFAST_NO_CLONES)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "AVX-512 (x86-64-v4)";
    if (__builtin_cpu_supports("x86-64-v3")) return "AVX2+FMA (x86-64-v3)";
    return "baseline (x86-64 SSE2)";
#elif defined(__aarch64__)
    return "baseline (AArch64 NEON)";
#else
    return "baseline";
#endif
}

#define T float
#define S f32
#define BNF_REDO_RATIO (1.0 - 0x1p-20)
#include "bnfast_kernels_impl.h"
#undef BNF_REDO_RATIO
#undef T
#undef S

#define T double
#define S f64
#define BNF_REDO_RATIO 0.5
#include "bnfast_kernels_impl.h"
#undef BNF_REDO_RATIO
#undef T
#undef S

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
#include "bnfast_kernels_impl.h"
#undef T
#undef S

#define T double
#define S f64
#include "bnfast_kernels_impl.h"
#undef T
#undef S

/* Intrinsics forms of the hottest inner loops, included by bnfast_kernels_impl.h once per
 * element type and ISA level (BNF_ISA_LEVEL 4: x86-64-v4, AVX-512; 3: x86-64-v3, AVX2).
 *
 * Why: gcc vectorizes a float -> double loop a full vector of floats at a time and
 * splits every vector with shuffles, on the port the conversions also need.  Loading
 * half a vector of floats per vector of doubles avoids them (measured in cache: dx
 * 15-20% faster, normalize 12-15% (AVX-512 only, see below), sums ~9%).
 *
 * Each function is the plain loop of the same name in bnfast_kernels_impl.h, with the
 * same operations in the same order on the same lanes: the same bits (test_simd_paths
 * compares them).  Tails shorter than a vector run the plain scalar expression. */

#if BNF_ISA_LEVEL == 4
#define BNF_ISA v4
#define BNF_SIMD_FN static __attribute__((target("arch=x86-64-v4")))
#define BNF_VW 8
#define BNF_VD __m512d
#define BNF_VSET1 _mm512_set1_pd
#define BNF_VZERO _mm512_setzero_pd
#define BNF_VADD _mm512_add_pd
#define BNF_VSUB _mm512_sub_pd
#define BNF_VMUL _mm512_mul_pd
#define BNF_VFMA _mm512_fmadd_pd   /* a * b + c, rounded once */
#define BNF_VFNMA _mm512_fnmadd_pd /* c - a * b, rounded once */
#define BNF_VLD _mm512_loadu_pd
#define BNF_VST _mm512_storeu_pd
#define BNF_NT_ALIGN 64
#if BNF_T_HALF
/* float16 through F16C: 8 halves (16 bytes) a vector of doubles; stores round to float
 * and then to half, as the scalar form (BNF_FROM_D) does */
#define BNF_VLDT(p) _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#define BNF_HCVT(v) _mm256_cvtps_ph(_mm512_cvtpd_ps(v), _MM_FROUND_TO_NEAREST_INT)
#define BNF_VSTT(q, v) _mm_storeu_si128((__m128i *)(q), BNF_HCVT(v))
#define BNF_VSTNT2(q, v0, v1) \
    _mm256_stream_si256((__m256i *)(q), _mm256_set_m128i(BNF_HCVT(v1), BNF_HCVT(v0)))
#define BNF_MASKED 0   /* float16: scalar tails */
#elif BNF_T_FLOAT
#define BNF_VLDT(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define BNF_VSTT(q, v) _mm256_storeu_ps((q), _mm512_cvtpd_ps(v))
#define BNF_VSTNT2(q, v0, v1)                                                             \
    _mm512_stream_ps((q), _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(v0)), \
                                             _mm512_cvtpd_ps(v1), 1))
#define BNF_MASKED 1   /* masked tails: the lanes of mask k only (never fault past them) */
#define BNF_VLDT_MASK(k, p) _mm512_cvtps_pd(_mm256_maskz_loadu_ps((k), (p)))
#define BNF_VSTT_MASK(q, k, v) _mm256_mask_storeu_ps((q), (k), _mm512_cvtpd_ps(v))
#else
#define BNF_VLDT(p) _mm512_loadu_pd(p)
#define BNF_VSTT(q, v) _mm512_storeu_pd((q), (v))
#define BNF_VSTNT2(q, v0, v1) (_mm512_stream_pd((q), (v0)), _mm512_stream_pd((q) + 8, (v1)))
#define BNF_MASKED 1
#define BNF_VLDT_MASK(k, p) _mm512_maskz_loadu_pd((k), (p))
#define BNF_VSTT_MASK(q, k, v) _mm512_mask_storeu_pd((q), (k), (v))
#endif
#elif BNF_ISA_LEVEL == 3
#define BNF_ISA v3
#define BNF_MASKED 0   /* AVX2: scalar tails */
#define BNF_SIMD_FN static __attribute__((target("arch=x86-64-v3")))
#define BNF_VW 4
#define BNF_VD __m256d
#define BNF_VSET1 _mm256_set1_pd
#define BNF_VZERO _mm256_setzero_pd
#define BNF_VADD _mm256_add_pd
#define BNF_VSUB _mm256_sub_pd
#define BNF_VMUL _mm256_mul_pd
#define BNF_VFMA _mm256_fmadd_pd
#define BNF_VFNMA _mm256_fnmadd_pd
#define BNF_VLD _mm256_loadu_pd
#define BNF_VST _mm256_storeu_pd
/* streamed from a line on, whole lines only (BNF_NT_END) */
#define BNF_NT_ALIGN 64
#if BNF_T_HALF
/* 4 halves (8 bytes) a vector of doubles */
#define BNF_VLDT(p) _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p))))
#define BNF_HCVT(v) _mm_cvtps_ph(_mm256_cvtpd_ps(v), _MM_FROUND_TO_NEAREST_INT)
#define BNF_VSTT(q, v) _mm_storel_epi64((__m128i *)(q), BNF_HCVT(v))
#define BNF_VSTNT2(q, v0, v1) \
    _mm_stream_si128((__m128i *)(q), _mm_unpacklo_epi64(BNF_HCVT(v0), BNF_HCVT(v1)))
#elif BNF_T_FLOAT
#define BNF_VLDT(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define BNF_VSTT(q, v) _mm_storeu_ps((q), _mm256_cvtpd_ps(v))
#define BNF_VSTNT2(q, v0, v1) \
    _mm256_stream_ps((q), _mm256_set_m128(_mm256_cvtpd_ps(v1), _mm256_cvtpd_ps(v0)))
#else
#define BNF_VLDT(p) _mm256_loadu_pd(p)
#define BNF_VSTT(q, v) _mm256_storeu_pd((q), (v))
#define BNF_VSTNT2(q, v0, v1) (_mm256_stream_pd((q), (v0)), _mm256_stream_pd((q) + 4, (v1)))
#endif
#else
#error "BNF_ISA_LEVEL must be 4 or 3"
#endif

#define BNF_SIMD(n) BNF_NAME(BNF_CAT(n, BNF_ISA))

/* The scalar arithmetic of heads and tails (BNF_SE): float16's own, with F16C's scalar
 * conversions (with the plain loops' software ones, 64x256x28x28 float16 training took
 * 3.4x a copy, 3.0x with these); the plain loops' for the others. */
#if BNF_T_HALF
#pragma push_macro("BNF_TO_D")
#pragma push_macro("BNF_FROM_D")
#undef BNF_TO_D
#undef BNF_FROM_D
#define BNF_TO_D(v) ((double)_cvtsh_ss(v))
#define BNF_FROM_D(d) ((uint16_t)_cvtss_sh((float)(d), _MM_FROUND_TO_NEAREST_INT))
#define BNF_ELEM(n) BNF_SIMD(n)
#define BNF_ELEM_FN BNF_SIMD_FN inline BNF_INLINE
#include "bnfast_kernels_elem.h"
#undef BNF_ELEM
#undef BNF_ELEM_FN
#pragma pop_macro("BNF_TO_D")
#pragma pop_macro("BNF_FROM_D")
#define BNF_SE(n) BNF_SIMD(n)
#else
#define BNF_SE(n) BNF_NAME(n)
#endif
#define BNF_NV (BNF_LANES / BNF_VW) /* vectors of lanes */

/* Outputs, two vectors at a time.  nt: streaming stores straight from the registers (q
 * BNF_NT_ALIGN-aligned; the elementwise loops first run the scalar expression up to such
 * an address).  Measured from L2 into a 51 MB output: dx 0.99 -> 0.63-0.65x a copy, the
 * normalize 0.92-1.02 -> 0.78-0.80x, against computing into an L1 chunk that
 * bnf_stream then copies out (which the plain loops still do). */
#define BNF_VST2(q, v0, v1, nt)                  \
    do {                                         \
        if (nt) {                                \
            BNF_VSTNT2((q), (v0), (v1));         \
        } else {                                 \
            BNF_VSTT((q), (v0));                 \
            BNF_VSTT((q) + BNF_VW, (v1));        \
        }                                        \
    } while (0)
#define BNF_NT_HEAD(q) ((uintptr_t)(q) & (BNF_NT_ALIGN - 1))

/* The parts of an elementwise loop writing q[0 .. n), from the loop's BNF_V(j) (the
 * vector of results from element j) and BNF_S(j) (result j alone): BNF_HEAD, with nt,
 * the elements before q's first BNF_NT_ALIGN boundary, alone; BNF_PAIRS two vectors at a
 * time up to `end`; BNF_TAIL the rest, by vectors, then alone.  (AVX-512 masked stores of
 * whole vectors for head and tail, which reach into the lines streamed next to them,
 * measured 1.3-5x slower; masked vectors kept within the head's and the tail's own
 * lines do not: BNF_HEAD_RUN, BNF_TAIL_RUN.) */
#define BNF_HEAD(q, i, n, nt)                                                          \
    do {                                                                               \
        if (nt)                                                                        \
            for (; i < (n) && BNF_NT_HEAD((q) + i); i++) (q)[i] = BNF_S(i);            \
    } while (0)
#define BNF_PAIRS(q, i, end, nt)                                                       \
    for (ptrdiff_t e_ = BNF_NT_END(q, end, nt); i + 2 * BNF_VW <= e_; i += 2 * BNF_VW)  \
    BNF_VST2((q) + i, BNF_V(i), BNF_V(i + BNF_VW), nt)
/* BNF_PAIRS over q[i .. n) in blocks of BNF_PF_BLOCK elements, `advance` (an expression
 * of the block b0 .. b1: the prefetch cursors) run once a block.  dx gives `nt` as a
 * constant, so that its pairs do not test it; the normalize's runs, unswitched so,
 * measured no faster on Zen 3 ((64, 256, 28, 28) from DRAM 0.99-1.03x the time) and keep
 * the test. */
#define BNF_RUN_BLOCKS(q, i, n, nt, advance)                                       \
    do {                                                                           \
        for (ptrdiff_t b0 = 0; b0 < (n); b0 += BNF_PF_BLOCK) {                     \
            ptrdiff_t b1 = (n) - b0 < BNF_PF_BLOCK ? (n) : b0 + BNF_PF_BLOCK;     \
            (void)(advance);                                                       \
            BNF_PAIRS(q, i, b1, nt);                                               \
        }                                                                          \
    } while (0)
/* Pairs of vectors shorter than a line (float16; float32 at level 3): streamed, they stop
 * at the last whole line before `end` (q[0 .. end) with q + i on a line), so that no line
 * is streamed in part and stored plainly in part (its other half by the tail, or by the
 * next run's head).  A line streamed and then stored to plainly waits for the streamed
 * half to reach DRAM and reads it back: a 64x256x28x28 float16 eval into out= took
 * 2.0-2.3x a copy before this and the F16C heads, 1.5x after; on a Zen 3 EPYC (AVX2),
 * float32 (192, 128, 128) eval into an out= 48 bytes past a line took 6x the time of one
 * on a line, each run's last line streamed in its first half (pairs of 32 bytes from a
 * 32-byte boundary, as level 3 streamed before) and stored plainly in its second. */
#if BNF_T_HALF || (BNF_ISA_LEVEL == 3 && BNF_T_FLOAT)
#define BNF_NT_END(q, end, nt) \
    ((nt) ? (end) - (ptrdiff_t)(((uintptr_t)((q) + (end)) & 63) / sizeof(T)) : (end))
#else
#define BNF_NT_END(q, end, nt) (end)
#endif
#define BNF_TAIL(q, i, n)                                                              \
    do {                                                                               \
        for (; i + BNF_VW <= (n); i += BNF_VW) BNF_VSTT((q) + i, BNF_V(i));            \
        for (; i < (n); i++) (q)[i] = BNF_S(i);                                        \
    } while (0)
/* The rows loops' tails (BNF_MASKED: AVX-512, float and double): the whole vectors, then
 * the rest as one masked vector, BNF_VM(j, k) (BNF_V(j) on the lanes of mask k, the
 * others neither read nor written), not an element at a time; the same operations lane
 * by lane (and so for the rows sums).  One thread, float32, in cache, alternated: (1333,
 * 300), (1600, 250), (3100, 129) 0.91-1.01x the time; (16, 28, 28, 60) training
 * 0.93-0.95x, backward 0.85-0.97x.  Streamed rows (nt) keep the scalar tail beside their
 * streamed lines. */
#if BNF_MASKED
#define BNF_VLDM(k, p) _mm512_maskz_loadu_pd((k), (p))
#define BNF_VSTM(q, k, v) _mm512_mask_storeu_pd((q), (k), (v))
#define BNF_TAIL_MASK(n, i) ((__mmask8)((1u << ((n) - (i))) - 1))
/* the tail by whole vectors and then one masked vector where `masked`, else BNF_TAIL */
#define BNF_TAIL_MASKED(q, i, n, masked)                                               \
    do {                                                                               \
        if (!(masked)) {                                                               \
            BNF_TAIL(q, i, n);                                                         \
            break;                                                                     \
        }                                                                              \
        for (; i + BNF_VW <= (n); i += BNF_VW) BNF_VSTT((q) + i, BNF_V(i));            \
        if (i < (n)) {                                                                 \
            __mmask8 k_ = BNF_TAIL_MASK(n, i);                                         \
            BNF_VSTT_MASK((q) + i, k_, BNF_VM(i, k_));                                 \
            i = (n);                                                                   \
        }                                                                              \
    } while (0)
#define BNF_TAIL_ROWS(q, i, n, nt) BNF_TAIL_MASKED(q, i, n, !(nt) && bnf_masked_tails)
#else
#define BNF_TAIL_ROWS(q, i, n, nt) BNF_TAIL(q, i, n)
#endif

/* A run's head and tail where it is streamed (nt, AVX-512 float and double; q aligned to
 * its elements): the elements before q's first line boundary, and those after its last
 * whole vector, by masked vectors that each lie within that line (BNF_VM(j, k): BNF_V(j)
 * on the lanes of mask k; lanes before q are neither read nor written), not an element
 * at a time; the lines streamed beside them are not touched.  Runs of 130-225 elements,
 * 51 MB, one thread, float32, in one process against the scalar ends (twenty-second
 * session): (128, 256, 13, 13) backward 0.93-0.94x the time, training 0.96x;
 * (64, 512, 14, 14) backward 0.88-0.99x, eval 0.95-0.99x; others 0.97-1.02x.  Else
 * BNF_HEAD and BNF_TAIL. */
#if BNF_MASKED
#define BNF_LINE_ELEMS ((ptrdiff_t)(BNF_LINE / sizeof(T)))
#define BNF_SPAN_MASK(a, b) ((__mmask8)(((1u << (b)) - 1) & ~((1u << (a)) - 1)))
#define BNF_HEAD_RUN(q, i, n, nt)                                                      \
    do {                                                                               \
        ptrdiff_t e_, l_;                                                              \
        if (!(nt) || !bnf_masked_tails || (uintptr_t)(q) % sizeof(T)) {                \
            BNF_HEAD(q, i, n, nt);                                                     \
            break;                                                                     \
        }                                                                              \
        e_ = bnf_nt_lead((q), sizeof(T));                                              \
        if (e_ == 0 || (n) <= 0) break;                                                \
        l_ = e_ - BNF_LINE_ELEMS;                                                      \
        if (e_ > (n)) e_ = (n);                                                        \
        for (ptrdiff_t j_ = l_; j_ < e_; j_ += BNF_VW) {                               \
            ptrdiff_t a_ = j_ < 0 ? -j_ : 0, b_ = e_ - j_ < BNF_VW ? e_ - j_ : BNF_VW;  \
            if (b_ > a_) BNF_VSTT_MASK((q) + j_, BNF_SPAN_MASK(a_, b_),               \
                                       BNF_VM(j_, BNF_SPAN_MASK(a_, b_)));             \
        }                                                                              \
        i = e_;                                                                        \
    } while (0)
#define BNF_TAIL_RUN(q, i, n, nt) BNF_TAIL_MASKED(q, i, n, (nt) && bnf_masked_tails)
#else
#define BNF_HEAD_RUN(q, i, n, nt) BNF_HEAD(q, i, n, nt)
#define BNF_TAIL_RUN(q, i, n, nt) BNF_TAIL(q, i, n)
#endif

/* The runs reductions advance their prefetch cursors once per BNF_SUMS_BLOCK elements
 * (whole BNF_LANES steps; b1 the end of the block from i, runs of length len), not per
 * step of 32, where the cursors' bookkeeping ran between every 24 vector operations; and
 * a tail's whole vectors go to the first lanes (runs of 28 x 28 have a tail of 16), not
 * through the scalar loop.  With the backward sums' adds on the FMA pipes (below),
 * (64, 8, 28, 28) float32 backward in cache took 0.93-0.96x the time ((64, 256, 28, 28)
 * from DRAM 0.95-1.02x: within the noise); the same bits.  (Cursors copied into locals
 * for the loop measured 3-7% slower on runs of 14 x 14.) */
#define BNF_SUMS_BLOCK (4 * BNF_LANES)

/* b + e += v, compensated (bnf_two_sum, lane by lane, the same operations); and b + e +=
 * d^2, the square rounded first, as sums_elem; else (no BNF_COMPENSATED) b += d^2 by a
 * multiply-add, e not touched.  _MASK: the lanes of m only (AVX-512). */
#define BNF_VTWO_SUM(b, e, v)                                                             \
    do {                                                                                  \
        BNF_VD v_ = (v), t_ = BNF_VADD((b), v_), z_ = BNF_VSUB(t_, (b));                 \
        (e) = BNF_VADD((e), BNF_VADD(BNF_VSUB((b), BNF_VSUB(t_, z_)), BNF_VSUB(v_, z_))); \
        (b) = t_;                                                                         \
    } while (0)
/* The same on the vectors at memory hi and lo (the rows loops' column sums) */
#define BNF_VTWO_SUM_AT(hi, lo, v)                                                        \
    do {                                                                                  \
        BNF_VD h_ = BNF_VLD(hi), l_ = BNF_VLD(lo);                                        \
        BNF_VTWO_SUM(h_, l_, v);                                                          \
        BNF_VST((hi), h_);                                                                \
        BNF_VST((lo), l_);                                                                \
    } while (0)
#if BNF_MASKED
/* hi (+ lo) += v on the lanes of mask k: BNF_VTWO_SUM_AT where compensated, else the
 * plain add (the rows loops' masked tails) */
#if BNF_COMPENSATED
#define BNF_VACC_MASK(hi, lo, k, v)                                                       \
    do {                                                                                  \
        BNF_VD h_ = BNF_VLDM((k), (hi)), l_ = BNF_VLDM((k), (lo));                        \
        BNF_VTWO_SUM(h_, l_, v);                                                          \
        BNF_VSTM((hi), (k), h_);                                                          \
        BNF_VSTM((lo), (k), l_);                                                          \
    } while (0)
#else
#define BNF_VACC_MASK(hi, lo, k, v) BNF_VSTM((hi), (k), BNF_VADD(BNF_VLDM((k), (hi)), (v)))
#endif
#endif
#if BNF_COMPENSATED
#define BNF_VSQ_ACC(b, e, d) BNF_VTWO_SUM(b, e, BNF_VMUL((d), (d)))
#define BNF_VSQ_ACC_MASK(b, e, d, m)                                                      \
    do {                                                                                  \
        BNF_VD b_ = (b), e_ = (e);                                                        \
        BNF_VSQ_ACC(b_, e_, d);                                                           \
        (b) = _mm512_mask_mov_pd((b), (m), b_);                                           \
        (e) = _mm512_mask_mov_pd((e), (m), e_);                                           \
    } while (0)
#else
#define BNF_VSQ_ACC(b, e, d) ((b) = BNF_VFMA((d), (d), (b)))
#define BNF_VSQ_ACC_MASK(b, e, d, m) ((b) = _mm512_mask3_fmadd_pd((d), (d), (b), (m)))
#endif
#define BNF_SUMS_BLOCK_END(i, len) \
    ((i) + BNF_SUMS_BLOCK <= (len) ? (i) + BNF_SUMS_BLOCK : (len) - ((len) - (i)) % BNF_LANES)

#if BNF_ISA_LEVEL == 3 && !BNF_COMPENSATED
/* AVX2, sums without low parts: the 32 lanes of the two sums and the shift are 17
 * vectors, and AVX2 has 16 registers: gcc keeps two sums on the stack (a multiply-add from
 * it and a store back at every vector: `perf` of (8, 64, 28, 28) training, ~13% of its
 * kernel).  Runs shorter than BNF_STATS_HALVES_LEN go twice instead, half the lanes at a
 * time, the second time from L1, as the backward sums (bwd_sums_run_half): each lane gets
 * the same additions in the same order (the bits of the body below).  Zen 3, one thread,
 * float32 training, old and new build alternated (two runs): in cache, runs of 13 x 13
 * 0.81x the time, 14 x 14 0.89-0.94x, 16 x 16 0.73-0.93x, 20 x 20 0.91-0.95x; (64, 256,
 * 14, 14) 0.86-0.87x; float16 0.90-0.95x.  All runs in halves measured 24 x 24 0.97x,
 * 28 x 28 1.04-1.16x and 40 x 40 1.13x (the second pass and its loop cost more than the
 * spills there): those keep the body.  Lanes h * BNF_NV / 2 vectors on, of the run at p;
 * the cursor advances in half 0. */
#define BNF_STATS_HALVES_LEN 512
BNF_SIMD_FN inline BNF_INLINE void BNF_SIMD(shifted_sums_run_half)(
    const T *p, ptrdiff_t len, BNF_VD vs, double shift, double *s1, double *s2, bnf_pf *pf,
    const int h)
{
    enum { HV = BNF_NV / 2 };
    const ptrdiff_t lane0 = (ptrdiff_t)h * HV * BNF_VW;     /* the half's first lane */
    BNF_VD a[HV], b[HV];
    for (int v = 0; v < HV; v++) {
        a[v] = BNF_VLD(s1 + lane0 + BNF_VW * v);
        b[v] = BNF_VLD(s2 + lane0 + BNF_VW * v);
    }
    ptrdiff_t i = 0;
    for (ptrdiff_t b1; i + BNF_LANES <= len;) {
        b1 = BNF_SUMS_BLOCK_END(i, len);
        if (h == 0 && pf) bnf_pf_advance(pf, (b1 - i) * (ptrdiff_t)sizeof(T));
        for (; i < b1; i += BNF_LANES)
            for (int v = 0; v < HV; v++) {
                BNF_VD d = BNF_VSUB(BNF_VLDT(p + i + lane0 + BNF_VW * v), vs);
                a[v] = BNF_VADD(a[v], d);
                BNF_VSQ_ACC(b[v], b[v], d);
            }
    }
    if (h == 0 && pf) bnf_pf_advance(pf, (len - i) * (ptrdiff_t)sizeof(T));
    /* the tail's whole vectors into the first lanes, then the rest a lane at a time */
    ptrdiff_t t = i;
    for (int v = 0; v < HV; v++) {
        ptrdiff_t o = t + lane0 + BNF_VW * v;
        if (o + BNF_VW <= len) {
            BNF_VD d = BNF_VSUB(BNF_VLDT(p + o), vs);
            a[v] = BNF_VADD(a[v], d);
            BNF_VSQ_ACC(b[v], b[v], d);
        }
    }
    for (int v = 0; v < HV; v++) {
        BNF_VST(s1 + lane0 + BNF_VW * v, a[v]);
        BNF_VST(s2 + lane0 + BNF_VW * v, b[v]);
    }
    i = t + (len - t) / BNF_VW * BNF_VW;
    for (ptrdiff_t l = i - t; i < len; i++, l++)
        if (l >= lane0 && l < lane0 + HV * BNF_VW)
            BNF_SE(sums_elem)(p[i], shift, &s1[l], &s2[l], (double *)0, (double *)0);
}
#endif

BNF_SIMD_FN inline BNF_INLINE void BNF_SIMD(shifted_sums_runs_body)(
    const T *x, ptrdiff_t nruns, ptrdiff_t stride, ptrdiff_t len, double shift, double *s1,
    double *s2, double *s2lo, bnf_pf *pf)
{
#if BNF_ISA_LEVEL == 3 && !BNF_COMPENSATED
    if (len < BNF_STATS_HALVES_LEN) {
        for (ptrdiff_t r = 0; r < nruns; r++) {
            const T *p = x + r * stride;
            BNF_VD vs = BNF_VSET1(shift);
            BNF_SIMD(shifted_sums_run_half)(p, len, vs, shift, s1, s2, pf, 0);
            BNF_SIMD(shifted_sums_run_half)(p, len, vs, shift, s1, s2, pf, 1);
        }
        return;
    }
#endif
    BNF_VD a[BNF_NV], b[BNF_NV], e[BNF_NV], vs = BNF_VSET1(shift);
    for (int v = 0; v < BNF_NV; v++) {
        a[v] = BNF_VLD(s1 + BNF_VW * v);
        b[v] = BNF_VLD(s2 + BNF_VW * v);
        e[v] = BNF_COMPENSATED ? BNF_VLD(s2lo + BNF_VW * v) : BNF_VZERO();
    }
    for (ptrdiff_t r = 0; r < nruns; r++) {
        const T *p = x + r * stride;
        ptrdiff_t i = 0;
        for (ptrdiff_t b1; i + BNF_LANES <= len;) {
            b1 = BNF_SUMS_BLOCK_END(i, len);
            if (pf) bnf_pf_advance(pf, (b1 - i) * (ptrdiff_t)sizeof(T));
#if BNF_COMPENSATED
            /* a whole block: each lane's four elements as sums_elem4 */
            if (b1 - i == BNF_SUMS_BLOCK) {
                for (int v = 0; v < BNF_NV; v++) {
                    const T *q = p + i + BNF_VW * v;
                    BNF_VD d0 = BNF_VSUB(BNF_VLDT(q), vs);
                    BNF_VD d1 = BNF_VSUB(BNF_VLDT(q + BNF_LANES), vs);
                    BNF_VD d2 = BNF_VSUB(BNF_VLDT(q + 2 * BNF_LANES), vs);
                    BNF_VD d3 = BNF_VSUB(BNF_VLDT(q + 3 * BNF_LANES), vs);
                    a[v] = BNF_VADD(a[v], BNF_VADD(BNF_VADD(d0, d1), BNF_VADD(d2, d3)));
                    BNF_VTWO_SUM(b[v], e[v],
                                 BNF_VADD(BNF_VFMA(d0, d0, BNF_VMUL(d1, d1)),
                                          BNF_VFMA(d2, d2, BNF_VMUL(d3, d3))));
                }
                i = b1;
                continue;
            }
#endif
            for (; i < b1; i += BNF_LANES)
                for (int v = 0; v < BNF_NV; v++) {
                    BNF_VD d = BNF_VSUB(BNF_VLDT(p + i + BNF_VW * v), vs);
                    a[v] = BNF_VADD(a[v], d);
                    BNF_VSQ_ACC(b[v], e[v], d);
                }
        }
        if (pf) bnf_pf_advance(pf, (len - i) * (ptrdiff_t)sizeof(T));
#if BNF_MASKED
        /* the tail into the first lanes, as the scalar loop would: whole vectors, then the
         * rest as one masked vector; each vector of lanes named by a constant, so they stay
         * in registers (no store and reload of every lane around a scalar loop).  One
         * thread, float32, in one process: (64, 256, 14, 14) training 0.81-0.83x the time,
         * `moments` 0.85x, (64, 512, 14, 14) 0.83x; float64 0.97x, two threads 0.92x;
         * runs without a partial vector (28 x 28) 0.97-1.00x.  The backward sums measured
         * the same way 0.79-0.82x on 14 x 14 but 1.07-1.09x on 28 x 28 from DRAM, and keep
         * their loop. */
        for (int v = 0; v < BNF_NV; v++) {
            ptrdiff_t o = i + BNF_VW * v;
            if (o + BNF_VW <= len) {
                BNF_VD d = BNF_VSUB(BNF_VLDT(p + o), vs);
                a[v] = BNF_VADD(a[v], d);
                BNF_VSQ_ACC(b[v], e[v], d);
            } else if (o < len) {
                __mmask8 m = (__mmask8)((1u << (len - o)) - 1);
                BNF_VD d = BNF_VSUB(BNF_VLDT_MASK(m, p + o), vs);
                a[v] = _mm512_mask_add_pd(a[v], m, a[v], d);
                BNF_VSQ_ACC_MASK(b[v], e[v], d, m);
            }
        }
#else
        /* the tail's whole vectors into the first lanes, as the scalar loop would */
        ptrdiff_t t = i;
        for (int v = 0; i + BNF_VW <= len; v++, i += BNF_VW) {
            BNF_VD d = BNF_VSUB(BNF_VLDT(p + i), vs);
            a[v] = BNF_VADD(a[v], d);
            BNF_VSQ_ACC(b[v], e[v], d);
        }
        if (i < len) {
            for (int v = 0; v < BNF_NV; v++) {
                BNF_VST(s1 + BNF_VW * v, a[v]);
                BNF_VST(s2 + BNF_VW * v, b[v]);
                if (BNF_COMPENSATED) BNF_VST(s2lo + BNF_VW * v, e[v]);
            }
            for (ptrdiff_t l = i - t; i < len; i++, l++)
                BNF_SE(sums_elem)(p[i], shift, &s1[l], &s2[l], BNF_LO(s2lo, l), (double *)0);
            for (int v = 0; v < BNF_NV; v++) {
                a[v] = BNF_VLD(s1 + BNF_VW * v);
                b[v] = BNF_VLD(s2 + BNF_VW * v);
                if (BNF_COMPENSATED) e[v] = BNF_VLD(s2lo + BNF_VW * v);
            }
        }
#endif
    }
    for (int v = 0; v < BNF_NV; v++) {
        BNF_VST(s1 + BNF_VW * v, a[v]);
        BNF_VST(s2 + BNF_VW * v, b[v]);
        if (BNF_COMPENSATED) BNF_VST(s2lo + BNF_VW * v, e[v]);
    }
    (void)e;
}

BNF_SIMD_FN void BNF_SIMD(shifted_sums_runs)(const T *x, ptrdiff_t nruns, ptrdiff_t stride,
                                             ptrdiff_t len, double shift, double *s1,
                                             double *s2, double *s2lo, bnf_pf *pf)
{
    BNF_SIMD(shifted_sums_runs_body)(x, nruns, stride, len, shift, s1, s2, s2lo, pf);
}

#if BNF_COMPENSATED
/* bnf_sum_lanes_lo (and _lo2: a second fold beside it) of four channels at once, channel j
 * in element j of each vector: every channel gets bnf_sum_lanes_lo's operations in its
 * order (bnf_two_sum of lane l, then lane l's low part added), so the same bits.  Channel
 * j's lanes at s + j * BNF_LANES (lo, s2, lo2 alike), turned four lanes at a time into
 * vectors of a lane of the four channels.  A float64 channel's fold was a chain of 62
 * dependent scalar adds, and with two folds side by side, 16 scalar adds a lane. */
#define BNF_T4(p, v)                                                                   \
    do {                                                                               \
        __m256d r0_ = _mm256_loadu_pd(p), r1_ = _mm256_loadu_pd((p) + BNF_LANES),      \
                r2_ = _mm256_loadu_pd((p) + 2 * BNF_LANES),                            \
                r3_ = _mm256_loadu_pd((p) + 3 * BNF_LANES);                            \
        __m256d u0_ = _mm256_unpacklo_pd(r0_, r1_), u1_ = _mm256_unpackhi_pd(r0_, r1_), \
                u2_ = _mm256_unpacklo_pd(r2_, r3_), u3_ = _mm256_unpackhi_pd(r2_, r3_); \
        (v)[0] = _mm256_permute2f128_pd(u0_, u2_, 0x20);                               \
        (v)[1] = _mm256_permute2f128_pd(u1_, u3_, 0x20);                               \
        (v)[2] = _mm256_permute2f128_pd(u0_, u2_, 0x31);                               \
        (v)[3] = _mm256_permute2f128_pd(u1_, u3_, 0x31);                               \
    } while (0)
/* bnf_two_sum(&t, &e, v), then e += vlo: element by element as the scalar code */
#define BNF_V4_STEP(t, e, v, vlo)                                                      \
    do {                                                                               \
        __m256d nt_ = _mm256_add_pd((t), (v)), z_ = _mm256_sub_pd(nt_, (t));           \
        (e) = _mm256_add_pd((e), _mm256_add_pd(_mm256_sub_pd((t), _mm256_sub_pd(nt_, z_)), \
                                               _mm256_sub_pd((v), z_)));               \
        (t) = nt_;                                                                     \
        (e) = _mm256_add_pd((e), (vlo));                                               \
    } while (0)
BNF_SIMD_FN inline BNF_INLINE void BNF_SIMD(sum_lanes_lo_x4)(const double *s, const double *lo,
                                                            double *sum, double *sum_lo)
{
    __m256d t = _mm256_setzero_pd(), e = t, vs[4], vl[4];
    for (int l = 0; l < BNF_LANES; l += 4) {
        BNF_T4(s + l, vs);
        BNF_T4(lo + l, vl);
        for (int i = 0; i < 4; i++) {
            if (l + i == 0) {
                t = vs[0];
                e = vl[0];
            } else {
                BNF_V4_STEP(t, e, vs[i], vl[i]);
            }
        }
    }
    _mm256_storeu_pd(sum, t);
    _mm256_storeu_pd(sum_lo, e);
}
BNF_SIMD_FN inline BNF_INLINE void BNF_SIMD(sum_lanes_lo2_x4)(
    const double *s, const double *lo, const double *s2, const double *lo2, double *sum,
    double *sum_lo, double *sum2, double *sum2_lo)
{
    __m256d t = _mm256_setzero_pd(), e = t, t2 = t, e2 = t, vs[4], vl[4], vs2[4], vl2[4];
    for (int l = 0; l < BNF_LANES; l += 4) {
        BNF_T4(s + l, vs);
        BNF_T4(lo + l, vl);
        BNF_T4(s2 + l, vs2);
        BNF_T4(lo2 + l, vl2);
        for (int i = 0; i < 4; i++) {
            if (l + i == 0) {
                t = vs[0];
                e = vl[0];
                t2 = vs2[0];
                e2 = vl2[0];
            } else {
                BNF_V4_STEP(t, e, vs[i], vl[i]);
                BNF_V4_STEP(t2, e2, vs2[i], vl2[i]);
            }
        }
    }
    _mm256_storeu_pd(sum, t);
    _mm256_storeu_pd(sum_lo, e);
    _mm256_storeu_pd(sum2, t2);
    _mm256_storeu_pd(sum2_lo, e2);
}
#undef BNF_T4
#undef BNF_V4_STEP
#endif

/* The first pass of k channels of runs each one tile (bnf_train_runs_cached), each around
 * its first element (stats_runs_tiles' shift for its first tile): its lanes set, summed
 * (shifted_sums_runs' body, inlined) and folded here into sd[c] = sum(x - shift[c]) and
 * sdd[c] (+ sdd_lo[c], BNF_COMPENSATED) = sum((x - shift[c])^2), as tile_finish folds
 * them.  The same bits; one call a block, as bwd_sums_channels. */
BNF_SIMD_FN void BNF_SIMD(tile_sums_channels)(const T *x, ptrdiff_t xstride, ptrdiff_t xcs,
                                              ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k,
                                              double *shift, double *sd, double *sdd,
                                              double *sdd_lo, bnf_pf *pf)
{
#if BNF_COMPENSATED
    /* four channels a group, their compensated folds side by side (sum_lanes_lo_x4) */
    for (ptrdiff_t c0 = 0; c0 < k; c0 += 4) {
        ptrdiff_t g = k - c0 < 4 ? k - c0 : 4;
        BNF_ALIGN64 double s1[4][BNF_LANES] = {{0}}, s2[4][BNF_LANES] = {{0}},
                           s2lo[4][BNF_LANES] = {{0}};
        for (ptrdiff_t j = 0; j < g; j++) {
            const T *p = x + (c0 + j) * xcs;
            shift[c0 + j] = bnf_finite_or(BNF_TO_D(p[0]), 0);
            BNF_SIMD(shifted_sums_runs_body)(p, nruns, xstride, len, shift[c0 + j], s1[j],
                                             s2[j], s2lo[j], pf);
            sd[c0 + j] = bnf_sum_lanes(s1[j]);
        }
        if (g == 4)
            BNF_SIMD(sum_lanes_lo_x4)(s2[0], s2lo[0], sdd + c0, sdd_lo + c0);
        else
            for (ptrdiff_t j = 0; j < g; j++)
                bnf_sum_lanes_lo(s2[j], s2lo[j], &sdd[c0 + j], &sdd_lo[c0 + j]);
    }
#else
    for (ptrdiff_t c = 0; c < k; c++) {
        BNF_ALIGN64 double s1[BNF_LANES] = {0}, s2[BNF_LANES] = {0};
        const T *p = x + c * xcs;
        shift[c] = bnf_finite_or(BNF_TO_D(p[0]), 0);
        BNF_SIMD(shifted_sums_runs_body)(p, nruns, xstride, len, shift[c], s1, s2, NULL, pf);
        sd[c] = bnf_sum_lanes(s1);
        sdd[c] = bnf_sum_lanes(s2);
        sdd_lo[c] = 0;
    }
#endif
}

/* One line of columns: the prefetch step of the rows loops. */
#define BNF_LINE_COLS (BNF_LINE / (ptrdiff_t)sizeof(T))
/* The lines that start in columns [c, c + span) of a row (counted from its first
 * column), for the rows loops' prefetch (bnf_rows_ahead): one prefetch per line read. */
#define BNF_FOR_LINES(l, c, span)                                                    \
    for (ptrdiff_t l = (c) + (BNF_LINE_COLS - (c) % BNF_LINE_COLS) % BNF_LINE_COLS;   \
         l < (c) + (span); l += BNF_LINE_COLS)
/* bnf_pf_row_ends of `nrows` rows of `cols` columns at p (rows `stride` elements apart),
 * and likewise at p2 with stride2 where p2 is not NULL (x beside dy). */
#define BNF_PF_ENDS(p, stride, p2, stride2, cols, nrows, far)                              \
    do {                                                                                 \
        bnf_pf_row_ends((p), (stride) * (ptrdiff_t)sizeof(T), (cols) * (ptrdiff_t)sizeof(T), \
                        (nrows), (far));                                                 \
        if (p2)                                                                          \
            bnf_pf_row_ends((p2), (stride2) * (ptrdiff_t)sizeof(T),                     \
                            (cols) * (ptrdiff_t)sizeof(T), (nrows), (far));              \
    } while (0)

BNF_SIMD_FN void BNF_SIMD(shifted_sums_rows)(const T *base, ptrdiff_t k, ptrdiff_t stride,
                                             ptrdiff_t width, const double *shift,
                                             double *s1, double *s2, double *s2lo,
                                             double *s1lo, ptrdiff_t pf_rows, int far)
{
    ptrdiff_t r, ahead = bnf_rows_ahead(width * (ptrdiff_t)sizeof(T));
    ptrdiff_t further = far ? bnf_rows_ahead_by(width * (ptrdiff_t)sizeof(T),
                                                BNF_FAR_ROWS_BYTES) : 0;
    /* into L1 too: in cache, or rows of up to bnf_l1_rows_max[BNF_L1_REDUCE] */
    int l1 = !far || width * (ptrdiff_t)sizeof(T) <= bnf_l1_rows_max[BNF_L1_REDUCE];
    for (ptrdiff_t c = 0; c < width; c++) {
        s1[c] = s2[c] = 0;
        if (BNF_COMPENSATED) s2lo[c] = s1lo[c] = 0;
    }
    /* quad iq: the rows iq + j sp (bnf_stats_spacing, no prefetches), or 4 iq + j */
    const ptrdiff_t sp = bnf_stats_spacing(k), sq = sp ? sp * stride : stride;
    const ptrdiff_t nq = sp ? sp : k / 4;
    for (ptrdiff_t iq = 0; iq < nq; iq++) {
        r = sp ? iq : 4 * iq;
        const T *p0 = base + r * stride, *p1 = p0 + sq, *p2 = p1 + sq, *p3 = p2 + sq,
                *pa = p0 + ahead * stride, *pf2 = p0 + further * stride;
        int pf = !sp && r + ahead + 4 <= pf_rows;
        ptrdiff_t c = 0;
        if (pf) {
            if (l1) BNF_PF_ENDS(pa, stride, (const T *)NULL, 0, width, 4, 0);
            if (further) BNF_PF_ENDS(pf2, stride, (const T *)NULL, 0, width, 4, 1);
        }
        /* a chunk's prefetches, then its columns by a loop without branches (as the
         * backward sums) */
        for (ptrdiff_t c0 = 0; c0 + BNF_VW <= width; c0 += BNF_PF_COLS) {
            ptrdiff_t c1 = width - c0 < BNF_PF_COLS ? width : c0 + BNF_PF_COLS;
            if (pf)
                BNF_FOR_LINES(l, c0, c1 - c0) {
                    if (l1)
                        bnf_pf_quad(pa, stride * (ptrdiff_t)sizeof(T),
                                    width * (ptrdiff_t)sizeof(T), l * (ptrdiff_t)sizeof(T), 0);
                    if (further)
                        bnf_pf_quad(pf2, stride * (ptrdiff_t)sizeof(T),
                                    width * (ptrdiff_t)sizeof(T), l * (ptrdiff_t)sizeof(T), 1);
                }
            for (c = c0; c + BNF_VW <= c1; c += BNF_VW) {
                BNF_VD sh = BNF_VLD(shift + c);
                BNF_VD d0 = BNF_VSUB(BNF_VLDT(p0 + c), sh), d1 = BNF_VSUB(BNF_VLDT(p1 + c), sh);
                BNF_VD d2 = BNF_VSUB(BNF_VLDT(p2 + c), sh), d3 = BNF_VSUB(BNF_VLDT(p3 + c), sh);
                BNF_VD t1 = BNF_VADD(BNF_VADD(d0, d1), BNF_VADD(d2, d3));
                BNF_VD t2 = BNF_VADD(BNF_VFMA(d0, d0, BNF_VMUL(d1, d1)),
                                     BNF_VFMA(d2, d2, BNF_VMUL(d3, d3)));
#if BNF_COMPENSATED
                BNF_VTWO_SUM_AT(s1 + c, s1lo + c, t1);
                BNF_VTWO_SUM_AT(s2 + c, s2lo + c, t2);
#else
                BNF_VST(s1 + c, BNF_VADD(BNF_VLD(s1 + c), t1));
                BNF_VST(s2 + c, BNF_VADD(BNF_VLD(s2 + c), t2));
#endif
            }
        }
#if BNF_MASKED
        if (c < width && bnf_masked_tails) {
            __mmask8 m = BNF_TAIL_MASK(width, c);
            BNF_VD sh = BNF_VLDM(m, shift + c);
            BNF_VD d0 = BNF_VSUB(BNF_VLDT_MASK(m, p0 + c), sh),
                   d1 = BNF_VSUB(BNF_VLDT_MASK(m, p1 + c), sh);
            BNF_VD d2 = BNF_VSUB(BNF_VLDT_MASK(m, p2 + c), sh),
                   d3 = BNF_VSUB(BNF_VLDT_MASK(m, p3 + c), sh);
            BNF_VD t1 = BNF_VADD(BNF_VADD(d0, d1), BNF_VADD(d2, d3));
            BNF_VD t2 = BNF_VADD(BNF_VFMA(d0, d0, BNF_VMUL(d1, d1)),
                                 BNF_VFMA(d2, d2, BNF_VMUL(d3, d3)));
            BNF_VACC_MASK(s1 + c, s1lo + c, m, t1);
            BNF_VACC_MASK(s2 + c, s2lo + c, m, t2);
            c = width;
        }
#endif
        for (; c < width; c++)
            BNF_SE(sums_elem4)(p0[c], p1[c], p2[c], p3[c], shift[c], &s1[c], &s2[c],
                               BNF_LO(s2lo, c), BNF_LO(s1lo, c));
    }
    r = 4 * nq;
    for (; r < k; r++) {
        const T *p = base + r * stride;
        ptrdiff_t c = 0;
        for (; c + BNF_VW <= width; c += BNF_VW) {
            BNF_VD d = BNF_VSUB(BNF_VLDT(p + c), BNF_VLD(shift + c));
#if BNF_COMPENSATED
            BNF_VTWO_SUM_AT(s1 + c, s1lo + c, d);
            BNF_VTWO_SUM_AT(s2 + c, s2lo + c, BNF_VMUL(d, d));
#else
            BNF_VST(s1 + c, BNF_VADD(BNF_VLD(s1 + c), d));
            BNF_VST(s2 + c, BNF_VFMA(d, d, BNF_VLD(s2 + c)));
#endif
        }
#if BNF_MASKED
        if (c < width && bnf_masked_tails) {
            __mmask8 m = BNF_TAIL_MASK(width, c);
            BNF_VD d = BNF_VSUB(BNF_VLDT_MASK(m, p + c), BNF_VLDM(m, shift + c));
#if BNF_COMPENSATED
            BNF_VACC_MASK(s1 + c, s1lo + c, m, d);
            BNF_VACC_MASK(s2 + c, s2lo + c, m, BNF_VMUL(d, d));
#else
            BNF_VSTM(s1 + c, m, BNF_VADD(BNF_VLDM(m, s1 + c), d));
            BNF_VSTM(s2 + c, m, BNF_VFMA(d, d, BNF_VLDM(m, s2 + c)));
#endif
            c = width;
        }
#endif
        for (; c < width; c++)
            BNF_SE(sums_elem)(p[c], shift[c], &s1[c], &s2[c], BNF_LO(s2lo, c),
                              BNF_LO(s1lo, c));
    }
}

#if BNF_MASKED
/* A row of k channels' runs of len elements back to back in x and in y (evaluation of
 * short runs, a row a call), plain stores: each run's whole vectors, then its tail as one
 * masked vector, with no call, head or scalar loop per run.  The bits of norm_chunk. */
BNF_SIMD_FN void BNF_SIMD(norm_runs_row)(const T *x, T *y, ptrdiff_t k, ptrdiff_t len,
                                         const double *mean, const double *scale,
                                         const double *shift, bnf_pf *pf)
{
    ptrdiff_t whole = len - len % BNF_VW;
    __mmask8 tail = (__mmask8)((1u << (len % BNF_VW)) - 1);
    for (ptrdiff_t c = 0; c < k; c++) {
        const T *p = x + c * len;
        T *q = y + c * len;
        BNF_VD vm = BNF_VSET1(mean[c]), va = BNF_VSET1(scale[c]), vb = BNF_VSET1(shift[c]);
        bnf_pf_advance(pf, len * (ptrdiff_t)sizeof(T));
        for (ptrdiff_t i = 0; i < whole; i += BNF_VW)
            BNF_VSTT(q + i, BNF_VFMA(BNF_VSUB(BNF_VLDT(p + i), vm), va, vb));
        if (tail)
            BNF_VSTT_MASK(q + whole, tail,
                          BNF_VFMA(BNF_VSUB(BNF_VLDT_MASK(tail, p + whole), vm), va, vb));
    }
}
#endif

/* Normalize.  At level 3, float and double run these only where bnf_norm_v3 (by CPU
 * vendor: AMD): on an Intel Xeon (AVX-512, its AVX2 clone timed) this form measured 7-10%
 * slower than gcc's vectorized plain loop on a 51 MB eval and no faster in cache; on a
 * Zen 3 EPYC (AVX2 only), against that loop, one thread, float32, in one process: eval of
 * (64, 256, 28, 28) 0.78x the time, training 0.80x; (64, 28, 28, 256) and (200704, 64)
 * 0.94-0.96x; in cache, (64, 64, 16, 16) eval 0.59x, (4096, 64) 0.79x.  gcc's loop loads
 * a vector of floats, splits it and joins the results by an insert, on the pipes the
 * conversions need.  float16's plain loop converts an element at a time: it always runs
 * these. */
BNF_SIMD_FN inline BNF_INLINE void BNF_SIMD(norm_chunk_body)(const T *p, T *q, ptrdiff_t n,
                                                            double mean, double scale,
                                                            double shift, bnf_pf *pf, int nt)
{
    BNF_VD vm = BNF_VSET1(mean), va = BNF_VSET1(scale), vb = BNF_VSET1(shift);
    ptrdiff_t i = 0;
#define BNF_V(j) BNF_VFMA(BNF_VSUB(BNF_VLDT(p + (j)), vm), va, vb)
#define BNF_S(j) BNF_SE(norm_elem)(p[j], mean, scale, shift)
#define BNF_VM(j, k) BNF_VFMA(BNF_VSUB(BNF_VLDT_MASK(k, p + (j)), vm), va, vb)
    BNF_HEAD_RUN(q, i, n, nt);
    BNF_RUN_BLOCKS(q, i, n, nt, bnf_pf_advance(pf, (b1 - b0) * (ptrdiff_t)sizeof(T)));
    BNF_TAIL_RUN(q, i, n, nt);
#undef BNF_V
#undef BNF_S
#undef BNF_VM
}

BNF_SIMD_FN void BNF_SIMD(norm_chunk)(const T *p, T *q, ptrdiff_t n, double mean,
                                      double scale, double shift, bnf_pf *pf, int nt)
{
    BNF_SIMD(norm_chunk_body)(p, q, n, mean, scale, shift, pf, nt);
}

#if BNF_T_FLOAT
/* Rows r0 .. r1 - 1 of bnf_norm_runs, not staged (float32: its loop in
 * bnfast_kernels_impl.h has the numbers): the loops here, each run through the inlined
 * bodies, not a call (and its dispatch) a run. */
BNF_SIMD_FN void BNF_SIMD(norm_runs_rows)(const T *x, ptrdiff_t xstride, ptrdiff_t xcs, T *y,
                                          ptrdiff_t ystride, ptrdiff_t ycs, ptrdiff_t r0,
                                          ptrdiff_t r1, ptrdiff_t nruns, ptrdiff_t len,
                                          ptrdiff_t k, const double *mean,
                                          const double *scale, const double *shift,
                                          const T *x_next, ptrdiff_t k_next,
                                          const double *tile_shift, double *s1, double *s2,
                                          bnf_pf *pf, bnf_pf *pf_next, int nt)
{
    ptrdiff_t kmax = k > k_next ? k : k_next;
    for (ptrdiff_t r = r0; r < r1; r++) {
        if (k_next == 1)
            bnf_pf_next_run_end(x_next, r, nruns, xstride * (ptrdiff_t)sizeof(T),
                                len * (ptrdiff_t)sizeof(T));
        for (ptrdiff_t c = 0; c < kmax; c++) {
            if (c < k_next)
                BNF_SIMD(shifted_sums_runs_body)(x_next + c * xcs + r * xstride, 1, xstride,
                                                 len, tile_shift[c], s1 + c * BNF_LANES,
                                                 s2 + c * BNF_LANES, NULL, pf_next);
            if (c < k) {
                const T *p = x + r * xstride + c * xcs;
                T *q = y + r * ystride + c * ycs;
                if (nt) {
                    bnf_prefetch_ends(c + 1 < k ? q + ycs : y + (r + 1) * ystride, len,
                                      sizeof(T), c + 1 < k || r + 1 < nruns);
                    BNF_SIMD(norm_chunk_body)(p, q, len, mean[c], scale[c], shift[c], pf, nt);
                    continue;
                }
                for (ptrdiff_t i0 = 0; i0 < len; i0 += BNF_CHUNK)
                    BNF_SIMD(norm_chunk_body)(p + i0, q + i0,
                                              len - i0 < BNF_CHUNK ? len - i0 : BNF_CHUNK,
                                              mean[c], scale[c], shift[c], pf, 0);
            }
        }
    }
}
#endif

/* Rows form (norm_rows_run of bnfast_kernels_impl.h): four rows at a time, the factors of
 * a pair of vectors loaded once for the four, and the four rows `ahead` below prefetched
 * as each line of columns is done (bnf_pf_quad: in address order on contiguous rows).
 * Rows one at a time (each line of the row `ahead` below prefetched as its columns are
 * done) only where a streamed output's rows are off a line, whose heads go alone.  A row
 * at a time, the factors' loads bounded the normalize in cache; four at a time, one
 * thread, float32, in one process (Zen 4): (1568, 64) eval 0.68x the time, training
 * 0.79-0.80x; (6272, 256) eval 0.75-0.84x, training 0.88-0.95x; the same with the
 * output 4 bytes off a line; from DRAM, (200704, 64) and (64, 28, 28, 256), 0.94-1.00x
 * (two threads 0.89-0.95x).  float16, whose conversions bound it, measured 1.04-1.07x
 * the time that way in cache ((1568, 64) eval and training): it goes four rows at a
 * time only streaming from cache (pf_rows == 0, rows on a line), as before.  Four rows
 * without the prefetch were 1.2-1.3x slower from DRAM.  A row's prefetches issued at
 * once (a cursor advanced per row) stalled the streaming stores (dx 1.29-1.40x). */
BNF_SIMD_FN void BNF_SIMD(norm_rows_run)(const T *x, ptrdiff_t xstride, T *q,
                                         ptrdiff_t qstride, ptrdiff_t k, ptrdiff_t n,
                                         const double *m, const double *a, const double *b,
                                         ptrdiff_t pf_rows, int nt)
{
    int far;
    ptrdiff_t r = 0,
              ahead = bnf_rows_ahead_pf(n * (ptrdiff_t)sizeof(T), BNF_L1_NORM, &far);
    int on_lines = !BNF_NT_HEAD(q) && qstride * (ptrdiff_t)sizeof(T) % BNF_NT_ALIGN == 0;
    /* nt == 2: streamed, rows one at a time (norm_rows_grouped_wide: four rows 16 KB
     * apart a step measured 1.2-1.6x the time on Zen 4) */
#if BNF_T_HALF
    int quads = pf_rows == 0 && nt == 1 && on_lines;    /* float16: as before (see above) */
#else
    int quads = nt != 2 && (!nt || on_lines);
#endif
    const T *p;
    T *o;
#define BNF_V(j)                                                                       \
    BNF_VFMA(BNF_VSUB(BNF_VLDT(p + (j)), BNF_VLD(m + (j))), BNF_VLD(a + (j)), BNF_VLD(b + (j)))
#define BNF_S(j) BNF_SE(norm_elem)(p[j], m[j], a[j], b[j])
#define BNF_VF(j, vm, va, vb) BNF_VFMA(BNF_VSUB(BNF_VLDT(p + (j)), vm), va, vb)
/* two vectors of columns from c of the four rows from p0, stored at o0 */
#define BNF_NORM_QUAD(c, stream)                                                          \
    do {                                                                                  \
        BNF_VD m0 = BNF_VLD(m + (c)), m1 = BNF_VLD(m + (c) + BNF_VW);                     \
        BNF_VD a0 = BNF_VLD(a + (c)), a1 = BNF_VLD(a + (c) + BNF_VW);                     \
        BNF_VD b0 = BNF_VLD(b + (c)), b1 = BNF_VLD(b + (c) + BNF_VW);                     \
        for (int i = 0; i < 4; i++) {                                                     \
            p = p0 + i * xstride;                                                         \
            BNF_VST2(o0 + i * qstride + (c), BNF_VF((c), m0, a0, b0),                     \
                     BNF_VF((c) + BNF_VW, m1, a1, b1), stream);                           \
        }                                                                                 \
    } while (0)
#define BNF_VM(j, k)                                                                   \
    BNF_VFMA(BNF_VSUB(BNF_VLDT_MASK(k, p + (j)), BNF_VLDM(k, m + (j))), BNF_VLDM(k, a + (j)), \
             BNF_VLDM(k, b + (j)))
    for (; quads && r + 4 <= k; r += 4) {
        const T *p0 = x + r * xstride, *pa = p0 + ahead * xstride;
        int pf = r + ahead + 4 <= pf_rows;
        T *o0 = q + r * qstride;
        ptrdiff_t c = 0;
        if (pf) BNF_PF_ENDS(pa, xstride, (const T *)NULL, 0, n, 4, far);
        /* streamed, the rows are on lines: whole lines of each (BNF_NT_END).  A chunk's
         * prefetches, then its columns by a loop whose stores are known (as dx) */
        ptrdiff_t ce = BNF_NT_END(o0, n, nt);
        for (ptrdiff_t c0 = 0; c0 + 2 * BNF_VW <= ce; c0 += BNF_PF_COLS) {
            ptrdiff_t c1 = ce - c0 < BNF_PF_COLS ? ce : c0 + BNF_PF_COLS;
            if (pf)
                BNF_FOR_LINES(l, c0, c1 - c0)
                    bnf_pf_quad(pa, xstride * (ptrdiff_t)sizeof(T), n * (ptrdiff_t)sizeof(T),
                                l * (ptrdiff_t)sizeof(T), far);
            if (nt)
                for (c = c0; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW) BNF_NORM_QUAD(c, 1);
            else
                for (c = c0; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW) BNF_NORM_QUAD(c, 0);
        }
        for (int i = 0; i < 4; i++) {
            ptrdiff_t cc = c;
            p = p0 + i * xstride;
            o = o0 + i * qstride;
            BNF_TAIL_ROWS(o, cc, n, nt);
        }
    }
    for (; r < k; r++) {
        const T *pa = x + (r + ahead) * xstride;
        int pf = r + ahead < pf_rows;
        ptrdiff_t c = 0;
        p = x + r * xstride;
        o = q + r * qstride;
        if (pf) BNF_PF_ENDS(pa, xstride, (const T *)NULL, 0, n, 1, far);
        BNF_HEAD(o, c, n, nt);
        /* a chunk's prefetches, then its columns by a loop without branches (as dx's) */
        const ptrdiff_t ce = BNF_NT_END(o, n, nt);
        while (c + 2 * BNF_VW <= ce) {
            ptrdiff_t c1 = ce - c < BNF_PF_COLS ? ce : c + BNF_PF_COLS;
            if (pf) BNF_FOR_LINES(l, c, c1 - c) BNF_PF_HINT(pa + l, far);
            if (nt)
                for (; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW)
                    BNF_VST2(o + c, BNF_V(c), BNF_V(c + BNF_VW), 1);
            else
                for (; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW)
                    BNF_VST2(o + c, BNF_V(c), BNF_V(c + BNF_VW), 0);
        }
        BNF_TAIL_ROWS(o, c, n, nt);
    }
#undef BNF_V
#undef BNF_S
#undef BNF_VM
#undef BNF_VF
#undef BNF_NORM_QUAD
}


#if BNF_ISA_LEVEL == 3 && !BNF_COMPENSATED
/* AVX2, sums without low parts: the 32 lanes of the three sums are 24 vectors, and AVX2
 * has 16 registers: gcc kept them on the stack, loaded and stored at every step (perf:
 * most of (16, 64, 14, 14) backward's sums).  So each run goes twice, half the lanes at
 * a time (12 registers), the second time from L1: each lane gets the same additions in
 * the same order (the bits of the body below).  Lanes h * BNF_NV / 2 vectors on, of the
 * run at g and p; the run's cursors advance in half 0. */
BNF_SIMD_FN inline BNF_INLINE void BNF_SIMD(bwd_sums_run_half)(
    const T *g, const T *p, ptrdiff_t len, BNF_VD vm, double mean, double *a1, double *a2,
    double *a3, bnf_pf *pfg, bnf_pf *pfx, const int h, const int fma_adds)
{
    enum { HV = BNF_NV / 2 };
    const ptrdiff_t lane0 = (ptrdiff_t)h * HV * BNF_VW;     /* the half's first lane */
    BNF_VD s1[HV], s2[HV], s3[HV], one = BNF_VSET1(1.0);
#define BNF_ACC(s, v) (fma_adds ? BNF_VFMA((v), one, (s)) : BNF_VADD((s), (v)))
    for (int v = 0; v < HV; v++) {
        s1[v] = BNF_VLD(a1 + lane0 + BNF_VW * v);
        s2[v] = BNF_VLD(a2 + lane0 + BNF_VW * v);
        s3[v] = BNF_VLD(a3 + lane0 + BNF_VW * v);
    }
    ptrdiff_t i = 0;
    for (ptrdiff_t b1; i + BNF_LANES <= len;) {
        b1 = BNF_SUMS_BLOCK_END(i, len);
        if (h == 0) {
            bnf_pf_advance(pfg, (b1 - i) * (ptrdiff_t)sizeof(T));
            bnf_pf_advance(pfx, (b1 - i) * (ptrdiff_t)sizeof(T));
        }
        for (; i < b1; i += BNF_LANES)
            for (int v = 0; v < HV; v++) {
                BNF_VD gi = BNF_VLDT(g + i + lane0 + BNF_VW * v);
                BNF_VD d = BNF_VSUB(BNF_VLDT(p + i + lane0 + BNF_VW * v), vm);
                s1[v] = BNF_ACC(s1[v], gi);
                s2[v] = BNF_VFMA(gi, d, s2[v]);
                s3[v] = BNF_ACC(s3[v], d);
            }
    }
    if (h == 0) {
        bnf_pf_advance(pfg, (len - i) * (ptrdiff_t)sizeof(T));
        bnf_pf_advance(pfx, (len - i) * (ptrdiff_t)sizeof(T));
    }
    /* the tail's whole vectors into the first lanes, then the rest a lane at a time */
    ptrdiff_t t = i;
    for (int v = 0; v < HV; v++) {
        ptrdiff_t o = t + lane0 + BNF_VW * v;
        if (o + BNF_VW <= len) {
            BNF_VD gi = BNF_VLDT(g + o), d = BNF_VSUB(BNF_VLDT(p + o), vm);
            s1[v] = BNF_ACC(s1[v], gi);
            s2[v] = BNF_VFMA(gi, d, s2[v]);
            s3[v] = BNF_ACC(s3[v], d);
        }
    }
    for (int v = 0; v < HV; v++) {
        BNF_VST(a1 + lane0 + BNF_VW * v, s1[v]);
        BNF_VST(a2 + lane0 + BNF_VW * v, s2[v]);
        BNF_VST(a3 + lane0 + BNF_VW * v, s3[v]);
    }
    i = t + (len - t) / BNF_VW * BNF_VW;
    for (ptrdiff_t l = i - t; i < len; i++, l++)
        if (l >= lane0 && l < lane0 + HV * BNF_VW)
            BNF_SE(bwd_elem)(g[i], p[i], mean, &a1[l], &a2[l], &a3[l], NULL, NULL);
#undef BNF_ACC
}
#endif

/* masked (AVX-512, float and double; runs that end in a partial vector): the tail as
 * whole vectors and one masked vector, the lanes kept in registers (as
 * shifted_sums_runs); else the tail's whole vectors, then the rest through the scalar
 * loop, the lanes stored and reloaded around it.  The same lanes and bits either way. */
BNF_SIMD_FN inline BNF_INLINE void BNF_SIMD(bwd_sums_runs_adds)(
    const T *dy, ptrdiff_t dystride, const T *x, ptrdiff_t xstride, ptrdiff_t nruns,
    ptrdiff_t len, double mean, double *a1, double *a2, double *a3, double *a1lo,
    double *a2lo, bnf_pf *pfg, bnf_pf *pfx, const int masked, const int fma_adds)
{
#if BNF_ISA_LEVEL == 3 && !BNF_COMPENSATED
    (void)a1lo;
    (void)a2lo;
    (void)masked;
    for (ptrdiff_t r = 0; r < nruns; r++) {
        const T *g = dy + r * dystride, *p = x + r * xstride;
        BNF_VD vm = BNF_VSET1(mean);
        BNF_SIMD(bwd_sums_run_half)(g, p, len, vm, mean, a1, a2, a3, pfg, pfx, 0, fma_adds);
        BNF_SIMD(bwd_sums_run_half)(g, p, len, vm, mean, a1, a2, a3, pfg, pfx, 1, fma_adds);
    }
    return;
#endif
    /* sum dy and sum (x - mean) by fused multiply-adds with 1 (exact: the bits of the
     * adds) where bnf_adds_as_fma: on Zen 4 the adds share their pipes with the
     * conversions, the multiply-adds do not (these sums took 0.80x the time in a C
     * harness, in L2; (64, 8, 28, 28) backward 0.96x); on an Intel Xeon (64, 256, 28,
     * 28) backward took 1.04x the time that way, in-cache ones 1.00-1.01x */
    BNF_VD s1[BNF_NV], s2[BNF_NV], s3[BNF_NV], vm = BNF_VSET1(mean), one = BNF_VSET1(1.0);
    BNF_VD e1[BNF_NV], e2[BNF_NV];   /* the low parts of s1, s2 (BNF_COMPENSATED) */
#define BNF_ACC(s, v) (fma_adds ? BNF_VFMA((v), one, (s)) : BNF_VADD((s), (v)))
    /* s1 and s2 updated by g and d: s1 += g, s2 += g d (compensated: bnf_two_sum, the
     * product rounded first) */
#if BNF_COMPENSATED
#define BNF_BWD_ACC(v, gi, d)                            \
    do {                                                 \
        BNF_VTWO_SUM(s1[v], e1[v], (gi));                \
        BNF_VTWO_SUM(s2[v], e2[v], BNF_VMUL((gi), (d))); \
    } while (0)
#else
#define BNF_BWD_ACC(v, gi, d)                  \
    do {                                       \
        s1[v] = BNF_ACC(s1[v], (gi));          \
        s2[v] = BNF_VFMA((gi), (d), s2[v]);    \
    } while (0)
#endif
    for (int v = 0; v < BNF_NV; v++) {
        s1[v] = BNF_VLD(a1 + BNF_VW * v);
        s2[v] = BNF_VLD(a2 + BNF_VW * v);
        s3[v] = BNF_VLD(a3 + BNF_VW * v);
        e1[v] = BNF_COMPENSATED ? BNF_VLD(a1lo + BNF_VW * v) : BNF_VZERO();
        e2[v] = BNF_COMPENSATED ? BNF_VLD(a2lo + BNF_VW * v) : BNF_VZERO();
    }
    for (ptrdiff_t r = 0; r < nruns; r++) {
        const T *g = dy + r * dystride;
        const T *p = x + r * xstride;
        ptrdiff_t i = 0;
        for (ptrdiff_t b1; i + BNF_LANES <= len;) {
            b1 = BNF_SUMS_BLOCK_END(i, len);
            bnf_pf_advance(pfg, (b1 - i) * (ptrdiff_t)sizeof(T));
            bnf_pf_advance(pfx, (b1 - i) * (ptrdiff_t)sizeof(T));
#if BNF_COMPENSATED
            /* a whole block: each lane's four elements as bwd_elem4 */
            if (b1 - i == BNF_SUMS_BLOCK) {
                for (int v = 0; v < BNF_NV; v++) {
                    const T *gq = g + i + BNF_VW * v, *pq = p + i + BNF_VW * v;
                    BNF_VD a0 = BNF_VLDT(gq), a1v = BNF_VLDT(gq + BNF_LANES);
                    BNF_VD a2v = BNF_VLDT(gq + 2 * BNF_LANES), a3v = BNF_VLDT(gq + 3 * BNF_LANES);
                    BNF_VD d0 = BNF_VSUB(BNF_VLDT(pq), vm);
                    BNF_VD d1 = BNF_VSUB(BNF_VLDT(pq + BNF_LANES), vm);
                    BNF_VD d2 = BNF_VSUB(BNF_VLDT(pq + 2 * BNF_LANES), vm);
                    BNF_VD d3 = BNF_VSUB(BNF_VLDT(pq + 3 * BNF_LANES), vm);
                    BNF_VTWO_SUM(s1[v], e1[v], BNF_VADD(BNF_VADD(a0, a1v), BNF_VADD(a2v, a3v)));
                    BNF_VTWO_SUM(s2[v], e2[v],
                                 BNF_VADD(BNF_VFMA(a0, d0, BNF_VMUL(a1v, d1)),
                                          BNF_VFMA(a2v, d2, BNF_VMUL(a3v, d3))));
                    s3[v] = BNF_VADD(s3[v], BNF_VADD(BNF_VADD(d0, d1), BNF_VADD(d2, d3)));
                }
                i = b1;
                continue;
            }
#endif
            for (; i < b1; i += BNF_LANES)
                for (int v = 0; v < BNF_NV; v++) {
                    BNF_VD gi = BNF_VLDT(g + i + BNF_VW * v);
                    BNF_VD d = BNF_VSUB(BNF_VLDT(p + i + BNF_VW * v), vm);
                    BNF_BWD_ACC(v, gi, d);
                    s3[v] = BNF_ACC(s3[v], d);
                }
        }
        bnf_pf_advance(pfg, (len - i) * (ptrdiff_t)sizeof(T));
        bnf_pf_advance(pfx, (len - i) * (ptrdiff_t)sizeof(T));
        /* the tail into the first lanes, as the scalar loop would: whole vectors, then
         * (masked) the rest as one masked vector (fma(g, 1, s) is s + g: a masked add),
         * else through the scalar loop.  Each vector of lanes is named by a constant, so
         * they stay in registers: indexed by a running count, they went through memory
         * (runs of 144 in blocks of 8 channels 0.169 -> 0.119 ns an element, of 784 0.118
         * -> 0.099, C harness, in L2; (4-8, 64, 28, 28) backward in cache 0.92x the
         * time, from DRAM 0.97-1.00x). */
        ptrdiff_t t = i;
        for (int v = 0; v < BNF_NV; v++) {
            ptrdiff_t o = t + BNF_VW * v;
            if (o + BNF_VW <= len) {
                BNF_VD gi = BNF_VLDT(g + o), d = BNF_VSUB(BNF_VLDT(p + o), vm);
                BNF_BWD_ACC(v, gi, d);
                s3[v] = BNF_ACC(s3[v], d);
            }
#if BNF_MASKED
            else if (masked && o < len) {
                __mmask8 k = (__mmask8)((1u << (len - o)) - 1);
                BNF_VD gi = BNF_VLDT_MASK(k, g + o);
                BNF_VD d = BNF_VSUB(BNF_VLDT_MASK(k, p + o), vm);
#if BNF_COMPENSATED
                BNF_VD t1 = s1[v], t1e = e1[v], t2 = s2[v], t2e = e2[v];
                BNF_VTWO_SUM(t1, t1e, gi);
                BNF_VTWO_SUM(t2, t2e, BNF_VMUL(gi, d));
                s1[v] = _mm512_mask_mov_pd(s1[v], k, t1);
                e1[v] = _mm512_mask_mov_pd(e1[v], k, t1e);
                s2[v] = _mm512_mask_mov_pd(s2[v], k, t2);
                e2[v] = _mm512_mask_mov_pd(e2[v], k, t2e);
#else
                s1[v] = _mm512_mask_add_pd(s1[v], k, s1[v], gi);
                s2[v] = _mm512_mask3_fmadd_pd(gi, d, s2[v], k);
#endif
                s3[v] = _mm512_mask_add_pd(s3[v], k, s3[v], d);
            }
#endif
        }
        i = t + (len - t) / BNF_VW * BNF_VW;
        if (!masked && i < len) {
            for (int v = 0; v < BNF_NV; v++) {
                BNF_VST(a1 + BNF_VW * v, s1[v]);
                BNF_VST(a2 + BNF_VW * v, s2[v]);
                BNF_VST(a3 + BNF_VW * v, s3[v]);
                if (BNF_COMPENSATED) {
                    BNF_VST(a1lo + BNF_VW * v, e1[v]);
                    BNF_VST(a2lo + BNF_VW * v, e2[v]);
                }
            }
            for (ptrdiff_t l = i - t; i < len; i++, l++)
                BNF_SE(bwd_elem)(g[i], p[i], mean, &a1[l], &a2[l], &a3[l], BNF_LO(a1lo, l),
                                 BNF_LO(a2lo, l));
            for (int v = 0; v < BNF_NV; v++) {
                s1[v] = BNF_VLD(a1 + BNF_VW * v);
                s2[v] = BNF_VLD(a2 + BNF_VW * v);
                s3[v] = BNF_VLD(a3 + BNF_VW * v);
                if (BNF_COMPENSATED) {
                    e1[v] = BNF_VLD(a1lo + BNF_VW * v);
                    e2[v] = BNF_VLD(a2lo + BNF_VW * v);
                }
            }
        }
    }
    for (int v = 0; v < BNF_NV; v++) {
        BNF_VST(a1 + BNF_VW * v, s1[v]);
        BNF_VST(a2 + BNF_VW * v, s2[v]);
        BNF_VST(a3 + BNF_VW * v, s3[v]);
        if (BNF_COMPENSATED) {
            BNF_VST(a1lo + BNF_VW * v, e1[v]);
            BNF_VST(a2lo + BNF_VW * v, e2[v]);
        }
    }
    (void)e1;
    (void)e2;
#undef BNF_ACC
#undef BNF_BWD_ACC
}

/* bwd_sums_runs_adds with bnf_adds_as_fma taken once a call, not tested at every vector:
 * a constant, the adds' form is compiled into each of the two loops.  Tested in the
 * loop, gcc kept it there (and AVX2 spilled sums to the stack around it). */
BNF_SIMD_FN inline BNF_INLINE void BNF_SIMD(bwd_sums_runs_body)(
    const T *dy, ptrdiff_t dystride, const T *x, ptrdiff_t xstride, ptrdiff_t nruns,
    ptrdiff_t len, double mean, double *a1, double *a2, double *a3, double *a1lo,
    double *a2lo, bnf_pf *pfg, bnf_pf *pfx, const int masked)
{
    if (bnf_adds_as_fma)
        BNF_SIMD(bwd_sums_runs_adds)(dy, dystride, x, xstride, nruns, len, mean, a1, a2, a3,
                                     a1lo, a2lo, pfg, pfx, masked, 1);
    else
        BNF_SIMD(bwd_sums_runs_adds)(dy, dystride, x, xstride, nruns, len, mean, a1, a2, a3,
                                     a1lo, a2lo, pfg, pfx, masked, 0);
}

#if BNF_MASKED
/* Runs that end in a partial vector (len % BNF_VW) take the masked tail, in a function
 * of their own: with that tail in bwd_sums_runs itself, (64, 256, 14, 14) backward
 * measured 0.79-0.82x the time but 28 x 28 runs (no partial vector) 1.07-1.09x from
 * DRAM.  So, one thread, float32, in one process against the scalar tail: (64, 256, 14,
 * 14) backward 0.91x, (64, 512, 14, 14) 0.94x, (16, 128, 14, 14) 0.88x; float64
 * 0.92-0.98x; two threads 0.91-0.97x; 28 x 28 1.00x. */
BNF_SIMD_FN BNF_NOINLINE void BNF_SIMD(bwd_sums_runs_masked)(
    const T *dy, ptrdiff_t dystride, const T *x, ptrdiff_t xstride, ptrdiff_t nruns,
    ptrdiff_t len, double mean, double *a1, double *a2, double *a3, double *a1lo, double *a2lo,
    bnf_pf *pfg, bnf_pf *pfx)
{
    BNF_SIMD(bwd_sums_runs_body)(dy, dystride, x, xstride, nruns, len, mean, a1, a2, a3, a1lo,
                                 a2lo, pfg, pfx, 1);
}
#endif

BNF_SIMD_FN void BNF_SIMD(bwd_sums_runs)(const T *dy, ptrdiff_t dystride, const T *x,
                                         ptrdiff_t xstride, ptrdiff_t nruns, ptrdiff_t len,
                                         double mean, double *a1, double *a2, double *a3,
                                         double *a1lo, double *a2lo, bnf_pf *pfg, bnf_pf *pfx)
{
#if BNF_MASKED
    if (len % BNF_VW) {
        BNF_SIMD(bwd_sums_runs_masked)(dy, dystride, x, xstride, nruns, len, mean, a1, a2, a3,
                                       a1lo, a2lo, pfg, pfx);
        return;
    }
#endif
    BNF_SIMD(bwd_sums_runs_body)(dy, dystride, x, xstride, nruns, len, mean, a1, a2, a3, a1lo,
                                 a2lo, pfg, pfx, 0);
}

/* The backward sums of k channels of runs, each channel on its own (bnf_bwd_runs_cached):
 * its lanes set, summed (bwd_sums_runs' body, inlined) and folded (bwd_lanes_out's sums)
 * here, the sums stored to sum_dy[c], sum_dy_xmu[c] and sum_xmu[c].  The same bits as
 * those two; one call a block, where a call and its dispatch a channel, and the lanes
 * handed through memory, were most of a channel of a few 7 x 7 runs. */
BNF_SIMD_FN void BNF_SIMD(bwd_sums_channels)(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs,
                                             const T *x, ptrdiff_t xstride, ptrdiff_t xcs,
                                             ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k,
                                             const double *mean, double *sum_dy,
                                             double *sum_dy_xmu, double *sum_xmu, bnf_pf *pf)
{
#if BNF_COMPENSATED
    /* four channels a group, their compensated folds side by side (sum_lanes_lo2_x4).
     * One thread, Zen 3 (AVX2), against a fold a channel, in one process: float64
     * (1, 1000, 7, 7) backward 0.79x the time (eval mode 0.76x), (2, 1000, 7, 7) 0.90x
     * (0.89x); 14 x 14 runs and (4, 512, 7, 7) 0.98-1.01x.  Training (tile_sums_channels)
     * 0.84x and 0.88x. */
    for (ptrdiff_t c0 = 0; c0 < k; c0 += 4) {
        ptrdiff_t g = k - c0 < 4 ? k - c0 : 4;
        BNF_ALIGN64 double a1[4][BNF_LANES] = {{0}}, a2[4][BNF_LANES] = {{0}},
                           a3[4][BNF_LANES] = {{0}};
        BNF_ALIGN64 double a1lo[4][BNF_LANES] = {{0}}, a2lo[4][BNF_LANES] = {{0}};
        BNF_ALIGN64 double hi[4], lo[4], hi2[4], lo2[4];
        for (ptrdiff_t j = 0; j < g; j++) {
            ptrdiff_t c = c0 + j;
#if BNF_MASKED
            if (len % BNF_VW)
                BNF_SIMD(bwd_sums_runs_body)(dy + c * dycs, dystride, x + c * xcs, xstride,
                                             nruns, len, mean[c], a1[j], a2[j], a3[j], a1lo[j],
                                             a2lo[j], pf, pf, 1);
            else
#endif
                BNF_SIMD(bwd_sums_runs_body)(dy + c * dycs, dystride, x + c * xcs, xstride,
                                             nruns, len, mean[c], a1[j], a2[j], a3[j], a1lo[j],
                                             a2lo[j], pf, pf, 0);
            sum_xmu[c] = bnf_sum_lanes(a3[j]);
        }
        if (g == 4)
            BNF_SIMD(sum_lanes_lo2_x4)(a1[0], a1lo[0], a2[0], a2lo[0], hi, lo, hi2, lo2);
        else
            for (ptrdiff_t j = 0; j < g; j++)
                bnf_sum_lanes_lo2(a1[j], a1lo[j], a2[j], a2lo[j], &hi[j], &lo[j], &hi2[j],
                                  &lo2[j]);
        for (ptrdiff_t j = 0; j < g; j++) {
            sum_dy[c0 + j] = bnf_fold_lo(hi[j], lo[j]);
            sum_dy_xmu[c0 + j] = bnf_fold_lo(hi2[j], lo2[j]);
        }
    }
#else
    for (ptrdiff_t c = 0; c < k; c++) {
        BNF_ALIGN64 double a1[BNF_LANES] = {0}, a2[BNF_LANES] = {0}, a3[BNF_LANES] = {0};
#if BNF_MASKED
        if (len % BNF_VW)
            BNF_SIMD(bwd_sums_runs_body)(dy + c * dycs, dystride, x + c * xcs, xstride, nruns,
                                         len, mean[c], a1, a2, a3, NULL, NULL, pf, pf, 1);
        else
#endif
            BNF_SIMD(bwd_sums_runs_body)(dy + c * dycs, dystride, x + c * xcs, xstride, nruns,
                                         len, mean[c], a1, a2, a3, NULL, NULL, pf, pf, 0);
        sum_dy[c] = bnf_sum_lanes(a1);
        sum_dy_xmu[c] = bnf_sum_lanes(a2);
        sum_xmu[c] = bnf_sum_lanes(a3);
    }
#endif
}

/* k channels of runs a row of them at a time (bnf_bwd_sums_runs), channel c's lanes at
 * a1 + c * BNF_LANES ..: the loops here, each run through the inlined body, not a call
 * (and its dispatch) a run. */
BNF_SIMD_FN inline BNF_INLINE void BNF_SIMD(bwd_sums_block_body)(
    const T *dy, ptrdiff_t dystride, ptrdiff_t dycs, const T *x, ptrdiff_t xstride,
    ptrdiff_t xcs, ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k, const double *mean,
    double *a1, double *a2, double *a3, double *a1lo, double *a2lo, bnf_pf *pfg, bnf_pf *pfx,
    const int masked)
{
    for (ptrdiff_t r = 0; r < nruns; r++)
        for (ptrdiff_t c = 0; c < k; c++)
            BNF_SIMD(bwd_sums_runs_body)(dy + r * dystride + c * dycs, dystride,
                                         x + r * xstride + c * xcs, xstride, 1, len, mean[c],
                                         a1 + c * BNF_LANES, a2 + c * BNF_LANES,
                                         a3 + c * BNF_LANES, BNF_LO(a1lo, c * BNF_LANES),
                                         BNF_LO(a2lo, c * BNF_LANES), pfg, pfx, masked);
}

#if BNF_MASKED
BNF_SIMD_FN BNF_NOINLINE void BNF_SIMD(bwd_sums_block_masked)(
    const T *dy, ptrdiff_t dystride, ptrdiff_t dycs, const T *x, ptrdiff_t xstride,
    ptrdiff_t xcs, ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k, const double *mean,
    double *a1, double *a2, double *a3, double *a1lo, double *a2lo, bnf_pf *pfg, bnf_pf *pfx)
{
    BNF_SIMD(bwd_sums_block_body)(dy, dystride, dycs, x, xstride, xcs, nruns, len, k, mean,
                                  a1, a2, a3, a1lo, a2lo, pfg, pfx, 1);
}
#endif

BNF_SIMD_FN void BNF_SIMD(bwd_sums_block)(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs,
                                          const T *x, ptrdiff_t xstride, ptrdiff_t xcs,
                                          ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k,
                                          const double *mean, double *a1, double *a2,
                                          double *a3, double *a1lo, double *a2lo, bnf_pf *pfg,
                                          bnf_pf *pfx)
{
#if BNF_MASKED
    if (len % BNF_VW) {
        BNF_SIMD(bwd_sums_block_masked)(dy, dystride, dycs, x, xstride, xcs, nruns, len, k,
                                        mean, a1, a2, a3, a1lo, a2lo, pfg, pfx);
        return;
    }
#endif
    BNF_SIMD(bwd_sums_block_body)(dy, dystride, dycs, x, xstride, xcs, nruns, len, k, mean,
                                  a1, a2, a3, a1lo, a2lo, pfg, pfx, 0);
}

/* One vector of columns c of one row into the backward sums (gi: dy, d: x - mean). */
#if BNF_COMPENSATED
#define BNF_ROW_SUMS(c, gi, d)                                                        \
    do {                                                                              \
        BNF_VTWO_SUM_AT(sum_dy + (c), sum_dy_lo + (c), gi);                           \
        BNF_VTWO_SUM_AT(sum_dy_xmu + (c), sum_dy_xmu_lo + (c), BNF_VMUL(gi, d));      \
        BNF_VST(sum_xmu + (c), BNF_VADD(BNF_VLD(sum_xmu + (c)), d));                  \
    } while (0)
#else
#define BNF_ROW_SUMS(c, gi, d)                                                        \
    do {                                                                              \
        BNF_VST(sum_dy + (c), BNF_VADD(BNF_VLD(sum_dy + (c)), gi));                   \
        BNF_VST(sum_dy_xmu + (c), BNF_VFMA(gi, d, BNF_VLD(sum_dy_xmu + (c))));        \
        BNF_VST(sum_xmu + (c), BNF_VADD(BNF_VLD(sum_xmu + (c)), d));                  \
    } while (0)
#endif
/* One vector of columns from c of the four rows g0-g3 (dy) and p0-p3 (x) added to the
 * sums; leaves a0-a3, the vectors of dy. */
#if BNF_COMPENSATED
#define BNF_SUMS_QUAD_ACC(c, t1, t2)                                                    \
    BNF_VTWO_SUM_AT(sum_dy + (c), sum_dy_lo + (c), t1);                                  \
    BNF_VTWO_SUM_AT(sum_dy_xmu + (c), sum_dy_xmu_lo + (c), t2)
#else
#define BNF_SUMS_QUAD_ACC(c, t1, t2)                                                    \
    BNF_VST(sum_dy + (c), BNF_VADD(BNF_VLD(sum_dy + (c)), t1));                          \
    BNF_VST(sum_dy_xmu + (c), BNF_VADD(BNF_VLD(sum_dy_xmu + (c)), t2))
#endif
#define BNF_SUMS_QUAD(c)                                                                 \
    BNF_VD m = BNF_VLD(mean + (c));                                                      \
    BNF_VD a0 = BNF_VLDT(g0 + (c)), a1 = BNF_VLDT(g1 + (c)), a2 = BNF_VLDT(g2 + (c)),      \
           a3 = BNF_VLDT(g3 + (c));                                                      \
    BNF_VD d0 = BNF_VSUB(BNF_VLDT(p0 + (c)), m), d1 = BNF_VSUB(BNF_VLDT(p1 + (c)), m),     \
           d2 = BNF_VSUB(BNF_VLDT(p2 + (c)), m), d3 = BNF_VSUB(BNF_VLDT(p3 + (c)), m);     \
    BNF_VD t1 = BNF_VADD(BNF_VADD(a0, a1), BNF_VADD(a2, a3));                            \
    BNF_VD t2 = BNF_VADD(BNF_VFMA(a0, d0, BNF_VMUL(a1, d1)),                             \
                         BNF_VFMA(a2, d2, BNF_VMUL(a3, d3)));                            \
    BNF_VD t3 = BNF_VADD(BNF_VADD(d0, d1), BNF_VADD(d2, d3));                            \
    BNF_SUMS_QUAD_ACC(c, t1, t2);                                                        \
    BNF_VST(sum_xmu + (c), BNF_VADD(BNF_VLD(sum_xmu + (c)), t3))
/* ... the columns from c under mask k (BNF_MASKED) */
#define BNF_SUMS_QUAD_MASKED(c, k)                                                        \
    BNF_VD m = BNF_VLDM(k, mean + (c));                                                  \
    BNF_VD a0 = BNF_VLDT_MASK(k, g0 + (c)), a1 = BNF_VLDT_MASK(k, g1 + (c)),              \
           a2 = BNF_VLDT_MASK(k, g2 + (c)), a3 = BNF_VLDT_MASK(k, g3 + (c));              \
    BNF_VD d0 = BNF_VSUB(BNF_VLDT_MASK(k, p0 + (c)), m),                                 \
           d1 = BNF_VSUB(BNF_VLDT_MASK(k, p1 + (c)), m),                                 \
           d2 = BNF_VSUB(BNF_VLDT_MASK(k, p2 + (c)), m),                                 \
           d3 = BNF_VSUB(BNF_VLDT_MASK(k, p3 + (c)), m);                                 \
    BNF_VD t1 = BNF_VADD(BNF_VADD(a0, a1), BNF_VADD(a2, a3));                            \
    BNF_VD t2 = BNF_VADD(BNF_VFMA(a0, d0, BNF_VMUL(a1, d1)),                             \
                         BNF_VFMA(a2, d2, BNF_VMUL(a3, d3)));                            \
    BNF_VD t3 = BNF_VADD(BNF_VADD(d0, d1), BNF_VADD(d2, d3));                            \
    BNF_VACC_MASK(sum_dy + (c), sum_dy_lo + (c), k, t1);                                 \
    BNF_VACC_MASK(sum_dy_xmu + (c), sum_dy_xmu_lo + (c), k, t2);                         \
    BNF_VSTM(sum_xmu + (c), k, BNF_VADD(BNF_VLDM(k, sum_xmu + (c)), t3))
/* The backward sums of 4 sp rows four at a time, quad i the rows i + j sp (j = 0-3):
 * bnf_sums_spacing.  No prefetches, no dx stored; the arithmetic of bwd_sums_rows' four
 * rows (below) in that order, in a loop of its own so that the four-row loop, which also
 * stores dx in cache, stays as it was. */
BNF_SIMD_FN BNF_NOINLINE void BNF_SIMD(bwd_sums_quads_spaced)(
    const T *dy, ptrdiff_t dystride, const T *x, ptrdiff_t xstride, ptrdiff_t sp,
    ptrdiff_t width, const double *mean, double *sum_dy, double *sum_dy_xmu, double *sum_xmu,
    double *sum_dy_lo, double *sum_dy_xmu_lo)
{
    const ptrdiff_t gq = sp * dystride, xq = sp * xstride;
    for (ptrdiff_t i = 0; i < sp; i++) {
        const T *g0 = dy + i * dystride, *g1 = g0 + gq, *g2 = g1 + gq, *g3 = g2 + gq;
        const T *p0 = x + i * xstride, *p1 = p0 + xq, *p2 = p1 + xq, *p3 = p2 + xq;
        ptrdiff_t c = 0;
        for (; c + BNF_VW <= width; c += BNF_VW) {
            BNF_SUMS_QUAD(c);
            (void)a0, (void)a1, (void)a2, (void)a3;
        }
#if BNF_MASKED
        if (c < width && bnf_masked_tails) {
            __mmask8 k = BNF_TAIL_MASK(width, c);
            BNF_SUMS_QUAD_MASKED(c, k);
            c = width;
        }
#endif
        for (; c < width; c++)
            BNF_SE(bwd_elem4)(g0[c], g1[c], g2[c], g3[c], p0[c], p1[c], p2[c], p3[c],
                              mean[c], &sum_dy[c], &sum_dy_xmu[c], &sum_xmu[c],
                              BNF_LO(sum_dy_lo, c), BNF_LO(sum_dy_xmu_lo, c));
    }
}
BNF_SIMD_FN void BNF_SIMD(bwd_sums_rows)(const T *dy, ptrdiff_t dystride, const T *x,
                                         ptrdiff_t xstride, ptrdiff_t nrows, ptrdiff_t width,
                                         const double *mean, double *sum_dy,
                                         double *sum_dy_xmu, double *sum_xmu, double *sum_dy_lo,
                                         double *sum_dy_xmu_lo, ptrdiff_t pf_rows, int near,
                                         const bnf_dx_fixed *fx)
{
    /* fx: dx = a * dy stored as dy is read (bnf_bwd_sums_dx_rows); streamed (fx->nt) a
     * line at a time in the rows read one at a time, plain elsewhere */
    T *q = fx ? (T *)fx->q : NULL;
    const double *fa = fx ? fx->a : NULL;
    ptrdiff_t qstride = fx ? fx->qstride : 0;
    int qnt = fx && fx->nt;
    ptrdiff_t r = 0, ahead = bnf_rows_ahead_by(width * (ptrdiff_t)sizeof(T),
                                                        BNF_FAR_ROWS_BYTES);
    ptrdiff_t nearby =
        near && width * (ptrdiff_t)sizeof(T) <= bnf_l1_rows_max[BNF_L1_REDUCE]
            ? bnf_rows_ahead_by(width * (ptrdiff_t)sizeof(T), BNF_NEAR_ROWS_BYTES)
            : 0;
    /* BNF_COMPENSATED (float64) keeps four rows at a time from DRAM too: a row at a time,
     * two more accumulators loaded and stored a row, (200704, 64) and (64, 28, 28, 256)
     * backward took 1.08-1.13x the time of the plain sums, four rows 1.01-1.04x */
    int rowwise = !BNF_COMPENSATED &&
                  bnf_sums_rowwise(width * (ptrdiff_t)sizeof(T), sizeof(T), near);
    ptrdiff_t quads_end = rowwise ? 0 : nrows;
    ptrdiff_t ahead1 = rowwise ? bnf_rows_ahead_by(width * (ptrdiff_t)sizeof(T),
                                                   BNF_ROWWISE_AHEAD_BYTES) : 0;
    /* storing dx as it goes (the eval-mode backward's one pass), the rows ahead go into
     * L2 as dx's own (bnf_rows_ahead_pf, BNF_L1_DX): on Zen 4, one thread, float32, 51
     * MB, in one process, against L1, four runs: (200704, 64) 1.47-1.66 -> 1.33-1.48x a
     * copy, (50176, 256) 1.47-1.56 -> 1.34-1.41x (16 KB ahead the same as 8) */
    const int far1 = q && width * (ptrdiff_t)sizeof(T) > bnf_l1_rows_max[BNF_L1_DX];
    const ptrdiff_t sp = bnf_sums_spacing(nrows, near, q != NULL, BNF_COMPENSATED);
    if (sp) {
        BNF_SIMD(bwd_sums_quads_spaced)(dy, dystride, x, xstride, sp, width, mean, sum_dy,
                                        sum_dy_xmu, sum_xmu, sum_dy_lo, sum_dy_xmu_lo);
        r = 4 * sp;
        quads_end = 0;
    }
    for (; r + 4 <= quads_end; r += 4) {
        const T *g0 = dy + r * dystride, *g1 = g0 + dystride, *g2 = g1 + dystride,
                *g3 = g2 + dystride, *ga = g0 + ahead * dystride,
                *gn = g0 + nearby * dystride;
        const T *p0 = x + r * xstride, *p1 = p0 + xstride, *p2 = p1 + xstride,
                *p3 = p2 + xstride, *pa = p0 + ahead * xstride, *pn = p0 + nearby * xstride;
        int pf = r + ahead + 4 <= pf_rows;
        ptrdiff_t c = 0;
        if (pf) {
            BNF_PF_ENDS(ga, dystride, pa, xstride, width, 4, 1);
            if (nearby) BNF_PF_ENDS(gn, dystride, pn, xstride, width, 4, 0);
        }
        /* a chunk's prefetches, then its columns by a loop without branches (with them
         * in it, gcc kept the eight row pointers on the stack and the loop ran at about
         * half the speed of a plain C loop of the same arithmetic in cache) */
        for (ptrdiff_t c0 = 0; c0 + BNF_VW <= width; c0 += BNF_PF_COLS) {
            ptrdiff_t c1 = width - c0 < BNF_PF_COLS ? width : c0 + BNF_PF_COLS;
            if (pf)
                BNF_FOR_LINES(l, c0, c1 - c0) {
                    bnf_pf_quad(ga, dystride * (ptrdiff_t)sizeof(T),
                                width * (ptrdiff_t)sizeof(T), l * (ptrdiff_t)sizeof(T), 1);
                    bnf_pf_quad(pa, xstride * (ptrdiff_t)sizeof(T),
                                width * (ptrdiff_t)sizeof(T), l * (ptrdiff_t)sizeof(T), 1);
                    if (nearby) {
                        bnf_pf_quad(gn, dystride * (ptrdiff_t)sizeof(T),
                                    width * (ptrdiff_t)sizeof(T), l * (ptrdiff_t)sizeof(T), 0);
                        bnf_pf_quad(pn, xstride * (ptrdiff_t)sizeof(T),
                                    width * (ptrdiff_t)sizeof(T), l * (ptrdiff_t)sizeof(T), 0);
                    }
                }
            if (q)
                for (c = c0; c + BNF_VW <= c1; c += BNF_VW) {
                    BNF_SUMS_QUAD(c);
                    BNF_VD va = BNF_VLD(fa + c);
                    T *o = q + r * qstride + c;
                    BNF_VSTT(o, BNF_VMUL(a0, va));
                    BNF_VSTT(o + qstride, BNF_VMUL(a1, va));
                    BNF_VSTT(o + 2 * qstride, BNF_VMUL(a2, va));
                    BNF_VSTT(o + 3 * qstride, BNF_VMUL(a3, va));
                }
            else
                for (c = c0; c + BNF_VW <= c1; c += BNF_VW) {
                    BNF_SUMS_QUAD(c);
                    (void)a0, (void)a1, (void)a2, (void)a3;
                }
        }
#if BNF_MASKED
        if (c < width && bnf_masked_tails) {
            __mmask8 k = BNF_TAIL_MASK(width, c);
            BNF_SUMS_QUAD_MASKED(c, k);
            if (q) {
                BNF_VD va = BNF_VLDM(k, fa + c);
                T *o = q + r * qstride + c;
                BNF_VSTT_MASK(o, k, BNF_VMUL(a0, va));
                BNF_VSTT_MASK(o + qstride, k, BNF_VMUL(a1, va));
                BNF_VSTT_MASK(o + 2 * qstride, k, BNF_VMUL(a2, va));
                BNF_VSTT_MASK(o + 3 * qstride, k, BNF_VMUL(a3, va));
            }
            c = width;
        }
#endif
        for (; c < width; c++) {
            if (q) {
                T *o = q + r * qstride + c;       /* dy read before it (out=dy) */
                T d0 = BNF_SE(dx_fixed_elem)(g0[c], fa[c]);
                T d1 = BNF_SE(dx_fixed_elem)(g1[c], fa[c]);
                T d2 = BNF_SE(dx_fixed_elem)(g2[c], fa[c]);
                T d3 = BNF_SE(dx_fixed_elem)(g3[c], fa[c]);
                BNF_SE(bwd_elem4)(g0[c], g1[c], g2[c], g3[c], p0[c], p1[c], p2[c], p3[c],
                                  mean[c], &sum_dy[c], &sum_dy_xmu[c], &sum_xmu[c],
                                  BNF_LO(sum_dy_lo, c), BNF_LO(sum_dy_xmu_lo, c));
                o[0] = d0, o[qstride] = d1, o[2 * qstride] = d2, o[3 * qstride] = d3;
                continue;
            }
            BNF_SE(bwd_elem4)(g0[c], g1[c], g2[c], g3[c], p0[c], p1[c], p2[c], p3[c],
                              mean[c], &sum_dy[c], &sum_dy_xmu[c], &sum_xmu[c],
                              BNF_LO(sum_dy_lo, c), BNF_LO(sum_dy_xmu_lo, c));
        }
    }
    /* the rows left over, or all of them (rowwise: prefetching): the lines that start in
     * columns [c, c + span) of the rows ahead */
#define BNF_ROW_PF(c, span)                                                              \
    do {                                                                                 \
        if (pf && far1)                                                                  \
            BNF_FOR_LINES(l, c, span) {                                                  \
                BNF_PREFETCH_FAR(ga + l);                                                \
                BNF_PREFETCH_FAR(pa + l);                                                \
            }                                                                            \
        else if (pf)                                                                     \
            BNF_FOR_LINES(l, c, span) {                                                  \
                BNF_PREFETCH(ga + l);                                                    \
                BNF_PREFETCH(pa + l);                                                    \
            }                                                                            \
    } while (0)
    for (; r < nrows; r++) {
        const T *g = dy + r * dystride, *ga = g + ahead1 * dystride;
        const T *p = x + r * xstride, *pa = p + ahead1 * xstride;
        int pf = rowwise && r + ahead1 < pf_rows;
        ptrdiff_t c = 0;
        T *o = q ? q + r * qstride : NULL;
        if (pf) BNF_PF_ENDS(ga, dystride, pa, xstride, width, 1, far1);
        if (o && qnt) {
            /* to o's first line alone, then a line (two vectors) at a time, streamed */
            for (; c < width && BNF_NT_HEAD(o + c); c++) {
                T dxc = BNF_SE(dx_fixed_elem)(g[c], fa[c]);
                BNF_SE(bwd_elem)(g[c], p[c], mean[c], &sum_dy[c], &sum_dy_xmu[c], &sum_xmu[c],
                                 BNF_LO(sum_dy_lo, c), BNF_LO(sum_dy_xmu_lo, c));
                o[c] = dxc;
            }
            const ptrdiff_t nt_end = BNF_NT_END(o, width, 1);
            while (c + 2 * BNF_VW <= nt_end) {
                ptrdiff_t c1 = nt_end - c < BNF_PF_COLS ? nt_end : c + BNF_PF_COLS;
                BNF_ROW_PF(c, c1 - c);
                for (; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW) {
                    BNF_VD g0 = BNF_VLDT(g + c),
                           d0 = BNF_VSUB(BNF_VLDT(p + c), BNF_VLD(mean + c));
                    BNF_VD g1 = BNF_VLDT(g + c + BNF_VW),
                           d1 = BNF_VSUB(BNF_VLDT(p + c + BNF_VW), BNF_VLD(mean + c + BNF_VW));
                    BNF_ROW_SUMS(c, g0, d0);
                    BNF_ROW_SUMS(c + BNF_VW, g1, d1);
                    BNF_VSTNT2(o + c, BNF_VMUL(g0, BNF_VLD(fa + c)),
                               BNF_VMUL(g1, BNF_VLD(fa + c + BNF_VW)));
                }
            }
        }
        /* a chunk's prefetches, then its vectors by a loop without branches, as the
         * four-row loops above (Zen 3, float32, the eval-mode backward's one pass, which
         * streams dx here: (64, 28, 28, 256) 0.84-0.93x the time, the same bits) */
        while (c + BNF_VW <= width) {
            ptrdiff_t c1 = width - c < BNF_PF_COLS ? width : c + BNF_PF_COLS;
            BNF_ROW_PF(c, c1 - c);
            if (o)
                for (; c + BNF_VW <= c1; c += BNF_VW) {
                    BNF_VD gi = BNF_VLDT(g + c),
                           d = BNF_VSUB(BNF_VLDT(p + c), BNF_VLD(mean + c));
                    BNF_ROW_SUMS(c, gi, d);
                    BNF_VSTT(o + c, BNF_VMUL(gi, BNF_VLD(fa + c)));
                }
            else
                for (; c + BNF_VW <= c1; c += BNF_VW) {
                    BNF_VD gi = BNF_VLDT(g + c),
                           d = BNF_VSUB(BNF_VLDT(p + c), BNF_VLD(mean + c));
                    BNF_ROW_SUMS(c, gi, d);
                }
        }
#if BNF_MASKED
        if (c < width && bnf_masked_tails) {
            __mmask8 k = BNF_TAIL_MASK(width, c);
            BNF_VD gi = BNF_VLDT_MASK(k, g + c);
            BNF_VD d = BNF_VSUB(BNF_VLDT_MASK(k, p + c), BNF_VLDM(k, mean + c));
#if BNF_COMPENSATED
            BNF_VACC_MASK(sum_dy + c, sum_dy_lo + c, k, gi);
            BNF_VACC_MASK(sum_dy_xmu + c, sum_dy_xmu_lo + c, k, BNF_VMUL(gi, d));
#else
            BNF_VSTM(sum_dy + c, k, BNF_VADD(BNF_VLDM(k, sum_dy + c), gi));
            BNF_VSTM(sum_dy_xmu + c, k, BNF_VFMA(gi, d, BNF_VLDM(k, sum_dy_xmu + c)));
#endif
            BNF_VSTM(sum_xmu + c, k, BNF_VADD(BNF_VLDM(k, sum_xmu + c), d));
            if (o) BNF_VSTT_MASK(o + c, k, BNF_VMUL(gi, BNF_VLDM(k, fa + c)));
            c = width;
        }
#endif
        for (; c < width; c++) {
            T dxc = o ? BNF_SE(dx_fixed_elem)(g[c], fa[c]) : 0;
            BNF_SE(bwd_elem)(g[c], p[c], mean[c], &sum_dy[c], &sum_dy_xmu[c], &sum_xmu[c],
                             BNF_LO(sum_dy_lo, c), BNF_LO(sum_dy_xmu_lo, c));
            if (o) o[c] = dxc;
        }
    }
#undef BNF_ROW_PF
#undef BNF_ROW_SUMS
#undef BNF_SUMS_QUAD
#undef BNF_SUMS_QUAD_ACC
#undef BNF_SUMS_QUAD_MASKED
}

BNF_SIMD_FN void BNF_SIMD(dx_chunk)(const T *g, const T *p, T *q, ptrdiff_t n, double mean,
                                    double a, double k1, double k2, bnf_pf *pfg, bnf_pf *pfx,
                                    int nt)
{
    BNF_VD vm = BNF_VSET1(mean), va = BNF_VSET1(a), v1 = BNF_VSET1(k1), v2 = BNF_VSET1(k2);
    ptrdiff_t i = 0;
    /* with_x: p given; a constant of its own in each loop below (shadowing this one), so
     * that none of them tests it (nor nt) per pair of vectors, as they did */
    const int with_x = p != NULL;
#define BNF_V(j)                                                                           \
    (with_x ? BNF_VMUL(va, BNF_VFNMA(BNF_VSUB(BNF_VLDT(p + (j)), vm), v2,                 \
                                     BNF_VSUB(BNF_VLDT(g + (j)), v1)))                    \
            : BNF_VMUL(BNF_VLDT(g + (j)), va))
#define BNF_S(j) \
    (with_x ? BNF_SE(dx_elem)(g[j], p[j], mean, a, k1, k2) : BNF_SE(dx_fixed_elem)(g[j], a))
#define BNF_VM(j, k)                                                                     \
    (with_x ? BNF_VMUL(va, BNF_VFNMA(BNF_VSUB(BNF_VLDT_MASK(k, p + (j)), vm), v2,       \
                                     BNF_VSUB(BNF_VLDT_MASK(k, g + (j)), v1)))          \
            : BNF_VMUL(BNF_VLDT_MASK(k, g + (j)), va))
#define BNF_DX_ADVANCE                                           \
    (bnf_pf_advance(pfg, (b1 - b0) * (ptrdiff_t)sizeof(T)),     \
     bnf_pf_advance(pfx, (b1 - b0) * (ptrdiff_t)sizeof(T)))
    BNF_HEAD_RUN(q, i, n, nt);
    if (with_x && nt) {
        const int with_x = 1;
        BNF_RUN_BLOCKS(q, i, n, 1, BNF_DX_ADVANCE);
    } else if (with_x) {
        const int with_x = 1;
        BNF_RUN_BLOCKS(q, i, n, 0, BNF_DX_ADVANCE);
    } else if (nt) {
        const int with_x = 0;
        BNF_RUN_BLOCKS(q, i, n, 1, BNF_DX_ADVANCE);
    } else {
        const int with_x = 0;
        BNF_RUN_BLOCKS(q, i, n, 0, BNF_DX_ADVANCE);
    }
    BNF_TAIL_RUN(q, i, n, nt);
#undef BNF_DX_ADVANCE
#undef BNF_V
#undef BNF_S
#undef BNF_VM
}

/* dx of k channels of runs of at most BNF_CHUNK elements in cache, not streamed
 * (bnf_bwd_runs_cached): each run through dx_chunk called here, not dispatched run by
 * run (dx_run); the same bits. */
BNF_SIMD_FN void BNF_SIMD(dx_runs_rows)(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs,
                                        const T *x, ptrdiff_t xstride, ptrdiff_t xcs, T *dx,
                                        ptrdiff_t dxstride, ptrdiff_t dxcs, ptrdiff_t nruns,
                                        ptrdiff_t len, ptrdiff_t k, const double *mean,
                                        const double *a, const double *k1, const double *k2,
                                        bnf_pf *pf)
{
    for (ptrdiff_t r = 0; r < nruns; r++)
        for (ptrdiff_t c = 0; c < k; c++)
            BNF_SIMD(dx_chunk)(dy + r * dystride + c * dycs,
                               x ? x + r * xstride + c * xcs : NULL,
                               dx + r * dxstride + c * dxcs, len, mean[c], a[c], k1[c], k2[c],
                               pf, pf, 0);
}

/* Rows form (dx_rows_run of bnfast_kernels_impl.h): four rows at a time and rows in order
 * as norm_rows_run (streaming from cache on 64-wide rows 0.88-1.00 -> 0.83-0.88x a copy;
 * from DRAM 1.29-1.44 -> 1.12-1.20x, where a copy of x and dy into dx takes 1.03-1.06x).
 * Four rows at a time with plain stores and prefetching too, against rows in order, one
 * thread, float32, in one process: (1568, 64) backward 0.91-0.94x the time, (6272, 256)
 * 0.87-0.95x, (20000, 72) 0.95-0.97x; from DRAM, (200704, 64) and (64, 28, 28, 256),
 * 0.98-1.03x (two builds of one source 0.98-1.03x apart); the same with the arrays 4 or
 * 48 bytes further off a line. */
BNF_SIMD_FN void BNF_SIMD(dx_rows_run)(const T *g, ptrdiff_t gstride, const T *x,
                                       ptrdiff_t xstride, T *q, ptrdiff_t qstride, ptrdiff_t k,
                                       ptrdiff_t n, const double *m, const double *a,
                                       const double *k1, const double *k2, ptrdiff_t pf_rows,
                                       int nt)
{
    int far;
    ptrdiff_t r = 0,
              ahead = bnf_rows_ahead_pf(n * (ptrdiff_t)sizeof(T), BNF_L1_DX, &far);
    /* nt == 2: streamed, rows one at a time (bwd_dx_rows_grouped_wide, bnf_dx_nt) */
    int quads = nt != 2 &&
                (!nt || (!BNF_NT_HEAD(q) && qstride * (ptrdiff_t)sizeof(T) % BNF_NT_ALIGN == 0));
    const T *gr, *p;
    T *o;
#define BNF_V(j)                                                                           \
    (p ? BNF_VMUL(BNF_VLD(a + (j)),                                                       \
                  BNF_VFNMA(BNF_VSUB(BNF_VLDT(p + (j)), BNF_VLD(m + (j))), BNF_VLD(k2 + (j)), \
                            BNF_VSUB(BNF_VLDT(gr + (j)), BNF_VLD(k1 + (j)))))             \
       : BNF_VMUL(BNF_VLDT(gr + (j)), BNF_VLD(a + (j))))
#define BNF_S(j)                                                         \
    (p ? BNF_SE(dx_elem)(gr[j], p[j], m[j], a[j], k1[j], k2[j])        \
       : BNF_SE(dx_fixed_elem)(gr[j], a[j]))
#define BNF_VM(j, kk)                                                                      \
    (p ? BNF_VMUL(BNF_VLDM(kk, a + (j)),                                                  \
                  BNF_VFNMA(BNF_VSUB(BNF_VLDT_MASK(kk, p + (j)), BNF_VLDM(kk, m + (j))),   \
                            BNF_VLDM(kk, k2 + (j)),                                       \
                            BNF_VSUB(BNF_VLDT_MASK(kk, gr + (j)), BNF_VLDM(kk, k1 + (j))))) \
       : BNF_VMUL(BNF_VLDT_MASK(kk, gr + (j)), BNF_VLDM(kk, a + (j))))
/* BNF_V with x given, and without */
#define BNF_VX(j)                                                                          \
    BNF_VMUL(BNF_VLD(a + (j)),                                                            \
             BNF_VFNMA(BNF_VSUB(BNF_VLDT(p + (j)), BNF_VLD(m + (j))), BNF_VLD(k2 + (j)),  \
                       BNF_VSUB(BNF_VLDT(gr + (j)), BNF_VLD(k1 + (j)))))
#define BNF_VFIXED(j) BNF_VMUL(BNF_VLDT(gr + (j)), BNF_VLD(a + (j)))
#define BNF_VF(j, va, v1, vm, v2)                                                  \
    BNF_VMUL(va,                                                                   \
             BNF_VFNMA(BNF_VSUB(BNF_VLDT(p + (j)), vm), v2, BNF_VSUB(BNF_VLDT(gr + (j)), v1)))
/* two vectors of columns from c of the four rows from g0 (and p0), stored at o0 */
#define BNF_DX_QUAD(c, stream)                                                             \
    do {                                                                                   \
        BNF_VD a0 = BNF_VLD(a + (c)), a1 = BNF_VLD(a + (c) + BNF_VW);                      \
        BNF_VD f0 = BNF_VLD(k1 + (c)), f1 = BNF_VLD(k1 + (c) + BNF_VW);                    \
        BNF_VD m0 = BNF_VLD(m + (c)), m1 = BNF_VLD(m + (c) + BNF_VW);                      \
        BNF_VD h0 = BNF_VLD(k2 + (c)), h1 = BNF_VLD(k2 + (c) + BNF_VW);                    \
        for (int i = 0; i < 4; i++) {                                                      \
            gr = g0 + i * gstride;                                                         \
            p = p0 + i * xstride;                                                          \
            BNF_VST2(o0 + i * qstride + (c), BNF_VF((c), a0, f0, m0, h0),                  \
                     BNF_VF((c) + BNF_VW, a1, f1, m1, h1), stream);                        \
        }                                                                                  \
    } while (0)
#define BNF_DX_FIXED_QUAD(c, stream)                                                       \
    do {                                                                                   \
        BNF_VD a0 = BNF_VLD(a + (c)), a1 = BNF_VLD(a + (c) + BNF_VW);                      \
        for (int i = 0; i < 4; i++) {                                                      \
            gr = g0 + i * gstride;                                                         \
            BNF_VST2(o0 + i * qstride + (c), BNF_VMUL(BNF_VLDT(gr + (c)), a0),             \
                     BNF_VMUL(BNF_VLDT(gr + (c) + BNF_VW), a1), stream);                   \
        }                                                                                  \
    } while (0)
    for (; quads && r + 4 <= k; r += 4) {
        const T *g0 = g + r * gstride, *p0 = x ? x + r * xstride : NULL;
        const T *ga = g0 + ahead * gstride, *pa = p0 ? p0 + ahead * xstride : NULL;
        int pf = r + ahead + 4 <= pf_rows;
        T *o0 = q + r * qstride;
        ptrdiff_t c = 0;
        if (pf) BNF_PF_ENDS(ga, gstride, pa, xstride, n, 4, far);
        /* streamed, the rows are on lines: whole lines of each (BNF_NT_END).  A chunk's
         * prefetches, then its columns by a loop whose stores are known (as the sums) */
        ptrdiff_t ce = BNF_NT_END(o0, n, nt);
        for (ptrdiff_t c0 = 0; c0 + 2 * BNF_VW <= ce; c0 += BNF_PF_COLS) {
            ptrdiff_t c1 = ce - c0 < BNF_PF_COLS ? ce : c0 + BNF_PF_COLS;
            if (pf)
                BNF_FOR_LINES(l, c0, c1 - c0) {
                    bnf_pf_quad(ga, gstride * (ptrdiff_t)sizeof(T), n * (ptrdiff_t)sizeof(T),
                                l * (ptrdiff_t)sizeof(T), far);
                    if (pa)
                        bnf_pf_quad(pa, xstride * (ptrdiff_t)sizeof(T),
                                    n * (ptrdiff_t)sizeof(T), l * (ptrdiff_t)sizeof(T), far);
                }
            if (p0 && nt)
                for (c = c0; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW) BNF_DX_QUAD(c, 1);
            else if (p0)
                for (c = c0; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW) BNF_DX_QUAD(c, 0);
            else if (nt)
                for (c = c0; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW) BNF_DX_FIXED_QUAD(c, 1);
            else
                for (c = c0; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW) BNF_DX_FIXED_QUAD(c, 0);
        }
        for (int i = 0; i < 4; i++) {
            ptrdiff_t cc = c;
            gr = g0 + i * gstride;
            p = p0 ? p0 + i * xstride : NULL;
            o = o0 + i * qstride;
            BNF_TAIL_ROWS(o, cc, n, nt);
        }
    }
    for (; r < k; r++) {
        const T *ga = g + (r + ahead) * gstride, *pa = x ? x + (r + ahead) * xstride : NULL;
        int pf = r + ahead < pf_rows;
        ptrdiff_t c = 0;
        gr = g + r * gstride;
        p = x ? x + r * xstride : NULL;
        o = q + r * qstride;
        if (pf) BNF_PF_ENDS(ga, gstride, pa, xstride, n, 1, far);
        BNF_HEAD(o, c, n, nt);
        /* a chunk's prefetches, then its columns by a loop without branches (as the
         * quads above) */
        const ptrdiff_t ce = BNF_NT_END(o, n, nt);
        while (c + 2 * BNF_VW <= ce) {
            ptrdiff_t c1 = ce - c < BNF_PF_COLS ? ce : c + BNF_PF_COLS;
            if (pf)
                BNF_FOR_LINES(l, c, c1 - c) {
                    BNF_PF_HINT(ga + l, far);
                    if (pa) BNF_PF_HINT(pa + l, far);
                }
            if (p && nt)
                for (; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW)
                    BNF_VST2(o + c, BNF_VX(c), BNF_VX(c + BNF_VW), 1);
            else if (p)
                for (; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW)
                    BNF_VST2(o + c, BNF_VX(c), BNF_VX(c + BNF_VW), 0);
            else if (nt)
                for (; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW)
                    BNF_VST2(o + c, BNF_VFIXED(c), BNF_VFIXED(c + BNF_VW), 1);
            else
                for (; c + 2 * BNF_VW <= c1; c += 2 * BNF_VW)
                    BNF_VST2(o + c, BNF_VFIXED(c), BNF_VFIXED(c + BNF_VW), 0);
        }
        BNF_TAIL_ROWS(o, c, n, nt);
    }
#undef BNF_V
#undef BNF_S
#undef BNF_VM
#undef BNF_VF
#undef BNF_VX
#undef BNF_VFIXED
#undef BNF_DX_QUAD
#undef BNF_DX_FIXED_QUAD
}

#undef BNF_NV
#undef BNF_SUMS_BLOCK
#undef BNF_SUMS_BLOCK_END
#undef BNF_VTWO_SUM
#undef BNF_VTWO_SUM_AT
#undef BNF_VACC_MASK
#undef BNF_VLDM
#undef BNF_VSTM
#undef BNF_TAIL_MASK
#undef BNF_TAIL_ROWS
#undef BNF_TAIL_MASKED
#undef BNF_HEAD_RUN
#undef BNF_TAIL_RUN
#undef BNF_LINE_ELEMS
#undef BNF_SPAN_MASK
#undef BNF_VSQ_ACC
#undef BNF_VSQ_ACC_MASK
#undef BNF_LINE_COLS
#undef BNF_FOR_LINES
#undef BNF_PF_ENDS
#undef BNF_SIMD
#undef BNF_SE
#undef BNF_ISA
#undef BNF_SIMD_FN
#undef BNF_VW
#undef BNF_VD
#undef BNF_VSET1
#undef BNF_VZERO
#undef BNF_VADD
#undef BNF_VSUB
#undef BNF_VMUL
#undef BNF_VFMA
#undef BNF_VFNMA
#undef BNF_MASKED
#undef BNF_VLDT_MASK
#undef BNF_VSTT_MASK
#undef BNF_VLD
#undef BNF_VST
#undef BNF_VLDT
#undef BNF_VSTT
#undef BNF_VSTNT2
#undef BNF_HCVT
#undef BNF_VST2
#undef BNF_NT_HEAD
#undef BNF_NT_ALIGN
#undef BNF_HEAD
#undef BNF_TAIL
#undef BNF_PAIRS
#undef BNF_RUN_BLOCKS
#undef BNF_NT_END

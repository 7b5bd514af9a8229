/* Kernel bodies, included once per element type by bnfast_kernels.c with T (element
 * type), S (name suffix), BNF_TO_D, BNF_FROM_D, BNF_T_FLOAT, BNF_T_HALF,
 * BNF_REDO_RATIO and BNF_COMPENSATED defined; undefined again at the end. */

#define BNF_CAT2(a, b) a##_##b
#define BNF_CAT(a, b) BNF_CAT2(a, b)
#define BNF_NAME(n) BNF_CAT(n, S)

#define BNF_ELEM(n) BNF_NAME(n)
#define BNF_ELEM_FN static inline BNF_INLINE
#include "bnfast_kernels_elem.h"
#undef BNF_ELEM
#undef BNF_ELEM_FN

/* Element i of a compensation array (the low parts of compensated sums, BNF_COMPENSATED);
 * for the other types, which keep none, NULL. */
#if BNF_COMPENSATED
#define BNF_LO(a, i) (&(a)[i])
#else
#define BNF_LO(a, i) ((double *)0)
#endif
/* s += v, compensated into lo where BNF_COMPENSATED (bnf_two_sum); else plain, lo kept 0 */
#if BNF_COMPENSATED
#define BNF_ADD_LO(s, lo, v) bnf_two_sum(&(s), &(lo), (v))
#else
#define BNF_ADD_LO(s, lo, v) ((s) += (v))
#endif

/* The intrinsics loops (bnfast_kernels_simd.h) and the dispatch between them and the
 * plain loops below: BNF_DISPATCH(name, args) calls name_v4, name_v3 or name;
 * BNF_DISPATCH4 (normalize) the same, but name_v3 for float and double only where
 * bnf_norm_v3 (by CPU vendor), else the plain loop.  float16 always takes its AVX2
 * normalize: its plain loop converts element by element. */
#if BNF_SIMD_X86
#define BNF_ISA_LEVEL 4
#include "bnfast_kernels_simd.h"
#undef BNF_ISA_LEVEL
#define BNF_ISA_LEVEL 3
#include "bnfast_kernels_simd.h"
#undef BNF_ISA_LEVEL
#define BNF_DISPATCH(n, ...)                                                              \
    (bnf_simd_level == 4   ? BNF_NAME(n##_v4)(__VA_ARGS__)                                \
     : bnf_simd_level == 3 ? BNF_NAME(n##_v3)(__VA_ARGS__)                                \
                           : BNF_NAME(n)(__VA_ARGS__))
#if BNF_T_HALF
#define BNF_DISPATCH4 BNF_DISPATCH
#define BNF_NORM_NT BNF_DIRECT_NT(4)
#else
#define BNF_DISPATCH4(n, ...)                                                           \
    (bnf_simd_level == 4                  ? BNF_NAME(n##_v4)(__VA_ARGS__)                 \
     : bnf_simd_level == 3 && bnf_norm_v3 ? BNF_NAME(n##_v3)(__VA_ARGS__)                 \
                                          : BNF_NAME(n)(__VA_ARGS__))
/* whether the normalize runs an intrinsics loop that streams from the registers (the
 * plain loop computes a chunk into L1 for bnf_stream to copy out) */
#define BNF_NORM_NT (BNF_DIRECT_NT(4) || (bnf_simd_level == 3 && bnf_norm_v3))
#endif
#else
#define BNF_DISPATCH(n, ...) BNF_NAME(n)(__VA_ARGS__)
#define BNF_DISPATCH4(n, ...) BNF_NAME(n)(__VA_ARGS__)
#define BNF_NORM_NT 0
#endif

/* A tile's sums around a shift are taken again around the tile's own mean where the
 * first pass lost too much to cancellation (sd^2 / n > BNF_REDO_RATIO * sdd), and where
 * its squares overflowed but its sum did not: float64 data far from the shift (an
 * outlier first in a channel, |x - shift| above ~1e154) whose variance is finite, where
 * inf - inf made m2 NaN (and bnf_m2_fix would call it inf). */
#define BNF_TILE_REDO(sd, sdd, n) \
    ((sd) * (sd) > BNF_REDO_RATIO * (n) * (sdd) || ((sdd) == INFINITY && (sd) - (sd) == 0))

/* Sums of d = x - shift and d^2 over `nruns` runs of `len` contiguous elements, into
 * the lanes s1 and s2 (BNF_LANES each, accumulated into; s2lo the low parts of s2 where
 * BNF_COMPENSATED, else NULL).  Lane l takes the elements at positions l, l+L, ... of
 * each run, whatever the vector width, so the summation order is fixed. */
static inline BNF_INLINE void BNF_NAME(shifted_sums_runs)(const T *x, ptrdiff_t nruns,
                                                         ptrdiff_t stride, ptrdiff_t len,
                                                         double shift, double *s1,
                                                         double *s2, double *s2lo,
                                                         bnf_pf *pf)
{
    for (ptrdiff_t r = 0; r < nruns; r++) {
        const T *p = x + r * stride;
        ptrdiff_t i = 0;
#if BNF_COMPENSATED
        /* four steps at a time, a lane's four elements as sums_elem4 (one compensated add
         * for four: per element, float64 `moments` in cache took 1.8x the time of the
         * plain sums, this way 1.17-1.25x), as the intrinsics loop's blocks */
        for (; i + 4 * BNF_LANES <= len; i += 4 * BNF_LANES) {
            if (pf) bnf_pf_advance(pf, 4 * BNF_LANES * sizeof(T));
#pragma omp simd
            for (int l = 0; l < BNF_LANES; l++)
                BNF_NAME(sums_elem4)(p[i + l], p[i + BNF_LANES + l], p[i + 2 * BNF_LANES + l],
                                     p[i + 3 * BNF_LANES + l], shift, &s1[l], &s2[l],
                                     &s2lo[l], (double *)0);
        }
#endif
        for (; i + BNF_LANES <= len; i += BNF_LANES) {
            if (pf) bnf_pf_advance(pf, BNF_LANES * sizeof(T));
#pragma omp simd
            for (int l = 0; l < BNF_LANES; l++)
                BNF_NAME(sums_elem)(p[i + l], shift, &s1[l], &s2[l], BNF_LO(s2lo, l),
                                    (double *)0);
        }
        if (pf) bnf_pf_advance(pf, (len - i) * (ptrdiff_t)sizeof(T));
        for (int l = 0; i < len; i++, l++)
            BNF_NAME(sums_elem)(p[i], shift, &s1[l], &s2[l], BNF_LO(s2lo, l), (double *)0);
    }
}

/* A tile's moments from its folded sums around `shift` (tile_finish, once it has taken
 * them again where needed). */
static inline BNF_INLINE void BNF_NAME(tile_moments)(double n, double shift, double sd,
                                                    double sdd, double sdd_lo,
                                                    bnf_moments *t)
{
    t->n = n;
    t->hi = shift;
    t->lo = sd / n;
#if BNF_COMPENSATED
    t->m2 = bnf_tile_m2_lo(sdd, sdd_lo, sd, n, t->lo, 1 / n);
#else
    (void)sdd_lo;
    t->m2 = sdd - sd * t->lo;
#endif
    t->m2 = t->m2 < 0 ? 0 : bnf_m2_fix(t->m2, t->lo);
}

/* Moments of one cache-resident tile from the lanes s1, s2 of a first pass around
 * `shift` (the mean so far), with a second pass around the tile's own mean only when the
 * first loses too much to cancellation (sd^2 / n > BNF_REDO_RATIO * sdd): for double data
 * more than one bit; for float data more than 20 of the 53 bits, which leaves the
 * variance ~1e-10 exact, far below a float's resolution.  The result is as exact as two
 * passes would make it. */
static inline BNF_INLINE void BNF_NAME(tile_finish)(const T *x, ptrdiff_t nruns,
                                                   ptrdiff_t stride, ptrdiff_t len,
                                                   double shift, double *s1, double *s2,
                                                   double *s2lo, bnf_moments *t)
{
    double n = (double)nruns * (double)len, sd = bnf_sum_lanes(s1), sdd, sdd_lo = 0;
#if BNF_COMPENSATED
#define BNF_SUM_S2() bnf_sum_lanes_lo(s2, s2lo, &sdd, &sdd_lo)
#else
#define BNF_SUM_S2() (sdd = bnf_sum_lanes(s2))
#endif
    BNF_SUM_S2();
    if (BNF_TILE_REDO(sd, sdd, n)) {
        shift += sd / n;
        for (int l = 0; l < BNF_LANES; l++) {
            s1[l] = s2[l] = 0;
            if (BNF_COMPENSATED) s2lo[l] = 0;
        }
        BNF_DISPATCH(shifted_sums_runs, x, nruns, stride, len, shift, s1, s2, s2lo, NULL);
        sd = bnf_sum_lanes(s1);
        BNF_SUM_S2();
    }
#undef BNF_SUM_S2
    BNF_NAME(tile_moments)(n, shift, sd, sdd, sdd_lo, t);
}

/* Moments of a tile of `nruns` runs at x: the first pass, then tile_finish. */
static inline BNF_INLINE void BNF_NAME(tile_runs)(const T *x, ptrdiff_t nruns,
                                                 ptrdiff_t stride, ptrdiff_t len,
                                                 double shift, bnf_moments *t, bnf_pf *pf)
{
    double s1[BNF_LANES] = {0}, s2[BNF_LANES] = {0}, s2lo[BNF_LANES] = {0};
    BNF_DISPATCH(shifted_sums_runs, x, nruns, stride, len, shift, s1, s2, s2lo, pf);
    BNF_NAME(tile_finish)(x, nruns, stride, len, shift, s1, s2, s2lo, t);
}

/* One channel's moments over its runs in tiles (tile_runs) merged in order, from the
 * first element (bnf_stats_runs; bnf_train_runs_cached without a prefetch cursor). */
static inline BNF_INLINE void BNF_NAME(stats_runs_tiles)(const T *x, ptrdiff_t nruns,
                                                        ptrdiff_t stride, ptrdiff_t len,
                                                        bnf_moments *m, bnf_pf *pf)
{
    bnf_moments t;
    double m2lo = 0;   /* the merges' (bnf_moments_merge_lo) */
    m->n = m->hi = m->lo = m->m2 = 0;
    if (nruns <= 0 || len <= 0) return;
#define BNF_SHIFT \
    (m->n > 0 ? bnf_finite_or(m->hi + m->lo, m->hi) : bnf_finite_or(BNF_TO_D(x[0]), 0))
    if (len <= BNF_TILE_ELEMS) {
        ptrdiff_t per = BNF_TILE_ELEMS / len;
        for (ptrdiff_t r0 = 0; r0 < nruns; r0 += per) {
            ptrdiff_t k = nruns - r0 < per ? nruns - r0 : per;
            BNF_NAME(tile_runs)(x + r0 * stride, k, stride, len, BNF_SHIFT, &t, pf);
            bnf_moments_merge_lo(m, &m2lo, &t);
        }
    } else {
        for (ptrdiff_t r = 0; r < nruns; r++) {
            for (ptrdiff_t i0 = 0; i0 < len; i0 += BNF_TILE_ELEMS) {
                ptrdiff_t k = len - i0 < BNF_TILE_ELEMS ? len - i0 : BNF_TILE_ELEMS;
                BNF_NAME(tile_runs)(x + r * stride + i0, 1, stride, k, BNF_SHIFT, &t, pf);
                bnf_moments_merge_lo(m, &m2lo, &t);
            }
        }
    }
#undef BNF_SHIFT
    m->m2 = bnf_fold_lo(m->m2, m2lo);
}

BNF_CLONES void BNF_NAME(bnf_stats_runs)(const T *x, ptrdiff_t nruns, ptrdiff_t stride,
                                         ptrdiff_t len, bnf_moments *m, int flags)
{
    bnf_pf pf, pf_far;
    if (nruns <= 0 || len <= 0) {
        m->n = m->hi = m->lo = m->m2 = 0;
        return;
    }
    bnf_pf_init(&pf, x, nruns, stride * (ptrdiff_t)sizeof(T), len * (ptrdiff_t)sizeof(T));
    if (flags & BNF_FROM_DRAM) {
        bnf_pf_init_by(&pf_far, x, nruns, stride * (ptrdiff_t)sizeof(T),
                       len * (ptrdiff_t)sizeof(T), BNF_FAR_ROWS_BYTES);
        pf_far.far = 1;
        pf.also = &pf_far;
    }
    BNF_NAME(stats_runs_tiles)(x, nruns, stride, len, m, &pf);
}

/* Rows form: sums of d = x - shift[c] and d^2 per channel over `k` rows, four rows at
 * a time so the accumulators are loaded and stored once per four rows (s2lo and s1lo:
 * the low parts of s2 and s1, BNF_COMPENSATED; else NULL): rows a quarter of the k apart
 * (bnf_stats_spacing), or, in tiles of fewer rows, four adjacent rows, whose rows up to
 * pf_rows (counted from base; 0: none) are prefetched, bnf_rows_ahead below.  `far`
 * (from DRAM): the intrinsics loops also prefetch BNF_FAR_ROWS_BYTES ahead into L2;
 * these plain loops do not. */
static inline BNF_INLINE void BNF_NAME(shifted_sums_rows)(const T *base, ptrdiff_t k,
                                                         ptrdiff_t stride, ptrdiff_t width,
                                                         const double *shift, double *s1,
                                                         double *s2, double *s2lo,
                                                         double *s1lo, ptrdiff_t pf_rows,
                                                         int far)
{
    ptrdiff_t r, ahead = bnf_rows_ahead(width * (ptrdiff_t)sizeof(T));
    (void)far;
    for (ptrdiff_t c = 0; c < width; c++) {
        s1[c] = s2[c] = 0;
        if (BNF_COMPENSATED) s2lo[c] = s1lo[c] = 0;
    }
    const ptrdiff_t sp = bnf_stats_spacing(k), sq = sp ? sp * stride : stride;
    const ptrdiff_t nq = sp ? sp : k / 4;
    for (ptrdiff_t iq = 0; iq < nq; iq++) {
        r = sp ? iq : 4 * iq;
        const T *p0 = base + r * stride, *p1 = p0 + sq, *p2 = p1 + sq, *p3 = p2 + sq;
        int pf = !sp && r + ahead + 4 <= pf_rows;
        if (pf)
            bnf_pf_row_ends(p0 + ahead * stride, stride * (ptrdiff_t)sizeof(T),
                            width * (ptrdiff_t)sizeof(T), 4, 0);
        for (ptrdiff_t c0 = 0; c0 < width; c0 += BNF_PF_COLS) {
            ptrdiff_t c1 = width - c0 < BNF_PF_COLS ? width : c0 + BNF_PF_COLS;
            for (ptrdiff_t c = c0; pf && c < c1; c += BNF_LINE / (ptrdiff_t)sizeof(T))
                bnf_pf_quad(p0 + ahead * stride, stride * (ptrdiff_t)sizeof(T),
                            width * (ptrdiff_t)sizeof(T), c * (ptrdiff_t)sizeof(T), 0);
#pragma omp simd
            for (ptrdiff_t c = c0; c < c1; c++)
                BNF_NAME(sums_elem4)(p0[c], p1[c], p2[c], p3[c], shift[c], &s1[c], &s2[c],
                                     BNF_LO(s2lo, c), BNF_LO(s1lo, c));
        }
    }
    r = 4 * nq;
    for (; r < k; r++) {
        const T *p = base + r * stride;
#pragma omp simd
        for (ptrdiff_t c = 0; c < width; c++)
            BNF_NAME(sums_elem)(p[c], shift[c], &s1[c], &s2[c], BNF_LO(s2lo, c),
                                BNF_LO(s1lo, c));
    }
}

/* The sums of each channel's `group` columns: column i into partial sum i % 4, the
 * partial sums paired as (0 + 1) + (2 + 3) (one chain of `group` dependent adds per
 * channel cost 5% of a 256-row training).  BNF_COMPENSATED: s2 + s2lo into g2 + g2lo,
 * compensated. */
static inline BNF_INLINE void BNF_NAME(group_sums)(const double *s1, const double *s2,
                                                  const double *s2lo, ptrdiff_t width,
                                                  ptrdiff_t group, double *g1, double *g2,
                                                  double *g2lo)
{
    for (ptrdiff_t c = 0; c < width; c++) {
        const double *p1 = s1 + c * group, *p2 = s2 + c * group;
        double a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
#if BNF_COMPENSATED
        const double *p2lo = s2lo + c * group;
        double blo[4] = {0, 0, 0, 0};
        for (ptrdiff_t i = 0; i < group; i++) {
            a[i & 3] += p1[i];
            bnf_two_sum(&b[i & 3], &blo[i & 3], p2[i]);
            blo[i & 3] += p2lo[i];
        }
        g2lo[c] = (blo[0] + blo[1]) + (blo[2] + blo[3]);
        for (int i = 1; i < 4; i++) bnf_two_sum(&b[0], &g2lo[c], b[i]);
        g2[c] = b[0];
#else
        (void)s2lo;
        (void)g2lo;
        for (ptrdiff_t i = 0; i < group; i++) {
            a[i & 3] += p1[i];
            b[i & 3] += p2[i];
        }
        g2[c] = (b[0] + b[1]) + (b[2] + b[3]);
#endif
        g1[c] = (a[0] + a[1]) + (a[2] + a[3]);
    }
}

/* Rows form: per-channel moments of `width` contiguous channels over `nrows` rows,
 * in tiles of `tile_rows` rows (cache resident if a second pass is needed, see
 * tile_runs); tile_rows <= 0: as many as fit BNF_TILE_ELEMS.  Every channel has seen
 * the same rows, so a tile is merged into all of them (Chan's formula, as
 * bnf_moments_merge) with the count ratios computed once: a per-channel call with two
 * divisions cost as much as the sums of a 128-row tile.
 * group > 1: channel c is the `group` columns from c * group (short runs read as rows),
 * all summed around the channel's shift; a tile's column sums are added into the
 * channel's (group_sums), and the tile is finished per channel, as a tile of runs
 * (tile_runs) is. */
/* The per-column buffers of stats_rows_in: nine of n doubles (64-byte aligned where buf
 * is and n is a multiple of 8), then the low parts' three (n each where BNF_COMPENSATED,
 * else one). */
/* s1 += s1lo, where BNF_COMPENSATED (the rows form's compensated column sums); an
 * infinite or NaN s1 (a column holding an inf: its low part is NaN) as it is, as the
 * plain sums leave it */
static inline BNF_INLINE void BNF_NAME(fold_s1)(double *s1, const double *s1lo, ptrdiff_t n)
{
#if BNF_COMPENSATED
    for (ptrdiff_t c = 0; c < n; c++)
        if (s1[c] - s1[c] == 0) s1[c] += s1lo[c];
#else
    (void)s1, (void)s1lo, (void)n;
#endif
}

#define BNF_STATS_BUFS(n) ((BNF_COMPENSATED ? 13 : 9) * (n) + (BNF_COMPENSATED ? 0 : 4))

static inline BNF_INLINE void BNF_NAME(stats_rows_in)(const T *x, ptrdiff_t nrows,
                                                     ptrdiff_t stride, ptrdiff_t width,
                                                     ptrdiff_t group, ptrdiff_t tile_rows,
                                                     bnf_moments *m, int far, double *buf,
                                                     ptrdiff_t n)
{
    double *shift = buf, *s1 = buf + n, *s2 = buf + 2 * n;
    double *hi = buf + 3 * n, *lo = buf + 4 * n, *m2 = buf + 5 * n;
    double *gshift = buf + 6 * n, *g1 = buf + 7 * n, *g2 = buf + 8 * n;
    /* the low parts of s2, g2, m2 and s1 (BNF_COMPENSATED; the others keep none): a
     * column's s1 is a chain of up to a tile's rows / 4 adds, and around a shift a
     * standard deviation from the mean (the channel's first value) it had put the mean
     * and m2 of (5000, 2) float64 10-19 ulps off */
    ptrdiff_t nlo = BNF_COMPENSATED ? n : 1;
    double *s2lo = buf + 9 * n, *g2lo = s2lo + nlo, *m2lo = g2lo + nlo, *s1lo = m2lo + nlo;
    double count = 0;                 /* elements merged so far, in every channel */
    ptrdiff_t cols = width * group;
    ptrdiff_t per = tile_rows > 0 ? tile_rows : BNF_TILE_ELEMS / cols;
    /* a channel's shift and sums: its column's, or (group > 1) its columns' together */
    double *cs = group > 1 ? gshift : shift, *c1 = group > 1 ? g1 : s1,
           *c2 = group > 1 ? g2 : s2, *c2lo = group > 1 ? g2lo : s2lo;
    if (per < 4) per = 4;
    for (ptrdiff_t c = 0; c < width; c++) {
        cs[c] = nrows > 0 ? bnf_finite_or(BNF_TO_D(x[c * group]), 0) : 0;
        hi[c] = lo[c] = m2[c] = 0;
#if BNF_COMPENSATED
        m2lo[c] = 0;
#endif
    }
#if !BNF_COMPENSATED
    (void)m2lo;
    (void)c2lo;
#endif
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += per) {
        ptrdiff_t k = nrows - r0 < per ? nrows - r0 : per;
        const T *base = x + r0 * stride;
        double n = (double)k * (double)group, inv_n = 1 / n;
        int redo = 0;
        if (group > 1)
            for (ptrdiff_t c = 0; c < width; c++)
                for (ptrdiff_t i = 0; i < group; i++) shift[c * group + i] = cs[c];
        BNF_DISPATCH(shifted_sums_rows, base, k, stride, cols, shift, s1, s2,
                     BNF_LO(s2lo, 0), BNF_LO(s1lo, 0), nrows - r0, far);
        BNF_NAME(fold_s1)(s1, s1lo, cols);
        if (group > 1) BNF_NAME(group_sums)(s1, s2, s2lo, width, group, g1, g2, g2lo);
#pragma omp simd reduction(| : redo)
        for (ptrdiff_t c = 0; c < width; c++) redo |= BNF_TILE_REDO(c1[c], c2[c], n);
        if (redo) {
            /* only the channels that need it move their shift: the others' sums are
             * taken again from the same shift (the same bits), so no channel's result
             * depends on which channels share its block (the blocks depend on the thread
             * count) */
            for (ptrdiff_t c = 0; c < width; c++)
                if (BNF_TILE_REDO(c1[c], c2[c], n)) cs[c] += c1[c] / n;
            if (group > 1)
                for (ptrdiff_t c = 0; c < width; c++)
                    for (ptrdiff_t i = 0; i < group; i++) shift[c * group + i] = cs[c];
            BNF_DISPATCH(shifted_sums_rows, base, k, stride, cols, shift, s1, s2,
                         BNF_LO(s2lo, 0), BNF_LO(s1lo, 0), 0, 0);
            BNF_NAME(fold_s1)(s1, s1lo, cols);
            if (group > 1) BNF_NAME(group_sums)(s1, s2, s2lo, width, group, g1, g2, g2lo);
        }
        /* a tile's m2 (tile_finish's) and, BNF_COMPENSATED, m2 + m2lo compensated */
#if BNF_COMPENSATED
#define BNF_TILE_M2(c, tlo) bnf_tile_m2_lo(c2[c], c2lo[c], c1[c], n, tlo, inv_n)
#define BNF_ADD_M2(c, v) bnf_two_sum(&m2[c], &m2lo[c], v)
#else
#define BNF_TILE_M2(c, tlo) (c2[c] - c1[c] * (tlo))
#define BNF_ADD_M2(c, v) (m2[c] += (v))
        (void)inv_n;
#endif
        if (count == 0) {
#pragma omp simd
            for (ptrdiff_t c = 0; c < width; c++) {
                double tlo = c1[c] / n, tm2 = BNF_TILE_M2(c, tlo);
                hi[c] = cs[c];
                lo[c] = tlo;
                m2[c] = tm2 < 0 ? 0 : tm2;
            }
        } else {
            double total = count + n, ratio = n / total, weight = count * ratio;
#pragma omp simd
            for (ptrdiff_t c = 0; c < width; c++) {
                double tlo = c1[c] / n, tm2 = BNF_TILE_M2(c, tlo);
                double delta = (cs[c] - hi[c]) + (tlo - lo[c]);
                if (tm2 < 0) tm2 = 0;
                lo[c] = bnf_merged_lo(lo[c], delta, ratio, cs[c] - hi[c], tlo);
                BNF_ADD_M2(c, tm2 + delta * delta * weight);
            }
        }
#undef BNF_TILE_M2
#undef BNF_ADD_M2
        count += n;
        /* the next tile is shifted by the mean so far (kept where that is not finite) */
        for (ptrdiff_t c = 0; c < width; c++) cs[c] = bnf_finite_or(hi[c] + lo[c], cs[c]);
    }
    for (ptrdiff_t c = 0; c < width; c++) {
        m[c].n = count;
        m[c].hi = hi[c];
        m[c].lo = lo[c];
#if BNF_COMPENSATED
        m[c].m2 = bnf_m2_fix(bnf_fold_lo(m2[c], m2lo[c]), hi[c] + lo[c]);
#else
        m[c].m2 = bnf_m2_fix(m2[c], hi[c] + lo[c]);
#endif
    }
}

/* Rows of up to BNF_MAX_WIDTH columns, or wider (whole rows, _full_rows: their buffers
 * on the heap; out of memory, in blocks of columns: each channel's moments are its own,
 * the same bits). */
static inline BNF_INLINE void BNF_NAME(stats_rows_cols)(const T *x, ptrdiff_t nrows,
                                                       ptrdiff_t stride, ptrdiff_t width,
                                                       ptrdiff_t group, ptrdiff_t tile_rows,
                                                       bnf_moments *m, int far)
{
    BNF_ALIGN64 double sbuf[BNF_STATS_BUFS(BNF_MAX_WIDTH)];
    double *buf = sbuf, *heap = NULL;
    ptrdiff_t n = BNF_MAX_WIDTH, step = width;
    if (width * group > BNF_MAX_WIDTH) {        /* group 1: the caller's blocks are not */
        ptrdiff_t wide = (width + 7) / 8 * 8;
        heap = (double *)bnf_kernel_alloc64((size_t)BNF_STATS_BUFS(wide) * sizeof(double));
        if (heap)
            buf = heap, n = wide;
        else
            step = BNF_MAX_WIDTH;
    }
    for (ptrdiff_t c0 = 0; c0 < width; c0 += step) {
        ptrdiff_t w = width - c0 < step ? width - c0 : step;
        BNF_NAME(stats_rows_in)(x + c0 * group, nrows, stride, w, group, tile_rows, m + c0,
                                far, buf, n);
    }
    if (heap) bnf_free64(heap);
}

/* Rows form: per-channel moments of `width` channels over `nrows` rows, `tile_rows` rows
 * a tile (0: as many as fit BNF_TILE_ELEMS).
 * group > 1: channels of short runs read as rows.  A row holds width * group columns,
 * channel c the `group` columns from c * group (stats_rows_cols).  A block of channels
 * per call (at most BNF_GROUP_COLS columns): each channel's result does not depend on
 * the blocks.  (Each column's moments merged into its channel one after another, as
 * before, cost 1.5-1.8 ns an element on 8 rows of 7 x 7 or 11 x 11: a chain of
 * dependent merges per channel.) */
static BNF_CLONES BNF_NOINLINE void BNF_NAME(stats_rows_grouped)(const T *x, ptrdiff_t nrows,
                                                               ptrdiff_t stride,
                                                               ptrdiff_t width,
                                                               ptrdiff_t group,
                                                               ptrdiff_t tile_rows,
                                                               bnf_moments *m, int far)
{
    ptrdiff_t per = bnf_group_block(BNF_GROUP_COLS, group);
    for (ptrdiff_t c0 = 0; c0 < width; c0 += per) {
        ptrdiff_t w = width - c0 < per ? width - c0 : per;
        BNF_NAME(stats_rows_cols)(x + c0 * group, nrows, stride, w, group, tile_rows,
                                  m + c0, far);
    }
}

/* Contiguous narrow rows folded (bnf_fold_rows): k rows as one of k * width columns,
 * channel c owning columns c, c + width, ...; the columns are merged into the channel in
 * order, then the rows left over (fewer than k) as rows of their own. */
static BNF_CLONES BNF_NOINLINE void BNF_NAME(stats_rows_folded)(const T *x, ptrdiff_t nrows,
                                                              ptrdiff_t width,
                                                              ptrdiff_t tile_rows,
                                                              bnf_moments *m, int far)
{
    bnf_moments col[BNF_MAX_WIDTH];
    double m2lo[BNF_FOLD_WIDTH];  /* the merges' (bnf_moments_merge_lo; 64 columns of a
                                   * channel merged plainly put a variance 4 ulps off) */
    ptrdiff_t k = bnf_fold_rows(width), fw = k * width, nf = nrows / k;
    BNF_NAME(stats_rows_cols)(x, nf, fw, fw, 1, BNF_TILE_ELEMS / fw, col, far);
    for (ptrdiff_t c = 0; c < width; c++) {
        m[c] = col[c];
        m2lo[c] = 0;
        for (ptrdiff_t i = 1; i < k; i++)
            bnf_moments_merge_lo(&m[c], &m2lo[c], &col[i * width + c]);
    }
    if (nrows > nf * k) {
        BNF_NAME(stats_rows_cols)(x + nf * fw, nrows - nf * k, width, width, 1, tile_rows,
                                  col, far);
        for (ptrdiff_t c = 0; c < width; c++) bnf_moments_merge_lo(&m[c], &m2lo[c], &col[c]);
    }
    for (ptrdiff_t c = 0; c < width; c++) m[c].m2 = bnf_fold_lo(m[c].m2, m2lo[c]);
}

BNF_CLONES void BNF_NAME(bnf_stats_rows)(const T *x, ptrdiff_t nrows, ptrdiff_t stride,
                                         ptrdiff_t width, ptrdiff_t group,
                                         ptrdiff_t tile_rows, bnf_moments *m, int flags)
{
    int far = (flags & BNF_FROM_DRAM) != 0;
    /* the grouped and folded forms apart: their scratch would grow every small call's
     * frame */
    if (group > 1)
        BNF_NAME(stats_rows_grouped)(x, nrows, stride, width, group, tile_rows, m, far);
    else if (stride == width && bnf_fold_rows(width) && nrows * width >= BNF_FOLD_MIN_STATS)
        BNF_NAME(stats_rows_folded)(x, nrows, width, tile_rows, m, far);
    else
        BNF_NAME(stats_rows_cols)(x, nrows, stride, width, 1, tile_rows, m, far);
}

/* y = (x - mean) * scale + shift over n contiguous elements, advancing a prefetch
 * cursor as it goes.  The intrinsics forms take nt: stream q straight out. */
static inline BNF_INLINE void BNF_NAME(norm_chunk)(const T *p, T *q, ptrdiff_t n, double mean,
                                                  double scale, double shift, bnf_pf *pf,
                                                  int nt)
{
    (void)nt; /* plain stores: a streamed output is staged (BNF_DIRECT_NT) */
    for (ptrdiff_t b0 = 0; b0 < n; b0 += BNF_PF_BLOCK) {
        ptrdiff_t b1 = n - b0 < BNF_PF_BLOCK ? n : b0 + BNF_PF_BLOCK;
        bnf_pf_advance(pf, (b1 - b0) * (ptrdiff_t)sizeof(T));
#pragma omp simd
        for (ptrdiff_t i = b0; i < b1; i++)
            q[i] = BNF_NAME(norm_elem)(p[i], mean, scale, shift);
    }
}

/* Rows form, k rows of n columns: q = (x - m) * a + b with per-column factors, rows
 * xstride and qstride elements apart; rows up to pf_rows (from x; 0: none) are
 * prefetched rows ahead (bnf_rows_ahead_pf: into L1, or into L2 for wide rows). */
static inline BNF_INLINE void BNF_NAME(norm_rows_run)(const T *x, ptrdiff_t xstride, T *q,
                                                     ptrdiff_t qstride, ptrdiff_t k,
                                                     ptrdiff_t n, const double *m,
                                                     const double *a, const double *b,
                                                     ptrdiff_t pf_rows, int nt)
{
    int far;
    ptrdiff_t ahead = bnf_rows_ahead_pf(n * (ptrdiff_t)sizeof(T), BNF_L1_NORM, &far);
    (void)nt;
    for (ptrdiff_t r = 0; r < k; r++) {
        const T *p = x + r * xstride;
        T *o = q + r * qstride;
        if (r + ahead < pf_rows)
            bnf_pf_row(p + ahead * xstride, n * (ptrdiff_t)sizeof(T), far);
#pragma omp simd
        for (ptrdiff_t c = 0; c < n; c++) o[c] = BNF_NAME(norm_elem)(p[c], m[c], a[c], b[c]);
    }
}

/* A prefetch cursor over k channels of `nruns` runs of `len` elements (strides in
 * elements, as bnf_norm_runs), visited run by run, a run's channels in turn: one
 * channel's runs, or one row's channels, or (channels back to back) rows of k channels
 * as one span each. */
static inline BNF_INLINE void BNF_NAME(pf_block_by)(bnf_pf *pf, const T *x, ptrdiff_t nruns,
                                                   ptrdiff_t stride, ptrdiff_t cs,
                                                   ptrdiff_t len, ptrdiff_t k, ptrdiff_t ahead)
{
    ptrdiff_t isz = sizeof(T);
    if (k == 1 || nruns == 1)
        bnf_pf_init_by(pf, x, nruns * k, (k == 1 ? stride : cs) * isz, len * isz, ahead);
    else
        bnf_pf_init_by(pf, x, nruns, stride * isz, ((k - 1) * cs + len) * isz, ahead);
}

static inline BNF_INLINE void BNF_NAME(pf_block)(bnf_pf *pf, const T *x, ptrdiff_t nruns,
                                                ptrdiff_t stride, ptrdiff_t cs, ptrdiff_t len,
                                                ptrdiff_t k)
{
    BNF_NAME(pf_block_by)(pf, x, nruns, stride, cs, len, k, BNF_PREFETCH_BYTES);
}

/* y = (x - mean[c]) * scale[c] + shift[c], in double, rounded once, over k channels of
 * `nruns` runs of `len` contiguous elements: channel c's runs at x + c * xcs, its run r
 * at r * xstride from there (y likewise), visited run by run, each run's channels in
 * address order (one channel's runs; a row of NCHW, one call a row; or a block of
 * NCHW channels, a row of them one stream).  `mean` is the high part of the mean (an
 * offset of prices is removed exactly here); the caller folds the small low part into
 * shift.
 *
 * With x_next given, the call also takes the moments of the k_next (<= BNF_BLOCK_CHANNELS)
 * channels of the next block into m_next (as bnf_stats_runs channel by channel, the
 * same bits): runs of the same shape and strides at x_next, each run's before this
 * block's.  A fused block's normalize reads from cache and its statistics wait on DRAM;
 * interleaved, the next block's loads overlap this block's arithmetic.  Blocks of
 * NCHW channels read that way, a row of them at a time, took 0.88-0.89x the time of one
 * channel at a time ((64, 256, 28, 28) float32 training, Zen 4, one thread).
 * With BNF_FETCH_NEXT (and BNF_CACHED) the next block is only prefetched into L2 as this
 * one is normalized, for its own fused statistics to read: channels of 802 KB, too large
 * to pipeline, (64, 64, 56, 56) float32 training 0.88-0.90x the time (runs of 50 KB,
 * (16, 64, 112, 112), no change: the hardware prefetcher keeps up with those).
 * The statistics of x_next prefetch 4 KB ahead into L1 as they go; with BNF_FROM_DRAM also
 * 16 KB ahead into L2 (a second cursor): one core then has more lines in flight than
 * L1's miss buffers allow (_pipeline has the numbers). */
BNF_CLONES void BNF_NAME(bnf_norm_runs)(const T *x, ptrdiff_t xstride, ptrdiff_t xcs, T *y,
                                        ptrdiff_t ystride, ptrdiff_t ycs, ptrdiff_t nruns,
                                        ptrdiff_t len, ptrdiff_t k, const double *mean,
                                        const double *scale, const double *shift, int flags,
                                        const T *x_next, ptrdiff_t k_next,
                                        bnf_moments *m_next)
{
    T tmp[BNF_CHUNK];
    double s1[BNF_BLOCK_CHANNELS][BNF_LANES], s2[BNF_BLOCK_CHANNELS][BNF_LANES];
    /* the low parts of s2 (BNF_COMPENSATED; the others keep none) */
    double s2lo[BNF_COMPENSATED ? BNF_BLOCK_CHANNELS : 1][BNF_LANES];
    double tile_shift[BNF_BLOCK_CHANNELS], m2lo_next[BNF_BLOCK_CHANNELS];
#if !BNF_COMPENSATED
    (void)s2lo;
#endif
    bnf_pf pf, pf_next, pf_next_far;
    int stream = (flags & BNF_STREAM) && len * (ptrdiff_t)sizeof(T) >= BNF_STREAM_MIN_RUN;
    /* an output near x (bnf_nt_aliased) staged, streamed or not */
    int alias = bnf_nt_aliased(y, x, 0);
    int nt = stream && BNF_NORM_NT && !alias;
    int staged = stream ? !nt : alias && (flags & BNF_STAGE_NEAR);
    ptrdiff_t per = len <= BNF_TILE_ELEMS ? BNF_TILE_ELEMS / len : 0, kmax;
    int fetch;
    if (!x_next) k_next = 0;
    fetch = k_next && (flags & BNF_FETCH_NEXT) && (flags & BNF_CACHED);
    if (fetch) {
        BNF_NAME(pf_block)(&pf, x_next, nruns, xstride, xcs, len, k_next);
        pf.far = 1;
    }
    if (flags & BNF_FETCH_NEXT) {
        k_next = 0;                                 /* prefetched at most, not summed */
    } else if (k_next && (per == 0 || nruns <= 0 || len <= 0)) {
        for (ptrdiff_t c = 0; c < k_next; c++)     /* not interleaved */
            BNF_NAME(bnf_stats_runs)(x_next + c * xcs, nruns, xstride, len, m_next + c, 0);
        k_next = 0;
    }
    if (!fetch)
        BNF_NAME(pf_block)(&pf, flags & BNF_CACHED ? NULL : x, nruns, xstride, xcs, len, k);
#if BNF_SIMD_X86 && !BNF_T_HALF
    /* a row of short runs back to back, not streamed (eval): one call, masked tails;
     * staged, a call and a copy for as many runs as tmp holds (a run at a time, (8, 64,
     * 16, 16) float32 eval took 1.5x the time of the runs in place, (32, 64, 7, 7) 2.2x) */
    if (bnf_simd_level == 4 && nruns == 1 && k > 1 && !stream && !k_next && !fetch &&
        xcs == len && ycs == len && (!staged || len <= BNF_CHUNK)) {
        ptrdiff_t per_tmp = staged ? BNF_CHUNK / len : k;
        for (ptrdiff_t c0 = 0; c0 < k; c0 += per_tmp) {
            ptrdiff_t w = k - c0 < per_tmp ? k - c0 : per_tmp;
            BNF_NAME(norm_runs_row_v4)(x + c0 * len, staged ? tmp : y + c0 * len, w, len,
                                       mean + c0, scale + c0, shift + c0, &pf);
            if (staged) bnf_stage_out(y + c0 * len, tmp, w * len * (ptrdiff_t)sizeof(T), 0);
        }
        return;
    }
#endif
    BNF_NAME(pf_block)(&pf_next, k_next ? x_next : NULL, nruns, xstride, xcs, len, k_next);
    if (k_next && (flags & BNF_FROM_DRAM)) {
        BNF_NAME(pf_block_by)(&pf_next_far, x_next, nruns, xstride, xcs, len, k_next,
                              BNF_FAR_ROWS_BYTES);
        pf_next_far.far = 1;
        pf_next.also = &pf_next_far;
    }
    for (ptrdiff_t c = 0; c < k_next; c++) {
        m_next[c].n = m_next[c].hi = m_next[c].lo = m_next[c].m2 = m2lo_next[c] = 0;
        tile_shift[c] = bnf_finite_or(BNF_TO_D(x_next[c * xcs]), 0);
        for (int l = 0; l < BNF_LANES; l++) s1[c][l] = s2[c][l] = 0;
#if BNF_COMPENSATED
        for (int l = 0; l < BNF_LANES; l++) s2lo[c][l] = 0;
#endif
    }
    kmax = k > k_next ? k : k_next;
    /* bnf_stats_runs' tiles of `per` runs, one run of each channel at a time; float32 on
     * AVX-512 through one call a tile, not one a run (a call and its dispatch cost as
     * much as a short run's arithmetic). One thread, in one process against a call a
     * run: training of (4-16, 64, 14, 14) 0.86-0.87x the time, (64, 256, 14, 14)
     * 0.85-0.86x, (64, 512, 12, 12) 0.86x, (64, 256, 28, 28) 0.93-0.94x; two threads
     * 0.79-0.95x. float64 measured 0.92-0.97x in cache but 1.03-1.05x from DRAM (28 x 28):
     * not there. */
    for (ptrdiff_t t0 = 0, t1; t0 < nruns; t0 = t1) {
        t1 = per && nruns - t0 > per ? t0 + per : nruns;
#if BNF_SIMD_X86 && BNF_T_FLOAT
        if (bnf_simd_level == 4 && !staged)
            BNF_NAME(norm_runs_rows_v4)(x, xstride, xcs, y, ystride, ycs, t0, t1, nruns, len,
                                        k, mean, scale, shift, x_next, k_next, tile_shift,
                                        s1[0], s2[0], &pf, &pf_next, nt);
        else if (bnf_simd_level == 3 && bnf_norm_v3 && !staged)
            BNF_NAME(norm_runs_rows_v3)(x, xstride, xcs, y, ystride, ycs, t0, t1, nruns, len,
                                        k, mean, scale, shift, x_next, k_next, tile_shift,
                                        s1[0], s2[0], &pf, &pf_next, nt);
        else
#endif
            for (ptrdiff_t r = t0; r < t1; r++) {
                if (k_next == 1)
                    bnf_pf_next_run_end(x_next, r, nruns, xstride * (ptrdiff_t)sizeof(T),
                                        len * (ptrdiff_t)sizeof(T));
                for (ptrdiff_t c = 0; c < kmax; c++) {
                    if (c < k_next)
                        BNF_DISPATCH(shifted_sums_runs, x_next + c * xcs + r * xstride, 1,
                                     xstride, len, tile_shift[c], s1[c], s2[c],
                                     BNF_LO(s2lo[c], 0), &pf_next);
                    if (c < k) {
                        const T *p = x + r * xstride + c * xcs;
                        T *q = y + r * ystride + c * ycs;
                        if (nt) {
                            /* the whole run: chunks would end and start mid-line */
                            bnf_prefetch_ends(c + 1 < k ? q + ycs : y + (r + 1) * ystride,
                                              len, sizeof(T), c + 1 < k || r + 1 < nruns);
                            BNF_DISPATCH4(norm_chunk, p, q, len, mean[c], scale[c], shift[c],
                                          &pf, nt);
                            continue;
                        }
                        for (ptrdiff_t i0 = 0; i0 < len; i0 += BNF_CHUNK) {
                            ptrdiff_t n = len - i0 < BNF_CHUNK ? len - i0 : BNF_CHUNK;
                            BNF_DISPATCH4(norm_chunk, p + i0, staged ? tmp : q + i0, n,
                                          mean[c], scale[c], shift[c], &pf, nt);
                            if (staged)
                                bnf_stage_out(q + i0, tmp, n * (ptrdiff_t)sizeof(T), stream);
                        }
                    }
                }
            }
        for (ptrdiff_t c = 0; c < k_next; c++) {
            bnf_moments t;
            BNF_NAME(tile_finish)(x_next + c * xcs + t0 * xstride, t1 - t0, xstride, len,
                                  tile_shift[c], s1[c], s2[c], BNF_LO(s2lo[c], 0), &t);
            bnf_moments_merge_lo(m_next + c, &m2lo_next[c], &t);
            for (int l = 0; l < BNF_LANES; l++) s1[c][l] = s2[c][l] = 0;
#if BNF_COMPENSATED
            for (int l = 0; l < BNF_LANES; l++) s2lo[c][l] = 0;
#endif
            tile_shift[c] = bnf_finite_or(m_next[c].hi + m_next[c].lo, tile_shift[c]);
        }
    }
    for (ptrdiff_t c = 0; c < k_next; c++)
        m_next[c].m2 = bnf_fold_lo(m_next[c].m2, m2lo_next[c]);
}

/* The plain form of tile_sums_channels (bnfast_kernels_simd.h). */
static inline BNF_INLINE void BNF_NAME(tile_sums_channels)(const T *x, ptrdiff_t xstride,
                                                          ptrdiff_t xcs, ptrdiff_t nruns,
                                                          ptrdiff_t len, ptrdiff_t k,
                                                          double *shift, double *sd,
                                                          double *sdd, double *sdd_lo,
                                                          bnf_pf *pf)
{
    for (ptrdiff_t c = 0; c < k; c++) {
        double s1[BNF_LANES] = {0}, s2[BNF_LANES] = {0}, s2lo[BNF_LANES] = {0};
        const T *p = x + c * xcs;
        shift[c] = bnf_finite_or(BNF_TO_D(p[0]), 0);
        BNF_NAME(shifted_sums_runs)(p, nruns, xstride, len, shift[c], s1, s2, s2lo, pf);
        sd[c] = bnf_sum_lanes(s1);
#if BNF_COMPENSATED
        bnf_sum_lanes_lo(s2, s2lo, &sdd[c], &sdd_lo[c]);
#else
        sdd[c] = bnf_sum_lanes(s2);
        sdd_lo[c] = 0;
#endif
    }
}

/* Training forward of k channels of runs in cache (bnfast._core._cached_runs), in
 * blocks of about BNF_CACHED_RUNS_BYTES of x: each channel's moments (its tiles, as
 * bnf_stats_runs: the same bits) into m, the block's factors (bnf_finalize), then the
 * block normalized from L1 (bnf_norm_runs).  The pipeline of blocks (each block's
 * normalization beside the next block's statistics, run by run, the lanes stored and
 * loaded around each run) is for x from DRAM; on short runs in cache those loads and
 * stores cost more than the run's arithmetic. */
BNF_CLONES void BNF_NAME(bnf_train_runs_cached)(const T *x, ptrdiff_t xstride, ptrdiff_t xcs,
                                                T *y, ptrdiff_t ystride, ptrdiff_t ycs,
                                                ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k,
                                                double eps, const double *weight,
                                                double *hi, double *lo, double *invstd,
                                                double *scale, double *shift, double *var,
                                                bnf_moments *m, int flags)
{
    ptrdiff_t ch = nruns * len * (ptrdiff_t)sizeof(T);
    ptrdiff_t per = ch > 0 ? BNF_CACHED_RUNS_BYTES / ch : BNF_BLOCK_CHANNELS;
    if (per < 1) per = 1;
    if (per > BNF_BLOCK_CHANNELS) per = BNF_BLOCK_CHANNELS;
    /* channels of one tile each: their first pass in one call a block (tile_sums_channels;
     * one a channel, a dispatched call with its lanes in memory, was most of a channel of
     * a few 7 x 7 runs), then stats_runs_tiles' arithmetic; a tile that needs its second
     * pass, and longer channels, go through stats_runs_tiles */
    int one_tile = nruns > 0 && len > 0 && len <= BNF_TILE_ELEMS &&
                   nruns <= BNF_TILE_ELEMS / len;
    double t_shift[BNF_BLOCK_CHANNELS], sd[BNF_BLOCK_CHANNELS], sdd[BNF_BLOCK_CHANNELS];
    double sdd_lo[BNF_BLOCK_CHANNELS];
    bnf_pf pf;      /* no prefetch: in cache */
    BNF_NAME(pf_block)(&pf, NULL, nruns, xstride, xcs, len, 1);
    for (ptrdiff_t c0 = 0; c0 < k; c0 += per) {
        ptrdiff_t w = k - c0 < per ? k - c0 : per;
        if (one_tile) {
            double n = (double)nruns * (double)len;
            BNF_DISPATCH(tile_sums_channels, x + c0 * xcs, xstride, xcs, nruns, len, w,
                         t_shift, sd, sdd, sdd_lo, &pf);
            for (ptrdiff_t c = 0; c < w; c++) {
                if (BNF_TILE_REDO(sd[c], sdd[c], n)) {
                    BNF_NAME(stats_runs_tiles)(x + (c0 + c) * xcs, nruns, xstride, len,
                                               m + c0 + c, NULL);
                } else {
                    bnf_moments *mc = m + c0 + c;
                    BNF_NAME(tile_moments)(n, t_shift[c], sd[c], sdd[c], sdd_lo[c], mc);
                    mc->m2 = bnf_fold_lo(mc->m2, 0);    /* as stats_runs_tiles */
                }
            }
        } else {
            for (ptrdiff_t c = c0; c < c0 + w; c++)
                BNF_NAME(stats_runs_tiles)(x + c * xcs, nruns, xstride, len, m + c, NULL);
        }
        bnf_finalize(m + c0, w, eps, weight + c0, hi + c0, lo + c0, invstd + c0, scale + c0,
                     shift + c0, var + c0);
        BNF_NAME(bnf_norm_runs)(x + c0 * xcs, xstride, xcs, y + c0 * ycs, ystride, ycs, nruns,
                                len, w, hi + c0, scale + c0, shift + c0, flags | BNF_CACHED,
                                NULL, 0, NULL);
    }
}

/* Contiguous rows (input and output) of at most half BNF_FLAT_ELEMS: the rows are one
 * run, normalized BNF_FLAT_ELEMS / width whole rows per inner loop with the factors
 * repeated along it, so the per-row loop costs are paid once per several rows.  Every
 * element gets the same arithmetic as in the row loop: the same bits. */
static inline BNF_INLINE int BNF_NAME(norm_rows_flat)(const T *x, T *y, ptrdiff_t nrows,
                                                      ptrdiff_t width, const double *mean,
                                                      const double *scale,
                                                      const double *shift, int flags)
{
    T tmp[BNF_CHUNK];
    BNF_ALIGN64 double mbuf[BNF_CHUNK], abuf[BNF_CHUNK], bbuf[BNF_CHUNK];
    double *m = mbuf, *a = abuf, *b = bbuf, *heap = NULL;
    ptrdiff_t len = BNF_FLAT_LEN(width), total = nrows * width, head = 0;
    int stream = flags & BNF_STREAM;
    /* streamed straight from the registers (BNF_FLAT_NT), or stored plainly from
     * BNF_LINES_MIN elements: the first `head` elements, up to a line, are done alone, and
     * the factors are repeated from column `head` on, so that every run starts on a line
     * and loads its factors from one */
    int nt = stream && BNF_FLAT_NT(width, BNF_NORM_NT) &&
             !bnf_rows_aliased(y, x, BNF_FLAT_LINES_LEN(width) * (ptrdiff_t)sizeof(T),
                               BNF_T_HALF);
    int lines = nt || (!stream && bnf_flat_rows_lines(total, width, sizeof(T)));
    /* runs of whole lines longer than tmp, near x: runs of BNF_FLAT_LEN, which it holds,
     * to be staged ((1700, 300) float32 on huge pages, y 16-48 bytes ahead of x: 144 ->
     * 265 us in place) */
    if (lines && !nt && BNF_FLAT_LINES_LEN(width) > BNF_CHUNK && len <= BNF_CHUNK &&
        (flags & BNF_STAGE_NEAR) &&
        bnf_rows_aliased_plain(y, x, BNF_FLAT_LINES_LEN(width) * (ptrdiff_t)sizeof(T),
                               BNF_T_HALF))
        lines = 0;
    if (lines) len = BNF_FLAT_LINES_LEN(width);
    if (len > BNF_CHUNK) {               /* longer runs: factors on the heap */
        heap = (double *)bnf_kernel_alloc64(3 * (size_t)len * sizeof(double));
        if (heap) {
            m = heap, a = heap + len, b = heap + 2 * len;
        } else if (BNF_FLAT_LEN(width) > BNF_CHUNK) {
            return 0;                   /* whole wide rows: nothing done, the caller's blocks */
        } else {                        /* out of memory: as before */
            nt = lines = 0;
            len = BNF_FLAT_LEN(width);
        }
    }
    ptrdiff_t chunk = BNF_CHUNK / len * len;
    double *dst[3] = {m, a, b};
    const double *src[3] = {mean, scale, shift};
    /* not streamed, but near x (bnf_rows_aliased): staged all the same */
    int staged = stream ? !nt
                        : (flags & BNF_STAGE_NEAR) && len <= BNF_CHUNK &&
                              bnf_rows_aliased_plain(y, x, len * (ptrdiff_t)sizeof(T),
                                                     BNF_T_HALF);
    int cached = flags & BNF_CACHED;
    if (lines || (!staged && bnf_flat_lines(y, total, len, sizeof(T)))) {
        head = bnf_nt_lead(y, sizeof(T));
        if (head > total) head = total;
        for (ptrdiff_t e = 0; e < head; e++)
            y[e] = BNF_NAME(norm_elem)(x[e], mean[e % width], scale[e % width],
                                       shift[e % width]);
        x += head;
        y += head;
        total -= head;
    }
    bnf_repeat_factors(dst, src, 3, width, len, head);
    if (!staged) chunk = total;         /* nothing staged: one call */
    for (ptrdiff_t e0 = 0; e0 < total; e0 += chunk) {
        ptrdiff_t n = total - e0 < chunk ? total - e0 : chunk;
        const T *p0 = x + e0;
        T *q0 = staged ? tmp : y + e0;
        ptrdiff_t full = n / len, rest = n - full * len;
        ptrdiff_t pf_rows = cached ? 0 : (total - e0) / len;
        /* runs of len elements are rows of the repeated factors */
        BNF_DISPATCH4(norm_rows_run, p0, len, q0, len, full, len, m, a, b, pf_rows,
                      bnf_norm_nt(nt, len * (ptrdiff_t)sizeof(T)));
        if (rest)
            BNF_DISPATCH4(norm_rows_run, p0 + full * len, 0, q0 + full * len, 0, 1, rest, m, a,
                          b, 0, nt);
        if (staged) bnf_stage_out(y + e0, tmp, n * (ptrdiff_t)sizeof(T), stream);
    }
    if (heap) bnf_free64(heap);
    return 1;
}

/* A block of at most BNF_CHUNK columns (a staged group of rows fits tmp). */
static inline BNF_INLINE void BNF_NAME(norm_rows_block)(const T *x, ptrdiff_t xstride, T *y,
                                                       ptrdiff_t ystride, ptrdiff_t nrows,
                                                       ptrdiff_t width, const double *mean,
                                                       const double *scale,
                                                       const double *shift, int flags)
{
    T tmp[BNF_CHUNK];
    BNF_ALIGN64 double mbuf[BNF_CHUNK], abuf[BNF_CHUNK], bbuf[BNF_CHUNK];
    int stream = flags & BNF_STREAM, cached = flags & BNF_CACHED;
    if (xstride == width && ystride == width &&
        ((2 * width <= BNF_FLAT_ELEMS && nrows * width >= BNF_FLAT_MIN) ||
         (stream && BNF_FLAT_NT(width, BNF_NORM_NT)) ||
         (!stream && bnf_flat_rows_lines(nrows * width, width, sizeof(T))))) {
        BNF_NAME(norm_rows_flat)(x, y, nrows, width, mean, scale, shift, flags);
        return;
    }
    int nt = stream && BNF_NORM_NT &&
             bnf_rows_stream_direct(y, ystride, width, sizeof(T)) &&
             !bnf_rows_aliased(y, x, xstride * (ptrdiff_t)sizeof(T),
                               BNF_T_HALF || !bnf_rows_on_lines(y, ystride, width, sizeof(T)));
    if (nt) stream = 0;               /* nothing staged */
    /* not streamed, but near x (bnf_rows_aliased): staged all the same */
    int staged = stream || ((flags & BNF_STAGE_NEAR) &&
                            bnf_rows_aliased_plain(y, x, xstride * (ptrdiff_t)sizeof(T),
                                                   BNF_T_HALF ||
                                                       !bnf_rows_on_lines(y, ystride, width,
                                                                          sizeof(T))));
    /* rows that all start `lead` elements before a line: those columns of a group of rows
     * alone (plain stores), then the rest from a line (bnf_block_lead) */
    ptrdiff_t lead = bnf_block_lead(y, ystride, width, sizeof(T), nt, staged);
    const T *xh = x;
    T *yh = y;
    const double *mh = mean, *ah = scale, *bh = shift;
    x += lead, y += lead, width -= lead;
    mean = bnf_aligned(mean + lead, mbuf, width, lead ? 0 : nrows);
    scale = bnf_aligned(scale + lead, abuf, width, lead ? 0 : nrows);
    shift = bnf_aligned(shift + lead, bbuf, width, lead ? 0 : nrows);
    ptrdiff_t group = staged ? bnf_row_group(width, ystride, &staged, sizeof(T)) : 0;
    if (!staged) group = lead ? BNF_LEAD_ROWS : nrows;      /* nothing staged */
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += group) {
        ptrdiff_t k = nrows - r0 < group ? nrows - r0 : group;
        if (lead)
            BNF_DISPATCH4(norm_rows_run, xh + r0 * xstride, xstride, yh + r0 * ystride,
                          ystride, k, lead, mh, ah, bh, 0, 0);
        BNF_DISPATCH4(norm_rows_run, x + r0 * xstride, xstride, staged ? tmp : y + r0 * ystride,
                      staged ? width : ystride, k, width, mean, scale, shift,
                      cached ? 0 : nrows - r0,
                      bnf_norm_nt(nt, xstride * (ptrdiff_t)sizeof(T)));
        if (staged)
            bnf_stage_out(y + r0 * ystride, tmp, k * width * (ptrdiff_t)sizeof(T), stream);
    }
}

/* Contiguous wide rows, streamed, in groups of rows and column blocks (bnf_grouped_wide):
 * each row's first `lead` columns (before y's first line) and last `tail` ones (after
 * its last) with plain stores (the two share a line with the next row's and the row
 * before's), the columns between in blocks that start on lines, streamed, their factors
 * copied once to buffers that start at column `lead` on a line (read where they lay,
 * off a line, each load split in two and the blocks took 1.1-1.2x the time of whole
 * rows).  Every element's arithmetic is its own: the same bits as any other form.
 * Returns 0, with nothing done, where the buffers cannot be had. */
static inline BNF_INLINE int BNF_NAME(norm_rows_grouped_wide)(const T *x, T *y,
                                                             ptrdiff_t nrows, ptrdiff_t width,
                                                             const double *mean,
                                                             const double *scale,
                                                             const double *shift)
{
    ptrdiff_t line = 64 / (ptrdiff_t)sizeof(T), row = width * (ptrdiff_t)sizeof(T);
    ptrdiff_t lead = bnf_nt_lead(y, sizeof(T)), tail = (width - lead) % line;
    ptrdiff_t mid = width - lead - tail;
    ptrdiff_t group = BNF_WIDE_GROUP_BYTES / row > 1 ? BNF_WIDE_GROUP_BYTES / row : 1;
    ptrdiff_t nblocks = (mid + BNF_WIDE_BLOCK_COLS - 1) / BNF_WIDE_BLOCK_COLS;
    ptrdiff_t done = 0;
    double *heap = (double *)bnf_kernel_alloc64(3 * (size_t)mid * sizeof(double));
    if (!heap) return 0;
    double *m = heap, *a = heap + mid, *b = heap + 2 * mid;
    memcpy(m, mean + lead, (size_t)mid * sizeof(double));
    memcpy(a, scale + lead, (size_t)mid * sizeof(double));
    memcpy(b, shift + lead, (size_t)mid * sizeof(double));
    bnf_pf_share(x, (nrows < group ? nrows : group) * row, BNF_WIDE_GROUP_BYTES, &done);
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += group) {
        ptrdiff_t k = nrows - r0 < group ? nrows - r0 : group;
        ptrdiff_t next = nrows - r0 - k < group ? nrows - r0 - k : group;
        const T *xg = x + r0 * width, *xn = xg + k * width;
        T *yg = y + r0 * width;
        ptrdiff_t share = (next * row / nblocks + BNF_LINE - 1) / BNF_LINE * BNF_LINE;
        done = 0;
        /* the kernel itself, not norm_rows_block: its checks cost as much as a block */
        if (lead)
            BNF_DISPATCH4(norm_rows_run, xg, width, yg, width, k, lead, mean, scale, shift, 0,
                          0);
        for (ptrdiff_t c0 = 0; c0 < mid; c0 += BNF_WIDE_BLOCK_COLS) {
            ptrdiff_t w = mid - c0 < BNF_WIDE_BLOCK_COLS ? mid - c0 : BNF_WIDE_BLOCK_COLS;
            bnf_pf_share(xn, next * row, share, &done);
            BNF_DISPATCH4(norm_rows_run, xg + lead + c0, width, yg + lead + c0, width, k, w,
                          m + c0, a + c0, b + c0, 0, 2);     /* rows one at a time */
        }
        if (tail)
            BNF_DISPATCH4(norm_rows_run, xg + width - tail, width, yg + width - tail, width, k,
                          tail, mean + width - tail, scale + width - tail,
                          shift + width - tail, 0, 0);
    }
    bnf_free64(heap);
    return 1;
}

/* Wide rows go one block of BNF_WIDE_COLS columns at a time over all the rows: the
 * block's factors (24 bytes a column) then stay in L1 instead of streaming from L2
 * once per row (measured in cache: 64x4096 2.5-2.8 -> 1.8-1.9x a copy, 16x16384
 * 3.2 -> 2.1-2.9x; from DRAM, 3136x4096, 1.5-1.6 -> 1.25-1.45x). */
static inline BNF_INLINE void BNF_NAME(norm_rows_cols)(const T *x, ptrdiff_t xstride, T *y,
                                                      ptrdiff_t ystride, ptrdiff_t nrows,
                                                      ptrdiff_t width, const double *mean,
                                                      const double *scale,
                                                      const double *shift, int flags)
{
    ptrdiff_t step = bnf_wide_step(width, sizeof(T));
    if (xstride == width && ystride == width && bnf_grouped_wide(width, sizeof(T), flags) &&
        BNF_NORM_NT && width * (ptrdiff_t)sizeof(T) % 64 == 0 &&
        !bnf_rows_aliased(y, x, width * (ptrdiff_t)sizeof(T), BNF_T_HALF) &&
        BNF_NAME(norm_rows_grouped_wide)(x, y, nrows, width, mean, scale, shift))
        return;
    if (step < width && xstride == width && ystride == width &&
        bnf_wide_flat(width, flags) && BNF_FLAT_NT(width, BNF_NORM_NT) &&
        !bnf_rows_aliased(y, x, width * (ptrdiff_t)sizeof(T), BNF_T_HALF) &&
        BNF_NAME(norm_rows_flat)(x, y, nrows, width, mean, scale, shift, flags))
        return;
    for (ptrdiff_t c0 = 0; c0 < width; c0 += step) {
        ptrdiff_t w = width - c0 < step ? width - c0 : step;
        BNF_NAME(norm_rows_block)(x + c0, xstride, y + c0, ystride, nrows, w, mean + c0,
                                  scale + c0, shift + c0, flags);
    }
}


/* group > 1: channels of short runs as rows (bnf_stats_rows), a block of at most
 * BNF_CHUNK columns at a time over all the rows, its factors spread over the columns. */
static BNF_CLONES BNF_NOINLINE void BNF_NAME(norm_rows_grouped)(
    const T *x, ptrdiff_t xstride, T *y, ptrdiff_t ystride, ptrdiff_t nrows, ptrdiff_t width,
    ptrdiff_t group, const double *mean, const double *scale, const double *shift, int flags)
{
    BNF_ALIGN64 double m[BNF_CHUNK], a[BNF_CHUNK], b[BNF_CHUNK];
    double *dst[3] = {m, a, b};
    const double *src[3] = {mean, scale, shift};
    ptrdiff_t per = bnf_group_block(BNF_CHUNK, group);
    for (ptrdiff_t c0 = 0; c0 < width; c0 += per) {
        ptrdiff_t w = width - c0 < per ? width - c0 : per;
        bnf_spread_factors(dst, src, 3, c0, w, group);
        BNF_NAME(norm_rows_cols)(x + c0 * group, xstride, y + c0 * group, ystride, nrows,
                                 w * group, m, a, b, flags);
    }
}

BNF_CLONES void BNF_NAME(bnf_norm_rows)(const T *x, ptrdiff_t xstride, T *y,
                                        ptrdiff_t ystride, ptrdiff_t nrows, ptrdiff_t width,
                                        ptrdiff_t group, const double *mean,
                                        const double *scale, const double *shift, int flags)
{
    if (group > 1)
        BNF_NAME(norm_rows_grouped)(x, xstride, y, ystride, nrows, width, group, mean, scale,
                                    shift, flags);
    else
        BNF_NAME(norm_rows_cols)(x, xstride, y, ystride, nrows, width, mean, scale, shift,
                                 flags);
}

/* Backward sums of runs into lanes a1..a3 (BNF_LANES each, accumulated into; a1lo and
 * a2lo the low parts of a1 and a2 where BNF_COMPENSATED, else NULL). */
static inline BNF_INLINE void BNF_NAME(bwd_sums_runs)(const T *dy, ptrdiff_t dystride,
                                                     const T *x, ptrdiff_t xstride,
                                                     ptrdiff_t nruns, ptrdiff_t len,
                                                     double mean, double *a1, double *a2,
                                                     double *a3, double *a1lo, double *a2lo,
                                                     bnf_pf *pfg, bnf_pf *pfx)
{
    for (ptrdiff_t r = 0; r < nruns; r++) {
        const T *g = dy + r * dystride;
        const T *p = x + r * xstride;
        ptrdiff_t i = 0;
#if BNF_COMPENSATED
        /* four steps at a time, as shifted_sums_runs */
        for (; i + 4 * BNF_LANES <= len; i += 4 * BNF_LANES) {
            bnf_pf_advance(pfg, 4 * BNF_LANES * sizeof(T));
            bnf_pf_advance(pfx, 4 * BNF_LANES * sizeof(T));
#pragma omp simd
            for (int l = 0; l < BNF_LANES; l++)
                BNF_NAME(bwd_elem4)(g[i + l], g[i + BNF_LANES + l], g[i + 2 * BNF_LANES + l],
                                    g[i + 3 * BNF_LANES + l], p[i + l], p[i + BNF_LANES + l],
                                    p[i + 2 * BNF_LANES + l], p[i + 3 * BNF_LANES + l], mean,
                                    &a1[l], &a2[l], &a3[l], &a1lo[l], &a2lo[l]);
        }
#endif
        for (; i + BNF_LANES <= len; i += BNF_LANES) {
            bnf_pf_advance(pfg, BNF_LANES * sizeof(T));
            bnf_pf_advance(pfx, BNF_LANES * sizeof(T));
#pragma omp simd
            for (int l = 0; l < BNF_LANES; l++)
                BNF_NAME(bwd_elem)(g[i + l], p[i + l], mean, &a1[l], &a2[l], &a3[l],
                                   BNF_LO(a1lo, l), BNF_LO(a2lo, l));
        }
        bnf_pf_advance(pfg, (len - i) * (ptrdiff_t)sizeof(T));
        bnf_pf_advance(pfx, (len - i) * (ptrdiff_t)sizeof(T));
        for (int l = 0; i < len; i++, l++)
            BNF_NAME(bwd_elem)(g[i], p[i], mean, &a1[l], &a2[l], &a3[l], BNF_LO(a1lo, l),
                               BNF_LO(a2lo, l));
    }
}

/* k channels of runs a row of them at a time, channel c's lanes at a1 + c * BNF_LANES .. */
static inline BNF_INLINE void BNF_NAME(bwd_sums_block)(const T *dy, ptrdiff_t dystride,
                                                      ptrdiff_t dycs, const T *x,
                                                      ptrdiff_t xstride, ptrdiff_t xcs,
                                                      ptrdiff_t nruns, ptrdiff_t len,
                                                      ptrdiff_t k, const double *mean,
                                                      double *a1, double *a2, double *a3,
                                                      double *a1lo, double *a2lo,
                                                      bnf_pf *pfg, bnf_pf *pfx)
{
    for (ptrdiff_t r = 0; r < nruns; r++)
        for (ptrdiff_t c = 0; c < k; c++)
            BNF_NAME(bwd_sums_runs)(dy + r * dystride + c * dycs, dystride,
                                    x + r * xstride + c * xcs, xstride, 1, len, mean[c],
                                    a1 + c * BNF_LANES, a2 + c * BNF_LANES,
                                    a3 + c * BNF_LANES, BNF_LO(a1lo, c * BNF_LANES),
                                    BNF_LO(a2lo, c * BNF_LANES), pfg, pfx);
}

/* The lanes of k channels' backward sums (a1lo, a2lo: low parts where BNF_COMPENSATED)
 * summed into each channel's sum_dy, sum_dy_xmu and sum_xmu. */
static inline BNF_INLINE void BNF_NAME(bwd_lanes_out)(ptrdiff_t k,
                                                     double (*a1)[BNF_LANES],
                                                     double (*a2)[BNF_LANES],
                                                     double (*a3)[BNF_LANES],
                                                     double (*a1lo)[BNF_LANES],
                                                     double (*a2lo)[BNF_LANES],
                                                     double *sum_dy, double *sum_dy_xmu,
                                                     double *sum_xmu)
{
    for (ptrdiff_t c = 0; c < k; c++) {
#if BNF_COMPENSATED
        double hi, lo, hi2, lo2;
        bnf_sum_lanes_lo2(a1[c], a1lo[c], a2[c], a2lo[c], &hi, &lo, &hi2, &lo2);
        sum_dy[c] = bnf_fold_lo(hi, lo);
        sum_dy_xmu[c] = bnf_fold_lo(hi2, lo2);
#else
        (void)a1lo;
        (void)a2lo;
        sum_dy[c] = bnf_sum_lanes(a1[c]);
        sum_dy_xmu[c] = bnf_sum_lanes(a2[c]);
#endif
        sum_xmu[c] = bnf_sum_lanes(a3[c]);
    }
}

/* The plain form of bwd_sums_channels (bnfast_kernels_simd.h): k channels of runs, each
 * on its own, their sums stored to sum_dy[c], sum_dy_xmu[c] and sum_xmu[c]. */
static inline BNF_INLINE void BNF_NAME(bwd_sums_channels)(
    const T *dy, ptrdiff_t dystride, ptrdiff_t dycs, const T *x, ptrdiff_t xstride,
    ptrdiff_t xcs, ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k, const double *mean,
    double *sum_dy, double *sum_dy_xmu, double *sum_xmu, bnf_pf *pf)
{
    double a1[1][BNF_LANES], a2[1][BNF_LANES], a3[1][BNF_LANES];
    double a1lo[1][BNF_LANES], a2lo[1][BNF_LANES];   /* BNF_COMPENSATED */
    for (ptrdiff_t c = 0; c < k; c++) {
        for (int l = 0; l < BNF_LANES; l++) {
            a1[0][l] = a2[0][l] = a3[0][l] = 0;
            a1lo[0][l] = a2lo[0][l] = 0;
        }
        BNF_NAME(bwd_sums_runs)(dy + c * dycs, dystride, x + c * xcs, xstride, nruns, len,
                                mean[c], a1[0], a2[0], a3[0], BNF_LO(a1lo[0], 0),
                                BNF_LO(a2lo[0], 0), pf, pf);
        BNF_NAME(bwd_lanes_out)(1, a1, a2, a3, a1lo, a2lo, sum_dy + c, sum_dy_xmu + c,
                                sum_xmu + c);
    }
}

/* Backward sums over k (<= BNF_BLOCK_CHANNELS) channels of runs, strides and order as
 * bnf_norm_runs: sum(dy), sum(dy * (x - mean[c])) and sum(x - mean[c]) of each channel
 * c; the last recovers the part of the batch mean that a double `mean` cannot hold.
 * Each channel's lanes see its runs in order: the same bits whatever k.
 * x_next given (k_next channels of the same shape and strides): this block is read from
 * cache, where the dx before prefetched it, and the next block's x is prefetched into L2
 * meanwhile (its dy goes with this block's dx, BNF_SPLIT_NEXT), so that DRAM works
 * during the sums too. */
BNF_CLONES void BNF_NAME(bnf_bwd_sums_runs)(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs,
                                            const T *x, ptrdiff_t xstride, ptrdiff_t xcs,
                                            ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k,
                                            const double *mean, double *sum_dy,
                                            double *sum_dy_xmu, double *sum_xmu,
                                            const T *x_next, ptrdiff_t k_next)
{
    double a1[BNF_BLOCK_CHANNELS][BNF_LANES], a2[BNF_BLOCK_CHANNELS][BNF_LANES];
    double a3[BNF_BLOCK_CHANNELS][BNF_LANES];
    /* the low parts of a1 and a2 (BNF_COMPENSATED; the others keep none) */
    double a1lo[BNF_COMPENSATED ? BNF_BLOCK_CHANNELS : 1][BNF_LANES];
    double a2lo[BNF_COMPENSATED ? BNF_BLOCK_CHANNELS : 1][BNF_LANES];
    bnf_pf pfg, pfx;
    for (ptrdiff_t c = 0; c < k; c++)
        for (int l = 0; l < BNF_LANES; l++) a1[c][l] = a2[c][l] = a3[c][l] = 0;
#if BNF_COMPENSATED
    for (ptrdiff_t c = 0; c < k; c++)
        for (int l = 0; l < BNF_LANES; l++) a1lo[c][l] = a2lo[c][l] = 0;
#else
    (void)a1lo;
    (void)a2lo;
#endif
    if (x_next) {
        /* this block from cache: x of the next one into L2 meanwhile (its dy with dx) */
        /* from the block's start (BNF_NEXT_FROM_START_BYTES: these blocks are small) */
        BNF_NAME(pf_block_by)(&pfg, x_next, nruns, xstride, xcs, len, k_next, 0);
        BNF_NAME(pf_block)(&pfx, NULL, nruns, xstride, xcs, len, k);
        pfg.far = 1;
    } else {
        BNF_NAME(pf_block)(&pfg, dy, nruns, dystride, dycs, len, k);
        BNF_NAME(pf_block)(&pfx, x, nruns, xstride, xcs, len, k);
    }
    if (k == 1)
        BNF_DISPATCH(bwd_sums_runs, dy, dystride, x, xstride, nruns, len, mean[0], a1[0],
                     a2[0], a3[0], BNF_LO(a1lo[0], 0), BNF_LO(a2lo[0], 0), &pfg, &pfx);
    else
        BNF_DISPATCH(bwd_sums_block, dy, dystride, dycs, x, xstride, xcs, nruns, len, k, mean,
                     a1[0], a2[0], a3[0], BNF_LO(a1lo[0], 0), BNF_LO(a2lo[0], 0), &pfg,
                     &pfx);
    BNF_NAME(bwd_lanes_out)(k, a1, a2, a3, a1lo, a2lo, sum_dy, sum_dy_xmu, sum_xmu);
}

/* q[c] = a[c] * g[c] for one row (after its sums have read g: q may be g). */
static inline BNF_INLINE void BNF_NAME(dx_fixed_row)(const T *g, T *q, ptrdiff_t width,
                                                    const double *a)
{
#pragma omp simd
    for (ptrdiff_t c = 0; c < width; c++) q[c] = BNF_NAME(dx_fixed_elem)(g[c], a[c]);
}

/* Backward sums of rows, per column, accumulated into sum_dy.. (four rows at a time),
 * prefetching rows up to pf_rows as shifted_sums_rows, but further and into L2
 * (BNF_FAR_ROWS_BYTES).  `near` (from DRAM): the intrinsics loops also prefetch rows
 * nearer into L1 (BNF_NEAR_ROWS_BYTES); these plain loops do not.  Wide rows from DRAM
 * go a row at a time (bnf_sums_rowwise), in both, with the same bits.  sum_dy_lo and
 * sum_dy_xmu_lo: the low parts of sum_dy and sum_dy_xmu (BNF_COMPENSATED; else NULL). */
static inline BNF_INLINE void BNF_NAME(bwd_sums_rows)(const T *dy, ptrdiff_t dystride,
                                                     const T *x, ptrdiff_t xstride,
                                                     ptrdiff_t nrows, ptrdiff_t width,
                                                     const double *mean, double *sum_dy,
                                                     double *sum_dy_xmu, double *sum_xmu,
                                                     double *sum_dy_lo, double *sum_dy_xmu_lo,
                                                     ptrdiff_t pf_rows, int near,
                                                     const bnf_dx_fixed *fx)
{
    ptrdiff_t r = 0, ahead = bnf_rows_ahead_by(width * (ptrdiff_t)sizeof(T),
                                                        BNF_FAR_ROWS_BYTES);
    T *q = fx ? (T *)fx->q : NULL;     /* dx = a * dy (plain stores), as dy is read */
    ptrdiff_t quads_end = !BNF_COMPENSATED &&   /* as the intrinsics loop */
                                  bnf_sums_rowwise(width * (ptrdiff_t)sizeof(T), sizeof(T),
                                                   near)
                              ? 0 : nrows;
    /* spaced (bnf_sums_spacing, as the intrinsics loops): quad i the rows i + j sp */
    const ptrdiff_t sp = bnf_sums_spacing(nrows, near, q != NULL, BNF_COMPENSATED);
    for (ptrdiff_t i = 0; i < sp; i++) {
        const T *g0 = dy + i * dystride, *g1 = g0 + sp * dystride, *g2 = g1 + sp * dystride,
                *g3 = g2 + sp * dystride;
        const T *p0 = x + i * xstride, *p1 = p0 + sp * xstride, *p2 = p1 + sp * xstride,
                *p3 = p2 + sp * xstride;
#pragma omp simd
        for (ptrdiff_t c = 0; c < width; c++)
            BNF_NAME(bwd_elem4)(g0[c], g1[c], g2[c], g3[c], p0[c], p1[c], p2[c], p3[c],
                                mean[c], &sum_dy[c], &sum_dy_xmu[c], &sum_xmu[c],
                                BNF_LO(sum_dy_lo, c), BNF_LO(sum_dy_xmu_lo, c));
    }
    if (sp) r = 4 * sp, quads_end = 0;
    for (; r + 4 <= quads_end; r += 4) {
        const T *g0 = dy + r * dystride, *g1 = g0 + dystride, *g2 = g1 + dystride,
                *g3 = g2 + dystride;
        const T *p0 = x + r * xstride, *p1 = p0 + xstride, *p2 = p1 + xstride,
                *p3 = p2 + xstride;
        int pf = r + ahead + 4 <= pf_rows;
        if (pf) {
            bnf_pf_row_ends(g0 + ahead * dystride, dystride * (ptrdiff_t)sizeof(T),
                            width * (ptrdiff_t)sizeof(T), 4, 1);
            bnf_pf_row_ends(p0 + ahead * xstride, xstride * (ptrdiff_t)sizeof(T),
                            width * (ptrdiff_t)sizeof(T), 4, 1);
        }
        for (ptrdiff_t c0 = 0; c0 < width; c0 += BNF_PF_COLS) {
            ptrdiff_t c1 = width - c0 < BNF_PF_COLS ? width : c0 + BNF_PF_COLS;
            for (ptrdiff_t c = c0; pf && c < c1; c += BNF_LINE / (ptrdiff_t)sizeof(T)) {
                bnf_pf_quad(g0 + ahead * dystride, dystride * (ptrdiff_t)sizeof(T),
                            width * (ptrdiff_t)sizeof(T), c * (ptrdiff_t)sizeof(T), 1);
                bnf_pf_quad(p0 + ahead * xstride, xstride * (ptrdiff_t)sizeof(T),
                            width * (ptrdiff_t)sizeof(T), c * (ptrdiff_t)sizeof(T), 1);
            }
#pragma omp simd
            for (ptrdiff_t c = c0; c < c1; c++)
                BNF_NAME(bwd_elem4)(g0[c], g1[c], g2[c], g3[c], p0[c], p1[c], p2[c], p3[c],
                                    mean[c], &sum_dy[c], &sum_dy_xmu[c], &sum_xmu[c],
                                    BNF_LO(sum_dy_lo, c), BNF_LO(sum_dy_xmu_lo, c));
        }
        for (ptrdiff_t i = 0; q && i < 4; i++)
            BNF_NAME(dx_fixed_row)(dy + (r + i) * dystride, q + (r + i) * fx->qstride, width,
                                   fx->a);
    }
    for (; r < nrows; r++) {
        const T *g = dy + r * dystride;
        const T *p = x + r * xstride;
#pragma omp simd
        for (ptrdiff_t c = 0; c < width; c++)
            BNF_NAME(bwd_elem)(g[c], p[c], mean[c], &sum_dy[c], &sum_dy_xmu[c], &sum_xmu[c],
                               BNF_LO(sum_dy_lo, c), BNF_LO(sum_dy_xmu_lo, c));
        if (q) BNF_NAME(dx_fixed_row)(g, q + r * fx->qstride, width, fx->a);
    }
}

/* Streamed dx (fx) of contiguous rows of whole lines that start off a line: the
 * elements before dx's first line, else 0 (the rows are streamed as they are). */
static inline ptrdiff_t BNF_NAME(dx_rows_shift)(const bnf_dx_fixed *fx, ptrdiff_t dystride,
                                               ptrdiff_t xstride, ptrdiff_t nrows,
                                               ptrdiff_t width)
{
    uintptr_t off = (uintptr_t)fx->q % BNF_LINE;
    if (!fx->nt || !off || off % sizeof(T) || nrows < 2 || dystride != width ||
        xstride != width || fx->qstride != width || width * sizeof(T) % BNF_LINE)
        return 0;
    return (ptrdiff_t)((BNF_LINE - off) / sizeof(T));
}

/* dst[j] = src[(j + h) % width], and back */
static inline void BNF_NAME(rotate_cols)(double *dst, const double *src, ptrdiff_t width,
                                         ptrdiff_t h, int back)
{
    for (ptrdiff_t j = 0; j < width; j++) {
        ptrdiff_t c = j + h < width ? j + h : j + h - width;
        if (back)
            dst[c] = src[j];
        else
            dst[j] = src[c];
    }
}

/* Backward sums of contiguous rows read one at a time with dx streamed (fx), the rows
 * off a line by the same h elements (dx_rows_shift): row 0's first h columns, then
 * "rows" of `width` elements from each line start (a row's last columns and the next
 * row's first h) with the columns' factors and sums rotated to match, then the last
 * row's last columns.  Each column still takes its rows in order: the bits of the rows
 * as they are, every line of dx but the first and last streamed whole.  Returns 0, having
 * done nothing, where rows wider than BNF_MAX_WIDTH find no memory for their buffers. */
static BNF_NOINLINE int BNF_NAME(bwd_sums_dx_shifted)(const T *dy, const T *x,
                                                       ptrdiff_t nrows, ptrdiff_t width,
                                                       const double *mean, double *o1,
                                                       double *o2, double *o3, int near,
                                                       const bnf_dx_fixed *fx)
{
    BNF_ALIGN64 double rbuf[5 * BNF_MAX_WIDTH];
    ptrdiff_t n = (width + 7) / 8 * 8;  /* each buffer on a line */
    double *rm = rbuf, *heap = NULL;
    if (width > BNF_MAX_WIDTH) {       /* full rows (_full_rows) */
        heap = (double *)bnf_kernel_alloc64(5 * (size_t)n * sizeof(double));
        if (!heap) return 0;
        rm = heap;
    }
    double *ra = rm + n, *r1 = ra + n, *r2 = r1 + n, *r3 = r2 + n;
    ptrdiff_t h = BNF_NAME(dx_rows_shift)(fx, width, width, nrows, width);
    ptrdiff_t last = (nrows - 1) * width;
    T *q = (T *)fx->q;
    bnf_dx_fixed part = *fx, body = *fx;
    part.nt = 0;                       /* the first line, shared with what precedes dx */
    BNF_DISPATCH(bwd_sums_rows, dy, width, x, width, 1, h, mean, o1, o2, o3, NULL, NULL, 1,
                 near, &part);
    BNF_NAME(rotate_cols)(rm, mean, width, h, 0);
    BNF_NAME(rotate_cols)(ra, fx->a, width, h, 0);
    BNF_NAME(rotate_cols)(r1, o1, width, h, 0);
    BNF_NAME(rotate_cols)(r2, o2, width, h, 0);
    BNF_NAME(rotate_cols)(r3, o3, width, h, 0);
    body.q = q + h, body.a = ra;
    BNF_DISPATCH(bwd_sums_rows, dy + h, width, x + h, width, nrows - 1, width, rm, r1, r2, r3,
                 NULL, NULL, nrows - 1, near, &body);
    BNF_NAME(rotate_cols)(o1, r1, width, h, 1);
    BNF_NAME(rotate_cols)(o2, r2, width, h, 1);
    BNF_NAME(rotate_cols)(o3, r3, width, h, 1);
    body.q = q + last + h, body.a = fx->a + h;
    BNF_DISPATCH(bwd_sums_rows, dy + last + h, width, x + last + h, width, 1, width - h,
                 mean + h, o1 + h, o2 + h, o3 + h, NULL, NULL, 1, near, &body);
    if (heap) bnf_free64(heap);
    return 1;
}

/* bwd_sums_rows_cols with its per-column buffers (width each): mbuf (the mean, aligned),
 * s1-s3 (the sums, aligned), lo1, lo2 (their low parts, BNF_COMPENSATED). */
static inline BNF_INLINE void BNF_NAME(bwd_sums_rows_in)(const T *dy, ptrdiff_t dystride,
                                                        const T *x, ptrdiff_t xstride,
                                                        ptrdiff_t nrows, ptrdiff_t width,
                                                        const double *mean, double *sum_dy,
                                                        double *sum_dy_xmu, double *sum_xmu,
                                                        int near, const bnf_dx_fixed *fx,
                                                        double *mbuf, double *s1, double *s2,
                                                        double *s3, double *lo1, double *lo2)
{
    double *o1 = sum_dy, *o2 = sum_dy_xmu, *o3 = sum_xmu;
    int local = nrows >= BNF_ALIGN_MIN_ROWS &&
                (bnf_misaligned(o1) || bnf_misaligned(o2) || bnf_misaligned(o3));
    if (local) o1 = s1, o2 = s2, o3 = s3;
    mean = bnf_aligned(mean, mbuf, width, nrows);
    for (ptrdiff_t c = 0; c < width; c++) o1[c] = o2[c] = o3[c] = 0;
#if BNF_COMPENSATED
    for (ptrdiff_t c = 0; c < width; c++) lo1[c] = lo2[c] = 0;
#else
    (void)lo1;
    (void)lo2;
#endif
    /* dx shifted onto lines where it can be (0 only out of memory, nothing done) */
    if (!(fx && BNF_NAME(dx_rows_shift)(fx, dystride, xstride, nrows, width) &&
          BNF_NAME(bwd_sums_dx_shifted)(dy, x, nrows, width, mean, o1, o2, o3, near, fx)))
        BNF_DISPATCH(bwd_sums_rows, dy, dystride, x, xstride, nrows, width, mean, o1, o2, o3,
                     BNF_LO(lo1, 0), BNF_LO(lo2, 0), nrows, near, fx);
#if BNF_COMPENSATED
    for (ptrdiff_t c = 0; c < width; c++) {
        o1[c] = bnf_fold_lo(o1[c], lo1[c]);
        o2[c] = bnf_fold_lo(o2[c], lo2[c]);
    }
#endif
    if (local) {
        memcpy(sum_dy, s1, (size_t)width * sizeof(double));
        memcpy(sum_dy_xmu, s2, (size_t)width * sizeof(double));
        memcpy(sum_xmu, s3, (size_t)width * sizeof(double));
    }
}

/* The backward sums of rows of up to BNF_MAX_WIDTH columns, or wider (whole rows,
 * _full_rows: their buffers on the heap). */
static inline BNF_INLINE void BNF_NAME(bwd_sums_rows_cols)(const T *dy, ptrdiff_t dystride,
                                                          const T *x, ptrdiff_t xstride,
                                                          ptrdiff_t nrows, ptrdiff_t width,
                                                          const double *mean,
                                                          double *sum_dy,
                                                          double *sum_dy_xmu,
                                                          double *sum_xmu, int near,
                                                          const bnf_dx_fixed *fx)
{
    BNF_ALIGN64 double sbuf[4 * BNF_MAX_WIDTH];
    /* the low parts of the first two sums (BNF_COMPENSATED; the others keep none), added
     * to them at the end */
    BNF_ALIGN64 double lbuf[BNF_COMPENSATED ? 2 * BNF_MAX_WIDTH : 2];
    double *buf = sbuf, *lo = lbuf, *heap = NULL;
    ptrdiff_t n = BNF_MAX_WIDTH, step = width;
    if (width > BNF_MAX_WIDTH) {
        ptrdiff_t wide = (width + 7) / 8 * 8;   /* each buffer on a line */
        heap = (double *)bnf_kernel_alloc64((BNF_COMPENSATED ? 6 : 4) * (size_t)wide *
                                            sizeof(double));
        if (heap) {
            buf = heap, n = wide;
            if (BNF_COMPENSATED) lo = heap + 4 * n;
        } else {
            /* out of memory: in blocks of columns, the same bits (each column's sums are
             * its own); dx then not shifted (streamed plainly off a line) */
            step = BNF_MAX_WIDTH;
        }
    }
    for (ptrdiff_t c0 = 0; c0 < width; c0 += step) {
        ptrdiff_t w = width - c0 < step ? width - c0 : step;
        bnf_dx_fixed fb;
        if (fx) fb = *fx, fb.q = (T *)fx->q + c0, fb.a = fx->a + c0;
        BNF_NAME(bwd_sums_rows_in)(dy + c0, dystride, x + c0, xstride, nrows, w, mean + c0,
                                   sum_dy + c0, sum_dy_xmu + c0, sum_xmu + c0, near,
                                   fx ? &fb : NULL, buf, buf + n, buf + 2 * n, buf + 3 * n,
                                   lo, lo + (BNF_COMPENSATED ? n : 1));
    }
    if (heap) bnf_free64(heap);
}

/* Rows per folded row of the backward sums of contiguous rows (0: not folded). */
static inline ptrdiff_t BNF_NAME(bwd_sums_fold)(ptrdiff_t nrows, ptrdiff_t width, int near)
{
    ptrdiff_t fold = bnf_fold_pays(nrows, width) ? bnf_fold_rows(width) : 0;
    return fold ? fold : bnf_sums_fold_from_dram(width, sizeof(T), near);
}

/* group > 1: channels of short runs as rows (bnf_stats_rows): each column's sums, then
 * a channel's columns added in order. */
static BNF_CLONES BNF_NOINLINE void BNF_NAME(bwd_sums_rows_grouped)(
    const T *dy, ptrdiff_t dystride, const T *x, ptrdiff_t xstride, ptrdiff_t nrows,
    ptrdiff_t width, ptrdiff_t group, const double *mean, double *sum_dy, double *sum_dy_xmu,
    double *sum_xmu, int near, const bnf_dx_fixed *fx)
{
    BNF_ALIGN64 double m[BNF_MAX_WIDTH], s1[BNF_MAX_WIDTH], s2[BNF_MAX_WIDTH],
        s3[BNF_MAX_WIDTH], am[BNF_MAX_WIDTH];
    double *dst[2] = {m, am};
    const double *src[2] = {mean, fx ? fx->a : NULL};
    ptrdiff_t per = bnf_group_block(BNF_GROUP_COLS, group);
    bnf_dx_fixed fb;                   /* dx (fx): the block's columns, factors spread */
    for (ptrdiff_t c0 = 0; c0 < width; c0 += per) {
        ptrdiff_t w = width - c0 < per ? width - c0 : per;
        bnf_spread_factors(dst, src, fx ? 2 : 1, c0, w, group);
        if (fx) fb = *fx, fb.q = (T *)fx->q + c0 * group, fb.a = am;
        BNF_NAME(bwd_sums_rows_cols)(dy + c0 * group, dystride, x + c0 * group, xstride,
                                     nrows, w * group, m, s1, s2, s3, near, fx ? &fb : NULL);
        for (ptrdiff_t c = 0; c < w; c++) {
            double t1 = s1[c * group], t2 = s2[c * group], t3 = s3[c * group];
            double t1lo = 0, t2lo = 0;
            for (ptrdiff_t i = 1; i < group; i++) {
                BNF_ADD_LO(t1, t1lo, s1[c * group + i]);
                BNF_ADD_LO(t2, t2lo, s2[c * group + i]);
                t3 += s3[c * group + i];
            }
            sum_dy[c0 + c] = BNF_COMPENSATED ? bnf_fold_lo(t1, t1lo) : t1;
            sum_dy_xmu[c0 + c] = BNF_COMPENSATED ? bnf_fold_lo(t2, t2lo) : t2;
            sum_xmu[c0 + c] = t3;
        }
    }
}

/* Contiguous narrow rows folded, as stats_rows_folded: a channel's columns added in
 * order, then the rows left over. */
static BNF_CLONES BNF_NOINLINE void BNF_NAME(bwd_sums_rows_folded)(
    const T *dy, const T *x, ptrdiff_t nrows, ptrdiff_t width, ptrdiff_t k,
    const double *mean, double *sum_dy, double *sum_dy_xmu, double *sum_xmu, int near,
    const bnf_dx_fixed *fx)
{
    BNF_ALIGN64 double m[BNF_MAX_WIDTH], s1[BNF_MAX_WIDTH], s2[BNF_MAX_WIDTH],
        s3[BNF_MAX_WIDTH], am[BNF_MAX_WIDTH];
    double *dst[2] = {m, am};
    const double *src[2] = {mean, fx ? fx->a : NULL};
    ptrdiff_t fw = k * width, nf = nrows / k;
    /* dx (fx): the folded rows' factors repeated as the mean's */
    bnf_dx_fixed ffold, frest;
    if (fx) {
        ffold = *fx, frest = *fx;
        ffold.qstride = fw, ffold.a = am;
        frest.q = (T *)fx->q + nf * fw, frest.qstride = width, frest.a = am;
    }
    bnf_repeat_factors(dst, src, fx ? 2 : 1, width, fw, 0);
    BNF_NAME(bwd_sums_rows_cols)(dy, fw, x, fw, nf, fw, m, s1, s2, s3, near,
                                 fx ? &ffold : NULL);
    /* the low parts (BNF_COMPENSATED, BNF_ADD_LO; the others keep none).  Widths here
     * pass BNF_FOLD_WIDTH (narrow rows folded from DRAM, bnf_sums_fold_from_dram). */
    BNF_ALIGN64 double lo1[BNF_COMPENSATED ? BNF_MAX_WIDTH : 1];
    BNF_ALIGN64 double lo2[BNF_COMPENSATED ? BNF_MAX_WIDTH : 1];
#if !BNF_COMPENSATED
    (void)lo1;
    (void)lo2;
#endif
    for (ptrdiff_t c = 0; c < width; c++) {
        double t1 = s1[c], t2 = s2[c], t3 = s3[c];
#if BNF_COMPENSATED
        lo1[c] = lo2[c] = 0;
#endif
        for (ptrdiff_t i = 1; i < k; i++) {
            BNF_ADD_LO(t1, lo1[c], s1[i * width + c]);
            BNF_ADD_LO(t2, lo2[c], s2[i * width + c]);
            t3 += s3[i * width + c];
        }
        sum_dy[c] = t1;
        sum_dy_xmu[c] = t2;
        sum_xmu[c] = t3;
    }
    if (nrows > nf * k) {
        BNF_NAME(bwd_sums_rows_cols)(dy + nf * fw, width, x + nf * fw, width, nrows - nf * k,
                                     width, m, s1, s2, s3, near, fx ? &frest : NULL);
        for (ptrdiff_t c = 0; c < width; c++) {
            BNF_ADD_LO(sum_dy[c], lo1[c], s1[c]);
            BNF_ADD_LO(sum_dy_xmu[c], lo2[c], s2[c]);
            sum_xmu[c] += s3[c];
        }
    }
#if BNF_COMPENSATED
    for (ptrdiff_t c = 0; c < width; c++) {
        sum_dy[c] = bnf_fold_lo(sum_dy[c], lo1[c]);
        sum_dy_xmu[c] = bnf_fold_lo(sum_dy_xmu[c], lo2[c]);
    }
#endif
}

static inline BNF_INLINE void BNF_NAME(bwd_sums_rows_any)(
    const T *dy, ptrdiff_t dystride, const T *x, ptrdiff_t xstride, ptrdiff_t nrows,
    ptrdiff_t width, ptrdiff_t group, const double *mean, double *sum_dy, double *sum_dy_xmu,
    double *sum_xmu, int flags, const bnf_dx_fixed *fx)
{
    int near = bnf_sums_near(flags);
    ptrdiff_t fold = BNF_NAME(bwd_sums_fold)(nrows, width, near);
    if (group == 1 && dystride == width && xstride == width && fold)
        BNF_NAME(bwd_sums_rows_folded)(dy, x, nrows, width, fold, mean, sum_dy, sum_dy_xmu,
                                       sum_xmu, near, fx);
    else if (group > 1)
        BNF_NAME(bwd_sums_rows_grouped)(dy, dystride, x, xstride, nrows, width, group, mean,
                                        sum_dy, sum_dy_xmu, sum_xmu, near, fx);
    else
        BNF_NAME(bwd_sums_rows_cols)(dy, dystride, x, xstride, nrows, width, mean, sum_dy,
                                     sum_dy_xmu, sum_xmu, near, fx);
}

BNF_CLONES void BNF_NAME(bnf_bwd_sums_rows)(const T *dy, ptrdiff_t dystride, const T *x,
                                            ptrdiff_t xstride, ptrdiff_t nrows,
                                            ptrdiff_t width, ptrdiff_t group,
                                            const double *mean, double *sum_dy,
                                            double *sum_dy_xmu, double *sum_xmu, int flags)
{
    BNF_NAME(bwd_sums_rows_any)(dy, dystride, x, xstride, nrows, width, group, mean, sum_dy,
                                sum_dy_xmu, sum_xmu, flags, NULL);
}

/* The backward sums of bnf_bwd_sums_rows with dx = a * dy (the statistics held fixed)
 * stored as dy is read, in one pass (short runs read as rows, group > 1: where the row's
 * channels are one block of columns, its `cols`):
 * - streamed (BNF_STREAM): where the sums read rows one at a time from DRAM
 *   (bnf_sums_rowwise, after folding), float32, from the intrinsics loops, the rows of
 *   dx on lines or contiguous rows of whole lines (bwd_sums_dx_shifted);
 * - in cache (neither streamed nor from DRAM): rows of whole lines (after folding), any
 *   type and level.
 * Returns 0 without doing anything elsewhere (the caller takes the sums, then dx).  The
 * sums have the bits of bnf_bwd_sums_rows, dx those of bnf_bwd_dx_rows.  Measured: see
 * the README ("Backward with the statistics held fixed"). */
BNF_CLONES int BNF_NAME(bnf_bwd_sums_dx_rows)(const T *dy, ptrdiff_t dystride, const T *x,
                                              ptrdiff_t xstride, T *dx, ptrdiff_t dxstride,
                                              ptrdiff_t nrows, ptrdiff_t width,
                                              ptrdiff_t group, const double *mean,
                                              const double *a, double *sum_dy,
                                              double *sum_dy_xmu, double *sum_xmu, int flags)
{
    int near = bnf_sums_near(flags);
    ptrdiff_t cols = group > 1 ? width * group : width;      /* elements of a row */
    ptrdiff_t fold = group == 1 ? BNF_NAME(bwd_sums_fold)(nrows, width, near) : 0;
    int contiguous = dystride == cols && xstride == cols && dxstride == cols;
    ptrdiff_t row = (fold && contiguous ? fold : 1) * cols;
    bnf_dx_fixed fx;
    ptrdiff_t qstride = fold && contiguous ? row : dxstride;
    /* every row of dx on a line, or contiguous rows of whole lines (bwd_sums_dx_shifted);
     * else rows that share lines would be streamed in part and stored in part (1.7x the
     * time of the sums and then dx) */
    int lines = (uintptr_t)dx % BNF_LINE == 0 && qstride * sizeof(T) % BNF_LINE == 0;
    int shiftable = contiguous && row * sizeof(T) % BNF_LINE == 0 &&
                    (uintptr_t)dx % sizeof(T) == 0;
    /* short runs as rows (group > 1): channels of one block of columns only */
    if (!bnf_fuse_sums_dx || (fold && !contiguous) ||
        (group > 1 && width > bnf_group_block(BNF_GROUP_COLS, group)))
        return 0;
    fx.nt = (flags & BNF_STREAM) != 0;
    if (!fx.nt) {
        /* in cache, plain stores.  Not from DRAM (an output allocated by the call, not
         * streamed: its first touch costs most, and the one pass measured 0.96-1.05x the
         * time of the two steps); nor rows that are not whole lines: the two steps' dx
         * puts its stores on lines ((512, 300) measured 1.09x the time in one pass) */
        if (near || row * sizeof(T) % BNF_LINE) return 0;
        /* nor dx just ahead of a row of dy or x near it (bnf_step_aliased), which the
         * two steps stage: (2049, 64) float32 on huge pages, dx 16-48 bytes ahead of x
         * or of a row beside, 31 -> 52-57 us in one pass, 42 in two; whole rows or 64
         * bytes ahead cost one pass nothing */
        if ((flags & BNF_STAGE_NEAR) &&
            (bnf_step_aliased(dx, dy, qstride * (ptrdiff_t)sizeof(T), 12 * sizeof(T)) ||
             bnf_step_aliased(dx, x, qstride * (ptrdiff_t)sizeof(T), 12 * sizeof(T))))
            return 0;
    } else if (BNF_COMPENSATED || BNF_T_HALF || !BNF_DIRECT_NT(3) || !(lines || shiftable) ||
               !bnf_sums_rowwise(row * (ptrdiff_t)sizeof(T), sizeof(T), near) ||
               bnf_nt_aliased(dx, dy, 0) || bnf_nt_aliased(dx, x, 0)) {
        return 0;
    }
    fx.q = dx, fx.qstride = dxstride, fx.a = a;
    BNF_NAME(bwd_sums_rows_any)(dy, dystride, x, xstride, nrows, width, group, mean, sum_dy,
                                sum_dy_xmu, sum_xmu, flags, &fx);
    return 1;
}

/* dx = a * ((dy - k1) - (x - mean) * k2) over n contiguous elements; x == NULL: a * dy. */
static inline BNF_INLINE void BNF_NAME(dx_chunk)(const T *g, const T *p, T *q, ptrdiff_t n,
                                                double mean, double a, double k1, double k2,
                                                bnf_pf *pfg, bnf_pf *pfx, int nt)
{
    (void)nt;
    for (ptrdiff_t b0 = 0; b0 < n; b0 += BNF_PF_BLOCK) {
        ptrdiff_t b1 = n - b0 < BNF_PF_BLOCK ? n : b0 + BNF_PF_BLOCK;
        bnf_pf_advance(pfg, (b1 - b0) * (ptrdiff_t)sizeof(T));
        bnf_pf_advance(pfx, (b1 - b0) * (ptrdiff_t)sizeof(T));
        if (!p) {
#pragma omp simd
            for (ptrdiff_t i = b0; i < b1; i++) q[i] = BNF_NAME(dx_fixed_elem)(g[i], a);
        } else {
#pragma omp simd
            for (ptrdiff_t i = b0; i < b1; i++)
                q[i] = BNF_NAME(dx_elem)(g[i], p[i], mean, a, k1, k2);
        }
    }
}

/* The plain form of dx_runs_rows (bnfast_kernels_simd.h). */
static inline BNF_INLINE void BNF_NAME(dx_runs_rows)(const T *dy, ptrdiff_t dystride,
                                                    ptrdiff_t dycs, const T *x,
                                                    ptrdiff_t xstride, ptrdiff_t xcs, T *dx,
                                                    ptrdiff_t dxstride, ptrdiff_t dxcs,
                                                    ptrdiff_t nruns, ptrdiff_t len,
                                                    ptrdiff_t k, const double *mean,
                                                    const double *a, const double *k1,
                                                    const double *k2, bnf_pf *pf)
{
    for (ptrdiff_t r = 0; r < nruns; r++)
        for (ptrdiff_t c = 0; c < k; c++)
            BNF_NAME(dx_chunk)(dy + r * dystride + c * dycs,
                               x ? x + r * xstride + c * xcs : NULL,
                               dx + r * dxstride + c * dxcs, len, mean[c], a[c], k1[c], k2[c],
                               pf, pf, 0);
}

/* Rows form, k rows of n columns: dx = a * ((dy - k1) - (x - m) * k2) with per-column
 * factors (x == NULL: a * dy), prefetching as norm_rows_run (BNF_L1_DX). */
static inline BNF_INLINE void BNF_NAME(dx_rows_run)(const T *g, ptrdiff_t gstride, const T *x,
                                                   ptrdiff_t xstride, T *q, ptrdiff_t qstride,
                                                   ptrdiff_t k, ptrdiff_t n, const double *m,
                                                   const double *a, const double *k1,
                                                   const double *k2, ptrdiff_t pf_rows, int nt)
{
    int far;
    ptrdiff_t ahead = bnf_rows_ahead_pf(n * (ptrdiff_t)sizeof(T), BNF_L1_DX, &far);
    (void)nt;
    for (ptrdiff_t r = 0; r < k; r++) {
        const T *gr = g + r * gstride;
        T *o = q + r * qstride;
        if (r + ahead < pf_rows) {
            bnf_pf_row(gr + ahead * gstride, n * (ptrdiff_t)sizeof(T), far);
            if (x) bnf_pf_row(x + (r + ahead) * xstride, n * (ptrdiff_t)sizeof(T), far);
        }
        if (!x) {
#pragma omp simd
            for (ptrdiff_t c = 0; c < n; c++) o[c] = BNF_NAME(dx_fixed_elem)(gr[c], a[c]);
        } else {
            const T *p = x + r * xstride;
#pragma omp simd
            for (ptrdiff_t c = 0; c < n; c++)
                o[c] = BNF_NAME(dx_elem)(gr[c], p[c], m[c], a[c], k1[c], k2[c]);
        }
    }
}

/* dx of one run (p == NULL: a * g) in chunks of BNF_CHUNK: streamed from the registers
 * (nt), the chunks ending on q's lines (the first one after the run's head), so that no
 * line in a run is written in two parts; or computed into tmp and stored from there
 * (staged: bnf_stage_out, streamed where `stream`). */
static inline BNF_INLINE void BNF_NAME(dx_run)(const T *g, const T *p, T *q, ptrdiff_t len,
                                              double mean, double a, double k1, double k2,
                                              bnf_pf *pfg, bnf_pf *pfx, int nt, int staged,
                                              int stream, T *tmp)
{
    ptrdiff_t head = nt ? bnf_nt_lead(q, sizeof(T)) : 0;
    for (ptrdiff_t i0 = 0, ch = 0; i0 < len; ch++) {
        ptrdiff_t i1 = head + (ch + 1) * BNF_CHUNK;
        if (i1 > len) i1 = len;
        BNF_DISPATCH(dx_chunk, g + i0, p ? p + i0 : NULL, staged ? tmp : q + i0, i1 - i0,
                     mean, a, k1, k2, pfg, pfx, nt);
        if (staged) bnf_stage_out(q + i0, tmp, (i1 - i0) * (ptrdiff_t)sizeof(T), stream);
        i0 = i1;
    }
}

/* dx = a[c] * ((dy - k1[c]) - (x - mean[c]) * k2[c]) over k channels of runs, strides
 * and order as bnf_norm_runs (dy and dx likewise); x == NULL (statistics held fixed)
 * means dx = a[c] * dy, and x is not read at all.  With BNF_CACHED and dy_next given,
 * the k_next channels of the next block (dy_next, x_next: same shape and strides) are
 * prefetched into L2 as this block's dx goes: its sums then read them from cache while
 * this pass, from cache, leaves DRAM idle.  BNF_SPLIT_NEXT: dy_next only, x_next was
 * prefetched by this block's sums. */
BNF_CLONES void BNF_NAME(bnf_bwd_dx_runs)(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs,
                                          const T *x, ptrdiff_t xstride, ptrdiff_t xcs,
                                          T *dx, ptrdiff_t dxstride, ptrdiff_t dxcs,
                                          ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k,
                                          const double *mean, const double *a,
                                          const double *k1, const double *k2, int flags,
                                          const T *dy_next, const T *x_next,
                                          ptrdiff_t k_next)
{
    T tmp[BNF_CHUNK];
    bnf_pf pfg, pfx;
    int stream = (flags & BNF_STREAM) && len * (ptrdiff_t)sizeof(T) >= BNF_STREAM_MIN_RUN;
    /* an output near dy or x (bnf_nt_aliased) staged, streamed or not */
    int alias = bnf_nt_aliased(dx, dy, 0) || bnf_nt_aliased(dx, x, 0);
    int nt = stream && BNF_DIRECT_NT(3) && !alias;
    int staged = stream ? !nt : alias && (flags & BNF_STAGE_NEAR);
    int cached = flags & BNF_CACHED;
    if (cached && dy_next) {
        /* this block from cache: fetch the next block's dy and x meanwhile, a small one
         * from its start (BNF_NEXT_FROM_START_BYTES) */
        ptrdiff_t from = k_next * nruns * len * (ptrdiff_t)sizeof(T) <=
                                 BNF_NEXT_FROM_START_BYTES
                             ? 0
                             : BNF_PREFETCH_BYTES;
        BNF_NAME(pf_block_by)(&pfg, dy_next, nruns, dystride, dycs, len, k_next, from);
        BNF_NAME(pf_block_by)(&pfx, flags & BNF_SPLIT_NEXT ? NULL : x_next, nruns, xstride,
                              xcs, len, k_next, from);
        pfg.far = pfx.far = 1;
    } else {
        BNF_NAME(pf_block)(&pfg, cached ? NULL : dy, nruns, dystride, dycs, len, k);
        BNF_NAME(pf_block)(&pfx, cached || !x ? NULL : x, nruns, xstride, xcs, len, k);
    }
    for (ptrdiff_t r = 0; r < nruns; r++) {
        /* the cursors step a line from each run's start: where runs start off a line
         * (NumPy's 16 bytes), the next block's runs' last lines too, or its sums read
         * them from DRAM ((64, 256, 28, 28) float32 backward sums in L2 0.88x the time in
         * a C harness) */
        if (cached && dy_next)
            for (ptrdiff_t c = 0; c < k_next; c++) {
                bnf_pf_last_line(dy_next + r * dystride + c * dycs, len * (ptrdiff_t)sizeof(T));
                bnf_pf_last_line(x_next + r * xstride + c * xcs, len * (ptrdiff_t)sizeof(T));
            }
        for (ptrdiff_t c = 0; c < k; c++) {
            const T *g = dy + r * dystride + c * dycs;
            const T *p = x ? x + r * xstride + c * xcs : NULL;
            T *q = dx + r * dxstride + c * dxcs;
            if (nt) bnf_prefetch_ends(c + 1 < k ? q + dxcs : dx + (r + 1) * dxstride, len,
                                      sizeof(T), c + 1 < k || r + 1 < nruns);
            BNF_NAME(dx_run)(g, p, q, len, mean[c], a[c], k1[c], k2[c], &pfg, &pfx, nt,
                             staged, stream, tmp);
        }
    }
}

/* Backward of k channels of runs in cache (bnfast._core._cached_runs), in blocks of about
 * BNF_CACHED_RUNS_BYTES of x and dy: each channel's sums over its runs, its lanes in
 * registers from run to run (bwd_sums_runs: the same bits as bnf_bwd_sums_runs), the
 * block's dx coefficients (bnf_bwd_coeffs; training) and then its dx from L1 (not
 * training: dx = scale * dy), the runs through one call (dx_runs_rows: (2, 1024, 7, 7)
 * backward 0.88-0.90x the time of a dispatch a run, bnf_bwd_dx_runs, which takes the
 * streamed and staged outputs).  A block of channels through bnf_bwd_sums_runs goes a
 * row at a time, each run's lanes loaded and stored around it: on short runs those cost
 * more than the run's arithmetic. */
BNF_CLONES void BNF_NAME(bnf_bwd_runs_cached)(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs,
                                              const T *x, ptrdiff_t xstride, ptrdiff_t xcs,
                                              T *dx, ptrdiff_t dxstride, ptrdiff_t dxcs,
                                              ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k,
                                              int training, double n, const double *mean,
                                              const double *invstd, const double *scale,
                                              double *sum_dy, double *sum_dy_xmu,
                                              double *sum_xmu, double *lo, double *k1,
                                              double *k2, int flags)
{
    ptrdiff_t ch = 2 * nruns * len * (ptrdiff_t)sizeof(T);
    ptrdiff_t per = ch > 0 ? BNF_CACHED_RUNS_BYTES / ch : BNF_BLOCK_CHANNELS;
    bnf_pf pf;      /* no prefetch: in cache */
    BNF_NAME(pf_block)(&pf, NULL, nruns, xstride, xcs, len, 1);
    if (per < 1) per = 1;
    if (per > BNF_BLOCK_CHANNELS) per = BNF_BLOCK_CHANNELS;
    for (ptrdiff_t c0 = 0; c0 < k; c0 += per) {
        ptrdiff_t w = k - c0 < per ? k - c0 : per;
        BNF_DISPATCH(bwd_sums_channels, dy + c0 * dycs, dystride, dycs, x + c0 * xcs, xstride,
                     xcs, nruns, len, w, mean + c0, sum_dy + c0, sum_dy_xmu + c0,
                     sum_xmu + c0, &pf);
        if (training)
            bnf_bwd_coeffs(w, n, mean + c0, invstd + c0, sum_dy + c0, sum_dy_xmu + c0,
                           sum_xmu + c0, lo + c0, k1 + c0, k2 + c0);
        if (len <= BNF_CHUNK && !(flags & BNF_STREAM) &&
            !bnf_nt_aliased(dx, dy, 0) && !bnf_nt_aliased(dx, x, 0))
            BNF_DISPATCH(dx_runs_rows, dy + c0 * dycs, dystride, dycs,
                         training ? x + c0 * xcs : NULL, xstride, xcs, dx + c0 * dxcs,
                         dxstride, dxcs, nruns, len, w, mean + c0, scale + c0, k1 + c0,
                         k2 + c0, &pf);
        else
            BNF_NAME(bnf_bwd_dx_runs)(dy + c0 * dycs, dystride, dycs,
                                      training ? x + c0 * xcs : NULL, xstride, xcs,
                                      dx + c0 * dxcs, dxstride, dxcs, nruns, len, w,
                                      mean + c0, scale + c0, k1 + c0, k2 + c0,
                                      flags | BNF_CACHED, NULL, NULL, 0);
    }
}

/* The backward sums of bnf_bwd_sums_runs (the same bits: each channel's lanes see its
 * runs in order) with the statistics held fixed, each run's dx = a[c] * dy computed
 * right after its sums read it (from L1) and stored as bnf_bwd_dx_runs would: one pass
 * over DRAM, not the sums of a block and then its dx from L2, during which DRAM only
 * took the stores.  One thread, float32, against the two steps: (64, 256, 28, 28) 0.82x
 * the time, (16, 128, 56, 56) 0.86x, (64, 512, 14, 14) 0.95x, in cache (8, 64, 28, 28)
 * 0.82x; float64 0.85x.  A second cursor 8-32 KB ahead into L2 measured 1.02-1.19x,
 * blocks of 1.5-4 MB 0.97-1.04x, the sums of a block's row in one call (then its dx)
 * 0.97-1.06x.  (Intel; on Zen 4 the two steps measured 0.56-0.98x the time of this from
 * DRAM, and bnfast._core does not call it there: _fused_eval_runs.)  Returns 0, with
 * nothing done, where bnf_fuse_sums_dx is off. */
BNF_CLONES int BNF_NAME(bnf_bwd_sums_dx_runs)(const T *dy, ptrdiff_t dystride,
                                             ptrdiff_t dycs, const T *x, ptrdiff_t xstride,
                                             ptrdiff_t xcs, T *dx, ptrdiff_t dxstride,
                                             ptrdiff_t dxcs, ptrdiff_t nruns, ptrdiff_t len,
                                             ptrdiff_t k, const double *mean,
                                             const double *a, double *sum_dy,
                                             double *sum_dy_xmu, double *sum_xmu, int flags)
{
    double a1[BNF_BLOCK_CHANNELS][BNF_LANES], a2[BNF_BLOCK_CHANNELS][BNF_LANES];
    double a3[BNF_BLOCK_CHANNELS][BNF_LANES];
    double a1lo[BNF_COMPENSATED ? BNF_BLOCK_CHANNELS : 1][BNF_LANES];
    double a2lo[BNF_COMPENSATED ? BNF_BLOCK_CHANNELS : 1][BNF_LANES];
    T tmp[BNF_CHUNK];
    bnf_pf pfg, pfx, none;
    int stream = (flags & BNF_STREAM) && len * (ptrdiff_t)sizeof(T) >= BNF_STREAM_MIN_RUN;
    int alias = bnf_nt_aliased(dx, dy, 0) || bnf_nt_aliased(dx, x, 0);
    int nt = stream && BNF_DIRECT_NT(3) && !alias;
    int staged = stream ? !nt : alias && (flags & BNF_STAGE_NEAR);
    if (!bnf_fuse_sums_dx) return 0;
    for (ptrdiff_t c = 0; c < k; c++)
        for (int l = 0; l < BNF_LANES; l++) {
            a1[c][l] = a2[c][l] = a3[c][l] = 0;
            if (BNF_COMPENSATED) a1lo[c][l] = a2lo[c][l] = 0;
        }
    BNF_NAME(pf_block)(&pfg, dy, nruns, dystride, dycs, len, k);
    BNF_NAME(pf_block)(&pfx, x, nruns, xstride, xcs, len, k);
    BNF_NAME(pf_block)(&none, NULL, nruns, dystride, dycs, len, k);
    for (ptrdiff_t r = 0; r < nruns; r++)
        for (ptrdiff_t c = 0; c < k; c++) {
            const T *g = dy + r * dystride + c * dycs;
            T *q = dx + r * dxstride + c * dxcs;
            BNF_DISPATCH(bwd_sums_runs, g, dystride, x + r * xstride + c * xcs, xstride, 1,
                         len, mean[c], a1[c], a2[c], a3[c], BNF_LO(a1lo[c], 0),
                         BNF_LO(a2lo[c], 0), &pfg, &pfx);
            if (nt) bnf_prefetch_ends(c + 1 < k ? q + dxcs : dx + (r + 1) * dxstride, len,
                                      sizeof(T), c + 1 < k || r + 1 < nruns);
            BNF_NAME(dx_run)(g, NULL, q, len, 0, a[c], 0, 0, &none, &none, nt, staged, stream,
                             tmp);
        }
    BNF_NAME(bwd_lanes_out)(k, a1, a2, a3, a1lo, a2lo, sum_dy, sum_dy_xmu, sum_xmu);
    return 1;
}

/* dx over contiguous rows as one run, as norm_rows_flat (x == NULL: a * dy). */
static inline BNF_INLINE int BNF_NAME(dx_rows_flat)(const T *dy, const T *x, T *dx,
                                                    ptrdiff_t nrows, ptrdiff_t width,
                                                    const double *mean, const double *a,
                                                    const double *k1, const double *k2,
                                                    int flags)
{
    T tmp[BNF_CHUNK];
    BNF_ALIGN64 double mbuf[BNF_CHUNK], abuf[BNF_CHUNK], k1buf[BNF_CHUNK], k2buf[BNF_CHUNK];
    double *m = mbuf, *fa = abuf, *f1 = k1buf, *f2 = k2buf, *heap = NULL;
    ptrdiff_t len = BNF_FLAT_LEN(width), total = nrows * width, head = 0;
    int stream = flags & BNF_STREAM;
    ptrdiff_t run = BNF_FLAT_LINES_LEN(width) * (ptrdiff_t)sizeof(T);
    int nt = stream && BNF_FLAT_NT(width, BNF_DIRECT_NT(3)) &&
             !bnf_rows_aliased(dx, dy, run, BNF_T_HALF) && !bnf_rows_aliased(dx, x, run, BNF_T_HALF);
    int lines = nt || (!stream && bnf_flat_rows_lines(total, width, sizeof(T)));
    if (lines && !nt && BNF_FLAT_LINES_LEN(width) > BNF_CHUNK && len <= BNF_CHUNK &&
        (flags & BNF_STAGE_NEAR) &&               /* as norm_rows_flat */
        (bnf_rows_aliased_plain(dx, dy, run, BNF_T_HALF) ||
         bnf_rows_aliased_plain(dx, x, run, BNF_T_HALF)))
        lines = 0;
    if (lines) len = BNF_FLAT_LINES_LEN(width);
    if (len > BNF_CHUNK) {               /* as norm_rows_flat */
        heap = (double *)bnf_kernel_alloc64(4 * (size_t)len * sizeof(double));
        if (heap) {
            m = heap, fa = heap + len, f1 = heap + 2 * len, f2 = heap + 3 * len;
        } else if (BNF_FLAT_LEN(width) > BNF_CHUNK) {
            return 0;                   /* whole wide rows: nothing done, the caller's blocks */
        } else {
            nt = lines = 0;
            len = BNF_FLAT_LEN(width);
        }
    }
    ptrdiff_t chunk = BNF_CHUNK / len * len;
    double *dst[4] = {fa, m, f1, f2};
    const double *src[4] = {a, mean, k1, k2};
    /* not streamed, but near dy or x (bnf_rows_aliased): staged all the same */
    int staged = stream ? !nt
                        : (flags & BNF_STAGE_NEAR) && len <= BNF_CHUNK &&
                              (bnf_rows_aliased_plain(dx, dy, len * (ptrdiff_t)sizeof(T),
                                                      BNF_T_HALF) ||
                               bnf_rows_aliased_plain(dx, x, len * (ptrdiff_t)sizeof(T),
                                                      BNF_T_HALF));
    int cached = flags & BNF_CACHED;
    /* the first elements alone, as norm_rows_flat */
    if (lines || (!staged && bnf_flat_lines(dx, total, len, sizeof(T)))) {
        head = bnf_nt_lead(dx, sizeof(T));
        if (head > total) head = total;
        for (ptrdiff_t e = 0; e < head; e++) {
            ptrdiff_t c = e % width;
            dx[e] = x ? BNF_NAME(dx_elem)(dy[e], x[e], mean[c], a[c], k1[c], k2[c])
                      : BNF_NAME(dx_fixed_elem)(dy[e], a[c]);
        }
        dy += head;
        dx += head;
        if (x) x += head;
        total -= head;
    }
    bnf_repeat_factors(dst, src, x ? 4 : 1, width, len, head);
    if (!staged) chunk = total;         /* nothing staged: one call */
    for (ptrdiff_t e0 = 0; e0 < total; e0 += chunk) {
        ptrdiff_t n = total - e0 < chunk ? total - e0 : chunk;
        const T *g0 = dy + e0, *p0 = x ? x + e0 : NULL;
        T *q0 = staged ? tmp : dx + e0;
        ptrdiff_t full = n / len, rest = n - full * len;
        ptrdiff_t pf_rows = cached ? 0 : (total - e0) / len;
        BNF_DISPATCH(dx_rows_run, g0, len, p0, len, q0, len, full, len, m, fa, f1, f2, pf_rows,
                     bnf_dx_nt(nt, len * (ptrdiff_t)sizeof(T), flags));
        if (rest)
            BNF_DISPATCH(dx_rows_run, g0 + full * len, 0, p0 ? p0 + full * len : NULL, 0,
                         q0 + full * len, 0, 1, rest, m, fa, f1, f2, 0, nt);
        if (staged) bnf_stage_out(dx + e0, tmp, n * (ptrdiff_t)sizeof(T), stream);
    }
    if (heap) bnf_free64(heap);
    return 1;
}

/* A block of at most BNF_CHUNK columns (a staged group of rows fits tmp). */
static inline BNF_INLINE void BNF_NAME(dx_rows_block)(const T *dy, ptrdiff_t dystride,
                                                     const T *x, ptrdiff_t xstride, T *dx,
                                                     ptrdiff_t dxstride, ptrdiff_t nrows,
                                                     ptrdiff_t width, const double *mean,
                                                     const double *a, const double *k1,
                                                     const double *k2, int flags)
{
    T tmp[BNF_CHUNK];
    BNF_ALIGN64 double mbuf[BNF_CHUNK], abuf[BNF_CHUNK], k1buf[BNF_CHUNK],
        k2buf[BNF_CHUNK];
    int stream = flags & BNF_STREAM, cached = flags & BNF_CACHED;
    int single = BNF_T_HALF || !bnf_rows_on_lines(dx, dxstride, width, sizeof(T));
    int nt = stream && BNF_DIRECT_NT(3) &&
             bnf_rows_stream_direct(dx, dxstride, width, sizeof(T)) &&
             !bnf_rows_aliased(dx, dy, dystride * (ptrdiff_t)sizeof(T), single) &&
             !bnf_rows_aliased(dx, x, xstride * (ptrdiff_t)sizeof(T), single);
    if (dystride == width && (!x || xstride == width) && dxstride == width &&
        (bnf_fold_pays(nrows, width) || (stream && BNF_FLAT_NT(width, BNF_DIRECT_NT(3))) ||
         (!stream && 2 * width <= BNF_FLAT_ELEMS &&
          bnf_flat_lines(dx, nrows * width, BNF_FLAT_LEN(width), sizeof(T))) ||
         (!stream && bnf_flat_rows_lines(nrows * width, width, sizeof(T))))) {
        BNF_NAME(dx_rows_flat)(dy, x, dx, nrows, width, mean, a, k1, k2, flags);
        return;
    }
    if (nt) stream = 0;               /* nothing staged */
    /* as norm_rows_block */
    int staged = stream || ((flags & BNF_STAGE_NEAR) &&
                            (bnf_rows_aliased_plain(dx, dy, dystride * (ptrdiff_t)sizeof(T),
                                                    single) ||
                             bnf_rows_aliased_plain(dx, x, xstride * (ptrdiff_t)sizeof(T),
                                                    single)));
    ptrdiff_t lead = bnf_block_lead(dx, dxstride, width, sizeof(T), nt, staged);
    const T *gh = dy, *xh = x;
    T *qh = dx;
    const double *mh = mean, *ah = a, *f1h = k1, *f2h = k2;
    dy += lead, dx += lead, width -= lead;
    a = bnf_aligned(a + lead, abuf, width, lead ? 0 : nrows);
    if (x) {
        x += lead;
        mean = bnf_aligned(mean + lead, mbuf, width, lead ? 0 : nrows);
        k1 = bnf_aligned(k1 + lead, k1buf, width, lead ? 0 : nrows);
        k2 = bnf_aligned(k2 + lead, k2buf, width, lead ? 0 : nrows);
    }
    ptrdiff_t group = staged ? bnf_row_group(width, dxstride, &staged, sizeof(T)) : 0;
    if (!staged) group = lead ? BNF_LEAD_ROWS : nrows;      /* nothing staged */
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += group) {
        ptrdiff_t k = nrows - r0 < group ? nrows - r0 : group;
        if (lead)
            BNF_DISPATCH(dx_rows_run, gh + r0 * dystride, dystride,
                         xh ? xh + r0 * xstride : NULL, xstride, qh + r0 * dxstride,
                         dxstride, k, lead, mh, ah, f1h, f2h, 0, 0);
        BNF_DISPATCH(dx_rows_run, dy + r0 * dystride, dystride, x ? x + r0 * xstride : NULL,
                     xstride, staged ? tmp : dx + r0 * dxstride, staged ? width : dxstride, k,
                     width, mean, a, k1, k2, cached ? 0 : nrows - r0,
                     bnf_dx_nt(nt, width * (ptrdiff_t)sizeof(T), flags));
        if (staged)
            bnf_stage_out(dx + r0 * dxstride, tmp, k * width * (ptrdiff_t)sizeof(T), stream);
    }
}

/* dx of contiguous wide rows, streamed, as norm_rows_grouped_wide: groups of rows in
 * column blocks, a row at a time, the blocks' factors (32 bytes a column) in L1, the
 * next group's dy and x prefetched into L2.  The same bits as any other form.  Returns
 * 0, with nothing done, where the factors' buffers cannot be had. */
static inline BNF_INLINE int BNF_NAME(bwd_dx_rows_grouped_wide)(const T *dy, const T *x, T *dx,
                                                               ptrdiff_t nrows,
                                                               ptrdiff_t width,
                                                               const double *mean,
                                                               const double *a,
                                                               const double *k1,
                                                               const double *k2)
{
    ptrdiff_t line = 64 / (ptrdiff_t)sizeof(T), row = width * (ptrdiff_t)sizeof(T);
    ptrdiff_t lead = bnf_nt_lead(dx, sizeof(T)), tail = (width - lead) % line;
    ptrdiff_t mid = width - lead - tail, narr = x ? 2 : 1;
    /* a group of about BNF_WIDE_GROUP_BYTES of dy and x together */
    ptrdiff_t group = BNF_WIDE_GROUP_BYTES / (narr * row) > 1
                          ? BNF_WIDE_GROUP_BYTES / (narr * row) : 1;
    ptrdiff_t nblocks = (mid + BNF_WIDE_BLOCK_COLS - 1) / BNF_WIDE_BLOCK_COLS;
    ptrdiff_t done_g = 0, done_x = 0;
    double *heap = (double *)bnf_kernel_alloc64((x ? 4 : 1) * (size_t)mid * sizeof(double));
    if (!heap) return 0;
    double *fa = heap, *fm = x ? heap + mid : NULL, *f1 = x ? heap + 2 * mid : NULL,
           *f2 = x ? heap + 3 * mid : NULL;
    memcpy(fa, a + lead, (size_t)mid * sizeof(double));
    if (x) {
        memcpy(fm, mean + lead, (size_t)mid * sizeof(double));
        memcpy(f1, k1 + lead, (size_t)mid * sizeof(double));
        memcpy(f2, k2 + lead, (size_t)mid * sizeof(double));
    }
    bnf_pf_share(dy, (nrows < group ? nrows : group) * row, BNF_WIDE_GROUP_BYTES, &done_g);
    if (x)
        bnf_pf_share(x, (nrows < group ? nrows : group) * row, BNF_WIDE_GROUP_BYTES, &done_x);
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += group) {
        ptrdiff_t k = nrows - r0 < group ? nrows - r0 : group;
        ptrdiff_t next = nrows - r0 - k < group ? nrows - r0 - k : group;
        const T *gg = dy + r0 * width, *xg = x ? x + r0 * width : NULL;
        T *qg = dx + r0 * width;
        ptrdiff_t share = (next * row / nblocks + BNF_LINE - 1) / BNF_LINE * BNF_LINE;
        done_g = done_x = 0;
        if (lead)
            BNF_DISPATCH(dx_rows_run, gg, width, xg, width, qg, width, k, lead, mean, a, k1,
                         k2, 0, 0);
        for (ptrdiff_t c0 = 0; c0 < mid; c0 += BNF_WIDE_BLOCK_COLS) {
            ptrdiff_t w = mid - c0 < BNF_WIDE_BLOCK_COLS ? mid - c0 : BNF_WIDE_BLOCK_COLS;
            bnf_pf_share(gg + k * width, next * row, share, &done_g);
            if (x) bnf_pf_share(xg + k * width, next * row, share, &done_x);
            BNF_DISPATCH(dx_rows_run, gg + lead + c0, width, xg ? xg + lead + c0 : NULL, width,
                         qg + lead + c0, width, k, w, x ? fm + c0 : NULL, fa + c0,
                         x ? f1 + c0 : NULL, x ? f2 + c0 : NULL, 0, 2);
        }
        if (tail)
            BNF_DISPATCH(dx_rows_run, gg + width - tail, width, xg ? xg + width - tail : NULL,
                         width, qg + width - tail, width, k, tail,
                         x ? mean + width - tail : NULL, a + width - tail,
                         x ? k1 + width - tail : NULL, x ? k2 + width - tail : NULL, 0, 0);
    }
    bnf_free64(heap);
    return 1;
}

/* Wide rows go one block of BNF_WIDE_COLS columns at a time over all the rows, as in
 * bnf_norm_rows. */
static inline BNF_INLINE void BNF_NAME(bwd_dx_rows_cols)(const T *dy, ptrdiff_t dystride,
                                                        const T *x, ptrdiff_t xstride, T *dx,
                                                        ptrdiff_t dxstride, ptrdiff_t nrows,
                                                        ptrdiff_t width, const double *mean,
                                                        const double *a, const double *k1,
                                                        const double *k2, int flags)
{
    ptrdiff_t step = bnf_wide_step(width, sizeof(T));
    ptrdiff_t row = width * (ptrdiff_t)sizeof(T);
    if (dystride == width && (!x || xstride == width) && dxstride == width &&
        bnf_grouped_wide(width, sizeof(T), flags) && BNF_DIRECT_NT(3) && row % 64 == 0 &&
        (!x || 4 * row <= BNF_WIDE_GROUP_BYTES) &&      /* two rows of dy and x a group */
        !bnf_rows_aliased(dx, dy, row, BNF_T_HALF) &&
        !bnf_rows_aliased(dx, x, row, BNF_T_HALF) &&
        BNF_NAME(bwd_dx_rows_grouped_wide)(dy, x, dx, nrows, width, mean, a, k1, k2))
        return;
    if (step < width && dystride == width && (!x || xstride == width) && dxstride == width &&
        bnf_wide_flat(width, flags) && BNF_FLAT_NT(width, BNF_DIRECT_NT(3)) &&
        !bnf_rows_aliased(dx, dy, row, BNF_T_HALF) && !bnf_rows_aliased(dx, x, row, BNF_T_HALF) &&
        BNF_NAME(dx_rows_flat)(dy, x, dx, nrows, width, mean, a, k1, k2, flags))
        return;
    for (ptrdiff_t c0 = 0; c0 < width; c0 += step) {
        ptrdiff_t w = width - c0 < step ? width - c0 : step;
        BNF_NAME(dx_rows_block)(dy + c0, dystride, x ? x + c0 : NULL, xstride, dx + c0,
                                dxstride, nrows, w, mean + c0, a + c0, k1 + c0, k2 + c0,
                                flags);
    }
}

/* group > 1: channels of short runs as rows (bnf_norm_rows). */
static BNF_CLONES BNF_NOINLINE void BNF_NAME(bwd_dx_rows_grouped)(
    const T *dy, ptrdiff_t dystride, const T *x, ptrdiff_t xstride, T *dx, ptrdiff_t dxstride,
    ptrdiff_t nrows, ptrdiff_t width, ptrdiff_t group, const double *mean, const double *a,
    const double *k1, const double *k2, int flags)
{
    BNF_ALIGN64 double fa[BNF_CHUNK], m[BNF_CHUNK], f1[BNF_CHUNK], f2[BNF_CHUNK];
    double *dst[4] = {fa, m, f1, f2};
    const double *src[4] = {a, mean, k1, k2};
    ptrdiff_t per = bnf_group_block(BNF_CHUNK, group);
    for (ptrdiff_t c0 = 0; c0 < width; c0 += per) {
        ptrdiff_t w = width - c0 < per ? width - c0 : per;
        bnf_spread_factors(dst, src, x ? 4 : 1, c0, w, group);
        BNF_NAME(bwd_dx_rows_cols)(dy + c0 * group, dystride, x ? x + c0 * group : NULL,
                                   xstride, dx + c0 * group, dxstride, nrows, w * group, m,
                                   fa, f1, f2, flags);
    }
}

BNF_CLONES void BNF_NAME(bnf_bwd_dx_rows)(const T *dy, ptrdiff_t dystride, const T *x,
                                          ptrdiff_t xstride, T *dx, ptrdiff_t dxstride,
                                          ptrdiff_t nrows, ptrdiff_t width, ptrdiff_t group,
                                          const double *mean, const double *a,
                                          const double *k1, const double *k2, int flags)
{
    if (group > 1)
        BNF_NAME(bwd_dx_rows_grouped)(dy, dystride, x, xstride, dx, dxstride, nrows, width,
                                      group, mean, a, k1, k2, flags);
    else
        BNF_NAME(bwd_dx_rows_cols)(dy, dystride, x, xstride, dx, dxstride, nrows, width,
                                   mean, a, k1, k2, flags);
}

#undef BNF_STATS_BUFS
#undef BNF_DISPATCH
#undef BNF_DISPATCH4
#undef BNF_NORM_NT
#undef BNF_NAME
#undef BNF_CAT
#undef BNF_CAT2
#undef T
#undef S
#undef BNF_TO_D
#undef BNF_FROM_D
#undef BNF_T_FLOAT
#undef BNF_T_HALF
#undef BNF_REDO_RATIO
#undef BNF_TILE_REDO
#undef BNF_COMPENSATED
#undef BNF_LO
#undef BNF_ADD_LO

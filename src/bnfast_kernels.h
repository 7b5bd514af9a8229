/* bnfast C inner loops.
 *
 * Every kernel works on one "unit" of a 3-D view (outer, C, inner) of an array:
 *   - runs form  (inner > 1, inner contiguous): one channel, `nruns` runs of `len`
 *     contiguous elements, `stride` elements apart (NCHW, NCL, Fortran (N, C), ...);
 *   - rows form  (inner == 1, channels contiguous): a block of `width` channels over
 *     `nrows` rows, `stride` elements apart (NHWC, (samples, features), ...).
 * The Cython layer splits an array into units, runs them in an OpenMP loop and merges
 * the per-unit results in a fixed order, so results do not depend on the thread count.
 *
 * `flags` (normalize and dx kernels): BNF_STREAM writes the output with non-temporal
 * stores, for outputs larger than the caches; BNF_CACHED says the inputs were just read
 * (a fused unit's second pass), so the kernel issues no prefetches.
 *
 * Rows form: a channel's statistics depend on `tile_rows` and on where the unit starts,
 * never on `width`, so a caller may cut the channels into blocks of any width (one per
 * thread) without changing a bit.
 *
 * Numerics: statistics accumulate in double with a fixed lane structure (independent of
 * the SIMD width chosen at run time), two passes per cache-resident tile, tiles merged
 * with Chan's formula.  The mean is carried as hi + lo (double-double-like); the
 * normalization is (x - hi) * scale + (shift - lo * scale) in double, rounded once to
 * the output type: the offset hi is removed exactly before any scaling.  Built with
 * -ffp-contract=off, so every ISA gives the same bits.
 *
 * Element types: float (_f32), double (_f64), and float16 as its bits (uint16_t, _f16),
 * read exactly and computed as float data are: results rounded to float, then to
 * float16 (the bits of converting the data to float first).
 */
#ifndef BNFAST_KERNELS_H
#define BNFAST_KERNELS_H

/* -ffast-math (from a user's CFLAGS) breaks what the kernels promise: NaN and inf
 * handling (finite-math-only), the exact sums (reassociation), and at link time it sets
 * flush-to-zero process-wide.  Refused rather than built wrong. */
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "bnfast must not be built with -ffast-math or -ffinite-math-only (check CFLAGS and BNFAST_EXTRA_CFLAGS): they break its NaN/inf handling and exact sums"
#endif

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Moments of one channel over some elements: count, mean = hi + lo, m2 = sum (x - mean)^2. */
typedef struct {
    double n, hi, lo, m2;
} bnf_moments;

#define BNF_STREAM 1
#define BNF_CACHED 2
/* an output not streamed, too large to stay in cache beside its inputs: where it lies
 * near an input it is staged all the same (bnf_nt_aliased, bnf_stage_out) */
#define BNF_STAGE_NEAR 8
/* bnf_norm_runs: x_next (k_next channels) is only prefetched into L2 as this block is
 * normalized from cache, not summed */
#define BNF_FETCH_NEXT 4
/* bnf_stats_rows, bnf_bwd_sums_rows: the arrays read are larger than the caches, read
 * from DRAM: the rows are prefetched further ahead, into L2 as well as L1; bnf_norm_runs:
 * the statistics of x_next likewise */
#define BNF_FROM_DRAM 16
/* bnf_bwd_dx_runs: only dy_next is prefetched, x_next was by the block's sums
 * (bnf_bwd_sums_runs given x_next) */
#define BNF_SPLIT_NEXT 32
/* bnf_bwd_sums_rows (and bnf_bwd_sums_dx_rows) from DRAM: the rows summed four at a time
 * however wide (whole wide rows a unit: bnfast._core's _full_rows) */
#define BNF_WIDE_QUADS 64
/* ... or a row at a time: the call's columns are part of rows of BNF_ROWWISE_MIN_BYTES or
 * more (short runs read as rows: all the channels' runs), however few they are */
#define BNF_ROWS_WIDE 128
/* ... or four rows a quarter of the call's rows apart (bnf_sums_spacing in
 * bnfast_kernels.c; float32 training backward sums from DRAM on Zen 3: bnfast._core's
 * _spaced_quads) */
#define BNF_SPACED_QUADS 256
/* From DRAM the backward sums of rows of this many bytes or more go a row at a time
 * (bnf_sums_rowwise in bnfast_kernels.c) */
#define BNF_ROWWISE_MIN_BYTES 512

/* Widest channel block the rows-form kernels accept (stack scratch is sized by it), and
 * the width of the blocks the reductions over wider rows take.  512, not 256: rows of
 * 257-512 channels are then one block, read whole (Zen 4, one thread, 51 MB float32,
 * three alternated processes: (N, 384) moments 0.46-0.50 -> 0.24-0.29 ns an element,
 * training 0.67-0.84 -> 0.46-0.47; (N, 512) 0.42-0.47 -> 0.27-0.31 and 0.67-0.75 ->
 * 0.49-0.65; (N, 1024) unchanged). 1024 measured slower at 1024 channels. */
#define BNF_MAX_WIDTH 512
/* Columns of a block of short runs read as rows (group > 1): 512. Against 256, one
 * thread, Zen 4, float32: (256, 512, 7, 7) backward 0.80x the time, (64, 512, 7, 7)
 * training 0.88x (a unit reads a row's piece of 490 columns, not 245: twice the bytes
 * per DRAM page opened). */
#define BNF_GROUP_COLS 512
/* ... and of narrow rows folded together (bnf_fold_rows): 256, as measured for them. */
#define BNF_FOLD_COLS 256
/* Most channels in a block of runs whose sums a call takes (bnf_norm_runs' next block,
 * bnf_bwd_sums_runs): their lanes are on the stack. */
#define BNF_BLOCK_CHANNELS 32
/* Bytes of x (and of dy) a block of bnf_train_runs_cached (bnf_bwd_runs_cached) takes:
 * its statistics (sums), then its normalization (dx) from L1. */
#define BNF_CACHED_RUNS_BYTES (16 * 1024)
/* Elements per chunk staged in L1 before a streaming store (and the widest block of
 * columns the rows-form normalize and dx take at once). */
#define BNF_CHUNK 1024
/* Elements per cache-resident tile of the two-pass statistics. */
#define BNF_TILE_ELEMS 32768

/* Short runs read as rows (group > 1, the rows kernels): channels per block of at most
 * `cols` columns, whole lines of them when that leaves at least one line. */
static inline ptrdiff_t bnf_group_block(ptrdiff_t cols, ptrdiff_t group)
{
    ptrdiff_t per = cols / group, line = 16;
    while (line > 1 && group % 2 == 0 && line % 2 == 0) group /= 2, line /= 2;
    if (per >= line) per -= per % line;
    return per < 1 ? 1 : per;
}

/* Contiguous rows narrower than this are folded, k rows read as one row of k * width
 * columns (the rows kernels' reductions; a vector of columns per row otherwise leaves
 * most lanes in scalar tails: NHWC with 3 channels trained at 3.8x a copy). */
#define BNF_FOLD_WIDTH 32
/* The statistics fold from this many elements: merging a channel's columns costs ~2.5 us
 * ((128, 16) trained 4.7 -> 7.1 us folded). */
#define BNF_FOLD_MIN_STATS 16384
/* Rows per folded row: 0 (no folding) from BNF_FOLD_WIDTH on. */
static inline ptrdiff_t bnf_fold_rows(ptrdiff_t width)
{
    return width > 0 && width < BNF_FOLD_WIDTH ? BNF_FOLD_COLS / width : 0;
}
/* The backward sums fold, and dx runs flat (dx_rows_flat), from 2048 elements, or 8192
 * when the rows fill whole vectors of 8: below, repeating the factors costs more than
 * the scalar tails it saves ((128, 16) backward 6.3 -> 7.6 us; (1000, 3) 27 -> 9 us). */
static inline int bnf_fold_pays(ptrdiff_t nrows, ptrdiff_t width)
{
    return bnf_fold_rows(width) && nrows * width >= (width % 8 ? 2048 : 8192);
}

/* s + lo += v, compensated: lo collects the rounding error of the add to s (Knuth's
 * TwoSum, exact for any magnitudes; needs -ffp-contract=off).  Used where many parts are
 * summed: a kernel's merges below, and the float64 sums of squares (BNF_COMPENSATED in
 * bnfast_kernels.c has why). */
static inline void bnf_two_sum(double *s, double *lo, double v)
{
    double t = *s + v, z = t - *s;
    *lo += (*s - (t - z)) + (v - z);
    *s = t;
}

/* A compensated sum s + lo as one double.  An infinite part makes lo NaN (inf - inf in
 * bnf_two_sum) while s holds the plain sum's inf or NaN: then s, as plain sums give. */
static inline double bnf_fold_lo(double s, double lo)
{
    return lo - lo == 0 ? s + lo : s;
}

/* A shift to sum a channel's elements about: s, or alt where s is not finite.  Where a
 * channel holds an infinity its mean so far is one, and x - inf made its later sums
 * NaN, as an infinity first in a channel made all of them (np.mean and PyTorch's mean
 * are that infinity). */
static inline double bnf_finite_or(double s, double alt)
{
    return s - s == 0 ? s : alt;
}

/* The low part of a merged mean (hi stays the first part's): lo + delta * ratio, or,
 * where delta is not finite (a part's mean is an infinity: lo + delta * ratio was
 * inf - inf), the sum of the parts' means less hi, as a plain sum gives: the infinity,
 * or NaN where +inf and -inf meet.  Finite data take the first form: the same bits. */
static inline double bnf_merged_lo(double lo, double delta, double ratio, double dhi,
                                   double lo_b)
{
    return delta - delta == 0 ? lo + delta * ratio : lo + (dhi + lo_b);
}

/* Merge b into a (Chan et al.); exact when either part is empty.  m2lo (or NULL): a->m2
 * compensated, its rounding errors collected there (bnf_two_sum) for the caller to add
 * at the end: a kernel's tiles merged one after another (a 2M-element channel, 61
 * tiles, put m2 4 ulps off plainly; compensated, within one). */
static inline void bnf_moments_merge_lo(bnf_moments *a, double *m2lo, const bnf_moments *b)
{
    if (b->n == 0) return;
    if (a->n == 0) {
        *a = *b;
        return;
    }
    double n = a->n + b->n;
    /* hi stays the first part's; lo absorbs the shift, so the mean keeps ~twice double
     * precision when the parts' means are close (prices). */
    double delta = (b->hi - a->hi) + (b->lo - a->lo);
    a->lo = bnf_merged_lo(a->lo, delta, b->n / n, b->hi - a->hi, b->lo);
    double v = b->m2 + delta * delta * (a->n * (b->n / n));
    if (m2lo)
        bnf_two_sum(&a->m2, m2lo, v);
    else
        a->m2 += v;
    a->n = n;
}

static inline void bnf_moments_merge(bnf_moments *a, const bnf_moments *b)
{
    bnf_moments_merge_lo(a, NULL, b);
}


/* The intrinsics inner loops: level 4 (x86-64-v4, AVX-512), 3 (x86-64-v3, AVX2) or 0
 * (the plain loops), capped at what the CPU supports; -1 only asks.  Returns the
 * previous level.  The default is the highest supported.  For tests and benchmarks:
 * every level gives the same bits. */
int bnf_set_simd_level(int level);
/* Whether the intrinsics backward sums of runs add by multiply-adds (on: 1, off: 0, -1
 * leaves it): the previous setting.  Set by CPU vendor at load (tuning, tests). */
int bnf_set_adds_as_fma(int on);
/* Whether AVX2 (level 3) normalizes float and double by its intrinsics loops (on: 1, off:
 * 0, -1 leaves it): the previous setting.  Set by CPU vendor at load (tuning, tests; the
 * same bits either way). */
int bnf_set_norm_v3(int on);
/* Whether plain stores of the rows forms are put on lines (on: 1, off: 0, -1 leaves it):
 * the previous setting (tuning, tests; the same bits either way). */
int bnf_set_store_lines(int on);
/* Whether the AVX-512 rows loops end rows with one masked vector, and streamed runs take
 * their heads and tails by masked vectors (on: 1, off: 0, -1 leaves it): the previous
 * setting (tuning, tests; the same bits either way). */
int bnf_set_masked_tails(int on);
/* Whether eval-mode backward stores dx as its sums read dy, in one pass
 * (bnf_bwd_sums_dx_rows, bnf_bwd_sums_dx_runs; tuning, tests: the same bits either way). */
int bnf_set_fuse_sums_dx(int on);
/* Streamed dx of rows of at least n bytes a row at a time, not four, from DRAM (the dx
 * flags' BNF_FROM_DRAM) or not (-1 leaves it): the previous value (tuning, tests; the
 * same bits either way). */
ptrdiff_t bnf_set_dx_in_order_bytes(ptrdiff_t n, int from_dram);
/* ... and the streamed normalize of rows a multiple of n bytes apart (0: all; -1 leaves
 * it). */
ptrdiff_t bnf_set_norm_in_order_bytes(ptrdiff_t n);
/* Whether contiguous rows that do not fill whole lines go as runs of several rows that
 * do, streamed or in cache (on: 1, off: 0, -1 leaves it): the previous setting (tuning,
 * tests; the same bits either way). */
int bnf_set_flat_whole_lines(int on);
/* Whether contiguous rows wider than a chunk, streamed, are normalized (dx computed)
 * whole rows at a time, one flat run (1), or in blocks of columns (0; -1 leaves it): the
 * previous setting (tuning, tests: the same bits either way). */
int bnf_set_wide_flat(int on);
int bnf_set_grouped_wide(int on);
/* The widest rows (bytes) that a kind of rows loop from DRAM prefetches rows ahead into
 * L1 (wider: into L2 only): the reductions, the normalize, dx. */
#define BNF_L1_REDUCE 0
#define BNF_L1_NORM 1
#define BNF_L1_DX 2
#define BNF_L1_KINDS 3
ptrdiff_t bnf_set_l1_rows_max(int kind, ptrdiff_t n);
int bnf_set_stats_spaced(int on);
/* 1 on an AMD CPU (the tuning choices that differ by vendor) */
int bnf_cpu_amd(void);
/* The L1 data cache of a core in bytes, as the C library reports it (32 KB where it
 * does not): the widest rows whose per-column state stays in L1 (_full_rows). */
long bnf_l1d_bytes(void);
/* Tests: while on, the kernels' own heap buffers (factors repeated along a flat run,
 * moments and sums of rows wider than BNF_MAX_WIDTH) fail as when out of memory, so
 * that their fallbacks run (the same bits); the previous setting. */
int bnf_set_kernel_alloc_fails(int on);

/* 64-byte-aligned memory for per-channel arrays (the rows kernels read them as 64-byte
 * vectors); NULL when out of memory.  Free with bnf_free64. */
void *bnf_alloc64(size_t bytes);
void bnf_free64(void *p);

/* Order the streaming stores of this thread before later stores (call once per unit). */
void bnf_stream_fence(void);

/* The work units' parts merged into the first C entries, each channel's in unit order
 * (parts of unit sb at sb * C): moments (bnf_moments_merge_lo, m2 compensated), and the
 * backward sums (sum dy and sum dy (x - mean) compensated by bnf_two_sum, sum (x - mean)
 * plain). */
void bnf_merge_unit_moments(bnf_moments *mom, ptrdiff_t C, ptrdiff_t nsb);
/* bnf_moments_merge_lo of b[c] into a[c], m2lo[c] for w channels whose parts all hold
 * na (> 0) and nb elements, the count ratios computed once: the same values. */
void bnf_merge_same_counts(bnf_moments *a, double *m2lo, const bnf_moments *b, ptrdiff_t w,
                           double na, double nb);
void bnf_merge_unit_sums(double *sum_dy, double *sum_dy_xmu, double *sum_xmu, ptrdiff_t C,
                         ptrdiff_t nsb);

/* Name of the SIMD ISA the kernels dispatch to on this CPU. */
const char *bnf_simd_isa(void);
/* How the kernels' fused multiply-adds run here: the instruction or libm's fma(). */
const char *bnf_fma_kind(void);

/* Per-channel helpers: widen float32 (or gather float64) values `stride` bytes apart into
 * contiguous doubles; eval factors scale[i] /= sqrt(var[i] + eps), returning the first
 * negative variance's index (nothing written) or -1. */
void bnf_widen_f32(const char *src, ptrdiff_t stride, double *dst, ptrdiff_t n);
/* ... and float16 (as its bits), exactly. */
void bnf_widen_f16(const char *src, ptrdiff_t stride, double *dst, ptrdiff_t n);
/* float16 (as its bits) <-> float32, n contiguous elements: round to nearest even. */
void bnf_half_to_float(const uint16_t *src, float *dst, ptrdiff_t n);
void bnf_float_to_half(const float *src, uint16_t *dst, ptrdiff_t n);
/* One value each way, for per-channel buffers (float16 running statistics): exact, and
 * rounded once to nearest (NumPy's conversion), not through a float's rounding. */
double bnf_half_to_double(uint16_t h);
uint16_t bnf_double_to_half(double d);
void bnf_gather_f64(const char *src, ptrdiff_t stride, double *dst, ptrdiff_t n);
ptrdiff_t bnf_eval_scale(double *scale, const double *var, ptrdiff_t n, double eps);

/* Normalization factors of n channels from their moments (see bnfast_kernels.c). */
void bnf_finalize(const bnf_moments *m, ptrdiff_t n, double eps, const double *weight,
                  double *hi, double *lo, double *invstd, double *scale, double *shift,
                  double *var);
/* A training call's outputs of C channels after bnf_finalize: mean hi + lo, invstd, and
 * the variance for the running update (var n / (n - 1) where unbiased). */
void bnf_train_outputs(ptrdiff_t C, double n, int unbiased, const double *hi, const double *lo,
                       const double *invstd, const double *var, double *mean_out,
                       double *invstd_out, double *running_var);
/* The dx coefficients of C channels from their backward sums (training mode; see
 * bnfast_kernels.c): lo, k1, k2, and sum_dy_xmu moved onto the mean hi + lo. */
void bnf_bwd_coeffs(ptrdiff_t C, double n, const double *hi, const double *invstd,
                    const double *sum_dy, double *sum_dy_xmu, const double *sum_xmu,
                    double *lo, double *k1, double *k2);

#define BNF_DECLARE(T, S)                                                                 \
    void bnf_stats_runs_##S(const T *x, ptrdiff_t nruns, ptrdiff_t stride, ptrdiff_t len, \
                            bnf_moments *m, int flags);                                   \
    void bnf_stats_rows_##S(const T *x, ptrdiff_t nrows, ptrdiff_t stride,                \
                            ptrdiff_t width, ptrdiff_t group, ptrdiff_t tile_rows,        \
                            bnf_moments *m, int flags);                                   \
    void bnf_bwd_runs_cached_##S(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs,        \
                                 const T *x, ptrdiff_t xstride, ptrdiff_t xcs, T *dx,     \
                                 ptrdiff_t dxstride, ptrdiff_t dxcs, ptrdiff_t nruns,     \
                                 ptrdiff_t len, ptrdiff_t k, int training, double n,      \
                                 const double *mean, const double *invstd,                \
                                 const double *scale, double *sum_dy, double *sum_dy_xmu, \
                                 double *sum_xmu, double *lo, double *k1, double *k2,     \
                                 int flags);                                              \
    void bnf_train_runs_cached_##S(const T *x, ptrdiff_t xstride, ptrdiff_t xcs, T *y,   \
                                   ptrdiff_t ystride, ptrdiff_t ycs, ptrdiff_t nruns,     \
                                   ptrdiff_t len, ptrdiff_t k, double eps,                \
                                   const double *weight, double *hi, double *lo,          \
                                   double *invstd, double *scale, double *shift,          \
                                   double *var, bnf_moments *m, int flags);               \
    void bnf_norm_runs_##S(const T *x, ptrdiff_t xstride, ptrdiff_t xcs, T *y,           \
                           ptrdiff_t ystride, ptrdiff_t ycs, ptrdiff_t nruns,             \
                           ptrdiff_t len, ptrdiff_t k, const double *mean,                \
                           const double *scale, const double *shift, int flags,           \
                           const T *x_next, ptrdiff_t k_next, bnf_moments *m_next);       \
    void bnf_norm_rows_##S(const T *x, ptrdiff_t xstride, T *y, ptrdiff_t ystride,        \
                           ptrdiff_t nrows, ptrdiff_t width, ptrdiff_t group,             \
                           const double *mean, const double *scale, const double *shift,  \
                           int flags);                                                    \
    void bnf_bwd_sums_runs_##S(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs,          \
                               const T *x, ptrdiff_t xstride, ptrdiff_t xcs,              \
                               ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k,               \
                               const double *mean, double *sum_dy, double *sum_dy_xmu,    \
                               double *sum_xmu, const T *x_next, ptrdiff_t k_next);       \
    void bnf_bwd_sums_rows_##S(const T *dy, ptrdiff_t dystride, const T *x,               \
                               ptrdiff_t xstride, ptrdiff_t nrows, ptrdiff_t width,       \
                               ptrdiff_t group, const double *mean, double *sum_dy,       \
                               double *sum_dy_xmu, double *sum_xmu, int flags);           \
    int bnf_bwd_sums_dx_rows_##S(const T *dy, ptrdiff_t dystride, const T *x,             \
                                 ptrdiff_t xstride, T *dx, ptrdiff_t dxstride,            \
                                 ptrdiff_t nrows, ptrdiff_t width, ptrdiff_t group,       \
                                 const double *mean, const double *a, double *sum_dy,     \
                                 double *sum_dy_xmu, double *sum_xmu, int flags);         \
    int bnf_bwd_sums_dx_runs_##S(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs,        \
                                 const T *x, ptrdiff_t xstride, ptrdiff_t xcs, T *dx,     \
                                 ptrdiff_t dxstride, ptrdiff_t dxcs, ptrdiff_t nruns,     \
                                 ptrdiff_t len, ptrdiff_t k, const double *mean,          \
                                 const double *a, double *sum_dy, double *sum_dy_xmu,     \
                                 double *sum_xmu, int flags);                             \
    void bnf_bwd_dx_runs_##S(const T *dy, ptrdiff_t dystride, ptrdiff_t dycs, const T *x, \
                             ptrdiff_t xstride, ptrdiff_t xcs, T *dx, ptrdiff_t dxstride, \
                             ptrdiff_t dxcs, ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k, \
                             const double *mean, const double *a, const double *k1,       \
                             const double *k2, int flags, const T *dy_next,               \
                             const T *x_next, ptrdiff_t k_next);                          \
    void bnf_bwd_dx_rows_##S(const T *dy, ptrdiff_t dystride, const T *x,                 \
                             ptrdiff_t xstride, T *dx, ptrdiff_t dxstride,                \
                             ptrdiff_t nrows, ptrdiff_t width, ptrdiff_t group,           \
                             const double *mean, const double *a, const double *k1,       \
                             const double *k2, int flags);

BNF_DECLARE(float, f32)
BNF_DECLARE(double, f64)
BNF_DECLARE(uint16_t, f16) /* float16, as its bits */

#undef BNF_DECLARE

/* Rows of `nch` runs of `run` bytes, `channel_stride` bytes apart, rows `row_stride`
 * bytes apart, packed into rows of nch * run bytes at dst (and back): channels whose
 * short runs are not back to back go through the rows kernels this way. */
void bnf_copy_2d(char *dst, ptrdiff_t dst_rs, ptrdiff_t dst_cs, const char *src,
                 ptrdiff_t src_rs, ptrdiff_t src_cs, ptrdiff_t rows, ptrdiff_t cols,
                 ptrdiff_t size);
void bnf_pack_runs(char *dst, const char *src, ptrdiff_t nrows, ptrdiff_t row_stride,
                   ptrdiff_t nch, ptrdiff_t channel_stride, ptrdiff_t run);
void bnf_unpack_runs(char *dst, const char *src, ptrdiff_t nrows, ptrdiff_t row_stride,
                     ptrdiff_t nch, ptrdiff_t channel_stride, ptrdiff_t run);

/* The same kernels by element type, `type` one of these (x, y, dy, dx of that type):
 * what the Cython layer calls, the one place that dispatches on the type.  Inline: an
 * out-of-line call measured ~15 ns a kernel on a (1, 64) call of 340. */
enum { BNF_F32 = 0, BNF_F64 = 1, BNF_F16 = 2 };
#define BNF_BY_TYPE(type, CALL)                    \
    switch (type) {                                \
    case BNF_F64: CALL(double, f64); break;        \
    case BNF_F16: CALL(uint16_t, f16); break;      \
    default: CALL(float, f32); break;              \
    }

static inline void bnf_stats_runs(int type, const void *x, ptrdiff_t nruns,
                                  ptrdiff_t stride, ptrdiff_t len, bnf_moments *m, int flags)
{
#define CALL(T, S) bnf_stats_runs_##S((const T *)x, nruns, stride, len, m, flags)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}

static inline void bnf_stats_rows(int type, const void *x, ptrdiff_t nrows,
                                  ptrdiff_t stride, ptrdiff_t width, ptrdiff_t group,
                                  ptrdiff_t tile_rows, bnf_moments *m, int flags)
{
#define CALL(T, S) \
    bnf_stats_rows_##S((const T *)x, nrows, stride, width, group, tile_rows, m, flags)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}

static inline void bnf_bwd_runs_cached(int type, const void *dy, ptrdiff_t dystride,
                                       ptrdiff_t dycs, const void *x, ptrdiff_t xstride,
                                       ptrdiff_t xcs, void *dx, ptrdiff_t dxstride,
                                       ptrdiff_t dxcs, ptrdiff_t nruns, ptrdiff_t len,
                                       ptrdiff_t k, int training, double n,
                                       const double *mean, const double *invstd,
                                       const double *scale, double *sum_dy,
                                       double *sum_dy_xmu, double *sum_xmu, double *lo,
                                       double *k1, double *k2, int flags)
{
#define CALL(T, S)                                                                          \
    bnf_bwd_runs_cached_##S((const T *)dy, dystride, dycs, (const T *)x, xstride, xcs,       \
                            (T *)dx, dxstride, dxcs, nruns, len, k, training, n, mean,       \
                            invstd, scale, sum_dy, sum_dy_xmu, sum_xmu, lo, k1, k2, flags)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}

static inline void bnf_train_runs_cached(int type, const void *x, ptrdiff_t xstride,
                                         ptrdiff_t xcs, void *y, ptrdiff_t ystride,
                                         ptrdiff_t ycs, ptrdiff_t nruns, ptrdiff_t len,
                                         ptrdiff_t k, double eps, const double *weight,
                                         double *hi, double *lo, double *invstd,
                                         double *scale, double *shift, double *var,
                                         bnf_moments *m, int flags)
{
#define CALL(T, S)                                                                         \
    bnf_train_runs_cached_##S((const T *)x, xstride, xcs, (T *)y, ystride, ycs, nruns, len, \
                              k, eps, weight, hi, lo, invstd, scale, shift, var, m, flags)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}

static inline void bnf_norm_runs(int type, const void *x, ptrdiff_t xstride, ptrdiff_t xcs,
                                 void *y, ptrdiff_t ystride, ptrdiff_t ycs, ptrdiff_t nruns,
                                 ptrdiff_t len, ptrdiff_t k, const double *mean,
                                 const double *scale, const double *shift, int flags,
                                 const void *x_next, ptrdiff_t k_next, bnf_moments *m_next)
{
#define CALL(T, S)                                                                      \
    bnf_norm_runs_##S((const T *)x, xstride, xcs, (T *)y, ystride, ycs, nruns, len, k,   \
                      mean, scale, shift, flags, (const T *)x_next, k_next, m_next)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}

static inline void bnf_norm_rows(int type, const void *x, ptrdiff_t xstride, void *y,
                                 ptrdiff_t ystride, ptrdiff_t nrows, ptrdiff_t width,
                                 ptrdiff_t group, const double *mean, const double *scale,
                                 const double *shift, int flags)
{
#define CALL(T, S)                                                                      \
    bnf_norm_rows_##S((const T *)x, xstride, (T *)y, ystride, nrows, width, group, mean, \
                      scale, shift, flags)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}

static inline void bnf_bwd_sums_runs(int type, const void *dy, ptrdiff_t dystride,
                                     ptrdiff_t dycs, const void *x, ptrdiff_t xstride,
                                     ptrdiff_t xcs, ptrdiff_t nruns, ptrdiff_t len,
                                     ptrdiff_t k, const double *mean, double *sum_dy,
                                     double *sum_dy_xmu, double *sum_xmu, const void *x_next,
                                     ptrdiff_t k_next)
{
#define CALL(T, S)                                                                      \
    bnf_bwd_sums_runs_##S((const T *)dy, dystride, dycs, (const T *)x, xstride, xcs,     \
                          nruns, len, k, mean, sum_dy, sum_dy_xmu, sum_xmu,              \
                          (const T *)x_next, k_next)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}

static inline void bnf_bwd_sums_rows(int type, const void *dy, ptrdiff_t dystride,
                                     const void *x, ptrdiff_t xstride, ptrdiff_t nrows,
                                     ptrdiff_t width, ptrdiff_t group, const double *mean,
                                     double *sum_dy, double *sum_dy_xmu, double *sum_xmu,
                                     int flags)
{
#define CALL(T, S)                                                                      \
    bnf_bwd_sums_rows_##S((const T *)dy, dystride, (const T *)x, xstride, nrows, width, \
                          group, mean, sum_dy, sum_dy_xmu, sum_xmu, flags)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}

/* 1 where the sums and dx = a * dy went in one pass; 0: nothing done (see
 * bnfast_kernels_impl.h) */
static inline int bnf_bwd_sums_dx_rows(int type, const void *dy, ptrdiff_t dystride,
                                       const void *x, ptrdiff_t xstride, void *dx,
                                       ptrdiff_t dxstride, ptrdiff_t nrows, ptrdiff_t width,
                                       ptrdiff_t group, const double *mean, const double *a,
                                       double *sum_dy, double *sum_dy_xmu, double *sum_xmu,
                                       int flags)
{
#define CALL(T, S)                                                                        \
    return bnf_bwd_sums_dx_rows_##S((const T *)dy, dystride, (const T *)x, xstride,      \
                                    (T *)dx, dxstride, nrows, width, group, mean, a,      \
                                    sum_dy, sum_dy_xmu, sum_xmu, flags)
    BNF_BY_TYPE(type, CALL)
#undef CALL
    return 0;
}

/* 1 where the sums and dx = a * dy of k channels of runs went in one pass; 0: nothing
 * done (see bnfast_kernels_impl.h) */
static inline int bnf_bwd_sums_dx_runs(int type, const void *dy, ptrdiff_t dystride,
                                       ptrdiff_t dycs, const void *x, ptrdiff_t xstride,
                                       ptrdiff_t xcs, void *dx, ptrdiff_t dxstride,
                                       ptrdiff_t dxcs, ptrdiff_t nruns, ptrdiff_t len,
                                       ptrdiff_t k, const double *mean, const double *a,
                                       double *sum_dy, double *sum_dy_xmu, double *sum_xmu,
                                       int flags)
{
#define CALL(T, S)                                                                        \
    return bnf_bwd_sums_dx_runs_##S((const T *)dy, dystride, dycs, (const T *)x, xstride, \
                                    xcs, (T *)dx, dxstride, dxcs, nruns, len, k, mean, a, \
                                    sum_dy, sum_dy_xmu, sum_xmu, flags)
    BNF_BY_TYPE(type, CALL)
#undef CALL
    return 0;
}

static inline void bnf_bwd_dx_runs(int type, const void *dy, ptrdiff_t dystride,
                                   ptrdiff_t dycs, const void *x, ptrdiff_t xstride,
                                   ptrdiff_t xcs, void *dx, ptrdiff_t dxstride, ptrdiff_t dxcs,
                                   ptrdiff_t nruns, ptrdiff_t len, ptrdiff_t k,
                                   const double *mean, const double *a, const double *k1,
                                   const double *k2, int flags, const void *dy_next,
                                   const void *x_next, ptrdiff_t k_next)
{
#define CALL(T, S)                                                                      \
    bnf_bwd_dx_runs_##S((const T *)dy, dystride, dycs, (const T *)x, xstride, xcs,       \
                        (T *)dx, dxstride, dxcs, nruns, len, k, mean, a, k1, k2, flags,   \
                        (const T *)dy_next, (const T *)x_next, k_next)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}

static inline void bnf_bwd_dx_rows(int type, const void *dy, ptrdiff_t dystride,
                                   const void *x, ptrdiff_t xstride, void *dx,
                                   ptrdiff_t dxstride, ptrdiff_t nrows, ptrdiff_t width,
                                   ptrdiff_t group, const double *mean, const double *a,
                                   const double *k1, const double *k2, int flags)
{
#define CALL(T, S)                                                                      \
    bnf_bwd_dx_rows_##S((const T *)dy, dystride, (const T *)x, xstride, (T *)dx,         \
                        dxstride, nrows, width, group, mean, a, k1, k2, flags)
    BNF_BY_TYPE(type, CALL)
#undef CALL
}
#undef BNF_BY_TYPE

#ifdef __cplusplus
}
#endif
#endif

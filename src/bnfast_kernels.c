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

/* Intrinsics inner loops (bnfast_kernels_simd.h) for x86-64-v4 and -v3, chosen at run
 * time by bnf_simd_level: 4, 3, or 0 for the plain loops (which every other target, and
 * a CPU without AVX2, runs). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) \
    && !defined(BNFAST_NO_SIMD_LOOPS)
#define BNF_SIMD_X86 1
static int bnf_simd_supported = 0, bnf_simd_level = 0;
/* The intrinsics backward sums of runs add by multiply-adds by 1 (bwd_sums_runs): on AMD
 * (Zen 4) the adds share their pipes with the conversions, on Intel they have pipes of
 * their own and the multiply-adds a longer latency.  The same bits either way. */
static int bnf_adds_as_fma = 0;
/* Whether AVX2 (level 3) normalizes float and double by its intrinsics loops (half a
 * vector of floats loaded per vector of doubles), not by gcc's vectorized plain loop
 * (a vector of floats loaded and split, the results joined by an insert): by CPU vendor,
 * AMD yes (Zen 3: 0.78-0.96x the time, see norm_chunk_body), Intel no (its AVX2 clone
 * measured 7-10% slower that way).  The same bits either way. */
static int bnf_norm_v3 = 0;
__attribute__((constructor)) static void bnf_simd_init(void)
{
    __builtin_cpu_init();
    bnf_simd_supported = __builtin_cpu_supports("x86-64-v4")   ? 4
                         : __builtin_cpu_supports("x86-64-v3") ? 3
                                                               : 0;
    bnf_simd_level = bnf_simd_supported;
    bnf_adds_as_fma = __builtin_cpu_is("amd");
    bnf_norm_v3 = __builtin_cpu_is("amd");
}
/* Whether the intrinsics loops of level `min` or above run now: they stream a large
 * output straight from the registers (BNF_VST2), where the plain loops compute a chunk
 * into L1 for bnf_stream to copy out. */
#define BNF_DIRECT_NT(min) (bnf_simd_level >= (min))
#else
#define BNF_SIMD_X86 0
#define BNF_DIRECT_NT(min) 0
#endif

/* A load from an address equal, modulo BNF_ALIAS_SPAN (1 MiB), to that of a store just
 * made, and within a line or two of it, waits until the store has left the store buffer;
 * a store to DRAM leaves it slowly.  The elementwise loops load each input just past the
 * output they have just stored (runs in step), or four rows at a time (a row's loads
 * near the stores to the rows beside it): where the output sits that close to an input
 * modulo the span, every load waited.  Measured (twentieth session, Intel VM, one
 * thread, 51 MB float32, the output 32 bytes ahead of x modulo 1 MiB, as arrays whose
 * sizes are a whole number of MiB lie when allocated one after another from the heap):
 * NCHW eval 3.0 -> 10.5 ms, training 4.2 -> 11.4, backward 8.7 -> 15.1; rows of 1 KB
 * with the output 1 KB ahead, eval 3.3 -> 8.9 ms; float16 and float64 alike.  Staged
 * through L1 (a chunk computed into a buffer, then streamed out by bnf_stream) the
 * loads do not follow the stores: 4.1-4.6 ms.  So the elementwise loops stage an output
 * near an input, streamed or not (bnf_stage_out): up to BNF_ALIAS_NEAR bytes ahead for
 * runs in step, or near it plus one to three row strides for rows, or (stored plainly)
 * up to BNF_ALIAS_SAME_ROW bytes ahead in the same row (of placements at random, about
 * 1 in 450 for rows, 1 in 5000 for runs).
 * The addresses that collide are physical: arrays on 4 KiB pages collide only where
 * their pages happen to, but on huge pages (NumPy asks for them from 4 MiB; the
 * kernel's THP "always" gives them to any large enough mapping) an offset modulo 1 MiB
 * is one in memory.  So outputs are staged at any size (twenty-fourth session, one
 * thread, float32, arrays in one 2 MiB-paged buffer, the output 16-48 bytes ahead of x
 * or dy: eval of (2049, 64) 17 -> 86-92 us, staged 23; (256, 64) 2.6 -> 11.9, staged
 * 3.5; (32, 64) 0.8 -> 2.0, staged 0.9; backward of (1024, 64) 25 -> 62, staged 29;
 * on 4 KiB pages the same offsets cost nothing, and staged 1.00-1.20x the time). */
#define BNF_ALIAS_SPAN ((uintptr_t)1 << 20)
#define BNF_ALIAS_NEAR 192
#define BNF_ALIAS_SAME_ROW 48
/* q at most BNF_ALIAS_SAME_ROW bytes ahead of p: a row's loads, four stores behind its
 * own last one in the rows forms, still reach it (16-48 bytes: 2.5-5x the time; 64:
 * 1.0-1.4x, 128: 1.00-1.07x, where staging cost as much or more) */
static inline int bnf_row_aliased(const void *q, const void *p)
{
    uintptr_t d = ((uintptr_t)q - (uintptr_t)p) & (BNF_ALIAS_SPAN - 1);
    return p && d && d <= BNF_ALIAS_SAME_ROW;
}
/* q up to `near` bytes ahead of p or of one of the three rows of p before or after it
 * (stride: q's and p's, in bytes): rows four at a time, a vector of columns a step,
 * whose next step's loads reach the stores of this one (bnf_bwd_sums_dx_rows) */
static inline int bnf_step_aliased(const void *q, const void *p, ptrdiff_t stride,
                                   uintptr_t near)
{
    uintptr_t d = ((uintptr_t)q - (uintptr_t)p) & (BNF_ALIAS_SPAN - 1);
    if (!p) return 0;
    for (int k = -3; k <= 3; k++) {
        uintptr_t u = (d - (uintptr_t)(k * stride)) & (BNF_ALIAS_SPAN - 1);
        if (u && u <= near) return 1;
    }
    return 0;
}
static inline int bnf_nt_aliased(const void *q, const void *p, ptrdiff_t stride)
{
    uintptr_t d = ((uintptr_t)q - (uintptr_t)p) & (BNF_ALIAS_SPAN - 1);
    if (!p) return 0;
    if (!stride) return d != 0 && d <= BNF_ALIAS_NEAR;  /* q just ahead of p, in step */
    /* four rows at a time, in step: q near a later row of p, loaded after the stores to
     * an earlier row of q in the same step; or just ahead of an earlier row of p, whose
     * next step's loads follow those stores.  Not whole rows behind p: those loads come
     * a step after and start past the stores (one thread, float32, 2 MiB pages, q 1-3
     * rows behind x: staged 1.07-1.19x the time, in place no slower; 32-64 bytes ahead
     * of that, in place 1.17-1.37x).  Arrays of whole MiB mapped one after another lie
     * so, q a page or two behind. */
    for (int k = -3; k <= 3; k++) {
        uintptr_t u = (d - (uintptr_t)(k * stride)) & (BNF_ALIAS_SPAN - 1);
        if (k > 0 && (u <= BNF_ALIAS_NEAR || u >= BNF_ALIAS_SPAN - BNF_ALIAS_NEAR)) return 1;
        if (k < 0 && u && u <= BNF_ALIAS_NEAR) return 1;
    }
    return 0;
}
/* ... for rows: taken four at a time (stride: q's and p's, in bytes), and where `single`
 * also one at a time (float16 from DRAM; streamed rows off a line) */
static inline int bnf_rows_aliased(const void *q, const void *p, ptrdiff_t stride, int single)
{
    return bnf_nt_aliased(q, p, stride) || (single && bnf_nt_aliased(q, p, 0));
}
/* ... and where q is stored plainly, also just ahead of p in the same row (streamed,
 * q 16 bytes ahead of x measured no slower: (8192, 256) float32 eval 462 us, 460
 * elsewhere; staged 562) */
static inline int bnf_rows_aliased_plain(const void *q, const void *p, ptrdiff_t stride,
                                         int single)
{
    return bnf_row_aliased(q, p) || bnf_rows_aliased(q, p, stride, single);
}

int bnf_set_simd_level(int level)
{
#if BNF_SIMD_X86
    int old = bnf_simd_level;
    if (level >= 0) {
        if (level > bnf_simd_supported) level = bnf_simd_supported;
        bnf_simd_level = level >= 4 ? 4 : level >= 3 ? 3 : 0;
    }
    return old;
#else
    (void)level;
    return 0;
#endif
}

/* Whether plain (not streamed) stores are put on lines too (BNF_LINES_MIN): 1, or 0 as
 * before (tuning, tests: the same bits either way). */
static int bnf_store_lines = 1;
int bnf_set_store_lines(int on)
{
    int old = bnf_store_lines;
    if (on >= 0) bnf_store_lines = on != 0;
    return old;
}

/* Whether the AVX-512 rows loops end a row of plain stores, and a row's sums, with one
 * masked vector (1), or an element at a time as before (0; tuning, tests: the same bits
 * either way). */
static int bnf_masked_tails = 1;
int bnf_set_masked_tails(int on)
{
    int old = bnf_masked_tails;
    if (on >= 0) bnf_masked_tails = on != 0;
    return old;
}

static int bnf_fuse_sums_dx = 1;
int bnf_set_fuse_sums_dx(int on)
{
    int old = bnf_fuse_sums_dx;
    if (on >= 0) bnf_fuse_sums_dx = on != 0;
    return old;
}

/* Streamed dx of rows of bnf_dx_in_order_bytes or more goes a row at a time in memory
 * order, not four rows at a time (three streams, not twelve a row apart): [1] from DRAM
 * (BNF_FROM_DRAM in the dx flags), [0] else (from L3, or from cache as the second pass of
 * a fused unit).  Zen 3, one thread, float32: in a C harness over 51 MB, dx of 1 KB rows
 * took 0.50 ns an element in order against 0.71-0.87 four at a time (a streamed x + dy,
 * its floor, 0.40; rows of 256 bytes 0.50-0.52 either way); in bnfast, from L3 ((8192,
 * 256), 8 MB), the backward 1.15x the time in order, (4096, 512) 0.79x, (3072, 1024)
 * 0.19x (four rows 4 KB apart: 16x a copy).  Zen 4 (earlier) measured the two the same
 * from DRAM.  The same bits (elementwise). */
static ptrdiff_t bnf_dx_in_order_bytes[2] = {2048, BNF_ROWWISE_MIN_BYTES};
ptrdiff_t bnf_set_dx_in_order_bytes(ptrdiff_t n, int from_dram)
{
    ptrdiff_t old = bnf_dx_in_order_bytes[from_dram != 0];
    if (n >= 0) bnf_dx_in_order_bytes[from_dram != 0] = n;
    return old;
}
/* dx_rows_run's nt for a streamed dx (nt) of rows of row_bytes: 2, a row at a time, where
 * bnf_dx_in_order_bytes says so */
static inline int bnf_dx_nt(int nt, ptrdiff_t row_bytes, int flags)
{
    return nt && row_bytes >= bnf_dx_in_order_bytes[(flags & BNF_FROM_DRAM) != 0] ? 2 : nt;
}

/* The streamed normalize of rows a multiple of this many bytes apart (2 KB, 4 KB, ...)
 * goes a row at a time too: four rows at a time, two of them 4 KB apart (the same L1
 * sets, and loads that look like the stores of two rows before).  Zen 3, one thread,
 * float32, old and new build alternated: eval of (25088, 512) 0.60x the time, (12544,
 * 1024) 0.58x (it had taken 1.8-5.1x a copy), (8362, 1536) 0.83x, (6272, 2048) 0.59x,
 * from L3 (4096, 512) 0.68x; training 0.72-0.90x.  Rows of 2.5 and 3 KB measured 1.10
 * and 1.22x the time a row at a time, 1 KB rows 1.02x: four rows there.  The same bits.
 * 0: every streamed row a row at a time. */
static ptrdiff_t bnf_norm_in_order_bytes = 2048;
ptrdiff_t bnf_set_norm_in_order_bytes(ptrdiff_t n)
{
    ptrdiff_t old = bnf_norm_in_order_bytes;
    if (n >= 0) bnf_norm_in_order_bytes = n;
    return old;
}
/* norm_rows_run's nt for a streamed output (nt == 1) of rows `stride` bytes apart */
static inline int bnf_norm_nt(int nt, ptrdiff_t stride)
{
    ptrdiff_t d = bnf_norm_in_order_bytes;
    return nt == 1 && (d == 0 || (stride >= d && stride % d == 0)) ? 2 : nt;
}

int bnf_cpu_amd(void)
{
#if BNF_SIMD_X86
    return __builtin_cpu_is("amd");
#else
    return 0;
#endif
}

int bnf_set_norm_v3(int on)
{
#if BNF_SIMD_X86
    int old = bnf_norm_v3;
    if (on >= 0) bnf_norm_v3 = on != 0;
    return old;
#else
    (void)on;
    return 0;
#endif
}

int bnf_set_adds_as_fma(int on)
{
#if BNF_SIMD_X86
    int old = bnf_adds_as_fma;
    if (on >= 0) bnf_adds_as_fma = on != 0;
    return old;
#else
    (void)on;
    return 0;
#endif
}

/* Helpers are inlined into each ISA clone: a call would run the baseline version. */
#if defined(__GNUC__)
#define BNF_INLINE __attribute__((always_inline))
#define BNF_NOINLINE __attribute__((noinline))
#else
#define BNF_INLINE
#define BNF_NOINLINE
#endif

/* Streaming (non-temporal) stores for large outputs: the line is written without being
 * read first, and without evicting the input from cache.  A kernel computes a chunk into
 * an L1 buffer and streams it out with the widest stores the CPU has: 64-byte stores cost
 * a quarter of the instructions of SSE ones (measured 15-20% off a fused normalize).
 * SSE2 is the x86-64 baseline; elsewhere a plain copy. */
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BNF_HAVE_STREAM 1
#else
#define BNF_HAVE_STREAM 0
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(_WIN32)
#include <malloc.h>
#else
#include <unistd.h>
#endif

void *bnf_alloc64(size_t bytes)
{
    if (bytes == 0) bytes = 64;
#if defined(_WIN32)
    return _aligned_malloc(bytes, 64);
#else
    void *p = NULL;
    return posix_memalign(&p, 64, bytes) == 0 ? p : NULL;
#endif
}

/* The kernels' own buffers: bnf_alloc64, or NULL while a test says so. */
static int bnf_kernel_alloc_fails = 0;
int bnf_set_kernel_alloc_fails(int on)
{
    int old = bnf_kernel_alloc_fails;
    if (on >= 0) bnf_kernel_alloc_fails = on != 0;
    return old;
}
static inline void *bnf_kernel_alloc64(size_t bytes)
{
    return bnf_kernel_alloc_fails ? NULL : bnf_alloc64(bytes);
}

long bnf_l1d_bytes(void)
{
    long v = 0;
#if defined(_SC_LEVEL1_DCACHE_SIZE)
    v = sysconf(_SC_LEVEL1_DCACHE_SIZE);
#endif
    return v >= 4096 && v <= (1L << 24) ? v : 32768;
}

void bnf_free64(void *p)
{
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

typedef void (*bnf_stream_fn)(char *dst, const char *src, ptrdiff_t bytes);

#if BNF_HAVE_STREAM
/* Head and tail (up to dst's first line and from its last whole line) by memcpy; whole
 * lines streamed between, never part of one: a line streamed in part and then stored to
 * plainly (by the tail, or the next chunk's head) waits for the streamed part to reach
 * DRAM and reads it back.  On a Zen 3 EPYC, float32 (192, 128, 128) eval into an out=
 * 48 bytes past a line, staged, took 6x the time of one on a line when the vectors of
 * 32 and 16 bytes streamed from their own alignment (each run's last line streamed in
 * its first half, the tail stored in its second).  Elements stay whole because dst and
 * src are offset by a multiple of the element size. */
#define BNF_STREAM_BODY(ALIGN, LOADU, STREAM)                                         \
    {                                                                                 \
        ptrdiff_t head = (ptrdiff_t)(-(uintptr_t)dst & 63);                           \
        if (head > bytes) head = bytes;                                               \
        memcpy(dst, src, (size_t)head);                                               \
        ptrdiff_t i = head;                                                           \
        for (; i + 64 <= bytes; i += 64)                                              \
            for (int v_ = 0; v_ < 64; v_ += ALIGN)                                    \
                STREAM((float *)(dst + i + v_), LOADU((const float *)(src + i + v_))); \
        memcpy(dst + i, src + i, (size_t)(bytes - i));                                \
    }

static void bnf_stream_sse2(char *dst, const char *src, ptrdiff_t bytes)
    BNF_STREAM_BODY(16, _mm_loadu_ps, _mm_stream_ps)

#if defined(__GNUC__) && !defined(BNFAST_NO_CLONES)
#define BNF_STREAM_WIDE 1
__attribute__((target("avx"))) static void bnf_stream_avx(char *dst, const char *src,
                                                          ptrdiff_t bytes)
    BNF_STREAM_BODY(32, _mm256_loadu_ps, _mm256_stream_ps)

__attribute__((target("avx512f"))) static void bnf_stream_avx512(char *dst, const char *src,
                                                                 ptrdiff_t bytes)
    BNF_STREAM_BODY(64, _mm512_loadu_ps, _mm512_stream_ps)
#endif

static bnf_stream_fn bnf_pick_stream(void)
{
#ifdef BNF_STREAM_WIDE
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return bnf_stream_avx512;
    if (__builtin_cpu_supports("avx")) return bnf_stream_avx;
#endif
    return bnf_stream_sse2;
}
#else
static void bnf_stream_plain(char *dst, const char *src, ptrdiff_t bytes)
{
    memcpy(dst, src, (size_t)bytes);
}
static bnf_stream_fn bnf_pick_stream(void) { return bnf_stream_plain; }
#endif

/* Chosen on first use; threads racing here all store the same pointer. */
static bnf_stream_fn bnf_stream_impl;

static void bnf_stream_bytes(void *dst, const void *src, ptrdiff_t bytes)
{
#if defined(__GNUC__)
    bnf_stream_fn f = __atomic_load_n(&bnf_stream_impl, __ATOMIC_RELAXED);
    if (!f) {
        f = bnf_pick_stream();
        __atomic_store_n(&bnf_stream_impl, f, __ATOMIC_RELAXED);
    }
#else
    bnf_stream_fn f = bnf_pick_stream();
#endif
    f((char *)dst, (const char *)src, bytes);
}

static inline BNF_INLINE void bnf_stream_f32(float *dst, const float *src, ptrdiff_t n)
{
    bnf_stream_bytes(dst, src, n * (ptrdiff_t)sizeof(float));
}

static inline BNF_INLINE void bnf_stream_f64(double *dst, const double *src, ptrdiff_t n)
{
    bnf_stream_bytes(dst, src, n * (ptrdiff_t)sizeof(double));
}

static inline BNF_INLINE void bnf_stream_f16(uint16_t *dst, const uint16_t *src, ptrdiff_t n)
{
    bnf_stream_bytes(dst, src, n * (ptrdiff_t)sizeof(uint16_t));
}

/* A staged chunk out: streamed, or copied plainly where it was staged only to keep an
 * input's loads off the output's stores (bnf_nt_aliased: plain stores to memory not in
 * cache wait as long, (64, 256, 28, 28) float32 eval without streaming 3.2-4.3 ms,
 * 16-19 ms with the output 16-32 bytes ahead of x; (4096, 256) 0.3 -> 0.8 ms). */
static inline BNF_INLINE void bnf_stage_out(void *dst, const void *src, ptrdiff_t bytes,
                                            int stream)
{
    if (stream)
        bnf_stream_bytes(dst, src, bytes);
    else
        memcpy(dst, src, (size_t)bytes);
}

/* Streaming stores are weakly ordered: the caller fences once per work unit, before
 * other threads may read the output. */
void bnf_stream_fence(void)
{
#if BNF_HAVE_STREAM
    _mm_sfence();
#endif
}

/* Channels per block of the unit merges (their compensation terms on the stack).  The
 * units are the outer loop and the channels the inner one: a channel's merges form one
 * chain of dependent operations (a merge of moments waits on a division), and merging
 * a channel's units before the next channel's left the core waiting on that chain.  In
 * this order the chains of neighbouring channels overlap; each channel still takes its
 * units in the same order, with the same operations: the same values (where NaNs of
 * both signs meet, which one an addition keeps depends on the operand order the
 * compiler chose: README, Determinism). */
#define BNF_MERGE_BLOCK 256

BNF_CLONES void bnf_merge_same_counts(bnf_moments *a, double *m2lo, const bnf_moments *b,
                                      ptrdiff_t w, double na, double nb)
{
    if (nb == 0) return;
    double n = na + nb, ratio = nb / n, weight = na * ratio;
#pragma omp simd
    for (ptrdiff_t c = 0; c < w; c++) {
        double delta = (b[c].hi - a[c].hi) + (b[c].lo - a[c].lo);
        a[c].lo = bnf_merged_lo(a[c].lo, delta, ratio, b[c].hi - a[c].hi, b[c].lo);
        bnf_two_sum(&a[c].m2, &m2lo[c], b[c].m2 + delta * delta * weight);
        a[c].n = n;
    }
}

BNF_CLONES void bnf_merge_unit_moments(bnf_moments *mom, ptrdiff_t C, ptrdiff_t nsb)
{
    double m2lo[BNF_MERGE_BLOCK];
    for (ptrdiff_t c0 = 0; c0 < C; c0 += BNF_MERGE_BLOCK) {
        ptrdiff_t w = C - c0 < BNF_MERGE_BLOCK ? C - c0 : BNF_MERGE_BLOCK;
        bnf_moments *a = mom + c0;
        for (ptrdiff_t c = 0; c < w; c++) m2lo[c] = 0;
        for (ptrdiff_t sb = 1; sb < nsb; sb++) {
            const bnf_moments *b = a + sb * C;
            /* a unit's channels saw the same rows: one division per unit, not a channel */
            double na = a[0].n, nb = b[0].n;
            int same = na > 0 && nb > 0;
#pragma omp simd reduction(& : same)
            for (ptrdiff_t c = 1; c < w; c++) same &= (a[c].n == na) & (b[c].n == nb);
            if (same)
                bnf_merge_same_counts(a, m2lo, b, w, na, nb);
            else
                for (ptrdiff_t c = 0; c < w; c++) bnf_moments_merge_lo(&a[c], &m2lo[c], &b[c]);
        }
        for (ptrdiff_t c = 0; c < w; c++) a[c].m2 = bnf_fold_lo(a[c].m2, m2lo[c]);
    }
}

BNF_CLONES void bnf_merge_unit_sums(double *sum_dy, double *sum_dy_xmu, double *sum_xmu,
                                    ptrdiff_t C, ptrdiff_t nsb)
{
    double lo_dy[BNF_MERGE_BLOCK], lo_dyx[BNF_MERGE_BLOCK];
    for (ptrdiff_t c0 = 0; c0 < C; c0 += BNF_MERGE_BLOCK) {
        ptrdiff_t w = C - c0 < BNF_MERGE_BLOCK ? C - c0 : BNF_MERGE_BLOCK;
        double *s1 = sum_dy + c0, *s2 = sum_dy_xmu + c0, *s3 = sum_xmu + c0;
        for (ptrdiff_t c = 0; c < w; c++) lo_dy[c] = lo_dyx[c] = 0;
        for (ptrdiff_t sb = 1; sb < nsb; sb++)
            for (ptrdiff_t c = 0; c < w; c++) {
                bnf_two_sum(&s1[c], &lo_dy[c], s1[sb * C + c]);
                bnf_two_sum(&s2[c], &lo_dyx[c], s2[sb * C + c]);
                s3[c] += s3[sb * C + c];
            }
        for (ptrdiff_t c = 0; c < w; c++) {
            s1[c] = bnf_fold_lo(s1[c], lo_dy[c]);
            s2[c] = bnf_fold_lo(s2[c], lo_dyx[c]);
        }
    }
}

/* Software prefetch, this many bytes ahead of the loads.  With real arithmetic per cache
 * line the out-of-order window holds too few loads to cover memory latency, and the
 * hardware prefetcher restarts at every run: a statistics pass over 51 MB measured 2.9x
 * faster with it (4-16 KB alike; 1 KB too short). */
/* A cursor for a later pass (bnf_pf.far) prefetches into L2, not L1 (prefetcht1):
 * backward's prefetch of the next block measured 0.93x the time with it, 0.99x into L1. */
#define BNF_FAR_HINT 2
#define BNF_PREFETCH_BYTES 4096
#define BNF_LINE 64
#if defined(__GNUC__)
#define BNF_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#define BNF_PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#define BNF_PREFETCH_FAR(p) __builtin_prefetch((p), 0, BNF_FAR_HINT)
#else
#define BNF_PREFETCH_FAR(p) ((void)(p))
#define BNF_PREFETCH(p) ((void)(p))
#define BNF_PREFETCH_W(p) ((void)(p))
#endif

/* A prefetch cursor over a unit's runs (rows are runs of `width` elements), kept ahead
 * of the loads: a loop advances it by as many bytes as it consumes.  Counted in bytes,
 * so one cursor serves every element type.  Addresses are integers: the cursor runs
 * past the last run, into what follows it in memory (often the next unit; prefetches
 * never fault). */
typedef struct bnf_pf {
    uintptr_t run;       /* start of the current run */
    ptrdiff_t off, end;  /* position in it, and where it ends (off == end: finished) */
    ptrdiff_t stride, len, left; /* bytes between runs, bytes per run, runs after this */
    int far;             /* for a later pass: into the outer caches */
    struct bnf_pf *also; /* a cursor further ahead, advanced with this one (or NULL) */
} bnf_pf;

static inline BNF_INLINE void bnf_pf_init_by(bnf_pf *pf, const void *base, ptrdiff_t nruns,
                                             ptrdiff_t stride_bytes, ptrdiff_t len_bytes,
                                             ptrdiff_t ahead)
{
    ptrdiff_t r = 0;
    pf->stride = stride_bytes;
    pf->len = len_bytes;
    pf->run = (uintptr_t)base;
    pf->off = pf->end = 0;
    pf->left = 0;
    pf->far = 0;
    pf->also = NULL;
    if (!base || len_bytes <= 0 || nruns <= 0) return;
    r = ahead / len_bytes;
    if (r > nruns - 1) r = nruns - 1;
    pf->run += (uintptr_t)(r * stride_bytes);
    pf->off = ahead - r * len_bytes;
    pf->left = nruns - 1 - r;
    pf->end = pf->left > 0 ? len_bytes : len_bytes + BNF_PREFETCH_BYTES;
    if (pf->off > pf->end) pf->off = pf->end;
}

static inline BNF_INLINE void bnf_pf_init(bnf_pf *pf, const void *base, ptrdiff_t nruns,
                                          ptrdiff_t stride_bytes, ptrdiff_t len_bytes)
{
    bnf_pf_init_by(pf, base, nruns, stride_bytes, len_bytes, BNF_PREFETCH_BYTES);
}

static inline BNF_INLINE void bnf_pf_advance_one(bnf_pf *pf, ptrdiff_t bytes)
{
    while (bytes > 0 && pf->off < pf->end) {
        ptrdiff_t take = pf->end - pf->off < bytes ? pf->end - pf->off : bytes;
        uintptr_t p = pf->run + (uintptr_t)pf->off;
        if (pf->far)
            for (ptrdiff_t k = 0; k < take; k += BNF_LINE) BNF_PREFETCH_FAR((const void *)(p + k));
        else
            for (ptrdiff_t k = 0; k < take; k += BNF_LINE) BNF_PREFETCH((const void *)(p + k));
        bytes -= take;
        pf->off += take;
        if (pf->off == pf->end && pf->left > 0) {
            pf->run += (uintptr_t)pf->stride;
            pf->off = 0;
            pf->left--;
            pf->end = pf->left > 0 ? pf->len : pf->len + BNF_PREFETCH_BYTES;
        }
    }
}

static inline BNF_INLINE void bnf_pf_advance(bnf_pf *pf, ptrdiff_t bytes)
{
    if (pf->also) bnf_pf_advance_one(pf->also, bytes);
    bnf_pf_advance_one(pf, bytes);
}

/* The backward's prefetch of the next block (into L2, while this one is finished from
 * cache) starts at the block's first byte where the block holds at most this many bytes
 * of each array, not 4 KB in as a cursor ahead of its reader does: the sums that follow
 * read the first 4 KB of every block from DRAM otherwise.  One thread, float32, in one
 * process: (64, 256, 20, 20) backward 0.90-0.96x the time, (32, 128, 24, 24) 0.94x,
 * (64, 128, 28, 28) 0.94-0.96x, (64, 256, 16, 16) 0.92-1.00x, (20, 64, 56, 56)
 * 0.95-0.96x, (64, 256, 28, 28) 0.97-0.98x, (48, 256, 32, 32) 1.01-1.03x; two threads
 * 0.96-0.97x; float64 0.98x.  Blocks of 1.2 MB ((128, 256, 28, 28), three channels)
 * measured 1.03x: they keep the 4 KB. */
#define BNF_NEXT_FROM_START_BYTES (256 * 1024)

/* Into L2, the line of a run's last byte where the run ends off a line (a cursor's steps
 * from a start off a line stop short of it). */
static inline BNF_INLINE void bnf_pf_last_line(const void *run, ptrdiff_t bytes)
{
    uintptr_t end = (uintptr_t)run + (uintptr_t)bytes;
    if (end % BNF_LINE) BNF_PREFETCH_FAR((const void *)(end - 1));
}

/* Pipelined training (bnf_norm_runs), a channel a block: into L2, the last line of the
 * next block's run some rows on, where runs end off a line (NumPy's large arrays start
 * 16 bytes into one): x_next's cursor steps 64 bytes from the run's start and stops a
 * line short of it, and the statistics waited on DRAM for it once a run.  One thread,
 * float32, arrays 16 bytes off a line, in one process against the build without:
 * training of (64, 256, 28, 28) 0.91-0.98x the time, (64, 128, 32, 32) 0.93-0.96x,
 * (128, 96, 28, 28) 0.97x, (128, 128, 20, 20) 0.98x, (64, 64, 40, 40) 1.00-1.05x;
 * float64 (64, 128, 20, 20) 0.95x, (64, 256, 28, 28) 0.99x; two threads 0.99-1.01x.
 * Blocks of several channels (runs back to back) measured 1.01-1.03x on 12 x 12: not
 * there.  On a line the prefetch is not issued. */
static inline BNF_INLINE void bnf_pf_next_run_end(const void *x_next, ptrdiff_t r,
                                                  ptrdiff_t nruns, ptrdiff_t stride_bytes,
                                                  ptrdiff_t run_bytes)
{
    ptrdiff_t ahead = 1 + (run_bytes > 0 ? BNF_PREFETCH_BYTES / run_bytes : 0);
    if (r + ahead < nruns)
        bnf_pf_last_line((const char *)x_next + (r + ahead) * stride_bytes, run_bytes);
}

/* Elements computed between two advances of a prefetch cursor (elementwise kernels). */
#define BNF_PF_BLOCK 64

/* Rows reductions (four rows at a time) prefetch no cursor: the four rows `ahead` rows
 * below (bnf_pf_quad), four lines as they sum a line of columns (the intrinsics loops), or
 * a block of BNF_PF_COLS columns at a time (the plain loops).  Prefetches per line
 * consumed, never bunched: on wide rows one batch per row block would issue 64+ at once,
 * fill the line-fill buffers and stall the loads behind them (a backward over 1024-wide
 * rows spent 40% of its sums there).  A cursor advanced per block cost the backward sums
 * over 64-wide rows 30% in cache and 25% from DRAM against these (C harness, 51 MB). */
#define BNF_PF_COLS 64

/* Widest gap between rows that bnf_pf_quad still prefetches across as one run. */
#define BNF_PF_GAP 256

/* The backward sums of rows read dy and x, eight streams of four rows: they prefetch
 * further, into L2 (bnf_pf_quad's `far`).  One thread, float32, against 4 KB into L1,
 * alternated in one process: (64, 28, 28, 256) channels-last backward 2.72-2.91 ->
 * 2.20-2.62x a copy, (200704, 64) 2.45-2.67 -> 2.37-2.45x.  Not dx (with these sums,
 * 2.20 -> 2.62x).  The statistics (one array) lost with this instead of 4 KB into L1
 * ((64, 28, 28, 256) training 1.54-1.62 -> 1.70-1.87x); from DRAM (BNF_FROM_DRAM) they
 * take both: against L1 alone, in one process, (64, 28, 28, 256) training 0.89-0.92x
 * the time, (25088, 512) 0.91x, (200704, 64) 0.92-0.95x, (1835008, 7) folded 0.95-0.97x
 * (two threads 0.96-0.97x); from L3 1.04x, hence the flag. */
#define BNF_FAR_ROWS_BYTES 16384

/* From DRAM (BNF_FROM_DRAM), the backward sums of rows also prefetch the rows this far
 * ahead (a whole number of four-row steps) into L1.  On rows of 1 KB or more the sums
 * waited on L2 without: one thread, float32, 51 MB, in one process against the far
 * prefetch alone (Zen 4), (64, 28, 28, 256) backward sums 0.77-0.86x the time and the
 * backward 0.87-0.92x (two threads 0.88x and 0.95x), (25088, 512) sums 0.79-0.87x,
 * (100352, 128) 0.86x; (200704, 64) 0.96-1.02x.  From L3 (x and dy of 6-13 MB each)
 * the same prefetches cost the sums 7-13%: hence the flag. */
#define BNF_NEAR_ROWS_BYTES 2048
/* The rows reductions from DRAM (statistics, backward sums four rows at a time) prefetch
 * rows ahead into L1 only where the rows are at most this many bytes (set at import by
 * CPU vendor: bnfast._core).  Four rows ahead, rounded up, of wider rows is 16-64 KB of
 * each stream, more than L1 holds, and rows of a multiple of 4 KB land in the sets of the
 * rows being read: on Zen 4 (twenty-seventh session, one thread, float32, 51 MB, in one
 * process) without it the backward sums of (12544, 1024) took 1.29-1.34x a copy against
 * 1.92, (3136, 4096) 1.20-1.26 against 1.91; (16725, 768) 1.05-1.10 against 1.07 and
 * (50176, 256) 1.51-1.55 against 1.55 (kept there); whole rows' statistics, below,
 * 0.64-0.70x against 1.07-1.23x.  The prefetches into L2 stay.  Prefetches only: the
 * same bits.  One limit for each kind of loop (BNF_L1_REDUCE; the normalize and dx rows
 * loops, BNF_L1_NORM and BNF_L1_DX, prefetch into L2 instead: bnf_rows_ahead_pf). */
static ptrdiff_t bnf_l1_rows_max[BNF_L1_KINDS] = {(ptrdiff_t)1 << 40, (ptrdiff_t)1 << 40,
                                                 (ptrdiff_t)1 << 40};
ptrdiff_t bnf_set_l1_rows_max(int kind, ptrdiff_t n)
{
    ptrdiff_t old;
    if (kind < 0 || kind >= BNF_L1_KINDS) return -1;
    old = bnf_l1_rows_max[kind];
    if (n >= 0) bnf_l1_rows_max[kind] = n;
    return old;
}

/* From DRAM (BNF_FROM_DRAM) the backward sums read rows of BNF_ROWWISE_MIN_BYTES or more
 * one at a time, in memory order, prefetching BNF_ROWWISE_AHEAD_BYTES ahead into L1,
 * not four rows at a time (eight streams a row apart, with the prefetches above).  One
 * thread, float32, in one process against four at a time: backward of (64, 28, 28,
 * 256) 0.92-0.94x the time, (25088, 512) 0.92-0.93x, (12544, 1024) 0.93x, (100352, 128)
 * 0.94-0.95x, (131072, 100) 0.97x; float64 (64, 28, 28, 256) 0.94x; two threads
 * 0.97-1.01x.  Narrower rows measured 0.99x (256 bytes) and 1.11x (128), float16 0.99-1.03x,
 * 4 KB ahead 0.93-0.95x, 16 KB 0.93-0.96x, with 16 KB into L2 as well 0.98-0.99x.  In
 * cache four rows at a time stay: the accumulators are loaded and stored once per four
 * rows.  The sums then add in another order than from cache: other bits for an x of
 * BNF_FROM_DRAM's size, the same for any thread count.
 * On AMD (twenty-seventh session, Zen 4) four rows at a time measured faster again, and
 * most where rows were wider than a block: bnfast._core then makes each unit whole rows
 * and sets BNF_WIDE_QUADS (_whole_rows, float32 and float16; float64's compensated state,
 * 48 bytes a column, took 1.1-1.2x the time whole).  One thread, float32, 51 MB, in one
 * process against a row at a time: the sums of (200704, 64) 1.39-1.45 -> 0.98-1.06x a
 * copy, (50176, 256) 1.37-1.42 -> 0.81-1.09x, (16725, 768) 2.4-3.2 -> 1.06-1.26x, (12544,
 * 1024) 2.1-3.1 -> 1.8-2.1x, (3136, 4096) 2.0-3.4 -> 1.7-1.9x; the backward 0.82-0.84x,
 * 0.60-0.85x, 0.57-0.66x, 0.77-0.99x, 0.71-0.98x the time (1536-16384 columns
 * 0.65-0.88x); two threads 0.94x, 0.97x, -, 0.87x, 0.96x.  float16 wide rows 0.86-0.88x
 * (the sums), narrow ones the same. */
#define BNF_ROWWISE_AHEAD_BYTES 8192
/* How the backward sums of rows read them (`near`, from a call's flags): 0 in cache;
 * from DRAM, BNF_NEAR_BY_WIDTH a row at a time where the rows are BNF_ROWWISE_MIN_BYTES
 * or more (whole rows: a call's rows narrower than that are whole, or folded to such),
 * BNF_NEAR_ROWWISE a row at a time however narrow (a block of columns of wider rows,
 * BNF_ROWS_WIDE: whatever its width, which the thread count can change; a block's own
 * width decided it before, and (7, 5, 3, 600) float32 summed its last 88 columns in
 * another order on three threads than on one), BNF_NEAR_QUADS four rows at a time
 * (BNF_WIDE_QUADS). */
#define BNF_NEAR_BY_WIDTH 1
#define BNF_NEAR_ROWWISE 2
#define BNF_NEAR_QUADS 3
#define BNF_NEAR_SPACED 4
static inline int bnf_sums_near(int flags)
{
    if (!(flags & BNF_FROM_DRAM)) return 0;
    if (flags & BNF_SPACED_QUADS) return BNF_NEAR_SPACED;
    if (flags & BNF_WIDE_QUADS) return BNF_NEAR_QUADS;
    return (flags & BNF_ROWS_WIDE) ? BNF_NEAR_ROWWISE : BNF_NEAR_BY_WIDTH;
}
/* BNF_NEAR_SPACED (BNF_SPACED_QUADS): the backward sums of a call's rows (not storing dx,
 * not compensated) four at a time, quad i the rows i, i + sp, i + 2 sp and i + 3 sp for
 * sp = nrows / 4 (then the rows left over one at a time), with no prefetches: eight
 * streams each read in memory order, which the CPU's own prefetchers follow, where four
 * rows a row apart (BNF_NEAR_QUADS) cross a 4 KB page in short runs. Returns sp, or 0
 * (four adjacent rows at a time, or a row at a time: bnf_sums_rowwise). The rows of a
 * call are fixed by the shape (a unit's), so its bits are the same for any thread count. */
static inline ptrdiff_t bnf_sums_spacing(ptrdiff_t nrows, int near, int with_q, int compensated)
{
    return near == BNF_NEAR_SPACED && !with_q && !compensated ? nrows / 4 : 0;
}
/* The statistics of rows (shifted_sums_rows) take a tile's k rows four at a time, quad i
 * the rows i, i + sp, i + 2 sp and i + 3 sp for sp = k / 4 (then the rows left over one
 * at a time), with no prefetches: four streams each in memory order, which the CPU's own
 * prefetchers follow, not four rows a row apart with prefetches ahead.  Zen 3, one
 * thread, float32 training, toggled in one process (21-41 repetitions), against four
 * adjacent rows: from DRAM (64, 28, 28, 256) 0.94x the time, (200704, 64) 0.88x,
 * (25088, 512) 0.88x, (12544, 1024) 0.88x, (131072, 100) 0.93x, (16725, 768)-(4096,
 * 1536) 0.95-0.98x; in cache (4096, 64) 0.91x, (1024, 256) 0.89x, (256, 1024) 0.90x,
 * (8, 28, 28, 64) 0.89x, (32, 64, 7, 7) 0.94x; float64 0.87-0.95x, float16 0.93-1.02x.
 * In a C harness over 51 MB, 1 KB rows: 0.21 ns an element against 0.35-0.38 adjacent
 * with prefetches (a read with one add 0.21).  Tiles of under BNF_STATS_SPACED_MIN_ROWS
 * rows (rows of over 2048 float32 columns) keep four adjacent rows: from L3 (1024, 3000)
 * and (512, 4096) took 1.17-1.21x the time spaced.  Tiles are fixed by the shape: the same
 * bits every way, as before, other bits than four adjacent rows.  0 (tuning,
 * bnfast._core._set_stats_spaced): four adjacent rows everywhere. */
#define BNF_STATS_SPACED_MIN_ROWS 16
static int bnf_stats_spaced = 1;
int bnf_set_stats_spaced(int on)
{
    int old = bnf_stats_spaced;
    if (on >= 0) bnf_stats_spaced = on != 0;
    return old;
}
static inline ptrdiff_t bnf_stats_spacing(ptrdiff_t k)
{
    return bnf_stats_spaced && k >= BNF_STATS_SPACED_MIN_ROWS ? k / 4 : 0;
}
static inline int bnf_sums_rowwise(ptrdiff_t row_bytes, size_t elem_size, int near)
{
    return elem_size >= 4 &&
           (near == BNF_NEAR_ROWWISE ||
            (near == BNF_NEAR_BY_WIDTH && row_bytes >= BNF_ROWWISE_MIN_BYTES));
}

/* Contiguous rows narrower than that, from DRAM, are folded BNF_FOLD_COLS / width to a
 * row (as rows under BNF_FOLD_WIDTH always are) and so summed a row at a time too.  One
 * thread, float32, in one process: backward of (200704, 64) 0.92x the time, (131072,
 * 100) 0.94x, (401408, 32) 0.95x.  Returns the rows per folded row, or 0. */
static inline ptrdiff_t bnf_sums_fold_from_dram(ptrdiff_t width, size_t elem_size,
                                                int from_dram)
{
    return width > 0 && from_dram && elem_size >= 4 &&
                   width * (ptrdiff_t)elem_size < BNF_ROWWISE_MIN_BYTES
               ? BNF_FOLD_COLS / width : 0;
}

/* Rows ahead: `bytes` of the rows' columns, a whole number of four-row steps. */
static inline ptrdiff_t bnf_rows_ahead_by(ptrdiff_t row_bytes, ptrdiff_t bytes)
{
    ptrdiff_t ahead = row_bytes > 0 ? (bytes + row_bytes - 1) / row_bytes : 4;
    return (ahead + 3) / 4 * 4;
}

/* Rows ahead: BNF_PREFETCH_BYTES of the rows' columns. */
static inline ptrdiff_t bnf_rows_ahead(ptrdiff_t row_bytes)
{
    return bnf_rows_ahead_by(row_bytes, BNF_PREFETCH_BYTES);
}

/* A prefetch into L1, or into L2 where `far`. */
#define BNF_PF_HINT(p, far)            \
    do {                               \
        if (far)                       \
            BNF_PREFETCH_FAR(p);       \
        else                           \
            BNF_PREFETCH(p);           \
    } while (0)

/* Every line of a row of `bytes` at p (the plain elementwise rows loops, a row ahead),
 * into L2 where `far`. */
static inline BNF_INLINE void bnf_pf_row(const void *p, ptrdiff_t bytes, int far)
{
    for (ptrdiff_t b = 0; b < bytes; b += BNF_LINE)
        BNF_PF_HINT((const void *)((uintptr_t)p + (uintptr_t)b), far);
}

/* The elementwise rows loops from DRAM (normalize: norm_rows_run; dx: dx_rows_run)
 * prefetch rows ahead as they go: BNF_PREFETCH_BYTES of them into L1, or, for rows of
 * more than bnf_l1_rows_max[kind] bytes (kind BNF_L1_NORM or BNF_L1_DX; on AMD 1 KB for
 * normalize, 0 for dx), BNF_PREFETCH_FAR_ROWS_BYTES into L2 (*far set).  On Zen 4 (32 KiB
 * L1d) four rows ahead into L1 of 4 KB rows is 16 KB of each stream beside the four rows
 * being read (4 KB apart: the same sets) and the factors (24 bytes a column, dx 32), more
 * than L1 holds; dx, with two streams and 32 KB of factors at 1024 columns, crowds L1 at
 * every width.  One thread, float32, 51 MB, in one process, alternated call by call, into
 * L2 (8 KB ahead) against into L1 (twenty-eighth session): eval of (12544, 1024)
 * 1.48-1.54 -> 1.05-1.15x a copy, (16725, 768) 1.03-1.13 -> 0.65-0.70x; training
 * 0.66-0.82x the time at those widths; backward (12544, 1024) 3.6-4.1 -> 3.3-3.7x,
 * (16725, 768) 2.8-3.1 -> 2.1-2.3x, (25088, 512) 2.70 -> 2.21x, (50176, 256) 2.36-2.59 ->
 * 2.06-2.36x, (200704, 64) 2.41-2.55 -> 2.15-2.36x; float64 (12544, 512) eval 1.24 ->
 * 0.82x, backward 3.21 -> 2.40x, (100352, 64) backward 3.09 -> 2.55x; two threads
 * backward 0.87-0.95x the time.  Normalize of rows over 1 KB into L2 against over 2 KB,
 * three runs: (25088, 512) eval 0.80-1.06 -> 0.68-0.92x, training 1.37-1.56 ->
 * 1.28-1.42x; (33450, 384) eval 0.60-0.67 -> 0.58-0.62x; (42816, 300) the same.
 * Normalize of rows of 1 KB or less measured slower into L2 ((50176, 256) eval 0.64 ->
 * 0.87x): into L1 there, as before.  4 and 16 KB ahead into L2 measured no better than 8.
 * float16 (bound by its conversions) measured the same either way.  Prefetches only: the
 * same bits. */
#define BNF_PREFETCH_FAR_ROWS_BYTES 8192
static inline ptrdiff_t bnf_rows_ahead_pf(ptrdiff_t row_bytes, int kind, int *far)
{
    *far = row_bytes > bnf_l1_rows_max[kind];
    return bnf_rows_ahead_by(row_bytes,
                             *far ? BNF_PREFETCH_FAR_ROWS_BYTES : BNF_PREFETCH_BYTES);
}

/* The rows reductions' prefetch: four lines of the four rows at pa (rows `stride` bytes
 * apart, `row` bytes used of each) for the columns `off` bytes into them.  Contiguous
 * rows: the four lines at 4 * off, so that a pass over the four rows' columns prefetches
 * them front to back in address order (row by row, NHWC backward measured 2.11-2.27 ->
 * 1.99-2.09x a copy this way, alternated in one process; the statistics the same).
 * Rows with a gap of at most BNF_PF_GAP bytes between them (a column slice of a slightly
 * wider array) likewise, the four rows' used bytes taken as one run: in a C harness on
 * Zen 4 (51 MB, four rows at a time) the sums of 256 of 264-320 columns took 0.13-0.16 ns
 * an element this way against 0.32-0.38 with a line of each row, 128 of 144-192 columns
 * 0.18-0.22 against 0.37-0.46.  Wider gaps (a channel block of wider rows, half of each
 * row or less): a line of each row at off, 0.34-0.41 against 0.43-0.48 in address
 * order.  `far`: into L2 (BNF_FAR_ROWS_BYTES). */
static inline BNF_INLINE void bnf_pf_quad(const void *pa, ptrdiff_t stride, ptrdiff_t row,
                                          ptrdiff_t off, int far)
{
    uintptr_t q = (uintptr_t)pa;   /* integers: rows past the array are prefetched too */
    if (stride > row && stride - row <= BNF_PF_GAP) {
        for (ptrdiff_t i = 0; i < 4; i++) {
            ptrdiff_t o = 4 * off + i * BNF_LINE;       /* into the four rows' used bytes */
            ptrdiff_t r = (o >= row) + (o >= 2 * row) + (o >= 3 * row);
            BNF_PF_HINT((const void *)(q + (uintptr_t)(r * stride + (o - r * row))), far);
        }
        return;
    }
    uintptr_t step = stride == row ? BNF_LINE : (uintptr_t)stride;
    q += stride == row ? 4 * (uintptr_t)off : (uintptr_t)off;
    BNF_PF_HINT((const void *)q, far);
    BNF_PF_HINT((const void *)(q + step), far);
    BNF_PF_HINT((const void *)(q + 2 * step), far);
    BNF_PF_HINT((const void *)(q + 3 * step), far);
}

/* The line of the last byte of each of `nrows` rows `stride` bytes apart from pa, `row`
 * bytes used of each, where the rows lie apart (a block of wider rows' columns) and a row
 * ends off a line.  The per-line prefetches step from a row's first column: on a row off
 * a line (NumPy's large arrays start 16 bytes into one) they stop a line short of its end,
 * and each row then waited on DRAM for that line (the sums' loads stalled there).  One
 * thread, float32, in one process against the build without (Zen 4): (3136, 4096)
 * backward sums 0.75-0.81x the time, backward 0.88-0.90x, moments 0.87-0.93x; (6272,
 * 2048) 0.82-0.83x, 0.91-0.92x; (784, 16384) 0.81x, 0.90x; (12544, 1024) 0.92x and
 * 0.98-0.99x; two threads 0.93-0.95x; AVX2 0.92x; narrower rows unchanged.  Rows with a
 * narrower gap go as one run (bnf_pf_quad) and contiguous ones need none. */
static inline BNF_INLINE void bnf_pf_row_ends(const void *pa, ptrdiff_t stride, ptrdiff_t row,
                                              int nrows, int far)
{
    if (stride <= row + BNF_PF_GAP) return;
    for (int i = 0; i < nrows; i++) {
        uintptr_t end = (uintptr_t)pa + (uintptr_t)(i * stride + row);
        if (end % BNF_LINE) BNF_PF_HINT((const void *)(end - 1), far);
    }
}


/* Per-column arrays of the rows form (factors, sums) are read as 64-byte vectors; from an
 * array off a 64-byte boundary every such load splits two cache lines.  Measured on a
 * 51 MB rows normalize with the factors 16 bytes off: 11-18% slower (5-8% in L2).  The
 * rows kernels therefore work on 64-byte-aligned stack copies where the caller's arrays
 * are not aligned and at least BNF_ALIGN_MIN_ROWS rows reuse them. */
#if defined(_MSC_VER)
#define BNF_ALIGN64 __declspec(align(64))
#else
#define BNF_ALIGN64 __attribute__((aligned(64)))
#endif
#define BNF_ALIGN_MIN_ROWS 16

static inline BNF_INLINE int bnf_misaligned(const void *p)
{
    return ((uintptr_t)p & 63) != 0;
}

/* p itself, or its first n values copied to buf (64-byte aligned) when p is not aligned
 * and nrows rows will read it. */
static inline BNF_INLINE const double *bnf_aligned(const double *p, double *buf, ptrdiff_t n,
                                                   ptrdiff_t nrows)
{
    if (nrows < BNF_ALIGN_MIN_ROWS || !bnf_misaligned(p)) return p;
    memcpy(buf, p, (size_t)n * sizeof(double));
    return buf;
}

/* Elements before the first 64-byte boundary at q (streaming stores start there). */
static inline BNF_INLINE ptrdiff_t bnf_nt_lead(const void *q, size_t itemsize)
{
    return (ptrdiff_t)((-(uintptr_t)q & 63) / itemsize);
}

/* Before a run streamed from the registers: bring the lines of its ends (which its
 * head and tail write with plain stores) into cache, so those stores do not wait for
 * them behind the streaming stores. */
static inline BNF_INLINE void bnf_prefetch_ends(const void *run, ptrdiff_t len,
                                                size_t itemsize, int any)
{
    if (!any) return;
    BNF_PREFETCH_W(run);
    BNF_PREFETCH_W((const char *)run + (len - 1) * (ptrdiff_t)itemsize);
}

/* Rows that the intrinsics loops stream straight out: every row starts on a line and
 * fills whole lines, so no row has a head or tail done alone (a channels-last eval with
 * rows 16 bytes off a line measured 1.04-1.11 -> 1.18-1.55x a copy that way) and the
 * per-column factors load from their lines. */
static inline BNF_INLINE int bnf_rows_on_lines(const void *q, ptrdiff_t stride,
                                               ptrdiff_t width, size_t itemsize)
{
    return !bnf_misaligned(q) && stride * (ptrdiff_t)itemsize % 64 == 0 &&
           width * (ptrdiff_t)itemsize % 64 == 0;
}
/* Rows streamed straight out that all start `lead` elements (0 < lead < width) before a
 * line (the rows lines apart, the output off a line, as NumPy's large allocations are):
 * a group of BNF_LEAD_ROWS rows' first `lead` columns alone (plain stores), then the
 * rest, from a line, four rows at a time with each vector of factors loaded once for the
 * four (the factors not copied to align them: their split loads, shared so, cost less
 * than the copy).  Before, such rows went one at a time with their heads inline and,
 * rows wider than a chunk, one row a call.  One thread, in one process, outputs 16 bytes
 * off a line: float32 (6272, 2048) eval 0.60-0.66x the time, training 0.74-0.80x,
 * backward 0.83-0.89x; (3136, 4096) 0.61-0.68x, 0.75-0.79x, 0.87-0.92x; (784, 16384)
 * 0.59x, 0.73x, 0.88x; two threads 0.88x, 0.93x, 1.00x; float64 eval
 * 1.05-1.07x, training 0.95-0.96x, backward 0.93-0.99x; rows of 1024 or fewer columns
 * (one block), 64-512 of them, 0.99-1.01x.  Groups of 4 rows, 16 or all of a call
 * measured alike. */
#define BNF_LEAD_ROWS 16
/* Plain stores too: a vector stored across a line is split in two, and rows 16 bytes
 * off a line, in cache, took up to 1.5x the time of rows on lines.  So the flat and the
 * block forms put their vectors on lines whether they stream or not: the flat run's
 * first elements alone (from BNF_LINES_MIN elements: below, the scalar head costs more
 * than the split stores), and a block's `lead` columns as above where its rows are at
 * least BNF_LINES_ROW_BYTES wide (narrower, the lead columns' scalar loop costs more:
 * contiguous narrow rows go flat instead). */
#define BNF_LINES_MIN 3072
#define BNF_LINES_ROW_BYTES 1024
static inline BNF_INLINE int bnf_flat_lines(const void *q, ptrdiff_t total, ptrdiff_t len,
                                            size_t itemsize)
{
    return bnf_store_lines && total >= BNF_LINES_MIN && bnf_nt_lead(q, itemsize) &&
           len * (ptrdiff_t)itemsize % 64 == 0;
}
static inline BNF_INLINE ptrdiff_t bnf_lines_lead(const void *q, ptrdiff_t stride,
                                                  ptrdiff_t width, size_t itemsize)
{
    ptrdiff_t lead = bnf_nt_lead(q, itemsize);
    return stride * (ptrdiff_t)itemsize % 64 == 0 && lead < width ? lead : 0;
}
/* A block's lead columns: streamed straight out (nt), or stored plainly (not staged) in
 * rows of BNF_LINES_ROW_BYTES or more */
static inline BNF_INLINE ptrdiff_t bnf_block_lead(const void *q, ptrdiff_t stride,
                                                  ptrdiff_t width, size_t itemsize, int nt,
                                                  int staged)
{
    int lines = nt || (!staged && bnf_store_lines &&
                       width * (ptrdiff_t)itemsize >= BNF_LINES_ROW_BYTES);
    return lines ? bnf_lines_lead(q, stride, width, itemsize) : 0;
}
/* Rows streamed straight out: on lines, or wide enough that a row's head and tail
 * (done alone, with plain stores) cost little beside it.  16 MB of 1000-wide float32
 * rows, output 16 bytes off a line (as NumPy's large allocations are), against staging:
 * eval 1.54 -> 1.16x a copy, training 2.19 -> 1.85x; 1500-wide 1.43 -> 1.18x.  1 KB rows
 * measured slower that way (256 of 260 columns: eval 0.78 -> 0.89x), 2 KB rows the same
 * (512 of 520 columns). */
#define BNF_NT_ROW_BYTES 2048
static inline BNF_INLINE int bnf_rows_stream_direct(const void *q, ptrdiff_t stride,
                                                    ptrdiff_t width, size_t itemsize)
{
    return bnf_rows_on_lines(q, stride, width, itemsize) ||
           width * (ptrdiff_t)itemsize >= BNF_NT_ROW_BYTES;
}


/* Rows wider than BNF_CHUNK are normalized (and dx computed) in blocks of this many
 * columns; a block's rows are staged in BNF_CHUNK elements. */
#define BNF_WIDE_COLS 1024
#if BNF_WIDE_COLS > BNF_CHUNK
#error "BNF_WIDE_COLS must not exceed BNF_CHUNK"
#endif
/* Columns per block of rows wider than BNF_CHUNK: blocks of at most BNF_WIDE_COLS, of
 * equal size in whole lines, so that none is left narrow (1500 columns: 752 + 748, not
 * 1024 + 476, which was staged: bnf_rows_stream_direct).  Blocks of 512 measured
 * slower (600 and 1024 columns: eval 1.15-1.23 -> 1.36-1.54x a copy). */
static inline ptrdiff_t bnf_wide_step(ptrdiff_t width, size_t itemsize)
{
    ptrdiff_t line = 64 / (ptrdiff_t)itemsize, nb, step;
    if (width <= BNF_CHUNK) return width;
    nb = (width + BNF_WIDE_COLS - 1) / BNF_WIDE_COLS;
    step = (width + nb - 1) / nb;
    step = (step + line - 1) / line * line;
    return step > BNF_WIDE_COLS ? BNF_WIDE_COLS : step;
}

/* Contiguous rows wider than BNF_CHUNK whose output is streamed (from DRAM), on a CPU
 * whose L1d is under 40 KiB (bnf_grouped_wide, set at import), go in groups of rows of
 * about BNF_WIDE_GROUP_BYTES, each group in column blocks of BNF_WIDE_BLOCK_COLS whose
 * factors (24 bytes a column: 3 KB; dx 32) stay in L1 from row to row of the group, the
 * next group prefetched into L2 a block's share at a time (every column block of a row
 * then reads L2, and DRAM sees the rows in order).  The whole-row run below repeats
 * factors of 48-192 KB for 2048-8192 columns, which stream from L2 once per row beside
 * x: on Zen 4 (32 KiB L1d) a C harness of that eval over 51 MB float32 took 6.7-7.7 ms
 * for 2048-8192 columns against 2.7-3.5 for 256, and this form 2.8-3.4 (groups of 64 KB,
 * blocks of 128, a row at a time; blocks of 256 3.3-4.3, groups of 128-256 KB 3.0-5.3,
 * four rows a step 4.9-5.4; 1024 columns 3.9-4.1 against a whole-row run's 3.6-5.9: not
 * there).  In bnfast, one thread, alternated in one process: eval of (6272, 2048) 5.4 ->
 * 4.2 ms, (3136, 4096) 5.2-5.4 -> 3.7-3.9, (1568, 8192) 5.9 -> 4.7, (8370, 1536) 4.8 ->
 * 4.0; in cache (streamed) 0.40 -> 0.24-0.27 ns an element; dx (where two rows of dy and
 * x fit a group) (6272, 2048) 16.7 -> 15.0 ms, (3136, 4096) 17.3 -> 14.9.  Rows of more
 * than half a group (12288 and 16384 columns: a row a group) measured 1.07-1.23x the
 * time: not there; nor where the output lies near x (bnf_rows_aliased: staged as
 * before).  The Intel VM (48 KiB L1d) measured the whole rows faster than column blocks
 * over a unit (below) and keeps them. */
#define BNF_WIDE_GROUP_BYTES 65536
#define BNF_WIDE_BLOCK_COLS 128
static int bnf_grouped_wide_on = 0;    /* set at import by L1d size: bnfast._core */
int bnf_set_grouped_wide(int on)
{
    int old = bnf_grouped_wide_on;
    if (on >= 0) bnf_grouped_wide_on = on != 0;
    return old;
}
static inline int bnf_grouped_wide(ptrdiff_t width, size_t itemsize, int flags)
{
    return bnf_grouped_wide_on && (flags & BNF_STREAM) && width > BNF_CHUNK &&
           2 * width * (ptrdiff_t)itemsize <= BNF_WIDE_GROUP_BYTES;
}
/* Prefetch into L2 the part [*done, *done + share) of `bytes` bytes at p (a group of rows
 * ahead), advancing *done. */
static inline BNF_INLINE void bnf_pf_share(const void *p, ptrdiff_t bytes, ptrdiff_t share,
                                           ptrdiff_t *done)
{
    ptrdiff_t end = *done + share < bytes ? *done + share : bytes;
    for (ptrdiff_t b = *done; b < end; b += BNF_LINE)
        BNF_PREFETCH_FAR((const char *)p + b);
    *done = end;
}

/* Contiguous rows wider than BNF_CHUNK whose output is streamed (from DRAM) are
 * normalized (and dx computed) whole, one flat run (norm_rows_flat, their factors
 * repeated on the heap), up to this many columns: not in blocks of BNF_WIDE_COLS over a
 * unit's rows, which read each row in pieces 4 KB apart (float32).  Their factors then
 * come from L2, which from DRAM costs less than the pieces.  One thread, float32, 51 MB,
 * in one process against the blocks (twenty-first session, Intel VM): eval of (6272,
 * 2048), (3136, 4096), (1568, 8192) 0.78-0.93 -> 0.67-0.74x a copy, training 6-8% and
 * backward 3-7% less time (two threads 2-13%).  In cache the blocks stay (64x4096
 * above).  An output not streamed (allocated by the call) keeps them: whole rows measured
 * 0.99-1.04x the time there for eval and training (backward 0.90-1.01x).  The same bits
 * either way (each element's arithmetic is its own). */
#define BNF_WIDE_FLAT_MAX 8192
static int bnf_wide_flat_on = 1;
int bnf_set_wide_flat(int on)
{
    int old = bnf_wide_flat_on;
    if (on >= 0) bnf_wide_flat_on = on != 0;
    return old;
}
static inline int bnf_wide_flat(ptrdiff_t width, int flags)
{
    return bnf_wide_flat_on && (flags & BNF_STREAM) && width <= BNF_WIDE_FLAT_MAX;
}

/* Contiguous narrow rows are normalized this many elements (whole rows) per inner loop:
 * 64-wide rows measured 25-30% faster in cache and from DRAM without streaming stores
 * (the same with them); 512 was slower than 256 (the repeated factors crowd L1). */
#define BNF_FLAT_ELEMS 256
/* ... from this many elements: on a row or a few, repeating the factors costs more than
 * it saves (a (1, 64) normalize measured 2x faster in the rows form). */
#define BNF_FLAT_MIN (2 * BNF_FLAT_ELEMS)
/* Its run: whole rows, as many as fit BNF_FLAT_ELEMS when they are narrow, and whole
 * lines where a run of at most BNF_CHUNK can be (3-wide float32 rows: 240 elements, not
 * 255; 33-wide: 528), so that a large output is streamed straight from the registers,
 * not staged: 16 MB of (N, 3) float32 eval 1.49 -> 0.92x a copy, backward 2.87 -> 2.20x,
 * (N, 33) 1.23 -> 0.78x and 2.68 -> 2.00x; small calls unchanged. */
static inline ptrdiff_t bnf_flat_len(ptrdiff_t width, size_t itemsize)
{
    ptrdiff_t line = 64 / (ptrdiff_t)itemsize, both = width;
    if (2 * width > BNF_FLAT_ELEMS) return width;
    while (both % line && both <= BNF_CHUNK) both += width;
    if (both > BNF_CHUNK) return BNF_FLAT_ELEMS / width * width;
    return both > BNF_FLAT_ELEMS ? both : BNF_FLAT_ELEMS / both * both;
}
#define BNF_FLAT_LEN(width) bnf_flat_len(width, sizeof(T))
/* Streamed (and in cache, bnf_flat_rows_lines), the run is whole lines: BNF_FLAT_LEN's
 * where it fills them, else the fewest whole rows that do, up to BNF_FLAT_LINES_MAX
 * elements (rows of 300 float32, 1200 bytes: four, 4800 bytes; past BNF_CHUNK their
 * factors repeated on the heap), or 0 (none).  Rows of 300 from DRAM were staged, three
 * in four off a line: (40000, 300) float32 eval 1.19-1.99 -> 0.88-1.10x a copy, training
 * 1.64-3.12 -> 1.48-2.19x, where rows on lines ((39473, 304)) take 0.76x and 1.33x. */
#define BNF_FLAT_LINES_MAX 2048
static int bnf_flat_whole_lines = 1;
int bnf_set_flat_whole_lines(int on)
{
    int old = bnf_flat_whole_lines;
    if (on >= 0) bnf_flat_whole_lines = on != 0;
    return old;
}
static inline ptrdiff_t bnf_flat_lines_len(ptrdiff_t width, size_t itemsize)
{
    ptrdiff_t len = bnf_flat_len(width, itemsize), rows = 1;
    if (len * (ptrdiff_t)itemsize % 64 == 0) return len;
    if (!bnf_flat_whole_lines || width > BNF_FLAT_LINES_MAX) return 0;
    while (rows * width * (ptrdiff_t)itemsize % 64) rows++;    /* at most 64 / itemsize */
    return rows * width <= BNF_FLAT_LINES_MAX ? rows * width : 0;
}
#define BNF_FLAT_LINES_LEN(width) bnf_flat_lines_len(width, sizeof(T))
/* In cache too, contiguous rows whose BNF_FLAT_LEN does not fill whole lines go as such
 * runs (their plain stores on lines, bnf_flat_lines), from BNF_FLAT_LINES_RUNS runs of
 * them: one thread, float32, alternated, eval 0.72-0.86x the time, training 0.78-0.96x,
 * backward 0.82-1.00x ((128-1333, 300), (1600, 250), (800, 500)); narrow rows folded
 * 16 to a run (127 or 113 columns: 2032 and 1808 elements, where BNF_FLAT_LEN is 254
 * and 226) eval 0.73-0.83x, training 0.81-0.89x, backward 0.94-0.98x; on 8 runs ((32,
 * 300)) the backward measured 1.05-1.06x: repeating the factors cost more than the
 * split stores. */
#define BNF_FLAT_LINES_RUNS 16
static inline BNF_INLINE int bnf_flat_rows_lines(ptrdiff_t total, ptrdiff_t width,
                                                 size_t itemsize)
{
    ptrdiff_t len;
    if (!bnf_store_lines || total < BNF_FLAT_LINES_RUNS * width) return 0;  /* small calls */
    len = bnf_flat_lines_len(width, itemsize);
    return len > bnf_flat_len(width, itemsize) && total >= BNF_FLAT_LINES_RUNS * len;
}
/* Contiguous rows of any width up to a chunk are streamed as one such run straight from
 * the registers (where `direct`: the loops that run stream so, BNF_DIRECT_NT or
 * BNF_NORM_NT) when the runs fill whole lines, however far the output is from one (the
 * factors are rotated to match, bnf_repeat_factors). */
#define BNF_FLAT_NT(width, direct) ((direct) && BNF_FLAT_LINES_LEN(width) > 0)

/* dst[k][e] = src[k][(e + head) % width] for e < len (a multiple of width): per-channel
 * factors repeated along a flat run of whole rows that starts `head` elements into one. */
static inline BNF_INLINE void bnf_repeat_factors(double *const *dst, const double *const *src,
                                                 int nsrc, ptrdiff_t width, ptrdiff_t len,
                                                 ptrdiff_t head)
{
    /* a rotated row, then the filled part doubled: an element at a time with the index
     * wrapped cost ~0.8 ns an element, 600 ns of a (8, 64) FrozenBatchNorm call's 1100 */
    ptrdiff_t h = head % width;
    for (int k = 0; k < nsrc; k++) {
        memcpy(dst[k], src[k] + h, (size_t)(width - h) * sizeof(double));
        memcpy(dst[k] + (width - h), src[k], (size_t)h * sizeof(double));
        for (ptrdiff_t e = width; e < len; e *= 2)
            memcpy(dst[k] + e, dst[k], (size_t)(len - e < e ? len - e : e) * sizeof(double));
    }
}

/* Per-channel factors of channels c0 .. c0 + w - 1 repeated over their `group` columns. */
static inline BNF_INLINE void bnf_spread_factors(double *const *dst,
                                                 const double *const *src, int nsrc,
                                                 ptrdiff_t c0, ptrdiff_t w, ptrdiff_t group)
{
    for (int k = 0; k < nsrc; k++)
        for (ptrdiff_t c = 0; c < w; c++)
            for (ptrdiff_t i = 0; i < group; i++) dst[k][c * group + i] = src[k][c0 + c];
}

/* Streaming stores only for runs of at least this many bytes: a short run leaves lines
 * partly written, and the call per run costs more than it saves. */
#define BNF_STREAM_MIN_RUN 512

/* Rows-form output staged for streaming: rows per group, one inner-loop call and one
 * staged chunk.  Narrow rows that are contiguous in the output share one chunk (one
 * streaming call); narrow rows apart are not streamed (*stream cleared).  Rows not staged
 * go all in one call (or BNF_LEAD_ROWS), so that the intrinsics loops take them four at
 * a time: before, rows of 512 went two a call, one at a time.  One thread, in one
 * process against that, in cache: float32 eval / training / backward of (64, 512)
 * 0.76 / 0.88 / 0.96x the time, (4096, 300) 0.70 / 0.81 / 0.88x, (32, 1024) 0.80 / 0.90
 * / 0.98x, (8, 28, 28, 256) 0.92 / 0.96 / 0.97x, (64, 512, 7, 7) training 0.84x and
 * backward 0.92x (short runs as rows); two threads alike; float64 (64, 512) 0.87 / 0.94
 * / 1.02-1.03x; from DRAM and rows of 128 or fewer (flat) 0.98-1.01x. */
static inline BNF_INLINE ptrdiff_t bnf_row_group(ptrdiff_t width, ptrdiff_t ystride,
                                                 int *stream, size_t itemsize)
{
    if (width >= BNF_CHUNK) return 1;
    if (*stream && ystride != width) {
        if (width * (ptrdiff_t)itemsize < BNF_STREAM_MIN_RUN) *stream = 0;
        else return 1;
    }
    return BNF_CHUNK / width;
}

/* Accumulator lanes: a fixed count, so sums are identical for every vector width. */
#define BNF_LANES 32
#if BNF_CHUNK % BNF_LANES
#error "BNF_CHUNK must be a multiple of BNF_LANES (chunks of a run keep their lanes)"
#endif

#if BNF_LANES != 32
#error "bnf_sum_lanes pairs 32 lanes"
#endif
#if defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 12)
typedef double bnf_v8d __attribute__((vector_size(64), aligned(8)));
typedef double bnf_v4d __attribute__((vector_size(32)));
typedef double bnf_v2d __attribute__((vector_size(16)));
#endif
static inline BNF_INLINE double bnf_sum_lanes(const double *acc)
{
    /* Pairwise over the lanes, in a fixed order: lane l + 16 onto l, then l + 8, l + 4,
     * l + 2 and l + 1.  The kernels leave the lanes as whole vectors: loaded as such (GCC's
     * vector types, one instruction each in the AVX-512 clones) and halved in registers.
     * Written as an array halved in place by a loop over the widths, the adds went through
     * the stack, each level waiting on the last one's stores; unrolled as scalars, each
     * lane's load waited on a vector store it could not be forwarded from (a channel of
     * one 7x7 run, float32: its backward 0.93x the time unrolled). */
#if defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 12)
    bnf_v8d l0, l1, l2, l3;
    memcpy(&l0, acc, sizeof l0);
    memcpy(&l1, acc + 8, sizeof l1);
    memcpy(&l2, acc + 16, sizeof l2);
    memcpy(&l3, acc + 24, sizeof l3);
    bnf_v8d u = (l0 + l2) + (l1 + l3);
    bnf_v4d v = __builtin_shufflevector(u, u, 0, 1, 2, 3) +
                __builtin_shufflevector(u, u, 4, 5, 6, 7);
    bnf_v2d w = __builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3);
    return w[0] + w[1];
#else
    double u[8], v[4], w[2];
    for (int l = 0; l < 8; l++) u[l] = (acc[l] + acc[l + 16]) + (acc[l + 8] + acc[l + 24]);
    for (int l = 0; l < 4; l++) v[l] = u[l] + u[l + 4];
    for (int l = 0; l < 2; l++) w[l] = v[l] + v[l + 2];
    return w[0] + w[1];
#endif
}

/* Compensated sums (float64 data, BNF_COMPENSATED): the sums of squares s2 + s2lo and
 * the backward's sum dy and sum dy (x - mean), bnf_two_sum into each lane or column.
 * Why: such sums of quantized data (prices on a tick, integers) round one way.  Squares
 * of integers are 0 or 1 mod 4, so once a sum passes 2**53 ticks^2 each add drops a
 * remainder that a tie never rounds back up: tens of thousands of them put the float64
 * variance 60-230 ulps low, dgamma of gradients on x's grid 60-950 (an exact rational
 * reference; float32 and float16 results, rounded from double, were never affected). */
/* The lanes s[l] + lo[l] summed, compensated, in lane order: *sum + *sum_lo. */
static inline BNF_INLINE void bnf_sum_lanes_lo(const double *s, const double *lo,
                                               double *sum, double *sum_lo)
{
    double t = s[0], e = lo[0];
    for (int l = 1; l < BNF_LANES; l++) {
        bnf_two_sum(&t, &e, s[l]);
        e += lo[l];
    }
    *sum = t;
    *sum_lo = e;
}

/* Two of bnf_sum_lanes_lo in one loop, each with its own bits: its low part is a chain of
 * 62 dependent adds, and two side by side take about the time of one (a float64 channel
 * of one 7 x 7 run: the backward's two folds were half its time). */
static inline BNF_INLINE void bnf_sum_lanes_lo2(const double *s, const double *lo,
                                                const double *s2, const double *lo2,
                                                double *sum, double *sum_lo, double *sum2,
                                                double *sum2_lo)
{
    double t = s[0], e = lo[0], t2 = s2[0], e2 = lo2[0];
    for (int l = 1; l < BNF_LANES; l++) {
        bnf_two_sum(&t, &e, s[l]);
        bnf_two_sum(&t2, &e2, s2[l]);
        e += lo[l];
        e2 += lo2[l];
    }
    *sum = t;
    *sum_lo = e;
    *sum2 = t2;
    *sum2_lo = e2;
}

/* m2 (of a tile, or of a kernel's channel) NaN while its mean is finite: inf - inf where
 * float64 squares overflowed (|x - shift| above ~1e154), and NumPy's and PyTorch's
 * variance is inf there (invstd 0; the kernels gave NaN, and y NaN).  Data holding an
 * infinity or a NaN have a mean that is not finite and keep NaN, as theirs do.  Checked
 * once per tile of runs and per channel of rows, outside the loops over elements. */
static inline BNF_INLINE double bnf_m2_fix(double m2, double mean)
{
    return m2 != m2 && mean - mean == 0 ? INFINITY : m2;
}

/* m2 = sdd - sd^2 / n of a tile's sums around its shift (sdd + sdd_lo compensated, see
 * bnf_two_sum), with lo = sd / n and inv_n = 1 / n: the subtraction's, the product's and
 * the quotient's rounding errors put back (TwoSum, fma; r the division's exact
 * remainder, sd / n = lo + r / n), so that m2 is rounded once, at the end. */
static inline BNF_INLINE double bnf_tile_m2_lo(double sdd, double sdd_lo, double sd,
                                               double n, double lo, double inv_n)
{
    double r = fma(-lo, n, sd), p = sd * lo, p_lo = fma(sd, lo, -p), e = 0;
    bnf_two_sum(&sdd, &e, -p);
    return bnf_fold_lo(sdd, ((e + sdd_lo) - p_lo) - sd * (r * inv_n));
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

/* How products are added (bnfast_kernels_elem.h: C's fma(), exact everywhere): by the
 * FMA instruction, or by libm's fma() where the loops run without one. */
const char *bnf_fma_kind(void)
{
#if defined(__aarch64__) || defined(__FMA__)
    return "instruction";
#elif defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("fma"))
        return "libm fma() (this CPU has no FMA instruction: the same bits, slower)";
#if !defined(__clang__) && defined(__linux__) && !defined(BNFAST_NO_CLONES)
    return "instruction";
#else
    return "instruction (intrinsics loops), libm fma() (plain loops)";
#endif
#else
    return "libm fma()";
#endif
}

/* Per-channel vectors: on small inputs these loops are a large part of a call (scalar
 * sqrt and divide measured ~4 ns a channel).  Vector sqrt and divide are correctly
 * rounded, so every ISA gives the bits of the scalar loop. */

/* float16 <-> float32 for float16 inputs and outputs (computed in float32): IEEE
 * binary16, round to nearest even, NaN kept quiet; F16C where the CPU has it, else these
 * scalar forms, which give its bits.  NumPy's own conversions took 3-6 ns an element:
 * a float16 eval cost 27-31x a copy of its bytes, 5x PyTorch's time. */
static inline BNF_INLINE float bnf_half_to_float1(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, x;
    float f;
    if (e == 0x1f) {
        x = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0);
    } else if (e == 0) {
        uint32_t k = 0;
        if (m == 0) {
            x = sign;
        } else {
            while (!(m & 0x400u)) m <<= 1, k++;
            x = sign | ((113 - k) << 23) | ((m & 0x3ffu) << 13);
        }
    } else {
        x = sign | ((e + 112) << 23) | (m << 13);
    }
    memcpy(&f, &x, sizeof f);
    return f;
}

static inline BNF_INLINE uint16_t bnf_float_to_half1(float f)
{
    uint32_t x, sign, ax, h, rem;
    memcpy(&x, &f, sizeof x);
    sign = (x >> 16) & 0x8000u;
    ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf, NaN (quiet, the top of its payload) */
        return (uint16_t)(sign | 0x7c00u |
                          (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (ax < 0x38800000u) {                                    /* below 2^-14: subnormal */
        uint32_t m, q, shift, half;
        if (ax <= 0x33000000u) return (uint16_t)sign;            /* at most 2^-25: zero */
        m = (ax & 0x7fffffu) | 0x800000u;
        shift = 126 - (ax >> 23);                                /* units of 2^-24 */
        q = m >> shift;
        rem = m & ((1u << shift) - 1);
        half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    h = (ax - 0x38000000u) >> 13;
    rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

#if BNF_SIMD_X86
__attribute__((target("avx,f16c"))) static void bnf_h2f_f16c(const uint16_t *src,
                                                             float *dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i,
                         _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = bnf_half_to_float1(src[i]);
}

__attribute__((target("avx,f16c"))) static void bnf_f2h_f16c(const float *src, uint16_t *dst,
                                                             ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = bnf_float_to_half1(src[i]);
}
#endif

double bnf_half_to_double(uint16_t h)
{
    return (double)bnf_half_to_float1(h);
}

/* To float rounding to odd (truncated, its last bit set where inexact), then to the
 * nearest half: with 24 bits against 11 + 2 the result is d rounded once, as NumPy
 * rounds a double to float16 (plain double -> float -> half rounds twice, and a value
 * just past a half's midpoint could land on it and go to even). */
uint16_t bnf_double_to_half(double d)
{
    float f = (float)d;
    if (f == f && (double)f != d) {
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        if (fabs((double)f) > fabs(d)) u--;     /* rounded away from zero: truncate */
        u |= 1u;
        memcpy(&f, &u, sizeof f);
    }
    return bnf_float_to_half1(f);
}

void bnf_half_to_float(const uint16_t *src, float *dst, ptrdiff_t n)
{
#if BNF_SIMD_X86
    if (__builtin_cpu_supports("f16c")) {
        bnf_h2f_f16c(src, dst, n);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = bnf_half_to_float1(src[i]);
}

void bnf_float_to_half(const float *src, uint16_t *dst, ptrdiff_t n)
{
#if BNF_SIMD_X86
    if (__builtin_cpu_supports("f16c")) {
        bnf_f2h_f16c(src, dst, n);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = bnf_float_to_half1(src[i]);
}

/* dst[i] = src[i * stride] widened to double (stride in bytes). */
BNF_CLONES void bnf_widen_f32(const char *src, ptrdiff_t stride, double *dst, ptrdiff_t n)
{
    if (stride == (ptrdiff_t)sizeof(float)) {
        const float *s = (const float *)src;
#pragma omp simd
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = (double)s[i];
    } else {
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = (double)*(const float *)(src + i * stride);
    }
}

void bnf_widen_f16(const char *src, ptrdiff_t stride, double *dst, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + i * stride, sizeof h);
        dst[i] = (double)bnf_half_to_float1(h);
    }
}

void bnf_gather_f64(const char *src, ptrdiff_t stride, double *dst, ptrdiff_t n)
{
    if (stride == (ptrdiff_t)sizeof(double)) {
        memcpy(dst, src, (size_t)n * sizeof(double));
    } else {
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = *(const double *)(src + i * stride);
    }
}

/* scale[i] = scale[i] / sqrt(var[i] + eps) (the weight in, the eval factor out); the
 * first i with var[i] < 0, or -1 (then nothing is written). */
BNF_CLONES ptrdiff_t bnf_eval_scale(double *scale, const double *var, ptrdiff_t n, double eps)
{
    int neg = 0;
#pragma omp simd reduction(| : neg)
    for (ptrdiff_t i = 0; i < n; i++) neg |= var[i] < 0;
    if (neg) {
        for (ptrdiff_t i = 0; i < n; i++)
            if (var[i] < 0) return i;
    }
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++) scale[i] = scale[i] / sqrt(var[i] + eps);
    return -1;
}

/* Channels' normalization factors from their moments: var = m2 / n, invstd =
 * 1 / sqrt(var + eps), scale = weight * invstd, and shift (the bias in) minus lo * scale:
 * (x - hi - lo) * scale + bias keeps the offset hi exact. */
BNF_CLONES void bnf_finalize(const bnf_moments *m, ptrdiff_t n, double eps,
                             const double *weight, double *hi, double *lo, double *invstd,
                             double *scale, double *shift, double *var)
{
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++) {
        double v = m[i].m2 / m[i].n;
        double is = 1.0 / sqrt(v + eps);
        double a = weight[i] * is;
        hi[i] = m[i].hi;
        lo[i] = m[i].lo;
        invstd[i] = is;
        scale[i] = a;
        shift[i] = shift[i] - m[i].lo * a;
        var[i] = v;
    }
}

/* A training call's per-channel outputs after bnf_finalize: the mean hi + lo and invstd
 * (float64 arrays), and the variance for the running update, var n / (n - 1) (unbiased,
 * PyTorch's) or var (biased, Keras's).  A loop that vectorizes: a channel at a time in
 * Cython, its divisions took a twelfth of a (32, 256) training call. */
BNF_CLONES void bnf_train_outputs(ptrdiff_t C, double n, int unbiased, const double *hi,
                                  const double *lo, const double *invstd, const double *var,
                                  double *mean_out, double *invstd_out, double *running_var)
{
#pragma omp simd
    for (ptrdiff_t c = 0; c < C; c++) {
        mean_out[c] = hi[c] + lo[c];
        invstd_out[c] = invstd[c];
        running_var[c] = unbiased ? var[c] * n / (n - 1.0) : var[c];
    }
}

/* The dx coefficients of channels 0 .. C - 1 from their backward sums (the training
 * mode's dx = scale * (dy - k1 - (x - hi) * k2), bnfast._core._bwd_coeffs): lo = sum(x -
 * hi) / n, the part of the batch mean a double hi cannot hold (0 where hi is further
 * than a few ulps from the batch mean: taken as given), sum(dy (x - hi)) moved onto hi +
 * lo, k2 = invstd^2 sum(dy (x - mean)) / n, k1 = sum(dy) / n - lo k2; the corrections
 * only where finite (an infinite sum dy made inf - inf of an infinite sum dy (x - hi),
 * whose sign numpy keeps).  A loop over channels that vectorizes (three divisions a
 * channel: one at a time they took a sixth of a (32, 256) backward). */
BNF_CLONES void bnf_bwd_coeffs(ptrdiff_t C, double n, const double *hi, const double *invstd,
                               const double *sum_dy, double *sum_dy_xmu,
                               const double *sum_xmu, double *lo, double *k1, double *k2)
{
#pragma omp simd
    for (ptrdiff_t c = 0; c < C; c++) {
        double l = sum_xmu[c] / n, s = sum_dy_xmu[c], corr, kk;
        if (!(fabs(l) <= 8.9e-16 * fabs(hi[c]))) l = 0.0;
        lo[c] = l;
        corr = l * sum_dy[c];
        if (corr - corr == 0) s -= corr;
        sum_dy_xmu[c] = s;
        kk = invstd[c] * invstd[c] * (s / n);
        k2[c] = kk;
        corr = l * kk;
        k1[c] = sum_dy[c] / n - (corr - corr == 0 ? corr : 0.0);
    }
}

/* The element types, each with T, the name suffix S, BNF_TO_D / BNF_FROM_D (an element
 * to double, a double rounded to an element), BNF_T_FLOAT, BNF_T_HALF and
 * BNF_REDO_RATIO (tile_finish) and BNF_COMPENSATED (sums of squares and backward sums
 * compensated, bnf_two_sum: float64, whose results keep the sums' errors), which
 * bnfast_kernels_impl.h undefines when done. */
/* dx = a * dy stored by the backward sums of rows as they read dy (bnf_bwd_sums_dx_rows):
 * the output q (an element type's pointer), its row stride, the per-column factors, and
 * whether it is streamed. */
typedef struct {
    void *q;
    ptrdiff_t qstride;
    const double *a;
    int nt;
} bnf_dx_fixed;

#define T float
#define S f32
#define BNF_TO_D(v) ((double)(v))
#define BNF_FROM_D(d) ((T)(d))
#define BNF_T_FLOAT 1
#define BNF_T_HALF 0
#define BNF_REDO_RATIO (1.0 - 0x1p-20)
#define BNF_COMPENSATED 0
#include "bnfast_kernels_impl.h"

#define T double
#define S f64
#define BNF_TO_D(v) ((double)(v))
#define BNF_FROM_D(d) ((T)(d))
#define BNF_T_FLOAT 0
#define BNF_T_HALF 0
#define BNF_REDO_RATIO 0.5
#define BNF_COMPENSATED 1
#include "bnfast_kernels_impl.h"

/* float16, as its bits: read exactly, computed in double as float32 data are, rounded
 * to float32 and then to float16 (the bits of computing float16 data in float32 and
 * converting the result, which bnfast did before it read float16 natively). */
#define T uint16_t
#define S f16
#define BNF_TO_D(v) ((double)bnf_half_to_float1(v))
#define BNF_FROM_D(d) bnf_float_to_half1((float)(d))
#define BNF_T_FLOAT 0
#define BNF_T_HALF 1
#define BNF_REDO_RATIO (1.0 - 0x1p-20)
#define BNF_COMPENSATED 0
#include "bnfast_kernels_impl.h"

/* Channels of short runs that are not back to back (x[:, ::2] of an NCL array, stepped
 * channels of a channels-last one): a unit's rows are packed into a buffer (rows of nch *
 * run bytes), the rows kernels run on it, and the results are unpacked.  Runs of 2 to 32
 * bytes in powers of two are copied by fixed sizes, which the compiler turns into moves. */
#define BNF_PACK_LOOP(COPY)                                                               \
    for (ptrdiff_t r = 0; r < nrows; r++)                                                \
        for (ptrdiff_t c = 0; c < nch; c++) COPY;
#define BNF_PACK_SIZES(DST, SRC)                                                          \
    switch (run) {                                                                        \
    case 2: BNF_PACK_LOOP(memcpy(DST, SRC, 2)) break;                                     \
    case 4: BNF_PACK_LOOP(memcpy(DST, SRC, 4)) break;                                     \
    case 8: BNF_PACK_LOOP(memcpy(DST, SRC, 8)) break;                                     \
    case 16: BNF_PACK_LOOP(memcpy(DST, SRC, 16)) break;                                   \
    case 32: BNF_PACK_LOOP(memcpy(DST, SRC, 32)) break;                                   \
    default: BNF_PACK_LOOP(memcpy(DST, SRC, (size_t)run)) break;                          \
    }

void bnf_pack_runs(char *dst, const char *src, ptrdiff_t nrows, ptrdiff_t row_stride,
                   ptrdiff_t nch, ptrdiff_t channel_stride, ptrdiff_t run)
{
    BNF_PACK_SIZES(dst + (r * nch + c) * run, src + r * row_stride + c * channel_stride)
}

void bnf_unpack_runs(char *dst, const char *src, ptrdiff_t nrows, ptrdiff_t row_stride,
                     ptrdiff_t nch, ptrdiff_t channel_stride, ptrdiff_t run)
{
    BNF_PACK_SIZES(dst + r * row_stride + c * channel_stride, src + (r * nch + c) * run)
}
#undef BNF_PACK_SIZES
#undef BNF_PACK_LOOP

/* dst[i * dst_rs + j * dst_cs] = src[i * src_rs + j * src_cs] (byte strides) for a
 * rows x cols tile of `size`-byte elements (_copy_tiled: a transposing copy, which NumPy
 * does an element at a time across the whole array), in blocks of 8 x 8, the shorter of
 * the tile's two axes outermost: the other side then moves as a few sequential streams
 * (measured both ways on (131072, 64) float32, C -> F and F -> C order). */
#define BNF_TRANSPOSE_BLOCK(U)                                                            \
    do {                                                                                  \
        ptrdiff_t i1 = i0 + 8 < rows ? i0 + 8 : rows, nj = j0 + 8 < cols ? 8 : cols - j0; \
        for (ptrdiff_t i = i0; i < i1; i++) {                                             \
            const char *s = src + i * src_rs + j0 * src_cs;                              \
            char *d = dst + i * dst_rs + j0 * dst_cs;                                    \
            for (ptrdiff_t j = 0; j < nj; j++, s += src_cs, d += dst_cs)                \
                memcpy(d, s, sizeof(U));                                                 \
        }                                                                                 \
    } while (0)
#define BNF_TRANSPOSE_LOOP(U)                                                             \
    if (cols <= rows) {                                                                   \
        for (ptrdiff_t j0 = 0; j0 < cols; j0 += 8)                                        \
            for (ptrdiff_t i0 = 0; i0 < rows; i0 += 8) BNF_TRANSPOSE_BLOCK(U);            \
    } else {                                                                              \
        for (ptrdiff_t i0 = 0; i0 < rows; i0 += 8)                                        \
            for (ptrdiff_t j0 = 0; j0 < cols; j0 += 8) BNF_TRANSPOSE_BLOCK(U);            \
    }
void bnf_copy_2d(char *dst, ptrdiff_t dst_rs, ptrdiff_t dst_cs, const char *src,
                 ptrdiff_t src_rs, ptrdiff_t src_cs, ptrdiff_t rows, ptrdiff_t cols,
                 ptrdiff_t size)
{
    if (size == 4) {
        BNF_TRANSPOSE_LOOP(uint32_t)
    } else if (size == 8) {
        BNF_TRANSPOSE_LOOP(uint64_t)
    } else if (size == 2) {
        BNF_TRANSPOSE_LOOP(uint16_t)
    } else {
        for (ptrdiff_t i = 0; i < rows; i++)
            for (ptrdiff_t j = 0; j < cols; j++)
                memcpy(dst + i * dst_rs + j * dst_cs, src + i * src_rs + j * src_cs,
                       (size_t)size);
    }
}
#undef BNF_TRANSPOSE_LOOP
#undef BNF_TRANSPOSE_BLOCK

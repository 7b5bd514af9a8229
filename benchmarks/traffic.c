/* The bare memory traffic of batch norm's passes, for `benchmarks/interleaved.py
 * --floors`: loads, one add an element and stores, so that a pass costs what its reads
 * and writes cost and nothing else.  Not part of the build or the tests; interleaved.py
 * compiles it with the system C compiler (`cc -O2 -shared -fPIC`) and loads it with
 * ctypes.  On x86-64 the output is streamed (non-temporal stores) where bnfast would stream
 * it (the caller says), in the widest vectors the CPU has: one core on the Zen 4 dev VM
 * read and wrote DRAM 10-20% slower in 16-byte vectors than in 64-byte ones.  A smaller
 * output is stored plainly: streamed, it measured a floor bnfast does not take, and left
 * the output out of cache for the call timed next ((64, 512, 7, 7) eval 1.0 -> 2.3-2.8x a
 * copy after the floors).  Elsewhere: plain C. */
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <string.h>

/* read: four sums of a (+ b); write: out = a (+ b), streamed from the first aligned
 * element when `stream`, else stored; both return how far they went (the caller finishes
 * the tail) */
#define TRAFFIC_KERNELS(isa, TGT, V, W, ALIGN, ZERO, ADD, LOAD, STORE, STREAM)                     \
    __attribute__((target(TGT))) static size_t read_##isa(const float *a, const float *b,   \
                                                             size_t n, double *sum)         \
    {                                                                                       \
        V s0 = ZERO(), s1 = s0, s2 = s0, s3 = s0;                                           \
        float lanes[W];                                                                     \
        size_t i = 0;                                                                       \
        for (; i + 2 * W <= n; i += 2 * W) {                                                \
            s0 = ADD(s0, LOAD(a + i));                                                      \
            s1 = ADD(s1, LOAD(a + i + W));                                                  \
            if (b) {                                                                        \
                s2 = ADD(s2, LOAD(b + i));                                                  \
                s3 = ADD(s3, LOAD(b + i + W));                                              \
            }                                                                               \
        }                                                                                   \
        s0 = ADD(ADD(s0, s1), ADD(s2, s3));                                                 \
        memcpy(lanes, &s0, sizeof lanes);                                                   \
        for (int l = 0; l < W; l++) *sum += lanes[l];                                       \
        return i;                                                                           \
    }                                                                                       \
    __attribute__((target(TGT))) static size_t write_##isa(const float *a, const float *b,  \
                                                              float *out, size_t n,         \
                                                              int stream)                   \
    {                                                                                       \
        size_t i = 0;                                                                       \
        if (!stream) {                                                                      \
            if (b)                                                                          \
                for (; i + W <= n; i += W) STORE(out + i, ADD(LOAD(a + i), LOAD(b + i)));   \
            else                                                                            \
                for (; i + W <= n; i += W) STORE(out + i, LOAD(a + i));                     \
            return i;                                                                       \
        }                                                                                   \
        for (; i < n && ((uintptr_t)(out + i) & (ALIGN - 1)); i++)                          \
            out[i] = a[i] + (b ? b[i] : 0.0f);                                              \
        if (b)                                                                              \
            for (; i + W <= n; i += W) STREAM(out + i, ADD(LOAD(a + i), LOAD(b + i)));      \
        else                                                                                \
            for (; i + W <= n; i += W) STREAM(out + i, LOAD(a + i));                        \
        _mm_sfence();                                                                       \
        return i;                                                                           \
    }

TRAFFIC_KERNELS(avx512, "avx512f", __m512, 16, 64, _mm512_setzero_ps, _mm512_add_ps,
                _mm512_loadu_ps, _mm512_storeu_ps, _mm512_stream_ps)
TRAFFIC_KERNELS(avx2, "avx2", __m256, 8, 32, _mm256_setzero_ps, _mm256_add_ps,
                _mm256_loadu_ps, _mm256_storeu_ps, _mm256_stream_ps)
TRAFFIC_KERNELS(sse2, "sse2", __m128, 4, 16, _mm_setzero_ps, _mm_add_ps, _mm_loadu_ps,
                _mm_storeu_ps, _mm_stream_ps)

static int traffic_isa(void)
{
    return __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
}
#endif

/* Which kernels run: "avx512", "avx2", "sse2" (streamed stores where asked) or "c"
 * (plain). */
const char *traffic_kind(void)
{
#ifdef TRAFFIC_KERNELS
    static const char *names[] = {"sse2", "avx2", "avx512"};
    return names[traffic_isa()];
#else
    return "c";
#endif
}

/* The sum of a's n floats, and of b's when b is not NULL: one or two reads. */
double traffic_read(const float *a, const float *b, size_t n)
{
    double s = 0;
    size_t i = 0;
#ifdef TRAFFIC_KERNELS
    int isa = traffic_isa();
    i = isa == 2 ? read_avx512(a, b, n, &s) : isa == 1 ? read_avx2(a, b, n, &s)
                                                       : read_sse2(a, b, n, &s);
#endif
    for (; i < n; i++) s += a[i] + (b ? b[i] : 0.0f);
    return s;
}

/* out = a (+ b when not NULL): one or two reads and a write, streamed when `stream`
 * (x86-64). */
void traffic_write(const float *a, const float *b, float *out, size_t n, int stream)
{
    size_t i = 0;
#ifdef TRAFFIC_KERNELS
    int isa = traffic_isa();
    i = isa == 2   ? write_avx512(a, b, out, n, stream)
        : isa == 1 ? write_avx2(a, b, out, n, stream)
                   : write_sse2(a, b, out, n, stream);
#else
    (void)stream;
#endif
    for (; i < n; i++) out[i] = a[i] + (b ? b[i] : 0.0f);
}

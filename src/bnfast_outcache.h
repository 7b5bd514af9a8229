/* bnfast's large outputs: a NumPy memory handler that keeps the last freed blocks.
 *
 * An output of a large call is fresh memory: the kernel faults its pages in (the kernel
 * zeroes each one first), which on a 51 MB float32 eval cost as much again as the eval
 * (allocating 1.22-1.24x a copy against 0.58x into a warm `out=`, Zen 4). A training loop
 * frees last step's output just before asking for the same size again, so the arrays
 * bnfast allocates of BNF_OUTCACHE_MIN bytes or more carry this handler, whose free keeps
 * the block (up to bnf_outcache_max bytes, BNF_OUTCACHE_SLOTS blocks, the oldest
 * released first) for the next request of the same size. The arrays own their data as
 * any other (`flags.owndata`, `resize`); NumPy traces them for tracemalloc around the
 * handler as it does for its own. Included once, by bnfast/_core.pyx (NumPy's headers
 * first). */
#ifndef BNFAST_OUTCACHE_H
#define BNFAST_OUTCACHE_H

#include <Python.h>
#include <pythread.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* NumPy's own hugepage hint starts at 4 MiB; smaller blocks glibc keeps itself */
#define BNF_OUTCACHE_MIN ((size_t)1 << 22)
#define BNF_OUTCACHE_SLOTS 8

typedef struct {
    void *p;
    size_t size;
} bnf_outcache_block;

static bnf_outcache_block bnf_outcache_blocks[BNF_OUTCACHE_SLOTS]; /* newest first */
static int bnf_outcache_count = 0;
static size_t bnf_outcache_held = 0;
static size_t bnf_outcache_max = (size_t)256 << 20;
static PyThread_type_lock bnf_outcache_lock = NULL;  /* frees may come from any thread */
static PyObject *bnf_outcache_capsule = NULL;
static int bnf_outcache_hit = 0;   /* the last malloc reused a block (read under the GIL) */

static void *bnf_outcache_fresh(size_t size)
{
    void *p = malloc(size ? size : 1);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    /* as NumPy's default allocator does for large blocks */
    if (p != NULL && size >= BNF_OUTCACHE_MIN) {
        uintptr_t start = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
        if (start < (uintptr_t)p + size)
            madvise((void *)start, (uintptr_t)p + size - start, MADV_HUGEPAGE);
    }
#endif
    return p;
}

static void *bnf_outcache_malloc(void *ctx, size_t size)
{
    void *p = NULL;
    (void)ctx;
    bnf_outcache_hit = 0;
    if (size >= BNF_OUTCACHE_MIN) {
        PyThread_acquire_lock(bnf_outcache_lock, WAIT_LOCK);
        for (int i = 0; i < bnf_outcache_count; i++) {
            if (bnf_outcache_blocks[i].size == size) {   /* the same shape again */
                p = bnf_outcache_blocks[i].p;
                bnf_outcache_held -= size;
                memmove(bnf_outcache_blocks + i, bnf_outcache_blocks + i + 1,
                        (size_t)(bnf_outcache_count - i - 1) * sizeof(bnf_outcache_block));
                bnf_outcache_count--;
                break;
            }
        }
        PyThread_release_lock(bnf_outcache_lock);
        if (p != NULL) {
            bnf_outcache_hit = 1;
            return p;
        }
    }
    return bnf_outcache_fresh(size);
}

static void *bnf_outcache_calloc(void *ctx, size_t nelem, size_t elsize)
{
    (void)ctx;
    return calloc(nelem ? nelem : 1, elsize ? elsize : 1);
}

static void *bnf_outcache_realloc(void *ctx, void *p, size_t size)
{
    (void)ctx;
    return realloc(p, size ? size : 1);
}

/* Release every block beyond `max` bytes or BNF_OUTCACHE_SLOTS - room blocks, oldest
 * first; called with the lock held, frees after it is released. */
static int bnf_outcache_trim(size_t max, int room, void **drop)
{
    int n = 0;
    while (bnf_outcache_count > 0 &&
           (bnf_outcache_held > max || bnf_outcache_count > BNF_OUTCACHE_SLOTS - room)) {
        bnf_outcache_count--;
        drop[n++] = bnf_outcache_blocks[bnf_outcache_count].p;
        bnf_outcache_held -= bnf_outcache_blocks[bnf_outcache_count].size;
    }
    return n;
}

static void bnf_outcache_free(void *ctx, void *p, size_t size)
{
    void *drop[BNF_OUTCACHE_SLOTS];
    int n = 0;
    int kept = 0;
    (void)ctx;
    if (p == NULL) return;
    if (size >= BNF_OUTCACHE_MIN) {
        PyThread_acquire_lock(bnf_outcache_lock, WAIT_LOCK);
        if (size <= bnf_outcache_max) {
            n = bnf_outcache_trim(bnf_outcache_max - size, 1, drop);
            memmove(bnf_outcache_blocks + 1, bnf_outcache_blocks,
                    (size_t)bnf_outcache_count * sizeof(bnf_outcache_block));
            bnf_outcache_blocks[0].p = p;
            bnf_outcache_blocks[0].size = size;
            bnf_outcache_count++;
            bnf_outcache_held += size;
            kept = 1;
        }
        PyThread_release_lock(bnf_outcache_lock);
    }
    for (int i = 0; i < n; i++) free(drop[i]);
    if (!kept) free(p);
}

static PyDataMem_Handler bnf_outcache_handler = {
    "bnfast_output_cache",
    1,
    {NULL, bnf_outcache_malloc, bnf_outcache_calloc, bnf_outcache_realloc,
     bnf_outcache_free},
};

/* At import: the lock and the handler's capsule (kept for the life of the process: the
 * arrays hold references to it). 0, or -1 with an exception set. */
static int bnf_outcache_init(void)
{
    bnf_outcache_lock = PyThread_allocate_lock();
    if (bnf_outcache_lock == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    bnf_outcache_capsule = PyCapsule_New(&bnf_outcache_handler, "mem_handler", NULL);
    return bnf_outcache_capsule == NULL ? -1 : 0;
}

/* Set the bytes kept (0: none, and release what is held); returns the previous limit. */
static size_t bnf_outcache_set_max(size_t max)
{
    void *drop[BNF_OUTCACHE_SLOTS];
    int n;
    size_t old;
    PyThread_acquire_lock(bnf_outcache_lock, WAIT_LOCK);
    old = bnf_outcache_max;
    bnf_outcache_max = max;
    n = bnf_outcache_trim(max, 0, drop);
    PyThread_release_lock(bnf_outcache_lock);
    for (int i = 0; i < n; i++) free(drop[i]);
    return old;
}

static size_t bnf_outcache_get_max(void)
{
    return bnf_outcache_max;
}

static size_t bnf_outcache_held_bytes(void)
{
    size_t held;
    PyThread_acquire_lock(bnf_outcache_lock, WAIT_LOCK);
    held = bnf_outcache_held;
    PyThread_release_lock(bnf_outcache_lock);
    return held;
}

/* A new array like x (its memory order, no subclass), from the cache when it is large
 * and the cache keeps anything; NULL with an exception set. *recycled: whether its
 * memory is a freed output's (its pages mapped already: the kernels may stream into it).
 * The GIL is held from the handler's malloc to the read of bnf_outcache_hit. */
static PyObject *bnf_outcache_new_like(PyArrayObject *x, int *recycled)
{
    PyObject *old, *o, *back;
    *recycled = 0;
    if ((size_t)PyArray_NBYTES(x) < BNF_OUTCACHE_MIN || bnf_outcache_max == 0)
        return PyArray_NewLikeArray(x, NPY_KEEPORDER, NULL, 0);
    old = PyDataMem_SetHandler(bnf_outcache_capsule);
    if (old == NULL) return NULL;
    bnf_outcache_hit = 0;
    o = PyArray_NewLikeArray(x, NPY_KEEPORDER, NULL, 0);
    *recycled = o != NULL && bnf_outcache_hit;
    back = PyDataMem_SetHandler(old);
    Py_DECREF(old);
    if (back == NULL) {
        Py_XDECREF(o);
        return NULL;
    }
    Py_DECREF(back);
    return o;
}

#endif

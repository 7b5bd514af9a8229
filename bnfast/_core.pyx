# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Compiled core of bnfast: argument checks on raw arrays, the split of an array into
work units, and the OpenMP loops over the C kernels in ``src/``.

Every array is seen as a 3-D view (outer, C, inner): C is the channel axis; the other
axes are ordered by stride and merged.  Two kernel forms cover every layout:

* runs form, inner > 1 contiguous (NCHW, NCL, Fortran (N, C)): a unit is one channel
  (or a fixed slice of its runs);
* rows form, channels contiguous (NHWC, (samples, features)): a unit is a block of up
  to 256 channels over a fixed slice of rows.

Units and their merge order depend only on the shape, never on the thread count, so
results are bitwise identical for any number of threads.
"""
cimport cython
cimport numpy as cnp
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from libc.stdint cimport uint16_t
from libc.float cimport DBL_EPSILON
from libc.math cimport fabs, sqrt, NAN, INFINITY
from cython.parallel cimport prange

from bnfast._openmp_helpers cimport (BNF_GNU_OPENMP, BNF_HAVE_OPENMP, bnf_omp_max_threads,
                                     bnf_omp_thread_limit, bnf_omp_thread_num,
                                     bnf_omp_version)

import itertools
import operator
import os

import numpy as np

cnp.import_array()

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

cdef extern from "numpy/arrayobject.h":
    object PyArray_NewLikeArray(cnp.ndarray prototype, cnp.NPY_ORDER order, void *descr,
                                int subok)

cdef extern from "bnfast_outcache.h":
    int bnf_outcache_init() except -1
    size_t bnf_outcache_set_max(size_t max_bytes)
    size_t bnf_outcache_held_bytes()
    size_t bnf_outcache_get_max()
    object bnf_outcache_new_like(cnp.ndarray x, int *recycled)

bnf_outcache_init()

cdef extern from "bnfast_kernels.h" nogil:
    ctypedef struct bnf_moments:
        double n, hi, lo, m2
    enum: BNF_MAX_WIDTH
    enum: BNF_GROUP_COLS
    enum: BNF_STREAM
    enum: BNF_CACHED
    enum: BNF_L1_REDUCE
    enum: BNF_L1_NORM
    enum: BNF_L1_DX
    enum: BNF_STAGE_NEAR
    enum: BNF_FETCH_NEXT
    enum: BNF_FROM_DRAM
    enum: BNF_WIDE_QUADS
    enum: BNF_ROWS_WIDE
    enum: BNF_SPACED_QUADS
    enum: BNF_ROWWISE_MIN_BYTES
    enum: BNF_SPLIT_NEXT
    enum: BNF_BLOCK_CHANNELS
    enum: BNF_TILE_ELEMS
    enum: BNF_CHUNK
    void bnf_two_sum(double *s, double *lo, double v)
    double bnf_fold_lo(double s, double lo)
    Py_ssize_t bnf_group_block(Py_ssize_t cols, Py_ssize_t group)
    const char *bnf_simd_isa()
    const char *bnf_fma_kind()
    int bnf_set_simd_level(int level)
    int bnf_set_stats_spaced(int on)
    int bnf_set_adds_as_fma(int on)
    int bnf_set_norm_v3(int on)
    int bnf_cpu_amd()
    long bnf_l1d_bytes()
    int bnf_set_kernel_alloc_fails(int on)
    int bnf_set_wide_flat(int on)
    int bnf_set_grouped_wide(int on)
    Py_ssize_t bnf_set_l1_rows_max(int kind, Py_ssize_t n)
    int bnf_set_store_lines(int on)
    int bnf_set_masked_tails(int on)
    int bnf_set_fuse_sums_dx(int on)
    Py_ssize_t bnf_set_dx_in_order_bytes(Py_ssize_t n, int from_dram)
    Py_ssize_t bnf_set_norm_in_order_bytes(Py_ssize_t n)
    int bnf_set_flat_whole_lines(int on)
    void *bnf_alloc64(size_t bytes)
    void bnf_free64(void *p)
    void bnf_stream_fence()
    void bnf_merge_unit_moments(bnf_moments *mom, Py_ssize_t C, Py_ssize_t nsb)
    void bnf_merge_same_counts(bnf_moments *a, double *m2lo, const bnf_moments *b,
                               Py_ssize_t w, double na, double nb)
    void bnf_merge_unit_sums(double *sum_dy, double *sum_dy_xmu, double *sum_xmu,
                             Py_ssize_t C, Py_ssize_t nsb)
    void bnf_widen_f32(const char *src, Py_ssize_t stride, double *dst, Py_ssize_t n)
    void bnf_widen_f16(const char *src, Py_ssize_t stride, double *dst, Py_ssize_t n)
    void bnf_half_to_float(const uint16_t *src, float *dst, Py_ssize_t n)
    void bnf_float_to_half(const float *src, uint16_t *dst, Py_ssize_t n)
    double bnf_half_to_double(uint16_t h)
    uint16_t bnf_double_to_half(double d)
    void bnf_gather_f64(const char *src, Py_ssize_t stride, double *dst, Py_ssize_t n)
    Py_ssize_t bnf_eval_scale(double *scale, const double *var, Py_ssize_t n, double eps)
    void bnf_finalize(const bnf_moments *m, Py_ssize_t n, double eps, const double *weight,
                      double *hi, double *lo, double *invstd, double *scale, double *shift,
                      double *var)
    void bnf_train_outputs(Py_ssize_t C, double n, int unbiased, const double *hi,
                           const double *lo, const double *invstd, const double *var,
                           double *mean_out, double *invstd_out, double *running_var)
    void bnf_bwd_coeffs(Py_ssize_t C, double n, const double *hi, const double *invstd,
                        const double *sum_dy, double *sum_dy_xmu, const double *sum_xmu,
                        double *lo, double *k1, double *k2)
    void bnf_copy_2d(char *dst, Py_ssize_t dst_rs, Py_ssize_t dst_cs, const char *src,
                     Py_ssize_t src_rs, Py_ssize_t src_cs, Py_ssize_t rows, Py_ssize_t cols,
                     Py_ssize_t size)
    void bnf_pack_runs(char *dst, const char *src, Py_ssize_t nrows, Py_ssize_t row_stride,
                       Py_ssize_t nch, Py_ssize_t channel_stride, Py_ssize_t run)
    void bnf_unpack_runs(char *dst, const char *src, Py_ssize_t nrows, Py_ssize_t row_stride,
                         Py_ssize_t nch, Py_ssize_t channel_stride, Py_ssize_t run)
    enum: BNF_F32
    enum: BNF_F64
    enum: BNF_F16
    void bnf_stats_runs(int type, const void *x, Py_ssize_t nruns, Py_ssize_t stride,
                        Py_ssize_t length, bnf_moments *m, int flags)
    void bnf_stats_rows(int type, const void *x, Py_ssize_t nrows, Py_ssize_t stride,
                        Py_ssize_t width, Py_ssize_t group, Py_ssize_t tile_rows,
                        bnf_moments *m, int flags)
    void bnf_bwd_runs_cached(int type, const void *dy, Py_ssize_t dys, Py_ssize_t dycs,
                             const void *x, Py_ssize_t xs, Py_ssize_t xcs, void *dx,
                             Py_ssize_t dxs, Py_ssize_t dxcs, Py_ssize_t nruns,
                             Py_ssize_t length, Py_ssize_t k, int training, double n,
                             const double *mean, const double *invstd, const double *scale,
                             double *sum_dy, double *sum_dy_xmu, double *sum_xmu,
                             double *lo, double *k1, double *k2, int flags)
    void bnf_train_runs_cached(int type, const void *x, Py_ssize_t xs, Py_ssize_t xcs,
                               void *y, Py_ssize_t ys, Py_ssize_t ycs, Py_ssize_t nruns,
                               Py_ssize_t length, Py_ssize_t k, double eps,
                               const double *weight, double *hi, double *lo,
                               double *invstd, double *scale, double *shift, double *var,
                               bnf_moments *m, int flags)
    void bnf_norm_runs(int type, const void *x, Py_ssize_t xs, Py_ssize_t xcs, void *y,
                       Py_ssize_t ys, Py_ssize_t ycs, Py_ssize_t nruns, Py_ssize_t length,
                       Py_ssize_t k, const double *mean, const double *scale,
                       const double *shift, int flags, const void *x_next,
                       Py_ssize_t k_next, bnf_moments *m_next)
    void bnf_norm_rows(int type, const void *x, Py_ssize_t xs, void *y, Py_ssize_t ys,
                       Py_ssize_t nrows, Py_ssize_t width, Py_ssize_t group,
                       const double *mean, const double *scale, const double *shift,
                       int flags)
    void bnf_bwd_sums_runs(int type, const void *dy, Py_ssize_t dys, Py_ssize_t dycs,
                           const void *x, Py_ssize_t xs, Py_ssize_t xcs, Py_ssize_t nruns,
                           Py_ssize_t length, Py_ssize_t k, const double *mean,
                           double *sum_dy, double *sum_dy_xmu, double *sum_xmu,
                           const void *x_next, Py_ssize_t k_next)
    void bnf_bwd_sums_rows(int type, const void *dy, Py_ssize_t dys, const void *x,
                           Py_ssize_t xs, Py_ssize_t nrows, Py_ssize_t width,
                           Py_ssize_t group, const double *mean, double *sum_dy,
                           double *sum_dy_xmu, double *sum_xmu, int flags)
    bint bnf_bwd_sums_dx_rows(int type, const void *dy, Py_ssize_t dys, const void *x,
                              Py_ssize_t xs, void *dx, Py_ssize_t dxs, Py_ssize_t nrows,
                              Py_ssize_t width, Py_ssize_t group, const double *mean,
                              const double *a, double *sum_dy, double *sum_dy_xmu,
                              double *sum_xmu, int flags)
    bint bnf_bwd_sums_dx_runs(int type, const void *dy, Py_ssize_t dys, Py_ssize_t dycs,
                              const void *x, Py_ssize_t xs, Py_ssize_t xcs, void *dx,
                              Py_ssize_t dxs, Py_ssize_t dxcs, Py_ssize_t nruns,
                              Py_ssize_t length, Py_ssize_t k, const double *mean,
                              const double *a, double *sum_dy, double *sum_dy_xmu,
                              double *sum_xmu, int flags)
    void bnf_bwd_dx_runs(int type, const void *dy, Py_ssize_t dys, Py_ssize_t dycs,
                         const void *x, Py_ssize_t xs, Py_ssize_t xcs, void *dx,
                         Py_ssize_t dxs, Py_ssize_t dxcs, Py_ssize_t nruns,
                         Py_ssize_t length, Py_ssize_t k, const double *mean,
                         const double *a, const double *k1, const double *k2, int flags,
                         const void *dy_next, const void *x_next, Py_ssize_t k_next)
    void bnf_bwd_dx_rows(int type, const void *dy, Py_ssize_t dys, const void *x,
                         Py_ssize_t xs, void *dx, Py_ssize_t dxs, Py_ssize_t nrows,
                         Py_ssize_t width, Py_ssize_t group, const double *mean,
                         const double *a, const double *k1, const double *k2,
                         int flags)


# ----------------------------------------------------------------------------------
# Tuning constants.  They fix the partition of every reduction, so changing one changes
# low-order bits of results; the thread count never does.

# A channel (runs form) or channel block (rows form) of at most this many bytes per
# array is processed in one unit: statistics, then normalization while it is in L2.
DEF FUSE_BYTES = 1 << 20
# Backward takes channels of runs of up to this many bytes (x and dy) whole, sums then
# dx, the second pass from L2 or L3; larger ones go in superblocks of rows, two passes
# over DRAM (the sums need every row first). Measured on one thread (Zen 4, float32,
# against 2 MB): (128, 64, 56, 56) 3.66 -> 2.53x a copy (two threads 2.29 -> 1.48x),
# (512, 64, 28, 28) 4.28 -> 2.82x; 8 and 16 MB no better. Where many threads share a
# smaller L3, a channel's second pass reads DRAM again: the two passes' traffic.
DEF BWD_FUSE_BYTES = 1 << 22
# Channels of runs (training forward, x) of at most this many bytes are pipelined: one
# block's normalization runs beside the next block's statistics (_pipeline). Backward
# takes channels of up to BWD_FUSE_BYTES (x and dy) in blocks, sums then dx: (32, 64,
# 56, 56) and (40, 64, 56, 56), 392 and 501 KB of each, 0.85-0.87x the time of a fused
# channel at a time. Training channels of 802 KB pipelined measured 1.14x: not there.
DEF PIPE_BYTES = 1 << 19
# Fused float32 backward from DRAM takes blocks of channels of up to this many bytes of
# each array where one fits (x and dy of a block and the next block's x in L2), and
# spreads the prefetch of the next block over both passes: its x during this block's
# sums, its dy during this block's dx (_split_fetch). The sums alone used to leave DRAM
# idle. One thread, in one process against blocks of CHANNEL_BLOCK_BYTES prefetched
# during dx (Zen 4, ABBA): (64, 256, 28, 28) backward 0.81-0.83x the time, (64, 128, 28,
# 28) 0.83-0.85x, (32, 256, 28, 28) 0.82-0.85x, (16, 64, 56, 56) 0.76x, (64, 256, 14,
# 14) 0.83-0.86x (runs of 784 bytes, no prefetch of the next block: the smaller blocks
# alone). Two threads: the smaller blocks alone 0.81-0.94x, with the split 0.94-1.15x,
# so one thread only splits. Smaller blocks alone gave most of that on some shapes
# (0.74-0.87x) and none on (64, 256, 28, 28) (0.88-0.99x); in cache they cost 1-2%, so
# only from x and dy of _reduce_blocks_min or more (_bwd_small_blocks). Channels of 401 KB
# (one a block) measured 1.08-1.16x: not there. float64 1.02-1.14x and float16
# 0.96-1.04x: not there. The next block's sums interleaved run by run with this block's
# dx instead measured 1.10-1.20x.
# Where the next block is prefetched (_fetch_next: runs of 1 KB or more), a channel of up
# to this size is a block of its own, any dtype: a block of several, with the next one
# beside it, overfilled L2. Against blocks of BWD_SPLIT_BYTES (ninth session, ABBA, one
# thread, float32): (64, 256, 16, 16) 0.61x the time, (128, 256, 16, 16) 0.77x, (64,
# 512, 16, 16) 0.78x, (64, 256, 20, 20) 0.79x, (32, 128, 24, 24) 0.87x, (32, 256, 16,
# 16) 0.95x, (16, 128, 32, 32) 0.95x; two threads 0.87-0.94x; float64 (blocks of
# CHANNEL_BLOCK_BYTES before) 0.82-0.93x. Channels larger than this measured 0.94-1.04x
# one a block: left as they were.
DEF BWD_SPLIT_BYTES = 1 << 18
# Bytes of each array in a block of channels of runs (_channel_block). Measured on one
# thread (Zen 4, float32, in one process against a channel at a time, ABBA): training
# (64, 256, 28, 28) in blocks of 6 channels (1.2 MB) 0.88x the time, of 8 0.89-0.91x,
# 12 0.95x, 4 0.97x; (64, 1024, 14, 14) 16-32 channels (0.8-1.6 MB) 0.91-0.92x, 8
# 1.01x; (32, 64, 56, 56) 4 channels 0.97x, 2-3 1.02x.
DEF CHANNEL_BLOCK_BYTES = 3 << 19
# Training takes blocks of at most this many bytes where a channel fits, so that a block
# and the next (read beside it) stay in L2 between the statistics and the normalization.
# Those measurements were of training after training; after another call (an
# evaluation, a copy: the L3 full of what it read) the blocks of CHANNEL_BLOCK_BYTES,
# normalized from L3, lost it. Seventh session, one thread, float32, in one process,
# against them (after an evaluation / after a copy / after a training): (64, 256, 28,
# 28) 0.62-0.79 / 0.61-0.83 / 0.85-0.97x the time, (64, 128, 28, 28) 0.85 / 0.94 /
# 0.95, (32, 256, 28, 28) 0.86 / 0.86 / 0.84, (96, 256, 28, 28) 0.88 / 0.89 / 1.04,
# (64, 512, 14, 14) 0.74 / 0.73 / 0.73, (16, 64, 56, 56) 1.00 / 1.05 / 0.99; float64
# (32, 256, 28, 28) 0.89-0.91; two threads 0.87-0.93; in cache 0.99-1.01. Channels
# larger than this keep CHANNEL_BLOCK_BYTES: one of 401 KB a block measured 1.08-1.13x
# on (128, 256, 28, 28).
DEF TRAIN_BLOCK_BYTES = 3 << 17
# The statistics alone (`moments`, a training batch over processes) and the backward
# sums alone read channels of runs in those blocks when x holds at least
# REDUCE_BLOCKS_MIN bytes and the runs at least REDUCE_BLOCKS_RUN: then from DRAM a row
# of a block is one stream, where a channel at a time reads runs a row apart. Measured
# on one thread (Zen 4, float32, ABBA against a channel at a time): `moments` of (64,
# 256, 28, 28) 0.77x the time, (32, 512, 28, 28) 0.71x, (128, 256, 16, 16) 0.86x, (64,
# 64, 28, 28) 0.90x, (32, 64, 28, 28) 0.97x, but (16, 64, 28, 28) 1.06x and (8, 64, 28,
# 28) 1.03x (in cache the blocks' call a run costs more), and runs of 14 x 14 1.3-1.47x.
# Backward with the statistics held fixed (training=False) in blocks from that size too:
# (64, 256, 28, 28) 0.79x, (32, 64, 56, 56) 0.86x, (64, 128, 14, 14) 0.87x; in cache
# (2-16, 16-64, 14-28, 14-28) 1.02-1.05x. The same sizes (x, or x and dy) gate the
# prefetch of the next block or channel while a fused one is finished from cache
# (_pipeline's backward, _unit's training).
DEF REDUCE_BLOCKS_MIN = 1 << 24
DEF REDUCE_BLOCKS_RUN = 1 << 10
# An input up to this size (with its output, well within L2) is normalized as in cache:
# no prefetches ((256, 64) eval 8.0 -> 7.0 us); at 1 MiB that measured 5-19% slower than
# prefetching (Zen 4). Larger ones prefetch where _prefetch_ordered says so.
DEF CACHED_BYTES = 1 << 18
# Runs of at most this many elements, with the channels back to back, are read as rows
# (Job.group).
DEF GROUP_MAX_INNER = 128
# ... but evaluation alone reads runs from this many elements as runs, a row of channels
# a call (the rows form spreads each channel's factors over its columns and reads a
# block of channels down all the rows). float32 eval against a copy, one thread, Zen 4:
# (256, 2048, 7, 7) 1.75 -> 1.30x, (128, 512, 7, 7) 1.94 -> 1.75x, (2, 512, 7, 7) 4.14 ->
# 3.00x, (1, 64, 7, 7) 2.67 -> 1.94x, (64, 256, 8, 8) 2.91 -> 2.31x, (64, 512, 11, 11) 2.20
# -> 1.73x; (64, 512, 7, 7) and (8, 512, 7, 7) unchanged; runs of 25-40 were slower so.
DEF EVAL_GROUP_MAX_INNER = 47
# Channels of runs in cache a channel at a time (_cached_runs): x of at most this many
# bytes (training; the backward's), runs of at least this many elements (and at most
# GROUP_MAX_INNER in training, CACHED_RUNS_BWD_MAX_INNER in the backward), at most this
# many runs a channel in training and in the backward (half those of float16).
DEF CACHED_RUNS_BYTES = 1 << 20
DEF CACHED_RUNS_BWD_BYTES = 1 << 22
DEF CACHED_RUNS_MIN_INNER = 40
DEF CACHED_RUNS_BWD_MAX_INNER = 256
DEF CACHED_RUNS_OUTER_FWD = 8
DEF CACHED_RUNS_OUTER_BWD = 4
# ... whose elements count this many times in the threads' work (_launch): a short run's
# element in cache costs ~0.6-0.9 ns in training and backward, a streamed one's ~0.1-0.5.
# Two threads against one (float32, in one process): (2, 1024, 7, 7) training 0.74x the
# time, backward 0.70x; (4, 128, 10, 10) 0.74x, 0.64x; (1, 512, 7, 7) 0.90x, 0.89x;
# (2, 168, 7, 7), 16464 elements, 0.98x, 0.86x (one per 65536 elements: one thread).
DEF CACHED_RUNS_WORK = 8
# Elements per unit when a channel or block is larger than that.
DEF SUPER_ELEMS = 1 << 18
# Elements per unit of channels not back to back in x or dy (Job.gap == GAP_INPUTS):
# packed into scratch, in L2; and per piece of dx computed into scratch (GAP_OUTPUT).
DEF GAP_ELEMS = 1 << 15
# ... whose runs are normalized packed when shorter than this (longer ones as runs)
DEF GAP_NORM_INNER = 32
# Rows in segments (a crop, a window) are read in place (not x copied) from segments of
# this many bytes and rows (the reductions, evaluation): _segments_pay.
DEF SEG_BYTES = 8192
DEF SEG_ROWS = 16
DEF SEG_ELEMENTWISE_BYTES = 2048
DEF SEG_ELEMENTWISE_ROWS = 4
DEF SEG_RUNS_INNER = 32
# ... and for the backward (its sums, then dx, a call a segment each), rows whose
# channels lie together from segments of this many bytes: one thread, float32, 51 MB,
# NHWC and (N, T, C) windows in place against x copied first, training backward 1.65x
# the time at 14 KB, 1.29x at 28 KB, 1.16x at 56 KB, 1.03x at 224 KB (training
# forward in place from 28 KB 0.90-0.97x, `moments` always faster in place; NCHW crops,
# runs, 112 x 112 in place 0.71x: they keep SEG_BYTES)
DEF SEG_BWD_ROWS_BYTES = 1 << 17
# Below this many elements per thread, no OpenMP region at all.
DEF PAR_MIN_ELEMS = 1 << 16
# Below this many elements the GIL is kept (releasing it costs more than the work).
DEF NOGIL_MIN_ELEMS = 4096


# ----------------------------------------------------------------------------------
# Threads

cdef int _num_threads = 0      # 0: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)
# GNU OpenMP's thread pool does not survive fork(): a child's first parallel region
# waits forever on the parent's threads. So a child forked after a parallel region ran
# here (multiprocessing's default start method on Linux) runs every call serially; and
# so does a child forked while the parent had other threads at all: another library's
# OpenMP team (PyTorch's) in the same libgomp hung it just as well, and its threads
# cannot be told from others.
cdef int _teams_started = 0
cdef bint _serial_after_fork = False
cdef bint _threads_at_fork = False


def _before_fork():
    global _threads_at_fork
    if BNF_GNU_OPENMP:
        try:
            _threads_at_fork = len(os.listdir("/proc/self/task")) > 1
        except OSError:         # no /proc: only this module's own teams are known
            _threads_at_fork = False


def _after_fork_in_child():
    global _serial_after_fork
    if BNF_GNU_OPENMP and (_teams_started or _threads_at_fork):
        _serial_after_fork = True     # LLVM's and Intel's runtimes survive fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _forked_by_multiprocessing():
    """This process is a child that multiprocessing forked (its 'fork' start method),
    so bnfast is imported after the fork, which the handler above cannot see: a parent
    with another library's OpenMP team (PyTorch's) left this libgomp waiting on threads
    that are gone, and the first parallel region hung (a DataLoader-style worker that
    imports bnfast lazily). Such a child runs serially, as one forked after the import."""
    import sys
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return False
    try:
        return (mp.parent_process() is not None
                and mp.get_start_method(allow_none=True) == "fork")
    except Exception:
        return False


if BNF_GNU_OPENMP and _forked_by_multiprocessing():
    _serial_after_fork = True

# Outputs of at least this many bytes are written with streaming (non-temporal) stores:
# they bypass the caches, which saves reading each output line before writing it.
cdef Py_ssize_t _stream_bytes = 1 << 23
# Outputs not streamed of more than this many bytes (BNF_STAGE_NEAR), where they lie just
# ahead of an input modulo 1 MiB, are staged through L1 (bnf_nt_aliased): the loads that
# follow their stores wait for them. Any size: the twentieth session measured small ones
# on 4 KiB pages, where the offsets collide only by chance ((512, 256) float32 eval
# 22.5-22.9 us either way), but on huge pages they collide at every size ((256, 64) eval
# 2.6 -> 11.9 us, staged 3.5; (1024, 256) 61 -> 193, staged 50-60; twenty-fourth session).
# Intel only: on Zen 4 (twenty-sixth session, one thread, float32, x and the output in one
# 2 MiB-paged buffer, the output 16-1024 bytes ahead modulo 1 MiB, staged against not,
# alternated in one process) the loads did not wait as long as staging costs: (4096, 64)
# eval 75-83 us staged, 53-57 plain (56 and 53 with the output far off), training
# 130-144 against 107-116; (16, 64, 32, 32) eval 218-272 against 184-201 (160 far off),
# training 345-458 against 291-322; NumPy's own arrays there, (16, 64, 32, 32) backward
# 521 against 460, (32, 64, 7, 7) 66 against 58.
cdef Py_ssize_t _stage_near_bytes = \
    (2 ** 62 if sizeof(Py_ssize_t) >= 8 else 2 ** 30) if bnf_cpu_amd() else 0
# Tests: rows in segments always read in place (_segments_pay), however short.
cdef bint _segments_always = False
# At most one thread per this many elements (_threads_for_work; tests lower it).
cdef Py_ssize_t _par_min_elems = PAR_MIN_ELEMS
# The smallest x whose reductions alone go in blocks (_in_blocks; tests lower it).
cdef Py_ssize_t _reduce_blocks_min = REDUCE_BLOCKS_MIN
# A large channel finished from cache prefetches the next one only on AMD, where it was
# measured to gain (Zen 4): fused backward's dx the next block for channels larger than
# BWD_SPLIT_BYTES (_fetch_next; (128, 64, 56, 56) 2.58 -> 1.95x a copy, _pipeline), and
# a fused training channel too large to pipeline the next channel as it is normalized
# (BNF_FETCH_NEXT, _unit). On the Intel dev VM (2 MiB of L2, a mesh L3) both cost;
# without them, one thread, in one process: backward float32 (64, 64, 56, 56)
# 0.80-0.82x the time, (16, 64, 112, 112) 0.76-0.83x, (32, 64, 56, 56) 0.77x, (256, 64,
# 28, 28) 0.81x, (128, 64, 56, 56) 0.86x, (128, 256, 28, 28) 0.92-0.93x; float64 (32,
# 64, 56, 56) 0.77x, (64, 128, 28, 28) 0.74x, (64, 256, 28, 28) 0.88x; two threads
# 0.82-0.84x; training (64, 64, 56, 56) 0.86-0.88x, (16, 64, 112, 112) 0.91-0.92x,
# (128, 64, 56, 56) and float64 0.98-1.00x. (Channels of up to BWD_SPLIT_BYTES keep their
# prefetch: on two threads it measured 1.00-1.02x without.) Where it does not prefetch,
# backward takes such channels one a block (_channel_block), not 2-5 in a block of
# CHANNEL_BLOCK_BYTES (x and dy over this L2): (96, 256, 28, 28) 0.85x the time, (128,
# 256, 28, 28) 0.91-0.92x, float64 (64, 128, 28, 28) 0.90x, (48, 256, 28, 28) 0.95x,
# two threads 0.90-0.92x; channels of 768 KB or more went one a block already. The
# same bits either way.
cdef bint _fetch_large = bnf_cpu_amd()
# Whether the ordered units (normalize, dx) of an input over CACHED_BYTES prefetch it
# when their output is not streamed: by CPU vendor, AMD yes (Zen 4, above). On the Intel
# dev VM (2 MiB of L2, a mesh L3) those prefetches cost at every size; without them, one
# thread, float32, in one process (ABBA): eval into out= (1024-4096, 256), (3136, 512),
# (64, 7, 7, 512), (20000, 64) 0.83-0.88x the time, allocating 0.82-0.96x, backward
# 0.93-0.96x; two threads, training 0.90-0.93x, eval 0.84-0.89x; from DRAM (51 MB,
# allocated output) 0.91-1.00x; NCHW (runs) 0.99-1.01x. Streamed outputs keep them
# (without, (8192, 256) eval measured 1.1-1.3x the time). The same bits either way.
# On Zen 4 (twenty-sixth session, one thread, float32, in one process, with them against
# without) they pay only on rows under ORDERED_PF_ROW_BYTES: narrower rows, called again
# on the same arrays, measured 0.96-1.26x the time without, and after 64 MB read
# elsewhere (x from DRAM) 1.09-1.53x ((4096, 64), (8192, 128), (10000, 96), (20000, 64),
# (16, 28, 28, 128)); rows of 1 KB and wider 0.69-0.95x without for eval, 0.79-1.01x
# training, 0.84-1.00x backward, called again ((512-7000, 256), (256-1024, 1024); from
# DRAM 0.88-1.21x); runs (NCHW) eval 0.82-0.85x, from DRAM 0.73-0.82x. Hence 2 there:
# rows narrower than that only. 0: never; 1: always.
cdef int _prefetch_ordered = 2 if bnf_cpu_amd() else 0
# Whether eval-mode backward of channels of runs (NCHW) stores each run's dx as its sums
# read it, in one pass (bnf_bwd_sums_dx_runs), rather than a block's sums and then its
# dx from cache: by CPU vendor, Intel yes (0.82-0.95x the time there). On Zen 4
# (twenty-sixth session, one thread, float32, in one process) the one pass took 1.47x the
# time of the two steps on (64, 256, 28, 28) (9.1 against 6.2 ms) and 1.38x on (16, 128,
# 56, 56); in cache (8, 256, 28, 28) the same. The same bits either way.
cdef bint _fused_eval_runs = not bnf_cpu_amd()
# Wide rows streamed in groups of rows and column blocks where L1d is under 40 KiB
# (bnf_grouped_wide in bnfast_kernels.c: Zen 4's 32 KiB yes, the Intel VM's 48 no).
bnf_set_grouped_wide(1 if bnf_l1d_bytes() < 40960 else 0)
DEF ORDERED_PF_ROW_BYTES = 1024
# Rows of float32 (the others: the backward sums) wider than a block (BNF_MAX_WIDTH) and up
# to this many columns have their reductions from DRAM taken whole rows a unit
# (_full_rows): the float32 backward sums' state (32 bytes a column: three sums and the
# mean), loaded and stored every row, within two thirds of a core's L1 data cache.
cdef Py_ssize_t _full_rows_cols = bnf_l1d_bytes() // 48
# ... and the backward sums of such rows in cache too from this many bytes of x (beyond
# what L2 keeps of x and dy beside each other): one thread, in one process against blocks,
# Intel VM (2 MiB of L2), float32 (384-1024, 1024), (700, 768), (2048, 640): backward
# 0.91-0.96x the time, eval-mode backward (then in one pass) 0.80-0.91x; float64 (192-512,
# 1024), (1024, 768) 0.95-1.00x and 0.82-0.90x; two threads 0.94-1.04x and 0.86-1.00x. At
# 1 MB of x 0.97-1.03x; their training (the statistics) 0.98-1.17x: not there.
cdef Py_ssize_t _full_rows_sums_bytes = 3 << 19
# The reductions of rows from DRAM whole rows a unit however wide (_full_rows): the
# statistics of float32, the training backward sums of float32 and float16 four rows at a
# time (BNF_WIDE_QUADS); and the rows' L1 prefetch only for rows of up to 2 KB
# (bnf_l1_rows_max): by CPU vendor. Zen 4 (twenty-seventh session) measured the sums at
# 0.6-0.85x the time of a row at a time in blocks of 512 columns (the seventh session had
# measured a row at a time faster there), `moments` of (12544, 1024) - (3136, 4096)
# 0.64-0.70x a copy against 0.75-1.00x in blocks. The Intel VM keeps blocks, a row at a
# time and its L1 prefetches: not measured again.
cdef bint _whole_rows = bnf_cpu_amd()
# ... of which float32 rows of at least this many bytes four rows at a time, narrower ones
# a row at a time (folded from under 512 bytes; eval-mode: in the one pass that stores dx
# as its sums read dy): 0 (all four at a time) where the CPU has AVX-512 (Zen 4, above),
# 3 KB where it has not, where (_spaced_quads) the four rows lie a quarter of a unit apart
# and the training backward's sums take them so at any width. Zen 3 (AVX2), one thread,
# float32, 51 MB, toggled in one process (21-41 repetitions, 2-4 runs), a row at a time
# against four adjacent rows, backward: (200704, 64) 0.89-0.92x the time (two threads
# 0.78x), (131072, 100) 0.86-0.89x, (42816, 300) 0.85-0.88x, (64, 28, 28, 256)
# 0.88-0.94x (0.99x on a loaded host; two threads 0.94x), (100352, 128) 0.91-0.93x,
# (33450, 384) 0.92-0.96x, (25088, 512) 0.93-1.04x, (20070, 640) 0.96-0.97x; but (16725,
# 768) 1.01-1.09x and (12544, 1024) 1.12-1.15x. Eval-mode backward: (42816, 300) 0.89x,
# (25088, 512) 0.78x, (20070, 640) 0.82x, (12544, 1024) 1.08x. In a C harness over 51 MB
# there, rows of 1 KB took 0.53-0.59 ns an element a row at a time against 0.75-0.98 four
# adjacent rows at a time with any prefetch (x and dy read with one add, 0.36-0.45).
# Four rows a quarter of a unit apart (BNF_SPACED_QUADS: eight streams each in memory
# order, no prefetches: the CPU's own follow them), in the harness with 2 MiB pages: 1 KB
# rows 0.40-0.42 against 0.43-0.46 a row at a time and 0.35-0.37 read with one add; 2 KB
# 0.44 against 0.53 and 0.65-0.81 adjacent, 4 KB 0.43 against 0.64-0.74 and 0.60. In
# bnfast, training backward, against a row at a time / four adjacent rows: (200704, 64)
# 0.86x / 0.83x, (64, 28, 28, 256) 0.89x / 0.88x, (131072, 100) 0.86x / 0.81x, (25088,
# 512) 0.93x / 0.87x; two threads (200704, 64) 0.92x / 0.93x, (64, 28, 28, 256) 0.92x /
# 0.89x; against four adjacent rows (16725, 768) 0.87-0.91x, (12544, 1024) 0.83-0.88x,
# (3136, 4096) 0.93x, and against the default before (a row at a time under 3 KB)
# (401408, 32) 0.86x, (100352, 128) 0.72x. Eval-mode backward of rows of 3 KB and more
# against four adjacent rows: (16725, 768) 0.88x, (12544, 1024) 0.92x, (3136, 4096) 0.87x.
# Each order gives other bits than the others, the same for any thread count (a unit's
# rows, which the spacing follows, are fixed by the shape). Zen 4 keeps four adjacent rows
# (measured faster than a row at a time there; spaced rows not measured there).
cdef Py_ssize_t _quads_min_bytes = 0 if bnf_set_simd_level(-1) >= 4 else 3072
cdef bint _spaced_quads = bnf_cpu_amd() and bnf_set_simd_level(-1) < 4
# ... and the eval-mode backward's sums of rows over this many bytes, then its dx: not the
# one pass that stores dx as the sums read dy (bnf_bwd_sums_dx_rows), which needs a row at
# a time. Zen 4, one thread, float32, 51 MB, in one process against the one pass:
# (42816, 300) 1.98 -> 1.57x a copy, (33450, 384) 1.85 -> 1.61x, (25690, 500) 1.96 ->
# 1.61x, (25088, 512) 2.97-5.46 -> 1.70-1.86x, (16725, 768) 3.08-4.61 -> 1.67-1.77x,
# (12544, 1024) 2.61-5.00 -> 1.96-2.30x, (3136, 4096) 2.24-4.65 -> 2.03-2.14x; two threads
# (12544, 1024) 2.46 -> 1.57x. Narrower rows keep the one pass: (50176, 256) 1.55-1.63
# against 1.57-1.68x, (200704, 64) 1.62-1.63 against 1.50-1.88 (two threads 0.96-0.97
# against 1.02-1.13). Where float32 rows under _quads_min_bytes sum a row at a time (Zen
# 3), they take the one pass at any width: (25088, 512) 0.78x the time there.
DEF BEVAL_WHOLE_ROW_BYTES = 1024
bnf_set_l1_rows_max(BNF_L1_REDUCE, 2048 if _whole_rows else -1)
# The normalize of rows over 1 KB and dx of any rows from DRAM prefetch rows ahead into
# L2, not L1, on AMD (bnf_rows_ahead_pf: Zen 4's 32 KiB L1d; eval of 768-1024 columns
# 0.56-0.83x the time, backward 0.75-0.96x there, twenty-eighth session). The Intel VM
# (48 KiB) keeps L1: not measured.
bnf_set_l1_rows_max(BNF_L1_NORM, 1024 if bnf_cpu_amd() else -1)
bnf_set_l1_rows_max(BNF_L1_DX, 0 if bnf_cpu_amd() else -1)
# Training backward of channels of runs whose rows alias in L2 (_rows_alias) goes in two
# passes in memory order (tuning, tests: _set_alias_two_pass; the same bits)
cdef bint _alias_two_pass = True
# Channels of few short runs in cache go a channel at a time (_cached_runs; tuning:
# _set_cached_runs)
cdef bint _cached_runs_on = True
# Blocks of columns of the backward begin on the output's lines (_line_blocks).
cdef bint _line_blocks_on = True


def _set_simd_level(level):
    """Set the intrinsics inner loops: 4 (AVX-512), 3 (AVX2) or 0 (the plain loops),
    capped at what the CPU supports; None only asks. Returns the previous level. For
    tests and benchmarks: every level gives the same bits."""
    return bnf_set_simd_level(-1 if level is None else max(0, int(level)))


def _set_fetch_large(on):
    """Whether a large channel finished from cache prefetches the next one: fused
    backward's blocks of more than BWD_SPLIT_BYTES (without: one channel a block),
    fused training's channels too large to pipeline (set by CPU vendor at load: AMD
    yes). The same bits either way. None leaves it; returns the previous setting
    (tuning, tests)."""
    global _fetch_large
    old = _fetch_large
    if on is not None:
        _fetch_large = bool(on)
    return old


def _set_cached_runs(on):
    """Whether training and backward of channels of few short runs in cache go a channel
    at a time (_cached_runs; on by default). None leaves it; returns the previous setting
    (tuning, tests)."""
    global _cached_runs_on
    old = _cached_runs_on
    if on is not None:
        _cached_runs_on = bool(on)
    return old


def _set_alias_two_pass(on):
    """Whether training backward of channels of runs whose rows alias in L2 (a sample
    stride of a multiple of 128 KB: (64, 256, 16, 16)) takes its sums over the whole
    array and then dx, two passes in memory order, rather than each channel's sums and
    then its dx from cache (the same bits; on by default). None leaves it; returns the
    previous setting (tuning, tests)."""
    global _alias_two_pass
    old = _alias_two_pass
    if on is not None:
        _alias_two_pass = bool(on)
    return old


def _set_full_rows_sums_bytes(n):
    """Set the smallest x whose backward sums in cache go whole rows a unit (_full_rows;
    None leaves it); returns the previous value (tuning, tests: the same bits)."""
    global _full_rows_sums_bytes
    old = _full_rows_sums_bytes
    if n is not None:
        _full_rows_sums_bytes = int(n)
    return old


def _set_full_rows_cols(n):
    """Set the widest rows whose reductions (statistics, backward sums) from DRAM go
    whole rows a unit (_full_rows; 0: none; None leaves it); returns the previous value
    (tuning, tests: the same bits)."""
    global _full_rows_cols
    old = _full_rows_cols
    if n is not None:
        _full_rows_cols = int(n)
    return old


def _set_line_blocks(on):
    """Whether the backward's blocks of columns begin on the output's lines
    (_line_blocks; None leaves it); returns the previous setting (tests: the same bits)."""
    global _line_blocks_on
    old = _line_blocks_on
    if on is not None:
        _line_blocks_on = bool(on)
    return old


def _set_wide_flat(on):
    """Whether contiguous rows wider than a chunk with a streamed output are normalized
    (dx computed) whole rows at a time (on), or in blocks of columns; None leaves it.
    Returns the previous setting (tuning, tests: the same bits)."""
    return bool(bnf_set_wide_flat(-1 if on is None else int(bool(on))))


def _set_grouped_wide(on):
    """Whether contiguous rows wider than a chunk with a streamed output are normalized
    in groups of rows and column blocks (bnf_grouped_wide; by default where L1d is under
    40 KiB). None leaves it; returns the previous setting (tuning, tests: the same bits)."""
    return bool(bnf_set_grouped_wide(-1 if on is None else int(bool(on))))


def _set_whole_rows(on):
    """Whether the reductions of rows from DRAM go whole rows a unit however wide: the
    statistics of float32 (the same bits), the training backward sums of float32 and
    float16 four rows at a time (other bits, the same for any thread count) (_whole_rows;
    by default on AMD). None leaves it; returns the previous setting (tuning, tests)."""
    global _whole_rows
    old = _whole_rows
    if on is not None:
        _whole_rows = bool(on)
    return old


def _set_quads_min_bytes(n):
    """Set the narrowest float32 rows (bytes) whose backward sums from DRAM go four rows
    at a time under _whole_rows (_quads_min_bytes: 0 where the CPU has AVX-512, 3 KB
    where not); narrower ones a row at a time, but the training backward's where
    _spaced_quads (other bits, the same for any thread count). None leaves it; returns
    the previous value (tuning, tests)."""
    global _quads_min_bytes
    old = _quads_min_bytes
    if n is not None:
        _quads_min_bytes = max(0, int(n))
    return old


def _set_stats_spaced(on):
    """Whether the statistics of rows take a tile's quads from rows a quarter of the tile
    apart (bnf_stats_spacing; tiles of 16 rows or more), not four adjacent rows (other
    bits, the same every way). None leaves it; returns the previous setting (tuning)."""
    return bool(bnf_set_stats_spaced(-1 if on is None else int(bool(on))))


def _set_spaced_quads(on):
    """Whether the backward sums of float32 whole rows from DRAM (_whole_rows) go four
    rows a quarter of a unit apart (BNF_SPACED_QUADS): the training backward's at any
    width, the eval-mode backward's from _quads_min_bytes; else four adjacent rows from
    there and a row at a time below (_spaced_quads: by default on AMD without AVX-512).
    Other bits either way, the same for any thread count. None leaves it; returns the
    previous setting (tuning, tests)."""
    global _spaced_quads
    old = _spaced_quads
    if on is not None:
        _spaced_quads = bool(on)
    return old


def _set_l1_rows_max(n, kind="reduce"):
    """Set the widest rows (bytes) that a kind of rows loop from DRAM ("reduce": the
    statistics and backward sums; "normalize"; "dx") prefetches rows ahead into L1, not
    L2 only (bnf_l1_rows_max; None leaves it); returns the previous value (tuning, tests:
    the same bits)."""
    kinds = {"reduce": BNF_L1_REDUCE, "normalize": BNF_L1_NORM, "dx": BNF_L1_DX}
    if kind not in kinds:
        raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
    return bnf_set_l1_rows_max(kinds[kind], -1 if n is None else int(n))


def _set_kernel_alloc_fails(on):
    """While on, the kernels' own heap buffers fail as when out of memory, so that their
    fallbacks run (tests: the same bits); returns the previous setting."""
    return bool(bnf_set_kernel_alloc_fails(-1 if on is None else int(bool(on))))


def _set_prefetch_ordered(on):
    """Whether normalize and dx of an input over CACHED_BYTES prefetch it when their
    output is not streamed: False never, True always, 2 on rows narrower than
    ORDERED_PF_ROW_BYTES only (set by CPU vendor at load: AMD 2, others False). The same
    bits either way. None leaves it; returns the previous setting (tuning, tests)."""
    global _prefetch_ordered
    old = _prefetch_ordered
    if on is not None:
        _prefetch_ordered = 2 if (on == 2 and not isinstance(on, bool)) else int(bool(on))
    return True if old == 1 else False if old == 0 else old


def _set_fused_eval_runs(on):
    """Whether eval-mode backward of channels of runs goes in one pass where
    _set_fused_eval_backward allows it (set by CPU vendor at load: Intel yes, AMD no).
    The same bits either way. None leaves it; returns the previous setting (tuning,
    tests)."""
    global _fused_eval_runs
    old = _fused_eval_runs
    if on is not None:
        _fused_eval_runs = bool(on)
    return old


def _set_adds_as_fma(on):
    """Whether the intrinsics backward sums of runs add by fused multiply-adds by 1 (the
    same bits; set by CPU vendor at load: AMD yes). None leaves it; returns the previous
    setting (tuning, tests)."""
    return bool(bnf_set_adds_as_fma(-1 if on is None else (1 if on else 0)))


def _set_norm_v3(on):
    """Whether AVX2 (level 3) normalizes float32 and float64 by its intrinsics loops, not
    gcc's vectorized plain loop (the same bits; set by CPU vendor at load: AMD yes). None
    leaves it; returns the previous setting (tuning, tests)."""
    return bool(bnf_set_norm_v3(-1 if on is None else (1 if on else 0)))


def _set_store_lines(on):
    """Whether the rows forms put their plain (not streamed) stores on lines (the same
    bits; on by default). None leaves it; returns the previous setting (tuning, tests)."""
    return bool(bnf_set_store_lines(-1 if on is None else (1 if on else 0)))


def _set_masked_tails(on):
    """Whether the AVX-512 rows loops end each row (its plain stores, its sums) with one
    masked vector, and streamed runs write their heads and tails by masked vectors within
    their lines, rather than an element at a time (the same bits; on by default). None
    leaves it; returns the previous setting (tuning, tests)."""
    return bool(bnf_set_masked_tails(-1 if on is None else (1 if on else 0)))


def _set_fused_eval_backward(on):
    """Whether eval-mode backward (statistics held fixed) stores dx as its sums read dy,
    in one pass (rows; runs, each run's dx right after its sums), rather than the sums
    and then dx of each unit or block (the same bits; on by default). None leaves it;
    returns the previous setting (tuning, tests)."""
    return bool(bnf_set_fuse_sums_dx(-1 if on is None else (1 if on else 0)))


def _set_dx_in_order_bytes(n, dram=True):
    """Set the narrowest rows (bytes) whose streamed dx goes a row at a time in memory
    order rather than four rows at a time, for x from DRAM (`dram`: x of
    _reduce_blocks_min bytes or more) or not (the same bits either way). None leaves it;
    returns the previous value (tuning, tests)."""
    return bnf_set_dx_in_order_bytes(-1 if n is None else int(n), 1 if dram else 0)


def _set_norm_in_order_bytes(n):
    """Set n: the streamed normalize of rows a multiple of n bytes apart goes a row at a
    time in memory order rather than four rows at a time (0: every row; the same bits
    either way). None leaves it; returns the previous value (tuning, tests)."""
    return bnf_set_norm_in_order_bytes(-1 if n is None else int(n))


def _set_flat_whole_lines(on):
    """Whether contiguous rows that do not fill whole lines (300 float32 columns) go as
    runs of several rows that do, streamed or in cache (the same bits; on by default).
    None leaves it; returns the previous setting (tuning, tests)."""
    return bool(bnf_set_flat_whole_lines(-1 if on is None else (1 if on else 0)))


def _set_segments_always(flag):
    """Read rows in segments in place however short the segments (tests); returns the
    previous setting."""
    global _segments_always
    old = _segments_always
    _segments_always = bool(flag)
    return old


def _set_par_min_elems(n):
    """Set the elements per thread below which a call starts no more threads (tests:
    small arrays through the threaded paths; the work units, and so the bits, do not
    depend on it); returns the previous value."""
    global _par_min_elems
    old = _par_min_elems
    _par_min_elems = max(1, int(n))
    return old


def _threads_for(elems):
    """Threads a call on `elems` elements would start now (tests)."""
    return _threads_for_work(elems)


def _set_reduce_blocks_min(n):
    """Set the size of x from which the reductions alone (statistics, backward sums) of
    channels of runs go in blocks (tests); returns the previous value."""
    global _reduce_blocks_min
    old = _reduce_blocks_min
    _reduce_blocks_min = int(n)
    return old


def _set_stage_near_bytes(n):
    """Set the output size above which an output not streamed is staged where it lies
    near an input (tests); returns the previous value."""
    global _stage_near_bytes
    old = _stage_near_bytes
    _stage_near_bytes = int(n)
    return old


def _set_stream_bytes(n):
    """Set the output size from which streaming stores are used (tuning, benchmarks);
    returns the previous value."""
    global _stream_bytes
    old = _stream_bytes
    _stream_bytes = int(n)
    return old


def set_output_cache(max_bytes):
    """Set how many bytes of freed outputs bnfast keeps for its next calls (process-wide);
    returns the previous limit.

    An output that bnfast allocates (no ``out=``) of 4 MiB or more is fresh memory, whose
    pages the kernel faults in on first write: on a 51 MB float32 array that costs about
    as much as the batch norm itself. When such an array is freed, bnfast keeps its
    memory (up to ``max_bytes`` in all, the 8 most recent blocks) and hands it to the next
    output of the same size, as a training loop asks every step. The default keeps up to
    256 MiB; ``0`` keeps nothing and releases what is held. Passing ``out=`` avoids the
    question altogether.

    Parameters
    ----------
    max_bytes : int
        A non-negative byte count.

    Examples
    --------
    >>> import bnfast
    >>> old = bnfast.set_output_cache(0)        # release, and keep nothing from now on
    >>> bnfast.get_output_cache()["held_bytes"]
    0
    >>> _ = bnfast.set_output_cache(old)
    """
    k = _index(max_bytes, "set_output_cache: max_bytes")
    if k < 0:
        raise ValueError(f"set_output_cache: max_bytes must be a non-negative int, "
                         f"got {max_bytes!r}")
    return int(bnf_outcache_set_max(<size_t>min(k, <object>(<size_t>-1))))


def get_output_cache():
    """The freed-output cache's limit and what it holds now, in bytes:
    ``{"max_bytes": ..., "held_bytes": ...}`` (see :func:`set_output_cache`).

    Examples
    --------
    >>> import bnfast
    >>> sorted(bnfast.get_output_cache())
    ['held_bytes', 'max_bytes']
    """
    return {"max_bytes": int(bnf_outcache_get_max()),
            "held_bytes": int(bnf_outcache_held_bytes())}


def set_num_threads(n):
    """Set the number of threads bnfast kernels use (process-wide).

    Parameters
    ----------
    n : int or None
        A positive count, or ``None`` / ``0`` to follow the OpenMP runtime again
        (``OMP_NUM_THREADS``, ``threadpoolctl`` limits).

    Examples
    --------
    >>> import bnfast
    >>> bnfast.set_num_threads(1)
    >>> bnfast.get_num_threads()
    1
    >>> bnfast.set_num_threads(None)
    """
    global _num_threads
    if n is None:
        _num_threads = 0
        return
    k = _index(n, "set_num_threads: n")
    if k < 0 or k > 2**31 - 1:
        raise ValueError(f"set_num_threads: n must be a non-negative int below 2**31, "
                         f"got {n!r}")
    _num_threads = k


def get_num_threads():
    """Number of threads the next bnfast call may use, computed now as a call would.

    The count set by :func:`set_num_threads`, else OpenMP's (``OMP_NUM_THREADS``,
    ``threadpoolctl`` limits), either capped by ``OMP_THREAD_LIMIT``; 1 when built
    without OpenMP, and in a process forked
    while its parent had other threads, such as bnfast's or another library's OpenMP
    threads (GNU OpenMP's threads do not survive ``fork``: use the ``spawn`` or
    ``forkserver`` start method for threaded children), where bnfast was imported
    before the fork or the child is one that ``multiprocessing`` forked (README
    "Threads"). Calls on small
    inputs use fewer threads (none below a work threshold).

    Parameters
    ----------
    None

    Examples
    --------
    >>> import bnfast
    >>> bnfast.set_num_threads(2)
    >>> bnfast.get_num_threads() in (1, 2)     # 1 when built without OpenMP
    True
    >>> bnfast.set_num_threads(None)
    """
    return _max_threads()


cdef inline int _max_threads() noexcept nogil:
    cdef int limit
    if not BNF_HAVE_OPENMP or _serial_after_fork:
        return 1
    if _num_threads > 0:
        limit = bnf_omp_thread_limit()   # OMP_THREAD_LIMIT caps set_num_threads too
        return _num_threads if _num_threads < limit else limit
    return bnf_omp_max_threads()


cdef inline int _threads_for_work(Py_ssize_t elems) noexcept nogil:
    """Threads the settings allow, at most one per PAR_MIN_ELEMS elements."""
    cdef Py_ssize_t t, by_work
    if elems < 2 * _par_min_elems:     # one thread whatever the settings: no OpenMP call
        return 1
    t = _max_threads()
    by_work = elems // _par_min_elems
    if t > by_work:
        t = by_work
    return <int>t if t > 1 else 1


def _build_info():
    """Facts about this build (used by show_config / ``python -m bnfast info``)."""
    return {
        "openmp": bool(BNF_HAVE_OPENMP),
        "openmp_version": int(bnf_omp_version()),
        "simd_isa": (<bytes>bnf_simd_isa()).decode(),
        "simd_loops": _SIMD_LOOPS.get(bnf_set_simd_level(-1), "plain loops"),
        "fma": (<bytes>bnf_fma_kind()).decode(),
    }


# The inner loops in use, by level (bnf_set_simd_level).
_SIMD_LOOPS = {4: "AVX-512 intrinsics", 3: "AVX2 intrinsics", 0: "plain loops"}


# ----------------------------------------------------------------------------------
# Geometry: an array as (outer, C, inner) with element strides.

DEF MAX_LEVELS = 4     # levels of outer rows (a crop of NHWC: W, H, N); more: copied

ctypedef struct Geo:
    Py_ssize_t outer, C, inner     # inner == 1: rows form
    Py_ssize_t os, cs              # element strides of the rows (level 0) and channels
    # Rows evenly spaced in segments of `seg` (level 0); segments laid out by up to
    # MAX_LEVELS - 1 further levels (a crop or a window of the outer axes), level l + 1
    # of lc[l] segments ls[l] elements apart. nlev == 0: one level, seg == outer.
    Py_ssize_t seg
    int nlev
    Py_ssize_t lc[MAX_LEVELS]
    Py_ssize_t ls[MAX_LEVELS]

ctypedef struct Groups:
    # How the ordered non-channel axes of a call are merged (fixed by x): order[kin:]
    # into one contiguous inner run, order[lo[l]:hi] into the rows of level l, where
    # hi is kin for level 0 and lo[l - 1] above it.
    int kin
    int nlev                       # levels of outer axes (0: no outer axis)
    int lo[MAX_LEVELS]


cdef int _order_axes(cnp.ndarray a, int axis, int *order) noexcept:
    """Non-channel axes of size > 1, by decreasing stride (stable). Returns the count."""
    cdef int nd = cnp.PyArray_NDIM(a), k = 0, i, j, t
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *st = cnp.PyArray_STRIDES(a)
    for i in range(nd):
        if i != axis and shape[i] > 1:
            order[k] = i
            k += 1
    for i in range(1, k):      # insertion sort, stable
        t = order[i]
        j = i - 1
        while j >= 0 and st[order[j]] < st[t]:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = t
    return k


cdef bint _geometry(cnp.ndarray a, int axis, const int *order, int nord, int nabove,
                    Groups *gr, bint derive, Geo *g) noexcept:
    """Fill g for `a` with the non-channel axes `order` (the first `nabove` of them
    outside the channel) merged as `gr` says; derive: merge as far as `a` allows and
    record it in `gr`. False when `a` has no such view with contiguous inner runs,
    positive strides and no element twice, or needs more than MAX_LEVELS levels."""
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *st = cnp.PyArray_STRIDES(a)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(a)
    cdef Py_ssize_t outer = 1, inner = 1, count = 1, base = 0, ext, s
    cdef int i, ax, lev = -1, kin
    cdef bint channel_placed
    g.C = shape[axis]
    g.nlev = 0
    if cnp.PyArray_SIZE(a) == 0:
        # no elements: nothing to read or write (size-0 axes are not in `order`)
        g.outer = 0
        g.inner = 1
        g.os = 0
        g.cs = 1
        g.seg = 0
        if derive:
            gr.kin = nord
            gr.nlev = 0
        return True
    # inner group: merged into one contiguous run
    if derive:
        i = nord - 1
        while i >= nabove and st[order[i]] == inner * isz:
            inner *= shape[order[i]]
            i -= 1
        gr.kin = i + 1
    else:
        for i in range(nord - 1, gr.kin - 1, -1):
            ax = order[i]
            if st[ax] != inner * isz:
                return False
            inner *= shape[ax]
    kin = gr.kin
    # outer axes, innermost first: each merged into its level's evenly spaced rows (i of
    # -1: past the last, closing the level open)
    for i in range(kin - 1, -2, -1):
        ax = order[i] if i >= 0 else axis
        if i >= 0 and lev >= 0 and \
                (st[ax] == count * base * isz if derive else i >= gr.lo[lev]):
            if st[ax] != count * base * isz:
                return False
            count *= shape[ax]
            if derive:
                gr.lo[lev] = i
            continue
        if lev >= 0:                    # close level `lev`
            if lev == 0:
                g.seg = count
                g.os = base
            else:
                g.lc[lev - 1] = count
                g.ls[lev - 1] = base
            outer *= count
        if i < 0:
            break
        lev += 1
        if lev >= MAX_LEVELS or (not derive and lev >= gr.nlev):
            return False
        if derive:
            gr.lo[lev] = i
        if st[ax] <= 0 or st[ax] % isz:
            return False
        base = st[ax] // isz
        count = shape[ax]
    if derive:
        gr.nlev = lev + 1
    elif lev + 1 != gr.nlev:
        return False
    g.nlev = lev if lev > 0 else 0
    if g.C > 1:
        if st[axis] <= 0 or st[axis] % isz:
            return False
        g.cs = st[axis] // isz
        if g.cs < inner or (inner == 1 and g.cs != 1):
            # stepped channels-last: copied (packing them an element at a time measured
            # slower than the copy, training 4.9 -> 6.3x a copy)
            return False
    else:
        g.cs = inner
    # no element twice (an output is written in any order): each axis, by increasing
    # stride, clears the extent of those below it
    ext = inner
    channel_placed = g.C <= 1
    for i in range(kin - 1, -1, -1):
        s = st[order[i]] // isz
        if not channel_placed and g.cs <= s:
            ext += (g.C - 1) * g.cs
            channel_placed = True
        if s < ext:
            return False
        ext += (shape[order[i]] - 1) * s
    if not channel_placed and g.cs < ext:
        return False
    g.outer = outer
    g.inner = inner
    if outer == 1:
        g.os = g.C * g.cs
        g.seg = 1
    elif g.nlev == 0:
        g.seg = outer
    return True


cdef int _split_outer(cnp.ndarray a, int axis, const int *order, int nord) noexcept:
    """How many of the ordered axes lie outside the channel (stride above it)."""
    cdef cnp.npy_intp *st = cnp.PyArray_STRIDES(a)
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(a)
    cdef int i, k = 0
    if shape[axis] <= 1:
        return 0                 # one channel: everything is one run
    for i in range(nord):
        if st[order[i]] > st[axis]:
            k += 1
    return k


# ----------------------------------------------------------------------------------
# Work description shared by every driver.

ctypedef struct Job:
    int type                       # element type of x, y, dy: BNF_F32, BNF_F64, BNF_F16
    Py_ssize_t isz                 # its size in bytes
    Py_ssize_t outer, C, inner, width, ncb, sb_len, nsb
    # rows form: columns a channel takes in a row (1: channels-last rows; the run length:
    # short runs read as rows of C * inner columns, see _plan); 0: runs form
    Py_ssize_t group
    Py_ssize_t col_shift           # rows form: blocks of columns start col_shift columns
                                   # before multiples of width (but the first: _line_blocks)
    int cached                     # runs form in cache: a channel at a time (_cached_runs)
    int wide_quads                 # rows backward sums from DRAM four rows at a time,
                                   # whole rows a unit (_full_rows, BNF_WIDE_QUADS)
    int spaced_quads               # ... four rows a quarter of a unit apart
                                   # (BNF_SPACED_QUADS)
    int gap                        # rows form over channels not back to back: in x or dy
                                   # (GAP_INPUTS), each unit packed into scratch first
                                   # (_gap_unit); in the output alone (GAP_OUTPUT), x and
                                   # dy read in place, the output through scratch
                                   # (_out_gap_unit)
    Py_ssize_t seg                 # rows in levels of segments (Geo.seg, nlev, lc): read a
    int nlev                       # segment a call (_at, _piece), reductions merged over
    Py_ssize_t lc[MAX_LEVELS]      # the segments of a unit in row order (_seg_unit)
    char *scratch                  # ... per thread, scratch_bytes each (_launch)
    Py_ssize_t scratch_bytes
    int threaded                   # the units run in an OpenMP loop (_launch)
    Py_ssize_t tile_rows           # rows form: rows per statistics tile (fixed by the shape)
    Py_ssize_t rb, nrb             # memory-order blocks (normalization, dx of rows): rb rows
    Py_ssize_t cn_len, ncn         # ... of cn_len channels (all, unless rows are too few)
    char *x
    Py_ssize_t x_os, x_cs
    Py_ssize_t x_ls[MAX_LEVELS]
    char *y
    Py_ssize_t y_os, y_cs
    Py_ssize_t y_ls[MAX_LEVELS]
    char *dy
    Py_ssize_t dy_os, dy_cs
    Py_ssize_t dy_ls[MAX_LEVELS]
    double eps
    int stream                     # non-temporal stores for the output (large outputs)
    int reverse                    # a second pass: units last to first (see _run)
    double n_total                 # elements per channel in the whole (maybe global) batch
    # per channel [C]
    double *hi                     # mean, high part
    double *lo                     # mean, low part
    double *scale                  # weight * invstd
    double *shift                  # bias, then bias - lo * scale
    double *weight
    double *invstd
    double *k1
    double *k2
    # per unit [nsb * C]
    bnf_moments *mom
    double *s_dy                   # sum(dy)
    double *s_dyx                  # sum(dy * (x - mean))
    double *s_xm                   # sum(x - mean)


DEF GAP_INPUTS = 1     # Job.gap
DEF GAP_OUTPUT = 2
DEF K_STATS = 0        # moments of a unit into mom
DEF K_NORM = 1         # y = (x - hi) * scale + shift, in memory order
DEF K_FWD = 2          # fused: moments, finalize the channel(s), normalize
DEF K_BSUMS = 3        # backward sums of a unit into s_dy, s_dyx, s_xm
DEF K_BDX = 4          # dx with k1, k2, scale (= weight * invstd); rows: in memory order
DEF K_BWD = 5          # fused backward of a unit, training statistics
DEF K_BEVAL = 6        # backward sums and dx = scale * dy of a unit


cdef inline void _finalize(Job *j, Py_ssize_t c0, Py_ssize_t n,
                           const bnf_moments *m) noexcept nogil:
    """Factors of channels c0 .. c0 + n - 1 from their moments m[0 .. n - 1]; the
    variance is kept in k1 for the running-variance update."""
    bnf_finalize(m, n, j.eps, j.weight + c0, j.hi + c0, j.lo + c0, j.invstd + c0,
                 j.scale + c0, j.shift + c0, j.k1 + c0)


cdef inline void _bwd_coeffs(Job *j, Py_ssize_t c0, Py_ssize_t w) noexcept nogil:
    """dx coefficients of channels c0 .. c0 + w - 1 from their sums (training mode):
    dx = scale * (dy - k1 - (x - hi) * k2).

    `hi` is the batch mean rounded to a double; sum(x - hi) / n recovers the rest of it
    (exactly, for price offsets), so the gradient is centred on the exact batch mean. A
    `hi` further than a few ulps from the batch mean is taken as given (bnf_bwd_coeffs)."""
    bnf_bwd_coeffs(w, j.n_total, j.hi + c0, j.invstd + c0, j.s_dy + c0, j.s_dyx + c0,
                   j.s_xm + c0, j.lo + c0, j.k1 + c0, j.k2 + c0)


cdef inline Py_ssize_t _at(const Job *j, const Py_ssize_t *ls, Py_ssize_t os,
                           Py_ssize_t r) noexcept nogil:
    """Element offset of row r in an array whose rows are os apart within a segment and
    whose segments are laid out by the level strides ls."""
    cdef Py_ssize_t q, off
    cdef int l
    if j.nlev == 0:
        return r * os
    q = r // j.seg
    off = (r - q * j.seg) * os
    for l in range(j.nlev - 1):
        off += (q % j.lc[l]) * ls[l]
        q = q // j.lc[l]
    return off + q * ls[j.nlev - 1]


cdef inline int _out_flags(const Job *j) noexcept nogil:
    """The output's flags for the kernels: BNF_STREAM, or BNF_STAGE_NEAR for one not
    streamed larger than _stage_near_bytes."""
    if j.stream:
        return BNF_STREAM
    return BNF_STAGE_NEAR if j.outer * j.C * j.inner * j.isz > _stage_near_bytes else 0


cdef inline int _dram_flags(const Job *j) noexcept nogil:
    """The rows reductions read from DRAM when x holds _reduce_blocks_min bytes or more:
    then the statistics prefetch into L2 as well as L1 (BNF_FAR_ROWS_BYTES) and the
    backward sums into L1 as well as L2 (BNF_NEAR_ROWS_BYTES). In cache those
    prefetches cost 4-13%."""
    if j.outer * j.C * j.inner * j.isz < _reduce_blocks_min:
        return 0
    if j.spaced_quads:
        return BNF_FROM_DRAM | BNF_SPACED_QUADS
    if j.wide_quads:
        return BNF_FROM_DRAM | BNF_WIDE_QUADS
    # the backward sums of a block of columns of rows of 512 bytes or more go a row at a
    # time however narrow the block (the thread count can change its width)
    if j.group > 0 and j.C * j.group * j.isz >= BNF_ROWWISE_MIN_BYTES:
        return BNF_FROM_DRAM | BNF_ROWS_WIDE
    return BNF_FROM_DRAM


cdef inline int _dx_flags(const Job *j, int flags) noexcept nogil:
    """The output's flags for the rows dx kernel, with BNF_FROM_DRAM where x holds
    _reduce_blocks_min bytes or more (its streamed rows a row at a time from narrower
    rows: bnf_dx_in_order_bytes)."""
    if j.outer * j.C * j.inner * j.isz < _reduce_blocks_min:
        return flags
    return flags | BNF_FROM_DRAM


cdef inline Py_ssize_t _piece(const Job *j, Py_ssize_t r, Py_ssize_t r1) noexcept nogil:
    """Rows from r, before r1, that lie in r's segment (evenly spaced)."""
    cdef Py_ssize_t n
    if j.nlev == 0:
        return r1 - r
    n = j.seg - r % j.seg
    return n if n < r1 - r else r1 - r


cdef inline char *_x_at(const Job *j, Py_ssize_t r, Py_ssize_t c) noexcept nogil:
    """Row r, channel c of x (_at); likewise _y_at, _dy_at."""
    return j.x + (_at(j, j.x_ls, j.x_os, r) + c * j.x_cs) * j.isz


cdef inline char *_y_at(const Job *j, Py_ssize_t r, Py_ssize_t c) noexcept nogil:
    return j.y + (_at(j, j.y_ls, j.y_os, r) + c * j.y_cs) * j.isz


cdef inline char *_dy_at(const Job *j, Py_ssize_t r, Py_ssize_t c) noexcept nogil:
    return j.dy + (_at(j, j.dy_ls, j.dy_os, r) + c * j.dy_cs) * j.isz


cdef void _unit(Job *j, int kind, Py_ssize_t u) noexcept nogil:
    # superblock-major: a superblock's column blocks one after another (and a thread's
    # contiguous range of units a band of whole rows), not each block down all the rows
    # first. The reductions over rows wider than a block read a 1 KB piece of each row
    # per unit; this way the rest of those rows is still in cache for the next block.
    # Measured on one thread (Zen 4, best of 15, three alternated processes each):
    # (25088, 512) float32 training 0.68-0.74 -> 0.55-0.59 ns an element, backward
    # 1.31-1.48 -> 1.09-1.25; (12544, 1024) 0.76-0.84 -> 0.59-0.61 and 1.49-1.60 ->
    # 1.21-1.28. Each unit's moments and sums have their own slot, merged in a fixed
    # order: the same bits.
    cdef Py_ssize_t cb = u % j.ncb, sb = u // j.ncb
    cdef Py_ssize_t c0, w, r0, nr, isz = j.isz
    cdef bint rows = j.group > 0
    cdef int flags = _out_flags(j)
    if rows:
        c0 = cb * j.width - j.col_shift if cb > 0 else 0
        w = (cb + 1) * j.width - j.col_shift
        w = (j.C if j.C < w else w) - c0
    else:
        c0 = cb
        w = 1
    r0 = sb * j.sb_len
    nr = j.outer - r0 if j.outer - r0 < j.sb_len else j.sb_len
    if j.gap == GAP_INPUTS:
        _gap_unit(j, kind, c0, w, r0, nr, sb)
        return
    # a fused unit's second pass reads what its first just read, from L2: no prefetches
    if kind != K_BDX and \
            nr * (w * j.group if rows else j.inner) * isz * (1 if kind == K_FWD else 2) \
            <= FUSE_BYTES:
        flags |= BNF_CACHED
        if kind == K_FWD and not rows and nr == j.outer and c0 + 1 < j.C and \
                j.inner * isz >= REDUCE_BLOCKS_RUN and \
                j.outer * j.C * j.inner * isz >= _reduce_blocks_min and _fetch_large:
            flags |= BNF_FETCH_NEXT     # (AMD only: see _fetch_large)
    if j.nlev:
        _seg_unit(j, kind, c0, w, r0, nr, sb, flags)
        return
    if j.gap == GAP_OUTPUT and kind != K_STATS and kind != K_BSUMS:
        _out_gap_unit(j, kind, c0, w, r0, nr, sb, flags)
        return
    _unit_at(j, kind, c0, w, nr,
             j.x + (r0 * j.x_os + c0 * j.x_cs) * isz if j.x != NULL else NULL, j.x_os,
             j.y + (r0 * j.y_os + c0 * j.y_cs) * isz if j.y != NULL else NULL, j.y_os,
             j.dy + (r0 * j.dy_os + c0 * j.dy_cs) * isz if j.dy != NULL else NULL, j.dy_os,
             sb, flags)


cdef void _seg_unit(Job *j, int kind, Py_ssize_t c0, Py_ssize_t w, Py_ssize_t r0,
                    Py_ssize_t nr, Py_ssize_t sb, int flags) noexcept nogil:
    """A unit of rows in segments (_unit_at's work), channels back to back (rows form)
    or one channel (runs form): each reduction a segment's rows a call, merged in row
    order; the normalization and dx a segment a call."""
    cdef Py_ssize_t r, n, c
    cdef bint rows = j.group > 0
    cdef bnf_moments *mom = j.mom + sb * j.C + c0 if j.mom != NULL else NULL
    cdef double *sdy = j.s_dy + sb * j.C + c0 if j.s_dy != NULL else NULL
    cdef double *sdyx = j.s_dyx + sb * j.C + c0 if j.s_dyx != NULL else NULL
    cdef double *sxm = j.s_xm + sb * j.C + c0 if j.s_xm != NULL else NULL
    cdef bnf_moments *pm = <bnf_moments *>_scratch(j)    # a segment's part
    cdef double *p1 = <double *>pm
    cdef double *p2 = p1 + w
    cdef double *p3 = p2 + w
    # the merges' compensation (bnf_two_sum): m2, or sum(dy) and sum(dy * (x - mean)) (a
    # crop of a float64 NCHW array, merged plainly, had M2 3.5 ulps off)
    cdef double *lo1 = <double *>(<char *>pm + j.width * sizeof(bnf_moments))
    cdef double *lo2 = lo1 + j.width
    cdef bint bwd = kind != K_STATS and kind != K_FWD
    cdef bint use_x = True
    cdef bnf_moments *m
    cdef double *s1
    cdef double *s2
    cdef double *s3
    if kind != K_BDX:
        memset(lo1, 0, w * sizeof(double))
        memset(lo2, 0, w * sizeof(double))
        r = r0
        while r < r0 + nr:
            n = _piece(j, r, r0 + nr)
            if r > r0:                     # the first segment's part goes in place
                m, s1, s2, s3 = pm, p1, p2, p3
            else:
                m, s1, s2, s3 = mom, sdy, sdyx, sxm
            if not bwd and rows:
                bnf_stats_rows(j.type, _x_at(j, r, c0), n, j.x_os, w, j.group, j.tile_rows,
                               m, _dram_flags(j))
            elif not bwd:
                bnf_stats_runs(j.type, _x_at(j, r, c0), n, j.x_os, j.inner, m, 0)
            elif rows:
                bnf_bwd_sums_rows(j.type, _dy_at(j, r, c0), j.dy_os, _x_at(j, r, c0),
                                  j.x_os, n, w, j.group, j.hi + c0, s1, s2, s3,
                                  _dram_flags(j))
            else:
                bnf_bwd_sums_runs(j.type, _dy_at(j, r, c0), j.dy_os, 0, _x_at(j, r, c0),
                                  j.x_os, 0, n, j.inner, 1, j.hi + c0, s1, s2, s3, NULL, 0)
            if r > r0 and not bwd:
                bnf_merge_same_counts(mom, lo1, pm, w, mom[0].n, pm[0].n)
            elif r > r0:
                for c in range(w):
                    bnf_two_sum(&sdy[c], &lo1[c], p1[c])
                    bnf_two_sum(&sdyx[c], &lo2[c], p2[c])
                    sxm[c] += p3[c]
            r += n
        for c in range(w):
            if not bwd:
                mom[c].m2 = bnf_fold_lo(mom[c].m2, lo1[c])
            else:
                sdy[c] = bnf_fold_lo(sdy[c], lo1[c])
                sdyx[c] = bnf_fold_lo(sdyx[c], lo2[c])
        if kind == K_STATS or kind == K_BSUMS:
            return
        if kind == K_FWD:
            _finalize(j, c0, w, mom)
        elif kind == K_BWD:
            _bwd_coeffs(j, c0, w)
        else:
            use_x = False                  # statistics held fixed: dx = scale * dy
    r = r0
    while r < r0 + nr:                     # the unit's output, a segment a call
        n = _piece(j, r, r0 + nr)
        if kind == K_FWD and rows:
            bnf_norm_rows(j.type, _x_at(j, r, c0), j.x_os, _y_at(j, r, c0), j.y_os, n, w,
                          j.group, j.hi + c0, j.scale + c0, j.shift + c0, flags)
        elif kind == K_FWD:
            bnf_norm_runs(j.type, _x_at(j, r, c0), j.x_os, 0, _y_at(j, r, c0), j.y_os, 0,
                          n, j.inner, 1, j.hi + c0, j.scale + c0, j.shift + c0, flags, NULL,
                          0, NULL)
        elif rows:
            bnf_bwd_dx_rows(j.type, _dy_at(j, r, c0), j.dy_os,
                            _x_at(j, r, c0) if use_x else NULL, j.x_os, _y_at(j, r, c0),
                            j.y_os, n, w, j.group, j.hi + c0, j.scale + c0, j.k1 + c0,
                            j.k2 + c0, _dx_flags(j, flags))
        else:
            bnf_bwd_dx_runs(j.type, _dy_at(j, r, c0), j.dy_os, 0,
                            _x_at(j, r, c0) if use_x else NULL, j.x_os, 0, _y_at(j, r, c0),
                            j.y_os, 0, n, j.inner, 1, j.hi + c0, j.scale + c0, j.k1 + c0,
                            j.k2 + c0, flags, NULL, NULL, 0)
        r += n


cdef inline char *_scratch(Job *j) noexcept nogil:
    """This thread's scratch (thread 0's outside an OpenMP loop of ours: a caller's own
    OpenMP thread number does not count)."""
    return j.scratch + (bnf_omp_thread_num() if j.threaded else 0) * j.scratch_bytes


cdef void _gap_unit(Job *j, int kind, Py_ssize_t c0, Py_ssize_t w, Py_ssize_t r0,
                    Py_ssize_t nr, Py_ssize_t sb) noexcept nogil:
    """A unit of a gapped job: its rows of x (and dy) packed into this thread's scratch
    (rows of w * group elements), the rows kernels run there (outputs in place), and the
    output unpacked into y."""
    cdef Py_ssize_t isz = j.isz, row = w * j.group, run = j.group * isz, r, n
    cdef char *px = _scratch(j)
    cdef char *pdy = px + nr * row * isz
    cdef bint bwd = kind == K_BSUMS or kind == K_BDX or kind == K_BWD or kind == K_BEVAL
    r = r0
    while r < r0 + nr:
        n = _piece(j, r, r0 + nr)
        bnf_pack_runs(px + (r - r0) * row * isz, _x_at(j, r, c0), n, j.x_os * isz, w,
                      j.x_cs * isz, run)
        if bwd:
            bnf_pack_runs(pdy + (r - r0) * row * isz, _dy_at(j, r, c0), n, j.dy_os * isz,
                          w, j.dy_cs * isz, run)
        r += n
    # the output over the input it is computed from: the kernels work element by element
    _unit_at(j, kind, c0, w, nr, px, row, pdy if bwd else px, row, pdy, row, sb, BNF_CACHED)
    if kind == K_FWD or (bwd and kind != K_BSUMS):
        r = r0
        while r < r0 + nr:
            n = _piece(j, r, r0 + nr)
            bnf_unpack_runs(_y_at(j, r, c0), (pdy if bwd else px) + (r - r0) * row * isz,
                            n, j.y_os * isz, w, j.y_cs * isz, run)
            r += n


cdef void _out_gap_unit(Job *j, int kind, Py_ssize_t c0, Py_ssize_t w, Py_ssize_t r0,
                        Py_ssize_t nr, Py_ssize_t sb, int flags) noexcept nogil:
    """A unit of a job whose output alone has its channels apart (GAP_OUTPUT, an `out=`
    crop or step): x and dy read where they are, in the units of the contiguous output,
    so that the statistics and sums have its bits; the output computed into this
    thread's scratch (rows of w * group elements) and unpacked into y. dx alone (K_BDX,
    element by element) goes GAP_ELEMS at a time."""
    cdef Py_ssize_t isz = j.isz, row = w * j.group, run = j.group * isz, r = r0, n, step
    cdef char *out = _scratch(j)
    step = nr
    if kind == K_BDX and step > GAP_ELEMS // row:
        step = GAP_ELEMS // row if row <= GAP_ELEMS else 1
    while r < r0 + nr:
        n = r0 + nr - r if r0 + nr - r < step else step
        _unit_at(j, kind, c0, w, n, j.x + (r * j.x_os + c0 * j.x_cs) * isz, j.x_os, out, row,
                 j.dy + (r * j.dy_os + c0 * j.dy_cs) * isz if j.dy != NULL else NULL,
                 j.dy_os, sb, flags & ~(BNF_STREAM | BNF_STAGE_NEAR))
        bnf_unpack_runs(j.y + (r * j.y_os + c0 * j.y_cs) * isz, out, n, j.y_os * isz, w,
                        j.y_cs * isz, run)
        r += n


cdef inline void _unit_at(Job *j, int kind, Py_ssize_t c0, Py_ssize_t w, Py_ssize_t nr,
                          char *x, Py_ssize_t x_os, char *y, Py_ssize_t y_os, char *dy,
                          Py_ssize_t dy_os, Py_ssize_t sb, int flags) noexcept nogil:
    """The kernels of a unit: channels c0 .. c0 + w - 1 (rows form; c0 alone for runs)
    over nr rows from x, y, dy (rows x_os, y_os, dy_os elements apart); sb: its
    superblock (where its moments and sums go)."""
    cdef bint rows = j.group > 0
    cdef Py_ssize_t c
    cdef bnf_moments *mom = j.mom + sb * j.C + c0 if j.mom != NULL else NULL
    cdef double *sdy = j.s_dy + sb * j.C + c0 if j.s_dy != NULL else NULL
    cdef double *sdyx = j.s_dyx + sb * j.C + c0 if j.s_dyx != NULL else NULL
    cdef double *sxm = j.s_xm + sb * j.C + c0 if j.s_xm != NULL else NULL
    if kind == K_STATS or kind == K_FWD:
        if rows:
            bnf_stats_rows(j.type, x, nr, x_os, w, j.group, j.tile_rows, mom, _dram_flags(j))
        else:
            bnf_stats_runs(j.type, x, nr, x_os, j.inner, mom, _runs_dram_flags(j, nr))
        if kind == K_STATS:
            return
        _finalize(j, c0, w, mom)
    if kind == K_FWD:
        if rows:
            bnf_norm_rows(j.type, x, x_os, y, y_os, nr, w, j.group, j.hi + c0,
                          j.scale + c0, j.shift + c0, flags)
        elif flags & BNF_FETCH_NEXT:
            # a fused channel from DRAM: the next channel into L2 meanwhile
            bnf_norm_runs(j.type, x, x_os, 0, y, y_os, 0, nr, j.inner, 1, j.hi + c0,
                          j.scale + c0, j.shift + c0, flags, x + j.x_cs * j.isz, 1, NULL)
        else:
            bnf_norm_runs(j.type, x, x_os, 0, y, y_os, 0, nr, j.inner, 1, j.hi + c0,
                          j.scale + c0, j.shift + c0, flags, NULL, 0, NULL)
        return
    if kind == K_BSUMS or kind == K_BWD or kind == K_BEVAL:
        if rows and kind == K_BEVAL and bnf_bwd_sums_dx_rows(
                j.type, dy, dy_os, x, x_os, y, y_os, nr, w, j.group, j.hi + c0, j.scale + c0,
                sdy, sdyx, sxm, flags | _dram_flags(j)):
            return      # dx = scale * dy stored as the sums read dy, one pass
        if not rows and kind == K_BEVAL and _fused_eval_runs and bnf_bwd_sums_dx_runs(
                j.type, dy, dy_os, 0, x, x_os, 0, y, y_os, 0, nr, j.inner, 1, j.hi + c0,
                j.scale + c0, sdy, sdyx, sxm, flags):
            return      # likewise, a run at a time
        if rows:
            bnf_bwd_sums_rows(j.type, dy, dy_os, x, x_os, nr, w, j.group, j.hi + c0,
                              sdy, sdyx, sxm, _dram_flags(j))
        else:
            bnf_bwd_sums_runs(j.type, dy, dy_os, 0, x, x_os, 0, nr, j.inner, 1, j.hi + c0,
                              sdy, sdyx, sxm, NULL, 0)
        if kind == K_BSUMS:
            return
        if kind == K_BWD:
            _bwd_coeffs(j, c0, w)
        else:
            x = NULL                       # statistics held fixed: dx = scale * dy
    # K_BDX, K_BWD, K_BEVAL
    if rows:
        bnf_bwd_dx_rows(j.type, dy, dy_os, x, x_os, y, y_os, nr, w, j.group,
                        j.hi + c0, j.scale + c0, j.k1 + c0, j.k2 + c0, _dx_flags(j, flags))
    else:
        bnf_bwd_dx_runs(j.type, dy, dy_os, 0, x, x_os, 0, y, y_os, 0, nr, j.inner, 1,
                        j.hi + c0, j.scale + c0, j.k1 + c0, j.k2 + c0, flags, NULL, NULL, 0)


cdef inline Py_ssize_t _gcd(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


cdef inline Py_ssize_t _l2_places(Py_ssize_t stride) noexcept nogil:
    """Places in a 128 KB way of L2 that rows `stride` bytes apart take (_rows_alias)."""
    cdef Py_ssize_t way = 1 << 17
    stride = (stride if stride >= 0 else -stride) % way
    return way // _gcd(stride, way)


cdef inline bint _cached_runs(const Job *j, Py_ssize_t itemsize, int narrays) noexcept nogil:
    """Channels of runs (NCHW) of CACHED_RUNS_MIN_INNER to GROUP_MAX_INNER elements, few a
    channel, x of at most CACHED_RUNS_BYTES (back to back or apart: each array's own
    channel stride, so a stepped view or `out=` has the bits of contiguous data): a
    channel's statistics (sums) with its lanes kept in registers from run to run, then
    its normalization (dx) from L1, all channels in one call (bnf_train_runs_cached,
    bnf_bwd_runs_cached). The rows form, which these runs took, spreads each channel's
    state over its columns; with few rows that state costs more than the data (and the
    pipeline of blocks loads and stores a run's lanes around it). One thread, float32, two builds alternated (the same bits
    on these shapes): training of (1, 2048, 7, 7) 0.46x the time (PyTorch's took 0.9x
    the old), (2, 1024, 7, 7) 0.59x, (2, 512, 10, 10) 0.43x, (8, 256, 10, 10) 0.68x,
    (8, 512, 7, 7) 0.92x. In one process against the rows form: backward (1, 2048, 7, 7)
    0.60x (eval mode 0.78x), (2, 1024, 7, 7) 0.71x (0.93x), (4, 512, 7, 7) 0.84x
    (1.01x), (4, 256, 10, 10) 0.62x (0.69x), (3, 256, 9, 9) 0.63x (0.77x); float64
    training 0.54-0.90x, backward 0.65-0.88x (0.69-0.96x); float16 backward to 2 runs
    0.79-0.90x (0.95-1.06x). Not where it measured slower: 16 runs (training
    1.03-1.05x), runs of 16-36 elements (1.04-1.37x), float16 training from 8 runs
    (1.13-1.22x), the backward of 8 runs of 7 x 7 (1.04x, eval mode 1.14x) and float16's
    of 4 (1.02x, 1.14x); longer runs, which the pipeline takes, gained nothing ((1, 64,
    56, 56) 1.00-1.06x, (4, 64, 32, 32) 1.10x). Since a block's channels take their sums
    in one call, lanes in registers (thirty-fourth session), the backward takes runs of up
    to 256 elements and x of up to 4 MB this way (the same bits as the runs pipeline on
    these shapes): against it, float32 (2, 1000, 14, 14) 0.76x the time, (4, 256, 14, 14)
    0.91x; float64 (2, 1000, 14, 14) 0.82x, (4, 256, 14, 14) 0.85x, (4, 128, 16, 16)
    0.86x; float16 (2, 1000, 14, 14) 0.88x. Training there measured 1.00-1.03x in
    float32 and keeps the limits above; 8 runs of 7 x 7 in the backward: float32 0.86x,
    float64 1.34x, so 4 still."""
    cdef Py_ssize_t most = CACHED_RUNS_OUTER_FWD if narrays == 1 else CACHED_RUNS_OUTER_BWD
    cdef Py_ssize_t longest = GROUP_MAX_INNER if narrays == 1 else CACHED_RUNS_BWD_MAX_INNER
    cdef Py_ssize_t most_bytes = CACHED_RUNS_BYTES if narrays == 1 else CACHED_RUNS_BWD_BYTES
    if itemsize == 2:
        most //= 2
    return _cached_runs_on and j.nlev == 0 and \
        CACHED_RUNS_MIN_INNER <= j.inner <= longest and \
        j.outer * j.C * j.inner * itemsize <= most_bytes and j.outer <= most


cdef inline bint _rows_alias(const Job *j) noexcept nogil:
    """Channels of runs (NCHW) from DRAM whose rows, in x or dy, fall on the same L2 sets
    more than 8 at a time: rows `x_os` bytes apart take 128 KB / gcd(x_os mod 128 KB,
    128 KB) places in a way of a 2 MiB 16-way (or 1 MiB 8-way) L2, and a fused channel
    keeps x and dy there between its sums and its dx. (64, 256, 16, 16), rows 256 KB
    apart, all 64 on the same sets: its backward took 1.03 ns an element, 0.51 with rows
    1 KB further apart, and 0.78 in two passes over DRAM in memory order; (64, 128, 32,
    32) 0.79 against 0.58 (one thread, float32, Intel VM, twenty-second session). Rows
    spread over the sets ((64, 250, 16, 16): 0.50 fused, 0.61 in two passes; (64, 256, 28,
    28), 8 rows a place: 0.47 and 0.56) stay fused. From x of _reduce_blocks_min (16
    MB), float32 from half that (twenty-third session, one thread, in one process against
    fused, repeated calls (from L3) / after 400 MB read (from DRAM): (32, 256, 16, 16)
    0.77x the time / 0.93x, (64, 128, 16, 16) 0.89x / 0.97x, (128, 64, 16, 16) 0.75x /
    0.77x, (16, 128, 32, 32) 0.85x / 0.92x, (32, 64, 32, 32) 0.77x / 0.99x; two threads
    0.76-0.78x). Smaller ones measured slower so ((24, 256, 16, 16), 6 MB, 1.12x; (40,
    128, 16, 16) 1.29x; 4 MB 1.18-1.24x), as did float64 (16, 256, 16, 16) (8 MB, 1.15x)."""
    if not _alias_two_pass or j.group != 0 or j.nlev != 0 or \
            j.outer * j.C * j.inner * j.isz < \
            (_reduce_blocks_min // 2 if j.isz == 4 else _reduce_blocks_min):
        return False
    return j.outer > 8 * _l2_places(j.x_os * j.isz) or \
        j.outer > 8 * _l2_places(j.dy_os * j.isz)


cdef inline bint _fuses(const Job *j, int narrays) noexcept nogil:
    """Each unit whole, its statistics (sums) and then its normalize (dx) from cache
    (K_FWD, K_BWD), where the rows are one superblock; for the rows form only where a
    unit's x (and dy) also fits FUSE_BYTES. Rows of up to SUPER_ELEMS // 512 wider than a
    block are one superblock by their count alone, in units of up to 1 MB of each array
    (2 MB float64), which do not stay in L2: there the two passes in memory order
    measured, one thread, the two builds alternated (twentieth session, Intel VM),
    backward float32 (512, 1024) 3.53-3.56 -> 2.99-3.01x a copy, (400, 1024) 3.66-3.72
    -> 3.07-3.08x, (512, 768) 3.50-3.61 -> 3.00-3.01x, (300, 2048) 3.44-3.50 ->
    3.23-3.30x, float64 3.29-3.34 -> 2.87-2.91x; training float64 (400, 1024) 1.90-1.96
    -> 1.67-1.69x, (512, 768) 1.93-1.96 -> 1.71x. The same bits."""
    if j.nsb != 1:
        return False
    if narrays == 1 and j.gap == GAP_OUTPUT and not _gap_packs_norm(j):
        # an output with its channels apart: runs of GAP_NORM_INNER and more are
        # normalized where they are, not through scratch ((204, 117, 79) float32 into a
        # crop: training 1.17x the time through scratch)
        return False
    return j.group == 0 or j.outer * j.width * j.group * j.isz * narrays <= FUSE_BYTES


cdef inline void _full_rows(Job *j, bint stats, int quads) noexcept nogil:
    """The reductions (statistics: `stats`, backward sums) of float32 rows from DRAM wider
    than a block, up to _full_rows_cols: whole rows a unit, not a block of 512 columns of
    each row (half a 4 KB row, then the other half 1 MB later); float64 and float16 rows
    too for the sums. Each column's moments and sums take its rows in the same order
    (float32 sums a row at a time from DRAM, bnf_sums_rowwise; the statistics and the
    other types' sums four): the same bits. Then the rows of dx are contiguous, and the
    eval-mode backward stores dx as its sums read dy, in one pass (bwd_sums_dx_shifted),
    where a block's rows off a line declined it. One thread,
    float32, 51 MB, in one process against blocks (twenty-first session, Intel VM, 48 KB
    of L1): (16725, 768) and (12544, 1024) backward sums 0.80-0.88 -> 0.68-0.82x a copy,
    backward 1.70-2.12 -> 1.56-2.07x, eval-mode backward 1.92-2.06 -> 0.95-1.15x,
    `moments` 0.42-0.49 -> 0.39-0.44x, training 0.94-0.97x the time. Wider rows (1536-
    8192 columns, 48-256 KB of state) took 1.46-1.56x the time of blocks for the sums,
    0.98-1.02x for the statistics. float64 (25 MB, four rows a step: the sums' state is
    loaded and stored once per four rows), (10035, 640), (8362, 768), (6272, 1024): sums
    1.01-1.06 -> 0.84-0.89x a copy, backward 0.91-0.95x the time, eval-mode backward
    0.70-0.79x; its statistics 0.97-1.09x: not there. float16 (26 MB), the same shapes as
    float32: sums 0.93-0.96x the time, backward 0.97-0.99x, eval-mode backward
    0.68-0.78x. The backward sums in cache too from _full_rows_sums_bytes (1.5 MiB) of
    x. With _whole_rows (AMD) rows from DRAM of any width go whole rows a unit: float32
    statistics, and (`quads`, the training backward sums) float32 and float16 summed four
    rows at a time (BNF_WIDE_QUADS; bnfast_kernels.c has the numbers), where blocks of
    512 columns (a row at a time) took up to 1.8x the time on Zen 4; without AVX-512 (Zen
    3) float32 rows four a quarter of a unit apart (_spaced_quads), but the eval-mode
    backward's under _quads_min_bytes a row at a time, whole rows still."""
    if j.group == 1 and not j.gap and j.nlev == 0 and j.ncb > 1 and \
            (j.isz == 4 or not stats) and j.C <= _full_rows_cols and \
            (_dram_flags(j) or
             (not stats and j.outer * j.C * j.inner * j.isz >= _full_rows_sums_bytes)):
        j.width = j.C
        j.ncb = 1
    if j.group == 1 and not j.gap and j.nlev == 0 and _whole_rows and \
            ((stats and j.isz == 4) or (quads and j.isz != 8)) and _dram_flags(j):
        j.width = j.C
        j.ncb = 1
        if quads and _spaced_quads and j.isz == 4 and \
                (quads == 2 or j.C * j.isz >= _quads_min_bytes):
            j.spaced_quads = True
        else:
            j.wide_quads = quads and (j.isz != 4 or j.C * j.isz >= _quads_min_bytes)


cdef inline void _line_blocks(Job *j) noexcept nogil:
    """Blocks of columns of rows that all start at the same place in a line of a streamed
    output (dx) begin on its lines: the first block is short by col_shift columns.
    NumPy's large arrays start 16 bytes into a line, so blocks at multiples of 512
    columns began and ended mid-line, and the eval-mode backward, which streams dx as its
    sums read dy, declined them (rows sharing lines would be streamed in part and stored
    in part). Each column's sums are its own: the same bits. One thread, float32, 51 MB,
    x, dy and dx 16 bytes into a line and apart modulo 1 MiB, in one process against
    blocks at multiples of 512 (twenty-first session, Intel VM): eval-mode backward of
    (8362, 1536), (6272, 2048), (3136, 4096), (1568, 8192) 1.71-1.96 -> 1.17-1.33x a
    copy; the training backward (dx in memory order) unchanged. Not in cache, where the
    one pass (plain stores) takes blocks whose rows are whole lines, which the short
    first block's are not: (512, 768) and (1024, 1024) eval-mode backward 1.05-1.06x
    the time with it."""
    cdef Py_ssize_t line = 64 // j.isz, lead
    if _line_blocks_on and j.stream and j.group == 1 and not j.gap and j.nlev == 0 and \
            j.ncb > 1 and j.y != NULL and (<size_t>j.y) % j.isz == 0 and \
            (j.y_os * j.isz) % 64 == 0 and j.width % line == 0:
        lead = ((-<Py_ssize_t>j.y) & 63) // j.isz      # columns before the first line
        j.col_shift = (line - lead) % line
        j.ncb = _cdiv(j.C + j.col_shift, j.width)


cdef inline bint _gap_packs_norm(const Job *j) noexcept nogil:
    """A gapped job's normalization packs its runs (its reductions always do). Runs of
    32 and more are normalized where they are (7x7 eval 2.1x a copy, 2.6x packed)."""
    return j.gap and j.inner < GAP_NORM_INNER


cdef inline bint _in_memory_order(const Job *j, int kind) noexcept nogil:
    """`kind` runs over blocks of rows in memory order (_ordered_unit), not over the units
    of the reductions: the normalization, and dx (its factors are known for every
    channel by then). Rows wider than a unit's channel block (256) are then read and
    written whole, not a 1 KB piece of each row per unit, and contiguous ones are
    streamed out as one run: backward of (12544, 1024) float32 3.44 -> 2.52x a copy,
    (20000, 300) 3.39 -> 2.69x (2 threads 2.14 -> 1.43x); short runs as rows
    (64, 512, 7, 7) 2.77 -> 2.59x; rows of 64 or 256 channels unchanged. Runs (NCHW,
    dx in two passes: channels aliasing in L2, a hook's exchanged sums, superblocks) go
    a row of channels a call, as the normalization, not a channel's runs at a time: one
    thread, float32, against a channel at a time (twenty-second session, Intel VM):
    (64, 256, 16, 16) 0.70-0.71x the time, (64, 128, 32, 32) 0.93x, float64 (32, 128, 32,
    32) 0.93-0.96x, with a hook (64, 256, 14, 14) 0.80-0.84x, (64, 256, 28, 28)
    0.95-0.98x; two threads alike."""
    return kind == K_NORM or (kind == K_BDX and not j.gap)


cdef void _ordered_unit(Job *j, int kind, Py_ssize_t u) noexcept nogil:
    """Normalize (or, K_BDX of rows, compute dx of) rows [r0, r0 + rb) of channels
    [c0, c0 + cn_len), in memory order."""
    cdef Py_ssize_t r0 = (u // j.ncn) * j.rb, r, n, c
    cdef Py_ssize_t c0 = (u % j.ncn) * j.cn_len
    cdef Py_ssize_t c1 = j.C if j.C - c0 < j.cn_len else c0 + j.cn_len
    cdef Py_ssize_t nr = j.outer - r0 if j.outer - r0 < j.rb else j.rb
    cdef Py_ssize_t isz = j.isz, row = (c1 - c0) * j.group
    cdef int flags = _out_flags(j)
    cdef char *px
    # an array this small is taken to be in cache (just written, or read again): no
    # prefetches; nor, for an output not streamed, but where _prefetch_ordered says so
    if j.outer * j.C * j.inner * isz <= CACHED_BYTES or \
            not (j.stream or _prefetch_ordered == 1 or
                 (_prefetch_ordered == 2 and j.group and row * isz < ORDERED_PF_ROW_BYTES)):
        flags |= BNF_CACHED
    if kind == K_NORM and _gap_packs_norm(j):      # packed, normalized in place, unpacked
        px = _scratch(j)
        r = r0
        while r < r0 + nr:
            n = _piece(j, r, r0 + nr)
            bnf_pack_runs(px + (r - r0) * row * isz, _x_at(j, r, c0), n, j.x_os * isz,
                          c1 - c0, j.x_cs * isz, j.group * isz)
            r += n
        bnf_norm_rows(j.type, px, row, px, row, nr, c1 - c0, j.group, j.hi + c0,
                      j.scale + c0, j.shift + c0, BNF_CACHED)
        r = r0
        while r < r0 + nr:
            n = _piece(j, r, r0 + nr)
            bnf_unpack_runs(_y_at(j, r, c0), px + (r - r0) * row * isz, n, j.y_os * isz,
                            c1 - c0, j.y_cs * isz, j.group * isz)
            r += n
        return
    if j.nlev and not j.group:
        # runs in segments (a crop of NCHW): memory order is a channel's runs of one
        # sample, then the next channel's, not a row of channels (in memory order only
        # without segments, where a row is a sample)
        for c in range(c0, c1):
            r = r0
            while r < r0 + nr:
                n = _piece(j, r, r0 + nr)
                _ordered_runs(j, kind, r, n, c, flags)
                r += n
        return
    r = r0
    while r < r0 + nr:                  # a segment's rows at a time
        n = _piece(j, r, r0 + nr)
        _ordered_piece(j, kind, r, n, c0, c1, flags)
        r += n


cdef inline void _ordered_runs(Job *j, int kind, Py_ssize_t r, Py_ssize_t n, Py_ssize_t c,
                               int flags) noexcept nogil:
    """Rows [r, r + n) of one segment, channel c alone (runs form)."""
    if kind == K_BDX:
        bnf_bwd_dx_runs(j.type, _dy_at(j, r, c), j.dy_os, 0,
                        _x_at(j, r, c) if j.x != NULL else NULL, j.x_os, 0, _y_at(j, r, c),
                        j.y_os, 0, n, j.inner, 1, j.hi + c, j.scale + c, j.k1 + c,
                        j.k2 + c, flags, NULL, NULL, 0)
    else:
        bnf_norm_runs(j.type, _x_at(j, r, c), j.x_os, 0, _y_at(j, r, c), j.y_os, 0, n,
                      j.inner, 1, j.hi + c, j.scale + c, j.shift + c, flags, NULL, 0, NULL)


cdef inline void _ordered_piece(Job *j, int kind, Py_ssize_t r0, Py_ssize_t nr,
                                Py_ssize_t c0, Py_ssize_t c1, int flags) noexcept nogil:
    """_ordered_unit over rows [r0, r0 + nr) of one segment (evenly spaced)."""
    cdef Py_ssize_t isz = j.isz, r
    cdef char *x = _x_at(j, r0, c0)
    cdef char *y = _y_at(j, r0, c0)
    if kind == K_BDX and not j.group:
        for r in range(nr):         # runs: a row of channels a call
            bnf_bwd_dx_runs(j.type, _dy_at(j, r0 + r, c0), 0, j.dy_cs,
                            x + r * j.x_os * isz, 0, j.x_cs, y + r * j.y_os * isz, 0,
                            j.y_cs, 1, j.inner, c1 - c0, j.hi + c0, j.scale + c0,
                            j.k1 + c0, j.k2 + c0, flags, NULL, NULL, 0)
        return
    if kind == K_BDX:
        bnf_bwd_dx_rows(j.type, _dy_at(j, r0, c0), j.dy_os, x, j.x_os, y, j.y_os, nr,
                        c1 - c0, j.group, j.hi + c0, j.scale + c0, j.k1 + c0, j.k2 + c0,
                        _dx_flags(j, flags))
        return
    if j.group and not j.gap:
        bnf_norm_rows(j.type, x, j.x_os, y, j.y_os, nr, c1 - c0, j.group, j.hi + c0,
                      j.scale + c0, j.shift + c0, flags)
        return
    # runs: strictly in memory order, a row a call. (Runs under 256 elements went a
    # channel at a time over the block's rows until this measured faster for them too:
    # float32 eval of (64, 512, 14, 14) 1.79 -> 0.82x a copy, (64, 256, 12, 12) 1.95 ->
    # 1.35x, (4, 64, 14, 14) in cache 0.81x the time; float64 and float16 0.48-0.83x.)
    for r in range(nr):
        bnf_norm_runs(j.type, x + r * j.x_os * isz, 0, j.x_cs, y + r * j.y_os * isz, 0,
                      j.y_cs, 1, j.inner, c1 - c0, j.hi + c0, j.scale + c0, j.shift + c0,
                      flags, NULL, 0, NULL)


cdef void _pipeline(Job *j, int kind, Py_ssize_t u0, Py_ssize_t u1) noexcept nogil:
    """Units u0 .. u1 - 1 of `kind` (K_FWD, K_BWD, K_BEVAL, K_STATS or K_BSUMS; whole
    channels of runs, nsb == 1), in blocks of _channel_block channels read a row of the
    block at a time.
    Training forward pipelines them: each block's normalization, from cache, beside the
    next block's statistics, from DRAM. Backward takes a block's sums, then its dx from
    cache (on Zen 4 interleaving the two measured slower); from DRAM (runs of 1 KB or
    more, x and dy of _reduce_blocks_min or more) the dx prefetches the next block's dy
    and x into L2 meanwhile, so its sums read cache. Measured on one thread (Zen 4,
    float32, against none): (64, 256, 28, 28) 2.30 -> 2.03x a copy, (128, 64, 56, 56)
    2.58 -> 1.95x, (32, 64, 56, 56) 2.57 -> 2.23x, float64 (64, 128, 28, 28) 2.00 ->
    1.53x; two threads 0.95x the time. Runs of 14 x 14 measured 1.05x and an x of 3 MB
    1.07x: not there. float32 channels of up to BWD_SPLIT_BYTES go in smaller blocks and
    split that prefetch: the next block's x during the sums, its dy during dx.
    Training's statistics of the next block (and the statistics alone) prefetch 4 KB
    ahead into L1; on one thread, from an x of twice _reduce_blocks_min or more
    (BNF_FROM_DRAM), also 16 KB ahead into L2. Against L1 alone, float32, in one process:
    training of (64, 256, 28, 28) 0.90x the time, (128, 256, 28, 28) 0.78x, (48, 256,
    28, 28) 0.94x; `moments` 0.65x, 0.70x and 0.74x; float64 (32, 256, 28, 28) 0.89x.
    An x of 25 MB (partly in L3) measured 0.87-1.04x, two threads 1.00-1.09x: hence the
    gates. An earlier form, into L2 instead of L1 (0.82-0.94x when it came), measured
    1.03-1.06x the time of L1 alone by then and went. The backward sums prefetching into
    L2 as well gained nothing that held: (128, 256, 28, 28) float32 1.07-1.10x the time,
    (64, 256, 28, 28) 1.01-1.05x, float64 (8, 64, 112, 112) 0.89-1.01x."""
    cdef Py_ssize_t u = u0, un, w = 0, wn, c, isz = j.isz
    cdef Py_ssize_t k = _channel_block(j, kind)
    cdef int flags = BNF_CACHED | _out_flags(j)
    cdef bint fetch_next, split
    if u0 >= u1:
        return
    if (kind == K_FWD or kind == K_STATS) and not j.threaded and \
            j.outer * j.C * j.inner * isz >= 2 * _reduce_blocks_min:
        flags |= BNF_FROM_DRAM          # the next block's statistics: L2 ahead of L1
    if kind == K_STATS:         # the statistics alone: a block's moments, a row at a time
        while u < u1:
            w = u1 - u if u1 - u < k else k
            bnf_norm_runs(j.type, NULL, j.x_os, j.x_cs, NULL, 0, 0, j.outer, j.inner, 0,
                          NULL, NULL, NULL, flags & BNF_FROM_DRAM, j.x + u * j.x_cs * isz, w,
                          j.mom + u)
            u += w
        return
    if kind == K_BSUMS:         # the backward sums alone (dx once they are exchanged)
        while u < u1:
            w = u1 - u if u1 - u < k else k
            bnf_bwd_sums_runs(j.type, j.dy + u * j.dy_cs * isz, j.dy_os, j.dy_cs,
                              j.x + u * j.x_cs * isz, j.x_os, j.x_cs, j.outer, j.inner, w,
                              j.hi + u, j.s_dy + u, j.s_dyx + u, j.s_xm + u, NULL, 0)
            u += w
        return
    if kind == K_BWD or kind == K_BEVAL:
        # from DRAM, each block's dx (from cache) prefetches the next block's dy and x
        fetch_next = _fetch_next(j)
        while u < u1:
            w = u1 - u if u1 - u < k else k
            if kind == K_BEVAL and _fused_eval_runs and bnf_bwd_sums_dx_runs(
                    j.type, j.dy + u * j.dy_cs * isz, j.dy_os, j.dy_cs,
                    j.x + u * j.x_cs * isz, j.x_os, j.x_cs, j.y + u * j.y_cs * isz, j.y_os,
                    j.y_cs, j.outer, j.inner, w, j.hi + u, j.scale + u, j.s_dy + u,
                    j.s_dyx + u, j.s_xm + u, _out_flags(j)):
                u += w          # dx = scale * dy stored as the sums read dy, one pass
                if j.stream:
                    bnf_stream_fence()
                continue
            un = u + w
            wn = u1 - un if u1 - un < k else k
            if not fetch_next:
                wn = 0
            # split: a block read from cache (not the first) prefetches the next block's x
            # during its sums, the next dy during its dx
            split = kind == K_BWD and wn and u > u0 and _split_fetch(j)
            bnf_bwd_sums_runs(j.type, j.dy + u * j.dy_cs * isz, j.dy_os, j.dy_cs,
                              j.x + u * j.x_cs * isz, j.x_os, j.x_cs, j.outer, j.inner, w,
                              j.hi + u, j.s_dy + u, j.s_dyx + u, j.s_xm + u,
                              j.x + un * j.x_cs * isz if split else NULL, wn)
            if kind == K_BWD:
                _bwd_coeffs(j, u, w)
            # statistics held fixed (K_BEVAL): dx = scale * dy, x not read
            bnf_bwd_dx_runs(j.type, j.dy + u * j.dy_cs * isz, j.dy_os, j.dy_cs,
                            j.x + u * j.x_cs * isz if kind == K_BWD else NULL, j.x_os,
                            j.x_cs,
                            j.y + u * j.y_cs * isz, j.y_os, j.y_cs, j.outer, j.inner, w,
                            j.hi + u, j.scale + u, j.k1 + u, j.k2 + u,
                            flags | (BNF_SPLIT_NEXT if split else 0),
                            j.dy + un * j.dy_cs * isz if wn else NULL,
                            j.x + un * j.x_cs * isz, wn)
            if j.stream:
                bnf_stream_fence()
            u += w
        return
    while True:
        # block u .. u + w - 1 (none at first: that call only takes the first's moments)
        un = u + w
        wn = u1 - un if u1 - un < k else k
        if w:
            _finalize(j, u, w, j.mom + u)
        bnf_norm_runs(j.type, j.x + u * j.x_cs * isz, j.x_os, j.x_cs,
                      j.y + u * j.y_cs * isz, j.y_os, j.y_cs, j.outer, j.inner, w,
                      j.hi + u, j.scale + u, j.shift + u, flags,
                      j.x + un * j.x_cs * isz if wn else NULL, wn, j.mom + un)
        if j.stream and w:
            bnf_stream_fence()
        if wn == 0:
            return
        u = un
        w = wn


cdef inline void _any_unit(Job *j, int kind, Py_ssize_t u) noexcept nogil:
    if _in_memory_order(j, kind):
        _ordered_unit(j, kind, u)
    else:
        _unit(j, kind, u)
    if j.stream:
        bnf_stream_fence()


cdef inline int _runs_dram_flags(const Job *j, Py_ssize_t nr) noexcept nogil:
    """BNF_FROM_DRAM for the statistics of a unit of runs of nr rows (bnf_stats_runs) of
    at most FUSE_BYTES, on one thread, from an x of twice _reduce_blocks_min or more: a
    second cursor 16 KB ahead into L2. Against L1 alone (float32, in one process):
    `moments` of (64, 64, 56, 56) 0.59-0.64x the time, (16, 64, 112, 112) 0.77-0.89x;
    their training 0.93-1.01x (its statistics read the channel prefetched into L2).
    Superblocks of larger channels measured 0.96-1.00x in float32 and 1.05-1.20x in
    float64 (units of 2 MB): not there."""
    return BNF_FROM_DRAM if not j.threaded and nr * j.inner * j.isz <= FUSE_BYTES and \
        j.outer * j.C * j.inner * j.isz >= 2 * _reduce_blocks_min else 0


cdef inline bint _fetch_next(const Job *j) noexcept nogil:
    """Fused backward from DRAM (runs of REDUCE_BLOCKS_RUN bytes or more, x and dy of
    _reduce_blocks_min or more): a block read from cache prefetches the next one;
    channels of more than BWD_SPLIT_BYTES only where _fetch_large (AMD)."""
    return j.inner * j.isz >= REDUCE_BLOCKS_RUN and \
        2 * j.outer * j.C * j.inner * j.isz >= _reduce_blocks_min and \
        (_fetch_large or j.outer * j.inner * j.isz <= BWD_SPLIT_BYTES)


cdef inline bint _bwd_small_blocks(const Job *j) noexcept nogil:
    """Fused float32 backward of x and dy of _reduce_blocks_min or more takes blocks of at
    most BWD_SPLIT_BYTES of each array where a channel fits (_channel_block)."""
    return j.isz == 4 and j.outer * j.inner * j.isz <= BWD_SPLIT_BYTES and \
        2 * j.outer * j.C * j.inner * j.isz >= _reduce_blocks_min


cdef inline bint _split_fetch(const Job *j) noexcept nogil:
    """Those blocks, with runs of REDUCE_BLOCKS_RUN or more (_fetch_next), on one thread:
    one read from cache prefetches the next block's x during its sums and the next dy
    during its dx. It overlaps a core's arithmetic with its own traffic; with more
    threads the memory is the limit, and it measured slower. Only for channels under 7/8
    of BWD_SPLIT_BYTES: the next block's x, held through this block's dx, pushed larger
    ones out of L2. Against the split (ninth session, one thread, float32, in one
    process): (20, 64, 56, 56) 0.75-0.83x the time, (16, 64, 64, 64) 0.78x, (56, 128, 32,
    32) 0.81x, (48, 256, 32, 32) 0.86-0.89x, (80, 128, 28, 28) 0.93x, (96, 128, 24, 24)
    0.93x, (16, 64, 56, 56) 0.94-0.96x; channels of 64-128 KB 1.07-1.11x (they keep it).
    Channels of 192-224 KB measured 0.99-1.00x with it ((64, 256, 28, 28)) until the dx
    also fetched the last line of each of the next block's runs (bnf_bwd_dx_runs); then
    0.91-0.97x (tenth session: (64-72, 256, 28, 28), (16, 64, 58, 58), (32, 64, 40,
    40)); 225-256 KB 1.01-1.08x ((64, 256, 30, 30), (80, 128, 28, 28))."""
    return not j.threaded and _fetch_next(j) and _bwd_small_blocks(j) and \
        8 * j.outer * j.inner * j.isz < 7 * BWD_SPLIT_BYTES


cdef Py_ssize_t _channel_block(const Job *j, int kind) noexcept nogil:
    """Channels per block of _pipeline: where the channels lie back to back in the
    arrays read (NCHW), as many as CHANNEL_BLOCK_BYTES of each holds, at most
    BNF_BLOCK_CHANNELS; else one. A row of a block is then one stream from DRAM, not one
    per channel."""
    cdef Py_ssize_t ch = j.outer * j.inner * j.isz
    cdef Py_ssize_t k = CHANNEL_BLOCK_BYTES // ch
    if kind == K_FWD and ch <= TRAIN_BLOCK_BYTES:
        k = TRAIN_BLOCK_BYTES // ch
    if kind == K_BEVAL:
        # two steps (_set_fused_eval_backward off), the sums read x and dy, dx then dy
        # again from L2: blocks of BWD_SPLIT_BYTES of each. (64, 256, 28, 28) eval-mode
        # backward took 1.87x a copy in blocks of CHANNEL_BLOCK_BYTES (7 channels: 2.8 MB
        # of x and dy) and 1.34x in these (one thread, float32, alternated in one
        # process, Intel Xeon with 2 MiB of L2); (16, 128, 56, 56) 1.64 -> 1.42x,
        # (32, 256, 28, 28) 1.98 -> 1.88x. In one pass the size measured the same
        # (blocks of 1.5 and 4 MB 0.97-1.04x the time).
        k = BWD_SPLIT_BYTES // ch
    elif kind == K_BWD and ch <= BWD_SPLIT_BYTES and _fetch_next(j):
        k = 1       # a channel a block: see BWD_SPLIT_BYTES
    elif kind == K_BWD and ch > BWD_SPLIT_BYTES and not _fetch_large:
        k = 1       # Intel: a channel a block, see _fetch_large
    elif kind == K_BWD and _bwd_small_blocks(j):
        k = BWD_SPLIT_BYTES // ch
    if j.x_cs != j.inner or (kind != K_FWD and kind != K_STATS and j.dy_cs != j.inner):
        return 1
    return 1 if k < 1 else BNF_BLOCK_CHANNELS if k > BNF_BLOCK_CHANNELS else k


cdef inline bint _in_blocks(const Job *j, int kind) noexcept nogil:
    """`kind` runs over whole channels of runs in _pipeline's blocks: training and
    backward where a channel (x, and dy) stays in cache between its two passes (with
    the statistics held fixed, only for an x from DRAM); the reductions alone where a
    block holds more than one channel, of long runs, of an x from DRAM."""
    if j.group != 0 or j.nlev != 0 or j.nsb != 1:
        return False
    if kind == K_FWD or kind == K_BWD:
        return j.outer * j.inner * j.isz * (1 if kind == K_FWD else 2) <= \
            (PIPE_BYTES if kind == K_FWD else BWD_FUSE_BYTES)
    if kind == K_BEVAL:     # its dx reads dy alone: in cache the blocks gained nothing
        return j.outer * j.inner * j.isz * 2 <= FUSE_BYTES and \
            j.outer * j.C * j.inner * j.isz >= _reduce_blocks_min
    return (kind == K_STATS or kind == K_BSUMS) and _channel_block(j, kind) > 1 and \
        j.inner * j.isz >= REDUCE_BLOCKS_RUN and \
        j.outer * j.C * j.inner * j.isz >= _reduce_blocks_min


cdef void _cached_units(Job *j, int kind, Py_ssize_t u0, Py_ssize_t u1) noexcept nogil:
    """Channels u0 .. u1 - 1 of runs in cache (_cached_runs), a channel at a time: its
    statistics or sums, then its normalization or dx (K_FWD, K_BWD, K_BEVAL)."""
    cdef Py_ssize_t isz = j.isz
    if u0 >= u1:
        return
    if kind == K_FWD:
        bnf_train_runs_cached(j.type, j.x + u0 * j.x_cs * isz, j.x_os, j.x_cs,
                              j.y + u0 * j.y_cs * isz, j.y_os, j.y_cs, j.outer, j.inner,
                              u1 - u0, j.eps, j.weight + u0, j.hi + u0, j.lo + u0,
                              j.invstd + u0, j.scale + u0, j.shift + u0, j.k1 + u0,
                              j.mom + u0, _out_flags(j))
    else:
        bnf_bwd_runs_cached(j.type, j.dy + u0 * j.dy_cs * isz, j.dy_os, j.dy_cs,
                            j.x + u0 * j.x_cs * isz, j.x_os, j.x_cs,
                            j.y + u0 * j.y_cs * isz, j.y_os, j.y_cs, j.outer, j.inner,
                            u1 - u0, kind == K_BWD, j.n_total, j.hi + u0, j.invstd + u0,
                            j.scale + u0, j.s_dy + u0, j.s_dyx + u0, j.s_xm + u0,
                            j.lo + u0, j.k1 + u0, j.k2 + u0, _out_flags(j))


cdef void _run(Job *j, int kind, Py_ssize_t nunits, int nthreads) noexcept nogil:
    global _teams_started
    cdef Py_ssize_t u, t
    if nthreads > 1:
        _teams_started = 1
    if j.cached and j.nsb == 1 and (kind == K_FWD or kind == K_BWD or kind == K_BEVAL):
        if nthreads <= 1:
            _cached_units(j, kind, 0, nunits)
        else:
            for t in prange(nthreads, num_threads=nthreads, schedule='static'):
                _cached_units(j, kind, t * nunits // nthreads, (t + 1) * nunits // nthreads)
        return
    if _in_blocks(j, kind):
        # each thread a contiguous range of channels, in blocks
        if nthreads <= 1:
            _pipeline(j, kind, 0, nunits)
        else:
            for t in prange(nthreads, num_threads=nthreads, schedule='static'):
                _pipeline(j, kind, t * nunits // nthreads, (t + 1) * nunits // nthreads)
        return
    if nthreads <= 1:
        for u in range(nunits):
            _any_unit(j, kind, nunits - 1 - u if j.reverse else u)
    else:
        for u in prange(nunits, num_threads=nthreads, schedule='static'):
            _any_unit(j, kind, nunits - 1 - u if j.reverse else u)


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t _lines(Py_ssize_t n) noexcept nogil:
    """n rounded up to a multiple of 16 elements (whole cache lines of float32)."""
    return _cdiv(n, 16) * 16


cdef void _split_for_threads(Job *j, int kind, Py_ssize_t t) noexcept nogil:
    """Cut the work into at least t units where the plan made fewer: normalization
    blocks by rows, or by channels when there are fewer rows than threads; rows-form
    reductions by channel blocks. None of this changes a bit of the results: each
    channel's reduction is partitioned by the shape alone (superblocks, tile_rows)."""
    cdef Py_ssize_t w
    if _in_memory_order(j, kind):
        if j.nrb * j.ncn >= t:
            return
        if j.outer >= t:
            j.rb = _cdiv(j.outer, t)
            j.nrb = _cdiv(j.outer, j.rb)
        else:
            j.rb = 1
            j.nrb = j.outer
            w = _cdiv(j.C, _cdiv(t, j.outer))
            j.cn_len = _lines(w) if j.group == 1 else w
            j.ncn = _cdiv(j.C, j.cn_len)
    elif j.group and j.ncb * j.nsb < t:
        # not below 128 columns: the rows kernels' per-row costs would eat the gain
        # (64-channel blocks measured 2x slower on two threads than one block on one)
        w = _cdiv(j.C, _cdiv(t, j.nsb))
        if j.group == 1:
            w = _lines(w)
        if w * j.group < 128:
            w = _cdiv(128, j.group)
        if w < j.width:
            j.width = w
            j.ncb = _cdiv(j.C + j.col_shift, w)


cdef int _launch(Job *j, int kind) except -1:
    """Run `kind` over its units: serially with the GIL held for tiny work, else
    without the GIL on as many threads as the work and the settings allow."""
    cdef Py_ssize_t elems = j.outer * j.C * j.inner
    cdef Py_ssize_t nunits
    cdef int nthreads = 1
    if elems == 0:
        return 0
    if elems >= NOGIL_MIN_ELEMS:
        nthreads = _threads_for_work(elems * CACHED_RUNS_WORK if j.cached and
                                     (kind == K_FWD or kind == K_BWD or kind == K_BEVAL)
                                     else elems)
        if nthreads > 1:
            _split_for_threads(j, kind, nthreads)
    if _in_memory_order(j, kind):
        nunits = j.nrb * j.ncn
    else:
        nunits = j.ncb * j.nsb
    if nthreads > nunits:
        nthreads = <int>nunits
    if (kind == K_NORM and _gap_packs_norm(j)) or \
            ((j.gap or j.nlev) and not _in_memory_order(j, kind)):
        # per OpenMP thread (it may run a prange with fewer threads than asked, never
        # more): a unit's rows of x and dy, packed; or a segment's moments or sums
        if kind == K_NORM:
            j.scratch_bytes = j.rb * j.cn_len * j.inner * j.isz
        elif j.gap == GAP_OUTPUT:
            # the output of a unit (of dx: GAP_ELEMS at most); the reductions, none
            j.scratch_bytes = 0 if kind == K_STATS or kind == K_BSUMS else \
                j.sb_len * j.width * j.group * j.isz
            if kind == K_BDX and j.sb_len * j.width * j.group > GAP_ELEMS:
                # pieces of up to GAP_ELEMS (of a narrower last block too), or a row
                j.scratch_bytes = (GAP_ELEMS if j.width * j.group <= GAP_ELEMS else
                                   j.width * j.group) * j.isz
        elif j.gap:
            j.scratch_bytes = j.sb_len * j.width * j.group * (1 if kind <= K_FWD else 2) \
                * j.isz
        else:
            j.scratch_bytes = j.width * (sizeof(bnf_moments) + 2 * sizeof(double))
        j.scratch_bytes = _cdiv(j.scratch_bytes, 64) * 64
        if j.scratch_bytes > 0:
            j.scratch = <char *>_alloc(j.scratch_bytes * nthreads)
            if j.scratch == NULL:
                raise MemoryError()
    try:
        if elems < NOGIL_MIN_ELEMS:
            j.threaded = 0
            _run(j, kind, nunits, 1)
        else:
            j.threaded = nthreads > 1
            with nogil:
                _run(j, kind, nunits, nthreads)
    finally:
        _free(j.scratch)
        j.scratch = NULL
    return 0


cdef inline void _copy_out(double *dst, const double *src, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = src[i]


cdef inline void _copy_in(double *dst, cnp.ndarray src, Py_ssize_t offset,
                          Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    cdef double *p = <double *>cnp.PyArray_DATA(src) + offset
    for i in range(n):
        dst[i] = p[i]


cdef void _sum_units(Job *j) noexcept:
    """Backward sums of the units into the first C entries, in a fixed order; sum(dy) and
    sum(dy * (x - mean)) compensated (bnf_two_sum: a (1048576, 8) float64 dbias of
    same-sign gradients was 2.8 ulps off plainly)."""
    if j.nsb > 1:
        bnf_merge_unit_sums(j.s_dy, j.s_dyx, j.s_xm, j.C, j.nsb)


cdef void _plan(Job *j, Py_ssize_t itemsize, int narrays, bint elementwise=False,
                bint cached=False) noexcept:
    """Choose channel blocks and superblocks (a function of the shape only). cached: the
    caller takes channels of runs in cache a channel at a time (_cached_runs)."""
    cdef Py_ssize_t per_block
    j.gap = 0
    j.cached = cached and _cached_runs(j, itemsize, narrays)
    if j.inner <= (EVAL_GROUP_MAX_INNER if elementwise else GROUP_MAX_INNER) and \
            not j.cached and not _segment_runs(j.nlev, j.inner, j.x_cs):
        # short runs (inner == 1: channels-last rows): a row of C * inner columns, read in
        # memory order by the rows kernels (a call per run of `inner` elements cost
        # 10-100x a copy); a channel's columns are reduced together. Channels not back
        # to back in x or dy (a stepped view): each unit packed into scratch first; in
        # the output alone, x and dy read in place and the output through scratch.
        j.group = j.inner
        if not (j.x_cs == j.inner and (j.dy == NULL or j.dy_cs == j.inner)) or \
                (j.nlev and j.y != NULL and j.y_cs != j.inner):
            j.gap = GAP_INPUTS
        elif j.y != NULL and j.y_cs != j.inner:
            # the output alone (an out= step or crop): the units, and so the bits of the
            # statistics, those of a contiguous output
            j.gap = GAP_OUTPUT
    else:
        j.group = 0
    if j.group:
        # the nominal width (channels) fixes superblocks and tiles; _split_for_threads
        # may then cut narrower blocks
        j.width = (BNF_MAX_WIDTH if j.group == 1 else BNF_GROUP_COLS) // j.group
        if j.width > j.C:
            j.width = j.C
        if j.width < 1:
            j.width = 1                  # no channels: nothing runs, but no division by 0
        j.ncb = (j.C + j.width - 1) // j.width
        per_block = j.width * j.group
        j.tile_rows = BNF_TILE_ELEMS // per_block
        if j.tile_rows < 4:
            j.tile_rows = 4
    else:
        j.width = 1
        j.ncb = j.C
        per_block = j.inner
    if j.group and j.ncb == 1:
        # One block of all channels: its statistics need every row before the first
        # is normalized, so it is two passes whether fused or not. Superblocks of
        # 1/8 of the rows (64K to 256K elements) let up to 8 threads share mid-size
        # arrays; each thread then normalizes the rows it read.
        j.sb_len = _cdiv(j.outer, 8)
        if j.sb_len > SUPER_ELEMS // per_block:
            j.sb_len = SUPER_ELEMS // per_block
        if j.sb_len < PAR_MIN_ELEMS // per_block:
            j.sb_len = PAR_MIN_ELEMS // per_block
    elif j.outer * per_block * itemsize * narrays <= \
            (BWD_FUSE_BYTES if narrays == 2 and j.group == 0 else FUSE_BYTES):
        j.sb_len = j.outer
    else:
        j.sb_len = SUPER_ELEMS // per_block
    if j.gap == GAP_INPUTS and j.sb_len > GAP_ELEMS // per_block:
        j.sb_len = GAP_ELEMS // per_block     # the scratch a unit is packed into
    if j.sb_len < 1:
        j.sb_len = 1
    j.nsb = (j.outer + j.sb_len - 1) // j.sb_len if j.outer > 0 else 1
    j.cn_len = j.C
    if j.group > 1 and (not j.gap or _gap_packs_norm(j)):
        # normalize a block of channels (the kernel's) over many rows a unit: its factors
        # are spread over its columns once per call (channels apart with longer runs:
        # normalized as runs, all channels a unit)
        j.cn_len = bnf_group_block(BNF_CHUNK, j.group)
        if j.cn_len > j.C:
            j.cn_len = j.C
    j.ncn = _cdiv(j.C, j.cn_len) if j.C > 0 else 1
    j.rb = (GAP_ELEMS if _gap_packs_norm(j) else SUPER_ELEMS) // (j.cn_len * j.inner) \
        if j.cn_len * j.inner > 0 else 1
    if j.rb < 1:
        j.rb = 1
    j.nrb = (j.outer + j.rb - 1) // j.rb if j.outer > 0 else 1


# ----------------------------------------------------------------------------------
# Argument handling on raw arrays.

cdef inline bint _is_native_float(object a) noexcept:
    cdef int t
    if not cnp.PyArray_CheckExact(a):
        return False
    t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    return (t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and \
        cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a) and cnp.PyArray_ISALIGNED(<cnp.ndarray>a)


cdef int _refuse_masked(object a, str name) except -1:
    """A masked array that hides values is refused: the kernels read the data under the
    mask, so the masked values would enter the statistics (NumPy's asarray drops the
    mask silently). Called only off the exact-ndarray fast paths."""
    if isinstance(a, np.ma.MaskedArray) and np.ma.is_masked(a):
        raise TypeError(f"{name} is a masked array with masked values, and bnfast does not "
                        f"apply masks: pass {name}.filled(value), or select the unmasked rows")
    return 0


def _tensor_to_numpy(t):
    """A torch tensor (any device, autograd or not) as a NumPy array. The float dtypes
    NumPy lacks (bfloat16, the float8 kinds) come back as float32, which holds each of
    their values exactly; `Tensor.numpy()` refuses them. Every torch argument, parameter
    and state_dict value goes through here."""
    if getattr(t, "is_meta", False):    # .cpu() raised torch's NotImplementedError
        raise ValueError("a torch tensor on the 'meta' device holds no values: materialize "
                         "the module first (module.to_empty(device='cpu'), then load its "
                         "state)")
    t = t.detach().cpu()
    try:
        return t.numpy()
    except TypeError:
        if t.is_floating_point():
            return t.float().numpy()
        raise


def _check_not_masked(a, name):
    """The Python modules' form of _refuse_masked (layers' dy, moments, folding,
    load_state_dict): they convert with np.asarray, which drops a mask. Returns a."""
    _refuse_masked(a, name)
    return a


def _as_array(a, name):
    """np.asarray(a) for the Python modules' array arguments (layers' x and dy, moments'
    x and chunks): a masked array that hides values refused, and what NumPy cannot
    convert (a torch tensor that needs grad, a ragged list) a TypeError naming the
    argument, as the kernels' entry points give."""
    if cnp.PyArray_CheckExact(a):       # (no mask to look for: ~80 ns of a layer's call)
        return a
    if isinstance(a, np.ndarray):
        _refuse_masked(a, name)
        return a
    try:
        a = np.asarray(a)
    except Exception as e:
        raise TypeError(f"{name} must be an array-like of real numbers: {e}") from None
    if cnp.PyArray_TYPE(a) == cnp.NPY_OBJECT:   # NumPy < 1.24 made a ragged list one
        raise TypeError(f"{name} must be an array-like of real numbers, got one NumPy "
                        f"reads as an object array (a ragged or mixed list?)")
    return a


cdef tuple _as_input(object x, str name):
    """(x as an aligned native float16/32/64 array, dtype of the result or None for
    x's own): integers and bools are computed in float64."""
    cdef cnp.ndarray a
    if _is_native_float(x):
        return x, None
    if cnp.PyArray_CheckExact(x) and cnp.PyArray_TYPE(<cnp.ndarray>x) == cnp.NPY_FLOAT16 and \
            cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>x) and cnp.PyArray_ISALIGNED(<cnp.ndarray>x):
        return x, None          # np.require below costs ~1 us: a tenth of a small call
    if isinstance(x, np.ndarray):
        _refuse_masked(x, name)
        a = x
    else:
        try:
            a = np.asarray(x)
        except Exception as e:
            raise TypeError(f"{name} must be an array-like of real numbers: {e}") from None
    kind = a.dtype.kind
    if kind == 'f':
        if a.dtype.itemsize not in (2, 4, 8):
            raise TypeError(f"{name} has dtype {a.dtype}; bnfast computes float16, float32 "
                            "and float64 (convert long double first)")
        return np.require(a, dtype=a.dtype.newbyteorder('='), requirements='A'), None
    if kind in 'iub':
        return np.asarray(a, dtype=np.float64), np.dtype(np.float64)
    raise TypeError(f"{name} must have a real floating dtype (float16/32/64; integers are "
                    f"converted to float64), got {a.dtype}")


cdef int _norm_axis(object axis, int ndim) except -1:
    cdef long long ax
    try:
        ax = _index(axis, "axis")
    except OverflowError:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions") from None
    if ax < -ndim or ax >= ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    return <int>(ax + ndim if ax < 0 else ax)


cdef int _load_param(object p, Py_ssize_t C, str name, double *dst, double default) except -1:
    """Copy a per-channel parameter (any real array-like of shape (C,)) into dst as
    double; None gives `default`."""
    cdef Py_ssize_t i, st
    cdef char *src
    cdef int t
    cdef cnp.ndarray a
    if p is None:
        for i in range(C):
            dst[i] = default
        return 0
    if cnp.PyArray_CheckExact(p) and cnp.PyArray_NDIM(<cnp.ndarray>p) == 1 and \
            cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>p) and cnp.PyArray_ISALIGNED(<cnp.ndarray>p):
        a = <cnp.ndarray>p
        t = cnp.PyArray_TYPE(a)
        if t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64 or t == cnp.NPY_FLOAT16:
            if cnp.PyArray_DIMS(a)[0] != C:
                raise ValueError(f"{name} must have shape ({C},) to match the {C} channels "
                                 f"of the input, got {(<object>p).shape}")
            src = <char *>cnp.PyArray_DATA(a)
            st = cnp.PyArray_STRIDES(a)[0]
            if t == cnp.NPY_FLOAT32:
                bnf_widen_f32(src, st, dst, C)
            elif t == cnp.NPY_FLOAT64:
                bnf_gather_f64(src, st, dst, C)
            else:       # float16 parameters (a float16 model): NumPy's cast cost ~0.5 us each
                bnf_widen_f16(src, st, dst, C)
            return 0
    if hasattr(p, "detach") and hasattr(p, "cpu"):       # a torch tensor
        p = _tensor_to_numpy(p)
    _refuse_masked(p, name)
    try:
        arr = np.asarray(p)
    except Exception as e:
        raise TypeError(f"{name} must be a real array-like of shape ({C},): {e}") from None
    if arr.dtype.kind not in 'fiub':
        raise TypeError(f"{name} must have a real numeric dtype, got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape ({C},), got shape {arr.shape}")
    if arr.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},) to match the {C} channels "
                         f"of the input, got {arr.shape}")
    a = np.ascontiguousarray(arr, dtype=np.float64)
    src = <char *>cnp.PyArray_DATA(a)
    for i in range(C):
        dst[i] = (<double *>src)[i]
    return 0


cdef object _index(object v, str name):
    """v as a Python int (integers only: no floats, strings or bools)."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {v!r}") from None


cdef int _check_bool(object v, str name) except -1:
    """A flag: bool or NumPy's bool only, as torch's batch_norm takes it (a string such as
    "False" read by truth value trained, and updated the running statistics)."""
    if v is True:
        return 1
    if v is False:
        return 0
    if isinstance(v, np.bool_):
        return 1 if v else 0
    raise TypeError(f"{name} must be a bool, got {type(v).__name__} {v!r}")


def _check_flag(v, name):
    """_check_bool for the Python modules' flags (folding's transpose, RunningStats'
    unbiased): True or False, else a TypeError naming the argument."""
    return _check_bool(v, name) == 1


cdef double _check_eps(object eps) except -1.0:
    cdef double e
    try:
        e = eps
    except OverflowError:       # an int beyond a double's range
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}") from None
    except (TypeError, ValueError):     # ValueError: a tensor of several elements
        raise TypeError(f"eps must be a real number, got {eps!r}") from None
    if not (0.0 < e < INFINITY):  # inf would normalize everything to zero: refused
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return e


cdef double _check_momentum(object momentum) except -1.0:
    cdef double m
    try:
        m = momentum
    except OverflowError:       # an int beyond a double's range
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}") from None
    except (TypeError, ValueError):     # ValueError: a tensor of several elements
        raise TypeError(f"momentum must be a real number in [0, 1], got {momentum!r}") from None
    if not (0.0 <= m <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return m


cdef object _check_out(object out, cnp.ndarray like, object dtype, str name):
    """`out` must be a writable ndarray of like's shape and the result dtype."""
    cdef int i, nd
    cdef cnp.ndarray o
    if cnp.PyArray_Check(out):
        o = <cnp.ndarray>out
        nd = cnp.PyArray_NDIM(o)
        if nd == cnp.PyArray_NDIM(like):
            for i in range(nd):
                if cnp.PyArray_DIMS(o)[i] != cnp.PyArray_DIMS(like)[i]:
                    break
            else:
                if (<object>cnp.PyArray_DESCR(o)) is dtype or o.dtype == dtype:
                    if cnp.PyArray_ISWRITEABLE(o):
                        if not cnp.PyArray_CheckExact(o):
                            _refuse_masked(o, name)   # the masked places would be written
                        return out
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != (<object>like).shape:
        raise ValueError(f"{name} must have shape {(<object>like).shape}, got {out.shape}")
    if out.dtype != dtype and not (out.dtype.newbyteorder("=") == dtype):
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    # the result dtype in the other byte order (out=x of a big-endian x): written
    # through a temporary (_direct_out), converted on the copy into out
    if not type(out) is np.ndarray:
        _refuse_masked(out, name)
    return out


cdef void _extent(cnp.ndarray a, char **lo, char **hi) noexcept:
    """Byte range [lo, hi) that a's elements occupy."""
    cdef char *p = <char *>cnp.PyArray_DATA(a)
    cdef char *q = p
    cdef int i
    cdef Py_ssize_t span
    for i in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[i] == 0:
            lo[0] = p
            hi[0] = p
            return
        span = (cnp.PyArray_DIMS(a)[i] - 1) * cnp.PyArray_STRIDES(a)[i]
        if span < 0:
            p += span
        else:
            q += span
    lo[0] = p
    hi[0] = q + cnp.PyArray_ITEMSIZE(a)


cdef bint _may_overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    """The byte ranges of a and b intersect (np.may_share_memory, without the call)."""
    cdef char *alo
    cdef char *ahi
    cdef char *blo
    cdef char *bhi
    _extent(a, &alo, &ahi)
    _extent(b, &blo, &bhi)
    return alo < bhi and blo < ahi and alo != ahi and blo != bhi


cdef inline bint _same_view(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int i
    if cnp.PyArray_DATA(a) != cnp.PyArray_DATA(b):
        return False
    for i in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[i] > 1 and cnp.PyArray_STRIDES(a)[i] != cnp.PyArray_STRIDES(b)[i]:
            return False
    return True


cdef inline bint _segment_runs(int nlev, Py_ssize_t inner, Py_ssize_t cs) noexcept nogil:
    """Rows in segments whose runs of SEG_RUNS_INNER or more lie apart from channel to
    channel (a crop of NCHW): read as runs, a segment of a channel a call, not packed
    as rows. Against the copy, float32: 32x16x128x128 of 132x132 training 2.5 -> 1.25x
    a copy of the view, backward 2.9 -> 1.9x; 8x8x32x64x64 of 34x66x66 2.6 -> 1.7x and
    3.2 -> 2.2x (packed as rows, 64x64x32x32 of 34x34 had trained 2.0 -> 2.2x)."""
    return nlev > 0 and cs != inner and inner >= SEG_RUNS_INNER


cdef inline bint _segments_pay(const Geo *g, Py_ssize_t itemsize,
                               bint elementwise, bint backward=False) noexcept:
    """Whether rows in segments (Geo.nlev > 0) are read where they are rather than x
    copied: when a kernel call, a segment's rows of a block of channels (rows form, the
    channels back to back) or of one channel (runs of more than 128 elements, or rows
    of channels apart), is long enough that the calls' costs stay small. Measured
    against the copy on windows (N, T, C) float32: evaluation gains from calls of 2 KB
    and 4 rows (1.6-1.9 -> 0.8-1.5x a copy of the view; 2 rows of 256 channels 1.5 ->
    2.3x); the reductions, whose calls also cost per channel, need 8 KB and 16 rows
    (training 1.6-2.2 -> 1.2-1.9x, backward 2.3-3.1 -> 2.2-2.9x; 2 KB: 1.4-1.6x slower
    than the copy, 2 to 8 rows of 256 channels 1.5-3.2x; runs of channels apart,
    _segment_runs: 4 KB calls ran backward 2.3 -> 2.8x). Runs under SEG_RUNS_INNER of
    channels apart would be packed for the reductions: copied instead."""
    cdef bint runs = g.inner > (EVAL_GROUP_MAX_INNER if elementwise else GROUP_MAX_INNER) \
        or _segment_runs(g.nlev, g.inner, g.cs)
    cdef bint together = g.cs == g.inner and not runs    # a call takes all channels
    # (_plan decides on x alone as well: a y or dy with channels apart packs the rows)
    cdef Py_ssize_t call_bytes = g.seg * g.inner * itemsize * (g.C if together else 1)
    if _segments_always:
        return True
    if backward and together and call_bytes < SEG_BWD_ROWS_BYTES:
        return False
    if elementwise:
        # short runs of channels apart (a crop of NCHW 28 x 28) would be packed, 112
        # bytes a copy: evaluation 4.3x a copy of the view against 1.7x for copying x
        # first (one thread, float32, 51 MB; 14 x 14 3.3x against 3.1x)
        return (together or runs) and call_bytes >= SEG_ELEMENTWISE_BYTES and \
            g.seg >= SEG_ELEMENTWISE_ROWS
    return (together or runs) and call_bytes >= SEG_BYTES and g.seg >= SEG_ROWS


cdef cnp.ndarray _copy_in_own_order(cnp.ndarray x):
    """x copied in its own axis order: a C-order copy of an F-ordered array would be a
    transpose, and an `out` in x's order would then need another. Broadcast axes (stride
    0) take their place in C order where the other axes are in C order, else go
    outermost: NumPy's order 'K' puts them innermost, so a (1, C) row broadcast to (N, C)
    came out F-ordered and a C-ordered out or dy took a second full-size copy."""
    cdef int i, nd = cnp.PyArray_NDIM(x), recycled
    cdef cnp.ndarray c
    for i in range(nd):
        if cnp.PyArray_STRIDES(x)[i] == 0 and cnp.PyArray_DIMS(x)[i] > 1:
            break
    else:
        # memory a freed output or copy held, when there is (bnf_outcache_new_like): a
        # fresh 51 MB copy's pages were faulted in and zeroed on every call, which took
        # about the time of the copy itself
        c = bnf_outcache_new_like(x, &recycled)
        np.copyto(c, x)
        return c
    shape, strides = (<object>x).shape, (<object>x).strides
    broadcast = [i for i in range(nd) if strides[i] == 0 and shape[i] > 1]
    # the rest outermost first by |stride| (stable: ties keep their order, as order 'K')
    rest = sorted((i for i in range(nd) if i not in broadcast),
                  key=lambda i: -abs(strides[i]))
    if rest == sorted(rest):
        perm = list(range(nd))      # the rest in C order: all of it (a C-ordered out fits)
    else:
        perm = broadcast + rest
    c = np.empty([shape[i] for i in perm], dtype=x.dtype).transpose(np.argsort(perm))
    np.copyto(c, x)
    return c


cdef class _Layout:
    """The (outer, C, inner) views of the arrays of one call, in the same axis order.

    Outer axes that do not merge into evenly spaced rows (a crop, a window) are levels
    of rows (Geo.nlev) when the runs are short enough to be read as rows. x is copied, in
    its own axis order, when it has no such view (negative or zero strides, gaps inside
    a long inner extent, channels-last with channels apart); an output without such a
    view, or one that partially overlaps an input, is computed into a temporary and
    copied at the end."""
    cdef int axis
    cdef int order[64]             # NumPy's most dimensions (NPY_MAXDIMS)
    cdef int nord, nabove
    cdef Groups groups
    cdef Geo gx
    cdef int recycled               # output() handed out a freed output's memory again

    cdef cnp.ndarray fit_input(self, cnp.ndarray x, int axis, bint elementwise=False,
                               bint backward=False):
        """x itself when the kernels can read it, else its copy; elementwise: the call
        only normalizes (no reductions); backward: the backward's sums and dx."""
        self.axis = axis
        self.nord = _order_axes(x, axis, self.order)
        self.nabove = _split_outer(x, axis, self.order, self.nord)
        if _geometry(x, axis, self.order, self.nord, self.nabove, &self.groups, True,
                     &self.gx) and (self.gx.nlev == 0 or
                                    _segments_pay(&self.gx, x.itemsize, elementwise,
                                                  backward)):
            return x
        x = _copy_in_own_order(x)
        self.nord = _order_axes(x, axis, self.order)
        self.nabove = _split_outer(x, axis, self.order, self.nord)
        _geometry(x, axis, self.order, self.nord, self.nabove, &self.groups, True, &self.gx)
        return x

    cdef bint fits(self, cnp.ndarray a, Geo *g):
        if not cnp.PyArray_ISALIGNED(a):
            return False                # the kernels store whole elements
        if not _geometry(a, self.axis, self.order, self.nord, self.nabove, &self.groups,
                         False, g):
            return False
        return g.outer == self.gx.outer and g.inner == self.gx.inner

    cdef cnp.ndarray fit_other_input(self, cnp.ndarray a, cnp.ndarray x, Geo *g):
        """A second input (dy) in x's layout; copied into it when it has another."""
        cdef cnp.ndarray b
        if self.fits(a, g):
            return a
        cdef int recycled
        b = bnf_outcache_new_like(x, &recycled)      # a copy: plain stores either way
        _copy_tiled(b, a)
        self.fits(b, g)
        return b

    cdef cnp.ndarray output(self, object out, cnp.ndarray x, tuple inputs, Geo *g):
        """The array to write: `out` itself when it fits and does not partially overlap
        an input, else a new array in x's layout."""
        cdef cnp.ndarray o
        self.recycled = 0
        if out is not None and self.takes(out, inputs, g):
            return out
        o = bnf_outcache_new_like(x, &self.recycled)
        self.fits(o, g)
        return o

    cdef bint takes(self, cnp.ndarray o, tuple inputs, Geo *g):
        """o fits this layout and does not partially overlap an input. Not an o with its
        channels apart where x's rows in segments have them together: _plan then packs
        the units (GAP_INPUTS, the only form with both), and their smaller units had
        changed the last bit of the statistics and sums against the call without out."""
        if not self.fits(o, g):
            return False
        if self.gx.nlev and self.gx.cs == self.gx.inner and g.cs != g.inner:
            return False
        for a in inputs:
            if not _same_view(o, a) and _may_overlap(o, a):
                return False
        return True


cdef _Layout _joint_layout(object out, _Layout lay, cnp.ndarray x, cnp.ndarray dy,
                           Geo *gx, Geo *gd, Geo *gy):
    """For an `out` that does not fit x's layout `lay` because its rows lie apart in
    segments where x's do not (the interior of a padded buffer, a window): a layout of
    out's own, with x (and dy) described in it, for the passes that work element by
    element (the normalization, dx), so that out is written in place rather than
    through a temporary of its size. The reductions keep x's layout, and so their bits.
    None when out fits `lay`, has no such view, x or dy does not fit out's rows, out's
    segments are too short for the calls to pay, or out partially overlaps an input."""
    cdef _Layout j
    cdef cnp.ndarray o
    if out is None or not isinstance(out, np.ndarray):
        return None
    o = out
    inputs = (x,) if dy is None else (x, dy)
    if lay.takes(o, inputs, gy) or not cnp.PyArray_ISALIGNED(o):
        return None
    for a in inputs:
        if not _same_view(o, a) and _may_overlap(o, a):
            return None
    j = _Layout()
    j.axis = lay.axis
    j.nord = _order_axes(o, j.axis, j.order)
    j.nabove = _split_outer(o, j.axis, j.order, j.nord)
    if not _geometry(o, j.axis, j.order, j.nord, j.nabove, &j.groups, True, &j.gx):
        return None
    if not (j.gx.cs == j.gx.inner and j.gx.inner <= EVAL_GROUP_MAX_INNER) or \
            (j.gx.nlev and not _segments_pay(&j.gx, cnp.PyArray_ITEMSIZE(x), True)):
        # only rows whose channels lie together (channels last, (N, T, C) windows): runs
        # of NCHW (a padded interior) went a row of channels a call, out of memory
        # order, 1.4-2.4x the time of the temporary (one thread, float32, 51 MB); with
        # one sample (rows evenly spaced, no segments) 1.2-1.3x (backward)
        return None
    if not j.fits(x, gx) or (dy is not None and not j.fits(dy, gd)):
        return None
    gy[0] = j.gx
    return j


cdef int _launch_joint(Job *j, int kind, cnp.ndarray x, Geo *gx, cnp.ndarray dy, Geo *gd,
                       cnp.ndarray y, Geo *gy, double *hi=NULL, double *shift=NULL) except -1:
    """The element-by-element pass `kind` (K_NORM, or K_BDX) of job j over the arrays in
    the layout of _joint_layout: the same per-channel factors (hi and shift in their
    place where given), its own plan (element by element, the bits do not depend on
    it)."""
    cdef Job k
    memset(&k, 0, sizeof(Job))
    k.type, k.isz, k.reverse = j.type, j.isz, j.reverse
    k.hi = hi if hi != NULL else j.hi
    k.shift = shift if shift != NULL else j.shift
    k.lo, k.scale = j.lo, j.scale
    k.k1, k.k2 = j.k1, j.k2
    _set_geo(&k, gx)
    k.x = <char *>cnp.PyArray_DATA(x)
    _set_y(&k, y, gy)
    if dy is not None:
        _set_dy(&k, dy, gd)
    _plan(&k, k.isz, 1 if kind == K_NORM else 2, kind == K_NORM)
    k.stream = _elems(&k) * k.isz >= _stream_bytes
    _launch(&k, kind)
    return 0


# A transposing copy (the fastest-varying axes of the two arrays differ) in tiles from
# this size on: NumPy's copy walks one side across the whole array for every element of
# the other's rows, so a (131072, 64) float32 C-ordered array copied into a Fortran one
# took 39 ms against 4 ms for a copy in the same order (Zen 4, one thread).
DEF TILED_COPY_BYTES = 1 << 20
# ... tiles of about this many elements, the two fast axes up to TILE_SIDE each
DEF TILE_ELEMS_COPY = 1 << 16
DEF TILE_SIDE = 1024


def _copy_tiled(dst, src, casting="same_kind", Py_ssize_t min_bytes=TILED_COPY_BYTES):
    """np.copyto(dst, src, casting) for arrays of one shape; when their fastest axes
    differ and dst has at least min_bytes, a tile at a time: each tile spans up to
    TILE_SIDE elements of both fast axes (and more axes until it holds about
    TILE_ELEMS_COPY), and the tiles go in dst's memory order, so both sides are read and
    written a few cache lines at a time."""
    cdef Py_ssize_t nd = dst.ndim, tile, i
    shape = dst.shape
    if dst.nbytes < min_bytes or nd < 2 or src.shape != shape:
        np.copyto(dst, src, casting=casting)
        return
    ss, ds = src.strides, dst.strides
    axes = [i for i in range(nd) if shape[i] > 1]
    if len(axes) < 2:
        np.copyto(dst, src, casting=casting)
        return
    a_s = min(axes, key=lambda i: abs(ss[i]))
    a_d = min(axes, key=lambda i: abs(ds[i]))
    if a_s == a_d:
        np.copyto(dst, src, casting=casting)
        return
    blk = [1] * nd
    blk[a_s] = min(shape[a_s], TILE_SIDE)
    blk[a_d] = min(shape[a_d], TILE_SIDE)
    # a short fast axis (a few channels): the other takes the rest of the tile, not
    # TILE_SIDE (tiles of 2 x 1024 elements, a Python step each: a 4 MB (N, 2) copy
    # from F to C order took 583 us, 325 us so)
    if blk[a_d] < TILE_SIDE:
        blk[a_s] = min(shape[a_s], max(TILE_SIDE, TILE_ELEMS_COPY // blk[a_d]))
    elif blk[a_s] < TILE_SIDE:
        blk[a_d] = min(shape[a_d], max(TILE_SIDE, TILE_ELEMS_COPY // blk[a_s]))
    tile = blk[a_s] * blk[a_d]
    for i in sorted(axes, key=lambda i: min(abs(ss[i]), abs(ds[i]))):
        if tile >= TILE_ELEMS_COPY:
            break
        if i != a_s and i != a_d:
            blk[i] = min(shape[i], max(1, TILE_ELEMS_COPY // tile))
            tile *= blk[i]
    order = sorted(range(nd), key=lambda i: -abs(ds[i]))
    copyto = np.copyto
    cdef bint in_c = isinstance(dst, np.ndarray) and isinstance(src, np.ndarray) and \
        dst.dtype == src.dtype and dst.flags.writeable and \
        all(b == 1 for i, b in enumerate(blk) if i != a_s and i != a_d)
    cdef cnp.ndarray d, sv
    cdef Py_ssize_t isz = dst.itemsize, nr, nc
    cdef Py_ssize_t d_r = ds[a_d], d_c = ds[a_s], s_r = ss[a_d], s_c = ss[a_s]
    for starts in itertools.product(*[range(0, shape[i], blk[i]) for i in order]):
        sl = [None] * nd
        for i, s0 in zip(order, starts):
            sl[i] = slice(s0, s0 + blk[i])
        t = tuple(sl)
        if in_c:
            # a 2-D tile: rows along dst's fast axis, columns along src's
            d, sv = dst[t], src[t]
            nr, nc = d.shape[a_d], d.shape[a_s]
            with nogil:
                bnf_copy_2d(<char *>cnp.PyArray_DATA(d), d_r, d_c,
                            <const char *>cnp.PyArray_DATA(sv), s_r, s_c, nr, nc, isz)
        else:
            copyto(dst[t], src[t], casting=casting)


cdef inline void _set_geo(Job *j, const Geo *gx) noexcept:
    j.outer = gx.outer
    j.C = gx.C
    j.inner = gx.inner
    j.seg = gx.seg
    j.nlev = gx.nlev
    if gx.nlev:
        memcpy(j.lc, gx.lc, sizeof(j.lc))
        memcpy(j.x_ls, gx.ls, sizeof(j.x_ls))
    j.x_os = gx.os
    j.x_cs = gx.cs


cdef inline void _set_y(Job *j, cnp.ndarray y, const Geo *gy) noexcept:
    j.y = <char *>cnp.PyArray_DATA(y)
    j.y_os = gy.os
    j.y_cs = gy.cs
    if gy.nlev:
        memcpy(j.y_ls, gy.ls, sizeof(j.y_ls))


cdef inline void _set_dy(Job *j, cnp.ndarray dy, const Geo *gd) noexcept:
    j.dy = <char *>cnp.PyArray_DATA(dy)
    j.dy_os = gd.os
    j.dy_cs = gd.cs
    if gd.nlev:
        memcpy(j.dy_ls, gd.ls, sizeof(j.dy_ls))


cdef inline int _elem_type(int t) noexcept:
    """The kernels' element type of a native float array of NumPy type t."""
    return BNF_F64 if t == cnp.NPY_FLOAT64 else BNF_F16 if t == cnp.NPY_FLOAT16 else BNF_F32


cdef inline void _set_type(Job *j, cnp.ndarray a) noexcept:
    j.type = _elem_type(cnp.PyArray_TYPE(a))
    j.isz = cnp.PyArray_ITEMSIZE(a)


cdef inline bint _same_order_contiguous(cnp.ndarray a, cnp.ndarray b) noexcept:
    """a and b contiguous with their elements in the same order in memory."""
    return (cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_IS_C_CONTIGUOUS(b)) or \
        (cnp.PyArray_IS_F_CONTIGUOUS(a) and cnp.PyArray_IS_F_CONTIGUOUS(b))


cdef inline bint _is_native_half(cnp.ndarray a) noexcept:
    return cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT16 and cnp.PyArray_ISNOTSWAPPED(a) and \
        cnp.PyArray_ISALIGNED(a)


cdef cnp.ndarray _half_to_float(cnp.ndarray a):
    """A float16 array as float32 (contiguous ones converted by bnf_half_to_float)."""
    cdef cnp.ndarray f
    if not (_is_native_half(a) and (cnp.PyArray_IS_C_CONTIGUOUS(a) or
                                    cnp.PyArray_IS_F_CONTIGUOUS(a))):
        return np.asarray(a, dtype=np.float32)
    f = np.empty_like(a, dtype=np.float32, subok=False)
    bnf_half_to_float(<const uint16_t *>cnp.PyArray_DATA(a), <float *>cnp.PyArray_DATA(f),
                      cnp.PyArray_SIZE(a))
    return f


def _half_to_float32(a):
    """float16 array -> float32 as the float16 inputs are read (tests)."""
    return _half_to_float(np.asarray(a, dtype=np.float16))


def _float32_to_half(a):
    """float32 array -> float16 as float16 results are written (tests)."""
    cdef cnp.ndarray src = np.ascontiguousarray(a, dtype=np.float32)
    cdef cnp.ndarray h = np.empty_like(src, dtype=np.float16)
    if not _float_into_half(h, src):
        raise AssertionError("contiguous arrays must convert in C")
    return h


cdef bint _float_into_half(cnp.ndarray dst, cnp.ndarray src) except -1:
    """dst[...] = src (float32 -> float16) by bnf_float_to_half when their layouts allow;
    False when they do not (nothing written)."""
    if not (cnp.PyArray_TYPE(src) == cnp.NPY_FLOAT32 and _is_native_half(dst) and
            cnp.PyArray_ISWRITEABLE(dst) and (<object>dst).shape == (<object>src).shape and
            _same_order_contiguous(dst, src)):
        return False
    bnf_float_to_half(<const float *>cnp.PyArray_DATA(src),
                      <uint16_t *>cnp.PyArray_DATA(dst), cnp.PyArray_SIZE(src))
    return True


cdef object _direct_out(object out, cnp.ndarray a, object result_dtype):
    """`out` where the kernels may write into it: when the result has the type they
    compute in (x's own, or the float64 that integers are computed in), else None (a
    temporary that _finish converts into out). An integer x with a float64 out had
    taken a full-size temporary beside the conversion."""
    if out is not None and not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>out):
        return None         # the other byte order: converted into on the copy (_finish)
    if result_dtype is None:
        return out
    if isinstance(out, np.ndarray) and result_dtype == a.dtype and \
            cnp.PyArray_TYPE(<cnp.ndarray>out) == cnp.PyArray_TYPE(a) and \
            (<cnp.ndarray>out).dtype.isnative:
        return out
    return None


cdef object _finish(object out, cnp.ndarray y, object result_dtype):
    """Deliver y: into the caller's `out` (copy when y is a temporary) or converted to
    the result dtype (float16 inputs)."""
    cdef cnp.ndarray h
    if out is not None:
        if out is not y and not (isinstance(out, np.ndarray) and
                                 _float_into_half(<cnp.ndarray>out, y)):
            _copy_tiled(out, y, 'unsafe')
        return out
    if result_dtype is not None and y.dtype != result_dtype:
        if result_dtype == np.float16 and cnp.PyArray_TYPE(y) == cnp.NPY_FLOAT32:
            h = np.empty_like(y, dtype=np.float16, subok=False)
            if _float_into_half(h, y):
                return h
        return y.astype(result_dtype)
    return y


cdef inline Py_ssize_t _elems(const Job *j) noexcept:
    return j.outer * j.C * j.inner


cdef inline int _streams(const Job *j, _Layout lay, object out, cnp.ndarray y,
                         Py_ssize_t itemsize):
    """Streaming stores for a large output the caller handed over, or one whose memory
    a freed output held (src/bnfast_outcache.h). Not for fresh memory: its pages are
    zeroed in cache by the first touch, and streaming then evicts them (measured 1.45x
    slower on a 51 MB eval)."""
    return (y is out or lay.recycled) and _elems(j) * itemsize >= _stream_bytes


cdef extern from "Python.h":
    int PyTraceMalloc_Track(unsigned int domain, size_t ptr, size_t size) nogil
    int PyTraceMalloc_Untrack(unsigned int domain, size_t ptr) nogil

# Every buffer bnfast allocates goes through _alloc (64-byte aligned) or _malloc (plain:
# cheaper on small calls, for what needs no alignment), freed by _free or _mfree. They
# report it to tracemalloc (as NumPy does its data) so that tests/test_memory.py sees
# bnfast's own scratch, not only NumPy's arrays: a full-size temporary in C would fail
# them too. When tracemalloc is not tracing, the calls return at once (they may be made
# without the GIL).
DEF TRACE_DOMAIN = 0x626E66      # "bnf"


cdef inline void *_traced(void *p, size_t bytes) noexcept nogil:
    if p != NULL:
        PyTraceMalloc_Track(TRACE_DOMAIN, <size_t>p, bytes)
    return p


cdef inline void *_untraced(void *p) noexcept nogil:
    if p != NULL:
        PyTraceMalloc_Untrack(TRACE_DOMAIN, <size_t>p)
    return p


cdef inline void *_alloc(size_t bytes) noexcept nogil:
    return _traced(bnf_alloc64(bytes), bytes)       # NULL when out of memory


cdef inline void _free(void *p) noexcept nogil:
    bnf_free64(_untraced(p))


cdef inline void *_malloc(size_t bytes) noexcept nogil:
    return _traced(malloc(bytes), bytes)


cdef inline void _mfree(void *p) noexcept nogil:
    free(_untraced(p))


cdef size_t _bytes_for(Py_ssize_t n, Py_ssize_t k, size_t size) except 0:
    """n * k items of `size` bytes (+ 1: never 0), or MemoryError where that passes what
    can be addressed (a channel count from a broadcast or empty x: 2**59 + 1 channels
    times 32 bytes wrapped to 32 bytes, and the parameters were written past them)."""
    cdef size_t limit = (<size_t>PY_SSIZE_T_MAX - 1) // size
    if n < 0 or k < 0 or (k > 0 and <size_t>n > limit // <size_t>k):
        raise MemoryError(f"{n} x {k} items of {size} bytes are more than can be "
                          f"addressed")
    return <size_t>n * <size_t>k * size + 1


cdef double *_alloc_channels(Py_ssize_t C, int count) except NULL:
    """count arrays of C doubles, 64-byte aligned (so each is when C is a multiple of 8,
    as the rows kernels want them); free with _free."""
    cdef double *p = <double *>_alloc(_bytes_for(C if C > 0 else 1, count,
                                                 sizeof(double)))
    if p == NULL:
        raise MemoryError()
    return p


cdef inline void _channel_arrays(Job *j, double *buf, Py_ssize_t C) noexcept:
    j.hi = buf
    j.lo = buf + C
    j.scale = buf + 2 * C
    j.shift = buf + 3 * C
    j.weight = buf + 4 * C
    j.invstd = buf + 5 * C
    j.k1 = buf + 6 * C
    j.k2 = buf + 7 * C


# ----------------------------------------------------------------------------------
# Eval normalization: shared by batch_norm(training=False) and FrozenBatchNorm.

cdef object _normalize(object x, object out, int axis_in, Py_ssize_t C_expected,
                       const double *mean, const double *scale, const double *shift):
    """y = (x - mean) * scale + shift per channel."""
    cdef object result_dtype = None
    cdef cnp.ndarray a
    if _is_native_float(x):
        a = <cnp.ndarray>x
    else:
        a, result_dtype = _as_input(x, "x")
    cdef int nd = cnp.PyArray_NDIM(a)
    cdef int axis
    cdef Job j
    cdef Geo gx, gy
    cdef _Layout lay
    cdef cnp.ndarray y
    if nd < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {np.shape(x)}")
    axis = _norm_axis(axis_in, nd)
    if cnp.PyArray_DIMS(a)[axis] != C_expected:
        raise ValueError(f"x has {cnp.PyArray_DIMS(a)[axis]} channels on axis {axis_in}, "
                         f"expected {C_expected}")
    if out is not None:
        _check_out(out, a, result_dtype if result_dtype is not None else a.dtype, "out")
    lay = _Layout()
    a = lay.fit_input(a, axis, True)
    o = _direct_out(out, a, result_dtype)
    memset(&j, 0, sizeof(Job))
    if _joint_layout(o, lay, a, None, &gx, NULL, &gy) is not None:
        y = o                              # written in place, in out's rows
        _set_geo(&j, &gx)
    else:
        y = lay.output(o, a, (a,), &gy)
        _set_geo(&j, &lay.gx)
    _set_type(&j, a)
    j.x = <char *>cnp.PyArray_DATA(a)
    _set_y(&j, y, &gy)
    j.hi = <double *>mean
    j.scale = <double *>scale
    j.shift = <double *>shift
    if _elems(&j) > 0:
        _plan(&j, cnp.PyArray_ITEMSIZE(a), 1, True)
        j.stream = _streams(&j, lay, out, y, cnp.PyArray_ITEMSIZE(a))
        _launch(&j, K_NORM)
    return _finish(out, y, result_dtype)


@cython.embedsignature(False)
cdef class FrozenBatchNorm:
    """FrozenBatchNorm(mean, var, weight=None, bias=None, eps=1e-05, *, axis=1)
--

    Immutable inference-mode batch normalization: the low-latency path.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel, computed as
    ``(x - mean) * scale + bias`` in double precision with ``scale`` precomputed at
    construction, rounded once to x's dtype.

    Parameters
    ----------
    mean, var : array_like, shape (C,)
        Channel statistics (running mean and running variance); ``var >= 0``.
    weight, bias : array_like, shape (C,), optional
        Scale (default 1) and shift (default 0).
    eps : float, default 1e-5
        Added to the variance; must be > 0.
    axis : int, default 1
        The channel axis of the inputs (negative counts from the end).

    Raises
    ------
    ValueError
        Mismatched shapes, a negative variance, eps <= 0.
    TypeError
        Non-numeric parameters.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> f = bnfast.FrozenBatchNorm(np.zeros(3), np.ones(3), eps=1e-5, axis=-1)
    >>> f(np.ones((2, 3), np.float32)).round(3)
    array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32)
    """
    cdef double *buf
    cdef Py_ssize_t C
    cdef object _axis
    cdef int _axis_int
    cdef double _eps
    cdef readonly object mean, var, weight, bias

    def __cinit__(self):
        self.buf = NULL

    def __init__(self, mean, var, weight=None, bias=None, eps=1e-5, *, axis=1):
        cdef Py_ssize_t C
        cdef double e = _check_eps(eps)
        cdef double *b
        if self.buf != NULL:
            # immutable: a second __init__ would change it under a call in another thread
            raise TypeError("FrozenBatchNorm is immutable: __init__ cannot run again")
        m = _param_vector(mean, "mean", -1)
        C = m.shape[0]
        if C < 1:
            raise ValueError("mean must have at least one channel")
        v = _param_vector(var, "var", C)
        w = None if weight is None else _param_vector(weight, "weight", C)
        bb = None if bias is None else _param_vector(bias, "bias", C)
        # NaN too: a frozen layer built from diverged statistics would answer NaN forever
        bad = np.flatnonzero(~(v >= 0))
        if bad.size:
            raise ValueError(f"var must be non-negative (not NaN); channel {bad[0]} has "
                             f"{v[bad[0]]!r}")
        bad = np.flatnonzero(~np.isfinite(m))      # as RunningStats.freeze: NaN or inf
        if bad.size:
            raise ValueError(f"mean must be finite; channel {bad[0]} has {m[bad[0]]!r}")
        axis_int = _index(axis, "axis")
        if not -2**31 <= axis_int < 2**31:
            raise ValueError(f"axis {axis} is out of range")
        # buf layout [C each]: mean (hi), zeros (lo), scale, shift
        self.buf = _alloc_channels(C, 4)
        b = self.buf
        _load_param(m, C, "mean", b, 0.0)
        _load_param(v, C, "var", b + C, 1.0)
        _load_param(w, C, "weight", b + 2 * C, 1.0)
        _load_param(bb, C, "bias", b + 3 * C, 0.0)
        bnf_eval_scale(b + 2 * C, b + C, C, e)      # the same factors as batch_norm's eval
        memset(b + C, 0, C * sizeof(double))
        self.C = C
        self._axis = axis_int
        self._axis_int = axis_int
        self._eps = e
        self.mean, self.var, self.weight, self.bias = m, v, w, bb

    def __dealloc__(self):
        _free(self.buf)

    @property
    def eps(self):
        return self._eps

    @property
    def axis(self):
        return self._axis

    @property
    def num_features(self):
        return self.C

    def __call__(self, x, *, out=None):
        """Normalize x with the frozen statistics.

        Parameters
        ----------
        x : array_like
            Input with ``num_features`` channels on ``axis``; float32/float64 computed
            natively (a C-contiguous (rows, C) float array with channels last takes a
            serial fast path with no Python-level work).
        out : ndarray, keyword-only, optional
            Written and returned: x's shape and dtype; ``out=x`` is allowed.

        Returns
        -------
        y : ndarray

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> f = bnfast.FrozenBatchNorm(np.full(2, 100.0), np.full(2, 4.0), eps=1e-12, axis=-1)
        >>> x = np.array([[102.0, 98.0]], np.float32)
        >>> out = np.empty_like(x)
        >>> f(x, out=out) is out, out
        (True, array([[ 1., -1.]], dtype=float32))
        """
        cdef cnp.ndarray a, o
        cdef Py_ssize_t C = self.C, rows
        cdef int t, nd
        cdef double *b = self.buf
        # Fast path: a C-contiguous native float (rows, C) or (1, C, 1...) with channels
        # last in memory: one serial kernel call, no Python-level work.
        if cnp.PyArray_CheckExact(x):
            a = <cnp.ndarray>x
            nd = cnp.PyArray_NDIM(a)
            t = cnp.PyArray_TYPE(a)
            if nd == 2 and (t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64 or
                            t == cnp.NPY_FLOAT16) \
                    and (self._axis_int == 1 or self._axis_int == -1) \
                    and cnp.PyArray_DIMS(a)[1] == C and cnp.PyArray_IS_C_CONTIGUOUS(a) \
                    and cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_ISALIGNED(a) \
                    and cnp.PyArray_DIMS(a)[0] * C <= NOGIL_MIN_ELEMS:
                rows = cnp.PyArray_DIMS(a)[0]
                if out is None:
                    o = cnp.PyArray_EMPTY(2, cnp.PyArray_DIMS(a), t, 0)
                elif cnp.PyArray_CheckExact(out) and cnp.PyArray_TYPE(<cnp.ndarray>out) == t \
                        and cnp.PyArray_NDIM(<cnp.ndarray>out) == 2 \
                        and cnp.PyArray_DIMS(<cnp.ndarray>out)[0] == rows \
                        and cnp.PyArray_DIMS(<cnp.ndarray>out)[1] == C \
                        and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>out) \
                        and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out) \
                        and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>out) \
                        and cnp.PyArray_ISALIGNED(<cnp.ndarray>out) \
                        and (cnp.PyArray_DATA(<cnp.ndarray>out) == cnp.PyArray_DATA(a)
                             or not _may_overlap(a, <cnp.ndarray>out)):
                    o = <cnp.ndarray>out
                else:
                    return _normalize(x, out, self._axis_int, C, b, b + 2 * C, b + 3 * C)
                bnf_norm_rows(_elem_type(t), cnp.PyArray_DATA(a), C, cnp.PyArray_DATA(o), C,
                              rows, C, 1, b, b + 2 * C, b + 3 * C, BNF_CACHED)
                return o
        return _normalize(x, out, self._axis_int, C, b, b + 2 * C, b + 3 * C)

    def __reduce__(self):
        return (_rebuild_frozen, (self.mean, self.var, self.weight, self.bias, self._eps,
                                  self._axis))

    def __repr__(self):
        return (f"FrozenBatchNorm({self.C}, eps={self._eps}, axis={self._axis})")


cdef object _param_vector(object p, str name, Py_ssize_t C):
    """A read-only float64 copy of a per-channel parameter (C < 0: any length)."""
    if p is None:
        raise ValueError(f"{name} is required")
    if hasattr(p, "detach") and hasattr(p, "cpu"):       # a torch tensor
        p = _tensor_to_numpy(p)
    _refuse_masked(p, name)
    try:
        a = np.asarray(p)
    except Exception as e:
        raise TypeError(f"{name} must be a real array-like: {e}") from None
    if a.dtype.kind not in 'fiub':
        raise TypeError(f"{name} must have a real numeric dtype, got {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if C >= 0 and a.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},), got {a.shape}")
    # over an immutable bytes object: neither it nor a view of it can be set back to
    # writable (an array owning its data can, and through a view's .base so could its)
    return np.frombuffer(np.asarray(a, dtype=np.float64).tobytes(), dtype=np.float64)


def _rebuild_frozen(mean, var, weight, bias, eps, axis):
    return FrozenBatchNorm(mean, var, weight, bias, eps, axis=axis)


# ----------------------------------------------------------------------------------
# Functional API

def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """Batch normalization, with the argument order of ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : array_like, ndim >= 2
        Input; float32, float64 and float16 are read as they are (float16 computed as
        float32 data are), integers and bools are converted to float64. The output has
        x's (float) dtype.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics. Required when ``training`` is False. When ``training`` is
        True and they are given, they are updated in place (they must then be writable
        float arrays): ``new = (1 - momentum) * old + momentum * batch``, with the
        unbiased batch variance.
    weight, bias : array_like of shape (C,), optional
        gamma (default 1) and beta (default 0).
    training : bool
        Normalize with the batch statistics (True) or the running ones (False).
    momentum : float in [0, 1]
    eps : float > 0
    axis : int, keyword-only, default 1
        The channel axis: 1 for NC, NCL, NCHW, NCDHW; -1 for channels-last and
        (samples, features) matrices.
    out : ndarray, keyword-only, optional
        Written and returned; same shape as x, x's dtype. ``out=x`` is allowed.

    Returns
    -------
    y : ndarray, shape of x

    Raises
    ------
    ValueError
        Bad shapes, eps <= 0, momentum outside [0, 1], a negative running variance,
        missing running statistics in eval, one value per channel in training.
    TypeError
        Non-real dtypes, an ``out`` of the wrong dtype.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> bnfast.batch_norm(x, np.zeros(2), np.ones(2), training=True, eps=1e-12, axis=-1)
    array([[-1., -1.],
           [ 1.,  1.]])
    """
    if _check_bool(training, "training"):
        return batch_norm_train(x, weight, bias, eps=eps, axis=axis,
                                running_mean=running_mean, running_var=running_var,
                                momentum=momentum, out=out)[0]
    cdef double e = _check_eps(eps)
    _check_momentum(momentum)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    cdef Py_ssize_t C, c
    cdef int nd, ax
    cdef double stackbuf[4 * 64]
    cdef double *buf
    cdef cnp.ndarray a
    # channel count from x without converting it yet
    if cnp.PyArray_Check(x):
        a = <cnp.ndarray>x
    else:
        a = <cnp.ndarray>_as_input(x, "x")[0]     # conversion errors name x
    nd = cnp.PyArray_NDIM(a)
    if nd < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {(<object>a).shape}")
    ax = _norm_axis(axis, nd)
    C = cnp.PyArray_DIMS(a)[ax]
    if C <= 64:
        buf = &stackbuf[0]
    else:
        buf = _alloc_channels(C, 4)
    try:
        # layout: mean, var, scale (weight first), shift
        _load_param(running_mean, C, "running_mean", buf, 0.0)
        _load_param(running_var, C, "running_var", buf + C, 1.0)
        _load_param(weight, C, "weight", buf + 2 * C, 1.0)
        _load_param(bias, C, "bias", buf + 3 * C, 0.0)
        c = bnf_eval_scale(buf + 2 * C, buf + C, C, e)
        if c >= 0:
            raise ValueError(f"running_var must be non-negative; channel {c} has "
                             f"{buf[C + c]!r}")
        return _normalize(a, out, ax, C, buf, buf + 2 * C, buf + 3 * C)
    finally:
        if buf != &stackbuf[0]:
            _free(buf)


cdef int _check_apart(object a, str aname, object b, str bname) except -1:
    """a and b (ndarrays or None) must not share memory where one is written after the
    other (running_mean and running_var are each updated in place; y is written before
    them): the same array given twice made one write overwrite the other, silently. A
    bounds test on the raw arrays, np.shares_memory only where the bounds meet
    (interleaved views do not share)."""
    if a is None or b is None:
        return 0
    if _may_overlap(<cnp.ndarray>a, <cnp.ndarray>b) and np.shares_memory(a, b):
        raise ValueError(f"{aname} and {bname} share memory, and each is written in "
                         f"place: pass separate arrays")
    return 0


cdef int _check_running(object r, Py_ssize_t C, str name, bint nonneg=False) except -1:
    """A running statistic updated in place: a writable float ndarray of shape (C,);
    `nonneg`: no negative entry (a variance). Native float32/float64 arrays are checked
    on the raw array (this is on the per-step path of small layers)."""
    cdef cnp.ndarray a
    cdef Py_ssize_t i, st
    cdef char *p
    cdef int t
    if r is None:
        return 0
    if cnp.PyArray_CheckExact(r):
        a = <cnp.ndarray>r
        t = cnp.PyArray_TYPE(a)
        if (t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64 or t == cnp.NPY_FLOAT16) and \
                cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIMS(a)[0] == C and \
                cnp.PyArray_ISWRITEABLE(a) and cnp.PyArray_ISNOTSWAPPED(a) and \
                cnp.PyArray_ISALIGNED(a):
            if not nonneg:
                return 0
            p = <char *>cnp.PyArray_DATA(a)
            st = cnp.PyArray_STRIDES(a)[0]
            for i in range(C):
                if (t == cnp.NPY_FLOAT32 and (<float *>(p + i * st))[0] < 0) or \
                        (t == cnp.NPY_FLOAT64 and (<double *>(p + i * st))[0] < 0) or \
                        (t == cnp.NPY_FLOAT16 and
                         bnf_half_to_double((<uint16_t *>(p + i * st))[0]) < 0):
                    raise ValueError(f"{name} must be non-negative; channel {i} has "
                                     f"{r[i]!r}")
            return 0
    if not isinstance(r, np.ndarray):
        raise TypeError(f"{name} must be a writable float numpy.ndarray of shape ({C},) "
                        f"to be updated in training, got {type(r).__name__}")
    _refuse_masked(r, name)
    if r.dtype.kind != 'f':
        raise TypeError(f"{name} must have a float dtype to be updated, got {r.dtype}")
    if r.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match the {C} channels "
                         f"of the input, got {r.shape}")
    if not r.flags.writeable:
        raise ValueError(f"{name} is read-only, but training updates it in place")
    if nonneg:
        neg = np.flatnonzero(r < 0)
        if neg.size:
            raise ValueError(f"{name} must be non-negative; channel {neg[0]} has "
                             f"{r[neg[0]]!r}")
    return 0


def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                     running_var=None, momentum=0.1, out=None):
    """Training-mode batch normalization that also returns the batch statistics.

    Parameters
    ----------
    x : array_like, ndim >= 2
        As in :func:`batch_norm`.
    weight, bias : array_like of shape (C,), optional
    eps : float > 0
    axis : int, default 1
    running_mean, running_var : ndarray of shape (C,), optional
        Updated in place when given (biased batch mean, unbiased batch variance); two
        arrays that do not share memory (ValueError otherwise).
    momentum : float in [0, 1]
    out : ndarray, optional

    Returns
    -------
    y : ndarray, shape and dtype of x
    mean : ndarray of float64, shape (C,)
        Batch mean per channel (float64 whatever x's dtype, so backward keeps the
        offset of price-like data).
    invstd : ndarray of float64, shape (C,)
        ``1 / sqrt(var + eps)`` with the biased batch variance.

    Raises
    ------
    ValueError
        One value per channel, an empty batch, bad shapes or arguments.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> y, mean, invstd = bnfast.batch_norm_train(np.array([[1.0], [3.0]]), eps=1e-12)
    >>> y.ravel(), mean, invstd
    (array([-1.,  1.]), array([2.]), array([1.]))
    """
    return _train(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
                  True)


def _train(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
           bint unbiased_running_var, moments_hook=None):
    """batch_norm_train, with the choice of the variance that updates running_var
    (unbiased like PyTorch, or biased like Keras).

    moments_hook: the batch spans several processes. moments_hook(local) gets this
    process's per-channel moments as a (C, 4) float64 array of [count, mean_hi, mean_lo,
    m2] and returns the merged moments of the whole batch in the same form; they
    normalize x and update the running statistics. x may then be empty."""
    cdef double e = _check_eps(eps)
    cdef double mom = _check_momentum(momentum)
    cdef object result_dtype
    cdef cnp.ndarray a
    a, result_dtype = _as_input(x, "x")
    cdef int nd = cnp.PyArray_NDIM(a), axis_i
    cdef Py_ssize_t C, c, n_per
    cdef Job j
    cdef Geo gy, gxj
    cdef _Layout lay, joint
    cdef cnp.ndarray y, mean_out, invstd_out
    cdef double *buf = NULL
    cdef double *bias_buf
    cdef bnf_moments m
    cdef double n, var
    cdef cnp.npy_intp dimC
    if nd < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {np.shape(x)}")
    axis_i = _norm_axis(axis, nd)
    C = cnp.PyArray_DIMS(a)[axis_i]
    n_per = cnp.PyArray_SIZE(a) // C if C > 0 else 0
    if C > 0 and n_per == 0 and moments_hook is None:
        raise ValueError(f"x has an empty batch {(<object>a).shape}; training needs more than "
                         f"1 value per channel")
    if C > 0 and n_per <= 1 and moments_hook is None:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {(<object>a).shape}")
    if (running_mean is None) != (running_var is None):
        # one of them alone was updated (PyTorch's check and message)
        raise ValueError("running_mean and running_var must either both be None or "
                         "neither be None")
    _check_running(running_mean, C, "running_mean")
    _check_running(running_var, C, "running_var", True)
    _check_apart(running_mean, "running_mean", running_var, "running_var")
    if out is not None:
        _check_out(out, a, result_dtype if result_dtype is not None else a.dtype, "out")
        _check_apart(out, "out", running_mean, "running_mean")
        _check_apart(out, "out", running_var, "running_var")
    buf = _alloc_channels(C, 9)
    try:
        memset(&j, 0, sizeof(Job))
        _channel_arrays(&j, buf, C)
        bias_buf = buf + 8 * C
        _load_param(weight, C, "weight", j.weight, 1.0)
        _load_param(bias, C, "bias", bias_buf, 0.0)
        j.shift = bias_buf
        lay = _Layout()
        a = lay.fit_input(a, axis_i)
        o = _direct_out(out, a, result_dtype)
        joint = _joint_layout(o, lay, a, None, &gxj, NULL, &gy)
        _set_geo(&j, &lay.gx)
        _set_type(&j, a)
        j.eps = e
        j.x = <char *>cnp.PyArray_DATA(a)
        if joint is None:
            y = lay.output(o, a, (a,), &gy)
            _set_y(&j, y, &gy)
        else:
            # out in rows of its own: the statistics planned as for an output in x's
            # layout (their units, so their bits, those of a call without out), then
            # the normalization in out's rows (_launch_joint)
            y = o
            j.y, j.y_os, j.y_cs = j.x, j.x_os, j.x_cs
            memcpy(j.y_ls, j.x_ls, sizeof(j.y_ls))
        _plan(&j, cnp.PyArray_ITEMSIZE(a), 1, False, moments_hook is None)
        j.stream = _streams(&j, lay, out, y, cnp.PyArray_ITEMSIZE(a))
        j.mom = <bnf_moments *>_malloc(_bytes_for(C, j.nsb, sizeof(bnf_moments)))
        if j.mom == NULL:
            raise MemoryError()
        try:
            if _fuses(&j, 1) and moments_hook is None and joint is None:
                _launch(&j, K_FWD)
            else:
                _stats(&j)
                if moments_hook is not None:
                    n_per = _exchange_moments(j.mom, C, moments_hook)
                _finalize(&j, 0, C, j.mom)
                # the last units the statistics read are the likeliest still in cache
                j.reverse = 1
                if joint is None:
                    _launch(&j, K_NORM)
                else:
                    _launch_joint(&j, K_NORM, a, &gxj, None, NULL, y, &gy)
        finally:
            _mfree(j.mom)
        dimC = C
        mean_out = cnp.PyArray_EMPTY(1, &dimC, cnp.NPY_FLOAT64, 0)
        invstd_out = cnp.PyArray_EMPTY(1, &dimC, cnp.NPY_FLOAT64, 0)
        n = <double>n_per
        # mean, invstd, and the variance for the running update (into k2): unbiased
        # (PyTorch) or biased (Keras)
        bnf_train_outputs(C, n, unbiased_running_var, j.hi, j.lo, j.invstd, j.k1,
                          <double *>cnp.PyArray_DATA(mean_out),
                          <double *>cnp.PyArray_DATA(invstd_out), j.k2)
        if running_mean is not None:
            _update_running(running_mean, <double *>cnp.PyArray_DATA(mean_out), mom)
        if running_var is not None:
            _update_running(running_var, j.k2, mom)
        return _finish(out, y, result_dtype), mean_out, invstd_out
    finally:
        _free(buf)


cdef int _stats(Job *j) except -1:
    """Moments of every unit into j.mom, merged per channel into j.mom[0:C] in a fixed
    order (the statistics pass without the normalization); m2 compensated over the
    units (a (100352, 64) float64 variance 3.4 ulps off plainly, 0.6 so)."""
    memset(j.mom, 0, j.nsb * j.C * sizeof(bnf_moments))
    _full_rows(j, True, False)
    _launch(j, K_STATS)
    if j.nsb > 1:
        bnf_merge_unit_moments(j.mom, j.C, j.nsb)
    return 0


def _moments(x, axis):
    """Per-channel moments of x (the statistics pass of batch_norm_train alone, same
    kernels and unit order) as a (C, 4) float64 array of [count, mean_hi, mean_lo, m2]."""
    cdef cnp.ndarray a
    a, _ = _as_input(x, "x")
    cdef int nd = cnp.PyArray_NDIM(a), axis_i
    cdef Py_ssize_t C
    cdef Job j
    cdef _Layout lay
    if nd < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {np.shape(x)}")
    axis_i = _norm_axis(axis, nd)
    C = cnp.PyArray_DIMS(a)[axis_i]
    memset(&j, 0, sizeof(Job))
    lay = _Layout()
    a = lay.fit_input(a, axis_i)
    _set_geo(&j, &lay.gx)
    _set_type(&j, a)
    j.x = <char *>cnp.PyArray_DATA(a)
    _plan(&j, cnp.PyArray_ITEMSIZE(a), 1)
    j.mom = <bnf_moments *>_malloc(_bytes_for(C, j.nsb, sizeof(bnf_moments)))
    if j.mom == NULL:
        raise MemoryError()
    try:
        _stats(&j)
        return _moments_array(j.mom, C)
    finally:
        _mfree(j.mom)


cdef tuple _new_vecs(Py_ssize_t C, double **data, int k):
    """k fresh float64 (C,) arrays, as a tuple; data[i] the first element of the i-th."""
    cdef cnp.npy_intp dim = C
    cdef cnp.ndarray a
    cdef list out = []
    for i in range(k):
        a = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_FLOAT64, 0)
        data[i] = <double *>cnp.PyArray_DATA(a)
        out.append(a)
    return tuple(out)


def _eval_invstd(var, eps):
    """1 / sqrt(var + eps) per channel, in double, as a float64 array (the layer's
    backward in eval mode: in NumPy, with the conversion of var, ~1.5 us of a 3.7 us
    call on (32, 64)). eps and var are checked as the forward checks them (an eps or a
    variance set wrong by hand gave a NaN gradient where the forward raised); a negative
    variance is refused, a NaN passes (as in the forward, bnf_eval_scale)."""
    cdef double e = _check_eps(eps)
    cdef cnp.ndarray v = np.asarray(var)
    cdef Py_ssize_t c, C, st
    cdef const char *p
    cdef double *o[1]
    cdef tuple out
    cdef double d
    cdef int t = cnp.PyArray_TYPE(v)
    if (t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or not cnp.PyArray_ISNOTSWAPPED(v) \
            or not cnp.PyArray_ISALIGNED(v) or cnp.PyArray_NDIM(v) != 1:
        v = np.ascontiguousarray(v, np.float64)
        if cnp.PyArray_NDIM(v) != 1:
            return 1.0 / np.sqrt(v + e)
        t = cnp.NPY_FLOAT64
    C = cnp.PyArray_DIMS(v)[0]
    st = cnp.PyArray_STRIDES(v)[0]
    p = <const char *>cnp.PyArray_DATA(v)
    out = _new_vecs(C, o, 1)
    for c in range(C):
        d = (<const float *>(p + c * st))[0] if t == cnp.NPY_FLOAT32 else \
            (<const double *>(p + c * st))[0]
        if d < 0.0:
            raise ValueError(f"running_var must be non-negative; channel {c} has {d!r}")
        o[0][c] = 1.0 / sqrt(d + e)
    return out[0]


def _moments_parts(x, axis):
    """_moments finished for Moments: (count, mean, m2, mean_lo, m2_lo = 0) as fresh
    float64 (C,) arrays, the mean's two parts renormalized (TwoSum; a low part that is
    not finite becomes 0). In C: the same in NumPy cost ~3 us of a small call."""
    cdef cnp.ndarray t = _moments(x, axis)
    cdef Py_ssize_t c, C = cnp.PyArray_DIMS(t)[0]
    cdef const double *p = <double *>cnp.PyArray_DATA(t)
    cdef double *o[5]                   # count, mean, m2, mean_lo, m2_lo
    cdef tuple out = _new_vecs(C, o, 5)
    cdef double e
    for c in range(C):
        o[0][c] = p[4 * c]
        _two_sum_to(p[4 * c + 1], p[4 * c + 2], &o[1][c], &e)
        o[2][c] = p[4 * c + 3]
        o[3][c] = e if e - e == 0 else 0.0
        o[4][c] = 0.0
    return out


def _frozen_f64(*arrays):
    """Moments' arrays as native contiguous float64 (a pickle of protocol 5 from a
    big-endian machine keeps '>f8', which the merges' C loops would read as garbage),
    each with its WRITEABLE flag cleared: a tuple. Through the C API: `a.flags.writeable
    = False` cost ~250 ns an array, a fifth of a small merge."""
    cdef list out = []
    for a in arrays:
        if not (cnp.PyArray_CheckExact(a) and
                cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.NPY_FLOAT64 and
                cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a) and
                cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)):
            a = np.array(a, dtype=np.float64, order="C")      # native, a copy
        cnp.PyArray_CLEARFLAGS(<cnp.ndarray>a, cnp.NPY_ARRAY_WRITEABLE)
        out.append(a)
    return tuple(out)


cdef inline void _two_sum_to(double a, double b, double *s, double *e) noexcept nogil:
    """s = fl(a + b), e its rounding error: s + e == a + b exactly (Knuth's TwoSum)."""
    cdef double t = a + b, bb = t - a
    s[0] = t
    e[0] = (a - (t - bb)) + (b - bb)


cdef inline double *_vec(cnp.ndarray a, Py_ssize_t C, str name) except NULL:
    if cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT64 or cnp.PyArray_NDIM(a) != 1 or \
            cnp.PyArray_DIMS(a)[0] != C or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name}: a contiguous float64 ({C},) array is required")
    return <double *>cnp.PyArray_DATA(a)


def _merge_moment_arrays(cnp.ndarray na_ not None, cnp.ndarray am_ not None,
                         cnp.ndarray alo_ not None, cnp.ndarray am2_ not None,
                         cnp.ndarray am2lo_ not None, cnp.ndarray nb_ not None,
                         cnp.ndarray bm_ not None, cnp.ndarray blo_ not None,
                         cnp.ndarray bm2_ not None, cnp.ndarray bm2lo_ not None):
    """merge_moments of parts a and b given as their float64 (C,) arrays (count, mean,
    mean_lo, m2, m2_lo); returns the union's (count, mean, m2, mean_lo, m2_lo), fresh.
    Chan's update based on the larger part (ties: the smaller mean), so that it is
    commutative exactly; m2 compensated (plainly where that overflows); either part
    empty: the other unchanged; a part's mean not finite (data holding an infinity or a
    NaN): the sum of the parts' means, as np.mean gives (the infinity, or NaN where +inf
    and -inf meet; Chan's update made inf - inf of it), and m2 NaN, as np.var gives. The
    loop in C: in NumPy a merge of 64 channels cost ~30 us, a RunningStats update of one
    row ~38 us."""
    # (a 0-d count has no first dimension: _vec refuses it)
    cdef Py_ssize_t c, C = cnp.PyArray_DIMS(na_)[0] if cnp.PyArray_NDIM(na_) == 1 else -1
    cdef const double *na = _vec(na_, C, "count")
    cdef const double *am = _vec(am_, C, "mean")
    cdef const double *alo = _vec(alo_, C, "mean_lo")
    cdef const double *am2 = _vec(am2_, C, "m2")
    cdef const double *am2lo = _vec(am2lo_, C, "m2_lo")
    cdef const double *nb = _vec(nb_, C, "count")
    cdef const double *bm = _vec(bm_, C, "mean")
    cdef const double *blo = _vec(blo_, C, "mean_lo")
    cdef const double *bm2 = _vec(bm2_, C, "m2")
    cdef const double *bm2lo = _vec(bm2lo_, C, "m2_lo")
    cdef double *o[5]                   # count, mean, m2, mean_lo, m2_lo
    cdef tuple out = _new_vecs(C, o, 5)
    cdef double n, h1, l1, h0, l0, n0, delta, mean, lo, shift, m2, e1, e2, m2lo
    cdef double mean_a, mean_b
    for c in range(C):
        n = na[c] + nb[c]
        if nb[c] > na[c] or (nb[c] == na[c] and (bm[c] < am[c] or
                                                (bm[c] == am[c] and blo[c] < alo[c]))):
            h1, l1, h0, l0, n0 = bm[c], blo[c], am[c], alo[c], na[c]
        else:
            h1, l1, h0, l0, n0 = am[c], alo[c], bm[c], blo[c], nb[c]
        delta = (h0 - h1) + (l0 - l1)
        _two_sum_to(h1, l1 + delta * (n0 / n), &mean, &lo)
        shift = delta * delta * ((na[c] * nb[c]) / n)
        _two_sum_to(am2[c], bm2[c], &m2, &e1)
        _two_sum_to(m2, shift, &m2, &e2)
        _two_sum_to(m2, ((am2lo[c] + bm2lo[c]) + e1) + e2, &m2, &m2lo)
        if not m2lo - m2lo == 0:                   # inf - inf in TwoSum: plainly
            m2 = (am2[c] + bm2[c]) + shift
            m2lo = 0.0
        mean_a = am[c] + alo[c]
        mean_b = bm[c] + blo[c]
        if not (mean_a - mean_a == 0 and mean_b - mean_b == 0):
            mean, lo, m2, m2lo = mean_a + mean_b, 0.0, NAN, 0.0
        if na[c] == 0:
            mean, lo, m2, m2lo = bm[c], blo[c], bm2[c], bm2lo[c]
        elif nb[c] == 0:
            mean, lo, m2, m2lo = am[c], alo[c], am2[c], am2lo[c]
        o[0][c] = n
        o[1][c] = mean
        o[2][c] = m2
        o[3][c] = lo if lo - lo == 0 else 0.0
        o[4][c] = m2lo
    return out


def _merge_packed_rows(cnp.ndarray rows):
    """Moments packed one part a row as [count(C), mean(C), mean_lo(C), m2(C)] (the
    distributed layer's allgather: every rank computes the same from the same rows),
    merged: (count, mean, m2, mean_lo, m2_lo = 0), fresh float64 (C,) arrays. Each
    part's mean is taken relative to a pivot (the first non-empty part's, per channel),
    as a pairwise merge would, and the shifts are summed in row order; where a part's
    mean is not finite, the parts' means summed in row order and m2 NaN (as
    _merge_moment_arrays). In C: in NumPy one rank's merge of 64 channels cost ~22 us."""
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    if cnp.PyArray_NDIM(rows) != 2 or cnp.PyArray_DIMS(rows)[1] % 4:
        raise ValueError(f"rows must be (parts, 4 * C), got shape {(<object>rows).shape}")
    cdef Py_ssize_t P = cnp.PyArray_DIMS(rows)[0], W = cnp.PyArray_DIMS(rows)[1]
    cdef Py_ssize_t C = W // 4, r, c, f
    cdef const double *q = <double *>cnp.PyArray_DATA(rows)
    cdef double *o[5]                   # count, mean, m2, mean_lo, m2_lo
    cdef tuple out = _new_vecs(C, o, 5)
    cdef double N, kh, kl, n, d, D, e, s_m2, s_nee, mean, mlo, part, plain
    cdef bint finite
    for c in range(C):
        if P == 0:
            N = 0
        else:
            N = q[c]
            for r in range(1, P):
                N = N + q[r * W + c]
        f = 0
        for r in range(P):
            if q[r * W + c] > 0:
                f = r
                break
        o[0][c], o[4][c] = N, 0.0
        if N == 0 or P == 0:
            o[1][c], o[2][c], o[3][c] = NAN, 0.0, 0.0
            continue
        kh = q[f * W + C + c]
        kl = q[f * W + 2 * C + c]
        D = 0.0
        s_m2 = 0.0
        s_nee = 0.0
        plain = 0.0
        finite = True
        for r in range(P):                        # part mean - pivot, weighted
            n = q[r * W + c]
            if n > 0:
                part = q[r * W + C + c] + q[r * W + 2 * C + c]
                plain = part if r == f else plain + part
                finite = finite and part - part == 0
            d = (q[r * W + C + c] - kh) + (q[r * W + 2 * C + c] - kl) if n > 0 else 0.0
            D = n * d if r == 0 else D + n * d
        D = D / N                                 # global mean - pivot
        for r in range(P):
            n = q[r * W + c]
            d = (q[r * W + C + c] - kh) + (q[r * W + 2 * C + c] - kl) if n > 0 else 0.0
            e = d - D if n > 0 else 0.0
            s_m2 = q[r * W + 3 * C + c] if r == 0 else s_m2 + q[r * W + 3 * C + c]
            s_nee = n * e * e if r == 0 else s_nee + n * e * e
        _two_sum_to(kh, kl + D, &mean, &mlo)
        if not finite:                            # an infinity or a NaN: np.mean's
            o[1][c], o[2][c], o[3][c] = plain, NAN, 0.0
            continue
        o[1][c] = mean
        o[2][c] = s_m2 + s_nee
        o[3][c] = mlo if mlo - mlo == 0 else 0.0
    return out


cdef cnp.ndarray _moments_array(const bnf_moments *mom, Py_ssize_t C):
    """mom[0:C] as a (C, 4) float64 array of [count, mean_hi, mean_lo, m2]."""
    cdef cnp.npy_intp dims[2]
    cdef Py_ssize_t c
    cdef double *p
    dims[0] = C
    dims[1] = 4
    cdef cnp.ndarray res = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
    p = <double *>cnp.PyArray_DATA(res)
    for c in range(C):
        p[4 * c] = mom[c].n
        p[4 * c + 1] = mom[c].hi
        p[4 * c + 2] = mom[c].lo
        p[4 * c + 3] = mom[c].m2
    return res


cdef Py_ssize_t _exchange_moments(bnf_moments *mom, Py_ssize_t C, object hook) except -1:
    """Replace mom[0:C] by hook(local moments as a (C, 4) array); the global count."""
    cdef Py_ssize_t c
    cdef double *p
    total = np.ascontiguousarray(hook(_moments_array(mom, C)), dtype=np.float64)
    if total.shape != (C, 4):
        raise ValueError(f"moments_hook must return a ({C}, 4) array, got {total.shape}")
    p = <double *>cnp.PyArray_DATA(total)
    for c in range(C):
        mom[c].n = p[4 * c]
        mom[c].hi = p[4 * c + 1]
        mom[c].lo = p[4 * c + 2]
        mom[c].m2 = p[4 * c + 3]
    if C > 0 and not mom[0].n > 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got "
                         f"{mom[0].n:.0f} over the whole batch")
    # every channel counts the same values, a whole number that a Py_ssize_t holds (a
    # hook's NaN or 1e300 cast to it was undefined behaviour)
    for c in range(C):
        if not (mom[c].n == mom[0].n and mom[c].n <= 9007199254740992.0 and
                mom[c].n == <double>(<long long>mom[c].n)):
            raise ValueError(f"moments_hook returned count {mom[c].n!r} for channel {c}: "
                             f"expected one whole count for every channel, got "
                             f"{mom[0].n!r} for channel 0")
    return <Py_ssize_t>mom[0].n


_F16 = np.dtype(np.float16)


cdef cnp.ndarray _params_from(const double *src, Py_ssize_t C, object dtype):
    """A new (C,) array of a parameter dtype holding src, rounded once (float16 as
    _vector_from; longdouble from the doubles)."""
    cdef int type_num = (<cnp.dtype>dtype).type_num
    if type_num in (cnp.NPY_FLOAT16, cnp.NPY_FLOAT32, cnp.NPY_FLOAT64):
        return _vector_from(src, C, type_num, None)
    return _vector_from(src, C, cnp.NPY_FLOAT64, dtype)


cdef cnp.ndarray _vector_from(const double *src, Py_ssize_t C, int type_num,
                              object result_dtype):
    """A new (C,) array of type_num (float16/32/64) holding src, rounded once (float16:
    to float32 and then to float16, as the kernels round); cast to result_dtype when that
    is another dtype."""
    cdef cnp.npy_intp dim = C
    if type_num == cnp.NPY_FLOAT16:
        type_num = cnp.NPY_FLOAT32
        if result_dtype is None:
            result_dtype = _F16
    cdef cnp.ndarray v = cnp.PyArray_EMPTY(1, &dim, type_num, 0)
    cdef cnp.ndarray h
    cdef Py_ssize_t c
    if type_num == cnp.NPY_FLOAT32:
        for c in range(C):
            (<float *>cnp.PyArray_DATA(v))[c] = <float>src[c]
    else:
        for c in range(C):
            (<double *>cnp.PyArray_DATA(v))[c] = src[c]
    if result_dtype is None:
        return v
    if result_dtype is _F16 and type_num == cnp.NPY_FLOAT32:
        # float16 by the kernels' conversion (NumPy's astype rounds the same: to nearest
        # even; it cost ~0.3 us of a small float16 call)
        h = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_FLOAT16, 0)
        bnf_float_to_half(<const float *>cnp.PyArray_DATA(v),
                          <uint16_t *>cnp.PyArray_DATA(h), C)
        return h
    if v.dtype != result_dtype:
        return v.astype(result_dtype)
    return v


cdef _update_running(cnp.ndarray r, const double *batch, double mom):
    """r = (1 - mom) * r + mom * batch, computed in double, rounded once."""
    cdef Py_ssize_t c, C = cnp.PyArray_DIMS(r)[0], st = cnp.PyArray_STRIDES(r)[0]
    cdef char *p = <char *>cnp.PyArray_DATA(r)
    cdef int t = cnp.PyArray_TYPE(r)
    if cnp.PyArray_ISNOTSWAPPED(r) and cnp.PyArray_ISALIGNED(r) and \
            (t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64 or t == cnp.NPY_FLOAT16):
        if t == cnp.NPY_FLOAT32:
            for c in range(C):
                (<float *>(p + c * st))[0] = <float>(
                    (1.0 - mom) * (<float *>(p + c * st))[0] + mom * batch[c])
        elif t == cnp.NPY_FLOAT16:      # rounded once, as NumPy's path (~6 us) rounded
            for c in range(C):
                (<uint16_t *>(p + c * st))[0] = bnf_double_to_half(
                    (1.0 - mom) * bnf_half_to_double((<uint16_t *>(p + c * st))[0]) +
                    mom * batch[c])
        else:
            for c in range(C):
                (<double *>(p + c * st))[0] = (
                    (1.0 - mom) * (<double *>(p + c * st))[0] + mom * batch[c])
        return
    cdef cnp.ndarray b = np.empty(C, np.float64)       # byte-swapped or unaligned r
    for c in range(C):
        (<double *>cnp.PyArray_DATA(b))[c] = batch[c]
    np.copyto(r, (1.0 - mom) * r.astype(np.float64) + mom * b, casting='unsafe')


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, axis=1,
                        out=None):
    """Gradients of batch normalization.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to the output; shape of x. A dy of a wider
        dtype than x's is not rounded to x's: the gradient is computed in dy's dtype
        (x widened, exactly) and rounded to x's at the end.
    x : array_like
        The forward input.
    mean, invstd : array_like of shape (C,)
        From :func:`batch_norm_train` (training), or the running mean and
        ``1 / sqrt(running_var + eps)`` (``training=False``). In training a ``mean``
        within about 4 ulps of x's batch mean (|Σ(x − mean)| / n ≤ 8.9e-16 |mean|) is
        taken as that batch mean, the part a double cannot hold recovered from the
        sums (the mean :func:`batch_norm_train` returns is such a rounding); any other
        mean (a float32 one from elsewhere) is used as given, as
        ``torch.ops.aten.native_batch_norm_backward`` does.
    weight : array_like of shape (C,), optional
    training : bool, default True
        True: the full gradient through the batch statistics. False: the statistics
        held fixed (eval mode).
    axis : int, default 1
    out : ndarray, optional
        Receives dx (shape and dtype of x); ``out=dy`` is allowed.

    Returns
    -------
    dx : ndarray, shape and dtype of x
    dweight, dbias : ndarray of shape (C,), x's dtype
        ``sum(dy * xhat)`` and ``sum(dy)`` per channel.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0], [3.0]])
    >>> y, m, s = bnfast.batch_norm_train(x, eps=1e-12)
    >>> dx, dw, db = bnfast.batch_norm_backward(np.array([[1.0], [1.0]]), x, m, s)
    >>> dx.ravel(), dw, db
    (array([0., 0.]), array([0.]), array([2.]))
    """
    return _backward(dy, x, mean, invstd, weight, _check_bool(training, "training"), axis,
                     out, None)


cdef int _check_x_unchanged(Job *j, Py_ssize_t C) except -1:
    """A layer's backward in training mode: x must be the input its forward normalized.
    The layer keeps a reference (NumPy arrays have no version counter, where torch's
    autograd raises on an input changed in place), and the backward's sums hold
    sum(x - mean) per channel, which for the forward's x and its own mean is rounding
    alone: at most n * (ulp(mean) / 2 + a few ulps of the spread). More than n times a
    millionth of the standard deviation (1 / invstd) means x's mean moved: a new batch
    written into the same array, an in-place update. (Only what moves a channel's mean
    is seen; a permutation of x is not.) NaN and infinite channels are not checked."""
    cdef Py_ssize_t c
    cdef double n = j.n_total, s, tol
    for c in range(C):
        s = fabs(j.s_xm[c])
        tol = n * (4.0 * DBL_EPSILON * fabs(j.hi[c]) + 1e-6 / j.invstd[c])
        if s > tol and s == s and tol == tol:
            raise RuntimeError(
                f"x was changed in place after the forward: channel {c}'s mean moved by "
                f"{s / n * j.invstd[c]:.3g} standard deviations. The layer keeps its "
                f"input for backward without a copy; call backward before changing x, or "
                f"pass the forward a copy")
    return 0


def _backward(dy, x, mean, invstd, weight, bint training, axis, out, sums_hook,
              bint saved_mean=False, param_dtype=None):
    """batch_norm_backward; with training and `sums_hook`, the batch spans several
    processes: sums_hook(local) gets the local per-channel sums as a (3, C) float64
    array [sum(dy), sum(dy * (x - mean)), sum(x - mean)] and returns (global sums of the
    same shape, global elements per channel). dweight and dbias stay this process's
    contribution. saved_mean (training): mean is the batch mean a layer's forward
    computed from this very x, so sum(x - mean) is rounding alone; a RuntimeError where
    it is not (x changed in place since: _check_x_unchanged). param_dtype (a layer's
    parameter dtype): dweight and dbias rounded once from the sums to it, not to x's
    dtype first (a float16 x's dbias overflows past 65504 where float32 parameters hold
    it, as torch's mixed-precision gradients do)."""
    cdef object result_dtype, rd_dy
    cdef cnp.ndarray a, g
    if mean is None or invstd is None:
        # no default: a gradient through statistics other than the batch's is wrong
        raise ValueError("mean and invstd are required (batch_norm_train's, or the "
                         "running mean and 1 / sqrt(running_var + eps) with training=False)")
    a, result_dtype = _as_input(x, "x")
    g, rd_dy = _as_input(dy, "dy")
    cdef int nd = cnp.PyArray_NDIM(a), axis_i
    cdef Py_ssize_t C, c, sb
    cdef Job j
    cdef Geo gy, gg, gxj, gdj
    cdef _Layout lay, joint
    cdef cnp.ndarray dx, dw, dbias
    cdef double *buf = NULL
    cdef double *lp
    cdef cnp.ndarray local
    cdef bint fused
    if nd < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {np.shape(x)}")
    if (<object>g).shape != (<object>a).shape:
        raise ValueError(f"dy must have the shape of x {(<object>a).shape}, got "
                         f"{(<object>g).shape}")
    if cnp.PyArray_TYPE(g) != cnp.PyArray_TYPE(a):
        if cnp.PyArray_ITEMSIZE(g) > cnp.PyArray_ITEMSIZE(a):
            # x narrower than dy: computed in dy's type, x widened (exactly) and dy not
            # rounded to x's (a float64 dy's sums would lose its last bits), the results
            # in x's dtype
            if result_dtype is None:
                result_dtype = a.dtype
            if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT16 and \
                    cnp.PyArray_TYPE(g) == cnp.NPY_FLOAT32:
                a = _half_to_float(a)
            else:
                a = a.astype(g.dtype)
        else:   # dy narrower: widened, exactly
            g = g.astype(a.dtype)
    axis_i = _norm_axis(axis, nd)
    C = cnp.PyArray_DIMS(a)[axis_i]
    if out is not None:
        _check_out(out, a, result_dtype if result_dtype is not None else a.dtype, "out")
    buf = _alloc_channels(C, 8)
    try:
        memset(&j, 0, sizeof(Job))
        _channel_arrays(&j, buf, C)
        _load_param(mean, C, "mean", j.hi, 0.0)
        _load_param(invstd, C, "invstd", j.invstd, 1.0)
        _load_param(weight, C, "weight", j.weight, 1.0)
        for c in range(C):
            j.scale[c] = j.weight[c] * j.invstd[c]
            j.k1[c] = 0.0
            j.k2[c] = 0.0
        lay = _Layout()
        a = lay.fit_input(a, axis_i, False, True)
        g = lay.fit_other_input(g, a, &gg)
        o = _direct_out(out, a, result_dtype)
        joint = _joint_layout(o, lay, a, g, &gxj, &gdj, &gy)
        _set_geo(&j, &lay.gx)
        _set_type(&j, a)
        j.x = <char *>cnp.PyArray_DATA(a)
        _set_dy(&j, g, &gg)
        if joint is None:
            dx = lay.output(o, a, (a, g), &gy)
            _set_y(&j, dx, &gy)
        else:
            # out in rows of its own: the sums planned as for an output in x's layout
            # (their bits those of a call without out), then dx in out's rows
            dx = o
            j.y, j.y_os, j.y_cs = j.x, j.x_os, j.x_cs
            memcpy(j.y_ls, j.x_ls, sizeof(j.y_ls))
        _plan(&j, cnp.PyArray_ITEMSIZE(a), 2, False, sums_hook is None)
        j.stream = _streams(&j, lay, out, dx, cnp.PyArray_ITEMSIZE(a))
        j.n_total = <double>j.outer * <double>j.inner
        j.s_dy = <double *>_malloc(_bytes_for(C, 3 * j.nsb, sizeof(double)))
        if j.s_dy == NULL:
            raise MemoryError()
        j.s_dyx = j.s_dy + j.nsb * C
        j.s_xm = j.s_dyx + j.nsb * C
        fused = _fuses(&j, 2) and not (training and _rows_alias(&j))
        if not fused:
            # eval-mode backward too (its sums, then dx) where rows exceed 1 KB
            _full_rows(&j, False, 2 if training else j.C * j.isz > BEVAL_WHOLE_ROW_BYTES)
        _line_blocks(&j)
        try:
            if _elems(&j) == 0:
                memset(j.s_dy, 0, 3 * C * sizeof(double))
            elif not training and joint is not None:
                _launch(&j, K_BSUMS)
                _sum_units(&j)
                # dx = scale * dy as the normalization computes it, (dy - 0) * scale
                # + (-0.0): the same bits (k1 holds zeros here; k2 is free)
                for c in range(C):
                    j.k2[c] = -0.0
                _launch_joint(&j, K_NORM, g, &gdj, None, NULL, dx, &gy, j.k1, j.k2)
            elif not training:
                _launch(&j, K_BEVAL)
                _sum_units(&j)
            elif fused and sums_hook is None and joint is not None:
                _launch(&j, K_BSUMS)
                _sum_units(&j)
                if saved_mean:
                    _check_x_unchanged(&j, C)
                _bwd_coeffs(&j, 0, C)
                j.reverse = 1
                _launch_joint(&j, K_BDX, a, &gxj, g, &gdj, dx, &gy)
            elif fused and sums_hook is None:
                _launch(&j, K_BWD)
                if saved_mean:      # (dx is written by now: out holds no result after it)
                    _check_x_unchanged(&j, C)
            else:
                _launch(&j, K_BSUMS)
                _sum_units(&j)
            if training and sums_hook is not None:
                # (saved_mean: the global sums checked below; a rank's own sum(x - mean)
                # is not zero, the sum over ranks is)
                local = np.empty((3, C), np.float64)
                _copy_out(<double *>cnp.PyArray_DATA(local), j.s_dy, C)
                _copy_out(<double *>cnp.PyArray_DATA(local) + C, j.s_dyx, C)
                _copy_out(<double *>cnp.PyArray_DATA(local) + 2 * C, j.s_xm, C)
                total, n_total = sums_hook(local.copy())
                total = np.ascontiguousarray(total, dtype=np.float64)
                if total.shape != (3, C):
                    raise ValueError(f"sums_hook must return a (3, {C}) array")
                j.n_total = float(n_total)
                _copy_in(j.s_dy, total, 0, C)
                _copy_in(j.s_dyx, total, C, C)
                _copy_in(j.s_xm, total, 2 * C, C)
                if saved_mean:
                    _check_x_unchanged(&j, C)
                _bwd_coeffs(&j, 0, C)
                if _elems(&j) > 0:
                    j.reverse = 1
                    if joint is None:
                        _launch(&j, K_BDX)
                    else:
                        _launch_joint(&j, K_BDX, a, &gxj, g, &gdj, dx, &gy)
                # this process's dweight, dbias, centred like the global gradient (from
                # local's data: indexing it as a Python object cost ~100 ns a channel)
                lp = <double *>cnp.PyArray_DATA(local)
                for c in range(C):
                    j.s_dy[c] = lp[c]
                    j.s_dyx[c] = lp[C + c] - j.lo[c] * lp[c]
            elif training and not fused:
                if saved_mean:
                    _check_x_unchanged(&j, C)
                _bwd_coeffs(&j, 0, C)
                j.reverse = 1
                if joint is None:
                    _launch(&j, K_BDX)
                else:
                    _launch_joint(&j, K_BDX, a, &gxj, g, &gdj, dx, &gy)
            for c in range(C):
                j.s_dyx[c] *= j.invstd[c]          # dweight = sum(dy * xhat)
            if param_dtype is None:
                dw = _vector_from(j.s_dyx, C, cnp.PyArray_TYPE(a), result_dtype)
                dbias = _vector_from(j.s_dy, C, cnp.PyArray_TYPE(a), result_dtype)
            else:
                dw = _params_from(j.s_dyx, C, param_dtype)
                dbias = _params_from(j.s_dy, C, param_dtype)
        finally:
            _mfree(j.s_dy)
        return _finish(out, dx, result_dtype), dw, dbias
    finally:
        _free(buf)

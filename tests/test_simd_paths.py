"""Issue 3: the intrinsics loops give the bits of the plain loops.

Where the CPU has x86-64-v4 (AVX-512) or x86-64-v3 (AVX2), the hottest loops
(statistics and backward sums, normalize, dx; runs and rows forms) run as intrinsics
written for it; elsewhere, and at level 0, the plain loops that gcc vectorizes run. All
do the same operations in the same order, so every output must match bit for bit:
shapes whose runs and rows leave tails after the vector loops (lengths not a multiple of
4, 8 or 32, row counts not a multiple of 4), every dtype (float16 read through F16C, its
heads and tails converted by F16C's scalar forms), strided and reversed inputs,
streamed and plain stores, one and two threads. On a CPU without AVX2 the level stays 0
and there is nothing to compare.

Across builds: products are added with fused multiply-adds (C's fma(), an instruction in
the x86-64-v3/v4 clones, libm's exact function in the baseline clone), so a build
without clones, as a CPU without FMA runs it, gives the same bits too. CI writes
``fingerprint()`` of its main build to a file and checks the sanitizer build (plain
loops built once, for the baseline) against it (``BNFAST_BITS_REFERENCE``)."""
import hashlib
import json
import os

import numpy as np
import pytest

import bnfast
from arrays import make_values, params, with_layout
from bnfast._core import (_set_adds_as_fma, _set_dx_in_order_bytes, _set_flat_whole_lines,
                          _set_fused_eval_backward, _set_norm_in_order_bytes,
                          _set_fused_eval_runs, _set_grouped_wide, _set_l1_rows_max,
                          _set_norm_v3, _set_reduce_blocks_min, _set_simd_level,
                          _set_stage_near_bytes, _set_store_lines, _set_stream_bytes,
                          _set_whole_rows, _set_quads_min_bytes, _set_spaced_quads)
from reference import assert_forward_close
import reference as ref

SUPPORTED = _set_simd_level(None)          # the default: the highest the CPU has
LEVELS = [lv for lv in (3, 4) if lv <= SUPPORTED]
ADDS_AS_FMA = _set_adds_as_fma(None)        # the default: by CPU vendor
NORM_V3 = _set_norm_v3(None)                # the default: by CPU vendor
# the defaults: from DRAM rows of 512 bytes, else 2 KB
DX_IN_ORDER = {dram: _set_dx_in_order_bytes(None, dram) for dram in (False, True)}
NORM_IN_ORDER = _set_norm_in_order_bytes(None)    # the default: rows 2 KB, 4 KB, ... apart

SHAPES = [
    ((7, 3, 45), 1),          # runs of 45: one 32-lane block and a tail
    ((6, 5, 8, 8), 1),        # runs of 64: no tail
    ((4, 6, 7, 7), 1),        # eval: a row's runs of 49 in one call, masked tails of 1
    ((3, 5, 11, 11), 1),      # eval: runs of 121, masked tails of 1
    ((3, 2, 1037), 1),        # long runs, chunked, odd tail
    ((5, 4, 12, 12), 1),      # runs of 144: a block of channels, no partial vector
    ((2, 40, 130), 1),        # runs of 130, two blocks: one's normalization beside the
                              # next one's statistics
    ((37, 19), -1),           # rows: 19 columns (two vectors and a tail), 37 rows
    ((203, 64), -1),          # contiguous narrow rows (flat form), rows not a multiple of 4
    ((41, 300), -1),          # rows of 300: several prefetch column blocks and a tail
    ((6, 1500), -1),          # rows wider than a chunk
    ((5, 7, 6, 24), -1),      # channels last
    ((50, 9, 7), 1),          # short runs read as rows of 63 columns
    ((33, 300, 4), 1),        # short runs: several channel blocks of columns
    ((1003, 3), -1),          # narrow rows folded 85 to a row, 68 rows left over
    ((7, 21, 30, 5), -1),     # channels last, 5 channels: folded, 1 row left over
]


def _offset(dtype):
    """Price-like data: an offset that leaves float16 a few bits of spread."""
    return 100.0 if dtype == np.float16 else 1e4


def _off_a_line(size, dtype, offset):
    """(buf, lo): a NaN-filled buffer of size + 64 elements, and the index `offset`
    elements past a line (buf[lo - offset] on one), where an output of `size` starts."""
    buf = np.full(size + 64, np.nan, dtype)
    return buf, (-buf.ctypes.data % 64) // buf.itemsize + offset


def _outputs_off_a_line(x, dy, axis, full, offset):
    """[(name, output)] of eval, training and both backward forms, each written into a
    NaN-filled buffer `offset` elements past a line (`full`: the buffer's shape, of
    which the output is the first x.shape[-1] columns), checking that nothing outside
    the output was written."""
    w, b, rm, rv = params(x.shape[axis], x.dtype, 3)
    size = int(np.prod(full))
    res = []
    for name in ("eval", "train", "dx", "dx fixed"):
        buf, lo = _off_a_line(size, x.dtype, offset)
        out = buf[lo:lo + size].reshape(full)[..., :x.shape[-1]]
        if name == "eval":
            bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=out)
        elif name == "train":
            _, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, out=out)
        else:
            bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, out=out,
                                       training=name == "dx")
        outside = np.ones(size + 64, bool)
        outside[lo:lo + size].reshape(full)[..., :x.shape[-1]] = False
        assert np.isnan(buf[outside]).all(), f"{name}: written outside the output"
        res.append((name, out.copy()))
    return res


def _same_bits_either_way(switch, x, dy, axis, full, offset):
    """_outputs_off_a_line at level 0 and at the CPU's, with `switch` (a _core._set_*
    setting, on by default) off and on: the same bits every way. Returns the first (level
    0, off)."""
    runs = {}
    try:
        for level in sorted({0, SUPPORTED}):
            _set_simd_level(level)
            for on in (False, True):
                switch(on)
                runs[level, on] = _outputs_off_a_line(x, dy, axis, full, offset)
    finally:
        _set_simd_level(SUPPORTED)
        switch(True)
    first = runs[0, False]
    for key, res in runs.items():
        for (name, a), (_, g) in zip(first, res):
            assert a.tobytes() == g.tobytes(), f"{name}: {key} gives other bits"
    return first


def _ops(x, axis, dtype):
    C = x.shape[axis]
    w, b, rm, rv = params(C, dtype, 3)
    dy = with_layout(make_values(x.shape, dtype, 5, axis=axis), "c", axis=axis)
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis)
    res = [("train y", y), ("mean", mean), ("invstd", invstd),
           ("eval", bnfast.batch_norm(x, rm, rv, w, b, axis=axis))]
    for training in (True, False):
        dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w, training=training,
                                                axis=axis)
        res += [(f"dx[{training}]", dx), (f"dw[{training}]", dw), (f"db[{training}]", db)]
    mo = bnfast.moments(x, axis=axis)
    res += [("moments mean", np.asarray(mo.mean)), ("moments var", np.asarray(mo.var))]
    return res


@pytest.mark.skipif(not LEVELS, reason="the CPU has no AVX2 or AVX-512 loops to compare")
@pytest.mark.parametrize("dram", ["no", "a row at a time", "four rows", "spaced"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["c", "negative", "step"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_v4_loops_equal_plain_loops(shape, axis, dtype, layout, threads, stream, dram):
    """`dram`: the paths for arrays read from DRAM (BNF_FROM_DRAM and the blocks of
    _reduce_blocks_min, lowered to 0), where the training backward sums of rows go a row
    at a time, or four rows at a time over whole rows (_whole_rows, by CPU vendor)."""
    x = with_layout(make_values(shape, dtype, 11, axis=axis, offset=_offset(dtype)), layout,
                    axis=axis)
    bnfast.set_num_threads(threads)
    old_stream = _set_stream_bytes(0 if stream else 1 << 62)
    old_blocks = _set_reduce_blocks_min(1 << 62 if dram == "no" else 0)
    old_quads = _set_whole_rows(dram in ("four rows", "spaced"))
    old_quads_min = _set_quads_min_bytes(0)      # four rows however narrow
    old_spaced = _set_spaced_quads(dram == "spaced")
    try:
        _set_simd_level(0)
        plain = _ops(x, axis, dtype)
        simd = {}
        for level in LEVELS:
            _set_simd_level(level)
            # the backward sums' adds, and AVX2's normalize of float and double (its
            # intrinsics or the plain loop), each either way
            for by_vendor in (False, True):
                _set_adds_as_fma(by_vendor)
                _set_norm_v3(by_vendor)
                simd[level, by_vendor] = _ops(x, axis, dtype)
    finally:
        _set_simd_level(SUPPORTED)
        _set_adds_as_fma(ADDS_AS_FMA)
        _set_norm_v3(NORM_V3)
        _set_stream_bytes(old_stream)
        _set_reduce_blocks_min(old_blocks)
        _set_whole_rows(old_quads)
        _set_quads_min_bytes(old_quads_min)
        _set_spaced_quads(old_spaced)
        bnfast.set_num_threads(None)
    for (level, by_vendor), res in simd.items():
        for (name, a), (_, g) in zip(plain, res):
            assert a.tobytes() == g.tobytes(), \
                f"{name}: level {level} loops (adds as FMA, AVX2 normalize: {by_vendor}) " \
                "give other bits"
    # and both are right (the comparison above is not of two wrong answers)
    w, b = params(x.shape[axis], dtype, 3)[:2]
    assert_forward_close(plain[0][1], ref.batch_norm_train(x, w, b, axis=axis)[0])


def test_level_is_capped_and_restored():
    try:
        assert _set_simd_level(99) == SUPPORTED
        assert _set_simd_level(None) == SUPPORTED       # capped at what the CPU has
        assert _set_simd_level(0) == SUPPORTED
        assert _set_simd_level(None) == 0
        for level in LEVELS:
            _set_simd_level(level)
            assert _set_simd_level(None) == level
    finally:
        _set_simd_level(SUPPORTED)
    assert SUPPORTED in (0, 3, 4)


# Outputs off a line by every element offset: the intrinsics loops stream a large output
# straight from the registers (the elements before the first 64-byte boundary alone;
# contiguous rows as one run with the factors rotated to match), the plain loops stage
# it. Both must give the same bits, and the right ones.
STREAM_SHAPES = [
    ((3, 4, 300), 1),         # runs: a head and a tail in every run
    ((2, 3, 2049), 1),        # runs of three chunks of sums, two of dx after a head
    ((40, 256), -1),          # contiguous wide rows, one run
    ((40, 64), -1),           # contiguous narrow rows (flat form)
    ((30, 65), -1),           # flat form whose runs fill no whole lines (float32): staged
    ((50, 3), -1),            # flat form of 3-wide rows: runs of 240, whole lines
    ((40, 33), -1),           # ... of 33-wide rows: runs of 528, wider than 256
    ((9, 5, 2, 272), -1),     # channels last, rows of 272
    ((40, 300, 3), 1),        # short runs as rows of 900 columns
    ((6, 40, 49), 1),         # short runs as rows: blocks of 16 channels (whole lines)
    ((12, 2048), -1),         # rows wider than a chunk, lines apart: each row's columns
                              # before its first line alone, the rest from a line
    ((9, 1040), -1),          # ... in blocks of columns, rows of 65 lines (float32)
]


@pytest.mark.skipif(not LEVELS, reason="the CPU has no AVX2 or AVX-512 loops to compare")
@pytest.mark.parametrize("offset", [0, 1, 3, 4, 7, 12, 15, 17, 31])   # float16: 32 a line
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", STREAM_SHAPES)
def test_streamed_outputs_off_a_line(shape, axis, dtype, offset):
    x = make_values(shape, dtype, 13, axis=axis, offset=_offset(dtype))
    C = shape[axis]
    w, b, rm, rv = params(C, dtype, 3)
    dy = make_values(shape, dtype, 17, axis=axis)
    size = int(np.prod(shape))

    def run():
        res = []
        for name in ("eval", "eval in place", "train", "dx"):
            buf, lo = _off_a_line(size, dtype, offset)
            out = buf[lo:lo + size].reshape(shape)
            if name == "eval":
                bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=out)
            elif name == "eval in place":
                out[...] = x
                bnfast.batch_norm(out, rm, rv, w, b, axis=axis, out=out)
            elif name == "train":
                _, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, out=out)
            else:
                bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, out=out)
            # nothing written outside the output
            assert np.isnan(buf[:lo]).all() and np.isnan(buf[lo + size:]).all(), name
            res.append((name, out.copy()))
        return res

    old_stream = _set_stream_bytes(0)
    try:
        _set_simd_level(0)
        plain = run()
        simd = {}
        for level in LEVELS:
            _set_simd_level(level)
            for norm_v3 in ((False, True) if level == 3 else (NORM_V3,)):
                _set_norm_v3(norm_v3)     # AVX2's normalize: its intrinsics or the plain loop
                simd[level, norm_v3] = run()
    finally:
        _set_simd_level(SUPPORTED)
        _set_stream_bytes(old_stream)
        _set_norm_v3(NORM_V3)
    for (level, norm_v3), res in simd.items():
        for (name, a), (_, g) in zip(plain, res):
            assert a.tobytes() == g.tobytes(), \
                f"{name}: level {level} loops (AVX2 normalize: {norm_v3}) give other bits"
    assert plain[0][1].tobytes() == plain[1][1].tobytes()       # in place: the same
    y_ref = ref.batch_norm_train(x, w, b, axis=axis)[0]
    assert_forward_close(plain[2][1], y_ref)


# Outputs near an input modulo 1 MiB (just ahead of it; or, for rows taken four at a
# time, a row stride ahead or behind): the loops stage them through L1 instead of
# storing from the registers, whose stores would stall the loads that follow
# (bnf_nt_aliased), then stream them out or copy them plainly.
# Runs (NCHW), flat rows, rows not whole lines, rows of 1000 (off lines: one at a time),
# short runs as rows, and both backward forms.
ALIAS_SHAPES = [
    ((4, 8, 16, 16), 1, 32),      # runs of 1 KB in step: 32 bytes ahead
    ((4, 8, 16, 16), 1, 160),
    ((300, 256), -1, 32),         # flat rows: four at a time, 32 bytes ahead
    ((300, 256), -1, 1024),       # ... a row ahead
    ((300, 256), -1, -2048),      # ... two rows behind (not staged)
    ((300, 256), -1, -992),       # ... 32 bytes ahead of a row behind
    ((300, 250), -1, 1000),       # rows not whole lines
    ((300, 250), -1, 32),         # ... runs of whole lines longer than the L1 buffer
    ((60, 1000), -1, 48),         # rows of 4 KB one at a time where off a line
    ((40, 30, 8), 1, 960),        # short runs as rows of 240 columns
]


@pytest.mark.parametrize("mode", ["stream", "plain-staged", "plain-in-place"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis,delta", ALIAS_SHAPES)
def test_outputs_near_an_input(shape, axis, delta, dtype, mode):
    """(Outputs stored plainly are staged near an input on Intel CPUs only, where the
    stores stall the loads; both ways are run on any CPU.)"""
    x0 = make_values(shape, dtype, 19, axis=axis, offset=_offset(dtype))
    dy0 = make_values(shape, dtype, 23, axis=axis)
    C = shape[axis]
    w, b, rm, rv = params(C, dtype, 7)
    size = int(np.prod(shape))
    isz = np.dtype(dtype).itemsize
    span = 1 << 20
    assert size * isz < span
    # x on a line; dy a whole number of MiB after it; the output `delta` bytes from a
    # whole number of MiB after both (delta a multiple of the item size)
    buf = np.full(6 * span // isz, np.nan, dtype)
    lo = (-buf.ctypes.data % 64) // isz
    xi, gi, oi = lo + span // isz, lo + 2 * span // isz, lo + (4 * span + delta) // isz
    x, dy, out = (buf[i:i + size].reshape(shape) for i in (xi, gi, oi))
    x[...] = x0
    dy[...] = dy0
    assert (out.ctypes.data - x.ctypes.data) % span == delta % span

    def run(x, dy, out):
        res = [bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=out).copy()]
        y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, out=out)
        res.append(y.copy())
        for training in (True, False):
            dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                    training=training, out=out)
            res += [dx.copy(), dw, db]
        return [a.tobytes() for a in res], res[1]

    old_stream = _set_stream_bytes(0 if mode == "stream" else 1 << 62)
    old_stage = _set_stage_near_bytes(0 if mode == "plain-staged" else 1 << 62)
    try:
        near, y = run(x, dy, out)
        far, _ = run(x0, dy0, np.empty_like(x0))
    finally:
        _set_stream_bytes(old_stream)
        _set_stage_near_bytes(old_stage)
    assert near == far
    # nothing written outside the output (x and dy as they were)
    rest = np.concatenate([buf[:xi], buf[xi + size:gi], buf[gi + size:oi], buf[oi + size:]])
    assert np.isnan(rest).all()
    assert x.tobytes() == x0.tobytes() and dy.tobytes() == dy0.tobytes()
    assert_forward_close(y, ref.batch_norm_train(x0, w, b, axis=axis)[0])


# Outputs off a line, not streamed (in cache): rows forms put their vectors on lines too
# (the flat run's first elements alone, a block's first columns of rows lines apart), or
# half their vector stores were split across two lines. The same bits as without that,
# and as the plain loops; nothing written outside the output.
LINES_SHAPES = [
    ((48, 64), -1, None),        # flat form, at BNF_LINES_MIN elements
    ((203, 64), -1, None),       # flat, rows not a multiple of 4
    ((200, 24), -1, None),       # flat runs of 240 (whole lines), rows left over
    ((1100, 3), -1, None),       # narrow rows folded
    ((12, 1024), -1, None),      # a block of rows lines apart: lead columns alone
    ((9, 1040), -1, None),       # ... in column blocks
    ((20, 1024), -1, 1040),      # an output cropped from rows of 1040: lines apart
    ((40, 300, 4), 1, None),     # short runs as rows of 1200 columns (not lines apart)
]


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("offset", [0, 1, 3, 4, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis,row", LINES_SHAPES)
def test_plain_stores_off_a_line(shape, axis, row, dtype, offset, threads):
    x = make_values(shape, dtype, 13, axis=axis, offset=_offset(dtype))
    w, b = params(shape[axis], dtype, 3)[:2]
    dy = make_values(shape, dtype, 17, axis=axis)
    full = shape if row is None else shape[:-1] + (row,)
    bnfast.set_num_threads(threads)
    try:
        first = _same_bits_either_way(_set_store_lines, x, dy, axis, full, offset)
    finally:
        bnfast.set_num_threads(None)
    y_ref = ref.batch_norm_train(x, w, b, axis=axis)[0]
    assert_forward_close(first[1][1], y_ref)


# Contiguous rows that do not fill whole lines (300 float32 columns: 1200 bytes) go as
# runs of the fewest whole rows that do, of at most 2048 elements, so that their stores
# are on lines: streamed straight from the registers, and in cache (plain stores) from 16
# such runs; else as before.
WHOLE_LINES_SHAPES = [
    (70, 300),      # runs of 4 rows (float64: 2), 2 rows left over; float32 1200 elements
    (150, 130),     # runs of 8 rows (1040 elements; float64: 4 rows), 6 left over
    (33, 1000),     # runs of 2 rows: 2000 elements
    (30, 129),      # float32: 16 rows would be 2064 elements: as before
    (300, 127),     # narrow (runs of 254 before): float32 16 rows, 2032 elements
]


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("offset", [0, 1, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", WHOLE_LINES_SHAPES)
def test_rows_in_runs_of_whole_lines(shape, dtype, offset, threads, stream):
    x = make_values(shape, dtype, 29, axis=-1, offset=_offset(dtype))
    dy = make_values(shape, dtype, 31, axis=-1)
    bnfast.set_num_threads(threads)
    old_stream = _set_stream_bytes(0 if stream else 1 << 62)
    try:
        first = _same_bits_either_way(_set_flat_whole_lines, x, dy, -1, shape, offset)
    finally:
        _set_stream_bytes(old_stream)
        bnfast.set_num_threads(None)
    w, b = params(shape[-1], dtype, 3)[:2]
    assert_forward_close(first[1][1], ref.batch_norm_train(x, w, b, axis=-1)[0])


# Streamed dx of rows of 512 bytes or more (x from DRAM; else 2 KB), and the streamed
# normalize of rows a multiple of 2 KB apart, go a row at a time in memory order, not
# four rows at a time (_set_dx_in_order_bytes, _set_norm_in_order_bytes; off: never; 0: every row): the
# same bits every way, as the plain loops', and nothing written outside the output,
# wherever it starts.
IN_ORDER_SHAPES = [
    ((70, 256), -1, None),       # rows of 1 KB (float64 2 KB, float16 512 bytes)
    ((41, 128), -1, None),       # 512 bytes: at the limit (float16 below it)
    ((33, 512), -1, None),       # the widest channel block (2 KB: the normalize's limit)
    ((20, 1024), -1, 1040),      # the output cropped from rows of 1040: lines apart
    ((14, 1024), -1, None),      # rows of 4 KB (float16 2 KB)
    ((21, 300), -1, None),       # rows not whole lines
    ((6, 1500), -1, None),       # rows wider than a chunk
    ((9, 7, 3, 160), -1, None),  # channels last, 5 rows left over after the fours
]


def _dx_in_order(on, limit=None):
    for dram in (False, True):
        _set_dx_in_order_bytes(DX_IN_ORDER[dram] if on else 1 << 62 if limit is None
                               else limit, dram)


def _norm_in_order(on, limit=None):
    _set_norm_in_order_bytes(NORM_IN_ORDER if on else 1 << 62 if limit is None else limit)


@pytest.mark.usefixtures("threads_on_small_arrays")
# (the normalize's limit does not depend on where x is)
@pytest.mark.parametrize("kind,dram", [("dx", False), ("dx", True), ("normalize", True)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("offset", [0, 1, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis,row", IN_ORDER_SHAPES)
def test_streamed_rows_in_order(shape, axis, row, dtype, offset, threads, dram, kind):
    switch = {"dx": _dx_in_order, "normalize": _norm_in_order}[kind]
    x = make_values(shape, dtype, 43, axis=axis, offset=_offset(dtype))
    dy = make_values(shape, dtype, 47, axis=axis)
    full = shape if row is None else shape[:-1] + (row,)
    bnfast.set_num_threads(threads)
    old_stream = _set_stream_bytes(0)
    old_blocks = _set_reduce_blocks_min(0 if dram else 1 << 62)
    try:
        first = _same_bits_either_way(switch, x, dy, axis, full, offset)
        switch(False, 0)                        # every row in order, however narrow
        every = _outputs_off_a_line(x, dy, axis, full, offset)
    finally:
        switch(True)
        _set_stream_bytes(old_stream)
        _set_reduce_blocks_min(old_blocks)
        bnfast.set_num_threads(None)
    for (name, a), (_, g) in zip(first, every):
        assert a.tobytes() == g.tobytes(), f"{name}: every row in order gives other bits"
    # and right (the statistics _outputs_off_a_line's backward took)
    w, b = params(shape[axis], dtype, 3)[:2]
    _, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis)
    assert_forward_close(first[1][1], ref.batch_norm_train(x, w, b, axis=axis)[0])
    for name, training in (("dx", True), ("dx fixed", False)):
        want = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=training)
        ref.assert_grad_close(dict(first)[name], want[0], dtype, what=name)


# Eval-mode backward of rows stores dx = scale * dy as its sums read dy, in one pass
# (bnf_bwd_sums_dx_rows). From DRAM, streamed: rows of dx on lines as they are; contiguous
# rows of whole lines off a line shifted to start on one, the sums' columns rotated to
# match; others (rows that are not whole lines, float64, float16) the sums and then dx as
# before. In cache: rows of whole lines, plain stores, every type.
FUSED_DX_SHAPES = [
    ((70, 256), (70, 256), -1),     # 1 KB rows: on lines (offset 0) or shifted
    ((203, 64), (203, 64), -1),     # folded four to a row from DRAM, 3 rows left over
    ((33, 512), (33, 512), -1),     # the widest channel block
    ((41, 128), (41, 128), -1),     # 512-byte rows
    ((64, 256), (64, 272), -1),     # dx a column slice: its rows on lines only at offset 0
    ((40, 300), (40, 300), -1),     # rows not whole lines: as before
    ((6, 1500), (6, 1500), -1),     # wider than a channel block: as before
    ((33, 16, 4), (33, 16, 4), 1),  # short runs as rows of 64 columns
    ((21, 24, 8), (21, 24, 8), 1),  # rows of 192 columns
    ((17, 200, 3), (17, 200, 3), 1),  # 600 columns: two blocks, as before
    ((9, 10, 5, 5), (9, 10, 5, 5), 1),  # 250 columns, not whole lines: as before
    ((5, 12, 200), (5, 12, 200), 1),  # runs (NCHW): dx of each run after its sums
    ((3, 10, 14, 14), (3, 10, 14, 14), 1),  # runs of 196: masked tails
    ((4, 6, 130), (4, 6, 144), 1),  # dx's runs not back to back
    ((3, 4, 2100), (3, 4, 2100), 1),  # runs longer than a chunk
    ((3, 2, 90000), (3, 2, 90000), 1),  # channels in several units (superblocks)
]


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("dram", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("offset", [0, 1, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,full,axis", FUSED_DX_SHAPES)
def test_eval_backward_sums_and_dx_in_one_pass(shape, full, axis, dtype, offset, threads, dram):
    """`dram`: the paths of arrays read from DRAM (streamed, rows one at a time); else
    in cache."""
    if dtype == np.float16 and np.prod(shape) > 100000:
        pytest.skip("dweight and dbias beyond float16's range")
    x = make_values(shape, dtype, 37, axis=axis, offset=_offset(dtype))
    dy = make_values(shape, dtype, 41, axis=axis)
    w = params(shape[axis], dtype, 3)[0]
    _, mean, invstd = bnfast.batch_norm_train(x, w, axis=axis)
    size = int(np.prod(full))
    runs = {}
    bnfast.set_num_threads(threads)
    old_stream = _set_stream_bytes(0 if dram else 1 << 62)
    old_blocks = _set_reduce_blocks_min(0 if dram else 1 << 62)
    old_runs = _set_fused_eval_runs(True)      # runs in one pass too (off on AMD)
    old_l1 = _set_l1_rows_max(None, "dx")
    try:
        for level in sorted({0, SUPPORTED}):
            _set_simd_level(level)
            # the one pass's rows ahead into L1 (1 << 40) or L2 (0, as dx's on AMD)
            for on, l1 in ((False, old_l1), (True, 0), (True, 1 << 40)):
                _set_fused_eval_backward(on)
                _set_l1_rows_max(l1, "dx")
                buf, lo = _off_a_line(size, dtype, offset)
                out = buf[lo:lo + size].reshape(full)[..., :shape[-1]]
                _, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                       training=False, out=out)
                outside = np.ones(size + 64, bool)
                outside[lo:lo + size].reshape(full)[..., :shape[-1]] = False
                assert np.isnan(buf[outside]).all(), f"{(level, on, l1)}: written outside dx"
                runs[level, on, l1] = (out.copy(), dw, db)
    finally:
        _set_simd_level(SUPPORTED)
        _set_fused_eval_backward(True)
        _set_l1_rows_max(old_l1, "dx")
        _set_fused_eval_runs(old_runs)
        _set_stream_bytes(old_stream)
        _set_reduce_blocks_min(old_blocks)
        bnfast.set_num_threads(None)
    want = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=False)
    for key, got in runs.items():
        for g, r, f, what in zip(got, want, runs[0, False, old_l1],
                                 ("dx", "dweight", "dbias")):
            assert g.tobytes() == f.tobytes(), f"{what}: {key} gives other bits"
            ref.assert_grad_close(g, r, dtype, what=f"{what} {key}")


@pytest.mark.parametrize("dram", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("shape,axis", [((70, 256), -1), ((203, 64), -1),
                                        ((5, 12, 200), 1)])
def test_eval_backward_in_one_pass_over_dy(shape, axis, offset, dram):
    """out=dy (allowed): the one pass reads each element of dy before it writes dx there
    (rows; and runs, a run's dx after its sums)."""
    x = make_values(shape, np.float32, 43, axis=axis, offset=1e4)
    dy = make_values(shape, np.float32, 47, axis=axis)
    w = params(shape[axis], np.float32, 3)[0]
    _, mean, invstd = bnfast.batch_norm_train(x, w, axis=axis)
    size = int(np.prod(shape))
    old_stream = _set_stream_bytes(0 if dram else 1 << 62)
    old_blocks = _set_reduce_blocks_min(0 if dram else 1 << 62)
    try:
        want = bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=False)
        buf, lo = _off_a_line(size, np.float32, offset)
        g = buf[lo:lo + size].reshape(shape)
        g[...] = dy
        got = bnfast.batch_norm_backward(g, x, mean, invstd, w, axis=axis, training=False,
                                         out=g)
    finally:
        _set_stream_bytes(old_stream)
        _set_reduce_blocks_min(old_blocks)
    assert got[0] is g
    for a, b, what in zip(got, want, ("dx", "dweight", "dbias")):
        assert a.tobytes() == b.tobytes(), what


# Fused units of runs (NCHW) go in blocks of channels: training normalizes a block beside
# the next block's statistics, backward takes a block's sums and then its dx. The
# unit-by-unit path (taken when a hook merges the statistics, here the identity) must give
# the same bits.
PIPE_SHAPES = [
    ((5, 7, 9, 11), 1),       # runs of 99: tails in every run
    ((4, 6, 300), 1),         # several runs per tile
    ((2, 5, 1500), 1),        # runs longer than a chunk
    ((1, 3, 40000), 1),       # runs longer than a statistics tile: not interleaved
    ((60, 3, 700), 1),        # 60 runs of 700: the statistics in two tiles
]


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", PIPE_SHAPES)
def test_pipelined_units_equal_unit_by_unit(shape, axis, dtype, threads, stream):
    from bnfast._core import _backward, _train
    x = make_values(shape, dtype, 19, axis=axis, offset=1e4)
    dy = make_values(shape, dtype, 23, axis=axis)
    C = shape[axis]
    w, b = params(C, dtype, 3)[:2]
    n = x.size // C
    bnfast.set_num_threads(threads)
    old_stream = _set_stream_bytes(0 if stream else 1 << 62)
    try:
        res = {}
        for hooked in (False, True):
            mh = (lambda local: local) if hooked else None
            sh = (lambda local: (local, n)) if hooked else None
            y, mean, invstd = _train(x, w, b, 1e-5, axis, None, None, 0.1, None, True, mh)
            dx, dw, db = _backward(dy, x, mean, invstd, w, True, axis, None, sh)
            res[hooked] = [y, mean, invstd, dx, dw, db]
    finally:
        _set_stream_bytes(old_stream)
        bnfast.set_num_threads(None)
    for name, a, g in zip(["y", "mean", "invstd", "dx", "dw", "db"], res[False], res[True]):
        assert a.tobytes() == g.tobytes(), f"{name}: the pipelined units give other bits"


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,shape", [(np.float32, (40, 8, 1024)),
                                         (np.float64, (40, 8, 1024)),
                                         (np.float16, (70, 8, 1024))])
def test_backward_of_rows_aliasing_in_l2(shape, dtype, threads):
    """Channels whose rows fall on the same L2 sets (rows 32 KB apart, 16 for float16:
    four or eight places in a 128 KB way, more than 8 rows each) go in two passes in
    memory order (_rows_alias), with the bits of each channel fused."""
    from bnfast._core import _set_alias_two_pass
    x = make_values(shape, dtype, 29, axis=1, offset=_offset(dtype))
    dy = make_values(shape, dtype, 31, axis=1)
    w = params(shape[1], dtype, 3)[0]
    _, mean, invstd = bnfast.batch_norm_train(x, w, axis=1)
    bnfast.set_num_threads(threads)
    old_blocks = _set_reduce_blocks_min(0)
    try:
        res = {}
        for on in (False, True):
            _set_alias_two_pass(on)
            res[on] = bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=1)
    finally:
        _set_alias_two_pass(True)
        _set_reduce_blocks_min(old_blocks)
        bnfast.set_num_threads(None)
    want = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=1)
    for name, a, g in zip(["dx", "dweight", "dbias"], res[False], res[True]):
        assert a.tobytes() == g.tobytes(), f"{name}: two passes give other bits"
    ref.assert_grad_close(res[True][0], want[0], dtype, what="dx")


def fingerprint():
    """A hash of every output of _ops, plain loops, one thread, per (shape, dtype, layout)."""
    out = {}
    bnfast.set_num_threads(1)
    _set_simd_level(0)
    try:
        for shape, axis in SHAPES:
            for dtype in (np.float32, np.float64, np.float16):
                for layout in ("c", "negative"):
                    x = with_layout(make_values(shape, dtype, 11, axis=axis,
                                                offset=_offset(dtype)), layout, axis=axis)
                    h = hashlib.sha1()
                    for _, a in _ops(x, axis, dtype):
                        h.update(np.ascontiguousarray(a).tobytes())
                    out[f"{shape} {axis} {np.dtype(dtype).name} {layout}"] = h.hexdigest()
    finally:
        _set_simd_level(SUPPORTED)
        bnfast.set_num_threads(None)
    return out


@pytest.mark.skipif(not os.environ.get("BNFAST_BITS_REFERENCE"),
                    reason="no other build's fingerprint (BNFAST_BITS_REFERENCE) to compare")
def test_same_bits_as_another_build():
    with open(os.environ["BNFAST_BITS_REFERENCE"]) as f:
        other = json.load(f)
    mine = fingerprint()
    assert set(mine) == set(other)
    differ = [k for k in mine if mine[k] != other[k]]
    assert not differ, f"{len(differ)} of {len(mine)} cases differ from the other build: {differ[:5]}"


# Contiguous rows wider than a chunk, streamed: in groups of rows and column blocks where
# L1d is small (_set_grouped_wide, on by default under 40 KiB: Zen 4), whole rows
# elsewhere. Outputs 0-48 bytes past a line (each row's plain-stored lead and tail
# columns), rows not whole lines (not grouped), x off a line; eval, training and both
# backward forms (dx). The same bits both ways, nothing written outside the output, and
# right.
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("width", [1056, 2048, 2080, 4096, 1100])
@pytest.mark.parametrize("offset", [0, 3, 4, 12])
def test_grouped_wide_rows(width, offset, dtype):
    if dtype == np.float64 and width > 4096:
        pytest.skip("rows over half a group")
    rows = 300         # more than a superblock: the backward's dx a pass of its own
    xbuf = np.empty(rows * width + 64, dtype)
    xlo = (-xbuf.ctypes.data % 64) // xbuf.itemsize + 1      # x off a line too
    x = xbuf[xlo:xlo + rows * width].reshape(rows, width)
    x[...] = make_values((rows, width), dtype, 29, axis=-1, offset=_offset(dtype))
    dy = make_values((rows, width), dtype, 31, axis=-1)
    w, b, rm, rv = params(width, dtype, 5)
    _, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=-1)
    old_stream = _set_stream_bytes(0)
    old = _set_grouped_wide(None)
    got = {}
    try:
        for on in (False, True):
            _set_grouped_wide(on)
            res = []
            for op in ("eval", "train", "backward", "backward eval"):
                buf, lo = _off_a_line(rows * width, dtype, offset)
                out = buf[lo:lo + rows * width].reshape(rows, width)
                if op == "eval":
                    bnfast.batch_norm(x, rm, rv, w, b, axis=-1, out=out)
                elif op == "train":
                    bnfast.batch_norm_train(x, w, b, axis=-1, out=out)
                else:
                    bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=-1, out=out,
                                               training=op == "backward")
                outside = np.ones(buf.size, bool)
                outside[lo:lo + rows * width] = False
                assert np.isnan(buf[outside]).all(), f"{op}: written outside the output"
                res.append(out.copy())
            got[on] = res
    finally:
        _set_grouped_wide(old)
        _set_stream_bytes(old_stream)
    for a, g in zip(got[False], got[True]):
        assert a.tobytes() == g.tobytes(), "grouped wide rows give other bits"
    assert_forward_close(got[True][0], ref.batch_norm(x, rm, rv, w, b, axis=-1))
    assert_forward_close(got[True][1], ref.batch_norm_train(x, w, b, axis=-1)[0])
    for got_dx, training in ((got[True][2], True), (got[True][3], False)):
        want = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=-1, training=training)[0]
        scale = np.abs(want).max()
        assert np.abs(got_dx.astype(np.float64) - want).max() <= 1e-2 * scale if \
            dtype == np.float16 else np.allclose(got_dx, want, rtol=1e-5, atol=1e-6 * scale)

"""Issue 5, awkward input that must be handled correctly.

Every layout in ``arrays.LAYOUTS`` (strides of every kind, byte order, read-only,
unaligned, broadcast), ``out=`` in every writable layout, in place and partially
overlapping outputs, array-likes, empty batches in eval, NaN/inf, a million channels,
float16, integer input, and (opt-in, slow) arrays of more than 2**31 elements. Values
are checked against the float64 reference; inputs the call may not write are checked
bitwise afterwards."""
import gc
import os
import sys

import numpy as np
import pytest

import bnfast
import reference as ref
from _reliability_helpers import (assert_close_nonfinite, assert_unchanged, channel_mask,
                                  snapshot)
from arrays import LAYOUTS, OUT_LAYOUTS, applicable, make_values, out_like, params, \
    with_layout
from reference import assert_forward_close, assert_grad_close, assert_vec_close

SHAPES = [((5, 3, 4, 6), 1), ((5, 4, 6, 3), -1), ((40, 7), 1), ((40, 7), -1),
          ((6, 3, 10), 1), ((3, 4, 2, 3, 2), 1), ((4, 5, 3, 6), 2), ((1, 3, 1, 9), 1)]
DTYPES = [np.float32, np.float64]
OFFSET = {np.dtype(np.float32): 1e5, np.dtype(np.float64): 3e6}


@pytest.fixture(autouse=True)
def _segments_in_place():
    """Rows in segments (the crop layouts, outputs too) read in place however small
    their segments, so these tests take that path rather than the copy."""
    old = bnfast._core._set_segments_always(True)
    yield
    bnfast._core._set_segments_always(old)


def _case(shape, axis, dtype, layout="c", seed=0):
    base = make_values(shape, dtype, seed, axis=axis, offset=OFFSET[np.dtype(dtype)])
    x = with_layout(base, layout, axis=axis, seed=seed)
    C = shape[axis]
    w, b, rm, rv = params(C, np.float64, seed)
    return x, w, b, rm, rv


def _dy(x, layout="c", seed=1):
    dy = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype.newbyteorder("="))
    return with_layout(dy, layout, seed=seed)


# ----------------------------------------------------------------------------------
# Runners: each calls bnfast and the reference on the same inputs and checks everything.

def run_eval(x, w, b, rm, rv, axis, out=None, eps=1e-5):
    expect = ref.batch_norm(x, rm, rv, w, b, False, 0.1, eps, axis=axis)
    snap = snapshot(x, w, b, rm, rv)
    y = bnfast.batch_norm(x, rm, rv, w, b, False, 0.1, eps, axis=axis, out=out)
    if out is not None:
        assert y is out
        assert_unchanged(snap, "batch_norm eval")
    else:
        assert_unchanged(snap, "batch_norm eval")
    assert y.dtype == _result_dtype(x)
    assert_forward_close(y, expect, what="batch_norm eval y")
    return y


def run_frozen(x, w, b, rm, rv, axis, out=None, eps=1e-5):
    expect = ref.frozen_batch_norm(x, rm, rv, w, b, eps, axis=axis)
    f = bnfast.FrozenBatchNorm(rm, rv, w, b, eps, axis=axis)
    snap = snapshot(x, w, b, rm, rv)
    y = f(x, out=out)
    if out is not None:
        assert y is out
    assert_unchanged(snap, "FrozenBatchNorm")
    assert y.dtype == _result_dtype(x)
    assert_forward_close(y, expect, what="FrozenBatchNorm y")
    return y


def run_train(x, w, b, rm, rv, axis, out=None, eps=1e-5, momentum=0.1):
    rm_ref, rv_ref = np.array(rm, np.float64), np.array(rv, np.float64)
    y_ref, m_ref, s_ref = ref.batch_norm_train(x, w, b, eps=eps, axis=axis,
                                               running_mean=rm_ref, running_var=rv_ref,
                                               momentum=momentum)
    snap = snapshot(x, w, b)
    y, m, s = bnfast.batch_norm_train(x, w, b, eps=eps, axis=axis, running_mean=rm,
                                      running_var=rv, momentum=momentum, out=out)
    if out is not None:
        assert y is out
    assert_unchanged(snap, "batch_norm_train (x, weight, bias)")
    assert y.dtype == _result_dtype(x)
    assert m.dtype == np.float64 and s.dtype == np.float64
    assert_forward_close(y, y_ref, what="batch_norm_train y")
    assert_vec_close(m, m_ref, 1e-12, "batch mean")
    assert_vec_close(s, s_ref, 1e-9, "batch invstd")
    r = 1e-6 if rm.dtype == np.float32 else 1e-12
    assert_vec_close(rm, rm_ref, r, "running_mean")
    assert_vec_close(rv, rv_ref, max(r, 1e-9), "running_var")
    return y


def run_backward(dy, x, w, axis, training=True, out=None, eps=1e-5):
    mean, var, _ = ref.batch_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    dx_ref, dw_ref, db_ref = ref.batch_norm_backward(dy, x, mean, invstd, w,
                                                     training=training, axis=axis)
    snap = snapshot(x, w, mean, invstd) + (snapshot(dy) if out is None or
                                           not np.may_share_memory(out, dy) else [])
    dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w, training=training,
                                            axis=axis, out=out)
    if out is not None:
        assert dx is out
    assert_unchanged(snap, "batch_norm_backward inputs")
    rd = _result_dtype(x)
    assert dx.dtype == rd and dw.dtype == rd and db.dtype == rd
    assert_grad_close(dx, dx_ref, scale=_dx_scale(dy, w, invstd, dx_ref), what="dx")
    # the sums' condition: relative to sum |dy * xhat| and sum |dy| per channel
    absdy = np.abs(np.asarray(dy, np.float64))
    xhat = ref.frozen_batch_norm(x, mean, 1 / invstd ** 2, eps=0.0, axis=axis) \
        if np.all(invstd > 0) else np.zeros(np.shape(x))
    red = tuple(i for i in range(np.ndim(x)) if i != axis % np.ndim(x))
    assert_grad_close(dw, dw_ref, what="dweight", scale=max(
        np.max(np.abs(dw_ref), initial=0.0), np.max((absdy * np.abs(xhat)).sum(axis=red),
                                                    initial=0.0)))
    assert_grad_close(db, db_ref, what="dbias", scale=max(
        np.max(np.abs(db_ref), initial=0.0), np.max(absdy.sum(axis=red), initial=0.0)))
    return dx


def _dx_scale(dy, w, invstd, dx_ref):
    """dx's terms are of size |weight * invstd * dy|: cancellation (few values per
    channel, a constant channel) leaves rounding noise relative to that, not to |dx|."""
    w64 = np.ones(np.shape(invstd)) if w is None else np.asarray(w, np.float64)
    return max(np.max(np.abs(dx_ref), initial=0.0),
               np.max(np.abs(w64 * invstd), initial=0.0) * np.max(np.abs(dy), initial=0.0))


def _result_dtype(x):
    x = np.asarray(x)
    if x.dtype.kind in "iub":
        return np.dtype(np.float64)
    return x.dtype.newbyteorder("=")


# ----------------------------------------------------------------------------------
# Every input layout

CASES = [(s, a, lay) for s, a in SHAPES for lay in LAYOUTS if applicable(s, a, lay)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis,layout", CASES)
def test_input_layouts_eval(shape, axis, layout, dtype):
    x, w, b, rm, rv = _case(shape, axis, dtype, layout)
    run_eval(x, w, b, rm, rv, axis)
    run_frozen(x, w, b, rm, rv, axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis,layout", CASES)
def test_input_layouts_train(shape, axis, layout, dtype):
    x, w, b, rm, rv = _case(shape, axis, dtype, layout)
    run_train(x, w, b, rm, rv, axis)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis,layout", CASES)
def test_input_layouts_backward(shape, axis, layout, dtype, training):
    x, w, *_ = _case(shape, axis, dtype, layout)
    run_backward(_dy(x, layout), x, w, axis, training)          # dy laid out like x
    run_backward(_dy(x, "c"), x, w, axis, training)             # dy C-ordered


LARGE_LAYOUTS = ["f", "channels_last", "crop_channels_last", "step", "negative_some",
                 "broadcast", "unaligned", "swapped"]


@pytest.mark.parametrize("layout", LARGE_LAYOUTS)
@pytest.mark.parametrize("shape,axis", [((30000, 20), -1), ((2000, 3, 90), 1)])
def test_input_layouts_large(shape, axis, layout):
    """Awkward layouts on arrays large enough for threads and split channels/row blocks."""
    x, w, b, rm, rv = _case(shape, axis, np.float32, layout)
    run_eval(x, w, b, rm, rv, axis)
    run_frozen(x, w, b, rm, rv, axis)
    run_train(x, w, b, rm.copy(), rv.copy(), axis)
    run_backward(_dy(x, layout), x, w, axis, True)
    run_backward(_dy(x, layout), x, w, axis, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", [((6, 5, 7, 16), -1), ((9, 11, 33), -1),
                                        ((5, 16, 6, 7), 1), ((40, 300, 3), -1),
                                        ((3, 4, 5, 6, 8), 1)])
def test_segments_same_bits_as_contiguous(shape, axis, dtype):
    """Rows in segments, read in place: what is computed element by element (the
    normalization, dx with the statistics held fixed) has the bits of the same values
    laid out contiguously, with `out` a crop as well; training matches the reference."""
    x, w, b, rm, rv = _case(shape, axis, dtype, "crop_channels_last")
    xc = with_layout(np.array(x), "channels_last", axis=axis)
    dy = _dy(x, "crop_channels_last")
    dyc = with_layout(np.array(dy), "channels_last", axis=axis)
    out = with_layout(np.zeros(x.shape, x.dtype), "crop_channels_last", axis=axis)
    y = bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=out)
    assert y is out
    np.testing.assert_array_equal(y, bnfast.batch_norm(xc, rm, rv, w, b, axis=axis))
    assert np.isnan(out.base).sum() == out.base.size - out.size      # nothing else written
    invstd = 1 / np.sqrt(rv + 1e-5)
    dx = bnfast.batch_norm_backward(dy, x, rm, invstd, w, training=False, axis=axis)[0]
    dxc = bnfast.batch_norm_backward(dyc, xc, rm, invstd, w, training=False, axis=axis)[0]
    np.testing.assert_array_equal(dx, dxc)
    run_train(x, w, b, rm.copy(), rv.copy(), axis, out=out)
    run_backward(dy, x, w, axis, True, out=out)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", [((6, 10, 8, 5), 2), ((40, 9, 12, 3), 2)])
def test_segments_of_short_runs(shape, axis, dtype):
    """Channels of short runs back to back (read as rows of C * inner columns) under
    two outer axes, the inner of them cropped: rows in segments."""
    base = make_values(shape, dtype, 0, axis=axis, offset=OFFSET[np.dtype(dtype)])
    parent = np.full((shape[0], shape[1] + 3) + shape[2:], np.nan, dtype)
    x = parent[:, 2:-1]
    x[...] = base
    out = np.full_like(parent, np.nan)[:, 1:-2]
    C = shape[axis]
    w, b, rm, rv = params(C, np.float64, 0)
    np.testing.assert_array_equal(run_eval(x, w, b, rm, rv, axis, out=out),
                                  bnfast.batch_norm(base, rm, rv, w, b, axis=axis))
    run_train(x, w, b, rm.copy(), rv.copy(), axis, out=out)
    run_backward(_dy(x), x, w, axis, True, out=out)
    run_backward(_dy(x), x, w, axis, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 300), (3, 4, 5, 200), (2, 3, 4, 5, 140),
                                   (3, 4, 5, 40)])
def test_segments_of_long_runs(shape, dtype):
    """A crop of NCHW with long rows, read where they are (a segment of a channel a
    call; evaluation also a row a call): evaluation with the bits of contiguous data,
    training and backward against the reference."""
    x, w, b, rm, rv = _case(shape, 1, dtype, "crop")
    out = with_layout(np.zeros(x.shape, x.dtype), "crop", axis=1)
    y = run_eval(x, w, b, rm, rv, 1, out=out)
    np.testing.assert_array_equal(y, bnfast.batch_norm(np.array(x), rm, rv, w, b))
    assert np.isnan(out.base).sum() == out.base.size - out.size
    np.testing.assert_array_equal(run_frozen(x, w, b, rm, rv, 1), y)
    run_train(x, w, b, rm.copy(), rv.copy(), 1, out=out)
    run_backward(_dy(x, "crop"), x, w, 1, True, out=out)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dy_layouts_against_c_x(layout):
    for shape, axis in [((5, 3, 4, 6), 1), ((5, 4, 6, 3), -1), ((40, 7), 1)]:
        if not applicable(shape, axis, layout):
            continue
        x, w, *_ = _case(shape, axis, np.float32, "c")
        for training in (True, False):
            run_backward(_dy(x, layout), x, w, axis, training)


@pytest.mark.parametrize("layout", ["swapped", "step", "negative", "broadcast", "readonly"])
def test_parameter_layouts(layout):
    """Per-channel parameters in awkward layouts (and dtypes) are read by value."""
    x, w, b, rm, rv = _case((5, 6, 4), 1, np.float32)
    conv = {
        "swapped": lambda v: v.astype(v.dtype.newbyteorder("S")),
        "step": lambda v: np.repeat(v, 2)[::2],
        "negative": lambda v: v[::-1].copy()[::-1],
        "broadcast": lambda v: np.broadcast_to(v[:1], v.shape),
        "readonly": lambda v: with_layout(v, "readonly"),
    }[layout]
    pw, pb, prm, prv = (conv(v) for v in (w, b, rm, rv))
    run_eval(x, pw, pb, prm, prv, 1)
    run_frozen(x, pw, pb, prm, prv, 1)
    run_train(x, pw, pb, rm.copy(), rv.copy(), 1)
    run_backward(_dy(x), x, pw, 1)


@pytest.mark.parametrize("view", ["contiguous", "step", "negative"])
def test_float16_parameters_read_exactly(view):
    """float16 parameters (widened in C, not by NumPy) have the bits of the same values
    given as float64, including every special value: subnormals, infinities, NaN."""
    x, w, b, rm, rv = _case((5, 6, 4), 1, np.float32)
    bits = np.array([0x0001, 0x03FF, 0x7C00, 0xFC00, 0x7E00, 0x8400], np.uint16)
    special = np.array([6e-8, 65504, -0.0, 1e-5, 2.0, 3.0], np.float16)
    pick = {"contiguous": lambda v: v, "step": lambda v: np.repeat(v, 2)[::2],
            "negative": lambda v: v[::-1].copy()[::-1]}[view]
    for w16, b16 in ((special, bits.view(np.float16)), (w.astype(np.float16),
                                                       b.astype(np.float16))):
        rm16, rv16 = rm.astype(np.float16), (np.abs(rv) + 1).astype(np.float16)
        p16 = [pick(v) for v in (w16, b16, rm16, rv16)]
        p64 = [v.astype(np.float64) for v in (w16, b16, rm16, rv16)]
        with np.errstate(all="ignore"):
            np.testing.assert_array_equal(
                bnfast.batch_norm(x, p16[2], p16[3], p16[0], p16[1], axis=1),
                bnfast.batch_norm(x, p64[2], p64[3], p64[0], p64[1], axis=1))
            np.testing.assert_array_equal(bnfast.batch_norm_train(x, p16[0], p16[1])[0],
                                          bnfast.batch_norm_train(x, p64[0], p64[1])[0])
            _, m, s = bnfast.batch_norm_train(x)
            for got, want in zip(bnfast.batch_norm_backward(_dy(x), x, m, s, p16[0]),
                                 bnfast.batch_norm_backward(_dy(x), x, m, s, p64[0])):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64, np.int8, np.uint16,
                                   np.bool_])
def test_parameter_dtypes(dtype):
    x, w, b, rm, rv = _case((5, 6, 4), 1, np.float32)
    cast = [np.asarray(v, np.float64).round() if np.dtype(dtype).kind in "iub" else v
            for v in (w, b, rm, np.abs(rv) + 1)]
    pw, pb, prm, prv = (v.astype(dtype) for v in cast)
    run_eval(x, pw, pb, prm, prv, 1)
    run_frozen(x, pw, pb, prm, prv, 1)
    run_backward(_dy(x), x, pw, 1)


def test_running_stats_awkward_but_writable():
    """Training updates float32, byte-swapped and strided running stats in place, and
    nothing outside the view."""
    x, w, b, rm, rv = _case((8, 5, 3), 1, np.float32)
    run_train(x, w, b, rm.astype(np.float32), rv.astype(np.float32), 1)
    run_train(x, w, b, rm.astype(">f8"), rv.astype(">f8"), 1)
    prm, prv = np.full(10, 7.0), np.full(10, 9.0)
    prm[::2], prv[::2] = rm, rv
    run_train(x, w, b, prm[::2], prv[::2], 1)
    assert (prm[1::2] == 7.0).all() and (prv[1::2] == 9.0).all()
    prm = np.full(5, 7.0)
    prm[::-1] = rm
    run_train(x, w, b, prm[::-1], rv.copy(), 1)


# ----------------------------------------------------------------------------------
# out= in every writable layout (and nothing written outside the view)

def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _view_byte_mask(view, root):
    start = view.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    idx = np.indices(view.shape).reshape(view.ndim, -1)
    offs = start + (np.asarray(view.strides)[:, None] * idx).sum(0)
    mask = np.zeros(root.nbytes, bool)
    for k in range(view.itemsize):
        mask[offs + k] = True
    return mask


def _check_only_view_written(out, call):
    root = _root(out)
    assert root.flags.c_contiguous or root.flags.f_contiguous
    before = root.ravel(order="K").view(np.uint8).copy()
    result = call()
    after = root.ravel(order="K").view(np.uint8)
    outside = ~_view_byte_mask(out, root)
    assert np.array_equal(before[outside], after[outside]), "bytes outside out= were written"
    return result


OUT_CASES = [((5, 3, 4, 6), 1), ((5, 4, 6, 3), -1), ((40, 7), 1), ((4, 5, 3, 6), 2)]


@pytest.mark.parametrize("out_layout", OUT_LAYOUTS)
@pytest.mark.parametrize("x_layout", ["c", "f", "negative"])
@pytest.mark.parametrize("shape,axis", OUT_CASES)
def test_out_layouts(shape, axis, x_layout, out_layout):
    for dtype in DTYPES:
        x, w, b, rm, rv = _case(shape, axis, dtype, x_layout)
        for fn in (lambda o: run_eval(x, w, b, rm, rv, axis, out=o),
                   lambda o: run_frozen(x, w, b, rm, rv, axis, out=o),
                   lambda o: run_train(x, w, b, rm.copy(), rv.copy(), axis, out=o),
                   lambda o: run_backward(_dy(x), x, w, axis, True, out=o),
                   lambda o: run_backward(_dy(x), x, w, axis, False, out=o)):
            o = out_like(x, out_layout)
            _check_only_view_written(o, lambda: fn(o))


# out= layouts that take other routes than a contiguous output: short runs read as rows
# (NCL, 1x73 runs; (4100, 16, 4): superblocks, dx in pieces; (400, 64, 20): blocks of 25
# and 14 channels, dx in pieces), channels-last rows, runs of 40-128 in cache
# (_cached_runs), longer runs.
SAME_BITS_CASES = [((843, 3, 1, 73), 1), ((60, 117, 9), 1), ((4100, 16, 4), 1),
                   ((400, 64, 20), 1),
                   ((30, 5, 6, 40), -1), ((4, 56, 50), 1), ((16, 8, 40), 1), ((6, 5, 300), 1)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_layout", ["channel_step", "step", "crop", "crop_channels_last",
                                        "f", "negative"])
@pytest.mark.parametrize("shape,axis", SAME_BITS_CASES)
def test_same_bits_whatever_out_layout(shape, axis, out_layout, threads):
    """Where the output goes changes no bit of anything: the statistics, y, dx and the
    parameter gradients with `out=` in any layout are those of the call without it. (An
    output with its channels apart used to shrink the units the reductions merge, and to
    keep channels of short runs in cache from their kernel: mean, invstd and dweight then
    differed in the last bit.)"""
    if not applicable(shape, axis, out_layout):
        pytest.skip("layout not applicable")
    bnfast.set_num_threads(threads)
    try:
        for dtype in (np.float32, np.float64, np.float16):
            offset = OFFSET.get(np.dtype(dtype), 100.0)       # float16: 100 +- a few
            x = make_values(shape, dtype, 0, axis=axis, offset=offset)
            w, b, _, _ = params(shape[axis], np.float64, 0)
            dy = _dy(x)

            def out():
                return with_layout(np.full(x.shape, np.nan, x.dtype), out_layout, axis=axis)

            def same(got, want, what):
                assert got.tobytes() == np.ascontiguousarray(want).tobytes() and \
                    got.shape == want.shape, (what, np.dtype(dtype).name)

            y0, m0, s0 = bnfast.batch_norm_train(x, w, b, axis=axis)
            o = out()
            y1, m1, s1 = bnfast.batch_norm_train(x, w, b, axis=axis, out=o)
            assert y1 is o
            same(np.ascontiguousarray(y1), y0, "y")
            same(m1, m0, "mean")
            same(s1, s0, "invstd")
            for training in (True, False):
                want = bnfast.batch_norm_backward(dy, x, m0, s0, w, axis=axis,
                                                  training=training)
                o = out()
                got = bnfast.batch_norm_backward(dy, x, m0, s0, w, axis=axis,
                                                 training=training, out=o)
                assert got[0] is o
                for g, v, what in zip(got, want, ("dx", "dweight", "dbias")):
                    same(np.ascontiguousarray(g), v, f"{what}, training={training}")
    finally:
        bnfast.set_num_threads(None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_out_non_native_byte_order(dtype):
    """An out of x's dtype in the other byte order is computed into (through a
    temporary), with the bits of the call without it: out=x of a big-endian x too (it
    was refused: "out must have dtype float32, got >f4")."""
    x = make_values((5, 3, 4), dtype, 0, axis=1,
                    offset=OFFSET.get(np.dtype(dtype), 100.0))     # float16: 100 +- a few
    w, b, rm, rv = params(3, np.float64, 0)
    swapped = np.dtype(dtype).newbyteorder("S")
    dy = _dy(x)
    frozen = bnfast.FrozenBatchNorm(rm, rv, w, b, axis=1)
    calls = {
        "eval": lambda a, o: bnfast.batch_norm(a, rm, rv, w, b, axis=1, out=o),
        "frozen": lambda a, o: frozen(a, out=o),
        "train": lambda a, o: bnfast.batch_norm_train(a, w, b, axis=1, out=o)[0],
        "backward": lambda a, o: bnfast.batch_norm_backward(dy, a, rm, 1 / np.sqrt(rv + 1e-5),
                                                            w, axis=1, out=o)[0],
    }
    for name, f in calls.items():
        want = f(x, None)
        o = np.full(x.shape, np.nan, swapped)
        assert f(x, o) is o, name
        assert o.astype(dtype).tobytes() == want.tobytes(), name
        xb = x.astype(swapped)                      # in place, big-endian x
        assert f(xb, xb) is xb, name
        assert xb.astype(dtype).tobytes() == want.tobytes(), name


# ----------------------------------------------------------------------------------
# Array-likes

class ArrayLike:
    def __init__(self, a):
        self.a = np.asarray(a)

    def __array__(self, dtype=None, copy=None):
        return self.a if dtype is None else self.a.astype(dtype)


@pytest.mark.parametrize("kind", ["list", "tuple", "__array__", "memoryview"])
def test_array_likes(kind):
    x64, w, b, rm, rv = _case((6, 3, 4), 1, np.float64)
    conv = {"list": lambda a: a.tolist(),
            "tuple": lambda a: tuple(map(tuple, a)) if a.ndim == 2 else tuple(
                tuple(map(tuple, r)) for r in a),
            "__array__": ArrayLike,
            "memoryview": lambda a: memoryview(np.ascontiguousarray(a))}[kind]
    x = conv(x64)
    pw, pb, prm, prv = (conv(v) if kind != "tuple" else tuple(v) for v in (w, b, rm, rv))
    expect = ref.batch_norm(x64, rm, rv, w, b, axis=1)
    assert_forward_close(bnfast.batch_norm(x, prm, prv, pw, pb, axis=1), expect)
    assert_forward_close(bnfast.FrozenBatchNorm(prm, prv, pw, pb)(x), expect)
    y_ref, m_ref, s_ref = ref.batch_norm_train(x64, w, b)
    y, m, s = bnfast.batch_norm_train(x, pw, pb)
    assert_forward_close(y, y_ref)
    assert_vec_close(m, m_ref, 1e-12)
    dy = conv(_dy(x64))
    dx_ref, *_ = ref.batch_norm_backward(_dy(x64), x64, m_ref, s_ref, w)
    dx, _, _ = bnfast.batch_norm_backward(dy, x, m_ref.tolist(), tuple(s_ref), pw)
    assert_grad_close(dx, dx_ref, scale=_dx_scale(_dy(x64), w, s_ref, dx_ref))
    layer = bnfast.BatchNorm(3, dtype=np.float64)
    rl = ref.BatchNormRef(3, dtype=np.float64)
    assert_forward_close(layer(x), rl(x64))
    assert_grad_close(layer.backward(dy), rl.backward(_dy(x64)))


def test_integer_input_becomes_float64():
    rng = np.random.default_rng(3)
    for dtype in (np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64, np.bool_):
        xi = rng.integers(0, 2 if dtype == np.bool_ else 100, (7, 4, 3)).astype(dtype)
        w, b, rm, rv = params(4)
        y = run_eval(xi, w, b, rm, rv, 1)
        assert y.dtype == np.float64
        run_frozen(xi, w, b, rm, rv, 1)
        xi[0, :, 0] = 1     # no constant channel for bool
        xi[1, :, 0] = 0
        run_train(xi, w, b, rm.copy(), rv.copy(), 1)
        run_backward(xi, xi, w, 1)
        layer = bnfast.BatchNorm(4, dtype=np.float32)
        assert layer(xi).dtype == np.float64


def test_integer_input_with_out():
    xi = np.arange(24, dtype=np.int32).reshape(4, 3, 2)
    w, b, rm, rv = params(3)
    o = np.full(xi.shape, np.nan)
    assert bnfast.batch_norm(xi, rm, rv, w, b, out=o) is o
    assert_forward_close(o, ref.batch_norm(xi, rm, rv, w, b))
    with pytest.raises(TypeError, match=r"\bout\b"):
        bnfast.batch_norm(xi, rm, rv, w, b, out=np.zeros(xi.shape, np.int32))


# ----------------------------------------------------------------------------------
# float16: read and written as it is, computed as float32 data are (in double, rounded to
# float32), then rounded to float16

def _assert_f16_close(y, expect):
    """Within half a float16 ulp of the float64 reference, plus float32 rounding."""
    assert y.dtype == np.float16
    e = np.asarray(expect, np.float64)
    ulp = np.spacing(np.abs(e).astype(np.float16)).astype(np.float64)
    tol = 0.5 * ulp + 2e-6 * np.maximum(1.0, np.abs(e))
    err = np.abs(y.astype(np.float64) - e)
    assert np.all(err <= tol), f"float16 output off by up to {np.max(err / tol):.3g} x tol"


@pytest.mark.parametrize("shape,axis", [((6, 3, 5, 4), 1), ((6, 5, 4, 3), -1), ((300, 8), 1)])
@pytest.mark.parametrize("layout", ["c", "f", "step", "swapped"])
def test_float16(shape, axis, layout):
    base = make_values(shape, np.float16, 5, axis=axis, offset=0.0)
    x = with_layout(base, layout, axis=axis)
    C = shape[axis]
    w, b, rm, rv = params(C)
    snap = snapshot(x, w, b, rm, rv)
    _assert_f16_close(bnfast.batch_norm(x, rm, rv, w, b, axis=axis),
                      ref.batch_norm(x, rm, rv, w, b, axis=axis))
    _assert_f16_close(bnfast.FrozenBatchNorm(rm, rv, w, b, axis=axis)(x),
                      ref.frozen_batch_norm(x, rm, rv, w, b, axis=axis))
    y_ref, m_ref, s_ref = ref.batch_norm_train(x, w, b, axis=axis)
    rmt, rvt = rm.astype(np.float16), rv.astype(np.float16)
    y, m, s = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rmt, running_var=rvt)
    _assert_f16_close(y, y_ref)
    assert m.dtype == np.float64
    assert_vec_close(m, m_ref, 1e-12, "mean of float16 data")
    assert_vec_close(s, s_ref, 1e-9, "invstd of float16 data")
    assert rmt.dtype == np.float16
    dy = _dy(x).astype(np.float16)
    dx_ref, dw_ref, db_ref = ref.batch_norm_backward(dy, x, m_ref, s_ref, w, axis=axis)
    dx, dw, db = bnfast.batch_norm_backward(dy, x, m_ref, s_ref, w, axis=axis)
    assert dx.dtype == np.float16
    assert_grad_close(dx, dx_ref, dtype=np.float16)
    o = np.full(x.shape, np.nan, np.float16)
    assert bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=o) is o
    _assert_f16_close(o, ref.batch_norm(x, rm, rv, w, b, axis=axis))
    assert_unchanged(snap, "float16 calls")


# Each kernel form with float16 (runs, rows, flat rows, short runs as rows, folded narrow
# rows, rows wider than a chunk), price-like data, with and without streamed stores.
F16_PATHS = [((6, 16, 28, 28), 1), ((3000, 64), -1), ((4, 64, 7, 7), 1), ((5000, 3), -1),
             ((40, 7, 300), 1), ((30, 1500), -1), ((9, 28, 28, 16), -1)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("shape,axis", F16_PATHS)
def test_float16_kernels(shape, axis, stream):
    from bnfast._core import _set_stream_bytes
    x = make_values(shape, np.float16, 7, axis=axis, offset=100.0)
    C = shape[axis]
    w, b, rm, rv = params(C)
    rm = rm + 100.0
    dy = _dy(x).astype(np.float16)
    old = _set_stream_bytes(0 if stream else 1 << 62)
    try:
        y = bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=np.empty_like(x))
        # the float32 computation, rounded to float16: the same bits
        y32 = bnfast.batch_norm(x.astype(np.float32), rm, rv, w, b, axis=axis)
        assert y.tobytes() == y32.astype(np.float16).tobytes()
        _assert_f16_close(y, ref.batch_norm(x, rm, rv, w, b, axis=axis))
        yt, m, s = bnfast.batch_norm_train(x, w, b, axis=axis, out=np.empty_like(x))
        y_ref, m_ref, s_ref = ref.batch_norm_train(x, w, b, axis=axis)
        _assert_f16_close(yt, y_ref)
        assert_vec_close(m, m_ref, 1e-12, "mean of float16 data")
        assert_vec_close(s, s_ref, 1e-9, "invstd of float16 data")
        dx, dw, db = bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis,
                                                out=np.empty_like(x))
        dx_ref, dw_ref, db_ref = ref.batch_norm_backward(dy, x, m_ref, s_ref, w, axis=axis)
        assert dx.dtype == dw.dtype == db.dtype == np.float16
        assert_grad_close(dx, dx_ref, dtype=np.float16)
        assert_grad_close(dw, dw_ref, dtype=np.float16, what="dweight")
        assert_grad_close(db, db_ref, dtype=np.float16, what="dbias")
    finally:
        _set_stream_bytes(old)


@pytest.mark.parametrize("x_dtype,dy_dtype", [(np.float16, np.float32),
                                              (np.float16, np.float64),
                                              (np.float32, np.float64)])
@pytest.mark.parametrize("training", [True, False])
def test_x_narrower_than_dy(x_dtype, dy_dtype, training):
    """dy is not rounded to x's dtype: the gradient is computed in dy's, x widened (exact),
    and the results rounded to x's dtype; with out= too."""
    x = make_values((50, 6, 9), x_dtype, 3, offset=100.0)
    dy = _dy(x).astype(dy_dtype) * dy_dtype(1 + 2 ** -13)   # bits x's dtype lacks
    w = params(6)[0]
    _, m, s = bnfast.batch_norm_train(x, w)
    dx, dw, db = bnfast.batch_norm_backward(dy, x, m, s, w, training=training)
    assert dx.dtype == dw.dtype == db.dtype == x_dtype
    wide = bnfast.batch_norm_backward(dy, x.astype(dy_dtype), m, s, w, training=training)
    for got, want in zip((dx, dw, db), wide):
        assert got.tobytes() == want.astype(x_dtype).tobytes()
    out = np.full_like(x, np.nan)
    assert bnfast.batch_norm_backward(dy, x, m, s, w, training=training, out=out)[0] is out
    assert out.tobytes() == dx.tobytes()
    dx_ref = ref.batch_norm_backward(dy, x, m, s, w, training=training)[0]
    assert_grad_close(dx, dx_ref, dtype=x_dtype)


def test_float64_dy_sums_not_rounded_to_float32():
    """A float32 x with a float64 dy: sum(dy) = 1.75 exactly, which float32 holds; with dy
    rounded to float32 first it came out 0.75 (1e8 + 1 is not a float32)."""
    x = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)
    dy = np.array([[1e8 + 1], [-1e8], [0.5], [0.25]])
    dx, dw, db = bnfast.batch_norm_backward(dy, x, np.array([1.5]), np.array([1.0]),
                                            training=False)
    assert db.dtype == np.float32 and db[0] == 1.75
    assert dw[0] == np.float32((1e8 + 1) * -1.5 + 1e8 * 0.5 + 0.5 * 0.5 + 0.25 * 1.5)


def test_float16_frozen_rows():
    """FrozenBatchNorm's one-call path for small (rows, C) arrays takes float16 too."""
    rng = np.random.default_rng(4)
    w, b, rm, rv = params(24)
    f = bnfast.FrozenBatchNorm(rm, rv, w, b, axis=-1)
    for rows in (1, 3, 40):
        x = rng.standard_normal((rows, 24)).astype(np.float16)
        y = f(x)
        assert y.dtype == np.float16
        assert y.tobytes() == f(x.astype(np.float32)).astype(np.float16).tobytes()
        o = np.empty_like(x)
        assert f(x, out=o) is o and o.tobytes() == y.tobytes()


def test_float16_in_place():
    x = make_values((8, 4, 6), np.float16, 2)
    w, b, rm, rv = params(4)
    expect = ref.batch_norm(x, rm, rv, w, b)
    assert bnfast.batch_norm(x, rm, rv, w, b, out=x) is x
    _assert_f16_close(x, expect)
    x = make_values((8, 4, 6), np.float16, 2)
    expect = ref.batch_norm_train(x)[0]
    assert bnfast.batch_norm_train(x, out=x)[0] is x
    _assert_f16_close(x, expect)


# ----------------------------------------------------------------------------------
# Empty batch in eval (and zero-size non-channel axes)

@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3), -1), ((0, 3, 4), 1),
                                        ((2, 3, 0), 1), ((0, 4, 5, 3), -1), ((4, 0, 3), -1)])
def test_empty_batch_eval(shape, axis):
    C = shape[axis]
    w, b, rm, rv = params(C)
    for dtype in (np.float32, np.float64, np.float16):
        x = np.zeros(shape, dtype)
        y = bnfast.batch_norm(x, rm, rv, w, b, axis=axis)
        assert y.shape == shape and y.dtype == dtype
        y = bnfast.FrozenBatchNorm(rm, rv, w, b, axis=axis)(x)
        assert y.shape == shape and y.dtype == dtype
        o = np.zeros(shape, dtype)
        assert bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=o) is o
        layer = bnfast.BatchNorm(C, axis=axis).eval()
        assert layer(x).shape == shape
        dx, dw, db = bnfast.batch_norm_backward(x, x, rm, 1 / np.sqrt(rv), w, axis=axis,
                                                training=False)
        assert dx.shape == shape
        np.testing.assert_array_equal(dw, 0)
        np.testing.assert_array_equal(db, 0)
        assert layer.backward(x).shape == shape
        np.testing.assert_array_equal(layer.grad_bias, 0)
        # eval without running statistics normalizes by the batch's (as torch's): an
        # empty batch comes back empty too, not refused as in training
        layer = bnfast.BatchNorm(C, axis=axis, track_running_stats=False,
                                 dtype=dtype).eval()
        y = layer(x)
        assert y.shape == shape and y.dtype == dtype
        assert layer.backward(x).shape == shape
        np.testing.assert_array_equal(layer.grad_weight, 0)
        np.testing.assert_array_equal(layer.grad_bias, 0)
        with pytest.raises(ValueError, match="empty batch"):
            layer.train()(x)


@pytest.mark.parametrize("shape,axis", [((4, 0), 1), ((4, 0), -1), ((3, 0, 5), 1),
                                        ((2, 3, 4, 0), -1), ((0, 0), 1)])
def test_no_channels(shape, axis):
    # a zero-length channel axis: empty results of the right shapes, never a crash (the
    # work planner once divided by the channel count)
    x = np.zeros(shape, np.float32)
    z = np.zeros(0)
    y, m, s = bnfast.batch_norm_train(x, axis=axis)
    assert y.shape == shape and m.shape == (0,) and s.shape == (0,)
    assert bnfast.batch_norm(x, z, z + 1, axis=axis).shape == shape
    assert bnfast.batch_norm(x, z, z + 1, training=True, axis=axis).shape == shape
    for training in (True, False):
        dx, dw, db = bnfast.batch_norm_backward(x, x, z, z + 1, training=training, axis=axis)
        assert dx.shape == shape and dw.shape == (0,) and db.shape == (0,)
    mo = bnfast.moments(x, axis=axis)
    assert mo.count.shape == (0,)


# ----------------------------------------------------------------------------------
# In place (out=x) for every writable x layout

# small shapes in every writable layout; large ones (threads, channels of > 1 MiB split
# into several units) in a few
INPLACE_CASES = [(s, a, lay) for s, a in [((5, 3, 4, 6), 1), ((5, 4, 6, 3), -1), ((40, 7), 1)]
                 for lay in OUT_LAYOUTS] + \
    [(s, a, lay) for s, a in [((3, 70000), 1), ((1, 2, 600, 600), 1), ((30000, 20), -1)]
     for lay in ("c", "f", "negative_some", "channels_last")]


@pytest.mark.parametrize("shape,axis,layout", INPLACE_CASES)
def test_in_place(shape, axis, layout):
    dtype = np.float32
    x0, w, b, rm, rv = _case(shape, axis, dtype, "c")
    for fn in ("eval", "frozen", "train", "bwd_train", "bwd_eval"):
        x = with_layout(x0, layout, axis=axis)
        if fn == "eval":
            expect = ref.batch_norm(x0, rm, rv, w, b, axis=axis)
            y = _check_only_view_written(
                x, lambda: bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=x))
        elif fn == "frozen":
            expect = ref.frozen_batch_norm(x0, rm, rv, w, b, axis=axis)
            f = bnfast.FrozenBatchNorm(rm, rv, w, b, axis=axis)
            y = _check_only_view_written(x, lambda: f(x, out=x))
        elif fn == "train":
            expect, m_ref, _ = ref.batch_norm_train(x0, w, b, axis=axis)
            y, m, _ = _check_only_view_written(
                x, lambda: bnfast.batch_norm_train(x, w, b, axis=axis, out=x))
            assert_vec_close(m, m_ref, 1e-12)
        else:
            training = fn == "bwd_train"
            mean, var, _ = ref.batch_stats(x0, axis)
            invstd = 1 / np.sqrt(var + 1e-5)
            dy0 = _dy(x0)
            dy = with_layout(dy0, layout, axis=axis)
            expect = ref.batch_norm_backward(dy0, x0, mean, invstd, w, training=training,
                                             axis=axis)[0]
            y = _check_only_view_written(dy, lambda: bnfast.batch_norm_backward(
                dy, x, mean, invstd, w, training=training, axis=axis, out=dy))[0]
            assert y is dy
            assert_grad_close(y, expect, what=f"{fn} in place",
                              scale=_dx_scale(dy0, w, invstd, expect))
            continue
        assert y is x
        assert_forward_close(y, expect, what=f"{fn} in place")


def test_in_place_backward_out_is_x():
    """out=x in backward: dx overwrites the forward input it is computed from."""
    x0, w, *_ = _case((6, 3, 40), 1, np.float32)
    mean, var, _ = ref.batch_stats(x0, 1)
    invstd = 1 / np.sqrt(var + 1e-5)
    dy = _dy(x0)
    for training in (True, False):
        x = x0.copy()
        expect = ref.batch_norm_backward(dy, x0, mean, invstd, w, training=training)[0]
        dx = bnfast.batch_norm_backward(dy, x, mean, invstd, w, training=training, out=x)[0]
        assert dx is x
        assert_grad_close(dx, expect, scale=_dx_scale(dy, w, invstd, expect))


def test_layer_in_place_then_backward():
    """A training layer called with out=x keeps what backward needs."""
    x0, *_ = _case((16, 4, 5), 1, np.float32)
    x = x0.copy()
    layer = bnfast.BatchNorm(4)
    rl = ref.BatchNormRef(4)
    y = layer(x, out=x)
    assert y is x
    assert_forward_close(y, rl(x0))
    dy = _dy(x0)
    assert_grad_close(layer.backward(dy), rl.backward(dy))


# ----------------------------------------------------------------------------------
# Partially overlapping out: computed correctly (README: "an `out` that partially
# overlaps an input is handled through a temporary"), never refused, never garbage

def _overlap_pairs(shape, dtype):
    """(x, out) pairs sharing memory without being the same view."""
    n = int(np.prod(shape))
    C = shape[1]
    pairs = []
    for k in (1, C, n // 2, n - 1):
        buf = np.empty(n + k, dtype)
        pairs.append((f"out=x+{k}", buf[:n].reshape(shape), buf[k:].reshape(shape)))
        buf = np.empty(n + k, dtype)
        pairs.append((f"out=x-{k}", buf[k:].reshape(shape), buf[:n].reshape(shape)))
    # same first element, other strides
    root = np.empty((shape[0], 2 * int(np.prod(shape[1:]))), dtype)
    flat = int(np.prod(shape[1:]))
    pairs.append(("same-ptr-strided", root[:, :flat].reshape(shape),
                  root[:, ::2].reshape(shape)))
    # reversed view of the same memory
    buf = np.empty(n, dtype)
    pairs.append(("reversed", buf.reshape(shape), buf[::-1].reshape(shape)))
    # transposed view of the same memory (square non-channel/channel plane)
    if len(shape) == 2 and shape[0] == shape[1]:
        buf = np.empty(shape, dtype)
        pairs.append(("transposed", buf, buf.T))
    for label, x, out in pairs:     # a reshape that copied would test no overlap at all
        assert np.shares_memory(x, out), label
        assert x.__array_interface__ != out.__array_interface__, label
    return pairs


OVERLAP_SHAPES = [((6, 6), 1), ((6, 6), -1), ((2, 8), -1), ((5, 3, 7), 1), ((4, 5, 6, 3), -1),
                  ((64, 64), -1), ((300, 300), 1), ((4, 4, 96, 96), 1)]


@pytest.mark.parametrize("shape,axis", OVERLAP_SHAPES)
def test_partially_overlapping_out(shape, axis):
    rng = np.random.default_rng(11)
    C = shape[axis]
    w, b, rm, rv = params(C)
    f = bnfast.FrozenBatchNorm(rm, rv, w, b, axis=axis)
    computed, cases = 0, 0
    for dtype in DTYPES:
        for fn in ("eval", "frozen", "train", "bwd_train", "bwd_eval"):
            for label, x, out in _overlap_pairs(shape, dtype):
                cases += 1
                x[...] = rng.standard_normal(shape) + 1000.0
                x0 = x.copy()
                what = f"{fn} {label} {np.dtype(dtype).name}"
                # no try/except: the README promises these are computed through a
                # temporary, so a ValueError (a refusal) fails the test
                if fn == "eval":
                    got = bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=out)
                    expect = ref.batch_norm(x0, rm, rv, w, b, axis=axis)
                elif fn == "frozen":
                    got = f(x, out=out)
                    expect = ref.frozen_batch_norm(x0, rm, rv, w, b, axis=axis)
                elif fn == "train":
                    got = bnfast.batch_norm_train(x, w, b, axis=axis, out=out)[0]
                    expect = ref.batch_norm_train(x0, w, b, axis=axis)[0]
                else:
                    training = fn == "bwd_train"
                    mean, var, _ = ref.batch_stats(x0, axis)
                    s = 1 / np.sqrt(var + 1e-5)
                    dy = (rng.standard_normal(shape)).astype(dtype)
                    # out overlaps x (the forward input) here
                    got = bnfast.batch_norm_backward(dy, x, mean, s, w, training=training,
                                                     axis=axis, out=out)[0]
                    expect = ref.batch_norm_backward(dy, x0, mean, s, w,
                                                     training=training, axis=axis)[0]
                assert got is out, what
                if fn.startswith("bwd"):
                    assert_grad_close(got, expect, what=what,
                                      scale=_dx_scale(dy, w, s, expect))
                else:
                    assert_forward_close(got, expect, what=what)
                computed += 1
    # every case was computed and checked: none skipped
    assert cases >= len(DTYPES) * 5 * 10 and computed == cases, (computed, cases)


@pytest.mark.parametrize("shape,axis", [((5, 3, 7), 1), ((64, 64), -1), ((4, 4, 96, 96), 1)])
def test_backward_out_overlapping_dy(shape, axis):
    rng = np.random.default_rng(12)
    C = shape[axis]
    w = params(C)[0]
    x = rng.standard_normal(shape) + 50.0
    mean, var, _ = ref.batch_stats(x, axis)
    s = 1 / np.sqrt(var + 1e-5)
    computed, cases = 0, 0
    for training in (True, False):
        for label, dy, out in _overlap_pairs(shape, np.float64):
            cases += 1
            dy[...] = rng.standard_normal(shape)
            dy0 = dy.copy()
            expect = ref.batch_norm_backward(dy0, x, mean, s, w, training=training, axis=axis)[0]
            # an out overlapping dy is promised to be computed: a refusal fails here
            got = bnfast.batch_norm_backward(dy, x, mean, s, w, training=training,
                                             axis=axis, out=out)[0]
            assert got is out
            assert_grad_close(got, expect, what=f"backward {label}",
                              scale=_dx_scale(dy0, w, s, expect))
            computed += 1
    assert cases >= 2 * 10 and computed == cases, (computed, cases)


# ----------------------------------------------------------------------------------
# NaN and inf stay in their element (eval) or their channel (training)

NAN_SHAPES = [((6, 5, 4, 3), 1), ((64, 300), -1), ((6, 4, 5, 300), -1), ((2, 3, 400, 400), 1),
              ((20000, 64), -1), ((300000, 3), 0 + 1)]


def _poison(x, axis, rng):
    """Put NaN, +inf and -inf into three elements of channels 0 and (if any) 2."""
    x = x.copy()
    C = x.shape[axis]
    ax = axis % x.ndim
    pos = []
    for c, v in zip((0, 0, min(2, C - 1)), (np.nan, np.inf, -np.inf)):
        idx = [int(rng.integers(0, s)) for s in x.shape]
        idx[ax] = c
        x[tuple(idx)] = v
        pos.append(tuple(idx))
    return x, sorted({p[ax] for p in pos})


@pytest.mark.parametrize("shape,axis", NAN_SHAPES)
def test_nonfinite_eval_stays_in_element(shape, axis):
    rng = np.random.default_rng(21)
    for dtype in DTYPES:
        x, w, b, rm, rv = _case(shape, axis, dtype)
        x, _ = _poison(x, axis, rng)
        expect = ref.batch_norm(x, rm, rv, w, b, axis=axis)   # elementwise: same positions
        assert (~np.isfinite(expect)).sum() == 3
        snap = snapshot(x, w, b, rm, rv)
        assert_close_nonfinite(bnfast.batch_norm(x, rm, rv, w, b, axis=axis), expect)
        assert_close_nonfinite(bnfast.FrozenBatchNorm(rm, rv, w, b, axis=axis)(x), expect)
        assert_unchanged(snap, "eval with NaN/inf")
        # backward with statistics held fixed: dx = dy * scale, elementwise
        dy = x.copy()
        dx = bnfast.batch_norm_backward(dy, np.zeros_like(x), rm, 1 / np.sqrt(rv + 1e-5), w,
                                        training=False, axis=axis)[0]
        assert_close_nonfinite(dx, ref.batch_norm_backward(
            dy, np.zeros_like(x), rm, 1 / np.sqrt(rv + 1e-5), w, training=False,
            axis=axis)[0])


@pytest.mark.parametrize("shape,axis", NAN_SHAPES)
def test_nonfinite_training_stays_in_channel(shape, axis):
    rng = np.random.default_rng(22)
    for dtype in DTYPES:
        x, w, b, rm, rv = _case(shape, axis, dtype)
        x, bad = _poison(x, axis, rng)
        C = x.shape[axis]
        good = [c for c in range(C) if c not in bad]
        ax = axis % x.ndim
        take = lambda a: np.take(a, good, axis=ax)      # noqa: E731
        rm1, rv1 = rm.copy(), rv.copy()
        y, m, s = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm1, running_var=rv1)
        rm2, rv2 = rm[good], rv[good]          # fancy indexing: copies
        y_ref, m_ref, s_ref = ref.batch_norm_train(take(x), w[good], b[good], axis=axis,
                                                   running_mean=rm2, running_var=rv2)
        # the clean channels are exactly as if the poisoned ones did not exist
        assert_forward_close(take(y), y_ref, what="clean channels")
        assert_vec_close(m[good], m_ref, 1e-12, "mean of clean channels")
        assert_vec_close(s[good], s_ref, 1e-9, "invstd of clean channels")
        assert_vec_close(rm1[good], rm2, 1e-12, "running_mean of clean channels")
        assert_vec_close(rv1[good], rv2, 1e-9, "running_var of clean channels")
        # the poisoned channels are not silently finite
        mask = channel_mask(x.shape, axis, bad)
        assert not np.isfinite(y[mask]).all()
        assert not np.isfinite(m[bad]).any() or not np.isfinite(s[bad]).any()
        # backward: a NaN in dy stays in its channel (training) / element (eval)
        mean, var, _ = ref.batch_stats(np.where(mask, 0.0, x), axis)
        s0 = 1 / np.sqrt(var + 1e-5)
        dy = np.where(np.isfinite(x), _dy(x), x).astype(x.dtype)
        xc = np.where(np.isfinite(x), x, 0.0).astype(x.dtype)
        dx, dw, db = bnfast.batch_norm_backward(dy, xc, mean, s0, w, axis=axis)
        dx_ref, dw_ref, db_ref = ref.batch_norm_backward(take(dy), take(xc), mean[good],
                                                         s0[good], w[good], axis=axis)
        assert_grad_close(take(dx), dx_ref, what="dx of clean channels",
                          scale=_dx_scale(take(dy), w[good], s0[good], dx_ref))
        assert_grad_close(dw[good], dw_ref, what="dweight of clean channels")
        assert_grad_close(db[good], db_ref, what="dbias of clean channels")
        assert not np.isfinite(dx[mask]).all()
        assert not np.isfinite(db[bad]).all()


# ----------------------------------------------------------------------------------
# A channel holding an infinity has np.mean's mean, wherever the infinity falls

INF_SHAPES = [((16, 3), 1), ((300000, 3), 1), ((20000, 64), -1), ((2, 3, 400, 400), 1),
              ((64, 8, 7, 7), 1), ((8, 4, 5, 300), -1), ((4, 16, 56, 56), 1),
              ((16, 4, 96, 96), 1)]


def _infinities(x, axis, rng):
    """+inf in channel 0 (a random element and the last), -inf first in channel 1, and
    +inf and -inf in channel 2: the three channels np.mean makes +inf, -inf and NaN."""
    x = x.copy()
    ax = axis % x.ndim
    first = [0] * x.ndim
    last = [s - 1 for s in x.shape]
    rand = lambda: [int(rng.integers(0, s)) for s in x.shape]   # noqa: E731
    for c, idx, v in ((0, rand(), np.inf), (0, last, np.inf), (1, first, -np.inf),
                      (2, last, np.inf), (2, rand(), -np.inf)):
        idx = list(idx)
        idx[ax] = c
        x[tuple(idx)] = v
    return x


@pytest.mark.parametrize("shape,axis", INF_SHAPES)
def test_channel_holding_an_infinity_has_numpys_mean(shape, axis):
    """The mean of a channel holding infinities is np.mean's (and PyTorch's): the
    infinity, or NaN where +inf and -inf meet; its variance is NaN, as np.var's. Checked
    for the training outputs, the running mean, `moments` and the merges of parts
    (merge_moments and the distributed layer's), one and two threads, plain loops and
    intrinsics. The sums about the mean so far once took x - inf there, and the mean
    came out NaN in all but the smallest arrays (also with the infinity first in the
    channel, the sums' first shift)."""
    from bnfast import _core
    rng = np.random.default_rng(23)
    ax = axis % len(shape)
    others = tuple(i for i in range(len(shape)) if i != ax)
    levels = sorted({0, _core._set_simd_level(None)})
    for dtype in (np.float32, np.float64):
        x, w, b, rm, rv = _case(shape, axis, dtype)
        x = _infinities(x, axis, rng)
        n = x.size // shape[ax]
        with np.errstate(invalid="ignore"):
            want = np.add.reduce(x.astype(np.float64), axis=others)[:3] / n
            want_rm = 0.9 * rm[:3].astype(np.float64) + 0.1 * want
        assert np.array_equal(want, [np.inf, -np.inf, np.nan], equal_nan=True)
        half = shape[0] // 2 if ax != 0 else None
        parts = (x[:half], x[half:]) if half else None
        try:
            for level in levels:
                _core._set_simd_level(level)
                for threads in (1, 2):
                    bnfast.set_num_threads(threads)
                    what = (np.dtype(dtype).name, level, threads)
                    rm1, rv1 = rm.copy(), rv.copy()
                    _, mean, invstd = bnfast.batch_norm_train(
                        x, w, b, axis=axis, running_mean=rm1, running_var=rv1)
                    assert np.array_equal(mean[:3], want, equal_nan=True), (what, mean[:3])
                    assert np.isnan(invstd[:3]).all() and np.isnan(rv1[:3]).all(), what
                    assert np.array_equal(rm1[:3], want_rm.astype(rm1.dtype),
                                          equal_nan=True), (what, rm1[:3])
                    m = bnfast.moments(x, axis=axis)
                    assert np.array_equal(m.mean[:3], want, equal_nan=True), (what, m.mean[:3])
                    assert np.isnan(m.var[:3]).all(), what
                    if parts is None:
                        continue
                    merged = bnfast.merge_moments(*(bnfast.moments(p, axis=axis)
                                                    for p in parts))
                    assert np.array_equal(merged.mean[:3], want, equal_nan=True), what
                    assert np.isnan(merged.var[:3]).all(), what
                    # the distributed layer's merge of the kernels' (count, hi, lo, m2)
                    rows = np.stack([_core._moments(p, axis).T.ravel() for p in parts])
                    packed = _core._merge_packed_rows(rows)
                    assert np.array_equal(packed[1][:3], want, equal_nan=True), what
                    assert np.isnan(packed[2][:3]).all(), what
        finally:
            _core._set_simd_level(levels[-1])
            bnfast.set_num_threads(None)


# ----------------------------------------------------------------------------------
# A million channels

@pytest.mark.parametrize("shape,axis", [((2, 10**6), -1), ((3, 10**6), 1)])
def test_million_channels(shape, axis):
    x, w, b, rm, rv = _case(shape, axis, np.float32)
    run_eval(x, w, b, rm, rv, axis)
    run_frozen(x, w, b, rm, rv, axis)
    run_train(x, w, b, rm.copy(), rv.copy(), axis)
    run_backward(_dy(x), x, w, axis, True)
    run_backward(_dy(x), x, w, axis, False)


def test_million_channels_4d():
    """Channels last with a million channels and a spatial extent (rows form)."""
    x, w, b, rm, rv = _case((2, 1, 2, 10**6), -1, np.float32)
    run_train(x, w, b, rm.copy(), rv.copy(), -1)
    run_frozen(x, w, b, rm, rv, -1)


# ----------------------------------------------------------------------------------
# More than 2**31 elements: 64-bit indexing (opt-in: BNFAST_SLOW_TESTS=1, ~9.5 GB RAM)

SLOW = pytest.mark.skipif(os.environ.get("BNFAST_SLOW_TESTS") != "1",
                          reason="needs ~9.5 GB of RAM and ~3 minutes: set BNFAST_SLOW_TESTS=1")


def _chunks(n, size=1 << 26):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@pytest.mark.skipif(sys.platform != "linux", reason="needs a sparse file (Linux)")
@pytest.mark.parametrize("axis", [1, 0], ids=["rows", "runs"])
def test_byte_offsets_beyond_2_31(tmp_path, axis):
    """The everyday stand-in for the test below: rows 2**31 + 64 elements (8 GB) apart in
    a sparse memory-mapped file (a few pages touched, no RAM), read and written in place.
    axis=1: rows form, rows that far apart; axis=0: four channels of runs that far
    apart. An offset computed in 32 bits (elements or bytes) would read or write
    elsewhere."""
    C, rows = 64, 4
    step = (1 << 31) // C + 1
    mm = np.memmap(tmp_path / "sparse.bin", dtype=np.float32, mode="w+",
                   shape=(rows * step, C))
    x, out = mm[::step], mm[1::step]
    assert x.strides[0] // 4 > 1 << 31 and x.shape == out.shape == (rows, C)
    x[...] = np.arange(rows * C, dtype=np.float32).reshape(rows, C) * 0.5 + 100
    xc = np.ascontiguousarray(x)
    y, m, s = bnfast.batch_norm_train(x, axis=axis, out=out)
    yc, mc, sc = bnfast.batch_norm_train(xc, axis=axis)
    assert y is out
    np.testing.assert_array_equal(out, yc)
    np.testing.assert_array_equal(m, mc)
    dy = np.linspace(-1, 1, rows * C, dtype=np.float32).reshape(rows, C)
    for got, want in zip(bnfast.batch_norm_backward(dy, x, m, s, axis=axis, out=out),
                         bnfast.batch_norm_backward(dy, xc, m, s, axis=axis)):
        np.testing.assert_array_equal(got, want)
    var = 1 / sc ** 2
    bnfast.batch_norm(x, mc, var, axis=axis, out=out)
    np.testing.assert_array_equal(out, bnfast.batch_norm(xc, mc, var, axis=axis))
    del x, out, mm


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("form", ["runs", "rows"])
def test_more_than_2_31_elements(form):
    """Train forward, eval and backward, all in place on a float32 array of 2**31 + 1024
    elements whose values are known analytically: +-1 alternating with a distinct tail
    beyond element 2**31. A 32-bit index anywhere reads or writes the wrong elements."""
    gc.collect()
    if form == "runs":
        # one channel, one contiguous run of 2**31 + 1024 elements
        n, C = 2**31 + 1024, 1
        shape, axis = (n, 1), 1
    else:
        # (rows, 64) channels last: row offsets beyond 2**31 elements
        C = 64
        n = 2**31 + 1024 * C
        shape, axis = (n // C, C), -1
    rows = n // C
    x = np.empty(shape, np.float32)
    flat = x.reshape(-1)
    tail = 1024 * C if form == "rows" else 1024
    body = n - tail                   # even number of rows/elements of +-1
    # body: -1, +1 alternating along the channel's elements; tail: a ramp per channel
    if form == "runs":
        for sl in _chunks(body):
            v = flat[sl]
            v[0::2] = -1.0
            v[1::2] = 1.0
        t = (3.0 + 0.25 * np.arange(tail)).astype(np.float32)
        flat[body:] = t
        tails = [t.astype(np.float64)]
    else:
        for sl in _chunks(body // C, 1 << 20):
            blk = x[sl]
            blk[0::2] = -1.0
            blk[1::2] = 1.0
        tr = (3.0 + 0.25 * np.arange(1024)[:, None] + 0.5 * np.arange(C)[None, :])
        x[rows - 1024:] = tr.astype(np.float32)
        tails = [tr[:, c] for c in range(C)]
    nb = body // C                    # body elements per channel
    # analytic statistics per channel (float64)
    mean = np.array([t.sum() / (n // C) for t in tails])
    m2 = np.array([nb * (1.0 + mu * mu) + ((t - mu) ** 2).sum() for t, mu in zip(tails, mean)])
    var = m2 / (n // C)
    eps = 1.0
    invstd = 1.0 / np.sqrt(var + eps)

    def check(fn_body, fn_tail, what, rtol=1e-6):
        # body: the two values alternate; check every element in chunks
        if form == "runs":
            for sl in _chunks(body):
                v = flat[sl]
                for par, val in ((0, -1.0), (1, 1.0)):
                    e = fn_body(val, 0)
                    got = v[par::2]
                    err = np.max(np.abs(got.astype(np.float64) - e))
                    assert err <= rtol * max(1, abs(e)), f"{what}: body off by {err} at {sl}"
            got = flat[body:].astype(np.float64)
            e = fn_tail(tails[0], 0)
        else:
            e_m = np.array([fn_body(-1.0, c) for c in range(C)])
            e_p = np.array([fn_body(1.0, c) for c in range(C)])
            for sl in _chunks(nb, 1 << 20):
                blk = x[sl].astype(np.float64)
                err = max(np.max(np.abs(blk[0::2] - e_m)), np.max(np.abs(blk[1::2] - e_p)))
                assert err <= rtol * max(1, np.abs(e_m).max(), np.abs(e_p).max()), \
                    f"{what}: body off by {err} in rows {sl}"
            got = x[rows - 1024:].astype(np.float64)
            e = np.stack([fn_tail(tails[c], c) for c in range(C)], axis=1)
        err = np.abs(got - e)
        assert np.all(err <= rtol * np.maximum(1, np.abs(e))), \
            f"{what}: tail off by {err.max()}"

    # 1. training forward in place
    rm, rv = np.zeros(C), np.ones(C)
    y, m, s = bnfast.batch_norm_train(x, eps=eps, axis=axis, out=x, running_mean=rm,
                                      running_var=rv, momentum=1.0)
    assert y is x
    np.testing.assert_allclose(m, mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s, invstd, rtol=1e-10)
    np.testing.assert_allclose(rv, var * (n // C) / (n // C - 1), rtol=1e-10)
    check(lambda v, c: (v - mean[c]) * invstd[c], lambda t, c: (t - mean[c]) * invstd[c],
          "train forward")
    # x now holds xhat = (x - mean) * invstd. 2. eval in place with known statistics
    fm, fv = np.full(C, 0.5), np.full(C, 3.0)
    f = bnfast.FrozenBatchNorm(fm, fv, np.full(C, 2.0), np.full(C, -1.0), eps=1.0, axis=axis)
    assert f(x, out=x) is x

    def ev(v, c):
        return (v - 0.5) / 2.0 * 2.0 - 1.0
    check(lambda v, c: ev((v - mean[c]) * invstd[c], c),
          lambda t, c: ev((t - mean[c]) * invstd[c], c), "eval", rtol=2e-6)
    # x now holds z = xhat - 1.5 (exactly affine in the original values).
    # 3. backward in place with dy = x = z: dx = invstd_z * (z - mean_z) * eps / (var_z + eps)
    #    where mean_z, var_z are z's statistics (passed as mean and invstd).
    mz = (mean - mean) * invstd - 1.5          # mean of xhat is 0
    vz = var * invstd ** 2                     # variance of xhat
    sz = 1.0 / np.sqrt(vz + eps)
    dx, dw, db = bnfast.batch_norm_backward(x, x, mz, sz, axis=axis, out=x)
    assert dx is x
    k = sz * eps / (vz + eps)

    def bw(v, c):
        z = (v - mean[c]) * invstd[c] - 1.5
        return (z - mz[c]) * k[c]
    check(bw, bw, "backward", rtol=2e-6)
    np.testing.assert_allclose(db.astype(np.float64), mz * (n // C), rtol=1e-5)
    np.testing.assert_allclose(dw.astype(np.float64), vz * sz * (n // C), rtol=1e-5)


# ----------------------------------------------------------------------------------
# float16 inputs and outputs: converted in C (F16C where the CPU has it, a scalar form
# for the rest and for tails), bit for bit as NumPy converts.

def _same_half_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    nan = np.isnan(a)
    assert np.array_equal(nan, np.isnan(b))
    assert np.array_equal(a[~nan].view(np.uint16 if a.dtype == np.float16 else np.uint32),
                          b[~nan].view(np.uint16 if b.dtype == np.float16 else np.uint32))


@pytest.mark.parametrize("piece", [7, 8, 1000])      # 7: the scalar form alone
def test_float16_to_float32_every_value(piece):
    from bnfast._core import _half_to_float32
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = np.concatenate([_half_to_float32(p) for p in np.array_split(h, len(h) // piece)])
    _same_half_bits(got, h.astype(np.float32))
    assert got.dtype == np.float32


@pytest.mark.parametrize("piece", [7, 8, 1000])
def test_float32_to_float16_rounds_to_nearest_even(piece):
    from bnfast._core import _float32_to_half
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    h = h[np.isfinite(h)]
    f = h.astype(np.float32)
    bits = f.view(np.uint32)
    # every half, the floats one ulp either side, the midpoints between neighbours (ties)
    # and one ulp either side of them, overflow and underflow edges, inf and NaN
    hs = np.sort(f)
    mid = ((hs[:-1].astype(np.float64) + hs[1:]) / 2).astype(np.float32)
    edges = np.array([65504, 65519.996, 65520, 65536, 1e10, 2.0 ** -25, 2.0 ** -25 * 1.0000001,
                      2.0 ** -26, 2.0 ** -24, 2.0 ** -14, 2.0 ** -14 * 0.99999994, 1e-40, 0.0,
                      np.inf, np.nan], dtype=np.float32)
    rng = np.random.default_rng(0)
    rand = rng.standard_normal(20000).astype(np.float32) * np.float32(2.0) ** rng.integers(
        -30, 18, 20000).astype(np.float32)
    vals = np.concatenate([f, (bits + 1).view(np.float32), (bits - 1).view(np.float32), mid,
                           np.nextafter(mid, np.float32(np.inf)),
                           np.nextafter(mid, np.float32(-np.inf)), edges, -edges, rand])
    vals = vals[~np.isnan(vals) | np.isnan(vals)]
    got = np.concatenate([_float32_to_half(p)
                          for p in np.array_split(vals, max(1, len(vals) // piece))])
    with np.errstate(over="ignore"):
        _same_half_bits(got, vals.astype(np.float16))


# ------------------------------------------------------------------ transposing copies

def _tiled_cases():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((37, 29))
    b = rng.standard_normal((300, 70))
    c = rng.standard_normal((3, 9, 11, 20))           # NHWC memory
    return [
        ("C into F", a.astype(np.float32), lambda s: np.empty(s.shape, s.dtype, order="F")),
        ("F into C", np.asfortranarray(b.astype(np.float64)),
         lambda s: np.empty(s.shape, s.dtype)),
        ("float16", np.asfortranarray(b.astype(np.float16)), lambda s: np.empty(s.shape, s.dtype)),
        ("NHWC memory into NCHW", c.astype(np.float32).transpose(0, 3, 1, 2),
         lambda s: np.empty(s.shape, s.dtype)),
        ("NCHW into NHWC memory", np.ascontiguousarray(c.astype(np.float32).transpose(0, 3, 1, 2)),
         lambda s: np.empty((3, 9, 11, 20), s.dtype).transpose(0, 3, 1, 2)),
        ("reversed, stepped", b.astype(np.float32)[::-1, ::2],
         lambda s: np.empty(s.shape[::-1], s.dtype).T),
        ("same order", b.astype(np.float32), lambda s: np.empty(s.shape, s.dtype)),
        ("one row", a.astype(np.float32)[:1], lambda s: np.empty(s.shape, s.dtype, order="F")),
    ]


@pytest.mark.parametrize("case", range(len(_tiled_cases())))
def test_copy_tiled_equals_copyto(case):
    """The tiled copy behind dy and `out=` in another layout than x gives np.copyto's
    bits, whatever the strides (forced on for small arrays)."""
    from bnfast._core import _copy_tiled
    name, src, make = _tiled_cases()[case]
    dst = make(src)
    _copy_tiled(dst, src, min_bytes=0)
    expect = make(src)
    np.copyto(expect, src)
    u = f"u{src.itemsize}"
    assert np.array_equal(dst.view(u), expect.view(u)), name       # the same bits
    assert np.array_equal(dst, src), name


def test_copy_tiled_casts_and_writes_unaligned():
    from bnfast._core import _copy_tiled
    src = np.random.default_rng(6).standard_normal((50, 40))          # float64, C order
    buf = np.zeros(50 * 40 * 4 + 1, np.uint8)
    dst = np.frombuffer(buf[1:].data, np.float32).reshape(40, 50).T    # F order, unaligned
    assert not dst.flags.aligned
    _copy_tiled(dst, src, "unsafe", min_bytes=0)
    assert np.array_equal(dst, src.astype(np.float32))


def test_layouts_apart_at_scale():
    """x Fortran-ordered, dy and out C-ordered, large enough (1 MiB) for the tiled copies:
    right against the reference."""
    n, C = 4096, 64
    x = np.asfortranarray(make_values((n, C), np.float32, 7, axis=1, offset=1e4))
    dy = make_values((n, C), np.float32, 8, axis=1)
    w, b, rm, rv = params(C, np.float32, 3)
    out = np.empty((n, C), np.float32)
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=1, out=out)
    assert y is out
    y_ref = ref.batch_norm_train(x, w, b, axis=1)[0]
    assert_forward_close(out, y_ref)
    dx = np.empty((n, C), np.float32)
    got = bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=1, out=dx)
    want = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=1)
    assert got[0] is dx
    assert_grad_close(dx, want[0])
    e = bnfast.batch_norm(x, rm, rv, w, b, axis=1, out=np.empty((n, C), np.float32))
    assert_forward_close(e, ref.batch_norm(x, rm, rv, w, b, axis=1))


@pytest.mark.parametrize("threads", [1, 2])
def test_same_bits_window_input_and_out_with_channels_apart(threads):
    """x a window (rows in segments, channels together) and out with its channels apart:
    the statistics, y, dx and the parameter gradients are those of the call without out
    (such an out had made the units packed, and smaller: mean, invstd, dweight and dbias
    differed in the last bit)."""
    N, T, C, k = 16, 32, 8, 35
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((N, T + 8, C, k)) + 1e3)[:, 8:]
    dy = rng.standard_normal((N, T, C, k))
    m, s = np.full(C, 1e3), np.ones(C)
    bnfast.set_num_threads(threads)
    try:
        for call in (lambda o: bnfast.batch_norm_train(x, axis=2, out=o),
                     lambda o: bnfast.batch_norm_backward(dy, x, m, s, axis=2, out=o),
                     lambda o: bnfast.batch_norm_backward(dy, x, m, s, axis=2, out=o,
                                                          training=False)):
            o = np.full((N, T, C, k + 1), np.nan)[..., :k]
            got, want = call(o), call(None)
            assert got[0] is o
            for g, v in zip(got, want):
                assert g.tobytes() == np.ascontiguousarray(v).tobytes()
    finally:
        bnfast.set_num_threads(None)

"""Issue 5 (and 3), memory: no growth over 100k calls (error paths included), and no
full-size temporaries (peak traced allocation during a call with ``out=`` at most 5% of
the output; NumPy's data allocations are traced by tracemalloc).

Leaks are measured two ways: the resident set size (catches C-level malloc leaks, which
tracemalloc does not see) and tracemalloc's current size (catches leaked Python objects
and NumPy arrays precisely)."""
import gc
import os
import tracemalloc

import numpy as np
import pytest

import bnfast
from _reliability_helpers import rss_bytes

N_CALLS = 100_000


@pytest.fixture(scope="module", autouse=True)
def _collections_scan_only_this_module():
    """The growth tests collect garbage before they measure: in the full suite a
    collection walked every object torch, Keras and ~8000 collected tests had made, 0.1-0.5 s
    each (the module took 163 s there, 43 s alone). What is alive when the module starts is
    frozen out of the collector's reach until it ends."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
C_SMALL = 64
C_HEAP = 300            # above the 64 channels bnfast keeps on the stack: heap scratch


def _raises(fn, exc):
    def call():
        try:
            fn()
        except exc:
            return
        raise AssertionError("expected an exception")
    return call


def _scenarios():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, C_SMALL)).astype(np.float32)
    o1 = np.empty_like(x1)
    p = [rng.uniform(0.5, 2, C_SMALL) for _ in range(4)]
    frozen = bnfast.FrozenBatchNorm(p[0], p[1], p[2], p[3], axis=-1)
    xh = rng.standard_normal((4, C_HEAP)).astype(np.float32)
    oh = np.empty_like(xh)
    q = [rng.uniform(0.5, 2, C_HEAP) for _ in range(4)]
    rm, rv = q[0].copy(), q[1].copy()
    neg = q[1].copy()
    neg[-1] = -1.0
    x4 = rng.standard_normal((2, 8, 3, 3)).astype(np.float32)
    layer = bnfast.BatchNorm(8)
    layer_eval = bnfast.BatchNorm(8).eval()
    y, m, s = bnfast.batch_norm_train(xh, axis=-1)
    bad_out = np.empty(xh.shape, np.float64)
    return {
        # working calls
        "frozen (1, 64)": lambda: frozen(x1),
        "frozen (1, 64) out=": lambda: frozen(x1, out=o1),
        "batch_norm eval (1, 64)": lambda: bnfast.batch_norm(x1, p[0], p[1], p[2], p[3],
                                                             axis=-1),
        "batch_norm eval heap": lambda: bnfast.batch_norm(xh, q[0], q[1], q[2], q[3],
                                                          axis=-1, out=oh),
        "batch_norm_train heap": lambda: bnfast.batch_norm_train(
            xh, q[2], q[3], axis=-1, running_mean=rm, running_var=rv, out=oh),
        "backward heap": lambda: bnfast.batch_norm_backward(xh, xh, m, s, q[2], axis=-1,
                                                            out=oh),
        "layer train+backward": lambda: (layer(x4), layer.backward(x4)),
        "layer eval": lambda: layer_eval(x4),
        # calls that raise, after bnfast has allocated its scratch
        "raise: eval negative running_var": _raises(
            lambda: bnfast.batch_norm(xh, q[0], neg, axis=-1), ValueError),
        "raise: eval weight mismatch": _raises(
            lambda: bnfast.batch_norm(xh, q[0], q[1], p[2], axis=-1), ValueError),
        "raise: train bias mismatch": _raises(
            lambda: bnfast.batch_norm_train(xh, q[2], p[3], axis=-1), ValueError),
        "raise: train out dtype": _raises(
            lambda: bnfast.batch_norm_train(xh, axis=-1, out=bad_out), TypeError),
        "raise: backward weight mismatch": _raises(
            lambda: bnfast.batch_norm_backward(xh, xh, m, s, p[2], axis=-1), ValueError),
        "raise: frozen channel mismatch": _raises(lambda: frozen(xh), ValueError),
        "raise: frozen construction": _raises(
            lambda: bnfast.FrozenBatchNorm(q[0], neg), ValueError),
        "raise: layer one value": _raises(lambda: layer(x4[:1, :, :1, :1]), ValueError),
        "raise: bad dtype": _raises(
            lambda: bnfast.batch_norm(xh.astype(np.complex64), q[0], q[1]), TypeError),
    }


SCENARIOS = list(_scenarios())


# 100k calls for the low-latency paths and a few error paths; 20k for the rest
LONG = {"frozen (1, 64)", "frozen (1, 64) out=", "batch_norm eval (1, 64)",
        "raise: eval negative running_var", "raise: train bias mismatch",
        "raise: frozen channel mismatch"}


UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "") or \
    "asan" in os.environ.get("BNFAST_SANITIZER", "")


@pytest.mark.skipif(rss_bytes() is None, reason="needs /proc/self/statm")
@pytest.mark.skipif(UNDER_ASAN, reason="ASan's quarantine holds freed memory: RSS grows")
@pytest.mark.parametrize("name", SCENARIOS)
def test_no_rss_growth(name):
    """Resident memory does not grow over 100k (20k) calls: a leak of >= ~40 (~200)
    bytes per call would show."""
    fn = _scenarios()[name]
    n = N_CALLS if name in LONG else N_CALLS // 5
    for _ in range(2000):                 # warm up caches and free lists
        fn()
    gc.collect()
    before = rss_bytes()
    for _ in range(n):
        fn()
    gc.collect()
    grown = rss_bytes() - before
    assert grown <= 4 << 20, f"{name}: resident memory grew {grown / 2**20:.1f} MiB over {n} calls"


@pytest.mark.skipif(UNDER_ASAN, reason="allocation accounting (the main job's); the "
                    "sanitizer job checks memory safety")
@pytest.mark.parametrize("name", SCENARIOS)
def test_no_traced_growth(name):
    """tracemalloc: no Python object or NumPy buffer survives the calls."""
    fn = _scenarios()[name]
    for _ in range(200):
        fn()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(3000):           # lazily filled caches fill up while traced
            fn()
        gc.collect()
        before = tracemalloc.take_snapshot()
        for _ in range(5000):
            fn()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    grown = sum(s.size_diff for s in stats)
    top = [str(s) for s in stats[:3]]
    assert grown < 32 * 1024, f"{name}: {grown} bytes more after 5000 calls: {top}"


# ----------------------------------------------------------------------------------
# No full-size temporaries

LAYOUTS = {
    "NCHW": ((64, 64, 32, 32), 1),
    "NHWC": ((64, 32, 32, 64), -1),
    "NC": ((65536, 64), 1),
    "NC-wide": ((8192, 512), -1),
}


def _peak_during(fn):
    """Peak traced allocation during fn() above what was traced before it. The collector
    is off meanwhile: garbage it freed during fn() would make room that hides a
    temporary."""
    enabled = gc.isenabled()
    gc.disable()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        if enabled:
            gc.enable()
    return peak - base


@pytest.fixture(scope="module")
def arrays():
    """(x, dy, out, axis) by (layout, dtype name)."""
    out = {}
    rng = np.random.default_rng(1)
    for name, (shape, axis) in LAYOUTS.items():
        x = (rng.standard_normal(shape, dtype=np.float32) + 1000.0)
        dy = rng.standard_normal(shape, dtype=np.float32)
        out[name, "float32"] = (x, dy, np.empty_like(x), axis)
        # float16 is read and written as it is (no float32 copy of x, dy or the result)
        x16, dy16 = x.astype(np.float16), dy.astype(np.float16)
        out[name, "float16"] = (x16, dy16, np.empty_like(x16), axis)
    return out


@pytest.mark.skipif(UNDER_ASAN, reason="allocation accounting (the main job's); the "
                    "sanitizer job checks memory safety")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["train", "batch_norm-train", "eval", "frozen", "backward",
                                "backward-eval", "layer-train", "layer-backward",
                                "moments", "running-stats"])
def test_no_full_size_temporaries(arrays, layout, op, dtype):
    x, dy, out, axis = arrays[layout, dtype]
    C = x.shape[axis]
    w, b = np.ones(C), np.zeros(C)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    m, s = np.full(C, 1000.0), np.ones(C)
    frozen = bnfast.FrozenBatchNorm(rm, rv, w, b, axis=axis)
    layer = bnfast.BatchNorm(C, axis=axis)
    layer(x)
    stats = bnfast.RunningStats(C, axis=axis)
    fn = {
        "train": lambda: bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                                 running_var=rv, out=out),
        "batch_norm-train": lambda: bnfast.batch_norm(x, rm, rv, w, b, True, axis=axis,
                                                      out=out),
        "eval": lambda: bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=out),
        "frozen": lambda: frozen(x, out=out),
        "backward": lambda: bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis, out=out),
        "backward-eval": lambda: bnfast.batch_norm_backward(dy, x, m, s, w, training=False,
                                                            axis=axis, out=out),
        "layer-train": lambda: layer(x, out=out),
        "layer-backward": lambda: layer.backward(dy, out=out),
        "moments": lambda: bnfast.moments(x, axis=axis),
        "running-stats": lambda: stats.update(x),
    }[op]
    fn()
    peak = _peak_during(fn)
    assert peak <= 0.05 * out.nbytes, (f"{op} on {layout}: {peak} bytes allocated during "
                                       f"the call ({peak / out.nbytes:.1%} of the output)")


@pytest.mark.skipif(UNDER_ASAN, reason="allocation accounting (the main job's); the "
                    "sanitizer job checks memory safety")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["train", "eval", "backward"])
def test_allocating_call_allocates_only_the_output(arrays, layout, op, dtype):
    x, dy, out, axis = arrays[layout, dtype]
    C = x.shape[axis]
    m, s = np.full(C, 1000.0), np.ones(C)
    fn = {"train": lambda: bnfast.batch_norm_train(x, axis=axis),
          "eval": lambda: bnfast.batch_norm(x, m, s, axis=axis),
          "backward": lambda: bnfast.batch_norm_backward(dy, x, m, s, axis=axis)}[op]
    fn()
    peak = _peak_during(fn)
    assert peak <= 1.05 * x.nbytes, f"{op} on {layout}: peak {peak / x.nbytes:.2f}x the output"


def test_tracemalloc_sees_numpy_allocations():
    """The premise of the tests above: a NumPy buffer shows up in tracemalloc."""
    assert _peak_during(lambda: np.empty(1 << 20, np.float32).fill(0)) >= 4 << 20


def test_tracemalloc_sees_bnfast_scratch():
    """... and so does bnfast's own C scratch (per-channel factors, partial moments,
    per-thread buffers), which goes through _core's traced _alloc: a full-size temporary
    made in C would fail the tests above too. A million channels of two rows: the
    per-channel buffers (9 doubles, 72 MB) dwarf x (8 MB) and the NumPy outputs."""
    x = np.ones((2, 1 << 20), np.float32)
    x[1] = 2.0
    out = np.empty_like(x)
    assert _peak_during(lambda: bnfast.batch_norm_train(x, axis=1, out=out)) >= 9 * 8 << 20


# Layouts the kernels cannot read in place: x is copied once, in its own axis order, so
# that an `out` (and a dy) in that order are used as they are. (A C-order copy of the
# F-ordered ones was a transpose, and then needed a temporary output as well.)
COPIED = {
    "F rows stepped": (lambda a: np.asfortranarray(a.reshape(-1, 32))[::2], 1),
    "NCHW width stepped": (lambda a: a.reshape(32, 16, 32, 64)[..., ::2], 1),
    "NHWC channels stepped": (lambda a: a.reshape(32, 16, 32, 64)[..., ::2], -1),
    "F reversed": (lambda a: np.asfortranarray(a.reshape(-1, 32))[::-1], 1),
    # a row broadcast over the batch (stride 0), with out and dy C-ordered, as a user's:
    # NumPy's order 'K' put the broadcast axis innermost (an F-ordered copy), and the
    # C-ordered out and dy then took a full-size copy each
    "(N, C) broadcast": (lambda a: np.broadcast_to(a[:32], (1 << 15, 32)), 1),
    "NCHW batch broadcast": (lambda a: np.broadcast_to(a[:1 << 15].reshape(1, 16, 32, 64),
                                                       (32, 16, 32, 64)), 1),
    # ... and over the channels (a middle axis): copied in C order too
    "NCHW channel broadcast": (lambda a: np.broadcast_to(a[:1 << 16].reshape(32, 1, 32, 64),
                                                         (32, 16, 32, 64)), 1),
}


@pytest.mark.parametrize("op", ["train", "eval", "backward", "moments"])
@pytest.mark.parametrize("layout", COPIED)
def test_copied_input_is_copied_once(layout, op):
    rng = np.random.default_rng(2)
    make, axis = COPIED[layout]
    x = make(rng.standard_normal(1 << 20, dtype=np.float32) + 1000.0)
    assert not x.flags.c_contiguous and not x.flags.f_contiguous
    if 0 in x.strides:
        out, dy = np.empty(x.shape, x.dtype), np.ones(x.shape, x.dtype)
    else:
        out = np.empty_like(x)                  # contiguous, in x's axis order
        dy = np.ones_like(x)
    C = x.shape[axis]
    m, s = np.full(C, 1000.0), np.ones(C)
    fn = {"train": lambda: bnfast.batch_norm_train(x, axis=axis, out=out),
          "eval": lambda: bnfast.batch_norm(x, m, s, axis=axis, out=out),
          "backward": lambda: bnfast.batch_norm_backward(dy, x, m, s, axis=axis,
                                                         out=out),
          "moments": lambda: bnfast.moments(x, axis=axis)}[op]
    fn()
    peak = _peak_during(fn)
    assert peak <= 1.05 * out.nbytes, f"{op} on {layout}: peak {peak / out.nbytes:.2f}x"


# Rows in segments (a crop of NHWC or NCHW, a window of (N, T, C)) are read where they
# are: no copy of x, whether `out` is given or allocated. Not for the backward of rows
# whose segments are under SEG_BWD_ROWS_BYTES (128 KB; these are 8 KB): x is copied once,
# which measured faster (a call per segment for the sums and for dx).
SEGMENTS = {
    "NHWC crop": (lambda a: a.reshape(18, 34, 34, 64)[1:-1, 1:-1, 1:-1], -1),
    "NTC window": (lambda a: a[:520 * 40 * 64].reshape(520, 40, 64)[:, 8:], -1),
    "NCHW crop": (lambda a: a[:4 * 16 * 132 * 132].reshape(4, 16, 132, 132)[..., 1:-1, 1:-1],
                  1),
}


@pytest.mark.parametrize("op", ["train", "eval", "backward", "moments"])
@pytest.mark.parametrize("layout", SEGMENTS)
def test_segments_read_in_place(layout, op):
    rng = np.random.default_rng(3)
    make, axis = SEGMENTS[layout]
    x = make(rng.standard_normal(18 * 34 * 34 * 64, dtype=np.float32) + 1000.0)
    assert not x.flags.c_contiguous
    out = np.empty_like(x)
    dy = np.ones_like(x)
    C = x.shape[axis]
    m, s = np.full(C, 1000.0), np.ones(C)
    fn = {"train": lambda o: bnfast.batch_norm_train(x, axis=axis, out=o),
          "eval": lambda o: bnfast.batch_norm(x, m, s, axis=axis, out=o),
          "backward": lambda o: bnfast.batch_norm_backward(dy, x, m, s, axis=axis, out=o),
          "moments": lambda o: bnfast.moments(x, axis=axis)}[op]
    fn(out)
    peak = _peak_during(lambda: fn(out))
    copied = op == "backward" and layout != "NCHW crop"
    assert peak <= (1.05 if copied else 0.05) * out.nbytes, \
        f"{op} on {layout}: {peak / out.nbytes:.1%} of the output"
    if op != "moments":
        peak = _peak_during(lambda: fn(None))
        assert peak <= (2.05 if copied else 1.05) * out.nbytes, \
            f"{op} on {layout}: peak {peak / out.nbytes:.2f}x"


# An `out` whose rows lie apart in segments where x's do not (the interior of a padded
# buffer, a window of a longer sequence) is written in place where its channels lie
# together (channels last, (N, T, C)): the statistics and sums read x in its own layout,
# the normalization and dx write out's rows. (It went through a temporary of its size,
# then a copy.) The runs of NCHW still go through one temporary (in place measured
# slower); the bits are those of the call without out either way.
SEGMENTED_OUTS = {
    "NHWC padded": ((16, 32, 32, 64), -1, lambda dt: np.full((16, 34, 34, 64), np.nan, dt),
                    (slice(None), slice(1, -1), slice(1, -1)), True),
    "NTC window": ((512, 32, 64), -1, lambda dt: np.full((512, 40, 64), np.nan, dt),
                   (slice(None), slice(8, None)), True),
    "NCHW padded": ((4, 16, 128, 128), 1, lambda dt: np.full((4, 16, 130, 130), np.nan, dt),
                    (Ellipsis, slice(1, -1), slice(1, -1)), False),
}


def _segmented_out_ops(x, dy, axis):
    C = x.shape[axis]
    rng = np.random.default_rng(5)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    m, v = np.asarray(x.mean(axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim),
                             dtype=np.float64)), rng.uniform(0.5, 2, C)
    s = 1.0 / np.sqrt(v + 1e-5)
    # a frozen layer refuses a mean that is not finite (x's inf channel): 0 there
    frozen = bnfast.FrozenBatchNorm(np.where(np.isfinite(m), m, 0.0), v, w, b, axis=axis)
    return {
        "train": lambda o: bnfast.batch_norm_train(x, w, b, axis=axis, out=o),
        "eval": lambda o: bnfast.batch_norm(x, m, v, w, b, axis=axis, out=o),
        "frozen": lambda o: frozen(x, out=o),
        "backward": lambda o: bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis, out=o),
        "backward eval": lambda o: bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis,
                                                              training=False, out=o),
    }


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("layout", SEGMENTED_OUTS)
def test_segmented_out_written_in_place(layout, dtype, threads):
    shape, axis, parent, interior, in_place = SEGMENTED_OUTS[layout]
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 3 + (1e4 if dtype != np.float16 else 100)).astype(dtype)
    x.reshape(-1)[7] = np.inf                    # one channel's results NaN
    dy = rng.standard_normal(shape).astype(dtype)
    dy.reshape(-1)[11] = -0.0
    bnfast.set_num_threads(threads)
    try:
        for op, fn in _segmented_out_ops(x, dy, axis).items():
            want = fn(None)
            p = parent(dtype)
            o = p[interior]
            assert o.shape == x.shape and not o.flags.c_contiguous
            got = fn(o)
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            assert got[0] is o
            for g, v in zip(got, want):
                assert g.tobytes() == np.ascontiguousarray(v).tobytes(), (op, layout)
            rest = p.copy()
            rest[interior] = np.nan
            assert np.isnan(rest).all(), f"{op} wrote outside out"
            peak = _peak_during(lambda: fn(o))
            assert peak <= (0.05 if in_place else 1.05) * o.nbytes, \
                f"{op} into {layout}: peak {peak / o.nbytes:.1%} of the output"
    finally:
        bnfast.set_num_threads(None)


# ----------------------------------------------------------------------------------
# The cache of freed outputs (bnfast.set_output_cache, src/bnfast_outcache.h)

CACHE_MIN = 4 << 20                     # outputs from this size carry the cache's handler


@pytest.fixture
def output_cache():
    """The cache at its default (256 MiB), emptied before and after the test."""
    old = bnfast.set_output_cache(0)
    bnfast.set_output_cache(256 << 20)
    try:
        yield
    finally:
        bnfast.set_output_cache(0)
        bnfast.set_output_cache(old)


def _held():
    return bnfast.get_output_cache()["held_bytes"]


CACHE_LAYOUTS = {"NCHW": ((16, 64, 32, 32), 1), "NHWC": ((16, 32, 32, 64), -1),
                 "NC": ((2048, 600), 1), "NC-fortran": ((600, 2048), 0)}


def _cache_arrays(layout, dtype):
    shape, axis = CACHE_LAYOUTS[layout]
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 0.01 + 1e4).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if layout == "NC-fortran":
        x, dy = np.asfortranarray(x), np.asfortranarray(dy)
    return x, dy, axis


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
@pytest.mark.parametrize("op", ["eval", "train", "backward", "backward-eval"])
def test_output_cache_reuses_a_freed_output_with_the_same_bits(output_cache, layout, op,
                                                               dtype):
    """An output freed is handed to the next call of its size (no fresh pages), and the
    results are the bits of a call with out= (which streams its stores) and of a call
    with the cache off (fresh memory, plain stores)."""
    x, dy, axis = _cache_arrays(layout, dtype)
    C = x.shape[axis]
    rng = np.random.default_rng(3)
    m = 1e4 + rng.standard_normal(C) * 0.01
    s = rng.uniform(50, 150, C)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    fn = {"eval": lambda **k: bnfast.batch_norm(x, m, s, w, b, axis=axis, **k),
          "train": lambda **k: bnfast.batch_norm_train(x, w, b, axis=axis, **k)[0],
          "backward": lambda **k: bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis,
                                                             **k)[0],
          "backward-eval": lambda **k: bnfast.batch_norm_backward(
              dy, x, m, s, w, axis=axis, training=False, **k)[0]}[op]
    assert x.nbytes >= CACHE_MIN
    out = np.empty_like(x)
    want = fn(out=out).copy()
    bnfast.set_output_cache(0)
    fresh = fn()
    assert _held() == 0
    bnfast.set_output_cache(256 << 20)
    y = fn()
    assert y.flags.owndata and y.base is None
    assert y.flags.c_contiguous == x.flags.c_contiguous
    assert y.flags.f_contiguous == x.flags.f_contiguous
    address = y.ctypes.data
    first = y.copy()
    del y
    assert _held() == x.nbytes
    y = fn()
    assert y.ctypes.data == address, "the freed output was not handed out again"
    assert _held() == 0
    for got in (fresh, first, y):
        np.testing.assert_array_equal(np.ascontiguousarray(got).view(np.uint8),
                                      np.ascontiguousarray(want).view(np.uint8))


def test_output_cache_keeps_within_its_limits(output_cache):
    x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32) + 1e4
    m, s = np.full(1024, 1e4), np.ones(1024)
    nbytes = x.nbytes
    ys = [bnfast.batch_norm(x, m, s, axis=1) for _ in range(10)]
    assert _held() == 0
    del ys
    assert _held() == 8 * nbytes                    # the 8 most recent blocks
    bnfast.set_output_cache(3 * nbytes)             # lowering the limit releases blocks
    assert _held() == 3 * nbytes
    assert bnfast.get_output_cache()["max_bytes"] == 3 * nbytes
    bnfast.set_output_cache(nbytes - 1)             # an output larger than the limit
    assert _held() == 0
    y = bnfast.batch_norm(x, m, s, axis=1)
    del y
    assert _held() == 0
    bnfast.set_output_cache(256 << 20)
    small = bnfast.batch_norm(x[:100], m, s, axis=1)        # under 4 MiB: never kept
    assert small.nbytes < CACHE_MIN
    del small
    assert _held() == 0
    bnfast.set_output_cache(0)
    assert bnfast.get_output_cache() == {"max_bytes": 0, "held_bytes": 0}


def test_output_cache_arrays_behave_as_numpy_s(output_cache):
    """A view keeps the memory (it returns to the cache with its last array), resize
    reallocates, pickling copies, and another size is fresh memory."""
    import pickle

    x = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)
    m, s = np.zeros(1024), np.ones(1024)
    want = bnfast.batch_norm(x, m, s, axis=1, out=np.empty_like(x))
    y = bnfast.batch_norm(x, m, s, axis=1)
    view = y[10:20]
    del y
    assert _held() == 0
    np.testing.assert_array_equal(view, want[10:20])
    del view
    assert _held() == x.nbytes
    y = bnfast.batch_norm(x, m, s, axis=1)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(y)), want)
    want = y[:3].copy()
    y.resize((3, 1024), refcheck=False)
    np.testing.assert_array_equal(y, want)
    y.resize((4096, 1024), refcheck=False)
    assert y.shape == (4096, 1024)
    del y
    assert _held() in (0, 2 * x.nbytes)             # realloc may or may not have moved
    bnfast.set_output_cache(0)
    bnfast.set_output_cache(256 << 20)
    y = bnfast.batch_norm(x[:1500], m, s, axis=1)   # another size: fresh
    del y
    assert _held() == 1500 * 1024 * 4


def test_output_cache_from_many_threads(output_cache):
    """Threads allocating and freeing outputs at once get correct results, and the cache
    keeps its accounts."""
    import threading

    x = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32) + 1e4
    m, s = np.full(2048, 1e4), np.ones(2048)
    want = bnfast.batch_norm(x, m, s, axis=1)
    errors = []

    def work():
        try:
            for _ in range(20):
                y = bnfast.batch_norm(x, m, s, axis=1)
                if not np.array_equal(y, want):
                    errors.append("wrong result")
                del y
        except Exception as e:                      # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _held() % x.nbytes == 0 and _held() <= 8 * x.nbytes


def test_output_cache_bad_arguments():
    with pytest.raises(ValueError, match="set_output_cache: max_bytes"):
        bnfast.set_output_cache(-1)
    for bad in (1.5, "256", None):
        with pytest.raises(TypeError, match="set_output_cache: max_bytes"):
            bnfast.set_output_cache(bad)
    old = bnfast.set_output_cache(np.int64(1 << 20))
    assert bnfast.set_output_cache(old) == 1 << 20


@pytest.mark.parametrize("op", ["train", "eval", "backward"])
def test_integer_input_writes_into_a_float64_out(op):
    # integers are computed in float64: beside the conversion (1x) the call took a
    # full-size temporary and copied it into `out` (2x), left in the output cache
    x = (np.arange(16 * 64 * 1024) % 7).reshape(16, 64, 1024)
    out, dy = np.empty(x.shape), np.ones(x.shape)
    m, s = np.full(64, 3.0), np.ones(64)
    frozen = bnfast.FrozenBatchNorm(m, s)
    fn = {"train": lambda: bnfast.batch_norm_train(x, out=out),
          "eval": lambda: frozen(x, out=out),
          "backward": lambda: bnfast.batch_norm_backward(dy, x, m, s, out=out)}[op]
    want = {"train": lambda: bnfast.batch_norm_train(x.astype(np.float64))[0],
            "eval": lambda: frozen(x.astype(np.float64)),
            "backward": lambda: bnfast.batch_norm_backward(dy, x.astype(np.float64), m,
                                                           s)[0]}[op]()
    fn()
    assert np.array_equal(out, want)
    peak = _peak_during(fn)
    assert peak <= 1.05 * out.nbytes, f"{op}: peak {peak / out.nbytes:.2f}x"


def test_layer_in_place_keeps_x_in_its_own_layout():
    # out=x: the layer keeps a copy for backward; in C order it made an F-ordered x's
    # dy and dx copies too (peak 2x)
    x = np.asfortranarray(np.random.default_rng(4).standard_normal((8192, 64)) + 5)
    dy, dx = np.asfortranarray(np.ones_like(x)), np.empty_like(x, order="F")
    bn = bnfast.BatchNorm(64, axis=-1, dtype=np.float64)
    bn(x, out=x)
    assert bn._saved[0].flags.f_contiguous
    peak = _peak_during(lambda: bn.backward(dy, out=dx))
    assert peak <= 0.05 * dx.nbytes, f"backward peak {peak / dx.nbytes:.2f}x"


def test_input_copy_comes_from_the_output_cache(output_cache):
    """An input the kernels cannot read in place (here a crop of NCHW with short runs)
    is copied into memory from the cache of freed outputs: after one call the cache
    holds that copy's block, and the next call takes that block again rather than
    adding one. It had been fresh memory every call, its pages faulted in."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((16, 64, 34, 34)) + 1e3).astype(np.float32)[..., 1:-1, 1:-1]
    out = np.empty(x.shape, np.float32)
    assert x.nbytes >= CACHE_MIN
    bnfast.batch_norm_train(x, axis=1, out=out)
    held = _held()
    assert held >= x.nbytes                     # the copy's block, kept when freed
    bnfast.batch_norm_train(x, axis=1, out=out)
    assert _held() == held                      # reused, handed back again


@pytest.mark.parametrize("W", [40, 130])
def test_nchw_crop_elementwise_same_bits_as_contiguous(W):
    """The normalization and dx with the statistics fixed of an NCHW crop read in place
    (a channel's runs at a time) have the bits of the same values contiguous."""
    rng = np.random.default_rng(9)
    full = (rng.standard_normal((3, 5, W + 2, W + 2)) + 1e3).astype(np.float32)
    x = full[..., 1:-1, 1:-1]
    xc = np.ascontiguousarray(x)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    m, v = np.full(5, 1e3), rng.uniform(0.5, 2, 5)
    for a, b in ((bnfast.batch_norm(x, m, v, axis=1), bnfast.batch_norm(xc, m, v, axis=1)),
                 (bnfast.batch_norm_backward(dy, x, m, 1 / np.sqrt(v), axis=1,
                                             training=False)[0],
                  bnfast.batch_norm_backward(dy, xc, m, 1 / np.sqrt(v), axis=1,
                                             training=False)[0])):
        assert a.tobytes() == b.tobytes()

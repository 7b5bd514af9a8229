"""Mergeable statistics: moments, merge_moments, RunningStats (issue 6).

The yardstick is an independent long-double two-pass computation on the values of the
array handed to bnfast (``_ref``), never bnfast itself.
"""
import doctest
import pickle

import numpy as np
import pytest

import bnfast
import bnfast._moments as M
import reference as R
from arrays import LAYOUTS, applicable, make_values, with_layout

moments = getattr(bnfast, "moments", M.moments)
merge_moments = getattr(bnfast, "merge_moments", M.merge_moments)
RunningStats = getattr(bnfast, "RunningStats", M.RunningStats)
Moments = getattr(bnfast, "Moments", M.Moments)

OFFSETS = (0.0, 1e5, 1e6, 3e6)


def _ref(x, axis):
    """(count, mean, m2) per channel in long double, from x's values (two-pass)."""
    x = np.asarray(x)
    ax = axis + x.ndim if axis < 0 else axis
    C = x.shape[ax]
    v = np.moveaxis(x, ax, -1).reshape(-1, C).astype(np.longdouble)
    n = v.shape[0]
    if n == 0:
        return np.zeros(C), np.full(C, np.nan), np.zeros(C)
    mean = v.sum(axis=0) / n
    d = v - mean
    mean = mean + d.sum(axis=0) / n
    d = v - mean
    return np.full(C, float(n)), mean, (d * d).sum(axis=0)


def _check(m, ref, *, what="", var_rtol=1e-12):
    """Mean and M2 to float64 rounding: the mean within a few ulps of its value plus
    1e-12 of the spread, M2 within var_rtol relative."""
    count, mean, m2 = ref
    assert isinstance(m, Moments)
    np.testing.assert_array_equal(m.count, count, err_msg=f"{what} count")
    sd = np.sqrt(np.asarray(m2 / np.maximum(count, 1), dtype=np.float64))
    mean64 = np.asarray(mean, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(m.mean), np.isnan(mean64), err_msg=f"{what} NaN")
    ok = ~np.isnan(mean64)
    err = np.abs(np.asarray(m.mean - mean, dtype=np.float64))[ok]
    tol = (1e-15 * np.abs(mean64) + 1e-12 * sd + 1e-300)[ok]
    assert np.all(err <= tol), f"{what} mean: err {err} > tol {tol}"
    m2_64 = np.asarray(m2, dtype=np.float64)
    err2 = np.abs(m.m2 - m2_64)
    tol2 = var_rtol * m2_64 + 1e-300
    assert np.all(err2 <= tol2), f"{what} m2: got {m.m2}, ref {m2_64}, rel err {err2 / tol2 * var_rtol}"


# -------------------------------------------------------------------------------------
# moments()

@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((257, 5), -1), ((6, 4, 3, 5), 1),
                                        ((3, 7, 6, 4), -1), ((9, 3, 40), 1)])
def test_moments_exact_at_offsets(shape, axis, dtype, offset):
    x = make_values(shape, dtype, seed=3, axis=axis, offset=offset, spread=1e-2)
    m = moments(x, axis=axis)
    _check(m, _ref(x, axis), what=f"{shape} {np.dtype(dtype)} off={offset}")
    assert m.mean.dtype == m.m2.dtype == m.count.dtype == np.float64
    np.testing.assert_allclose(m.var, np.asarray(_ref(x, axis)[2] / m.count, np.float64),
                               rtol=1e-12)


def test_moments_beats_naive_formula_at_price_offsets():
    # E[x^2] - E[x]^2 in float64 is useless at 3e6 with a 1e-3 spread; moments is not.
    rng = np.random.default_rng(0)
    x = 3e6 + 1e-3 * rng.standard_normal((4096, 2))
    m = moments(x, axis=-1)
    ref = _ref(x, -1)
    _check(m, ref)
    naive = (x * x).mean(0) - x.mean(0) ** 2
    true = np.asarray(ref[2] / 4096, np.float64)
    assert np.max(np.abs(naive - true) / true) > 1e-2      # the test can tell
    np.testing.assert_allclose(m.var, true, rtol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moments_any_layout(layout):
    shape, axis = (5, 3, 1, 4), 1              # a size-1 axis: every layout applies
    assert applicable(shape, axis, layout)
    base = make_values(shape, np.float32, seed=5, axis=axis, offset=1e5, spread=0.1)
    x = with_layout(base, layout, axis=axis, seed=5)
    _check(moments(x, axis=axis), _ref(x, axis), what=layout)


# Arrays split into many work units (channel blocks, row superblocks, long runs): the
# compiled statistics pass merges them in a fixed order, whatever the thread count.
MULTI_UNIT = [((3000, 300), -1), ((300000, 3), -1), ((4, 5, 300, 300), 1),
              ((2, 700000), 0), ((40, 30, 20, 70), -1)]


@pytest.mark.parametrize("shape,axis", MULTI_UNIT)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_many_units_exact_and_thread_independent(shape, axis, dtype):
    x = make_values(shape, dtype, seed=9, axis=axis, offset=1e5, spread=0.01)
    ref = _ref(x, axis)
    got = []
    try:
        for n in (1, 2, 3):
            bnfast.set_num_threads(n)
            m = moments(x, axis=axis)
            _check(m, ref, what=f"{shape} {n} threads", var_rtol=1e-11)
            # the mean's low part (kept for merges) makes it exact to long double
            # precision; the high part alone is off by up to half an ulp of 1e5 (7e-12)
            full = np.longdouble(m.mean) + np.longdouble(m._lo)
            assert np.max(np.abs(full - ref[1])) < 2e-13
            got.append((m.mean.tobytes(), m._lo.tobytes(), m.m2.tobytes()))
    finally:
        bnfast.set_num_threads(None)
    assert got[0] == got[1] == got[2]


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.int64, np.uint8, np.bool_])
def test_moments_other_dtypes(dtype):
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 2 if dtype == np.bool_ else 100, (31, 3))).astype(dtype)
    _check(moments(x, axis=-1), _ref(x, -1), what=str(dtype))


def test_moments_constant_channel_is_exactly_zero():
    x = np.empty((100, 3))
    x[:, 0] = 3e6 + 0.25
    x[:, 1] = np.linspace(1e5, 1e5 + 1, 100)
    x[:, 2] = 0.0
    m = moments(x, axis=-1)
    assert m.m2[0] == 0.0 and m.var[0] == 0.0 and m.mean[0] == 3e6 + 0.25
    assert m.m2[2] == 0.0 and m.mean[2] == 0.0
    _check(m, _ref(x, -1))


def test_moments_tiny_variance_channel():
    # a variance far below any eps: recovered exactly, not as eps-polluted noise
    x = np.array([[1.0], [1.0 + 2.0 ** -40], [1.0 - 2.0 ** -40]])
    _check(moments(x), _ref(x, 1), var_rtol=1e-14)


def test_moments_one_sample_and_empty():
    x = np.array([[1e6 + 0.5, -2.0, 7.0]])
    m = moments(x, axis=-1)
    np.testing.assert_array_equal(m.count, [1, 1, 1])
    np.testing.assert_array_equal(m.mean, x[0])
    np.testing.assert_array_equal(m.m2, [0, 0, 0])
    np.testing.assert_array_equal(m.var, [0, 0, 0])
    assert np.all(np.isnan(m.var_unbiased))
    e = moments(np.zeros((0, 3), np.float32), axis=-1)
    np.testing.assert_array_equal(e.count, [0, 0, 0])
    assert np.all(np.isnan(e.mean)) and np.all(np.isnan(e.var))
    np.testing.assert_array_equal(e.m2, [0, 0, 0])
    e2 = moments(np.zeros((4, 3, 0)), axis=1)        # empty spatial extent
    np.testing.assert_array_equal(e2.count, [0, 0, 0])


def test_moments_nan_propagates():
    x = np.array([[1.0, 2.0], [np.nan, 3.0], [2.0, 4.0]])
    m = moments(x, axis=-1)
    assert np.isnan(m.mean[0]) and np.isnan(m.m2[0])
    np.testing.assert_allclose(m.mean[1], 3.0)


@pytest.mark.parametrize("bad,exc,match", [
    (np.zeros(5), ValueError, "at least 2 dimensions"),
    (np.zeros((3, 2), np.complex128), TypeError, "real dtype"),
    (np.zeros((3, 2), np.longdouble), TypeError, "real dtype"),
    (np.array([["a", "b"]]), TypeError, "real dtype"),
])
def test_moments_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        moments(bad, axis=-1)


def test_moments_axis_errors():
    with pytest.raises(ValueError, match="out of range"):
        moments(np.zeros((3, 2)), axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        moments(np.zeros((3, 2)), axis=1.0)


# -------------------------------------------------------------------------------------
# Moments object, merge_moments

def test_moments_object_is_immutable_and_picklable():
    m = moments(np.arange(12.0).reshape(4, 3), axis=-1)
    with pytest.raises(AttributeError):
        m.mean = np.zeros(3)
    with pytest.raises(AttributeError):
        m.extra = 1
    with pytest.raises(ValueError):
        m.mean[0] = 1.0                      # read-only arrays
    for k in ("count", "mean", "m2"):        # ... for good: the flag cannot be set back
        for obj in (m, merge_moments(m, m), Moments([2, 3, 4], [1.0, 2.0, 3.0], [0.0] * 3)):
            a = getattr(obj, k)
            with pytest.raises(ValueError):
                a.flags.writeable = True
            assert not a.flags.writeable
    m2 = pickle.loads(pickle.dumps(m))
    for k in ("count", "mean", "m2"):
        np.testing.assert_array_equal(getattr(m2, k), getattr(m, k))
    assert "Moments(count=" in repr(m)


def test_moments_constructor_checks():
    m = Moments([2, 0], [5.0, 3.0], [8.0, 1.0])
    assert np.isnan(m.mean[1]) and m.m2[1] == 0.0 and m.num_features == 2
    with pytest.raises(ValueError, match="same shape"):
        Moments([1, 2], [0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="whole numbers from 0 to"):
        Moments([1.5], [0.0], [0.0])
    with pytest.raises(ValueError, match="whole numbers from 0 to"):
        Moments([-1], [0.0], [0.0])
    with pytest.raises(ValueError, match="whole numbers from 0 to"):
        Moments([np.inf], [1.0], [1.0])         # merged, it turned every mean NaN
    with pytest.raises(ValueError, match="whole numbers from 0 to 2"):
        Moments([1e300], [1.0], [0.0])          # merged with itself: m2 NaN
    assert Moments([2.0**53], [1.0], [0.0]).count[0] == 2.0**53
    with pytest.raises(ValueError, match="m2 must be non-negative"):
        Moments([3], [0.0], [-1.0])
    with pytest.raises(ValueError, match="1-D"):
        Moments(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)))
    e = Moments.empty(3)
    np.testing.assert_array_equal(e.count, np.zeros(3))


@pytest.mark.parametrize("offset", OFFSETS)
def test_merge_equals_one_shot(offset):
    x = make_values((1000, 4), np.float64, seed=11, axis=-1, offset=offset, spread=1e-3)
    cuts = [0, 1, 2, 2, 37, 500, 999, 1000]              # includes empty and 1-row parts
    parts = [moments(x[a:b], axis=-1) for a, b in zip(cuts[:-1], cuts[1:])]
    acc = parts[0]
    for p in parts[1:]:
        acc = merge_moments(acc, p)
    _check(acc, _ref(x, -1), what=f"off={offset}")
    # a balanced tree of merges agrees too
    while len(parts) > 1:
        parts = [merge_moments(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    _check(parts[0], _ref(x, -1), what=f"tree off={offset}")


def test_merge_with_empty_is_exact_and_commutative():
    rng = np.random.default_rng(2)
    a = moments(1e6 + rng.standard_normal((17, 3)), axis=-1)
    b = moments(1e6 + rng.standard_normal((5, 3)), axis=-1)
    e = Moments.empty(3)
    for r in (merge_moments(a, e), merge_moments(e, a), a.merge(e)):
        np.testing.assert_array_equal(r.count, a.count)
        np.testing.assert_array_equal(r.mean, a.mean)
        np.testing.assert_array_equal(r.m2, a.m2)
    ee = merge_moments(e, e)
    np.testing.assert_array_equal(ee.count, np.zeros(3))
    assert np.all(np.isnan(ee.mean))
    ab, ba = merge_moments(a, b), merge_moments(b, a)
    for k in ("count", "mean", "m2"):
        np.testing.assert_array_equal(getattr(ab, k), getattr(ba, k))
    # channel-wise: an empty channel in one part only
    p = Moments([3, 0], [1.0, 0.0], [2.0, 0.0])
    q = Moments([0, 4], [0.0, 5.0], [0.0, 1.0])
    r = merge_moments(p, q)
    np.testing.assert_array_equal(r.count, [3, 4])
    np.testing.assert_array_equal(r.mean, [1.0, 5.0])
    np.testing.assert_array_equal(r.m2, [2.0, 1.0])


def test_merge_is_associative_to_rounding():
    rng = np.random.default_rng(4)
    a, b, c = (moments(3e6 + 0.01 * rng.standard_normal((n, 2)), axis=-1)
               for n in (3, 100, 7))
    l = merge_moments(merge_moments(a, b), c)
    r = merge_moments(a, merge_moments(b, c))
    np.testing.assert_allclose(l.mean, r.mean, rtol=1e-15)
    np.testing.assert_allclose(l.m2, r.m2, rtol=1e-13)


def test_merge_errors():
    with pytest.raises(ValueError, match="channel counts differ"):
        merge_moments(Moments.empty(2), Moments.empty(3))
    with pytest.raises(TypeError, match="two Moments"):
        merge_moments(Moments.empty(2), np.zeros(2))


# -------------------------------------------------------------------------------------
# RunningStats

@pytest.mark.parametrize("offset", [1e5, 1e6, 3e6])
def test_running_stats_over_memmap_uneven_chunks(tmp_path, offset):
    n, C = 5003, 6
    x = make_values((n, C), np.float32, seed=7, axis=-1, offset=offset, spread=0.05)
    path = tmp_path / "prices.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, C))
    mm[:] = x
    mm.flush()
    del mm
    data = np.memmap(path, dtype=np.float32, mode="r", shape=(n, C))
    rng = np.random.default_rng(0)
    rs = RunningStats(C, axis=-1)
    start = 0
    sizes = []
    while start < n:
        k = int(rng.choice([0, 1, 2, 3, 64, 999]))
        sizes.append(k)
        assert rs.update(data[start:start + k]) is rs
        start += k
    assert 0 in sizes and 1 in sizes
    ref = _ref(x, -1)
    _check(rs.moments, ref, what=f"stream off={offset}")
    one = moments(x, axis=-1)
    np.testing.assert_allclose(rs.mean, one.mean, rtol=1e-15)
    np.testing.assert_allclose(rs.var, one.var, rtol=1e-12)
    np.testing.assert_array_equal(rs.count, np.full(C, n))
    m2 = np.asarray(ref[2], np.float64)
    np.testing.assert_allclose(rs.var, m2 / n, rtol=1e-12)
    np.testing.assert_allclose(rs.var_unbiased, m2 / (n - 1), rtol=1e-12)


def test_running_stats_one_row_at_a_time_does_not_drift():
    # tick data: thousands of one-row updates at a 1e6 offset; a plain float64 running
    # mean would drift by ~sqrt(k) ulps, the compensated one stays within rounding
    x = make_values((4000, 2), np.float64, seed=12, axis=-1, offset=1e6, spread=1e-3)
    rs = RunningStats(2, axis=-1)
    for row in x:
        rs.update(row[None, :])
    _check(rs.moments, _ref(x, -1), what="one row at a time")


@pytest.mark.parametrize("chunk", [100, 1000, 7919])
def test_running_stats_of_quantized_float64_data_to_an_ulp(chunk):
    """float64 data on a grid (a tick, integers, float32 values) fed in chunks: the
    variance within 1.5 ulps of exact arithmetic, as `moments` of the whole array
    (the chunks' M2 merged plainly, in chunks of 100 rows, were 10-28 ulps off)."""
    from test_exactness import QUANTIZED, _exact_var, _ulps

    for kind, make in QUANTIZED.items():
        x = make(np.random.default_rng(len(kind)), (40000, 3))
        rs = bnfast.RunningStats(3, axis=-1)
        for s in range(0, len(x), chunk):
            rs.update(x[s:s + chunk])
        for c in range(3):
            assert _ulps(rs.var[c], _exact_var(x[:, c])) <= 1.5, (kind, c)


def test_m2_low_part_survives_empty_merges_and_pickling():
    """The low part of M2 (the merges' compensation) goes through a merge with an empty
    part and through pickling: continuing a chain of merges after either gives the bits
    of the chain left alone (both once dropped it: 1 ulp off in some channels)."""
    x = 1e7 + 0.01 * np.random.default_rng(3).standard_normal((16000, 40))
    parts = [bnfast.moments(x[i:i + 100], axis=-1) for i in range(0, len(x), 100)]
    plain = parts[0]
    for p in parts[1:]:
        plain = bnfast.merge_moments(plain, p)
    for detour in (lambda m: bnfast.merge_moments(m, bnfast.Moments.empty(40)),
                   lambda m: bnfast.merge_moments(bnfast.Moments.empty(40), m),
                   lambda m: pickle.loads(pickle.dumps(m))):
        m = parts[0]
        for i, p in enumerate(parts[1:]):
            m = bnfast.merge_moments(detour(m) if i == 80 else m, p)
        assert m.m2.tobytes() == plain.m2.tobytes()
        assert m.mean.tobytes() == plain.mean.tobytes()


def test_running_stats_generator_of_nchw_batches():
    x = make_values((23, 3, 4, 5), np.float64, seed=9, axis=1, offset=1e6, spread=1e-2)

    def batches():
        for a, b in [(0, 0), (0, 5), (5, 6), (6, 6), (6, 23)]:
            yield x[a:b]

    rs = RunningStats(3)
    for chunk in batches():
        rs.update(chunk)
    _check(rs.moments, _ref(x, 1))
    # a Moments can be merged in too (e.g. computed elsewhere)
    rs2 = RunningStats(3).update(moments(x[:10])).update(x[10:])
    _check(rs2.moments, _ref(x, 1))


def test_running_stats_initialises_batchnorm():
    x = make_values((200, 4), np.float64, seed=1, axis=-1, offset=1e5, spread=0.1)
    rs = RunningStats(4, axis=-1).update(x[:77]).update(x[77:])
    count, mean, m2 = _ref(x, -1)
    bn = bnfast.BatchNorm(4, axis=-1, dtype=np.float64)
    rm_obj = bn.running_mean
    assert rs.to_batchnorm(bn) is bn
    assert bn.running_mean is rm_obj                        # written in place
    np.testing.assert_allclose(bn.running_mean, np.asarray(mean, np.float64), rtol=1e-15)
    np.testing.assert_allclose(bn.running_var, np.asarray(m2 / 199, np.float64), rtol=1e-12)
    assert bn.num_batches_tracked == 0
    keras = bnfast.BatchNorm(4, axis=-1, dtype=np.float32, unbiased_running_var=False)
    rs.to_batchnorm(keras)
    assert keras.running_var.dtype == np.float32
    np.testing.assert_allclose(keras.running_var, np.asarray(m2 / 200, np.float64),
                               rtol=1e-7)
    # eval with those statistics = standardizing with the whole history
    y = bn.eval()(x)
    ref = (x - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(m2 / 199, np.float64)
                                                       + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    fz = rs.freeze(eps=1e-12)
    np.testing.assert_allclose(fz(x).std(0), np.ones(4), rtol=1e-6)


def test_running_stats_errors_and_state():
    rs = RunningStats(3, axis=-1)
    assert np.all(rs.count == 0) and np.all(np.isnan(rs.mean)) and np.all(np.isnan(rs.var))
    with pytest.raises(ValueError, match=r"RunningStats\(3\) got a chunk with 2 channels"):
        rs.update(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="Moments with 2 channels"):
        rs.update(Moments.empty(2))
    with pytest.raises(ValueError, match=r"^chunk must have at least 2 dimensions.*chunk\[:, None\]"):
        rs.update(np.zeros(3))
    assert np.all(rs.count == 0)                             # unchanged by the errors
    with pytest.raises(ValueError, match="at least 2 values"):
        rs.to_batchnorm(bnfast.BatchNorm(3, axis=-1))
    rs.update(np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    with pytest.raises(ValueError, match="3 channels"):
        rs.to_batchnorm(bnfast.BatchNorm(4))
    with pytest.raises(ValueError, match="no running statistics"):
        rs.to_batchnorm(bnfast.BatchNorm(3, track_running_stats=False))
    rs.mean[0] = 99.0                                        # a copy: no effect
    assert rs.mean[0] == 2.0
    assert rs.reset() is rs and np.all(rs.count == 0)
    for bad in (0, -1, 2.5):
        with pytest.raises((ValueError, TypeError)):
            RunningStats(bad)
    with pytest.raises(TypeError, match="axis"):
        RunningStats(3, axis=None)
    assert "RunningStats(3" in repr(rs)


def test_running_stats_non_finite_statistics_refused_by_both():
    """NaN or inf in a channel's data: freeze and to_batchnorm both refuse, naming the
    channel and saying why (not "not enough values": every channel has 3)."""
    rs = RunningStats(3, axis=-1).update(
        np.array([[1.0, np.nan, 1.0], [2.0, 3.0, np.inf], [4.0, 5.0, 2.0]]))
    bn = bnfast.BatchNorm(3, axis=-1)
    for call in (rs.freeze, lambda: rs.freeze(unbiased=True), lambda: rs.to_batchnorm(bn)):
        with pytest.raises(ValueError, match=r"channel\(s\) \[1, 2\] are not finite"):
            call()
    np.testing.assert_array_equal(bn.running_mean, 0.0)      # nothing written
    np.testing.assert_array_equal(bn.running_var, 1.0)
    # too few values: both name the channels and their counts
    rs = RunningStats(2, axis=-1).update(Moments([3, 1], [0.0, 0.0], [2.0, 0.0]))
    bn = bnfast.BatchNorm(2, axis=-1)
    for call in (lambda: rs.freeze(unbiased=True), lambda: rs.to_batchnorm(bn)):
        with pytest.raises(ValueError, match=r"at least 2 values; channel\(s\) \[1\] "
                                             r"have counts \[1\.\]"):
            call()
    rs.freeze()                                              # biased: 1 value is enough


def test_docstring_examples(monkeypatch):
    for name in ("moments", "merge_moments", "RunningStats", "Moments"):
        if not hasattr(bnfast, name):
            monkeypatch.setattr(bnfast, name, getattr(M, name), raising=False)
    res = doctest.testmod(M, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 10 and res.failed == 0


def test_to_batchnorm_refused_changes_nothing():
    """A layer whose running_var is read-only, or statistics out of a float16 layer's
    range: a ValueError that names the problem, and neither running statistic written
    (the mean used to be written before the variance failed)."""
    rs = bnfast.RunningStats(2, axis=-1).update(1e5 + np.array([[1.0, 10.0], [3.0, 30.0]]))
    bn = bnfast.BatchNorm(2, dtype=np.float64)
    bn.running_var.flags.writeable = False
    with pytest.raises(ValueError, match="running_var is read-only"):
        rs.to_batchnorm(bn)
    np.testing.assert_array_equal(bn.running_mean, [0.0, 0.0])
    bn16 = bnfast.BatchNorm(2, dtype=np.float16)
    with pytest.raises(ValueError, match=r"mean of channels \[0, 1\] does not fit"):
        rs.to_batchnorm(bn16)
    np.testing.assert_array_equal(bn16.running_mean, [0.0, 0.0])
    np.testing.assert_array_equal(bn16.running_var, [1.0, 1.0])
    with pytest.raises(TypeError, match="layer must be a bnfast.BatchNorm.*got int"):
        rs.to_batchnorm(3)


def test_to_batchnorm_holds_the_layer_lock():
    """to_batchnorm waits for a call in progress (which holds the layer's lock), so that
    call never sees the new mean beside the old variance."""
    from _reliability_helpers import run_while_locked

    bn = bnfast.BatchNorm(2, axis=-1, dtype=np.float64)
    rs = bnfast.RunningStats(2, axis=-1).update(np.array([[1.0, 2.0], [3.0, 6.0]]))
    run_while_locked(bn._lock, lambda: rs.to_batchnorm(bn),
                     lambda: np.testing.assert_array_equal(bn.running_mean, 0.0),
                     "to_batchnorm")
    np.testing.assert_array_equal(bn.running_mean, [2.0, 4.0])


def _random_parts(rng, C, empty_frac):
    """(count, mean, mean_lo, m2, m2_lo) of a random part: empty channels, price
    offsets, NaN and infinite means and m2s that overflow among them."""
    n = rng.integers(0, 6, C).astype(float) * (rng.random(C) > empty_frac)
    mean = rng.standard_normal(C) * 10.0 ** rng.integers(-3, 4, C) \
        + np.where(rng.random(C) < 0.5, 1e6, 0.0)
    odd = rng.random(C)
    mean = np.where(odd < 0.05, np.nan, np.where(odd < 0.1, np.inf, mean))
    m2 = np.where(rng.random(C) < 0.05, 1e308, rng.random(C) * 10)
    lo = rng.standard_normal(C) * 1e-13
    m2lo = rng.standard_normal(C) * 1e-15
    empty = n == 0
    return (n, np.where(empty, np.nan, mean), np.where(empty, 0.0, lo),
            np.where(empty, 0.0, m2), np.where(empty, 0.0, m2lo))


def test_merges_in_c_equal_their_numpy_twins_bitwise():
    """The compiled merges (merge_moments / RunningStats, and the distributed layer's
    merge of packed parts) compute exactly their NumPy twins' arithmetic: the same bits
    on random parts with empty channels, equal counts (the tie rule), price offsets,
    NaN, inf and overflowing m2."""
    from bnfast import _core
    rng = np.random.default_rng(7)

    def same(got, ref):            # bit for bit; a NaN for a NaN (payloads aside)
        for g, r in zip(got, ref):
            g, r = np.asarray(g), np.asarray(r, np.float64)
            nan = np.isnan(g)
            if not (np.array_equal(nan, np.isnan(r)) and
                    g[~nan].tobytes() == r[~nan].tobytes()):
                return False
        return True

    for trial in range(300):
        C = int(rng.integers(1, 40))
        a = _random_parts(rng, C, 0.3)
        b = a if trial % 7 == 0 else _random_parts(rng, C, 0.3)
        if trial % 5 == 0:                        # equal counts: the tie rule decides
            b = (a[0].copy(),) + b[1:]
        got = _core._merge_moment_arrays(*a, *b)
        assert same(got, R.merge_moment_arrays(*a, *b)), trial
        P = int(rng.integers(1, 10))
        rows = np.zeros((P, 4 * C + trial % 3))   # a column slice, as after an allgather
        for r in range(P):
            n, mean, lo, m2, _ = _random_parts(rng, C, 0.4)
            rows[r, :4 * C] = np.concatenate([n, mean, lo, m2])
        got = _core._merge_packed_rows(rows[:, :4 * C])
        assert same(got[:4], R.merge_packed_rows(rows[:, :4 * C])), trial
        assert not got[4].any()
    # a 0-d or missing first array: an error, not a read of its (absent) first dimension
    a = _random_parts(rng, 3, 0.3)
    with pytest.raises(ValueError, match="count"):
        _core._merge_moment_arrays(np.array(2.0), *a[1:], *a)
    with pytest.raises(TypeError):
        _core._merge_moment_arrays(None, *a[1:], *a)


def test_moments_of_big_endian_arrays_merge_correctly():
    """Moments holding byte-swapped arrays (a protocol-5 pickle from a big-endian machine
    keeps '>f8') merge as their values say: the merges' C loops once read their bytes
    as native doubles."""
    import pickle
    be = lambda v: np.array(v, ">f8")           # noqa: E731
    m = pickle.loads(pickle.dumps(M.Moments._trusted(be([3., 4.]), be([1., 2.]),
                                                     be([2., 8.]), be([0., 0.]),
                                                     be([0., 0.])), protocol=5))
    for got, k in ((bnfast.merge_moments(m, m), 2),
                   (bnfast.RunningStats(2, axis=-1).update(m).moments, 1)):
        np.testing.assert_array_equal(got.mean, [1.0, 2.0])
        np.testing.assert_array_equal(got.count, [3.0 * k, 4.0 * k])
        np.testing.assert_array_equal(got.m2, [2.0 * k, 8.0 * k])
    assert m.mean.dtype == np.float64 and m.mean.dtype.isnative
    assert not m.mean.flags.writeable


# -------------------------------------------------------------------------------------
# hypothesis: random shapes, axes, layouts, dtypes, offsets, seeds (tests/arrays.py)

try:
    from hypothesis import given, strategies as st
except ImportError:           # hypothesis is a test extra: the cases above still run
    given = None


if given is not None:
    from arrays import cases

    @given(cases())
    def test_hyp_moments(c):
        x = c.array()
        _check(moments(x, axis=c.axis), _ref(x, c.axis), what=repr(c))

    @given(cases(), st.lists(st.floats(0, 1), max_size=4))
    def test_hyp_merge_of_parts(c, cuts):
        """The moments of parts of x along a non-channel axis (empty parts included),
        merged in order, against those of the whole."""
        x = c.array()
        ax = c.axis % x.ndim
        along = 0 if ax != 0 else 1
        n = x.shape[along]
        at = [0] + sorted(int(f * n) for f in cuts) + [n]
        parts = [moments(np.take(x, range(a, b), axis=along), axis=c.axis)
                 for a, b in zip(at[:-1], at[1:])]
        acc = parts[0]
        for p in parts[1:]:
            acc = merge_moments(acc, p)
        _check(acc, _ref(x, c.axis), what=f"{c!r} cut at {at}")


def test_flags_and_layers_of_another_kind_are_type_errors():
    rs = bnfast.RunningStats(2, axis=-1).update(np.array([[1.0, 2.0], [3.0, 5.0]]))
    # a string "False" read by truth value gave the unbiased variance
    with pytest.raises(TypeError, match="unbiased"):
        rs.freeze(unbiased="False")
    assert np.array_equal(rs.freeze(unbiased=np.False_).var, rs.freeze().var)
    # a torch module passed the duck-typing check, then raised AttributeError
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="from_torch"):
        rs.to_batchnorm(torch.nn.BatchNorm1d(2))
    with pytest.raises(TypeError, match="num_features"):
        bnfast.Moments.empty(True)

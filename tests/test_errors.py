"""Issue 5, bad input: every refusal class, at every entry point where it applies.

Each refusal must be a ValueError or TypeError whose message names the offending
argument, and a refused call must change nothing: not x, not the parameters, not the
running statistics, not ``out``, not a layer's state."""
import numpy as np
import pytest

import bnfast
from bnfast._core import _eval_invstd
from _reliability_helpers import assert_unchanged, snapshot

C = 3


def valid(dtype=np.float32, shape=(4, C, 5)):
    """Valid arguments for every entry point (x is NCL, channel axis 1)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) + 100.0).astype(dtype)
    n = x.size // C
    red = tuple(i for i in range(x.ndim) if i != 1)
    with np.errstate(all="ignore"):
        mean = x.astype(np.float64).mean(axis=red) if x.size else np.zeros(C)
        invstd = 1.0 / np.sqrt(x.astype(np.float64).var(axis=red) + 1e-5) if x.size \
            else np.ones(C)
    return dict(
        x=x, dy=rng.standard_normal(shape).astype(dtype),
        running_mean=rng.standard_normal(C), running_var=rng.uniform(0.5, 2, C),
        weight=rng.uniform(0.5, 2, C), bias=rng.standard_normal(C),
        mean=mean, invstd=invstd, momentum=0.1, eps=1e-5, axis=1,
        out=np.full(shape, np.nan, dtype), training=True, n=n,
    )


# ----------------------------------------------------------------------------------
# Entry points, each a function of the argument dict.

def _bn_eval(a):
    return bnfast.batch_norm(a["x"], a["running_mean"], a["running_var"], a["weight"],
                             a["bias"], False, a["momentum"], a["eps"], axis=a["axis"],
                             out=a["out"])


def _bn_train(a):
    return bnfast.batch_norm(a["x"], a["running_mean"], a["running_var"], a["weight"],
                             a["bias"], True, a["momentum"], a["eps"], axis=a["axis"],
                             out=a["out"])


def _bnt(a):
    return bnfast.batch_norm_train(a["x"], a["weight"], a["bias"], eps=a["eps"],
                                   axis=a["axis"], running_mean=a["running_mean"],
                                   running_var=a["running_var"], momentum=a["momentum"],
                                   out=a["out"])


def _bwd(a):
    return bnfast.batch_norm_backward(a["dy"], a["x"], a["mean"], a["invstd"], a["weight"],
                                      training=a["training"], axis=a["axis"], out=a["out"])


def _bwd_eval(a):
    return bnfast.batch_norm_backward(a["dy"], a["x"], a["mean"], a["invstd"], a["weight"],
                                      training=False, axis=a["axis"], out=a["out"])


def _frozen(a):
    f = bnfast.FrozenBatchNorm(a["running_mean"], a["running_var"], a["weight"], a["bias"],
                               a["eps"], axis=a["axis"])
    return f(a["x"], out=a["out"])


def _frozen_ctor(a):
    return bnfast.FrozenBatchNorm(a["running_mean"], a["running_var"], a["weight"],
                                  a["bias"], a["eps"], axis=a["axis"])


def _layer(a, training):
    layer = bnfast.BatchNorm(C, eps=a["eps"], momentum=a["momentum"], axis=a["axis"])
    a["layer"] = layer
    layer.train(training)
    return layer(a["x"], out=a["out"])


def _layer_train(a):
    return _layer(a, True)


def _layer_eval(a):
    return _layer(a, False)


def _layer_ctor(a):
    return bnfast.BatchNorm(C, eps=a["eps"], momentum=a["momentum"], axis=a["axis"])


# Entry points that take an input x (and out=).
X_ENTRIES = {
    "batch_norm": _bn_eval,
    "batch_norm[training]": _bn_train,
    "batch_norm_train": _bnt,
    "batch_norm_backward": _bwd,
    "batch_norm_backward[eval]": _bwd_eval,
    "FrozenBatchNorm": _frozen,
    "BatchNorm[train]": _layer_train,
    "BatchNorm[eval]": _layer_eval,
}


def refused(entry, a, exc, match):
    """Call ``entry(a)``, expect ``exc`` with a message matching ``match``, and check that
    no array in ``a`` (nor a layer's state) was modified."""
    snap = snapshot(a)
    with pytest.raises(exc, match=match) as info:
        entry(a)
    assert_unchanged(snap, f"{entry.__name__} refused with {info.value!r}")
    layer = a.get("layer")
    if layer is not None:
        assert layer.num_batches_tracked == 0, "a refused call counted a batch"
        assert np.array_equal(layer.running_mean, np.zeros(C))
        assert np.array_equal(layer.running_var, np.ones(C))
        assert np.array_equal(layer.weight, np.ones(C))
        assert np.array_equal(layer.bias, np.zeros(C))
    return info.value


def _with(a, **kw):
    a = dict(a)
    a.update(kw)
    return a


# ----------------------------------------------------------------------------------
# 0-d and 1-D input

@pytest.mark.parametrize("entry", X_ENTRIES.values(), ids=X_ENTRIES.keys())
@pytest.mark.parametrize("bad", [np.float32(1.5), np.ones(C, np.float32), [1.0, 2.0, 3.0]],
                         ids=["0d", "1d", "1d-list"])
def test_input_ndim_below_2(entry, bad):
    a = valid()
    dy = np.ones(np.shape(bad), np.float32)
    refused(entry, _with(a, x=bad, dy=dy, out=None), ValueError,
            r"\bx\b.*\bdimensions?\b|\binput\b")


def test_input_ndim_layer_subclasses():
    x = np.ones((4, C), np.float32)
    refused(lambda a: bnfast.BatchNorm2d(C)(a["x"]), {"x": x}, ValueError, r"4D input")
    refused(lambda a: bnfast.BatchNorm3d(C)(a["x"]), {"x": x}, ValueError, r"5D input")
    refused(lambda a: bnfast.BatchNorm1d(C)(a["x"]), {"x": np.ones((2, C, 2, 2))},
            ValueError, r"2D or 3D input")


# ----------------------------------------------------------------------------------
# Channel-count mismatch of any parameter; parameters that are not 1-D

PARAM_ENTRIES = {   # entry -> the per-channel parameters it takes
    "batch_norm": (_bn_eval, ("running_mean", "running_var", "weight", "bias")),
    "batch_norm[training]": (_bn_train, ("running_mean", "running_var", "weight", "bias")),
    "batch_norm_train": (_bnt, ("running_mean", "running_var", "weight", "bias")),
    "batch_norm_backward": (_bwd, ("mean", "invstd", "weight")),
    "batch_norm_backward[eval]": (_bwd_eval, ("mean", "invstd", "weight")),
}
PARAM_CASES = [(k, p) for k, (_, ps) in PARAM_ENTRIES.items() for p in ps]


@pytest.mark.parametrize("entry_name,param", PARAM_CASES)
@pytest.mark.parametrize("length", [C - 1, C + 1, 0])
def test_param_channel_mismatch(entry_name, param, length):
    entry = PARAM_ENTRIES[entry_name][0]
    a = valid()
    refused(entry, _with(a, **{param: np.ones(length)}), ValueError, rf"\b{param}\b")


@pytest.mark.parametrize("entry_name,param", PARAM_CASES)
@pytest.mark.parametrize("shape", [(C, 1), (1, C), ()], ids=["Cx1", "1xC", "0d"])
def test_param_not_1d(entry_name, param, shape):
    entry = PARAM_ENTRIES[entry_name][0]
    a = valid()
    refused(entry, _with(a, **{param: np.ones(shape)}), ValueError, rf"\b{param}\b")


@pytest.mark.parametrize("param", ["var", "weight", "bias"])
@pytest.mark.parametrize("bad", [np.ones(C + 1), np.ones((C, 1)), np.float64(1.0)],
                         ids=["C+1", "Cx1", "0d"])
def test_frozen_construction_param_mismatch(param, bad):
    a = valid()
    key = {"var": "running_var"}.get(param, param)
    refused(_frozen_ctor, _with(a, **{key: bad}), ValueError, rf"\b{param}\b")


def test_frozen_mean_not_1d():
    a = valid()
    refused(_frozen_ctor, _with(a, running_mean=np.zeros((C, 1))), ValueError, r"\bmean\b")


@pytest.mark.parametrize("entry", [_frozen, _layer_train, _layer_eval],
                         ids=["FrozenBatchNorm", "BatchNorm[train]", "BatchNorm[eval]"])
@pytest.mark.parametrize("channels", [C - 1, C + 1])
def test_input_channel_mismatch_fixed_C(entry, channels):
    """FrozenBatchNorm and layers know C: an input with another count is refused."""
    a = valid(shape=(4, channels, 5))
    refused(entry, _with(a, out=None), ValueError, r"\bx\b|\binput\b")


@pytest.mark.parametrize("entry", X_ENTRIES.values(), ids=X_ENTRIES.keys())
@pytest.mark.parametrize("shape", [(4, C + 1, 5), (4, C, 6), (4, C), (5, C, 4)])
def test_out_wrong_shape(entry, shape):
    a = valid()
    refused(entry, _with(a, out=np.zeros(shape, np.float32)), ValueError, r"\bout\b")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, C + 1, 5), (4, C, 6), (4, C), (5, C, 4)])
def test_dy_wrong_shape(training, shape):
    a = valid()
    refused(_bwd, _with(a, dy=np.ones(shape, np.float32), training=training), ValueError,
            r"\bdy\b")


# ----------------------------------------------------------------------------------
# Non-real dtypes: complex, string, object, datetime (x, dy and the parameters)

BAD_DTYPES = {
    "complex64": lambda s: np.ones(s, np.complex64),
    "complex128": lambda s: np.ones(s, np.complex128),
    "str": lambda s: np.full(s, "1.0"),
    "bytes": lambda s: np.full(s, b"1.0"),
    "object": lambda s: np.ones(s, object),
    "datetime64": lambda s: np.ones(s, "datetime64[s]"),
    "timedelta64": lambda s: np.ones(s, "timedelta64[s]"),
    "void": lambda s: np.zeros(s, "V4"),
}


@pytest.mark.parametrize("entry", X_ENTRIES.values(), ids=X_ENTRIES.keys())
@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_input_bad_dtype(entry, dtype):
    a = valid()
    x = BAD_DTYPES[dtype](a["x"].shape)
    refused(entry, _with(a, x=x, out=None), TypeError, r"\bx\b")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_dy_bad_dtype(training, dtype):
    a = valid()
    dy = BAD_DTYPES[dtype](a["x"].shape)
    refused(_bwd, _with(a, dy=dy, training=training, out=None), TypeError, r"\bdy\b")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_layer_backward_dy_bad_dtype(training, dtype):
    layer = bnfast.BatchNorm(C).train(training)
    x = valid()["x"]
    layer(x)
    state = snapshot(layer.__dict__)
    with pytest.raises(TypeError, match=r"\bdy\b"):
        layer.backward(BAD_DTYPES[dtype](x.shape))
    assert_unchanged(state, "layer.backward refused")
    assert layer.grad_weight is None and layer.grad_bias is None


@pytest.mark.parametrize("entry_name,param", PARAM_CASES)
@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_param_bad_dtype(entry_name, param, dtype):
    entry = PARAM_ENTRIES[entry_name][0]
    a = valid()
    refused(entry, _with(a, **{param: BAD_DTYPES[dtype]((C,))}), TypeError, rf"\b{param}\b")


@pytest.mark.parametrize("param", ["mean", "var", "weight", "bias"])
@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_frozen_construction_bad_dtype(param, dtype):
    a = valid()
    key = {"var": "running_var", "mean": "running_mean"}.get(param, param)
    refused(_frozen_ctor, _with(a, **{key: BAD_DTYPES[dtype]((C,))}), TypeError,
            rf"\b{param}\b")


@pytest.mark.parametrize("make", [bnfast.BatchNorm, bnfast.BatchNorm2d,
                                  lambda c: bnfast.RunningStats(c)])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_num_features_infinite(make, bad):
    with pytest.raises(TypeError, match="num_features"):   # a float, as torch
        make(bad)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), "3", None])
def test_moments_empty_num_features_not_an_int(bad):
    with pytest.raises((TypeError, ValueError), match="num_features"):
        bnfast.Moments.empty(bad)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_])
def test_layer_non_float_dtype(dtype):
    with pytest.raises(TypeError, match=r"\bdtype\b"):
        bnfast.BatchNorm(C, dtype=dtype)


# ----------------------------------------------------------------------------------
# out of the wrong dtype, read-only, or not an array

@pytest.mark.parametrize("entry", X_ENTRIES.values(), ids=X_ENTRIES.keys())
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.complex64])
def test_out_wrong_dtype(entry, dtype):
    a = valid()
    refused(entry, _with(a, out=np.zeros(a["x"].shape, dtype)), TypeError, r"\bout\b")


@pytest.mark.parametrize("entry", X_ENTRIES.values(), ids=X_ENTRIES.keys())
def test_out_read_only(entry):
    a = valid()
    out = np.zeros(a["x"].shape, np.float32)
    out.flags.writeable = False
    refused(entry, _with(a, out=out), ValueError, r"\bout\b")


@pytest.mark.parametrize("entry", X_ENTRIES.values(), ids=X_ENTRIES.keys())
def test_out_read_only_is_x(entry):
    """out=x with a read-only x: refused, not written through."""
    a = valid()
    a["x"].flags.writeable = False
    refused(entry, _with(a, out=a["x"]), ValueError, r"\bout\b")


@pytest.mark.parametrize("entry", X_ENTRIES.values(), ids=X_ENTRIES.keys())
def test_out_not_an_array(entry):
    a = valid()
    refused(entry, _with(a, out=a["x"].tolist()), TypeError, r"\bout\b")


def test_layer_backward_out_refused():
    x = valid()["x"]
    for training in (True, False):
        layer = bnfast.BatchNorm(C).train(training)
        layer(x)
        ro = np.zeros(x.shape, np.float32)
        ro.flags.writeable = False
        for bad, exc in [(np.zeros(x.shape, np.float64), TypeError),
                         (np.zeros((4, C), np.float32), ValueError), (ro, ValueError)]:
            state = snapshot(layer.__dict__, bad)
            with pytest.raises(exc, match=r"\bout\b"):
                layer.backward(np.ones_like(x), out=bad)
            assert_unchanged(state, "layer.backward(out=bad)")
            assert layer.grad_weight is None


# ----------------------------------------------------------------------------------
# Eval without running statistics; training with one value per channel or no values

@pytest.mark.parametrize("missing", ["running_mean", "running_var", "both"])
def test_eval_without_running_stats(missing):
    a = valid()
    kw = {"running_mean": None, "running_var": None} if missing == "both" else {missing: None}
    refused(_bn_eval, _with(a, **kw), ValueError, r"running_(mean|var)")


TRAIN_ENTRIES = {"batch_norm[training]": _bn_train, "batch_norm_train": _bnt,
                 "BatchNorm[train]": _layer_train}


@pytest.mark.parametrize("how", ["same", "shifted", "reversed"])
def test_running_stats_sharing_memory_refused(how):
    """running_mean and running_var are both updated in place: given the same memory,
    the variance's update overwrote the mean's, silently. Refused, nothing changed."""
    x = np.random.default_rng(5).standard_normal((16, C)) + 3.0
    r = np.ones(C + 1)
    rm, rv = {"same": (r[:C], r[:C]), "shifted": (r[:C], r[1:]),
              "reversed": (r[:C], r[C - 1::-1])}[how]
    before = r.copy()
    with pytest.raises(ValueError, match="running_mean and running_var share memory"):
        bnfast.batch_norm_train(x, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(r, before)
    bn = bnfast.BatchNorm(C, dtype=np.float64)
    bn.running_var = bn.running_mean                 # by hand, as a user might
    with pytest.raises(ValueError, match="share memory"):
        bn(x)
    assert bn.num_batches_tracked == 0


@pytest.mark.parametrize("entry", ["batch_norm[training]", "batch_norm_train"])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_sharing_memory_with_running_stats_refused(entry, which, dtype):
    """y is written before the running statistics are updated in place: with either
    inside out, the update overwrote part of the returned y, silently. Refused, nothing
    written."""
    a = valid(dtype, shape=(6, C))
    buf = np.full(6 * C, 2.0, dtype)
    a["out"] = buf.reshape(6, C)
    a[which] = buf[C:2 * C]                          # out[1]
    a["running_mean" if which == "running_var" else "running_var"] = np.ones(C, dtype)
    before = buf.copy()
    with pytest.raises(ValueError, match=f"out and {which} share memory"):
        TRAIN_ENTRIES[entry](a)
    np.testing.assert_array_equal(buf, before)
    layer = bnfast.BatchNorm(C, dtype=dtype)
    setattr(layer, which, buf[:C])                   # by hand, as a user might
    with pytest.raises(ValueError, match="share memory"):
        layer(a["x"], out=a["out"])
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(buf, before)
    # beside each other, they are apart
    out, r = buf[:5 * C].reshape(5, C), buf[5 * C:]
    a = valid(dtype, shape=(5, C))
    a["out"], a[which] = out, r
    want = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a.items()}
    want["out"] = np.empty_like(out)
    TRAIN_ENTRIES[entry](a)
    TRAIN_ENTRIES[entry](want)
    np.testing.assert_array_equal(out, want["out"])
    np.testing.assert_array_equal(r, want[which])


def test_running_stats_interleaved_views_are_apart():
    """Views whose bounds meet but whose elements do not (every other element) are two
    arrays: accepted, each updated as alone."""
    x = np.random.default_rng(6).standard_normal((16, C)) + 3.0
    r = np.zeros(2 * C)
    rm, rv = r[0::2], r[1::2]
    rv[:] = 1.0
    want_m, want_v = np.zeros(C), np.ones(C)
    bnfast.batch_norm_train(x, running_mean=rm, running_var=rv)
    bnfast.batch_norm_train(x, running_mean=want_m, running_var=want_v)
    np.testing.assert_array_equal(rm, want_m)
    np.testing.assert_array_equal(rv, want_v)


@pytest.mark.parametrize("entry", TRAIN_ENTRIES.values(), ids=TRAIN_ENTRIES.keys())
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1), (1, C, 1, 1, 1)])
def test_training_one_value_per_channel(entry, shape):
    a = valid(shape=shape)
    refused(entry, a, ValueError, r"more than 1 value per channel")


@pytest.mark.parametrize("entry", TRAIN_ENTRIES.values(), ids=TRAIN_ENTRIES.keys())
@pytest.mark.parametrize("shape", [(0, C), (0, C, 5), (4, C, 0), (0, C, 0, 2)])
def test_training_empty_batch(entry, shape):
    a = valid(shape=shape)
    refused(entry, a, ValueError, r"\bx\b.*empty|empty.*\bx\b")


def test_layer_without_tracking_refuses_one_value_in_eval():
    """track_running_stats=False uses batch statistics even in eval (torch)."""
    layer = bnfast.BatchNorm(C, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        layer(np.ones((1, C), np.float32))


# ----------------------------------------------------------------------------------
# eps <= 0, infinite or NaN; momentum outside [0, 1]

EPS_ENTRIES = {"batch_norm": _bn_eval, "batch_norm[training]": _bn_train,
               "batch_norm_train": _bnt, "FrozenBatchNorm": _frozen_ctor,
               "BatchNorm": _layer_ctor}


@pytest.mark.parametrize("entry", EPS_ENTRIES.values(), ids=EPS_ENTRIES.keys())
@pytest.mark.parametrize("eps", [0.0, -0.0, -1e-5, float("nan"), float("-inf"), np.nan,
                                 float("inf"), np.inf])
def test_eps_not_positive(entry, eps):
    a = valid()
    refused(entry, _with(a, eps=eps), ValueError, r"\beps\b")


@pytest.mark.parametrize("entry", EPS_ENTRIES.values(), ids=EPS_ENTRIES.keys())
def test_eps_an_int_beyond_a_double(entry):
    # float(10**400) overflows: an OverflowError had not named eps
    a = valid()
    refused(entry, _with(a, eps=10**400), ValueError, r"\beps\b")


@pytest.mark.parametrize("entry", EPS_ENTRIES.values(), ids=EPS_ENTRIES.keys())
@pytest.mark.parametrize("eps", ["1e-5", None, [1e-5], np.array([1e-5, 1e-5])])
def test_eps_not_a_number(entry, eps):
    a = valid()
    refused(entry, _with(a, eps=eps), TypeError, r"\beps\b")


MOM_ENTRIES = {"batch_norm": _bn_eval, "batch_norm[training]": _bn_train,
               "batch_norm_train": _bnt, "BatchNorm": _layer_ctor}


@pytest.mark.parametrize("entry", MOM_ENTRIES.values(), ids=MOM_ENTRIES.keys())
@pytest.mark.parametrize("momentum", [-0.1, 1.0 + 1e-9, 2.0, float("nan"), float("inf")])
def test_momentum_out_of_range(entry, momentum):
    a = valid()
    refused(entry, _with(a, momentum=momentum), ValueError, r"\bmomentum\b")


@pytest.mark.parametrize("entry", MOM_ENTRIES.values(), ids=MOM_ENTRIES.keys())
@pytest.mark.parametrize("momentum", [10**400, -10**400])
def test_momentum_an_int_beyond_a_double(entry, momentum):
    a = valid()
    refused(entry, _with(a, momentum=momentum), ValueError, r"\bmomentum\b")


def test_eps_and_momentum_tensors_of_several_elements():
    # torch's own ValueError ("only one element tensors ...") had not named the argument
    torch = pytest.importorskip("torch")
    for entry in EPS_ENTRIES.values():
        refused(entry, _with(valid(), eps=torch.full((2,), 1e-5)), TypeError, r"\beps\b")
    for entry in MOM_ENTRIES.values():
        refused(entry, _with(valid(), momentum=torch.full((2,), 0.1)), TypeError,
                r"\bmomentum\b")


@pytest.mark.parametrize("entry", [_bn_train, _bnt], ids=["batch_norm[training]",
                                                          "batch_norm_train"])
@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_bounds_accepted(entry, momentum):
    """The closed interval: 0 keeps the running stats, 1 replaces them."""
    a = valid()
    rm, rv = a["running_mean"].copy(), a["running_var"].copy()
    entry(_with(a, momentum=momentum))
    x = a["x"].astype(np.float64)
    if momentum == 0.0:
        np.testing.assert_array_equal(a["running_mean"], rm)
        np.testing.assert_array_equal(a["running_var"], rv)
    else:
        np.testing.assert_allclose(a["running_mean"], x.mean(axis=(0, 2)), rtol=1e-12)
        np.testing.assert_allclose(a["running_var"], x.var(axis=(0, 2), ddof=1), rtol=1e-9)


# ----------------------------------------------------------------------------------
# Negative running variance: in calls and at FrozenBatchNorm construction

NEGVAR_ENTRIES = {"batch_norm": _bn_eval, "batch_norm[training]": _bn_train,
                  "batch_norm_train": _bnt, "FrozenBatchNorm": _frozen_ctor}


@pytest.mark.parametrize("entry", NEGVAR_ENTRIES.values(), ids=NEGVAR_ENTRIES.keys())
@pytest.mark.parametrize("value", [-1.0, -1e-30, -np.inf])
def test_negative_running_var(entry, value):
    a = valid()
    rv = a["running_var"].copy()
    rv[1] = value
    name = r"\bvar\b" if entry is _frozen_ctor else r"\brunning_var\b"
    refused(entry, _with(a, running_var=rv), ValueError, name)


def test_negative_running_var_layer():
    layer = bnfast.BatchNorm(C)
    sd = layer.state_dict()
    state = snapshot(layer.__dict__)
    with pytest.raises(ValueError, match=r"running_var"):
        layer.load_state_dict({**sd, "running_var": np.array([1.0, -1.0, 1.0])})
    assert_unchanged(state, "load_state_dict refused")
    # set directly (bypassing load_state_dict): the eval call refuses it
    layer.running_var = np.array([1.0, -2.0, 1.0], np.float32)
    layer.eval()
    x = valid()["x"]
    snap = snapshot(x, layer.__dict__)
    with pytest.raises(ValueError, match=r"running_var"):
        layer(x)
    assert_unchanged(snap, "eval layer call with a negative running_var")
    with pytest.raises(ValueError, match=r"\bvar\b"):
        layer.freeze()


# ----------------------------------------------------------------------------------
# axis out of range (and not an integer)

AXIS_ENTRIES = dict(X_ENTRIES)


@pytest.mark.parametrize("entry", AXIS_ENTRIES.values(), ids=AXIS_ENTRIES.keys())
@pytest.mark.parametrize("axis", [3, -4, 100, -(2**40)])
def test_axis_out_of_range(entry, axis):
    a = valid()
    refused(entry, _with(a, axis=axis), ValueError, r"\baxis\b")


@pytest.mark.parametrize("entry", list(AXIS_ENTRIES.values()) + [_frozen_ctor, _layer_ctor],
                         ids=list(AXIS_ENTRIES.keys()) + ["FrozenBatchNorm()", "BatchNorm()"])
@pytest.mark.parametrize("axis", [1.5, 1.0, "1", None])
def test_axis_not_an_int(entry, axis):
    """A float or string axis is refused, not truncated/parsed to another axis."""
    a = valid()
    refused(entry, _with(a, axis=axis), TypeError, r"\baxis\b")


# ----------------------------------------------------------------------------------
# Read-only running statistics when training must update them

@pytest.mark.parametrize("entry", [_bn_train, _bnt], ids=["batch_norm[training]",
                                                          "batch_norm_train"])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_read_only_running_stats_in_training(entry, which):
    a = valid()
    a[which].flags.writeable = False
    refused(entry, a, ValueError, rf"\b{which}\b")


@pytest.mark.parametrize("entry", [_bn_train, _bnt], ids=["batch_norm[training]",
                                                          "batch_norm_train"])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("bad", ["list", "int64", "broadcast"])
def test_unwritable_running_stats_in_training(entry, which, bad):
    """Running stats that cannot be updated in place (a list, an integer array, a
    broadcast view) are refused rather than silently not updated."""
    a = valid()
    v = {"list": a[which].tolist(), "int64": np.ones(C, np.int64),
         "broadcast": np.broadcast_to(np.float64(1.0), (C,))}[bad]
    refused(entry, _with(a, **{which: v}), (ValueError, TypeError), rf"\b{which}\b")


def test_read_only_running_stats_layer():
    layer = bnfast.BatchNorm(C)
    layer.running_mean.flags.writeable = False
    x = valid()["x"]
    snap = snapshot(x, layer.__dict__)
    with pytest.raises(ValueError, match=r"running_mean"):
        layer(x)
    assert_unchanged(snap, "training layer call with read-only running_mean")
    assert layer.num_batches_tracked == 0
    # eval only reads them: fine
    layer.eval()
    layer(x)


@pytest.mark.parametrize("entry", [_bn_eval, _frozen], ids=["batch_norm", "FrozenBatchNorm"])
def test_read_only_inputs_fine_in_eval(entry):
    """Eval only reads x, the statistics and the parameters: read-only ones are fine."""
    a = valid()
    for k in ("running_mean", "running_var", "weight", "bias", "x"):
        a[k].flags.writeable = False
    snap = snapshot({k: v for k, v in a.items() if k != "out"})
    y = entry(a)
    assert y is a["out"] and np.isfinite(y).all()
    assert_unchanged(snap, "eval with read-only inputs")


# ----------------------------------------------------------------------------------
# num_features < 1

@pytest.mark.parametrize("cls", [bnfast.BatchNorm, bnfast.BatchNorm1d, bnfast.BatchNorm2d,
                                 bnfast.BatchNorm3d])
@pytest.mark.parametrize("nf", [0, -1, -(2**40)])
def test_num_features_below_1(cls, nf):
    with pytest.raises(ValueError, match=r"num_features"):
        cls(nf)


@pytest.mark.parametrize("nf", [2.5, "3", None, [3]])
def test_num_features_not_an_int(nf):
    with pytest.raises((TypeError, ValueError), match=r"num_features"):
        bnfast.BatchNorm(nf)


def test_frozen_zero_channels():
    with pytest.raises(ValueError, match=r"\bmean\b"):
        bnfast.FrozenBatchNorm(np.zeros(0), np.zeros(0))


# ----------------------------------------------------------------------------------
# load_state_dict: wrong shape (names the key), missing key

@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(C + 1,), (C - 1,), (C, 1), ()])
def test_load_state_dict_wrong_shape(key, shape):
    layer = bnfast.BatchNorm(C)
    sd = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    sd["running_mean"][:] = 5.0      # a change that must not land when refused
    sd[key] = np.ones(shape)
    state = snapshot(layer.__dict__)
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        layer.load_state_dict(sd)
    assert_unchanged(state, "load_state_dict refused")
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("value", [2.9, -4, np.nan, np.inf, -1.0, 2.0**70])
def test_load_state_dict_num_batches_tracked_must_be_a_whole_count(value):
    layer = bnfast.BatchNorm(C)
    sd = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    sd["running_mean"][:] = 5.0
    sd["num_batches_tracked"] = np.array(value)
    state = snapshot(layer.__dict__)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        layer.load_state_dict(sd)
    assert_unchanged(state, "load_state_dict refused")
    sd["num_batches_tracked"] = np.array(7.0)      # a whole float (torch's .float()) loads
    assert layer.load_state_dict(sd).num_batches_tracked == 7


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var",
                                 "num_batches_tracked"])
def test_load_state_dict_missing_key(key):
    layer = bnfast.BatchNorm(C)
    sd = {k: np.array(v, copy=True) for k, v in layer.state_dict().items() if k != key}
    if "running_mean" in sd:
        sd["running_mean"][:] = 5.0
    state = snapshot(layer.__dict__)
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        layer.load_state_dict(sd)
    assert_unchanged(state, "load_state_dict refused")


def test_load_state_dict_bad_dtype_names_key():
    layer = bnfast.BatchNorm(C)
    sd = dict(layer.state_dict())
    sd["bias"] = np.ones(C, np.complex128)
    state = snapshot(layer.__dict__)
    with pytest.raises(TypeError, match=r"\bbias\b"):
        layer.load_state_dict(sd)
    assert_unchanged(state, "load_state_dict refused")


# ----------------------------------------------------------------------------------
# Layer backward before any forward, or with a dy of another shape

@pytest.mark.parametrize("training", [True, False])
def test_backward_before_forward(training):
    layer = bnfast.BatchNorm(C).train(training)
    with pytest.raises(ValueError, match=r"backward.*forward|forward.*backward"):
        layer.backward(np.ones((4, C), np.float32))
    assert layer.grad_weight is None and layer.grad_bias is None


def test_backward_after_refused_forward_still_refused():
    """A forward that was refused leaves nothing behind for backward."""
    layer = bnfast.BatchNorm(C)
    with pytest.raises(ValueError):
        layer(np.ones((1, C), np.float32))
    with pytest.raises(ValueError, match=r"backward.*forward|forward.*backward"):
        layer.backward(np.ones((1, C), np.float32))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, C + 1, 5), (4, C, 6), (4, C), (5, C, 4), (4 * C * 5,),
                                   (C, 4, 5)])
def test_layer_backward_dy_shape(training, shape):
    layer = bnfast.BatchNorm(C).train(training)
    x = valid()["x"]
    layer(x)
    state = snapshot(layer.__dict__)
    with pytest.raises(ValueError, match=r"\bdy\b"):
        layer.backward(np.ones(shape, np.float32))
    assert_unchanged(state, "layer.backward refused")
    assert layer.grad_weight is None and layer.grad_bias is None


# ----------------------------------------------------------------------------------
# Refusals in the low-latency FrozenBatchNorm fast path (small C-contiguous (rows, C))

def test_frozen_fast_path_refusals():
    f = bnfast.FrozenBatchNorm(np.zeros(C), np.ones(C), axis=-1)
    x = np.ones((2, C), np.float32)
    snap = snapshot(x)
    ro = np.zeros((2, C), np.float32)
    ro.flags.writeable = False
    for out, exc in [(np.zeros((2, C), np.float64), TypeError),
                     (np.zeros((2, C + 1), np.float32), ValueError),
                     (np.zeros((3, C), np.float32), ValueError),
                     (ro, ValueError), ([[0.0] * C] * 2, TypeError)]:
        with pytest.raises(exc, match=r"\bout\b"):
            f(x, out=out)
    with pytest.raises(ValueError, match=r"\bx\b|\binput\b|channels"):
        f(np.ones((2, C + 1), np.float32))
    assert_unchanged(snap, "frozen fast path")


# ----------------------------------------------------------------------------------
# Masked arrays: the kernels read the data under the mask, so one that hides values is
# refused wherever an array is read or written (NumPy's asarray would drop the mask).

def _masked(a, where=(0,)):
    mask = np.zeros(np.shape(a), bool)
    mask.flat[list(where)] = True
    return np.ma.masked_array(a, mask=mask)


@pytest.mark.parametrize("entry", X_ENTRIES.values(), ids=X_ENTRIES.keys())
@pytest.mark.parametrize("arg", ["x", "out"])
def test_masked_input_or_out_refused(entry, arg):
    a = valid()
    a[arg] = _masked(a[arg])
    refused(entry, a, TypeError, rf"\b{arg}\b.*masked")


@pytest.mark.parametrize("training", [True, False])
def test_masked_dy_refused(training):
    a = _with(valid(), training=training)
    a["dy"] = _masked(a["dy"])
    refused(_bwd, a, TypeError, r"\bdy\b.*masked")


@pytest.mark.parametrize("entry,param", [
    (_bn_eval, "running_mean"), (_bn_eval, "weight"), (_bnt, "bias"),
    (_bnt, "running_var"), (_bwd, "mean"), (_bwd, "invstd"), (_bwd, "weight"),
    (_frozen_ctor, "running_var")])
def test_masked_param_refused(entry, param):
    a = valid()
    a[param] = _masked(a[param], where=(1,))
    name = {"running_mean": "running_mean|mean", "running_var": "running_var|var"}.get(
        param, param)
    refused(entry, a, TypeError, rf"\b({name})\b.*masked")


@pytest.mark.parametrize("entry", X_ENTRIES.values(), ids=X_ENTRIES.keys())
def test_masked_array_hiding_nothing_is_its_data(entry):
    a = valid()
    want = entry(_with(a, out=None))
    got = entry(_with(a, x=np.ma.masked_array(a["x"], mask=False), out=None))
    for w, g in zip(want if isinstance(want, tuple) else (want,),
                    got if isinstance(got, tuple) else (got,)):
        np.testing.assert_array_equal(np.asarray(g), w)


# ----------------------------------------------------------------------------------
# Odd calls the signatures allow

def test_eval_conversion_error_names_x():
    rm, rv = np.zeros(C), np.ones(C)
    with pytest.raises(TypeError, match=r"\bx\b"):
        bnfast.batch_norm([[1.0, 2.0, 3.0], [4.0, 5.0]], rm, rv)       # ragged
    with pytest.raises(TypeError, match=r"\bx\b.*dtype"):
        bnfast.batch_norm(object(), rm, rv)


def test_layer_conversion_errors_name_the_argument():
    """The layers converted x and dy with a bare np.asarray: a ragged list or a torch
    tensor that needs grad raised NumPy's or torch's own error (a RuntimeError), where
    the functional API names the argument in a TypeError."""
    layer = bnfast.BatchNorm(2, axis=-1)
    with pytest.raises(TypeError, match=r"^x must be an array-like"):
        layer([[1.0, 2.0], [1.0]])
    layer(np.ones((3, 2)) * np.arange(3)[:, None])
    with pytest.raises(TypeError, match=r"^dy must be an array-like"):
        layer.backward([[1.0, 2.0], [1.0], [2.0, 3.0]])
    with pytest.raises(TypeError, match=r"^x must be an array-like"):
        bnfast.moments([[1.0, 2.0], [1.0]])
    # what NumPy converts to an object array without an error (and NumPy < 1.24 made of
    # a ragged list, with a warning only: "x must have at least 2 dimensions")
    for call in (lambda: layer([[1.0, 2.0], [None, 3.0]]),
                 lambda: bnfast.moments([[1.0, 2.0], [None, 3.0]])):
        with pytest.raises(TypeError, match=r"^x must be an array-like.*object array"):
            call()
    torch = pytest.importorskip("torch")
    t = torch.ones((3, 2), requires_grad=True)
    for call in (lambda: bnfast.batch_norm_train(t), lambda: layer(t)):
        with pytest.raises(TypeError, match=r"^x must be an array-like"):
            call()


@pytest.mark.parametrize("bad", ["False", "", 1, 0, None, [False]])
def test_training_flag_must_be_a_bool(bad):
    """training was read by truth value: training="False" trained and updated the
    running statistics; in the backward it gave the training-mode gradient. torch's
    batch_norm takes only a bool (here NumPy's bool too)."""
    a = valid()
    rm = a["running_mean"].copy()
    with pytest.raises(TypeError, match=r"training must be a bool"):
        bnfast.batch_norm(a["x"], a["running_mean"], a["running_var"], training=bad)
    np.testing.assert_array_equal(a["running_mean"], rm)
    with pytest.raises(TypeError, match=r"training must be a bool"):
        bnfast.batch_norm_backward(a["dy"], a["x"], a["mean"], a["invstd"], training=bad)
    with pytest.raises(ValueError, match=r"training mode is expected to be boolean"):
        bnfast.BatchNorm(C).train(bad)
    for ok in (np.True_, np.False_):
        want = bnfast.batch_norm(a["x"], rm.copy(), a["running_var"].copy(), training=bool(ok))
        got = bnfast.batch_norm(a["x"], rm.copy(), a["running_var"].copy(), training=ok)
        np.testing.assert_array_equal(got, want)
        assert bnfast.BatchNorm(C).train(ok).training is bool(ok)


@pytest.mark.parametrize("eps", [-5.0, 0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_eval_backward_checks_eps_and_running_var(eps, dtype):
    """The forward refuses an eps (or a negative running variance) set by hand; the
    eval-mode backward read the layer's eps then and returned a NaN gradient. It now
    takes the last forward's eps, and checks a running variance changed in place."""
    x = valid(dtype)["x"]
    layer = bnfast.BatchNorm(C, dtype=dtype).eval()
    layer(x)
    dx = layer.backward(np.ones_like(x))
    layer.eps = eps
    with pytest.raises(ValueError, match=r"\beps\b"):
        layer(x)
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), dx)
    assert np.isfinite(layer.grad_weight).all()
    with pytest.raises(ValueError, match=r"\beps\b"):
        _eval_invstd(layer.running_var, eps)
    layer.eps = 1e-5
    layer.running_var[1] = -1.0
    with pytest.raises(ValueError, match=r"running_var must be non-negative; channel 1"):
        layer(x)
    with pytest.raises(ValueError, match=r"running_var must be non-negative; channel 1"):
        layer.backward(np.ones_like(x))


def test_moments_of_masked_arrays_refused():
    """Moments(count, mean, m2) took the values under a mask, silently; moments() and
    every other entry point refuse a masked array that hides values."""
    for arg in range(3):
        parts = [np.array([2.0, 2.0]), np.array([1.0, 99.0]), np.array([0.5, 0.5])]
        parts[arg] = _masked(parts[arg], where=(1,))
        with pytest.raises(TypeError, match=rf"\b{('count', 'mean', 'm2')[arg]}\b.*masked"):
            bnfast.Moments(*parts)
    m = bnfast.Moments(*(np.ma.masked_array(p, mask=False) for p in
                         (np.array([2.0]), np.array([1.0]), np.array([0.5]))))
    assert m.mean.tolist() == [1.0]


@pytest.mark.parametrize("op", ["train", "eval", "backward", "backward-empty"])
def test_channel_counts_past_the_address_space_are_a_memory_error(op):
    """A broadcast (or empty) x can claim 2**58 channels in a few bytes; their
    per-channel buffers (C x 4-9 doubles) wrapped around size_t to a few bytes, and the
    parameters were written past them (a segfault; ASan: heap-buffer-overflow)."""
    C = {"train": 256204778801521551, "eval": 2**59 + 1}.get(op, 2**58 + 1)
    x = (np.empty((0, C), np.float16) if op == "backward-empty" else
         np.broadcast_to(np.float16(1), (2, C)))
    m, s = np.broadcast_to(np.zeros(1), (C,)), np.broadcast_to(np.ones(1), (C,))
    call = {"train": lambda: bnfast.batch_norm_train(x, axis=1),
            "eval": lambda: bnfast.batch_norm(x, m, s, axis=1)}.get(
        op, lambda: bnfast.batch_norm_backward(x, x, m, s, axis=1))
    with pytest.raises(MemoryError, match="more than can be addressed"):
        call()


@pytest.mark.parametrize("missing", ["mean", "invstd"])
@pytest.mark.parametrize("training", [True, False])
def test_backward_statistics_required(missing, training):
    a = _with(valid(), training=training)
    a[missing] = None
    refused(_bwd, a, ValueError, r"mean and invstd are required")


def test_frozen_init_runs_once_and_its_arrays_stay_read_only():
    f = bnfast.FrozenBatchNorm(np.zeros(C), np.ones(C), axis=-1)
    x = np.ones((2, C))
    want = f(x)
    with pytest.raises(TypeError, match="immutable"):
        f.__init__(np.full(C, 1.0), np.ones(C), axis=-1)
    np.testing.assert_array_equal(f(x), want)
    for name in ("mean", "var"):
        with pytest.raises(ValueError):
            getattr(f, name).flags.writeable = True
    g = bnfast.FrozenBatchNorm(np.zeros(C), np.ones(C), np.ones(C), np.zeros(C), axis=-1)
    for name in ("weight", "bias"):
        with pytest.raises(ValueError):
            getattr(g, name).flags.writeable = True
    # nor through the array that owns the data (a view's .base had been settable)
    for obj, name in ((f, "mean"), (f, "var"), (g, "weight"), (g, "bias")):
        a = getattr(obj, name)
        while isinstance(a, np.ndarray):
            with pytest.raises(ValueError):
                a.flags.writeable = True
            a = a.base
    np.testing.assert_array_equal(f.mean, np.zeros(C))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_frozen_and_fold_refuse_a_mean_not_finite(bad):
    # as a NaN variance: a frozen or folded layer from diverged statistics would answer
    # NaN for good (RunningStats.freeze refused it already)
    mean = np.zeros(C)
    mean[1] = bad
    with pytest.raises(ValueError, match=r"\bmean\b.*finite.*channel 1"):
        bnfast.FrozenBatchNorm(mean, np.ones(C))
    layer = bnfast.BatchNorm(C, axis=-1, dtype=np.float64).eval()
    layer.running_mean[1] = bad
    with pytest.raises(ValueError, match=r"\bmean\b.*finite.*channel 1"):
        layer.freeze()
    with pytest.raises(ValueError, match=r"running_mean.*channel 1"):
        bnfast.fold_linear(np.eye(C), None, layer)


@pytest.mark.parametrize("n", [2**31, 10**20])
def test_set_num_threads_too_many(n):
    before = bnfast.get_num_threads()
    with pytest.raises(ValueError, match="set_num_threads"):
        bnfast.set_num_threads(n)
    assert bnfast.get_num_threads() == before


def test_masked_refused_by_the_python_entry_points():
    """The layers' backward (plain and synchronized), moments, RunningStats.update,
    load_state_dict and folding convert with np.asarray, which drops a mask: they check
    first."""
    from bnfast.distributed import SingleProcessComm, SyncBatchNorm

    a = valid()
    for layer in (bnfast.BatchNorm(C), SyncBatchNorm(C, comm=SingleProcessComm())):
        layer(a["x"])
        state = snapshot(layer.weight, layer.running_mean)
        with pytest.raises(TypeError, match=r"\bdy\b.*masked"):
            layer.backward(_masked(a["dy"]))
        assert_unchanged(state, "a refused backward")
        assert layer.grad_weight is None
    with pytest.raises(TypeError, match=r"\bx\b.*masked"):
        bnfast.moments(_masked(a["x"]))
    with pytest.raises(TypeError, match=r"\bchunk\b.*masked"):
        bnfast.RunningStats(C).update(_masked(a["x"]))
    bn = bnfast.BatchNorm(C)
    with pytest.raises(TypeError, match="masked"):
        bn.load_state_dict({**bn.state_dict(), "bias": _masked(np.ones(C))})
    np.testing.assert_array_equal(bn.bias, 0.0)
    with pytest.raises(TypeError, match=r"\bweight\b.*masked"):
        bnfast.fold_linear(_masked(np.ones((C, 2))), np.zeros(C), bn.eval())


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_training_with_one_running_stat_refused(given):
    """Training with one running statistic and not the other is refused, as PyTorch
    refuses it (it updated the one given and nothing else)."""
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    stats = {given: np.zeros(3, np.float32) if given == "running_mean" else
             np.ones(3, np.float32)}
    before = stats[given].copy()
    for call in (lambda: bnfast.batch_norm(x, stats.get("running_mean"),
                                           stats.get("running_var"), training=True),
                 lambda: bnfast.batch_norm_train(x, **stats)):
        with pytest.raises(ValueError, match="both be None or neither"):
            call()
        np.testing.assert_array_equal(stats[given], before)


def test_sync_batchnorm_comm_checked_when_used():
    """A comm without the calls SyncBatchNorm makes is a TypeError naming it at the
    first training call (an AttributeError on 'int' before); eval never uses it."""
    from bnfast.distributed import SyncBatchNorm
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    bn = SyncBatchNorm(3, axis=-1, comm=5)
    with pytest.raises(TypeError, match="comm"):
        bn(x)
    assert bn.num_batches_tracked == 0
    bn.eval()(x)                                # local: the comm is not needed


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (2**63, ValueError),
                                     ("a", TypeError), (1.5, TypeError), (True, TypeError)])
def test_num_batches_tracked_set_by_hand_checked(bad, exc):
    """A num_batches_tracked set by hand to something that is not a count is an error
    naming it at the next training call (a ZeroDivisionError before), and the running
    statistics are left as they were."""
    bn = bnfast.BatchNorm(3, axis=-1, momentum=None, dtype=np.float64)
    bn.num_batches_tracked = bad
    x = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(exc, match="num_batches_tracked"):
        bn(x)
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    with pytest.raises(exc, match="num_batches_tracked"):
        bn.state_dict()
    # a good state repairs it (the load had checked the bad count and refused itself)
    good = bnfast.BatchNorm(3, axis=-1, dtype=np.float64)
    good(x)
    assert bn.load_state_dict(good.state_dict()) is bn
    assert bn.num_batches_tracked == 1 and type(bn.num_batches_tracked) is int
    assert int(bn.state_dict()["num_batches_tracked"]) == 1
    bn.num_batches_tracked = bad
    bn.load_state_dict({"weight": [2.0] * 3}, strict=False)     # the count not given: kept
    assert bn.num_batches_tracked is bad or bn.num_batches_tracked == bad
    np.testing.assert_array_equal(bn.weight, 2.0)


def test_num_batches_tracked_none_or_an_integer_array(tmp_path):
    """None (torch's, without tracking): counts nothing, the running statistics
    updated with factor 0 (momentum None); save, load and from_batchnorm still work
    (the count saved as 0). A 0-d integer array counts as its value."""
    from bnfast.distributed import SingleProcessComm, SyncBatchNorm
    x = np.random.default_rng(0).standard_normal((6, 3))
    bn = bnfast.BatchNorm(3, axis=-1, momentum=None, dtype=np.float64)
    bn.num_batches_tracked = None
    bn(x)
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    assert bn.num_batches_tracked is None
    assert bnfast.load(bn.save(tmp_path / "b")).num_batches_tracked == 0
    assert SyncBatchNorm.from_batchnorm(bn, comm=SingleProcessComm()).num_batches_tracked == 0
    bn.num_batches_tracked = np.array(3)
    bn(x)
    assert bn.num_batches_tracked == 4 and type(bn.num_batches_tracked) is int


@pytest.mark.parametrize("reset,training", [("reset_parameters", True),
                                            ("reset_parameters", False),
                                            ("reset_running_stats", False)])
def test_backward_after_a_reset_refused(reset, training):
    """A reset between a forward and its backward changes, in place, arrays the
    backward needs (the weight; in eval the running statistics): a RuntimeError, as
    torch's in-place check, not gradients of other values. A reset of the running
    statistics after a training forward leaves its backward alone."""
    bn = bnfast.BatchNorm(3, axis=-1, dtype=np.float64)
    bn.weight[:] = [2.0, 3.0, 4.0]
    bn.train(training)
    x = np.random.default_rng(0).standard_normal((6, 3))
    bn(x)
    getattr(bn, reset)()
    with pytest.raises(RuntimeError, match=reset):
        bn.backward(np.ones_like(x))
    bn(x)
    bn.backward(np.ones_like(x))                # a new forward: fine
    bn.train()(x)
    bn.reset_running_stats()
    bn.backward(np.ones_like(x))


def test_layer_flags_and_dtype_checked():
    with pytest.raises(TypeError, match="strict"):
        bnfast.BatchNorm(3).load_state_dict({}, strict="False")
    assert bnfast.BatchNorm(3, dtype=None).dtype == np.float32     # torch's None
    torch = pytest.importorskip("torch")
    assert bnfast.BatchNorm(3, dtype=torch.float64).dtype == np.float64


def test_frozen_batchnorm_signature():
    import inspect
    sig = inspect.signature(bnfast.FrozenBatchNorm)
    assert str(sig) == "(mean, var, weight=None, bias=None, eps=1e-05, *, axis=1)"

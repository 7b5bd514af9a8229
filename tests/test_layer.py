"""Layer semantics (no torch needed): bnfast.BatchNorm* against reference.BatchNormRef,
modes, attributes, freeze, pickle/copy, rank rules, backward, state_dict errors."""
import copy
import pickle

import numpy as np
import pytest

import bnfast
import reference as R
from _reliability_helpers import run_while_locked
from arrays import make_values, params, with_layout


def _ctor_kwargs(**kw):
    return kw


# ----------------------------------------------------------------------------------
# construction, attributes, modes

def test_defaults():
    bn = bnfast.BatchNorm(4)
    assert bn.training is True
    assert bn.num_batches_tracked == 0
    assert bn.grad_weight is None and bn.grad_bias is None
    for name, val in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                      ("running_var", 1.0)):
        a = getattr(bn, name)
        assert isinstance(a, np.ndarray) and a.shape == (4,) and a.dtype == np.float32, name
        np.testing.assert_array_equal(a, val)
    bn = bnfast.BatchNorm(3, affine=False, track_running_stats=False, dtype=np.float64)
    assert bn.weight is None and bn.bias is None
    assert bn.running_mean is None and bn.running_var is None
    assert bn.num_batches_tracked is None       # torch's, without running statistics


def test_train_eval_return_self():
    bn = bnfast.BatchNorm2d(3)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    assert bn.train(True) is bn and bn.training is True


@pytest.mark.parametrize("kwargs,exc", [
    (_ctor_kwargs(num_features=0), ValueError),
    (_ctor_kwargs(num_features=-2), ValueError),
    (_ctor_kwargs(num_features=2.5), TypeError),
    (_ctor_kwargs(num_features=2.0), TypeError),          # a float, as torch (was taken)
    (_ctor_kwargs(num_features="3"), TypeError),
    (_ctor_kwargs(num_features=3, affine="False"), TypeError),   # read as true before
    (_ctor_kwargs(num_features=3, track_running_stats="False"), TypeError),
    (_ctor_kwargs(num_features=3, unbiased_running_var="False"), TypeError),
    (_ctor_kwargs(num_features=3, dtype="no such dtype"), TypeError),
    (_ctor_kwargs(num_features=3, eps=0.0), ValueError),
    (_ctor_kwargs(num_features=3, eps=-1e-5), ValueError),
    (_ctor_kwargs(num_features=3, eps=float("nan")), ValueError),
    (_ctor_kwargs(num_features=3, eps=float("inf")), ValueError),
    (_ctor_kwargs(num_features=True), TypeError),
    (_ctor_kwargs(num_features=np.True_), TypeError),
    (_ctor_kwargs(num_features=3, momentum=1.5), ValueError),
    (_ctor_kwargs(num_features=3, momentum=-0.1), ValueError),
    (_ctor_kwargs(num_features=3, dtype=np.int32), TypeError),
])
def test_constructor_errors(kwargs, exc):
    with pytest.raises(exc):
        bnfast.BatchNorm(**kwargs)


@pytest.mark.parametrize("cls,good,bad", [
    (bnfast.BatchNorm1d, [(4, 3), (4, 3, 5)], [(4, 3, 2, 2), (4, 3, 2, 2, 2)]),
    (bnfast.BatchNorm2d, [(4, 3, 2, 2)], [(4, 3), (4, 3, 5), (4, 3, 2, 2, 2)]),
    (bnfast.BatchNorm3d, [(4, 3, 2, 2, 2)], [(4, 3), (4, 3, 5), (4, 3, 2, 2)]),
    (bnfast.BatchNorm, [(4, 3), (4, 3, 5), (4, 3, 2, 2), (4, 3, 2, 2, 2), (2, 3, 1, 1, 1, 2)],
     []),
])
def test_input_rank_rules(cls, good, bad):
    bn = cls(3, dtype=np.float64)
    for shape in good:
        x = make_values(shape, np.float64, 0)
        bn.train()(x)
        bn.eval()(x)
    for shape in bad:
        with pytest.raises(ValueError, match=f"{len(shape)}D"):
            bn.train()(make_values(shape, np.float64, 0))
    with pytest.raises(ValueError):
        bn(np.zeros(3))                       # 1-D: never
    with pytest.raises(ValueError):
        bn(np.float64(1.0))                   # 0-D


def test_channel_mismatch():
    bn = bnfast.BatchNorm(3, axis=-1)
    with pytest.raises(ValueError, match="3"):
        bn(np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError):
        bnfast.BatchNorm(3, axis=5)(np.zeros((5, 3), np.float32))


# ----------------------------------------------------------------------------------
# behaviour against the reference layer

LAYER_OPTIONS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.0),
    dict(momentum=1.0),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False, momentum=None),
    dict(unbiased_running_var=False, momentum=0.01),
    dict(eps=1e-3, axis=-1),
    dict(axis=2),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", LAYER_OPTIONS, ids=[str(o) for o in LAYER_OPTIONS])
def test_layer_against_reference(opts, dtype):
    shape = (6, 3, 4, 5) if opts.get("axis", 1) != -1 else (6, 4, 5, 3)
    axis = opts.get("axis", 1)
    C = shape[axis]
    bn = bnfast.BatchNorm(C, dtype=dtype, **opts)
    ref = R.BatchNormRef(C, dtype=dtype, **opts)
    if bn.weight is not None:
        w, b, _, _ = params(C, dtype, 1)
        bn.weight[...] = w
        bn.bias[...] = b
        ref.weight[...] = w
        ref.bias[...] = b
    rt = 1e-6 if dtype == np.float32 else 1e-12
    plan = ["train"] * 3 + ["eval"] * 2 + ["train", "eval"]
    for i, mode in enumerate(plan):
        bn.train(mode == "train")
        ref.train(mode == "train")
        x = make_values(shape, dtype, i, axis=axis, offset=(0.0, 1e4)[i % 2], spread=0.5 + i)
        y = bn(x)
        assert y.dtype == dtype and y.shape == x.shape
        R.assert_forward_close(y, ref(x), what=f"step {i} {mode}: y")
        dy = make_values(shape, dtype, 50 + i, axis=axis)
        dx = bn.backward(dy)
        dxr = ref.backward(dy)
        R.assert_grad_close(dx, dxr, what=f"step {i}: dx")
        if bn.affine:
            assert bn.grad_weight.dtype == dtype and bn.grad_bias.dtype == dtype
            R.assert_grad_close(bn.grad_weight, ref.grad_weight, what="grad_weight")
            R.assert_grad_close(bn.grad_bias, ref.grad_bias, what="grad_bias")
        else:
            assert bn.grad_weight is None and bn.grad_bias is None
        assert bn.num_batches_tracked == ref.num_batches_tracked
        if bn.track_running_stats:
            assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
            R.assert_vec_close(bn.running_mean, ref.running_mean, rt, "running_mean")
            R.assert_vec_close(bn.running_var, ref.running_var, rt, "running_var")


def test_num_batches_tracked_counts_training_calls_only():
    bn = bnfast.BatchNorm(2, dtype=np.float64)
    x = make_values((5, 2), np.float64, 0)
    for _ in range(3):
        bn(x)
    bn.eval()(x)
    assert bn.num_batches_tracked == 3
    bn2 = bnfast.BatchNorm(2, track_running_stats=False)
    bn2(x.astype(np.float32))
    assert bn2.num_batches_tracked is None


def test_num_batches_tracked_stays_an_int64():
    """The counter is torch's int64: at its largest it stops (torch's wraps negative), so
    state_dict() and save() keep working; a larger loaded count is refused."""
    bn = bnfast.BatchNorm(2, dtype=np.float64, momentum=None)
    x = make_values((5, 2), np.float64, 0)
    top = 2**63 - 1
    bn.load_state_dict({"num_batches_tracked": top}, strict=False)
    before = bn.running_mean.copy()
    bn(x)
    assert bn.num_batches_tracked == top
    assert int(bn.state_dict()["num_batches_tracked"]) == top
    # factor 1 / (2**63 - 1): the running mean moves by ~1e-19 of the batch mean
    np.testing.assert_allclose(bn.running_mean, before, atol=1e-15)
    for bad in (2**63, float(2**63), -1):
        with pytest.raises(ValueError, match="num_batches_tracked"):
            bn.load_state_dict({"num_batches_tracked": bad}, strict=False)
    assert bn.num_batches_tracked == top


@pytest.mark.parametrize("bad", [None, [("weight", np.ones(2))], "weight"])
def test_load_state_dict_needs_a_mapping(bad):
    bn = bnfast.BatchNorm(2)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        bn.load_state_dict(bad)


def test_momentum_none_is_cumulative_average():
    bn = bnfast.BatchNorm(3, momentum=None, dtype=np.float64, axis=-1)
    xs = [make_values((10, 3), np.float64, s, axis=-1, offset=0.0) for s in range(4)]
    for x in xs:
        bn(x)
    means = np.array([x.mean(axis=0) for x in xs])
    uvars = np.array([x.var(axis=0, ddof=1) for x in xs])
    np.testing.assert_allclose(bn.running_mean, means.mean(axis=0), rtol=1e-12, atol=1e-15)
    # the first update replaces the initial 1 entirely (factor 1/1)
    np.testing.assert_allclose(bn.running_var, uvars.mean(axis=0), rtol=1e-12)


def test_input_dtype_kept_with_other_layer_dtype():
    bn = bnfast.BatchNorm(3, dtype=np.float64)
    x = make_values((4, 3, 2), np.float32, 0)
    assert bn(x).dtype == np.float32
    assert bn.backward(x).dtype == np.float32
    assert bn.eval()(x).dtype == np.float32


@pytest.mark.parametrize("x_dtype, layer_dtype, training", [
    (np.float16, np.float32, True), (np.float16, np.float32, False),
    (np.float32, np.float64, True), (np.float16, np.float64, False)])
def test_parameter_gradients_rounded_once_to_the_layer_dtype(x_dtype, layer_dtype, training):
    # grad_weight and grad_bias come from the double sums rounded to the layer's dtype,
    # as torch's mixed-precision gradients: rounded to x's float16 first, a dbias past
    # 65504 was inf, and the others kept x's precision only
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16384, 3, 2, 2)) * 2 + 5).astype(x_dtype)
    dy = (rng.standard_normal(x.shape) + 1.5).astype(x_dtype)
    bn = bnfast.BatchNorm2d(3, dtype=layer_dtype)
    bn.train(training)
    bn(x)
    bn.backward(dy)
    assert bn.grad_bias.dtype == bn.grad_weight.dtype == layer_dtype
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    if training:
        mean, invstd = R.batch_stats(x64)[0], 1 / np.sqrt(R.batch_stats(x64)[1] + 1e-5)
    else:
        mean, invstd = np.zeros(3), np.full(3, 1 / np.sqrt(1 + 1e-5))
    _, dw, db = R.batch_norm_backward(dy64, x64, mean, invstd, training=training)
    assert np.all(np.abs(db) > 65504)                   # past float16's range
    tol = 4 * np.finfo(layer_dtype).eps
    np.testing.assert_allclose(bn.grad_bias, db, rtol=tol)
    np.testing.assert_allclose(bn.grad_weight, dw, rtol=tol, atol=tol * np.abs(dy64).sum(axis=(0, 2, 3)).max())


def test_awkward_input_layouts():
    bn = bnfast.BatchNorm(3, dtype=np.float64)
    ref = R.BatchNormRef(3, dtype=np.float64)
    x0 = make_values((4, 3, 5), np.float64, 1)
    for lay in ("f", "channels_last", "negative", "step", "swapped", "readonly",
                "unaligned", "broadcast"):
        x = with_layout(x0, lay, axis=1)
        R.assert_forward_close(bn(x), ref(x), what=lay)
        dy = with_layout(make_values(x.shape, np.float64, 3), lay, axis=1)
        R.assert_grad_close(bn.backward(dy), ref.backward(dy), what=lay)


# ----------------------------------------------------------------------------------
# backward

def test_backward_before_forward():
    bn = bnfast.BatchNorm(3)
    with pytest.raises(ValueError, match="before"):
        bn.backward(np.zeros((4, 3), np.float32))


def test_backward_wrong_dy_shape():
    bn = bnfast.BatchNorm(3)
    bn(make_values((4, 3), np.float32, 0))
    with pytest.raises(ValueError, match="shape"):
        bn.backward(np.zeros((4, 3, 1), np.float32))
    with pytest.raises(ValueError, match="shape"):
        bn.backward(np.zeros((5, 3), np.float32))


@pytest.mark.parametrize("training", [True, False])
def test_in_place_forward_then_backward(training):
    """y = bn(x, out=x) overwrites x; backward must still use the original input."""
    for lay in ("c", "f", "channels_last", "step"):
        bn = bnfast.BatchNorm(3, dtype=np.float64).train(training)
        ref = R.BatchNormRef(3, dtype=np.float64).train(training)
        x0 = make_values((6, 3, 4), np.float64, 2, offset=10.0)
        x = with_layout(x0, lay)
        y = bn(x, out=x)
        assert y is x
        R.assert_forward_close(x, ref(x0), what=f"in-place forward ({lay})")
        dy = make_values(x0.shape, np.float64, 3)
        dxr = ref.backward(dy)
        R.assert_grad_close(bn.backward(dy), dxr, what=f"dx after in-place forward ({lay})")
        R.assert_grad_close(bn.grad_weight, ref.grad_weight, what="grad_weight")
        # backward in place into dy
        dy2 = with_layout(dy, lay)
        assert bn.backward(dy2, out=dy2) is dy2
        R.assert_grad_close(dy2, dxr, what=f"dx out=dy ({lay})")


def test_backward_uses_last_forward():
    bn = bnfast.BatchNorm(2, dtype=np.float64, axis=-1)
    ref = R.BatchNormRef(2, dtype=np.float64, axis=-1)
    for s in range(2):
        x = make_values((7, 2), np.float64, s, axis=-1)
        bn(x)
        ref(x)
    dy = make_values((7, 2), np.float64, 9, axis=-1)
    R.assert_grad_close(bn.backward(dy), ref.backward(dy))
    # backward can be called again (with another dy) for the same forward
    R.assert_grad_close(bn.backward(dy * 2), ref.backward(dy * 2))


def _sync_layer(C, dtype):
    from bnfast.distributed import SingleProcessComm, SyncBatchNorm
    return SyncBatchNorm(C, dtype=dtype, comm=SingleProcessComm())


LAYER_KINDS = {"BatchNorm": lambda C, dtype: bnfast.BatchNorm(C, dtype=dtype),
               "SyncBatchNorm": _sync_layer}


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("shape,dtype,offset", [
    ((8, 3), np.float64, 0.0),                    # a small call
    ((16, 4, 30, 30), np.float32, 1e5),           # runs, prices (fused sums and dx)
    ((3000, 32), np.float32, 1e4),                # rows
    ((64, 8, 64, 64), np.float32, 50.0),          # 8 MB: channels over L2 (sums, then dx)
])
def test_input_changed_in_place_before_backward_is_refused(kind, shape, dtype, offset):
    """The layer keeps a reference to its input (no copy), and NumPy arrays have no
    version counter: a new batch written into the same array, or an in-place update of
    it, between forward and backward gave a gradient of no forward at all (dx off by
    79 in a reported case), where torch's autograd raises. The backward's sum(x - mean)
    is rounding alone for the forward's x: a moved channel mean is refused."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 0.01 + offset).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    bn = LAYER_KINDS[kind](shape[1], dtype)
    bn(x)
    dx = bn.backward(dy)                           # the forward's own x: accepted
    np.testing.assert_array_equal(bn.backward(dy), dx)
    edits = {"new batch": lambda a: np.copyto(a, (rng.standard_normal(shape) * 0.01
                                                  + offset).astype(dtype)),
             "scaled": lambda a: np.multiply(a, 2, out=a),
             "one element": lambda a: a.flat.__setitem__(a.size // 2, a.flat[a.size // 2]
                                                          + dtype(1.0))}
    for what, edit in edits.items():
        bn(x)
        edit(x)
        with pytest.raises(RuntimeError, match=r"x was changed in place after the forward"):
            bn.backward(dy)
        bn(x)                                      # a forward of the new x: fine again
        bn.backward(dy)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_backward_uses_the_forwards_weight_and_statistics(kind):
    """backward read the layer's weight (and in eval its running statistics' eps) as they
    were at backward: one reassigned between forward and backward gave the gradient of
    another forward. torch's autograd keeps the forward's."""
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
    w0 = np.array([1.0, 2.0, 3.0])
    bn = LAYER_KINDS[kind](3, np.float64)
    bn.weight[:] = w0
    y, m, s = bnfast.batch_norm_train(x, w0, axis=1)
    want = bnfast.batch_norm_backward(dy, x, m, s, w0, training=True, axis=1)
    for change in (lambda: setattr(bn, "weight", np.full(3, 5.0)),
                   lambda: setattr(bn, "weight", None), lambda: setattr(bn, "axis", -1)):
        bn.weight, bn.axis = w0.copy(), 1
        bn(x)
        change()
        dx = bn.backward(dy)
        np.testing.assert_array_equal(dx, want[0])
        np.testing.assert_array_equal(bn.grad_weight, want[1])
    if kind == "SyncBatchNorm":
        return                                     # (its eval forward is BatchNorm's)
    bn = bnfast.BatchNorm(3, dtype=np.float64).eval()
    bn.weight[:] = w0
    bn.running_var[:] = [2.0, 3.0, 0.5]
    rm, rv = bn.running_mean, bn.running_var
    want = bnfast.batch_norm_backward(dy, x, rm, 1.0 / np.sqrt(rv + 1e-5), w0,
                                      training=False, axis=1)
    for change in (lambda: setattr(bn, "eps", 0.5),
                   lambda: setattr(bn, "running_var", np.ones(3)),
                   lambda: setattr(bn, "running_mean", np.ones(3))):
        bn.eps, bn.running_mean, bn.running_var = 1e-5, rm, rv
        bn(x)
        change()
        np.testing.assert_array_equal(bn.backward(dy), want[0])
        np.testing.assert_array_equal(bn.grad_weight, want[1])


def test_load_state_dict_replaces_a_parameter_set_by_hand_as_a_list_or_tensor():
    """A weight assigned as a list (or a torch tensor), which forward and backward take,
    made load_state_dict fail with AttributeError ('list' has no 'shape')."""
    values = [[1.0, 2.0, 3.0]]
    torch = None
    try:
        import torch
        values.append(torch.ones(3, dtype=torch.float64))
    except ImportError:
        pass
    for v in values:
        bn = bnfast.BatchNorm(3, dtype=np.float64)
        bn.weight = v
        bn.load_state_dict({"weight": [2.0, 2.0, 2.0]}, strict=False)
        assert isinstance(bn.weight, np.ndarray) and bn.weight.dtype == np.float64
        np.testing.assert_array_equal(bn.weight, [2.0, 2.0, 2.0])


# ----------------------------------------------------------------------------------
# freeze, FrozenBatchNorm

def test_freeze():
    bn = bnfast.BatchNorm(3, axis=-1)
    w, b, _, _ = params(3, np.float32, 0)
    bn.weight[...] = w
    bn.bias[...] = b
    for s in range(3):
        bn(make_values((8, 3), np.float32, s, axis=-1, offset=100.0))
    f = bn.freeze()
    assert isinstance(f, bnfast.FrozenBatchNorm)
    assert f.num_features == 3 and f.axis == -1 and f.eps == bn.eps
    for name in ("mean", "var", "weight", "bias"):
        a = getattr(f, name)
        assert a.dtype == np.float64 and a.shape == (3,) and not a.flags.writeable, name
    np.testing.assert_array_equal(f.mean, bn.running_mean)
    np.testing.assert_array_equal(f.var, bn.running_var)
    x = make_values((5, 3), np.float32, 9, axis=-1, offset=100.0)
    y_layer = bn.eval()(x)
    R.assert_forward_close(f(x), R.frozen_batch_norm(x, bn.running_mean, bn.running_var,
                                                     bn.weight, bn.bias, bn.eps, axis=-1))
    np.testing.assert_array_equal(f(x), y_layer)
    # the frozen copy does not follow the layer afterwards
    bn.train()(make_values((8, 3), np.float32, 10, axis=-1))
    bn.weight[...] = 5.0
    np.testing.assert_array_equal(f(x), y_layer)
    # immutable
    for name in ("mean", "var", "weight", "bias", "eps", "axis", "num_features"):
        with pytest.raises(AttributeError):
            setattr(f, name, None)
    with pytest.raises(ValueError):
        f.mean[0] = 1.0
    with pytest.raises(ValueError):
        bnfast.BatchNorm(3, track_running_stats=False).freeze()


def test_frozen_without_affine():
    bn = bnfast.BatchNorm(2, affine=False, dtype=np.float64)
    bn(make_values((6, 2), np.float64, 0))
    f = bn.freeze()
    assert f.weight is None and f.bias is None
    x = make_values((3, 2), np.float64, 1)
    R.assert_forward_close(f(x), R.frozen_batch_norm(x, bn.running_mean, bn.running_var))


def test_frozen_construction_errors():
    with pytest.raises(ValueError):
        bnfast.FrozenBatchNorm(np.zeros(3), np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError):
        bnfast.FrozenBatchNorm(np.zeros(3), np.ones(2))
    with pytest.raises(ValueError):
        bnfast.FrozenBatchNorm(np.zeros(3), np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        bnfast.FrozenBatchNorm(np.zeros(3), np.ones(3), eps=0.0)
    with pytest.raises(ValueError, match="eps must be a finite"):
        bnfast.FrozenBatchNorm(np.zeros(3), np.ones(3), eps=np.inf)
    with pytest.raises(ValueError, match="var must be non-negative.*channel 1"):
        bnfast.FrozenBatchNorm(np.zeros(3), np.array([1.0, np.nan, 1.0]))
    with pytest.raises(ValueError):
        bnfast.FrozenBatchNorm(np.zeros((3, 1)), np.ones(3))
    with pytest.raises(TypeError):
        bnfast.FrozenBatchNorm(np.array(["a", "b"]), np.ones(2))
    f = bnfast.FrozenBatchNorm(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError):
        f(np.zeros((2, 4)))                  # wrong channel count


# ----------------------------------------------------------------------------------
# pickle, copy

def _trained(**kw):
    bn = bnfast.BatchNorm(3, dtype=np.float64, **kw)
    if bn.weight is not None:
        w, b, _, _ = params(3, np.float64, 4)
        bn.weight[...] = w
        bn.bias[...] = b
    for s in range(2):
        bn(make_values((5, 3, 2), np.float64, s))
    return bn


@pytest.mark.parametrize("kw", [dict(), dict(momentum=None, affine=False),
                                dict(track_running_stats=False)])
def test_pickle_and_copy(kw):
    bn = _trained(**kw)
    x = make_values((5, 3, 2), np.float64, 7)
    dy = make_values((5, 3, 2), np.float64, 8)
    for clone in (pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        assert type(clone) is type(bn)
        assert clone.num_batches_tracked == bn.num_batches_tracked
        assert clone.training == bn.training and clone.momentum == bn.momentum
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[k], v, err_msg=k)
        # the clone continues exactly like the original, and independently of it
        a, c = copy.deepcopy(bn), clone
        np.testing.assert_array_equal(c(x), a(x))
        np.testing.assert_array_equal(c.backward(dy), a.backward(dy))
        if bn.track_running_stats:
            np.testing.assert_array_equal(c.running_mean, a.running_mean)
            before = bn.running_mean.copy()
            c(x * 3)
            np.testing.assert_array_equal(bn.running_mean, before)
    # BatchNorm2d keeps its class and rank rule through pickle
    b2 = pickle.loads(pickle.dumps(bnfast.BatchNorm2d(3)))
    assert type(b2) is bnfast.BatchNorm2d
    with pytest.raises(ValueError):
        b2(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("training", [True, False])
def test_unpickles_a_layer_saved_mid_step_by_the_earlier_format(training):
    """Before the forward's weight and axis were kept, a layer between forward and
    backward pickled a 4-item _saved (eval: None for the statistics, read at backward);
    such a pickle loads and its backward gives the gradient it gave then."""
    x = make_values((5, 3, 2), np.float64, 7)
    dy = make_values((5, 3, 2), np.float64, 8)
    bn = _trained().train(training)
    bn(x)
    want = bn.backward(dy)
    state = bn.__getstate__()
    saved = state["_saved"]
    state["_saved"] = (saved[0], saved[1] if training else None,
                       saved[2] if training else None, saved[3])
    old = type(bn).__new__(type(bn))
    old.__setstate__(state)
    loaded = pickle.loads(pickle.dumps(old))
    np.testing.assert_array_equal(loaded.backward(dy), want)
    np.testing.assert_array_equal(loaded.grad_weight, bn.grad_weight)


def test_pickle_frozen():
    f = bnfast.FrozenBatchNorm([1.0, 2.0], [0.5, 2.0], [1.0, -1.0], [0.0, 3.0], eps=1e-3,
                               axis=-1)
    for g in (pickle.loads(pickle.dumps(f)), copy.deepcopy(f), copy.copy(f)):
        assert g.eps == f.eps and g.axis == f.axis and g.num_features == 2
        x = make_values((4, 2), np.float64, 0, axis=-1)
        np.testing.assert_array_equal(g(x), f(x))


# ----------------------------------------------------------------------------------
# state_dict

def test_state_dict_keys_and_values():
    bn = _trained()
    sd = bn.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var",
                        "num_batches_tracked"]
    assert np.asarray(sd["num_batches_tracked"]).dtype == np.int64
    assert int(sd["num_batches_tracked"]) == 2
    assert set(_trained(affine=False).state_dict()) == {"running_mean", "running_var",
                                                        "num_batches_tracked"}
    assert set(_trained(track_running_stats=False).state_dict()) == {"weight", "bias"}
    # load into a fresh layer: equal state, lists accepted
    bn2 = bnfast.BatchNorm(3, dtype=np.float64)
    bn2.load_state_dict({k: np.asarray(v).tolist() for k, v in sd.items()})
    for k, v in sd.items():
        np.testing.assert_array_equal(bn2.state_dict()[k], v, err_msg=k)
    assert bn2.num_batches_tracked == 2
    # loaded arrays are copies, in the layer's dtype
    src = {k: np.array(v, dtype=np.float32) for k, v in sd.items()}
    bn2.load_state_dict(src)
    assert bn2.running_mean.dtype == np.float64
    src["running_mean"][0] = 123.0
    assert bn2.running_mean[0] != 123.0


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
def test_load_state_dict_errors_name_the_key(key):
    bn = _trained()
    before = {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}
    good = {k: np.array(v, copy=True) for k, v in before.items()}

    bad = dict(good)
    bad[key] = np.ones(4)                         # wrong shape
    with pytest.raises(ValueError, match=key):
        bn.load_state_dict(bad)
    bad = dict(good)
    del bad[key]                                  # missing
    with pytest.raises((KeyError, ValueError), match=key):
        bn.load_state_dict(bad)
    bad = dict(good)
    bad[key] = np.ones((3, 1))                    # not 1-D
    with pytest.raises(ValueError, match=key):
        bn.load_state_dict(bad)
    bad = dict(good)
    bad["extra_key"] = np.ones(3)                 # unexpected (strict)
    with pytest.raises((KeyError, ValueError), match="extra_key"):
        bn.load_state_dict(bad)
    # nothing changed by the failed loads
    for k, v in before.items():
        np.testing.assert_array_equal(bn.state_dict()[k], v, err_msg=k)
    assert bn.num_batches_tracked == 2


def test_load_state_dict_negative_var_and_non_strict():
    bn = _trained()
    sd = {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}
    sd["running_var"][1] = -1.0
    with pytest.raises(ValueError, match="running_var"):
        bn.load_state_dict(sd)
    # strict=False: missing keys keep their values, extra keys ignored
    bn2 = bnfast.BatchNorm(3, dtype=np.float64)
    bn2.load_state_dict({"weight": np.full(3, 2.0), "whatever": 1}, strict=False)
    np.testing.assert_array_equal(bn2.weight, 2.0)
    np.testing.assert_array_equal(bn2.running_var, 1.0)
    assert bn2.num_batches_tracked == 0


def test_load_state_dict_writes_into_the_layers_arrays():
    """Like torch's copy_: references to the arrays (an optimizer's parameter list, an
    earlier state_dict()) see the loaded values, cast to the arrays' dtype."""
    bn = bnfast.BatchNorm(3)                                 # float32
    earlier = bn.state_dict()
    arrays = {k: v for k, v in earlier.items() if k != "num_batches_tracked"}
    src = {k: np.array(v, copy=True) for k, v in _trained().state_dict().items()}  # float64
    bn.load_state_dict(src)
    for k, a in arrays.items():
        assert getattr(bn, k) is a and bn.state_dict()[k] is a, k
        assert a.dtype == np.float32, k
        np.testing.assert_array_equal(earlier[k], src[k].astype(np.float32), err_msg=k)
    assert bn.num_batches_tracked == 2
    src["weight"][0] = 123.0                                  # the source stays apart
    assert bn.weight[0] != 123.0
    # values that are the layer's own arrays (a swap) are all read before any is written
    w, b = bn.weight.copy(), bn.bias.copy()
    bn.load_state_dict({**bn.state_dict(), "weight": bn.bias, "bias": bn.weight})
    np.testing.assert_array_equal(bn.weight, b)
    np.testing.assert_array_equal(bn.bias, w)


def test_load_state_dict_refused_writes_nothing():
    """Every entry, and the array it goes into, is checked before any is written."""
    bn = _trained()
    before = {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}
    good = {k: v + 1.0 for k, v in before.items()}
    with pytest.raises(ValueError, match="num_batches_tracked"):   # the last key
        bn.load_state_dict({**good, "num_batches_tracked": np.ones(2)})
    bn.running_var = bn.running_var.copy()
    bn.running_var.flags.writeable = False                   # set by hand, read-only
    with pytest.raises(ValueError, match="running_var.*read-only"):
        bn.load_state_dict(good)
    for k, v in before.items():
        np.testing.assert_array_equal(bn.state_dict()[k], v, err_msg=k)
    assert bn.num_batches_tracked == 2


def test_load_state_dict_holds_the_layer_lock():
    """A load waits for a call in progress (which holds the layer's lock), so that call
    never sees half-loaded statistics."""
    bn = bnfast.BatchNorm(3)
    sd = _trained().state_dict()
    run_while_locked(bn._lock, lambda: bn.load_state_dict(sd),
                     lambda: np.testing.assert_array_equal(bn.running_var, 1.0),
                     "load_state_dict")
    np.testing.assert_array_equal(bn.running_var, sd["running_var"].astype(np.float32))


def test_load_state_dict_conversion_failure_names_the_key():
    bn = bnfast.BatchNorm(2)
    with pytest.raises(TypeError, match=r"state_dict\['bias'\]"):
        bn.load_state_dict({**bn.state_dict(), "bias": [[1.0, 2.0], [3.0]]})   # ragged
    np.testing.assert_array_equal(bn.bias, 0.0)


def test_track_running_stats_turned_off_after_construction():
    """As in torch: the running statistics stay; training uses batch statistics and
    leaves them and num_batches_tracked unchanged, eval uses them; freeze works."""
    bn = _trained()
    bn.track_running_stats = False
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    w, b = bn.weight.copy(), bn.bias.copy()
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                    "num_batches_tracked"}
    x = make_values((5, 3, 2), np.float64, 9)
    R.assert_forward_close(bn(x), R.batch_norm_train(x, w, b)[0], what="training")
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == 2
    ref = R.frozen_batch_norm(x, rm, rv, w, b)
    R.assert_forward_close(bn.eval()(x), ref, what="eval")
    R.assert_forward_close(bn.freeze()(x), ref, what="frozen")
    dy = make_values((5, 3, 2), np.float64, 10)               # eval backward: fixed stats
    np.testing.assert_allclose(bn.backward(dy), dy * (w / np.sqrt(rv + bn.eps))[:, None],
                               rtol=1e-12)


def test_repr():
    r = repr(bnfast.BatchNorm2d(7, momentum=None))
    assert "BatchNorm2d" in r and "7" in r
    assert "FrozenBatchNorm" in repr(bnfast.FrozenBatchNorm(np.zeros(2), np.ones(2)))


@pytest.mark.parametrize("op", ["freeze", "deepcopy", "pickle", "save", "fold"])
def test_copies_of_the_state_wait_for_the_layer_lock(op, tmp_path):
    """freeze, deepcopy, save and folding read the state under the layer's lock, so a
    concurrent load_state_dict or training step (which hold it) is never caught
    half-way; pickling collects it under the lock too."""
    bn = bnfast.BatchNorm(3, dtype=np.float64).eval()

    def folded():           # the folded bias of a zero Linear layer: -mean * scale
        _, b = bnfast.fold_linear(np.zeros((3, 2)), np.zeros(3), bn)
        return bnfast.FrozenBatchNorm(-b * np.sqrt(7.0 + bn.eps), np.full(3, 7.0),
                                      eps=bn.eps)

    copy_of = {"freeze": bn.freeze, "deepcopy": lambda: copy.deepcopy(bn),
               "pickle": lambda: pickle.loads(pickle.dumps(bn)),
               "save": lambda: bnfast.load(bn.save(str(tmp_path / "bn"))),
               "fold": folded}[op]

    def update():                                            # what it must see whole
        bn.running_mean[:] = 5.0
        bn.running_var[:] = 7.0

    got = run_while_locked(bn._lock, copy_of, update, op)
    frozen = op in ("freeze", "fold")
    np.testing.assert_allclose(got.mean if frozen else got.running_mean, 5.0, rtol=1e-12)
    np.testing.assert_array_equal(got.var if frozen else got.running_var, 7.0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_arrays_shared_with_what_else_is_copied(how):
    """An optimizer's list of the layer's arrays, copied or pickled with the layer, still
    holds the copy's arrays (the copies are not taken apart)."""
    bn = bnfast.BatchNorm(3)
    model = {"bn": bn, "params": [bn.weight, bn.bias]}
    new = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert new["params"][0] is new["bn"].weight and new["params"][1] is new["bn"].bias
    assert new["bn"].weight is not bn.weight
    new["params"][0] -= 0.5
    np.testing.assert_array_equal(new["bn"].weight, 0.5)
    np.testing.assert_array_equal(bn.weight, 1.0)


# ----------------------------------------------------------------------------------
# hypothesis: FrozenBatchNorm on random shapes, axes, layouts, dtypes, offsets, seeds,
# against the float64 twin, allocating and into out= of any layout

try:
    from hypothesis import given, strategies as st
except ImportError:           # hypothesis is a test extra: the tests above still run
    given = None


if given is not None:
    from arrays import OUT_LAYOUTS, cases, out_like

    @given(cases(training=True), st.sampled_from(LAYER_OPTIONS),
           st.lists(st.booleans(), min_size=1, max_size=4))
    def test_hyp_layer(c, opts, modes):
        """The layer over a few steps (training or not) against BatchNormRef: outputs,
        dx, the parameter gradients (relative to their sums' condition) and the running
        statistics, on random shapes, axes, layouts, dtypes and offsets."""
        opts = dict(opts, axis=c.axis)
        x = c.array()
        dtype = x.dtype.newbyteorder("=")
        bn = bnfast.BatchNorm(c.C, dtype=dtype, **opts)
        ref = R.BatchNormRef(c.C, dtype=dtype, **opts)
        if bn.weight is not None:
            w, b, _, _ = c.params(dtype)
            bn.weight[...] = w
            bn.bias[...] = b
            ref.weight[...] = w
            ref.bias[...] = b
        rt = 1e-6 if dtype == np.float32 else 1e-12
        ax = c.axis % x.ndim
        red = tuple(i for i in range(x.ndim) if i != ax)
        bs = [1] * x.ndim
        bs[ax] = -1
        for i, training in enumerate(modes):
            bn.train(training)
            ref.train(training)
            y = bn(x)
            assert y.dtype == dtype and y.shape == x.shape
            R.assert_forward_close(y, ref(x), what=f"step {i} training={training}: y")
            dy = make_values(x.shape, dtype, c.seed % 1000 + i, axis=c.axis)
            dx, dxr = bn.backward(dy), ref.backward(dy)
            _, mean, invstd = ref._saved[:3]
            wv = np.ones(c.C) if bn.weight is None else np.asarray(bn.weight, np.float64)
            absdy = np.abs(dy.astype(np.float64))
            R.assert_grad_close(dx, dxr, scale=np.max(
                absdy * np.reshape(np.abs(wv * invstd), bs), initial=0.0), what="dx")
            if bn.affine:
                xhat = np.abs((x.astype(np.float64) - np.reshape(mean, bs)) *
                              np.reshape(invstd, bs))
                R.assert_grad_close(bn.grad_weight, ref.grad_weight, what="grad_weight",
                                    scale=max(np.max(np.abs(ref.grad_weight)),
                                              np.max((absdy * xhat).sum(axis=red))))
                R.assert_grad_close(bn.grad_bias, ref.grad_bias, what="grad_bias",
                                    scale=max(np.max(np.abs(ref.grad_bias)),
                                              np.max(absdy.sum(axis=red))))
            assert bn.num_batches_tracked == ref.num_batches_tracked
            if bn.track_running_stats:
                R.assert_vec_close(bn.running_mean, ref.running_mean, rt, "running_mean")
                R.assert_vec_close(bn.running_var, ref.running_var, rt, "running_var")

    @given(cases(), st.sampled_from(OUT_LAYOUTS), st.booleans(),
           st.sampled_from([1e-5, 1e-3, 0.5]))
    def test_hyp_frozen(c, out_layout, affine, eps):
        x = c.array()
        dtype = x.dtype.newbyteorder("=")
        w, b, _, _ = c.params(dtype)
        if not affine:
            w = b = None
        rng = np.random.default_rng(c.seed % 1000)
        m, v, _ = R.batch_stats(x, c.axis)
        C = m.shape[0]
        rm = (m + rng.uniform(-0.5, 0.5, C)).astype(dtype)
        rv = (np.where(v > 0, v, 1.0) * rng.uniform(0.5, 2.0, C)).astype(dtype)
        before = x.copy()
        f = bnfast.FrozenBatchNorm(rm, rv, w, b, eps=eps, axis=c.axis)
        ref = R.frozen_batch_norm(x, rm, rv, w, b, eps, axis=c.axis)
        y = f(x)
        assert y.dtype == dtype and y.shape == x.shape
        R.assert_forward_close(y, ref, dtype, what="frozen")
        out = out_like(x, out_layout, seed=c.seed % 1000)
        assert f(x, out=out) is out
        R.assert_forward_close(out, ref, dtype, what=f"frozen out={out_layout}")
        np.testing.assert_array_equal(x, before)      # x untouched


def test_reset_running_stats_and_parameters_in_place():
    """torch's reset_running_stats and reset_parameters: the arrays written in place
    (references such as an optimizer's see them), nothing without the statistics."""
    bn = bnfast.BatchNorm(3, axis=-1, dtype=np.float64)
    x = make_values((6, 3), np.float64, 0)
    bn(x)
    bn.weight[:] = 2.0
    bn.bias[:] = 3.0
    arrays = [bn.running_mean, bn.running_var, bn.weight, bn.bias]
    bn.reset_running_stats()
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)
    np.testing.assert_array_equal(bn.weight, 2.0)          # parameters kept
    bn(x)
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, 1.0)
    np.testing.assert_array_equal(bn.bias, 0.0)
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    assert bn.num_batches_tracked == 0
    assert all(a is b for a, b in zip(arrays, [bn.running_mean, bn.running_var, bn.weight,
                                               bn.bias]))
    plain = bnfast.BatchNorm(3, affine=False, track_running_stats=False)
    plain.reset_parameters()
    assert plain.running_mean is None and plain.num_batches_tracked is None

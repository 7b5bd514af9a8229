"""Parity with PyTorch (skipped when torch is not installed).

torch.nn.functional.batch_norm (train / eval, running updates), autograd gradients, and
torch.nn.BatchNorm1d/2d/3d against bnfast.BatchNorm1d/2d/3d over several steps with every
option; state_dict round trips; the error for one value per channel. Comparisons are in
float64 on data without large offsets (PyTorch is inexact at offsets: see
test_exactness.py for that).
"""
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import bnfast  # noqa: E402
from arrays import make_values, params, with_layout  # noqa: E402

RTOL = 1e-12      # float64 outputs and statistics
GTOL = 1e-10      # float64 gradients (torch's reduction order differs)


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def T(a, grad=False):
    a = np.asarray(a)
    return torch.tensor(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")),
                        requires_grad=grad)


def N(t):
    return None if t is None else t.detach().numpy()


def close(a, b, rtol=RTOL, what=""):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=what)


SHAPES = [(8, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2)]


# ----------------------------------------------------------------------------------
# functional

@pytest.mark.parametrize("channels_last", [False, True], ids=["axis1", "axis-1"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_functional_and_autograd(shape, training, channels_last):
    C = shape[1]
    x = make_values(shape, np.float64, 1, axis=1, offset=0.0, spread=2.0)
    w, b, rm, rv = params(C, np.float64, 2)
    dy = make_values(shape, np.float64, 3, axis=1)
    # torch, NC... layout
    xt, wt, bt = T(x, True), T(w, True), T(b, True)
    rmt, rvt = T(rm), T(rv)
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, training, 0.2, 1e-4)
    yt.backward(T(dy))
    # bnfast, same values, possibly channels-last
    if channels_last:
        mv = lambda a: np.moveaxis(a, 1, -1)  # noqa: E731
        axis = -1
    else:
        mv = lambda a: a  # noqa: E731
        axis = 1
    xb, dyb = mv(x), mv(dy)
    rmb, rvb = rm.copy(), rv.copy()
    y = bnfast.batch_norm(xb, rmb, rvb, w, b, training, 0.2, 1e-4, axis=axis)
    close(y, mv(N(yt)), what="y")
    close(rmb, N(rmt), what="running_mean")
    close(rvb, N(rvt), what="running_var")
    if training:
        _, mean, invstd = bnfast.batch_norm_train(xb, w, b, eps=1e-4, axis=axis)
    else:
        mean, invstd = rm, 1 / np.sqrt(rv + 1e-4)
    dx, dw, db = bnfast.batch_norm_backward(dyb, xb, mean, invstd, w, training=training,
                                            axis=axis)
    close(dx, mv(N(xt.grad)), GTOL, "dx")
    close(dw, N(wt.grad), GTOL, "dweight")
    close(db, N(bt.grad), GTOL, "dbias")


def test_functional_without_affine_and_float32():
    x = make_values((16, 4, 6), np.float32, 4, axis=1)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    rmt, rvt = T(rm), T(rv)
    yt = F.batch_norm(T(x), rmt, rvt, None, None, True, 0.1, 1e-5)
    y = bnfast.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    assert y.dtype == np.float32
    close(y, N(yt), 1e-5, "float32 train y")
    close(rm, N(rmt), 1e-6, "float32 running_mean")
    close(rv, N(rvt), 1e-6, "float32 running_var")
    ye = bnfast.batch_norm(x, rm, rv)
    close(ye, N(F.batch_norm(T(x), rmt, rvt)), 1e-5, "float32 eval y")


@pytest.mark.parametrize("shape", [(16, 3, 5, 5), (32, 3, 64, 64)])
def test_running_stats_of_channels_holding_infinities(shape):
    """A channel holding +inf, -inf, or both: PyTorch's running mean is that infinity
    (NaN for both) and its running variance NaN; bnfast's the same (its mean once came
    out NaN for any of them but in the smallest arrays)."""
    x = make_values(shape, np.float32, 5, axis=1, offset=1e4)
    x[3, 0, 2, 2] = np.inf
    x[0, 1, 0, 0] = -np.inf
    x[5, 2, 1, 1], x[6, 2, 4, 4] = np.inf, -np.inf
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rmt, rvt = T(rm), T(rv)
    F.batch_norm(T(x), rmt, rvt, None, None, True, 0.1, 1e-5)
    bnfast.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    assert np.array_equal(N(rmt), [np.inf, -np.inf, np.nan], equal_nan=True)
    assert np.array_equal(rm, N(rmt), equal_nan=True), (rm, N(rmt))
    assert np.isnan(N(rvt)).all() and np.isnan(rv).all(), (rv, N(rvt))


# ----------------------------------------------------------------------------------
# modules over several steps

KINDS = {
    "1d-NC": (torch.nn.BatchNorm1d, bnfast.BatchNorm1d, (12, 4)),
    "1d-NCL": (torch.nn.BatchNorm1d, bnfast.BatchNorm1d, (5, 4, 7)),
    "2d": (torch.nn.BatchNorm2d, bnfast.BatchNorm2d, (3, 4, 5, 6)),
    "3d": (torch.nn.BatchNorm3d, bnfast.BatchNorm3d, (2, 4, 3, 4, 3)),
}
OPTIONS = list(itertools.product([0.1, None, 0.75], [True, False], [True, False]))


def _pair(kind, momentum, affine, track, eps=1e-5):
    tcls, bcls, shape = KINDS[kind]
    C = shape[1]
    tm = tcls(C, eps=eps, momentum=momentum, affine=affine,
              track_running_stats=track).double()
    bm = bcls(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track,
              dtype=np.float64)
    if affine:
        w, b, _, _ = params(C, np.float64, 11)
        with torch.no_grad():
            tm.weight.copy_(T(w))
            tm.bias.copy_(T(b))
        bm.weight[...] = w
        bm.bias[...] = b
    return tm, bm, shape


def _compare_state(tm, bm, what):
    if tm.affine:
        close(bm.weight, N(tm.weight), what=f"{what}: weight")
        close(bm.bias, N(tm.bias), what=f"{what}: bias")
    else:
        assert bm.weight is None and bm.bias is None
    if tm.track_running_stats:
        close(bm.running_mean, N(tm.running_mean), what=f"{what}: running_mean")
        close(bm.running_var, N(tm.running_var), what=f"{what}: running_var")
        assert bm.num_batches_tracked == int(tm.num_batches_tracked), what
    else:
        assert bm.running_mean is None and bm.running_var is None
        assert bm.num_batches_tracked is None and tm.num_batches_tracked is None
        assert tm.running_mean is None
    assert bm.training == tm.training


def _step(tm, bm, x, dy, what):
    xt = T(x, True)
    tm.zero_grad(set_to_none=True)
    yt = tm(xt)
    yt.backward(T(dy))
    y = bm(x)
    close(y, N(yt), what=f"{what}: y")
    dx = bm.backward(dy)
    close(dx, N(xt.grad), GTOL, f"{what}: dx")
    if tm.affine:
        close(bm.grad_weight, N(tm.weight.grad), GTOL, f"{what}: grad_weight")
        close(bm.grad_bias, N(tm.bias.grad), GTOL, f"{what}: grad_bias")
    else:
        assert bm.grad_weight is None and bm.grad_bias is None
    _compare_state(tm, bm, what)


@pytest.mark.parametrize("momentum,affine,track", OPTIONS,
                         ids=[f"m{m}-aff{int(a)}-track{int(t)}" for m, a, t in OPTIONS])
@pytest.mark.parametrize("kind", list(KINDS))
def test_module_steps(kind, momentum, affine, track):
    tm, bm, shape = _pair(kind, momentum, affine, track)
    _compare_state(tm, bm, "init")
    plan = ["train"] * 3 + ["eval"] * 2 + ["train", "eval"]
    for i, mode in enumerate(plan):
        assert (tm.train() if mode == "train" else tm.eval()) is tm
        assert (bm.train() if mode == "train" else bm.eval()) is bm
        x = make_values(shape, np.float64, 100 + i, axis=1, offset=0.0, spread=1.0 + i)
        dy = make_values(shape, np.float64, 200 + i, axis=1)
        _step(tm, bm, x, dy, f"step {i} ({mode})")


def test_module_awkward_layout_input():
    """A BatchNorm2d fed transposed / strided inputs matches torch fed the same values."""
    tm, bm, shape = _pair("2d", 0.1, True, True)
    for i, lay in enumerate(["channels_last", "f", "negative", "step", "swapped"]):
        x0 = make_values(shape, np.float64, 300 + i, axis=1)
        x = with_layout(x0, lay, axis=1)
        dy = with_layout(make_values(shape, np.float64, 400 + i, axis=1), lay, axis=1)
        _step(tm, bm, x, dy, lay)


def test_freeze_matches_torch_eval():
    tm, bm, shape = _pair("2d", 0.3, True, True)
    for i in range(3):
        _step(tm, bm, make_values(shape, np.float64, i, axis=1),
              make_values(shape, np.float64, 50 + i, axis=1), f"step {i}")
    tm.eval()
    x = make_values(shape, np.float64, 9, axis=1)
    close(bm.freeze()(x), N(tm(T(x))), what="frozen vs torch eval")


# ----------------------------------------------------------------------------------
# state_dict

@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_state_dict_round_trip(affine, track):
    tm, _, shape = _pair("2d", 0.1, affine, track)
    for i in range(2):                      # non-trivial running stats and counter
        tm(T(make_values(shape, np.float64, i, axis=1, spread=3.0)))
    tsd = tm.state_dict()
    # torch -> bnfast (tensors accepted as they are)
    bm = bnfast.BatchNorm2d(4, affine=affine, track_running_stats=track, dtype=np.float64)
    bm.load_state_dict(tsd)
    assert set(bm.state_dict()) == set(tsd)
    for k, v in tsd.items():
        np.testing.assert_array_equal(np.asarray(bm.state_dict()[k]), v.numpy(), err_msg=k)
    if track:
        assert bm.num_batches_tracked == 2
    bm.eval()
    tm.eval()
    x = make_values(shape, np.float64, 7, axis=1)
    close(bm(x), N(tm(T(x))), what="after loading torch's state_dict")
    # bnfast -> torch
    bm2 = bnfast.BatchNorm2d(4, affine=affine, track_running_stats=track, dtype=np.float64)
    for i in range(3):
        bm2(make_values(shape, np.float64, 20 + i, axis=1, spread=0.5))
    tm2 = torch.nn.BatchNorm2d(4, affine=affine, track_running_stats=track).double()
    tm2.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in bm2.state_dict().items()})
    for k, v in tm2.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), np.asarray(bm2.state_dict()[k]), err_msg=k)
    if track:
        assert int(tm2.num_batches_tracked) == 3
    tm2.eval()
    bm2.eval()
    close(bm2(x), N(tm2(T(x))), what="torch after loading bnfast's state_dict")


def test_state_dict_float32_torch_to_bnfast_float32():
    tm = torch.nn.BatchNorm1d(3)
    tm(torch.tensor(make_values((10, 3), np.float32, 1, axis=1)))
    bm = bnfast.BatchNorm1d(3)
    bm.load_state_dict(tm.state_dict())
    assert bm.running_mean.dtype == np.float32
    np.testing.assert_array_equal(bm.running_mean, tm.running_mean.numpy())
    np.testing.assert_array_equal(bm.running_var, tm.running_var.numpy())


# ----------------------------------------------------------------------------------
# errors

def test_one_value_per_channel_error_text():
    x = make_values((1, 3), np.float64, 0)
    with pytest.raises(ValueError) as te:
        F.batch_norm(T(x), None, None, training=True)
    with pytest.raises(ValueError) as be:
        bnfast.batch_norm(x, None, None, training=True)
    prefix = "Expected more than 1 value per channel when training"
    assert str(te.value).startswith(prefix)
    assert str(be.value).startswith(prefix), str(be.value)
    for tcls, bcls, shape in [(torch.nn.BatchNorm1d, bnfast.BatchNorm1d, (1, 3)),
                              (torch.nn.BatchNorm2d, bnfast.BatchNorm2d, (1, 3, 1, 1))]:
        x = make_values(shape, np.float64, 0)
        with pytest.raises(ValueError, match=prefix):
            tcls(3).double()(T(x))
        bm = bcls(3, dtype=np.float64)
        with pytest.raises(ValueError, match=prefix):
            bm(x)
        assert bm.num_batches_tracked == 0      # a refused call does not count
        # eval mode accepts a single sample, as torch does
        close(bm.eval()(x), N(tcls(3).double().eval()(T(x))), what="eval one sample")

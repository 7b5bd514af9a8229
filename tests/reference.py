"""Float64 NumPy twins of bnfast's public functions (bottleneck's ``slow/`` style).

Every function here takes the same arguments, in the same order and with the same axis
convention, as its bnfast counterpart, and computes the textbook formula in float64 from
the *values* of its inputs (whatever their dtype, layout or byte order). The results are
float64 arrays; they are the yardstick the tests hold bnfast to, so they favour clarity
over speed. The one refinement is the batch mean, carried as two doubles (hi + lo, lo from
a second pass over x - hi) so that the centred data, and so the reference, stay accurate
to float64 rounding of the data's *spread* on price-like data (offsets of 1e3 .. 3e6).

The bottom of the module holds the comparison helpers shared by the tests.
"""
import numpy as np

__all__ = [
    "batch_norm", "batch_norm_train", "batch_norm_backward", "frozen_batch_norm",
    "BatchNormRef", "batch_stats", "merge_moment_arrays", "merge_packed_rows",
    "assert_forward_close", "assert_grad_close", "assert_vec_close",
]

EPS64 = np.finfo(np.float64).eps


# ----------------------------------------------------------------------------------
# Helpers

def _axis(x, axis):
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions, got shape {x.shape}")
    ax = int(axis)
    if ax < 0:
        ax += x.ndim
    if not 0 <= ax < x.ndim:
        raise ValueError(f"axis {axis} is out of range for {x.ndim} dimensions")
    return ax


def _channel_sum(v, ax):
    """Per-channel sums of v over every axis but ax, shape (C,).  Each channel's values
    are copied contiguous and summed along that last axis, where NumPy adds pairwise;
    reduced along a strided axis (rows of an (N, C) array) it adds in one running loop,
    whose error grows with the count (1e4 ulps on channels of 1e5+ large integers)."""
    C = v.shape[ax]
    if v.size == 0:
        return np.zeros(C)
    return np.ascontiguousarray(np.moveaxis(v, ax, 0)).reshape(C, -1).sum(axis=1)


def _channel_mean(v, ax, n):
    """_channel_sum / n shaped to broadcast against v (n == 0: NaN, as np.mean)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (_channel_sum(v, ax) / n).reshape(_bshape(v, ax))


def _bshape(x, ax):
    s = [1] * x.ndim
    s[ax] = x.shape[ax]
    return tuple(s)


def _vec(p, C, default):
    """A per-channel parameter as a float64 (C,) vector (default when None)."""
    if p is None:
        return np.full(C, float(default))
    if hasattr(p, "detach"):                  # a torch tensor
        p = p.detach().cpu().numpy()
    v = np.asarray(p, dtype=np.float64)
    if v.shape != (C,):
        raise ValueError(f"parameter must have shape ({C},), got {v.shape}")
    return v


def _f64(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _deliver(y, out):
    if out is None:
        return y
    np.copyto(out, y, casting="unsafe")
    return out


def _center(x, ax):
    """(x - mean, mean, biased var, n) per channel, float64.

    The mean is carried as two doubles, hi + lo (lo = mean(x - hi), a second pass), and
    the data are centred as (x - hi) - lo, so the centred values stay accurate to the
    data's spread, not its offset, on price-like data.  A channel holding an infinity
    has np.mean's mean (the infinity, or NaN where +inf and -inf meet) and a NaN
    variance, as np.var gives."""
    n = x.size // x.shape[ax] if x.shape[ax] else 0
    with np.errstate(invalid="ignore"):
        hi = _channel_mean(x, ax, n)
        d = x - hi
        lo = _channel_mean(d, ax, n)
        xc = d - lo
        var = _channel_mean(xc ** 2, ax, n).reshape(-1)
    mean = np.where(np.isfinite(hi), hi + lo, hi)
    return xc, mean.reshape(-1), var, n


def batch_stats(x, axis=1):
    """(mean, biased var, n) per channel in float64."""
    x = _f64(x)
    _, mean, var, n = _center(x, _axis(x, axis))
    return mean, var, n


def _update(running, batch, momentum):
    """running <- (1 - momentum) * running + momentum * batch, in place, float64 math."""
    new = (1.0 - momentum) * np.asarray(running, np.float64) + momentum * batch
    np.copyto(running, new, casting="unsafe")


def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e == a + b exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def merge_moment_arrays(na, am, alo, am2, am2lo, nb, bm, blo, bm2, bm2lo):
    """Twin of bnfast._core._merge_moment_arrays (merge_moments' arithmetic, NumPy over
    the channels, operation for operation): (count, mean, m2, mean_lo, m2_lo)."""
    n = na + nb
    # base on the larger part (ties: the smaller mean), so the result is symmetric
    swap = (nb > na) | ((nb == na) & ((bm < am) | ((bm == am) & (blo < alo))))
    h1, l1 = np.where(swap, bm, am), np.where(swap, blo, alo)
    h0, l0 = np.where(swap, am, bm), np.where(swap, alo, blo)
    n0 = np.where(swap, na, nb)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        delta = (h0 - h1) + (l0 - l1)
        mean, lo = _two_sum(h1, l1 + delta * (n0 / n))
        # m2a + m2b + delta^2 na nb / n, compensated (plainly where that overflows)
        shift_m2 = delta * delta * ((na * nb) / n)
        m2, e1 = _two_sum(am2, bm2)
        m2, e2 = _two_sum(m2, shift_m2)
        m2, m2lo = _two_sum(m2, ((am2lo + bm2lo) + e1) + e2)
        overflow = ~np.isfinite(m2lo)
        m2 = np.where(overflow, (am2 + bm2) + shift_m2, m2)
        m2lo = np.where(overflow, 0.0, m2lo)
        # a part's mean not finite: the parts' means summed (np.mean's infinity, or
        # NaN), m2 NaN (np.var's)
        mean_a, mean_b = am + alo, bm + blo
        plain = ~(np.isfinite(mean_a) & np.isfinite(mean_b))
        mean = np.where(plain, mean_a + mean_b, mean)
        lo = np.where(plain, 0.0, lo)
        m2 = np.where(plain, np.nan, m2)
        m2lo = np.where(plain, 0.0, m2lo)
    a_empty, b_empty = na == 0, nb == 0
    mean = np.where(a_empty, bm, np.where(b_empty, am, mean))
    lo = np.where(a_empty, blo, np.where(b_empty, alo, lo))
    m2 = np.where(a_empty, bm2, np.where(b_empty, am2, m2))
    m2lo = np.where(a_empty, bm2lo, np.where(b_empty, am2lo, m2lo))
    lo = np.where(np.isfinite(lo), lo, 0.0)
    return n, mean, m2, lo, m2lo


def merge_packed_rows(rows):
    """Twin of bnfast._core._merge_packed_rows (the distributed layer's merge of parts
    packed [count(C), mean(C), mean_lo(C), m2(C)] a row): (count, mean, m2, mean_lo).
    Every sum over the parts runs in row order (a Python loop over the rows: NumPy's
    own reductions over rows add pairwise when they see one channel)."""
    rows = np.asarray(rows, np.float64)
    C = rows.shape[1] // 4
    n, hi, lo, m2 = (rows[:, k * C:(k + 1) * C] for k in range(4))

    def rowsum(v):
        s = v[0].copy()
        for r in range(1, len(v)):
            s = s + v[r]
        return s

    N = rowsum(n)
    has = n > 0
    first = np.argmax(has, axis=0)
    cols = np.arange(C)
    k_hi, k_lo = hi[first, cols], lo[first, cols]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = np.where(has, (hi - k_hi) + (lo - k_lo), 0.0)   # part mean - pivot
        D = rowsum(n * d) / N                               # global mean - pivot
        e = np.where(has, d - D, 0.0)
        M2 = rowsum(m2) + rowsum(n * e * e)
        mean, mlo = _two_sum(k_hi, k_lo + D)
        # a part's mean not finite: the parts' means summed in row order, M2 NaN
        part = hi + lo
        plain = np.zeros(C)
        for r in range(len(part)):
            plain = np.where(~has[r], plain, np.where(r == first, part[r], plain + part[r]))
        nonfinite = (has & ~np.isfinite(part)).any(axis=0)
        mean = np.where(nonfinite, plain, mean)
        mlo = np.where(nonfinite, 0.0, mlo)
        M2 = np.where(nonfinite, np.nan, M2)
    empty = N == 0
    mean = np.where(empty, np.nan, mean)
    mlo = np.where(empty | ~np.isfinite(mlo), 0.0, mlo)
    M2 = np.where(empty, 0.0, M2)
    return N, mean, M2, mlo


# ----------------------------------------------------------------------------------
# Functional twins

def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """Twin of ``bnfast.batch_norm``: returns float64 y (or writes ``out``)."""
    if training:
        return batch_norm_train(x, weight, bias, eps=eps, axis=axis,
                                running_mean=running_mean, running_var=running_var,
                                momentum=momentum, out=out)[0]
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    return frozen_batch_norm(x, running_mean, running_var, weight, bias, eps, axis=axis,
                             out=out)


def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                     running_var=None, momentum=0.1, out=None):
    """Twin of ``bnfast.batch_norm_train``: (y, mean, invstd) in float64.

    The running statistics, when given, are updated in place (pass copies):
    ``new = (1 - momentum) * old + momentum * batch`` with the unbiased variance."""
    x = _f64(x)
    ax = _axis(x, axis)
    C = x.shape[ax]
    xc, mean, var, n = _center(x, ax)
    if n <= 1:
        raise ValueError("Expected more than 1 value per channel when training")
    invstd = 1.0 / np.sqrt(var + eps)
    w = _vec(weight, C, 1.0)
    b = _vec(bias, C, 0.0)
    bs = _bshape(x, ax)
    y = xc * (invstd * w).reshape(bs) + b.reshape(bs)
    if running_mean is not None:
        _update(running_mean, mean, momentum)
    if running_var is not None:
        _update(running_var, var * n / (n - 1.0), momentum)
    return _deliver(y, out), mean, invstd


def frozen_batch_norm(x, mean, var, weight=None, bias=None, eps=1e-5, *, axis=1,
                      out=None):
    """Twin of ``bnfast.FrozenBatchNorm(mean, var, weight, bias, eps, axis=axis)(x)``."""
    x = _f64(x)
    ax = _axis(x, axis)
    C = x.shape[ax]
    m = _vec(mean, C, 0.0)
    v = _vec(var, C, 1.0)
    w = _vec(weight, C, 1.0)
    b = _vec(bias, C, 0.0)
    bs = _bshape(x, ax)
    y = (x - m.reshape(bs)) / np.sqrt(v + eps).reshape(bs) * w.reshape(bs) + b.reshape(bs)
    return _deliver(y, out)


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, axis=1,
                        out=None):
    """Twin of ``bnfast.batch_norm_backward``: (dx, dweight, dbias) in float64.

    training=True: the full gradient through the batch statistics (mean and invstd
    must be x's batch statistics). training=False: statistics held fixed."""
    x = _f64(x)
    dy = _f64(dy)
    if dy.shape != x.shape:
        raise ValueError("dy must have the shape of x")
    ax = _axis(x, axis)
    C = x.shape[ax]
    bs = _bshape(x, ax)
    m = _vec(mean, C, 0.0).reshape(bs)
    s = _vec(invstd, C, 1.0).reshape(bs)
    w = _vec(weight, C, 1.0).reshape(bs)
    xc = x - m
    if training:
        # bnfast's documented rule: a `mean` within a few ulps of the batch mean is the
        # batch mean rounded to a double; the gradient is centred on the exact batch mean.
        lo = _channel_mean(xc, ax, x.size // C if C else 0)
        near = np.abs(lo) <= 8.9e-16 * np.abs(m)
        xc = xc - np.where(near, lo, 0.0)
    xhat = xc * s
    dbias = _channel_sum(dy, ax)
    dweight = _channel_sum(dy * xhat, ax)
    if training:
        n = x.size // C
        dx = w * s * (dy - dbias.reshape(bs) / n - xhat * (dweight.reshape(bs) / n))
    else:
        dx = dy * (w * s)
    return _deliver(dx, out), dweight, dbias


# ----------------------------------------------------------------------------------
# Layer twin (torch.nn.BatchNorm*d semantics)

class BatchNormRef:
    """Twin of ``bnfast.BatchNorm`` with ``torch.nn.BatchNorm*d`` semantics.

    Parameters and running statistics are stored in ``dtype`` (like the layer);
    every computation is float64. ``forward`` outputs are float64."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32,
                 unbiased_running_var=True):
        C = int(num_features)
        self.num_features = C
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.dtype = np.dtype(dtype)
        self.unbiased_running_var = unbiased_running_var
        self.weight = np.ones(C, dtype) if affine else None
        self.bias = np.zeros(C, dtype) if affine else None
        self.running_mean = np.zeros(C, dtype) if track_running_stats else None
        self.running_var = np.ones(C, dtype) if track_running_stats else None
        self.num_batches_tracked = 0 if track_running_stats else None
        self.training = True
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        x = _f64(x)
        ax = _axis(x, self.axis)
        C = self.num_features
        # torch: eval uses the running statistics whenever they exist (also after
        # track_running_stats was turned off); training updates them only when tracked
        use_batch = self.training or self.running_mean is None
        if use_batch:
            xc, mean, var, n = _center(x, ax)
            if n <= 1:
                raise ValueError("Expected more than 1 value per channel when training")
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                f = (1.0 / self.num_batches_tracked if self.momentum is None
                     else float(self.momentum))
                v = var * n / (n - 1.0) if self.unbiased_running_var else var
                _update(self.running_mean, mean, f)
                _update(self.running_var, v, f)
        else:
            mean = np.asarray(self.running_mean, np.float64)
            var = np.asarray(self.running_var, np.float64)
            xc = x - mean.reshape(_bshape(x, ax))
        invstd = 1.0 / np.sqrt(var + self.eps)
        w = _vec(self.weight, C, 1.0)
        b = _vec(self.bias, C, 0.0)
        bs = _bshape(x, ax)
        y = xc * (invstd * w).reshape(bs) + b.reshape(bs)
        self._saved = (x, mean, invstd, use_batch, self.weight, self.axis)
        return y

    def backward(self, dy):
        if self._saved is None:
            raise ValueError("backward called before any forward call")
        x, mean, invstd, use_batch, weight, axis = self._saved   # the forward's
        dx, dw, db = batch_norm_backward(dy, x, mean, invstd, weight, training=use_batch,
                                         axis=axis)
        if self.affine:
            self.grad_weight, self.grad_bias = dw, db
        return dx


# ----------------------------------------------------------------------------------
# Comparison helpers

def _report(got, ref, err, tol, what):
    bad = np.argwhere(err > tol)
    i = tuple(bad[0]) if bad.size else ()
    ratio = float(np.max(err / tol)) if err.size else 0.0
    return (f"{what}: {bad.shape[0]} of {err.size} elements out of tolerance "
            f"(worst err/tol {ratio:.3g}); first at {i}: got {got[i]!r}, "
            f"ref {ref[i]!r}, tol {np.asarray(tol)[i] if np.ndim(tol) else tol!r}")


def forward_tol(dtype, ref):
    """Per-element tolerance of a forward output of ``dtype`` against the float64 ref:
    float32 1e-6 * max(1, |ref|); float64 1e-12 * max(1, |ref|); float16 (computed in
    float32, rounded to float16) 1e-3 * max(1, |ref|)."""
    dtype = np.dtype(dtype)
    big = np.maximum(1.0, np.abs(np.asarray(ref, np.float64)))
    rtol = {np.dtype(np.float16): 1e-3, np.dtype(np.float32): 1e-6}.get(dtype, 1e-12)
    return rtol * big


def assert_forward_close(got, ref, dtype=None, what="y"):
    """A forward output against the float64 reference (see ``forward_tol``); NaN must
    be where the reference has NaN."""
    got = np.asarray(got)
    if dtype is None:
        dtype = got.dtype
    assert got.shape == np.shape(ref), f"{what}: shape {got.shape} != {np.shape(ref)}"
    ref = np.asarray(ref, np.float64)
    g = got.astype(np.float64)
    tol = forward_tol(dtype, ref)
    err = np.where(np.isnan(g) & np.isnan(ref), 0.0, np.abs(g - ref))
    err = np.where(np.isnan(err), np.inf, err)
    assert np.all(err <= tol), _report(g, ref, err, tol, what)


def assert_grad_close(got, ref, dtype=None, scale=None, what="dx"):
    """A gradient against its reference, relative to the gradient's scale
    (``scale`` defaults to max |ref|): float32 1e-6, float64 1e-12."""
    got = np.asarray(got)
    if dtype is None:
        dtype = got.dtype
    dtype = np.dtype(dtype)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    if scale is None:
        scale = np.max(np.abs(ref), initial=0.0)
    scale = max(float(scale), 1e-300)
    rtol = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-6}.get(dtype, 1e-12)
    tol = rtol * scale
    g = got.astype(np.float64)
    err = np.abs(g - ref)
    err = np.where(np.isnan(err), np.inf, err)
    assert np.all(err <= tol), _report(g, ref, err, np.full(err.shape, tol), what)


def assert_vec_close(got, ref, rtol, what="vector"):
    """Per-channel vectors (mean, invstd, running stats): |got - ref| <= rtol*max(1,|ref|)."""
    g = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert g.shape == ref.shape, f"{what}: shape {g.shape} != {ref.shape}"
    tol = rtol * np.maximum(1.0, np.abs(ref))
    err = np.abs(g - ref)
    err = np.where(np.isnan(err), np.inf, err)
    assert np.all(err <= tol), _report(g, ref, err, tol, what)

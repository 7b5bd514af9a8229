"""Mergeable per-channel statistics: count, mean and M2 (sum of squared deviations).

:func:`moments` computes them for one array, :func:`merge_moments` combines two parts
(Chan, Golub & LeVeque's pairwise update), :class:`RunningStats` streams them over
chunks of data larger than memory. Everything is float64 and exact at price-level
offsets: the mean and the deviations about it are formed before any squaring, so an
offset of 1e6 with a spread of 1e-2 loses nothing, and merged means carry a compensation
term (a second double), so streaming a million one-row chunks does not drift.
"""
import contextlib

import numpy as np

from bnfast._core import (_as_array, _check_flag, _frozen_f64, _merge_moment_arrays,
                          _merge_packed_rows, _moments_parts)

__all__ = ["Moments", "moments", "merge_moments", "RunningStats"]

class Moments:
    """Per-channel count, mean and M2 of some data: immutable, float64, mergeable.

    Build one with :func:`moments` (from an array), :func:`merge_moments`,
    :attr:`RunningStats.moments`, or directly from three arrays.

    Parameters
    ----------
    count : array_like of shape (C,)
        Number of values per channel (whole numbers from 0 to 2**53, where float64
        stops holding them exactly; others are refused).
    mean : array_like of shape (C,)
        Mean per channel. Ignored where ``count == 0`` (stored as NaN there).
    m2 : array_like of shape (C,)
        Sum of squared deviations from the mean per channel (>= 0). Ignored where
        ``count == 0`` (stored as 0 there).

    Attributes
    ----------
    count, mean, m2 : ndarray of float64, shape (C,), read-only
    var : ndarray of float64, shape (C,)
        Biased (population) variance ``m2 / count``; NaN where ``count == 0``.
    var_unbiased : ndarray of float64, shape (C,)
        ``m2 / (count - 1)``; NaN where ``count <= 1``.
    num_features : int
        C.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> m = bnfast.moments(np.array([[1.0, 10.0], [3.0, 30.0]]), axis=-1)
    >>> m.count, m.mean, m.m2, m.var
    (array([2., 2.]), array([ 2., 20.]), array([  2., 200.]), array([  1., 100.]))
    >>> bnfast.Moments([2, 0], [5.0, 0.0], [8.0, 0.0]).mean   # count 0: no mean
    array([ 5., nan])
    """

    # _mean + _lo is the mean to about twice float64 precision (_mean = fl(_mean + _lo)):
    # merges stay exact however many parts are merged.  _m2 + _m2lo likewise (_m2 =
    # fl(_m2 + _m2lo)): M2 summed over thousands of merges (chunks of RunningStats)
    # rounded one way, 20-28 ulps off in chunks of 100 rows, plainly.
    __slots__ = ("_count", "_mean", "_lo", "_m2", "_m2lo")

    def __init__(self, count, mean, m2):
        arrs = []
        for name, v in (("count", count), ("mean", mean), ("m2", m2)):
            a = _as_array(v, name)
            if a.dtype.kind not in "fiub":
                raise TypeError(f"Moments: {name} must be real numbers, got dtype {a.dtype}")
            a = np.array(a, dtype=np.float64, copy=True)
            if a.ndim != 1:
                raise ValueError(f"Moments: {name} must be 1-D (one value per channel), "
                                 f"got shape {a.shape}")
            arrs.append(a)
        c, mu, m2a = arrs
        if not (c.shape == mu.shape == m2a.shape):
            raise ValueError(f"Moments: count, mean and m2 must have the same shape, got "
                             f"{c.shape}, {mu.shape}, {m2a.shape}")
        # at most 2**53, where float64 counts stop being exact (1e300 made merges NaN)
        if np.any(~((c >= 0) & (c <= 2.0**53))) or np.any(c != np.floor(c)):
            raise ValueError(f"Moments: count must hold whole numbers from 0 to 2**53, "
                             f"got {c}")
        if np.any(m2a < 0):
            raise ValueError(f"Moments: m2 must be non-negative, got {m2a}")
        empty = c == 0
        mu[empty] = np.nan
        m2a[empty] = 0.0
        for a in arrs:
            a.flags.writeable = False
        lo = np.zeros_like(mu)
        lo.flags.writeable = False
        object.__setattr__(self, "_count", c)
        object.__setattr__(self, "_mean", mu)
        object.__setattr__(self, "_lo", lo)
        object.__setattr__(self, "_m2", m2a)
        object.__setattr__(self, "_m2lo", lo)

    @classmethod
    def empty(cls, num_features):
        """Moments of no data (count 0) for ``num_features`` channels: the identity of
        :func:`merge_moments`.

        Parameters
        ----------
        num_features : int
            Number of channels C (>= 0).

        Examples
        --------
        >>> import bnfast
        >>> bnfast.Moments.empty(2).count
        array([0., 0.])
        """
        if isinstance(num_features, (bool, np.bool_)):
            raise TypeError(f"num_features must be an int, got {num_features!r}")
        try:
            c = int(num_features)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"num_features must be an int, got {num_features!r}") from None
        if c != num_features or c < 0:
            raise ValueError(f"num_features must be an int >= 0, got {num_features!r}")
        z = np.zeros(c)
        return cls(z, z, z)

    @classmethod
    def _trusted(cls, count, mean, m2, lo=None, m2lo=None):
        """No checks: arrays are fresh float64 (C,), normalized where count == 0."""
        if lo is None:
            lo = np.zeros_like(mean)
        if m2lo is None:
            m2lo = np.zeros_like(m2)
        count, mean, lo, m2, m2lo = _frozen_f64(count, mean, lo, m2, m2lo)
        self = object.__new__(cls)
        object.__setattr__(self, "_count", count)
        object.__setattr__(self, "_mean", mean)
        object.__setattr__(self, "_lo", lo)
        object.__setattr__(self, "_m2", m2)
        object.__setattr__(self, "_m2lo", m2lo)
        return self

    # Views of the read-only arrays: NumPy lets the owner of an array's data set its
    # WRITEABLE flag back, but refuses that on a view of a read-only base.  Made here,
    # not in the merges, which never read these (a view costs ~85 ns).
    count = property(lambda self: self._count.view(), doc="Values per channel (float64).")
    mean = property(lambda self: self._mean.view(),
                    doc="Mean per channel (NaN where count is 0).")
    m2 = property(lambda self: self._m2.view(), doc="Sum of squared deviations from the mean.")

    @property
    def num_features(self):
        """Number of channels C."""
        return self._count.shape[0]

    @property
    def var(self):
        """Biased variance ``m2 / count`` (NaN where count is 0)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._count > 0, self._m2 / self._count, np.nan)

    @property
    def var_unbiased(self):
        """Unbiased variance ``m2 / (count - 1)`` (NaN where count <= 1)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._count > 1, self._m2 / (self._count - 1.0), np.nan)

    def merge(self, other):
        """``merge_moments(self, other)``: the moments of both parts' data.

        Parameters
        ----------
        other : Moments
            Same number of channels.

        Returns
        -------
        Moments

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> a = bnfast.moments(np.array([[1.0], [2.0]]))
        >>> b = bnfast.moments(np.array([[3.0], [4.0], [5.0]]))
        >>> m = a.merge(b)
        >>> m.count, m.mean, m.m2
        (array([5.]), array([3.]), array([10.]))
        """
        return merge_moments(self, other)

    def __setattr__(self, name, value):
        raise AttributeError("Moments is immutable")

    def __delattr__(self, name):
        raise AttributeError("Moments is immutable")

    def __reduce__(self):
        return (Moments._trusted, (self._count.copy(), self._mean.copy(), self._m2.copy(),
                                   self._lo.copy(), self._m2lo.copy()))

    def __repr__(self):
        return (f"Moments(count={self._count!r}, mean={self._mean!r}, m2={self._m2!r})")


# -------------------------------------------------------------------------------------
# One array

def _channel_axis(x, axis, name="x"):
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (samples, channels, ...), "
                         f"got shape {x.shape}; use {name}[:, None] for a single series")
    ax = int(axis) + x.ndim if axis < 0 else int(axis)
    if not 0 <= ax < x.ndim:
        raise ValueError(f"axis {axis} is out of range for a {x.ndim}-D input")
    return ax


def _check_dtype(x, name="x"):
    k = x.dtype.kind
    if k in "iub" or (k == "f" and x.dtype.itemsize <= 8):
        return
    raise TypeError(f"{name} must have a real dtype (float16/32/64, integers, bools), "
                    f"got {x.dtype}")


def _kernel_moments(x, ax):
    """Moments of x with channel axis ax, from the compiled statistics pass of
    :func:`bnfast.batch_norm_train` (no scratch output): per cache tile one pass about
    the mean so far (a second only on cancellation), tiles merged with Chan's update,
    the mean kept as two doubles."""
    C = x.shape[ax]
    n_per = x.size // C if C else 0
    if n_per == 0:
        z = np.zeros(C)
        return Moments(z, z, z)
    return Moments._trusted(*_moments_parts(x, ax))


def moments(x, *, axis=1):
    """Per-channel count, mean and M2 of an array, float64, exact at large offsets.

    Parameters
    ----------
    x : array_like, ndim >= 2
        Data; float16/32/64, integers or bools (computed in float64 precision). Any
        layout and strides; numpy memmaps are read without a copy.
    axis : int, keyword-only, default 1
        The channel axis (1 for NC, NCL, NCHW; -1 for channels-last and
        (samples, features) matrices). Every other axis is reduced.

    Returns
    -------
    Moments
        ``count`` (float64: values per channel, the product of the other axes'
        lengths), ``mean``, ``m2`` (sum of squared deviations) and ``var`` (biased).
        An input with no samples gives count 0, mean NaN, m2 0.

    Notes
    -----
    One read of x by the compiled statistics pass of :func:`bnfast.batch_norm_train`
    (multithreaded, results independent of the thread count; no temporary of x's size
    unless x needs converting (integers, non-native byte order), has negative or zero
    strides, or has no strided view the kernels read in place (stepped channels-last,
    short segments: README "Memory")). The mean is kept as two doubles, whose low
    part the result keeps for merges. For float64 data M2 is within about 2 ulps of the
    exact value on data away from zero, whatever the offset (batches of 2-40 values at
    offsets 1e2-1e5 measured up to 2.2), also on data on a grid (prices on a tick,
    integers: compensated sums, README "How it is exact"; data whose level jumps by many
    spreads inside a channel of runs (NCHW) measured up to 8: a tile's sum of x - shift
    is plain there, channels-last rows compensate it). On data centred near zero the
    shift (a channel's first value) is subtracted with a rounding, and M2 of batches of
    a few values measured up to 5 ulps (NumPy's two-pass sum 5.9 on the same data; from
    about 1000 values 1.5). The mean is within half an ulp of itself (its rounding)
    plus a few ulps (measured up to 4.8) of the larger of the standard deviation and the
    distance of the channel's first value from the mean (absolute), which is a few ulps
    of the mean unless the data are centred near zero. float32 and float16 data are
    summed in float64 without compensation (each product exact): M2 measured up to 72
    float64 ulps off (about 1e-14 relative), and within a few 1e-10 relative where a
    channel's first value lies far out (3000-3500 standard deviations: up to 8e-12 for
    float32, 1.3e-10 for float16), far below their own precision.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = 1e6 + np.array([[0.0, 0.0], [0.02, 2.0]])   # prices: offset 1e6
    >>> m = bnfast.moments(x, axis=-1)
    >>> m.count
    array([2., 2.])
    >>> np.round(m.mean - 1e6, 12), np.round(np.sqrt(m.var), 12)
    (array([0.01, 1.  ]), array([0.01, 1.  ]))
    """
    x = _as_array(x, "x")
    _check_dtype(x)
    ax = _channel_axis(x, axis)
    return _kernel_moments(x, ax)


# -------------------------------------------------------------------------------------
# Merging

def merge_moments(a, b):
    """Moments of the union of two parts' data (Chan et al.'s pairwise update).

    ``mean = ma + (mb - ma) * nb / n`` and ``m2 = m2a + m2b + (mb - ma)**2 * na * nb / n``,
    with the mean carried as two doubles so that rounding does not accumulate over
    many merges: well conditioned at any offset, associative to float64 rounding,
    commutative exactly, and exact when either part is empty (the other part is
    returned unchanged, channel by channel).

    Parameters
    ----------
    a, b : Moments
        Same number of channels.

    Returns
    -------
    Moments

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    >>> m = bnfast.merge_moments(bnfast.moments(x[:2]), bnfast.moments(x[2:]))
    >>> m.count, m.mean, m.m2
    (array([5.]), array([3.]), array([10.]))
    """
    if not isinstance(a, Moments) or not isinstance(b, Moments):
        raise TypeError(f"merge_moments takes two Moments, got {type(a).__name__} and "
                        f"{type(b).__name__}")
    if a.num_features != b.num_features:
        raise ValueError(f"merge_moments: channel counts differ ({a.num_features} and "
                         f"{b.num_features})")
    return _merge(a, b)


def _merge(a, b):
    """merge_moments without checks (bnfast._core._merge_moment_arrays: Chan's update
    based on the larger part, m2 compensated; its NumPy twin is in tests/reference.py)."""
    return Moments._trusted(*_merge_moment_arrays(a._count, a._mean, a._lo, a._m2, a._m2lo,
                                                  b._count, b._mean, b._lo, b._m2, b._m2lo))


def _pack(m, buf):
    """Write m as [count(C), mean(C), mean_lo(C), m2(C)] into buf[:4C]."""
    C = m.num_features
    buf[:C] = m._count
    buf[C:2 * C] = m._mean
    buf[2 * C:3 * C] = m._lo
    buf[3 * C:4 * C] = m._m2


def _merge_packed(rows):
    """Merge the moments packed by _pack, one per row (used by the distributed layer
    after an allgather: every rank computes the same result from the same rows).

    Every part's mean is taken relative to a pivot (the first non-empty part's mean, per
    channel), exactly as a pairwise merge would, and the shifts are summed in row order
    (bnfast._core._merge_packed_rows; its NumPy twin is in tests/reference.py)."""
    return Moments._trusted(*_merge_packed_rows(rows))


# -------------------------------------------------------------------------------------
# Streaming

def _listed(a):
    """A 1-D array for a message, elided in the middle when long (a million channels)."""
    return np.array2string(np.asarray(a), threshold=10, edgeitems=3, separator=", ")


class RunningStats:
    """Exact per-channel mean and variance accumulated over chunks of data.

    Feeding the chunks of a dataset (a memory-mapped file, a generator of batches) one
    at a time gives the statistics of the whole dataset to float64 rounding, whatever
    the chunk sizes (float64 data; float32 and float16 data within the few 1e-10
    relative of :func:`moments`); empty chunks are allowed.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    axis : int, keyword-only, default 1
        Channel axis of the chunks (-1 for (samples, features)).

    Attributes
    ----------
    count, mean, var, var_unbiased : ndarray of float64, shape (C,)
        Values seen per channel, mean, biased and unbiased variance (NaN until there
        are enough values).
    moments : Moments
        Everything accumulated so far (immutable, mergeable).
    num_features, axis : int

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> data = 1e5 + np.arange(20.0).reshape(10, 2)      # could be an np.memmap
    >>> rs = bnfast.RunningStats(2, axis=-1)
    >>> for start in range(0, 10, 3):                     # chunks of 3, 3, 3, 1 rows
    ...     _ = rs.update(data[start:start + 3])
    >>> rs.count, rs.mean - 1e5, rs.var
    (array([10., 10.]), array([ 9., 10.]), array([33., 33.]))
    >>> bn = rs.to_batchnorm(bnfast.BatchNorm(2, axis=-1, dtype=np.float64))
    >>> bn.running_var                                    # unbiased, like torch
    array([36.66666667, 36.66666667])
    """

    def __init__(self, num_features, *, axis=1):
        from bnfast._layers import _check_num_features

        c = _check_num_features(num_features)
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise TypeError(f"axis must be an int, got {axis!r}")
        self.num_features = c
        self.axis = int(axis)
        self._m = Moments.empty(c)

    def update(self, chunk):
        """Add a chunk of data (array_like, channel axis ``axis``) or a :class:`Moments`.

        Returns self. Raises ValueError (and changes nothing) on a channel mismatch.

        Parameters
        ----------
        chunk : array_like or Moments
            Data with ``num_features`` channels on axis ``axis`` (ndim >= 2; may have
            no samples), or the :class:`Moments` of some data (e.g. computed
            elsewhere).

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> rs = bnfast.RunningStats(2, axis=-1)
        >>> _ = rs.update(np.array([[1.0, 10.0], [3.0, 30.0]]))
        >>> _ = rs.update(bnfast.moments(np.array([[5.0, 50.0]]), axis=-1))
        >>> rs.count, rs.mean
        (array([3., 3.]), array([ 3., 30.]))
        """
        if isinstance(chunk, Moments):
            m = chunk
            if m.num_features != self.num_features:
                raise ValueError(f"RunningStats({self.num_features}) got Moments with "
                                 f"{m.num_features} channels")
        else:
            x = _as_array(chunk, "chunk")
            _check_dtype(x, "chunk")
            ax = _channel_axis(x, self.axis, "chunk")
            if x.shape[ax] != self.num_features:
                raise ValueError(f"RunningStats({self.num_features}) got a chunk with "
                                 f"{x.shape[ax]} channels on axis {self.axis} "
                                 f"(shape {x.shape})")
            m = _kernel_moments(x, ax)
        self._m = merge_moments(self._m, m)
        return self

    def reset(self):
        """Forget everything; returns self.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> rs = bnfast.RunningStats(2, axis=-1).update(np.ones((4, 2)))
        >>> rs.reset().count
        array([0., 0.])
        """
        self._m = Moments.empty(self.num_features)
        return self

    moments = property(lambda self: self._m, doc="The accumulated :class:`Moments`.")
    count = property(lambda self: self._m.count.copy(), doc="Values per channel.")
    mean = property(lambda self: self._m.mean.copy(), doc="Mean per channel.")
    var = property(lambda self: self._m.var, doc="Biased variance per channel.")
    var_unbiased = property(lambda self: self._m.var_unbiased,
                            doc="Unbiased variance per channel.")

    def to_batchnorm(self, layer):
        """Set a :class:`bnfast.BatchNorm`'s running statistics to these statistics.

        ``running_mean`` gets the mean; ``running_var`` the unbiased variance, or the
        biased one for a layer built with ``unbiased_running_var=False`` (Keras'
        convention). Written in place in the layer's dtype; ``num_batches_tracked``,
        weight and bias are not changed. Works for any layer with those attributes
        (BatchNorm1d/2d/3d, ``bnfast.distributed.SyncBatchNorm``).

        Returns the layer.

        Parameters
        ----------
        layer : BatchNorm
            The layer to set (``num_features`` channels, ``track_running_stats=True``).

        Raises
        ------
        TypeError
            `layer` is not a batch-norm layer.
        ValueError
            The layer has no running statistics or another channel count, its running
            statistics are read-only, a channel has fewer than 2 values (1 for a biased
            layer), or a channel's mean or variance is not finite (NaN or inf in its
            data) or does not fit the layer's dtype (float16); the channels are named.
            Nothing is written then.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> rs = bnfast.RunningStats(1).update(np.array([[1.0], [2.0], [3.0]]))
        >>> bn = rs.to_batchnorm(bnfast.BatchNorm(1, dtype=np.float64))
        >>> bn.running_mean, bn.running_var                 # unbiased variance
        (array([2.]), array([1.]))
        >>> keras_like = bnfast.BatchNorm(1, dtype=np.float64, unbiased_running_var=False)
        >>> np.round(rs.to_batchnorm(keras_like).running_var, 6)   # biased variance
        array([0.666667])
        """
        if not hasattr(layer, "running_mean") or not hasattr(layer, "num_features"):
            raise TypeError(f"to_batchnorm: layer must be a bnfast.BatchNorm (or a layer "
                            f"with running_mean, running_var and num_features), got "
                            f"{type(layer).__name__}")
        if layer.running_mean is None or getattr(layer, "running_var", None) is None:
            raise ValueError("to_batchnorm: the layer has no running statistics "
                             "(track_running_stats=False)")
        for name in ("running_mean", "running_var"):   # (a torch module's are tensors)
            if not isinstance(getattr(layer, name), np.ndarray):
                raise TypeError(f"to_batchnorm: layer must be a bnfast.BatchNorm (or a "
                                f"layer whose running statistics are NumPy arrays); its "
                                f"{name} is a {type(getattr(layer, name)).__name__} (for "
                                f"a torch module: bnfast.from_torch(module) first)")
        if layer.num_features != self.num_features:
            raise ValueError(f"to_batchnorm: the layer has {layer.num_features} channels, "
                             f"these statistics have {self.num_features} channels")
        var = self._checked_var("to_batchnorm", getattr(layer, "unbiased_running_var", True))
        # checked whole before either is written: a refused call changes nothing
        new = {}
        for name, value in (("running_mean", self._m.mean), ("running_var", var)):
            dst = getattr(layer, name)
            if not dst.flags.writeable:
                raise ValueError(f"to_batchnorm: the layer's {name} is read-only")
            with np.errstate(over="ignore"):
                new[name] = np.asarray(value).astype(dst.dtype)
            bad = np.flatnonzero(~np.isfinite(new[name]))
            if bad.size:
                raise ValueError(f"to_batchnorm: the {name[8:]} of channels "
                                 f"{bad[:10].tolist()} does not fit the layer's {dst.dtype} "
                                 f"(e.g. {np.asarray(value)[bad[0]]!r})")
        # under the layer's lock, as its forward and load_state_dict: a concurrent call
        # must not see the mean written and the variance not yet
        lock = getattr(layer, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            np.copyto(layer.running_mean, new["running_mean"])
            np.copyto(layer.running_var, new["running_var"])
        return layer

    def freeze(self, weight=None, bias=None, *, eps=1e-5, unbiased=False):
        """A :class:`bnfast.FrozenBatchNorm` that standardizes with these statistics
        (biased variance by default), e.g. to normalize features with the statistics
        of a whole history. ``axis`` is this object's.

        Parameters
        ----------
        weight, bias : array_like of shape (C,), optional
            Scale and shift applied after standardizing (default: none).
        eps : float, keyword-only, default 1e-5
            Added to the variance.
        unbiased : bool, keyword-only, default False
            Standardize with the unbiased variance ``m2 / (count - 1)`` instead of the
            biased one ``m2 / count``.

        Returns
        -------
        FrozenBatchNorm

        Raises
        ------
        ValueError
            A channel has too few values for the variance (0, or 1 with ``unbiased``),
            or its mean or variance is not finite (NaN or inf in its data); the
            channels are named. As :meth:`to_batchnorm`.
        TypeError
            ``unbiased`` is not a bool (a string "False" would read as true).

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> history = 1e5 + np.array([[1.0, 10.0], [3.0, 30.0]])   # price offsets
        >>> rs = bnfast.RunningStats(2, axis=-1).update(history)
        >>> frozen = rs.freeze()
        >>> np.round(frozen(1e5 + np.array([[2.0, 40.0]])), 4)   # (x - mean) / std
        array([[0., 2.]])
        """
        from bnfast._core import FrozenBatchNorm
        var = self._checked_var("freeze", _check_flag(unbiased, "unbiased"))
        return FrozenBatchNorm(self._m.mean, var, weight, bias, eps, axis=self.axis)

    def _checked_var(self, what, unbiased):
        """The unbiased or biased variance, or a ValueError naming the channels with too
        few values for it or with statistics that are not finite (NaN or inf in the
        data: normalizing with them would give NaN on those channels for good)."""
        count, mean = self._m.count, self._m.mean
        need = 2 if unbiased else 1
        few = np.flatnonzero(count < need)
        if few.size:
            raise ValueError(f"{what}: every channel needs at least {need} "
                             f"value{'s' if need > 1 else ''}; channel(s) {_listed(few)} "
                             f"have counts {_listed(count[few])}")
        var = self._m.var_unbiased if unbiased else self._m.var
        bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
        if bad.size:
            raise ValueError(f"{what}: the statistics of channel(s) {_listed(bad)} are not "
                             f"finite (mean {_listed(mean[bad])}, variance "
                             f"{_listed(var[bad])}): their data hold NaN or inf")
        return var

    def __repr__(self):
        return (f"RunningStats({self.num_features}, axis={self.axis}, "
                f"count={self._m.count.max() if self.num_features else 0:g})")

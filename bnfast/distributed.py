"""Synchronized batch normalization across processes over MPI (mpi4py).

``bnfast.distributed.SyncBatchNorm`` is :class:`bnfast.BatchNorm` whose training
statistics are those of the batch concatenated over every rank of an MPI communicator:

* forward: one ``Allgather`` of 4*C + 1 float64 per rank (count, mean as two doubles,
  M2 per channel, and a status flag), merged in rank order as
  :func:`bnfast.merge_moments` does, so every rank gets the same, exact global
  statistics;
* backward: one ``Allreduce`` (sum) of 2*C + 1 float64 (sum dy, sum dy*xhat and a status
  flag).

mpi4py is imported only when a layer needs its default communicator
(``MPI.COMM_WORLD``); install it with ``pip install "bnfast[mpi]"`` (mpi4py and the
``mpich`` runtime wheel) and run the program under ``mpiexec -n P python train.py``.
"""
import numpy as np

from bnfast._core import batch_norm
from bnfast._layers import BatchNorm
from bnfast._moments import _bcast, _merge_packed, _moments_and_scratch, _pack, _slices

__all__ = ["SyncBatchNorm"]


def _default_comm():
    try:
        from mpi4py import MPI
    except ImportError as e:        # pragma: no cover - depends on the environment
        raise ImportError("bnfast.distributed.SyncBatchNorm needs mpi4py for its default "
                          "communicator: pip install 'bnfast[mpi]' (mpi4py and mpich), "
                          "or pass comm=") from e
    return MPI.COMM_WORLD


class _Sync:
    """Marks a saved forward as synchronized; holds the global count per channel."""
    __slots__ = ("count",)

    def __init__(self, count):
        self.count = count


class SyncBatchNorm(BatchNorm):
    """Batch normalization with statistics synchronized over an MPI communicator.

    In training mode every rank normalizes its shard with the mean and variance of the
    batch concatenated over all ranks, updates its running statistics with them (all
    ranks keep identical buffers), and :meth:`backward` returns the gradient of that
    global normalization with respect to this rank's shard. In eval mode it is a plain
    local :class:`bnfast.BatchNorm` (no communication).

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, axis, dtype,
    unbiased_running_var
        As :class:`bnfast.BatchNorm`.
    comm : mpi4py communicator, keyword-only, optional
        Default ``mpi4py.MPI.COMM_WORLD`` (imported when first needed). Any object with
        ``Get_size()``, ``Allgather(sendbuf, recvbuf)`` and ``Allreduce(sendbuf,
        recvbuf)`` (sum) over float64 NumPy buffers works.

    Attributes
    ----------
    weight, bias, running_mean, running_var, num_batches_tracked, training
        As :class:`bnfast.BatchNorm`.
    grad_weight, grad_bias : ndarray or None
        This rank's contribution, like PyTorch's SyncBatchNorm: ``sum(dy * xhat)`` and
        ``sum(dy)`` over this rank's shard with the global statistics. Their sum over
        ranks is the single-process gradient, so a data-parallel loop allreduces them
        together with every other parameter's gradient.
    comm
        The communicator (settable).

    Notes
    -----
    Every rank must call forward (and backward) in the same order: they are
    collective. A rank may hold no samples in a step (a shard of shape (0, C, ...)).
    An error on one rank (wrong channel count, wrong dy shape) is raised on every rank
    (the failing rank raises its own error, the others a RuntimeError) instead of
    leaving them blocked. Shapes other than the channel axis may differ between ranks.

    Training forward costs the local statistics pass (plus a pass for the low part of
    the mean on float64 data), one allgather of 4*C + 1 float64 per rank and the
    normalization pass; backward a float64 pass for the local sums, one allreduce of
    2*C + 1 float64 and a float64 pass for dx. All local passes are over this rank's
    shard only; the result equals a single :class:`bnfast.BatchNorm` on the
    concatenated batch to float rounding.

    A layer pickles without its communicator (it uses ``COMM_WORLD`` after unpickling
    unless ``comm`` is set again).

    Examples
    --------
    Under ``mpiexec -n 2 python script.py``:

    >>> import numpy as np
    >>> from bnfast.distributed import SyncBatchNorm
    >>> bn = SyncBatchNorm(64, axis=-1)                        # doctest: +SKIP
    >>> y = bn(x_shard)              # global statistics       # doctest: +SKIP
    >>> dx = bn.backward(dy_shard)                             # doctest: +SKIP
    >>> # allreduce bn.grad_weight, bn.grad_bias with the other gradients
    """

    _kind = "SyncBatchNorm"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, comm=None,
                 unbiased_running_var=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         axis=axis, dtype=dtype, unbiased_running_var=unbiased_running_var)
        self._comm = comm

    @classmethod
    def from_batchnorm(cls, layer, *, comm=None):
        """A SyncBatchNorm with the configuration, parameters and running statistics
        (copied) of a :class:`bnfast.BatchNorm` (like torch's
        ``convert_sync_batchnorm`` for one layer)."""
        new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
                  layer.track_running_stats, axis=layer.axis, dtype=layer.dtype,
                  comm=comm, unbiased_running_var=getattr(layer, "unbiased_running_var",
                                                          True))
        new.load_state_dict({k: np.array(v, copy=True)
                             for k, v in layer.state_dict().items()})
        new.training = layer.training
        return new

    @property
    def comm(self):
        """The communicator (``mpi4py.MPI.COMM_WORLD`` unless one was given)."""
        if self._comm is None:
            self._comm = _default_comm()
        return self._comm

    @comm.setter
    def comm(self, value):
        self._comm = value

    # -- forward ------------------------------------------------------------------------
    def __call__(self, x, *, out=None):
        """Normalize x: global batch statistics in training, running ones in eval."""
        if not self.training:
            return super().__call__(x, out=out)
        comm = self.comm
        C = self.num_features
        size = comm.Get_size()
        send = np.zeros(4 * C + 1)
        err = None
        with self._lock:
            try:
                x = self._check_input(x)
                ax = self.axis + x.ndim if self.axis < 0 else self.axis
                rdtype = _check_out(out, x)
                if out is not None and np.may_share_memory(out, x):
                    x = x.copy()           # in place: keep the input for backward
                # float64 data: keep the low part of the local mean (one more pass);
                # float32/16 data cannot tell it from zero
                local, scratch = _moments_and_scratch(x, ax, out,
                                                      compensate=rdtype.itemsize == 8)
                _pack(local, send)
            except Exception as e:
                err = e
                send[-1] = 1.0
            recv = np.empty((size, 4 * C + 1))
            comm.Allgather(send, recv)
            if err is not None:
                raise err
            bad = np.flatnonzero(recv[:, -1])
            if bad.size:
                raise RuntimeError(f"SyncBatchNorm forward failed on rank(s) {bad.tolist()} "
                                   f"(see the error raised there)")
            g = _merge_packed(recv[:, :4 * C])
            n = g.count
            if np.any(n <= 1):
                raise ValueError(f"Expected more than 1 value per channel when training, "
                                 f"got {int(n.min())} over all ranks (local input size "
                                 f"{x.shape})")
            gvar = g.var
            invstd = 1.0 / np.sqrt(gvar + self.eps)
            w = (np.ones(C) if self.weight is None
                 else np.asarray(self.weight, dtype=np.float64))
            b = (np.zeros(C) if self.bias is None
                 else np.asarray(self.bias, dtype=np.float64))
            # y = (x - hi - lo) * w * invstd + b, with the low part folded into the shift
            shift = b - g._lo * (w * invstd)
            if x.size == 0:
                y = out if out is not None else np.empty(x.shape, rdtype)
            else:
                y = batch_norm(x, g.mean, gvar, w, shift, False, 0.1, self.eps,
                               axis=self.axis,
                               out=scratch if scratch is not None else out)
            if self.track_running_stats:
                self.num_batches_tracked += 1
                f = (1.0 / self.num_batches_tracked if self.momentum is None
                     else self.momentum)
                bvar = g.m2 / (n - 1.0) if self.unbiased_running_var else gvar
                _update_running(self.running_mean, g.mean, f)
                _update_running(self.running_var, bvar, f)
            self._saved = (x, (g.mean, g._lo), invstd, _Sync(n))
            return y

    # -- backward -----------------------------------------------------------------------
    def backward(self, dy, *, out=None):
        """Gradient with respect to this rank's last input.

        After a training forward this is collective (one allreduce of 2*C + 1 float64):
        dx is the gradient of the global normalization, and ``grad_weight`` /
        ``grad_bias`` are this rank's contributions (sum them over ranks)."""
        saved = self._saved
        if saved is None or not isinstance(saved[3], _Sync):
            return super().backward(dy, out=out)
        comm = self.comm
        C = self.num_features
        send = np.zeros(2 * C + 1)
        err = None
        with self._lock:
            x, mean, invstd, sync = self._saved
            try:
                dy = np.asarray(dy)
                if dy.shape != x.shape:
                    raise ValueError(f"dy must have the shape of the last input {x.shape}, "
                                     f"got {dy.shape}")
                if dy.dtype.kind not in "fiub" or (dy.dtype.kind == "f"
                                                   and dy.dtype.itemsize > 8):
                    raise TypeError(f"dy must have a real dtype, got {dy.dtype}")
                rdtype = _check_out(out, x)
                ax = self.axis + x.ndim if self.axis < 0 else self.axis
                s_dy, s_dyx = _local_sums(dy, x, mean, ax)
                send[:C] = s_dy
                send[C:2 * C] = s_dyx * invstd
            except Exception as e:
                err = e
                send[-1] = 1.0
            recv = np.empty_like(send)
            comm.Allreduce(send, recv)
            if err is not None:
                raise err
            if recv[-1] != 0:
                raise RuntimeError("SyncBatchNorm backward failed on another rank (see the "
                                   "error raised there)")
            n = sync.count
            w = (np.ones(C) if self.weight is None
                 else np.asarray(self.weight, dtype=np.float64))
            k1 = recv[:C] / n                         # mean of dy
            k2 = recv[C:2 * C] / n * invstd           # mean of dy*xhat, times invstd
            dx = _grad_input(dy, x, mean, w * invstd, k1, k2, ax, out, rdtype)
            if self.affine:
                self.grad_weight = send[C:2 * C].astype(self.dtype)
                self.grad_bias = send[:C].astype(self.dtype)
            return dx

    # -- pickling -----------------------------------------------------------------------
    def __getstate__(self):
        d = super().__getstate__()
        d["_comm"] = None
        return d



def _check_out(out, x):
    """The result dtype for input x (x's float dtype, float64 for integers); checks out."""
    rdtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"out must have shape {x.shape}, got {out.shape}")
        if out.dtype != rdtype:
            raise TypeError(f"out must have dtype {rdtype}, got {out.dtype}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
    return rdtype


def _update_running(r, batch, f):
    """r = (1 - f) * r + f * batch in float64, rounded once (as the core does)."""
    upd = (1.0 - f) * r.astype(np.float64) + f * np.asarray(batch, dtype=np.float64)
    np.copyto(r, upd, casting="unsafe")


def _einsum_spec(ndim, ax):
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    return f"{letters},{letters}->{letters[ax]}"


def _local_sums(dy, x, mean, ax):
    """float64 per-channel sum(dy) and sum(dy * (x - mean)) over this rank's shard;
    mean = (hi, lo): x is centred exactly on hi, and lo is folded in at the end."""
    C = x.shape[ax]
    axes = tuple(i for i in range(x.ndim) if i != ax)
    m = _bcast(mean[0], x.ndim, ax)
    spec = _einsum_spec(x.ndim, ax)
    s_dy = np.zeros(C)
    s_dyx = np.zeros(C)
    if x.size == 0:
        return s_dy, s_dyx
    for sl in _slices(x.shape, ax):
        xc = np.subtract(x[sl], m, dtype=np.float64)
        s_dy += np.sum(dy[sl], axis=axes, dtype=np.float64)
        s_dyx += np.einsum(spec, dy[sl], xc, dtype=np.float64)
    return s_dy, s_dyx - mean[1] * s_dy


def _grad_input(dy, x, mean, scale, k1, k2, ax, out, rdtype):
    """dx = scale * (dy - k1 - (x - mean) * k2), computed as
    scale * dy + c1 * (x - hi) + c0 in float64 slice by slice and rounded once into out."""
    if out is None:
        dx = np.empty(x.shape, dtype=rdtype)
    elif np.may_share_memory(out, x) or (np.may_share_memory(out, dy)
                                         and not _same_view(out, dy)):
        dx = np.empty(x.shape, dtype=rdtype)       # overlapping: compute aside
    else:
        dx = out
    if x.size:
        hi, lo = mean
        m = _bcast(hi, x.ndim, ax)
        ab = _bcast(scale, x.ndim, ax)
        c1 = _bcast(-scale * k2, x.ndim, ax)
        c0 = _bcast(-scale * k1 + scale * k2 * lo, x.ndim, ax)
        for sl in _slices(x.shape, ax):
            t = np.subtract(x[sl], m, dtype=np.float64)
            t *= c1
            t += c0
            g = np.multiply(dy[sl], ab, dtype=np.float64)
            np.add(t, g, out=dx[sl], casting="unsafe")
    if out is not None and dx is not out:
        np.copyto(out, dx)
        return out
    return dx


def _same_view(a, b):
    return (a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.dtype == b.dtype)

"""Synchronized batch normalization across processes over MPI (mpi4py).

``bnfast.distributed.SyncBatchNorm`` is :class:`bnfast.BatchNorm` whose training
statistics are those of the batch concatenated over every rank of an MPI communicator:

* forward: one ``Allgather`` of 4*C + 1 float64 per rank (count, mean as two doubles,
  M2 per channel, and a status flag), merged in rank order as
  :func:`bnfast.merge_moments` does, so every rank gets the same, exact global
  statistics;
* backward: one ``Allreduce`` (sum) of 3*C + 2 float64 (sum dy, sum dy*(x - mean),
  sum (x - mean), the count and a status flag).

After a rank fails (bad input), the others raise a RuntimeError naming it: the forward's
flags are in its allgather; the backward then makes one more ``Allgather`` of a flag per
rank (on that path only).

Both run the compiled kernels of :class:`bnfast.BatchNorm` with the collective between
the statistics pass and the normalization (or dx) pass.

mpi4py is imported only when a layer needs its default communicator
(``MPI.COMM_WORLD``); install it with ``pip install "bnfast[mpi]"`` (mpi4py and the
``mpich`` runtime wheel) and run the program under ``mpiexec -n P python train.py``.
"""
import numpy as np

from bnfast._core import _as_array, _backward
from bnfast._layers import BatchNorm, _input_for_backward
from bnfast._moments import _merge_packed

__all__ = ["SingleProcessComm", "SyncBatchNorm"]


def _default_comm():
    try:
        from mpi4py import MPI
    except ImportError as e:        # pragma: no cover - depends on the environment
        raise ImportError("bnfast.distributed.SyncBatchNorm needs mpi4py for its default "
                          "communicator: pip install 'bnfast[mpi]' (mpi4py and mpich), "
                          "or pass comm=") from e
    return MPI.COMM_WORLD


class SingleProcessComm:
    """A communicator of one rank (the buffer-based calls SyncBatchNorm makes), for
    examples and single-process use without mpi4py."""

    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0

    def Allgather(self, sendbuf, recvbuf):
        np.copyto(recvbuf, np.reshape(sendbuf, np.shape(recvbuf)))

    def Allreduce(self, sendbuf, recvbuf):
        np.copyto(recvbuf, sendbuf)


def _check_comm(comm):
    """comm, when a training call is about to use it: an object with the buffer-based
    calls SyncBatchNorm makes; else a TypeError naming it (an int had been taken, and
    the first training call raised an AttributeError). Not checked before: a layer used
    only in eval may hold a stand-in that must not be called."""
    if not all(callable(getattr(comm, m, None)) for m in
               ("Get_size", "Allgather", "Allreduce")):
        raise TypeError(f"comm must be an mpi4py communicator (Get_size, Allgather, "
                        f"Allreduce) or None, got {type(comm).__name__}")
    return comm


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
    3*C + 2 float64 and a float64 pass for dx. All local passes are over this rank's
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
        ``convert_sync_batchnorm`` for one layer).

        The training/eval mode is kept; later changes to ``layer`` do not affect the
        result.

        Parameters
        ----------
        layer : BatchNorm
            The layer to convert (BatchNorm1d/2d/3d, or a layer from
            :func:`bnfast.from_torch` / :func:`bnfast.from_keras`).
        comm : mpi4py communicator, keyword-only, optional
            As in :class:`SyncBatchNorm` (default ``mpi4py.MPI.COMM_WORLD``).

        Returns
        -------
        SyncBatchNorm

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> from bnfast.distributed import SyncBatchNorm, SingleProcessComm
        >>> bn = bnfast.BatchNorm(2, axis=-1, dtype=np.float64)
        >>> _ = bn(np.array([[1.0, 10.0], [3.0, 30.0]]))
        >>> sbn = SyncBatchNorm.from_batchnorm(bn, comm=SingleProcessComm())   # one rank
        >>> sbn.running_mean, sbn.num_batches_tracked, sbn.training
        (array([0.2, 2. ]), 1, True)
        """
        if not isinstance(layer, BatchNorm):
            raise TypeError("layer must be a bnfast.BatchNorm (convert a torch module with "
                            f"bnfast.from_torch first), got {type(layer).__name__}")
        # built with statistics wherever the layer has them: a layer whose
        # track_running_stats was turned off after construction keeps them (eval uses them)
        with layer._lock:   # one state: not half of a concurrent load or training step
            state = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
            track, training = layer.track_running_stats, layer.training
        new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
                  "running_mean" in state, axis=layer.axis, dtype=layer.dtype,
                  comm=comm, unbiased_running_var=getattr(layer, "unbiased_running_var",
                                                          True))
        new.load_state_dict(state)
        new.track_running_stats = track
        new.training = training
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
        """Normalize x: global batch statistics in training, running ones in eval.

        Parameters
        ----------
        x : array_like
            This rank's shard (any number of samples, 0 included).
        out : ndarray, keyword-only, optional
            Written and returned (x's shape and float dtype).

        Returns
        -------
        y : ndarray

        Examples
        --------
        >>> import numpy as np
        >>> from bnfast.distributed import SyncBatchNorm, SingleProcessComm
        >>> # under mpiexec: comm=MPI.COMM_WORLD (the default); here a one-rank stand-in
        >>> bn = SyncBatchNorm(2, axis=-1, comm=SingleProcessComm())
        >>> bn(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)).round(3)
        array([[-1., -1.],
               [ 1.,  1.]], dtype=float32)
        """
        if not self.training:
            return super().__call__(x, out=out)
        comm = _check_comm(self.comm)
        C = self.num_features
        called = []

        def exchange(local):
            # the one collective of the forward: every rank's (count, mean hi, mean lo,
            # m2) per channel, merged in rank order (the same result on every rank)
            called.append(True)
            send = np.zeros(4 * C + 1)
            send[:4 * C] = local.T.ravel()
            recv = np.empty((comm.Get_size(), 4 * C + 1))
            comm.Allgather(send, recv)
            bad = np.flatnonzero(recv[:, -1])
            if bad.size:
                raise RuntimeError(f"SyncBatchNorm forward failed on rank(s) {bad.tolist()} "
                                   f"(see the error raised there)")
            g = _merge_packed(recv[:, :4 * C])
            return np.stack([g.count, g.mean, g._lo, g.m2], axis=1)

        with self._lock:
            try:
                x = self._check_input(x)
                saved_x = _input_for_backward(x, out)
                y, mean, invstd = self._batch_forward(x, out, True, exchange)  # (read above)
            except Exception:
                if not called:               # tell the other ranks, which are waiting
                    send = np.zeros(4 * C + 1)
                    send[-1] = 1.0
                    comm.Allgather(send, np.empty((comm.Get_size(), 4 * C + 1)))
                raise
            self._saved = (saved_x, mean, invstd, _Sync(None), self.weight, self.axis)
            return y

    # -- backward -----------------------------------------------------------------------
    def backward(self, dy, *, out=None):
        """Gradient with respect to this rank's last input.

        After a training forward this is collective (one allreduce of 3*C + 2 float64):
        dx is the gradient of the global normalization, and ``grad_weight`` /
        ``grad_bias`` are this rank's contributions (sum them over ranks).

        Parameters
        ----------
        dy : array_like
            Gradient with respect to this rank's output (the shape of the last input).
        out : ndarray, keyword-only, optional
            Receives dx.

        Returns
        -------
        dx : ndarray

        Examples
        --------
        >>> import numpy as np
        >>> from bnfast.distributed import SyncBatchNorm, SingleProcessComm
        >>> bn = SyncBatchNorm(1, axis=-1, dtype=np.float64, comm=SingleProcessComm())  # one rank
        >>> _ = bn(np.array([[1.0], [3.0]]))
        >>> bn.backward(np.array([[1.0], [1.0]])).ravel(), bn.grad_bias
        (array([0., 0.]), array([2.]))
        """
        with self._lock:    # the last forward's input and path read under the lock too
            saved = self._saved
            if saved is None or not isinstance(saved[3], _Sync):
                return self._local_backward(dy, out)
            return self._sync_backward(dy, out, saved)

    def _sync_backward(self, dy, out, saved):
        """backward after a synchronized training forward; the caller holds the lock."""
        comm = _check_comm(self.comm)
        C = self.num_features
        called = []

        def exchange(local):
            # the one collective of the backward: sum(dy), sum(dy (x - mean)),
            # sum(x - mean) per channel, and the global count
            called.append(True)
            send = np.zeros(3 * C + 2)
            send[:3 * C] = local.ravel()
            send[3 * C] = x.size // C if C else 0
            recv = np.empty_like(send)
            comm.Allreduce(send, recv)
            if recv[-1] != 0:
                bad = np.flatnonzero(failed_ranks(0.0))
                raise RuntimeError(f"SyncBatchNorm backward failed on rank(s) {bad.tolist()} "
                                   f"(see the error raised there)")
            return recv[:3 * C].reshape(3, C), recv[3 * C]

        def failed_ranks(flag):
            # only after a failure (every rank saw it in the allreduce): one allgather of
            # a flag per rank, so that the others can name the ranks that failed
            recv = np.empty((comm.Get_size(), 1))
            comm.Allgather(np.array([flag]), recv)
            return recv[:, 0]

        x, mean, invstd, _, weight, axis = saved      # the forward's (BatchNorm.backward)
        try:
            dy_arr = _as_array(dy, "dy")
            if dy_arr.shape != x.shape:
                raise ValueError(f"dy must have the shape of the last input {x.shape}, "
                                 f"got {dy_arr.shape}")
            dx, dw, db = _backward(dy_arr, x, mean, invstd, weight, True, axis, out,
                                   exchange, True, self.dtype)
        except Exception:
            if not called:
                send = np.zeros(3 * C + 2)
                send[-1] = 1.0
                comm.Allreduce(send, np.empty_like(send))
                failed_ranks(1.0)
            raise
        if self.affine:
            self.grad_weight = dw
            self.grad_bias = db
        return dx

    # -- pickling -----------------------------------------------------------------------
    def __getstate__(self):
        d = super().__getstate__()
        d["_comm"] = None
        return d

    def __deepcopy__(self, memo):
        # a communicator is a handle to the group, not the layer's data: the copy shares
        # it (deep-copying one with a lock inside raised "cannot pickle '_thread.lock'")
        if self._comm is not None:
            memo.setdefault(id(self._comm), self._comm)
        return super().__deepcopy__(memo)

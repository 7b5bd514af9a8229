"""Layers with PyTorch's semantics over the compiled kernels."""
import copy
import math
import operator
import threading
from collections.abc import Mapping

import numpy as np

from bnfast._core import (FrozenBatchNorm, _as_array, _backward, _check_flag,
                          _check_not_masked, _eval_invstd, _tensor_to_numpy, _train,
                          batch_norm)

_NBT_MAX = 2**63 - 1   # num_batches_tracked's largest value (int64)
_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _check_num_features(num_features):
    """num_features as an int >= 1, or a TypeError/ValueError naming it (a float or a
    string is a TypeError, as in torch: 2.0 and "3" had been taken)."""
    if isinstance(num_features, (bool, np.bool_)) or \
            not isinstance(num_features, (int, np.integer)):
        raise TypeError(f"num_features must be an int, got {type(num_features).__name__} "
                        f"{num_features!r}")
    if num_features < 1:
        raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
    return int(num_features)


def _count(n):
    """num_batches_tracked set by hand, as an int: a TypeError for what is not an
    integer (a float, a string, a bool), a ValueError for one below 0 or past int64."""
    if isinstance(n, (bool, np.bool_)):
        raise TypeError(f"num_batches_tracked must be an int >= 0 or None, got {n!r}")
    try:
        c = operator.index(n)
    except TypeError:
        raise TypeError(f"num_batches_tracked must be an int >= 0 or None, got "
                        f"{type(n).__name__} {n!r}") from None
    if not 0 <= c <= _NBT_MAX:
        raise ValueError(f"num_batches_tracked must be an int >= 0 or None, got {c}")
    return c


def _layer_dtype(dtype):
    """The layer's float dtype: None is the default (float32, as torch's None), a torch
    dtype is taken by name; else a TypeError naming `dtype`."""
    if dtype is None:
        return np.dtype(np.float32)
    if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        dtype = str(dtype).replace("torch.", "")
    try:
        d = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a NumPy float dtype, got {dtype!r}") from None
    if d.kind != "f":
        raise TypeError(f"dtype must be a float dtype, got {d}")
    return d


def _input_for_backward(x, out):
    """x, or a copy of it when `out` may overwrite it (in place): backward needs it."""
    if out is not None and np.may_share_memory(out, x):
        return x.copy(order="K")    # (C order had made dy and dx of an F-ordered x copies)
    return x


def _real(v, name):
    """v as a float; a TypeError naming the argument otherwise (no strings)."""
    if isinstance(v, (str, bytes)) or v is None:
        raise TypeError(f"{name} must be a real number, got {v!r}")
    try:
        return float(v)
    except OverflowError:       # an int beyond a double's range: the callers refuse it
        try:
            return math.inf if v > 0 else -math.inf
        except TypeError:
            raise TypeError(f"{name} must be a real number, got {v!r}") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {v!r}") from None


def _to_numpy(v):
    _check_not_masked(v, "a state_dict value")
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor
        v = _tensor_to_numpy(v)
    return np.asarray(v)


class BatchNorm:
    """Batch normalization layer with ``torch.nn.BatchNorm*d`` semantics.

    Parameters
    ----------
    num_features : int
        Number of channels C (>= 1).
    eps : float, default 1e-5
        Added to the variance; > 0.
    momentum : float or None, default 0.1
        Weight of the batch statistics in the running update
        ``new = (1 - momentum) * old + momentum * batch``; None gives the cumulative
        average (factor ``1 / num_batches_tracked``).
    affine : bool, default True
        Learnable ``weight`` (ones) and ``bias`` (zeros); None otherwise.
    track_running_stats : bool, default True
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and
        ``num_batches_tracked``; without them batch statistics are always used.
        Setting the attribute to False later keeps the arrays, as in torch: training
        then uses batch statistics and leaves them unchanged, eval still uses them.
    axis : int, keyword-only, default 1
        Channel axis of the inputs (-1 for channels-last and (samples, features)).
    dtype : numpy float dtype, keyword-only, default float32
        dtype of the parameters and running statistics.
    unbiased_running_var : bool, keyword-only, default True
        True (PyTorch): the running variance is updated with the unbiased batch
        variance ``n/(n-1) * var``. False (Keras): with the biased one.

    Attributes
    ----------
    weight, bias, running_mean, running_var : ndarray of shape (C,) or None
    num_batches_tracked : int or None
        Training calls counted (None without running statistics, as torch's).
    training : bool
        True at construction, like torch; see :meth:`train` and :meth:`eval`.
    grad_weight, grad_bias : ndarray or None
        Set by :meth:`backward`, in the layer's dtype (rounded once from the sums,
        whatever x's dtype).

    Notes
    -----
    A layer holds the last forward's input for :meth:`backward` and, in training, updates
    its running statistics: calls on one layer are serialized by a lock, so sharing one
    training layer between threads is safe but gives an order-dependent result. For
    concurrent inference, share a :meth:`freeze`-d layer, which is immutable.

    The input is held without a copy: in training, :meth:`backward` raises a
    RuntimeError when a channel's mean of x moved since the forward (x changed in place;
    README "Bad and awkward input"). It uses the forward's weight, axis, eps and running
    arrays, also where the attributes were reassigned in between; after
    :meth:`reset_parameters` or :meth:`reset_running_stats` wrote into arrays it needs
    (the weight; an eval forward's running statistics) it raises a RuntimeError.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm(3, axis=-1, dtype=np.float64)
    >>> y = bn(np.arange(12.0).reshape(4, 3))
    >>> bn.running_mean
    array([0.45, 0.55, 0.65])
    >>> dx = bn.backward(np.ones((4, 3)))
    >>> bn.grad_bias
    array([4., 4., 4.])
    """

    _input_ndims: "tuple[int, ...] | None" = None  # subclasses restrict the input rank like torch
    _kind = "BatchNorm"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32,
                 unbiased_running_var=True):
        c = _check_num_features(num_features)
        dtype = _layer_dtype(dtype)
        # flags are bools (a string "False" was read as true)
        affine = _check_flag(affine, "affine")
        track_running_stats = _check_flag(track_running_stats, "track_running_stats")
        unbiased_running_var = _check_flag(unbiased_running_var, "unbiased_running_var")
        e = _real(eps, "eps")
        if not 0 < e < math.inf:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= _real(momentum, "momentum") <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int, got {axis!r}")
        self.num_features = c
        self.eps = e
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = dtype
        self.unbiased_running_var = bool(unbiased_running_var)
        self.weight = np.ones(c, dtype) if self.affine else None
        self.bias = np.zeros(c, dtype) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, dtype)
            self.running_var = np.ones(c, dtype)
        else:
            self.running_mean = None
            self.running_var = None
        # torch's: None without running statistics
        self.num_batches_tracked = 0 if self.track_running_stats else None
        self.training = True
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None
        self._lock = threading.Lock()

    # -- modes ----------------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (batch statistics, running updates); returns self.

        Parameters
        ----------
        mode : bool, default True
            True: training mode; False: inference mode (same as :meth:`eval`).

        Examples
        --------
        >>> import bnfast
        >>> bn = bnfast.BatchNorm(3).train(False)
        >>> bn.training, bn.train().training
        (False, True)
        """
        if not isinstance(mode, (bool, np.bool_)):   # torch's check and error
            raise ValueError(f"training mode is expected to be boolean, got "
                             f"{type(mode).__name__} {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Set inference mode (running statistics); returns self.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> bn = bnfast.BatchNorm(2, axis=-1).eval()
        >>> bn.training
        False
        >>> bn(np.array([[1.0, 2.0]]))    # running mean 0, variance 1: x / sqrt(1 + eps)
        array([[0.999995, 1.99999 ]])
        """
        return self.train(False)

    def reset_running_stats(self):
        """Running mean 0, running variance 1 and ``num_batches_tracked`` 0, written in
        place (as torch's); nothing without running statistics. Returns None.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> bn = bnfast.BatchNorm(2, axis=-1, dtype=np.float64)
        >>> _ = bn(np.array([[1.0, 2.0], [3.0, 6.0]]))
        >>> bn.reset_running_stats()
        >>> bn.running_mean, bn.running_var, bn.num_batches_tracked
        (array([0., 0.]), array([1., 1.]), 0)
        """
        with self._lock:
            self._reset_stats("reset_running_stats")

    def _reset_stats(self, what):
        # (the caller holds the lock)
        if self.track_running_stats and self.running_mean is not None:
            s = self._saved
            if s is not None and not s[3] and s[1] is self.running_mean:
                self._drop_saved(what)          # an eval forward's statistics
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def _drop_saved(self, what):
        """The last forward's arrays were just changed in place: its backward would be
        computed from the new values (torch raises there, its in-place check)."""
        self._saved = None
        self._no_backward = (f"{what}() changed, after the last forward, arrays its "
                             f"backward needs; call the forward again")

    def reset_parameters(self):
        """:meth:`reset_running_stats`, and ``weight`` 1 and ``bias`` 0 (affine), in
        place, as torch's. Returns None.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> bn = bnfast.BatchNorm(2, dtype=np.float64)
        >>> bn.weight[:] = 3.0
        >>> bn.reset_parameters()
        >>> bn.weight, bn.num_batches_tracked
        (array([1., 1.]), 0)
        """
        with self._lock:             # one step: no forward sees half of it
            self._reset_stats("reset_parameters")
            if self.affine:
                if self._saved is not None and self._saved[4] is self.weight:
                    self._drop_saved("reset_parameters")
                self.weight[...] = 1
                self.bias[...] = 0

    # -- forward / backward -----------------------------------------------------------
    def _check_input(self, x):
        x = _as_array(x, "x")
        if self._input_ndims is not None and x.ndim not in self._input_ndims:
            want = " or ".join(f"{d}D" for d in self._input_ndims)
            raise ValueError(f"expected {want} input (got {x.ndim}D input)")
        if x.ndim < 2:
            raise ValueError(f"x must have at least 2 dimensions, got shape {x.shape}")
        ax = self.axis + x.ndim if self.axis < 0 else self.axis
        if not 0 <= ax < x.ndim:
            raise ValueError(f"axis {self.axis} is out of range for a {x.ndim}-D input")
        if x.shape[ax] != self.num_features:
            raise ValueError(f"{self._kind}({self.num_features}) got an input with "
                             f"{x.shape[ax]} channels on axis {self.axis} (shape {x.shape})")
        return x

    def __call__(self, x, *, out=None):
        """Normalize x (batch statistics in training or without running stats).

        In training mode (with ``track_running_stats``) the running statistics are
        updated; the input is kept for :meth:`backward`.

        Parameters
        ----------
        x : array_like
            Input with ``num_features`` channels on axis ``axis`` (at least 2-D).
        out : ndarray, keyword-only, optional
            Array of x's shape and result dtype to write the result into (may be x
            itself).

        Returns
        -------
        ndarray
            The normalized input, in x's dtype (float64 for integer inputs).

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> bn = bnfast.BatchNorm(2, axis=-1, dtype=np.float64)
        >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
        >>> np.round(bn(x), 4)                       # batch statistics
        array([[-1., -1.],
               [ 1.,  1.]])
        >>> bn.running_mean, bn.num_batches_tracked
        (array([0.2, 2. ]), 1)
        """
        x = self._check_input(x)
        with self._lock:
            # torch: eval uses the running statistics whenever the layer has them, also
            # when track_running_stats was turned off after construction
            # `training` read once: train()/eval() take no lock, and a flag flipped by
            # another thread between two reads gave a batch-statistics forward that did
            # not update the running statistics
            training = self.training
            use_batch = training or (self.running_mean is None
                                     and self.running_var is None)
            saved_x = _input_for_backward(x, out)
            if not use_batch:
                y = batch_norm(x, self.running_mean, self.running_var, self.weight,
                               self.bias, False, 0.1, self.eps, axis=self.axis, out=out)
                # the running statistics this forward used: invstd computed by backward
                mean, invstd = self.running_mean, (self.running_var, self.eps)
            elif not training and x.size == 0:
                # an empty batch in eval without running statistics: nothing to normalize,
                # returned empty (as torch's); the statistics of a batch of nothing are
                # not needed (backward: an empty dx, zero parameter gradients). Training
                # refuses it: it would update the running statistics from nothing
                c = self.num_features
                mean, invstd = np.zeros(c), (np.ones(c), self.eps)
                use_batch = False
                y = batch_norm(x, mean, invstd[0], self.weight, self.bias, False, 0.1,
                               self.eps, axis=self.axis, out=out)
            else:
                y, mean, invstd = self._batch_forward(x, out, training)
            self._saved = (saved_x, mean, invstd, use_batch, self.weight, self.axis)
            return y

    def _batch_forward(self, x, out, training, moments_hook=None):
        """Normalize with batch statistics, updating the running ones when `training`
        (the layer's flag, read once by the caller) and tracked (num_batches_tracked is
        restored if the call fails); (y, mean, invstd). moments_hook: see
        bnfast._core._train (statistics of a batch over processes)."""
        update = training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        counted = self.num_batches_tracked
        if update and counted is not None:
            counted = _count(counted)
            # an int64, as torch's (and state_dict's); it stops at the largest, where
            # torch's wraps around to negative counts
            self.num_batches_tracked = counted + 1 if counted < _NBT_MAX else counted
            if self.momentum is None:
                factor = 1.0 / self.num_batches_tracked
        try:
            return _train(x, self.weight, self.bias, self.eps, self.axis,
                          self.running_mean if update else None,
                          self.running_var if update else None,
                          factor, out, self.unbiased_running_var, moments_hook)
        except BaseException:
            if update:
                self.num_batches_tracked = counted
            raise

    def backward(self, dy, *, out=None):
        """Gradient with respect to the last forward's input; sets ``grad_weight`` and
        ``grad_bias`` (None without affine). Returns dx.

        Parameters
        ----------
        dy : array_like
            Gradient of the loss with respect to the last forward's output (same shape
            as its input).
        out : ndarray, keyword-only, optional
            Array of the input's shape and result dtype to write dx into.

        Returns
        -------
        ndarray
            dx, the gradient with respect to the last forward's input.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> bn = bnfast.BatchNorm(2, axis=-1, dtype=np.float64)
        >>> y = bn(np.array([[1.0, 10.0], [3.0, 30.0]]))
        >>> dx = bn.backward(np.ones((2, 2)))        # a constant dy: no gradient to x
        >>> bool(np.abs(dx).max() < 1e-12), bn.grad_bias
        (True, array([2., 2.]))
        """
        with self._lock:
            return self._local_backward(dy, out)

    def _local_backward(self, dy, out):
        """backward's body; the caller holds the lock (SyncBatchNorm chooses its path
        under it)."""
        if self._saved is None:
            if self.__dict__.get("_no_backward"):
                raise RuntimeError(self._no_backward)
            raise ValueError("backward called before any forward call")
        # the forward's weight, axis and statistics (eval: its running arrays and eps),
        # not the layer's now: reassigned in between, as torch's autograd keeps them
        x, mean, invstd, use_batch, weight, axis = self._saved
        if not use_batch:
            invstd = _eval_invstd(*invstd)
        dy_arr = _as_array(dy, "dy")
        if dy_arr.shape != x.shape:
            raise ValueError(f"dy must have the shape of the last input {x.shape}, "
                             f"got {dy_arr.shape}")
        # the parameter gradients rounded once to the layer's dtype from the sums
        dx, dw, db = _backward(dy_arr, x, mean, invstd, weight, use_batch, axis, out, None,
                               use_batch, self.dtype)
        if self.affine:
            self.grad_weight = dw
            self.grad_bias = db
        return dx

    # -- state ------------------------------------------------------------------------
    def state_dict(self):
        """Parameters and buffers under PyTorch's key names (numpy arrays).

        The arrays are the layer's own (not copies); :meth:`load_state_dict` writes
        into them. ``num_batches_tracked`` is a 0-d array of the count (a Python int on
        the layer): writing into it does not change the layer. Without ``affine`` there
        is no ``weight``/``bias``; without running statistics
        (``track_running_stats=False`` at construction) no
        ``running_mean``/``running_var``/``num_batches_tracked``.

        Examples
        --------
        >>> import bnfast
        >>> sorted(bnfast.BatchNorm(3).state_dict())
        ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
        """
        d = {k: getattr(self, k) for k in self._state_keys() if k != "num_batches_tracked"}
        if "running_mean" in d:
            # 0 for a count set to None by hand (save, load and from_batchnorm need it)
            nbt = self.num_batches_tracked
            d["num_batches_tracked"] = np.array(0 if nbt is None else _count(nbt),
                                                dtype=np.int64)
        return d

    def _state_keys(self):
        """The keys of :meth:`state_dict`, in its order (load_state_dict lists them without
        checking a count set by hand)."""
        keys = ["weight", "bias"] if self.affine else []
        if self.running_mean is not None:  # torch: the buffers, whatever the flag
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def load_state_dict(self, state_dict, strict=True):
        """Load a mapping with PyTorch's key names (numpy arrays, torch tensors, lists).

        Values are copied into the layer's own arrays, in their dtype (like torch's
        ``copy_``): references to them, such as an optimizer's parameter list or an
        earlier :meth:`state_dict`, see the loaded values. Torch tensors of any dtype
        (bfloat16 included) and device are accepted. Raises ValueError or TypeError
        naming the key on a missing key, a wrong shape, a value that is not numeric or
        cannot be converted, or (strict) an unexpected key; every entry is checked
        before any is written, so nothing is changed then. Returns self.

        Parameters
        ----------
        state_dict : mapping
            Keys as :meth:`state_dict` (``weight``, ``bias``, ``running_mean``,
            ``running_var``, ``num_batches_tracked``), e.g. a
            ``torch.nn.BatchNorm*d``'s ``state_dict()``.
        strict : bool, default True
            True: every key of :meth:`state_dict` must be present and no other.
            False: unexpected keys are ignored, and so are missing ones (those
            attributes keep their values).

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> bn = bnfast.BatchNorm(2, dtype=np.float64)
        >>> rm = bn.running_mean
        >>> _ = bn.load_state_dict({"running_mean": [1.0, 2.0], "running_var": [4.0, 9.0]},
        ...                        strict=False)
        >>> bn.running_mean, bn.running_var, bn.weight
        (array([1., 2.]), array([4., 9.]), array([1., 1.]))
        >>> bn.running_mean is rm                    # written in place
        True
        """
        strict = _check_flag(strict, "strict")
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a mapping of names to arrays (as "
                            f"state_dict() returns), got {type(state_dict).__name__}")
        # under the lock: a concurrent forward must not read half-written statistics
        with self._lock:
            # the keys alone: state_dict() checks a count set by hand, which this may repair
            expected = self._state_keys()
            if strict:
                unexpected = [k for k in state_dict if k not in expected]
                if unexpected:
                    raise ValueError(f"unexpected key(s) in state_dict: {unexpected}")
            # check every entry before writing any: a refused load changes nothing
            new = {}
            for k in expected:
                if k not in state_dict:
                    if strict:
                        raise ValueError(f"missing key in state_dict: {k!r} "
                                         f"(got {list(state_dict)})")
                    continue
                try:
                    v = _to_numpy(state_dict[k])
                except Exception as e:
                    raise TypeError(f"state_dict[{k!r}] must be a numeric array (numpy "
                                    f"array, torch tensor or list); could not convert "
                                    f"{type(state_dict[k]).__name__}: {e}") from e
                if v.dtype.kind not in "fiub":
                    raise TypeError(f"state_dict[{k!r}] must be numeric, got {v.dtype}")
                if k == "num_batches_tracked":
                    if v.size != 1:
                        raise ValueError(f"state_dict['num_batches_tracked'] must be a "
                                         f"scalar, got shape {v.shape}")
                    n = v.reshape(()).item()  # a Python int, float or bool
                    if not (0 <= n <= _NBT_MAX and n == round(n)):
                        raise ValueError(f"state_dict['num_batches_tracked'] must be a "
                                         f"whole number >= 0, got {n!r}")
                    new[k] = int(n)
                    continue
                if v.shape != (self.num_features,):
                    raise ValueError(f"state_dict[{k!r}] must have shape "
                                     f"({self.num_features},), got {v.shape}")
                if k == "running_var" and np.any(v < 0):
                    raise ValueError("state_dict['running_var'] must be non-negative")
                dest = getattr(self, k)  # the array the value is copied into
                if not isinstance(dest, np.ndarray):
                    dest = None          # None, a list or a tensor set by hand: replaced
                if dest is not None and dest.shape != v.shape:
                    raise ValueError(f"cannot load state_dict[{k!r}]: the layer's {k} has "
                                     f"shape {dest.shape}, expected {v.shape}")
                if dest is not None and not dest.flags.writeable:
                    raise ValueError(f"cannot load state_dict[{k!r}]: the layer's {k} is "
                                     "read-only")
                new[k] = v.copy()  # v may be another of the layer's arrays (a swap)
            for k, v in new.items():
                if k == "num_batches_tracked":
                    self.num_batches_tracked = v
                    continue
                dest = getattr(self, k)
                if not isinstance(dest, np.ndarray):  # nothing to write into (by hand)
                    setattr(self, k, np.array(v, dtype=self.dtype))
                else:
                    np.copyto(dest, v, casting="unsafe")
        return self

    def save(self, path):
        """Save configuration and state to a ``.npz`` file; read it back with
        :func:`bnfast.load` (no pickle). Returns the path written (``".npz"`` is
        appended when missing). See :func:`bnfast.interop.save_layer`.

        Parameters
        ----------
        path : str or os.PathLike
            File to write.

        Examples
        --------
        >>> import bnfast, tempfile, os
        >>> path = bnfast.BatchNorm(3).save(os.path.join(tempfile.mkdtemp(), "bn"))
        >>> path.endswith("bn.npz"), bnfast.load(path).num_features
        (True, 3)
        """
        from bnfast.interop import save_layer

        return save_layer(self, path)

    def freeze(self):
        """The immutable inference form (running statistics, current weight and bias).

        Returns
        -------
        FrozenBatchNorm
            Its ``mean``/``var`` are copies of ``running_mean``/``running_var``; later
            changes to the layer do not affect it.

        Raises
        ------
        ValueError
            The layer has no running statistics (``track_running_stats=False`` at
            construction; a layer whose flag was turned off later keeps them and
            freezes them, as its eval mode uses them).

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> bn = bnfast.BatchNorm(2, axis=-1, dtype=np.float64)
        >>> _ = bn(np.array([[1.0, 10.0], [3.0, 30.0]]))   # updates the running stats
        >>> frozen = bn.freeze()
        >>> frozen.mean, frozen.var
        (array([0.2, 2. ]), array([ 1.1, 20.9]))
        """
        if self.running_mean is None or self.running_var is None:
            raise ValueError("freeze() needs running statistics (the layer was built with "
                             "track_running_stats=False)")
        # under the lock (FrozenBatchNorm copies the arrays): not half of a concurrent
        # load_state_dict or training step
        with self._lock:
            return FrozenBatchNorm(self.running_mean, self.running_var, self.weight,
                                   self.bias, self.eps, axis=self.axis)

    def __getstate__(self):
        # the layer's own arrays (not copies), so that a pickle keeps them shared with
        # what else it holds (an optimizer's list); collected under the lock, but pickle
        # writes them after it: take a consistent copy with freeze(), save() or deepcopy
        with self._lock:
            d = self.__dict__.copy()
        del d["_lock"]
        return d

    def __deepcopy__(self, memo):
        # all of it under the lock (a consistent state), through memo (arrays shared with
        # other copied objects stay shared)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        with self._lock:
            d = {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_lock"}
        new.__setstate__(d)
        return new

    def __setstate__(self, d):
        saved = d.get("_saved")
        if saved is not None and len(saved) == 4:   # a pickle from before the forward's
            x, mean, invstd, mode = saved            # weight and axis were kept
            if mean is None:
                mean, invstd = d["running_mean"], (d["running_var"], d["eps"])
            d = dict(d, _saved=(x, mean, invstd, mode, d["weight"], d["axis"]))
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __repr__(self):
        return (f"{self._kind}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype.name})")


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for (N, C) or (N, C, L) inputs (channel axis 1).

    Other input ranks raise ValueError, like ``torch.nn.BatchNorm1d``.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, axis, dtype,
    unbiased_running_var
        As :class:`BatchNorm`.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm1d(2, dtype=np.float64)
    >>> np.round(bn(np.array([[1.0, 10.0], [3.0, 30.0]])), 4)    # (N, C)
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> bn(np.zeros((2, 2, 3, 3)))
    Traceback (most recent call last):
    ...
    ValueError: expected 2D or 3D input (got 4D input)
    """
    _input_ndims = (2, 3)
    _kind = "BatchNorm1d"


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for (N, C, H, W) inputs (channel axis 1).

    Other input ranks raise ValueError, like ``torch.nn.BatchNorm2d``.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, axis, dtype,
    unbiased_running_var
        As :class:`BatchNorm`.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm2d(3)
    >>> x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    >>> y = bn(x)
    >>> y.shape, y.dtype, np.round(y.mean(axis=(0, 2, 3)), 5) + 0
    ((2, 3, 2, 2), dtype('float32'), array([0., 0., 0.], dtype=float32))
    """
    _input_ndims = (4,)
    _kind = "BatchNorm2d"


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` for (N, C, D, H, W) inputs (channel axis 1).

    Other input ranks raise ValueError, like ``torch.nn.BatchNorm3d``.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, axis, dtype,
    unbiased_running_var
        As :class:`BatchNorm`.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm3d(2).eval()
    >>> bn(np.ones((1, 2, 2, 2, 2), np.float32)).shape
    (1, 2, 2, 2, 2)
    """
    _input_ndims = (5,)
    _kind = "BatchNorm3d"

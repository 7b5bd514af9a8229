"""Bring batch-normalization layers in from PyTorch, ONNX and Keras; save and load
layers as ``.npz``; fold an inference-mode batch norm into the preceding Linear or
Conv weights.

None of the peer libraries is imported at module import: each converter imports
what it needs (``torch``, ``onnx``) inside the function, and :func:`from_keras`
needs no import at all (it reads the layer's attributes).

Conventions (see the README's conventions table):

* PyTorch ``momentum`` is bnfast's ``momentum`` (weight of the *new* batch);
  Keras and ONNX ``momentum`` is the weight of the *old* value, so
  bnfast's momentum is ``1 - m``.
* PyTorch updates the running variance with the unbiased batch variance
  (bnfast's default); Keras with the biased one (``unbiased_running_var=False``).
* ONNX puts the channel on axis 1 (NC, NCHW, ...).
"""
import math
import os
import sys
import zipfile
import zlib

import numpy as np

from bnfast._core import FrozenBatchNorm, _check_flag, _check_not_masked, _tensor_to_numpy
from bnfast._layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "fold_conv",
    "fold_linear",
    "from_keras",
    "from_onnx",
    "from_torch",
    "load",
    "save_layer",
]

_LAYER_CLASSES = {cls.__name__: cls for cls in (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d)}
# 2: a layer whose track_running_stats was turned off after construction, saved with its
# running statistics (a reader of version 1 would build it without them); every other
# layer is still written as version 1, which older bnfast reads.
_FORMAT_VERSION = 2


def _tensor_to_float64(t):
    """A torch tensor (any device, any float dtype, bfloat16 included) as float64 numpy."""
    return np.array(_tensor_to_numpy(t), dtype=np.float64)


def _layer_dtype(dt):
    """float64 stays float64; every other dtype maps to float32."""
    return np.dtype(np.float64) if np.dtype(dt) == np.float64 else np.dtype(np.float32)


# ---------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------
def from_torch(module):
    """Convert a ``torch.nn.BatchNorm1d/2d/3d`` or ``torch.nn.SyncBatchNorm`` to bnfast.

    Everything that defines the layer's behaviour is copied: ``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``, ``eps``, ``momentum``
    (``None``, the cumulative average, too), ``affine``, ``track_running_stats`` and the
    train/eval state. The result has PyTorch's semantics (unbiased running variance,
    channel axis 1), so it continues training exactly where the torch module stopped.
    A module whose ``track_running_stats`` was set to False after construction keeps
    its running statistics, and so does the result: like torch, it uses them in eval
    and uses (and does not update) batch statistics in training.

    Parameters
    ----------
    module : torch.nn.BatchNorm1d, BatchNorm2d, BatchNorm3d or SyncBatchNorm
        On any device. A lazy module must have been materialized by a forward call.

    Returns
    -------
    BatchNorm
        :class:`bnfast.BatchNorm1d`, ``BatchNorm2d`` or ``BatchNorm3d`` for the
        corresponding torch class (same input-rank rules), :class:`bnfast.BatchNorm`
        (any rank >= 2, axis 1) for ``SyncBatchNorm``. Its ``dtype`` is float64 when the
        module's tensors are float64 and float32 otherwise (float16 and bfloat16
        included). The arrays are copies: the torch module is not shared.

    Raises
    ------
    TypeError
        ``module`` is not one of the classes above (torch is then not even imported
        when the object does not come from torch).
    ValueError
        A lazy module whose parameters are still uninitialized.

    Examples
    --------
    >>> import torch, numpy as np, bnfast
    >>> tbn = torch.nn.BatchNorm1d(4, momentum=None).eval()
    >>> bn = bnfast.from_torch(tbn)
    >>> type(bn).__name__, bn.momentum, bn.training, bn.dtype
    ('BatchNorm1d', None, False, dtype('float32'))
    >>> x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    >>> np.allclose(bn(x), tbn(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    True
    """
    if "torch" not in sys.modules:  # then it cannot be a torch module: don't import torch
        raise TypeError("from_torch expects a torch.nn.BatchNorm1d/2d/3d or "
                        f"torch.nn.SyncBatchNorm module, got {type(module).__name__}")
    import torch

    nn = torch.nn
    if isinstance(module, nn.SyncBatchNorm):
        cls = BatchNorm
    elif isinstance(module, nn.BatchNorm3d):
        cls = BatchNorm3d
    elif isinstance(module, nn.BatchNorm2d):
        cls = BatchNorm2d
    elif isinstance(module, nn.BatchNorm1d):
        cls = BatchNorm1d
    else:
        from torch.nn.modules.lazy import LazyModuleMixin

        if isinstance(module, LazyModuleMixin) and isinstance(
                module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"{type(module).__name__} has uninitialized parameters: run one "
                             "forward call on it before converting")
        raise TypeError("from_torch expects a torch.nn.BatchNorm1d/2d/3d or "
                        f"torch.nn.SyncBatchNorm module, got {type(module).__name__}")

    tensors = [t for t in (module.weight, module.bias, module.running_mean, module.running_var)
               if t is not None]
    dtype = np.float64 if tensors and tensors[0].dtype == torch.float64 else np.float32
    momentum = None if module.momentum is None else float(module.momentum)
    has_stats = module.running_mean is not None and module.running_var is not None
    if module.track_running_stats and not has_stats:
        raise ValueError("the torch module tracks running statistics but has none")
    if module.affine and (module.weight is None or module.bias is None):
        raise ValueError("the torch module is affine but its weight or bias is None")
    layer = cls(int(module.num_features), eps=float(module.eps), momentum=momentum,
                affine=bool(module.affine), track_running_stats=has_stats,
                axis=1, dtype=dtype)
    state = {}
    if module.affine:
        state["weight"] = _tensor_to_float64(module.weight)
        state["bias"] = _tensor_to_float64(module.bias)
    if has_stats:
        state["running_mean"] = _tensor_to_float64(module.running_mean)
        state["running_var"] = _tensor_to_float64(module.running_var)
        nbt = module.num_batches_tracked
        state["num_batches_tracked"] = 0 if nbt is None else int(nbt.item())
    layer.load_state_dict(state, strict=True)
    # track_running_stats turned off after construction: the statistics stay (eval uses
    # them), training neither uses nor updates them, in torch and in the layer
    layer.track_running_stats = bool(module.track_running_stats)
    return layer.train(bool(module.training))


# ---------------------------------------------------------------------------------------
# .npz save / load
# ---------------------------------------------------------------------------------------
def save_layer(layer, path):
    """Save a :class:`bnfast.BatchNorm` (configuration and state) to a ``.npz`` file.

    The file holds only numeric and string arrays, so :func:`load` reads it with
    ``allow_pickle=False``: loading a file from an untrusted source cannot run code.
    :meth:`BatchNorm.save` calls this function.

    Parameters
    ----------
    layer : BatchNorm
        Any :class:`bnfast.BatchNorm` (``BatchNorm1d/2d/3d`` included; an instance of
        another subclass is saved as its nearest bnfast base class).
    path : str, os.PathLike or writable binary file
        Where to write. As with :func:`numpy.savez`, ``".npz"`` is appended to a path
        that does not end with it.

    Returns
    -------
    str or file
        The path actually written (or the file object given).

    Stored keys
    -----------
    ``config.class``, ``config.num_features``, ``config.eps``, ``config.momentum``
    (NaN for None), ``config.affine``, ``config.track_running_stats``, ``config.axis``,
    ``config.dtype``, ``config.unbiased_running_var``, ``config.training``,
    ``format_version``, and ``state.<key>`` for every key of :meth:`BatchNorm.state_dict`.

    Raises
    ------
    TypeError
        ``layer`` is not a :class:`bnfast.BatchNorm`.

    Examples
    --------
    >>> import numpy as np, bnfast, tempfile, os
    >>> bn = bnfast.BatchNorm(3, momentum=None, axis=-1).eval()
    >>> path = os.path.join(tempfile.mkdtemp(), "bn.npz")
    >>> bnfast.interop.save_layer(bn, path) == path
    True
    >>> bn2 = bnfast.load(path)
    >>> bn2.momentum, bn2.axis, bn2.training
    (None, -1, False)
    """
    if not isinstance(layer, BatchNorm):
        raise TypeError(f"save_layer expects a bnfast.BatchNorm, got {type(layer).__name__}")
    cls_name = next(c.__name__ for c in type(layer).__mro__ if c.__name__ in _LAYER_CLASSES
                    and _LAYER_CLASSES[c.__name__] is c)
    with layer._lock:    # one state: not half of a concurrent load or training step
        arrays = _layer_arrays(layer, cls_name)
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path = path + ".npz"
    np.savez(path, **arrays)
    return path


def _layer_arrays(layer, cls_name):
    """save_layer's arrays: copies of the layer's configuration and state."""
    arrays = {
        "format_version": np.array(
            2 if not layer.track_running_stats and layer.running_mean is not None else 1,
            np.int64),
        "config.class": np.array(cls_name),
        "config.num_features": np.array(layer.num_features, np.int64),
        "config.eps": np.array(layer.eps, np.float64),
        "config.momentum": np.array(np.nan if layer.momentum is None else layer.momentum,
                                    np.float64),
        "config.affine": np.array(layer.affine, np.bool_),
        "config.track_running_stats": np.array(layer.track_running_stats, np.bool_),
        "config.axis": np.array(layer.axis, np.int64),
        "config.dtype": np.array(np.dtype(layer.dtype).name),
        "config.unbiased_running_var": np.array(layer.unbiased_running_var, np.bool_),
        "config.training": np.array(layer.training, np.bool_),
    }
    for k, v in layer.state_dict().items():
        arrays["state." + k] = np.array(v, copy=True)
    return arrays


def load(path):
    """Load a layer written by :meth:`BatchNorm.save` / :func:`save_layer`.

    Reads with ``np.load(path, allow_pickle=False)``: no pickle, no code execution.

    Parameters
    ----------
    path : str, os.PathLike or readable binary file
        A ``.npz`` file written by :func:`save_layer`.

    Returns
    -------
    BatchNorm
        Same class, configuration, parameters, running statistics,
        ``num_batches_tracked`` and train/eval state as the saved layer.

    Raises
    ------
    ValueError
        The file is not a bnfast layer file (missing keys, unknown class or format
        version, arrays of the wrong shape) or needs pickle.

    Examples
    --------
    >>> import numpy as np, bnfast, tempfile, os
    >>> bn = bnfast.BatchNorm2d(2)
    >>> _ = bn(np.arange(16.0, dtype=np.float32).reshape(2, 2, 2, 2))
    >>> path = bn.save(os.path.join(tempfile.mkdtemp(), "bn.npz"))
    >>> bn2 = bnfast.load(path)
    >>> bn2.num_batches_tracked, bn2.training, np.array_equal(bn2.running_mean, bn.running_mean)
    (1, True, True)
    """
    # what a truncated, empty or corrupted file raises (an interrupted save): the zip
    # reader's BadZipFile (also a bad CRC), EOFError, zlib.error; object arrays need
    # pickle (ValueError)
    # (NotImplementedError: an unknown compression method; RuntimeError: "encrypted")
    unreadable = (ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                  RuntimeError)
    try:
        f = np.load(path, allow_pickle=False)
    except unreadable as e:
        raise ValueError(f"{path!r} is not a bnfast layer file: {e}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):    # a .npy file: one array
        raise ValueError(f"{path!r} is not a bnfast layer file: it holds one array, not "
                         "an .npz archive of a layer's configuration and state")
    try:
        with f:
            data = {k: f[k] for k in f.files}
    except unreadable as e:
        raise ValueError(f"{path!r} is not a bnfast layer file: {e}") from None
    required = ["format_version", "config.class", "config.num_features", "config.eps",
                "config.momentum", "config.affine", "config.track_running_stats",
                "config.axis", "config.dtype", "config.unbiased_running_var",
                "config.training"]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path!r} is not a bnfast layer file: missing {missing}")
    def whole(key):
        # an edited file's 1.5 must not silently become 1
        v = data[key]
        if v.shape != () or v.dtype.kind not in "iuf" or not np.isfinite(v) or v != int(v):
            raise ValueError(f"{path!r} is not a bnfast layer file: {key} must be a whole "
                             f"number, got {v!r}")
        return int(v)

    def real(key):
        v = data[key]
        if v.shape != () or v.dtype.kind not in "iuf":
            raise ValueError(f"{path!r} is not a bnfast layer file: {key} must be a "
                             f"number, got {v!r}")
        return float(v)

    def flag(key):
        v = data[key]
        if v.shape != () or v.dtype.kind not in "biu" or v not in (0, 1):
            raise ValueError(f"{path!r} is not a bnfast layer file: {key} must be a "
                             f"bool, got {v!r}")
        return bool(v)

    version = whole("format_version")
    if version not in (1, 2):
        raise ValueError(f"unsupported bnfast layer file format version {version} "
                         f"(this bnfast reads versions 1 to {_FORMAT_VERSION})")
    cls_name = str(data["config.class"])
    if cls_name not in _LAYER_CLASSES:
        raise ValueError(f"unknown layer class {cls_name!r} in {path!r}")
    mom = real("config.momentum")
    try:
        dtype = np.dtype(str(data["config.dtype"]))
    except TypeError:
        raise ValueError(f"{path!r} is not a bnfast layer file: config.dtype "
                         f"{str(data['config.dtype'])!r} is not a NumPy dtype") from None
    track = flag("config.track_running_stats")
    num_features = whole("config.num_features")
    state = {k[len("state."):]: v for k, v in data.items() if k.startswith("state.")}
    # the per-channel arrays checked against num_features before the layer allocates
    # them (an edited count of 2**40 would allocate first)
    affine = flag("config.affine")
    needed = (["weight", "bias"] if affine else []) + (
        ["running_mean", "running_var", "num_batches_tracked"] if track else [])
    missing = [f"state.{k}" for k in needed if k not in state]
    if missing:
        raise ValueError(f"{path!r} is not a bnfast layer file: missing {missing}")
    for k, v in state.items():
        if k != "num_batches_tracked" and v.shape != (num_features,):
            raise ValueError(f"{path!r} is not a bnfast layer file: state.{k} has shape "
                             f"{v.shape}, config.num_features is {num_features}")
    try:
        layer = _LAYER_CLASSES[cls_name](
            num_features,
            eps=real("config.eps"),
            momentum=None if math.isnan(mom) else mom,
            affine=affine,
            # a layer whose flag was turned off after construction kept its statistics
            track_running_stats=track or "state.running_mean" in data,
            axis=whole("config.axis"),
            dtype=dtype,
            unbiased_running_var=flag("config.unbiased_running_var"),
        )
    except (TypeError, ValueError) as e:   # e.g. config.dtype int64: not a float dtype
        raise ValueError(f"{path!r} is not a bnfast layer file: its config is refused: "
                         f"{e}") from None
    layer.load_state_dict(state, strict=True)
    layer.track_running_stats = track
    return layer.train(flag("config.training"))


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------
def _onnx_attrs(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _onnx_constant_value(node):
    """The value of a ``Constant`` node as a numpy array, or None if not numeric."""
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":     # the repeated field as a sequence: no list
            return np.array(a.floats, np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(a.ints, np.int64)
        if a.name == "sparse_value":
            return _onnx_sparse_to_array(a.sparse_tensor)
    return None


def _onnx_sparse_to_array(sparse):
    """A SparseTensorProto as a dense array (indices linear, or one row per value)."""
    from onnx import numpy_helper

    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices)
    dense = np.zeros(tuple(sparse.dims), values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _onnx_walk(graph, scope, found, opset, training_nodes):
    """Collect the BatchNormalization nodes of ``graph`` (and of its subgraphs)."""
    from onnx import AttributeProto, numpy_helper

    scope = dict(scope)  # name -> ("value", array) | ("input", None) | ("node", op)
    for inp in graph.input:
        scope[inp.name] = ("input", None)
    for init in graph.initializer:  # an initializer also listed as an input is a default
        scope[init.name] = ("value", init)
    for sparse in graph.sparse_initializer:
        scope[sparse.values.name] = ("value", _onnx_sparse_to_array(sparse))
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            val = _onnx_constant_value(node)
            for o in node.output:
                scope[o] = ("value", val) if val is not None else ("node", "Constant")
        elif node.op_type == "Identity" and node.domain in ("", "ai.onnx") and \
                len(node.input) == 1 and node.input[0] in scope:
            scope[node.output[0]] = scope[node.input[0]]
        else:
            for o in node.output:
                if o:
                    scope[o] = ("node", node.name or node.op_type)
        for a in node.attribute:  # If / Loop / Scan bodies see the outer scope
            if a.type == AttributeProto.GRAPH:
                _onnx_walk(a.g, scope, found, opset, training_nodes)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    _onnx_walk(g, scope, found, opset, training_nodes)
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        key = node.name or node.output[0]
        if key in found:
            key = node.output[0]
        if key in found:  # e.g. both branches of an If name their output alike: number them
            n = 1
            while f"{key}#{n}" in found:
                n += 1
            key = f"{key}#{n}"
        attrs = _onnx_attrs(node)
        if int(attrs.get("spatial", 1)) == 0:
            raise NotImplementedError(
                f"BatchNormalization node {key!r} has spatial=0 (per-element statistics, "
                "a legacy opset < 9 mode): not supported; bnfast normalizes per channel")
        if opset < 7:
            training = not int(attrs.get("is_test", 0))
            why = f"is_test={int(attrs.get('is_test', 0))} (opset {opset}: training mode)"
        elif opset < 14:
            n_out = sum(1 for o in node.output if o)
            training = n_out > 1
            why = f"{n_out} outputs (opset {opset}: the training-mode output case)"
        else:
            training = bool(int(attrs.get("training_mode", 0)))
            why = "training_mode=1"
        if training and training_nodes == "error":
            raise ValueError(
                f"BatchNormalization node {key!r} is in training mode ({why}): it normalizes "
                "with batch statistics, which a FrozenBatchNorm cannot reproduce. Pass "
                "training_nodes='running_stats' to freeze it with its input mean and var.")
        names = ("scale", "B", "mean", "var")
        if len(node.input) < 5:
            raise ValueError(f"BatchNormalization node {key!r} has {len(node.input)} inputs, "
                             "expected 5 (X, scale, B, mean, var)")
        params = []
        for pname, inp in zip(names, node.input[1:5]):
            kind, val = scope.get(inp, ("missing", None))
            if kind == "value":
                arr = numpy_helper.to_array(val) if not isinstance(val, np.ndarray) else val
                arr = np.asarray(arr)
                if arr.dtype.kind == "V" and arr.dtype.name.startswith(
                        ("bfloat16", "float8", "float4")):
                    # ml_dtypes' floats (BatchNormalization allows bfloat16 from opset
                    # 14): float32 holds each value exactly
                    arr = arr.astype(np.float32)
                if arr.dtype.kind not in "fiu":
                    raise ValueError(f"BatchNormalization node {key!r}: parameter {pname} "
                                     f"({inp!r}) has non-numeric dtype {arr.dtype}")
                params.append(arr.astype(np.float64))
            elif kind == "input":
                raise ValueError(
                    f"BatchNormalization node {key!r}: parameter {pname} ({inp!r}) is a "
                    "runtime graph input, not a constant; bake it into an initializer")
            elif kind == "node":
                raise ValueError(
                    f"BatchNormalization node {key!r}: parameter {pname} ({inp!r}) is "
                    f"computed at run time by node {val!r}; only initializers and "
                    "Constant nodes can be converted")
            else:
                raise ValueError(f"BatchNormalization node {key!r}: parameter {pname} "
                                 f"({inp!r}) is not defined in the graph")
        scale, bias, mean, var = params
        shapes = {p.shape for p in params}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"BatchNormalization node {key!r}: scale, B, mean and var must "
                             f"be 1-D of the same length, got shapes "
                             f"{[p.shape for p in params]}")
        # ONNX stores epsilon as float32: take the shortest decimal that rounds to it
        # (1e-5, not 9.99999974737875e-06), which is what the exporter was given.
        eps = float(str(np.float32(attrs.get("epsilon", 1e-5))))
        try:
            found[key] = FrozenBatchNorm(mean, var, scale, bias, eps, axis=1)
        except (TypeError, ValueError) as e:   # eps <= 0, a negative var: name the node
            raise type(e)(f"BatchNormalization node {key!r}: {e}") from None


def from_onnx(model_or_path, *, training_nodes="error"):
    """Extract every ``BatchNormalization`` node of an ONNX model as a FrozenBatchNorm.

    All opsets are read: the legacy attributes ``is_test``, ``spatial`` and
    ``consumed_inputs`` (opsets 1-8), opset 9, and opsets 14/15 (``training_mode``;
    separate element types for scale/B and mean/var). Parameters may be initializers
    (also when they are listed among the graph inputs, as IR version < 4 models do),
    sparse initializers, ``Constant`` nodes (``value``, ``value_float(s)``,
    ``value_int(s)``, ``sparse_value``) or
    ``Identity`` of those; nodes inside ``If``/``Loop``/``Scan`` bodies are included,
    and those inside model-local functions (``torch.onnx.export``'s
    ``export_modules_as_functions``) after inlining them (``onnx.inliner``; keyed by
    the inlined node's name).
    The channel axis is 1 (ONNX tensors are N x C x D1 x ...), so the frozen layers
    take inputs exactly as ONNX Runtime does.

    Parameters
    ----------
    model_or_path : onnx.ModelProto, str, os.PathLike, bytes or binary file
        The model or where to read it (``onnx.load``).
    training_nodes : {"error", "running_stats"}, keyword-only, default "error"
        What to do with a node in training mode (opset < 7: ``is_test=0``, the
        default there; opsets 7-13: more than one output; opset >= 14:
        ``training_mode=1``), which normalizes with *batch* statistics: raise, or
        freeze it with its ``mean``/``var`` inputs (what it computes in inference).

    Returns
    -------
    dict of str to FrozenBatchNorm
        One entry per node, in graph order (a subgraph's nodes at the place of its
        ``If``/``Loop``/``Scan`` node, subgraphs in attribute order), keyed by the
        node's name, or by its first output's name when the node is unnamed (or its
        name was already used). When that key is taken too (the branches of an ``If``
        may reuse an output name), ``#1``, ``#2``, ... is appended to it in that
        order: ``"yb"``, ``"yb#1"``.
        Parameters are float64; ``eps`` is the node's ``epsilon`` (default 1e-5), stored
        by ONNX as float32 and read back as the shortest decimal that rounds to it.

    Raises
    ------
    ImportError
        ``onnx`` is not installed (``pip install 'bnfast[onnx]'``).
    ValueError
        A parameter is a runtime graph input or computed by another node; parameters
        are not 1-D of one length; a training-mode node with ``training_nodes="error"``;
        an ``epsilon`` or ``var`` that :class:`FrozenBatchNorm` refuses (the node is
        named).
    NotImplementedError
        A legacy node with ``spatial=0`` (per-element statistics).
    TypeError
        ``model_or_path`` is of another type.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> c = 3
    >>> inits = [numpy_helper.from_array(np.full(c, v, np.float32), n)
    ...          for n, v in [("s", 2.0), ("b", 0.5), ("m", 1.0), ("v", 4.0)]]
    >>> node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
    ...                         name="bn0", epsilon=1e-3)
    >>> graph = helper.make_graph(
    ...     [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, c])], inits)
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    >>> layers = bnfast.from_onnx(model)
    >>> layers
    {'bn0': FrozenBatchNorm(3, eps=0.001, axis=1)}
    >>> layers["bn0"](np.full((1, c), 3.0, np.float32)).round(4)
    array([[2.4998, 2.4998, 2.4998]], dtype=float32)
    """
    if training_nodes not in ("error", "running_stats"):
        raise ValueError(f"training_nodes must be 'error' or 'running_stats', "
                         f"got {training_nodes!r}")
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
    elif isinstance(model_or_path, (str, os.PathLike)):
        model = onnx.load(os.fspath(model_or_path))
    elif isinstance(model_or_path, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model_or_path))
    elif hasattr(model_or_path, "read"):
        model = onnx.load(model_or_path)
    else:
        raise TypeError("from_onnx expects an onnx.ModelProto, a path, bytes or a binary "
                        f"file, got {type(model_or_path).__name__}")
    if any(n.op_type == "BatchNormalization" for f in model.functions for n in f.node):
        # model-local functions (torch.onnx.export's export_modules_as_functions) that
        # hold BatchNormalization nodes, which a walk of the graph alone skipped
        try:
            from onnx.inliner import inline_local_functions
        except ImportError:
            raise ValueError("the model's local functions hold BatchNormalization "
                             "nodes: inlining them needs onnx >= 1.16") from None
        model = inline_local_functions(model)
    opset = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = int(imp.version)
    if opset is None:
        opset = onnx.defs.onnx_opset_version()
    found = {}
    _onnx_walk(model.graph, {}, found, opset, training_nodes)
    return found


# ---------------------------------------------------------------------------------------
# Keras
# ---------------------------------------------------------------------------------------
def _keras_to_numpy(v):
    if hasattr(v, "numpy"):
        v = v.numpy()
    elif hasattr(v, "detach"):
        v = _tensor_to_numpy(v)
    return np.asarray(v)


def from_keras(layer):
    """Convert a built Keras ``BatchNormalization`` layer (Keras 3, any backend) to bnfast.

    Keras' conventions are converted so that the bnfast layer computes what the Keras
    layer computes, in inference and in training:

    * ``axis`` (default -1, channels-last; a list or tuple of one axis is accepted)
      becomes the channel axis;
    * ``epsilon`` (Keras default 1e-3) becomes ``eps``;
    * ``momentum`` m (Keras: ``moving = moving * m + batch * (1 - m)``, default 0.99)
      becomes bnfast's ``1 - m`` (weight of the batch);
    * ``unbiased_running_var=False``: Keras updates the moving variance with the
      *biased* batch variance;
    * ``center``/``scale`` become ``affine``: when both are off the result has no
      weight/bias, when only one is on the other is filled with its identity value
      (``gamma = 1`` or ``beta = 0``).

    A Keras layer with ``trainable=False`` uses its moving statistics even when called
    with ``training=True``: keep the bnfast layer in eval mode to match it.

    ``gamma``, ``beta``, ``moving_mean`` and ``moving_variance`` are copied;
    ``num_batches_tracked`` is 0 (Keras does not count). The result is in inference
    mode (``training=False``), which is what calling a Keras layer without
    ``training=True`` does; call ``.train()`` to continue training. Keras itself is
    not imported: the layer's attributes are read, so ``tf.keras`` layers work too.

    Parameters
    ----------
    layer : keras.layers.BatchNormalization
        A built layer (it has weights).

    Returns
    -------
    BatchNorm
        float64 when the moving statistics are float64, float32 otherwise.

    Raises
    ------
    TypeError
        ``layer`` does not look like a Keras BatchNormalization layer.
    ValueError
        The layer is not built yet, or ``axis`` names more than one axis.
    NotImplementedError
        ``renorm=True`` (batch renormalization).

    Examples
    --------
    Any Keras backend (the tests use ``KERAS_BACKEND=torch``):

    >>> import keras, numpy as np, bnfast
    >>> kbn = keras.layers.BatchNormalization()
    >>> kbn.build((None, 4))
    >>> bn = bnfast.from_keras(kbn)
    >>> bn.axis, bn.eps, round(bn.momentum, 6), bn.unbiased_running_var
    (-1, 0.001, 0.01, False)
    >>> x = np.arange(8.0, dtype=np.float32).reshape(2, 4)
    >>> np.allclose(bn(x), keras.ops.convert_to_numpy(kbn(x)))   # inference: the same
    True
    """
    needed = ("axis", "epsilon", "momentum", "center", "scale", "moving_mean",
              "moving_variance")
    lacking = [a for a in needed if not hasattr(layer, a)]
    if lacking:
        raise TypeError("from_keras expects a keras.layers.BatchNormalization layer, got "
                        f"{type(layer).__name__} (no attribute(s) {lacking})")
    if getattr(layer, "renorm", False):
        raise NotImplementedError("Keras batch renormalization (renorm=True) is not "
                                  "supported")
    if layer.moving_mean is None or layer.moving_variance is None:
        raise ValueError("the Keras layer is not built yet: call it once or "
                         "layer.build(input_shape) first")
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(f"bnfast normalizes over one channel axis; the Keras layer has "
                             f"axis={list(axis)}")
        axis = axis[0]
    axis = int(axis)
    mean = _keras_to_numpy(layer.moving_mean)
    var = _keras_to_numpy(layer.moving_variance)
    if mean.ndim != 1 or mean.shape != var.shape:
        raise ValueError(f"moving_mean and moving_variance must be 1-D of one length, got "
                         f"{mean.shape} and {var.shape}")
    c = mean.shape[0]
    dtype = _layer_dtype(mean.dtype)
    center, scale = bool(layer.center), bool(layer.scale)
    affine = center or scale
    m = float(layer.momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"Keras momentum must be in [0, 1], got {m}")
    out = BatchNorm(c, eps=float(layer.epsilon), momentum=1.0 - m, affine=affine,
                    track_running_stats=True, axis=axis, dtype=dtype,
                    unbiased_running_var=False)
    state = {"running_mean": mean, "running_var": var, "num_batches_tracked": 0}
    if affine:
        state["weight"] = (_keras_to_numpy(layer.gamma) if scale
                           else np.ones(c, np.float64))
        state["bias"] = (_keras_to_numpy(layer.beta) if center
                         else np.zeros(c, np.float64))
    out.load_state_dict(state, strict=True)
    return out.eval()


# ---------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------
def _fold_factors(bn):
    """(scale, shift) in float64 with  bn(z) == z * scale + shift  per channel."""
    if isinstance(bn, FrozenBatchNorm):
        mean, var, w, b, eps = bn.mean, bn.var, bn.weight, bn.bias, bn.eps
    elif isinstance(bn, BatchNorm):
        if bn.running_mean is None:  # eval uses them whenever they exist (torch)
            raise ValueError("folding needs running statistics: the BatchNorm was built "
                             "with track_running_stats=False")
        if bn.training:
            raise ValueError("folding uses the running statistics of an inference-mode "
                             "BatchNorm: call bn.eval() first")
        with bn._lock:      # copies of one state, not half of a concurrent load
            mean, var, w, b = (None if v is None else np.array(v, np.float64)
                               for v in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
            eps = bn.eps
    else:
        raise TypeError("bn must be a bnfast.BatchNorm or FrozenBatchNorm, got "
                        f"{type(bn).__name__} (convert peers' layers with from_torch, "
                        "from_keras or from_onnx first)")
    mean = np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    # as eval and freeze() refuse them: folded weights would answer NaN for good
    bad = np.flatnonzero(~(var >= 0))
    if bad.size:
        raise ValueError(f"folding needs a non-negative running_var (not NaN); channel "
                         f"{bad[0]} has {var[bad[0]]!r}")
    bad = np.flatnonzero(~np.isfinite(mean))
    if bad.size:
        raise ValueError(f"folding needs a finite running_mean; channel {bad[0]} has "
                         f"{mean[bad[0]]!r}")
    w = np.ones_like(mean) if w is None else np.asarray(w, np.float64)
    b = np.zeros_like(mean) if b is None else np.asarray(b, np.float64)
    scale = w / np.sqrt(var + float(eps))
    return mean, scale, b


def _as_array(a, name):
    if hasattr(a, "detach") and hasattr(a, "cpu"):   # a torch tensor
        a = _tensor_to_numpy(a)
    a = np.asarray(_check_not_masked(a, name))
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a


def _out_dtype(a):
    return a.dtype if a.dtype.kind == "f" else np.dtype(np.float64)


def _fold(weight, bias, bn, channel_dim, what):
    w = _as_array(weight, "weight")
    if w.ndim < 2 or (what == "linear" and w.ndim != 2):
        raise ValueError(f"{what} weight must have {'2' if what == 'linear' else 'at least 2'} "
                         f"dimensions, got shape {w.shape}")
    mean, scale, shift = _fold_factors(bn)
    c = w.shape[channel_dim]
    if c != mean.shape[0]:
        raise ValueError(f"the {what} has {c} output channels (weight shape {w.shape}) but "
                         f"the batch norm has {mean.shape[0]}")
    if bias is None:
        b = np.zeros(c, np.float64)
        b_dtype = _out_dtype(w)
    else:
        b_arr = _as_array(bias, "bias")
        if b_arr.shape != (c,):
            raise ValueError(f"bias must have shape ({c},), got {b_arr.shape}")
        b = b_arr.astype(np.float64)
        b_dtype = _out_dtype(b_arr)
    shape = [1] * w.ndim
    shape[channel_dim] = c
    # one float64 temporary, scaled in place (a widened copy, the product and a cast
    # had held twice the weight's float64 size at once)
    new_w = w.astype(np.float64)
    new_w *= scale.reshape(shape)
    new_w = new_w.astype(_out_dtype(w), copy=False)
    new_b = ((b - mean) * scale + shift).astype(b_dtype)
    return new_w, new_b


def fold_linear(weight, bias, bn):
    """Fold an inference-mode batch norm into the Linear layer that precedes it.

    For ``z = x @ weight.T + bias`` followed by ``y = bn(z)`` (channel = output
    feature), returns ``(W, b)`` with ``x @ W.T + b == y``:
    ``W = weight * s[:, None]``, ``b = (bias - mean) * s + beta`` where
    ``s = gamma / sqrt(var + eps)``; the same as
    ``torch.nn.utils.fusion.fuse_linear_bn_weights``. Computed in float64.

    Parameters
    ----------
    weight : array_like, shape (out, in)
        The Linear weight (PyTorch layout; for a ``(in, out)`` matrix used as
        ``x @ M``, pass ``M.T``). NumPy arrays, torch tensors and lists are accepted.
    bias : array_like of shape (out,), or None
        None is a zero bias.
    bn : BatchNorm or FrozenBatchNorm
        A :class:`bnfast.BatchNorm` in eval mode with running statistics, or a
        :class:`bnfast.FrozenBatchNorm`, with ``out`` channels. Its ``axis`` does not
        matter (the feature axis of the Linear output).

    Returns
    -------
    weight : ndarray, shape (out, in)
        In the weight's dtype (float64 for an integer weight).
    bias : ndarray, shape (out,)
        In the bias' dtype, or the weight's when ``bias`` is None.

    Raises
    ------
    ValueError
        Channel count mismatch, a weight that is not 2-D, a BatchNorm in training mode
        or without running stats, a negative or NaN running variance.
    TypeError
        ``bn`` is not a bnfast layer; non-numeric arrays.

    Notes
    -----
    Folding trades exactness for one fewer pass: the folded bias holds
    ``-mean * s``, so on inputs whose Linear output carries a large offset (raw prices)
    the float32 serving matmul loses the digits that bnfast's batch norm keeps. Fold
    on centred or return-like features, or serve the folded layer in float64.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> rng = np.random.default_rng(0)
    >>> W, b = rng.normal(size=(4, 3)), rng.normal(size=4)
    >>> bn = bnfast.FrozenBatchNorm(rng.normal(size=4), rng.uniform(1, 2, 4),
    ...                             rng.normal(size=4), rng.normal(size=4), axis=-1)
    >>> Wf, bf = bnfast.fold_linear(W, b, bn)
    >>> x = rng.normal(size=(5, 3))
    >>> np.allclose(x @ Wf.T + bf, bn(x @ W.T + b))
    True
    """
    return _fold(weight, bias, bn, 0, "linear")


def fold_conv(weight, bias, bn, *, transpose=False):
    """Fold an inference-mode batch norm into the convolution that precedes it.

    Scales each output channel's filter by ``s = gamma / sqrt(var + eps)`` and sets
    the bias to ``(bias - mean) * s + beta``; the same as
    ``torch.nn.utils.fusion.fuse_conv_bn_weights``. Works for 1-, 2- and 3-D and
    grouped/depthwise convolutions. Computed in float64.

    Parameters
    ----------
    weight : array_like, shape (out, in / groups, *kernel)
        The convolution weight in PyTorch/ONNX layout (``(in, out, *kernel)`` with
        ``transpose=True``, groups = 1). NumPy arrays, torch tensors, lists.
    bias : array_like of shape (out,), or None
        None is a zero bias.
    bn : BatchNorm or FrozenBatchNorm
        A :class:`bnfast.BatchNorm` in eval mode with running statistics, or a
        :class:`bnfast.FrozenBatchNorm`, with ``out`` channels. Its ``axis`` does not
        matter (the data layout does not change the weight's output-channel dimension).
    transpose : bool, keyword-only, default False
        The weight belongs to a transposed convolution (output channels on dim 1).

    Returns
    -------
    weight : ndarray
        Same shape, in the weight's dtype (float64 for an integer weight).
    bias : ndarray, shape (out,)
        In the bias' dtype, or the weight's when ``bias`` is None.

    Raises
    ------
    ValueError
        Channel count mismatch, a weight of fewer than 2 dimensions, a BatchNorm in
        training mode or without running statistics, a negative or NaN running variance.
    TypeError
        ``bn`` is not a bnfast layer; non-numeric arrays; ``transpose`` not a bool.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> w = np.ones((2, 1, 3, 3), np.float32)          # depthwise 3x3, 2 channels
    >>> bn = bnfast.FrozenBatchNorm([1.0, 2.0], [3.0, 15.0], eps=1.0)
    >>> wf, bf = bnfast.fold_conv(w, None, bn)
    >>> wf[:, 0, 0, 0], bf
    (array([0.5 , 0.25], dtype=float32), array([-0.5, -0.5], dtype=float32))
    """
    return _fold(weight, bias, bn, 1 if _check_flag(transpose, "transpose") else 0,
                 "convolution")

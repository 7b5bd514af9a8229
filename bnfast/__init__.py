"""bnfast: fast, exact batch normalization for NumPy on the CPU.

Functional API: :func:`batch_norm`, :func:`batch_norm_train`, :func:`batch_norm_backward`.
Layers: :class:`BatchNorm` (and 1d/2d/3d), :class:`FrozenBatchNorm`.
Interop: :func:`from_torch`, :func:`from_onnx`, :func:`from_keras`, :func:`fold_linear`,
:func:`fold_conv`, :func:`load`. Statistics: :func:`moments`, :func:`merge_moments`,
:class:`RunningStats`. Distributed: ``bnfast.distributed.SyncBatchNorm`` (MPI).
"""
from typing import TYPE_CHECKING

try:
    from bnfast._core import (
        FrozenBatchNorm,
        batch_norm,
        batch_norm_backward,
        batch_norm_train,
        get_num_threads,
        get_output_cache,
        set_num_threads,
        set_output_cache,
    )
except ModuleNotFoundError as _e:   # `python -m bnfast` in a checkout imports its source
    if _e.name != "bnfast._core":
        raise
    import os as _os

    raise ImportError(
        f"bnfast's compiled core (bnfast._core) is missing from "
        f"{_os.path.dirname(__file__)}. A source tree (Python imports the current "
        "directory first) has none: run from another directory, or build in place "
        "(python setup.py build_ext --inplace). An installed bnfast built for another "
        "Python: reinstall it for this one.") from None
from bnfast._layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

# Names from modules that are imported on first use (they pull in optional dependencies
# only inside their functions, but keep `import bnfast` minimal).
_LAZY = {
    "from_torch": "bnfast.interop",
    "from_onnx": "bnfast.interop",
    "from_keras": "bnfast.interop",
    "fold_linear": "bnfast.interop",
    "fold_conv": "bnfast.interop",
    "load": "bnfast.interop",
    "moments": "bnfast._moments",
    "merge_moments": "bnfast._moments",
    "Moments": "bnfast._moments",
    "RunningStats": "bnfast._moments",
    "show_config": "bnfast._config",
}


if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    # `import a as a`: an explicit re-export, which mypy --no-implicit-reexport (--strict) needs
    from bnfast import distributed as distributed
    from bnfast._config import show_config as show_config
    from bnfast._moments import Moments as Moments
    from bnfast._moments import RunningStats as RunningStats
    from bnfast._moments import merge_moments as merge_moments
    from bnfast._moments import moments as moments
    from bnfast.interop import fold_conv as fold_conv
    from bnfast.interop import fold_linear as fold_linear
    from bnfast.interop import from_keras as from_keras
    from bnfast.interop import from_onnx as from_onnx
    from bnfast.interop import from_torch as from_torch
    from bnfast.interop import load as load
else:  # a module __getattr__ would make every attribute of bnfast "Any" to mypy

    def __getattr__(name):
        import importlib

        if name in _LAZY:
            value = getattr(importlib.import_module(_LAZY[name]), name)
            globals()[name] = value
            return value
        if name == "distributed":
            return importlib.import_module("bnfast.distributed")
        raise AttributeError(f"module 'bnfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"distributed"})   # a loaded name once


__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_train",
    "get_num_threads",
    "set_num_threads",
    "get_output_cache",
    "set_output_cache",
    # the names of _LAZY, spelled out: mypy cannot read `*_LAZY` (tests/test_typing.py keeps
    # the two in step)
    "from_torch",
    "from_onnx",
    "from_keras",
    "fold_linear",
    "fold_conv",
    "load",
    "moments",
    "merge_moments",
    "Moments",
    "RunningStats",
    "show_config",
    "__version__",
]

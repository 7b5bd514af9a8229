"""bnfast: fast, exact batch normalization for NumPy on the CPU."""
from bnfast._core import (
    FrozenBatchNorm,
    batch_norm,
    batch_norm_backward,
    batch_norm_train,
    get_num_threads,
    set_num_threads,
)
from bnfast._layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

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
    "__version__",
]

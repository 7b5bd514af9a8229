"""Type stubs for the compiled module ``bnfast._core`` (source: ``bnfast/_core.pyx``).

Keep these in step with the ``def`` signatures of the .pyx: ``tests/test_typing.py``
runs ``mypy.stubtest`` against the built module.

Dtype rules expressed by the overloads: float16/float32/float64 inputs give an output of
the same dtype; integer and bool inputs are converted to float64; any other array-like
gives some float array.
"""

from typing import Any, Callable, SupportsFloat, SupportsIndex, TypedDict, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray
from typing_extensions import TypeAlias

_FloatT = TypeVar("_FloatT", bound=np.floating[Any])

# What the kernels accept as x / dy: anything np.asarray turns into real numbers.
# Per-channel parameters: 1-D array-likes of length C (torch tensors are accepted too).
_Param: TypeAlias = ArrayLike | None
_IntLike: TypeAlias = np.integer[Any] | np.bool_

class _BuildInfo(TypedDict):
    # the keys of _core._build_info()'s dict (tests/test_typing.py compares them)
    openmp: bool
    openmp_version: int
    simd_isa: str
    simd_loops: str
    fma: str

def set_num_threads(n: SupportsIndex | None) -> None: ...
def get_num_threads() -> int: ...
def set_output_cache(max_bytes: SupportsIndex) -> int: ...
def get_output_cache() -> dict[str, int]: ...
def _build_info() -> _BuildInfo: ...

# --------------------------------------------------------------------------------------
# batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
#            momentum=0.1, eps=1e-5, *, axis=1, out=None)

@overload
def batch_norm(
    x: NDArray[_FloatT],
    running_mean: _Param,
    running_var: _Param,
    weight: _Param = None,
    bias: _Param = None,
    training: bool = False,
    momentum: SupportsFloat = 0.1,
    eps: SupportsFloat = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: NDArray[_FloatT] | None = None,
) -> NDArray[_FloatT]: ...
@overload
def batch_norm(
    x: NDArray[_IntLike],
    running_mean: _Param,
    running_var: _Param,
    weight: _Param = None,
    bias: _Param = None,
    training: bool = False,
    momentum: SupportsFloat = 0.1,
    eps: SupportsFloat = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: NDArray[np.float64] | None = None,
) -> NDArray[np.float64]: ...
@overload
def batch_norm(
    x: ArrayLike,
    running_mean: _Param,
    running_var: _Param,
    weight: _Param = None,
    bias: _Param = None,
    training: bool = False,
    momentum: SupportsFloat = 0.1,
    eps: SupportsFloat = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: NDArray[Any] | None = None,
) -> NDArray[np.floating[Any]]: ...

# --------------------------------------------------------------------------------------
# batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
#                  running_var=None, momentum=0.1, out=None) -> (y, mean, invstd)
# mean and invstd are float64 whatever x's dtype; running stats are float ndarrays
# updated in place.

@overload
def batch_norm_train(
    x: NDArray[_FloatT],
    weight: _Param = None,
    bias: _Param = None,
    *,
    eps: SupportsFloat = 1e-5,
    axis: SupportsIndex = 1,
    running_mean: NDArray[np.floating[Any]] | None = None,
    running_var: NDArray[np.floating[Any]] | None = None,
    momentum: SupportsFloat = 0.1,
    out: NDArray[_FloatT] | None = None,
) -> tuple[NDArray[_FloatT], NDArray[np.float64], NDArray[np.float64]]: ...
@overload
def batch_norm_train(
    x: NDArray[_IntLike],
    weight: _Param = None,
    bias: _Param = None,
    *,
    eps: SupportsFloat = 1e-5,
    axis: SupportsIndex = 1,
    running_mean: NDArray[np.floating[Any]] | None = None,
    running_var: NDArray[np.floating[Any]] | None = None,
    momentum: SupportsFloat = 0.1,
    out: NDArray[np.float64] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]: ...
@overload
def batch_norm_train(
    x: ArrayLike,
    weight: _Param = None,
    bias: _Param = None,
    *,
    eps: SupportsFloat = 1e-5,
    axis: SupportsIndex = 1,
    running_mean: NDArray[np.floating[Any]] | None = None,
    running_var: NDArray[np.floating[Any]] | None = None,
    momentum: SupportsFloat = 0.1,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[np.floating[Any]], NDArray[np.float64], NDArray[np.float64]]: ...

# --------------------------------------------------------------------------------------
# batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, axis=1,
#                     out=None) -> (dx, dweight, dbias), all of x's (result) dtype

@overload
def batch_norm_backward(
    dy: ArrayLike,
    x: NDArray[_FloatT],
    mean: ArrayLike,
    invstd: ArrayLike,
    weight: _Param = None,
    *,
    training: bool = True,
    axis: SupportsIndex = 1,
    out: NDArray[_FloatT] | None = None,
) -> tuple[NDArray[_FloatT], NDArray[_FloatT], NDArray[_FloatT]]: ...
@overload
def batch_norm_backward(
    dy: ArrayLike,
    x: NDArray[_IntLike],
    mean: ArrayLike,
    invstd: ArrayLike,
    weight: _Param = None,
    *,
    training: bool = True,
    axis: SupportsIndex = 1,
    out: NDArray[np.float64] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]: ...
@overload
def batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    weight: _Param = None,
    *,
    training: bool = True,
    axis: SupportsIndex = 1,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]], NDArray[np.floating[Any]]]: ...

# --------------------------------------------------------------------------------------
# _train: batch_norm_train with the choice of the running-variance update (positional).

def _train(
    x: ArrayLike,
    weight: _Param,
    bias: _Param,
    eps: SupportsFloat,
    axis: SupportsIndex,
    running_mean: NDArray[np.floating[Any]] | None,
    running_var: NDArray[np.floating[Any]] | None,
    momentum: SupportsFloat,
    out: NDArray[Any] | None,
    unbiased_running_var: bool,
    moments_hook: Callable[[NDArray[np.float64]], ArrayLike] | None = None,
) -> tuple[NDArray[np.floating[Any]], NDArray[np.float64], NDArray[np.float64]]: ...
def _backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: _Param,
    invstd: _Param,
    weight: _Param,
    training: bool,
    axis: SupportsIndex,
    out: NDArray[Any] | None,
    sums_hook: Callable[[NDArray[np.float64]], tuple[ArrayLike, float]] | None,
    saved_mean: bool = False,
    param_dtype: np.dtype[Any] | None = None,
) -> tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]], NDArray[np.floating[Any]]]: ...
def _set_stream_bytes(n: SupportsIndex) -> int: ...
def _set_reduce_blocks_min(n: SupportsIndex) -> int: ...
def _set_segments_always(flag: object) -> bool: ...
def _moments(x: ArrayLike, axis: SupportsIndex) -> NDArray[np.float64]: ...

# Helpers the package's Python modules import (not public).
_A = TypeVar("_A")
_F64: TypeAlias = NDArray[np.float64]
# (count, mean, m2, mean_lo, m2_lo), float64 (C,) arrays
_MomentParts: TypeAlias = tuple[_F64, _F64, _F64, _F64, _F64]

def _check_not_masked(a: _A, name: str) -> _A: ...
def _check_flag(v: object, name: str) -> bool: ...
def _as_array(a: ArrayLike, name: str) -> NDArray[Any]: ...
def _tensor_to_numpy(t: Any) -> NDArray[Any]: ...
def _eval_invstd(var: ArrayLike, eps: SupportsFloat) -> _F64: ...
def _frozen_f64(*arrays: ArrayLike) -> tuple[_F64, ...]: ...
def _moments_parts(x: ArrayLike, axis: SupportsIndex) -> _MomentParts: ...
def _merge_moment_arrays(
    na_: _F64, am_: _F64, alo_: _F64, am2_: _F64, am2lo_: _F64,
    nb_: _F64, bm_: _F64, blo_: _F64, bm2_: _F64, bm2lo_: _F64,
) -> _MomentParts: ...
def _merge_packed_rows(rows: _F64) -> _MomentParts: ...

# --------------------------------------------------------------------------------------

class FrozenBatchNorm:
    """Immutable inference-mode batch normalization: the low-latency path."""

    def __init__(
        self,
        mean: ArrayLike,
        var: ArrayLike,
        weight: _Param = None,
        bias: _Param = None,
        eps: SupportsFloat = 1e-5,
        *,
        axis: SupportsIndex = 1,
    ) -> None: ...
    # read-only float64 copies of the construction parameters
    @property
    def mean(self) -> NDArray[np.float64]: ...
    @property
    def var(self) -> NDArray[np.float64]: ...
    @property
    def weight(self) -> NDArray[np.float64] | None: ...
    @property
    def bias(self) -> NDArray[np.float64] | None: ...
    @property
    def eps(self) -> float: ...
    @property
    def axis(self) -> int: ...
    @property
    def num_features(self) -> int: ...
    @overload
    def __call__(
        self, x: NDArray[_FloatT], *, out: NDArray[_FloatT] | None = None
    ) -> NDArray[_FloatT]: ...
    @overload
    def __call__(
        self, x: NDArray[_IntLike], *, out: NDArray[np.float64] | None = None
    ) -> NDArray[np.float64]: ...
    @overload
    def __call__(
        self, x: ArrayLike, *, out: NDArray[Any] | None = None
    ) -> NDArray[np.floating[Any]]: ...
    def __reduce__(
        self,
    ) -> tuple[
        Any,
        tuple[
            NDArray[np.float64],
            NDArray[np.float64],
            NDArray[np.float64] | None,
            NDArray[np.float64] | None,
            float,
            int,
        ],
    ]: ...

def _rebuild_frozen(
    mean: ArrayLike,
    var: ArrayLike,
    weight: _Param,
    bias: _Param,
    eps: SupportsFloat,
    axis: SupportsIndex,
) -> FrozenBatchNorm: ...

"""The SyncBatchNorm checks, run by every rank of a communicator: under mpiexec by
sync_bn_check.py (real MPI processes) and in threads by tests/test_distributed.py
(a thread communicator), so both exercise the same cases.

Every rank draws the whole global batch from a fixed seed and keeps its shard; per
case (two training steps, then eval) it checks, on its shard:

* y, dx, the running statistics and the sum over ranks of grad_weight / grad_bias
  against an exact long-double reference on the concatenated batch
  (``sync_reference.Exact``), at the project's tolerances (float32 1e-6, float64 1e-12);
* the same against a single ``bnfast.BatchNorm`` on the concatenated batch.

Only the communicator's ``Get_rank``, ``Get_size``, ``Allgather`` and ``Allreduce`` on
float64 NumPy buffers are used.
"""
import os
import sys
import zlib

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bnfast  # noqa: E402
import reference as R  # noqa: E402
from arrays import make_values  # noqa: E402
from bnfast.distributed import SyncBatchNorm  # noqa: E402
from sync_reference import Exact  # noqa: E402

# bnfast.BatchNorm's float64 backward centres x on the batch mean rounded to one double
# (batch_norm_train returns hi + lo rounded), so at price offsets its dx and grad_weight
# are off by up to ~ulp(offset)/std relative (1e-9 at 1e5 with std 1e-2, 5e-7 at 3e6 with
# std 1e-3): above the float64 target of 1e-12. SyncBatchNorm keeps the low part and
# meets the target against the exact reference (checked below at 1e-12); against
# BatchNorm's float64 gradients the comparison allows that core error.
# tests/test_distributed.py holds the test that shows it in the core
# (test_core_float64_backward_exact_at_price_offsets).
CORE_F64_GRAD_RTOL = 1e-6

# (name, per-sample shape (C at `axis`; the batch axis 0 is prepended), axis, dtype,
#  shard sizes per rank (cycled over the ranks), offset, spread, momentum, affine,
#  track_running_stats, unbiased_running_var)
CASES = [
    ("nc-f64-uneven", (5,), -1, np.float64, (7, 2, 11), 1e5, 1e-2, 0.1, True, True, True),
    ("nc-f32-empty-rank", (4,), -1, np.float32, (6, 0, 9), 1e4, 1.0, None, True, True,
     True),
    ("nchw-f32", (3, 4, 5), 1, np.float32, (2, 3, 1), 0.0, 1.0, 0.1, True, True, True),
    ("nhwc-f64-keras", (3, 2, 4), -1, np.float64, (1, 4, 2), 3e6, 1e-3, 0.2, True, True,
     False),
    ("ncl-f64-noaffine", (3, 6), 1, np.float64, (0, 5, 3), 1e3, 1.0, 0.1, False, True,
     True),
    ("nc-f32-notrack", (6,), -1, np.float32, (3, 3, 0), 1e5, 1.0, 0.1, True, False, True),
]


def _rtol(dtype):
    return 1e-6 if np.dtype(dtype) == np.float32 else 1e-12


def _allsum(comm, v):
    v = np.ascontiguousarray(v, dtype=np.float64)
    out = np.empty_like(v)
    comm.Allreduce(v, out)
    return out


def _same_on_all_ranks(comm, v):
    v = np.ascontiguousarray(v, dtype=np.float64)
    allv = np.empty((comm.Get_size(),) + v.shape)
    comm.Allgather(v, allv)
    for r in range(allv.shape[0]):
        np.testing.assert_array_equal(allv[r], allv[0], err_msg=f"rank {r} differs")


class Checker:
    def __init__(self):
        self.failures = []
        self.count = 0

    def __call__(self, what, fn, *args, **kw):
        self.count += 1
        try:
            fn(*args, **kw)
        except AssertionError as e:
            self.failures.append(f"{what}: {e}")


def shards_of(sizes, size):
    s = [sizes[i % len(sizes)] for i in range(size)]
    if sum(s) < 2:
        s[0] += 2
    return s


def run_case(comm, check, name, tail, axis, dtype, sizes, offset, spread, momentum,
             affine, track, unbiased):
    rank, size = comm.Get_rank(), comm.Get_size()
    sizes = shards_of(sizes, size)
    N = sum(sizes)
    shape = (N,) + tail
    ax = axis % len(shape)
    C = shape[ax]
    seed = zlib.crc32(name.encode()) % 10000
    x_all = make_values(shape, dtype, seed=seed, axis=axis, offset=offset, spread=spread)
    dy_all = make_values(shape, dtype, seed=seed + 1, axis=axis)
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 2.0, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    kw = dict(axis=axis, dtype=dtype, affine=affine, track_running_stats=track,
              momentum=momentum, unbiased_running_var=unbiased)
    sync = SyncBatchNorm(C, comm=comm, **kw)
    single = bnfast.BatchNorm(C, **kw)
    exact = Exact(C, momentum=momentum, axis=axis, unbiased_running_var=unbiased,
                  weight=w if affine else None, bias=b if affine else None,
                  track_running_stats=track)
    if affine:
        for layer in (sync, single):
            layer.weight[:] = w
            layer.bias[:] = b
    lo = sum(sizes[:rank])
    mine = slice(lo, lo + sizes[rank])
    rt = _rtol(dtype)
    core_grad_rt = rt if np.dtype(dtype) == np.float32 else CORE_F64_GRAD_RTOL
    for step in range(2):
        tag = f"{name} step {step} rank {rank}"
        y = sync(x_all[mine])
        ye = exact.forward(x_all).astype(np.float64)
        y1 = single(x_all).astype(np.float64)
        check(f"{tag} y vs exact", R.assert_forward_close, y, ye[mine], dtype)
        check(f"{tag} y vs BatchNorm", R.assert_forward_close, y, y1[mine], dtype)
        if track:
            for k in ("running_mean", "running_var"):
                check(f"{tag} {k} vs exact", R.assert_vec_close, getattr(sync, k),
                      getattr(exact, k).astype(np.float64), rt, k)
                check(f"{tag} {k} vs BatchNorm", R.assert_vec_close, getattr(sync, k),
                      getattr(single, k), rt, k)
            check(f"{tag} running_var equal on all ranks", _same_on_all_ranks, comm,
                  sync.running_var)
            check(f"{tag} num_batches_tracked", np.testing.assert_equal,
                  sync.num_batches_tracked, step + 1)
        else:
            assert sync.running_mean is None and sync.num_batches_tracked is None
        dx = sync.backward(dy_all[mine])
        dxe, gwe, gbe = (v.astype(np.float64) for v in exact.backward(dy_all))
        dx1 = single.backward(dy_all)
        scale = max(float(np.max(np.abs(dxe))), 1e-300)
        check(f"{tag} dx vs exact", R.assert_grad_close, dx, dxe[mine], dtype, scale)
        check(f"{tag} dx vs BatchNorm", _close, dx, dx1[mine], core_grad_rt * scale)
        if affine:
            gw = _allsum(comm, sync.grad_weight)
            gb = _allsum(comm, sync.grad_bias)
            gscale = max(1.0, float(np.max(np.abs(gwe))))
            check(f"{tag} sum grad_weight vs exact", _close, gw, gwe, rt * gscale)
            check(f"{tag} sum grad_bias vs exact", _close, gb, gbe,
                  rt * max(1.0, float(np.max(np.abs(gbe)))))
            check(f"{tag} sum grad_weight vs BatchNorm", _close, gw, single.grad_weight,
                  core_grad_rt * gscale)
            check(f"{tag} sum grad_bias vs BatchNorm", _close, gb, single.grad_bias,
                  rt * max(1.0, float(np.max(np.abs(gbe)))))
            assert sync.grad_weight.dtype == np.dtype(dtype)
        else:
            assert sync.grad_weight is None
        x_all = (x_all * 1.5 + 0.25).astype(dtype)           # a second, different batch
    # eval: local, no communication (only rank 0 calls it)
    sync.eval()
    single.eval()
    if rank == 0 and track:
        check(f"{name} eval", R.assert_forward_close, sync(x_all[:3]),
              single(x_all[:3]).astype(np.float64), dtype)


def _close(got, ref, tol):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != {ref.shape}"
    err = np.abs(got - ref)
    assert np.all(err <= tol), (f"max error {err.max():.3g} > tol {tol:.3g}: got "
                                f"{got.ravel()[:4]}, ref {ref.ravel()[:4]}")


def error_cases(comm, check):
    rank, size = comm.Get_rank(), comm.Get_size()
    bad = rank == size - 1

    def channel_mismatch():
        bn = SyncBatchNorm(3, axis=-1, comm=comm)
        x = np.ones((4, 2 if bad else 3), np.float32)
        try:
            bn(x)
        except ValueError as e:
            assert bad, f"ValueError on a good rank: {e}"
            assert "channels" in str(e)
        except RuntimeError as e:
            assert not bad and f"rank(s) [{size - 1}]" in str(e), repr(e)
        else:
            raise AssertionError("no error")
        assert bn.num_batches_tracked == 0
        # the layer still works afterwards
        bn(np.random.default_rng(rank).standard_normal((3, 3)).astype(np.float32))
        assert bn.num_batches_tracked == 1

    def one_value_in_the_whole_batch():
        bn = SyncBatchNorm(3, axis=-1, comm=comm)
        x = np.ones((1 if rank == 0 else 0, 3), np.float32)
        try:
            bn(x)
        except ValueError as e:
            assert "more than 1 value per channel" in str(e), str(e)
        else:
            raise AssertionError("no error")
        assert bn.num_batches_tracked == 0

    def backward_bad_dy():
        bn = SyncBatchNorm(3, axis=-1, comm=comm)
        bn(np.random.default_rng(rank).standard_normal((3, 3)).astype(np.float32))
        dy = np.ones((2, 3) if rank == 0 else (3, 3), np.float32)
        try:
            bn.backward(dy)
        except ValueError:
            assert rank == 0
        except RuntimeError:
            assert rank != 0
        else:
            raise AssertionError("no error")

    for fn in (channel_mismatch, one_value_in_the_whole_batch, backward_bad_dy):
        check(f"{fn.__name__} rank {rank}", fn)


def run_all(comm):
    """All cases on this rank; returns (number of checks, failures)."""
    check = Checker()
    for case in CASES:
        run_case(comm, check, *case)
    error_cases(comm, check)
    return check.count, check.failures

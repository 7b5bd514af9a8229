"""bnfast.distributed.SyncBatchNorm (issue 6).

* Real MPI: ``mpiexec -n 2`` and ``-n 3`` run tests/mpi_scripts/sync_bn_check.py (the
  cases of tests/mpi_scripts/sync_cases.py); skipped, with the reason, only where
  mpi4py or mpiexec is missing. Install: ``pip install mpi4py mpich``.
* The same cases in threads with an in-process communicator (always run), a fake
  single-rank communicator, and the layer's interface.

References: an exact long-double computation on the concatenated batch
(tests/mpi_scripts/sync_reference.py) and a single ``bnfast.BatchNorm`` on it.
"""
import os
import pickle
import shutil
import subprocess
import tempfile
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import bnfast
from bnfast.distributed import SyncBatchNorm

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "mpi_scripts"
sys.path.insert(0, str(SCRIPTS))

import sync_cases  # noqa: E402
from sync_reference import Exact  # noqa: E402


# -------------------------------------------------------------------------------------
# In-process communicators

class _Group:
    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size


class ThreadComm:
    """The part of an mpi4py communicator SyncBatchNorm uses, for ranks that are
    threads of one process (Allgather, Allreduce-sum over float64 buffers)."""

    def __init__(self, group, rank):
        self.group, self.rank = group, rank
        self.calls = 0

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.group.size

    def _exchange(self, send):
        g = self.group
        self.calls += 1
        g.slots[self.rank] = np.array(send, dtype=np.float64, copy=True).ravel()
        g.barrier.wait()
        parts = list(g.slots)
        g.barrier.wait()                     # nobody refills a slot before all read
        return parts

    def Allgather(self, send, recv):
        recv[...] = np.concatenate(self._exchange(send)).reshape(recv.shape)

    def Allreduce(self, send, recv):
        parts = self._exchange(send)
        acc = parts[0].copy()
        for p in parts[1:]:
            acc += p
        recv[...] = acc.reshape(recv.shape)


def run_ranks(size, fn):
    """fn(comm) on `size` threads; returns the results by rank (re-raises the first
    exception)."""
    group = _Group(size)
    results = [None] * size
    errors = [None] * size

    def target(r):
        try:
            results[r] = fn(ThreadComm(group, r))
        except BaseException as e:          # pragma: no cover - reported below
            errors[r] = e
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for e in errors:
        if e is not None and not isinstance(e, threading.BrokenBarrierError):
            raise e
    for e in errors:
        if e is not None:
            raise e
    return results


class OneRank:
    """A single-rank communicator that counts its collective calls."""

    def __init__(self):
        self.calls = []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        self.calls.append(("Allgather", np.asarray(send).size))
        recv[...] = np.asarray(send).reshape(recv.shape)

    def Allreduce(self, send, recv):
        self.calls.append(("Allreduce", np.asarray(send).size))
        recv[...] = send


class NoComm:
    def __getattr__(self, name):
        raise AssertionError(f"communicator used ({name}) where it must not be")


# -------------------------------------------------------------------------------------
# The shared cases, in threads

@pytest.mark.parametrize("size", [1, 2, 3])
def test_sync_cases_in_threads(size):
    results = run_ranks(size, sync_cases.run_all)
    failures = [f for _, fl in results for f in fl]
    assert not failures, "\n".join(failures[:20])
    assert all(n > 100 for n, _ in results)


def test_one_collective_each_way_and_sizes():
    comm = OneRank()
    bn = SyncBatchNorm(7, axis=-1, comm=comm)
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    bn(x)
    assert comm.calls == [("Allgather", 4 * 7 + 1)]
    bn.backward(np.ones_like(x))
    # sum(dy), sum(dy (x - mean)), sum(x - mean) per channel, the count, a status flag
    assert comm.calls == [("Allgather", 4 * 7 + 1), ("Allreduce", 3 * 7 + 2)]


def test_merge_of_many_ranks_is_exact_and_order_free():
    # 40 ranks with uneven shards (some empty) of float64 prices at 3e6: the merged
    # global statistics equal the exact ones of the concatenation
    from bnfast._moments import _kernel_moments, _merge_packed, _pack
    rng = np.random.default_rng(8)
    sizes = rng.choice([0, 1, 2, 5, 40], 40)
    x = 3e6 + 1e-3 * rng.standard_normal((int(sizes.sum()), 3))
    rows = np.zeros((40, 4 * 3))
    start = 0
    for r, k in enumerate(sizes):
        _pack(_kernel_moments(x[start:start + k], 1), rows[r])
        start += k
    g = _merge_packed(rows)
    d = x - x.mean(0)                              # exact: x - hi (doubles, close)
    lo = d.astype(np.longdouble).mean(0)
    dc = d.astype(np.longdouble) - lo
    m2 = (dc * dc).sum(0)
    exact_mean = x.mean(0).astype(np.longdouble) + lo
    np.testing.assert_array_equal(g.count, [len(x)] * 3)
    # the mean to 1e-15 of the spread (1e-3), far below ulp(3e6) = 4.7e-10
    assert np.all(np.abs((g.mean + g._lo.astype(np.longdouble)) - exact_mean) < 1e-18)
    np.testing.assert_allclose(g.m2, np.asarray(m2, np.float64), rtol=1e-12)
    g2 = _merge_packed(rows[::-1].copy())          # another order: same to rounding
    np.testing.assert_allclose(g2.m2, g.m2, rtol=1e-13)
    assert np.all(np.abs((g2.mean - g.mean) + (g2._lo - g._lo)) < 1e-18)
    empty = _merge_packed(np.zeros((3, 4 * 3)))
    assert np.all(empty.count == 0) and np.all(np.isnan(empty.mean))


# -------------------------------------------------------------------------------------
# Single rank: equal to BatchNorm

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((16, 5), -1), ((4, 3, 5, 6), 1),
                                        ((3, 4, 4, 3), -1)])
def test_single_rank_equals_batchnorm(shape, axis, dtype):
    rng = np.random.default_rng(1)
    x = (1e4 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    a = SyncBatchNorm(C, axis=axis, dtype=dtype, comm=OneRank())
    b = bnfast.BatchNorm(C, axis=axis, dtype=dtype)
    for layer in (a, b):
        layer.weight[:] = np.linspace(0.5, 2, C)
        layer.bias[:] = np.linspace(-1, 1, C)
    rt = 1e-6 if dtype == np.float32 else 1e-12
    for _ in range(3):
        ya, yb = a(x), b(x)
        assert ya.dtype == yb.dtype == dtype and ya.shape == shape
        np.testing.assert_allclose(ya, yb, rtol=rt, atol=rt)
        np.testing.assert_allclose(a.running_mean, b.running_mean, rtol=rt)
        np.testing.assert_allclose(a.running_var, b.running_var, rtol=rt)
        da, db = a.backward(dy), b.backward(dy)
        scale = np.abs(db).max()
        tol = rt if dtype == np.float32 else sync_cases.CORE_F64_GRAD_RTOL
        np.testing.assert_allclose(da, db, rtol=0, atol=tol * scale)
        np.testing.assert_allclose(a.grad_bias, b.grad_bias, rtol=rt, atol=rt)
        np.testing.assert_allclose(a.grad_weight, b.grad_weight, rtol=0,
                                   atol=tol * max(1, np.abs(b.grad_weight).max()))
        x = x * 0.5 + 1
    assert a.num_batches_tracked == b.num_batches_tracked == 3


def test_int_and_float16_inputs():
    comm = OneRank()
    x = np.arange(24).reshape(8, 3)
    bn = SyncBatchNorm(3, axis=-1, comm=comm)
    y = bn(x)
    assert y.dtype == np.float64
    ref = Exact(3, axis=-1).forward(x).astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    dx = bn.backward(np.ones((8, 3)))
    assert dx.dtype == np.float64
    h = SyncBatchNorm(3, axis=-1, dtype=np.float32, comm=comm)
    x16 = (np.arange(24).reshape(8, 3) / 7).astype(np.float16)
    y16 = h(x16)
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16, Exact(3, axis=-1).forward(x16).astype(np.float64),
                               atol=2e-3)
    assert h.backward(np.ones((8, 3), np.float16)).dtype == np.float16


def test_out_arguments_and_in_place():
    rng = np.random.default_rng(3)
    x = (1e5 + rng.standard_normal((6, 4))).astype(np.float32)
    dy = rng.standard_normal((6, 4)).astype(np.float32)
    ref = SyncBatchNorm(4, axis=-1, comm=OneRank())
    y_ref = ref(x)
    dx_ref = ref.backward(dy)
    bn = SyncBatchNorm(4, axis=-1, comm=OneRank())
    out = np.empty_like(x)
    assert bn(x, out=out) is out
    np.testing.assert_array_equal(out, y_ref)
    xi = x.copy()
    bn2 = SyncBatchNorm(4, axis=-1, comm=OneRank())
    assert bn2(xi, out=xi) is xi                  # in place: the input is kept for backward
    np.testing.assert_array_equal(xi, y_ref)
    dyi = dy.copy()
    assert bn2.backward(dyi, out=dyi) is dyi
    np.testing.assert_array_equal(dyi, dx_ref)
    o = np.empty_like(x)
    assert bn.backward(dy, out=o) is o
    np.testing.assert_array_equal(o, dx_ref)
    # strided, non-contiguous input and out
    xs = np.asfortranarray(x)
    bn3 = SyncBatchNorm(4, axis=-1, comm=OneRank())
    np.testing.assert_array_equal(bn3(xs, out=np.empty((4, 6), np.float32).T), y_ref)
    for bad, exc in [(np.empty((6, 4), np.float64), TypeError),
                     (np.empty((6, 5), np.float32), ValueError),
                     ([[0.0] * 4] * 6, TypeError)]:
        with pytest.raises(exc):
            bn(x, out=bad)
    with pytest.raises(exc):
        bn.backward(dy, out=[[0.0] * 4] * 6)


def test_bad_out_on_one_rank_raises_on_all_ranks():
    def fn(comm):
        bn = SyncBatchNorm(2, axis=-1, comm=comm)
        x = (np.ones((3, 2)) * np.arange(3)[:, None]).astype(np.float32)
        out = np.empty((3, 2), np.float64 if comm.Get_rank() == 1 else np.float32)
        try:
            bn(x, out=out)
        except (TypeError, RuntimeError) as e:
            return type(e).__name__
        return "no error"

    assert run_ranks(3, fn) == ["RuntimeError", "TypeError", "RuntimeError"]


def test_bad_dy_on_one_rank_is_named_on_the_others():
    def fn(comm):
        bn = SyncBatchNorm(2, axis=-1, comm=comm)
        x = (np.ones((3, 2)) * np.arange(3)[:, None]).astype(np.float32)
        bn(x)
        dy = np.ones((4, 2) if comm.Get_rank() == 2 else (3, 2), np.float32)
        try:
            bn.backward(dy)
        except (ValueError, RuntimeError) as e:
            res = f"{type(e).__name__}: {e}"
        # the ranks still step together afterwards
        bn(x)
        bn.backward(np.ones((3, 2), np.float32))
        return res

    res = run_ranks(3, fn)
    assert res[2].startswith("ValueError: dy must have the shape"), res
    for r in (0, 1):
        assert res[r].startswith("RuntimeError: SyncBatchNorm backward failed on rank(s) [2]"), res


@pytest.mark.parametrize("count", [float("nan"), 1e300, 7.5, "uneven"])
def test_moments_hook_counts_are_checked(count):
    """A communicator that returns a count no Py_ssize_t holds (NaN, 1e300: the cast was
    undefined behaviour), a fraction, or different counts per channel is refused."""
    x = np.random.default_rng(0).standard_normal((6, 3))

    def hook(local):
        g = np.array(local, dtype=np.float64)
        if count == "uneven":
            g[1, 0] = 12.0
        else:
            g[1:, 0] = count
        return g

    with pytest.raises(ValueError, match="moments_hook returned count"):
        bnfast._core._train(x, None, None, 1e-5, 1, None, None, 0.1, None, True, hook)


def test_deepcopy_shares_the_communicator():
    """deepcopy copied the communicator too: one holding a lock (a threaded or mpi4py
    one) raised TypeError; the copy is a layer of the same group."""
    import copy

    def fn(comm):
        bn = SyncBatchNorm(2, axis=-1, comm=comm)
        bn2 = copy.deepcopy(bn)
        assert bn2.comm is comm and bn2.weight is not bn.weight
        x = np.arange(6.0).reshape(3, 2) + comm.Get_rank()
        return bn2(x).tolist() == bn(x).tolist()

    assert run_ranks(2, fn) == [True, True]


def test_empty_rank_gets_empty_output_and_zero_grads():
    def fn(comm):
        r = comm.Get_rank()
        bn = SyncBatchNorm(3, axis=1, comm=comm, dtype=np.float64)
        x = np.zeros((5, 3, 2))[0:0] if r == 1 else \
            np.random.default_rng(r).standard_normal((4, 3, 2))
        y = bn(x)
        dx = bn.backward(np.ones_like(x))
        return y.shape, dx.shape, bn.grad_weight.tolist(), bn.grad_bias.tolist()

    res = run_ranks(2, fn)
    assert res[1] == ((0, 3, 2), (0, 3, 2), [0.0] * 3, [0.0] * 3)
    assert res[0][0] == (4, 3, 2)


# -------------------------------------------------------------------------------------
# Interface

def test_eval_mode_is_local():
    bn = SyncBatchNorm(3, axis=-1, comm=NoComm())
    bn.running_mean[:] = [1, 2, 3]
    bn.running_var[:] = [4, 5, 6]
    bn.eval()
    x = np.arange(12.0).reshape(4, 3).astype(np.float32)
    y = bn(x)
    ref = (x - np.array([1, 2, 3])) / np.sqrt(np.array([4, 5, 6]) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    dx = bn.backward(np.ones_like(x))
    np.testing.assert_allclose(dx, np.ones((4, 1)) / np.sqrt(np.array([4, 5, 6.0]) + 1e-5)
                               + 0 * x, rtol=1e-6)
    # without running statistics, eval uses the local batch (like torch), still local
    nt = SyncBatchNorm(3, axis=-1, track_running_stats=False, comm=NoComm()).eval()
    yn = nt(x)
    np.testing.assert_allclose(yn, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-5)


def test_state_dict_freeze_repr_and_from_batchnorm():
    comm = OneRank()
    bn = SyncBatchNorm(4, axis=-1, comm=comm, momentum=None)
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    bn(x)
    bn(x + 1)
    sd = bn.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var",
                       "num_batches_tracked"}
    # momentum None: the cumulative average of the two batches' statistics
    np.testing.assert_allclose(sd["running_mean"], x.mean(0) + 0.5, rtol=1e-5)
    other = SyncBatchNorm(4, axis=-1, comm=comm).load_state_dict(sd)
    np.testing.assert_array_equal(other.running_var, bn.running_var)
    assert other.num_batches_tracked == 2
    fz = bn.freeze()
    np.testing.assert_allclose(fz(x), bn.eval()(x), rtol=1e-6)
    assert "SyncBatchNorm(4" in repr(bn)
    plain = bnfast.BatchNorm(4, axis=-1, dtype=np.float64, momentum=0.3)
    plain(x.astype(np.float64))
    plain.eval()
    s = SyncBatchNorm.from_batchnorm(plain, comm=comm)
    assert (s.momentum, s.axis, s.dtype, s.training) == (0.3, -1, np.float64, False)
    np.testing.assert_array_equal(s.running_mean, plain.running_mean)
    assert s.running_mean is not plain.running_mean
    assert isinstance(s, bnfast.BatchNorm)


def test_from_batchnorm_refuses_what_is_not_a_layer():
    with pytest.raises(TypeError, match="layer must be a bnfast.BatchNorm.*dict"):
        SyncBatchNorm.from_batchnorm({"weight": np.ones(3)}, comm=OneRank())
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="from_torch"):
        SyncBatchNorm.from_batchnorm(torch.nn.BatchNorm1d(3), comm=OneRank())


def test_from_batchnorm_keeps_statistics_no_longer_tracked():
    # track_running_stats turned off after construction (torch keeps the buffers and
    # uses them in eval): the SyncBatchNorm keeps them, eval uses them, training leaves
    # them alone
    comm = OneRank()
    plain = bnfast.BatchNorm(3, axis=-1, dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((8, 3)) * 2 + 5
    plain(x)
    plain.track_running_stats = False
    s = SyncBatchNorm.from_batchnorm(plain, comm=comm)
    assert s.track_running_stats is False
    np.testing.assert_array_equal(s.running_mean, plain.running_mean)
    before = s.running_mean.copy()
    s(x + 1)                                   # training: batch statistics, no update
    np.testing.assert_array_equal(s.running_mean, before)
    assert s.num_batches_tracked == 1
    s.eval()
    plain.eval()
    np.testing.assert_array_equal(s(x), plain(x))


def test_pickle_drops_the_communicator():
    bn = SyncBatchNorm(3, axis=-1, comm=OneRank())
    bn(np.random.default_rng(0).standard_normal((4, 3)))
    b2 = pickle.loads(pickle.dumps(bn))
    assert b2._comm is None
    np.testing.assert_array_equal(b2.running_mean, bn.running_mean)
    b2.comm = OneRank()
    b2(np.random.default_rng(1).standard_normal((4, 3)))
    assert b2.num_batches_tracked == 2


def test_backward_before_forward_and_errors():
    bn = SyncBatchNorm(3, comm=OneRank())
    with pytest.raises(ValueError, match="before any forward"):
        bn.backward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.ones((1, 3)))
    assert bn.num_batches_tracked == 0
    with pytest.raises(ValueError, match="channels"):
        bn(np.ones((4, 2)))
    bn(np.random.default_rng(0).standard_normal((4, 3)))
    with pytest.raises(ValueError, match="shape of the last input"):
        bn.backward(np.ones((3, 3)))
    with pytest.raises(TypeError, match="real"):
        bn.backward(np.ones((4, 3), np.complex64))


# -------------------------------------------------------------------------------------
# Real MPI processes

def _mpiexec():
    env = os.environ.get("MPIEXEC")
    if env:
        return env
    for d in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        for name in ("mpiexec", "mpirun"):
            p = d / name
            if p.exists() and os.access(p, os.X_OK):
                return str(p)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _mpi_skip_reason():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install mpi4py mpich)"
    if _mpiexec() is None:
        return "no mpiexec found (pip install mpich, or set MPIEXEC)"
    return None


def _env():
    env = dict(os.environ)
    root = str(Path(bnfast.__file__).resolve().parent.parent)   # the bnfast under test
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in
                                                  [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"             # ranks share the machine's cores
    # Open MPI refuses to start as root (containers) unless told to; MPICH ignores these
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


@pytest.mark.parametrize("nprocs", [2, 3])
def test_sync_batchnorm_under_mpiexec(nprocs):
    reason = _mpi_skip_reason()
    if reason:
        pytest.skip(reason)
    cmd = [_mpiexec(), "-n", str(nprocs), sys.executable,
           str(SCRIPTS / "sync_bn_check.py"), str(nprocs)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(),
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} timed out (a rank blocked?): {e.stdout} {e.stderr}")
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{out[-6000:]}"
    for r in range(nprocs):
        assert f"rank {r}/{nprocs}: " in p.stdout and "checks ok" in p.stdout, out


def test_default_communicator_is_comm_world_and_mpi4py_is_lazy():
    reason = _mpi_skip_reason()
    if reason and "mpi4py" in reason:
        pytest.skip(reason)
    code = (
        "import sys, numpy as np\n"
        "import bnfast.distributed as d\n"
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported eagerly'\n"
        "bn = d.SyncBatchNorm(2, axis=-1)\n"
        "bn.eval()(np.ones((3, 2)))\n"
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported in eval'\n"
        "bn.train()(np.arange(6.0).reshape(3, 2))\n"
        "from mpi4py import MPI\n"
        "assert bn.comm is MPI.COMM_WORLD and bn.comm.Get_size() == 1\n"
        "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=_env(), stdin=subprocess.DEVNULL,
                       cwd=tempfile.gettempdir())   # not the checkout's source bnfast/
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout + p.stderr


# -------------------------------------------------------------------------------------
# Core defects found while building SyncBatchNorm (they fail until the core is fixed)

@pytest.mark.parametrize("call", ["batch_norm", "backward_train", "backward_eval",
                                  "frozen"])
def test_core_empty_batch_view_writes_nothing(call):
    # An empty batch that is a view (x[0:0] of a larger array, as a rank with no samples
    # gets from slicing a batch): the core treats it as non-empty (size-0 axes are
    # dropped from its geometry) and writes C*inner elements through out's pointer -
    # heap corruption when out is a fresh 0-byte array.
    x = np.zeros((5, 3, 6))[0:0]
    canary = np.full((5, 3, 6), 7.0)
    out = canary[0:0]
    C = 3
    if call == "batch_norm":
        bnfast.batch_norm(x, np.zeros(C), np.ones(C), axis=1, out=out)
    elif call == "backward_train":
        bnfast.batch_norm_backward(x, x, np.zeros(C), np.ones(C), axis=1, out=out)
    elif call == "backward_eval":
        bnfast.batch_norm_backward(x, x, np.zeros(C), np.ones(C), training=False, axis=1,
                                   out=out)
    else:
        bnfast.FrozenBatchNorm(np.zeros(C), np.ones(C))(x, out=out)
    assert np.all(canary == 7.0), f"{int(np.sum(canary != 7.0))} elements written " \
                                  f"outside a zero-size output"


def test_core_float64_backward_exact_at_price_offsets():
    # float64 prices (offset 1e6, spread 1e-3): BatchNorm's forward is exact to 1e-12,
    # but its backward centres x on the mean rounded to one double (batch_norm_train
    # returns hi + lo rounded), so dx and grad_weight are off by up to ~ulp(1e6)/1e-3
    # relative (the project's float64 target is 1e-12).
    rng = np.random.default_rng(0)
    x = 1e6 + 1e-3 * rng.standard_normal((1000, 2))
    dy = rng.standard_normal((1000, 2))
    ex = Exact(2, axis=-1)
    y_ex = ex.forward(x)
    dx_ex, gw_ex, _ = ex.backward(dy)
    bn = bnfast.BatchNorm(2, axis=-1, dtype=np.float64)
    y = bn(x)
    dx = bn.backward(dy)
    assert np.max(np.abs(y - y_ex)) <= 1e-12 * max(1, float(np.max(np.abs(y_ex))))
    # SyncBatchNorm (same data, one rank) meets the target:
    s = SyncBatchNorm(2, axis=-1, dtype=np.float64, comm=OneRank())
    s(x)
    dxs = s.backward(dy)
    scale = float(np.max(np.abs(dx_ex)))
    assert np.max(np.abs(dxs - dx_ex)) <= 1e-12 * scale
    assert np.max(np.abs(s.grad_weight - gw_ex)) <= 1e-12 * max(1, float(np.max(abs(gw_ex))))
    err = float(np.max(np.abs(dx - dx_ex))) / scale
    gerr = float(np.max(np.abs(bn.grad_weight - gw_ex))) / max(1, float(np.max(abs(gw_ex))))
    assert err <= 1e-12 and gerr <= 1e-12, \
        f"BatchNorm float64 backward: dx rel err {err:.3g}, grad_weight rel err {gerr:.3g}"

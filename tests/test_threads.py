"""Issue 5 (and 3), determinism and the thread count.

Results are bitwise identical for 1, 2, 3, 4 and 8 OpenMP threads and from run to run,
on every layout, forward (train and eval) and backward, with arrays large enough to be
split into many work units and run on several threads. The thread count follows
``set_num_threads``, ``threadpoolctl`` and ``OMP_NUM_THREADS``, computed at call time."""
import json
import os
import subprocess
import tempfile
import sys
import threading

import numpy as np
import pytest

import bnfast
import reference as ref
from arrays import make_values, params, with_layout
from reference import assert_forward_close, assert_grad_close

# BNFAST_TEST_THREADS="1,2,4,16" checks other counts (a many-core machine)
THREADS = [int(n) for n in os.environ.get("BNFAST_TEST_THREADS", "1,2,3,4,8").split(",")]
HAVE_OPENMP = bnfast._core._build_info()["openmp"]
UNDER_SANITIZER = bool(os.environ.get("BNFAST_SANITIZER"))     # .ci/sanitize sets it

# (label, shape, axis, dtype, layout): >= ~1M elements, several work units each
CASES = [
    ("NCHW", (16, 64, 32, 32), 1, np.float32, "c"),                 # 64 fused channels
    # 2 MiB channels: training in superblocks; backward whole (x and dy <= 4 MB)
    ("NCHW-big-channel", (2, 3, 512, 512), 1, np.float32, "c"),
    # 2.5 MiB channels: backward in superblocks too
    ("NCHW-bigger-channel", (1, 2, 1024, 640), 1, np.float32, "c"),
    ("NHWC", (16, 32, 32, 64), -1, np.float32, "c"),                # rows, 4 row blocks
    ("NC-50000x64", (50000, 64), 1, np.float32, "c"),               # rows, 13 row blocks
    ("NC-wide", (4000, 600), -1, np.float32, "c"),                  # 2 channel blocks x rows
    ("NC-fortran", (300000, 16), 1, np.float32, "f"),               # runs of 1.2 MB
    ("NCHW-f64", (8, 32, 64, 64), 1, np.float64, "c"),
    ("NHWC-f64", (8, 64, 64, 32), -1, np.float64, "c"),
    ("NCDHW-channels_last", (4, 16, 8, 32, 32), 1, np.float32, "channels_last"),
    # mid-size rows form: superblocks of 1/8 of the rows, normalization split by rows
    ("NC-4096x64", (4096, 64), -1, np.float32, "c"),
    ("NC-2048x128-f64", (2048, 128), -1, np.float64, "c"),
    # two channel blocks (512 + 188) of two superblocks, cut narrower for more threads
    ("NC-1024x700", (1024, 700), -1, np.float32, "c"),
    # rows wider than a chunk (blocks of 560 + 540 columns), streamed (> 8 MB) off a line
    ("NC-2048x1100", (2048, 1100), -1, np.float32, "c"),
    # flat runs of 528 elements (16 rows of 33), streamed
    ("NC-65536x33", (65536, 33), -1, np.float32, "c"),
    # fewer rows than threads: normalization split by channels
    ("NC-2x200000", (2, 200000), -1, np.float32, "c"),
    ("NCHW-batch1", (1, 64, 64, 64), 1, np.float32, "c"),
    # short runs read as rows of C * inner columns, a channel's columns summed together
    ("NCL-short-runs", (4096, 64, 4), 1, np.float32, "c"),
    ("NCHW-7x7", (32, 256, 7, 7), 1, np.float32, "c"),
    ("NCHW-3x3-f64", (64, 128, 3, 3), 1, np.float64, "c"),
    # narrow rows folded into rows of 255 columns
    ("NHWC-3-channels", (16, 128, 129, 3), -1, np.float32, "c"),
    # channels apart (every other channel of a parent), short runs: units packed
    ("NCL-channel-step", (4096, 64, 4), 1, np.float32, "channel_step"),
    ("NCHW-7x7-channel-step", (32, 128, 7, 7), 1, np.float64, "channel_step"),
    # rows in segments, read in place: a crop of NHWC (32 rows of 64 channels a
    # segment, two levels above), a window of (N, T, C) (128 rows of 32)
    ("NHWC-crop", (16, 32, 32, 64), -1, np.float32, "crop"),
    ("NTC-window", (256, 128, 32), -1, np.float32, "crop"),
    ("NTC-window-f64", (512, 64, 32), -1, np.float64, "crop"),
    # ... and a crop of NCHW with rows of 130: runs, a segment of a channel a call
    ("NCHW-crop", (4, 16, 130, 130), 1, np.float32, "crop"),
    ("NCHW-crop-64", (16, 16, 64, 64), 1, np.float32, "crop"),
    # float16, read natively (offset 100: float16 has no room for 1e5)
    ("NCHW-f16", (16, 64, 32, 32), 1, np.float16, "c"),
    ("NHWC-f16", (16, 32, 32, 64), -1, np.float16, "c"),
    ("NCHW-7x7-f16", (32, 256, 7, 7), 1, np.float16, "c"),
]


@pytest.fixture(autouse=True)
def _restore_threads():
    bnfast.set_num_threads(None)
    yield
    bnfast.set_num_threads(None)


def _bits(a):
    a = np.asarray(a)
    return a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes()


def _on_threads(ops, counts=(1, 2, 3)):
    """ops() on each thread count in turn, the default put back after: {count: result}."""
    runs = {}
    try:
        for n in counts:
            bnfast.set_num_threads(n)
            runs[n] = ops()
    finally:
        bnfast.set_num_threads(None)
    return runs


def _all_ops(x, axis, w, b, rm, rv, dy):
    """Every kernel path on x; returns a list of (name, bits)."""
    res = []
    rm1, rv1 = rm.copy(), rv.copy()
    y, m, s = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm1, running_var=rv1)
    res += [("train y", _bits(y)), ("train mean", _bits(m)), ("train invstd", _bits(s)),
            ("running_mean", _bits(rm1)), ("running_var", _bits(rv1))]
    o = np.empty_like(x)
    bnfast.batch_norm_train(x, w, b, axis=axis, out=o)
    res.append(("train y out=", _bits(o)))
    res.append(("eval", _bits(bnfast.batch_norm(x, rm, rv, w, b, axis=axis))))
    res.append(("frozen", _bits(bnfast.FrozenBatchNorm(rm, rv, w, b, axis=axis)(x))))
    for training in (True, False):
        st = (m, s) if training else (rm, 1 / np.sqrt(rv + 1e-5))
        dx, dw, db = bnfast.batch_norm_backward(dy, x, st[0], st[1], w, training=training,
                                                axis=axis)
        res += [(f"dx[{training}]", _bits(dx)), (f"dweight[{training}]", _bits(dw)),
                (f"dbias[{training}]", _bits(db))]
    return res


@pytest.mark.parametrize("label,shape,axis,dtype,layout", CASES, ids=[c[0] for c in CASES])
def test_bitwise_identical_for_any_thread_count(label, shape, axis, dtype, layout):
    offset = 100.0 if dtype == np.float16 else 1e5
    x = with_layout(make_values(shape, dtype, 1, axis=axis, offset=offset), layout, axis=axis)
    C = shape[axis]
    w, b, rm, rv = params(C, np.float64, 1)
    dy = with_layout(make_values(shape, dtype, 2, axis=axis), layout, axis=axis)
    if dtype == np.float16:        # dweight, a sum over 16K elements, within float16's range
        rm = rm + offset
        dy = dy / np.float16(64)
    bnfast.set_num_threads(1)
    base = _all_ops(x, axis, w, b, rm, rv, dy)
    # the single-thread result is right (so the comparison below is not of garbage)
    y_ref, m_ref, s_ref = ref.batch_norm_train(x, w, b, axis=axis)
    y = bnfast.batch_norm_train(x, w, b, axis=axis)[0]
    assert_forward_close(y, y_ref)
    dx = bnfast.batch_norm_backward(dy, x, m_ref, s_ref, w, axis=axis)[0]
    dx_ref = ref.batch_norm_backward(dy, x, m_ref, s_ref, w, axis=axis)[0]
    assert_grad_close(dx, dx_ref, scale=np.max(np.abs(w * s_ref)) * np.max(np.abs(dy)))
    for n in THREADS + [2]:                         # 2 twice: run to run as well
        bnfast.set_num_threads(n)
        assert bnfast.get_num_threads() == (n if HAVE_OPENMP else 1)
        got = _all_ops(x, axis, w, b, rm, rv, dy)
        for (name, a), (_, g) in zip(base, got):
            assert a == g, f"{label}: {name} differs between 1 and {n} threads"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_when_a_tile_is_redone(dtype):
    """A column whose first value is far from its tile's mean has its tile's sums taken
    again from a better shift. Only that column: when a whole block was redone, the other
    columns' bits depended on which block they shared with it, and so on the thread count
    (blocks are cut narrower for more threads)."""
    x = make_values((1000, 512), dtype, 3, axis=-1, offset=1e3)
    x[0, 5] = 1e6
    x[0, 300] = -5e5
    C = x.shape[1]
    w, b, rm, rv = params(C, np.float64, 1)
    dy = make_values(x.shape, dtype, 4, axis=-1)
    bnfast.set_num_threads(1)
    base = _all_ops(x, -1, w, b, rm, rv, dy)
    y_ref, m_ref, s_ref = ref.batch_norm_train(x, w, b, axis=-1)
    assert_forward_close(bnfast.batch_norm_train(x, w, b, axis=-1)[0], y_ref)
    for n in THREADS:
        bnfast.set_num_threads(n)
        got = _all_ops(x, -1, w, b, rm, rv, dy)
        for (name, a), (_, g) in zip(base, got):
            assert a == g, f"{name} differs between 1 and {n} threads"


def test_bitwise_identical_under_threadpoolctl_and_default():
    """The default count (OpenMP's) and a threadpoolctl limit give the same bits."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    label, shape, axis, dtype, layout = CASES[2]
    x = make_values(shape, dtype, 3, axis=axis, offset=1e5)
    C = shape[axis]
    w, b, rm, rv = params(C, np.float64, 3)
    dy = make_values(shape, dtype, 4, axis=axis)
    base = _all_ops(x, axis, w, b, rm, rv, dy)
    with threadpoolctl.threadpool_limits(1):
        assert bnfast.get_num_threads() == 1
        assert _all_ops(x, axis, w, b, rm, rv, dy) == base


def test_set_num_threads_from_another_python_thread():
    """set_num_threads is process-wide; changing it from one Python thread while another
    computes changes no bits of the other's results."""
    x = make_values((50000, 64), np.float32, 5, axis=1, offset=1e5)
    w, b, rm, rv = params(64, np.float64, 5)
    bnfast.set_num_threads(1)
    expect = _bits(bnfast.batch_norm_train(x, w, b)[0])
    stop = threading.Event()
    errors = []

    def churn():
        k = 0
        while not stop.is_set():
            bnfast.set_num_threads([1, 2, 3, 4, 8, None][k % 6])
            k += 1
            stop.wait(0.0005)

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(30):
            got = _bits(bnfast.batch_norm_train(x, w, b)[0])
            if got != expect:
                errors.append("differs")
    finally:
        stop.set()
        t.join()
    assert not errors


# ----------------------------------------------------------------------------------
# set_num_threads / get_num_threads

def test_set_num_threads_none_restores_default():
    default = bnfast.get_num_threads()
    assert default >= 1
    for n in (1, 3, 8):
        bnfast.set_num_threads(n)
        assert bnfast.get_num_threads() == (n if HAVE_OPENMP else 1)
    bnfast.set_num_threads(None)
    assert bnfast.get_num_threads() == default
    bnfast.set_num_threads(5)
    bnfast.set_num_threads(0)
    assert bnfast.get_num_threads() == default


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (1.5, TypeError),
                                     ("2", TypeError), ([2], TypeError)])
def test_set_num_threads_refuses(bad, exc):
    before = bnfast.get_num_threads()
    with pytest.raises(exc, match=r"\bn\b|num_threads"):
        bnfast.set_num_threads(bad)
    assert bnfast.get_num_threads() == before


def test_threadpoolctl_limits_bnfast():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not HAVE_OPENMP:
        pytest.skip("built without OpenMP")
    default = bnfast.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1):
        assert bnfast.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert bnfast.get_num_threads() == 1
    assert bnfast.get_num_threads() == default
    with threadpoolctl.threadpool_limits(limits=3, user_api="openmp"):
        assert bnfast.get_num_threads() == 3


def _linked_openmp_runtime():
    """Real path of the OpenMP runtime bnfast._core is linked against (Linux, ldd)."""
    try:
        out = subprocess.run(["ldd", bnfast._core.__file__], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if any(k in line for k in ("libgomp", "libomp", "libiomp")) and "=>" in line:
            path = line.split("=>")[1].split("(")[0].strip()
            if path and os.path.exists(path):
                return os.path.realpath(path)
    return None


def test_threadpoolctl_sees_bnfast_openmp_runtime():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not HAVE_OPENMP:
        pytest.skip("built without OpenMP")
    if not sys.platform.startswith("linux"):
        pytest.skip("uses ldd")
    lib = _linked_openmp_runtime()
    if lib is None:
        pytest.skip("could not resolve the OpenMP runtime with ldd")
    info = threadpoolctl.threadpool_info()
    paths = {os.path.realpath(d["filepath"]) for d in info if d["user_api"] == "openmp"}
    assert lib in paths, f"threadpoolctl lists {paths}, bnfast uses {lib}"


# ----------------------------------------------------------------------------------
# In fresh processes: OMP_NUM_THREADS, and how many OS threads a call really starts

PROBE = r"""
import json, os, sys
import numpy as np
import bnfast

def tasks():
    return len(os.listdir("/proc/self/task"))

out = {"get": bnfast.get_num_threads(), "t0": tasks()}
small = np.random.rand(64, 64).astype(np.float32)
big = np.random.rand(64, 64, 32, 32).astype(np.float32)      # 4M elements, 64 channels
mode = sys.argv[1]
if mode == "limits":
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        out["get_limited"] = bnfast.get_num_threads()
        bnfast.batch_norm_train(big)
        bnfast.batch_norm_backward(big, big, np.zeros(64), np.ones(64))
        out["t_limited"] = tasks()
    bnfast.set_num_threads(4)
    bnfast.batch_norm_train(small)
    bnfast.batch_norm(small, np.zeros(64), np.ones(64))
    bnfast.FrozenBatchNorm(np.zeros(64), np.ones(64))(small)
    out["t_small"] = tasks()
    bnfast.batch_norm_train(big)
    out["t_big4"] = tasks()
else:
    bnfast.batch_norm_train(big)
    out["t_big"] = tasks()
print(json.dumps(out))
"""


def _probe(mode, **env):
    if not sys.platform.startswith("linux"):
        pytest.skip("counts threads in /proc")
    e = dict(os.environ)
    e.pop("OMP_NUM_THREADS", None)
    e.update(env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                       env=e, timeout=120,
                       cwd=tempfile.gettempdir())   # not the checkout's source bnfast/
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n", [1, 3])
def test_omp_num_threads_honoured(n):
    if not HAVE_OPENMP:
        pytest.skip("built without OpenMP")
    out = _probe("default", OMP_NUM_THREADS=str(n))
    assert out["get"] == n
    # libgomp starts n - 1 worker threads for a region of n threads
    assert out["t_big"] - out["t0"] == n - 1, out


def test_threads_started_only_for_large_work():
    """Under threadpool_limits(1) no worker thread is ever started; small inputs never
    open a parallel region; a large one with set_num_threads(4) uses 4 threads."""
    pytest.importorskip("threadpoolctl")
    if not HAVE_OPENMP:
        pytest.skip("built without OpenMP")
    out = _probe("limits", OMP_NUM_THREADS="2")
    assert out["get_limited"] == 1
    assert out["t_limited"] == out["t0"], out
    assert out["t_small"] == out["t0"], out
    assert out["t_big4"] - out["t0"] == 3, out


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_channel_blocks_give_the_bits_of_one_channel_at_a_time(dtype):
    """NCHW training and backward read blocks of channels that lie back to back a row at
    a time (1.5 MB of each array); training takes the next block's statistics beside
    this block's normalization. So do the statistics and backward sums alone, and
    backward with the statistics held fixed (from 16 MB of x; lowered here). 37
    channels: uneven blocks; runs enough for two or three tiles of statistics, few
    enough that a channel is taken whole (x <= 512 KB, x and dy <= 512 KB for backward:
    float64 in one tile); one channel with a tile redone. The same array with a gap after
    each channel is read a channel at a time: every bit must agree, on 1 and 3
    threads."""
    runs = {np.float16: 128, np.float32: 96, np.float64: 48}[dtype]
    shape, hw = (runs, 37, 24, 24), 24 * 24
    offset = 100.0 if dtype == np.float16 else 1e5
    x = make_values(shape, dtype, 4, axis=1, offset=offset)
    x[0, 3, 0, 0] = 2 * offset
    dy = make_values(shape, dtype, 5, axis=1)
    if dtype == np.float16:
        dy = dy / np.float16(64)
    w, b, _, _ = params(37, np.float64, 1)

    def gapped(a):
        parent = np.zeros(shape[:2] + (hw + 16,), a.dtype)
        parent[..., :hw] = a.reshape(shape[:2] + (hw,))
        return parent[..., :hw].reshape(shape)

    n_per = shape[0] * hw

    def ops(x, dy):
        y, m, s = bnfast.batch_norm_train(x, w, b, axis=1)
        dx, dw, db = bnfast.batch_norm_backward(dy, x, m, s, w, axis=1)
        # the reductions alone: moments, and training and backward with their sums
        # exchanged (as over processes) before the second pass
        mom = bnfast.moments(x, axis=1)
        yh, mh, sh = bnfast._core._train(x, w, b, 1e-5, 1, None, None, 0.1, None, True,
                                  lambda local: local)
        dxh, dwh, dbh = bnfast._core._backward(dy, x, m, s, w, True, 1, None,
                                        lambda local: (local, n_per))
        # and backward with the statistics held fixed
        dxe, dwe, dbe = bnfast.batch_norm_backward(dy, x, m, s, w, axis=1, training=False)
        return [_bits(a) for a in (y, m, s, dx, dw, db, mom.mean, mom.m2, yh, mh, sh,
                                   dxh, dwh, dbh, dxe, dwe, dbe)]

    names = ("y", "mean", "invstd", "dx", "dweight", "dbias", "moments mean", "moments m2",
             "y (hook)", "mean (hook)", "invstd (hook)", "dx (hook)", "dweight (hook)",
             "dbias (hook)", "dx (eval)", "dweight (eval)", "dbias (eval)")
    xg, dyg = gapped(x), gapped(dy)
    assert xg.strides[1] != hw * x.itemsize and np.array_equal(xg, x)
    old = bnfast._core._set_reduce_blocks_min(0)   # the reductions alone and eval in blocks
    try:
        for n in (1, 3):
            bnfast.set_num_threads(n)
            for name, a, g in zip(names, ops(x, dy), ops(xg, dyg)):
                assert a == g, f"{name} differs, {n} thread(s)"
    finally:
        bnfast._core._set_reduce_blocks_min(old)
    y, m, s = bnfast.batch_norm_train(x, w, b, axis=1)
    assert_forward_close(y, ref.batch_norm_train(x, w, b, axis=1)[0])


@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("shape", [(2, 5, 300, 256), (4, 80, 28, 28), (64, 3, 28, 28),
                                   (3001, 256), (20003, 7)])
def test_prefetching_the_next_channel_changes_no_bits(n_threads, shape):
    """From DRAM (x, or x and dy, of 16 MB or more; lowered here) a fused training
    channel too large to pipeline (614 KB) prefetches the next channel as it is
    normalized, and a backward block (x and dy) the next block as its dx goes (on one
    thread in blocks of at most 256 KB, the next block's x during the sums: channels of
    12.5 KB and of 196 KB, near the 224 KB where that stops; larger ones, 614 KB, only
    where _set_fetch_large says so: on AMD by default); pipelined
    training blocks (runs of 28 x 28, three blocks of channels) read the next block's
    statistics beside; rows (wide, and narrow ones folded) take their statistics with
    prefetches into both L1 and L2 (BNF_FROM_DRAM). Prefetches and blocks only: the bits
    of the same calls without them, and right. (From DRAM the backward sums of rows go a
    row at a time or four over whole rows, in another order:
    test_rows_from_dram_sum_in_their_own_order.)"""
    x = make_values(shape, np.float32, 6, axis=1, offset=1e4)
    dy = make_values(shape, np.float32, 7, axis=1)
    w, b, _, _ = params(shape[1], np.float64, 2)

    def ops():
        y, m, s = bnfast.batch_norm_train(x, w, b, axis=1)
        if len(shape) == 2:                 # rows: the forward only
            return [_bits(a) for a in (y, m, s)], y
        dx, dw, db = bnfast.batch_norm_backward(dy, x, m, s, w, axis=1)
        return [_bits(a) for a in (y, m, s, dx, dw, db)], y

    bnfast.set_num_threads(n_threads)
    fetched = {}
    try:
        plain, _ = ops()
        old = bnfast._core._set_reduce_blocks_min(0)
        # channels over 256 KB prefetch the next one in backward by CPU vendor: both ways
        old_large = bnfast._core._set_fetch_large(None)
        try:
            for large in (False, True):
                bnfast._core._set_fetch_large(large)
                fetched[large], y = ops()
        finally:
            bnfast._core._set_reduce_blocks_min(old)
            bnfast._core._set_fetch_large(old_large)
    finally:
        bnfast.set_num_threads(None)
    assert plain == fetched[False] == fetched[True]
    assert_forward_close(y, ref.batch_norm_train(x, w, b, axis=1)[0])


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((300, 1024), 1), ((257, 2048), -1), ((200, 1024), 1),
                                        ((512, 768), 1), ((100, 1024), 1)])
def test_wide_rows_of_one_superblock(shape, axis, dtype):
    """Rows wider than a block (512 channels) and few enough to be one superblock: where a
    unit's x (and dy) is over 1 MB, training and backward take the statistics (sums) of
    every unit and then normalize (dx) in memory order; smaller ones ((100, 1024), and
    (200, 1024) float32 training) each unit whole. Right, the same bits on one and two
    threads, and those of the two passes the distributed hooks force."""
    x = make_values(shape, dtype, 13, axis=axis, offset=1e4)
    dy = make_values(shape, dtype, 14, axis=axis)
    C = shape[axis]
    w, b, _, _ = params(C, dtype, 6)
    n_per = x.size // C

    def ops():
        y, m, s = bnfast.batch_norm_train(x, w, b, axis=axis)
        dx, dw, db = bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis)
        # the hooks take the two passes whatever the shape
        yh = bnfast._core._train(x, w, b, 1e-5, axis, None, None, 0.1, None, True,
                                 lambda mom: mom)[0]
        dxh, dwh, dbh = bnfast._core._backward(dy, x, m, s, w, True, axis, None,
                                               lambda local: (local, n_per))
        assert [_bits(a) for a in (y, dx, dw, db)] == [_bits(a) for a in (yh, dxh, dwh, dbh)]
        return [_bits(a) for a in (y, m, s, dx, dw, db)], (y, dx)

    got = {}
    try:
        for n_threads in (1, 2):
            bnfast.set_num_threads(n_threads)
            got[n_threads], (y, dx) = ops()
    finally:
        bnfast.set_num_threads(None)
    assert got[1] == got[2]
    ry, rmean, rinvstd = ref.batch_norm_train(x, w, b, axis=axis)
    assert_forward_close(y, ry)
    assert_grad_close(dx, ref.batch_norm_backward(dy, x, rmean, rinvstd, w, axis=axis)[0])


def _bits_under_settings(run, settings):
    """run() (its results' bits) on one thread, two threads and in the plain loops (SIMD
    level 0), under each of `settings`: dicts of _core setters' names to values, with
    "alloc_fails" making the kernels' heap buffers fail. Asserts they are all the same;
    returns the first. Every setting is put back."""
    from bnfast import _core

    names = sorted({k for d in settings for k in d if k != "alloc_fails"})
    old = {k: getattr(_core, "_set_" + k)(None) for k in names}
    level = _core._set_simd_level(None)
    got = []
    # under the sanitizer (CI's .ci/sanitize) memory, not bits, is checked: one thread at
    # the default level walks the same work units as two
    runs = ((2, level), (1, 0)) if UNDER_SANITIZER else ((1, level), (2, level), (1, 0))
    try:
        for n_threads, lv in runs:
            bnfast.set_num_threads(n_threads)
            _core._set_simd_level(lv)
            for d in settings:
                for k in names:
                    getattr(_core, "_set_" + k)(d.get(k, old[k]))
                _core._set_kernel_alloc_fails(d.get("alloc_fails", False))
                try:
                    got.append(run())
                finally:
                    _core._set_kernel_alloc_fails(False)
    finally:
        bnfast.set_num_threads(None)
        _core._set_simd_level(level)
        for k in names:
            getattr(_core, "_set_" + k)(old[k])
    assert all(v == got[0] for v in got)
    return got[0]


def _placed(a, at):
    """A copy of a in memory that starts on a 64-byte line (at == "line") or 16 bytes
    into one ("off"); None: a itself."""
    if at is None:
        return a
    buf = np.empty(a.size + 64 // a.itemsize, a.dtype)
    i = (-buf.ctypes.data % 64 + (16 if at == "off" else 0)) // a.itemsize
    out = buf[i:i + a.size].reshape(a.shape)
    out[...] = a
    return out


# Rows wider than a block (512 channels), float32, read from DRAM (here: from any size),
# or the backward sums of rows in cache from 1.5 MiB (here: from any size): the backward
# sums go whole rows a unit (_full_rows) up to the widest rows whose sums stay in L1, and
# the eval-mode backward then stores dx as its sums read dy (dx rows on lines, or
# contiguous and shifted onto them). Wider rows go in blocks that begin on dx's lines
# (_line_blocks).
FULL_ROWS_SHAPES = [
    ((600, 640), 1),            # two blocks before: 512 + 128
    ((520, 768), 1),            # 512 + 256, rows of 3 KB
    ((530, 1000), 1),           # rows not whole lines
    ((40, 14, 1024), -1),       # channels last, rows of 4 KB
    ((700, 520), 1),            # a block and 8 columns
    ((300, 1536), 1),           # blocks on dx's lines: 3 or 4 of them
    ((6, 20, 2056), -1),        # ... the last one 8 columns (or 8 + the shift)
]


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("stream,dram", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("out_at", ["line", "off", None])
@pytest.mark.parametrize("shape,axis", FULL_ROWS_SHAPES)
def test_full_rows_backward_sums(shape, axis, out_at, stream, dram, dtype):
    """Whole rows, and blocks on dx's lines, give the bits of blocks of 512 columns (each
    column's moments and sums take its rows in the same order; the training and
    `moments` statistics whole rows too), on one and two threads, in the plain
    loops (SIMD level 0), with the kernels' heap buffers failing (then blocks again, dx
    not shifted), for both backward forms, dx on a line, 16 bytes off one or allocated;
    and match the float64 twin. float64 and float16 too (their backward sums whole rows,
    four at a time; their statistics in blocks). x and dy are left as they were."""
    if UNDER_SANITIZER and dtype != np.float32:
        # 189 cases took 184 s of the sanitizer job's ~1000 (Zen 3); its float64 and
        # float16 rows loops run there in test_simd_paths and test_awkward
        pytest.skip("float32 only under the sanitizer")
    from bnfast import _core

    x = make_values(shape, dtype, 31, axis=axis, offset=1e2 if dtype == np.float16 else 1e4)
    dy = make_values(shape, dtype, 32, axis=axis)
    x0, dy0 = x.copy(), dy.copy()
    C = shape[axis]
    w, _, _, _ = params(C, dtype, 8)
    _, mean, invstd = bnfast.batch_norm_train(x, axis=axis)
    grads = {}

    def run():
        out = None if out_at is None else _placed(np.full(shape, np.nan, dtype), out_at)
        mom = bnfast.moments(x, axis=axis)
        res = [[_bits(a) for a in bnfast.batch_norm_train(x, w, axis=axis, out=out)],
               [_bits(a) for a in (mom.mean, mom.m2)]]
        for training in (True, False):
            out = None if out_at is None else _placed(np.full(shape, np.nan, dtype), out_at)
            dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                    training=training, out=out)
            res.append([_bits(a) for a in (dx, dw, db)])
            grads[training] = (dx, dw, db)
        return res

    old = (_core._set_reduce_blocks_min(0), _core._set_stream_bytes(0 if stream else 1 << 62))
    if not dram:
        _core._set_reduce_blocks_min(old[0])
    # in cache: the backward sums whole rows from any size (by default from 1.5 MiB)
    sums = {} if dram else dict(full_rows_sums_bytes=0)
    try:
        _bits_under_settings(run, [
            dict(full_rows_cols=0, line_blocks=False, **sums),
            dict(full_rows_cols=0, line_blocks=True, **sums),
            dict(full_rows_cols=4096, line_blocks=True, **sums),
            dict(full_rows_cols=4096, line_blocks=True, alloc_fails=True, **sums)])
    finally:
        _core._set_reduce_blocks_min(old[0])
        _core._set_stream_bytes(old[1])
    assert x.tobytes() == x0.tobytes() and dy.tobytes() == dy0.tobytes()
    for training in (True, False):
        want = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=training)
        for a, b in zip(grads[training], want):
            assert_grad_close(a, b)


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("out_at", ["line", "off", None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((40, 2048), 1), ((3, 7, 4096), -1), ((9, 8192), 1),
                                        ((30, 1040), 1)])
def test_wide_rows_whole(shape, axis, dtype, out_at):
    """Contiguous rows wider than a chunk (1024) with a streamed output are normalized
    and their dx computed whole rows at a time (one flat run, the factors repeated on the
    heap): the bits of blocks of columns, on one and two threads, in the plain loops,
    with the heap failing (blocks then), for eval, training and both backward forms; the
    output on a line, 16 bytes off one or allocated."""
    from bnfast import _core

    x = make_values(shape, dtype, 35, axis=axis, offset=1e4)
    dy = make_values(shape, dtype, 36, axis=axis)
    C = shape[axis]
    w, b, rm, rv = params(C, dtype, 10)

    def run():
        res = []
        out = None if out_at is None else _placed(np.full(shape, np.nan, dtype), out_at)
        res.append(bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=out))
        out = None if out_at is None else _placed(np.full(shape, np.nan, dtype), out_at)
        y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, out=out)
        res += [y, mean, invstd]
        for training in (True, False):
            out = None if out_at is None else _placed(np.full(shape, np.nan, dtype), out_at)
            res += bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                              training=training, out=out)
        ys.append(y)
        return [_bits(a) for a in res]

    ys = []
    old = _core._set_stream_bytes(0)
    try:
        _bits_under_settings(run, [dict(wide_flat=False), dict(wide_flat=True),
                                   dict(wide_flat=True, alloc_fails=True)])
    finally:
        _core._set_stream_bytes(old)
    assert_forward_close(ys[0], ref.batch_norm_train(x, w, b, axis=axis)[0])


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", [((900, 300), 1), ((10, 20, 10, 300), -1)])
def test_kernel_buffers_out_of_memory(shape, axis, dtype, stream):
    """Rows of 300 go as flat runs of four rows (1200 elements, whole lines), their
    factors repeated in a heap buffer; where that buffer cannot be had, as runs of a row:
    the same bits (eval, training, both backward forms), streamed or not."""
    from bnfast import _core

    x = make_values(shape, dtype, 33, axis=axis, offset=1e4 if dtype != np.float16 else 1e2)
    dy = make_values(shape, dtype, 34, axis=axis)
    C = shape[axis]
    w, b, rm, rv = params(C, dtype, 9)

    def run():
        res = [bnfast.batch_norm(x, rm, rv, w, b, axis=axis)]
        y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis)
        res += [y, mean, invstd]
        for training in (True, False):
            res += bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                              training=training)
        return [_bits(a) for a in res], y

    old = _core._set_stream_bytes(0 if stream else 1 << 62)
    try:
        plain, y = run()
        _core._set_kernel_alloc_fails(True)
        try:
            failing, _ = run()
        finally:
            _core._set_kernel_alloc_fails(False)
    finally:
        _core._set_stream_bytes(old)
    assert plain == failing
    assert_forward_close(y, ref.batch_norm_train(x, w, b, axis=axis)[0])


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", [((1200, 256), -1), ((900, 300), 1),
                                        ((6, 64, 30, 30), 1), ((2000, 64, 4), 1),
                                        ((16, 7, 7, 512), -1)])
def test_prefetching_ordered_units_changes_no_bits(shape, axis, dtype, n_threads):
    """Normalize and dx of an input over 256 KB whose output is not streamed prefetch it
    where _set_prefetch_ordered says so (on AMD, rows under 1 KB by default), else not:
    rows (flat, not whole lines, channels last), runs and short runs read as rows; eval
    into out= and allocated, training, both backward forms. The same bits every way, and
    right."""
    x = make_values(shape, dtype, 11, axis=axis, offset=100.0 if dtype == np.float16 else 1e4)
    dy = make_values(shape, dtype, 12, axis=axis)
    w, b, rm, rv = params(shape[axis], dtype, 5)
    assert 1 << 18 < x.nbytes < 1 << 22         # over CACHED_BYTES, not streamed (8 MB)

    def ops():
        out = np.full_like(x, np.nan)
        y = bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=out)
        ya = bnfast.batch_norm(x, rm, rv, w, b, axis=axis)
        yt, m, s = bnfast.batch_norm_train(x, w, b, axis=axis)
        dx, dw, db = bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis)
        ex = bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis, training=False)
        return [_bits(a) for a in (y, ya, yt, m, s, dx, dw, db) + tuple(ex)], (y, yt, dx)

    bnfast.set_num_threads(n_threads)
    old = bnfast._core._set_prefetch_ordered(None)
    got = {}
    try:
        for on in (False, True, 2):
            bnfast._core._set_prefetch_ordered(on)
            got[on], res = ops()
    finally:
        bnfast._core._set_prefetch_ordered(old)
        bnfast.set_num_threads(None)
    assert got[False] == got[True] == got[2]
    y, yt, dx = res
    assert_forward_close(y, ref.batch_norm(x, rm, rv, w, b, axis=axis))
    ry, rmean, rinvstd = ref.batch_norm_train(x, w, b, axis=axis)
    assert_forward_close(yt, ry)
    assert_grad_close(dx, ref.batch_norm_backward(dy, x, rmean, rinvstd, w, axis=axis)[0])


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("quads", [False, True, 3072, "spaced"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", [((3001, 256), 1), ((2003, 300), -1),
                                        ((9, 7, 11, 128), -1), ((20003, 7), 1),
                                        ((500, 64, 4), 1), ((5001, 64), 1), ((3001, 100), -1),
                                        ((2001, 33), 1), ((1031, 1040), -1), ((301, 2048), 1),
                                        ((7, 5, 3, 600), -1)])
def test_rows_from_dram_sum_in_their_own_order(dtype, shape, axis, quads):
    """From DRAM (lowered here) the training backward sums of rows of 512 bytes or more
    (wide rows; narrower ones folded to such; short runs read as rows) go a row at a time
    in memory order (float32; float64's compensated sums and float16 keep four); with
    `quads` (_whole_rows: on AMD) float32 and float16 rows go four at a time, whole rows a
    unit however wide (blocks of columns only where threads outnumber the units; the
    eval-mode backward's sums too where rows exceed 1 KB), with `quads` a number of bytes
    (_quads_min_bytes) float32 rows only from that width, narrower ones a row at a time;
    "spaced" (_spaced_quads: the default on AMD without AVX-512) float32 rows four a
    quarter of a unit apart: another order of the additions than in cache, the same bits
    for any thread count (and for the sums exchanged over processes), and right."""
    x = make_values(shape, dtype, 8, axis=axis, offset=1e4)
    dy = make_values(shape, dtype, 9, axis=axis)
    C = shape[axis]
    w = params(C, dtype, 4)[0]
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean = x.astype(np.float64).mean(axis=red)
    invstd = 1 / np.sqrt(x.astype(np.float64).var(axis=red) + 1e-5)
    n_per = x.size // C

    def ops():
        dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
        sums = []                        # the float64 sums themselves: their every bit

        def hook(local):
            sums.append(local.copy())
            return local, n_per

        dxh, dwh, dbh = bnfast._core._backward(dy, x, mean, invstd, w, True, axis, None, hook)
        # eval mode: its sums four rows at a time too where rows exceed 1 KB (quads)
        ev = bnfast.batch_norm_backward(dy, x, mean, invstd, w, training=False, axis=axis)
        return [_bits(a) for a in (dx, dw, db, dxh, dwh, dbh, sums[0]) + ev], (dx, dw, db,
                                                                             ev[0])

    old = (bnfast._core._set_reduce_blocks_min(0), bnfast._core._set_whole_rows(bool(quads)),
           bnfast._core._set_quads_min_bytes(quads if type(quads) is int else 0),
           bnfast._core._set_spaced_quads(quads == "spaced"))
    try:
        runs = _on_threads(ops)
    finally:
        bnfast._core._set_reduce_blocks_min(old[0])
        bnfast._core._set_whole_rows(old[1])
        bnfast._core._set_quads_min_bytes(old[2])
        bnfast._core._set_spaced_quads(old[3])
    bits = runs[1][0]
    assert bits[:3] == bits[3:6], "the sums exchanged (hook) give other bits"

    assert runs[2][0] == bits and runs[3][0] == bits
    dx, dw, db, dx_eval = runs[1][1]
    assert_grad_close(dx_eval, ref.batch_norm_backward(dy, x, mean, invstd, w, training=False,
                                                       axis=axis)[0], what="eval-mode dx")
    dx_ref, dw_ref, db_ref = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    absdy = np.abs(dy.astype(np.float64))
    xhat = np.abs((x.astype(np.float64) - np.expand_dims(mean, red)) *
                  np.expand_dims(invstd, red))
    assert_grad_close(dx, dx_ref, what="dx")
    assert_grad_close(dw, dw_ref, scale=np.max((absdy * xhat).sum(axis=red)), what="dweight")
    assert_grad_close(db, db_ref, scale=np.max(absdy.sum(axis=red)), what="dbias")


L1_KINDS = ("reduce", "normalize", "dx")


def test_l1_rows_max_kinds():
    """_set_l1_rows_max sets each kind's limit alone, returns the one it replaces, and
    names the kinds it takes."""
    old = {k: bnfast._core._set_l1_rows_max(None, k) for k in L1_KINDS}
    try:
        for i, k in enumerate(L1_KINDS):
            bnfast._core._set_l1_rows_max(1000 + i, k)
        assert [bnfast._core._set_l1_rows_max(None, k) for k in L1_KINDS] == \
            [1000, 1001, 1002]
        assert bnfast._core._set_l1_rows_max(None) == 1000      # "reduce" by default
    finally:
        for k, n in old.items():
            bnfast._core._set_l1_rows_max(n, k)
    with pytest.raises(ValueError, match="kind"):
        bnfast._core._set_l1_rows_max(None, "sums")


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((1031, 1040), -1), ((301, 2048), 1),
                                        ((7, 5, 3, 600), -1), ((2003, 300), -1)])
def test_whole_rows_statistics_change_no_bits(dtype, shape, axis):
    """From DRAM (lowered here) the statistics of rows wider than a block go whole rows a
    unit on AMD (_whole_rows), blocks of 512 columns elsewhere, and rows of more than 2 KB
    prefetch nothing ahead into L1 there (_set_l1_rows_max; the normalize of rows over
    1 KB and dx of any rows prefetch into L2 instead): each column's tiles are fixed by
    the shape, so the same bits every way and for any thread count, and right."""
    x = make_values(shape, dtype, 10, axis=axis, offset=1e4)
    dy = make_values(shape, dtype, 11, axis=axis)
    w, b, _, _ = params(shape[axis], np.float64, 3)

    def ops():
        y, m, s = bnfast.batch_norm_train(x, w, b, axis=axis)
        mo = bnfast.moments(x, axis=axis)
        dx = bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis)[0]
        return [_bits(a) for a in (y, m, s, mo.mean, mo.var, dx)], (y, dx)

    old = (bnfast._core._set_reduce_blocks_min(0), bnfast._core._set_whole_rows(None),
           {k: bnfast._core._set_l1_rows_max(None, k) for k in L1_KINDS})
    runs = {}
    try:
        for whole in (False, True):
            bnfast._core._set_whole_rows(whole)
            for l1 in (0, 1 << 40):
                for k in L1_KINDS:
                    bnfast._core._set_l1_rows_max(l1, k)
                for n, res in _on_threads(ops).items():
                    runs[whole, l1, n] = res
    finally:
        bnfast._core._set_reduce_blocks_min(old[0])
        bnfast._core._set_whole_rows(old[1])
        for k, n in old[2].items():
            bnfast._core._set_l1_rows_max(n, k)
    for key, (bits, _) in runs.items():
        assert bits[:5] == runs[False, 0, 1][0][:5], key
        # dx: the backward sums' order is the setting's own (float32)
        assert bits[5] == runs[key[0], 0, 1][0][5], key
    y, dx = runs[True, 0, 1][1]
    assert_forward_close(y, ref.batch_norm_train(x, w, b, axis=axis)[0])
    ry, rmean, rinvstd = ref.batch_norm_train(x, w, b, axis=axis)
    assert_grad_close(dx, ref.batch_norm_backward(dy, x, rmean, rinvstd, w, axis=axis)[0])


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("dram", [False, True])
@pytest.mark.parametrize("layout", ["c", "channels_last", "step"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((4, 80, 28, 28), 1), ((2, 5, 300, 256), 1),
                                        ((64, 3, 28, 28), 1), ((9, 7, 11, 128), -1),
                                        ((3001, 256), 1), ((2003, 300), -1), ((20003, 7), 1),
                                        ((500, 64, 4), 1), ((1031, 1040), -1),
                                        ((301, 2048), 1), ((7, 5, 3, 600), -1)])
def test_float64_sums_are_the_same_for_any_thread_count(shape, axis, dtype, layout, dram):
    """The float64 moments (`moments`) and backward sums (what a sums hook is handed,
    the distributed path's exchange) bit for bit on one, two and three threads: the
    float32 outputs round away most differences of order, these do not (a block's own
    width, which threads change, once decided the order of the sums of its columns).
    In cache and from DRAM (lowered here)."""
    x = with_layout(make_values(shape, dtype, 12, axis=axis, offset=1e4), layout, axis=axis)
    dy = with_layout(make_values(shape, dtype, 13, axis=axis), layout, axis=axis)
    C = shape[axis]
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean = x.astype(np.float64).mean(axis=red)
    invstd = 1 / np.sqrt(x.astype(np.float64).var(axis=red) + 1e-5)
    n_per = x.size // C

    def ops():
        sums = []

        def hook(local):
            sums.append(local.copy())
            return local, n_per

        bnfast._core._backward(dy, x, mean, invstd, None, True, axis, None, hook)
        mo = bnfast.moments(x, axis=axis)
        return [_bits(a) for a in (sums[0], np.asarray(mo.mean), np.asarray(mo.m2))]

    old = bnfast._core._set_reduce_blocks_min(0 if dram else 1 << 62)
    try:
        runs = _on_threads(ops)
    finally:
        bnfast._core._set_reduce_blocks_min(old)
    assert runs[2] == runs[1] and runs[3] == runs[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_child_forked_after_threads_runs_serially():
    """GNU OpenMP's thread pool does not survive fork: a child forked after a threaded
    call (multiprocessing's default on Linux) waited forever in its next one. It now
    runs serially, with the same bits; the parent keeps its threads."""
    import signal

    x = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
    bnfast.set_num_threads(2)
    try:
        threads = bnfast.get_num_threads()           # 1 when built without OpenMP
        want = bnfast.batch_norm_train(x, axis=-1)[0]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                 # the child: never returns to pytest
            ok = b"0"
            try:
                signal.alarm(20)                     # a hang ends the child, not the test
                y = bnfast.batch_norm_train(x, axis=-1)[0]
                ok = b"1" if np.array_equal(y, want) and bnfast.get_num_threads() == 1 \
                    else b"0"
            finally:
                os.write(w, ok)
                os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        got = os.read(r, 1)
        os.close(r)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child hung or crashed"
        assert got == b"1", "the child's result or thread count was wrong"
        assert bnfast.get_num_threads() == threads
        np.testing.assert_array_equal(bnfast.batch_norm_train(x, axis=-1)[0], want)
    finally:
        bnfast.set_num_threads(None)


def _run_with_another_team(script):
    """Run `script` (argv[1]: the libgomp bnfast links) in a fresh interpreter; the JSON
    of its last line. Skips without GNU OpenMP on Linux."""
    if not HAVE_OPENMP or not sys.platform.startswith("linux"):
        pytest.skip("GNU OpenMP on Linux only")
    lib = _linked_openmp_runtime()
    if lib is None or "libgomp" not in os.path.basename(lib):
        pytest.skip(f"not linked against GNU OpenMP ({lib})")
    e = dict(os.environ)
    e.pop("OMP_NUM_THREADS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", script, lib], capture_output=True, text=True,
                       env=e, timeout=120, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


FORK_AFTER_OTHER_TEAM = r"""
import ctypes, hashlib, json, os, signal, sys
import numpy as np
import bnfast
# another library's OpenMP team in the libgomp bnfast uses (PyTorch's did this); bnfast
# itself has run no threads
gomp = ctypes.CDLL(sys.argv[1])
body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda data: None)
gomp.GOMP_parallel.argtypes = [type(body), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
gomp.GOMP_parallel(body, None, 2, 0)
bnfast.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    out = {}
    try:
        signal.alarm(20)                 # a hang ends the child, not the test
        y = bnfast.batch_norm_train(x, axis=-1)[0]
        out = {"sha": hashlib.sha256(y.tobytes()).hexdigest(),
               "threads": bnfast.get_num_threads()}
    finally:
        os.write(w, json.dumps(out).encode())
        os._exit(0)
os.close(w)
_, status = os.waitpid(pid, 0)
child = json.loads(os.read(r, 4096) or b"{}")
y = bnfast.batch_norm_train(x, axis=-1)[0]
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "child": child,
                  "sha": hashlib.sha256(y.tobytes()).hexdigest(),
                  "threads": bnfast.get_num_threads()}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_child_forked_after_another_librarys_threads_runs_serially():
    """A parent whose other OpenMP user (PyTorch) had run a team in the same libgomp,
    bnfast none: the child's first threaded bnfast call waited forever on the parent's
    threads (the guard counted only bnfast's own teams). Now a child forked while its
    parent had other threads runs serially, with the parent's bits."""
    got = _run_with_another_team(FORK_AFTER_OTHER_TEAM)
    assert got["exit"] == 0, "the forked child hung (SIGALRM) or crashed"
    assert got["child"] == {"sha": got["sha"], "threads": 1}
    assert got["threads"] == 2


MP_FORK_THEN_IMPORT = r"""
import ctypes, hashlib, json, multiprocessing, signal, sys
import numpy as np
# another library's OpenMP team (PyTorch's), and bnfast not imported before the fork:
# a DataLoader-style worker that imports it lazily
gomp = ctypes.CDLL(sys.argv[1])
body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda data: None)
gomp.GOMP_parallel.argtypes = [type(body), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
gomp.GOMP_parallel(body, None, 2, 0)
x = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)

def child(q):
    signal.alarm(20)                     # a hang ends the child, not the test
    import bnfast
    bnfast.set_num_threads(2)
    y = bnfast.batch_norm_train(x, axis=-1)[0]
    q.put({"sha": hashlib.sha256(y.tobytes()).hexdigest(),
           "threads": bnfast.get_num_threads()})

ctx = multiprocessing.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
p.join(60)
got = q.get(timeout=1) if p.exitcode == 0 else {}
import bnfast
y = bnfast.batch_norm_train(x, axis=-1)[0]
print(json.dumps({"exit": p.exitcode, "child": got,
                  "sha": hashlib.sha256(y.tobytes()).hexdigest()}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_multiprocessing_fork_child_importing_bnfast_late_runs_serially():
    """bnfast imported only in a child that multiprocessing forked from a parent with
    another library's OpenMP team: the fork handler never ran, and the child's first
    threaded call hung. Such a child now runs serially, with the parent's bits."""
    got = _run_with_another_team(MP_FORK_THEN_IMPORT)
    assert got["exit"] == 0, "the forked child hung (SIGALRM) or crashed"
    assert got["child"] == {"sha": got["sha"], "threads": 1}


def test_threads_on_small_arrays_fixture_starts_threads(threads_on_small_arrays):
    """The premise of the tests that use the fixture: with it, an array far below the
    usual threshold (2 * 65536 elements) gets more than one thread."""
    from bnfast import _core

    bnfast.set_num_threads(3)
    try:
        if bnfast.get_num_threads() < 3:
            pytest.skip("built without OpenMP")
        assert _core._threads_for(13500) == 3
        _core._set_par_min_elems(1 << 16)
        assert _core._threads_for(13500) == 1
    finally:
        bnfast.set_num_threads(None)

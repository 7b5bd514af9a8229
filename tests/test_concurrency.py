"""Issue 5, concurrency: several Python threads calling bnfast at once get correct
results, and the kernels release the GIL so that calls really overlap in time.

No test asserts a duration. GIL release is shown by *where* another thread's Python code
ran: a ticker thread that can only take time stamps while it holds the GIL stamps the
middle of a long kernel call, which is impossible if the kernel holds the GIL. Overlap
is shown by two threads' call intervals intersecting (wall-clock, so a loaded machine
does not make it fail); each check retries a few times before failing."""
import threading
import time

import numpy as np
import pytest

import bnfast
import reference as ref
from _reliability_helpers import run_while_locked
from arrays import make_values, params
from reference import assert_forward_close, assert_grad_close


@pytest.fixture(autouse=True)
def _one_omp_thread():
    """One OpenMP thread per call: Python threads, not OpenMP, provide the parallelism
    here, and the 2-core CI machine is not oversubscribed."""
    bnfast.set_num_threads(1)
    yield
    bnfast.set_num_threads(None)


def _run_threads(fns, timeout=120):
    """Run each fn in its own thread, started together; re-raise the first error."""
    errors = []
    barrier = threading.Barrier(len(fns))

    def wrap(fn):
        try:
            barrier.wait()
            fn()
        except BaseException as e:      # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def _bits(a):
    return np.ascontiguousarray(a).tobytes()


# ----------------------------------------------------------------------------------
# Correct results from several threads at once

def test_shared_frozen_many_threads():
    """One FrozenBatchNorm shared by 4 threads, on small (fast path) and large inputs."""
    C = 64
    w, b, rm, rv = params(C, np.float64, 1)
    frozen = bnfast.FrozenBatchNorm(rm, rv, w, b, axis=-1)
    frozen_nchw = bnfast.FrozenBatchNorm(rm, rv, w, b, axis=1)
    inputs = []
    for k in range(4):
        small = make_values((1 + k, C), np.float32, k, axis=-1, offset=1e5)
        big = make_values((64, 32, 32, C), np.float32, 10 + k, axis=-1, offset=1e5)
        nchw = make_values((16, C, 16, 16), np.float32, 20 + k, axis=1, offset=1e5)
        expect = (ref.frozen_batch_norm(small, rm, rv, w, b, axis=-1),
                  ref.frozen_batch_norm(big, rm, rv, w, b, axis=-1),
                  ref.frozen_batch_norm(nchw, rm, rv, w, b, axis=1))
        inputs.append((small, big, nchw, expect))
    # serial results, checked against the reference
    serial = []
    for small, big, nchw, expect in inputs:
        got = (frozen(small), frozen(big), frozen_nchw(nchw))
        for g, e in zip(got, expect):
            assert_forward_close(g, e)
        serial.append([_bits(g) for g in got])

    def worker(k):
        small, big, nchw, _ = inputs[k]
        o = np.empty_like(small)
        for i in range(300):
            assert _bits(frozen(small)) == serial[k][0]
            assert _bits(frozen(small, out=o)) == serial[k][0]
            if i % 30 == 0:
                assert _bits(frozen(big)) == serial[k][1]
                assert _bits(frozen_nchw(nchw)) == serial[k][2]

    _run_threads([lambda k=k: worker(k) for k in range(4)])


def test_functional_many_threads():
    """batch_norm (eval and training with per-thread running stats), batch_norm_train and
    batch_norm_backward from 4 threads: each thread's results are the serial ones."""
    shapes = [((32, 16, 24, 24), 1), ((4096, 48), -1), ((16, 24, 24, 16), -1), ((8, 3, 50), 1)]
    jobs = []
    for k, (shape, axis) in enumerate(shapes):
        x = make_values(shape, np.float32, k, axis=axis, offset=1e4)
        dy = make_values(shape, np.float32, 100 + k, axis=axis)
        w, b, rm, rv = params(shape[axis], np.float64, k)
        jobs.append((x, dy, axis, w, b, rm, rv))

    def compute(x, dy, axis, w, b, rm, rv):
        rm1, rv1 = rm.copy(), rv.copy()
        y = bnfast.batch_norm(x, rm1, rv1, w, b, True, 0.1, 1e-5, axis=axis)
        y2, m, s = bnfast.batch_norm_train(x, w, b, axis=axis)
        e = bnfast.batch_norm(x, rm1, rv1, w, b, axis=axis)
        dx, dw, db = bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis)
        return [_bits(v) for v in (y, rm1, rv1, y2, m, s, e, dx, dw, db)]

    serial = []
    for x, dy, axis, w, b, rm, rv in jobs:
        y_ref, m_ref, s_ref = ref.batch_norm_train(x, w, b, axis=axis)
        assert_forward_close(bnfast.batch_norm_train(x, w, b, axis=axis)[0], y_ref)
        dx_ref = ref.batch_norm_backward(dy, x, m_ref, s_ref, w, axis=axis)[0]
        assert_grad_close(bnfast.batch_norm_backward(dy, x, m_ref, s_ref, w, axis=axis)[0],
                          dx_ref, scale=np.max(np.abs(w * s_ref)) * np.max(np.abs(dy)))
        serial.append(compute(x, dy, axis, w, b, rm, rv))

    def worker(k):
        for _ in range(15):
            assert compute(*jobs[k]) == serial[k], f"thread {k}: results differ"

    _run_threads([lambda k=k: worker(k) for k in range(len(jobs))])


def test_separate_layers_many_threads():
    """Each thread trains its own layer (forward, backward, a few steps, then eval): the
    same bits as the same steps run serially, and right against the layer reference."""
    C = 32
    xs = [make_values((64, C, 12, 12), np.float32, k, offset=1e3) for k in range(3)]
    dys = [make_values((64, C, 12, 12), np.float32, 50 + k) for k in range(3)]

    def train(k, steps=6):
        layer = bnfast.BatchNorm(C, momentum=None if k == 1 else 0.1)
        out = []
        for s in range(steps):
            y = layer(xs[(k + s) % 3])
            dx = layer.backward(dys[(k + s) % 3])
            out += [_bits(y), _bits(dx), _bits(layer.grad_weight)]
        layer.eval()
        out += [_bits(layer(xs[k])), _bits(layer.running_mean), _bits(layer.running_var),
                layer.num_batches_tracked]
        return out

    # the serial run of layer 0 against the float64 layer twin
    layer, twin = bnfast.BatchNorm(C), ref.BatchNormRef(C)
    for s in range(3):
        assert_forward_close(layer(xs[s]), twin(xs[s]))
        assert_grad_close(layer.backward(dys[s]), twin.backward(dys[s]))
    serial = [train(k) for k in range(3)]
    results = [None] * 3

    def worker(k):
        for _ in range(3):
            results[k] = train(k)
            assert results[k] == serial[k], f"layer {k}: threaded run differs"

    _run_threads([lambda k=k: worker(k) for k in range(3)])


def test_shared_training_layer_is_serialized():
    """One training layer called from two threads (documented as order-dependent, not
    recommended) neither crashes nor loses an update: the calls are serialized."""
    C = 8
    layer = bnfast.BatchNorm(C, momentum=None)       # cumulative average: order-free
    xs = [make_values((512, C), np.float32, k, offset=10.0) for k in range(2)]
    n = 40

    def worker(k):
        for _ in range(n):
            layer(xs[k])
            layer.backward(np.ones_like(xs[k]))

    _run_threads([lambda k=k: worker(k) for k in range(2)])
    assert layer.num_batches_tracked == 2 * n
    # cumulative average of n copies of each batch's statistics
    m = (xs[0].astype(np.float64).mean(0) + xs[1].astype(np.float64).mean(0)) / 2
    np.testing.assert_allclose(layer.running_mean, m, rtol=1e-5)


# The test above is timing-dependent (it passed 19 of 23 runs with the lock removed);
# these show deterministically that forward and backward take the layer's lock: started
# while another holder has it, they wait, and then see what that holder changed, whole.

LOCKED_KINDS = ["BatchNorm", "SyncBatchNorm"]
# every locked layer kind, in training and in eval
each_locked_mode = pytest.mark.parametrize(
    "kind,training", [(k, t) for k in LOCKED_KINDS for t in (True, False)],
    ids=[f"{k}-{'train' if t else 'eval'}" for k in LOCKED_KINDS for t in (True, False)])


def _locked_layer(kind, C, training):
    if kind == "BatchNorm":
        bn = bnfast.BatchNorm(C, dtype=np.float64)
    else:
        from bnfast.distributed import SingleProcessComm, SyncBatchNorm
        bn = SyncBatchNorm(C, dtype=np.float64, comm=SingleProcessComm())
    return bn.train(training)


@each_locked_mode
def test_forward_waits_for_the_layer_lock(kind, training):
    C = 3
    bn = _locked_layer(kind, C, training)
    x = make_values((6, C, 4), np.float64, 1, offset=2.0)
    w, b, rm, rv = params(C, np.float64, 2)

    def update():      # parameters and running statistics replaced while the lock is held
        bn.weight[:], bn.bias[:] = w, b
        bn.running_mean[:], bn.running_var[:] = rm, rv

    y = run_while_locked(bn._lock, lambda: bn(x), update, f"{kind} forward")
    if training:
        rm1, rv1 = rm.copy(), rv.copy()
        expect = ref.batch_norm_train(x, w, b, running_mean=rm1, running_var=rv1)[0]
        assert bn.num_batches_tracked == 1
        np.testing.assert_allclose(bn.running_mean, rm1, rtol=1e-12)
        np.testing.assert_allclose(bn.running_var, rv1, rtol=1e-12)
    else:
        expect = ref.batch_norm(x, rm, rv, w, b)
    assert_forward_close(y, expect, what=f"{kind} forward after the lock")


@each_locked_mode
def test_backward_waits_for_the_layer_lock(kind, training):
    bn = _locked_layer(kind, 3, training)
    C = 3
    x = make_values((6, C, 4), np.float64, 3, offset=2.0)
    dy = make_values(x.shape, np.float64, 4)
    w, _, rm, rv = params(C, np.float64, 5)
    bn(x)
    if training:
        mean, var, _ = ref.batch_stats(x, 1)
        invstd = 1.0 / np.sqrt(var + bn.eps)

    def update():      # backward reads the weight (and in eval the running statistics)
        bn.weight[:] = w
        if not training:
            bn.running_mean[:], bn.running_var[:] = rm, rv

    dx = run_while_locked(bn._lock, lambda: bn.backward(dy), update, f"{kind} backward")
    if not training:
        mean, invstd = rm, 1.0 / np.sqrt(rv + bn.eps)
    dxe, dwe, dbe = ref.batch_norm_backward(dy, x, mean, invstd, w, training=training)
    assert_grad_close(dx, dxe, what=f"{kind} dx after the lock")
    assert_grad_close(bn.grad_weight, dwe, what=f"{kind} grad_weight")
    assert_grad_close(bn.grad_bias, dbe, what=f"{kind} grad_bias")


@pytest.mark.parametrize("kind", LOCKED_KINDS)
def test_backward_uses_the_forward_that_finished_before_it(kind):
    """A backward that waited on the lock uses the last forward's input, as it is when it
    gets the lock (SyncBatchNorm read it, and chose its path, before taking the lock)."""
    C = 3
    bn, other = _locked_layer(kind, C, True), _locked_layer(kind, C, True)
    x1 = make_values((6, C, 4), np.float64, 1, offset=2.0)
    x2 = make_values((6, C, 4), np.float64, 2, offset=50.0)
    dy = make_values(x1.shape, np.float64, 4)
    bn(x1)
    other(x2)

    def forward_finished():      # what another thread's bn(x2) leaves behind
        bn._saved = other._saved

    dx = run_while_locked(bn._lock, lambda: bn.backward(dy), forward_finished,
                          f"{kind} backward")
    mean, var, _ = ref.batch_stats(x2, 1)
    expect = ref.batch_norm_backward(dy, x2, mean, 1.0 / np.sqrt(var + bn.eps), bn.weight)
    assert_grad_close(dx, expect[0], what=f"{kind} dx of the last forward")


# ----------------------------------------------------------------------------------
# The GIL is released inside kernels

def _ticker_sees_middle(call, attempts=25):
    """True when a ticker thread stamped the middle 60% of one `call`.  Many attempts:
    on a loaded 2-core machine the ticker can miss five calls in a row for want of a
    core (seen once with another process busy), though the GIL was released."""
    for _ in range(attempts):
        stamps = []
        stop = threading.Event()

        def tick():
            while not stop.is_set():
                time.sleep(0.0005)
                stamps.append(time.perf_counter())

        t = threading.Thread(target=tick)
        t.start()
        time.sleep(0.01)                   # let the ticker get going
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        stop.set()
        t.join()
        lo, hi = t0 + 0.2 * (t1 - t0), t1 - 0.2 * (t1 - t0)
        if any(lo < s < hi for s in stamps):
            return True
    return False


@pytest.fixture(scope="module")
def big():
    """~32M float32 elements: a single-threaded kernel call takes tens of ms."""
    rng = np.random.default_rng(0)
    x = rng.random((32, 64, 128, 128), dtype=np.float32)
    x += 100.0
    return x, np.empty_like(x), params(64, np.float64, 0)


@pytest.mark.parametrize("op", ["eval", "frozen", "train", "backward", "backward-eval",
                                "layer", "nhwc-train"])
def test_kernels_release_the_gil(big, op):
    x, out, (w, b, rm, rv) = big
    frozen = bnfast.FrozenBatchNorm(rm, rv, w, b)
    layer = bnfast.BatchNorm(64)
    xl = x.reshape(32, 128, 128, 64)      # same memory read as channels-last
    m, s = rm, 1 / np.sqrt(rv)
    call = {
        "eval": lambda: bnfast.batch_norm(x, rm, rv, w, b, out=out),
        "frozen": lambda: frozen(x, out=out),
        "train": lambda: bnfast.batch_norm_train(x, w, b, out=out),
        "backward": lambda: bnfast.batch_norm_backward(x, x, m, s, w, out=out),
        "backward-eval": lambda: bnfast.batch_norm_backward(x, x, m, s, w, training=False,
                                                            out=out),
        "layer": lambda: layer(x, out=out),
        "nhwc-train": lambda: bnfast.batch_norm_train(xl, w, b, axis=-1,
                                                      out=out.reshape(xl.shape)),
    }[op]
    call()                                 # warm up (page faults, thread pool)
    assert _ticker_sees_middle(call), f"{op}: no other Python thread ran during the kernel"


def test_two_threads_overlap_in_time(big):
    """Two threads each calling kernels on their own large arrays: their calls run at
    the same time (intervals intersect for a good part of the busy time)."""
    x, out, (w, b, rm, rv) = big
    xa, xb = x[:16], x[16:]
    oa, ob = out[:16], out[16:]
    frozen = bnfast.FrozenBatchNorm(rm, rv, w, b)

    def intervals(fn, sink):
        for _ in range(6):
            t0 = time.perf_counter()
            fn()
            sink.append((t0, time.perf_counter()))

    def overlap(ia, ib):
        tot = 0.0
        for a0, a1 in ia:
            for b0, b1 in ib:
                tot += max(0.0, min(a1, b1) - max(a0, b0))
        return tot

    for _ in range(4):
        ia, ib = [], []
        _run_threads([
            lambda: intervals(lambda: bnfast.batch_norm_train(xa, w, b, out=oa), ia),
            lambda: intervals(lambda: frozen(xb, out=ob), ib)])
        busy = min(sum(e - s for s, e in ia), sum(e - s for s, e in ib))
        if overlap(ia, ib) > 0.3 * busy:
            return
    pytest.fail(f"kernel calls of two threads never overlapped: {overlap(ia, ib):.4f} s "
                f"of {busy:.4f} s busy")


def test_ticker_detects_a_call_that_holds_the_gil():
    """The detector itself can fail: a C call that keeps the GIL (bytes repetition) is
    never stamped in its middle."""
    assert not _ticker_sees_middle(lambda: b"x" * 300_000_000, attempts=2)


def test_forward_reads_the_training_flag_once():
    # train()/eval() take no lock: a flag flipped between two reads of it gave a
    # batch-statistics forward that did not update the running statistics. A flag
    # that reads True, then False, stands in for the other thread.
    class Flipping(bnfast.BatchNorm):
        reads = 0

        @property
        def training(self):
            self.reads += 1
            return self.reads % 2 == 1

        @training.setter
        def training(self, mode):
            pass

    x = (np.random.default_rng(0).standard_normal((16, 8)) * 5 + 3).astype(np.float32)
    layer = Flipping(8, axis=-1)
    layer.reads = 0
    y = layer(x)
    np.testing.assert_array_equal(y, bnfast.batch_norm_train(x, axis=-1)[0])
    assert layer.num_batches_tracked == 1          # the batch forward updated them
    assert not np.array_equal(layer.running_mean, np.zeros(8, np.float32))

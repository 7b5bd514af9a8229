"""Helpers for the reliability tests (issue 5): snapshots that prove nothing was mutated,
comparisons that tolerate the non-finite values a test put in on purpose, and memory
probes. The float64 reference itself lives in ``reference.py``."""
import os
import threading

import numpy as np

from reference import forward_tol


def snapshot(*objs):
    """Bitwise copies of every ndarray among ``objs`` (nested in lists/tuples/dicts too),
    so ``assert_unchanged(snap)`` can tell whether a call wrote into any of them."""
    out = []

    def walk(o):
        if isinstance(o, np.ndarray):
            # the bytes of the view (strides respected) plus dtype, shape and the flags
            out.append((o, o.copy(order="K"), o.dtype, o.shape, o.flags.writeable))
            base = o
            while isinstance(base.base, np.ndarray):
                base = base.base
            if base is not o and base.size < 1 << 22:
                out.append((base, base.copy(order="K"), base.dtype, base.shape,
                            base.flags.writeable))
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)

    for o in objs:
        walk(o)
    return out


def assert_unchanged(snap, what=""):
    for arr, copy, dtype, shape, writeable in snap:
        assert arr.dtype == dtype and arr.shape == shape, f"{what}: dtype/shape changed"
        assert arr.flags.writeable == writeable, f"{what}: writeable flag changed"
        if arr.tobytes() != copy.tobytes():
            raise AssertionError(f"{what}: an array the call must not write was modified "
                                 f"(shape {shape}, dtype {dtype})")


def assert_close_nonfinite(got, ref, dtype=None, what="y"):
    """Like ``reference.assert_forward_close`` but where the reference is +-inf the output
    must be the same infinity, and where it is NaN the output must be NaN; everywhere
    else the forward tolerance applies."""
    got = np.asarray(got)
    dtype = got.dtype if dtype is None else np.dtype(dtype)
    ref = np.asarray(ref, np.float64)
    g = got.astype(np.float64)
    assert g.shape == ref.shape, f"{what}: shape {g.shape} != {ref.shape}"
    fin = np.isfinite(ref)
    nan = np.isnan(ref)
    inf = np.isinf(ref)
    bad_nan = nan & ~np.isnan(g)
    assert not bad_nan.any(), f"{what}: NaN expected at {np.argwhere(bad_nan)[:5].tolist()}"
    bad_inf = inf & (g != ref)
    assert not bad_inf.any(), (f"{what}: {ref[bad_inf][:3]} expected at "
                               f"{np.argwhere(bad_inf)[:5].tolist()}, got {g[bad_inf][:3]}")
    tol = forward_tol(dtype, np.where(fin, ref, 0.0))
    with np.errstate(invalid="ignore"):
        err = np.abs(np.where(fin, g - ref, 0.0))
    err = np.where(np.isnan(err), np.inf, err)
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} finite elements out of tolerance; "
                           f"first at {tuple(np.argwhere(bad)[0])}: got "
                           f"{g[tuple(np.argwhere(bad)[0])]!r}, ref "
                           f"{ref[tuple(np.argwhere(bad)[0])]!r}")


def channel_mask(shape, axis, channels):
    """Boolean array of ``shape``: True on the given channels of ``axis``."""
    ax = axis + len(shape) if axis < 0 else axis
    m = np.zeros(shape[ax], bool)
    m[list(channels)] = True
    bs = [1] * len(shape)
    bs[ax] = shape[ax]
    return np.broadcast_to(m.reshape(bs), shape)


def rss_bytes():
    """Resident set size of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def os_thread_count():
    """Number of OS threads of this process (Linux /proc; None elsewhere)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def run_while_locked(lock, fn, while_held=None, what="the call"):
    """Start ``fn()`` in a thread while holding ``lock`` (as a layer's forward does), check
    that it waits (has not returned after 0.2 s), run ``while_held()`` (the change it must
    see whole), release, and return ``fn()``'s result."""
    done = threading.Event()
    result = []

    def run():
        result.append(fn())
        done.set()

    t = threading.Thread(target=run)
    with lock:
        t.start()
        assert not done.wait(0.2), f"{what} ran while the layer was in use"
        if while_held is not None:
            while_held()
    t.join(10)
    assert done.is_set(), f"{what} did not finish"
    return result[0]

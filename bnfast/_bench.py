"""Benchmark harness shared by ``python -m bnfast bench`` and ``benchmarks/`` (pytest-benchmark).

Every case is one operation on one array, timed beside

* ``copy``: ``np.copyto(dst, x)`` on the same bytes, the memory-bandwidth roofline (with more than one
  thread and at least 4 MiB, the same copy split into slices over that many Python threads -- contiguous
  slices, or blocks of rows of a strided x; ``np.copyto`` releases the GIL; below 4 MiB the plain copy,
  which is faster there);
* ``numpy``: a NumPy one-liner computing the same thing (allocating, as NumPy code does);
* ``torch``: ``torch.nn.functional.batch_norm`` (autograd for the backward), when PyTorch is installed;
* ``onnxruntime``: a one-node ``BatchNormalization`` model (opset 15) on the CPU provider, when ``onnx`` and
  ``onnxruntime`` are installed; inference only (its CPU kernel has no training mode).

Operations: ``eval`` (inference with running statistics; bnfast rows ``bnfast`` = ``batch_norm(..., out=)``,
``bnfast-alloc`` = ``batch_norm(...)``, ``frozen-out`` = ``FrozenBatchNorm(...)(x, out=)``, ``frozen`` =
``FrozenBatchNorm(...)(x)``), ``train`` (batch statistics + normalization + running-statistics update),
``backward`` (train-mode gradient), ``backward_eval`` (the gradient with the running statistics held
fixed, ``training=False``: a frozen layer fine-tuned through) and ``fwd_bwd`` (train forward then
backward).
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

import bnfast

EPS = 1e-5
MOMENTUM = 0.1
OFFSET = 1000.0          # price-like data: offset with a small spread

OPS = ("eval", "train", "backward", "backward_eval", "fwd_bwd")
OP_TITLES = {
    "eval": "eval (inference)",
    "train": "train forward",
    "backward": "backward (train mode)",
    "backward_eval": "backward (eval mode)",
    "fwd_bwd": "forward + backward",
}
BNFAST_VARIANTS = {
    "eval": ("bnfast", "bnfast-alloc", "frozen-out", "frozen"),
    "train": ("bnfast",),
    "backward": ("bnfast",),
    "backward_eval": ("bnfast",),
    "fwd_bwd": ("bnfast",),
}
VARIANT_TITLES = {
    "bnfast": "out=",
    "bnfast-alloc": "alloc",
    "frozen-out": "Frozen, out=",
    "frozen": "Frozen, alloc",
}
PEERS = ("numpy", "torch", "onnxruntime")
PEER_TITLES = {"numpy": "NumPy", "torch": "PyTorch", "onnxruntime": "ONNX Runtime"}
COPY = "copy"


@dataclass(frozen=True)
class Case:
    """An input geometry: ``shape`` with the channel axis ``axis``; ``layout`` is a label."""

    id: str
    shape: tuple
    axis: int
    layout: str
    large: bool = False
    pad: int = 0          # x is columns [0, C) of an array C + pad wide (rows not contiguous)

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def channels(self):
        return self.shape[self.axis]

    @property
    def label(self):
        return f"{'x'.join(map(str, self.shape))} {self.layout}"


def _case(shape, layout, pad=0):
    axis = 1 if layout in ("NCHW", "NCL") else -1
    cid = "x".join(map(str, shape)) + ("" if layout == "NC" else "-" + layout)
    return Case(cid, tuple(shape), axis, layout, large=math.prod(shape) >= 1 << 22, pad=pad)


CASES = OrderedDict((c.id, c) for c in [
    _case((1, 64), "NC"),
    _case((32, 256), "NC"),
    _case((256, 1024), "NC"),
    _case((2048, 1024), "NC"),
    _case((8, 64, 28, 28), "NCHW"),
    _case((8, 28, 28, 64), "NHWC"),
    _case((64, 256, 28, 28), "NCHW"),
    _case((64, 28, 28, 256), "NHWC"),
    _case((200704, 64), "NC"),
    # short runs (a ResNet's last stage, sequences of a few steps): read as rows
    _case((64, 512, 7, 7), "NCHW"),
    # ... the same stage at batch 2, in cache: channels of few short runs, a channel at a
    # time (bnfast._core._cached_runs)
    _case((2, 1024, 7, 7), "NCHW"),
    _case((32768, 64, 4), "NCL"),
    # a column slice: the first 256 columns of a 272-wide array, rows 1088 bytes apart
    _case((50176, 256), "NC-slice", pad=16),
    # wide rows (4096 features): wider than a chunk, normalized in blocks of columns
    _case((3136, 4096), "NC"),
    # rows of 300 features (1200 bytes): not a whole number of lines, three rows in four
    # start off one
    _case((40000, 300), "NC"),
])

# The shapes of the targets (pytest-benchmark suite and `bench --quick`).
TARGET_CASES = ("1x64", "32x256", "256x1024", "64x256x28x28-NCHW", "64x28x28x256-NHWC", "200704x64")


def applicable(op, case):
    """Training needs more than one value per channel."""
    return op == "eval" or case.size // case.channels > 1


def all_threads():
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Peers

class Unavailable(Exception):
    """A peer that is not installed (or cannot run this case)."""


# A peer installed but failing to import (built for another NumPy, a missing shared
# library): skipped as one not installed, with the error
PEER_BROKEN: "dict[str, str]" = {}


def peer_installed(name):
    if name in (COPY, "numpy") or name in BNFAST_VARIANTS["eval"]:
        return True
    mods = {"torch": ("torch",), "onnxruntime": ("onnx", "onnxruntime")}[name]
    if not all(importlib.util.find_spec(m) is not None for m in mods):
        return False
    if name not in PEER_BROKEN:
        try:
            for m in mods:
                importlib.import_module(m)
        except Exception as e:
            PEER_BROKEN[name] = f"{type(e).__name__}: {e}"
    return name not in PEER_BROKEN


def peer_version(name):
    mod = {"numpy": "numpy", "torch": "torch", "onnxruntime": "onnxruntime"}[name]
    if not peer_installed(name):
        return None
    return getattr(importlib.import_module(mod), "__version__", "?")


# How to install each peer: the bench extra has no torch (its wheels are large; the CPU
# build is all the benchmarks need).
PEER_INSTALL = {
    "torch": "pip install torch, the CPU wheel is enough: "
             "--index-url https://download.pytorch.org/whl/cpu",
    "onnxruntime": "pip install 'bnfast[bench]', or onnx and onnxruntime",
}


def install_hint(names):
    """How to install the peers ``names``, e.g. for a "not installed" message."""
    return "; ".join(f"{PEER_TITLES.get(n, n)}: {PEER_INSTALL[n]}"
                     for n in names if n in PEER_INSTALL)


def _import_peer(name):
    if not peer_installed(name):
        if name in PEER_BROKEN:
            raise Unavailable(f"{name} is installed but fails to import ({PEER_BROKEN[name]})")
        raise Unavailable(f"{name} is not installed ({PEER_INSTALL[name]})")
    if name == "torch":
        return importlib.import_module("torch")
    importlib.import_module("onnx")
    return importlib.import_module("onnxruntime")


def set_threads(n):
    """Use ``n`` threads in bnfast and in the already-imported peers."""
    bnfast.set_num_threads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Data

_DATA: "OrderedDict[tuple[str, str], Data]" = OrderedDict()
_DATA_KEEP = 3


class Data:
    """Inputs and preallocated outputs of one (case, dtype)."""

    def __init__(self, case, dtype, seed=0):
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        C = case.channels
        self.case, self.dtype = case, dtype
        # (NumPy draws float32 and float64 only: float16 is a rounded float32 draw)
        draw = np.float64 if dtype == np.float64 else np.float32
        full = case.shape[:-1] + (case.shape[-1] + case.pad,)
        cols = (Ellipsis, slice(0, case.shape[-1]))
        self.x = rng.standard_normal(full, dtype=draw).astype(dtype, copy=False)[cols]
        self.x += OFFSET
        self.dy = rng.standard_normal(full, dtype=draw).astype(dtype, copy=False)[cols]
        self.out = np.empty_like(self.x)
        self.dx = np.empty_like(self.x)
        self.weight = (1.0 + 0.1 * rng.standard_normal(C)).astype(dtype)
        self.bias = (0.1 * rng.standard_normal(C)).astype(dtype)
        self.running_mean = (OFFSET + 0.1 * rng.standard_normal(C)).astype(dtype)
        self.running_var = (1.0 + 0.1 * rng.random(C)).astype(dtype)
        self.rm = self.running_mean.copy()     # updated by train calls
        self.rv = self.running_var.copy()
        ax = case.axis % len(case.shape)
        self.axis = ax
        self.red = tuple(i for i in range(len(case.shape)) if i != ax)
        self.bshape = tuple(C if i == ax else 1 for i in range(len(case.shape)))
        self.n = case.size // C
        # batch statistics of x (float64), for the backward cases
        self.mean64, self.invstd64 = _stats64(self.x, self.red, self.n)

    def b(self, a):
        """A per-channel vector shaped to broadcast against x."""
        return a.reshape(self.bshape)


def _chunks(x):
    """Slices of the first axis holding about 4M elements each."""
    step = max(1, (1 << 22) // max(1, x[0].size))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _stats64(x, red, n):
    """Per-channel mean and 1/sqrt(biased var + eps) in float64, two passes, chunked (no full-size
    float64 temporary)."""
    ax = [i for i in range(x.ndim) if i not in red][0]
    bs = [1] * x.ndim
    bs[ax] = -1
    mean = np.zeros(x.shape[ax])
    for sl in _chunks(x):
        mean += x[sl].sum(axis=red, dtype=np.float64)
    mean /= n
    var = np.zeros_like(mean)
    for sl in _chunks(x):
        dlt = x[sl].astype(np.float64) - mean.reshape(bs)
        var += (dlt * dlt).sum(axis=red)
    var /= n
    return mean, 1.0 / np.sqrt(var + EPS)


def get_data(case, dtype):
    key = (case.id, np.dtype(dtype).str)
    d = _DATA.get(key)
    if d is None:
        while len(_DATA) >= _DATA_KEEP:
            _DATA.popitem(last=False)
        d = _DATA[key] = Data(case, dtype)
    else:
        _DATA.move_to_end(key)
    return d


def clear_data():
    _DATA.clear()
    gc.collect()


CHECK_ELEMS = 1 << 16


def check_rows(d):
    """Rows (first axis) of x that results are checked on: all of a small array, a leading block of a
    large one (every row's reference needs only per-channel statistics of the whole array)."""
    return max(1, min(d.x.shape[0], CHECK_ELEMS // max(1, d.x[0].size)))


def reference(op, d, rows=None):
    """float64 reference of ``op`` on x[:rows] (default: all of x)."""
    rows = d.x.shape[0] if rows is None else rows
    x = d.x[:rows].astype(np.float64)
    w, b = d.b(d.weight.astype(np.float64)), d.b(d.bias.astype(np.float64))
    if op == "eval":
        rm, rv = d.b(d.running_mean.astype(np.float64)), d.b(d.running_var.astype(np.float64))
        return (x - rm) / np.sqrt(rv + EPS) * w + b
    if op == "backward_eval":
        rv = d.b(d.running_var.astype(np.float64))
        return d.dy[:rows].astype(np.float64) * (w / np.sqrt(rv + EPS))
    mean, invstd = d.b(d.mean64), d.b(d.invstd64)
    xhat = (x - mean) * invstd
    if op == "train":
        return xhat * w + b
    sdy, sdyx = _dy_sums(d)
    dy = d.dy[:rows].astype(np.float64)
    return w * invstd / d.n * (d.n * dy - d.b(sdy) - xhat * d.b(sdyx))


def _dy_sums(d):
    """Per-channel sum(dy) and sum(dy * xhat) over the whole array, float64, chunked (cached)."""
    if getattr(d, "_dy_sums", None) is None:
        sdy = np.zeros(d.case.channels)
        sdyx = np.zeros(d.case.channels)
        mean, invstd = d.b(d.mean64), d.b(d.invstd64)
        for sl in _chunks(d.x):
            dy = d.dy[sl].astype(np.float64)
            sdy += dy.sum(axis=d.red)
            sdyx += (dy * ((d.x[sl] - mean) * invstd)).sum(axis=d.red)
        d._dy_sums = (sdy, sdyx)
    return d._dy_sums


def max_error(op, d, got):
    """max |got - ref| / max(1, max |ref|) on the checked rows, against the float64 reference of ``op``
    computed on the same (rounded) values."""
    rows = check_rows(d)
    ref = reference(op, d, rows)
    got = np.asarray(got)[:rows]
    if not ref.size:
        return 0.0
    err = np.max(np.abs(got - ref))          # NaN propagates: a NaN result is an error
    return float(err) / max(1.0, float(np.max(np.abs(ref))))


def wrong_call_tol(dtype):
    """A relative error above this is a wrong call, not rounding (float16, 32, 64)."""
    return {2: 1e-2, 4: 1e-3}.get(np.dtype(dtype).itemsize, 1e-8)


def check(op, d, got, name):
    """The error of ``got``; AssertionError for a bnfast result off by more than a wrong-call margin.

    (This guards the benchmark's own calls; exactness is tested in tests/. Peers are only reported:
    PyTorch and ONNX Runtime are inexact on offset data.)
    """
    err = max_error(op, d, got)
    if name == COPY or name in BNFAST_VARIANTS["eval"]:
        tol = wrong_call_tol(d.dtype)
        if not err <= tol:
            raise AssertionError(f"{name} {op} {d.case.label} {d.dtype}: relative error {err:.3g} "
                                 "against the float64 reference: the benchmark does not compute batch norm")
    return err


# --------------------------------------------------------------------------------------------
# Implementations: each builder returns (fn, result) where fn() runs one call and result()
# gives the array to check after fn() ran.

_POOLS: dict[int, Any] = {}


def _pool(n):
    from concurrent.futures import ThreadPoolExecutor
    p = _POOLS.get(n)
    if p is None:
        p = _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="bnfast-bench-copy")
    return p


def make_copy(d, threads=1):
    """``np.copyto(dst, x)``; with threads > 1 and >= 4 MiB, split over Python threads."""
    x, dst = d.x, d.out
    if threads <= 1 or x.nbytes < (4 << 20):
        return (lambda: np.copyto(dst, x)), None
    if x.flags.c_contiguous and dst.flags.c_contiguous:
        xf, df = x.reshape(-1), dst.reshape(-1)
    else:
        # reshape(-1) of a strided x (a column slice) is a copy made here, once: split along
        # the first axis instead, whose slices are views of x's own memory
        xf, df = x, dst
    bounds = np.linspace(0, xf.shape[0], threads + 1).astype(np.intp)
    parts = [(df[a:b], xf[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    pool = _pool(threads - 1)
    copyto = np.copyto

    def fn():
        futs = [pool.submit(copyto, dd, xx) for dd, xx in parts[1:]]
        copyto(*parts[0])
        for f in futs:
            f.result()
    return fn, None


def make_bnfast(op, d, variant="bnfast"):
    x, dy, out, dx, axis = d.x, d.dy, d.out, d.dx, d.case.axis
    w, b = d.weight, d.bias
    if op == "eval":
        rm, rv = d.running_mean, d.running_var
        if variant == "bnfast":
            def fn():
                bnfast.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS, axis=axis, out=out)
            return fn, (lambda: out)
        if variant == "bnfast-alloc":
            res = {}

            def fn():
                res["y"] = bnfast.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS, axis=axis)
            return fn, (lambda: res["y"])
        frozen = bnfast.FrozenBatchNorm(rm, rv, w, b, EPS, axis=axis)
        if variant == "frozen-out":
            return (lambda: frozen(x, out=out)), (lambda: out)
        if variant == "frozen":
            res = {}

            def fn():
                res["y"] = frozen(x)
            return fn, (lambda: res["y"])
        raise ValueError(variant)
    if variant != "bnfast":
        raise Unavailable(f"{variant} is an eval variant")
    rm, rv = d.rm, d.rv
    if op == "train":
        def fn():
            bnfast.batch_norm_train(x, w, b, eps=EPS, axis=axis, running_mean=rm, running_var=rv,
                                    momentum=MOMENTUM, out=out)
        return fn, (lambda: out)
    if op == "backward":
        _, mean, invstd = bnfast.batch_norm_train(x, w, b, eps=EPS, axis=axis, out=out)

        def fn():
            bnfast.batch_norm_backward(dy, x, mean, invstd, w, training=True, axis=axis, out=dx)
        return fn, (lambda: dx)
    if op == "backward_eval":
        rmean, rinvstd = d.running_mean, 1 / np.sqrt(d.running_var.astype(np.float64) + EPS)

        def fn():
            bnfast.batch_norm_backward(dy, x, rmean, rinvstd, w, training=False, axis=axis,
                                       out=dx)
        return fn, (lambda: dx)
    if op == "fwd_bwd":
        def fn():
            _, mean, invstd = bnfast.batch_norm_train(x, w, b, eps=EPS, axis=axis, running_mean=rm,
                                                      running_var=rv, momentum=MOMENTUM, out=out)
            bnfast.batch_norm_backward(dy, x, mean, invstd, w, training=True, axis=axis, out=dx)
        return fn, (lambda: dx)
    raise ValueError(op)


def make_numpy(op, d):
    """What a NumPy user writes (allocating temporaries)."""
    x, dy, red, n, eps = d.x, d.dy, d.red, d.n, d.dtype.type(EPS)
    w, b = d.b(d.weight), d.b(d.bias)
    res = {}
    if op == "eval":
        rm, rv = d.b(d.running_mean), d.b(d.running_var)

        def fn():
            res["y"] = (x - rm) * (w / np.sqrt(rv + eps)) + b
        return fn, (lambda: res["y"])
    rmv, rvv, m = d.rm, d.rv, d.dtype.type(MOMENTUM)

    def forward():
        mu = x.mean(axis=red, keepdims=True)
        xc = x - mu
        var = np.mean(xc * xc, axis=red, keepdims=True)
        invstd = 1 / np.sqrt(var + eps)
        y = xc * (invstd * w) + b
        rmv[...] = (1 - m) * rmv + m * mu.reshape(-1)
        rvv[...] = (1 - m) * rvv + m * var.reshape(-1) * (n / (n - 1))
        return y, xc, invstd

    def backward(xc, invstd):
        xhat = xc * invstd
        sdy = dy.sum(axis=red, keepdims=True)
        sdyx = (dy * xhat).sum(axis=red, keepdims=True)
        return (w * invstd / n) * (n * dy - sdy - xhat * sdyx), sdyx, sdy

    if op == "train":
        def fn():
            res["y"] = forward()[0]
        return fn, (lambda: res["y"])
    if op == "backward":
        mean, invstd = d.b(d.mean64.astype(d.dtype)), d.b(d.invstd64.astype(d.dtype))

        def fn():
            res["dx"] = backward(x - mean, invstd)[0]
        return fn, (lambda: res["dx"])
    if op == "backward_eval":
        rm = d.b(d.running_mean)
        inv = 1 / np.sqrt(d.b(d.running_var) + eps)

        def fn():
            # dx, and the dweight and dbias the layer needs (as backward's sums)
            res["dx"] = dy * (w * inv)
            res["dw"] = (dy * ((x - rm) * inv)).sum(axis=red)
            res["db"] = dy.sum(axis=red)
        return fn, (lambda: res["dx"])
    if op == "fwd_bwd":
        def fn():
            _, xc, invstd = forward()
            res["dx"] = backward(xc, invstd)[0]
        return fn, (lambda: res["dx"])
    raise ValueError(op)


def _to_nc(t, axis, ndim):
    """A torch view with the channel axis at position 1 (channels-last strides kept)."""
    ax = axis % ndim
    if ax == 1:
        return t
    perm = [0, ax] + [i for i in range(1, ndim) if i != ax]
    return t.permute(*perm)


def make_torch(op, d, threads=1):
    torch = _import_peer("torch")
    torch.set_num_threads(threads)
    F = torch.nn.functional
    nd = d.x.ndim
    xt = _to_nc(torch.from_numpy(d.x), d.axis, nd)
    dyt = _to_nc(torch.from_numpy(d.dy), d.axis, nd)
    w, b = torch.from_numpy(d.weight.copy()), torch.from_numpy(d.bias.copy())
    res = {}
    if op == "eval":
        rm, rv = torch.from_numpy(d.running_mean.copy()), torch.from_numpy(d.running_var.copy())

        def fn():
            with torch.no_grad():
                res["y"] = F.batch_norm(xt, rm, rv, w, b, False, MOMENTUM, EPS)
        return fn, (lambda: _from_nc(res["y"], d))
    rm, rv = torch.from_numpy(d.rm.copy()), torch.from_numpy(d.rv.copy())
    if op == "train":
        def fn():
            with torch.no_grad():
                res["y"] = F.batch_norm(xt, rm, rv, w, b, True, MOMENTUM, EPS)
        return fn, (lambda: _from_nc(res["y"], d))
    xg = xt.detach().requires_grad_(True)        # a leaf with x's strides
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    if op == "backward":
        y = F.batch_norm(xg, rm, rv, wg, bg, True, MOMENTUM, EPS)

        def fn():
            xg.grad = wg.grad = bg.grad = None
            y.backward(dyt, retain_graph=True)
        return fn, (lambda: _from_nc(xg.grad, d))
    if op == "backward_eval":
        erm = torch.from_numpy(d.running_mean.copy())
        erv = torch.from_numpy(d.running_var.copy())
        y = F.batch_norm(xg, erm, erv, wg, bg, False, MOMENTUM, EPS)

        def fn():
            xg.grad = wg.grad = bg.grad = None
            y.backward(dyt, retain_graph=True)
        return fn, (lambda: _from_nc(xg.grad, d))
    if op == "fwd_bwd":
        def fn():
            xg.grad = wg.grad = bg.grad = None
            F.batch_norm(xg, rm, rv, wg, bg, True, MOMENTUM, EPS).backward(dyt)
        return fn, (lambda: _from_nc(xg.grad, d))
    raise ValueError(op)


def _from_nc(t, d):
    """Back from torch's channel-at-1 view to x's layout, as NumPy."""
    a = t.detach().numpy()
    ax = d.axis
    if ax == 1:
        return a
    return np.moveaxis(a, 1, ax)


_ORT_MODELS: dict[tuple[Any, ...], Any] = {}


def _onnx_model(shape, dtype, axis):
    """Bytes of a BatchNormalization model on ``shape`` (channel axis ``axis``), float ``dtype``.

    (N, C) inputs are fed as (N, C, 1, 1); channels-last inputs go through Transpose nodes, as in
    models converted from channels-last frameworks (ONNX's BatchNormalization is channel-first).
    """
    from onnx import TensorProto, helper, numpy_helper
    key = (tuple(shape), np.dtype(dtype).str, axis)
    if key in _ORT_MODELS:
        return _ORT_MODELS[key]
    nd = len(shape)
    ax = axis % nd
    C = shape[ax]
    elem = {2: TensorProto.FLOAT16, 4: TensorProto.FLOAT}.get(np.dtype(dtype).itemsize,
                                                              TensorProto.DOUBLE)
    names = ("scale", "B", "mean", "var")
    inits = [numpy_helper.from_array(np.ones(C, dtype), n) for n in names]
    nodes = []
    bn_in, bn_out = "X", "Y"
    if ax != 1 and nd > 2:
        perm = [0, ax] + [i for i in range(1, nd) if i != ax]
        inv = list(np.argsort(perm))
        nodes.append(helper.make_node("Transpose", ["X"], ["Xt"], perm=perm))
        bn_in, bn_out = "Xt", "Yt"
    in_shape = list(shape) + ([1, 1] if nd == 2 else [])
    nodes.append(helper.make_node("BatchNormalization", [bn_in, *names], [bn_out], epsilon=EPS))
    if bn_out == "Yt":
        nodes.append(helper.make_node("Transpose", ["Yt"], ["Y"], perm=[int(i) for i in inv]))
    graph = helper.make_graph(nodes, "bnfast_bench",
                              [helper.make_tensor_value_info("X", elem, in_shape)],
                              [helper.make_tensor_value_info("Y", elem, in_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    _ORT_MODELS[key] = model
    return model


def make_onnxruntime(op, d, threads=1):
    if op != "eval":
        raise Unavailable("ONNX Runtime's CPU BatchNormalization has no training mode")
    ort = _import_peer("onnxruntime")
    from onnx import numpy_helper
    model = _onnx_model(d.x.shape, d.dtype, d.case.axis)
    # parameters into the model's initializers (copy of the proto, keyed model stays generic)
    m = type(model)()
    m.CopyFrom(model)
    vals = {"scale": d.weight, "B": d.bias, "mean": d.running_mean, "var": d.running_var}
    for init in m.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(vals[init.name]), init.name))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # ORT's pool spins after each run by default: on a machine with as many cores as
    # threads that steals the cores from whatever is timed next (round-robin)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    shape = list(d.x.shape) + ([1, 1] if d.x.ndim == 2 else [])
    x = d.x.reshape(shape)
    out = d.out
    io = sess.io_binding()            # preallocated output, no per-call allocation or copy
    io.bind_cpu_input("X", x)
    io.bind_output("Y", "cpu", 0, d.dtype, shape, out.ctypes.data)
    run = sess.run_with_iobinding

    if x.flags.c_contiguous:
        def fn():
            run(io)
    else:
        # ONNX Runtime takes contiguous tensors: a caller with a view pays the copy
        def fn():
            io.bind_cpu_input("X", np.ascontiguousarray(x))
            run(io)
    fn._keep = (sess, io, x)          # keep the session and the bound buffers alive
    return fn, (lambda: out)


def make(op, case, dtype, impl, threads=1):
    """(fn, result) for one implementation; raises Unavailable when it cannot run."""
    if not applicable(op, case):
        raise Unavailable(f"{op} needs more than one value per channel")
    d = get_data(case, dtype)
    if impl == COPY:
        return make_copy(d, threads)
    if impl in BNFAST_VARIANTS["eval"]:
        if impl not in BNFAST_VARIANTS[op]:
            raise Unavailable(f"{impl} is an eval variant")
        return make_bnfast(op, d, impl)
    if impl == "numpy":
        return make_numpy(op, d)
    if impl == "torch":
        return make_torch(op, d, threads)
    if impl == "onnxruntime":
        return make_onnxruntime(op, d, threads)
    raise ValueError(f"unknown implementation {impl!r}")


def impls_for(op):
    return (COPY,) + BNFAST_VARIANTS[op] + PEERS


# --------------------------------------------------------------------------------------------
# Timing (the command line; pytest-benchmark times the suite itself)

def measure_group(fns, budget=0.2, min_repeats=5, max_repeats=1000, batch_time=2e-3, warmup=True):
    """Median seconds per call of each callable in ``fns`` (a dict), measured round-robin.

    Each callable is called in batches of ``n`` calls (``n`` calibrated so that a batch takes at least
    ``batch_time``); the batches of all callables are interleaved, repeated ``min_repeats`` times or more
    within ``budget`` seconds per callable. Interleaving gives every implementation the same share of
    whatever else the machine is doing, so ratios stay meaningful on a busy machine.
    """
    names = list(fns)
    pc = time.perf_counter
    gc_was = gc.isenabled()
    gc.disable()
    try:
        batch, per = {}, {}
        times = {k: [] for k in names}
        for k in names:
            fn = fns[k]
            if warmup:
                fn()
            n = 1
            while True:
                t0 = pc()
                for _ in range(n):
                    fn()
                dt = pc() - t0
                if dt >= batch_time or n >= 1 << 20:
                    break
                n *= max(2, min(100, int(batch_time / max(dt, 1e-7) * 1.5)))
            batch[k], per[k] = n, dt
            if n == 1:
                times[k].append(dt)       # a slow call: its calibration run is a sample
        total = sum(per.values())
        repeats = int(min(max_repeats, max(min_repeats, budget * len(names) / max(total, 1e-9))))
        for r in range(repeats - min(len(v) for v in times.values())):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                fn, n = fns[k], batch[k]
                t0 = pc()
                for _ in range(n):
                    fn()
                times[k].append((pc() - t0) / n)
    finally:
        if gc_was:
            gc.enable()
    return {k: statistics.median(v) for k, v in times.items()}


def measure(fn, budget=0.2, min_repeats=5, max_repeats=1000, batch_time=2e-3):
    """Median seconds per call of ``fn`` (see measure_group)."""
    return measure_group({"f": fn}, budget, min_repeats, max_repeats, batch_time)["f"]


# --------------------------------------------------------------------------------------------
# The command-line sweep

def sweep_cases(mode):
    if mode == "tiny":
        return [_case((1, 64), "NC"), _case((16, 32), "NC"), _case((4, 8, 5, 5), "NCHW"),
                _case((4, 5, 5, 8), "NHWC"), _case((16, 32), "NC-slice", pad=5)]
    if mode == "quick":
        return [CASES[c] for c in TARGET_CASES]
    return list(CASES.values())


def run_sweep(mode="full", threads=None, dtype="float32", ops=OPS, peers=PEERS, progress=None,
              check_results=True, budget=None):
    """Time every (op, case, impl); returns a list of result dicts. ``budget``: seconds per
    implementation and case (default by mode)."""
    threads = threads or bnfast.get_num_threads()
    if mode == "full":
        default, batch, reps = 0.25, 2e-3, 5
    elif mode == "quick":
        default, batch, reps = 0.05, 1e-3, 3
    else:
        default, batch, reps = 0.005, 2e-4, 3
    budget = default if budget is None else budget
    peers = [p for p in peers if peer_installed(p)]
    for p in peers:
        if p != "numpy":
            _import_peer(p)
    set_threads(threads)
    cases = sweep_cases(mode)
    ops = [op for op in OPS if op in ops and not (mode == "quick" and op == "fwd_bwd")]
    plan = [(op, c) for c in cases for op in ops if applicable(op, c)]
    impls = {op: [i for i in (COPY,) + BNFAST_VARIANTS[op] + tuple(peers)
                  if not (i == "onnxruntime" and op != "eval")] for op in ops}
    total = sum(len(impls[op]) for op, _ in plan)
    results = []
    done = 0
    ftol = wrong_call_tol(dtype)
    try:
        for op, c in plan:
            fns, errs = {}, {}
            for impl in impls[op]:
                try:
                    fn, result = make(op, c, dtype, impl, threads)
                except Unavailable:
                    continue
                fn()
                errs[impl] = None
                if check_results and result is not None:
                    errs[impl] = err = check(op, get_data(c, dtype), result(), impl)
                    if impl in PEERS and err > ftol and progress:
                        progress(f"      note: {impl} {op} {c.label}: relative error {err:.2g} "
                                 "against the float64 reference")
                fns[impl] = fn
            times = measure_group(fns, budget=budget, batch_time=batch, min_repeats=reps, warmup=False)
            nbytes = get_data(c, dtype).x.nbytes
            for impl, t in times.items():
                done += 1
                results.append(dict(op=op, case=c.id, shape=c.shape, layout=c.layout, axis=c.axis,
                                    dtype=str(np.dtype(dtype)), threads=threads, impl=impl,
                                    seconds=t, nbytes=nbytes, error=errs[impl]))
                if progress:
                    progress(f"[{done:3d}/{total}] {op:8s} {c.label:22s} {impl:12s} {_fmt_time(t):>10s}")
            del fns
    finally:
        clear_data()
        bnfast.set_num_threads(None)
    return results


def _fmt_time(s):
    us = s * 1e6
    if us < 10:
        return f"{us:.2f} µs"
    if us < 1000:
        return f"{us:.1f} µs"
    return f"{us / 1000:.2f} ms"


def _fmt_size(nbytes):
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= k:
            return f"{nbytes / k:.3g} {unit}"
    return f"{nbytes} B"


def _fmt_us(s):
    us = s * 1e6
    return f"{us:.2f}" if us < 10 else f"{us:.1f}" if us < 1000 else f"{us:,.0f}"


def table_rows(results):
    """Rows (dicts) of the ratio table, one per bnfast variant and case."""
    by = OrderedDict()
    for r in results:
        by.setdefault((r["op"], r["case"], r["dtype"], r["threads"]), {})[r["impl"]] = r
    rows = []
    for (op, cid, dt, th), g in by.items():
        copy = g.get(COPY)
        for v in BNFAST_VARIANTS[op]:
            if v not in g:
                continue
            bn = g[v]
            row = OrderedDict()
            row["op"] = op
            row["variant"] = VARIANT_TITLES.get(v, v) if op == "eval" else "out="
            row["case"] = "x".join(map(str, bn["shape"])) + f" {bn['layout']}"
            row["dtype"] = dt
            row["threads"] = th
            row["nbytes"] = bn["nbytes"]
            row["copy"] = copy["seconds"] if copy else None
            row["bnfast"] = bn["seconds"]
            row["x_copy"] = bn["seconds"] / copy["seconds"] if copy else None
            for p in PEERS:
                row[p] = g[p]["seconds"] if p in g else None
                row["vs_" + p] = g[p]["seconds"] / bn["seconds"] if p in g else None
            rows.append(row)
    return rows


def format_table(results, markdown=False):
    rows = table_rows(results)
    head = ["op", "variant", "shape / layout", "dtype", "thr", "size", "copy µs", "bnfast µs",
            "bnfast/copy"] + [f"{PEER_TITLES[p]}/bnfast" for p in PEERS]
    present = [p for p in PEERS if any(r[p] is not None for r in rows)]
    keep = [True] * 9 + [p in present for p in PEERS]
    lines = []
    for r in rows:
        cells = [r["op"], r["variant"], r["case"], r["dtype"], str(r["threads"]), _fmt_size(r["nbytes"]),
                 _fmt_us(r["copy"]) if r["copy"] else "-", _fmt_us(r["bnfast"]),
                 f"{r['x_copy']:.2f}" if r["x_copy"] else "-"]
        for p in PEERS:
            v = r["vs_" + p]
            cells.append("-" if v is None else f"{v:.1f}×" if v >= 10 else f"{v:.2f}×")
        lines.append([c for c, k in zip(cells, keep) if k])
    head = [h for h, k in zip(head, keep) if k]
    if markdown:
        out = ["| " + " | ".join(head) + " |",
               "|" + "|".join("---" if i < 5 else "---:" for i in range(len(head))) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 5 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines]
    return "\n".join(out)


def legend(markdown=False):
    s = ("times are medians per call; bnfast/copy = bnfast time / np.copyto time on the same array "
         "(1.00 = at the memory-bandwidth roofline); Peer/bnfast = how many times longer the peer takes "
         "(> 1: bnfast is faster). eval variants: out= batch_norm(..., out=), alloc batch_norm(...), "
         "Frozen = FrozenBatchNorm.")
    return ("_" + s + "_") if markdown else s


def plot_path(path):
    """The file ``plot(results, path)`` will write, checked before anything is timed.

    A name without an extension gets matplotlib's default format (``.png``), as savefig would
    add it. ValueError, saying why, for a file type matplotlib cannot write or a folder that
    does not exist or cannot be written to.
    """
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ValueError(f"{path} is a folder, not a file name")
    ext = os.path.splitext(path)[1]
    fmt = ext[1:].lower()
    if not fmt:
        fmt = matplotlib.rcParams["savefig.format"]
        path = path.rstrip(".") + "." + fmt
    types = dict(FigureCanvasBase.get_supported_filetypes())   # (a copy: matplotlib's own)
    types.pop("pgf", None)     # needs a TeX install: it failed after the whole sweep
    if fmt == "pgf":
        raise ValueError(f"'.pgf' needs a TeX installation to write (choose one of "
                         f"{', '.join('.' + t for t in sorted(types))})")
    if fmt not in types:
        raise ValueError(f"matplotlib cannot write {ext!r} files (choose one of "
                         f"{', '.join('.' + t for t in sorted(types))})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the folder {folder} is not writable")
    return path


# Plot markers by layout (every layout of CASES and sweep_cases; another one gets "x").
PLOT_MARKERS = {"NC": "o", "NCHW": "s", "NHWC": "^", "NCL": "D", "NC-slice": "v"}


def plot(results, path):
    """Throughput (GB/s of x processed) against array size, one panel per operation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or bnfast[bench])") from None
    ops = [op for op in OPS if any(r["op"] == op for r in results)]
    if not ops:
        raise ValueError("no results to plot")
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops) + 1.6, 4.2), squeeze=False)
    colors = {COPY: "black", "bnfast": "tab:red", "frozen-out": "tab:orange", "numpy": "tab:blue",
              "torch": "tab:green", "onnxruntime": "tab:purple"}
    markers = dict(PLOT_MARKERS)
    for r in results:
        markers.setdefault(r["layout"], "x")
    for axp, op in zip(axes[0], ops):
        for impl, color in colors.items():
            for layout, mk in markers.items():
                pts = sorted((r["nbytes"], r["nbytes"] / r["seconds"] / 1e9) for r in results
                             if r["op"] == op and r["impl"] == impl and r["layout"] == layout)
                if not pts:
                    continue
                xs, ys = zip(*pts)
                axp.plot(xs, ys, marker=mk, color=color, linestyle="--" if impl == COPY else "-",
                         alpha=0.9, linewidth=1.2, markersize=5)
        axp.set_xscale("log")
        axp.set_yscale("log")
        axp.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axp.set_xlabel("array size (bytes)")
        axp.set_ylabel("throughput (GB/s of input)")
        axp.set_title(OP_TITLES[op])
        axp.grid(True, which="both", alpha=0.3)
    from matplotlib.lines import Line2D
    present = {(r["impl"], r["layout"]) for r in results}
    h1 = [Line2D([], [], color=c, linestyle="--" if i == COPY else "-",
                 label="np.copyto (roofline)" if i == COPY else i)
          for i, c in colors.items() if any(p[0] == i for p in present)]
    h2 = [Line2D([], [], color="gray", marker=m, linestyle="none", label=lay)
          for lay, m in markers.items() if any(p[1] == lay for p in present)]
    axes[0][-1].legend(handles=h1 + h2, fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    th = results[0]["threads"] if results else "?"
    fig.suptitle(f"bnfast {bnfast.__version__}: throughput vs size, {results[0]['dtype'] if results else ''}, "
                 f"{th} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# pytest-benchmark JSON -> ratio table (benchmarks/ratios.py and the suite's terminal summary)

def results_from_pytest(benchmarks):
    """Result dicts (as run_sweep returns) from pytest-benchmark's JSON ``benchmarks`` list."""
    out = []
    for b in benchmarks:
        e = b.get("extra_info") or {}
        if "op" not in e:
            continue
        out.append(dict(op=e["op"], case=e["case"], shape=tuple(e["shape"]), layout=e["layout"],
                        axis=e["axis"], dtype=e["dtype"], threads=e["threads"], impl=e["impl"],
                        seconds=b["stats"]["median"], nbytes=e["nbytes"]))
    return out

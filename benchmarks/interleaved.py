"""Ratios against a copy timed beside each call: steady numbers on a shared, noisy machine.

    python benchmarks/interleaved.py                      # 1 thread, the three 51 MB layouts
    python benchmarks/interleaved.py --threads 2 --reps 21
    python benchmarks/interleaved.py --layouts NCHW7x7,NCL4    # short runs
    python benchmarks/interleaved.py --layouts NCslice         # a column slice (strided rows)
    python benchmarks/interleaved.py --layouts NC300           # rows of 300: not whole lines
    python benchmarks/interleaved.py --layouts NCHW16          # rows aliasing in L2
    python benchmarks/interleaved.py --layouts NC1024,NCwide   # rows wider than a block

Each repetition times ``np.copyto`` of the input (with --threads N > 1, the same copy split
over N threads, as in ``python -m bnfast bench``) and then every operation once, and divides
each operation's time by that copy's; the table shows the median of those ratios. A
neighbour that slows the machine for a while slows the copy and the operations alike, so
the ratios move far less than the medians of separately timed runs (pytest-benchmark, or
``python -m bnfast bench``). PyTorch (``F.batch_norm``, autograd for forward + backward) is
timed the same way when it is installed, in repetitions of its own after bnfast's: its
calls map and unmap hundreds of MB of fresh outputs, and calls timed just after them ran
slower. With one thread, ``np.multiply`` of the input by a
scalar into the same output is timed too: the cost of the simplest one-pass elementwise
kernel with plain stores, a floor for eval on this machine.

``--floors`` (one thread) also times the bare memory traffic of each pass, from
``benchmarks/traffic.c`` compiled with the system C compiler: loads, one add an element
and streamed stores, the widest vectors the CPU has. ``floor 1r+w``: read x, write y (what
eval moves); ``floor 2r+w``: read x, then read x and write y (training forward of data
larger than the caches, channels last); ``floor bwd 2r+w`` and ``floor bwd 4r+w``: the
same with x and dy (backward in one pass, as NCHW channels from L2, and in two, as
channels last). A kernel cannot beat the floor of the passes it needs.

``backward eval`` is the gradient with the statistics held fixed (``training=False``: a
frozen layer fine-tuned through), one pass over x and dy: its floor is ``floor bwd 2r+w``.
"""
import argparse
import importlib.machinery
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if any(os.path.exists(os.path.join(_CHECKOUT, "bnfast", "_core" + suffix))
       for suffix in importlib.machinery.EXTENSION_SUFFIXES):   # built in place: that one
    sys.path.insert(0, _CHECKOUT)

import bnfast  # noqa: E402
from bnfast import _bench, _config  # noqa: E402

LAYOUTS = {
    "NCHW": ((64, 256, 28, 28), 1),
    "NHWC": ((64, 28, 28, 256), -1),
    "NC": ((200704, 64), 1),
    # short runs, read as rows (not in the default set)
    "NCHW7x7": ((64, 512, 7, 7), 1),
    "NCL4": ((32768, 64, 4), 1),
    # a column slice: the first 256 columns of a 272-wide array (rows not contiguous)
    "NCslice": ((50176, 256), -1, 16),
    # wide rows: 4096 features (rows wider than a chunk: normalized whole where streamed,
    # reduced in blocks of 512 columns that begin on the output's lines)
    "NCwide": ((3136, 4096), 1),
    # 1024 features: rows wider than a block, reduced whole (_full_rows)
    "NC1024": ((12544, 1024), 1),
    # rows of 300 features, 1200 bytes: not a whole number of lines
    "NC300": ((40000, 300), 1),
    # power-of-two NCHW: samples 256 KB apart, every row of a channel on the same L2 sets
    "NCHW16": ((64, 256, 16, 16), 1),
}
DEFAULT_LAYOUTS = ("NCHW", "NHWC", "NC")


def traffic_lib():
    """benchmarks/traffic.c compiled ($CC, else cc) and loaded: (library, None), or
    (None, why not)."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traffic.c")
    tmp = tempfile.mkdtemp(prefix="bnfast-traffic-")
    so = os.path.join(tmp, "traffic.so")
    try:
        r = subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", src,
                            "-o", so], capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"compiling {src} failed: {r.stderr.strip()}"
        lib = ctypes.CDLL(so)
    except OSError as e:
        return None, f"no C compiler or library: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # a loaded library stays mapped
    vp, n = ctypes.c_void_p, ctypes.c_size_t
    lib.traffic_read.restype = ctypes.c_double
    lib.traffic_read.argtypes = [vp, vp, n]
    lib.traffic_write.restype = None
    lib.traffic_write.argtypes = [vp, vp, vp, n, ctypes.c_int]
    lib.traffic_kind.restype = ctypes.c_char_p
    return lib, None


def _stream_bytes():
    """The output size from which bnfast streams an `out=` (non-temporal stores)."""
    from bnfast import _core
    n = _core._set_stream_bytes(0)
    _core._set_stream_bytes(n)
    return n


def _floor_ops(lib, x, dy, y):
    """The bare traffic of the passes over x (and dy) into y, its stores streamed where
    bnfast streams them; {} unless all three are C-contiguous."""
    if lib is None or not all(a.flags.c_contiguous for a in (x, dy, y)):
        return {}
    px, pdy, py, n = x.ctypes.data, dy.ctypes.data, y.ctypes.data, x.size
    read, write, nt = lib.traffic_read, lib.traffic_write, int(y.nbytes >= _stream_bytes())
    return {
        "floor 1r+w": lambda: write(px, None, py, n, nt),
        "floor 2r+w": lambda: (read(px, None, n), write(px, None, py, n, nt)),
        "floor bwd 2r+w": lambda: write(px, pdy, py, n, nt),
        "floor bwd 4r+w": lambda: (read(px, pdy, n), write(px, pdy, py, n, nt)),
    }


def _ops(shape, axis, with_torch, threads=1, pad=0, traffic=None):
    rng = np.random.default_rng(0)
    full, cols = shape[:-1] + (shape[-1] + pad,), (Ellipsis, slice(0, shape[-1]))
    x = (1000 + rng.standard_normal(full)).astype(np.float32)[cols]
    dy = rng.standard_normal(full).astype(np.float32)[cols]
    C = shape[axis]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    _, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis)

    def train():
        return bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm, running_var=rv,
                                       out=y)

    def fwd_bwd():
        _, m, s = train()
        bnfast.batch_norm_backward(dy, x, m, s, w, axis=axis, out=dx)

    ops = {
        "eval": lambda: bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=y),
        "train": train,
        "backward": lambda: bnfast.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                       out=dx),
        "fwd_bwd": fwd_bwd,
    }
    if threads == 1:                   # NumPy's ufuncs and the floors run on one thread
        scale = np.float32(1.5)
        ops["np.multiply"] = lambda: np.multiply(x, scale, out=y)
        ops.update(_floor_ops(traffic, x, dy, y))
    # the gradient with the statistics held fixed (a frozen layer fine-tuned through): one
    # pass over x and dy into dx, whose floor is "floor bwd 2r+w"
    ops["backward eval"] = lambda: bnfast.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5),
                                                              w, axis=axis, out=dx,
                                                              training=False)
    if with_torch:
        import torch
        import torch.nn.functional as F

        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
        if axis != 1:                       # channels last: a permuted view, as PyTorch holds it
            perm = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))
            xt, dyt = xt.permute(*perm), dyt.permute(*perm)
        xg = xt.detach().requires_grad_(True)
        wt, bt = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
        trm, trv = torch.zeros(C), torch.ones(C)

        def torch_train():
            with torch.no_grad():
                F.batch_norm(xt, trm, trv, wt, bt, True, 0.1, 1e-5)

        def torch_fwd_bwd():
            xg.grad = wt.grad = bt.grad = None
            F.batch_norm(xg, trm, trv, wt, bt, True, 0.1, 1e-5).backward(dyt)

        # eval mode: the backward alone, through a graph kept from one forward
        y_eval = F.batch_norm(xg, trm, trv, wt, bt, False, 0.1, 1e-5)

        def torch_backward_eval():
            xg.grad = wt.grad = bt.grad = None
            y_eval.backward(dyt, retain_graph=True)

        ops["torch train"] = torch_train
        ops["torch fwd_bwd"] = torch_fwd_bwd
        ops["torch backward eval"] = torch_backward_eval
    return x, ops


def run(layouts, threads, reps, with_torch, traffic=None):
    bnfast.set_num_threads(threads)
    if with_torch:
        import torch
        torch.set_num_threads(threads)
    rows = []
    for name in layouts:
        shape, axis, *pad = LAYOUTS[name]
        x, ops = _ops(shape, axis, with_torch, threads, *pad, traffic=traffic)
        copy, _ = _bench.make_copy(SimpleNamespace(x=x, out=np.empty_like(x)), threads)
        copy()
        for f in ops.values():
            f()
            f()
        ratios = {k: [] for k in ops}
        copies = []
        # PyTorch's calls in a phase of their own: each maps and unmaps hundreds of MB of
        # fresh outputs, and the calls timed after them ran slower for tens of
        # milliseconds (NCHW backward 1.70 -> 2.22x a copy, interleaved in one loop)
        phases = [[k for k in ops if not k.startswith("torch")],
                  [k for k in ops if k.startswith("torch")]]
        pc = time.perf_counter
        for phase in (p for p in phases if p):
            for _ in range(reps):
                t0 = pc()
                copy()
                c = pc() - t0
                copies.append(c)
                for k in phase:
                    t0 = pc()
                    ops[k]()
                    ratios[k].append((pc() - t0) / c)
        med = {k: statistics.median(v) for k, v in ratios.items()}
        rows.append((name, med, statistics.median(copies)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                   help=f"comma-separated, of {','.join(LAYOUTS)} "
                        f"(default: {','.join(DEFAULT_LAYOUTS)})")
    p.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    p.add_argument("--floors", action="store_true",
                   help="also time the bare memory traffic of each pass (one thread; "
                        "compiles benchmarks/traffic.c with the system C compiler)")
    a = p.parse_args(argv)
    layouts = [s for s in a.layouts.split(",") if s]
    bad = [s for s in layouts if s not in LAYOUTS]
    if bad:
        p.error(f"--layouts: unknown layout(s) {', '.join(bad)} (choose from {', '.join(LAYOUTS)})")
    if not layouts:
        p.error(f"--layouts: no layout given (choose one or more of {', '.join(LAYOUTS)})")
    if a.threads < 1 or a.reps < 1:
        p.error(f"--threads and --reps must be >= 1, got --threads {a.threads} --reps {a.reps}")
    with_torch = False
    if not a.no_torch:
        try:
            import torch  # noqa: F401
            with_torch = True
        except ImportError:
            pass
    traffic = None
    if a.floors:
        if a.threads != 1:
            p.error("--floors: the floors are one thread's; use --threads 1")
        traffic, why = traffic_lib()
        if traffic is None:
            print(f"--floors: not timed ({why})", file=sys.stderr)
    rows = run(layouts, a.threads, a.reps, with_torch, traffic)
    cols = list(dict.fromkeys(k for _, med, _ in rows for k in med))
    print(f"bnfast {bnfast.__version__}, {a.threads} thread(s), float32, median of {a.reps} "
          f"per-repetition ratios to np.copyto{' split over the threads' if a.threads > 1 else ''}"
          f"; {_config.config_info()['CPU']}"
          + (f"; floors in {traffic.traffic_kind().decode()}" if traffic is not None else ""))
    head = ["layout", "copy (µs)"] + [f"{k} / copy" for k in cols]
    if with_torch:
        head += ["PyTorch / bnfast train", "PyTorch / bnfast fwd_bwd",
                 "PyTorch / bnfast backward eval"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, med, copy_s in rows:
        cells = [name, f"{copy_s * 1e6:.1f}"] + [f"{med[k]:.2f}" if k in med else "—"
                                                 for k in cols]
        if with_torch:
            cells += [f"{med['torch train'] / med['train']:.2f}×",
                      f"{med['torch fwd_bwd'] / med['fwd_bwd']:.2f}×",
                      f"{med['torch backward eval'] / med['backward eval']:.2f}×"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Command line: ``python -m bnfast info`` and ``python -m bnfast bench``."""
from __future__ import annotations

import argparse
import os
import sys
import time

DESCRIPTION = "bnfast: fast, exact batch normalization for NumPy on the CPU."

BENCH_EPILOG = """\
What it measures: for each array shape and layout, the median time per call of
  eval      bnfast.batch_norm(..., out=) and allocating, FrozenBatchNorm with and without out=
  train     bnfast.batch_norm_train (batch statistics, normalization, running-stats update)
  backward  bnfast.batch_norm_backward (train mode)
  backward_eval  the same with training=False (the running statistics held fixed)
  fwd_bwd   train forward then backward (full sweep only)
beside np.copyto(dst, x) on the same array (the memory-bandwidth roofline; with --threads > 1
a copy split over that many threads), a NumPy one-liner, and PyTorch and ONNX Runtime when
installed (PyTorch: pip install torch, the CPU wheel is enough; ONNX Runtime:
pip install 'bnfast[bench]'). Every result is checked against a float64 reference first.
Progress goes to stderr, the table to stdout.

examples:
  python -m bnfast bench --quick
  python -m bnfast bench --threads 1 --markdown > bench.md
  python -m bnfast bench --plot throughput.png
"""


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {s}")
    return v


def build_parser():
    from bnfast import _bench

    p = argparse.ArgumentParser(prog="python -m bnfast", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print version, build and runtime configuration (= bnfast.show_config())",
                   description="Print bnfast's version, compiler, OpenMP (on/off, version, runtime "
                               "library), threads, the SIMD ISA chosen at run time, NumPy and Python.")
    b = sub.add_parser("bench", help="time bnfast against np.copyto, NumPy, PyTorch and ONNX Runtime",
                       description="Time bnfast against the np.copyto roofline and its peers over a "
                                   "sweep of shapes and operations.",
                       epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true",
                   help="the issue's target shapes only, short timings, no fwd_bwd (< 1 minute)")
    b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # tests: seconds
    b.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="threads for bnfast, PyTorch, ONNX Runtime and the copy "
                        "(default: bnfast.get_num_threads(), i.e. all)")
    b.add_argument("--dtype", choices=("float32", "float64", "float16"), default="float32",
                   help="element type (default float32)")
    # default None: an explicit fwd_bwd with --quick is refused, the default one dropped
    b.add_argument("--ops", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(_bench.OPS)} (default: all)")
    b.add_argument("--no-peers", action="store_true",
                   help="time only bnfast and np.copyto (no NumPy, PyTorch, ONNX Runtime)")
    b.add_argument("--budget", type=_positive_float, default=None, metavar="SECONDS",
                   help="time given to each implementation per case (default 0.25, 0.05 with "
                        "--quick); more gives steadier ratios on a busy machine")
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    b.add_argument("--plot", metavar="FILE.png",
                   help="also draw throughput (GB/s) against array size, with the copy roofline "
                        "and the peers (needs matplotlib)")
    b.set_defaults(subparser=b)     # bench's own errors show bench's usage
    return p


def _bench(args, parser):
    from bnfast import _bench, _config

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    choices = ", ".join(_bench.OPS)
    if args.ops is None:
        ops = list(_bench.OPS)
    else:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        bad = [o for o in ops if o not in _bench.OPS]
        if bad:
            parser.error(f"--ops: unknown operation(s) {', '.join(bad)} (choose from {choices})")
        if not ops:
            parser.error(f"--ops: no operation given (choose one or more of {choices})")
        if mode == "quick" and "fwd_bwd" in ops:
            parser.error("--ops fwd_bwd: the --quick sweep does not time fwd_bwd (the full "
                         "sweep does: leave out --quick)")
    plot_path = None
    if args.plot is not None and not args.plot.strip():
        parser.error("--plot: no file name given")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed: "
                  "pip install matplotlib (or pip install 'bnfast[bench]')", file=sys.stderr)
            return 2
        try:            # before the sweep, not after minutes of timing
            plot_path = _bench.plot_path(args.plot)
        except ValueError as e:
            parser.error(f"--plot {args.plot}: {e}")
    peers = () if args.no_peers else _bench.PEERS
    import bnfast

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    threads = args.threads or bnfast.get_num_threads()
    if args.threads:
        # fewer where bnfast cannot run more: every column then uses what bnfast does,
        # so that its ratios compare like with like
        bnfast.set_num_threads(args.threads)     # the sweep sets it again
        usable = bnfast.get_num_threads()
        if usable < args.threads:
            why = ("built without OpenMP" if not bnfast._core._build_info()["openmp"]
                   else "OMP_THREAD_LIMIT" if os.environ.get("OMP_THREAD_LIMIT")
                   else "a process forked while its parent had threads")
            progress(f"--threads {args.threads}: bnfast runs {usable} thread(s) here ({why}); "
                     f"timing everything with {usable}")
            threads = usable

    missing = [p for p in peers if not _bench.peer_installed(p)]
    broken = [p for p in missing if p in _bench.PEER_BROKEN]
    missing = [p for p in missing if p not in broken]
    if missing:
        progress(f"not installed, skipped: {', '.join(missing)}. {_bench.install_hint(missing)}")
    for p in broken:
        progress(f"installed but failing to import, skipped: {p} ({_bench.PEER_BROKEN[p]})")
    t0 = time.perf_counter()
    results = _bench.run_sweep(mode, threads=threads, dtype=args.dtype, ops=ops, peers=peers,
                               progress=progress, budget=args.budget)
    elapsed = time.perf_counter() - t0
    info = _config.config_info()
    vers = [f"NumPy {info['NumPy']}"] + [
        f"{_bench.PEER_TITLES[p]} {_bench.peer_version(p)}" for p in peers
        if p != "numpy" and _bench.peer_installed(p)]
    title = (f"bnfast {info['bnfast']} ({info['SIMD ISA']}, OpenMP {'on' if 'enabled' in info['OpenMP'] else 'off'})"
             f", {threads} thread(s), {args.dtype}; {', '.join(vers)}; {info['CPU']}")
    if args.markdown:
        print(f"**{title}**\n")
        print(_bench.format_table(results, markdown=True))
        print()
        print(_bench.legend(markdown=True))
    else:
        print(title)
        print()
        print(_bench.format_table(results))
        print()
        print(_bench.legend())
    progress(f"done in {elapsed:.1f} s")
    if plot_path:
        _bench.plot(results, plot_path)
        progress(f"plot written to {plot_path}")
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from bnfast._config import show_config
        show_config()
        return 0
    if args.command == "bench":
        return _bench(args, args.subparser)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

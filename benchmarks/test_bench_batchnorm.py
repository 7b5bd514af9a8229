"""bnfast beside np.copyto, NumPy, PyTorch and ONNX Runtime (pytest-benchmark).

One pytest-benchmark group per (operation, shape/layout, dtype, threads). See conftest.py for how to run.
"""
import pytest

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (or 'bnfast[bench]')")

from bnfast import _bench  # noqa: E402

THREADS = sorted({1, _bench.all_threads()})

# (case id, dtype, ops)
PLAN = [(cid, "float32", _bench.OPS) for cid in _bench.TARGET_CASES] + [
    ("1x64", "float64", ("eval",)),
    ("256x1024", "float64", _bench.OPS),
    ("64x256x28x28-NCHW", "float64", ("eval", "train")),
    # short runs, read as rows
    ("64x512x7x7-NCHW", "float32", _bench.OPS),
    # ... at batch 2, in cache: a channel at a time
    ("2x1024x7x7-NCHW", "float32", _bench.OPS),
    ("32768x64x4-NCL", "float32", _bench.OPS),
    # a column slice of a wider array: rows not contiguous
    ("50176x256-NC-slice", "float32", _bench.OPS),
    # wide rows
    ("3136x4096", "float32", _bench.OPS),
    # rows not a whole number of lines
    ("40000x300", "float32", _bench.OPS),
    # float16, read and written as it is
    ("64x256x28x28-NCHW", "float16", _bench.OPS),
    ("1x64", "float16", ("eval",)),
]


def _params():
    out = []
    for cid, dtype, ops in PLAN:
        case = _bench.CASES[cid]
        marks = [pytest.mark.large if case.large else pytest.mark.small]
        for op in ops:
            if not _bench.applicable(op, case):
                continue
            for threads in THREADS:
                for impl in _bench.impls_for(op):
                    if impl == "onnxruntime" and op != "eval":
                        continue       # no training mode in ONNX Runtime's CPU kernel
                    out.append(pytest.param(op, cid, dtype, threads, impl, marks=marks,
                                            id=f"{op}-{cid}-{dtype}-t{threads}-{impl}"))
    return out


@pytest.mark.parametrize("op, case_id, dtype, threads, impl", _params())
def test_batchnorm(benchmark, op, case_id, dtype, threads, impl):
    case = _bench.CASES[case_id]
    _bench.set_threads(threads)
    try:
        fn, result = _bench.make(op, case, dtype, impl, threads)
    except _bench.Unavailable as e:
        pytest.skip(str(e))
    fn()
    err = None
    if result is not None:
        # raises for a bnfast result that is not batch norm; peers' error is only recorded
        err = _bench.check(op, _bench.get_data(case, dtype), result(), impl)
    for _ in range(2):
        fn()
    benchmark.group = f"{op} {case.label} {dtype} {threads}t"
    d = _bench.get_data(case, dtype)
    benchmark.extra_info.update(
        op=op, case=case.id, shape=list(case.shape), layout=case.layout, axis=case.axis,
        dtype=dtype, threads=threads, impl=impl, nbytes=int(d.x.nbytes),
        max_rel_error=err,
        # where the arrays lie modulo 1 MiB: placement moves some kernels' times (README)
        placement={k: hex(getattr(d, k).ctypes.data % (1 << 20)) for k in ("x", "dy", "out", "dx")},
    )
    benchmark(fn)

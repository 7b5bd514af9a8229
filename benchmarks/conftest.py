"""pytest-benchmark configuration for bnfast's benchmark suite.

Run (from the repository root):

    pytest benchmarks/ -p no:cacheprovider --benchmark-only                  # everything (~5 min on 2 cores)
    pytest benchmarks/ -p no:cacheprovider --benchmark-only -m "not large"   # small arrays only (~1 min)
    pytest benchmarks/ -p no:cacheprovider --benchmark-only -k float32       # float32 only

The default ``testpaths = ["tests"]`` keeps these files out of the test run.

Each pytest-benchmark group is one (operation, shape/layout, dtype, threads) and holds bnfast, the
``np.copyto`` roofline, a NumPy one-liner, PyTorch and ONNX Runtime (skipped when not installed).
At the end a Markdown table of ratios (bnfast / copy, peer / bnfast) is printed; the saved JSON
(``--benchmark-autosave``) carries ``ratio_to_copy`` and ``gbps`` in each benchmark's ``extra_info``,
and ``python benchmarks/ratios.py FILE.json`` prints the same table from a saved run.

Unless ``--benchmark-max-time`` is given (on the command line, in ``PYTEST_ADDOPTS`` or in the ini
file's ``addopts``), this suite uses 0.2 s per benchmark (pytest-benchmark's default is 1 s), so the
whole run fits in a few minutes; ``--benchmark-min-rounds`` still applies.
"""
import os
import shlex

import pytest

DEFAULT_MAX_TIME = 0.2

# Marks of test_bench_batchnorm.py: `large` is _bench's Case.large (2**22 elements or more).
# The sizes are those of its PLAN (tests/test_cli.py checks them).
MARKERS = {
    "large": "arrays of 2**22 elements or more (25-103 MB)",
    "small": "arrays of fewer than 2**22 elements (at most 6.5 MB)",
}


def _bench_module():
    from bnfast import _bench
    return _bench


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def _max_time_given(config):
    """--benchmark-max-time is set, from any of the places pytest reads options from. (Its
    parsed value cannot tell: an unset option reads as pytest-benchmark's default.)"""
    args = [*config.invocation_params.args,
            *shlex.split(os.environ.get("PYTEST_ADDOPTS", "")),
            *config.getini("addopts")]
    return any(str(a).split("=", 1)[0] == "--benchmark-max-time" for a in args)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    config = session.config
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return
    if not _max_time_given(config):
        bs.options["max_time"] = DEFAULT_MAX_TIME


def _results(benchmarks):
    _bench = _bench_module()
    return _bench.results_from_pytest(benchmarks)


def _add_ratios(benchmarks):
    """ratio_to_copy and gbps into each benchmark dict's extra_info (pytest-benchmark JSON format)."""
    copies = {}
    for b in benchmarks:
        e = b.get("extra_info") or {}
        if e.get("impl") == "copy":
            copies[b.get("group")] = b["stats"]["median"]
    for b in benchmarks:
        e = b.get("extra_info")
        if not e or "impl" not in e:
            continue
        med = b["stats"]["median"]
        c = copies.get(b.get("group"))
        if c:
            e["ratio_to_copy"] = med / c
        if med > 0:
            e["gbps"] = e["nbytes"] / med / 1e9


def pytest_benchmark_update_json(config, benchmarks, output_json):
    _add_ratios(output_json.get("benchmarks", []))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or bs.disabled or not bs.benchmarks:
        return
    dicts = []
    for bench in bs.benchmarks:
        if getattr(bench, "has_error", False):
            continue
        try:
            dicts.append(bench.as_dict(include_data=False))
        except Exception:  # pragma: no cover - pytest-benchmark internals changed
            return
    res = _results(dicts)
    if not res:
        return
    _bench = _bench_module()
    terminalreporter.write_sep("-", "bnfast: ratios (medians; bnfast/copy, peer/bnfast)")
    terminalreporter.write_line(_bench.format_table(res, markdown=True))
    terminalreporter.write_line(_bench.legend(markdown=True))


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    import bnfast
    bnfast.set_num_threads(None)

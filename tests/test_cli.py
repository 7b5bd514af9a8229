"""The command line (`python -m bnfast info|bench`), show_config, and the benchmark table/ratio code.

Subprocess runs use the hidden `bench --tiny` sweep (tiny arrays, ~5 s with the peers' imports);
nothing here asserts a time.
"""
import importlib.util
import io
import json
import os
import re
import subprocess
import tempfile
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

import bnfast
from bnfast import _bench
from bnfast._config import config_info, show_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _run(*args, timeout=300, path_first=()):
    env = dict(os.environ)
    # the subprocess imports the same bnfast as this process
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([*path_first, pkg_parent]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("MPLBACKEND", "Agg")
    # cwd: not the checkout, whose source bnfast/ (without a build) `-m` would import
    return subprocess.run([sys.executable, "-m", "bnfast", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tempfile.gettempdir())


def _fields(text):
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out.setdefault(k.strip(), v.strip())
    return out


# ------------------------------------------------------------------------------------- info

def test_info_prints_the_fields():
    r = _run("info", timeout=120)
    assert r.returncode == 0, r.stderr
    f = _fields(r.stdout)
    for key in ("bnfast", "compiler", "OpenMP", "OpenMP runtime", "threads", "SIMD ISA", "NumPy", "Python"):
        assert key in f and f[key], (key, r.stdout)
    assert f["bnfast"] == bnfast.__version__
    assert f["NumPy"] == np.__version__
    build = bnfast._core._build_info()
    assert f["SIMD ISA"] == build["simd_isa"]
    assert f["inner loops"] == build["simd_loops"]
    assert build["simd_loops"] in ("AVX-512 intrinsics", "AVX2 intrinsics", "plain loops")
    # how the exact fused multiply-adds run: the instruction, or libm's fma()
    assert f["fused multiply-add"] == build["fma"]
    assert build["fma"].startswith(("instruction", "libm fma()")), build["fma"]
    if build["simd_loops"] != "plain loops":       # AVX2 and AVX-512 CPUs have FMA
        assert build["fma"].startswith("instruction"), build["fma"]
    assert f["OpenMP"].startswith("enabled" if build["openmp"] else "disabled")
    assert int(f["threads"]) >= 1
    assert f["Python"].startswith("%d.%d." % sys.version_info[:2])


def test_show_config_matches_config_info():
    buf = io.StringIO()
    show_config(file=buf)
    f = _fields(buf.getvalue())
    info = config_info()
    assert set(info) <= set(f)
    assert f["threads"] == str(bnfast.get_num_threads())
    bnfast.set_num_threads(1)
    try:
        assert config_info()["threads"] == "1"
    finally:
        bnfast.set_num_threads(None)


def test_config_names_the_cpu():
    # benchmark ratios are only comparable on the same CPU: the config names it
    cpu = config_info()["CPU"]
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count()
    assert cpu.endswith(f", {n} logical CPU(s) available"), cpu
    if sys.platform.startswith("linux"):
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            assert cpu.startswith(names[0] + ","), cpu


def test_show_config_names_the_openmp_runtime_with_threadpoolctl():
    pytest.importorskip("threadpoolctl")
    if not bnfast._core._build_info()["openmp"]:
        pytest.skip("built without OpenMP")
    rt = config_info()["OpenMP runtime"]
    assert re.search(r"gomp|iomp|omp", rt), rt


def test_show_config_without_openmp_names_no_runtime_of_its_own(monkeypatch):
    """A build without OpenMP is linked against no runtime: one another library loaded
    (PyTorch's libgomp) is named as theirs, not as bnfast's."""
    from bnfast import _config
    build = dict(bnfast._core._build_info(), openmp=False, openmp_version=0)
    monkeypatch.setattr(bnfast._core, "_build_info", lambda: build)
    monkeypatch.setattr(_config, "_openmp_runtimes", lambda: ["libgomp (x/libgomp.so.1)"])
    rt = config_info()["OpenMP runtime"]
    assert rt.startswith("none (built without OpenMP); loaded by other libraries: libgomp"), rt
    monkeypatch.setattr(_config, "_openmp_runtimes", lambda: None)
    assert config_info()["OpenMP runtime"] == "none (built without OpenMP)"


# ------------------------------------------------------------------------------------- bench

def _parse_markdown(text):
    rows = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    assert set(rows[1].replace("|", "").replace("-", "").replace(":", "")) <= {""}
    return head, [dict(zip(head, (c.strip() for c in r.strip("|").split("|")))) for r in rows[2:]]


def _num(s):
    return float(s.replace(",", "").rstrip("×"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    png = tmp_path_factory.mktemp("plot") / "bench.png"
    args = ["bench", "--tiny", "--markdown", "--threads", "1", "--budget", "0.002"]
    if HAVE_MPL:
        args += ["--plot", str(png)]
    r = _run(*args)
    return r, png


def test_bench_markdown_table(tiny_run):
    r, _ = tiny_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[  1/" in r.stderr                         # progress on stderr
    assert "|" not in r.stderr
    head, rows = _parse_markdown(r.stdout)
    for col in ("op", "variant", "shape / layout", "copy µs", "bnfast µs", "bnfast/copy", "NumPy/bnfast"):
        assert col in head
    assert ("PyTorch/bnfast" in head) == HAVE_TORCH
    assert ("ONNX Runtime/bnfast" in head) == HAVE_ORT
    ops = {row["op"] for row in rows}
    assert {"eval", "train", "backward"} <= ops
    assert {row["variant"] for row in rows if row["op"] == "eval"} == {
        "out=", "alloc", "Frozen, out=", "Frozen, alloc"}
    # train needs > 1 value per channel: no (1, 64) train row
    assert not any(row["op"] == "train" and row["shape / layout"] == "1x64 NC" for row in rows)
    for row in rows:
        assert row["thr"] == "1"
        copy, bn, ratio = _num(row["copy µs"]), _num(row["bnfast µs"]), _num(row["bnfast/copy"])
        assert copy > 0 and bn > 0
        # the printed ratio is the ratio of the printed times (up to their rounding)
        assert ratio == pytest.approx(bn / copy, rel=0.1, abs=0.02)
        assert _num(row["NumPy/bnfast"]) > 0


def test_bench_plot_writes_png(tiny_run):
    if not HAVE_MPL:
        pytest.skip("matplotlib is not installed")
    r, png = tiny_run
    assert r.returncode == 0, r.stderr[-3000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _hide_modules(root, *names):
    """A folder to put first on the subprocess's PYTHONPATH in which ``import name`` fails as
    if the package were not installed (whether or not it is)."""
    for name in names:
        pkg = root / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    return str(root)


def test_bench_plot_without_matplotlib_is_a_clear_error(tmp_path):
    # matplotlib is hidden rather than the test skipped where it is installed (CI's test
    # extra has it), so the clear error is checked in every environment
    png = tmp_path / "x.png"
    hidden = _hide_modules(tmp_path / "no_mpl", "matplotlib")
    r = _run("bench", "--tiny", "--no-peers", "--plot", str(png), path_first=[hidden])
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "--plot needs matplotlib" in r.stderr and "pip install" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not png.exists()


def test_bench_help_and_bad_arguments():
    r = _run("bench", "--help", timeout=120)
    assert r.returncode == 0
    for opt in ("--quick", "--threads", "--plot", "--markdown", "--budget", "np.copyto"):
        assert opt in r.stdout
    assert "--tiny" not in r.stdout
    assert "pip install torch" in r.stdout            # the bench extra has no torch
    assert _run("bench", "--threads", "0", timeout=120).returncode == 2
    for bad in ("0", "-1", "nan", "x"):
        r = _run("bench", "--budget", bad, timeout=120)
        assert r.returncode == 2 and "--budget" in r.stderr
    r = _run("bench", "--ops", "eval,nope", timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr
    assert "usage: python -m bnfast bench" in r.stderr      # bench's usage, not the top's
    r = _run("bench", "--plot", "", timeout=120)            # not silently no plot
    assert r.returncode == 2 and "--plot: no file name given" in r.stderr, r.stderr
    assert _run(timeout=120).returncode == 2          # no command: usage


def test_bench_threads_beyond_what_bnfast_runs(monkeypatch, capsys):
    """--threads N where bnfast runs fewer (built without OpenMP, or a forked child):
    the title, the thr column and the copy use what bnfast does, and it is said."""
    import bnfast
    from bnfast.__main__ import main
    seen = {}

    def sweep(mode, threads, **kw):
        seen["threads"] = threads
        return [_res("eval", "copy", 1e-6), _res("eval", "bnfast", 2e-6)]

    monkeypatch.setattr(_bench, "run_sweep", sweep)
    monkeypatch.setattr(bnfast, "get_num_threads", lambda: 1)
    try:
        assert main(["bench", "--tiny", "--no-peers", "--threads", "4"]) == 0
    finally:
        bnfast.set_num_threads(None)
    out, err = capsys.readouterr()
    assert seen["threads"] == 1 and ", 1 thread(s)," in out
    assert "--threads 4: bnfast runs 1 thread(s) here" in err


def test_bench_ops_without_an_operation_or_fwd_bwd_in_quick_mode_are_refused():
    r = _run("bench", "--ops", ",", timeout=120)
    assert r.returncode == 2 and "--ops: no operation given" in r.stderr, r.stderr
    assert "[]" not in r.stderr
    # the quick sweep has no fwd_bwd: asking for it is an error, not an empty table
    # (nor, with --plot, a crash on an empty figure)
    for extra in ((), ("--plot", os.path.join(tempfile.gettempdir(), "bnfast-unwritten.png"))):
        r = _run("bench", "--quick", "--no-peers", "--ops", "fwd_bwd", *extra, timeout=120)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "fwd_bwd" in r.stderr and "--quick" in r.stderr and "[  1/" not in r.stderr
        assert "Traceback" not in r.stderr


def test_missing_peers_install_hints(monkeypatch, capsys):
    """The bench extra has no torch: the hints for PyTorch say `pip install torch`."""
    from bnfast.__main__ import main
    monkeypatch.setattr(_bench, "peer_installed", lambda name: name not in ("torch", "onnxruntime"))
    with pytest.raises(_bench.Unavailable) as e:
        _bench._import_peer("torch")
    assert "pip install torch" in str(e.value) and "bnfast[bench]" not in str(e.value)
    # the sweep itself is not under test here
    monkeypatch.setattr(_bench, "run_sweep", lambda *a, **k: [_res("eval", "copy", 1e-6),
                                                                _res("eval", "bnfast", 2e-6)])
    assert main(["bench", "--tiny", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("not installed, skipped"))
    torch_hint = line.split("PyTorch:", 1)[1].split(";")[0] if "PyTorch:" in line else line
    assert "pip install torch" in torch_hint and "bnfast[bench]" not in torch_hint, line
    assert "onnxruntime" in line


def test_bench_plot_path_is_checked_before_timing(tmp_path):
    if not HAVE_MPL:
        pytest.skip("matplotlib is not installed")
    for bad, why in ((tmp_path / "missing" / "x.png", "does not exist"),
                     (tmp_path / "x.nope", "'.nope'"),
                     (tmp_path / "x.pgf", "'.pgf'"),   # needs TeX: it failed after the sweep
                     (tmp_path, "folder")):
        r = _run("bench", "--tiny", "--no-peers", "--plot", str(bad), timeout=120)
        assert r.returncode == 2, (bad, r.stderr[-2000:])
        assert "--plot" in r.stderr and why in r.stderr, r.stderr[-2000:]
        assert "[  1/" not in r.stderr and "Traceback" not in r.stderr   # nothing was timed
    assert list(tmp_path.iterdir()) == []


def test_bench_plot_without_extension_reports_the_file_written(tmp_path):
    if not HAVE_MPL:
        pytest.skip("matplotlib is not installed")
    r = _run("bench", "--tiny", "--no-peers", "--ops", "eval", "--threads", "1", "--budget", "0.001",
             "--plot", str(tmp_path / "p2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "p2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {tmp_path / 'p2.png'}" in r.stderr, r.stderr[-500:]


def test_plot_draws_every_layout(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    close, figs = plt.close, []
    monkeypatch.setattr(plt, "close", figs.append)      # keep the figure to look at
    layouts = {c.layout: c.id for c in list(_bench.CASES.values())}
    results = [_res("eval", impl, 1e-5 * (i + 1), case=cid)
               for cid in layouts.values() for i, impl in enumerate(("copy", "bnfast"))]
    _bench.plot(results, str(tmp_path / "all.png"))
    (fig,) = figs
    drawn = {t.get_text() for t in fig.axes[-1].get_legend().get_texts()}
    assert set(layouts) <= drawn, drawn               # NC-slice included
    assert len(fig.axes[0].get_lines()) == 2 * len(layouts)
    with pytest.raises(ValueError, match="no results"):
        _bench.plot([], str(tmp_path / "none.png"))
    close(fig)


# ------------------------------------------------------------------------------ table / ratios

def _res(op, impl, seconds, case="1x64", threads=1, dtype="float32"):
    c = _bench.CASES[case]
    return dict(op=op, case=case, shape=c.shape, layout=c.layout, axis=c.axis, dtype=dtype,
                threads=threads, impl=impl, seconds=seconds, nbytes=c.size * 4)


def test_table_ratios_are_computed_from_the_medians():
    results = [_res("eval", "copy", 1e-6), _res("eval", "bnfast", 2e-6), _res("eval", "frozen-out", 5e-7),
               _res("eval", "numpy", 8e-6), _res("eval", "torch", 30e-6)]
    rows = {r["variant"]: r for r in _bench.table_rows(results)}
    assert set(rows) == {"out=", "Frozen, out="}
    assert rows["out="]["x_copy"] == pytest.approx(2.0)
    assert rows["Frozen, out="]["x_copy"] == pytest.approx(0.5)
    assert rows["out="]["vs_numpy"] == pytest.approx(4.0)
    assert rows["Frozen, out="]["vs_torch"] == pytest.approx(60.0)
    assert rows["out="]["vs_onnxruntime"] is None
    md = _bench.format_table(results, markdown=True)
    head, parsed = _parse_markdown(md)
    assert "ONNX Runtime/bnfast" not in head            # absent peer: no column
    assert [p["bnfast/copy"] for p in parsed] == ["2.00", "0.50"]
    assert [p["PyTorch/bnfast"] for p in parsed] == ["15.0×", "60.0×"]


def test_ratios_script_reads_pytest_benchmark_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bnfast_bench_ratios", os.path.join(ROOT, "benchmarks", "ratios.py"))
    if spec is None or not os.path.exists(spec.origin):
        pytest.skip("benchmarks/ratios.py not in this checkout")
    ratios = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ratios)
    benches = []
    for r in [_res("eval", "copy", 1e-6), _res("eval", "frozen-out", 0.8e-6), _res("eval", "frozen", 2e-6),
              _res("eval", "torch", 9e-6)]:
        c = _bench.CASES[r["case"]]
        benches.append({"group": "g", "name": r["impl"], "stats": {"median": r["seconds"]},
                        "extra_info": dict(op=r["op"], case=r["case"], shape=list(c.shape), layout=c.layout,
                                           axis=c.axis, dtype=r["dtype"], threads=1, impl=r["impl"],
                                           nbytes=r["nbytes"])})
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    assert ratios.main([str(path)]) == 0
    out = capsys.readouterr().out
    tgt = {(t[0], t[1]): t for t in ratios.targets(_bench.results_from_pytest(benches))}
    assert tgt[("FrozenBatchNorm out= / copy (1t)", "1x64")][2] == pytest.approx(0.8)
    assert tgt[("FrozenBatchNorm out= / copy (1t)", "1x64")][4] is True
    assert tgt[("FrozenBatchNorm alloc / copy (1t)", "1x64")][4] is False          # 2.0 > 1.5
    assert tgt[("PyTorch eval / FrozenBatchNorm alloc (1t)", "1x64")][2] == pytest.approx(4.5)
    assert "| FrozenBatchNorm out= / copy (1t) | 1x64 | 0.80 | <= 1.0 | yes |" in out

    # two runs of the same group: each on its own, never one run's bnfast over the other's copy
    slow = json.loads(path.read_text())
    for b in slow["benchmarks"]:
        if b["name"] == "frozen-out":
            b["stats"]["median"] = 3e-6
    path2 = tmp_path / "run2.json"
    path2.write_text(json.dumps(slow))
    assert ratios.main([str(path), str(path2), "--targets-only"]) == 0
    captured = capsys.readouterr()
    assert "share benchmark groups" in captured.err
    assert f"## {path}" in captured.out and f"## {path2}" in captured.out
    assert "| FrozenBatchNorm out= / copy (1t) | 1x64 | 0.80 | <= 1.0 | yes |" in captured.out
    assert "| FrozenBatchNorm out= / copy (1t) | 1x64 | 3.00 | <= 1.0 | **no** |" in captured.out
    # runs of disjoint groups are merged, as one run
    other = json.loads(path.read_text())
    for b in other["benchmarks"]:
        b["extra_info"]["dtype"] = "float64"
    path3 = tmp_path / "run3.json"
    path3.write_text(json.dumps(other))
    assert ratios.main([str(path), str(path3), "--targets-only"]) == 0
    captured = capsys.readouterr()
    assert "##" not in captured.out and captured.err == ""
    assert captured.out.count("| FrozenBatchNorm out= / copy (1t) | 1x64 | 0.80 |") == 1


def test_interleaved_script(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bnfast_bench_interleaved",
                                                  os.path.join(ROOT, "benchmarks", "interleaved.py"))
    if spec is None or not os.path.exists(spec.origin):
        pytest.skip("benchmarks/interleaved.py not in this checkout")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "LAYOUTS", {"NCHW": ((4, 3, 5, 5), 1), "NC": ((50, 6), 1)})
    try:
        mod.main(["--reps", "3", "--no-torch", "--layouts", "NC,NCHW"])
    finally:
        bnfast.set_num_threads(None)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| N")]
    assert [r.split("|")[1].strip() for r in rows] == ["NC", "NCHW"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")][1:]
        assert len(cells) == 7 and all(float(c) > 0 for c in cells)   # copy (µs) first
    assert ("eval / copy | train / copy | backward / copy | fwd_bwd / copy | np.multiply / copy"
            " | backward eval / copy |") in out
    with pytest.raises(SystemExit):
        mod.main(["--layouts", "NCHW,bogus"])
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--layouts", ",", "--no-torch"])
    assert "--layouts: no layout given" in capsys.readouterr().err


def test_interleaved_script_floors(capsys, monkeypatch):
    """--floors: benchmarks/traffic.c compiled and timed beside the kernels; its passes
    compute what they say (a harness that moved no data would time nothing)."""
    mod = _load_benchmarks_module("interleaved.py")
    lib, why = mod.traffic_lib()
    if lib is None:
        pytest.skip(f"no C compiler for benchmarks/traffic.c: {why}")
    assert lib.traffic_kind().decode() in ("avx512", "avx2", "sse2", "c")
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 100, 1031):
        x, dy = rng.standard_normal((2, n + 1)).astype(np.float32)
        x, dy = x[1:], dy[1:]                   # off a 16-byte line: the unaligned head
        for stream in (1, 0):                   # streamed stores, plain ones
            out = np.full(n, np.nan, np.float32)
            lib.traffic_write(x.ctypes.data, dy.ctypes.data, out.ctypes.data, n, stream)
            np.testing.assert_array_equal(out, x + dy)
            out[:] = np.nan
            lib.traffic_write(x.ctypes.data, None, out.ctypes.data, n, stream)
            np.testing.assert_array_equal(out, x)
        ref = np.sum(x, dtype=np.float64) + np.sum(dy, dtype=np.float64)
        assert lib.traffic_read(x.ctypes.data, dy.ctypes.data, n) == pytest.approx(ref, abs=1e-3)
        assert lib.traffic_read(x.ctypes.data, None, n) == pytest.approx(
            np.sum(x, dtype=np.float64), abs=1e-3)
    monkeypatch.setattr(mod, "LAYOUTS", {"NC": ((50, 6), 1), "NCslice": ((40, 6), -1, 2)})
    try:
        mod.main(["--reps", "3", "--no-torch", "--floors", "--layouts", "NC,NCslice"])
    finally:
        bnfast.set_num_threads(None)
    out = capsys.readouterr().out
    assert "floors in " in out
    assert ("floor 1r+w / copy | floor 2r+w / copy | floor bwd 2r+w / copy | "
            "floor bwd 4r+w / copy |") in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")][2:]
            for line in out.splitlines() if line.startswith("| NC")}
    assert len(rows["NC"]) == 10 and all(float(c) > 0 for c in rows["NC"])
    assert rows["NCslice"][-5:-1] == ["—"] * 4    # strided rows: no floor (then backward eval)
    with pytest.raises(SystemExit):
        mod.main(["--floors", "--threads", "2", "--no-torch"])
    assert "--floors" in capsys.readouterr().err
    monkeypatch.setenv("CC", os.path.join(os.sep, "nonexistent", "cc"))
    assert mod.traffic_lib()[0] is None


def _load_benchmarks_module(name):
    path = os.path.join(ROOT, "benchmarks", name)
    if not os.path.exists(path):
        pytest.skip(f"benchmarks/{name} not in this checkout")
    spec = importlib.util.spec_from_file_location("bnfast_bench_" + name[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_max_time_is_seen_in_every_option_source(monkeypatch):
    """benchmarks/conftest.py sets 0.2 s per benchmark unless --benchmark-max-time is given:
    on the command line, in PYTEST_ADDOPTS or in the ini file's addopts."""
    conftest = _load_benchmarks_module("conftest.py")

    def max_time(args=(), env=None, ini=()):
        if env is None:
            monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
        else:
            monkeypatch.setenv("PYTEST_ADDOPTS", env)
        config = SimpleNamespace(_benchmarksession=SimpleNamespace(options={"max_time": 1.0}),
                                 invocation_params=SimpleNamespace(args=tuple(args)),
                                 getini=lambda name: list(ini) if name == "addopts" else [])
        conftest.pytest_sessionstart(SimpleNamespace(config=config))
        return config._benchmarksession.options["max_time"]

    assert max_time() == conftest.DEFAULT_MAX_TIME
    assert max_time(env="-ra", ini=["-q"], args=["benchmarks"]) == conftest.DEFAULT_MAX_TIME
    assert max_time(args=["--benchmark-max-time=1.0"]) == 1.0
    assert max_time(args=["--benchmark-max-time", "1.0"]) == 1.0
    assert max_time(env="-q --benchmark-max-time=1.0") == 1.0
    assert max_time(env="--benchmark-max-time 1.0") == 1.0
    assert max_time(ini=["-ra", "--benchmark-max-time=1.0"]) == 1.0


def test_benchmark_markers_describe_the_arrays():
    conftest = _load_benchmarks_module("conftest.py")
    lines = []
    conftest.pytest_configure(SimpleNamespace(addinivalue_line=lambda key, line: lines.append(line)))
    desc = dict(line.split(": ", 1) for line in lines)
    small = re.search(r"at most ([\d.]+) MB", desc["small"])
    large = re.search(r"([\d.]+)-([\d.]+) MB", desc["large"])
    assert small and large, desc
    with warnings.catch_warnings():     # its marks are registered by that conftest, not here
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        suite = _load_benchmarks_module("test_bench_batchnorm.py")
    for cid, dtype, _ in suite.PLAN:
        case = _bench.CASES[cid]
        mb = case.size * np.dtype(dtype).itemsize / 1e6
        if case.large:
            assert float(large.group(1)) <= mb <= float(large.group(2)), (cid, dtype, mb, desc)
        else:
            assert mb <= float(small.group(1)), (cid, dtype, mb, desc)


# ------------------------------------------------------------------------- the harness itself

@pytest.mark.parametrize("op", _bench.OPS)
@pytest.mark.parametrize("case", ["16x32", "4x8x5x5-NCHW", "4x5x5x8-NHWC", "16x32-NC-slice"])
def test_every_bench_implementation_computes_batch_norm(op, case):
    """The callables the benchmarks time compute the operation (checked against an independent float64
    formula here, not against bnfast), and a wrong result is caught."""
    c = {x.id: x for x in _bench.sweep_cases("tiny")}[case]
    d = _bench.get_data(c, np.float32)
    assert d.x.flags.c_contiguous == (c.pad == 0)      # a slice is timed as a view
    x64 = d.x.astype(np.float64)
    red = d.red
    mean = x64.mean(axis=red, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=red, keepdims=True)
    w, b = d.b(d.weight.astype(np.float64)), d.b(d.bias.astype(np.float64))
    if op == "eval":
        rm, rv = d.b(d.running_mean.astype(np.float64)), d.b(d.running_var.astype(np.float64))
        expect = (x64 - rm) / np.sqrt(rv + 1e-5) * w + b
    elif op == "train":
        expect = (x64 - mean) / np.sqrt(var + 1e-5) * w + b
    elif op == "backward_eval":
        rv = d.b(d.running_var.astype(np.float64))
        expect = d.dy.astype(np.float64) * w / np.sqrt(rv + 1e-5)
    else:
        xhat = (x64 - mean) / np.sqrt(var + 1e-5)
        dy = d.dy.astype(np.float64)
        n = x64.size // xhat.shape[d.axis]
        expect = (w / np.sqrt(var + 1e-5)) * (dy - dy.mean(axis=red, keepdims=True)
                                              - xhat * (dy * xhat).mean(axis=red, keepdims=True))
        assert n > 1
    np.testing.assert_allclose(_bench.reference(op, d), expect, rtol=1e-9, atol=1e-9)
    rows = 2
    np.testing.assert_allclose(_bench.reference(op, d, rows), expect[:rows], rtol=1e-9, atol=1e-9)
    for impl in _bench.impls_for(op):
        try:
            fn, result = _bench.make(op, c, np.float32, impl, 1)
        except _bench.Unavailable:
            continue
        fn()
        if result is None:
            continue
        got = np.asarray(result(), dtype=np.float64)
        tol = 1e-2 if impl in ("numpy", "torch", "onnxruntime") else 1e-5   # peers: inexact in float32
        np.testing.assert_allclose(got, expect, rtol=0, atol=tol * max(1, np.abs(expect).max()), err_msg=impl)
        if impl == "bnfast":
            with pytest.raises(AssertionError):
                _bench.check(op, d, np.zeros_like(got), impl)
    _bench.clear_data()


def test_parallel_copy_roofline_copies():
    c = _bench.CASES["256x1024"]
    d = _bench.get_data(c, np.float32)
    d.out[...] = 0
    fn, _ = _bench.make_copy(d, threads=3)      # 1 MiB: the plain copy
    fn()
    assert np.array_equal(d.out, d.x)
    d = _bench.get_data(_bench.CASES["2048x1024"], np.float32)
    d.out[...] = 0
    fn, _ = _bench.make_copy(d, threads=3)      # 8 MiB: split over 3 threads
    fn()
    assert np.array_equal(d.out, d.x)
    # a column slice (rows not contiguous, as 50176x256-NC-slice), 4.9 MB: the threads copy
    # x's own memory (x.reshape(-1) would be a copy of it, made once at setup)
    d = _bench.get_data(_bench._case((4096, 300), "NC-slice", pad=16), np.float32)
    assert not d.x.flags.c_contiguous and d.x.nbytes >= 4 << 20
    for threads in (2, 3):
        fn, _ = _bench.make_copy(d, threads=threads)
        d.out[...] = 0
        d.x[0, 0] = d.x[-1, -1] = -threads       # changed after setup: the copy sees it
        fn()
        assert np.array_equal(d.out, d.x)
        assert d.out[0, 0] == d.out[-1, -1] == -threads
    _bench.clear_data()


def test_bench_skips_a_peer_that_fails_to_import(tmp_path):
    # installed but broken (built for another NumPy, a missing library): it crashed the
    # bench with a traceback before anything was timed
    broken = tmp_path / "onnxruntime"
    broken.mkdir()
    (broken / "__init__.py").write_text('raise ImportError("simulated")\n')
    r = _run("bench", "--tiny", "--ops", "eval", "--threads", "1", "--budget", "0.001",
             path_first=[str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "installed but failing to import, skipped: onnxruntime" in r.stderr
    assert "simulated" in r.stderr and "Traceback" not in r.stderr


def test_thread_limit_caps_the_reported_count():
    # OMP_THREAD_LIMIT=1: bnfast ran one thread while get_num_threads(), `info` and the
    # bench's title said 2
    if not bnfast._core._build_info()["openmp"]:
        pytest.skip("built without OpenMP")
    code = ("import bnfast; a = bnfast.get_num_threads(); bnfast.set_num_threads(3); "
            "print(a, bnfast.get_num_threads())")
    env = dict(os.environ, OMP_THREAD_LIMIT="1", OMP_NUM_THREADS="4")
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=tempfile.gettempdir(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"]

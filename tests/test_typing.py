"""The package ships type information (PEP 561): ``py.typed`` and stubs for the compiled
module ``bnfast._core``. mypy checks a snippet that uses the public API correctly (no
error, and the precise types the stubs promise) and one that misuses it (each misuse
reported), against the source tree's ``bnfast``; ``mypy.stubtest`` checks the stubs
against the built module's real signatures.

The mypy tests are skipped where mypy is not installed (it is in the ``test`` extra).
"""
import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "bnfast"

GOOD = '''
from typing import Any

import numpy as np
from numpy.typing import NDArray
from typing_extensions import assert_type

import bnfast
from bnfast import _core

x32 = np.ones((4, 3), np.float32)
x64 = np.ones((4, 3))
rm = np.zeros(3, np.float32)
rv = np.ones(3, np.float32)

# batch_norm: positional order of torch.nn.functional.batch_norm, keyword-only axis/out
y = bnfast.batch_norm(x32, rm, rv, None, None, False, 0.1, 1e-5, axis=-1)
assert_type(y, NDArray[np.float32])
y64 = bnfast.batch_norm(x64, [0.0, 0.0, 0.0], (1.0, 1.0, 1.0), training=True,
                        axis=np.int64(1), out=np.empty_like(x64))
assert_type(y64, NDArray[np.float64])
assert_type(bnfast.batch_norm(np.ones((4, 3), np.int32), rm, rv), NDArray[np.float64])
assert_type(bnfast.batch_norm(x32.astype(np.float16), rm, rv), NDArray[np.float16])
assert_type(bnfast.batch_norm([[1.0, 2.0], [3.0, 4.0]], None, None, training=True),
            NDArray[np.floating[Any]])

# batch_norm_train: mean and invstd are float64 whatever x's dtype
yt, mean, invstd = bnfast.batch_norm_train(x32, rm, None, eps=1e-3, axis=1, running_mean=rm,
                                           running_var=rv, momentum=0.01, out=None)
assert_type(yt, NDArray[np.float32])
assert_type(mean, NDArray[np.float64])
assert_type(invstd, NDArray[np.float64])

# batch_norm_backward
dx, dw, db = bnfast.batch_norm_backward(np.ones_like(x32), x32, mean, invstd, None,
                                        training=False, axis=1, out=np.empty_like(x32))
assert_type(dx, NDArray[np.float32])
assert_type(dw, NDArray[np.float32])
assert_type(db, NDArray[np.float32])

# FrozenBatchNorm
f = bnfast.FrozenBatchNorm(mean, 1.0 / invstd**2, None, [0.0, 0.0, 0.0], 1e-5, axis=-1)
assert_type(f(x32), NDArray[np.float32])
assert_type(f(x64, out=np.empty_like(x64)), NDArray[np.float64])
assert_type(f.mean, NDArray[np.float64])
assert_type(f.var, NDArray[np.float64])
assert_type(f.weight, NDArray[np.float64] | None)
assert_type(f.bias, NDArray[np.float64] | None)
assert_type(f.eps, float)
assert_type(f.axis, int)
assert_type(f.num_features, int)

# threads, build facts, version
bnfast.set_num_threads(2)
bnfast.set_num_threads(None)
assert_type(bnfast.get_num_threads(), int)
info = _core._build_info()
assert_type(info["openmp"], bool)
assert_type(info["openmp_version"], int)
assert_type(info["simd_isa"], str)
assert_type(info["simd_loops"], str)
assert_type(info["fma"], str)
assert_type(bnfast.__version__, str)

# the layer (plain Python) is usable from typed code
bn = bnfast.BatchNorm1d(3, 1e-5, None, axis=1, dtype=np.float64)
frozen = bn.eval().freeze()
out = frozen(x64)
'''

# Every line marked "# E" must get an error; no other line may.
BAD = '''
import numpy as np
from numpy.typing import NDArray

import bnfast
from bnfast import _core

x = np.ones((4, 3), np.float32)
rm = np.zeros(3, np.float32)
rv = np.ones(3, np.float32)
f = bnfast.FrozenBatchNorm(rm, rv)

bnfast.batch_norm(x, rm, rv, axis="x")  # E: axis is an int
bnfast.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-5, 1)  # E: axis is keyword-only
bnfast.batch_norm(x, rm)  # E: running_var is required
bnfast.batch_norm_train(x, None, None, 1e-5)  # E: eps is keyword-only
bnfast.batch_norm_train(x, eps="small")  # E: eps is a number
bnfast.batch_norm_backward(x, x, rm, rv, None, True)  # E: training is keyword-only
f(x, None)  # E: out is keyword-only
f.mean = rm  # E: read-only attribute
f.num_features = 4  # E: read-only attribute
bnfast.set_num_threads("4")  # E: an int or None
mean32: NDArray[np.float32] = bnfast.batch_norm_train(x)[1]  # E: mean is float64
_core.batch_norm_fast(x)  # E: no such function
'''

# A misspelled public name. bnfast/__init__.py resolves its lazy names in a module-level
# __getattr__, which makes mypy accept *any* attribute of bnfast unless that __getattr__
# is hidden from type checkers (``if not TYPE_CHECKING:``) and the lazy names imported
# under ``if TYPE_CHECKING:``.
BAD_NAMES = '''
import numpy as np

import bnfast

x = np.ones((4, 3), np.float32)
bnfast.batch_norn(x, None, None, training=True)  # E: misspelled batch_norm
bnfast.from_torhc(None)  # E: misspelled from_torch
bnfast.fold_linear(np.ones((2, 3)), None)  # E: bn is required
'''

@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory):
    """One mypy run over the three snippets (one start-up, one load of numpy's stubs)."""
    pytest.importorskip("mypy.api", reason="mypy is not installed")
    d = tmp_path_factory.mktemp("typing")
    for name, text in (("good.py", GOOD), ("bad.py", BAD), ("bad_names.py", BAD_NAMES)):
        (d / name).write_text(textwrap.dedent(text))
    env = dict(os.environ, MYPYPATH=str(ROOT))
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", os.devnull,
           "--follow-imports=silent",  # report errors in the snippets, not in bnfast's code
           "--no-error-summary", "--show-error-codes", "--no-color-output",
           "--python-executable", sys.executable,
           "good.py", "bad.py", "bad_names.py"]
    proc = subprocess.run(cmd, check=False, cwd=d, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode in (0, 1), f"mypy crashed:\n{proc.stdout}\n{proc.stderr}"
    errors = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^([\w.]+\.py):(\d+): error: (.*)$", line)
        if m:
            errors.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(m.group(3))
    return errors, proc.stdout


def _marked_lines(text):
    return {i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1)
            if "# E" in line}


def _check_marked(report, name, text):
    errors, stdout = report
    found = errors.get(name, {})
    marked = _marked_lines(text)
    lines = textwrap.dedent(text).splitlines()
    missed = [lines[i - 1].strip() for i in sorted(marked - set(found))]
    extra = [f"{i}: {found[i]}" for i in sorted(set(found) - marked)]
    assert not missed, "mypy accepted these misuses:\n" + "\n".join(missed) + "\n" + stdout
    assert not extra, "mypy reported unexpected errors:\n" + "\n".join(extra)


def test_correct_usage_type_checks_with_precise_types(mypy_report):
    errors, stdout = mypy_report
    assert "good.py" not in errors, "mypy rejected correct use of the API:\n" + stdout


def test_misuse_is_reported(mypy_report):
    _check_marked(mypy_report, "bad.py", BAD)


def test_misspelled_public_name_is_reported(mypy_report):
    _check_marked(mypy_report, "bad_names.py", BAD_NAMES)


def _public_script():
    """Every public name of bnfast, imported by name and used as an attribute."""
    import bnfast
    names = [n for n in bnfast.__all__ if n != "__version__"]
    return "\n".join(["import bnfast", "from bnfast import __version__"]
                     + [f"from bnfast import {n}" for n in names]
                     + [f"print(bnfast.{n}, {n})" for n in names]
                     + ["print(bnfast.__version__, bnfast.distributed.SyncBatchNorm)", ""])


def test_public_names_are_exported_to_strict_mypy(tmp_path):
    """--no-implicit-reexport (part of --strict) accepts only names that bnfast exports
    explicitly: in a literal __all__ or as `import a as a`."""
    pytest.importorskip("mypy.api", reason="mypy is not installed")
    (tmp_path / "public.py").write_text(_public_script())
    env = dict(os.environ, MYPYPATH=str(ROOT))
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", os.devnull, "--follow-imports=silent",
           "--no-implicit-reexport", "--no-error-summary", "--show-error-codes",
           "--no-color-output", "--python-executable", sys.executable, "public.py"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"mypy --no-implicit-reexport:\n{proc.stdout}\n{proc.stderr}"


def test_all_is_literal_and_matches_the_lazy_names():
    """mypy reads only a literal __all__; it must list every lazily loaded name, and the
    TYPE_CHECKING imports must re-export them explicitly (`from m import a as a`)."""
    import bnfast
    tree = ast.parse((PKG / "__init__.py").read_text())
    literal = None
    type_checking = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                for t in node.targets):
            assert isinstance(node.value, ast.List), "__all__ is not a list literal"
            assert all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                       for e in node.value.elts), "__all__ holds more than string literals"
            literal = [e.value for e in node.value.elts]
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                if isinstance(imp, ast.ImportFrom):
                    for a in imp.names:
                        type_checking[a.name] = a.asname
    assert literal == list(bnfast.__all__)
    assert len(set(literal)) == len(literal), "duplicates in __all__"
    assert set(bnfast._LAZY) <= set(literal), set(bnfast._LAZY) - set(literal)
    assert set(type_checking) == set(bnfast._LAZY) | {"distributed"}
    assert all(alias == name for name, alias in type_checking.items()), type_checking
    for name in literal:
        assert getattr(bnfast, name) is not None, name


def _typeddict_fields(stub, cls):
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {n.target.id: ast.unparse(n.annotation) for n in node.body
                    if isinstance(n, ast.AnnAssign)}
    raise AssertionError(f"no class {cls} in {stub}")


def test_build_info_typeddict_has_the_runtime_keys():
    """_core.pyi's _BuildInfo names every key (with its type) that _build_info() returns."""
    core = importlib.import_module("bnfast._core")
    info = core._build_info()
    fields = _typeddict_fields(PKG / "_core.pyi", "_BuildInfo")
    assert set(fields) == set(info), (sorted(fields), sorted(info))
    for key, value in info.items():
        assert fields[key] == type(value).__name__, (key, fields[key], value)


def test_stubs_match_the_compiled_module(tmp_path):
    """mypy.stubtest: every runtime name of bnfast._core is in the stub with the same
    parameters (names, kinds, defaults), and the stub promises nothing that is absent."""
    pytest.importorskip("mypy.stubtest", reason="mypy is not installed")
    importlib.import_module("bnfast._core")  # the built extension must be importable

    # stubtest reads the stub from an isolated copy so that it checks _core.pyi alone
    # (not the rest of the package's Python code); the runtime module is the real one.
    stubs = tmp_path / "stubs" / "bnfast"
    stubs.mkdir(parents=True)
    (stubs / "_core.pyi").write_text((PKG / "_core.pyi").read_text())
    (stubs / "__init__.pyi").write_text("")
    allow = tmp_path / "allowlist.txt"
    allow.write_text(textwrap.dedent("""\
        # Cython's generated pickling helpers and its doctest table are not API
        bnfast\\._core\\.__reduce_cython__
        bnfast\\._core\\.__setstate_cython__
        bnfast\\._core\\.FrozenBatchNorm\\.__reduce_cython__
        bnfast\\._core\\.FrozenBatchNorm\\.__setstate_cython__
        bnfast\\._core\\.__test__
        """))
    env = dict(os.environ, MYPYPATH=str(tmp_path / "stubs"),
               # the bnfast under test, not the checkout's source (which has no build)
               PYTHONPATH=os.pathsep.join([str(_package_parent()),
                                           os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "mypy.stubtest", "--mypy-config-file", os.devnull,
            "--allowlist", str(allow), "--ignore-unused-allowlist"]
    # PEP 800 disjoint bases: not expressible for a Cython class on older mypys
    cmd = base + ["--ignore-disjoint-bases", "bnfast._core"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    if "unrecognized arguments" in proc.stderr:
        proc = subprocess.run(base + ["bnfast._core"], check=False, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stubtest:\n{proc.stdout}\n{proc.stderr}"


def test_stub_holds_every_core_name_the_package_uses():
    """The package's own modules import private helpers from bnfast._core; a name missing
    from the stub makes `mypy -p bnfast` fail (attr-defined), which stubtest does not see
    (it checks private runtime names only where the stub has them)."""
    stub = ast.parse((PKG / "_core.pyi").read_text())
    defined = set()
    for node in stub.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    defined.add(t.id)
    used = {}
    for path in sorted(PKG.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module in ("bnfast._core", "_core"):
                names = [a.name for a in node.names]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "_core"):
                names = [node.attr]
            for n in names:
                used.setdefault(n, path.name)
    assert len(used) > 10, used     # the scan found the imports
    missing = {n: f for n, f in used.items() if n not in defined and n != "__file__"}
    assert not missing, f"used from bnfast._core but not in _core.pyi: {missing}"


def _package_parent():
    return Path(importlib.util.find_spec("bnfast").origin).resolve().parent.parent


def test_pep561_files_are_in_the_package():
    assert (PKG / "py.typed").is_file()
    assert (PKG / "_core.pyi").is_file()
    # shipped in wheels: pyproject.toml lists them as package data
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"^\[tool\.setuptools\.package-data\]\s*\nbnfast\s*=\s*\[([^\]]*)\]", text,
                  re.MULTILINE)
    assert m, "pyproject.toml: no [tool.setuptools.package-data] entry for bnfast"
    assert '"py.typed"' in m.group(1) and '.pyi"' in m.group(1), m.group(0)

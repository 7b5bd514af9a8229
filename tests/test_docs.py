"""Documentation is part of the API: every public docstring runs (doctest), has an
example and a NumPy-style "Parameters" section naming each parameter; the README's
Python examples run; ``bnfast.__version__`` is the packaged version.

README blocks: every fenced ```python block that contains ``>>>`` is run as a doctest,
each block on its own (fresh namespace: a block imports what it uses). A block that
needs an optional dependency names it in an HTML comment on the line just before the
fence, e.g. ``<!-- requires: torch -->`` or ``<!-- requires: onnx, onnxruntime -->``;
it is skipped where that module is missing. Modules a docstring example imports are
required the same way, without any marker.
"""
import ast
import doctest
import importlib.util
import inspect
import os
import re
import textwrap
from pathlib import Path

import pytest

import bnfast

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STUB = ROOT / "bnfast" / "_core.pyi"
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS

# Public objects whose examples need a module they do not import themselves.
REQUIRES = {"bnfast.distributed.SyncBatchNorm": ["mpi4py"]}


# ----------------------------------------------------------------------------------
# What is public

def _unwrap(v):
    return v.__func__ if isinstance(v, (staticmethod, classmethod)) else v


def _members(cls, qual):
    """Public methods (and __call__) and properties defined by the class itself."""
    methods, props = [], []
    for k, v in vars(cls).items():
        if k.startswith("_") and k != "__call__":
            continue
        v = _unwrap(v)
        if isinstance(v, property) or inspect.isgetsetdescriptor(v) \
                or inspect.ismemberdescriptor(v):
            props.append((f"{qual}.{k}", v))
        elif callable(v):
            methods.append((f"{qual}.{k}", v))
    return methods, props


def _public():
    callables, props = [], []
    classes = [(f"bnfast.{n}", getattr(bnfast, n)) for n in bnfast.__all__
               if n != "__version__"]
    from bnfast.distributed import SyncBatchNorm

    classes.append(("bnfast.distributed.SyncBatchNorm", SyncBatchNorm))
    for qual, obj in classes:
        callables.append((qual, obj))
        if inspect.isclass(obj):
            m, p = _members(obj, qual)
            callables += m
            props += p
    return callables, props


CALLABLES, PROPERTIES = _public()


def _doc(obj):
    d = inspect.getdoc(obj) if not isinstance(obj, str) else obj
    return d or ""


# ----------------------------------------------------------------------------------
# Parameters of a callable (from the stub where the compiled module hides them)

def _stub_params():
    """{qualified name: [parameter names]} from bnfast/_core.pyi (the first overload)."""
    tree = ast.parse(STUB.read_text())
    found = {}

    def args_of(fn):
        a = fn.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
        return [n for n in names if n not in ("self", "cls")]

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found.setdefault(f"bnfast.{node.name}", args_of(node))
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef):
                    key = f"bnfast.{node.name}.{sub.name}"
                    found.setdefault(key, args_of(sub))
            if f"bnfast.{node.name}.__init__" in found:
                found[f"bnfast.{node.name}"] = found[f"bnfast.{node.name}.__init__"]
    return found


_STUB_PARAMS = _stub_params()


def _params(qual, obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        names = [p.name for p in sig.parameters.values()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                 and p.name not in ("self", "cls")]
        if names or not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                            for p in sig.parameters.values()):
            return names
    if qual in _STUB_PARAMS:
        return _STUB_PARAMS[qual]
    pytest.fail(f"{qual}: cannot read its signature (and it is not in _core.pyi)")


def _sections(doc):
    """{section title: body text} of a NumPy-style docstring."""
    lines = doc.splitlines()
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and re.fullmatch(r"\s*-{3,}\s*", lines[i + 1])
             and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 1]
    out = {}
    for k, i in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        out[lines[i].strip()] = "\n".join(lines[i + 2:end])
    return out


def _documented_names(section):
    """Names listed in a Parameters section: the unindented lines ``a, b : type``."""
    body = textwrap.dedent(section)
    names = set()
    for line in body.splitlines():
        if not line.strip() or line[:1].isspace():
            continue
        head = line.split(" :")[0]
        for n in head.split(","):
            n = n.strip().lstrip("*")
            if n:
                names.add(n)
    return names


# ----------------------------------------------------------------------------------
# Running examples

def _imports(test):
    mods = set()
    for ex in test.examples:
        if ex.options.get(doctest.SKIP):
            continue
        try:
            tree = ast.parse(ex.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return sorted(mods)


def run_doctest(text, name, requires=(), globs=None, filename=None, lineno=0):
    """Run the ``>>>`` examples in text; skip if a required or imported module is
    missing; fail with doctest's report."""
    test = doctest.DocTestParser().get_doctest(text, dict(globs or {}), name,
                                               filename or name, lineno)
    for mod in list(requires) + _imports(test):
        if mod == "keras" and importlib.util.find_spec("torch") is not None:
            os.environ.setdefault("KERAS_BACKEND", "torch")  # as tests/test_interop.py
        pytest.importorskip(mod, reason=f"{name} needs {mod}")
    report = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    failed, _ = runner.run(test, out=report.append)
    assert failed == 0, "".join(report)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Examples may write files (save/load): do it in a scratch directory."""
    monkeypatch.chdir(tmp_path)
    # examples may set a thread count; leave the process as it was
    yield
    bnfast.set_num_threads(None)


# ----------------------------------------------------------------------------------
# Docstrings

_with_examples = [(q, o) for q, o in CALLABLES + PROPERTIES if ">>>" in _doc(o)]


@pytest.mark.parametrize("qual,obj", _with_examples, ids=[q for q, _ in _with_examples])
def test_docstring_examples_run(qual, obj, in_tmp):
    requires = [m for k, mods in REQUIRES.items() if qual == k or qual.startswith(k + ".")
                for m in mods]
    run_doctest(_doc(obj), qual, requires)


@pytest.mark.parametrize("qual,obj", CALLABLES, ids=[q for q, _ in CALLABLES])
def test_docstring_has_an_example(qual, obj):
    doc = _doc(obj)
    assert doc.strip(), f"{qual} has no docstring"
    assert ">>>" in doc, f"{qual}: docstring has no example (an Examples section with >>>)"


@pytest.mark.parametrize("qual,obj", CALLABLES, ids=[q for q, _ in CALLABLES])
def test_docstring_documents_parameters(qual, obj):
    params = _params(qual, obj)
    if not params:
        return
    sections = _sections(_doc(obj))
    assert "Parameters" in sections, \
        f"{qual}{tuple(params)}: docstring has no NumPy-style 'Parameters' section"
    missing = [p for p in params if p not in _documented_names(sections["Parameters"])]
    assert not missing, f"{qual}: parameters not in its 'Parameters' section: {missing}"


def test_all_names_resolve():
    assert len(set(bnfast.__all__)) == len(bnfast.__all__), "duplicates in __all__"
    for name in bnfast.__all__:
        assert getattr(bnfast, name) is not None, name
        assert name in dir(bnfast), name
    assert len(set(dir(bnfast))) == len(dir(bnfast)), "a loaded lazy name listed twice"


def test_version_is_the_packaged_version():
    assert isinstance(bnfast.__version__, str)
    assert re.fullmatch(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[\w.]+)?",
                        bnfast.__version__), bnfast.__version__
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads(text)["project"]
    if "version" in project.get("dynamic", []):
        attr = tomllib.loads(text)["tool"]["setuptools"]["dynamic"]["version"]["attr"]
        assert attr == "bnfast.__version__"
    else:
        assert bnfast.__version__ == project["version"]


# ----------------------------------------------------------------------------------
# README

def readme_blocks(path):
    """[(line, code, requires)] for the fenced python blocks of a Markdown file."""
    text = Path(path).read_text()
    blocks = []
    fence = re.compile(r"^([ \t]*)```[ \t]*(?:python|py|pycon)[ \t]*\n(.*?)^[ \t]*```[ \t]*$",
                       re.MULTILINE | re.DOTALL)
    for m in fence.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        code = textwrap.dedent(m.group(2))
        before = text[:m.start()].rstrip().splitlines()
        requires = []
        if before:
            mm = re.fullmatch(r"\s*<!--\s*requires:\s*(.*?)\s*-->\s*", before[-1])
            if mm:
                requires = [r for r in re.split(r"[\s,]+", mm.group(1)) if r]
        blocks.append((line, code, requires))
    return blocks


def run_readme_block(path, line, code, requires):
    # lineno: the fence's line, so doctest reports the README's own line numbers
    run_doctest(code, f"{Path(path).name}:{line}", requires, filename=Path(path).name,
                lineno=line)


_README_BLOCKS = [b for b in readme_blocks(README) if ">>>" in b[1]] if README.exists() else []


def test_readme_has_runnable_examples():
    assert README.exists()
    assert _README_BLOCKS, "README.md has no ```python block with >>> examples (the API tour)"


@pytest.mark.parametrize("line,code,requires", _README_BLOCKS,
                         ids=[f"README.md:{b[0]}" for b in _README_BLOCKS])
def test_readme_example(line, code, requires, in_tmp):
    run_readme_block(README, line, code, requires)

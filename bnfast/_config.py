"""``bnfast.show_config()`` / ``python -m bnfast info``: what this build is and what it runs on."""
from __future__ import annotations

import os
import platform
import re
import sys
import sysconfig

_OMP_VERSIONS = {
    199810: "1.0", 200203: "2.0", 200505: "2.5", 200805: "3.0", 201107: "3.1", 201307: "4.0",
    201511: "4.5", 201811: "5.0", 202011: "5.1", 202111: "5.2", 202411: "6.0",
}


def _extension_compiler(path):
    """The compiler named in the compiled module's own bytes (ELF ``.comment``), or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    found = []
    for m in re.finditer(rb"(GCC: \([^)\x00]{0,80}\) [\w.+\-]{1,40}|(?:Apple |Ubuntu |Debian |Homebrew )?"
                         rb"clang version [\w.+\-]{1,40}|Intel\(R\) oneAPI DPC\+\+/C\+\+ Compiler [\w.+\-]+)",
                         data):
        s = m.group(0).decode("ascii", "replace")
        if s not in found:
            found.append(s)
    return "; ".join(found[-2:]) if found else None


def _openmp_runtimes():
    """OpenMP runtimes loaded in this process, from threadpoolctl (None when it is not installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    out = []
    for info in threadpool_info():
        if info.get("user_api") == "openmp":
            out.append(f"{info.get('prefix')} {info.get('version') or ''} ({info.get('filepath')}, "
                       f"{info.get('num_threads')} threads)".replace("  ", " "))
    return out


def _cpu():
    """The CPU's model name and the logical CPUs this process may run on: benchmark ratios
    depend on both (the same build is compute-bound on one machine, memory-bound on
    another)."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or "unknown"
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 0
    return f"{model}, {n} logical CPU(s) available"


def config_info():
    """The facts ``show_config`` prints, as an ordered dict of strings."""
    import numpy as np

    import bnfast
    from bnfast import _core

    build = _core._build_info()
    omp = build.get("openmp")
    ver = int(build.get("openmp_version") or 0)
    if omp:
        omp_s = f"enabled (OpenMP {_OMP_VERSIONS.get(ver, '?')}, _OPENMP={ver})"
    else:
        omp_s = "disabled (built without OpenMP: kernels run serially)"
    runtimes = _openmp_runtimes()
    if not omp:     # another library's runtime is not bnfast's
        rt = "none (built without OpenMP)"
        if runtimes:
            rt += "; loaded by other libraries: " + "; ".join(runtimes)
    elif runtimes is None:
        rt = "unknown (pip install threadpoolctl to see it)"
    elif runtimes:
        rt = "; ".join(runtimes)
    else:
        rt = "none loaded"
    cc = sysconfig.get_config_var("CC") or "unknown"
    built = _extension_compiler(getattr(_core, "__file__", "") or "")
    info = {
        "bnfast": bnfast.__version__,
        "location": bnfast.__path__[0] if hasattr(bnfast, "__path__") else "?",
        "compiler": built or "unknown",
        "sysconfig CC": cc,
        "OpenMP": omp_s,
        "OpenMP runtime": rt,
        "threads": str(bnfast.get_num_threads()),
        "SIMD ISA": build.get("simd_isa", "unknown"),
        "inner loops": build.get("simd_loops", "unknown"),
        "fused multiply-add": build.get("fma", "unknown"),
        "NumPy": np.__version__,
        "Python": f"{platform.python_version()} ({platform.python_implementation()}, "
                  f"{platform.python_compiler()})",
        "platform": f"{platform.platform()} {platform.machine()}",
        "CPU": _cpu(),
    }
    return info


def show_config(file=None):
    """Print bnfast's version, build (compiler, OpenMP) and runtime (threads, SIMD ISA, NumPy, Python).

    Parameters
    ----------
    file : file-like, optional
        Where to print (default ``sys.stdout``).

    Examples
    --------
    >>> import bnfast
    >>> bnfast.show_config()  # doctest: +ELLIPSIS
    bnfast: ...
    """
    file = sys.stdout if file is None else file
    info = config_info()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k + ':':{width + 1}s} {v}", file=file)

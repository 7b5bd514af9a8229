"""Build of bnfast's compiled core: Cython kernels over the C inner loops in src/.

OpenMP flags are chosen per compiler (gcc/clang: -fopenmp, MSVC: /openmp, Apple clang:
-Xpreprocessor -fopenmp -lomp) after a test compile; without OpenMP the build goes on,
serially, and says so.  No -march=native and no -ffast-math: SIMD comes from
`#pragma omp simd` and runtime dispatch (target_clones) in src/.
"""
import concurrent.futures
import os
import sys
import tempfile
import textwrap

import numpy as np
import setuptools
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# pyproject.toml's `license` is an SPDX string (PEP 639), which older setuptools reject with
# a schema error that does not say why; pip's isolated builds fetch a new enough one
if tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit()) < (77, 0):
    sys.exit(f"bnfast needs setuptools >= 77.0.3 to build (this is {setuptools.__version__}): "
             "pip install -U 'setuptools>=77.0.3'")

OMP_TEST = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


def _openmp_candidates(compiler_type):
    """(compile flags, link flags) to try, in order."""
    if compiler_type == "msvc":
        return [(["/openmp"], [])]
    if sys.platform == "darwin":
        return [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    return [(["-fopenmp"], ["-fopenmp"])]


def _env_flag(name):
    """A BNFAST_* switch: set unless empty, 0, false, no or off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


# What the compiled core depends on beyond its sources: a rebuild in the same tree
# with any of these changed recompiles (setuptools compares only file times, and had
# installed the serial or -ffast-math build's stale .so again while saying "serial").
_CONFIG_ENV = ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS", "BNFAST_DISABLE_OPENMP",
               "BNFAST_EXTRA_CFLAGS", "BNFAST_EXTRA_LDFLAGS")


class BuildExt(build_ext):
    """build_ext that adds OpenMP when the compiler has it, and optimisation flags."""

    def run(self):
        config = repr([(k, os.environ.get(k)) for k in _CONFIG_ENV] + [sys.version])
        stamp = os.path.join(self.build_temp, "bnfast-build-config")
        try:
            with open(stamp) as f:
                same = f.read() == config
        except OSError:
            same = False
        if not same:
            self.force = True
            if os.path.exists(stamp):   # a build that fails half way is redone whole
                os.remove(stamp)
        super().run()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(config)

    def _try_openmp(self, cflags, ldflags):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "omp_test.c")
            with open(src, "w") as f:
                f.write(OMP_TEST)
            try:
                objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                self.compiler.link_executable(
                    objs, os.path.join(tmp, "omp_test"), extra_postargs=ldflags
                )
            except Exception:
                return False
        return True

    def _has_flag(self, flag):
        """The compiler accepts flag without a warning."""
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "flag_test.c")
            with open(src, "w") as f:
                f.write("int main(void) { return 0; }\n")
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=["-Werror", flag])
            except Exception:
                return False
        return True

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            base = ["/O2", "/fp:precise"]
        else:
            # -ffp-contract=off: no implicit FMA contraction, so every ISA clone gives the same
            # bits; the kernels fuse explicitly, with fma() (exact everywhere).
            base = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-Wno-unused-function"]
            # No debug information (Python's own CFLAGS ask for -g): it was 85% of the
            # kernels' object (25 MB of 29) and 10% of their compile time; a debug build
            # adds it back with BNFAST_EXTRA_CFLAGS=-g, as the sanitizer job does.
            base.append("-g0")
            # gcc turns short copy and fill loops (a few hundred doubles) into inline
            # `rep movsq` / `rep stosq`, whose start-up cost dominated small calls: a
            # normalize of 64 rows x 8 channels took 1.4 us with them, 0.17 us without.
            if self._has_flag("-fno-tree-loop-distribute-patterns"):
                base.append("-fno-tree-loop-distribute-patterns")
        omp_c, omp_l = [], []
        if _env_flag("BNFAST_DISABLE_OPENMP"):
            print("bnfast: OpenMP disabled by BNFAST_DISABLE_OPENMP; building serial kernels")
        else:
            for cflags, ldflags in _openmp_candidates(ctype):
                if self._try_openmp(cflags, ldflags):
                    omp_c, omp_l = cflags, ldflags
                    break
            else:
                print(
                    "WARNING: bnfast: the compiler has no usable OpenMP; building serial "
                    "kernels (correct, single-threaded)",
                    file=sys.stderr,
                )
        if not omp_c and ctype != "msvc" and self._has_flag("-fopenmp-simd"):
            # the `#pragma omp simd` hints without the runtime (gcc, clang): otherwise
            # ignored, with a warning each
            base.append("-fopenmp-simd")
        extra_c = os.environ.get("BNFAST_EXTRA_CFLAGS", "").split()
        extra_l = os.environ.get("BNFAST_EXTRA_LDFLAGS", "").split()
        for ext in self.extensions:
            ext.extra_compile_args = base + omp_c + extra_c
            ext.extra_link_args = omp_l + extra_l
        self._compile_sources_in_parallel()
        super().build_extensions()

    def _compile_sources_in_parallel(self):
        """Compile an extension's C sources at once, one a thread (the compiler runs as
        a process of its own), up to the CPUs: the kernels alone take ~4-5 minutes."""
        serial = self.compiler.compile
        jobs = min(2, os.cpu_count() or 1)    # two sources: the Cython module, the kernels
        if jobs < 2:
            return

        def compile(sources, *args, **kwargs):
            if len(sources) < 2:
                return serial(sources, *args, **kwargs)
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                parts = list(pool.map(lambda src: serial([src], *args, **kwargs), sources))
            return [obj for part in parts for obj in part]

        self.compiler.compile = compile


extensions = [
    Extension(
        "bnfast._core",
        sources=["bnfast/_core.pyx", "src/bnfast_kernels.c"],
        include_dirs=["src", np.get_include()],
        depends=["src/bnfast_kernels.h", "src/bnfast_kernels_impl.h",
                 "src/bnfast_kernels_simd.h", "src/bnfast_kernels_elem.h",
                 "src/bnfast_outcache.h"],
        # NumPy 1.22's C API (memory handlers: src/bnfast_outcache.h); bnfast needs 1.23
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
                       ("NPY_TARGET_VERSION", "NPY_1_22_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3"},
        compile_time_env={},
    ),
    cmdclass={"build_ext": BuildExt},
)

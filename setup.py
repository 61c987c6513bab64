"""Build fastrnn's compiled extension (Cython over the C kernels in csrc/).

BLAS comes from SciPy through ``scipy.linalg.cython_blas``; nothing else is
linked.  OpenMP is used when the compiler accepts it, and the extension builds
cleanly without it otherwise.  Set ``FASTRNN_CYTHON_DEBUG=1`` to compile with
bounds checks and without optimisation.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import Extension, setup

DEBUG = os.environ.get("FASTRNN_CYTHON_DEBUG", "") not in ("", "0")

# The declarative table of extensions: name -> sources.
EXTENSIONS = {
    "fastrnn._cykernels": ["fastrnn/_cykernels.pyx", "csrc/rnn_kernels.c"],
}

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
}


def _compiler():
    return (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()


def openmp_flags():
    """The OpenMP compile/link flags this compiler accepts, or [] without it."""
    if os.environ.get("FASTRNN_NO_OPENMP"):
        return []
    if sys.platform == "win32":
        return ["/openmp"]
    candidates = ["-fopenmp"] if sys.platform != "darwin" else ["-Xpreprocessor -fopenmp"]
    code = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    for flag in candidates:
        tmp = tempfile.mkdtemp()
        try:
            src = os.path.join(tmp, "omp.c")
            with open(src, "w") as f:
                f.write(code)
            cmd = _compiler() + flag.split() + [src, "-o", os.path.join(tmp, "omp")] + flag.split()
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return flag.split()
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print("fastrnn: the C compiler has no OpenMP; building without it", file=sys.stderr)
    return []


def extensions():
    from Cython.Build import cythonize

    omp = openmp_flags()
    if sys.platform == "win32":
        cflags = ["/O2"]
    else:
        cflags = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
    macros = [("FASTRNN_OPENMP", "1")] if omp else []
    exts = [Extension(name, sources, include_dirs=["csrc"], define_macros=macros,
                      extra_compile_args=cflags + omp, extra_link_args=omp)
            for name, sources in EXTENSIONS.items()]
    return cythonize(exts, compiler_directives=CYTHON_DIRECTIVES)


setup(ext_modules=extensions())

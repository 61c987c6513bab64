"""Build fastrnn's compiled extension (Cython over the C kernels in csrc/).

BLAS comes from SciPy through ``scipy.linalg.cython_blas``; nothing else is
linked.  The kernels' threads are their own small POSIX-threads team
(csrc/fr_pool.c; without POSIX threads they run on the caller's thread).
Set ``FASTRNN_CYTHON_DEBUG=1`` to compile with bounds checks and without
optimisation.
"""
import glob
import os
import sys

from setuptools import Extension, setup

DEBUG = os.environ.get("FASTRNN_CYTHON_DEBUG", "") not in ("", "0")

# The declarative table of extensions: name -> sources.
EXTENSIONS = {
    "fastrnn._cykernels": ["fastrnn/_cykernels.pyx", "csrc/rnn_kernels.c",
                           "csrc/fr_pool.c"],
}

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
}


def extensions():
    from Cython.Build import cythonize

    if sys.platform == "win32":
        cflags, ldflags = ["/O2"], []
    else:
        cflags = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
        cflags, ldflags = cflags + ["-pthread"], ["-pthread"]
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")))   # rebuild when they change
    exts = [Extension(name, sources, include_dirs=["csrc"], depends=headers,
                      extra_compile_args=cflags, extra_link_args=ldflags)
            for name, sources in EXTENSIONS.items()]
    return cythonize(exts, compiler_directives=CYTHON_DIRECTIVES)


setup(ext_modules=extensions())
